"""ImageNet (ILSVRC2012) at 64/256/512 for U-ViT's ``imagenet64`` / ``imagenet256`` / ``imagenet512``.

ImageNet needs an account at https://image-net.org, so it is never downloaded from there; ``root``
points at a copy you have. Accepted forms of ``root``:

1. A folder with ``train/`` (and optionally ``val/``), each holding one sub-folder per class::

       ROOT/train/n01440764/n01440764_10026.JPEG
       ROOT/train/n01443537/...                       (1000 class folders, 1,281,167 images)
       ROOT/val/n01440764/ILSVRC2012_val_00000293.JPEG (val sorted into class folders, e.g. by
                                                       the well-known valprep.sh)

2. The ``train`` class-folder directory itself (train split only).
3. The official ``ILSVRC2012_img_train.tar`` (a tar of 1000 per-class tars ``nXXXXXXXX.tar``), as a
   local path or an ``s3://`` / ``http(s)://`` URL: a URL is fetched into ``download_dir`` first
   (resumable, MD5-checked for the official name), then the tar is extracted once into
   ``extract_dir/train/<synset>/`` (one class at a time, each renamed into place when complete, so
   an interrupted extraction resumes; another tar, by name, size or modification time, is
   extracted afresh) and used as in 1. A tar of your own (a subset) passes with its ``sha256``.

Labels are the index of the class folder name in the sorted list of train class folders (for the
official data identical to ADM/U-ViT's sorted synset prefixes of the file names). Images go through
ADM's :func:`~uvit.data.preprocess.center_crop_arr` at ``resolution`` (no flip, like the feature
extraction script); ``flip=True`` also stores each image's horizontal mirror as extra rows, as the
latent benchmarks do (their 2 x 1,281,167 stored features).

Disk: rows are decoded into a scratch memmap beside ``out_dir`` and then sharded, so ``out_dir``'s
filesystem needs about twice the split's size free (64px: 15.7 GB per copy; 256px: 252 GB;
512px: 1 TB — for the latent benchmarks encode to latents instead of keeping these).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tarfile
import uuid
from pathlib import Path, PurePosixPath

import numpy as np

from uvit.data.download import AUTO, BadSourceError, SourceInput, fetch, is_remote, open_tar, verify_file
from uvit.data.preprocess import PrepareOptions, SplitFiles, check_splits_absent, write_adm_split
from uvit.data.shards import Manifest
from uvit.fileio import read_json_or_none

TRAIN_TAR = "ILSVRC2012_img_train.tar"
TRAIN_TAR_MD5 = "1d675b47d978889d74fa0da5fadfb00e"  # as torchvision.datasets.ImageNet checks it
EXPECTED_COUNTS = {"train": 1_281_167, "val": 50_000}
NUM_CLASSES = 1000
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif")  # ADM's _list_image_files_recursively
SYNSET = re.compile(r"^n\d{8}$")
_EXTRACTED_MARKER = ".extracted"
_SOURCE_RECORD = ".source"  # the tar being extracted (an interrupted extraction resumes only from it)

__all__ = [
    "EXPECTED_COUNTS",
    "IMAGE_EXTENSIONS",
    "TRAIN_TAR",
    "TRAIN_TAR_MD5",
    "extract_train_tar",
    "list_class_folder",
    "missing_root_help",
    "prepare_imagenet",
]


def missing_root_help(resolution: int) -> str:
    return (
        "ImageNet (ILSVRC2012) is not downloaded automatically: it needs an account at "
        "https://image-net.org (sign up, accept the terms of access, then download "
        f"{TRAIN_TAR}, 138 GB, from the ILSVRC2012 download page). Expected: ROOT/train/<synset>/"
        "*.JPEG, i.e. 1000 class folders such as ROOT/train/n01440764/n01440764_10026.JPEG "
        f"(extract the tar of per-class tars: `mkdir -p ROOT/train && tar -xf {TRAIN_TAR} -C "
        "ROOT/train && cd ROOT/train && for f in *.tar; do mkdir ${f%.tar} && tar -xf $f -C "
        "${f%.tar} && rm $f; done`), or ROOT may be that train folder itself, or the path or "
        f"s3:// / https:// URL of {TRAIN_TAR} (extracted for you). Set it as "
        f"`imagenet{resolution}.data.root: ROOT` in params.yaml (or pass root=ROOT)."
    )


# --------------------------------------------------------------------------------------------
# Locating the data
# --------------------------------------------------------------------------------------------


def _safe_name(name: str) -> bool:
    return bool(name) and not name.startswith(".") and "/" not in name and "\\" not in name


def _tar_identity(tar_path: Path) -> dict:
    """What tells one tar from another without reading it: name, size, modification time."""
    st = tar_path.stat()
    return {"name": tar_path.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _members(tar: tarfile.TarFile, tar_path: Path):
    """The tar's members; a truncated or damaged tar is a BadSourceError naming it."""
    it = iter(tar)
    while True:
        try:
            member = next(it)
        except StopIteration:
            return
        except (tarfile.TarError, EOFError) as e:
            raise BadSourceError(
                f"{tar_path}: cannot read the archive past {tar.offset} bytes ({e}); it is "
                f"truncated or corrupt: fetch {TRAIN_TAR} again."
            ) from e
        yield member


