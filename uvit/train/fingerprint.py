"""Which checkpoints a run may resume from: the hash of everything that fixes the training
trajectory, and the folders that hold the run's training data. Torch-free, so that the publish
stage can name a run without importing the trainer."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from uvit.config import BenchmarkConfig
from uvit.paths import BenchmarkPaths


def training_data_dir(cfg: BenchmarkConfig, paths: BenchmarkPaths) -> Path:
    return paths.latents if cfg.encode is not None else paths.data


def contexts_data_dir(cfg: BenchmarkConfig, paths: BenchmarkPaths) -> Path | None:
    """The training captions' CLIP contexts (encode stage), for text-to-image presets; else None."""
    return paths.contexts if cfg.text_to_image else None


# Knobs that change how long, where or how visibly a run goes, not the trajectory it follows
# (the strategy changes only float summation order: DDP and FSDP checkpoints are interchangeable).
_RUN_LENGTH_KEYS = {
    "steps",
    "checkpoint_every",
    "keep_checkpoints",
    "max_failures",
    "log_every",
    "strategy",
    "storage_path",
    "storage_endpoint",
    "async_checkpoint",
    "prefetch",
    "sample_every",
    "tensorboard",
    "fid_every",
    "fid_samples",
}


def train_fingerprint(cfg: BenchmarkConfig, data_dir: Path, contexts_dir: Path | None = None) -> str:
    """Hash of everything that determines the training trajectory: model, diffusion and train
    parameters (except run-length knobs such as `steps`) and the training split's manifest.

    Checkpoints live under runs/<benchmark>/ray/<fingerprint>/, so a run only ever resumes from
    checkpoints of the same trajectory, and raising `train.steps` continues an earlier run.
    """
    train = {k: v for k, v in cfg.train.model_dump(mode="json").items() if k not in _RUN_LENGTH_KEYS}
    key = {
        "model": cfg.model.model_dump(mode="json"),
        "diffusion": cfg.diffusion.model_dump(mode="json"),
        "train": train,
        "encode": cfg.encode.model_dump(mode="json") if cfg.encode else None,
    }
    h = hashlib.sha256(json.dumps(key, sort_keys=True).encode())
    manifest = data_dir / "train" / "manifest.json"
    if manifest.is_file():
        h.update(manifest.read_bytes())
    if contexts_dir is not None and (contexts_dir / "train" / "manifest.json").is_file():  # text-to-image
        h.update((contexts_dir / "train" / "manifest.json").read_bytes())
    return h.hexdigest()[:16]
