"""Sampling from a trained U-ViT: per-sample seeds, classifier-free guidance, any sampler.

Sample i depends only on its seed and its label: it is the same whatever the batch size,
the number of workers or the order in which batches run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from uvit.diffusion import PerSampleNoise, make_schedule, sample, wrap_model
from uvit.diffusion.guidance import Condition, guided_network
from uvit.fileio import write_npz
from uvit.models import UViT

SEED_STRIDE = 10_000_000  # sample i of a run with seed s uses seed s * SEED_STRIDE + i


def sample_seeds(seed: int, num_samples: int, start: int = 0) -> list[int]:
    return [seed * SEED_STRIDE + i for i in range(start, start + num_samples)]


def balanced_labels(num_samples: int, num_classes: int) -> Tensor:
    """0, 1, ..., K-1, 0, 1, ...: every class equally often (K real classes, no null class)."""
    return torch.arange(num_samples) % num_classes


@dataclass(frozen=True)
class SamplingRecipe:
    """How to sample: the noise schedule ("vpsde" | "discrete"), the sampler (a name of
    `uvit.diffusion.ALL_SAMPLERS`), its steps, the guidance scale s (0: none) and the sampler's
    keyword options (order, skip_type, t_end, ...; empty: the sampler's defaults)."""

    schedule: str
    sampler: str
    steps: int
    guidance_scale: float = 0.0
    sampler_kwargs: Mapping[str, Any] = field(default_factory=dict)


def _model_condition(model: UViT, condition: Condition | None, num: int, guidance_scale: float) -> Condition:
    """The part of `condition` the model takes (labels for a class-conditional model, contexts for a
    text-to-image one, nothing else), checked."""
    c, condition = model.config, condition or Condition()
    if c.num_classes > 0:
        if condition.labels is None:
            raise ValueError("a class-conditional model needs `labels`")
        return Condition(labels=condition.labels)
    if c.clip_dim is not None:
        if condition.contexts is None or len(condition.contexts) != num:
            raise ValueError("a text-to-image model needs `contexts` (N, 77, D), one per seed")
        if guidance_scale > 0 and condition.empty_context is None:
            raise ValueError("guidance on a text-to-image model needs `empty_context` (77, D)")
        return Condition(contexts=condition.contexts, empty_context=condition.empty_context)
    return Condition()


@torch.no_grad()
def generate(
    model: UViT,
    recipe: SamplingRecipe,
    seeds: list[int],
    condition: Condition | None = None,
    *,
    batch_size: int = 500,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> Tensor:
    """Samples (N, C, H, W) in the model's data range ([-1, 1] for pixels), N = len(seeds).

    condition: labels (N,) for a class-conditional model (guidance's unconditional branch is the
    model's last class, the null class of CFG training); or contexts (N, 77, D) for a text-to-image
    model, with empty_context (77, D), the context of "", when guidance_scale > 0 (moved per batch).
    """
    condition = _model_condition(model, condition, len(seeds), recipe.guidance_scale)
    c = model.config
    model = model.to(device).eval()
    sched = make_schedule(recipe.schedule)
    null_class = c.num_classes - 1 if c.num_classes > 0 else None
    out = []
    desc = f"sample {recipe.sampler} x{recipe.steps}"
    bar = tqdm(total=len(seeds), desc=desc, unit="img", disable=not progress, ascii=True)
    for start in range(0, len(seeds), batch_size):
        chunk = seeds[start : start + batch_size]
        noise = PerSampleNoise(chunk, device=device)
        x_T = noise.randn((c.in_chans, c.img_size, c.img_size))
        batch = condition.rows(start, start + len(chunk)).to(device)
        net = guided_network(model, recipe.guidance_scale, batch, null_class)
        x = sample(
            recipe.sampler, wrap_model(net, sched), sched, x_T, recipe.steps, noise=noise, **recipe.sampler_kwargs
        )
        out.append(x.float().cpu())
        bar.update(len(chunk))
    bar.close()
    return torch.cat(out)


def to_uint8(x: Tensor) -> np.ndarray:
    """[-1, 1] floats (N, C, H, W) -> uint8 (N, C, H, W), rounding as torchvision's save_image."""
    return ((x.clamp(-1, 1) + 1) * 127.5 + 0.5).clamp(0, 255).to(torch.uint8).numpy()


def save_grid(images: np.ndarray, path: str | Path, nrow: int, upscale: int = 1) -> Path:
    """Save uint8 (N, C, H, W) images (C = 1 or 3) as one RGB PNG grid, nearest-neighbour
    upscaled if asked: the layout and bytes of torchvision's ``save_image(make_grid(x, nrow,
    padding=2, pad_value=1.0))`` (white 2-pixel gutters), in numpy, because importing
    torchvision costs a few seconds of torch._dynamo start-up in every stage process."""
    from PIL import Image

    x = np.asarray(images, dtype=np.uint8)
    if upscale > 1:
        x = x.repeat(upscale, axis=2).repeat(upscale, axis=3)
    if x.shape[1] == 1:
        x = x.repeat(3, axis=1)
    if len(x) == 1:
        grid = x[0]  # make_grid returns a single image without gutters
    else:
        n, c, h, w = x.shape
        cols, pad = min(nrow, n), 2
        rows = -(-n // cols)
        grid = np.full((c, rows * (h + pad) + pad, cols * (w + pad) + pad), 255, dtype=np.uint8)
        for k in range(n):
            top, left = (k // cols) * (h + pad) + pad, (k % cols) * (w + pad) + pad
            grid[:, top : top + h, left : left + w] = x[k]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(grid.transpose(1, 2, 0))).save(path)
    return path


def save_samples(
    path: str | Path, images: np.ndarray, labels: np.ndarray | None = None, extras: dict[str, np.ndarray] | None = None
) -> Path:
    """`.npz` with `arr_0` uint8 NHWC (the layout the reference evaluation suites read), labels,
    and any per-sample `extras` (N, ...) such as text-to-image `caption_rows` and `captions`."""
    arrays = {"arr_0": images.transpose(0, 2, 3, 1)}
    if labels is not None:
        arrays["labels"] = labels
    for k, v in (extras or {}).items():
        if k in arrays or len(v) != len(images):
            raise ValueError(f"extra {k!r}: a reserved name or not one row per sample")
        arrays[k] = v
    return write_npz(path, **arrays)


def load_samples(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """(uint8 NCHW images, labels or None) from a `save_samples` file."""
    with np.load(path) as f:
        images = f["arr_0"].transpose(0, 3, 1, 2)
        labels = f["labels"] if "labels" in f.files else None
    return np.ascontiguousarray(images), labels


def load_sample_extras(path: str | Path) -> dict[str, np.ndarray]:
    """The per-sample arrays of a `save_samples` file other than images and labels."""
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files if k not in ("arr_0", "labels")}


def save_pngs(images: np.ndarray, out_dir: str | Path, start: int = 0) -> list[Path]:
    """Write uint8 (N, C, H, W) images as `out_dir/{start + i:06d}.png` (the official `sample2dir`
    layout: one file per sample, named by its global index, so shards fill one folder)."""
    from PIL import Image

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, x in enumerate(images):
        hwc = x.transpose(1, 2, 0)
        p = out_dir / png_name(start + i)
        Image.fromarray(hwc[..., 0] if hwc.shape[-1] == 1 else hwc).save(p)
        paths.append(p)
    return paths


def png_name(i: int) -> str:
    return f"{i:06d}.png"