def extract_train_tar(tar_path: str | Path, extract_dir: str | Path, progress: bool = True) -> Path:
    """Extract the official tar of per-class tars into ``extract_dir/train/<synset>/`` and return
    ``extract_dir``. Only regular image files are written, under their base names (no paths from
    the archive are trusted). Finished classes are kept across interruptions of the same tar; a
    marker file records a complete extraction of this tar (name, size, modification time), after
    which this returns at once. Classes extracted from another tar are removed first."""
    from tqdm.auto import tqdm

    tar_path, extract_dir = Path(tar_path), Path(extract_dir)
    marker = extract_dir / _EXTRACTED_MARKER
    identity = _tar_identity(tar_path)
    done = read_json_or_none(marker) if marker.is_file() else None
    if done is not None and done.get("tar") == identity:
        return extract_dir
    train = extract_dir / "train"
    source = extract_dir / _SOURCE_RECORD
    if (read_json_or_none(source) or {}).get("tar") != identity:  # another tar's classes: start over
        marker.unlink(missing_ok=True)
        shutil.rmtree(train, ignore_errors=True)
        extract_dir.mkdir(parents=True, exist_ok=True)
        source.write_text(json.dumps({"tar": identity}) + "\n")
    train.mkdir(parents=True, exist_ok=True)
    classes = 0
    outer = open_tar(tar_path, f". Expected {TRAIN_TAR}, a tar of per-class tars; delete it and fetch it again.")
    with outer, tqdm(desc=f"extract {tar_path.name}", unit="class", disable=not progress, leave=False) as bar:
        for member in _members(outer, tar_path):
            name = PurePosixPath(member.name).name
            synset = name[: -len(".tar")] if name.endswith(".tar") else ""
            if not member.isfile() or not SYNSET.match(synset):
                continue
            classes += 1
            bar.update(1)
            final = train / synset
            if final.is_dir():  # finished by an earlier, interrupted run
                continue
            tmp = train / f".{synset}.tmp-{uuid.uuid4().hex}"
            tmp.mkdir()
            try:
                with tarfile.open(fileobj=outer.extractfile(member), mode="r|*") as inner:
                    for item in inner:
                        iname = PurePosixPath(item.name).name
                        if not item.isfile() or not _safe_name(iname) or not iname.lower().endswith(IMAGE_EXTENSIONS):
                            continue
                        with inner.extractfile(item) as src, open(tmp / iname, "wb") as dst:
                            shutil.copyfileobj(src, dst, 1 << 20)
                os.rename(tmp, final)
            except (tarfile.TarError, EOFError) as e:
                raise BadSourceError(
                    f"{tar_path}: the class archive {member.name} is corrupt ({e}); fetch {TRAIN_TAR} again."
                ) from e
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    if classes == 0:
        raise BadSourceError(f"{tar_path} contains no per-class tars nXXXXXXXX.tar; expected the official {TRAIN_TAR}.")
    marker.write_text(json.dumps({"tar": identity, "classes": classes}) + "\n")
    return extract_dir


