"""Reports: markdown pages and figures built from the pipeline's artifact files.

- `paper`: the U-ViT paper's published FIDs (packaged CSV) and its example captions.
- `tables`: load a run's artifacts, build results / comparison tables, write the
  per-benchmark pages (`reports/B.md`) and the index (`reports/README.md`).
- `plots`: the training-loss figure.

Every figure in a report is read from an artifact file or the packaged paper table; a
missing artifact shows as "not run" and a missing field as "—", never a made-up value.
pandas and matplotlib are imported only inside the functions that need them.
"""

from __future__ import annotations

from uvit.report.paper import BENCHMARKS, PAPER_CAPTIONS, paper_results
from uvit.report.plots import plot_loss
from uvit.report.tables import (
    RunArtifacts,
    comparison_table,
    load_run,
    results_table,
    write_benchmark_report,
    write_index,
    write_reports,
)

__all__ = [
    "BENCHMARKS",
    "PAPER_CAPTIONS",
    "RunArtifacts",
    "comparison_table",
    "load_run",
    "paper_results",
    "plot_loss",
    "results_table",
    "write_benchmark_report",
    "write_index",
    "write_reports",
]
