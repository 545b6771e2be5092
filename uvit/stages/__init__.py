"""The pipeline's stages: plain functions of a validated config and the artifact paths.

`uvit.stages.table.STAGES` declares every stage once (command, code and data dependencies, the
external files its parameters name, params, outputs, which benchmarks it applies to); the DVC
files are generated from it, and `uvit run` and the Prefect flow walk it. DVC calls the stages
through the `uvit` CLI, tests call the functions directly: one code path for every runner.
"""

from __future__ import annotations

import importlib
from typing import Any

from uvit.stages.table import STAGE_NAMES, STAGES, Stage, chain, get_stage, steps

# The stage functions import torch, great-expectations, Ray...: loaded on first use, so `uvit
# --help`, `uvit pipeline check` and the stages that need none of them start in a fraction of the time.
_FUNCTIONS = {
    "run_ablation": "ablation",
    "run_classifier": "classifier",
    "run_data": "data",
    "run_encode": "encode",
    "run_fetch": "publish",
    "run_publish": "publish",
    "run_report": "report",
    "run_sample": "sample",
    "run_samplers": "samplers",
    "run_score": "score",
    "run_spread": "spread",
    "run_train": "train",
    "run_validate": "validate",
}


def __getattr__(name: str) -> Any:
    if name in _FUNCTIONS:
        return getattr(importlib.import_module(f"uvit.stages.{_FUNCTIONS[name]}"), name)
    raise AttributeError(f"module 'uvit.stages' has no attribute {name!r}")


__all__ = ["STAGES", "STAGE_NAMES", "Stage", "chain", "get_stage", "steps", *_FUNCTIONS]
