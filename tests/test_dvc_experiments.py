"""`dvc exp run -S digits.train.steps=N` continues the previous run's training, in the workspace
and with `--temp` (a copy under .dvc/tmp/exps/, whose checkpoints are the workspace's)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

CUT_DOWN = {"digits": {
    "train": {"steps": 20, "checkpoint_every": 10, "log_every": 5, "num_workers": 1, "sample_every": 0},
    "sample": {"num_samples": 20, "batch_size": 20, "steps": 5},
    "score": {"classifier_epochs": 1},
}}


def checkpoint_steps(project: Path) -> set[int]:
    return {int(p.name.split("_")[-1]) for p in (project / "runs/digits/ray").glob("*/*/checkpoint_*")}


def test_exp_run_continues_training(tmp_path, make_project, dvc):
    project = make_project(tmp_path / "project", CUT_DOWN)
    dvc(["repro"], project)
    assert json.loads((project / "runs/digits/train/summary.json").read_text())["steps"] == 20

    out = dvc(["exp", "run", "-S", "digits.train.steps=30"], project)  # in the workspace
    assert re.search(r"resuming from \S+ \(step 20\)", out), out[-3000:]
    summary = json.loads((project / "runs/digits/train/summary.json").read_text())
    assert summary["steps"] == 30
    logged = [int(line.split(",")[0]) for line in (project / "runs/digits/train/metrics.csv").read_text().splitlines()[1:]]
    assert logged == list(range(5, 31, 5))  # one trajectory: steps 21..30 continue 1..20, none repeated

    out = dvc(["exp", "run", "--temp", "-S", "digits.train.steps=40"], project)  # in .dvc/tmp/exps/
    assert re.search(r"resuming from \S+ \(step 30\)", out), out[-3000:]
    assert 40 in checkpoint_steps(project)  # the experiment's checkpoints are the workspace's
