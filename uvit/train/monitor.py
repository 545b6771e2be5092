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

    def scalars(self, step: int, values: dict[str, Any]) -> None:
        if self.writer is None:
            return
        for k, v in values.items():
            if v is not None and not (isinstance(v, float) and math.isnan(v)):
                self.writer.add_scalar(f"train/{k}", v, step)

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
    Latent benchmarks are decoded with the VAE (`encode.vae`). Written as a PNG to `path`."""
    from uvit.evaluate.sample import save_grid
    from uvit.stages.evaluate import draw_samples

    k = cfg.validate_.num_classes
    cols = min(k, 10) if k > 0 and ema_model.config.num_classes > 0 else 8
    images, _ = draw_samples(cfg, ema_model, num_samples=rows * cols, progress=False)
    upscale = max(1, 64 // images.shape[-1])  # tiny digits: make the grid readable
    return save_grid(images, path, nrow=cols, upscale=upscale)
