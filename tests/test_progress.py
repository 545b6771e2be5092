"""Progress bars (tqdm on stderr) of the long waits: the reference-statistics pass, validate,
publish and fetch. progress=True draws a bar that ends at the right total, progress=False draws
nothing (and None, the default, draws only on a terminal, which capsys' stderr is not)."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import numpy as np
import pytest
from tqdm import tqdm

from uvit.config import load_benchmark, load_params
from uvit.data.shards import ShardedArrays, write_split
from uvit.paths import BenchmarkPaths

ROOT = Path(__file__).resolve().parents[1]


def final_counts(err: str, desc: str) -> list[str]:
    """The last "n/total" a bar named `desc` printed (tqdm redraws it with \\r), one per bar."""
    found = []
    for line in err.split("\n"):  # not splitlines(): it also splits at \r
        frames = [f for f in line.split("\r") if f.startswith(desc)]
        if frames:
            m = re.search(r"\| *([0-9.]+[kMG]?/[0-9.]+[kMG]?) ", frames[-1])
            found.append(m.group(1) if m else frames[-1])
    return found


@pytest.fixture
def bar_updates(monkeypatch) -> list[int]:
    """Every tqdm.update(n) amount, in order (the bars draw from these)."""
    updates: list[int] = []
    original = tqdm.update

    def spy(self, n=1):
        updates.append(n)
        return original(self, n)

    monkeypatch.setattr(tqdm, "update", spy)
    return updates


def _split(root: Path, n: int, shard_size: int, shape=(1, 4, 4)) -> Path:
    rng = np.random.default_rng(0)
    write_split(
        root,
        {"images": rng.integers(0, 256, (n, *shape), dtype=np.uint8), "labels": np.arange(n, dtype=np.int64) % 2},
        name="t",
        split="train",
        shard_size=shard_size,
    )
    return root


def test_reference_statistics_bar_counts_images(tmp_path, capsys):
    from uvit.evaluate.reference import stream_statistics

    split = _split(tmp_path / "s", 23, shard_size=10)

    def flat(b):
        return b.reshape(len(b), -1).astype(np.float32)

    stream_statistics(split, flat, batch_size=4, progress=False)
    assert capsys.readouterr().err == ""
    stream_statistics(split, flat, batch_size=4, progress=True)
    assert final_counts(capsys.readouterr().err, "reference statistics") == ["23/23"]
    stream_statistics(split, flat, batch_size=4)  # default: only on a terminal
    assert capsys.readouterr().err == ""


def test_validate_bars_count_shards_and_suites(tmp_path, capsys):
    from uvit.data.validate import ImageSplitExpectations, image_split_frames, validate_image_split

    split = _split(tmp_path / "train", 12, shard_size=5)  # 3 shards
    rows, _ = image_split_frames(ShardedArrays(split), 2, progress=False)
    assert len(rows) == 12 and capsys.readouterr().err == ""
    report = validate_image_split(split, ImageSplitExpectations(num_classes=2), progress=True)
    err = capsys.readouterr().err
    assert report.success
    assert final_counts(err, "validate train: shards") == ["3/3"]
    assert final_counts(err, "validate train: suites") == ["2/2"]  # rows and classes


def _project(root: Path) -> None:
    """The files `collect` needs of a finished digits run (bytes, not real weights)."""
    rnd = np.random.default_rng(1)
    files = {
        "runs/digits/train/model/model.safetensors": 3000,
        "runs/digits/train/ema/model.safetensors": 3000,
        "runs/digits/samples/samples.npz": 1500,
    }
    for rel, size in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(rnd.bytes(size))
    for rel, text in {
        "runs/digits/train/summary.json": json.dumps({"steps": 20}),
        "runs/digits/sample-summary/summary.json": "{}",
        "runs/digits/score/metrics.json": "{}",
    }.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_publish_and_fetch_bars_count_the_runs_bytes(tmp_path, capsys):
    from uvit.stages.publish import run_fetch, run_publish

    params = copy.deepcopy(load_params(ROOT / "params.yaml"))
    params["digits"]["artifacts"] = {"url": str(tmp_path / "store"), "ray_checkpoint": False}
    cfg = load_benchmark("digits", params)
    _project(tmp_path / "p")
    paths = BenchmarkPaths("digits", tmp_path / "p")

    result = run_publish(cfg, paths, progress=True)
    total = tqdm.format_sizeof(result["total_size"], divisor=1024)
    assert result["total_size"] > 7500  # the three binary files and the JSON files
    assert final_counts(capsys.readouterr().err, f"publish digits/{result['run_id']}") == [f"{total}/{total}"]

    fetched = run_fetch(cfg, paths, dest=tmp_path / "f1", progress=True)
    assert final_counts(capsys.readouterr().err, f"fetch digits/{result['run_id']}") == [f"{total}/{total}"]
    assert fetched["total_size"] == result["total_size"]
    # Again into the same folder: every file is already there and counts at once.
    run_fetch(cfg, paths, dest=tmp_path / "f1", progress=True)
    assert final_counts(capsys.readouterr().err, "fetch digits/") == [f"{total}/{total}"]

    run_fetch(cfg, paths, dest=tmp_path / "f2", progress=False)
    run_publish(cfg, paths, progress=False)  # the same content: a no-op
    assert capsys.readouterr().err == ""
    assert sorted(p.name for p in (tmp_path / "f2").rglob("*.safetensors")) == ["model.safetensors"] * 2


@pytest.mark.parametrize("size", [700, 3 * 2**20 + 5])
def test_store_bars_follow_bytes_within_a_file(tmp_path, capsys, bar_updates, size):
    """One file: the bar ends at its size (700 B exactly; 3 MiB + 5 B arrives in several 1 MiB
    chunks and is shown scaled)."""
    from uvit.storage.artifacts import ArtifactStore

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "blob.bin").write_bytes(b"x" * size)
    store = ArtifactStore(str(tmp_path / "store"))
    ref = store.upload_run(tmp_path / "run", "digits", progress=True)
    shown = tqdm.format_sizeof(size, divisor=1024)
    assert final_counts(capsys.readouterr().err, f"publish digits/{ref.run_id}") == [f"{shown}/{shown}"]
    assert sum(bar_updates) == size and len(bar_updates) == -(-size // 2**20)  # one update per 1 MiB chunk
    store.download_run("digits", ref.run_id, tmp_path / "dest", progress=False)
    assert capsys.readouterr().err == ""
    assert (tmp_path / "dest" / "blob.bin").read_bytes() == b"x" * size


def test_s3_bars_count_boto3s_transfer_callbacks(s3_endpoint, offline_aws_env, tmp_path, capsys, bar_updates):
    """On S3 the bars are fed by boto3's transfer Callback: a 6 MiB file in two 5 MiB-threshold
    parts up and down, plus a small one; both bars end at the run's total."""
    import uuid

    from uvit.storage.artifacts import ArtifactStore

    bucket = f"uvit-{uuid.uuid4().hex[:12]}"
    store = ArtifactStore(
        f"s3://{bucket}/a",
        endpoint_url=s3_endpoint,
        multipart_threshold=5 * 2**20,
        part_size=5 * 2**20,
        max_concurrency=2,
    )
    store.client.create_bucket(Bucket=bucket)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "big.bin").write_bytes(np.random.default_rng(2).bytes(6 * 2**20))
    (tmp_path / "run" / "small.json").write_text("{}\n")
    ref = store.upload_run(tmp_path / "run", "digits", progress=True)
    assert sum(bar_updates) == 6 * 2**20 + 3 and len(bar_updates) > 2  # byte counts from within the parts
    shown = tqdm.format_sizeof(6 * 2**20 + 3, divisor=1024)
    assert final_counts(capsys.readouterr().err, f"publish digits/{ref.run_id}") == [f"{shown}/{shown}"]
    bar_updates.clear()
    store.download_run("digits", ref.run_id, tmp_path / "dest", progress=True)
    assert sum(bar_updates) == 6 * 2**20 + 3
    assert final_counts(capsys.readouterr().err, f"fetch digits/{ref.run_id}") == [f"{shown}/{shown}"]
    assert (tmp_path / "dest" / "big.bin").read_bytes() == (tmp_path / "run" / "big.bin").read_bytes()


def test_scoring_feature_pass_bar_counts_images(tmp_path, capsys):
    """The score stage's feature extraction (torch-fidelity's loop) shows its bar when asked; the
    features do not depend on it."""
    import torch

    from uvit.evaluate.classifier import ClassifierConfig, DigitClassifier, save_classifier
    from uvit.evaluate.fid import FeatureSpace, extract_features

    torch.manual_seed(0)
    save_classifier(DigitClassifier(ClassifierConfig()), tmp_path / "clf")
    images = np.random.default_rng(0).integers(0, 256, (13, 1, 8, 8), dtype=np.uint8)
    space = FeatureSpace("digits-classifier", classifier_path=tmp_path / "clf", batch_size=4)
    quiet = extract_features(images, ("features",), space, progress=False)
    assert capsys.readouterr().err == ""
    shown = extract_features(images, ("features",), space, progress=True)
    err = capsys.readouterr().err  # torch-fidelity's bar (leave=False: cleared when done), over all 13
    assert err.startswith("\rProcessing samples:") and re.search(r"\| +(1[0-3]|[0-9])/13 \[", err)
    assert torch.equal(quiet["features"], shown["features"])
    extract_features(images, ("features",), space)  # default: only on a terminal
    assert capsys.readouterr().err == ""
