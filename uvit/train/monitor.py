"""What rank 0 shows while training: metrics CSV, TensorBoard scalars, EMA sample grids.

metrics.csv gets one row per `train.log_every` steps (loss, lr, grad-norm, images/s, elapsed
time and, on CUDA, peak GPU memory); it travels inside every checkpoint and is what `dvc plots`
renders. TensorBoard (`train.tensorboard`) gets the same scalars and the sample grids.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import torch

METRICS_FIELDS = ("step", "loss", "lr", "grad_norm", "images_per_s", "elapsed_s", "peak_mem_gib")


class MetricsLog:
    """Append-only CSV of per-step metrics (rank 0 only); survives restarts by truncation."""

    def __init__(self, path: Path, resume_step: int = 0):
        self.path = path
        rows = []
        if path.is_file():
            with path.open() as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, METRICS_FIELDS, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)

    def append(self, row: dict[str, Any]) -> None:
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, METRICS_FIELDS).writerow({k: row.get(k, "") for k in METRICS_FIELDS})


def peak_memory_gib(device: torch.device) -> float | None:
    """Peak GPU memory allocated by tensors since the last reset, GiB (None off CUDA)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


class TensorBoard:
    """A SummaryWriter that is a no-op when disabled (other ranks, `train.tensorboard: false`).

    On resume from step s it purges events after s, so the curves have no doubled segment.
    """

    def __init__(self, logdir: str | Path | None, resume_step: int = 0):
        self.writer = None
        if logdir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(logdir), purge_step=resume_step + 1 if resume_step else None)

    def scalars(self, step: int, values: dict[str, Any], prefix: str = "train") -> None:
        if self.writer is None:
            return
        for k, v in values.items():
            if v is not None and not (isinstance(v, float) and math.isnan(v)):
                self.writer.add_scalar(f"{prefix}/{k}", v, step)

    def image(self, tag: str, path: Path, step: int) -> None:
        """A PNG file (H, W, 3) as an image."""
        if self.writer is None:
            return
        import numpy as np
        from PIL import Image

        self.writer.add_image(tag, np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def sample_grid(cfg, ema_model: torch.nn.Module, path: Path, rows: int = 4) -> Path:
    """A small grid of EMA samples with the benchmark's sampler and guidance: one column per
    class (up to 10), `rows` rows, fixed seeds (so grids of successive steps are comparable).
    Latent benchmarks are decoded with the VAE (`sample.vae`, else `encode.vae`). Written as a PNG to `path`."""
    from uvit.evaluate.draw import draw_samples
    from uvit.evaluate.sample import save_grid

    k = cfg.data.num_classes
    cols = min(k, 10) if k > 0 and ema_model.config.num_classes > 0 else 8
    images, _ = draw_samples(cfg, ema_model, num_samples=rows * cols, progress=False)
    upscale = max(1, 64 // images.shape[-1])  # tiny digits: make the grid readable
    return save_grid(images, path, nrow=cols, upscale=upscale)


class PeriodicFID:
    """FID of EMA samples during training (`train.fid_every`), as the official code tracks it.

    The feature space is the benchmark's scorer (`score.feature_extractor`: Inception, or the
    digits classifier at `classifier_dir`); the reference is `score.reference_stats` when given,
    else `num_samples` evenly spaced training images (uint8 (N, C, H, W) field "images" of
    `images_split`). A few hundred or thousand samples give a biased but monotone trend.
    Everything it needs is checked when it is built, so a missing extractor fails at step 0.
    """

    def __init__(
        self,
        cfg,
        num_samples: int,
        images_split: str | Path | None,
        classifier_dir: str | Path | None,
        device: str = "cpu",
    ):
        from uvit.evaluate.fid import FeatureSpace, fid_statistics, load_fid_statistics

        self.cfg, self.num_samples = cfg, num_samples
        self.space = FeatureSpace(
            extractor=cfg.score.feature_extractor,
            weights_path=cfg.score.inception_weights,
            classifier_path=classifier_dir,
            device=device,
        )
        if cfg.score.feature_extractor == "digits-classifier" and not (
            classifier_dir and Path(classifier_dir).is_dir()
        ):
            raise FileNotFoundError(
                f"{cfg.name}.train.fid_every: the FID feature extractor (the digits classifier) "
                f"is not at {classifier_dir}; run `uvit classifier {cfg.name}` first"
            )
        if cfg.score.reference_stats:
            self.mu, self.sigma = load_fid_statistics(cfg.score.reference_stats)
        else:
            self.mu, self.sigma = fid_statistics(reference_images(images_split, num_samples), self.space)

    def score(self, images) -> float:
        """FID of uint8 images (N, C, H, W) against the reference."""
        from uvit.evaluate.fid import fid_from_statistics, fid_statistics

        return fid_from_statistics(*fid_statistics(images, self.space), self.mu, self.sigma)

    def __call__(self, ema_model: torch.nn.Module) -> float:
        from uvit.evaluate.draw import draw_samples

        images, _ = draw_samples(self.cfg, ema_model, num_samples=self.num_samples, progress=False)
        return self.score(images)


def reference_images(split: str | Path | None, n: int):
    """`n` evenly spaced rows (all if fewer) of a split's uint8 "images" field, (n, C, H, W)."""
    import numpy as np

    from uvit.data.shards import ShardedArrays
    from uvit.train.data import ShardGather

    if split is None or not (Path(split) / "manifest.json").is_file():
        raise FileNotFoundError(f"periodic FID needs the training images at {split} (or score.reference_stats)")
    gather = ShardGather(split, "images", with_labels=False)
    rows = np.linspace(0, len(ShardedArrays(split)) - 1, min(n, len(gather))).round().astype(np.int64)
    return gather.rows("images", rows)
