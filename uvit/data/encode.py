"""The ``encode`` stage's work: pre-encode image splits to VAE moments and captions to CLIP contexts.

Outputs are ordinary splits (:mod:`uvit.data.shards`: shard files + ``manifest.json`` with
checksums), so ``verify_split``/``ShardedArrays`` read them like image splits.

**Latent split** (:func:`encode_image_split`), from an image split (``images`` uint8 NCHW):

* ``moments`` float16 (or float32) (R, 2·C, H/f, W/f): mean ‖ logvar of the VAE posterior, the
  official ``encode_moments`` (training re-samples z = scale·(mean + σ·ε) every step);
* every other field of the source (``labels``, ``image_ids``, ``num_captions``, ``captions``,
  ...), row for row;
* with ``flip=True`` (the official ImageNet 256/512 feature extraction): R = 2N, rows [0, N)
  encode the images and rows [N, 2N) their horizontal mirrors, in the same order (the layout of
  image splits written with flips), and a uint8 field ``flipped`` marks the mirrors. A source
  that already stores mirrors (has a ``flipped`` field) is refused with ``flip=True``.

**Caption split** (:func:`encode_captions`), from a split with ``captions`` (N, K) + ``num_captions``:
one row per caption, image by image in caption order: ``contexts`` float16 (M, 77, D) (CLIP
``last_hidden_state``), ``image_rows`` int64 (the image row it belongs to), ``caption_index``
int64 (its position among the image's captions), ``image_ids`` when the source has them. Two
further files inside the split directory, whose sha256 and size are recorded in
``manifest.meta["files"]``: ``caption_offsets.npy`` int64 (N+1,) — image i's captions are rows
[offsets[i], offsets[i+1]) — and ``empty_context.npy`` float32 (77, D), the context of ""
(classifier-free guidance). :func:`load_caption_index` / :func:`load_empty_context` read them
with their checksum checked.

**Resumable**: the work is cut into chunks of ``shard_size`` output rows, one chunk = one output
shard. Each chunk's files are written under a temporary name into ``.<out>.partial/split/`` next
to ``out_root`` and renamed when complete; its sidecar ``chunk-NNNNN.json`` (file checksums,
statistics) is written last. A re-run with the same job (source manifest, encoder weights,
flip, shard size, dtype, precision) skips every chunk whose sidecar and files check out (the
progress bar starts at the skipped rows) and encodes only the rest; a different job discards
the partial directory. When all chunks are there the manifest is written and the directory is
renamed to ``out_root`` in one step, so ``out_root`` is either absent or complete. Re-running on
a complete ``out_root`` of the same job returns its manifest without work.

**Multi-GPU**: with ``torch.cuda.device_count() > 1`` (or an explicit ``num_workers > 1``) the
chunks run as Ray tasks (``num_gpus=1`` each on CUDA), each rebuilding the model from a state
dict put once into the object store and writing its chunk into the partial directory (which must
therefore be on a filesystem every Ray worker sees: one node, or shared storage). **The CUDA
multi-GPU path is not tested** (no GPU on the development machine); the test suite covers the
one-process path on CPU, and the Ray path was run once by hand with CPU tasks
(``num_workers=2``: moments and contexts byte-identical to the one-process result).
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from uvit.data.shards import (
    MANIFEST_NAME,
    MAX_COUNTED_VALUES,
    DataIntegrityError,
    FieldSpec,
    FileEntry,
    Manifest,
    ShardedArrays,
    ShardEntry,
    dtype_name,
    move_into_place,
    shard_file_name,
)
from uvit.fileio import commit_file, read_tree, remove_temps, sha256_file, temp_path, write_json, write_npy, write_tree
from uvit.sharded_work import Piece, Progress, RemoteTask, ShardedWork, Workers, run_sharded

__all__ = [
    "CAPTION_OFFSETS_NAME",
    "EMPTY_CONTEXT_NAME",
    "FORMAT",
    "CaptionEncoding",
    "EncodeRun",
    "ImageEncoding",
    "encode_captions",
    "encode_image_split",
    "load_caption_index",
    "load_empty_context",
    "partial_dir",
]

log = logging.getLogger(__name__)

FORMAT = "uvit-encode/1"
CAPTION_OFFSETS_NAME = "caption_offsets.npy"
EMPTY_CONTEXT_NAME = "empty_context.npy"
_JOB_NAME = "job.json"
_STAT_ROWS = 1024  # rows per block when computing statistics of a memory-mapped chunk


def partial_dir(out_root: str | Path) -> Path:
    """Where the chunks of an unfinished encode of ``out_root`` live (a hidden sibling)."""
    out_root = Path(out_root)
    return out_root.parent / f".{out_root.name}.partial"


# --------------------------------------------------------------------------------------------
# What to encode, where and how
# --------------------------------------------------------------------------------------------


def _check_storage(dtype: str, batch_size: int) -> None:
    if np.dtype(dtype) not in (np.float16, np.float32):
        raise ValueError(f"dtype must be float16 or float32, got {dtype}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


@dataclass(frozen=True)
class ImageEncoding:
    """What to make of an image split. ``flip``: also encode each image's horizontal mirror (rows
    [N, 2N), field ``flipped``). ``dtype``: storage dtype of ``moments`` ("float16" or "float32").
    ``carry``: source fields copied row for row (None: all but ``image_field``). ``autocast_dtype``:
    the VAE's autocast on CUDA (None: none). ``batch_size``: images per VAE call."""

    batch_size: int = 64
    flip: bool = False
    dtype: str = "float16"
    image_field: str = "images"
    carry: Sequence[str] | None = None
    autocast_dtype: torch.dtype | None = torch.bfloat16

    def __post_init__(self) -> None:
        _check_storage(self.dtype, self.batch_size)


