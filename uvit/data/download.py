"""Fetch one file from ``http(s)://``, ``s3://`` or a local path: resumable, verified, atomic.

:func:`fetch` is the only way the dataset sources get a file they do not already have:

- The bytes go to ``<dest>.part``; an interrupted download (network error, full disk, Ctrl-C) keeps
  the partial file and the next call resumes it (HTTP ``Range`` request, S3 ranged ``GetObject``,
  or a seek for a local copy) instead of starting over.
- When the transfer is complete the checksum(s) (``sha256`` and/or ``md5``) are checked and only then
  is ``.part`` renamed to ``dest`` (same directory, so the rename is atomic). A mismatch deletes the
  partial file (resuming a corrupt file cannot fix it) and raises :class:`ChecksumMismatch`.
- If ``dest`` already exists and matches the checksum nothing is downloaded. So a file placed at
  ``dest`` by hand (on a machine without internet access) is used as is, once it verifies. A
  ``dest`` that does *not* match is never overwritten: the error says to delete or replace it.
- A failed transfer is retried :data:`RETRIES` times (resuming each time); then
  :class:`DownloadError` names the URL and says where to put the file to skip the download.
  A full disk (``ENOSPC``) raises :class:`DiskFullError` at once, keeping the partial file.
- Concurrent calls for the same ``dest`` (two pipeline stages sharing a download folder) are
  serialised with an advisory lock on ``<dest>.lock``.

S3 credentials come from the usual boto3 chain; the endpoint from ``UVIT_S3_ENDPOINT_URL``,
``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (first set wins; unset means AWS itself).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import os
import socket
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from uvit.data.shards import DataIntegrityError
from uvit.storage.s3 import s3_client, s3_endpoint_url

__all__ = [
    "AUTO",
    "BACKOFF_S",
    "BadSourceError",
    "ChecksumMismatch",
    "DiskFullError",
    "DownloadError",
    "RETRIES",
    "SourceInput",
    "TIMEOUT_S",
    "default_download_dir",
    "fetch",
    "file_digests",
    "is_remote",
    "open_tar",
    "verify_file",
]

RETRIES = 3  # extra attempts after a transient failure, each resuming the partial file
BACKOFF_S = 2.0  # sleep BACKOFF_S * 2**attempt between attempts
TIMEOUT_S = 60.0  # socket timeout of one HTTP request / read
_HASH_BLOCK = 1 << 22
_REMOTE_SCHEMES = ("http://", "https://", "s3://")
_BYTES = {"unit": "B", "unit_scale": True, "unit_divisor": 1024}  # a tqdm bar counting bytes
AUTO = "auto"  # SourceInput.md5: the source's official MD5 for its official archive


class BadSourceError(DataIntegrityError, ValueError):
    """A dataset file or folder that is not what its source expects: corrupt, truncated, another
    version or layout. The message names the file and says what to provide instead.

    A :class:`~uvit.data.shards.DataIntegrityError` (so the CLI reports it in one line, without a
    traceback) and a ``ValueError`` (what the sources raised before this class existed)."""


class ChecksumMismatch(BadSourceError):
    """A file's digest is not the expected one. ``path``, ``algorithm``, ``expected``, ``actual``."""

    def __init__(self, message: str, *, path: Path, algorithm: str, expected: str, actual: str):
        super().__init__(message)
        self.path, self.algorithm, self.expected, self.actual = path, algorithm, expected, actual


class DownloadError(DataIntegrityError):
    """A transfer failed (network, missing object, permissions); the message names the URL and
    where to place the file by hand."""


class DiskFullError(OSError):
    """No space left while writing a download; the partial file is kept for resuming."""


class _Transient(Exception):
    """A failure worth retrying (connection reset, timeout, 5xx, short read)."""


def default_download_dir() -> Path:
    """``$UVIT_DOWNLOAD_DIR``, else ``$XDG_CACHE_HOME/uvit/downloads``, else ``~/.cache/uvit/downloads``.

    Kept outside ``data/<benchmark>/`` on purpose: DVC deletes a stage's outputs before re-running
    it, and a 150 GB archive should survive that.
    """
    if env := os.environ.get("UVIT_DOWNLOAD_DIR"):
        return Path(env)
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "uvit" / "downloads"


def is_remote(url_or_path: str | os.PathLike) -> bool:
    return str(url_or_path).startswith(_REMOTE_SCHEMES)


def open_tar(path: Path, fix: str) -> tarfile.TarFile:
    """``path`` opened as a (possibly compressed) tar; a file that is not one is a
    :class:`BadSourceError` "<path>: cannot open as a tar archive (<reason>)<fix>"."""
    try:
        return tarfile.open(path, "r:*")
    except (tarfile.TarError, OSError) as e:
        raise BadSourceError(f"{path}: cannot open as a tar archive ({e}){fix}") from e


