"""uvit.data.shards (the on-disk split format) and uvit.data.sources.digits."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from uvit.data.shards import (
    DataIntegrityError,
    Manifest,
    ShardedArrays,
    load_split_arrays,
    verify_split,
    write_split,
)
from uvit.data.sources.digits import digits_arrays, prepare_digits

N = 10


@pytest.fixture
def arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "images": rng.integers(0, 256, size=(N, 1, 2, 3), dtype=np.uint8),
        "labels": np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 2], dtype=np.int64),
        "latents": rng.standard_normal((N, 4)).astype(np.float16),
    }


@pytest.fixture
def split(tmp_path: Path, arrays) -> Path:
    root = tmp_path / "toy" / "train"
    write_split(root, arrays, name="toy", split="train", shard_size=4, meta={"source": "test"})
    return root


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------------------- round trip


def test_round_trip_values_and_manifest(split: Path, arrays) -> None:
    m = Manifest.load(split)
    assert (m.name, m.split, m.count, m.format_version) == ("toy", "train", N, 1)
    assert m.meta == {"source": "test"}
    assert {k: (f.dtype, f.shape) for k, f in m.fields.items()} == {
        "images": ("uint8", (1, 2, 3)),
        "labels": ("int64", ()),
        "latents": ("float16", (4,)),
    }
    # shard_size 4 < N = 10: shards of 4, 4, 2 rows, one file per field per shard
    assert [s.count for s in m.shards] == [4, 4, 2]
    assert m.shards[2].files["labels"].name == "labels-00002.npy"
    assert m.offsets.tolist() == [0, 4, 8, 10]
    assert sorted(p.name for p in split.iterdir()) == sorted(
        ["manifest.json"] + [f"{f}-{k:05d}.npy" for f in arrays for k in range(3)]
    )

    ds = ShardedArrays(split)
    assert len(ds) == N
    for name, arr in arrays.items():
        got = ds.field(name)
        assert got.dtype == arr.dtype and got.shape == arr.shape
        np.testing.assert_array_equal(got, arr)
    assert np.array_equal(ds.shard("labels", 1), arrays["labels"][4:8])


def test_row_lookup_across_shard_boundaries(split: Path, arrays) -> None:
    ds = ShardedArrays(split)
    for i in list(range(N)) + [-1, -N]:
        row = ds[i]
        assert set(row) == set(arrays)
        for name, arr in arrays.items():
            np.testing.assert_array_equal(row[name], arr[i])
    assert int(ds[3]["labels"]) == 0 and int(ds[4]["labels"]) == 1  # last of shard 0, first of 1
    with pytest.raises(IndexError):
        ds[N]
    with pytest.raises(IndexError):
        ds[-N - 1]


def test_manifest_stats(split: Path, arrays) -> None:
    m = Manifest.load(split)
    img = m.fields["images"].stats
    assert img["min"] == int(arrays["images"].min()) and img["max"] == int(arrays["images"].max())
    assert img["mean"] == pytest.approx(arrays["images"].mean())
    assert m.fields["labels"].stats["counts"] == {"0": 3, "1": 3, "2": 4}
    assert m.fields["latents"].stats["nonfinite"] == 0
    assert "counts" not in m.fields["latents"].stats


def test_returned_manifest_equals_saved(tmp_path: Path, arrays) -> None:
    m = write_split(tmp_path / "s", arrays, name="toy", split="test", shard_size=3)
    assert m.to_dict() == Manifest.load(tmp_path / "s").to_dict()
    assert json.loads((tmp_path / "s" / "manifest.json").read_text())["format_version"] == 1


def test_load_split_arrays(split: Path, arrays) -> None:
    images, labels = load_split_arrays(split, verify=True)
    np.testing.assert_array_equal(images, arrays["images"])
    np.testing.assert_array_equal(labels, arrays["labels"])


def test_rejects_bad_fields(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="same number of rows"):
        write_split(tmp_path / "a", {"x": np.zeros(3), "y": np.zeros(4)}, name="t", split="s")
    with pytest.raises(ValueError, match="field name"):
        write_split(tmp_path / "b", {"../x": np.zeros(3)}, name="t", split="s")
    with pytest.raises(ValueError, match="empty"):
        write_split(tmp_path / "c", {"x": np.zeros((0, 2))}, name="t", split="s")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------- integrity


def test_verify_passes_on_fresh_split(split: Path) -> None:
    m = verify_split(split)
    assert m.count == N
    assert len(ShardedArrays(split, verify=True)) == N


def test_flipped_byte_names_the_file(split: Path) -> None:
    _flip_last_byte(split / "labels-00001.npy")
    with pytest.raises(DataIntegrityError) as ei:
        verify_split(split)
    msg = str(ei.value)
    assert "labels-00001.npy" in msg and "sha256 mismatch" in msg
    assert "expected" in msg and "actual" in msg and "dvc checkout" in msg
    # only the damaged file is reported
    assert "images-00001.npy" not in msg and "labels-00000.npy" not in msg
    with pytest.raises(DataIntegrityError):
        ShardedArrays(split, verify=True)


def test_missing_shard_file(split: Path) -> None:
    (split / "images-00002.npy").unlink()
    with pytest.raises(DataIntegrityError, match=r"images-00002\.npy: missing"):
        verify_split(split)
    # Without verification the reader still fails clearly when it touches the file.
    with pytest.raises(DataIntegrityError, match="images-00002.npy"):
        ShardedArrays(split)[9]


def test_manifest_with_wrong_sha(split: Path) -> None:
    path = split / "manifest.json"
    d = json.loads(path.read_text())
    d["shards"][0]["files"]["images"]["sha256"] = "0" * 64
    path.write_text(json.dumps(d))
    with pytest.raises(
        DataIntegrityError,
        match=r"images-00000\.npy: sha256 mismatch, "
        r"expected 0{64}, actual [0-9a-f]{64}",
    ):
        verify_split(split)


def test_missing_or_invalid_manifest(split: Path) -> None:
    path = split / "manifest.json"
    text = path.read_text()
    path.write_text(text[: len(text) // 2])  # truncated JSON
    with pytest.raises(DataIntegrityError, match="Invalid manifest"):
        verify_split(split)
    d = json.loads(text)
    d["count"] = 11  # shard counts no longer add up
    path.write_text(json.dumps(d))
    with pytest.raises(DataIntegrityError, match="add up to 10"):
        Manifest.load(split)
    path.unlink()
    with pytest.raises(DataIntegrityError, match="No manifest"):
        ShardedArrays(split)


# ---------------------------------------------------------------------------- atomic writes


def test_refuses_existing_dir_without_overwrite(split: Path, arrays) -> None:
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_split(split, arrays, name="toy", split="train")
    new = {"labels": np.arange(3, dtype=np.int64)}
    write_split(split, new, name="toy", split="train", overwrite=True)
    assert sorted(p.name for p in split.iterdir()) == ["labels-00000.npy", "manifest.json"]
    np.testing.assert_array_equal(ShardedArrays(split, verify=True).field("labels"), np.arange(3))
    assert sorted(p.name for p in split.parent.iterdir()) == ["train"]  # no temp/old dirs left


def _fail_on_second_save(monkeypatch) -> None:
    real_save = np.save
    calls = {"n": 0}

    def flaky_save(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full (simulated)")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(np, "save", flaky_save)


def test_interrupted_write_leaves_nothing(tmp_path: Path, arrays, monkeypatch) -> None:
    _fail_on_second_save(monkeypatch)
    root = tmp_path / "toy" / "train"
    with pytest.raises(OSError, match="simulated"):
        write_split(root, arrays, name="toy", split="train", shard_size=4)
    assert not root.exists()
    assert list(root.parent.iterdir()) == []  # no temp dir, no partial manifest anywhere


def test_interrupted_overwrite_keeps_old_split(split: Path, arrays, monkeypatch) -> None:
    before = Manifest.load(split).to_dict()
    _fail_on_second_save(monkeypatch)
    with pytest.raises(OSError, match="simulated"):
        write_split(split, {"labels": np.arange(5)}, name="toy", split="train", shard_size=1, overwrite=True)
    assert verify_split(split).to_dict() == before
    assert sorted(p.name for p in split.parent.iterdir()) == ["train"]


# ---------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digits")
    prepare_digits(out, seed=0)
    return out


def test_prepare_digits_counts_and_stratification(digits_dir: Path) -> None:
    train, test = Manifest.load(digits_dir / "train"), Manifest.load(digits_dir / "test")
    assert (train.count, test.count) == (1437, 360)
    assert train.meta["source"] == "sklearn.datasets.load_digits"
    assert train.meta["split"]["seed"] == 0
    tr_counts = train.fields["labels"].stats["counts"]
    te_counts = test.fields["labels"].stats["counts"]
    assert sorted(tr_counts) == sorted(te_counts) == [str(c) for c in range(10)]
    for c in range(10):  # each class keeps its share (~10%) in both splits
        assert abs(tr_counts[str(c)] / 1437 - te_counts[str(c)] / 360) < 0.01
    assert sum(tr_counts.values()) + sum(te_counts.values()) == 1797


def test_prepare_digits_pixels_and_content(digits_dir: Path) -> None:
    parts = [load_split_arrays(digits_dir / s, verify=True) for s in ("train", "test")]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    assert images.dtype == np.uint8 and images.shape == (1797, 1, 8, 8)
    assert labels.dtype == np.int64
    assert (images.min(), images.max()) == (0, 255)
    # 0..16 scaled by 255/16 with round-half-up: v=8 -> 127.5 -> 128, v=1 -> 15.94 -> 16
    assert set(np.unique(images).tolist()) <= {int(np.floor(v * 255 / 16 + 0.5)) for v in range(17)}
    # the two splits together are exactly the dataset (as a multiset of (image, label) rows)
    all_images, all_labels = digits_arrays()
    rows = Counter((im.tobytes(), int(lb)) for im, lb in zip(images, labels))
    assert rows == Counter((im.tobytes(), int(lb)) for im, lb in zip(all_images, all_labels))


def _shas(manifest: Manifest) -> list[str]:
    return [f.sha256 for s in manifest.shards for f in s.files.values()]


def test_prepare_digits_deterministic(digits_dir: Path, tmp_path: Path) -> None:
    again = prepare_digits(tmp_path / "again", seed=0)
    other = prepare_digits(tmp_path / "other", seed=1)
    for split in ("train", "test"):
        first = Manifest.load(digits_dir / split)
        assert _shas(again[split]) == _shas(first)
        assert _shas(other[split]) != _shas(first)
    with pytest.raises(FileExistsError):
        prepare_digits(tmp_path / "again", seed=0)
