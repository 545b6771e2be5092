"""Training checkpoints: one directory per checkpoint, written atomically, read safely.

Layout of a checkpoint directory:
    model/       UViT.save_pretrained of the raw weights   (config.json + model.safetensors)
    ema/         UViT.save_pretrained of the EMA weights
    optimizer.pt AdamW + LR-scheduler state (tensors and numbers only: loaded weights_only)
    state.json   {"step": int, "format_version": 1, "files": {relative path: byte size}}
    metrics.csv  the per-step metrics so far (so they travel with the checkpoint to storage)

No RNG state is needed: every step's randomness is a function of (seed, step, rank).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from uvit.models.uvit import UViT

FORMAT_VERSION = 1


@dataclass
class TrainingState:
    model: UViT
    ema: UViT | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    step: int


def save_checkpoint(directory: str | Path, state: TrainingState, metrics_csv: str | Path | None = None) -> Path:
    """Write `state` to `directory` atomically (a temp sibling, then one rename)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        state.model.save_pretrained(tmp / "model")
        if state.ema is not None:
            state.ema.save_pretrained(tmp / "ema")
        torch.save(
            {"optimizer": state.optimizer.state_dict(), "scheduler": state.scheduler.state_dict()}, tmp / "optimizer.pt"
        )
        if metrics_csv is not None and Path(metrics_csv).is_file():
            shutil.copy2(metrics_csv, tmp / "metrics.csv")
        # state.json last: its presence marks a complete checkpoint, and the byte size of every
        # other file lets a reader spot a truncated copy (a crash mid-upload) without reading it.
        files = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
        (tmp / "state.json").write_text(
            json.dumps({"step": state.step, "format_version": FORMAT_VERSION, "files": files}) + "\n"
        )
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


class CheckpointError(RuntimeError):
    """A checkpoint directory is incomplete, corrupt or not ours."""


def checkpoint_step(directory: str | Path) -> int:
    path = Path(directory) / "state.json"
    try:
        return int(json.loads(path.read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{directory}: no readable state.json ({e}); the checkpoint is incomplete") from e


def read_checkpoint(directory: str | Path, device: str | torch.device = "cpu") -> dict[str, Any]:
    """The raw contents of a checkpoint: {"step", "model", "ema" (state dicts; ema None if absent),
    "optimizer", "scheduler" (state dicts)}. Raises CheckpointError on anything unreadable."""
    directory = Path(directory)
    step = checkpoint_step(directory)
    try:
        model = UViT.from_pretrained(directory / "model", device=device).state_dict()
        ema = (
            UViT.from_pretrained(directory / "ema", device=device).state_dict()
            if (directory / "ema").is_dir()
            else None
        )
        opt = torch.load(directory / "optimizer.pt", map_location=device, weights_only=True)
        return {"step": step, "model": model, "ema": ema, "optimizer": opt["optimizer"], "scheduler": opt["scheduler"]}
    except CheckpointError:
        raise
    except Exception as e:  # truncated safetensors, refused pickle, wrong shapes ...
        raise CheckpointError(f"{directory}: cannot be loaded ({type(e).__name__}: {e})") from e
