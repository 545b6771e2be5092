"""Where Ray Train keeps checkpoints: a local directory or `s3://bucket/prefix` (AWS, MinIO, moto).

`resolve_storage` turns `train.storage_path` into a pyarrow filesystem and a path on it, which is
what `RunConfig(storage_path=..., storage_filesystem=...)` takes; `find_checkpoints` lists the
complete checkpoints under it (any run of the same fingerprint), so the driver can resume from
either kind of storage. Credentials are never parameters: pyarrow reads the usual AWS chain
(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, ~/.aws, an instance profile).
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from uvit.storage.s3 import s3_endpoint_url


@dataclass
class Storage:
    """A storage location: `fs` (pyarrow FileSystem), `path` on it, `uri` for messages."""

    fs: object
    path: str
    uri: str

    @property
    def is_local(self) -> bool:
        return not self.uri.startswith("s3://")

    def child(self, name: str) -> Storage:
        return Storage(self.fs, f"{self.path.rstrip('/')}/{name}", f"{self.uri.rstrip('/')}/{name}")


def resolve_storage(location: str | Path, endpoint: str | None = None) -> Storage:
    """`s3://bucket/prefix` -> S3FileSystem ("bucket/prefix"); anything else -> a local directory.
    The endpoint is `endpoint` (train.storage_endpoint), else the environment's
    (:func:`uvit.storage.s3.s3_endpoint_url`), else AWS."""
    import pyarrow.fs

    location = str(location)
    if location.startswith("s3://"):
        bucket_prefix = location[len("s3://") :].strip("/")
        if not bucket_prefix:
            raise ValueError(f"{location!r} names no bucket")
        kwargs: dict = {}
        url = s3_endpoint_url(endpoint)
        if url:
            u = urlparse(url)
            if u.scheme not in ("http", "https") or not u.netloc:
                raise ValueError(f"S3 endpoint must be http(s)://host[:port], got {url!r}")
            kwargs.update(endpoint_override=u.netloc, scheme=u.scheme)
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            kwargs["region"] = region
        return Storage(pyarrow.fs.S3FileSystem(**kwargs), bucket_prefix, f"s3://{bucket_prefix}")
    if "://" in location:
        raise ValueError(f"unsupported storage {location!r}: use a directory or s3://bucket/prefix")
    path = Path(location).expanduser().resolve()
    return Storage(pyarrow.fs.LocalFileSystem(), str(path), str(path))


def _ls(fs, path: str) -> list:
    import pyarrow.fs

    return fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True, recursive=False))


def find_checkpoints(storage: Storage) -> list[tuple[int, float, str]]:
    """(step, mtime, path) of every complete checkpoint under <storage>/<run>/checkpoint_*,
    newest step first. Incomplete ones (no readable state.json) are left out."""
    import pyarrow.fs

    found = []
    for run in _ls(storage.fs, storage.path):
        if run.type != pyarrow.fs.FileType.Directory:
            continue
        for ckpt in _ls(storage.fs, run.path):
            if ckpt.type != pyarrow.fs.FileType.Directory or not ckpt.base_name.startswith("checkpoint_"):
                continue
            info = storage.fs.get_file_info(f"{ckpt.path}/state.json")
            if info.type != pyarrow.fs.FileType.File:
                continue
            try:
                with storage.fs.open_input_stream(info.path) as f:
                    state = json.loads(f.read())
                step = int(state["step"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
            problem = _size_mismatch(storage.fs, ckpt.path, state.get("files") or {})
            if problem:
                warnings.warn(
                    f"skipping checkpoint {ckpt.path} (step {step}): {problem}; falling back to an older one",
                    stacklevel=2,
                )
                continue
            mtime = info.mtime.timestamp() if info.mtime is not None else 0.0
            found.append((step, mtime, ckpt.path))
    return sorted(found, key=lambda c: (c[0], c[1]), reverse=True)


def _size_mismatch(fs, root: str, files: dict[str, int]) -> str | None:
    """What is wrong with a checkpoint's files against the sizes its state.json records, or None."""
    import pyarrow.fs

    if not files:  # written before sizes were recorded: nothing to compare
        return None
    infos = fs.get_file_info([f"{root}/{name}" for name in files])
    for (name, size), info in zip(files.items(), infos):
        if info.type != pyarrow.fs.FileType.File:
            return f"{name} is missing"
        if info.size != size:
            return f"{name} is {info.size} bytes, {size} expected (truncated?)"
    return None


def ensure_dir(storage: Storage) -> None:
    """Create the directory (local) or nothing (S3 has no directories; the bucket must exist)."""
    if storage.is_local:
        Path(storage.path).mkdir(parents=True, exist_ok=True)
