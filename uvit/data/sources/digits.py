"""The embedded default benchmark: scikit-learn's handwritten digits (no download).

``sklearn.datasets.load_digits()`` ships 1,797 real 8x8 grayscale digits with pixel values
0..16 and labels 0..9. We rescale pixels to uint8 0..255 (``round(v * 255 / 16)``), store them as
(N, 1, 8, 8) like every other image benchmark, and split them into stratified train/test splits.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from uvit.data.shards import Manifest, write_split

NAME = "digits"
NUM_CLASSES = 10
NUM_IMAGES = 1797
SOURCE = "sklearn.datasets.load_digits"
RAW_MAX = 16  # load_digits pixel values are integers 0..16

__all__ = ["NAME", "NUM_CLASSES", "NUM_IMAGES", "digits_arrays", "digits_expectations", "prepare_digits"]


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits: images uint8 (1797, 1, 8, 8) in 0..255, labels int64 (1797,) in 0..9."""
    from sklearn.datasets import load_digits

    d = load_digits()
    raw = np.asarray(d.images, dtype=np.float64)  # (1797, 8, 8), integer values 0..16
    # Round half up explicitly (only v=8 -> 127.5 is a tie) rather than numpy's half-to-even.
    images = np.floor(raw * (255.0 / RAW_MAX) + 0.5).astype(np.uint8)[:, None]
    labels = np.asarray(d.target, dtype=np.int64)
    return images, labels


def prepare_digits(
    out_dir: str | Path,
    test_fraction: float = 0.2,
    seed: int = 0,
    overwrite: bool = False,
) -> dict[str, Manifest]:
    """Write ``out_dir/train`` and ``out_dir/test`` (one shard each) and return their manifests.

    The split is stratified by label (every class keeps its share in both splits) and fully
    determined by ``seed``, so the same arguments give byte-identical files (same sha256s).
    """
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    images, labels = digits_arrays()
    idx_train, idx_test = train_test_split(
        np.arange(len(labels)), test_size=test_fraction, stratify=labels, random_state=seed
    )
    out_dir = Path(out_dir)
    manifests: dict[str, Manifest] = {}
    for split, idx in (("train", idx_train), ("test", idx_test)):
        meta = {
            "source": SOURCE,
            "num_classes": NUM_CLASSES,
            "preprocessing": "pixels 0..16 -> uint8 round(v*255/16), layout (N, 1, 8, 8)",
            "split": {
                "method": "sklearn.model_selection.train_test_split, stratify=labels",
                "test_fraction": test_fraction,
                "seed": seed,
            },
        }
        manifests[split] = write_split(
            out_dir / split,
            {"images": images[idx], "labels": labels[idx]},
            name=NAME,
            split=split,
            shard_size=len(idx),
            meta=meta,
            overwrite=overwrite,
        )
    return manifests


def digits_expectations():
    """Validation expectations for either digits split (see :mod:`uvit.data.validate`).

    Each class is ~10% of the data (174..183 images per class); allow 5%..15%.
    """
    from uvit.data.validate import ImageSplitExpectations

    return ImageSplitExpectations(
        num_classes=NUM_CLASSES,
        min_rows=1,
        max_rows=NUM_IMAGES,
        pixel_min=0,
        pixel_max=255,
        min_class_share=0.05,
        max_class_share=0.15,
    )
