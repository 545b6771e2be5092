"""The tiny digits training run that the Ray tests share: a 2-block, 32-wide U-ViT, 12 steps of
batch 16, a checkpoint every 4 steps and a metrics row every 2."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from uvit.config import load_params

ROOT = Path(__file__).resolve().parents[1]


def tiny_digits_params(workers: int, **train: Any) -> dict[str, Any]:
    """params.yaml with its digits block cut to the tiny run on `workers` Ray workers (one thread
    each); `train` overrides more of digits.train."""
    params = copy.deepcopy(load_params(ROOT / "params.yaml"))
    d = params["digits"]
    d["model"]["overrides"] = {"embed_dim": 32, "depth": 2, "num_heads": 2}
    d["train"].update(
        steps=12,
        batch_size=16,
        checkpoint_every=4,
        log_every=2,
        num_workers=workers,
        threads_per_worker=1,
        warmup_steps=2,
    )
    d["train"].update(train)
    return params