def _official_md5(name: str) -> str | None:
    """The official MD5 of a tar named ``name`` (None: not the official file name)."""
    return TRAIN_TAR_MD5 if name == TRAIN_TAR else None


def _fetch_tar(source: SourceInput, resolution: int, progress: bool) -> Path:
    """The tar at the URL ``source.root``, fetched into the download folder and verified."""
    name = PurePosixPath(str(source.root).split("?")[0]).name
    if not name.endswith(".tar"):
        raise BadSourceError(
            f"ImageNet root {source.root} is a URL but not of a .tar; only the "
            f"{TRAIN_TAR} archive can be fetched. {missing_root_help(resolution)}"
        )
    md5 = source.md5_for(_official_md5(name))
    return fetch(str(source.root), source.downloads() / name, md5=md5, sha256=source.sha256, progress=progress)


def _resolve_root(source: SourceInput, resolution: int, extract_dir: Path | None, progress: bool) -> Path:
    """The folder ``source.root`` stands for: the root itself, or where its tar is extracted."""
    root = source.root
    if root is None or str(root) == "":
        raise FileNotFoundError(f"No ImageNet root given. {missing_root_help(resolution)}")
    if is_remote(root):
        tar_path = _fetch_tar(source, resolution, progress)
        md5 = sha256 = None  # fetch verified it
    else:
        root = Path(root)
        if not root.exists():
            raise FileNotFoundError(f"ImageNet root {root} does not exist. {missing_root_help(resolution)}")
        if not root.is_file():
            if source.md5 not in (None, AUTO) or source.sha256 is not None:
                raise BadSourceError(
                    f"ImageNet root {root} is a folder, but a checksum was given for it; "
                    f"checksums apply to a tar root only (drop them, or point the root at "
                    f"the tar)."
                )
            return root
        tar_path = root
        # Verified on every run, extracted or not (a full read: minutes, next to hours of decoding),
        # so a replaced or damaged tar never passes on the strength of an earlier extraction.
        md5, sha256 = source.md5_for(_official_md5(tar_path.name)), source.sha256
    if md5 is not None or sha256 is not None:
        verify_file(tar_path, md5=md5, sha256=sha256)
    extract_dir = extract_dir or source.downloads() / tar_path.name.removesuffix(".tar")
    return extract_train_tar(tar_path, extract_dir, progress=progress)


def _class_dirs(folder: Path) -> list[str]:
    return sorted(d.name for d in folder.iterdir() if d.is_dir() and _safe_name(d.name))


def _split_folders(root: Path, splits: tuple[str, ...], resolution: int) -> dict[str, Path]:
    if (root / "train").is_dir() or any((root / s).is_dir() for s in splits):
        folders = {s: root / s for s in splits}
        for s, f in folders.items():
            if not f.is_dir():
                raise FileNotFoundError(f"ImageNet split folder {f} does not exist. {missing_root_help(resolution)}")
        return folders
    if any(SYNSET.match(d) for d in _class_dirs(root)):
        if tuple(splits) != ("train",):
            raise FileNotFoundError(
                f"{root} holds class folders directly, which is read as the "
                f"train split only, but splits={splits}; use ROOT/train and "
                f"ROOT/val. {missing_root_help(resolution)}"
            )
        return {"train": root}
    raise FileNotFoundError(f"{root} has neither train/ nor nXXXXXXXX class folders. {missing_root_help(resolution)}")


