"""uvit.data.download.fetch against loopback servers only: an http.server with Range support and a
moto S3 server on 127.0.0.1."""

from __future__ import annotations

import errno
import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from uvit.data import download
from uvit.data.download import ChecksumMismatch, DiskFullError, DownloadError, fetch, verify_file

DATA = np.random.default_rng(0).integers(0, 256, size=100_000, dtype=np.uint8).tobytes()
SHA = hashlib.sha256(DATA).hexdigest()
MD5 = hashlib.md5(DATA).hexdigest()


class _Server:
    """Serves ``files`` (path -> bytes). Records every request's Range header and the number of
    body bytes sent. Behaviour switches: ``ignore_range`` (always 200 + whole file),
    ``drop_after`` (first GET sends only that many body bytes, then closes the connection)."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.requests: list[dict] = []
        self.ignore_range = False
        self.drop_after: int | None = None
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):  # noqa: N802
                rng = self.headers.get("Range")
                record = {"path": self.path, "range": rng, "sent": 0}
                server.requests.append(record)
                body = server.files.get(self.path)
                if body is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                start, status = 0, 200
                if rng and not server.ignore_range:
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    status = 206
                payload = body[start:]
                self.send_response(status)
                self.send_header("Content-Length", str(len(payload)))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.end_headers()
                if server.drop_after is not None:
                    payload = payload[: server.drop_after]
                    server.drop_after = None
                    self.close_connection = True
                self.wfile.write(payload)
                record["sent"] = len(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = _Server()
    s.files["/data.bin"] = DATA
    yield s
    s.stop()


@pytest.fixture(autouse=True)
def _fast_retries(monkeypatch):
    monkeypatch.setattr(download, "BACKOFF_S", 0.0)
    monkeypatch.setattr(download, "TIMEOUT_S", 5.0)


def test_http_download_verifies_and_leaves_no_part(server, tmp_path):
    dest = tmp_path / "sub" / "data.bin"
    assert fetch(f"{server.url}/data.bin", dest, sha256=SHA, md5=MD5, progress=False) == dest
    assert dest.read_bytes() == DATA
    assert not (tmp_path / "sub" / "data.bin.part").exists()
    assert [r["range"] for r in server.requests] == [None]


def test_http_resumes_partial_file_with_range(server, tmp_path):
    dest = tmp_path / "data.bin"
    part = tmp_path / "data.bin.part"
    part.write_bytes(DATA[:30_000])
    fetch(f"{server.url}/data.bin", dest, sha256=SHA, chunk=4096, progress=False)
    assert dest.read_bytes() == DATA and not part.exists()
    assert len(server.requests) == 1
    assert server.requests[0]["range"] == "bytes=30000-"
    assert server.requests[0]["sent"] == len(DATA) - 30_000  # only the rest was transferred


def test_http_resume_appends_to_what_is_there(server, tmp_path):
    # Proof that the old bytes are kept, not re-fetched: a garbage prefix survives (no checksum).
    dest = tmp_path / "data.bin"
    (tmp_path / "data.bin.part").write_bytes(b"X" * 10)
    fetch(f"{server.url}/data.bin", dest, progress=False)
    assert dest.read_bytes() == b"X" * 10 + DATA[10:]


def test_http_dropped_connection_is_retried_from_where_it_stopped(server, tmp_path):
    server.drop_after = 25_000
    dest = tmp_path / "data.bin"
    fetch(f"{server.url}/data.bin", dest, sha256=SHA, chunk=1000, progress=False)
    assert dest.read_bytes() == DATA
    assert [r["range"] for r in server.requests] == [None, "bytes=25000-"]
    assert sum(r["sent"] for r in server.requests) == len(DATA)


def test_http_server_ignoring_range_restarts_cleanly(server, tmp_path):
    server.ignore_range = True
    (tmp_path / "data.bin.part").write_bytes(b"junk" * 100)
    dest = fetch(f"{server.url}/data.bin", tmp_path / "data.bin", sha256=SHA, progress=False)
    assert dest.read_bytes() == DATA


def test_http_complete_part_is_finished_without_transfer(server, tmp_path):
    (tmp_path / "data.bin.part").write_bytes(DATA)
    dest = fetch(f"{server.url}/data.bin", tmp_path / "data.bin", sha256=SHA, progress=False)
    assert dest.read_bytes() == DATA
    assert server.requests[0]["sent"] == 0


def test_checksum_mismatch_keeps_no_file(server, tmp_path):
    dest = tmp_path / "data.bin"
    wrong = "0" * 64
    with pytest.raises(ChecksumMismatch) as ei:
        fetch(f"{server.url}/data.bin", dest, sha256=wrong, progress=False)
    msg = str(ei.value)
    assert wrong in msg and SHA in msg and str(dest) in msg and "data.bin" in msg
    assert "run again" in msg.lower()
    assert (ei.value.expected, ei.value.actual, ei.value.algorithm) == (wrong, SHA, "sha256")
    assert not dest.exists() and not (tmp_path / "data.bin.part").exists()
    from uvit.cli import _user_errors

    assert isinstance(ei.value, _user_errors()) and isinstance(ei.value, ValueError)


def test_existing_verified_dest_is_not_downloaded(server, tmp_path):
    dest = tmp_path / "data.bin"
    dest.write_bytes(DATA)
    fetch(f"{server.url}/data.bin", dest, md5=MD5, progress=False)
    assert server.requests == []


def test_existing_wrong_dest_is_not_overwritten(server, tmp_path):
    dest = tmp_path / "data.bin"
    dest.write_bytes(b"not it")
    with pytest.raises(ChecksumMismatch, match="not overwritten"):
        fetch(f"{server.url}/data.bin", dest, sha256=SHA, progress=False)
    assert dest.read_bytes() == b"not it" and server.requests == []


def test_http_404_names_url_and_manual_placement(server, tmp_path):
    dest = tmp_path / "missing.bin"
    with pytest.raises(DownloadError) as ei:
        fetch(f"{server.url}/missing.bin", dest, progress=False)
    assert f"{server.url}/missing.bin" in str(ei.value) and "404" in str(ei.value)
    assert str(dest) in str(ei.value)
    assert len(server.requests) == 1  # a 404 is not retried
    from uvit.cli import _user_errors

    assert isinstance(ei.value, _user_errors())  # the CLI reports it in one line, without a traceback


def test_unreachable_host_is_retried_then_explained(tmp_path, monkeypatch):
    import socket

    monkeypatch.setattr(download, "RETRIES", 1)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    url = f"http://127.0.0.1:{port}/cifar.tar.gz"
    dest = tmp_path / "cifar.tar.gz"
    with pytest.raises(DownloadError) as ei:
        fetch(url, dest, md5=MD5, progress=False)
    msg = str(ei.value)
    assert url in msg and f"place it at {dest}" in msg and MD5 in msg
    assert not dest.exists()


def test_full_disk_keeps_partial_file_for_resume(server, tmp_path, monkeypatch):
    calls = {"n": 0}
    real_append = download._append

    def failing_append(f, data):
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_append(f, data)

    monkeypatch.setattr(download, "_append", failing_append)
    dest = tmp_path / "data.bin"
    part = tmp_path / "data.bin.part"
    with pytest.raises(DiskFullError) as ei:
        fetch(f"{server.url}/data.bin", dest, sha256=SHA, chunk=1000, progress=False)
    assert ei.value.errno == errno.ENOSPC
    assert "No space left" in str(ei.value) and str(part) in str(ei.value)
    assert "resume" in str(ei.value)
    assert part.stat().st_size == 3000 and not dest.exists()
    assert len(server.requests) == 1  # not retried: retrying cannot help a full disk

    monkeypatch.setattr(download, "_append", real_append)
    fetch(f"{server.url}/data.bin", dest, sha256=SHA, progress=False)
    assert dest.read_bytes() == DATA
    assert server.requests[-1]["range"] == "bytes=3000-"


def test_local_path_and_file_url(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(DATA)
    a = fetch(str(src), tmp_path / "out" / "a.bin", sha256=SHA, progress=False)
    b = fetch(src.as_uri(), tmp_path / "out" / "b.bin", md5=MD5, progress=False)
    assert a.read_bytes() == DATA and b.read_bytes() == DATA
    (tmp_path / "out" / "c.bin.part").write_bytes(DATA[:5])
    c = fetch(src, tmp_path / "out" / "c.bin", sha256=SHA, progress=False)
    assert c.read_bytes() == DATA
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fetch(tmp_path / "nope.bin", tmp_path / "out" / "d.bin", progress=False)


def test_verify_file(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(DATA)
    assert verify_file(p, sha256=SHA, md5=MD5) == p
    with pytest.raises(ChecksumMismatch, match="delete it"):
        verify_file(p, md5="f" * 32)


# -- S3 (moto on loopback) ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def moto_endpoint():
    from moto.server import ThreadedMotoServer

    srv = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    host, port = srv.get_host_and_port()
    yield f"http://{host}:{port}"
    srv.stop()


@pytest.fixture
def s3(moto_endpoint, monkeypatch):
    import boto3

    for k, v in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "UVIT_S3_ENDPOINT_URL": moto_endpoint,
    }.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    client = boto3.client("s3", endpoint_url=moto_endpoint)
    client.create_bucket(Bucket="uvit-data")
    client.put_object(Bucket="uvit-data", Key="raw/data.bin", Body=DATA)
    yield client


def test_s3_download_and_ranged_resume(s3, tmp_path):
    dest = fetch("s3://uvit-data/raw/data.bin", tmp_path / "a.bin", sha256=SHA, progress=False)
    assert dest.read_bytes() == DATA
    # resume: the kept prefix (marked garbage) is extended with a ranged GET of the rest
    (tmp_path / "b.bin.part").write_bytes(b"Y" * 40_000)
    b = fetch("s3://uvit-data/raw/data.bin", tmp_path / "b.bin", chunk=8192, progress=False)
    assert b.read_bytes() == b"Y" * 40_000 + DATA[40_000:]


def test_s3_missing_key_is_a_clear_error(s3, tmp_path):
    with pytest.raises(DownloadError) as ei:
        fetch("s3://uvit-data/raw/nope.bin", tmp_path / "nope.bin", progress=False)
    assert "s3://uvit-data/raw/nope.bin" in str(ei.value)
    assert str(tmp_path / "nope.bin") in str(ei.value)
