"""The design study's declaration and page: study runs as configs (uvit.config.AblationConfig), their
paths and DVC stages (studies/dvc.yaml), the periodic-FID export and the page's numbers and verdicts
(uvit.report.ablations). The study end to end runs in tests/test_pipeline.py."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from uvit.config import ConfigError, load_benchmark, load_params, study_runs
from uvit.paths import BenchmarkPaths
from uvit.report.ablations import (
    AGREES,
    DISAGREES,
    UNCLEAR,
    StudyRun,
    ablation_page,
    collect,
    fid_curves,
    summarize,
    verdict,
)
from uvit.stages import dvcfile

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def params() -> dict:
    return copy.deepcopy(load_params(ROOT / "params.yaml"))


def test_every_variant_and_seed_is_a_run(params) -> None:
    study = params["digits"]["ablation"]
    runs = study_runs(load_benchmark("digits", params))
    variants = sum(len(v) for v in study["groups"].values())
    assert len(runs) == len(study["default_seeds"]) + variants * len(study["seeds"])
    assert runs[0] == "digits/ablation/default-s0" and "digits/ablation/skip-none-s1" in runs


def test_a_run_is_its_benchmark_with_the_budget_the_seed_and_one_switch(params) -> None:
    base = load_benchmark("digits", params)
    run = load_benchmark("digits/ablation/skip-none-s1", params)
    budget = params["digits"]["ablation"]["train"]
    assert run.train.seed == 1 and run.train.steps == budget["steps"] and run.train.fid_every == budget["fid_every"]
    assert run.train.lr == base.train.lr and run.train.batch_size == base.train.batch_size  # the recipe otherwise
    assert run.uvit_config().skip == "none" and base.uvit_config().skip == "concat_linear"
    assert {k: v for k, v in vars(run.uvit_config()).items() if k != "skip"} == {
        k: v for k, v in vars(base.uvit_config()).items() if k != "skip"
    }
    assert run.ablation is None and run.sampler_study is None and run.sample == base.sample
    default = load_benchmark("digits/ablation/default-s2", params)
    assert default.uvit_config() == base.uvit_config() and default.train.seed == 2


def test_a_run_reads_its_benchmarks_data_and_writes_its_own_folder() -> None:
    p, base = BenchmarkPaths("digits/ablation/time-adaln-s0", Path("/w")), BenchmarkPaths("digits", Path("/w"))
    assert (p.data, p.validate, p.classifier) == (base.data, base.validate, base.classifier)
    assert p.train == Path("/w/runs/digits/ablation/time-adaln-s0/train") and p.ablation == base.ablation
    assert p.ray_storage == Path("/w/runs/digits/ablation/time-adaln-s0/ray")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s["groups"].update(spin=["left"]), "unknown group 'spin'"),
        (lambda s: s["groups"].update(skip=["sideways"]), "'sideways' is not one of"),
        (lambda s: s["groups"].update(skip=["concat_linear"]), "skip-concat_linear is the benchmark's own model"),
        (lambda s: s["groups"].update(scaling=[{"depth": 2, "embed_dim": 64}]), "each variant changes one of"),
        (lambda s: s["groups"].update(scaling=[{"depth": 3}]), "depth"),  # odd depth: not a valid model
        (lambda s: s.update(seeds=[0]), "at least 2 items"),
        (lambda s: s.update(default_seeds=[1, 1]), "repeated seed"),
        (lambda s: s["train"].update(steps=0), "steps"),
    ],
)
def test_a_bad_study_names_the_key(params, edit, message) -> None:
    edit(params["digits"]["ablation"])
    with pytest.raises(ConfigError, match=message):
        load_benchmark("digits", params)


def test_a_scaling_variant_changes_one_knob_and_its_count_is_exact(params) -> None:
    from uvit.models import UViT, count_params

    params["digits"]["ablation"]["groups"] = {"scaling": [{"depth": 2}, {"patch_size": 4}]}
    cfg = load_benchmark("digits", params)
    assert [r.rsplit("/", 1)[1] for r in study_runs(cfg)] == [
        "default-s0",
        "default-s1",
        "default-s2",
        "depth-2-s0",
        "depth-2-s1",
        "patch_size-4-s0",
        "patch_size-4-s1",
    ]
    shallow = load_benchmark("digits/ablation/depth-2-s0", params).uvit_config()
    assert (shallow.depth, shallow.embed_dim, shallow.patch_size) == (2, 128, 2)
    assert count_params(shallow) == sum(p.numel() for p in UViT(shallow).parameters())
    assert cfg.ablation.group_variants("scaling") == ["default", "depth-2", "patch_size-4"]


def test_an_unknown_run_lists_the_runs(params) -> None:
    with pytest.raises(ConfigError, match=r"no run 'skip-none-s7'; runs: default-s0, "):
        load_benchmark("digits/ablation/skip-none-s7", params)
    with pytest.raises(ConfigError, match="names no study run"):
        load_benchmark("digits/sweep/default-s0", params)


def test_studies_file_has_each_run_stage_per_run_and_the_page_stage(params) -> None:
    stages = yaml.safe_load(dvcfile.render(params, ROOT)[dvcfile.STUDY_FILE])["stages"]
    runs = [r.rsplit("/", 1)[1] for r in study_runs(load_benchmark("digits", params))]
    for name in ("train", "sample", "score"):
        assert stages[name]["foreach"] == runs
    train = stages["train"]["do"]
    assert train["cmd"] == "uvit train digits/ablation/${item}"
    assert {"data/digits", "runs/digits/validate", "runs/digits/classifier"} <= set(train["deps"])
    assert "digits.ablation.train" in train["params"][0]["params.yaml"]
    assert {"runs/digits/ablation/${item}/train/fid.csv": {"cache": False, "x": "step", "y": "fid"}} in train["plots"]
    page = stages["ablation"]
    assert page["cmd"] == "uvit ablation digits"
    assert f"runs/digits/ablation/{runs[-1]}/score/metrics.json" in page["deps"]
    where = dvcfile.addresses(params, ROOT)
    assert where["digits/ablation/skip-none-s0"]["score"].target() == "studies/dvc.yaml:score@skip-none-s0"
    assert where["digits"]["ablation"].target() == "studies/dvc.yaml:ablation"


def test_no_study_no_studies_file(params) -> None:
    del params["digits"]["ablation"]
    assert dvcfile.STUDY_FILE not in dvcfile.render(params, ROOT)


def test_the_fid_log_keeps_the_latest_value_of_each_step_up_to_the_run(tmp_path) -> None:
    from uvit.train.trainer import export_fid_log

    log = tmp_path / "fid.log"
    log.write_text("100,50.0\n200,30.0\n300,20.0\n200,31.5\n")  # resumed at 100: 200 logged again
    export_fid_log(log, tmp_path / "fid.csv", steps=200)
    assert (tmp_path / "fid.csv").read_text() == "step,fid\n100,50.0\n200,31.5\n"


# -- the page -------------------------------------------------------------------------------------
def _summary(rows: dict[str, tuple[float, float]]) -> pd.DataFrame:
    return pd.DataFrame(
        {"fid_mean": {k: m for k, (m, _) in rows.items()}, "fid_std": {k: s for k, (_, s) in rows.items()}}
    )


SKIP = {"skip-add": {"skip": "add"}, "skip-none": {"skip": "none"}}
BASE = {"skip": "concat_linear", "depth": 4, "embed_dim": 128, "patch_size": 2}
PAPER_SKIP = {"best": "concat_linear", "worst": "none"}


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        ({"default": (10, 1), "skip-add": (20, 1), "skip-none": (40, 2)}, AGREES),
        ({"default": (10, 3), "skip-add": (12, 3), "skip-none": (40, 2)}, UNCLEAR),  # best within spread
        ({"default": (30, 1), "skip-add": (10, 1), "skip-none": (40, 2)}, DISAGREES),  # another is clearly best
        ({"default": (10, 1), "skip-add": (40, 1), "skip-none": (20, 2)}, DISAGREES),  # none not worst, clearly
    ],
)
def test_a_verdict_weighs_the_means_against_their_spreads(rows, expected) -> None:
    result, ours = verdict("skip", ["default", "skip-add", "skip-none"], _summary(rows), PAPER_SKIP, BASE, SKIP)
    assert result == expected, ours
    best = min(rows, key=lambda k: rows[k][0])
    assert f"best {BASE['skip'] if best == 'default' else SKIP[best]['skip']}" in ours


def test_a_scaling_verdict_follows_the_direction_the_paper_prefers() -> None:
    overrides = {"depth-2": {"depth": 2}, "depth-8": {"depth": 8}}
    finding = {"better": {"depth": "larger"}}
    rows = {"default": (20, 1), "depth-2": (30, 1), "depth-8": (10, 1)}
    assert verdict("scaling", list(rows), _summary(rows), finding, BASE, overrides)[0] == AGREES
    rows = {"default": (20, 1), "depth-2": (10, 1), "depth-8": (21, 1)}
    assert verdict("scaling", list(rows), _summary(rows), finding, BASE, overrides)[0] == DISAGREES


def _write_run(root: Path, run: str, fid: float, acc: float, params: int, curve: list[tuple[int, float]]) -> StudyRun:
    train, score = root / run / "train", root / run / "score"
    train.mkdir(parents=True)
    score.mkdir(parents=True)
    (train / "summary.json").write_text(
        json.dumps({"params": params, "gmacs": 0.0134, "steps": 600, "wall_time_s": 80.0})
    )
    (train / "fid.csv").write_text("step,fid\n" + "".join(f"{s},{v}\n" for s, v in curve))
    (score / "metrics.json").write_text(
        json.dumps({"fid": fid, "fid_floor": 2.0, "fid_over_floor": fid / 2.0, "conditional_accuracy": acc})
    )
    variant, _, seed = run.rpartition("-s")
    return StudyRun(run, variant, int(seed), train, score)


def test_the_page_holds_each_variants_mean_and_spread_over_seeds(tmp_path) -> None:
    fids = {
        "default-s0": 10.0,
        "default-s1": 12.0,
        "default-s2": 11.0,
        "skip-add-s0": 30.0,
        "skip-add-s1": 34.0,
        "skip-none-s0": 60.0,
        "skip-none-s1": 70.0,
    }
    runs = [
        _write_run(
            tmp_path / "runs", r, f, 0.9, 731406 if r.startswith("default") else 700000, [(100, 5 * f), (200, f)]
        )
        for r, f in fids.items()
    ]
    results = collect(runs)
    summary = summarize(results)
    assert summary.loc["skip-none", "fid_mean"] == 65.0
    assert summary.loc["skip-none", "fid_std"] == pytest.approx(np.std([60.0, 70.0], ddof=1))
    assert summary.loc["default", "seeds"] == 3 and summary.loc["default", "fid_mean"] == 11.0
    curves = fid_curves(runs)
    assert len(curves) == 14 and curves[curves["run"] == "skip-add-s1"]["fid"].tolist() == [170.0, 34.0]
    page, meta = ablation_page(
        "digits",
        {"skip": ["default", "skip-add", "skip-none"]},
        SKIP,
        results,
        curves,
        BASE,
        "a budget",
        tmp_path / "reports",
    )
    assert "| concat_linear (default) | 731,406 | 13.40 M | 11.00 ± 1.00 | 5.50 ± 0.50 | 0.900 ± 0.000 | 3 |" in page
    assert "| none | 700,000 | 13.40 M | 65.00 ± 7.07 |" in page
    assert "Linear(Concat) is best" in page and f"**{AGREES}**" in page
    assert "FID 11.00 ± 1.00 (min 10.00, max 12.00)" in page
    assert meta["groups"] == {"skip": AGREES} and meta["default"]["fid_std"] == pytest.approx(1.0)
    assert (tmp_path / "reports" / "ablations" / "skip.png").stat().st_size > 1000
