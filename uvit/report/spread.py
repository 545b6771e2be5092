"""The seed spread of a benchmark's figures: its own run and its seed-spread runs (the same
configuration with another `train.seed`), each figure's mean and sample standard deviation.

One run's FID moves with the seeds and, in its last digits, with the machine (float-level
non-determinism across CPUs changes the loss from a few tens of steps on), so a benchmark's page
reports this spread beside its own run's figures.
"""

from __future__ import annotations

import json
import math
from typing import Any

from uvit.report.ablations import StudyRun, collect

# The figures summarised: the score stage's, and the training loss at the last step.
FIGURES = ("fid", "fid_floor", "fid_over_floor", "accuracy", "final_loss")


def _finite(v: Any) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def spread_summary(runs: list[StudyRun]) -> dict[str, Any]:
    """{"seeds", "runs": one record per run, and per figure {"mean", "std", "min", "max"}} over
    `runs` (the benchmark's own first). std is the sample standard deviation (n - 1); a figure no
    run has is null throughout. Every run's train/summary.json and score/metrics.json must exist."""
    if len(runs) < 2:
        raise ValueError(f"a seed spread needs at least two runs, got {len(runs)}")
    results = collect(runs)
    results["final_loss"] = [json.loads((r.train / "summary.json").read_text()).get("final_loss") for r in runs]
    records = [
        {"run": row["run"], "seed": int(row["seed"]), **{f: _finite(row[f]) for f in FIGURES}}
        for row in results.to_dict("records")
    ]
    out: dict[str, Any] = {"seeds": [r["seed"] for r in records], "runs": records}
    for figure in FIGURES:
        col = results[figure].astype(float)
        out[figure] = {k: _finite(getattr(col, k)()) for k in ("mean", "std", "min", "max")}
    return out
