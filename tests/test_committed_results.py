"""The committed results are tied to the code: the committed metrics, plots and report pages carry
the hashes `dvc.lock` recorded when `dvc repro` wrote them, and the report pages regenerate byte for
byte from the committed run files (a hand edit of a page, or of a metric, fails here)."""

from __future__ import annotations

import difflib
import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _git_files(*under: str) -> list[str]:
    """Paths (relative to the repository root) that git tracks under the given folders."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--", *under], cwd=ROOT, capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"not a git checkout ({e}): the committed files are unknown")
    return sorted(p for p in out.stdout.decode().split("\0") if p)


def _dvc_md5(path: Path) -> str:
    """The md5 DVC 3 records for `path`: a file's raw bytes (no line-ending normalisation); for a
    folder, the md5 of the JSON list of its files' {"md5", "relpath"} sorted by relpath, plus ".dir"."""
    if path.is_file():
        return hashlib.md5(path.read_bytes()).hexdigest()
    entries = [
        {"md5": hashlib.md5(f.read_bytes()).hexdigest(), "relpath": f.relative_to(path).as_posix()}
        for f in sorted(path.rglob("*"), key=lambda f: f.relative_to(path).as_posix())
        if f.is_file()
    ]
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode()).hexdigest() + ".dir"


def _entries(stage: dict, *keys: str):
    """(path, options) of a dvc.yaml stage's entries under `keys` (plain strings or {path: options})."""
    for key in keys:
        for item in stage.get(key) or []:
            if isinstance(item, str):
                yield item, {}
            else:
                ((path, opts),) = item.items()
                yield path, opts or {}


def _expanded(stages: dict) -> list[dict]:
    """dvc.yaml's stages, each `foreach` group (a list of items: the seed-spread runs) expanded."""
    out = []
    for stage in stages.values():
        if "foreach" not in stage:
            out.append(stage)
            continue
        body = yaml.safe_dump(stage["do"])
        out += [yaml.safe_load(body.replace("${item}", str(item))) for item in stage["foreach"]]
    return out


