"""ArtifactStore against a loopback moto S3 (127.0.0.1 only) and against a local directory."""

from __future__ import annotations

import hashlib
import random
import uuid
from pathlib import Path

import pytest

from uvit.storage.artifacts import ArtifactIntegrityError, ArtifactStore
from uvit.storage.s3server import free_port, local_s3

MiB = 2**20
BIG = 11 * MiB + 123  # three parts of 5 MiB (the S3 minimum part size)


@pytest.fixture(autouse=True)
def _aws(offline_aws_env):
    """Test credentials only; nothing but the loopback endpoint is contacted."""


@pytest.fixture
def store(s3_endpoint) -> ArtifactStore:
    bucket = f"uvit-{uuid.uuid4().hex[:12]}"
    s = ArtifactStore(f"s3://{bucket}/artifacts", endpoint_url=s3_endpoint,
                      multipart_threshold=5 * MiB, part_size=5 * MiB, max_concurrency=1)
    s.client.create_bucket(Bucket=bucket)
    s.bucket = bucket  # for the tests' own boto3 calls
    return s


@pytest.fixture(scope="module")
def big_bytes() -> bytes:
    return random.Random(0).randbytes(BIG)


@pytest.fixture
def run_dir(tmp_path, big_bytes) -> Path:
    d = tmp_path / "run"
    (d / "sub" / "deep").mkdir(parents=True)
    (d / "metrics.json").write_text('{"fid": 3.4}\n')
    (d / "sub" / "weights.bin").write_bytes(random.Random(1).randbytes(1000))
    (d / "sub" / "deep" / "notes.txt").write_text("nested\n")
    (d / "sub" / "empty").write_bytes(b"")
    (d / "big.bin").write_bytes(big_bytes)
    return d


def tree(root: Path) -> dict[str, bytes]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in files}


def count_calls(monkeypatch, client, method: str, fail_after: int | None = None) -> list:
    """Wrap client.<method>: record each call's PartNumber; raise after `fail_after` calls."""
    calls: list = []
    real = getattr(client, method)

    def wrapper(**kw):
        if fail_after is not None and len(calls) >= fail_after:
            raise ConnectionError("simulated network failure")
        calls.append(kw.get("PartNumber"))
        return real(**kw)

    monkeypatch.setattr(client, method, wrapper)
    return calls


def test_free_port_and_server_stops():
    port = free_port()
    assert 1024 <= port < 65536
    with local_s3(port) as url:
        assert url == f"http://127.0.0.1:{port}"
    import socket

    with socket.socket() as s:  # stopped: the port can be bound again
        s.bind(("127.0.0.1", port))


def test_s3_round_trip(store, run_dir, tmp_path, monkeypatch):
    ref = store.upload_run(run_dir, "digits")
    assert len(ref.run_id) == 16 and ref.benchmark == "digits"
    assert ref.uri == f"s3://{store.bucket}/artifacts/digits/{ref.run_id}"
    assert store.list_runs("digits") == [ref.run_id]
    assert store.list_runs("cifar10") == []

    key = f"artifacts/digits/{ref.run_id}/big.bin"
    head = store.client.head_object(Bucket=store.bucket, Key=key)
    assert head["ETag"].strip('"').endswith("-3")  # went up as a 3-part multipart upload
    big_sha = hashlib.sha256((run_dir / "big.bin").read_bytes()).hexdigest()
    assert head["Metadata"]["sha256"] == big_sha

    manifest = store.manifest("digits", ref.run_id)
    assert [f["path"] for f in manifest["files"]] == sorted(tree(run_dir))
    assert manifest["total_size"] == sum(len(b) for b in tree(run_dir).values())

    out = store.download_run("digits", ref.run_id, tmp_path / "dest")
    assert tree(out) == tree(run_dir)
    assert not list(out.rglob("*.part"))

    # Content addressed: the same content again is the same run, and nothing is re-uploaded.
    puts = count_calls(monkeypatch, store.client, "put_object")
    assert store.upload_run(run_dir, "digits") == ref
    assert puts == []
    named = store.upload_run(run_dir, "digits", run_id="v1")
    assert store.list_runs("digits") == [ref.run_id, "v1"]  # oldest first (ties: by name)
    (run_dir / "metrics.json").write_text('{"fid": 9.9}\n')
    with pytest.raises(FileExistsError):
        store.upload_run(run_dir, "digits", run_id=named.run_id)


def test_corrupted_object_is_refused(store, run_dir, tmp_path):
    ref = store.upload_run(run_dir, "digits", run_id="r1")
    key = "artifacts/digits/r1/sub/weights.bin"
    store.client.put_object(Bucket=store.bucket, Key=key, Body=b"tampered")  # same key, other bytes
    expected = hashlib.sha256((run_dir / "sub" / "weights.bin").read_bytes()).hexdigest()
    actual = hashlib.sha256(b"tampered").hexdigest()

    dest = tmp_path / "dest"
    with pytest.raises(ArtifactIntegrityError) as err:
        store.download_run("digits", ref.run_id, dest)
    msg = str(err.value)
    assert key in msg and expected in msg and actual in msg
    assert (err.value.expected, err.value.actual) == (expected, actual)
    assert not (dest / "sub" / "weights.bin").exists()
    assert not [p for p in dest.rglob("*") if p.name.startswith(".")]  # no temp files left


