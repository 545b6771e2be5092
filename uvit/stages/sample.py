"""Stage `sample`: config in, library calls, files out.

EMA weights -> runs/<b>/samples/: shards/ (resumable, uvit.evaluate.sample_shards), samples.npz (all
shards merged: uint8 NHWC + labels, or caption rows/texts for text-to-image), png/{i:06d}.png;
sample-summary/: grid.png, summary.json; text-to-image also examples.png, the paper's eight example
captions. The sampling settings live in :mod:`uvit.evaluate.draw`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from uvit.config import BenchmarkConfig
from uvit.evaluate.draw import caption_set, decoder_spec, device_for, paper_caption_images, sample_labels
from uvit.fileio import write_json
from uvit.paths import BenchmarkPaths

__all__ = ["run_sample", "sample_paper_captions"]


def run_sample(cfg: BenchmarkConfig, paths: BenchmarkPaths) -> dict:
    """Sample through resumable shards (finished shards are reused on a re-run), merge them into
    samples.npz, write the PNGs and the grid; for text-to-image also the example-caption grid."""
    from uvit.diffusion import count_nfe
    from uvit.evaluate.sample import save_grid
    from uvit.evaluate.sample_shards import SampleSpec, SamplingRun, merge_shards, sample_to_shards

    s = cfg.sample
    torch.set_num_threads(max(1, cfg.train.threads_per_worker))
    weights = paths.train / ("ema" if s.use_ema else "model")
    out = paths.samples
    t2i = cfg.text_to_image
    labels_k = cfg.data.num_classes if sample_labels(cfg, 1) is not None else None
    if cfg.encode is not None:  # fail before sampling, not after, when the VAE is not there
        from uvit.encoders.vae import load_vae

        path, key = cfg.decoder_vae()
        load_vae(path, scale_factor=cfg.encode.scale_factor, params_key=key)
    spec = SampleSpec(
        schedule=cfg.diffusion.schedule,
        sampler=s.sampler,
        steps=s.steps,
        num_samples=s.num_samples,
        shard_size=s.shard_size,
        seed=s.seed,
        guidance_scale=s.guidance_scale,
        num_classes_for_labels=labels_k,
        sampler_kwargs=s.sampler_kwargs(),
        captions=caption_set(cfg, paths, s.num_samples) if t2i else None,
        decoder=decoder_spec(cfg),
    )
    how = SamplingRun(
        batch_size=s.batch_size, num_workers=s.num_workers, use_gpu=cfg.train.use_gpu, device=device_for(cfg)
    )
    result = sample_to_shards(weights, out / "shards", spec, how, png_dir=out / "png" if s.png else None)
    if not s.png:
        import shutil

        shutil.rmtree(out / "png", ignore_errors=True)
    images = merge_shards(out / "shards", out / "samples.npz")
    view = paths.sample_summary
    view.mkdir(parents=True, exist_ok=True)
    if t2i:  # the first 64 samples, eight per row
        save_grid(images[:64], view / "grid.png", nrow=8)
        examples = sample_paper_captions(cfg, paths, weights)
    else:
        k = cfg.data.num_classes or 10
        # Grid: one column per class, ten rows (labels cycle through the classes).
        grid = images[: k * min(10, math.ceil(len(images) / k))]
        save_grid(grid, view / "grid.png", nrow=k, upscale=max(1, 64 // cfg.uvit_config().img_size))
        examples = None
    summary = {
        "sampler": s.sampler,
        "steps": s.steps,
        "nfe": count_nfe(s.sampler, s.steps, **s.sampler_kwargs()),
        "guidance_scale": s.guidance_scale,
        "num_samples": len(images),
        # Time and rate of the shards sampled by this run (reused shards cost nothing).
        "wall_time_s": round(result["seconds"], 2),
        "images_per_s": round(result["images_per_s"], 2),
        "shards_computed": len(result["computed"]),
        "shards_reused": len(result["reused"]),
        "num_workers": s.num_workers,
        "seed": s.seed,
        "weights": "ema" if s.use_ema else "raw",
    }
    previous = view / "summary.json"
    if not result["computed"] and previous.is_file():  # all reused: keep the timing of the run that sampled
        old = json.loads(previous.read_text())
        summary.update({k: old[k] for k in ("wall_time_s", "images_per_s") if k in old})
    if t2i:
        summary["captions"] = s.captions
        summary["examples"] = examples
    write_json(view / "summary.json", summary)
    return summary


def sample_paper_captions(cfg: BenchmarkConfig, paths: BenchmarkPaths, weights: Path, per_caption: int = 4) -> str:
    """Samples for the paper's eight example captions -> sample-summary/examples.png, one row per
    caption, and examples.json (the captions)."""
    from uvit.evaluate.sample import save_grid
    from uvit.report.paper import PAPER_CAPTIONS

    images = paper_caption_images(cfg, weights, per_caption)
    save_grid(images, paths.sample_summary / "examples.png", nrow=per_caption)
    write_json(
        paths.sample_summary / "examples.json",
        {"captions": list(PAPER_CAPTIONS), "per_caption": per_caption, "seed": cfg.sample.seed + 1},
    )
    return "examples.png"
