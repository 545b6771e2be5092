"""Stage `report`: reports/<benchmark>.md (+ PNGs) and the reports/README.md index, from artifacts only."""

from __future__ import annotations

from uvit.config import BenchmarkConfig
from uvit.paths import BenchmarkPaths


def run_report(cfg: BenchmarkConfig, paths: BenchmarkPaths) -> dict:
    from uvit.report.tables import write_benchmark_report, write_index

    if cfg.spread is None:  # a spread block removed leaves its summary behind (DVC keeps former outputs)
        (paths.spread / "summary.json").unlink(missing_ok=True)
    page = write_benchmark_report(cfg.name, paths.run, paths.reports)
    index = write_index(paths.root / "runs", paths.reports)
    return {"report": str(page), "index": str(index)}
