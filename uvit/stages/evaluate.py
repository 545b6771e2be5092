"""Stages `sample`, `classifier` and `score`.

sample:     EMA weights -> runs/<b>/samples/{samples.npz, grid.png, summary.json}
classifier: (digits) a small CNN on the real train split: the FID feature extractor and the judge
            of conditional accuracy -> runs/<b>/classifier/
score:      FID of the samples against the real train split (torch-fidelity), with the
            real-vs-real floor (as many test images vs train) and the untrained-model ceiling, and conditional
            accuracy -> runs/<b>/score/metrics.json (DVC metrics)
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from uvit.config import BenchmarkConfig
from uvit.paths import BenchmarkPaths


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)


def _device(cfg: BenchmarkConfig) -> str:
    return "cuda" if cfg.train.use_gpu and torch.cuda.is_available() else "cpu"


def sample_labels(cfg: BenchmarkConfig, num_samples: int) -> torch.Tensor | None:
    from uvit.evaluate.sample import balanced_labels

    k = cfg.validate_.num_classes
    return balanced_labels(num_samples, k) if cfg.uvit_config().num_classes > 0 and k > 0 else None


def draw_samples(cfg: BenchmarkConfig, model, num_samples: int | None = None, progress: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """uint8 (N, C, H, W) samples of `model` with the benchmark's sampler settings, and their labels."""
    from uvit.evaluate.sample import generate, sample_seeds, to_uint8

    s = cfg.sample
    n = num_samples or s.num_samples
    if model.config.clip_dim is not None:
        raise NotImplementedError(f"{cfg.name}: text-to-image sampling over the validation captions is not wired "
                                  "into this stage yet; UViTPipeline(prompt=...) samples from text today")
    labels = sample_labels(cfg, n)
    x = generate(model, schedule=cfg.diffusion.schedule, sampler=s.sampler, steps=s.steps,
                 seeds=sample_seeds(s.seed, n), labels=labels, guidance_scale=s.guidance_scale,
                 batch_size=s.batch_size, device=_device(cfg), progress=progress)
    if cfg.encode is not None:  # latent benchmarks: decode with the VAE, in chunks of 50 as the official code
        from uvit.encoders.vae import decode, load_vae

        vae = load_vae(cfg.encode.vae, scale_factor=cfg.encode.scale_factor, device=_device(cfg),
                       params_key=f"{cfg.name}.encode.vae")
        x = decode(vae, x.to(_device(cfg)), batch_size=50).cpu()
    return to_uint8(x), None if labels is None else labels.numpy()


