"""MS-COCO 2014 captions at 256x256 (U-ViT's ``mscoco256``): images plus every caption per image.

``root`` must hold (as unpacked from the official zips)::

    ROOT/train2014/COCO_train2014_000000000009.jpg ...   (82,783 images)   train2014.zip
    ROOT/val2014/COCO_val2014_000000000042.jpg ...       (40,504 images)   val2014.zip
    ROOT/annotations/captions_train2014.json              annotations_trainval2014.zip
    ROOT/annotations/captions_val2014.json

(``captions_*.json`` directly in ROOT is accepted too.) Rows are the annotation file's images in
ascending image id (U-ViT's ``sorted(coco.imgs.keys())``); each image keeps all its captions in
annotation-file order, unmodified (the CLIP tokenizer sees them as written).

Fields of a split: ``images`` uint8 (N, 3, R, R) — U-ViT's centre square crop + LANCZOS resize;
``image_ids`` int64 (N,); ``num_captions`` int64 (N,); ``captions`` fixed-width unicode
``<U{L}`` (N, K) with K the largest caption count and L the longest caption of the split, rows
padded with "" after ``num_captions`` (the shard format stores no object arrays, and fixed-width
strings keep a split one self-verifying set of .npy files, readable with ``allow_pickle=False``).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np

from uvit.data.download import BadSourceError
from uvit.data.preprocess import (
    BadImageError,
    Crop,
    PrepareOptions,
    SplitFiles,
    check_splits_absent,
    coco_crop,
    write_image_split,
)
from uvit.data.shards import Manifest

EXPECTED_COUNTS = {"train": 82_783, "val": 40_504}
URLS = {
    "train": "http://images.cocodataset.org/zips/train2014.zip",
    "val": "http://images.cocodataset.org/zips/val2014.zip",
    "annotations": "http://images.cocodataset.org/annotations/annotations_trainval2014.zip",
}

__all__ = ["AnnotationError", "EXPECTED_COUNTS", "URLS", "load_captions", "missing_root_help", "prepare_coco"]


class AnnotationError(BadSourceError):
    """A COCO annotation file that does not parse or is inconsistent; names the file."""


def missing_root_help(resolution: int = 256) -> str:
    return (
        f"MS-COCO 2014 is expected under ROOT as ROOT/train2014/*.jpg, ROOT/val2014/*.jpg and "
        f"ROOT/annotations/captions_{{train,val}}2014.json: download {URLS['train']}, "
        f"{URLS['val']} and {URLS['annotations']}, unzip them into ROOT, then set "
        f"`mscoco{resolution}.data.root: ROOT` in params.yaml (or pass root=ROOT)."
    )


def _annotation_file(root: Path, split: str, resolution: int) -> Path:
    for candidate in (root / "annotations" / f"captions_{split}2014.json", root / f"captions_{split}2014.json"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{root / 'annotations' / f'captions_{split}2014.json'} does not exist. {missing_root_help(resolution)}"
    )


def load_captions(path: str | Path) -> tuple[dict[int, str], dict[int, list[str]]]:
    """Parse a ``captions_*2014.json`` -> ({image id: file name}, {image id: [captions]}).

    Raises :class:`AnnotationError` naming the file (and the offending entry) when it is not
    valid JSON, lacks ``images``/``annotations``, or an annotation refers to an unknown image.
    """
    path = Path(path)
    fix = f"Re-download and unzip {URLS['annotations']} (the file is damaged or not a COCO captions file)."
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise AnnotationError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}). {fix}") from e
    except UnicodeDecodeError as e:
        raise AnnotationError(f"{path}: not UTF-8 text ({e}). {fix}") from e
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("images"), list)
        or not isinstance(data.get("annotations"), list)
    ):
        raise AnnotationError(f"{path}: expected a JSON object with 'images' and 'annotations' lists. {fix}")
    files: dict[int, str] = {}
    for i, img in enumerate(data["images"]):
        try:
            image_id, name = img["id"], img["file_name"]
        except (TypeError, KeyError) as e:
            raise AnnotationError(f"{path}: images[{i}] lacks 'id' or 'file_name'. {fix}") from e
        if (
            not isinstance(image_id, int)
            or not isinstance(name, str)
            or not name
            or "/" in name
            or "\\" in name
            or name.startswith(".")
        ):
            raise AnnotationError(f"{path}: images[{i}] has an invalid id {image_id!r} or file_name {name!r}. {fix}")
        if image_id in files:
            raise AnnotationError(f"{path}: image id {image_id} is listed twice. {fix}")
        files[image_id] = name
    captions: dict[int, list[str]] = {i: [] for i in files}
    for i, ann in enumerate(data["annotations"]):
        try:
            image_id, caption = ann["image_id"], ann["caption"]
        except (TypeError, KeyError) as e:
            raise AnnotationError(f"{path}: annotations[{i}] lacks 'image_id' or 'caption'. {fix}") from e
        if not isinstance(caption, str):
            raise AnnotationError(f"{path}: annotations[{i}] caption is not a string. {fix}")
        if image_id not in captions:
            raise AnnotationError(
                f"{path}: annotations[{i}] (id {ann.get('id')}) refers to image "
                f"id {image_id!r}, which is not in its 'images' list. {fix}"
            )
        captions[image_id].append(caption)
    return files, captions


def _usable_ids(
    files: dict[int, str], captions: dict[int, list[str]], image_dir: Path, ann_file: Path, refetch: str, skip_bad: bool
) -> tuple[list[int], list[dict]]:
    """(ids of the images with captions and a file, ascending; ``[{"file", "image_id", "error"}]``
    of the others when ``skip_bad``, else the first of them raises). ``refetch``: what to do about
    a missing file."""
    ids, skipped = [], []
    for image_id in sorted(files):
        path = image_dir / files[image_id]
        problem = None
        if not captions[image_id]:
            problem = f"image id {image_id} ({path}) has no captions in {ann_file}"
        elif not path.is_file():
            problem = f"image id {image_id}: {path} is listed in {ann_file.name} but does not exist; {refetch}"
        if problem is None:
            ids.append(image_id)
        elif skip_bad:
            skipped.append({"file": files[image_id], "image_id": image_id, "error": problem})
        else:
            raise BadImageError(problem + ", or pass skip_bad=True to skip such images.", path)
    return ids, skipped


def _caption_fields(ids: list[int], captions: dict[int, list[str]]) -> dict[str, np.ndarray]:
    """``image_ids``, ``num_captions`` and the padded ``captions`` array of the rows ``ids``."""
    num_captions = np.array([len(captions[i]) for i in ids], dtype=np.int64)
    width = max(1, max(len(c) for i in ids for c in captions[i]))
    caps = np.full((len(ids), int(num_captions.max())), "", dtype=f"<U{width}")
    for row, image_id in enumerate(ids):
        caps[row, : num_captions[row]] = captions[image_id]
    return {"image_ids": np.asarray(ids, dtype=np.int64), "num_captions": num_captions, "captions": caps}


def _skipped_meta(skipped: list[dict], files: dict[int, str]):
    """``meta_fn`` of :func:`write_image_split`: the images skipped before decoding, then those
    that failed to decode (with their image id added)."""
    id_of_file = {files[i]: i for i in files}

    def meta_fn(res):
        for bad in res.bad:
            bad["image_id"] = id_of_file.get(bad["file"])
        return {"skipped": skipped + res.bad, "num_skipped": len(skipped) + len(res.bad)}

    return meta_fn


def _split_meta(root: Path, split: str, ann_file: Path, resolution: int, listed: int, total_captions: int) -> dict:
    return {
        "source": f"MS-COCO 2014 {split}",
        "root": str(root),
        "annotations": ann_file.name,
        "preprocessing": (
            f"centre square crop (side min(H, W)), PIL LANCZOS resize to "
            f"{resolution}x{resolution} (U-ViT center_crop); no flip"
        ),
        "listed": listed,
        "expected_count": EXPECTED_COUNTS[split],
        "num_captions_total": total_captions,
        "captions_field": "captions[i, :num_captions[i]] are image i's captions, in "
        "annotation-file order; the rest is padding ''",
    }


def _prepare_split(out_dir: Path, root: Path, split: str, resolution: int, options: PrepareOptions) -> Manifest:
    ann_file = _annotation_file(root, split, resolution)
    image_dir = root / f"{split}2014"
    if not image_dir.is_dir():
        raise FileNotFoundError(f"{image_dir} does not exist. {missing_root_help(resolution)}")
    files, captions = load_captions(ann_file)
    refetch = f"unzip {URLS[split]} into {root} again"
    ids, skipped = _usable_ids(files, captions, image_dir, ann_file, refetch, options.skip_bad)
    if not ids:
        first = skipped[0]["error"] if skipped else ""
        raise BadImageError(f"no usable images for COCO {split}: {first}")
    extra = _caption_fields(ids, captions)
    meta = _split_meta(root, split, ann_file, resolution, len(files), int(extra["num_captions"].sum()))
    split_files = SplitFiles(
        f"mscoco{resolution}", split, [image_dir / files[i] for i in ids], files_root=image_dir, extra=extra, meta=meta
    )
    crop = Crop(functools.partial(coco_crop, size=resolution), (3, resolution, resolution))
    manifest, _ = write_image_split(out_dir / split, split_files, crop, options, meta_fn=_skipped_meta(skipped, files))
    return manifest


def prepare_coco(
    out_dir: str | Path,
    root: str | Path | None,
    resolution: int = 256,
    *,
    splits: tuple[str, ...] = ("train", "val"),
    options: PrepareOptions = PrepareOptions(shard_size=10_000),
) -> dict[str, Manifest]:
    """Write ``out_dir/<split>`` for each of ``splits`` (see the module docstring for fields).

    An image the annotations list but the folder lacks, one that does not decode, or one without
    captions raises an error naming the image id and file; with ``options.skip_bad`` it is
    skipped and listed in ``meta["skipped"]``. A broken annotation file is always an
    :class:`AnnotationError`.
    """
    if not splits or set(splits) - set(EXPECTED_COUNTS):
        raise ValueError(f"splits must be from ('train', 'val'), got {splits}")
    out_dir = Path(out_dir)
    check_splits_absent(out_dir, splits, options.overwrite)
    if root is None or str(root) == "" or not Path(root).is_dir():
        raise FileNotFoundError(f"MS-COCO root {root} does not exist. {missing_root_help(resolution)}")
    return {split: _prepare_split(out_dir, Path(root), split, resolution, options) for split in splits}
