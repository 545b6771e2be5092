"""Load a training checkpoint into a plain single-process `TrainingState`: how the tests look
inside one. The trainer restores through its strategy instead (`uvit.train.trainer._build_learner`
from `read_checkpoint`'s dict), so this is not library code."""

from __future__ import annotations

from pathlib import Path

import torch

from uvit.train.checkpoint import CheckpointError, TrainingState, read_checkpoint


def load_checkpoint(directory: str | Path, state: TrainingState, device: str | torch.device = "cpu") -> TrainingState:
    """Load weights, EMA, optimizer and scheduler from `directory` into `state` (in place)."""
    ckpt = read_checkpoint(directory, device)
    try:
        state.model.load_state_dict(ckpt["model"])
        if state.ema is not None:
            if ckpt["ema"] is None:
                raise CheckpointError(f"{directory}: no ema/ weights")
            state.ema.load_state_dict(ckpt["ema"])
        state.optimizer.load_state_dict(ckpt["optimizer"])
        state.scheduler.load_state_dict(ckpt["scheduler"])
    except CheckpointError:
        raise
    except Exception as e:  # wrong shapes, another model's optimizer ...
        raise CheckpointError(f"{directory}: cannot be loaded ({type(e).__name__}: {e})") from e
    state.step = ckpt["step"]
    return state