def run_sample(cfg: BenchmarkConfig, paths: BenchmarkPaths) -> dict:
    from uvit.diffusion import count_nfe
    from uvit.evaluate.sample import save_grid, save_samples
    from uvit.models import UViT

    s = cfg.sample
    torch.set_num_threads(max(1, cfg.train.threads_per_worker))
    weights = paths.train / ("ema" if s.use_ema else "model")
    model = UViT.from_pretrained(weights)
    t0 = time.perf_counter()
    images, labels = draw_samples(cfg, model)
    wall = time.perf_counter() - t0
    out = paths.samples
    save_samples(out / "samples.npz", images, labels)
    k = cfg.validate_.num_classes or 10
    # Grid: one column per class, ten rows (labels cycle through the classes).
    grid = images[: k * min(10, math.ceil(len(images) / k))]
    save_grid(grid, out / "grid.png", nrow=k, upscale=max(1, 64 // cfg.uvit_config().img_size))
    summary = {"sampler": s.sampler, "steps": s.steps, "nfe": count_nfe(s.sampler, s.steps),
               "guidance_scale": s.guidance_scale, "num_samples": len(images), "wall_time_s": round(wall, 2),
               "images_per_s": round(len(images) / wall, 2), "seed": s.seed, "weights": "ema" if s.use_ema else "raw"}
    _write_json(out / "summary.json", summary)
    return summary


def run_classifier(cfg: BenchmarkConfig, paths: BenchmarkPaths) -> dict:
    if cfg.score.feature_extractor != "digits-classifier":
        raise ValueError(f"{cfg.name}.score.feature_extractor is {cfg.score.feature_extractor!r}: "
                         "the classifier stage only serves the digits benchmark")
    from uvit.data.shards import load_split_arrays
    from uvit.evaluate.classifier import ClassifierConfig, accuracy, save_classifier, train_classifier

    torch.set_num_threads(max(1, cfg.train.threads_per_worker))
    train_x, train_y = load_split_arrays(paths.data / "train")
    test_x, test_y = load_split_arrays(paths.data / "test")
    config = ClassifierConfig(in_chans=train_x.shape[1], image_size=train_x.shape[2],
                              num_classes=cfg.validate_.num_classes)
    model = train_classifier(train_x, train_y, config, epochs=cfg.score.classifier_epochs, seed=cfg.data.seed)
    save_classifier(model, paths.classifier)
    result = {"test_accuracy": accuracy(model, test_x, test_y)}
    _write_json(paths.classifier / "metrics.json", result)
    return result


def run_score(cfg: BenchmarkConfig, paths: BenchmarkPaths) -> dict:
    from uvit.evaluate.sample import load_samples

    samples, labels = load_samples(paths.samples / "samples.npz")
    if cfg.score.feature_extractor == "inception":
        return _score_inception(cfg, paths, samples)
    from uvit.data.shards import load_split_arrays
    from uvit.evaluate.classifier import conditional_accuracy, load_classifier
    from uvit.evaluate.fid import fid
    from uvit.models import UViT

    torch.set_num_threads(max(1, cfg.train.threads_per_worker))
    train_x, _ = load_split_arrays(paths.data / "train")
    test_x, _ = load_split_arrays(paths.data / "test")
    kw = {"extractor": "digits-classifier", "classifier_path": paths.classifier}
    fid_samples = fid(samples, train_x, **kw)
    # The floor uses as many real test images as there are samples: FID's bias depends on the count.
    floor = fid(test_x[: len(samples)], train_x, **kw)
    # Ceiling: the same sampler on an untrained model (same init seed as training).
    torch.manual_seed(cfg.train.seed)
    untrained, _ = draw_samples(cfg, UViT(cfg.uvit_config()), num_samples=len(samples), progress=False)
    ceiling = fid(untrained, train_x, **kw)
    classifier = load_classifier(paths.classifier)
    metrics = {
        "fid": fid_samples,
        "fid_floor": floor,
        "fid_ceiling": ceiling,
        "fid_over_floor": fid_samples / floor,
        "conditional_accuracy": conditional_accuracy(classifier, samples, labels) if labels is not None else None,
        "classifier_test_accuracy": json.loads((paths.classifier / "metrics.json").read_text())["test_accuracy"],
        "feature_extractor": "digits-classifier",
        "num_samples": int(len(samples)),
        "num_reference": int(len(train_x)),
    }
    _write_json(paths.score / "metrics.json", metrics)
    return metrics


def reference_statistics(cfg: BenchmarkConfig, paths: BenchmarkPaths):
    """(mu, sigma) of the real data's Inception features: a user-supplied `.npz` (score.reference_stats,
    e.g. ADM's ImageNet statistics), else computed once from the training images and cached in
    runs/<benchmark>/reference/stats.npz (keyed by the split's manifest, so new data recomputes)."""
    import hashlib

    from uvit.data.shards import ShardedArrays
    from uvit.evaluate.fid import fid_statistics, load_fid_statistics, save_fid_statistics

    if cfg.score.reference_stats:
        return load_fid_statistics(cfg.score.reference_stats)
    split = paths.data / "train"
    digest = hashlib.sha256((split / "manifest.json").read_bytes()).hexdigest()[:16]
    cache = paths.run / "reference" / f"stats-{digest}.npz"
    if cache.is_file():
        return load_fid_statistics(cache)
    images = np.array(ShardedArrays(split).field("images"))
    mu, sigma = fid_statistics(images, extractor="inception", weights_path=cfg.score.inception_weights,
                               device=_device(cfg))
    save_fid_statistics(cache, mu, sigma)
    return mu, sigma


def _score_inception(cfg: BenchmarkConfig, paths: BenchmarkPaths, samples: np.ndarray) -> dict:
    """FID of the samples against the reference statistics, through torch-fidelity's Inception."""
    from uvit.evaluate.fid import fid_from_statistics, fid_statistics

    ref_mu, ref_sigma = reference_statistics(cfg, paths)
    mu, sigma = fid_statistics(samples, extractor="inception", weights_path=cfg.score.inception_weights,
                               device=_device(cfg))
    metrics = {"fid": fid_from_statistics(mu, sigma, ref_mu, ref_sigma), "feature_extractor": "inception",
               "num_samples": int(len(samples)),
               "reference": cfg.score.reference_stats or "training images (runs/<benchmark>/reference/)"}
    _write_json(paths.score / "metrics.json", metrics)
    return metrics