def list_class_folder(
    folder: str | Path,
    classes: list[str] | None = None,
) -> tuple[list[Path], np.ndarray, list[str]]:
    """(image paths, int64 labels, class names) of a class-folder tree.

    ``classes`` (default: the sorted sub-folder names of ``folder``) fixes the label order, so val
    uses train's; a sub-folder not in it is an error. Files are listed recursively and sorted.
    """
    folder = Path(folder)
    found = _class_dirs(folder)
    classes = list(classes) if classes is not None else found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise BadSourceError(
            f"{folder} has class folders not among the train classes: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}"
        )
    index = {c: i for i, c in enumerate(classes)}
    paths: list[Path] = []
    labels: list[int] = []
    for c in found:
        files = sorted(
            p
            for p in (folder / c).rglob("*")
            if p.suffix.lower() in IMAGE_EXTENSIONS and _safe_name(p.name) and p.is_file()
        )
        paths += files
        labels += [index[c]] * len(files)
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {folder}'s class folders")
    return paths, np.asarray(labels, dtype=np.int64), classes


# --------------------------------------------------------------------------------------------
# prepare
# --------------------------------------------------------------------------------------------


def _split_meta(root, split: str, classes: list[str], resolution: int, flip: bool, listed: int) -> dict:
    return {
        "source": "ILSVRC2012 " + split,
        "root": str(root),
        "num_classes": len(classes),
        "classes": classes,
        "label_rule": "index of the class folder name in the sorted train class folders",
        "preprocessing": (
            f"ADM center_crop_arr({resolution}): BOX halving while the short "
            f"side >= {2 * resolution}, BICUBIC to short side {resolution}, "
            f"centre crop"
        ),
        "flip": (
            {
                "stored": True,
                "layout": "rows [0, N) are the images, rows [N, 2N) their "
                "horizontal mirrors in the same order; field 'flipped' is 1 for mirrors",
            }
            if flip
            else {"stored": False}
        ),
        "listed": listed,
        "expected_count": EXPECTED_COUNTS[split] if len(classes) == NUM_CLASSES else None,
    }


def prepare_imagenet(
    out_dir: str | Path,
    source: SourceInput,
    resolution: int,
    splits: tuple[str, ...] = ("train",),
    flip: bool = False,
    *,
    extract_dir: str | Path | None = None,
    options: PrepareOptions = PrepareOptions(),
) -> dict[str, Manifest]:
    """Write ``out_dir/<split>``: images uint8 (N, 3, resolution, resolution), labels int64
    (plus ``flipped`` uint8 with ``flip=True``: rows [N, 2N) mirror rows [0, N)).

    ``source.root``: see the module docstring; a tar is extracted into ``extract_dir`` (default:
    beside it in ``source.download_dir``). ``source.md5`` checks a tar root (``"auto"``: the
    official MD5 when the file is named ``ILSVRC2012_img_train.tar`` and no ``sha256`` is given,
    else none); ``source.sha256`` too (a tar of your own passes with its digest). A folder root
    takes no checksum. A corrupt image raises :class:`~uvit.data.preprocess.BadImageError`;
    ``options.skip_bad`` skips and lists it. Images smaller than ``resolution`` are upsampled, as
    in ADM (counted in ``meta["num_upsampled"]``).
    """
    if resolution < 1:
        raise ValueError(f"resolution must be >= 1, got {resolution}")
    if not splits or set(splits) - {"train", "val"}:
        raise ValueError(f"splits must be from ('train', 'val'), got {splits}")
    out_dir = Path(out_dir)
    check_splits_absent(out_dir, splits, options.overwrite)
    base = _resolve_root(source, resolution, Path(extract_dir) if extract_dir is not None else None, options.progress)
    folders = _split_folders(base, tuple(splits), resolution)
    train_classes = _class_dirs(base / "train") if (base / "train").is_dir() else None
    manifests = {}
    for split, folder in folders.items():
        paths, labels, classes = list_class_folder(folder, train_classes)
        files = SplitFiles(
            f"imagenet{resolution}",
            split,
            paths,
            files_root=folder,
            extra={"labels": labels},
            meta=_split_meta(source.root, split, classes, resolution, flip, len(paths)),
        )
        manifests[split], _ = write_adm_split(out_dir / split, files, resolution, options, flip=flip)
    return manifests
