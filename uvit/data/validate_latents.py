"""Validate pre-encoded latents and captions before training, with great-expectations suites.

Same pattern as :mod:`uvit.data.validate` (and its report classes): integrity first
(:func:`~uvit.data.shards.verify_split`), then small pandas frames summarising the artifact, then
one great-expectations suite per frame; the result is a
:class:`~uvit.data.validate.ValidationReport` (:func:`~uvit.data.validate.require_valid` turns a
failure into :class:`~uvit.data.validate.ValidationFailed`).

**Latent split** (:func:`validate_latent_split`, written by
:func:`uvit.data.encode.encode_image_split`):

* rows: the row count equals the source image split's (×2 with flips); every row's moments are
  finite; labels (when ``num_classes > 0``) lie in [0, K−1] and every class occurs;
* scale: on ``scale_check.rows`` evenly spaced rows the latents the model trains on,
  z = scale·(mean + σ·ε) (ε seeded), must have std ≈ 1 over all channels
  (``1 ± overall_std_tolerance``), per-channel std within ``1 ± std_tolerance`` and per-channel
  |mean| ≤ ``max_abs_channel_mean``. That is what a scale factor means (0.18215 / 0.23010 ≈
  1/std of the VAE latents); a wrong factor shows up as a std far from 1. The measured
  per-channel statistics (and the implied factor scale/std) are always in the details.
  The defaults are deliberately wide (the SD VAE's channels differ in spread and offset);
  tighten them once a real encode has been measured.

**Caption split** (:func:`validate_caption_split`, an image or latent split with ``captions`` +
``num_captions``, optionally with the contexts written by :func:`uvit.data.encode.encode_captions`):
captions are non-empty strings, every image has at least ``min_captions``, the padding after
``num_captions`` is empty; with a tokenizer, captions longer than ``max_length`` tokens are
counted (they are truncated when encoded) and fail only above ``max_truncated_share``; with
``contexts_root`` the contexts split's checksums, row count, row→image index, finiteness,
``caption_offsets.npy`` and ``empty_context.npy`` are checked too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from uvit.data.shards import DataIntegrityError, Manifest, ShardedArrays, verify_split
from uvit.data.validate import (
    ExpectationOutcome,
    ValidationReport,
    _run_suites,  # the shared GE runner (same package)
    open_split,
)

__all__ = [
    "CaptionSplitExpectations",
    "LatentScaleCheck",
    "LatentSplitExpectations",
    "latent_statistics",
    "validate_caption_split",
    "validate_latent_split",
]

_ROW_BLOCK = 2048  # rows per block when scanning a shard


@dataclass(frozen=True)
class LatentScaleCheck:
    """The scale check, on ``rows`` evenly spaced rows with the noise ε seeded by ``seed``: the std
    of z over all channels within 1 ± ``overall_std_tolerance``, each channel's within
    1 ± ``std_tolerance``, and each channel's |mean| at most ``max_abs_channel_mean``."""

    overall_std_tolerance: float = 0.25
    std_tolerance: float = 0.5
    max_abs_channel_mean: float = 1.0
    rows: int = 10_000
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("overall_std_tolerance", "std_tolerance", "max_abs_channel_mean"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.rows < 1:
            raise ValueError(f"rows must be >= 1, got {self.rows}")


@dataclass(frozen=True)
class LatentSplitExpectations:
    """What a latent (moments) split must satisfy.

    ``scale_factor``: the factor training will use (None: the one recorded in the split's meta).
    ``source_rows``: rows of the image split that was encoded (None: recorded in the meta);
    ``flip``: whether mirrors were encoded too (None: recorded in the meta); the expected row
    count is ``source_rows × (2 if flip else 1)``. ``num_classes`` > 0 checks labels.
    """

    scale_factor: float | None = None
    source_rows: int | None = None
    flip: bool | None = None
    num_classes: int = 0
    latent_channels: int = 4
    scale_check: LatentScaleCheck = field(default_factory=LatentScaleCheck)

    def __post_init__(self) -> None:
        if self.scale_factor is not None and not self.scale_factor > 0:
            raise ValueError(f"scale_factor must be > 0, got {self.scale_factor}")
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {self.num_classes}")


@dataclass(frozen=True)
class CaptionSplitExpectations:
    """What the captions of a split (and optionally their encoded contexts) must satisfy."""

    min_captions: int = 1
    max_length: int = 77
    max_truncated_share: float = 0.01
    expected_rows: int | None = None

    def __post_init__(self) -> None:
        if self.min_captions < 0:
            raise ValueError(f"min_captions must be >= 0, got {self.min_captions}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")
        if not 0.0 <= self.max_truncated_share <= 1.0:
            raise ValueError(f"max_truncated_share must be in [0, 1], got {self.max_truncated_share}")


# --------------------------------------------------------------------------------------------
# Latents
# --------------------------------------------------------------------------------------------


def latent_statistics(
    ds: ShardedArrays, scale: float, *, rows: int = 10_000, seed: int = 0, field: str = "moments"
) -> dict[str, Any]:
    """Per-channel and overall mean/std of z = scale·(mean + σ·ε) over up to ``rows`` evenly
    spaced rows (rows with a non-finite value left out), and of the mean part scale·mean."""
    n = len(ds)
    idx = np.unique(np.linspace(0, n - 1, min(n, rows)).round().astype(np.int64))
    off = ds.manifest.offsets
    parts = []
    for k in range(len(ds.manifest.shards)):
        sel = idx[(idx >= off[k]) & (idx < off[k + 1])] - off[k]
        if len(sel):
            parts.append(np.asarray(ds.shard(field, k)[sel], dtype=np.float32))
    m = np.concatenate(parts)
    m = m[np.isfinite(m.reshape(len(m), -1)).all(axis=1)]
    c = m.shape[1] // 2
    mean, logvar = m[:, :c].astype(np.float64), m[:, c:].astype(np.float64)
    eps = np.random.default_rng(seed).standard_normal(mean.shape)
    z = scale * (mean + np.exp(0.5 * np.clip(logvar, -30.0, 20.0)) * eps)
    zm = scale * mean
    axes = (0, 2, 3)
    return {
        "rows": int(len(m)),
        "channel_mean": z.mean(axis=axes).tolist() if len(m) else [],
        "channel_std": z.std(axis=axes).tolist() if len(m) else [],
        "mean_part_channel_std": zm.std(axis=axes).tolist() if len(m) else [],
        "overall_mean": float(z.mean()) if len(m) else float("nan"),
        "overall_std": float(z.std()) if len(m) else float("nan"),
        "posterior_std_mean": float(np.exp(0.5 * np.clip(logvar, -30, 20)).mean()) * scale if len(m) else float("nan"),
    }


def _finite_rows(values: np.ndarray) -> np.ndarray:
    """bool (N,): whether every value of each row of ``values`` (one shard's field, (N, ...), often
    memory-mapped) is finite, read ``_ROW_BLOCK`` rows at a time."""
    n = len(values)
    finite = np.empty(n, dtype=bool)
    for s in range(0, n, _ROW_BLOCK):
        block = np.asarray(values[s : s + _ROW_BLOCK]).reshape(min(_ROW_BLOCK, n - s), -1)
        finite[s : s + len(block)] = np.isfinite(block).all(axis=1)
    return finite


def _latent_row_frame(ds: ShardedArrays, label_field: str | None):
    import pandas as pd

    parts, offset = [], 0
    for k, entry in enumerate(ds.manifest.shards):
        finite = _finite_rows(ds.shard("moments", k))
        cols = {"row": np.arange(offset, offset + entry.count, dtype=np.int64), "all_finite": finite}
        if label_field:
            cols["label"] = np.asarray(ds.shard(label_field, k)).astype(np.int64)
        parts.append(pd.DataFrame(cols))
        offset += entry.count
    return pd.concat(parts, ignore_index=True)


def _fmt_list(values) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"


def _moments_shape(manifest: Manifest, channels: int) -> ExpectationOutcome:
    shape = manifest.fields["moments"].shape
    return ExpectationOutcome(
        f"moments are (N, {2 * channels}, h, w)",
        len(shape) == 3 and shape[0] == 2 * channels,
        f"stored {manifest.fields['moments'].dtype} (N, {', '.join(map(str, shape))})",
    )


def _source_rows(
    meta: dict, e: LatentSplitExpectations, source_root: str | Path | None, outcomes: list[ExpectationOutcome]
) -> int | None:
    """Rows of the image split that was encoded: from ``source_root``'s manifest when given (which
    must be the one recorded at encode time: an outcome says so), else the expectations', else the
    split's meta."""
    rows = e.source_rows if e.source_rows is not None else meta.get("source", {}).get("count")
    if source_root is None:
        return rows
    try:
        rows = Manifest.load(source_root).count
        recorded = meta.get("source", {}).get("manifest_sha256")
        if recorded is not None:
            from uvit.fileio import sha256_file

            actual = sha256_file(Path(source_root) / "manifest.json")
            outcomes.append(
                ExpectationOutcome(
                    "encoded from this source split",
                    actual == recorded,
                    f"source manifest sha256 {actual[:12]}…, recorded at encode time {recorded[:12]}…",
                )
            )
    except DataIntegrityError as err:
        outcomes.append(ExpectationOutcome("source split readable", False, str(err)))
    return rows


def _row_frames(
    rows, num_classes: int, copies: int, source_rows: int | None, outcomes: list[ExpectationOutcome]
) -> dict[str, tuple[Any, list, str]]:
    """GE frames + suites of the rows (count = source rows × copies, finite, labels) and, with
    classes, of the class counts; an unknown source row count is a failed outcome."""
    import great_expectations.expectations as gxe
    import pandas as pd

    # (GE drops an expectation identical to one already in the suite: one row-count check only.)
    row_suite = []
    if source_rows is not None:
        expected = copies * int(source_rows)
        row_suite.append(
            (f"row count = source rows x {copies} ({expected})", gxe.ExpectTableRowCountToEqual(value=expected))
        )
    else:
        outcomes.append(
            ExpectationOutcome("row count = source rows", False, "source row count unknown (no source_rows, no meta)")
        )
    row_suite.append(
        ("latents finite (no NaN/inf)", gxe.ExpectColumnValuesToBeInSet(column="all_finite", value_set=[True]))
    )
    if num_classes <= 0:
        return {"rows": (rows, row_suite, "row")}
    k = num_classes
    row_suite += [
        (f"labels in [0, {k - 1}]", gxe.ExpectColumnValuesToBeBetween(column="label", min_value=0, max_value=k - 1)),
        ("labels not null", gxe.ExpectColumnValuesToNotBeNull(column="label")),
    ]
    classes = pd.DataFrame({"class": np.arange(k, dtype=np.int64)})
    classes["count"] = classes["class"].map(rows["label"].value_counts()).fillna(0).astype(np.int64)
    class_suite = [(f"every class 0..{k - 1} present", gxe.ExpectColumnValuesToBeBetween(column="count", min_value=1))]
    return {"rows": (rows, row_suite, "row"), "classes": (classes, class_suite, "class")}


def _scale_frames(
    stats: dict[str, Any], e: LatentScaleCheck, channels: int, scale: float
) -> dict[str, tuple[Any, list, str]]:
    """GE frames + suites of the measured latent std (all channels, per channel) and channel means."""
    import great_expectations.expectations as gxe
    import pandas as pd

    lo, hi = 1 - e.std_tolerance, 1 + e.std_tolerance
    olo, ohi = 1 - e.overall_std_tolerance, 1 + e.overall_std_tolerance
    nan = float("nan")
    per_channel = pd.DataFrame(
        {
            "channel": np.arange(channels, dtype=np.int64),
            "std": np.array(stats["channel_std"] or [nan] * channels, dtype=np.float64),
            "mean": np.array(stats["channel_mean"] or [nan] * channels, dtype=np.float64),
        }
    )
    per_channel["abs_mean"] = per_channel["mean"].abs()
    # NaN (no finite row to measure) must fail, not be skipped as null: compare on a filled copy.
    per_channel = per_channel.fillna(np.inf)
    overall = pd.DataFrame({"scope": ["all channels"], "std": [stats["overall_std"]]}).fillna(np.inf)
    name_overall, name_std, name_mean = _scale_check_names(e, scale)
    return {
        "overall": (
            overall,
            [(name_overall, gxe.ExpectColumnValuesToBeBetween(column="std", min_value=olo, max_value=ohi))],
            "scope",
        ),
        "channels": (
            per_channel,
            [
                (name_std, gxe.ExpectColumnValuesToBeBetween(column="std", min_value=lo, max_value=hi)),
                (name_mean, gxe.ExpectColumnValuesToBeBetween(column="abs_mean", max_value=e.max_abs_channel_mean)),
            ],
            "channel",
        ),
    }


def _scale_check_names(e: LatentScaleCheck, scale: float) -> tuple[str, str, str]:
    """Names of the overall-std, per-channel-std and per-channel-mean expectations."""
    return (
        f"latent std (all channels) in [{1 - e.overall_std_tolerance:g}, {1 + e.overall_std_tolerance:g}] "
        f"at scale {scale:g}",
        f"per-channel latent std in [{1 - e.std_tolerance:g}, {1 + e.std_tolerance:g}]",
        f"per-channel |latent mean| <= {e.max_abs_channel_mean:g}",
    )


def _measured(stats: dict[str, Any], scale: float) -> str:
    """What :func:`latent_statistics` measured, for the details of the scale checks."""
    overall_std = stats["overall_std"]
    implied = scale / overall_std if overall_std and np.isfinite(overall_std) else float("nan")
    return (
        f"measured on {stats['rows']} rows: overall std {stats['overall_std']:.4g}, "
        f"mean {stats['overall_mean']:.4g} (implied scale factor {implied:.5g}); "
        f"per-channel std {_fmt_list(stats['channel_std'])}, "
        f"mean {_fmt_list(stats['channel_mean'])}; mean-part std "
        f"{_fmt_list(stats['mean_part_channel_std'])}, posterior sigma (scaled) "
        f"{stats['posterior_std_mean']:.3g}"
    )


def validate_latent_split(
    root: str | Path,
    expectations: LatentSplitExpectations = LatentSplitExpectations(),
    *,
    source_root: str | Path | None = None,
    label_field: str = "labels",
) -> ValidationReport:
    """Validate the latent split at ``root``; never raises for bad data (see the module
    docstring). ``source_root``: the image split it was encoded from; its row count is then
    taken from its manifest (overriding ``expectations.source_rows``) and it must be the data
    that was encoded (manifest checksum recorded at encode time)."""
    e = expectations
    root = Path(root)
    manifest, artifact, outcomes = open_split(
        root, ["moments"] + ([label_field] if e.num_classes > 0 else []), "latents"
    )
    if manifest is None:
        return ValidationReport(artifact, False, outcomes)
    outcomes.append(_moments_shape(manifest, e.latent_channels))
    if not outcomes[-1].success:
        return ValidationReport(artifact, False, outcomes)

    meta = manifest.meta
    scale = e.scale_factor if e.scale_factor is not None else meta.get("scale_factor")
    flip = (
        e.flip
        if e.flip is not None
        else bool(meta.get("flip", {}).get("stored") is True and "flipped" in manifest.fields)
    )
    source_rows = _source_rows(meta, e, source_root, outcomes)
    if scale is None:
        outcomes.append(
            ExpectationOutcome("scale factor known", False, "no scale_factor given and none in the split's meta")
        )
        return ValidationReport(artifact, False, outcomes)

    ds = ShardedArrays(root)
    try:
        rows = _latent_row_frame(ds, label_field if e.num_classes > 0 else None)
        stats = latent_statistics(ds, float(scale), rows=e.scale_check.rows, seed=e.scale_check.seed)
    except DataIntegrityError as err:
        outcomes.append(ExpectationOutcome("readable", False, str(err)))
        return ValidationReport(artifact, False, outcomes)

    frames = _row_frames(rows, e.num_classes, 2 if flip else 1, source_rows, outcomes)
    frames.update(_scale_frames(stats, e.scale_check, e.latent_channels, scale))
    results = _run_suites(frames)
    measured, scale_checks = _measured(stats, scale), _scale_check_names(e.scale_check, scale)
    for r in results:
        if r.name in scale_checks:
            r.details = f"{r.details}; {measured}"
    outcomes += results
    return ValidationReport(artifact, all(o.success for o in outcomes), outcomes)


# --------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------


def _caption_frames(ds: ShardedArrays, tokenizer, max_length: int):
    import pandas as pd

    num = np.asarray(ds.field("num_captions"), dtype=np.int64)
    image_frames, caption_frames = [], []
    offset, caption_offset = 0, 0
    for k, entry in enumerate(ds.manifest.shards):
        caps = np.asarray(ds.shard("captions", k))
        n_k = num[offset : offset + entry.count]
        width = caps.shape[1]
        valid = np.arange(width)[None, :] < np.clip(n_k, 0, width)[:, None]
        padding_empty = (np.char.str_len(caps) == 0) | valid
        image_frames.append(
            pd.DataFrame(
                {
                    "image_row": np.arange(offset, offset + entry.count, dtype=np.int64),
                    "num_captions": n_k,
                    "padding_empty": padding_empty.all(axis=1),
                }
            )
        )
        r, c = np.nonzero(valid)
        texts = caps[r, c]
        cols = {
            "caption_row": np.arange(caption_offset, caption_offset + len(texts), dtype=np.int64),
            "image_row": (r + offset).astype(np.int64),
            "chars": np.char.str_len(np.char.strip(texts)).astype(np.int64),
        }
        if tokenizer is not None:
            from uvit.encoders.text import token_lengths

            tokens = token_lengths(tokenizer, texts.tolist())
            cols["tokens"] = tokens
            cols["truncated"] = (tokens > max_length).astype(np.float64)
        caption_frames.append(pd.DataFrame(cols))
        offset += entry.count
        caption_offset += len(texts)
    return (pd.concat(image_frames, ignore_index=True), pd.concat(caption_frames, ignore_index=True), num)


def _check_contexts(contexts_root: Path, num_captions: np.ndarray, max_length: int, outcomes: list[ExpectationOutcome]):
    """Outcomes for the contexts split; returns its GE frame + suite, or None when unreadable."""
    import great_expectations.expectations as gxe

    try:
        manifest = verify_split(contexts_root)
    except DataIntegrityError as err:
        outcomes.append(ExpectationOutcome("contexts checksums", False, str(err)))
        return None
    outcomes.append(
        ExpectationOutcome("contexts checksums", True, f"{sum(len(s.files) for s in manifest.shards)} files match")
    )
    missing = [f for f in ("contexts", "image_rows") if f not in manifest.fields]
    if missing:
        outcomes.append(
            ExpectationOutcome("contexts fields present", False, f"missing {missing}; has {sorted(manifest.fields)}")
        )
        return None
    shape = manifest.fields["contexts"].shape
    outcomes.append(
        ExpectationOutcome(
            f"contexts are (M, {max_length}, D)",
            len(shape) == 2 and shape[0] == max_length,
            f"stored (M, {', '.join(map(str, shape))})",
        )
    )
    _check_context_files(contexts_root, num_captions, max_length, shape, outcomes)
    frame = _contexts_frame(ShardedArrays(contexts_root), num_captions)
    total = int(num_captions.sum())
    suite = [
        (f"contexts rows = total captions ({total})", gxe.ExpectTableRowCountToEqual(value=total)),
        ("contexts finite (no NaN/inf)", gxe.ExpectColumnValuesToBeInSet(column="all_finite", value_set=[True])),
        (
            "contexts image_rows match num_captions",
            gxe.ExpectColumnValuesToBeInSet(column="image_row_ok", value_set=[True]),
        ),
    ]
    return frame, suite


def _check_context_files(
    contexts_root: Path, num_captions: np.ndarray, max_length: int, shape: tuple, outcomes: list[ExpectationOutcome]
) -> None:
    """Outcomes for ``caption_offsets.npy`` (must match ``num_captions``) and ``empty_context.npy``
    (finite, (max_length, D) with the contexts' D; ``shape``: the contexts' row shape)."""
    from uvit.data.encode import load_caption_index, load_empty_context

    offsets_expected = np.concatenate([[0], np.cumsum(num_captions)]).astype(np.int64)
    try:
        offsets = load_caption_index(contexts_root)
        ok = offsets.shape == offsets_expected.shape and bool((offsets == offsets_expected).all())
        outcomes.append(
            ExpectationOutcome(
                "caption_offsets match num_captions",
                ok,
                f"{len(offsets) - 1} images, {int(offsets[-1])} captions" if len(offsets) else "empty",
            )
        )
    except DataIntegrityError as err:
        outcomes.append(ExpectationOutcome("caption_offsets match num_captions", False, str(err)))
    try:
        empty = load_empty_context(contexts_root)
        ok = (
            empty.ndim == 2
            and empty.shape[0] == max_length
            and len(shape) == 2
            and empty.shape[1] == shape[1]
            and bool(np.isfinite(empty).all())
        )
        outcomes.append(
            ExpectationOutcome(
                "empty_context present, finite, shape matches", ok, f"{empty.dtype} {tuple(empty.shape)}"
            )
        )
    except DataIntegrityError as err:
        outcomes.append(ExpectationOutcome("empty_context present, finite, shape matches", False, str(err)))


def _contexts_frame(ds: ShardedArrays, num_captions: np.ndarray):
    """One row per context: ``caption_row``, ``all_finite``, ``image_row_ok`` (its image row is the
    one ``num_captions`` implies)."""
    import pandas as pd

    expected_rows = np.repeat(np.arange(len(num_captions), dtype=np.int64), num_captions)
    parts, offset = [], 0
    for k, entry in enumerate(ds.manifest.shards):
        finite = _finite_rows(ds.shard("contexts", k))
        image_rows = np.asarray(ds.shard("image_rows", k))
        exp = expected_rows[offset : offset + entry.count]
        index_ok = np.zeros(entry.count, dtype=bool)
        index_ok[: len(exp)] = image_rows[: len(exp)] == exp
        parts.append(
            pd.DataFrame(
                {"caption_row": np.arange(offset, offset + entry.count), "all_finite": finite, "image_row_ok": index_ok}
            )
        )
        offset += entry.count
    return pd.concat(parts, ignore_index=True)


def validate_caption_split(
    root: str | Path,
    expectations: CaptionSplitExpectations = CaptionSplitExpectations(),
    *,
    tokenizer=None,
    contexts_root: str | Path | None = None,
) -> ValidationReport:
    """Validate the captions of the split at ``root`` (fields ``captions``, ``num_captions``) and,
    with ``contexts_root``, the contexts encoded from them. ``tokenizer`` (the CLIP tokenizer)
    enables the tokenized-length check. Never raises for bad data."""
    import great_expectations.expectations as gxe

    e = expectations
    root = Path(root)
    manifest, artifact, outcomes = open_split(root, ("captions", "num_captions"), "captions")
    if manifest is None:
        return ValidationReport(artifact, False, outcomes)
    if manifest.fields["captions"].np_dtype.kind != "U":
        outcomes.append(ExpectationOutcome("captions are strings", False, f"dtype {manifest.fields['captions'].dtype}"))
        return ValidationReport(artifact, False, outcomes)

    ds = ShardedArrays(root)
    try:
        images, captions, num = _caption_frames(ds, tokenizer, e.max_length)
    except DataIntegrityError as err:
        outcomes.append(ExpectationOutcome("readable", False, str(err)))
        return ValidationReport(artifact, False, outcomes)

    n_rows = manifest.count if e.expected_rows is None else e.expected_rows
    image_suite = [
        (f"row count = {n_rows}", gxe.ExpectTableRowCountToEqual(value=n_rows)),
        (
            f"every image has >= {e.min_captions} caption(s)",
            gxe.ExpectColumnValuesToBeBetween(
                column="num_captions", min_value=e.min_captions, max_value=manifest.fields["captions"].shape[0]
            ),
        ),
        ("caption padding empty", gxe.ExpectColumnValuesToBeInSet(column="padding_empty", value_set=[True])),
    ]
    caption_suite = [("captions non-empty", gxe.ExpectColumnValuesToBeBetween(column="chars", min_value=1))]
    name_trunc = f"captions over {e.max_length} tokens (truncated) <= {e.max_truncated_share:.2%}"
    if tokenizer is not None:
        caption_suite.append(
            (
                name_trunc,
                gxe.ExpectColumnMeanToBeBetween(column="truncated", min_value=0.0, max_value=e.max_truncated_share),
            )
        )
    frames: dict[str, tuple[Any, list, str]] = {
        "images": (images, image_suite, "image_row"),
        "captions": (captions, caption_suite, "caption_row"),
    }
    if contexts_root is not None:
        ctx = _check_contexts(Path(contexts_root), num, e.max_length, outcomes)
        if ctx is not None:
            frames["contexts"] = (ctx[0], ctx[1], "caption_row")

    results = _run_suites(frames)
    if tokenizer is not None:
        tokens = captions["tokens"].to_numpy()
        truncated = int((tokens > e.max_length).sum())
        longest = captions.sort_values("tokens", ascending=False).head(3)
        for r in results:
            if r.name == name_trunc:
                r.details = (
                    f"{truncated} of {len(tokens)} captions "
                    f"({truncated / max(len(tokens), 1):.3%}) exceed {e.max_length} "
                    f"tokens and are truncated when encoded; longest: "
                    + ", ".join(
                        f"caption_row {int(row.caption_row)} ({int(row.tokens)} tokens)" for row in longest.itertuples()
                    )
                )
    outcomes += results
    return ValidationReport(artifact, all(o.success for o in outcomes), outcomes)