@dataclass(frozen=True)
class SourceInput:
    """Where a dataset source's input comes from, the same for every source.

    ``root``: a local folder or archive, or an ``http(s)://`` / ``s3://`` URL (None: the official
    download, where the source has one). ``download_dir``: where fetched and extracted files go
    (None: :func:`default_download_dir`). ``md5`` / ``sha256``: the digests the archive must have;
    ``md5="auto"`` means the source's official MD5 for its official archive unless a ``sha256`` is
    declared (a copy of your own passes with its ``sha256``), None no MD5.
    """

    root: str | os.PathLike | None = None
    download_dir: str | os.PathLike | None = None
    md5: str | None = AUTO
    sha256: str | None = None

    def downloads(self) -> Path:
        """The folder for fetched files."""
        return Path(self.download_dir) if self.download_dir is not None else default_download_dir()

    def md5_for(self, official: str | None) -> str | None:
        """The MD5 to check, given the source's ``official`` one for this file (None: it has none)."""
        if self.md5 != AUTO:
            return self.md5
        return official if self.sha256 is None else None


# --------------------------------------------------------------------------------------------
# Checksums
# --------------------------------------------------------------------------------------------


def file_digests(path: str | Path, algorithms: tuple[str, ...] = ("sha256",)) -> dict[str, str]:
    """Hex digests of ``path`` for each algorithm, in one pass over the file."""
    hashes = {a: hashlib.new(a) for a in algorithms}
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            for h in hashes.values():
                h.update(block)
    return {a: h.hexdigest() for a, h in hashes.items()}


def _expected(sha256: str | None, md5: str | None) -> dict[str, str]:
    out = {}
    if sha256 is not None:
        out["sha256"] = sha256.strip().lower()
    if md5 is not None:
        out["md5"] = md5.strip().lower()
    return out


def _first_mismatch(path: Path, expected: dict[str, str]) -> tuple[str, str, str] | None:
    if not expected:
        return None
    actual = file_digests(path, tuple(expected))
    for algo, want in expected.items():
        if actual[algo] != want:
            return algo, want, actual[algo]
    return None