@dataclass(frozen=True)
class CaptionEncoding:
    """What to make of a split's captions: CLIP contexts of ``max_length`` tokens, stored as
    ``dtype`` ("float16" or "float32"); ``batch_size`` captions per text-encoder call."""

    batch_size: int = 256
    max_length: int = 77
    dtype: str = "float16"

    def __post_init__(self) -> None:
        _check_storage(self.dtype, self.batch_size)


@dataclass(frozen=True)
class EncodeRun:
    """Where and how to write. ``shard_size``: output rows per shard = per resumable chunk.
    ``resume``: reuse the finished chunks (or the finished split) of the same job. ``overwrite``:
    replace an ``out_root`` of another job. ``device``: move the model there (None: use it where it
    is). ``num_workers``: None = one Ray task per GPU when more than one CUDA device is visible,
    else 1 (this process)."""

    shard_size: int = 50_000
    resume: bool = True
    overwrite: bool = False
    device: str | torch.device | None = None
    num_workers: int | None = None
    progress: bool = True


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def _save_npy_atomic(path: Path, arr: np.ndarray) -> FileEntry:
    write_npy(path, arr)
    return FileEntry(name=path.name, sha256=sha256_file(path), bytes=path.stat().st_size)


# --------------------------------------------------------------------------------------------
# Statistics (the manifest's per-field stats, merged over chunks)
# --------------------------------------------------------------------------------------------


def _partial_stats(arr: np.ndarray) -> dict[str, Any]:
    kind = arr.dtype.kind
    if kind not in "biuf":
        return {}
    st: dict[str, Any] = {"n": 0, "sum": 0.0, "min": None, "max": None}
    if kind == "f":
        st["nonfinite"] = 0
    if kind in "biu" and arr.ndim == 1:
        values, counts = np.unique(arr, return_counts=True)
        st["counts"] = (
            {str(int(v)): int(c) for v, c in zip(values, counts)} if len(values) <= MAX_COUNTED_VALUES else None
        )
    for s in range(0, max(len(arr), 1), _STAT_ROWS):
        x = np.asarray(arr[s : s + _STAT_ROWS])
        if x.size == 0:
            continue
        if kind == "f":
            finite = np.isfinite(x)
            st["nonfinite"] += int(x.size - finite.sum())
            x = x[finite]
            if x.size == 0:
                continue
        lo, hi = x.min().item(), x.max().item()
        st["min"] = lo if st["min"] is None else min(st["min"], lo)
        st["max"] = hi if st["max"] is None else max(st["max"], hi)
        st["sum"] += float(x.sum(dtype=np.float64))
        st["n"] += int(x.size)
    return st


def _merge_stats(parts: list[dict[str, Any]]) -> dict[str, Any]:
    if not parts or not parts[0]:
        return {}
    n = sum(p["n"] for p in parts)
    lows = [p["min"] for p in parts if p["min"] is not None]
    highs = [p["max"] for p in parts if p["max"] is not None]
    out: dict[str, Any] = {
        "min": min(lows) if lows else None,
        "max": max(highs) if highs else None,
        "mean": sum(p["sum"] for p in parts) / n if n else None,
    }
    if "nonfinite" in parts[0]:
        out["nonfinite"] = sum(p["nonfinite"] for p in parts)
    if "counts" in parts[0]:
        if all(p.get("counts") is not None for p in parts):
            counts: dict[int, int] = {}
            for p in parts:
                for k, v in p["counts"].items():
                    counts[int(k)] = counts.get(int(k), 0) + v
            if len(counts) <= MAX_COUNTED_VALUES:
                out["counts"] = {str(k): v for k, v in sorted(counts.items())}
    return out


# --------------------------------------------------------------------------------------------
# Chunks
# --------------------------------------------------------------------------------------------


def _sidecar(partial: Path, k: int) -> Path:
    return partial / f"chunk-{k:05d}.json"


