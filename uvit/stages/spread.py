"""Stage `spread`: the benchmark's figures over its own run and its seed-spread runs (each
trained, sampled and scored by the run stages) -> runs/<benchmark>/spread/summary.json (DVC metrics),
which the report stage shows."""

from __future__ import annotations

from uvit.config import BenchmarkConfig, spread_runs
from uvit.fileio import write_json
from uvit.paths import BenchmarkPaths


def run_spread(cfg: BenchmarkConfig, paths: BenchmarkPaths) -> dict:
    from uvit.report.ablations import StudyRun
    from uvit.report.spread import spread_summary

    if cfg.spread is None:
        raise ValueError(f"{cfg.name} has no `spread` block in params.yaml: nothing to summarise")
    runs = [StudyRun(cfg.name, "default", cfg.train.seed, train=paths.train, score=paths.score)]
    for name, seed in zip(spread_runs(cfg), cfg.spread.seeds):
        rp = paths.study_run(name)
        runs.append(StudyRun(name, "default", seed, train=rp.train, score=rp.score))
    for run in runs:
        for f in (run.train / "summary.json", run.score / "metrics.json"):
            if not f.is_file():
                raise FileNotFoundError(f"{f} is missing: run `uvit run {run.run}` (or `dvc repro`) first")
    summary = spread_summary(runs)
    write_json(paths.spread / "summary.json", summary)
    return summary
