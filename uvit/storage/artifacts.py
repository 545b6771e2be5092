"""A versioned, content-addressed artifact store: S3 (AWS, MinIO, moto) or a local directory.

Layout (the same for both backends)::

    <root>/<benchmark>/<run_id>/<relative path>     every file of the run
    <root>/<benchmark>/<run_id>/run_manifest.json   size + sha256 of every file, written last

``<root>`` is ``s3://bucket/prefix`` or a local directory (``file:///abs/dir`` or a plain path).
A run is complete exactly when its ``run_manifest.json`` exists: ``upload_run`` writes it after
every file has been uploaded and verified, ``list_runs`` lists only runs that have one and
``download_run`` refuses runs without one. Runs published before the file was renamed carry it as
``manifest.json``; they are read as well (the new name is looked up first).

The default ``run_id`` is the first 16 hex digits of the sha256 of the manifest's file list
(paths, sizes, sha256s; not the timestamp): uploading the same content twice gives the same run id,
and the second upload is a no-op. An existing complete run is never overwritten with different
content (``FileExistsError``).

Verification
------------
*Upload.* Every S3 object carries the sha256 of its content in its user metadata
(``x-amz-meta-sha256``). Transfers go through boto3's managed transfer (``upload_file``, with a
:class:`~boto3.s3.transfer.TransferConfig`): files at or above ``multipart_threshold`` go up as
multipart uploads of ``part_size`` parts, ``max_concurrency`` at a time, each request with the
SDK's checksum, which the server checks. After each upload the object is HEAD-ed (no
re-download) and must show the expected size and that sha256, which ties it to the manifest.
The local backend copies to a temporary file, hashes the copy and renames it into place.

*Download.* Every file is fetched by the managed transfer (large objects as parallel ranged
GETs) into a temporary file next to its destination; only a file whose size and sha256 equal the
manifest's is renamed into place. A mismatch raises :class:`ArtifactIntegrityError` (object,
expected and actual hash) and the temporary file is removed, so ``dest`` never holds a partial or
corrupt file. Files already in ``dest`` with the right hash are not downloaded again.

*Interrupted uploads.* A failed multipart upload is aborted by the transfer manager. Re-running
``upload_run`` skips every file the store already holds with the right size and sha256, uploads
the rest and then writes the manifest; until then the run is invisible. Configure a bucket
lifecycle rule ``AbortIncompleteMultipartUpload`` (e.g. 7 days) for uploads cut off by a killed
process (see ``infra/README.md``).

Credentials come only from the environment / AWS config files (the usual boto3 chain), never
from arguments. The endpoint is :func:`uvit.storage.s3.s3_endpoint_url`: ``endpoint_url=``, else
``$UVIT_S3_ENDPOINT_URL``, else ``$AWS_ENDPOINT_URL_S3``, else ``$AWS_ENDPOINT_URL``, else AWS.
Transient errors are retried with exponential backoff (botocore "standard" retry mode).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Callable, Mapping
from urllib.parse import unquote, urlparse

from tqdm import tqdm

from uvit.fileio import commit_file, sha256_file, temp_path
from uvit.storage.s3 import s3_client

log = logging.getLogger(__name__)

MANIFEST = "run_manifest.json"  # its presence marks a run complete
LEGACY_MANIFEST = "manifest.json"  # the same file in runs published before the rename
MANIFEST_NAMES = (MANIFEST, LEGACY_MANIFEST)  # looked up in this order; both reserved in a run
MANIFEST_FORMAT = "uvit-artifacts/1"
META_SHA256 = "sha256"  # user metadata key: x-amz-meta-sha256
S3_MIN_PART_SIZE = 5 * 2**20  # every part but the last must be at least this (S3 rule)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

# Called with the number of bytes just transferred (boto3's Callback convention: may be negative
# when a retried request rewinds).
OnBytes = Callable[[int], None]


class ArtifactIntegrityError(RuntimeError):
    """Stored bytes differ from what they should be (the object, expected and actual value)."""

    def __init__(self, obj: str, expected: str, actual: str, what: str = "sha256") -> None:
        super().__init__(f"integrity check failed for {obj}: expected {what} {expected}, got {actual}")
        self.object = obj
        self.expected = expected
        self.actual = actual
        self.what = what


@dataclass(frozen=True)
class ArtifactRef:
    benchmark: str
    run_id: str
    uri: str


@dataclass(frozen=True)
class _Digest:
    """What a file should look like in the store: its size in bytes and hex sha256."""

    size: int
    sha256: str


def _digest(path: Path) -> _Digest:
    return _Digest(path.stat().st_size, sha256_file(path))


def _check_name(kind: str, value: str) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise ValueError(f"invalid {kind} {value!r}: use letters, digits, '.', '_', '-'")
    return value


def _is_safe_relpath(rel: str) -> bool:
    """A relative POSIX path that stays inside its root ("a/b.txt", not "/a", "../a" or "a//b")."""
    return (
        bool(rel)
        and not PurePosixPath(rel).is_absolute()
        and all(part not in ("", ".", "..") for part in rel.split("/"))
    )


def _check_relpath(rel: str) -> str:
    if not isinstance(rel, str) or not _is_safe_relpath(rel):
        raise ArtifactIntegrityError(MANIFEST, "a relative path inside the run", repr(rel), "path")
    return rel


def _copy_stream(src: BinaryIO, dst: BinaryIO, on_bytes: OnBytes | None) -> None:
    """Copy src to dst in 1 MiB chunks, reporting each chunk to on_bytes."""
    while chunk := src.read(1 << 20):
        dst.write(chunk)
        if on_bytes is not None:
            on_bytes(len(chunk))


def _bytes_bar(total: int, desc: str, progress: bool | None) -> tqdm:
    """A tqdm bar over `total` bytes on stderr (None: only when stderr is a terminal)."""
    return tqdm(
        total=total,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        ascii=True,
        disable=None if progress is None else not progress,
    )


def _entries_id(entries: list[dict[str, Any]]) -> str:
    blob = json.dumps(entries, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Backends: the store talks to these through keys relative to its root.


class _LocalBackend:
    def __init__(self, root: Path) -> None:
        self.root = root.expanduser().resolve()

    def uri(self, key: str = "") -> str:
        return (self.root / key).as_uri() if key else self.root.as_uri()

    def has(self, key: str, digest: _Digest) -> bool:
        path = self.root / key
        return path.is_file() and path.stat().st_size == digest.size and sha256_file(path) == digest.sha256

    def put_file(self, local: Path, key: str, digest: _Digest, on_bytes: OnBytes | None = None) -> None:
        with open(local, "rb") as src:
            self._write(key, lambda f: _copy_stream(src, f, on_bytes), digest)

    def put_bytes(self, key: str, data: bytes) -> None:
        self._write(key, lambda f: f.write(data), _Digest(len(data), hashlib.sha256(data).hexdigest()))

    def _write(self, key: str, fill, digest: _Digest) -> None:
        """Write through a temporary that is hashed before it is renamed into place."""
        target = self.root / key
        tmp = temp_path(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(tmp, "xb") as f:
                fill(f)
            got = _digest(tmp)
            if got != digest:
                raise ArtifactIntegrityError(self.uri(key), digest.sha256, got.sha256)
            commit_file(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)

    def get_bytes(self, key: str) -> bytes | None:
        path = self.root / key
        return path.read_bytes() if path.is_file() else None

    def download(self, key: str, path: Path, on_bytes: OnBytes | None = None) -> None:
        with open(self.root / key, "rb") as src, open(path, "wb") as dst:
            _copy_stream(src, dst, on_bytes)

    def list_runs(self, benchmark: str) -> list[tuple[str, float]]:
        base = self.root / benchmark
        if not base.is_dir():
            return []
        out = []
        for d in base.iterdir():
            m = next((d / name for name in MANIFEST_NAMES if (d / name).is_file()), None)
            if m is not None:
                out.append((d.name, m.stat().st_mtime))
        return out


class _S3Backend:
    def __init__(
        self,
        bucket: str,
        prefix: str,
        *,
        endpoint_url: str | None,
        multipart_threshold: int,
        part_size: int,
        max_concurrency: int,
    ) -> None:
        from boto3.s3.transfer import TransferConfig

        if part_size < S3_MIN_PART_SIZE:
            raise ValueError(f"part_size must be >= {S3_MIN_PART_SIZE} bytes (S3), got {part_size}")
        self.bucket, self.prefix = bucket, prefix.strip("/")
        concurrency = max(1, max_concurrency)
        self.client = s3_client(endpoint_url, max_pool_connections=max(10, 2 * concurrency))
        # Multipart uploads and parallel ranged downloads above the threshold; the transfer
        # manager keeps within S3's 10,000 parts by growing the part size where it must.
        self.transfer = TransferConfig(
            multipart_threshold=multipart_threshold,
            multipart_chunksize=part_size,
            max_concurrency=concurrency,
            use_threads=concurrency > 1,
        )

    def full(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def uri(self, key: str = "") -> str:
        path = self.full(key) if key else self.prefix
        return f"s3://{self.bucket}/{path}" if path else f"s3://{self.bucket}"

    @staticmethod
    def _is_missing(exc: Exception) -> bool:
        from botocore.exceptions import ClientError

        if not isinstance(exc, ClientError):
            return False
        return str(exc.response.get("Error", {}).get("Code", "")) in ("404", "NoSuchKey", "NotFound")

    def head(self, key: str) -> dict[str, Any] | None:
        try:
            return self.client.head_object(Bucket=self.bucket, Key=self.full(key))
        except Exception as exc:
            if self._is_missing(exc):
                return None
            raise

    def _problem(self, key: str, digest: _Digest) -> tuple[str, str, str] | None:
        """How the object at `key` differs from `digest` (what, expected, actual), or None."""
        head = self.head(key)
        if head is None:
            return ("object", "present", "missing")
        if head["ContentLength"] != digest.size:
            return ("size", str(digest.size), str(head["ContentLength"]))
        meta = head.get("Metadata", {}).get(META_SHA256, "")
        if meta != digest.sha256:
            return ("metadata sha256", digest.sha256, meta or "<none>")
        return None

    def has(self, key: str, digest: _Digest) -> bool:
        return self._problem(key, digest) is None

    def _verify(self, key: str, digest: _Digest) -> None:
        problem = self._problem(key, digest)
        if problem is not None:
            what, expected, actual = problem
            raise ArtifactIntegrityError(self.uri(key), expected, actual, what)

    def put_file(self, local: Path, key: str, digest: _Digest, on_bytes: OnBytes | None = None) -> None:
        self.client.upload_file(
            str(local),
            self.bucket,
            self.full(key),
            Config=self.transfer,
            ExtraArgs={"Metadata": {META_SHA256: digest.sha256}},
            Callback=on_bytes,
        )
        self._verify(key, digest)

    def put_bytes(self, key: str, data: bytes) -> None:
        digest = _Digest(len(data), hashlib.sha256(data).hexdigest())
        self.client.put_object(
            Bucket=self.bucket,
            Key=self.full(key),
            Body=data,
            ContentType="application/json",
            Metadata={META_SHA256: digest.sha256},
        )
        self._verify(key, digest)

    def get_bytes(self, key: str) -> bytes | None:
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=self.full(key))
        except Exception as exc:
            if self._is_missing(exc):
                return None
            raise
        data = resp["Body"].read()
        meta = resp.get("Metadata", {}).get(META_SHA256)
        if meta and hashlib.sha256(data).hexdigest() != meta:
            raise ArtifactIntegrityError(self.uri(key), meta, hashlib.sha256(data).hexdigest())
        return data

    def download(self, key: str, path: Path, on_bytes: OnBytes | None = None) -> None:
        self.client.download_file(self.bucket, self.full(key), str(path), Config=self.transfer, Callback=on_bytes)

    def list_runs(self, benchmark: str) -> list[tuple[str, float]]:
        base = self.full(f"{benchmark}/")
        names = []
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base, Delimiter="/")
        for page in pages:
            for cp in page.get("CommonPrefixes", []):
                names.append(cp["Prefix"][len(base) :].rstrip("/"))
        out = []
        for name in names:
            heads = (self.head(f"{benchmark}/{name}/{m}") for m in MANIFEST_NAMES)
            head = next((h for h in heads if h is not None), None)
            if head is not None:
                out.append((name, head["LastModified"].timestamp()))
        return out


# --------------------------------------------------------------------------------------------


class ArtifactStore:
    """Runs of files under ``<uri>/<benchmark>/<run_id>/`` with a manifest; see the module doc.

    ``uri``: ``s3://bucket/prefix`` or a local directory (``file:///dir`` or a plain path).
    ``multipart_threshold`` / ``part_size``: S3 only; objects at or above the threshold go up
    and come down in parts of ``part_size`` bytes (>= 5 MiB), ``max_concurrency`` at a time.
    """

    def __init__(
        self,
        uri: str,
        *,
        endpoint_url: str | None = None,
        multipart_threshold: int = 8 * 2**20,
        part_size: int = 8 * 2**20,
        max_concurrency: int = 4,
    ) -> None:
        self.uri = str(uri)
        parsed = urlparse(self.uri)
        if parsed.scheme == "s3":
            if not parsed.netloc:
                raise ValueError(f"no bucket in {uri!r}")
            self._backend: _LocalBackend | _S3Backend = _S3Backend(
                parsed.netloc,
                parsed.path,
                endpoint_url=endpoint_url,
                multipart_threshold=multipart_threshold,
                part_size=part_size,
                max_concurrency=max_concurrency,
            )
        elif parsed.scheme == "file":
            if parsed.netloc not in ("", "localhost"):
                raise ValueError(f"file URI with a remote host: {uri!r}")
            self._backend = _LocalBackend(Path(unquote(parsed.path)))
        elif parsed.scheme == "" or (len(parsed.scheme) == 1 and os.name == "nt"):
            self._backend = _LocalBackend(Path(self.uri))
        else:
            raise ValueError(f"unsupported store URI {uri!r} (use s3://, file:// or a path)")

    def __repr__(self) -> str:
        return f"ArtifactStore({self._backend.uri()!r})"

    @property
    def client(self):
        """The boto3 S3 client (None for a local directory)."""
        return getattr(self._backend, "client", None)

    @property
    def is_s3(self) -> bool:
        return isinstance(self._backend, _S3Backend)

    def run_uri(self, benchmark: str, run_id: str) -> str:
        return self._backend.uri(f"{benchmark}/{run_id}")

    # ------------------------------------------------------------------------------------------
    def upload_file(self, local: str | Path, key: str) -> None:
        """Upload one file to ``<root>/<key>`` and verify it (see the module doc); large files
        (>= multipart_threshold) go up in parts."""
        local = Path(local)
        if not _is_safe_relpath(key):
            raise ValueError(f"invalid key {key!r}: a relative path like 'dir/file.bin'")
        self._backend.put_file(local, key, _digest(local))

    def upload_run(
        self, local_dir: str | Path, benchmark: str, run_id: str | None = None, *, progress: bool | None = None
    ) -> ArtifactRef:
        """Upload every file under ``local_dir`` as one run, then its manifest (progress: see
        :meth:`upload_files`)."""
        local_dir = Path(local_dir)
        if not local_dir.is_dir():
            raise NotADirectoryError(local_dir)
        files = {p.relative_to(local_dir).as_posix(): p for p in local_dir.rglob("*") if p.is_file()}
        if not files:
            raise ValueError(f"{local_dir} holds no files")
        return self.upload_files(files, benchmark, run_id, progress=progress)

    def upload_files(
        self,
        files: Mapping[str, str | Path],
        benchmark: str,
        run_id: str | None = None,
        *,
        progress: bool | None = None,
    ) -> ArtifactRef:
        """Upload ``{relative path in the run: local file}`` as one run, then its manifest.

        The files may come from anywhere (a stage's outputs spread over several directories);
        the run holds them at their relative paths. ``run_id`` defaults to the content id.
        progress: a tqdm bar over the run's bytes on stderr (files the store already holds count
        at once); None shows it only when stderr is a terminal, False never.
        """
        _check_name("benchmark", benchmark)
        if not files:
            raise ValueError("no files to upload")
        rels = sorted(files)
        for rel in rels:
            if not _is_safe_relpath(rel):
                raise ValueError(f"invalid path in the run {rel!r}: a relative path like 'dir/file.bin'")
        reserved = [name for name in MANIFEST_NAMES if name in rels]
        if reserved:
            raise ValueError(f"{', '.join(reserved)}: the name is reserved for the run manifest")
        paths = [Path(files[rel]) for rel in rels]
        digests = [_digest(p) for p in paths]
        entries = [{"path": rel, "size": d.size, "sha256": d.sha256} for rel, d in zip(rels, digests)]
        content_id = _entries_id(entries)
        run_id = _check_name("run_id", run_id or content_id)
        base = f"{benchmark}/{run_id}"
        ref = ArtifactRef(benchmark, run_id, self._backend.uri(base))

        existing = self._manifest_bytes(base)
        if existing is not None:
            if json.loads(existing).get("files") == entries:
                log.info("%s is already complete with the same content", ref.uri)
                return ref
            raise FileExistsError(f"{ref.uri} already exists with different content")

        with _bytes_bar(sum(d.size for d in digests), f"publish {benchmark}/{run_id}", progress) as bar:
            for path, rel, digest in zip(paths, rels, digests):
                key = f"{base}/{rel}"
                if self._backend.has(key, digest):  # left by an interrupted upload
                    bar.update(digest.size)
                    continue
                self._backend.put_file(path, key, digest, on_bytes=bar.update)

        manifest = {
            "format": MANIFEST_FORMAT,
            "benchmark": benchmark,
            "run_id": run_id,
            "content_id": content_id,
            # Microseconds: `latest_run` orders by it (S3's LastModified has whole seconds).
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds"),
            "total_size": sum(d.size for d in digests),
            "files": entries,
        }
        self._backend.put_bytes(f"{base}/{MANIFEST}", json.dumps(manifest, indent=1).encode())
        return ref

    def manifest(self, benchmark: str, run_id: str) -> dict[str, Any]:
        """The parsed manifest of a complete run (FileNotFoundError if incomplete or absent)."""
        _check_name("benchmark", benchmark)
        _check_name("run_id", run_id)
        data = self._manifest_bytes(f"{benchmark}/{run_id}")
        if data is None:
            raise FileNotFoundError(f"no complete run at {self.run_uri(benchmark, run_id)}")
        manifest = json.loads(data)
        if manifest.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"{self.run_uri(benchmark, run_id)}: unknown manifest format")
        for entry in manifest["files"]:
            _check_relpath(entry["path"])
        return manifest

    def _manifest_bytes(self, base: str) -> bytes | None:
        """The stored manifest of the run at key ``base`` (under its name, else its old one), or None."""
        found = (self._backend.get_bytes(f"{base}/{name}") for name in MANIFEST_NAMES)
        return next((data for data in found if data is not None), None)

    def download_run(self, benchmark: str, run_id: str, dest: str | Path, *, progress: bool | None = None) -> Path:
        """Download a complete run into ``dest`` (files at their relative paths), verified.
        progress: a tqdm bar over the run's bytes on stderr (files already in ``dest`` count at
        once); None shows it only when stderr is a terminal, False never."""
        manifest = self.manifest(benchmark, run_id)
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        total = sum(int(e["size"]) for e in manifest["files"])
        with _bytes_bar(total, f"fetch {benchmark}/{run_id}", progress) as bar:
            for entry in manifest["files"]:
                rel, size, sha256 = entry["path"], int(entry["size"]), entry["sha256"]
                key = f"{benchmark}/{run_id}/{rel}"
                target = dest / rel
                if target.is_file() and target.stat().st_size == size and sha256_file(target) == sha256:
                    bar.update(size)
                    continue  # already here (an earlier, interrupted call)
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = temp_path(target)
                try:
                    self._backend.download(key, tmp, on_bytes=bar.update)
                    got = _digest(tmp)
                    if got.sha256 != sha256:
                        raise ArtifactIntegrityError(self._backend.uri(key), sha256, got.sha256)
                    if got.size != size:  # only reachable with a sha256 collision; kept for clarity
                        raise ArtifactIntegrityError(self._backend.uri(key), str(size), str(got.size), "size")
                    commit_file(tmp, target)
                finally:
                    tmp.unlink(missing_ok=True)
        return dest

    def latest_run(self, benchmark: str) -> str | None:
        """The complete run whose manifest was written last (None if there is none)."""
        runs = [(self.manifest(benchmark, r).get("created", ""), r) for r in self.list_runs(benchmark)]
        return max(runs)[1] if runs else None

    def list_runs(self, benchmark: str) -> list[str]:
        """Complete runs (those with a manifest), oldest first."""
        _check_name("benchmark", benchmark)
        runs = sorted(self._backend.list_runs(benchmark), key=lambda t: (t[1], t[0]))
        return [name for name, _ in runs]