def _committed_outputs() -> list[str]:
    """Every output of dvc.yaml kept in git rather than the DVC cache (`cache: false`)."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return sorted(
        p for s in _expanded(stages) for p, o in _entries(s, "outs", "metrics", "plots") if o.get("cache") is False
    )


def test_the_committed_outputs_carry_dvc_lock_hashes() -> None:
    lock = yaml.safe_load((ROOT / "dvc.lock").read_text())["stages"]
    outputs = _committed_outputs()
    assert "runs/digits/score/metrics.json" in outputs and "reports/digits.md" in outputs
    assert {"runs/digits/spread/summary.json", "runs/digits/spread/s2/score/metrics.json"} <= set(outputs)
    tracked = _git_files(*outputs)
    recorded = {o["path"]: o for s in lock.values() for o in s.get("outs", [])}
    for path in outputs:
        assert any(t == path or t.startswith(path + "/") for t in tracked), f"{path} is not committed"
        assert path in recorded, f"dvc.lock records no output {path}: run `dvc repro` and commit dvc.lock"
        entry, local = recorded[path], ROOT / path
        assert entry.get("hash") == "md5", path  # DVC 3 hashes (raw bytes)
        assert _dvc_md5(local) == entry["md5"], f"{path} differs from what `dvc repro` wrote (dvc.lock)"
        files = [f for f in local.rglob("*") if f.is_file()] if local.is_dir() else [local]
        assert sum(f.stat().st_size for f in files) == entry["size"], path
        # Every stage that read this file read the committed version (the lock is one consistent run).
        for name, stage in lock.items():
            for dep in stage.get("deps", []):
                if dep["path"] == path:
                    assert dep["md5"] == entry["md5"], f"stage {name} ran on another {path}"


def test_dvc_md5_of_a_text_file_is_dvcs_own(tmp_path) -> None:
    """DVC 3 hashes a text file's raw bytes (DVC 2 turned CRLF into LF first): checked against
    dvc-data itself on a CRLF file. Folders are checked by the lock test (reports/digits)."""
    hash_file = pytest.importorskip("dvc_data.hashfile.hash").hash_file
    from dvc_objects.fs.local import LocalFileSystem

    path = tmp_path / "a.txt"
    path.write_bytes(b"line\r\nline\n")
    _, info = hash_file(str(path), LocalFileSystem(), "md5")
    assert info.value == _dvc_md5(path) == hashlib.md5(b"line\r\nline\n").hexdigest()


def test_the_report_pages_regenerate_from_the_committed_run_files(tmp_path, monkeypatch) -> None:
    """`uvit report digits` (and the sampler study's and the design study's pages, from their
    committed rows and runs) on a copy holding only the committed run files writes exactly the
    committed pages and figures."""
    from uvit.config import load_benchmark, load_params
    from uvit.paths import BenchmarkPaths
    from uvit.stages.report import run_report
    from uvit.stages.samplers import write_sampler_report

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    inputs = [p for p, _ in _entries(stages["report"], "deps") if p.startswith("runs/")]
    committed = _git_files("runs")
    for rel in committed:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, tmp_path / rel)
    missing = [p for p in inputs if not any(c == p or c.startswith(p + "/") for c in committed)]
    monkeypatch.chdir(tmp_path)  # the pages name their sources relative to the working directory
    cfg, paths = load_benchmark("digits", load_params(ROOT / "params.yaml")), BenchmarkPaths("digits", tmp_path)
    run_report(cfg, paths)
    if "samplers" in stages:  # its page and summary come from the study's committed rows
        write_sampler_report(cfg, paths)
        summary = "runs/digits/samplers/summary.json"
        assert (tmp_path / summary).read_bytes() == (ROOT / summary).read_bytes(), summary
    if (ROOT / "studies/dvc.lock").is_file():  # the design study's page, from its runs' committed files
        from uvit.stages.ablation import run_ablation

        for rel in ("runs/digits/ablation/results.csv", "runs/digits/ablation/summary.json"):
            (tmp_path / rel).unlink()
        run_ablation(cfg, paths)
        for rel in ("runs/digits/ablation/results.csv", "runs/digits/ablation/summary.json"):
            assert (tmp_path / rel).read_bytes() == (ROOT / rel).read_bytes(), rel

    pages = _git_files("reports")
    assert {"reports/digits.md", "reports/README.md"} <= set(pages)
    why = f" (report inputs not committed: {missing})" if missing else ""
    for rel in sorted(pages, key=lambda p: not p.endswith(".md")):  # pages first: their diff says most
        assert (tmp_path / rel).is_file(), f"{rel} is not regenerated from the committed run files{why}"
        got, want = (tmp_path / rel).read_bytes(), (ROOT / rel).read_bytes()
        diff = (
            "".join(
                difflib.unified_diff(
                    want.decode().splitlines(True),
                    got.decode().splitlines(True),
                    f"committed {rel}",
                    f"regenerated {rel}",
                )
            )
            if rel.endswith(".md")
            else ""
        )
        assert got == want, f"{rel} does not regenerate from the committed run files{why}\n{diff}"
    written = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "reports").rglob("*") if p.is_file())
    assert written == pages, "the report stage writes files that are not committed"


def test_the_committed_score_is_the_sampler_study_point_at_the_digits_setting() -> None:
    """digits samples with a setting of its sampler study, and the sample stage draws what the study
    drew at that setting and seed: the committed FID and conditional accuracy are that study row's."""
    import csv

    sample = yaml.safe_load((ROOT / "params.yaml").read_text())["digits"]["sample"]
    rows = [
        r
        for r in csv.DictReader((ROOT / "runs/digits/samplers/results.csv").open())
        if (r["sampler"], r["skip_type"], int(r["steps"]), int(r["seed"]))
        == (sample["sampler"], sample.get("skip_type") or "default", sample["steps"], sample.get("seed", 0))
    ]
    assert len(rows) == 1, f"the digits sample setting {sample} is not a point of the sampler study"
    metrics = json.loads((ROOT / "runs/digits/score/metrics.json").read_text())
    # The same samples (the accuracy counts agree exactly); the two FID computations agree to float
    # rounding, not bit for bit (2.7e-8 relative in one committed run), as in tests/test_pipeline.py.
    assert metrics["fid"] == pytest.approx(float(rows[0]["fid"]), rel=1e-6)
    assert metrics["conditional_accuracy"] == pytest.approx(float(rows[0]["conditional_accuracy"]), abs=1e-9)


def test_the_committed_study_files_carry_its_lock_hashes() -> None:
    """Every design-study output kept in git (each run's summary, metrics, FID log and score, the
    results table and the page) is what `dvc repro studies/dvc.yaml` wrote: studies/dvc.lock's hash."""
    lock_path = ROOT / "studies/dvc.lock"
    if not lock_path.is_file():
        pytest.skip("the design study has not been run and committed")
    lock = yaml.safe_load(lock_path.read_text())["stages"]
    recorded = {o["path"]: o for s in lock.values() for o in s.get("outs", [])}
    tracked = _git_files("runs", "reports")
    committed = [p for p in recorded if any(t == p or t.startswith(p + "/") for t in tracked)]
    assert "reports/ablations.md" in committed and "runs/digits/ablation/results.csv" in committed
    assert sum(p.endswith("score/metrics.json") for p in committed) == sum(n.startswith("score@") for n in lock)
    for path in committed:
        assert _dvc_md5(ROOT / path) == recorded[path]["md5"], f"{path} differs from what `dvc repro` wrote"
    for name, stage in lock.items():  # one consistent run: each stage read the committed files
        for dep in stage.get("deps", []):
            if dep["path"] in recorded and dep["path"] in committed:
                assert dep["md5"] == recorded[dep["path"]]["md5"], f"stage {name} ran on another {dep['path']}"
