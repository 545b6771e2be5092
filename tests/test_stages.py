"""Stage functions beyond digits: the Inception-FID score path of the paper benchmarks."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest

from uvit.config import load_benchmark, load_params
from uvit.data.shards import write_split
from uvit.evaluate.fid import FeatureSpace, fid, fid_statistics, save_fid_statistics
from uvit.evaluate.sample import save_samples
from uvit.paths import BenchmarkPaths
from uvit.stages.score import run_score

ROOT = Path(__file__).resolve().parents[1]


def cifar_like(tmp_path: Path, weights: str, **score):
    params = copy.deepcopy(load_params(ROOT / "params.yaml"))
    params["cifar10"]["score"].update(inception_weights=weights, **score)
    cfg = load_benchmark("cifar10", params)
    paths = BenchmarkPaths("cifar10", tmp_path)
    rng = np.random.default_rng(0)
    real = rng.integers(0, 256, (6, 3, 16, 16), dtype=np.uint8)
    write_split(paths.data / "train", {"images": real, "labels": np.arange(6) % 3}, name="cifar10", split="train")
    fake = rng.integers(0, 128, (6, 3, 16, 16), dtype=np.uint8)
    save_samples(paths.samples / "samples.npz", fake)
    return cfg, paths, real, fake


def test_inception_score_stage_matches_torch_fidelity(tmp_path, random_inception_weights) -> None:
    cfg, paths, real, fake = cifar_like(tmp_path, random_inception_weights)
    metrics = run_score(cfg, paths)
    expected = fid(fake, real, FeatureSpace("inception", weights_path=random_inception_weights))
    assert metrics["fid"] == pytest.approx(expected, rel=1e-4) and metrics["fid"] > 0
    cached = list((paths.run / "reference").glob("stats-*.npz"))
    assert len(cached) == 1  # reference statistics computed once and cached
    assert (paths.score / "metrics.json").is_file()


def test_user_supplied_reference_statistics(tmp_path, random_inception_weights) -> None:
    _, _, real, _ = cifar_like(tmp_path / "a", random_inception_weights)
    mu, sigma = fid_statistics(real, FeatureSpace("inception", weights_path=random_inception_weights))
    ref = save_fid_statistics(tmp_path / "ref.npz", mu, sigma)
    cfg, paths, _, fake = cifar_like(tmp_path / "b", random_inception_weights, reference_stats=str(ref))
    metrics = run_score(cfg, paths)
    assert metrics["reference"] == str(ref)
    assert not (paths.run / "reference").exists()  # nothing recomputed
    assert metrics["fid"] == pytest.approx(
        fid(fake, real, FeatureSpace("inception", weights_path=random_inception_weights)), rel=1e-4
    )
