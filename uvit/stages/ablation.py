"""Stage `ablation`: the design study's page from its runs (each trained, sampled and scored by the
run stages of studies/dvc.yaml) -> runs/<b>/ablation/results.csv (one row per run), summary.json
(DVC metrics), reports/ablations.md and reports/ablations/<group>.png."""

from __future__ import annotations

import dataclasses

from uvit.config import BenchmarkConfig, study_runs
from uvit.fileio import write_json, write_text
from uvit.paths import BenchmarkPaths


def run_ablation(cfg: BenchmarkConfig, paths: BenchmarkPaths) -> dict:
    from uvit.report.ablations import StudyRun, ablation_page, collect, fid_curves

    study = cfg.ablation
    ids = study.runs()
    runs = []
    for name in study_runs(cfg):
        run = name.rsplit("/", 1)[1]
        rp = paths.study_run(name)
        for f in (rp.train / "summary.json", rp.train / "fid.csv", rp.score / "metrics.json"):
            if not f.is_file():
                raise FileNotFoundError(
                    f"{f} is missing: run `dvc repro studies/dvc.yaml` (or `uvit train/sample/score {name}`) first"
                )
        runs.append(StudyRun(run, *ids[run], train=rp.train, score=rp.score))
    results = collect(runs)
    paths.ablation.mkdir(parents=True, exist_ok=True)
    write_text(paths.ablation / "results.csv", results.to_csv(index=False))
    tc = cfg.train.model_copy(update=study.train)
    budget = (
        f"{tc.steps} steps of batch {tc.batch_size} (lr {tc.lr}, warmup {tc.warmup_steps}, EMA {tc.ema_decay}), "
        f"{cfg.sample.num_samples} samples ({cfg.sample.sampler}, {cfg.sample.steps} steps, guidance "
        f"{cfg.sample.guidance_scale}); seeds {study.seeds} per variant, {study.default_seeds} for the default"
    )
    groups = {g: study.group_variants(g) for g in study.groups}
    page, meta = ablation_page(
        cfg.name,
        groups,
        study.variants(),
        results,
        fid_curves(runs),
        dataclasses.asdict(cfg.uvit_config()),
        budget,
        paths.reports,
    )
    write_text(paths.reports / "ablations.md", page)
    write_json(paths.ablation / "summary.json", meta)
    return meta
