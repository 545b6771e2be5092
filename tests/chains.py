"""What the two paper-chain test files share (tests/test_paper_chains.py: the pixel benchmarks,
tests/test_latent_chains.py: the latent ones; two files so `pytest -n 2 --dist loadfile` runs the
halves at once). A test module sets BENCHMARKS and imports the fixtures from here."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import yaml

from uvit.miniature import write_miniature

LATENT = ("imagenet256", "imagenet512", "mscoco256")


def ran(out: str) -> set[str]:
    """The stages `dvc repro` ran, as 'stage@benchmark' (group suffixes such as -latent dropped)."""
    names = re.findall(r"Running stage 'paper/dvc\.yaml:([^']+)'", out)
    return {re.sub(r"-(pixel|latent|text)(-\d+)?@", "@", n) for n in names}


@pytest.fixture(scope="module")
def inputs(request, tmp_path_factory) -> tuple[Path, dict]:
    """The miniature inputs of the module's BENCHMARKS and their params overrides."""
    dest = tmp_path_factory.mktemp("miniature")
    return dest, write_miniature(dest, request.module.BENCHMARKS)


@pytest.fixture(scope="module")
def project(inputs, tmp_path_factory, make_project) -> Path:
    """A git + DVC copy of the project pointed at the miniature inputs."""
    return make_project(tmp_path_factory.mktemp("paper") / "project", inputs[1])


def check_chain(project: Path, benchmark: str, out: str) -> None:
    """`out` (of `dvc repro paper/dvc.yaml:publish@<benchmark>`) ran every stage of the chain, and
    the chain's outputs hold this run's numbers."""
    stages = {s.split("@")[0] for s in ran(out) if s.endswith(f"@{benchmark}")}
    expected = {"data", "validate", "train", "sample", "score", "report", "publish"}
    expected |= {"encode"} if benchmark in LATENT else set()
    assert stages == expected, out[-3000:]
    metrics = json.loads((project / f"runs/{benchmark}/score/metrics.json").read_text())
    assert math.isfinite(metrics["fid"]) and metrics["fid"] > 0
    if benchmark == "mscoco256":
        assert 0 <= metrics["clip_score"] <= 100
    summary = json.loads((project / f"runs/{benchmark}/train/summary.json").read_text())
    assert summary["steps"] == 4 and "CPU" in summary["hardware"]
    page = (project / f"reports/{benchmark}.md").read_text()
    assert f"{metrics['fid']:.2f}" in page  # the report shows this run's FID
    published = json.loads((project / f"runs/{benchmark}/publish.json").read_text())
    assert (project / "artifacts" / benchmark / published["run_id"] / "run_manifest.json").is_file()


def second_repro_runs_nothing(project: Path, benchmarks, dvc) -> None:
    for b in benchmarks:  # the chains ran (or this fails on a missing output)
        assert (project / f"runs/{b}/publish.json").is_file()
    out = dvc(["repro", *(f"paper/dvc.yaml:publish@{b}" for b in benchmarks)], project)
    assert ran(out) == set(), out[-3000:]


def set_and_repro(dvc, project: Path, benchmark: str, key: tuple[str, str], value) -> str:
    """Set params.yaml's <benchmark>.<section>.<key> and reproduce the benchmark's chain."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    params[benchmark][key[0]][key[1]] = value
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return dvc(["repro", f"paper/dvc.yaml:publish@{benchmark}"], project)