class _ChunkOut:
    """The files of one chunk (= one output shard) being written into ``data_dir``.

    ``big(name, dtype, row_shape)`` returns a writable memory map (a temporary ``.npy``) for a
    large field; ``small(name, array)`` registers an in-memory one. ``commit()`` renames every
    file to its final shard name and writes the sidecar last; it returns the sidecar dict.
    """

    def __init__(self, partial: Path, k: int, start: int, count: int):
        self.partial, self.data = partial, partial / "split"
        self.k, self.start, self.count = k, start, count
        self._big: dict[str, tuple[Path, np.memmap]] = {}
        self._small: dict[str, np.ndarray] = {}

    def big(self, name: str, dtype, row_shape: tuple[int, ...]) -> np.memmap:
        if name not in self._big:
            final = self.data / shard_file_name(name, self.k)
            tmp = temp_path(final)
            arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.dtype(dtype), shape=(self.count, *row_shape))
            self._big[name] = (tmp, arr)
        return self._big[name][1]

    def small(self, name: str, arr: np.ndarray) -> None:
        arr = np.asarray(arr)
        if len(arr) != self.count:
            raise ValueError(f"field {name!r}: {len(arr)} rows for a chunk of {self.count}")
        self._small[name] = arr

    def discard(self) -> None:
        for tmp, arr in self._big.values():
            del arr
            tmp.unlink(missing_ok=True)
        self._big.clear()

    def commit(self) -> dict[str, Any]:
        fields: dict[str, Any] = {}
        for name, (tmp, arr) in self._big.items():
            arr.flush()
            stats = _partial_stats(arr)
            spec = (dtype_name(arr.dtype), list(arr.shape[1:]))
            del arr
            final = commit_file(tmp, self.data / shard_file_name(name, self.k))
            entry = FileEntry(final.name, sha256_file(final), final.stat().st_size)
            fields[name] = {
                "file": entry.name,
                "sha256": entry.sha256,
                "bytes": entry.bytes,
                "dtype": spec[0],
                "shape": spec[1],
                "stats": stats,
            }
        self._big.clear()
        for name, arr in self._small.items():
            entry = _save_npy_atomic(self.data / shard_file_name(name, self.k), arr)
            fields[name] = {
                "file": entry.name,
                "sha256": entry.sha256,
                "bytes": entry.bytes,
                "dtype": dtype_name(arr.dtype),
                "shape": list(arr.shape[1:]),
                "stats": _partial_stats(arr),
            }
        sidecar = {"index": self.k, "start": self.start, "count": self.count, "fields": fields}
        write_json(_sidecar(self.partial, self.k), sidecar, indent=1)  # last: marks the chunk done
        return sidecar


def _chunk_done(partial: Path, piece: Piece) -> dict[str, Any] | None:
    """The chunk's sidecar if it and every file it lists check out (size and sha256)."""
    k = piece.index
    path = _sidecar(partial, k)
    if not path.is_file():
        return None
    try:
        side = json.loads(path.read_text())
        if (side["index"], side["start"], side["count"]) != (k, piece.start, piece.count):
            return None
        for entry in side["fields"].values():
            f = partial / "split" / entry["file"]
            if not f.is_file() or f.stat().st_size != entry["bytes"] or sha256_file(f) != entry["sha256"]:
                log.warning("chunk %d: %s missing or damaged, encoding the chunk again", k, f.name)
                return None
    except (ValueError, KeyError, TypeError) as e:
        log.warning("chunk %d: unreadable sidecar (%s), encoding the chunk again", k, e)
        return None
    return side


