"""Stage `score` -> runs/<b>/score/metrics.json (DVC metrics).

Digits: FID and KID of the samples against the real train split (torch-fidelity), with the real-vs-real
floor (as many test images vs train) and the untrained-model ceiling, and conditional accuracy.
Inception benchmarks: FID, IS, KID (against our reference images), and the CLIP score for
text-to-image. The scoring lives in :mod:`uvit.evaluate.score`.
"""

from __future__ import annotations

from uvit.config import BenchmarkConfig
from uvit.fileio import write_json
from uvit.paths import BenchmarkPaths


def run_score(cfg: BenchmarkConfig, paths: BenchmarkPaths) -> dict:
    """runs/<b>/score/metrics.json: the digits metrics, or the Inception ones (uvit.evaluate.score)."""
    from uvit.evaluate.sample import load_samples
    from uvit.evaluate.score import score_digits, score_inception

    samples, labels = load_samples(paths.samples / "samples.npz")
    if cfg.score.feature_extractor == "inception":
        metrics = score_inception(cfg, paths, samples)
    else:
        metrics = score_digits(cfg, paths, samples, labels)
    write_json(paths.score / "metrics.json", metrics)
    return metrics
