"""The U-ViT paper's published figures, shipped with the package.

`paper_results()` reads `data/paper_results.csv` (transcribed from the paper's tables,
see `data/SOURCE.md`); rows whose notes start with "this paper" are U-ViT's own.
"""

from __future__ import annotations

from importlib import resources
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

#: The project's benchmarks; `digits` is its own CPU benchmark and has no paper rows.
BENCHMARKS: tuple[str, ...] = (
    "digits",
    "cifar10",
    "celeba64",
    "imagenet64",
    "imagenet256",
    "imagenet512",
    "mscoco256",
)

#: The eight MS-COCO captions the paper's text-to-image samples use.
PAPER_CAPTIONS: tuple[str, ...] = (
    "a baseball player swinging a bat at a ball",
    "A close-up of a calico cat wearing a tie.",
    "a stuffed teddy bear sitting on a stool",
    "a big clock tower sits in the middle of a road",
    "A colorful bird is perched on a branch.",
    "A couple of horses standing next to each other on a field.",
    "A group of three giraffe standing inside of a cage.",
    "A long empty road way surrounded by wild plants.",
)

_CSV = "paper_results.csv"
_OWN_PREFIX = "this paper"


def paper_results(benchmark: str | None = None) -> pd.DataFrame:
    """The paper's FID table, optionally only the rows of one `benchmark`.

    Columns: benchmark, method, family, params, extra_params, fid (float), notes; text
    columns keep the paper's spelling ("44M"), empty cells are NaN. A project benchmark
    without paper rows (`digits`) gives an empty frame; an unknown name raises ValueError.
    """
    import pandas as pd

    text = {"benchmark": str, "method": str, "family": str, "params": str, "extra_params": str, "notes": str}
    with resources.files("uvit.report").joinpath("data", _CSV).open("r", encoding="utf-8") as fh:
        df = pd.read_csv(fh, dtype=text)
    if benchmark is None:
        return df
    known = set(df["benchmark"]) | set(BENCHMARKS)
    if benchmark not in known:
        raise ValueError(f"unknown benchmark {benchmark!r}; known: {', '.join(sorted(known))}")
    return df[df["benchmark"] == benchmark].reset_index(drop=True)


def has_paper_figures(benchmark: str) -> bool:
    """Whether the paper's table has rows for `benchmark` (a params block of your own has none)."""
    return benchmark in set(paper_results()["benchmark"])


def is_own_row(notes: object) -> bool:
    """True for a paper row reporting U-ViT's own result (notes start with "this paper")."""
    return isinstance(notes, str) and notes.strip().lower().startswith(_OWN_PREFIX)


def best_uvit_result(benchmark: str) -> dict | None:
    """The paper's best (lowest-FID) U-ViT row for `benchmark` as a dict, or None if none."""
    df = paper_results(benchmark)
    own = df[df["notes"].map(is_own_row)]
    if own.empty:
        return None
    return own.sort_values("fid", kind="mergesort").iloc[0].to_dict()
