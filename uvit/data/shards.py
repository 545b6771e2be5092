"""The one on-disk dataset format: a split is a directory of shard files plus a manifest.

Layout of one split, e.g. ``data/digits/train/``::

    manifest.json            # what is here, with a sha256 and byte size per file
    images-00000.npy         # rows [0, shard_size) of field "images"
    labels-00000.npy
    images-00001.npy         # rows [shard_size, 2*shard_size) ...
    labels-00001.npy

Every field (``images`` uint8 (N, C, H, W), ``labels`` int64 (N,), later ``latents`` float16
(N, C, h, w), ...) is stored as one ``.npy`` per shard, so a split is a few large files that
``np.load(mmap_mode="r")`` memory-maps, never millions of small ones. All fields of a split have
the same number of rows N, and shard ``k`` of every field holds the same contiguous rows.

Writes are atomic: :func:`write_split` builds the split in a temporary directory next to its
destination and renames it into place, so an interrupted write never leaves a directory that
looks complete. :func:`verify_split` recomputes every checksum; :class:`ShardedArrays` reads.

Only numpy (and :mod:`uvit.fileio`) is imported here, so ``import uvit.data.shards`` is cheap.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from uvit.fileio import sha256_file, write_json

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
# Per-value counts (class counts) are only recorded for integer row fields with at most this many
# distinct values, so an id-like column does not blow up the manifest.
MAX_COUNTED_VALUES = 10_000
# Field names become file names.
_FIELD_NAME = re.compile(r"^[A-Za-z0-9_]+$")

__all__ = [
    "DataIntegrityError",
    "FieldSpec",
    "FileEntry",
    "FORMAT_VERSION",
    "Manifest",
    "MANIFEST_NAME",
    "ShardEntry",
    "ShardedArrays",
    "load_split_arrays",
    "shard_file_name",
    "verify_split",
    "write_split",
]

_FIX_HINT = (
    "Re-run the data stage that produces it (e.g. `uvit download <benchmark>` / `dvc repro`), "
    "or restore the tracked version with `dvc checkout`."
)


class DataIntegrityError(RuntimeError):
    """A split on disk does not match its manifest (or the manifest is missing or invalid)."""


# --------------------------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------------------------


@dataclass
class FieldSpec:
    """One field of a split: the dtype and per-row shape of its arrays, plus summary statistics.

    ``shape`` excludes the row axis: images stored as (N, 1, 8, 8) have ``shape == (1, 8, 8)``.
    ``stats`` (all optional, computed by :func:`write_split` for numeric fields): ``min``, ``max``,
    ``mean`` over all elements; ``nonfinite`` (float fields: count of NaN/inf elements, which are
    left out of min/max/mean); ``counts`` (integer fields with one value per row, e.g. labels:
    ``{"3": 180, ...}`` value -> number of rows, keys are strings because JSON keys must be).
    """

    dtype: str
    shape: tuple[int, ...]
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)


@dataclass
class FileEntry:
    """One file of one shard: its name inside the split directory, sha256 hex digest, size."""

    name: str
    sha256: str
    bytes: int


@dataclass
class ShardEntry:
    """Shard ``index`` holds ``count`` rows; ``files`` maps field name -> its file."""

    index: int
    count: int
    files: dict[str, FileEntry]


@dataclass
class Manifest:
    """Everything known about one split: ``manifest.json`` in the split directory."""

    name: str
    split: str
    count: int
    fields: dict[str, FieldSpec]
    shards: list[ShardEntry]
    meta: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    # -- (de)serialisation ------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for spec in d["fields"].values():
            spec["shape"] = list(spec["shape"])
        # format_version first: it is what a reader checks before anything else.
        return {"format_version": d.pop("format_version"), **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        """Build a manifest from its JSON dict; raises ``ValueError``/``KeyError``/``TypeError``."""
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(f"format_version is {version!r}, this code reads {FORMAT_VERSION}")
        fields = {
            name: FieldSpec(
                dtype=str(f["dtype"]), shape=tuple(int(s) for s in f["shape"]), stats=dict(f.get("stats", {}))
            )
            for name, f in d["fields"].items()
        }
        for spec in fields.values():
            np.dtype(spec.dtype)  # fail here, not later, on an unknown dtype
        shards = [
            ShardEntry(
                index=int(s["index"]),
                count=int(s["count"]),
                files={
                    k: FileEntry(name=str(v["name"]), sha256=str(v["sha256"]), bytes=int(v["bytes"]))
                    for k, v in s["files"].items()
                },
            )
            for s in d["shards"]
        ]
        m = cls(
            name=str(d["name"]),
            split=str(d["split"]),
            count=int(d["count"]),
            fields=fields,
            shards=shards,
            meta=dict(d.get("meta", {})),
            format_version=version,
        )
        m.check_consistent()
        return m

    def check_consistent(self) -> None:
        """Internal consistency: shard counts add up, every shard lists every field once."""
        total = sum(s.count for s in self.shards)
        if total != self.count:
            raise ValueError(f"shard counts add up to {total}, manifest count is {self.count}")
        for i, s in enumerate(self.shards):
            if s.index != i:
                raise ValueError(f"shard at position {i} has index {s.index}")
            if set(s.files) != set(self.fields):
                raise ValueError(f"shard {i} has files for {sorted(s.files)}, fields are {sorted(self.fields)}")

    @classmethod
    def load(cls, root: str | Path) -> Manifest:
        """Read ``root/manifest.json``; raises :class:`DataIntegrityError` if missing/invalid."""
        path = Path(root) / MANIFEST_NAME
        if not path.is_file():
            raise DataIntegrityError(
                f"No manifest at {path}: the split is missing or was not written completely. {_FIX_HINT}"
            )
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            # JSONDecodeError is a ValueError.
            raise DataIntegrityError(f"Invalid manifest {path}: {type(e).__name__}: {e}. {_FIX_HINT}") from e

    def save(self, root: str | Path) -> Path:
        """Write ``root/manifest.json`` atomically (:func:`uvit.fileio.write_json`)."""
        return write_json(Path(root) / MANIFEST_NAME, self.to_dict())

    # -- helpers ----------------------------------------------------------------------------

    @property
    def offsets(self) -> np.ndarray:
        """Row offset of each shard, int64 (num_shards + 1,): shard k is rows [o[k], o[k+1])."""
        return np.concatenate([[0], np.cumsum([s.count for s in self.shards])]).astype(np.int64)


def shard_file_name(field_name: str, shard: int) -> str:
    return f"{field_name}-{shard:05d}.npy"


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


class _HashingWriter:
    """File wrapper that hashes and counts bytes as ``np.save`` writes them (no second read)."""

    def __init__(self, f):
        self._f = f
        self.sha = hashlib.sha256()
        self.bytes = 0

    def write(self, data) -> int:
        self.sha.update(data)
        self._f.write(data)
        nbytes = memoryview(data).nbytes
        self.bytes += nbytes
        return nbytes

    def flush(self) -> None:
        self._f.flush()


class _StatsAccumulator:
    """Running min/max/mean (+ non-finite count, value counts) of one field across shards."""

    def __init__(self, arr: np.ndarray):
        kind = arr.dtype.kind
        self.numeric = kind in "biuf"
        self.is_float = kind == "f"
        self.count_values = kind in "biu" and arr.ndim == 1
        self.n = 0
        self.total = 0.0
        self.lo: float | None = None
        self.hi: float | None = None
        self.nonfinite = 0
        self.counts: dict[int, int] | None = {} if self.count_values else None

    def update(self, chunk: np.ndarray) -> None:
        if not self.numeric or chunk.size == 0:
            return
        x = np.asarray(chunk)
        if self.is_float:
            finite = np.isfinite(x)
            self.nonfinite += int(x.size - finite.sum())
            x = x[finite]
            if x.size == 0:
                return
        lo, hi = x.min().item(), x.max().item()
        self.lo = lo if self.lo is None else min(self.lo, lo)
        self.hi = hi if self.hi is None else max(self.hi, hi)
        self.total += float(x.sum(dtype=np.float64))
        self.n += x.size
        if self.counts is not None:
            values, counts = np.unique(x, return_counts=True)
            for v, c in zip(values.tolist(), counts.tolist()):
                self.counts[int(v)] = self.counts.get(int(v), 0) + c
            if len(self.counts) > MAX_COUNTED_VALUES:
                self.counts = None

    def result(self) -> dict[str, Any]:
        if not self.numeric:
            return {}
        stats: dict[str, Any] = {"min": self.lo, "max": self.hi, "mean": self.total / self.n if self.n else None}
        if self.is_float:
            stats["nonfinite"] = self.nonfinite
        if self.counts is not None:
            stats["counts"] = {str(k): v for k, v in sorted(self.counts.items())}
        return stats


def dtype_name(dt: np.dtype) -> str:
    """Readable dtype name ('uint8', 'float16') when it round-trips, else numpy's exact string."""
    try:
        if np.dtype(dt.name) == dt:
            return dt.name
    except TypeError:
        pass
    return dt.str


