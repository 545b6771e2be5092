"""Validate a data artifact before training, with great-expectations suites.

An image-classification split (``images`` (N, C, H, W), ``labels`` (N,), written by
:func:`uvit.data.shards.write_split`) is checked in three steps:

1. integrity: :func:`~uvit.data.shards.verify_split` recomputes every checksum; a bad or missing
   file is reported as a failed ``checksums`` expectation (nothing else is checked then, since the
   data cannot be trusted);
2. the split is summarised as two small pandas DataFrames: one row per image (``row``, ``label``,
   ``pixel_min``, ``pixel_max``, ``all_finite``) and one row per class (``class``, ``count``,
   ``share``);
3. great-expectations (1.x, ephemeral context) runs one suite on each frame: row counts, label
   range, pixel range, finiteness, every class present, class balance.

The result is a :class:`ValidationReport`; :func:`require_valid` turns a failed one into a
:class:`ValidationFailed` whose message is the readable summary.

great_expectations and pandas are imported inside the functions that use them (GE's import
takes a few seconds).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import numpy as np
from tqdm import tqdm

from uvit.data.shards import DataIntegrityError, Manifest, ShardedArrays, verify_split

__all__ = [
    "ExpectationOutcome",
    "ImageSplitExpectations",
    "ValidationFailed",
    "ValidationReport",
    "image_split_frames",
    "open_split",
    "require_valid",
    "validate_image_split",
]

# How many offending rows/classes a failure's details name.
_MAX_EXAMPLES = 5


@dataclass(frozen=True)
class ImageSplitExpectations:
    """What an image-classification split must satisfy.

    ``num_classes=0``: an unlabelled split (CelebA, MS-COCO images); no label is read or checked.
    Labels must lie in ``[0, num_classes - 1]`` and every class must occur; each class's share
    of the rows must lie in ``[min_class_share, max_class_share]``; every pixel must be finite and
    within ``[pixel_min, pixel_max]`` (0..255 for uint8 images); the row count must lie in
    ``[min_rows, max_rows]`` (``max_rows=None``: no upper bound) and equal the manifest's count.
    """

    num_classes: int
    min_rows: int = 1
    max_rows: int | None = None
    pixel_min: float = 0
    pixel_max: float = 255
    min_class_share: float = 0.0
    max_class_share: float = 1.0

    def __post_init__(self) -> None:
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0: unlabelled), got {self.num_classes}")
        if self.max_rows is not None and self.max_rows < self.min_rows:
            raise ValueError(f"max_rows ({self.max_rows}) < min_rows ({self.min_rows})")
        if self.pixel_max < self.pixel_min:
            raise ValueError(f"pixel_max ({self.pixel_max}) < pixel_min ({self.pixel_min})")
        if not 0.0 <= self.min_class_share <= self.max_class_share <= 1.0:
            raise ValueError(
                f"need 0 <= min_class_share <= max_class_share <= 1, got {self.min_class_share}, {self.max_class_share}"
            )


@dataclass
class ExpectationOutcome:
    """One checked expectation: a readable name, whether it held, and what was observed."""

    name: str
    success: bool
    details: str


@dataclass
class ValidationReport:
    """The outcome of validating one artifact; ``success`` iff every expectation held."""

    artifact: str
    success: bool
    results: list[ExpectationOutcome] = field(default_factory=list)

    @property
    def failures(self) -> list[ExpectationOutcome]:
        return [r for r in self.results if not r.success]

    def summary(self) -> str:
        """A readable table, failed expectations first."""
        verdict = "PASSED" if self.success else f"FAILED ({len(self.failures)} of {len(self.results)} expectations)"
        ordered = sorted(self.results, key=lambda r: r.success)  # stable: failures first
        width = max([len("expectation")] + [len(r.name) for r in ordered])
        lines = [f"Validation of {self.artifact}: {verdict}", f"  {'status':<6}  {'expectation':<{width}}  details"]
        for r in ordered:
            status = "ok" if r.success else "FAIL"
            details = r.details.replace("\n", "\n" + " " * (width + 12))
            lines.append(f"  {status:<6}  {r.name:<{width}}  {details}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        return self.summary()


class ValidationFailed(RuntimeError):
    """A validation failed; ``.report`` holds the full :class:`ValidationReport`."""

    def __init__(self, report: ValidationReport):
        super().__init__(report.summary())
        self.report = report


def verify_checksums(root: Path) -> tuple[Manifest | None, ExpectationOutcome]:
    """The first check of every suite: the split's files against its manifest's sha256s.

    Returns (manifest, passed outcome), or (None, failed outcome) when the data cannot be
    trusted, in which case a suite reports only that failure.
    """
    try:
        manifest = verify_split(root)
    except DataIntegrityError as e:
        return None, ExpectationOutcome("checksums", False, str(e))
    files = sum(len(s.files) for s in manifest.shards)
    return manifest, ExpectationOutcome("checksums", True, f"{files} files match the manifest")


def open_split(root: Path, needed: Sequence[str], kind: str = "") -> tuple[Manifest | None, str, list]:
    """The first checks of every suite: the checksums of the split at ``root``, then whether it
    has the ``needed`` fields. Returns (manifest, artifact name, outcomes so far); the manifest is
    None when a check failed, and the suite then reports only these outcomes. ``kind`` ("latents",
    "captions") ends the artifact name."""
    manifest, checksums = verify_checksums(root)
    if manifest is None:
        return None, str(root), [checksums]
    artifact = f"{root} ({manifest.name}/{manifest.split}{' ' + kind if kind else ''})"
    missing = [f for f in needed if f not in manifest.fields]
    if missing:
        fields = ExpectationOutcome(
            "fields present", False, f"missing field(s) {missing}; split has {sorted(manifest.fields)}"
        )
        return None, artifact, [checksums, fields]
    return manifest, artifact, [checksums]


def require_valid(report: ValidationReport) -> None:
    """Raise :class:`ValidationFailed` (message: the summary) unless ``report.success``."""
    if not report.success:
        raise ValidationFailed(report)


# --------------------------------------------------------------------------------------------
# Frames
# --------------------------------------------------------------------------------------------


def image_split_frames(
    ds: ShardedArrays,
    num_classes: int,
    *,
    image_field: str = "images",
    label_field: str = "labels",
    progress: bool | None = None,
):
    """Summarise a split as (rows, classes) pandas DataFrames for the expectation suites.

    rows: one row per image: ``row`` (int, global index), ``label``, ``pixel_min``, ``pixel_max``
    (over the image's finite values), ``all_finite`` (bool). classes: one row per class
    ``0..num_classes-1``: ``class``, ``count`` (rows with that label, 0 if absent), ``share``.
    Computed shard by shard so memory stays at one shard's images. progress: a tqdm bar over the
    shards on stderr (None: only when stderr is a terminal; False: never).
    """
    import pandas as pd

    parts = []
    offset = 0
    bar = tqdm(
        ds.manifest.shards,
        desc=f"validate {ds.manifest.split}: shards",
        unit="shard",
        ascii=True,
        disable=None if progress is None else not progress,
    )
    for k, entry in enumerate(bar):
        images = np.asarray(ds.shard(image_field, k)).reshape(entry.count, -1)
        labels = np.asarray(ds.shard(label_field, k)) if num_classes else np.full(entry.count, -1, np.int64)
        if images.dtype.kind == "f":
            finite = np.isfinite(images).all(axis=1)
            # fmin/fmax skip NaN; a NaN/inf is reported by all_finite instead.
            lo, hi = np.fmin.reduce(images, axis=1), np.fmax.reduce(images, axis=1)
        else:
            finite = np.ones(entry.count, dtype=bool)
            lo, hi = images.min(axis=1), images.max(axis=1)
        parts.append(
            pd.DataFrame(
                {
                    "row": np.arange(offset, offset + entry.count, dtype=np.int64),
                    "label": labels,
                    "pixel_min": lo.astype(np.float64),
                    "pixel_max": hi.astype(np.float64),
                    "all_finite": finite,
                }
            )
        )
        offset += entry.count
    rows = pd.concat(parts, ignore_index=True)

    counts = rows["label"].value_counts()
    classes = pd.DataFrame({"class": np.arange(num_classes, dtype=np.int64)})
    classes["count"] = classes["class"].map(counts).fillna(0).astype(np.int64)
    classes["share"] = classes["count"] / max(len(rows), 1)
    return rows, classes


# --------------------------------------------------------------------------------------------
# Suites
# --------------------------------------------------------------------------------------------


def _row_suite(e: ImageSplitExpectations, manifest: Manifest) -> list:
    """(name, expectation) pairs checked against the per-image frame."""
    import great_expectations.expectations as gxe

    upper = "inf" if e.max_rows is None else e.max_rows
    labels = (
        [
            (
                f"labels in [0, {e.num_classes - 1}]",
                gxe.ExpectColumnValuesToBeBetween(column="label", min_value=0, max_value=e.num_classes - 1),
            ),
            ("labels not null", gxe.ExpectColumnValuesToNotBeNull(column="label")),
        ]
        if e.num_classes
        else []
    )
    return [
        (f"row count = manifest count ({manifest.count})", gxe.ExpectTableRowCountToEqual(value=manifest.count)),
        (
            f"row count in [{e.min_rows}, {upper}]",
            gxe.ExpectTableRowCountToBeBetween(min_value=e.min_rows, max_value=e.max_rows),
        ),
        *labels,
        (f"pixels >= {e.pixel_min:g}", gxe.ExpectColumnValuesToBeBetween(column="pixel_min", min_value=e.pixel_min)),
        (f"pixels <= {e.pixel_max:g}", gxe.ExpectColumnValuesToBeBetween(column="pixel_max", max_value=e.pixel_max)),
        ("pixels finite (no NaN/inf)", gxe.ExpectColumnValuesToBeInSet(column="all_finite", value_set=[True])),
    ]


def _class_suite(e: ImageSplitExpectations) -> list:
    """(name, expectation) pairs checked against the per-class frame."""
    import great_expectations.expectations as gxe

    return [
        (f"every class 0..{e.num_classes - 1} present", gxe.ExpectColumnValuesToBeBetween(column="count", min_value=1)),
        (
            f"class share in [{e.min_class_share:g}, {e.max_class_share:g}]",
            gxe.ExpectColumnValuesToBeBetween(column="share", min_value=e.min_class_share, max_value=e.max_class_share),
        ),
    ]


def _run_suites(
    frames: dict[str, tuple[Any, list, str]], progress: bool | None = None, desc: str = "validate: suites"
) -> list[ExpectationOutcome]:
    """Run one GE suite per frame; ``frames``: key -> (DataFrame, [(name, expectation)], index
    column naming offending rows). Returns outcomes in suite order. progress: a tqdm bar over the
    suites (None: only on a terminal)."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    source = context.data_sources.add_pandas(name="uvit")
    outcomes: list[ExpectationOutcome] = []
    bar = tqdm(
        frames.items(),
        total=len(frames),
        desc=desc,
        unit="suite",
        ascii=True,
        disable=None if progress is None else not progress,
    )
    for key, (df, named, index_col) in bar:
        batch = source.add_dataframe_asset(name=key).add_batch_definition_whole_dataframe("all")
        suite = context.suites.add(gx.ExpectationSuite(name=key))
        for name, expectation in named:
            # The readable name travels in meta so results can be matched back to it.
            expectation.meta = {"uvit_name": name}
            suite.add_expectation(expectation)
        definition = context.validation_definitions.add(gx.ValidationDefinition(name=key, data=batch, suite=suite))
        result = definition.run(
            batch_parameters={"dataframe": df},
            result_format={"result_format": "SUMMARY", "unexpected_index_column_names": [index_col]},
        )
        by_name = {r.expectation_config.meta["uvit_name"]: r for r in result.results}
        for name, _ in named:
            outcomes.append(_outcome(name, by_name.get(name), index_col))
    return outcomes


def _outcome(name: str, r, index_col: str) -> ExpectationOutcome:
    """Turn one GE ExpectationValidationResult into a readable outcome."""
    if r is None:
        return ExpectationOutcome(name, False, "no result returned by great-expectations")
    info = r.exception_info or {}
    if info.get("raised_exception"):
        return ExpectationOutcome(name, False, f"great-expectations raised: {info.get('exception_message')}")
    res = dict(r.result or {})
    if "observed_value" in res:  # table-level expectations (row counts)
        return ExpectationOutcome(name, bool(r.success), f"observed {res['observed_value']}")
    total = res.get("element_count", 0)
    bad = res.get("unexpected_count", 0)
    units = index_col + ("es" if index_col.endswith("s") else "s")
    if r.success:
        return ExpectationOutcome(name, True, f"all {total} {units} ok")
    examples = []
    for item in (res.get("partial_unexpected_index_list") or [])[:_MAX_EXAMPLES]:
        item = {k: (v.item() if hasattr(v, "item") else v) for k, v in item.items()}
        where = item.pop(index_col, "?")
        values = ", ".join(f"{k}={_fmt(v)}" for k, v in item.items())
        examples.append(f"{index_col} {where}: {values}")
    details = f"{bad} of {total} {units} unexpected"
    if examples:
        details += "; e.g. " + "; ".join(examples)
    return ExpectationOutcome(name, False, details)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def validate_image_split(
    root: str | Path,
    expectations: ImageSplitExpectations,
    *,
    image_field: str = "images",
    label_field: str = "labels",
    progress: bool | None = None,
) -> ValidationReport:
    """Validate the image-classification split at ``root``; never raises for bad data.

    Integrity problems (missing/invalid manifest, missing or modified shard files) and broken
    expectations alike come back as failed outcomes in the report; use :func:`require_valid`
    to stop a pipeline on failure. progress: tqdm bars on stderr over the shards being summarised
    and the suites being run (None: only when stderr is a terminal; False: never).
    """
    root = Path(root)
    needed = (image_field, label_field) if expectations.num_classes else (image_field,)
    manifest, artifact, outcomes = open_split(root, needed)
    if manifest is None:
        return ValidationReport(artifact, False, outcomes)

    ds = ShardedArrays(root)
    try:
        rows, classes = image_split_frames(
            ds, expectations.num_classes, image_field=image_field, label_field=label_field, progress=progress
        )
    except DataIntegrityError as e:  # e.g. a file's shape disagrees with the manifest
        outcomes.append(ExpectationOutcome("readable", False, str(e)))
        return ValidationReport(artifact, False, outcomes)

    suites = {"rows": (rows, _row_suite(expectations, manifest), "row")}
    if expectations.num_classes:
        suites["classes"] = (classes, _class_suite(expectations), "class")
    outcomes += _run_suites(suites, progress, desc=f"validate {manifest.split}: suites")
    return ValidationReport(artifact, all(o.success for o in outcomes), outcomes)
