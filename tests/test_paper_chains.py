"""A miniature of every paper chain through DVC: `dvc repro paper/dvc.yaml:publish@<benchmark>`.

The inputs are small files in each source's real on-disk format and tiny random-weight stand-ins
for the weight files (uvit.miniature), named by parameters the way a user names the real ones;
the official checksums still guard the official archives (the miniature CIFAR-10 tarball passes
with the checksum its params declare). Then: every report holds numbers, a second `dvc repro`
runs nothing, and replacing the VAE file, a code file or a parameter re-runs exactly the stages
that depend on it.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from uvit.miniature import PAPER_BENCHMARKS, write_miniature

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
TIMES: dict[str, float] = {}


def ran(out: str) -> set[str]:
    """The stages `dvc repro` ran, as 'stage@benchmark' (group suffixes such as -latent dropped)."""
    names = re.findall(r"Running stage 'paper/dvc\.yaml:([^']+)'", out)
    return {re.sub(r"-(pixel|latent|text)(-\d+)?@", "@", n) for n in names}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, dict]:
    dest = tmp_path_factory.mktemp("miniature")
    return dest, write_miniature(dest, PAPER_BENCHMARKS)


@pytest.fixture(scope="module")
def project(inputs, tmp_path_factory, make_project) -> Path:
    _, overrides = inputs
    return make_project(tmp_path_factory.mktemp("paper") / "project", overrides)


@pytest.mark.parametrize("benchmark", PAPER_BENCHMARKS)
def test_chain_runs_end_to_end(project, benchmark, dvc):
    t0 = time.monotonic()
    out = dvc(["repro", f"paper/dvc.yaml:publish@{benchmark}"], project)
    TIMES[benchmark] = time.monotonic() - t0
    stages = {s.split("@")[0] for s in ran(out) if s.endswith(f"@{benchmark}")}
    expected = {"data", "validate", "train", "sample", "score", "report", "publish"}
    expected |= {"encode"} if benchmark in ("imagenet256", "imagenet512", "mscoco256") else set()
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
    assert (project / "artifacts" / benchmark / published["run_id"] / "manifest.json").is_file()
    print(f"{benchmark}: {TIMES[benchmark]:.0f} s")


def test_second_repro_runs_nothing(project, dvc):
    for b in PAPER_BENCHMARKS:  # the chains above ran (or this fails on a missing output)
        assert (project / f"runs/{b}/publish.json").is_file()
    out = dvc(["repro", "paper/dvc.yaml"], project)
    assert ran(out) == set(), out[-3000:]


def test_what_reruns_after_which_change(inputs, project, dvc):
    """A weight file, a parameter value and a code file, each changed once: exactly the stages that
    read it (and what depends on them) run again."""
    dest, overrides = inputs
    # 1. The VAE file replaced (the same format, other weights): encode and everything after it.
    vae = Path(overrides["imagenet256"]["encode"]["vae"])
    state = torch.load(vae, weights_only=True)
    state = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in state.items()}
    torch.save(state, vae)
    out = dvc(["repro", "paper/dvc.yaml:publish@imagenet256"], project)
    assert ran(out) == {f"{s}@imagenet256" for s in ("encode", "train", "sample", "score", "report", "publish")}
    # 2. A parameter of the sample stage: sample and what reads the samples.
    out = _set_and_repro(dvc, project, "imagenet256", ("sample", "seed"), 7)
    assert ran(out) == {f"{s}@imagenet256" for s in ("sample", "score", "report", "publish")}
    # 3. A code file of the report stage: the report (and publish) of the benchmark.
    tables = project / "uvit/report/tables.py"
    tables.write_text(tables.read_text() + "\n# a comment changes the file's hash\n")
    out = dvc(["repro", "paper/dvc.yaml:publish@cifar10"], project)
    assert ran(out) == {"report@cifar10", "publish@cifar10"}
    # 4. Nothing changed: nothing runs.
    assert ran(dvc(["repro", "paper/dvc.yaml:publish@cifar10"], project)) == set()


def _set_and_repro(dvc, project: Path, benchmark: str, key: tuple[str, str], value) -> str:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params[benchmark][key[0]][key[1]] = value
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return dvc(["repro", f"paper/dvc.yaml:publish@{benchmark}"], project)


def test_miniature_command_makes_a_ready_project(tmp_path):
    proc = subprocess.run([str(BIN / "uvit"), "miniature", str(tmp_path / "mini"), "--benchmarks", "cifar10"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    project = tmp_path / "mini" / "project"
    block = yaml.safe_load((project / "params.yaml").read_text())["cifar10"]
    archive = Path(block["data"]["root"])
    assert archive.is_file() and archive.is_relative_to(tmp_path / "mini" / "inputs")
    assert block["data"]["sha256"] == hashlib.sha256(archive.read_bytes()).hexdigest()
    check = subprocess.run([str(BIN / "uvit"), "pipeline", "check"], cwd=project, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    assert archive.as_posix() in (project / "paper/dvc.yaml").read_text()  # the archive is a DVC dependency
    assert subprocess.run(["git", "status", "--porcelain"], cwd=project, capture_output=True, text=True).stdout == ""
