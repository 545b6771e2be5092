"""Your own images as a benchmark's data: ``data: {source: imagefolder, root: ROOT}``.

``ROOT`` is a local folder, a tar (``.tar``, ``.tar.gz``, ``.tgz``; local, ``s3://`` or
``https://``; a single top folder inside it stands for ROOT) or an ``s3://bucket/prefix/`` of
images. A tar is fetched into ``download_dir`` and extracted once beside it; an S3 prefix is downloaded object by object (resumable). Then the
folder's layout decides the labels::

    ROOT/<class>/**/*.png      class-conditional: label = index of the class folder among the
                               sorted class folder names (kept in the manifest as ``classes``)
    ROOT/*.png                 unconditional (a flat folder): no labels
    ROOT/train/... ROOT/test/  either layout, split already (``val/`` is read as ``test/``);
                               otherwise every class is split with ``test_fraction`` and ``seed``

Images are jpg, jpeg, png, webp, bmp or gif of any size, RGB, grey or with alpha (converted to
RGB, transparency on white), cropped with ADM's ``center_crop_arr`` to the resolution.
``store_flips`` also stores each image's horizontal mirror as extra rows (latent benchmarks, which
cannot flip at training time). An unreadable or truncated file stops the stage, naming it
(``on_bad="fail"``), or is left out and listed in the manifest (``on_bad="skip"``); either way the
stage writes its splits into a scratch folder first, so nothing is half-written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from uvit.data.download import BadSourceError, SourceInput, fetch, is_remote, verify_file
from uvit.storage.s3 import s3_client
from uvit.data.preprocess import PrepareOptions, SplitFiles, check_splits_absent, write_adm_split
from uvit.data.shards import Manifest
from uvit.fileio import read_json_or_none, write_json

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
SPLIT_FOLDERS = {"train": ("train",), "test": ("test", "val")}
_DONE = ".uvit-complete"  # marks an extraction or download as complete (with what it came from)

__all__ = ["IMAGE_EXTENSIONS", "list_images", "locate", "prepare_imagefolder", "split_files"]


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _is_tar(name: str) -> bool:
    return name.lower().endswith(TAR_SUFFIXES)


def _safe_parts(name: str) -> tuple[str, ...] | None:
    """The path components of an archive or bucket member, or None when any is unsafe (absolute,
    '..', hidden, empty): nothing from an archive is written outside its folder."""
    parts = PurePosixPath(name).parts
    if not parts or PurePosixPath(name).is_absolute():
        return None
    if any(p in ("", ".", "..") or p.startswith(".") or "\\" in p for p in parts):
        return None
    return parts


# --------------------------------------------------------------------------------------------
# Locating ROOT: a folder, a tar, an S3 prefix
# --------------------------------------------------------------------------------------------


def _unwrap(folder: Path) -> Path:
    """A tar's single top folder (``images/...``, the usual way to pack one) stands for ROOT."""
    entries = _visible(folder)
    return entries[0] if len(entries) == 1 and entries[0].is_dir() else folder


