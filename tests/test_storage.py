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
    s = ArtifactStore(
        f"s3://{bucket}/artifacts",
        endpoint_url=s3_endpoint,
        multipart_threshold=5 * MiB,
        part_size=5 * MiB,
        max_concurrency=1,
    )
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


def count_calls(monkeypatch, client, method: str, fail_after: int | None = None, record: str = "PartNumber") -> list:
    """Wrap client.<method>: record each call's `record` argument (Key, Range, ...); raise after
    `fail_after` calls."""
    calls: list = []
    real = getattr(client, method)

    def wrapper(**kw):
        if fail_after is not None and len(calls) >= fail_after:
            raise ConnectionError("simulated network failure")
        calls.append(kw.get(record))
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


def test_interrupted_multipart_upload_rerun_completes(store, monkeypatch, tmp_path, big_bytes):
    """A multipart upload cut off after its first part leaves no object and no open upload
    behind; the next call uploads the file whole and it verifies."""
    local = tmp_path / "big.bin"
    local.write_bytes(big_bytes)
    key = "checkpoints/big.bin"

    first = count_calls(monkeypatch, store.client, "upload_part", fail_after=1)
    with pytest.raises(ConnectionError):
        store.upload_file(local, key)
    assert first == [1]
    assert "Uploads" not in store.client.list_multipart_uploads(Bucket=store.bucket)  # aborted
    assert "Contents" not in store.client.list_objects_v2(Bucket=store.bucket, Prefix=f"artifacts/{key}")

    monkeypatch.undo()
    second = count_calls(monkeypatch, store.client, "upload_part")
    store.upload_file(local, key)
    assert sorted(second) == [1, 2, 3]
    head = store.client.head_object(Bucket=store.bucket, Key=f"artifacts/{key}")
    assert head["Metadata"]["sha256"] == hashlib.sha256(big_bytes).hexdigest()
    body = store.client.get_object(Bucket=store.bucket, Key=f"artifacts/{key}")["Body"].read()
    assert body == big_bytes
    assert "Uploads" not in store.client.list_multipart_uploads(Bucket=store.bucket)


def test_interrupted_publish_rerun_sends_only_the_missing_files(store, monkeypatch, run_dir, tmp_path):
    """upload_run dies after some files: the run stays invisible; the re-run skips the files the
    store already holds (size and metadata sha256), sends the rest, then the manifest."""
    # Sorted order: big.bin (multipart), metrics.json, sub/deep/notes.txt, then the failure.
    first = count_calls(monkeypatch, store.client, "put_object", fail_after=2, record="Key")
    with pytest.raises(ConnectionError):
        store.upload_run(run_dir, "digits", run_id="r1")
    assert [k.rsplit("/r1/", 1)[1] for k in first] == ["metrics.json", "sub/deep/notes.txt"]
    assert store.list_runs("digits") == []
    with pytest.raises(FileNotFoundError):
        store.download_run("digits", "r1", tmp_path / "early")

    monkeypatch.undo()
    puts = count_calls(monkeypatch, store.client, "put_object", record="Key")
    parts = count_calls(monkeypatch, store.client, "upload_part")
    ref = store.upload_run(run_dir, "digits", run_id="r1")
    assert [k.rsplit("/r1/", 1)[1] for k in puts] == ["sub/empty", "sub/weights.bin", "run_manifest.json"]
    assert parts == []  # big.bin was already complete
    assert store.list_runs("digits") == ["r1"]
    assert tree(store.download_run("digits", ref.run_id, tmp_path / "dest")) == tree(run_dir)


def test_stale_object_under_the_same_key_is_replaced(store, run_dir, tmp_path, big_bytes):
    """An object left by another tool (right size, no sha256 metadata; or a bit flipped) is
    not taken for the file: it is uploaded again and the run verifies."""
    base = "artifacts/digits/r1"
    store.client.put_object(Bucket=store.bucket, Key=f"{base}/big.bin", Body=bytes(len(big_bytes)))
    weights = (run_dir / "sub" / "weights.bin").read_bytes()
    store.client.put_object(
        Bucket=store.bucket,
        Key=f"{base}/sub/weights.bin",
        Body=weights[:-1] + b"\0",
        Metadata={"sha256": hashlib.sha256(b"other").hexdigest()},
    )
    store.upload_run(run_dir, "digits", run_id="r1")
    head = store.client.head_object(Bucket=store.bucket, Key=f"{base}/big.bin")
    assert head["Metadata"]["sha256"] == hashlib.sha256(big_bytes).hexdigest()
    assert tree(store.download_run("digits", "r1", tmp_path / "dest")) == tree(run_dir)


