"""The seed spread: the spread stage's summary over the benchmark's run and its spread runs,
checked against numpy on fake run folders, and the page and index that show it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from test_report import make_run
from uvit.config import load_benchmark
from uvit.paths import BenchmarkPaths
from uvit.report import load_run, results_table, write_benchmark_report, write_index
from uvit.report.spread import spread_summary
from uvit.stages.spread import run_spread

ROOT = Path(__file__).resolve().parents[1]
# Per run (train.seed 0, 1, 2): FID, floor, conditional accuracy, final loss.
FIGURES = {0: (7.8, 2.84, 0.972, 0.0878), 1: (9.1, 2.80, 0.950, 0.0891), 2: (6.5, 2.90, 0.981, 0.0860)}


def _runs(root: Path) -> BenchmarkPaths:
    """runs/digits and runs/digits/spread/s1, s2 under `root`, with FIGURES' values."""
    for seed, (fid, floor, acc, loss) in FIGURES.items():
        parent, name = (root / "runs", "digits") if seed == 0 else (root / "runs/digits/spread", f"s{seed}")
        score = {"fid": fid, "fid_floor": floor, "fid_over_floor": fid / floor, "conditional_accuracy": acc}
        run = make_run(parent, name, score=score)
        summary = json.loads((run / "train/summary.json").read_text())
        (run / "train/summary.json").write_text(json.dumps({**summary, "final_loss": loss}))
    return BenchmarkPaths("digits", root)


def test_the_spread_stage_summarises_every_run_as_numpy_does(tmp_path: Path) -> None:
    cfg = load_benchmark("digits", ROOT / "params.yaml")
    assert cfg.spread is not None and cfg.spread.seeds == [1, 2] and cfg.train.seed == 0
    paths = _runs(tmp_path)
    summary = run_spread(cfg, paths)
    assert json.loads((tmp_path / "runs/digits/spread/summary.json").read_text()) == summary
    assert summary["seeds"] == [0, 1, 2]
    assert [r["run"] for r in summary["runs"]] == ["digits", "digits/spread/s1", "digits/spread/s2"]
    columns = {"fid": 0, "fid_floor": 1, "accuracy": 2, "final_loss": 3}
    for figure, i in columns.items():
        values = np.array([FIGURES[s][i] for s in (0, 1, 2)])
        assert [r[figure] for r in summary["runs"]] == pytest.approx(list(values))
        assert summary[figure]["mean"] == pytest.approx(values.mean())
        assert summary[figure]["std"] == pytest.approx(values.std(ddof=1))  # the sample std
        assert (summary[figure]["min"], summary[figure]["max"]) == pytest.approx((values.min(), values.max()))
    ratios = np.array([FIGURES[s][0] / FIGURES[s][1] for s in (0, 1, 2)])
    assert summary["fid_over_floor"]["std"] == pytest.approx(ratios.std(ddof=1))


def test_the_spread_stage_names_a_missing_run(tmp_path: Path) -> None:
    cfg = load_benchmark("digits", ROOT / "params.yaml")
    paths = _runs(tmp_path)
    (tmp_path / "runs/digits/spread/s2/score/metrics.json").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"spread/s2/score/metrics.json is missing: run `uvit run digits/spread/s2`"
    ):
        run_spread(cfg, paths)
    with pytest.raises(ValueError, match="at least two runs"):
        spread_summary([])


def test_the_page_and_the_index_show_the_spread(tmp_path: Path) -> None:
    cfg = load_benchmark("digits", ROOT / "params.yaml")
    paths = _runs(tmp_path)
    run_spread(cfg, paths)
    fids = np.array([FIGURES[s][0] for s in (0, 1, 2)])
    spread = f"{fids.mean():.2f} ± {fids.std(ddof=1):.2f}"
    row = results_table(load_run(paths.run, "digits")).iloc[0]
    assert row["FID"] == "7.80"  # the benchmark's own run
    assert row["FID over training seeds 0, 1, 2 (mean ± std)"] == spread
    page = write_benchmark_report("digits", paths.run, paths.reports).read_text()
    section = page.split("## Seed spread", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("| ")]
    assert len(lines) == 1 + 3 + 2  # header, a row per run, mean ± std, min – max
    assert "`digits/spread/s1`" in lines[2] and "9.10" in lines[2] and "0.0891" in lines[2]
    assert spread in lines[4] and "6.50 – 9.10" in lines[5]
    assert "bit-identical" not in page
    index = write_index(tmp_path / "runs", paths.reports).read_text()
    row = next(line for line in index.splitlines() if line.startswith("| digits"))
    assert f"7.80 ({spread} over 3 seeds)" in row


def test_a_page_without_a_spread_has_no_section(tmp_path: Path) -> None:
    make_run(tmp_path, "digits", score={"fid": 9.0, "fid_floor": 2.5})
    page = write_benchmark_report("digits", tmp_path / "digits", tmp_path / "reports").read_text()
    assert "## Seed spread" not in page
    assert not any("over training seeds" in c for c in results_table(load_run(tmp_path / "digits", "digits")).columns)