def verify_file(path: str | Path, *, sha256: str | None = None, md5: str | None = None) -> Path:
    """Check an existing local file against the given digest(s); raise :class:`ChecksumMismatch`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (or is not a file)")
    bad = _first_mismatch(path, _expected(sha256, md5))
    if bad:
        algo, want, got = bad
        raise ChecksumMismatch(
            f"{path}: {algo} is {got}, expected {want}. The file is corrupt, truncated or a "
            f"different version: delete it (or replace it with a correct copy) and run again to "
            f"download it afresh.",
            path=path,
            algorithm=algo,
            expected=want,
            actual=got,
        )
    return path


# --------------------------------------------------------------------------------------------
# fetch
# --------------------------------------------------------------------------------------------


def fetch(
    url_or_path: str | os.PathLike,
    dest: str | Path,
    *,
    sha256: str | None = None,
    md5: str | None = None,
    chunk: int = 1 << 20,
    progress: bool = True,
) -> Path:
    """Make ``dest`` a verified copy of ``url_or_path`` (``http(s)://``, ``s3://bucket/key``,
    ``file://`` or a local path) and return ``dest``.

    See the module docstring for resuming, verification, atomicity and errors. Without a checksum
    an existing ``dest`` is trusted and returned untouched.
    """
    src = os.fspath(url_or_path)
    dest = Path(dest)
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    expected = _expected(sha256, md5)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _locked(dest):
        if dest.exists():
            bad = _first_mismatch(dest, expected)
            if bad is None:
                return dest
            algo, want, got = bad
            raise ChecksumMismatch(
                f"{dest} already exists but its {algo} is {got}, expected {want} (source {src}). "
                f"It is not the expected file (corrupt, truncated or another version) and is not "
                f"overwritten: delete it, or replace it with a correct copy, and run again.",
                path=dest,
                algorithm=algo,
                expected=want,
                actual=got,
            )
        part = _part_path(dest)
        transfer = _transfer_for(src, dest)
        for attempt in range(RETRIES + 1):
            try:
                transfer(part, chunk, progress)
                break
            except _Transient as e:
                if attempt == RETRIES:
                    raise DownloadError(_failure_message(src, dest, part, expected, e)) from e
                time.sleep(BACKOFF_S * 2**attempt)
        bad = _first_mismatch(part, expected)
        if bad is not None:
            algo, want, got = bad
            part.unlink(missing_ok=True)
            raise ChecksumMismatch(
                f"Downloaded {src} but its {algo} is {got}, expected {want}; nothing was written "
                f"to {dest} and the corrupt partial file was deleted. Run again to download it "
                f"afresh; if it keeps failing the source has changed or is damaged: check the URL, "
                f"or fetch the file another way, verify its {algo} and place it at {dest}.",
                path=dest,
                algorithm=algo,
                expected=want,
                actual=got,
            )
        _fsync(part)
        os.replace(part, dest)
    return dest


def _part_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


@contextlib.contextmanager
def _locked(dest: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking
        yield
        return
    with open(dest.with_name(dest.name + ".lock"), "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _failure_message(src: str, dest: Path, part: Path, expected: dict[str, str], err: BaseException) -> str:
    cause = err.__cause__ or err
    have = part.stat().st_size if part.exists() else 0
    check = ", ".join(f"{a} {v}" for a, v in expected.items())
    msg = (
        f"Could not download {src}: {type(cause).__name__}: {cause}. "
        f"To skip the download, get the file another way (e.g. on a machine with internet "
        f"access) and place it at {dest}"
    )
    msg += f" (it must have {check})." if check else "."
    if have:
        msg += f" The {have} bytes received so far are kept in {part}; running again resumes there."
    return msg


def _transfer_for(src: str, dest: Path) -> Callable[[Path, int, bool], None]:
    if src.startswith(("http://", "https://")):
        return lambda part, chunk, progress: _http_transfer(src, part, chunk, progress)
    if src.startswith("s3://"):
        return lambda part, chunk, progress: _s3_transfer(src, part, chunk, progress)
    path = Path(urllib.parse.urlparse(src).path) if src.startswith("file://") else Path(src)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist (or is not a file), so it cannot be copied to {dest}. "
            f"Check the path, or place the file at {dest} yourself."
        )
    return lambda part, chunk, progress: _local_transfer(path, part, chunk, progress)


def _append(f, data: bytes) -> None:
    """Write one block; the one place download bytes hit the disk (tests make it fail)."""
    f.write(data)


def _write_stream(
    part: Path, offset: int, total: int | None, blocks: Iterator[bytes], desc: str, progress: bool
) -> int:
    """Append ``blocks`` to ``part`` (truncated first when ``offset`` is 0); returns the size.

    ENOSPC becomes :class:`DiskFullError` (partial file kept); any other error propagates.
    """
    from tqdm.auto import tqdm

    written = offset
    try:
        with (
            open(part, "ab" if offset else "wb") as f,
            tqdm(total=total, initial=offset, desc=desc, disable=not progress, leave=False, **_BYTES) as bar,
        ):
            for block in blocks:
                _append(f, block)
                written += len(block)
                bar.update(len(block))
            f.flush()
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise DiskFullError(
                errno.ENOSPC,
                f"No space left on the device while writing {part} ({written} bytes so far"
                + (f" of {total}" if total else "")
                + "). The partial file is kept: free "
                "space on that filesystem (or point the download folder elsewhere, e.g. "
                "UVIT_DOWNLOAD_DIR) and run again to resume.",
            ) from e
        raise
    return written


def _check_complete(src: str, size: int, total: int | None) -> None:
    if total is not None and size != total:
        raise _Transient(f"{src}: got {size} of {total} bytes (connection closed early)")


# -- local ------------------------------------------------------------------------------------


def _local_transfer(path: Path, part: Path, chunk: int, progress: bool) -> None:
    total = path.stat().st_size
    offset = part.stat().st_size if part.exists() else 0
    if offset > total:  # not a prefix of this file
        offset = 0

    def blocks() -> Iterator[bytes]:
        with open(path, "rb") as f:
            f.seek(offset)
            while block := f.read(chunk):
                yield block

    size = _write_stream(part, offset, total, blocks(), path.name, progress)
    _check_complete(str(path), size, total)


# -- HTTP -------------------------------------------------------------------------------------


def _http_transient(e: BaseException) -> bool:
    if isinstance(e, urllib.error.HTTPError):
        return e.code >= 500 or e.code in (408, 429)
    return isinstance(
        e, (urllib.error.URLError, ConnectionError, TimeoutError, socket.timeout, http.client.HTTPException)
    )


def _content_range_total(value: str | None) -> int | None:
    """'bytes 100-199/200' or 'bytes */200' -> 200 (None if absent or '*')."""
    if not value or "/" not in value:
        return None
    total = value.rsplit("/", 1)[1].strip()
    return int(total) if total.isdigit() else None


def _http_transfer(url: str, part: Path, chunk: int, progress: bool) -> None:
    offset = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"User-Agent": "uvit-fetch/1", "Accept-Encoding": "identity"})
    if offset:
        req.add_header("Range", f"bytes={offset}-")
    try:
        resp = urllib.request.urlopen(req, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:
            # Nothing after `offset`: complete already if the server's size is exactly `offset`,
            # otherwise the partial file is not a prefix of this resource, so start over.
            total = _content_range_total(e.headers.get("Content-Range"))
            e.close()
            if total == offset:
                return
            part.unlink(missing_ok=True)
            raise _Transient(f"{url}: the server rejected resuming at byte {offset}; restarting from scratch") from e
        if _http_transient(e):
            raise _Transient(str(e)) from e
        raise DownloadError(
            f"Could not download {url}: HTTP {e.code} {e.reason}. Check the URL; or get the file "
            f"another way and place it at {part.with_suffix('')} to skip the download."
        ) from e
    except Exception as e:  # noqa: BLE001 - classify, re-raise
        if _http_transient(e):
            raise _Transient(str(e)) from e
        raise
    with resp:
        length = resp.headers.get("Content-Length")
        length = int(length) if length and length.isdigit() else None
        if offset and resp.status == 206:
            start = int(resp.headers.get("Content-Range", "bytes 0-").split()[1].split("-")[0])
            if start != offset:
                part.unlink(missing_ok=True)
                raise _Transient(f"{url}: asked for bytes from {offset}, got from {start}")
            total = _content_range_total(resp.headers.get("Content-Range"))
            if total is None and length is not None:
                total = offset + length
        else:  # 200: the whole file (the server ignored or we did not send a Range)
            offset = 0
            total = length

        def blocks() -> Iterator[bytes]:
            while True:
                try:
                    block = resp.read(chunk)
                except Exception as e:  # noqa: BLE001
                    if _http_transient(e):
                        raise _Transient(str(e)) from e
                    raise
                if not block:
                    return
                yield block

        size = _write_stream(part, offset, total, blocks(), Path(urllib.parse.urlparse(url).path).name, progress)
    _check_complete(url, size, total)


# -- S3 ---------------------------------------------------------------------------------------


def _split_s3(url: str) -> tuple[str, str]:
    parsed = urllib.parse.urlparse(url)
    bucket, key = parsed.netloc, parsed.path.lstrip("/")
    if not bucket or not key:
        raise ValueError(f"{url!r} is not an s3://bucket/key URL")
    return bucket, key


def _s3_transfer(url: str, part: Path, chunk: int, progress: bool) -> None:
    import botocore.exceptions as bex

    bucket, key = _split_s3(url)
    # Few tries per call: fetch's own loop resumes from the bytes already on disk.
    client = s3_client(max_attempts=2, connect_timeout=TIMEOUT_S, read_timeout=TIMEOUT_S)
    transient = (
        bex.EndpointConnectionError,
        bex.ConnectionClosedError,
        bex.ReadTimeoutError,
        bex.ConnectTimeoutError,
        bex.IncompleteReadError,
        bex.ResponseStreamingError,
        ConnectionError,
        TimeoutError,
    )
    offset = part.stat().st_size if part.exists() else 0
    try:
        total = int(client.head_object(Bucket=bucket, Key=key)["ContentLength"])
        if offset > total:
            part.unlink()
            offset = 0
        if offset == total:
            return
        kwargs = {"Range": f"bytes={offset}-"} if offset else {}
        body = client.get_object(Bucket=bucket, Key=key, **kwargs)["Body"]

        def blocks() -> Iterator[bytes]:
            try:
                yield from body.iter_chunks(chunk)
            except transient as e:
                raise _Transient(str(e)) from e
            finally:
                body.close()

        size = _write_stream(part, offset, total, blocks(), Path(key).name, progress)
    except transient as e:
        raise _Transient(str(e)) from e
    except bex.ClientError as e:
        code = str(e.response.get("Error", {}).get("Code", ""))
        status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if status >= 500 or code in ("SlowDown", "InternalError", "RequestTimeout"):
            raise _Transient(str(e)) from e
        raise DownloadError(
            f"Could not download {url} (endpoint {s3_endpoint_url() or 'AWS default'}): {code or status}: "
            f"{e}. Check the bucket/key and credentials; or get the file another way and place it "
            f"at {part.with_suffix('')} to skip the download."
        ) from e
    except bex.NoCredentialsError as e:
        raise DownloadError(
            f"Could not download {url}: no AWS credentials found (set AWS_ACCESS_KEY_ID/"
            f"AWS_SECRET_ACCESS_KEY or a profile); or place the file at {part.with_suffix('')} "
            f"to skip the download."
        ) from e
    _check_complete(url, size, total)
