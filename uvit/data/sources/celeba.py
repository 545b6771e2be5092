"""CelebA 64x64 (U-ViT's ``celeba64``): the aligned-and-cropped images, torchvision's "train" split.

CelebA cannot be fetched here: it is distributed through Google Drive / Baidu (and mirrored on
Kaggle), behind interactive pages. :data:`DOWNLOAD_HELP` says what to get and where to put it.

Preprocessing (U-ViT ``datasets.py``): crop the fixed 128x128 box at top=57, left=25 (centre
x=89, y=121) of each 178x218 image, then ``transforms.Resize(64)`` (antialiased bilinear).
RandomHorizontalFlip and the [-1, 1] scaling happen at training time. Rows keep the order of the
partition file (torchvision's order).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
from PIL import Image

from uvit.data.download import BadSourceError
from uvit.data.preprocess import (
    CELEBA_ALIGNED_SIZE,
    CELEBA_CROP_BOX,
    BadImageError,
    Crop,
    PrepareOptions,
    SplitFiles,
    celeba_crop,
    check_splits_absent,
    write_image_split,
)
from uvit.data.shards import Manifest

NAME = "celeba64"
PARTITIONS = {"train": 0, "valid": 1, "test": 2}
EXPECTED_COUNTS = {"train": 162_770, "valid": 19_867, "test": 19_962, "all": 202_599}
_IMAGE_DIRS = ("img_align_celeba/img_align_celeba", "img_align_celeba", "Img/img_align_celeba")
_PARTITION_FILES = ("list_eval_partition.txt", "list_eval_partition.csv", "Eval/list_eval_partition.txt")

DOWNLOAD_HELP = (
    "CelebA is not downloaded automatically (it is served from Google Drive / Baidu behind "
    "interactive pages). From https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html -> 'Align&Cropped "
    "Images' (Google Drive folder 'CelebA'), download Img/img_align_celeba.zip (1.4 GB, 202,599 "
    "JPEGs of 178x218) and Eval/list_eval_partition.txt; or the Kaggle dataset "
    "'jessicali9530/celeba-dataset' (`kaggle datasets download jessicali9530/celeba-dataset`, "
    "whose list_eval_partition.csv is accepted too). Unzip so that ROOT/img_align_celeba/000001.jpg "
    "and ROOT/list_eval_partition.txt exist (torchvision's ROOT/celeba/... layout and Kaggle's "
    "nested img_align_celeba/img_align_celeba/ also work), then set `celeba64.data.root: ROOT` in "
    "params.yaml (or pass root=ROOT)."
)

__all__ = ["DOWNLOAD_HELP", "EXPECTED_COUNTS", "NAME", "PARTITIONS", "find_celeba", "prepare_celeba", "read_partition"]


def find_celeba(root: str | Path | None) -> tuple[Path, Path]:
    """-> (image folder, partition file) under ``root``; FileNotFoundError with instructions."""
    if root is None or str(root) == "":
        raise FileNotFoundError(f"No CelebA root given. {DOWNLOAD_HELP}")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"CelebA root {root} does not exist. {DOWNLOAD_HELP}")
    looked = []
    for base in (root, root / "celeba"):
        images = next((base / d for d in _IMAGE_DIRS if (base / d).is_dir()), None)
        partition = next((base / f for f in _PARTITION_FILES if (base / f).is_file()), None)
        if images is not None and partition is not None:
            return images, partition
        looked.append(
            f"{base}: image folder {'found' if images else 'missing'}, "
            f"partition file {'found' if partition else 'missing'}"
        )
    raise FileNotFoundError(f"CelebA not found under {root} ({'; '.join(looked)}). {DOWNLOAD_HELP}")


def read_partition(path: str | Path) -> list[tuple[str, int]]:
    """``list_eval_partition.txt`` ("000001.jpg 0" per line) or Kaggle's ``.csv`` (with header
    "image_id,partition") -> [(file name, partition)] in file order."""
    path = Path(path)
    rows = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.replace(",", " ").split()
        if not parts:
            continue
        if lineno == 1 and len(parts) == 2 and not parts[1].isdigit():
            continue  # csv header
        if (
            len(parts) != 2
            or not parts[1].isdigit()
            or int(parts[1]) not in PARTITIONS.values()
            or "/" in parts[0]
            or parts[0].startswith(".")
        ):
            raise BadSourceError(
                f"{path}:{lineno}: expected '<image file> <0|1|2>', got {line!r}. The "
                f"partition file is damaged: download list_eval_partition.txt again."
            )
        rows.append((parts[0], int(parts[1])))
    if not rows:
        raise BadSourceError(f"{path} lists no images; download list_eval_partition.txt again.")
    return rows


def _celeba_transform(im: Image.Image, size: int) -> np.ndarray:
    if im.size != CELEBA_ALIGNED_SIZE:
        raise BadImageError(
            f"image is {im.width}x{im.height} (WxH), but aligned CelebA images are exactly "
            f"{CELEBA_ALIGNED_SIZE[0]}x{CELEBA_ALIGNED_SIZE[1]} (the fixed crop needs them); these "
            f"may be the in-the-wild img_celeba images or resized copies. Use img_align_celeba, "
            f"or remove/replace the file, or pass skip_bad=True to skip such files."
        )
    return celeba_crop(im, size)


def _split_meta(root: str | Path, partition_file: Path, split: str, size: int, listed: int) -> dict:
    return {
        "source": "CelebA img_align_celeba (aligned & cropped, 178x218)",
        "root": str(root),
        "partition_file": partition_file.name,
        "partition": split,
        "preprocessing": (
            f"crop box (left, top, right, bottom)={CELEBA_CROP_BOX} (128x128 "
            f"centred at x=89, y=121), PIL BILINEAR (antialiased) resize to "
            f"{size}x{size} = torchvision Resize({size}); flip at training"
        ),
        "listed": listed,
        "expected_count": EXPECTED_COUNTS[split],
    }


def prepare_celeba(
    out_dir: str | Path,
    root: str | Path | None,
    *,
    splits: tuple[str, ...] = ("train",),
    size: int = 64,
    options: PrepareOptions = PrepareOptions(),
) -> dict[str, Manifest]:
    """Write ``out_dir/<split>`` (images uint8 (N, 3, size, size)) for each split
    ("train" = partition 0, "valid" = 1, "test" = 2, "all").

    A missing, corrupt or wrongly sized image raises :class:`~uvit.data.preprocess.BadImageError`;
    with ``options.skip_bad`` it is skipped and listed in the manifest's ``meta["skipped"]``.
    """
    unknown = set(splits) - set(PARTITIONS) - {"all"}
    if unknown:
        raise ValueError(f"unknown CelebA split(s) {sorted(unknown)}; choose from {[*PARTITIONS, 'all']}")
    out_dir = Path(out_dir)
    check_splits_absent(out_dir, splits, options.overwrite)
    image_dir, partition_file = find_celeba(root)
    rows = read_partition(partition_file)
    crop = Crop(functools.partial(_celeba_transform, size=size), (3, size, size), min_size=CELEBA_ALIGNED_SIZE)
    manifests = {}
    for split in splits:
        files = [f for f, p in rows if split == "all" or p == PARTITIONS[split]]
        if not files:
            raise BadSourceError(
                f"{partition_file} lists no images for split {split!r}; download list_eval_partition.txt again."
            )
        split_files = SplitFiles(
            NAME,
            split,
            [image_dir / f for f in files],
            files_root=image_dir,
            meta=_split_meta(root, partition_file, split, size, len(files)),
        )
        manifests[split], _ = write_image_split(out_dir / split, split_files, crop, options)
    return manifests
