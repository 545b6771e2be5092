"""A versioned, content-addressed artifact store: S3 (AWS, MinIO, moto) or a local directory.

Layout (the same for both backends)::

    <root>/<benchmark>/<run_id>/<relative path>     every file of the run
    <root>/<benchmark>/<run_id>/manifest.json       size + sha256 of every file, written last

``<root>`` is ``s3://bucket/prefix`` or a local directory (``file:///abs/dir`` or a plain path).
A run is complete exactly when its ``manifest.json`` exists: ``upload_run`` writes it after every
file has been uploaded and verified, ``list_runs`` lists only runs that have one and
``download_run`` refuses runs without one.

The default ``run_id`` is the first 16 hex digits of the sha256 of the manifest's file list
(paths, sizes, sha256s; not the timestamp): uploading the same content twice gives the same run id,
and the second upload is a no-op. An existing complete run is never overwritten with different
content (``FileExistsError``).

Verification
------------
*Upload.* Every S3 object carries the sha256 of its content in its user metadata
(``x-amz-meta-sha256``). After each upload the object is HEAD-ed (no re-download) and must show
the expected size, that sha256 and the expected ETag, which the client computes itself:

* single ``PutObject``: ETag = MD5 of the content (the response's ETag is checked too);
* multipart: ETag = MD5 of the concatenated binary part MD5s + ``-<part count>``, and every
  ``UploadPart`` is sent with ``Content-MD5`` (the server rejects a part damaged in transit) and
  its returned ETag must equal the part's MD5.

The ETag proves that the server stored exactly the bytes that were read from the local file; the
metadata sha256 ties the object to the manifest. Where the ETag is not an MD5 (SSE-KMS or SSE-C
encrypted buckets) the object is re-downloaded and hashed instead. The local backend copies to a
temporary file, hashes the copy and renames it into place.

*Download.* Every file is streamed into a temporary file next to its destination while its
sha256 is computed; only a file whose size and sha256 equal the manifest's is renamed into place.
A mismatch raises :class:`ArtifactIntegrityError` (object, expected and actual hash) and the
temporary file is removed, so ``dest`` never holds a partial or corrupt file. Files already in
``dest`` with the right hash are not downloaded again.

Resumable uploads
-----------------
Files at or above ``multipart_threshold`` go up as multipart uploads. An interrupted upload is
not aborted: the next ``upload_file`` (or ``upload_run``) for the same key finds it with
``ListMultipartUploads``, asks ``ListParts`` which parts the server holds, skips every part whose
size and ETag (MD5) equal the local part's, uploads the rest and completes the upload. Configure
a bucket lifecycle rule ``AbortIncompleteMultipartUpload`` (e.g. 7 days) so that abandoned
uploads do not cost storage forever (see ``infra/README.md``).

Credentials come only from the environment / AWS config files (the usual boto3 chain), never
from arguments. The endpoint is ``endpoint_url=``, else ``$UVIT_S3_ENDPOINT_URL``, else
``$AWS_ENDPOINT_URL_S3``, else ``$AWS_ENDPOINT_URL``, else AWS. Transient errors are retried
with exponential backoff (botocore "standard" retry mode).
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Iterator, Mapping
from urllib.parse import unquote, urlparse

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "uvit-artifacts/1"
META_SHA256 = "sha256"  # user metadata key: x-amz-meta-sha256
CHUNK = 1 << 20
S3_MIN_PART_SIZE = 5 * 2**20  # every part but the last must be at least this (S3 rule)
S3_MAX_PARTS = 10_000
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_ENDPOINT_ENV = ("UVIT_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


class ArtifactIntegrityError(RuntimeError):
    """Stored bytes differ from what they should be (the object, expected and actual value)."""

    def __init__(self, obj: str, expected: str, actual: str, what: str = "sha256") -> None:
        super().__init__(
            f"integrity check failed for {obj}: expected {what} {expected}, got {actual}"
        )
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
    """What a local file should look like remotely."""

    size: int
    sha256: str
    md5: str = ""  # whole-file MD5 hex (single-part ETag)
    part_size: int = 0
    part_md5s: tuple[bytes, ...] = ()  # binary MD5 of each part_size chunk

    @property
    def multipart_etag(self) -> str:
        joined = hashlib.md5(b"".join(self.part_md5s)).hexdigest()
        return f"{joined}-{len(self.part_md5s)}"

    def part_range(self, number: int) -> tuple[int, int]:
        """(offset, length) of 1-based part `number`."""
        start = (number - 1) * self.part_size
        return start, min(self.part_size, self.size - start)


def _digest(path: Path, part_size: int = 0) -> _Digest:
    """sha256 (always), and with part_size > 0 the whole-file MD5 and per-part MD5s, in one pass."""
    sha = hashlib.sha256()
    if part_size <= 0:
        size = 0
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                sha.update(chunk)
                size += len(chunk)
        return _Digest(size=size, sha256=sha.hexdigest())
    md5 = hashlib.md5()
    parts: list[bytes] = []
    size = 0
    with open(path, "rb") as f:
        while True:
            part = hashlib.md5()
            left, got = part_size, 0
            while left and (chunk := f.read(min(CHUNK, left))):
                sha.update(chunk)
                md5.update(chunk)
                part.update(chunk)
                got += len(chunk)
                left -= len(chunk)
            if got == 0:
                break
            parts.append(part.digest())
            size += got
            if left:
                break
    if not parts:  # an empty file is one empty part
        parts.append(hashlib.md5(b"").digest())
    return _Digest(size, sha.hexdigest(), md5.hexdigest(), part_size, tuple(parts))


def _check_name(kind: str, value: str) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise ValueError(f"invalid {kind} {value!r}: use letters, digits, '.', '_', '-'")
    return value


def _is_safe_relpath(rel: str) -> bool:
    """A relative POSIX path that stays inside its root ("a/b.txt", not "/a", "../a" or "a//b")."""
    return bool(rel) and not PurePosixPath(rel).is_absolute() and all(
        part not in ("", ".", "..") for part in rel.split("/")
    )


def _check_relpath(rel: str) -> str:
    if not isinstance(rel, str) or not _is_safe_relpath(rel):
        raise ArtifactIntegrityError(MANIFEST, "a relative path inside the run", repr(rel), "path")
    return rel


def _entries_id(entries: list[dict[str, Any]]) -> str:
    blob = json.dumps(entries, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _read_umask() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


_UMASK = _read_umask()  # once, at import: os.umask is process-wide, so not per call from threads


def _publish_tmp(tmp: str | Path, target: Path) -> None:
    """Rename a finished temp file into place with ordinary permissions (mkstemp makes it 0600)."""
    os.chmod(tmp, 0o666 & ~_UMASK)
    os.replace(tmp, target)


def _etag(value: str | None) -> str:
    return (value or "").strip('"')


# --------------------------------------------------------------------------------------------
# Backends: the store talks to these through keys relative to its root.


class _LocalBackend:
    def __init__(self, root: Path) -> None:
        self.root = root.expanduser().resolve()

    def uri(self, key: str = "") -> str:
        return (self.root / key).as_uri() if key else self.root.as_uri()

    def part_size_for(self, size: int) -> int:
        return 0

    def has(self, key: str, digest: _Digest) -> bool:
        path = self.root / key
        if not path.is_file() or path.stat().st_size != digest.size:
            return False
        return _digest(path).sha256 == digest.sha256

    def _atomic_write(self, key: str, fill, digest: _Digest) -> None:
        target = self.root / key
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as f:
                fill(f)
            got = _digest(Path(tmp))
            if (got.size, got.sha256) != (digest.size, digest.sha256):
                raise ArtifactIntegrityError(self.uri(key), digest.sha256, got.sha256)
            _publish_tmp(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def put_file(self, local: Path, key: str, digest: _Digest, resume: bool = True) -> None:
        def fill(f):
            with open(local, "rb") as src:
                shutil.copyfileobj(src, f, CHUNK)

        self._atomic_write(key, fill, digest)

    def put_bytes(self, key: str, data: bytes) -> None:
        digest = _Digest(len(data), hashlib.sha256(data).hexdigest())
        self._atomic_write(key, lambda f: f.write(data), digest)

    def get_bytes(self, key: str) -> bytes | None:
        path = self.root / key
        return path.read_bytes() if path.is_file() else None

    def iter_chunks(self, key: str) -> Iterator[bytes]:
        with open(self.root / key, "rb") as f:
            while chunk := f.read(CHUNK):
                yield chunk

    def list_runs(self, benchmark: str) -> list[tuple[str, float]]:
        base = self.root / benchmark
        if not base.is_dir():
            return []
        out = []
        for d in base.iterdir():
            m = d / MANIFEST
            if d.is_dir() and m.is_file():
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
        import boto3
        from botocore.config import Config

        if part_size < S3_MIN_PART_SIZE:
            raise ValueError(f"part_size must be >= {S3_MIN_PART_SIZE} bytes (S3), got {part_size}")
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.endpoint_url = endpoint_url
        self.multipart_threshold = multipart_threshold
        self.part_size = part_size
        self.max_concurrency = max(1, max_concurrency)
        config = Config(
            retries={"max_attempts": 8, "mode": "standard"},  # exponential backoff + jitter
            connect_timeout=10,
            read_timeout=120,
            max_pool_connections=max(10, 2 * self.max_concurrency),
            # We verify with our own MD5/sha256; don't let the SDK add CRC trailers that older
            # S3-compatible servers (MinIO versions, moto) may not understand.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            # A custom endpoint (MinIO, moto, an IP) rarely resolves bucket subdomains.
            s3={"addressing_style": "path"} if endpoint_url else None,
        )
        self.client = boto3.client("s3", endpoint_url=endpoint_url, config=config)

    # keys ------------------------------------------------------------------------------------
    def full(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def uri(self, key: str = "") -> str:
        path = self.full(key) if key else self.prefix
        return f"s3://{self.bucket}/{path}" if path else f"s3://{self.bucket}"

    def part_size_for(self, size: int) -> int:
        ps = self.part_size
        if size > ps * S3_MAX_PARTS:  # keep within 10,000 parts, in whole MiB
            ps = -(-size // S3_MAX_PARTS)
            ps = -(-ps // 2**20) * 2**20
        return ps

    def _is_missing(self, exc: Exception) -> bool:
        from botocore.exceptions import ClientError

        if not isinstance(exc, ClientError):
            return False
        code = str(exc.response.get("Error", {}).get("Code", ""))
        return code in ("404", "NoSuchKey", "NotFound")

    def head(self, key: str) -> dict[str, Any] | None:
        try:
            return self.client.head_object(Bucket=self.bucket, Key=self.full(key))
        except Exception as exc:
            if self._is_missing(exc):
                return None
            raise

    @staticmethod
    def _etag_is_md5(resp: dict[str, Any]) -> bool:
        sse = resp.get("ServerSideEncryption", "")
        return not (str(sse).startswith("aws:kms") or resp.get("SSECustomerAlgorithm"))

    # verification -----------------------------------------------------------------------------
    def _problems(self, key: str, digest: _Digest, multipart: bool | None) -> list[tuple]:
        """Differences between the object at `key` and `digest`: [(what, expected, actual)]."""
        head = self.head(key)
        if head is None:
            return [("object", "present", "missing")]
        out: list[tuple] = []
        if head["ContentLength"] != digest.size:
            out.append(("size", str(digest.size), str(head["ContentLength"])))
        meta = head.get("Metadata", {}).get(META_SHA256, "")
        if meta != digest.sha256:
            out.append(("metadata sha256", digest.sha256, meta or "<none>"))
        if out:
            return out
        etag = _etag(head.get("ETag"))
        if self._etag_is_md5(head):
            is_mp = "-" in etag if multipart is None else multipart
            want = digest.multipart_etag if is_mp else digest.md5
            if etag != want:
                out.append(("ETag", want, etag))
        else:  # encrypted: ETag is not an MD5, hash the stored bytes
            sha = hashlib.sha256()
            for chunk in self.iter_chunks(key):
                sha.update(chunk)
            if sha.hexdigest() != digest.sha256:
                out.append(("sha256", digest.sha256, sha.hexdigest()))
        return out

    def has(self, key: str, digest: _Digest) -> bool:
        return not self._problems(key, digest, None)

    def _verify(self, key: str, digest: _Digest, multipart: bool) -> None:
        problems = self._problems(key, digest, multipart)
        if problems:
            what, expected, actual = problems[0]
            raise ArtifactIntegrityError(self.uri(key), expected, actual, what)

    # upload -----------------------------------------------------------------------------------
    def put_file(self, local: Path, key: str, digest: _Digest, resume: bool = True) -> None:
        if digest.size < self.multipart_threshold:
            with open(local, "rb") as f:
                resp = self.client.put_object(
                    Bucket=self.bucket,
                    Key=self.full(key),
                    Body=f,
                    ContentMD5=base64.b64encode(bytes.fromhex(digest.md5)).decode(),
                    Metadata={META_SHA256: digest.sha256},
                )
            if self._etag_is_md5(resp) and _etag(resp.get("ETag")) != digest.md5:
                raise ArtifactIntegrityError(
                    self.uri(key), digest.md5, _etag(resp.get("ETag")), "ETag"
                )
            self._verify(key, digest, multipart=False)
        else:
            self._multipart(local, key, digest, resume=resume)

    def put_bytes(self, key: str, data: bytes) -> None:
        md5 = hashlib.md5(data)
        digest = _Digest(len(data), hashlib.sha256(data).hexdigest(), md5.hexdigest())
        self.client.put_object(
            Bucket=self.bucket,
            Key=self.full(key),
            Body=data,
            ContentMD5=base64.b64encode(md5.digest()).decode(),
            ContentType="application/json",
            Metadata={META_SHA256: digest.sha256},
        )
        self._verify(key, digest, multipart=False)

    def _find_upload(self, full_key: str) -> str | None:
        """The most recently started in-progress multipart upload of exactly `full_key`."""
        found = []
        pages = self.client.get_paginator("list_multipart_uploads").paginate(
            Bucket=self.bucket, Prefix=full_key
        )
        for page in pages:
            found += [u for u in page.get("Uploads", []) if u["Key"] == full_key]
        if not found:
            return None
        return max(found, key=lambda u: u["Initiated"])["UploadId"]

    def _uploaded_parts(self, full_key: str, upload_id: str) -> dict[int, tuple[int, str]]:
        parts: dict[int, tuple[int, str]] = {}
        pages = self.client.get_paginator("list_parts").paginate(
            Bucket=self.bucket, Key=full_key, UploadId=upload_id
        )
        for page in pages:
            for p in page.get("Parts", []):
                parts[p["PartNumber"]] = (p["Size"], _etag(p["ETag"]))
        return parts

    def _multipart(self, local: Path, key: str, digest: _Digest, resume: bool) -> None:
        full_key = self.full(key)
        n = len(digest.part_md5s)
        upload_id = self._find_upload(full_key) if resume else None
        done: set[int] = set()
        if upload_id is not None:
            for number, (size, etag) in self._uploaded_parts(full_key, upload_id).items():
                if (
                    1 <= number <= n
                    and size == digest.part_range(number)[1]
                    and etag == digest.part_md5s[number - 1].hex()
                ):
                    done.add(number)
            log.info("resuming %s: %d of %d parts already uploaded", self.uri(key), len(done), n)
        else:
            upload_id = self.client.create_multipart_upload(
                Bucket=self.bucket, Key=full_key, Metadata={META_SHA256: digest.sha256}
            )["UploadId"]

        def send(number: int) -> None:
            offset, length = digest.part_range(number)
            with open(local, "rb") as f:
                f.seek(offset)
                body = f.read(length)
            md5, got = digest.part_md5s[number - 1], hashlib.md5(body).digest()
            if got != md5:  # the file changed since it was hashed
                raise ArtifactIntegrityError(f"{local} part {number}", md5.hex(), got.hex(), "MD5")
            resp = self.client.upload_part(
                Bucket=self.bucket,
                Key=full_key,
                UploadId=upload_id,
                PartNumber=number,
                Body=body,
                ContentMD5=base64.b64encode(md5).decode(),
            )
            if _etag(resp.get("ETag")) != md5.hex() and self._etag_is_md5(resp):
                raise ArtifactIntegrityError(
                    f"{self.uri(key)} part {number}", md5.hex(), _etag(resp.get("ETag")), "ETag"
                )

        todo = [i for i in range(1, n + 1) if i not in done]
        if self.max_concurrency == 1 or len(todo) <= 1:
            for number in todo:
                send(number)
        else:
            with ThreadPoolExecutor(min(self.max_concurrency, len(todo))) as pool:
                for fut in [pool.submit(send, i) for i in todo]:
                    fut.result()  # re-raise the first failure (the upload stays resumable)

        self.client.complete_multipart_upload(
            Bucket=self.bucket,
            Key=full_key,
            UploadId=upload_id,
            MultipartUpload={
                "Parts": [
                    {"PartNumber": i, "ETag": f'"{digest.part_md5s[i - 1].hex()}"'}
                    for i in range(1, n + 1)
                ]
            },
        )
        problems = self._problems(key, digest, multipart=True)
        if problems and done and [p[0] for p in problems] == ["metadata sha256"]:
            # The resumed upload was started for another version of the file (or by another
            # tool): the bytes are right but the metadata is not. Upload again from scratch.
            log.warning("resumed upload of %s had stale metadata; uploading again", self.uri(key))
            self._multipart(local, key, digest, resume=False)
            return
        if problems:
            what, expected, actual = problems[0]
            raise ArtifactIntegrityError(self.uri(key), expected, actual, what)

    # download ---------------------------------------------------------------------------------
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

    def iter_chunks(self, key: str) -> Iterator[bytes]:
        resp = self.client.get_object(Bucket=self.bucket, Key=self.full(key))
        yield from resp["Body"].iter_chunks(CHUNK)

    def list_runs(self, benchmark: str) -> list[tuple[str, float]]:
        base = self.full(f"{benchmark}/")
        names = []
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=base, Delimiter="/"
        )
        for page in pages:
            for cp in page.get("CommonPrefixes", []):
                names.append(cp["Prefix"][len(base):].rstrip("/"))
        out = []
        for name in names:
            head = self.head(f"{benchmark}/{name}/{MANIFEST}")
            if head is not None:
                out.append((name, head["LastModified"].timestamp()))
        return out


# --------------------------------------------------------------------------------------------


class ArtifactStore:
    """Runs of files under ``<uri>/<benchmark>/<run_id>/`` with a manifest; see the module doc.

    ``uri``: ``s3://bucket/prefix`` or a local directory (``file:///dir`` or a plain path).
    ``multipart_threshold`` / ``part_size``: S3 only; files at or above the threshold go up in
    parts of ``part_size`` bytes (>= 5 MiB), ``max_concurrency`` parts at a time.
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
            if endpoint_url is None:
                endpoint_url = next(
                    (os.environ[e] for e in _ENDPOINT_ENV if os.environ.get(e)), None
                )
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
        """Upload one file to ``<root>/<key>`` and verify it (see the module doc).

        Large files (>= multipart_threshold) go up in parts; an interrupted upload of the same
        key is resumed, uploading only the parts the server does not already hold.
        """
        local = Path(local)
        if not _is_safe_relpath(key):
            raise ValueError(f"invalid key {key!r}: a relative path like 'dir/file.bin'")
        digest = _digest(local, self._backend.part_size_for(local.stat().st_size))
        self._backend.put_file(local, key, digest)

    def upload_run(
        self, local_dir: str | Path, benchmark: str, run_id: str | None = None
    ) -> ArtifactRef:
        """Upload every file under ``local_dir`` as one run, then its manifest."""
        local_dir = Path(local_dir)
        if not local_dir.is_dir():
            raise NotADirectoryError(local_dir)
        files = {p.relative_to(local_dir).as_posix(): p for p in local_dir.rglob("*") if p.is_file()}
        if not files:
            raise ValueError(f"{local_dir} holds no files")
        return self.upload_files(files, benchmark, run_id)

    def upload_files(
        self, files: Mapping[str, str | Path], benchmark: str, run_id: str | None = None
    ) -> ArtifactRef:
        """Upload ``{relative path in the run: local file}`` as one run, then its manifest.

        The files may come from anywhere (a stage's outputs spread over several directories);
        the run holds them at their relative paths. ``run_id`` defaults to the content id.
        """
        _check_name("benchmark", benchmark)
        if not files:
            raise ValueError("no files to upload")
        rels = sorted(files)
        for rel in rels:
            if not _is_safe_relpath(rel):
                raise ValueError(f"invalid path in the run {rel!r}: a relative path like 'dir/file.bin'")
        if MANIFEST in rels:
            raise ValueError(f"{MANIFEST}: the name is reserved for the run manifest")
        paths = [Path(files[rel]) for rel in rels]
        digests = [_digest(p, self._backend.part_size_for(p.stat().st_size)) for p in paths]
        entries = [
            {"path": rel, "size": d.size, "sha256": d.sha256} for rel, d in zip(rels, digests)
        ]
        content_id = _entries_id(entries)
        run_id = _check_name("run_id", run_id or content_id)
        base = f"{benchmark}/{run_id}"
        ref = ArtifactRef(benchmark, run_id, self._backend.uri(base))

        existing = self._backend.get_bytes(f"{base}/{MANIFEST}")
        if existing is not None:
            if json.loads(existing).get("files") == entries:
                log.info("%s is already complete with the same content", ref.uri)
                return ref
            raise FileExistsError(f"{ref.uri} already exists with different content")

        for path, rel, digest in zip(paths, rels, digests):
            key = f"{base}/{rel}"
            if self._backend.has(key, digest):  # left by an interrupted upload
                continue
            self._backend.put_file(path, key, digest)

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
        data = self._backend.get_bytes(f"{benchmark}/{run_id}/{MANIFEST}")
        if data is None:
            raise FileNotFoundError(f"no complete run at {self.run_uri(benchmark, run_id)}")
        manifest = json.loads(data)
        if manifest.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"{self.run_uri(benchmark, run_id)}: unknown manifest format")
        for entry in manifest["files"]:
            _check_relpath(entry["path"])
        return manifest

    def download_run(self, benchmark: str, run_id: str, dest: str | Path) -> Path:
        """Download a complete run into ``dest`` (files at their relative paths), verified."""
        manifest = self.manifest(benchmark, run_id)
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        for entry in manifest["files"]:
            rel, size, sha256 = entry["path"], int(entry["size"]), entry["sha256"]
            key = f"{benchmark}/{run_id}/{rel}"
            target = dest / rel
            if target.is_file() and target.stat().st_size == size:
                if _digest(target).sha256 == sha256:  # already here (an earlier, interrupted call)
                    continue
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
            try:
                sha, got = hashlib.sha256(), 0
                with os.fdopen(fd, "wb") as f:
                    for chunk in self._backend.iter_chunks(key):
                        sha.update(chunk)
                        got += len(chunk)
                        f.write(chunk)
                if sha.hexdigest() != sha256:
                    raise ArtifactIntegrityError(self._backend.uri(key), sha256, sha.hexdigest())
                if got != size:  # only reachable with a sha256 collision; kept for clarity
                    raise ArtifactIntegrityError(
                        self._backend.uri(key), str(size), str(got), "size"
                    )
                _publish_tmp(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
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