def _extract(tar_path: Path, dest: Path, progress: bool) -> Path:
    """Extract the image files of ``tar_path`` into ``dest`` (once per tar: name, size, mtime)
    and return the folder that stands for ROOT."""
    from tqdm.auto import tqdm

    st = tar_path.stat()
    identity = {"tar": tar_path.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if (read_json_or_none(dest / _DONE) or {}).get("source") == identity:
        return _unwrap(dest)
    tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    count = 0
    try:
        with (
            tarfile.open(tar_path, "r:*") as tar,
            tqdm(desc=f"extract {tar_path.name}", unit="file", disable=not progress, leave=False) as bar,
        ):
            for member in tar:
                parts = _safe_parts(member.name)
                if not member.isfile() or parts is None or not _is_image(parts[-1]):
                    continue
                target = tmp.joinpath(*parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(member) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                count += 1
                bar.update(1)
    except (tarfile.TarError, EOFError, OSError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise BadSourceError(
            f"{tar_path}: cannot read the archive ({e}); it is truncated, corrupt or not a "
            "tar: make it again, or point data.root at the extracted folder."
        ) from e
    if count == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise BadSourceError(f"{tar_path} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
    write_json(tmp / _DONE, {"source": identity, "files": count})
    shutil.rmtree(dest, ignore_errors=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.rename(tmp, dest)
    return _unwrap(dest)


def _download_prefix(url: str, dest: Path, progress: bool) -> Path:
    """Every image object under the s3:// prefix ``url``, at its relative path under ``dest``.
    Objects already there at their listed size are kept (an interrupted download resumes)."""
    from tqdm.auto import tqdm

    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"
    client = s3_client()
    objects = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            parts = _safe_parts(obj["Key"][len(prefix) :])
            if parts is not None and _is_image(parts[-1]):
                objects.append((obj["Key"], parts, int(obj["Size"])))
    if not objects:
        raise FileNotFoundError(f"no image objects ({', '.join(IMAGE_EXTENSIONS)}) under {url}")
    listing = hashlib.sha256(json.dumps(sorted((k, s) for k, _, s in objects)).encode()).hexdigest()
    if (read_json_or_none(dest / _DONE) or {}).get("listing") == listing:
        return dest
    (dest / _DONE).unlink(missing_ok=True)
    for key, parts, size in tqdm(objects, desc=f"download {url}", unit="file", disable=not progress):
        target = dest.joinpath(*parts)
        if not (target.is_file() and target.stat().st_size == size):
            fetch(f"s3://{bucket}/{key}", target, progress=False)
    write_json(dest / _DONE, {"listing": listing, "files": len(objects)})
    return dest


def locate(source: SourceInput, progress: bool = True) -> Path:
    """The local folder ``source.root`` stands for (see the module docstring); a tar is checked
    against ``source.sha256`` / ``source.md5`` when given, on every call. A folder or prefix takes
    no checksum. Fetched and extracted files go to ``source.download_dir``."""
    root, download_dir = source.root, source.downloads()
    sha256, md5 = source.sha256, source.md5_for(None)  # no official archive
    root_s = str(root)
    name = PurePosixPath(root_s.split("?")[0].rstrip("/")).name
    if not root_s:
        raise FileNotFoundError("data.root is empty: name a folder, a tar or an s3:// prefix of images")
    if (sha256 or md5) and not _is_tar(name):
        raise BadSourceError(f"{root}: a checksum applies to a tar root only (drop it, or point data.root at a tar)")
    if is_remote(root_s):
        tag = hashlib.sha256(root_s.encode()).hexdigest()[:10]
        if _is_tar(name):
            tar_path = fetch(root_s, download_dir / name, sha256=sha256, md5=md5, progress=progress)
            return _extract(tar_path, download_dir / f"{name}-{tag}", progress)
        if not root_s.startswith("s3://"):
            raise BadSourceError(f"{root}: only a tar can be fetched over http(s); a folder needs s3:// or a path")
        return _download_prefix(root_s, download_dir / f"s3-{tag}", progress)
    path = Path(root_s).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist: data.root names a folder, a tar or an s3:// prefix of "
            "images (class sub-folders for labels, a flat folder for none)"
        )
    if path.is_file():
        if not _is_tar(path.name):
            raise BadSourceError(f"{path} is a file but not a tar ({', '.join(TAR_SUFFIXES)})")
        if sha256 or md5:
            verify_file(path, sha256=sha256, md5=md5)
        tag = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:10]
        return _extract(path, download_dir / f"{path.name}-{tag}", progress)
    return path


# --------------------------------------------------------------------------------------------
# Listing and splitting
# --------------------------------------------------------------------------------------------


def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def list_images(folder: Path, classes: list[str] | None = None) -> tuple[list[Path], np.ndarray | None, list[str]]:
    """(image paths, int64 labels or None, class names) of one folder.

    Only sub-folders (with images below them): class-conditional, classes in sorted order unless
    ``classes`` fixes them (a test split uses the train split's). Only image files: unconditional.
    Both at once is ambiguous and an error.
    """
    entries = _visible(folder)
    dirs = [p for p in entries if p.is_dir()]
    files = [p for p in entries if p.is_file() and _is_image(p.name)]
    if dirs and files:
        raise BadSourceError(
            f"{folder} holds both image files ({files[0].name}, ...) and sub-folders "
            f"({dirs[0].name}/, ...): use class sub-folders only (labels) or images only (none)"
        )
    if files:
        return files, None, []
    names = [d.name for d in dirs]
    classes = list(classes) if classes is not None else names
    unknown = sorted(set(names) - set(classes))
    if unknown:
        raise BadSourceError(f"{folder} has class folders the train split has not: {unknown[:5]}")
    index = {c: i for i, c in enumerate(classes)}
    paths: list[Path] = []
    labels: list[int] = []
    for d in dirs:
        found = sorted(
            p
            for p in d.rglob("*")
            if p.is_file() and _is_image(p.name) and not any(q.startswith(".") for q in p.relative_to(d).parts)
        )
        paths += found
        labels += [index[d.name]] * len(found)
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {folder}")
    return paths, np.asarray(labels, dtype=np.int64), classes


def split_files(labels: np.ndarray | None, n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, test rows): every class (or all rows, unlabelled) shuffled with ``seed`` and
    split with at least one test row where the class has two or more images; sorted rows."""
    rng = np.random.default_rng(seed)
    groups = [np.arange(n)] if labels is None else [np.flatnonzero(labels == c) for c in np.unique(labels)]
    train, test = [], []
    for rows in groups:
        rows = rng.permutation(rows)
        k = 0 if len(rows) < 2 else min(len(rows) - 1, max(1, round(test_fraction * len(rows))))
        test.append(rows[:k])
        train.append(rows[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _split_folders(base: Path) -> dict[str, Path] | None:
    found = {s: next((base / n for n in names if (base / n).is_dir()), None) for s, names in SPLIT_FOLDERS.items()}
    if found["train"] is None:
        return None
    if found["test"] is None:
        raise FileNotFoundError(
            f"{base} has train/ but no test/ (or val/): add one, or put the images in "
            "one folder and let data.test_fraction split them"
        )
    return found  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# prepare
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Split:
    """One split's image paths, labels (None: unlabelled) and the folder they are listed under."""

    paths: list[Path]
    labels: np.ndarray | None
    files_root: Path


def _read_splits(base: Path, test_fraction: float, seed: int) -> tuple[dict[str, _Split], list[str], str]:
    """({"train", "test"}: split}, class names, how the split was made) of the folder ``base``."""
    folders = _split_folders(base)
    if folders is not None:
        train_paths, train_labels, classes = list_images(folders["train"])
        test_paths, test_labels, _ = list_images(folders["test"], classes if classes else None)
        if (train_labels is None) != (test_labels is None):
            raise BadSourceError(
                f"{folders['train']} and {folders['test']} differ in layout: both class sub-folders or both flat"
            )
        splits = {
            "train": _Split(train_paths, train_labels, folders["train"]),
            "test": _Split(test_paths, test_labels, folders["test"]),
        }
        return splits, classes, "the train/ and test/ folders"
    paths, labels, classes = list_images(base)
    tr, te = split_files(labels, len(paths), test_fraction, seed)
    if len(te) == 0:
        raise BadSourceError(f"{base}: {len(paths)} image(s) leave none for the test split; add images")
    splits = {
        "train": _Split([paths[i] for i in tr], None if labels is None else labels[tr], base),
        "test": _Split([paths[i] for i in te], None if labels is None else labels[te], base),
    }
    return splits, classes, f"per class, a seeded shuffle (seed {seed}) with test_fraction {test_fraction}"


def _split_meta(
    root, split: str, classes: list[str], rule: str, resolution: int, store_flips: bool, listed: int
) -> dict:
    return {
        "source": f"imagefolder {split}",
        "root": str(root),
        "num_classes": len(classes),
        "classes": classes,
        "label_rule": (
            "index of the class folder name in the sorted class folder names"
            if classes
            else "none: a flat folder (unconditional)"
        ),
        "split_rule": rule,
        "preprocessing": f"ADM center_crop_arr({resolution})",
        "flip": {"stored": bool(store_flips)},
        "listed": listed,
    }


def prepare_imagefolder(
    out_dir: str | Path,
    source: SourceInput,
    resolution: int,
    *,
    test_fraction: float = 0.2,
    seed: int = 0,
    store_flips: bool = False,
    options: PrepareOptions = PrepareOptions(),
) -> dict[str, Manifest]:
    """Write ``out_dir/train`` and ``out_dir/test``: images uint8 (N, 3, resolution, resolution),
    ``labels`` int64 when the folder has classes (plus ``flipped`` with ``store_flips``).
    ``source``: see :func:`locate`."""
    if resolution < 1:
        raise ValueError(f"resolution must be >= 1, got {resolution}")
    out_dir = Path(out_dir)
    check_splits_absent(out_dir, ("train", "test"), options.overwrite)
    base = locate(source, progress=options.progress)
    splits, classes, rule = _read_splits(base, test_fraction, seed)
    manifests = {}
    for split, s in splits.items():
        meta = _split_meta(source.root, split, classes, rule, resolution, store_flips, len(s.paths))
        extra = {"labels": s.labels} if s.labels is not None else {}
        files = SplitFiles("imagefolder", split, s.paths, files_root=s.files_root, extra=extra, meta=meta)
        manifests[split], _ = write_adm_split(out_dir / split, files, resolution, options, flip=store_flips)
    return manifests
