"""A benchmark's scores of its samples (the `score` stage's metrics.json).

- :func:`score_digits`: FID and KID against the real train split in the digits classifier's
  feature space, with the real-vs-real floor (as many test images as samples) and the
  untrained-model ceiling, precision/recall and conditional accuracy.
- :func:`score_inception`: FID against the reference statistics, IS, KID and precision/recall
  (against the reference features), and for text-to-image the CLIP score; one Inception pass.
- :func:`reference_statistics`: (mu, sigma, kid_features) of the real images, from a supplied
  ``.npz`` or computed once (streamed over the split, :mod:`uvit.evaluate.reference`) and cached
  under ``runs/<benchmark>/reference/``.

Samples are uint8 (N, C, H, W).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from uvit.config import BenchmarkConfig
from uvit.evaluate.draw import device_for, draw_samples
from uvit.evaluate.reference import KID_REFERENCE_ROWS
from uvit.fileio import sha256_file, write_npz
from uvit.paths import BenchmarkPaths

__all__ = [
    "KID_REFERENCE_ROWS",
    "DigitsReal",
    "digits_metrics",
    "reference_split",
    "reference_statistics",
    "score_digits",
    "score_inception",
]


def score_digits(cfg: BenchmarkConfig, paths: BenchmarkPaths, samples: np.ndarray, labels: np.ndarray | None) -> dict:
    """The digits metrics of `samples` (and their class `labels`, None if unconditional), in the
    feature space of the classifier at `paths.classifier`."""
    from uvit.data.shards import load_split_arrays
    from uvit.models import UViT

    torch.set_num_threads(max(1, cfg.train.threads_per_worker))
    train_x, _ = load_split_arrays(paths.data / "train")
    test_x, _ = load_split_arrays(paths.data / "test")
    # Ceiling: the same sampler on an untrained model (same init seed as training).
    torch.manual_seed(cfg.train.seed)
    untrained, _ = draw_samples(cfg, UViT(cfg.uvit_config()), num_samples=len(samples), progress=False)
    real = DigitsReal(train=train_x, test=test_x, classifier=Path(paths.classifier))
    return digits_metrics(samples, labels, untrained, real, kid_subset_size=cfg.score.kid_subset_size)


@dataclass(frozen=True)
class DigitsReal:
    """The real digits a score compares with: uint8 (N, C, H, W) train and test splits, and the
    classifier directory whose penultimate features are the metric space."""

    train: np.ndarray
    test: np.ndarray
    classifier: Path


def digits_metrics(
    samples: np.ndarray, labels: np.ndarray | None, untrained: np.ndarray, real: DigitsReal, *, kid_subset_size: int
) -> dict:
    """FID, KID and precision/recall of `samples` against the train split, with the floor (as many
    test images as samples: FID's bias depends on the count) and the untrained-model ceiling.

    Each image set goes through the classifier once; FID and KID are then torch-fidelity's own
    feature-to-metric steps, so every figure equals :func:`uvit.evaluate.fid.fid` /
    :func:`~uvit.evaluate.fid.kid` on the same images."""
    from uvit.evaluate.classifier import conditional_accuracy, load_classifier
    from uvit.evaluate.fid import (
        FeatureSpace,
        extract_features,
        fid_from_features,
        kid_from_features,
        precision_recall_from_features,
    )

    def features(images: np.ndarray) -> torch.Tensor:  # float32 (N, D)
        return extract_features(
            images, ("features",), FeatureSpace("digits-classifier", classifier_path=real.classifier)
        )["features"]

    f_train, f_samples = features(real.train), features(samples)
    f_floor, f_ceiling = features(real.test[: len(samples)]), features(untrained)
    fid_samples, floor = fid_from_features(f_samples, f_train), fid_from_features(f_floor, f_train)
    kid_mean, kid_std = kid_from_features(f_samples, f_train, subset_size=kid_subset_size)
    kid_floor, _ = kid_from_features(f_floor, f_train, subset_size=kid_subset_size)
    precision, recall = precision_recall_from_features(f_samples, f_train)
    classifier = load_classifier(real.classifier)
    return {
        "fid": fid_samples,
        "fid_floor": floor,
        "fid_ceiling": fid_from_features(f_ceiling, f_train),
        "fid_over_floor": fid_samples / floor,
        "kid": kid_mean,
        "kid_std": kid_std,
        "kid_floor": kid_floor,
        "kid_subset_size": min(kid_subset_size, len(samples)),
        "precision": precision,  # against the whole train split, in the classifier's feature space
        "recall": recall,
        "conditional_accuracy": conditional_accuracy(classifier, samples, labels) if labels is not None else None,
        "classifier_test_accuracy": json.loads((real.classifier / "metrics.json").read_text())["test_accuracy"],
        "feature_extractor": "digits-classifier",
        "num_samples": int(len(samples)),
        "num_reference": int(len(real.train)),
    }


def reference_statistics(cfg: BenchmarkConfig, paths: BenchmarkPaths, *, progress: bool | None = None):
    """(mu, sigma, kid_features) of the real data's Inception features: a user-supplied `.npz`
    (score.reference_stats, e.g. ADM's ImageNet statistics: kid_features None unless the file has a
    `kid_features` array), else computed once from the real images and cached in
    runs/<benchmark>/reference/stats-<manifest digest>.npz (new data recomputes), with the 2048-d
    features of up to KID_REFERENCE_ROWS evenly spaced images for KID. Text-to-image benchmarks
    use the validation images (the official reference), the others the training images. The
    split is streamed batch by batch (:mod:`uvit.evaluate.reference`: memory does not grow with
    its size); progress: a bar on stderr (None: only on a terminal)."""
    from uvit.evaluate.fid import load_fid_statistics
    from uvit.evaluate.reference import extractor_statistics

    if cfg.score.reference_stats:
        mu, sigma = load_fid_statistics(cfg.score.reference_stats)
        with np.load(cfg.score.reference_stats) as f:
            kid_features = f["kid_features"] if "kid_features" in f.files else None
        return mu, sigma, kid_features
    split = reference_split(cfg, paths)
    digest = sha256_file(split / "manifest.json")[:16]
    cache = paths.run / "reference" / f"stats-{digest}.npz"
    if cache.is_file():
        with np.load(cache) as f:
            return f["mu"], f["sigma"], (f["kid_features"] if "kid_features" in f.files else None)
    stats = extractor_statistics(
        split,
        extractor="inception",
        weights_path=cfg.score.inception_weights,
        device=device_for(cfg),
        kid_limit=KID_REFERENCE_ROWS,
        progress=progress,
    )
    write_npz(cache, mu=stats.mu, sigma=stats.sigma, kid_features=stats.kid_features)
    return stats.mu, stats.sigma, stats.kid_features


def reference_split(cfg: BenchmarkConfig, paths: BenchmarkPaths) -> Path:
    """The real images our reference statistics come from. Text-to-image samples follow validation
    captions, and the official reference is COCO val (fid_stats_mscoco256_val.npz); class and
    unconditional benchmarks use the training images."""
    val = paths.data / "val"
    if cfg.text_to_image and (val / "manifest.json").is_file():
        return val
    return paths.data / "train"


def _fid_stats(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """float64 (mu (D,), sigma (D, D)) of (N, D) features, by torch-fidelity (as fid_statistics)."""
    from torch_fidelity.metric_fid import fid_featuresdict_to_statistics

    st = fid_featuresdict_to_statistics({"f": features}, "f")
    return st["mu"].astype(np.float64), st["sigma"].astype(np.float64)


def score_inception(cfg: BenchmarkConfig, paths: BenchmarkPaths, samples: np.ndarray) -> dict:
    """FID against the reference statistics, IS, KID (when reference features exist) and, for
    text-to-image, the CLIP score; one Inception pass over the samples."""
    from uvit.evaluate.fid import (
        FeatureSpace,
        extract_features,
        fid_from_statistics,
        inception_score_from_logits,
        kid_from_features,
        precision_recall_from_features,
    )

    ref_mu, ref_sigma, ref_kid = reference_statistics(cfg, paths)
    feats = extract_features(
        samples,
        ("2048", "logits_unbiased"),
        FeatureSpace("inception", weights_path=cfg.score.inception_weights, device=device_for(cfg)),
    )
    mu, sigma = _fid_stats(feats["2048"])
    is_mean, is_std = inception_score_from_logits(feats["logits_unbiased"])
    metrics = {
        "fid": fid_from_statistics(mu, sigma, ref_mu, ref_sigma),
        "inception_score": is_mean,
        "inception_score_std": is_std,
    }
    if ref_kid is not None:
        metrics["kid"], metrics["kid_std"] = kid_from_features(
            feats["2048"], ref_kid, subset_size=cfg.score.kid_subset_size
        )
        metrics["kid_subset_size"] = min(cfg.score.kid_subset_size, len(samples), len(ref_kid))
        # Against the same reference features (up to KID_REFERENCE_ROWS images).
        metrics["precision"], metrics["recall"] = precision_recall_from_features(feats["2048"], ref_kid)
    else:
        metrics["kid"] = None  # a statistics-only reference (mu, sigma) has no features to compare with
    if cfg.text_to_image:
        metrics.update(_score_clip(cfg, paths, samples))
    metrics.update(
        {
            "feature_extractor": "inception",
            "num_samples": int(len(samples)),
            "reference": cfg.score.reference_stats
            or f"{reference_split(cfg, paths).name} images (runs/<benchmark>/reference/)",
        }
    )
    return metrics


def _score_clip(cfg: BenchmarkConfig, paths: BenchmarkPaths, samples: np.ndarray) -> dict:
    """CLIP score of the samples against the captions stored with them (samples.npz `captions`)."""
    from uvit.evaluate.clip_score import DEFAULT_CLIP_MODEL, clip_score, load_clip
    from uvit.evaluate.sample import load_sample_extras

    extras = load_sample_extras(paths.samples / "samples.npz")
    if "captions" not in extras:
        raise ValueError(
            f"{paths.samples / 'samples.npz'} holds no caption texts: the CLIP score needs them "
            f"(they are stored when data/{cfg.name}/val has the captions)"
        )
    source = cfg.score.clip_model or DEFAULT_CLIP_MODEL
    model, processor = load_clip(source, device=device_for(cfg), params_key=f"{cfg.name}.score.clip_model")
    return {
        "clip_score": clip_score(samples, [str(t) for t in extras["captions"]], model, processor),
        "clip_model": str(source),
    }
