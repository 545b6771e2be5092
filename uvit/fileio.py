"""File plumbing used everywhere: sha256 of files, directories and state dicts; atomic writes.

Hashes (hex sha256):

- :func:`sha256_file`: the file's bytes, read in blocks.
- :func:`sha256_listing` / :func:`sha256_dir`: over ``<relative path>\\0<file sha256>\\0`` for each
  file in order, so a renamed file or an edited one changes the hash and a touched one does not.
- :func:`sha256_state_dict`: over ``<name>|<dtype>|<shape>|`` and the raw bytes of each tensor,
  in name order (the same value on CPU and GPU).

Atomic writes (:func:`atomic_open` and the ``write_*`` helpers) go to a hidden temporary file in
the destination's directory (``.<name>.tmp-<random>``), which is flushed and fsynced, renamed over
the destination with ``os.replace``, and the directory fsynced: a reader sees the old file or
the whole new one, never a partial one, also after a crash. On an error the temporary is removed.

Only the standard library and numpy are imported here; torch only by :func:`sha256_state_dict`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from pathlib import Path, PurePosixPath
from typing import IO, Any, Iterable, Iterator, Mapping

import numpy as np

__all__ = [
    "atomic_open",
    "commit_file",
    "is_temp_name",
    "read_json_or_none",
    "read_tree",
    "remove_temps",
    "sha256_dir",
    "sha256_file",
    "sha256_listing",
    "sha256_state_dict",
    "temp_path",
    "update_with_state_dict",
    "write_bytes",
    "write_json",
    "write_npy",
    "write_npz",
    "write_text",
    "write_tree",
]

BLOCK = 1 << 22  # 4 MiB per read
_TEMP_MARK = ".tmp-"


# -- hashing --------------------------------------------------------------------------------------


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of the file's bytes, read in blocks (any size)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(BLOCK):
            h.update(block)
    return h.hexdigest()


def sha256_listing(root: str | Path, rel_paths: Iterable[str | PurePosixPath]) -> str:
    """Hex sha256 over ``<rel path>\\0<sha256 of root/rel path>\\0`` for each path, in the given order."""
    root = Path(root)
    h = hashlib.sha256()
    for rel in rel_paths:
        rel = PurePosixPath(rel)
        h.update(str(rel).encode() + b"\0" + sha256_file(root / rel).encode() + b"\0")
    return h.hexdigest()


def sha256_dir(root: str | Path) -> str:
    """Hex sha256 of a directory: :func:`sha256_listing` of every file under it, ordered by path
    components (so ``a/b`` sorts before ``a-c``). Names and contents count; times do not."""
    root = Path(root)
    rels = sorted(PurePosixPath(p.relative_to(root).as_posix()) for p in root.rglob("*") if p.is_file())
    return sha256_listing(root, rels)


def update_with_state_dict(h: Any, state_dict: Mapping[str, Any], prefixes: tuple[str, ...] = ()) -> Any:
    """Feed ``<name>|<dtype>|<shape>|`` and the bytes of every tensor (names in sorted order; only
    names starting with one of ``prefixes`` when given) into the hash object ``h``; return ``h``."""
    import torch

    for name, t in sorted(state_dict.items()):
        if prefixes and not name.startswith(prefixes):
            continue
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h


def sha256_state_dict(state_dict: Mapping[str, Any], prefixes: tuple[str, ...] = ()) -> str:
    """Hex sha256 of a torch state dict's names, dtypes, shapes and bytes (see
    :func:`update_with_state_dict`)."""
    return update_with_state_dict(hashlib.sha256(), state_dict, prefixes).hexdigest()


# -- atomic writes --------------------------------------------------------------------------------


def is_temp_name(name: str) -> bool:
    """Whether a file name is one of :func:`atomic_open`'s temporaries (``.<name>.tmp-<hex>``)."""
    return name.startswith(".") and _TEMP_MARK in name


def remove_temps(directory: str | Path, pattern: str = "*") -> list[Path]:
    """Delete the temporaries an interrupted :func:`atomic_open` left for files matching
    ``pattern`` in ``directory``; return what was deleted."""
    gone = []
    for p in Path(directory).glob(f".{pattern}{_TEMP_MARK}*"):
        if p.is_file():
            p.unlink(missing_ok=True)
            gone.append(p)
    return gone


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_path(path: str | Path) -> Path:
    """A fresh temporary name next to ``path`` (``.<name>.tmp-<random hex>``, same directory, so
    the final rename stays on one filesystem)."""
    path = Path(path)
    return path.with_name(f".{path.name}{_TEMP_MARK}{uuid.uuid4().hex}")


def commit_file(tmp: str | Path, path: str | Path) -> Path:
    """Make a finished temporary ``tmp`` durable and rename it to ``path``: fsync the file,
    ``os.replace``, fsync the directory."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(Path(path).parent)
    return Path(path)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb", **kwargs: Any) -> Iterator[IO]:
    """Open a temporary next to ``path`` for writing; on a clean exit it is fsynced and renamed to
    ``path`` (and the directory fsynced); on an exception it is deleted and ``path`` untouched.
    ``mode`` is ``"wb"`` or ``"w"`` (``kwargs`` go to ``open``, e.g. ``encoding``)."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open writes whole files: mode 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, mode.replace("w", "x"), **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_open(path, "wb") as f:
        f.write(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(
    path: str | Path, obj: Any, *, indent: int | None = 2, sort_keys: bool = False, default: Any = None
) -> Path:
    """Write ``json.dumps(obj, ...)`` and a newline to ``path`` atomically."""
    return write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys, default=default) + "\n")


def read_json_or_none(path: str | Path) -> Any:
    """The JSON value in ``path``, or None when the file is missing or unreadable (markers and
    records a resumable step may have left half-written or never written)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def write_npz(path: str | Path, **arrays: np.ndarray) -> Path:
    """Write ``np.savez(**arrays)`` to ``path`` atomically (exactly that name: no ``.npz`` appended)."""
    with atomic_open(path, "wb") as f:
        np.savez(f, **arrays)
    return Path(path)


def write_npy(path: str | Path, arr: np.ndarray) -> Path:
    """Write one array as ``.npy`` (C order, no pickles) to ``path`` atomically."""
    with atomic_open(path, "wb") as f:
        np.save(f, np.ascontiguousarray(arr), allow_pickle=False)
    return Path(path)


def read_tree(root: str | Path) -> dict[str, bytes]:
    """Every file under `root`, as {relative POSIX path: bytes}: a directory as one picklable value,
    to hand to or from another machine (a Ray task's argument or result)."""
    root = Path(root)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def write_tree(root: str | Path, files: Mapping[str, bytes], last: Iterable[str] = ()) -> list[Path]:
    """Write `read_tree`'s value under `root`, each file atomically; the names in `last` after all the
    others (a marker that says the rest is complete)."""
    root, last = Path(root), list(last)
    order = [name for name in files if name not in last] + [name for name in last if name in files]
    written = []
    for name in order:
        path = root / PurePosixPath(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        written.append(write_bytes(path, files[name]))
    return written
