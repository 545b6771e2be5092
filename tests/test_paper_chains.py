"""A miniature of every paper chain through DVC: `dvc repro paper/dvc.yaml:publish@<benchmark>`,
here the pixel benchmarks (tests/test_latent_chains.py: the latent ones).

The inputs are small files in each source's real on-disk format and tiny random-weight stand-ins
for the weight files (uvit.miniature), named by parameters the way a user names the real ones;
the official checksums still guard the official archives (the miniature CIFAR-10 tarball passes
with the checksum its params declare). Then: every report holds numbers, a second `dvc repro`
runs nothing, and an edited code file re-runs exactly the stage that runs it.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from chains import check_chain, inputs, project, ran, second_repro_runs_nothing  # noqa: F401 (fixtures)

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
BENCHMARKS = ("cifar10", "celeba64", "imagenet64")


@pytest.mark.parametrize("benchmark", BENCHMARKS)
def test_chain_runs_end_to_end(project, benchmark, dvc):
    check_chain(project, benchmark, dvc(["repro", f"paper/dvc.yaml:publish@{benchmark}"], project))


def test_second_repro_runs_nothing(project, dvc):
    second_repro_runs_nothing(project, BENCHMARKS, dvc)


def test_an_edited_code_file_reruns_its_stage_only(project, dvc):
    """A code file of the report stage changes (a comment): the report runs again; its outputs
    come out byte-identical, so DVC leaves publish alone."""
    tables = project / "uvit/report/tables.py"
    tables.write_text(tables.read_text() + "\n# a comment changes the file's hash\n")
    out = dvc(["repro", "paper/dvc.yaml:publish@cifar10"], project)
    assert ran(out) == {"report@cifar10"}
    assert ran(dvc(["repro", "paper/dvc.yaml:publish@cifar10"], project)) == set()  # nothing changed since


def test_miniature_command_makes_a_ready_project(tmp_path):
    proc = subprocess.run(
        [str(BIN / "uvit"), "miniature", str(tmp_path / "mini"), "--benchmarks", "cifar10"],
        capture_output=True,
        text=True,
        timeout=300,
    )
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