def test_interrupted_multipart_upload_resumes(store, monkeypatch, tmp_path, big_bytes):
    local = tmp_path / "big.bin"
    local.write_bytes(big_bytes)
    key = "checkpoints/big.bin"

    first = count_calls(monkeypatch, store.client, "upload_part", fail_after=1)
    with pytest.raises(ConnectionError):
        store.upload_file(local, key)
    assert first == [1]
    uploads = store.client.list_multipart_uploads(Bucket=store.bucket)["Uploads"]
    assert [u["Key"] for u in uploads] == [f"artifacts/{key}"]

    monkeypatch.undo()
    second = count_calls(monkeypatch, store.client, "upload_part")
    store.upload_file(local, key)
    assert second == [2, 3]  # only the missing parts
    body = store.client.get_object(Bucket=store.bucket, Key=f"artifacts/{key}")["Body"].read()
    assert body == big_bytes
    assert "Uploads" not in store.client.list_multipart_uploads(Bucket=store.bucket)


def test_resume_reuploads_parts_that_do_not_match(store, monkeypatch, tmp_path, big_bytes):
    """An upload started elsewhere: part 1 right, part 2 wrong bytes -> parts 2 and 3 are sent."""
    local = tmp_path / "big.bin"
    local.write_bytes(big_bytes)
    full = "artifacts/other/big.bin"
    upload_id = store.client.create_multipart_upload(
        Bucket=store.bucket, Key=full, Metadata={"sha256": hashlib.sha256(big_bytes).hexdigest()}
    )["UploadId"]
    part = 5 * MiB
    store.client.upload_part(Bucket=store.bucket, Key=full, UploadId=upload_id, PartNumber=1,
                             Body=big_bytes[:part])
    store.client.upload_part(Bucket=store.bucket, Key=full, UploadId=upload_id, PartNumber=2,
                             Body=bytes(part))

    calls = count_calls(monkeypatch, store.client, "upload_part")
    store.upload_file(local, "other/big.bin")
    assert calls == [2, 3]
    assert store.client.get_object(Bucket=store.bucket, Key=full)["Body"].read() == big_bytes


def test_small_file_single_put_and_bad_part_size(store, tmp_path, s3_endpoint):
    local = tmp_path / "small.txt"
    local.write_bytes(b"hello")
    store.upload_file(local, "misc/small.txt")
    head = store.client.head_object(Bucket=store.bucket, Key="artifacts/misc/small.txt")
    assert head["ETag"].strip('"') == hashlib.md5(b"hello").hexdigest()
    assert head["Metadata"]["sha256"] == hashlib.sha256(b"hello").hexdigest()
    with pytest.raises(ValueError):
        ArtifactStore("s3://bucket/x", endpoint_url=s3_endpoint, part_size=MiB)


def test_run_without_manifest_is_not_listed(store, run_dir, tmp_path):
    ref = store.upload_run(run_dir, "digits", run_id="done")
    store.client.put_object(Bucket=store.bucket, Key="artifacts/digits/partial/big.bin", Body=b"x")
    assert store.list_runs("digits") == [ref.run_id]
    with pytest.raises(FileNotFoundError):
        store.download_run("digits", "partial", tmp_path / "dest")


def test_endpoint_from_environment_and_parallel_parts(s3_endpoint, monkeypatch, run_dir, tmp_path):
    monkeypatch.setenv("UVIT_S3_ENDPOINT_URL", s3_endpoint)
    s = ArtifactStore("s3://uvit-env-bucket", part_size=5 * MiB)  # 4 parts at a time by default
    s.client.create_bucket(Bucket="uvit-env-bucket")
    ref = s.upload_run(run_dir, "celeba64")
    assert ref.uri == f"s3://uvit-env-bucket/celeba64/{ref.run_id}"
    assert s.list_runs("celeba64") == [ref.run_id]
    assert tree(s.download_run("celeba64", ref.run_id, tmp_path / "dest")) == tree(run_dir)


def test_unsafe_paths_are_refused(tmp_path, run_dir):
    s = ArtifactStore(str(tmp_path / "store"))
    with pytest.raises(ValueError):
        s.upload_file(run_dir / "metrics.json", "../outside.json")
    with pytest.raises(ValueError):
        s.upload_run(run_dir, "../digits")
    ref = s.upload_run(run_dir, "digits", run_id="r1")
    manifest = tmp_path / "store" / "digits" / "r1" / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"metrics.json"', '"../../escape.json"'))
    with pytest.raises(ArtifactIntegrityError):
        s.download_run("digits", ref.run_id, tmp_path / "dest" / "inner")
    assert not (tmp_path / "dest" / "escape.json").exists()


@pytest.mark.parametrize("as_uri", [False, True])
def test_local_directory_backend(run_dir, tmp_path, as_uri):
    root = tmp_path / "store"
    s = ArtifactStore(root.as_uri() if as_uri else str(root))
    assert s.client is None and not s.is_s3
    ref = s.upload_run(run_dir, "digits")
    assert ref.uri == (root / "digits" / ref.run_id).resolve().as_uri()
    assert s.list_runs("digits") == [ref.run_id]
    (root / "digits" / "partial").mkdir()
    (root / "digits" / "partial" / "x").write_bytes(b"x")
    assert s.list_runs("digits") == [ref.run_id]

    assert tree(s.download_run("digits", ref.run_id, tmp_path / "dest")) == tree(run_dir)

    s.upload_file(run_dir / "metrics.json", "misc/metrics.json")
    assert (root / "misc" / "metrics.json").read_bytes() == (run_dir / "metrics.json").read_bytes()

    (root / "digits" / ref.run_id / "sub" / "weights.bin").write_bytes(b"tampered")
    dest = tmp_path / "dest2"
    with pytest.raises(ArtifactIntegrityError):
        s.download_run("digits", ref.run_id, dest)
    assert not (dest / "sub" / "weights.bin").exists()
    assert not [p for p in dest.rglob("*") if p.name.startswith(".")]
