"""Figures for the reports (matplotlib, Agg backend, imported inside the functions)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    import pandas as pd


@contextlib.contextmanager
def png_figure(path: Path, *args: Any, **subplots_kw: Any) -> Iterator[tuple[Any, Any]]:
    """(figure, axes) of ``plt.subplots(*args, **subplots_kw)`` on the Agg backend; when the
    block ends, laid out tightly and saved to `path` (parents made); closed in any case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(*args, **subplots_kw)
    try:
        yield fig, axes
        fig.tight_layout()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
    finally:
        plt.close(fig)


def _smooth(values: pd.Series) -> pd.Series:
    """Centred rolling mean over ~2% of the points (at least 1), for a readable trend."""
    window = max(1, len(values) // 50)
    return values.rolling(window, center=True, min_periods=1).mean()


def plot_loss(metrics: pd.DataFrame, path: Path) -> Path:
    """Plot training loss against step to `path` (PNG) and return the path.

    The raw loss is drawn light with a smoothed line on top; the y axis is logarithmic when
    the (positive) loss spans more than one decade. When an `lr` column is present the
    learning rate goes on a twin axis. Needs `step` and `loss` columns with at least one row.
    """
    missing = {"step", "loss"} - set(metrics.columns)
    if missing:
        raise ValueError(f"metrics lack column(s) {sorted(missing)}; have {list(metrics.columns)}")
    data = metrics.dropna(subset=["step", "loss"]).sort_values("step")
    if data.empty:
        raise ValueError("metrics have no (step, loss) rows to plot")

    path = Path(path)
    with png_figure(path, figsize=(7, 4), dpi=120) as (_, ax):
        ax.plot(data["step"], data["loss"], color="tab:blue", alpha=0.3, linewidth=0.8, label="loss")
        ax.plot(data["step"], _smooth(data["loss"]), color="tab:blue", linewidth=1.8, label="loss (smoothed)")
        lo, hi = float(data["loss"].min()), float(data["loss"].max())
        if lo > 0 and hi / lo > 10:
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.grid(True, alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()

        if "lr" in data.columns and data["lr"].notna().any():
            ax2 = ax.twinx()
            ax2.plot(data["step"], data["lr"], color="tab:orange", linewidth=1.0, linestyle="--", label="lr")
            ax2.set_ylabel("learning rate")
            ax2.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
            h2, l2 = ax2.get_legend_handles_labels()
            handles, labels = handles + h2, labels + l2
        ax.legend(handles, labels, loc="upper right", fontsize="small")
        ax.set_title("Training loss")
    return path