def test_large_file_goes_up_in_parts_and_comes_down_in_parallel_ranges(s3_endpoint, monkeypatch, tmp_path):
    """~12 MiB with 5 MiB parts and 4 threads: a 3-part multipart upload, three ranged GETs, the
    sha256 intact at both ends."""
    bucket = f"uvit-{uuid.uuid4().hex[:12]}"
    s = ArtifactStore(
        f"s3://{bucket}", endpoint_url=s3_endpoint, multipart_threshold=5 * MiB, part_size=5 * MiB, max_concurrency=4
    )
    s.client.create_bucket(Bucket=bucket)
    data = random.Random(2).randbytes(12 * MiB + 7)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "ckpt.bin").write_bytes(data)
    parts = count_calls(monkeypatch, s.client, "upload_part")
    ref = s.upload_run(tmp_path / "run", "imagenet64")
    assert sorted(parts) == [1, 2, 3]
    head = s.client.head_object(Bucket=bucket, Key=f"imagenet64/{ref.run_id}/ckpt.bin")
    assert head["ETag"].strip('"').endswith("-3") and head["ContentLength"] == len(data)
    assert head["Metadata"]["sha256"] == hashlib.sha256(data).hexdigest()

    ranges = count_calls(monkeypatch, s.client, "get_object", record="Range")
    out = s.download_run("imagenet64", ref.run_id, tmp_path / "dest")
    got = (out / "ckpt.bin").read_bytes()
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(data).hexdigest()
    starts = sorted(int(r.removeprefix("bytes=").split("-")[0]) for r in ranges if r is not None)
    assert starts == [0, 5 * MiB, 10 * MiB]  # the manifest came as one plain GET
    assert sorted(p.name for p in out.iterdir()) == ["ckpt.bin"]


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


@pytest.mark.parametrize("on_s3", [False, True])
def test_run_published_as_manifest_json_is_still_read(on_s3, request, run_dir, tmp_path):
    """A run published before its manifest was renamed run_manifest.json (it was manifest.json):
    listed, read and fetched; publishing the same content again is a no-op (no second manifest).
    Neither name may be a file of a run."""
    s = request.getfixturevalue("store") if on_s3 else ArtifactStore(str(tmp_path / "store"))
    ref = s.upload_run(run_dir, "digits")
    new, old = (f"digits/{ref.run_id}/{name}" for name in ("run_manifest.json", "manifest.json"))
    if on_s3:
        source = {"Bucket": s.bucket, "Key": f"artifacts/{new}"}
        s.client.copy_object(Bucket=s.bucket, Key=f"artifacts/{old}", CopySource=source)
        s.client.delete_object(Bucket=s.bucket, Key=f"artifacts/{new}")
        stored = {o["Key"] for o in s.client.list_objects_v2(Bucket=s.bucket)["Contents"]}
        assert f"artifacts/{old}" in stored and f"artifacts/{new}" not in stored
    else:
        (tmp_path / "store" / new).rename(tmp_path / "store" / old)

    assert s.list_runs("digits") == [ref.run_id] and s.latest_run("digits") == ref.run_id
    assert s.manifest("digits", ref.run_id)["run_id"] == ref.run_id
    assert tree(s.download_run("digits", ref.run_id, tmp_path / "dest")) == tree(run_dir)
    assert s.upload_run(run_dir, "digits") == ref
    if on_s3:
        stored = {o["Key"] for o in s.client.list_objects_v2(Bucket=s.bucket)["Contents"]}
        assert f"artifacts/{new}" not in stored
    else:
        assert not (tmp_path / "store" / new).exists()
    for name in ("manifest.json", "run_manifest.json"):
        with pytest.raises(ValueError, match="reserved"):
            s.upload_files({name: run_dir / "metrics.json"}, "digits")


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
    manifest = tmp_path / "store" / "digits" / "r1" / "run_manifest.json"
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


def test_one_endpoint_rule(monkeypatch):
    """endpoint_url, else $UVIT_S3_ENDPOINT_URL, else $AWS_ENDPOINT_URL_S3, else $AWS_ENDPOINT_URL,
    else AWS (None); empty variables count as unset."""
    from uvit.storage.s3 import s3_endpoint_url

    assert s3_endpoint_url() is None
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:3")
    assert s3_endpoint_url() == "http://127.0.0.1:3"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:2")
    assert s3_endpoint_url() == "http://127.0.0.1:2"
    monkeypatch.setenv("UVIT_S3_ENDPOINT_URL", "")
    assert s3_endpoint_url() == "http://127.0.0.1:2"
    monkeypatch.setenv("UVIT_S3_ENDPOINT_URL", "http://127.0.0.1:1")
    assert s3_endpoint_url() == "http://127.0.0.1:1"
    assert s3_endpoint_url("http://127.0.0.1:9000") == "http://127.0.0.1:9000"
    store = ArtifactStore("s3://uvit-rule/x")
    assert store.client.meta.endpoint_url == "http://127.0.0.1:1"
    assert (
        ArtifactStore("s3://uvit-rule/x", endpoint_url="http://127.0.0.1:9000").client.meta.endpoint_url
        == "http://127.0.0.1:9000"
    )


def test_training_storage_follows_the_same_endpoint_rule(s3_endpoint, monkeypatch):
    """Ray Train's pyarrow S3 filesystem honours $UVIT_S3_ENDPOINT_URL too (it once read only the
    AWS_* variables): a file written through it is there for boto3 at the same endpoint."""
    from uvit.storage.s3 import s3_client
    from uvit.train.checkpoint_storage import resolve_storage

    bucket = f"uvit-{uuid.uuid4().hex[:12]}"
    client = s3_client(s3_endpoint)
    client.create_bucket(Bucket=bucket)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # loses to the uvit variable
    monkeypatch.setenv("UVIT_S3_ENDPOINT_URL", s3_endpoint)
    storage = resolve_storage(f"s3://{bucket}/ray", None)
    with storage.fs.open_output_stream(f"{storage.path}/state.json") as f:
        f.write(b'{"step": 3}')
    assert client.get_object(Bucket=bucket, Key="ray/state.json")["Body"].read() == b'{"step": 3}'
    with pytest.raises(ValueError, match="http"):
        resolve_storage(f"s3://{bucket}/ray", "127.0.0.1:9000")