def _check_fields(fields: dict[str, np.ndarray]) -> int:
    if not fields:
        raise ValueError("write_split needs at least one field")
    lengths = {}
    for name, arr in fields.items():
        if not _FIELD_NAME.match(name):
            raise ValueError(f"field name {name!r} must match {_FIELD_NAME.pattern} (it becomes part of a file name)")
        if not isinstance(arr, np.ndarray):
            raise TypeError(f"field {name!r} must be a numpy array, got {type(arr).__name__}")
        if arr.ndim < 1:
            raise ValueError(f"field {name!r} must have a row axis, got a 0-d array")
        if arr.dtype.hasobject:
            raise TypeError(f"field {name!r} has object dtype, which .npy cannot store safely")
        lengths[name] = len(arr)
    if len(set(lengths.values())) != 1:
        raise ValueError(f"all fields must have the same number of rows, got {lengths}")
    n = next(iter(lengths.values()))
    if n == 0:
        raise ValueError("refusing to write an empty split (0 rows)")
    return n


def write_split(
    root: str | Path,
    fields: dict[str, np.ndarray],
    *,
    name: str,
    split: str,
    shard_size: int = 50_000,
    meta: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Manifest:
    """Write ``fields`` (field name -> array with N rows on axis 0) as a sharded split at ``root``.

    Rows ``[k*shard_size, (k+1)*shard_size)`` of every field go to shard ``k``. Arrays may be
    memory-mapped; they are written shard by shard. ``name`` is the dataset (``"digits"``),
    ``split`` the split (``"train"``); ``meta`` is stored verbatim (source, preprocessing, ...;
    must be JSON-serialisable).

    The split is assembled in a temporary directory next to ``root`` and renamed into place only
    when complete, so a crash leaves either the old state or the new one, never a partial split.
    Raises ``FileExistsError`` if ``root`` exists and ``overwrite`` is False.
    """
    root = Path(root)
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    n = _check_fields(fields)
    if root.exists() and not overwrite:
        raise FileExistsError(f"{root} already exists; pass overwrite=True to replace it (or delete it first)")
    meta = dict(meta or {})
    json.dumps(meta)  # fail before writing anything if meta is not JSON-serialisable

    root.parent.mkdir(parents=True, exist_ok=True)
    # Same parent directory => same filesystem => the final rename is atomic.
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private (0o700); the split should be readable
        stats = {k: _StatsAccumulator(v) for k, v in fields.items()}
        shards: list[ShardEntry] = []
        for index, start in enumerate(range(0, n, shard_size)):
            stop = min(start + shard_size, n)
            files = {}
            for fname, arr in fields.items():
                chunk = np.ascontiguousarray(arr[start:stop])
                stats[fname].update(chunk)
                files[fname] = _write_npy(tmp / shard_file_name(fname, index), chunk)
            shards.append(ShardEntry(index=index, count=stop - start, files=files))
        manifest = Manifest(
            name=name,
            split=split,
            count=n,
            fields={
                k: FieldSpec(dtype=dtype_name(v.dtype), shape=tuple(v.shape[1:]), stats=stats[k].result())
                for k, v in fields.items()
            },
            shards=shards,
            meta=meta,
        )
        # The manifest is written last: its presence marks a complete split.
        manifest.save(tmp)
        move_into_place(tmp, root, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _write_npy(path: Path, chunk: np.ndarray) -> FileEntry:
    with open(path, "wb") as f:
        w = _HashingWriter(f)
        np.save(w, chunk, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    return FileEntry(name=path.name, sha256=w.sha.hexdigest(), bytes=w.bytes)


def move_into_place(tmp: Path, root: Path, *, overwrite: bool) -> None:
    """Rename a finished directory `tmp` to `root`; with `overwrite`, an existing `root` is moved
    aside first and deleted only once the new one is in place (rolled back on failure)."""
    if not root.exists():
        os.rename(tmp, root)
        return
    if not overwrite:  # appeared while we were writing
        raise FileExistsError(f"{root} appeared while writing; not replacing it")
    # Move the old split aside first (rename cannot replace a non-empty directory), then
    # delete it only once the new one is in place.
    old = root.with_name(f".{root.name}.old-{uuid.uuid4().hex}")
    os.rename(root, old)
    try:
        os.rename(tmp, root)
    except BaseException:
        os.rename(old, root)
        raise
    shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Verifying and reading
# --------------------------------------------------------------------------------------------


def verify_split(root: str | Path) -> Manifest:
    """Check every shard file of the split at ``root`` against its manifest; return the manifest.

    Recomputes each file's size and sha256. Raises :class:`DataIntegrityError` listing every file
    that is missing, has the wrong size or the wrong checksum (expected vs actual), or if the
    manifest itself is missing or invalid.
    """
    root = Path(root)
    manifest = Manifest.load(root)
    problems: list[str] = []
    for shard in manifest.shards:
        for entry in shard.files.values():
            path = root / entry.name
            if not path.is_file():
                problems.append(f"{path}: missing (expected {entry.bytes} bytes, sha256 {entry.sha256})")
                continue
            size = path.stat().st_size
            if size != entry.bytes:
                problems.append(f"{path}: size mismatch, expected {entry.bytes} bytes, actual {size}")
                continue
            actual = sha256_file(path)
            if actual != entry.sha256:
                problems.append(f"{path}: sha256 mismatch, expected {entry.sha256}, actual {actual}")
    if problems:
        raise DataIntegrityError(
            f"Split {root} ({manifest.name}/{manifest.split}) failed verification, "
            f"{len(problems)} bad file(s):\n  " + "\n  ".join(problems) + f"\n{_FIX_HINT}"
        )
    return manifest


class ShardedArrays:
    """Memory-mapped reader of a split written by :func:`write_split`.

    ``len(ds)`` is the number of rows N; ``ds[i]`` is row ``i`` as ``{field: array}`` (each array
    of the field's per-row shape) looked up through shard offsets without concatenating;
    ``ds.field(name)`` is the whole field as one (N, *shape) array (a memmap when there is one
    shard, otherwise a concatenated in-memory copy, so use it for small data only).
    With ``verify=True`` every checksum is checked first (:func:`verify_split`).
    """

    def __init__(self, root: str | Path, verify: bool = False):
        self.root = Path(root)
        self.manifest = verify_split(self.root) if verify else Manifest.load(self.root)
        self._offsets = self.manifest.offsets
        self._maps: dict[tuple[str, int], np.ndarray] = {}

    def __len__(self) -> int:
        return self.manifest.count

    def __repr__(self) -> str:
        m = self.manifest
        fields = ", ".join(f"{k}: {v.dtype}{list(v.shape)}" for k, v in m.fields.items())
        return f"ShardedArrays({str(self.root)!r}, {m.name}/{m.split}, n={m.count}, {fields})"

    @property
    def field_names(self) -> list[str]:
        return list(self.manifest.fields)

    def shard(self, name: str, index: int) -> np.ndarray:
        """The memory-mapped array of field ``name`` in shard ``index``, (count, *shape)."""
        key = (name, index)
        if key not in self._maps:
            self._maps[key] = self._open(name, index)
        return self._maps[key]

    def _open(self, name: str, index: int) -> np.ndarray:
        if name not in self.manifest.fields:
            raise KeyError(f"no field {name!r} in {self.root}; fields: {self.field_names}")
        spec = self.manifest.fields[name]
        entry = self.manifest.shards[index]
        path = self.root / entry.files[name].name
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise DataIntegrityError(f"Cannot read {path}: {e}. {_FIX_HINT}") from e
        expected = (entry.count, *spec.shape)
        if arr.shape != expected or arr.dtype != spec.np_dtype:
            raise DataIntegrityError(
                f"{path}: expected {spec.dtype} {expected}, found {arr.dtype} {arr.shape}. {_FIX_HINT}"
            )
        return arr

    def field(self, name: str) -> np.ndarray:
        """Field ``name`` over all rows, (N, *shape)."""
        parts = [self.shard(name, k) for k in range(len(self.manifest.shards))]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        n = len(self)
        i = int(i)
        if not -n <= i < n:
            raise IndexError(f"row {i} out of range for {n} rows")
        i %= n
        k = int(np.searchsorted(self._offsets, i, side="right")) - 1
        j = i - int(self._offsets[k])
        return {name: self.shard(name, k)[j] for name in self.manifest.fields}


def load_split_arrays(root: str | Path, verify: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) of an image-classification split as in-memory arrays.

    images: (N, C, H, W) in the stored dtype (uint8 for raw images); labels: int64 (N,).
    """
    ds = ShardedArrays(root, verify=verify)
    return np.array(ds.field("images")), np.array(ds.field("labels"))