def _read_rows(ds: ShardedArrays, name: str, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of field ``name`` as one in-memory array (across shard boundaries)."""
    off = ds.manifest.offsets
    parts = []
    k = max(int(np.searchsorted(off, start, side="right")) - 1, 0)
    while start < stop:
        lo, hi = int(off[k]), int(off[k + 1])
        take = min(stop, hi)
        parts.append(np.asarray(ds.shard(name, k)[start - lo : take - lo]))
        start = take
        k += 1
    if not parts:
        spec = ds.manifest.fields[name]
        return np.zeros((0, *spec.shape), dtype=spec.np_dtype)
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _batches(ds: ShardedArrays, name: str, start: int, stop: int, batch_size: int):
    """(offset, rows) for consecutive batches of rows [start, stop), the next batch read in a
    background thread while the caller encodes the current one."""
    starts = list(range(start, stop, batch_size))
    if not starts:
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        nxt = pool.submit(_read_rows, ds, name, starts[0], min(starts[0] + batch_size, stop))
        for i, s in enumerate(starts):
            rows = nxt.result()
            if i + 1 < len(starts):
                s2 = starts[i + 1]
                nxt = pool.submit(_read_rows, ds, name, s2, min(s2 + batch_size, stop))
            yield s - start, rows


# --------------------------------------------------------------------------------------------
# The chunk runner (one process or Ray tasks)
# --------------------------------------------------------------------------------------------


def _pack_model(model: torch.nn.Module) -> dict[str, Any]:
    """Class, config and CPU state dict: enough to rebuild the model in a Ray worker."""
    cfg = model.config
    config = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    state = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    return {
        "module": type(model).__module__,
        "cls": type(model).__name__,
        "config": config,
        "state": state,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }


def _unpack_model(blob: dict[str, Any], device: str) -> torch.nn.Module:
    import importlib

    cls = getattr(importlib.import_module(blob["module"]), blob["cls"])
    if hasattr(cls, "config_class") and cls.config_class is not None:  # transformers
        model = cls(cls.config_class.from_dict(blob["config"]))
    else:  # diffusers
        model = cls.from_config(blob["config"])
    model.load_state_dict(blob["state"], strict=True)
    dtype = getattr(torch, blob["dtype"])
    model = model.to(device) if dtype == torch.float32 else model.to(device=device, dtype=dtype)
    return model.eval().requires_grad_(False)


def _finish(partial: Path, out_root: Path, manifest: Manifest, overwrite: bool) -> None:
    data = partial / "split"
    manifest.save(data)
    move_into_place(data, out_root, overwrite=overwrite)
    shutil.rmtree(partial, ignore_errors=True)


def _encode_chunk_remote(
    kind: str, spec: dict, blob: dict, extra: Any, piece: Piece, device: str
) -> tuple[dict, dict[str, bytes]]:
    """A Ray task, on any machine: rebuild the model on this worker's device, encode one chunk into a
    temporary directory there, and ship back its sidecar and files (`_receive_chunk` writes them)."""
    model = _unpack_model(blob, device)
    with tempfile.TemporaryDirectory(prefix="uvit-chunk-") as tmp:
        (Path(tmp) / "split").mkdir()
        return _run_one(_make_compute(kind, spec, model, extra), Path(tmp), piece), read_tree(tmp)


def _receive_chunk(partial: Path, piece: Piece, shipped: tuple[dict, dict[str, bytes]]) -> dict:
    """On the driver: write a Ray task's chunk files into `partial`, the sidecar (which marks it done) last."""
    sidecar, files = shipped
    write_tree(partial, files, last=[_sidecar(partial, piece.index).name])
    return sidecar


def _make_compute(kind: str, spec: dict, model, extra) -> Callable:
    if kind == "moments":
        return functools.partial(_compute_moments, vae=model, spec=spec)
    if kind == "contexts":
        return functools.partial(_compute_contexts, tokenizer=extra, model=model, spec=spec)
    raise ValueError(f"unknown chunk kind {kind!r}")


def _run_one(compute: Callable, partial: Path, piece: Piece) -> dict:
    out = _ChunkOut(partial, piece.index, piece.start, piece.count)
    try:
        compute(out, piece.start, piece.count)
        return out.commit()
    finally:
        out.discard()


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _resolve_workers(num_workers: int | None, device: torch.device) -> Workers:
    if num_workers is None:
        many = device.type == "cuda" and torch.cuda.device_count() > 1
        num_workers = torch.cuda.device_count() if many else 1
    return Workers(num_workers, use_gpu=device.type == "cuda")


@dataclass(frozen=True)
class _Encode:
    """One encode as the chunk runner sees it.

    kind: "moments" or "contexts", the chunk function (:func:`_make_compute`) built around
    ``model`` (and ``extra``, the tokenizer). job: what determines the content (``job.json`` and
    ``manifest.meta["encode"]["job"]``): a re-run of the same job reuses its chunks. spec: what a
    chunk reads besides the model (source root, batch size, dtype, ...). src: the source split's
    manifest; total: output rows; meta: the output manifest's meta; finalize(data_dir): more meta,
    after the last chunk (files written beside the shards).
    """

    kind: str
    job: dict[str, Any]
    spec: dict[str, Any]
    model: torch.nn.Module
    extra: Any
    src: Manifest
    total: int
    meta: dict[str, Any]
    progress: tuple[str, str]  # (description, unit) of the progress bar
    finalize: Callable[[Path], dict[str, Any]] | None = None


def _report(
    run_info: dict[str, Any] | None, chunks: int, encoded: int, seconds: float, workers: int, rows: int
) -> None:
    if run_info is not None:
        run_info.update(
            {
                "chunks": chunks,
                "encoded_chunks": encoded,
                "reused_chunks": chunks - encoded,
                "seconds": seconds,
                "num_workers": workers,
                "rows": rows,
            }
        )


def _already_encoded(out_root: Path, job: dict[str, Any], run: EncodeRun) -> Manifest | None:
    """The manifest of a finished ``out_root`` of the same job; raises if ``out_root`` holds another
    and may not be overwritten."""
    if (out_root / MANIFEST_NAME).is_file():
        try:
            existing = Manifest.load(out_root)
        except DataIntegrityError:
            existing = None
        if run.resume and existing is not None and existing.meta.get("encode", {}).get("job") == job:
            log.info("%s is already encoded with the same job; nothing to do", out_root)
            return existing
    if out_root.exists() and not run.overwrite:
        raise FileExistsError(
            f"{out_root} already exists (from a different job or source); pass overwrite=True to replace it"
        )
    return None


def _open_partial(out_root: Path, job: dict[str, Any], resume: bool) -> Path:
    """The partial directory of this job: kept when resuming the same job, else started afresh."""
    partial = partial_dir(out_root)
    if partial.exists():
        try:
            old_job = json.loads((partial / _JOB_NAME).read_text())
        except (OSError, ValueError):
            old_job = None
        if not resume or old_job != job:
            if resume:
                log.warning(
                    "%s holds chunks of a different job (source, weights or settings changed); starting over", partial
                )
            shutil.rmtree(partial)
    (partial / "split").mkdir(parents=True, exist_ok=True)
    remove_temps(partial / "split")  # left by an interrupted chunk
    write_json(partial / _JOB_NAME, job, indent=1)
    return partial


def _assemble(enc: _Encode, job: dict[str, Any], sidecars: dict[int, dict], partial: Path) -> Manifest:
    """The output manifest from the chunks' sidecars (in shard order)."""
    fields = {fname: FieldSpec(dtype=f["dtype"], shape=tuple(f["shape"])) for fname, f in sidecars[0]["fields"].items()}
    shards = []
    for k, side in sidecars.items():
        if set(side["fields"]) != set(fields):
            raise RuntimeError(f"chunk {k} has fields {sorted(side['fields'])}, chunk 0 has {sorted(fields)}")
        for fname, f in side["fields"].items():
            if (f["dtype"], tuple(f["shape"])) != (fields[fname].dtype, fields[fname].shape):
                raise RuntimeError(
                    f"chunk {k} field {fname!r} is {f['dtype']}{f['shape']}, chunk "
                    f"0 has {fields[fname].dtype}{list(fields[fname].shape)}"
                )
        shards.append(
            ShardEntry(
                index=k,
                count=side["count"],
                files={fname: FileEntry(f["file"], f["sha256"], f["bytes"]) for fname, f in side["fields"].items()},
            )
        )
    for fname in fields:
        fields[fname].stats = _merge_stats([side["fields"][fname]["stats"] for side in sidecars.values()])
    meta = dict(enc.meta)
    if enc.finalize is not None:
        meta.update(enc.finalize(partial / "split"))
    # Only what determines the content: the manifest of a resumed encode equals a fresh one's.
    meta["encode"] = {"job": job, "chunks": len(sidecars)}
    return Manifest(name=enc.src.name, split=enc.src.split, count=enc.total, fields=fields, shards=shards, meta=meta)


def _run_chunks(out_root: Path, enc: _Encode, run: EncodeRun, run_info: dict[str, Any] | None) -> Manifest:
    """Encode the chunks of ``enc`` that are not already done, then write the split at ``out_root``."""
    job = json.loads(json.dumps(enc.job))  # as it reads back from JSON (tuples -> lists)
    if run.shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {run.shard_size}")
    existing = _already_encoded(out_root, job, run)
    if existing is not None:
        _report(run_info, len(existing.shards), 0, 0.0, 0, existing.count)
        return existing
    workers = _resolve_workers(run.num_workers, _device_of(enc.model))
    partial = _open_partial(out_root, job, run.resume)
    work = ShardedWork(
        total=enc.total,
        piece_size=run.shard_size,
        verified=lambda piece: _chunk_done(partial, piece) if run.resume else None,
        local=lambda: functools.partial(_run_one, _make_compute(enc.kind, enc.spec, enc.model, enc.extra), partial),
        remote=RemoteTask(_encode_chunk_remote, lambda: (enc.kind, enc.spec, _pack_model(enc.model), enc.extra)),
        progress=Progress(*enc.progress, show=run.progress),
        receive=functools.partial(_receive_chunk, partial),
    )
    done = run_sharded(work, workers)
    manifest = _assemble(enc, job, done.results, partial)
    _report(run_info, len(done.pieces), len(done.computed), done.seconds, workers.num_workers, enc.total)
    log.info("%s: %d chunks encoded, %d reused, %.1f s", out_root, len(done.computed), len(done.reused), done.seconds)
    manifest.check_consistent()
    _finish(partial, out_root, manifest, run.overwrite)
    return manifest


def _source_manifest_sha(root: Path) -> str:
    return sha256_file(root / MANIFEST_NAME)


def _precision_label(device: torch.device, model_dtype: torch.dtype, autocast_dtype) -> str:
    if device.type == "cuda" and model_dtype == torch.float32 and autocast_dtype is not None:
        return f"autocast-{str(autocast_dtype).removeprefix('torch.')}"
    return str(model_dtype).removeprefix("torch.")


# --------------------------------------------------------------------------------------------
# Images -> moments
# --------------------------------------------------------------------------------------------


def _compute_moments(out: _ChunkOut, start: int, count: int, *, vae, spec: dict) -> None:
    from uvit.encoders.vae import encode_moments, pixels_to_unit

    ds = ShardedArrays(spec["source"])
    n = len(ds)
    autocast = getattr(torch, spec["autocast"]) if spec["autocast"] else None
    stop = start + count
    # Output rows [start, stop) in at most two runs: originals (< n) and mirrors (>= n).
    segments = []
    for lo, hi, mirrored in ((start, min(stop, n), False), (max(start, n), stop, True)):
        if lo < hi:
            segments.append((lo - start, lo % n, lo % n + (hi - lo), mirrored))
    moments = None
    for out_off, a, b, mirrored in segments:
        for off, imgs in _batches(ds, spec["image_field"], a, b, spec["batch_size"]):
            x = pixels_to_unit(imgs)
            if mirrored:
                x = x.flip(-1)
            m = encode_moments(vae, x, autocast_dtype=autocast).cpu().numpy()
            if moments is None:
                moments = out.big("moments", spec["dtype"], m.shape[1:])
            o = out_off + off
            moments[o : o + len(m)] = m.astype(moments.dtype)
    for fname in spec["carry"]:
        out.small(fname, np.concatenate([_read_rows(ds, fname, a, b) for _, a, b, _ in segments]))
    if spec["flip"]:
        out.small(
            "flipped", np.concatenate([np.full(b - a, int(mirrored), dtype=np.uint8) for _, a, b, mirrored in segments])
        )


def _carried_fields(image_root: Path, src: Manifest, enc: ImageEncoding) -> list[str]:
    """The source fields copied row for row, after checking the encoding fits the source."""
    if enc.image_field not in src.fields:
        raise ValueError(f"{image_root} has no field {enc.image_field!r}; fields: {sorted(src.fields)}")
    if enc.flip and "flipped" in src.fields:
        raise ValueError(
            f"{image_root} already stores mirrored images (field 'flipped'); "
            f"encoding it with flip=True would mirror them twice: use flip=False"
        )
    carry = [f for f in src.fields if f != enc.image_field] if enc.carry is None else list(enc.carry)
    unknown = sorted(set(carry) - set(src.fields))
    if unknown:
        raise ValueError(f"carry fields {unknown} are not in {image_root} ({sorted(src.fields)})")
    if enc.flip and "flipped" in carry:
        raise ValueError("'flipped' cannot be carried with flip=True")
    return carry


def _on_device(model: torch.nn.Module, run: EncodeRun) -> torch.nn.Module:
    return model if run.device is None else model.to(run.device)


def _source_of(root: Path, src: Manifest) -> dict[str, Any]:
    """The job's record of the source split: its manifest's sha256 and what it holds."""
    return {"manifest_sha256": _source_manifest_sha(root), "count": src.count, "name": src.name, "split": src.split}


def _moments_meta(image_root: Path, src: Manifest, vae, job: dict[str, Any]) -> dict[str, Any]:
    """The latent split's manifest meta: its source, the VAE, and how to read the moments."""
    from uvit.encoders.vae import downsample_factor

    c = int(vae.config.latent_channels)
    return {
        "kind": "vae_moments",
        "source": {
            "root": str(image_root),
            "name": src.name,
            "split": src.split,
            "count": src.count,
            "manifest_sha256": job["source"]["manifest_sha256"],
        },
        "source_meta": {
            k: src.meta[k]
            for k in ("num_classes", "classes", "source", "preprocessing", "num_captions_total")
            if k in src.meta
        },
        "vae": {
            "class": type(vae).__name__,
            "latent_channels": c,
            "downsample_factor": downsample_factor(vae),
            "scaling_factor": float(vae.config.scaling_factor),
            "encoder_sha256": job["encoder_sha256"],
            "precision": job["precision"],
        },
        "scale_factor": float(vae.config.scaling_factor),
        "moments": (
            f"moments[:, :{c}] is the posterior mean, moments[:, {c}:] the log-variance "
            f"(unclamped); z = scale_factor * (mean + exp(0.5*clamp(logvar, -30, 20)) * eps)"
        ),
        "flip": (
            {
                "stored": True,
                "layout": "rows [0, N) encode the images, rows [N, 2N) their "
                "horizontal mirrors in the same order; field 'flipped' is 1 for mirrors",
            }
            if job["flip"]
            else {"stored": "flipped" in src.fields}
        ),
    }


def encode_image_split(
    image_root: str | Path,
    out_root: str | Path,
    vae,
    encoding: ImageEncoding = ImageEncoding(),
    run: EncodeRun = EncodeRun(),
    run_info: dict[str, Any] | None = None,
) -> Manifest:
    """Encode the image split at ``image_root`` to VAE moments in a new split at ``out_root``.

    ``vae``: a diffusers ``AutoencoderKL`` (:func:`uvit.encoders.vae.load_vae`), moved to
    ``run.device`` when given. ``encoding``: what to encode (flips, storage dtype, carried fields);
    ``run``: shard size, resume, workers. ``run_info``: a dict that receives what this call did
    (chunks encoded / reused, seconds, workers); the manifest itself holds only what determines the
    content, so a resumed encode writes the same manifest as an uninterrupted one. See the module
    docstring for the layout, resume and multi-GPU behaviour.
    """
    from uvit.encoders.vae import downsample_factor, encoder_fingerprint

    image_root, out_root = Path(image_root), Path(out_root)
    src = Manifest.load(image_root)
    carry = _carried_fields(image_root, src, encoding)
    vae = _on_device(vae, run)
    factor = downsample_factor(vae)
    h, w = src.fields[encoding.image_field].shape[-2:]
    if h % factor or w % factor:
        raise ValueError(f"images {h}x{w} are not divisible by the VAE's downsampling {factor}")
    autocast = encoding.autocast_dtype
    spec = {
        "source": str(image_root.resolve()),
        "image_field": encoding.image_field,
        "flip": bool(encoding.flip),
        "carry": carry,
        "dtype": np.dtype(encoding.dtype).name,
        "batch_size": int(encoding.batch_size),
        "autocast": str(autocast).removeprefix("torch.") if autocast else None,
    }
    job = {
        "format": FORMAT,
        "kind": "vae_moments",
        "source": _source_of(image_root, src),
        "encoder_sha256": encoder_fingerprint(vae),
        "flip": bool(encoding.flip),
        "shard_size": int(run.shard_size),
        "dtype": spec["dtype"],
        "image_field": encoding.image_field,
        "carry": carry,
        "precision": _precision_label(_device_of(vae), next(vae.parameters()).dtype, autocast),
    }
    total = (2 if encoding.flip else 1) * src.count
    meta = _moments_meta(image_root, src, vae, job)
    enc = _Encode("moments", job, spec, vae, None, src, total, meta, (f"encode {src.name}/{src.split}", "img"))
    return _run_chunks(out_root, enc, run, run_info)


# --------------------------------------------------------------------------------------------
# Captions -> contexts
# --------------------------------------------------------------------------------------------


def _caption_rows(num_captions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image_rows, caption_index, offsets) of the flat caption list."""
    num = np.asarray(num_captions, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(num)]).astype(np.int64)
    image_rows = np.repeat(np.arange(len(num), dtype=np.int64), num)
    caption_index = np.arange(int(offsets[-1]), dtype=np.int64) - np.repeat(offsets[:-1], num)
    return image_rows, caption_index, offsets


def _compute_contexts(out: _ChunkOut, start: int, count: int, *, tokenizer, model, spec: dict) -> None:
    from uvit.encoders.text import encode_text

    ds = ShardedArrays(spec["source"])
    image_rows, caption_index, _ = _caption_rows(ds.field("num_captions"))
    rows = image_rows[start : start + count]
    ks = caption_index[start : start + count]
    base = int(rows[0])
    block = _read_rows(ds, "captions", base, int(rows[-1]) + 1)
    texts = [str(block[r - base, k]) for r, k in zip(rows.tolist(), ks.tolist())]
    ctx = None
    bs = spec["batch_size"]
    for i in range(0, count, bs):
        c = encode_text(tokenizer, model, texts[i : i + bs], spec["max_length"]).cpu().numpy()
        if ctx is None:
            ctx = out.big("contexts", spec["dtype"], c.shape[1:])
        ctx[i : i + len(c)] = c.astype(ctx.dtype)
    out.small("image_rows", rows)
    out.small("caption_index", ks)
    if "image_ids" in ds.manifest.fields:
        out.small("image_ids", _read_rows(ds, "image_ids", base, int(rows[-1]) + 1)[rows - base])


def _caption_counts(split_root: Path, src: Manifest) -> np.ndarray:
    """The source's ``num_captions`` int64 (N,), after checking it has captions within range."""
    missing = [f for f in ("captions", "num_captions") if f not in src.fields]
    if missing:
        raise ValueError(f"{split_root} has no field(s) {missing}; fields: {sorted(src.fields)}")
    num_captions = np.asarray(ShardedArrays(split_root).field("num_captions"), dtype=np.int64)
    if (num_captions < 0).any() or (num_captions > src.fields["captions"].shape[0]).any():
        raise ValueError(f"{split_root}: num_captions outside [0, {src.fields['captions'].shape[0]}]")
    if num_captions.sum() == 0:
        raise ValueError(f"{split_root} has no captions")
    return num_captions


def _contexts_meta(split_root: Path, src: Manifest, text_model, job: dict[str, Any], total: int) -> dict[str, Any]:
    """The caption split's manifest meta: its source, the text encoder, and the row layout."""
    return {
        "kind": "clip_contexts",
        "source": {
            "root": str(split_root),
            "name": src.name,
            "split": src.split,
            "count": src.count,
            "manifest_sha256": job["source"]["manifest_sha256"],
        },
        "num_images": src.count,
        "num_captions_total": total,
        "text_encoder": {
            "class": type(text_model).__name__,
            "hidden_size": int(text_model.config.hidden_size),
            "max_length": job["max_length"],
            "sha256": job["text_encoder_sha256"],
            "output": "last_hidden_state of input_ids only (no attention mask), "
            "truncation + padding='max_length' (official libs/clip.py)",
        },
        "layout": (
            "one row per caption, images in row order, captions in source order; "
            f"image i's captions are rows [o[i], o[i+1]) with o = {CAPTION_OFFSETS_NAME}; "
            f"{EMPTY_CONTEXT_NAME} is the context of the empty prompt"
        ),
    }


def _write_caption_files(tokenizer, text_model, max_length: int, offsets: np.ndarray, data: Path) -> dict[str, Any]:
    """Write caption_offsets.npy and empty_context.npy into the split; their entries for the meta."""
    from uvit.encoders.text import empty_context

    empty = empty_context(tokenizer, text_model, max_length).cpu().numpy().astype(np.float32)
    files = {}
    for fname, arr in ((CAPTION_OFFSETS_NAME, offsets), (EMPTY_CONTEXT_NAME, empty)):
        e = _save_npy_atomic(data / fname, arr)
        files[fname] = {"sha256": e.sha256, "bytes": e.bytes, "dtype": dtype_name(arr.dtype), "shape": list(arr.shape)}
    return {"files": files}


def encode_captions(
    split_root: str | Path,
    out_root: str | Path,
    tokenizer,
    text_model,
    encoding: CaptionEncoding = CaptionEncoding(),
    run: EncodeRun = EncodeRun(),
    run_info: dict[str, Any] | None = None,
) -> Manifest:
    """Encode every caption of the split at ``split_root`` (fields ``captions`` (N, K) and
    ``num_captions`` (N,): an MS-COCO image split, or a latent split that carried them) to CLIP
    contexts in a new split at ``out_root``: one row per caption, plus ``caption_offsets.npy``
    (image row -> caption rows) and ``empty_context.npy`` (see the module docstring).

    Resumable and multi-GPU like :func:`encode_image_split`; ``run.shard_size`` counts captions.
    """
    from uvit.encoders.text import text_encoder_fingerprint

    split_root, out_root = Path(split_root), Path(out_root)
    src = Manifest.load(split_root)
    text_model = _on_device(text_model, run)
    _, _, offsets = _caption_rows(_caption_counts(split_root, src))
    total = int(offsets[-1])
    max_length = int(encoding.max_length)
    spec = {
        "source": str(split_root.resolve()),
        "batch_size": int(encoding.batch_size),
        "max_length": max_length,
        "dtype": np.dtype(encoding.dtype).name,
    }
    job = {
        "format": FORMAT,
        "kind": "clip_contexts",
        "source": _source_of(split_root, src),
        "text_encoder_sha256": text_encoder_fingerprint(tokenizer, text_model),
        "max_length": max_length,
        "shard_size": int(run.shard_size),
        "dtype": spec["dtype"],
        "precision": str(next(text_model.parameters()).dtype).removeprefix("torch."),
    }
    meta = _contexts_meta(split_root, src, text_model, job, total)
    progress = (f"encode captions {src.name}/{src.split}", "caption")
    finalize = functools.partial(_write_caption_files, tokenizer, text_model, max_length, offsets)
    enc = _Encode("contexts", job, spec, text_model, tokenizer, src, total, meta, progress, finalize)
    return _run_chunks(out_root, enc, run, run_info)


def _load_extra(root: str | Path, fname: str) -> np.ndarray:
    root = Path(root)
    manifest = Manifest.load(root)
    entry = manifest.meta.get("files", {}).get(fname)
    path = root / fname
    if entry is None:
        raise DataIntegrityError(
            f"{root} lists no {fname} in its manifest: not a caption split written by encode_captions"
        )
    if not path.is_file() or path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
        raise DataIntegrityError(
            f"{path} is missing or does not match its sha256 in {root / MANIFEST_NAME}; re-run the encode stage"
        )
    return np.load(path, allow_pickle=False)


def load_caption_index(root: str | Path) -> np.ndarray:
    """``caption_offsets`` int64 (N+1,) of a caption split, checksum checked."""
    return _load_extra(root, CAPTION_OFFSETS_NAME)


def load_empty_context(root: str | Path) -> np.ndarray:
    """The empty prompt's context float32 (77, D) of a caption split, checksum checked."""
    return _load_extra(root, EMPTY_CONTEXT_NAME)
