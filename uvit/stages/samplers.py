"""Stage `samplers`: the sampler study (uvit.evaluate.sampler_study) -> runs/<b>/samplers/
results.csv (one row per setting and seed) and summary.json (DVC metrics), reports/samplers.md and
reports/samplers/fid_vs_nfe.png."""

from __future__ import annotations

import math

from uvit.config import BenchmarkConfig
from uvit.fileio import write_json, write_text
from uvit.paths import BenchmarkPaths


def run_samplers(cfg: BenchmarkConfig, paths: BenchmarkPaths) -> dict:
    from uvit.evaluate.sampler_study import run_study, write_results

    write_results(run_study(cfg, paths), paths.samplers / "results.csv")
    return write_sampler_report(cfg, paths)


def write_sampler_report(cfg: BenchmarkConfig, paths: BenchmarkPaths) -> dict:
    """reports/samplers.md, its figure and runs/<b>/samplers/summary.json from results.csv alone,
    so the committed page regenerates from the committed rows."""
    from uvit.evaluate.sampler_study import cheapest_within, load_results, summarize
    from uvit.report.samplers import plot_fid_vs_nfe, sampler_page

    study = cfg.sampler_study
    summary = summarize(load_results(paths.samplers / "results.csv"))
    figure = plot_fid_vs_nfe(summary, paths.reports / "samplers" / "fid_vs_nfe.png")
    page = sampler_page(
        summary,
        benchmark=cfg.name,
        tolerance=study.tolerance,
        num_samples=cfg.sample.num_samples,
        guidance_scale=cfg.sample.guidance_scale,
        figure=figure.relative_to(paths.reports).as_posix(),
    )
    write_text(paths.reports / "samplers.md", page)
    best = cheapest_within(summary, study.tolerance)
    metrics = {
        "reference": _setting(summary[summary["reference"]].iloc[0]),
        "cheapest_within_tolerance": None if best is None else _setting(best),
        "tolerance": study.tolerance,
        "settings": len(summary),
        "seeds": len(study.seeds),
    }
    write_json(paths.samplers / "summary.json", metrics)
    return metrics


def _setting(row) -> dict:
    """A summary row as JSON: the setting, and its FID mean and spread (None with one seed)."""
    std = float(row["fid_std"])
    return {
        "sampler": row["sampler"],
        "skip_type": row["skip_type"],
        "steps": int(row["steps"]),
        "nfe": int(row["nfe"]),
        "fid_mean": float(row["fid_mean"]),
        "fid_std": None if math.isnan(std) else std,
    }
