"""uvit.data.validate: great-expectations suites on image-classification splits."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from uvit.data.shards import load_split_arrays, write_split
from uvit.data.sources.digits import digits_expectations, prepare_digits
from uvit.data.validate import (
    ImageSplitExpectations,
    ValidationFailed,
    ValidationReport,
    require_valid,
    validate_image_split,
)

DIGITS = ImageSplitExpectations(num_classes=10, min_class_share=0.05, max_class_share=0.15)


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digits")
    prepare_digits(out, seed=0)
    return out


@pytest.fixture(scope="module")
def train_arrays(digits_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    return load_split_arrays(digits_dir / "train")


def _write(root: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    write_split(root, {"images": images, "labels": labels}, name="digits", split="train", shard_size=500)
    return root


def _failed_names(report: ValidationReport) -> list[str]:
    return [r.name for r in report.failures]


def test_real_digits_splits_pass(digits_dir: Path) -> None:
    for split in ("train", "test"):
        report = validate_image_split(digits_dir / split, digits_expectations())
        assert report.success, report.summary()
        require_valid(report)  # does not raise
        names = [r.name for r in report.results]
        assert names[0] == "checksums"
        assert "labels in [0, 9]" in names and "every class 0..9 present" in names
        assert len(names) == 10
        assert report.to_dict()["success"] is True
        assert "PASSED" in report.summary()


def test_out_of_range_label_fails(tmp_path: Path, train_arrays) -> None:
    images, labels = train_arrays
    labels = labels.copy()
    labels[[3, 700]] = 12  # row 700 is in the second shard
    report = validate_image_split(_write(tmp_path / "s", images, labels), DIGITS)
    assert not report.success
    assert _failed_names(report) == ["labels in [0, 9]"]
    summary = report.summary()
    assert "FAILED (1 of 10 expectations)" in summary
    fail_line = summary.splitlines()[2]  # failures come first, right after the header
    assert fail_line.split()[0] == "FAIL" and "labels in [0, 9]" in fail_line
    assert "2 of 1437 rows unexpected" in fail_line
    assert "row 3: label=12" in fail_line and "row 700: label=12" in fail_line


def test_missing_class_fails(tmp_path: Path, train_arrays) -> None:
    images, labels = train_arrays
    keep = labels != 3
    report = validate_image_split(_write(tmp_path / "s", images[keep], labels[keep]), DIGITS)
    assert not report.success
    assert _failed_names(report) == ["every class 0..9 present", "class share in [0.05, 0.15]"]
    assert "class 3: count=0" in report.summary()


def test_class_balance_and_row_count_bounds(digits_dir: Path) -> None:
    e = ImageSplitExpectations(num_classes=10, min_rows=1500, min_class_share=0.11)
    report = validate_image_split(digits_dir / "train", e)
    assert _failed_names(report) == ["row count in [1500, inf]", "class share in [0.11, 1]"]
    assert "observed 1437" in report.summary()
    assert "10 of 10 classes unexpected" in report.summary()


def test_pixel_range_and_nonfinite(tmp_path: Path, train_arrays) -> None:
    images, labels = train_arrays
    floats = images.astype(np.float32)
    floats[5, 0, 2, 2] = np.nan
    floats[9, 0, 0, 0] = 300.0
    report = validate_image_split(_write(tmp_path / "s", floats, labels), DIGITS)
    assert _failed_names(report) == ["pixels <= 255", "pixels finite (no NaN/inf)"]
    by_name = {r.name: r.details for r in report.results}
    assert "row 9: pixel_max=300" in by_name["pixels <= 255"]
    assert "row 5" in by_name["pixels finite (no NaN/inf)"]


def test_corrupted_shard_fails_readably(tmp_path: Path, digits_dir: Path) -> None:
    root = tmp_path / "train"
    shutil.copytree(digits_dir / "train", root)
    path = root / "images-00000.npy"
    data = bytearray(path.read_bytes())
    data[200] ^= 0x01
    path.write_bytes(bytes(data))
    report = validate_image_split(root, DIGITS)
    assert not report.success
    assert [(r.name, r.success) for r in report.results] == [("checksums", False)]
    summary = report.summary()
    assert "images-00000.npy: sha256 mismatch" in summary and "dvc checkout" in summary


def test_missing_manifest_fails(tmp_path: Path) -> None:
    report = validate_image_split(tmp_path / "nothing-here", DIGITS)
    assert not report.success and "No manifest" in report.summary()


def test_validation_failed_carries_summary(tmp_path: Path, train_arrays) -> None:
    images, labels = train_arrays
    labels = labels.copy()
    labels[0] = 12
    report = validate_image_split(_write(tmp_path / "s", images, labels), DIGITS)
    with pytest.raises(ValidationFailed) as ei:
        require_valid(report)
    assert ei.value.report is report
    assert str(ei.value) == report.summary()
    assert "labels in [0, 9]" in str(ei.value)


def test_expectations_reject_nonsense() -> None:
    with pytest.raises(ValueError):
        ImageSplitExpectations(num_classes=-1)
    with pytest.raises(ValueError):
        ImageSplitExpectations(num_classes=10, min_class_share=0.5, max_class_share=0.1)
    with pytest.raises(ValueError):
        ImageSplitExpectations(num_classes=10, min_rows=10, max_rows=5)


def test_unlabelled_split_checks_images_only(tmp_path: Path) -> None:
    """num_classes=0 (CelebA, MS-COCO images): a split without labels validates on its pixels."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 3, 8, 8), dtype=np.uint8)
    root = tmp_path / "faces"
    write_split(root, {"images": images}, name="faces", split="train", shard_size=16)
    report = validate_image_split(root, ImageSplitExpectations(num_classes=0, min_rows=40))
    assert report.success, report.summary()
    names = [o.name for o in report.results]
    assert not any("label" in n or "class" in n for n in names) and "pixels finite (no NaN/inf)" in names
    too_few = validate_image_split(root, ImageSplitExpectations(num_classes=0, min_rows=41))
    assert _failed_names(too_few) == ["row count in [41, inf]"]
