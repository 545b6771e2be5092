"""Image decoding and the reference crops, plus the loop that turns many image files into rows.

The crops reproduce the official pipelines exactly; all return HWC uint8 arrays:

- :func:`center_crop_arr` — ADM / guided-diffusion's ImageNet crop (U-ViT ImageNet 64/256/512).
- :func:`celeba_crop` — U-ViT's CelebA 64: fixed 128x128 box at top=57, left=25, then
  ``transforms.Resize(64)`` (for a PIL image that is PIL's antialiased BILINEAR resize).
- :func:`coco_crop` — U-ViT's MS-COCO: centre square of side min(H, W), PIL LANCZOS resize.

:func:`load_rgb` opens and fully decodes one file, converts it to RGB and turns every way a file can
be broken into :class:`BadImageError` naming the file and what to do. :func:`preprocess_images`
applies a crop to a list of files (optionally in worker processes), writing rows into a
preallocated (usually memory-mapped, see :func:`scratch_array`) uint8 NCHW array and either
stopping at the first bad file or, with ``skip_bad=True``, skipping and listing bad files.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import shutil
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from uvit.data.download import BadSourceError

if TYPE_CHECKING:
    from uvit.data.shards import Manifest

__all__ = [
    "BadImageError",
    "CELEBA_ALIGNED_SIZE",
    "CELEBA_CROP_BOX",
    "Crop",
    "PrepareOptions",
    "PreprocessResult",
    "SplitFiles",
    "celeba_crop",
    "check_splits_absent",
    "center_crop_arr",
    "coco_crop",
    "ensure_free_space",
    "load_rgb",
    "preprocess_images",
    "scratch_array",
    "write_adm_split",
    "write_image_split",
]

# CelebA "Align&Cropped" images are 178 wide x 218 high. U-ViT crops the 128x128 box centred at
# (x=89, y=121): left=25, top=57, right=153, bottom=185 (PIL's (left, upper, right, lower)).
CELEBA_ALIGNED_SIZE = (178, 218)
CELEBA_CROP_BOX = (25, 57, 25 + 128, 57 + 128)

_SKIP_HINT = (
    "Remove or replace the file (e.g. re-extract it from the original archive), or pass "
    "skip_bad=True to the dataset source to skip such files and list them in the "
    "manifest's meta."
)


class BadImageError(BadSourceError):
    """An image file that cannot be used (missing, truncated, corrupt, too small). ``path``."""

    def __init__(self, message: str, path: str | Path | None = None):
        super().__init__(message)
        self.path = None if path is None else Path(path)


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


def _to_rgb(im: Image.Image) -> Image.Image:
    """RGB view of any PIL mode; transparency is composited on white."""
    if im.mode == "RGB" and "transparency" not in im.info:
        return im
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        if im.mode == "RGB":
            return im
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N"):  # 16-bit grey: keep the top 8 bits
        arr = (np.asarray(im, dtype=np.uint16) >> 8).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV, I, F


def load_rgb(path: str | Path, *, min_size: tuple[int, int] | None = None) -> Image.Image:
    """Open, verify and fully decode ``path``; return it as a loaded RGB PIL image.

    Greyscale, CMYK, palette and 16-bit images are converted to RGB; RGBA / LA / palette images
    with transparency are composited on white. ``min_size=(width, height)``: a smaller image is an
    error (for crops that need a minimum size). Every failure — missing, unreadable, truncated,
    corrupt, too small — is a :class:`BadImageError` naming the file and saying what to do.
    """
    path = Path(path)
    if not path.is_file():
        raise BadImageError(f"{path}: no such image file. {_SKIP_HINT}", path)
    try:
        with Image.open(path) as im:
            im.verify()  # structure / checksums (PNG CRCs); does not decode pixel data
        im = Image.open(path)
        im.load()  # full decode: catches truncated JPEGs ("image file is truncated")
        rgb = _to_rgb(im)
        if rgb is not im:
            im.close()
    except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ...
        raise BadImageError(
            f"{path}: cannot decode the image ({type(e).__name__}: {e}); the file "
            f"is truncated or corrupt. {_SKIP_HINT}",
            path,
        ) from e
    if min_size is not None and (rgb.width < min_size[0] or rgb.height < min_size[1]):
        raise BadImageError(
            f"{path}: image is {rgb.width}x{rgb.height} (WxH), smaller than the "
            f"{min_size[0]}x{min_size[1]} this crop needs. {_SKIP_HINT}",
            path,
        )
    return rgb


# --------------------------------------------------------------------------------------------
# The reference crops (HWC uint8 out)
# --------------------------------------------------------------------------------------------


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """ADM's ``center_crop_arr`` (guided-diffusion ``image_datasets.py``), verbatim in effect.

    Halve with BOX while the short side is >= 2 * image_size, BICUBIC-resize so the short side is
    image_size (``round`` of each scaled side), then take the centre image_size x image_size.
    Images smaller than image_size are upsampled, as in the reference.
    """
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size]


def celeba_crop(pil_image: Image.Image, size: int = 64) -> np.ndarray:
    """U-ViT's CelebA transform before flip/normalise: ``F.crop(img, 57, 25, 128, 128)`` then
    ``transforms.Resize(size)`` — on a PIL image torchvision calls ``img.resize((size, size),
    BILINEAR)``, which is antialiased. An image that does not contain the crop box is an error."""
    w, h = pil_image.size
    right, bottom = CELEBA_CROP_BOX[2], CELEBA_CROP_BOX[3]
    if w < right or h < bottom:
        raise BadImageError(
            f"image is {w}x{h} (WxH), but the CelebA crop box {CELEBA_CROP_BOX} "
            f"needs at least {right}x{bottom} (aligned CelebA images are "
            f"{CELEBA_ALIGNED_SIZE[0]}x{CELEBA_ALIGNED_SIZE[1]}). {_SKIP_HINT}"
        )
    img = pil_image.crop(CELEBA_CROP_BOX).resize((size, size), resample=Image.BILINEAR)
    return np.asarray(img)


def coco_crop(pil_image: Image.Image, size: int = 256) -> np.ndarray:
    """U-ViT's ``center_crop`` (``datasets.py``): centre square of side min(H, W) by array
    indexing, then PIL LANCZOS resize to size x size."""
    img = np.asarray(pil_image)
    crop = min(img.shape[:2])
    img = img[
        (img.shape[0] - crop) // 2 : (img.shape[0] + crop) // 2, (img.shape[1] - crop) // 2 : (img.shape[1] + crop) // 2
    ]
    out = Image.fromarray(np.ascontiguousarray(img), "RGB").resize((size, size), resample=Image.LANCZOS)
    return np.asarray(out)


# --------------------------------------------------------------------------------------------
# Many files -> rows
# --------------------------------------------------------------------------------------------


@dataclass
class PreprocessResult:
    """``kept``: indices (into the input paths) of the rows written, in order — row j of the output
    is ``paths[kept[j]]``; ``sizes``: (len(kept), 2) original (width, height) of those images;
    ``bad``: ``[{"file": ..., "error": ...}]`` for skipped files (only with ``skip_bad``)."""

    kept: np.ndarray
    sizes: np.ndarray
    bad: list[dict[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class Crop:
    """How one image file becomes one row: ``transform`` (PIL RGB -> HWC uint8; picklable, i.e. a
    module-level function or a ``functools.partial`` of one, for worker processes), ``shape`` the
    (C, H, W) of the row it gives, and ``min_size`` the smallest (width, height) it accepts."""

    transform: Callable[[Image.Image], np.ndarray]
    shape: tuple[int, int, int]
    min_size: tuple[int, int] | None = None


@dataclass(frozen=True)
class PrepareOptions:
    """How a source writes its splits, the same for every source: ``shard_size`` rows per shard,
    ``overwrite`` an existing split, ``skip_bad`` (leave an unusable image out and list it in the
    manifest instead of failing), ``num_workers`` decoding processes (0: this one), ``progress``
    bars."""

    shard_size: int = 50_000
    overwrite: bool = False
    skip_bad: bool = False
    num_workers: int = 0
    progress: bool = True


def _work_one(path: str, crop: Crop):
    """-> (CHW uint8 array, (w, h), None) or (None, None, error message)."""
    try:
        with load_rgb(path, min_size=crop.min_size) as im:
            size = im.size
            arr = np.asarray(crop.transform(im))
    except BadImageError as e:
        msg = str(e)
        return None, None, msg if str(path) in msg else f"{path}: {msg}"
    c, h, w = crop.shape
    if arr.dtype != np.uint8 or arr.shape != (h, w, c):
        raise ValueError(f"{path}: the transform returned {arr.dtype} {arr.shape}, expected uint8 HWC {(h, w, c)}")
    return np.ascontiguousarray(arr.transpose(2, 0, 1)), size, None


def _work_batch(paths: list[str], crop: Crop):
    return [_work_one(p, crop) for p in paths]


def _results(paths: Sequence[str], crop: Crop, num_workers: int, batch: int) -> Iterator[tuple]:
    """Results of ``_work_one`` for every path, in input order."""
    if num_workers <= 0:
        for p in paths:
            yield _work_one(p, crop)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    batches = [list(paths[i : i + batch]) for i in range(0, len(paths), batch)]
    # spawn: the parent may hold threads (torch, tqdm) that make fork unsafe.
    ex = ProcessPoolExecutor(num_workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        pending = []
        it = iter(batches)
        window = 2 * num_workers  # bounded look-ahead: finished rows do not pile up in memory
        for b in it:
            pending.append(ex.submit(_work_batch, b, crop))
            if len(pending) >= window:
                break
        while pending:
            fut = pending.pop(0)
            yield from fut.result()
            nxt = next(it, None)
            if nxt is not None:
                pending.append(ex.submit(_work_batch, nxt, crop))
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


def _relative_name(path: str, root: Path | None) -> str:
    """``path`` relative to ``root`` (POSIX), or as given when it is not below it."""
    if root is not None:
        with contextlib.suppress(ValueError):
            return Path(path).relative_to(root).as_posix()
    return str(path)


def preprocess_images(
    paths: Sequence[str | Path],
    crop: Crop,
    out: np.ndarray,
    options: PrepareOptions = PrepareOptions(),
    *,
    root: str | Path | None = None,
    desc: str = "images",
    batch: int = 64,
) -> PreprocessResult:
    """Decode each path with :func:`load_rgb`, apply ``crop.transform`` and write the rows, CHW,
    to ``out[0], out[1], ...`` (``out``: uint8 (len(paths), *crop.shape) or more rows).

    A bad file raises :class:`BadImageError`, or with ``options.skip_bad`` is left out (later rows
    move up) and listed in the result, its name relative to ``root`` when given.
    ``options.num_workers > 0`` decodes in that many spawned processes, ``batch`` files per task.
    Only ``skip_bad``, ``num_workers`` and ``progress`` of ``options`` apply here.
    """
    from tqdm.auto import tqdm

    n = len(paths)
    if out.dtype != np.uint8 or out.ndim != 4 or out.shape[0] < n or tuple(out.shape[1:]) != tuple(crop.shape):
        raise ValueError(f"out must be uint8 (N>={n}, {', '.join(map(str, crop.shape))}), got {out.dtype} {out.shape}")
    kept: list[int] = []
    sizes: list[tuple[int, int]] = []
    bad: list[dict[str, str]] = []
    root = Path(root) if root is not None else None
    strpaths = [str(p) for p in paths]
    with tqdm(total=n, desc=desc, unit="img", disable=not options.progress, leave=False) as bar:
        results = _results(strpaths, crop, options.num_workers, batch)
        try:
            for i, (arr, size, err) in enumerate(results):
                bar.update(1)
                if err is not None:
                    if not options.skip_bad:
                        raise BadImageError(err, strpaths[i])
                    bad.append({"file": _relative_name(strpaths[i], root), "error": err})
                    continue
                out[len(kept)] = arr
                kept.append(i)
                sizes.append(size)
        finally:
            if hasattr(results, "close"):
                results.close()  # shuts a worker pool down promptly on error
    return PreprocessResult(
        kept=np.asarray(kept, dtype=np.int64), sizes=np.asarray(sizes, dtype=np.int64).reshape(-1, 2), bad=bad
    )


def ensure_free_space(directory: str | Path, nbytes: int, what: str) -> None:
    """Raise ``OSError(ENOSPC)`` with a clear message if ``directory`` has less than ``nbytes``
    free — before hours of decoding, not after."""
    directory = Path(directory)
    probe = directory
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < nbytes:
        raise OSError(
            errno.ENOSPC,
            f"{what} needs about {nbytes / 2**30:.2f} GiB free under {directory}, but only "
            f"{free / 2**30:.2f} GiB is free. Free space there or choose another out_dir.",
        )


@contextlib.contextmanager
def scratch_array(directory: str | Path, shape: tuple[int, ...], dtype=np.uint8) -> Iterator[np.ndarray]:
    """A temporary memory-mapped ``.npy`` array in ``directory`` (deleted on exit): rows too many
    for RAM are written here, then :func:`~uvit.data.shards.write_split` copies them into shards.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f".scratch-{uuid.uuid4().hex}.npy"
    try:
        arr = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=tuple(shape))
        yield arr
    finally:
        path.unlink(missing_ok=True)  # POSIX: an open mapping stays valid until released


def check_splits_absent(out_dir: str | Path, splits: Sequence[str], overwrite: bool) -> None:
    """Fail before any work if a split directory exists and ``overwrite`` is False."""
    if overwrite:
        return
    for split in splits:
        if (Path(out_dir) / split).exists():
            raise FileExistsError(
                f"{Path(out_dir) / split} already exists; pass overwrite=True to replace it (or delete it first)"
            )


@dataclass(frozen=True)
class SplitFiles:
    """The image files of one split and what goes with them: ``name``/``split`` of the manifest,
    ``paths`` (one row each), ``files_root`` (skipped files are listed relative to it), ``extra``
    fields with one row per path (labels, ids, ...) and the source's ``meta``."""

    name: str
    split: str
    paths: Sequence[str | Path]
    files_root: str | Path | None = None
    extra: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)


def _mirror_rows(arr: np.ndarray, k: int) -> None:
    """Rows [k, 2k) of ``arr`` (uint8 (>=2k, C, H, W)) become the horizontal mirrors of rows [0, k),
    copied in blocks of about 64 MiB."""
    row_bytes = int(np.prod(arr.shape[1:]))
    step = max(1, (64 << 20) // max(row_bytes, 1))
    for s in range(0, k, step):
        e = min(k, s + step)
        arr[k + s : k + e] = arr[s:e, :, :, ::-1]


def _split_fields(arr: np.ndarray, files: SplitFiles, res: PreprocessResult, flip: bool) -> dict[str, np.ndarray]:
    """The split's fields: the kept images (and their mirrors), the kept rows of each extra field
    (repeated for the mirrors) and, with ``flip``, ``flipped`` uint8 0/1."""
    n, k, copies = len(files.paths), len(res.kept), 2 if flip else 1
    fields: dict[str, np.ndarray] = {"images": arr[: copies * k]}
    for fname, values in files.extra.items():
        values = np.asarray(values)
        if len(values) != n:
            raise ValueError(f"extra field {fname!r} has {len(values)} rows, expected {n}")
        sel = values[res.kept]
        fields[fname] = np.concatenate([sel] * copies) if flip else sel
    if flip:
        fields["flipped"] = np.repeat(np.array([0, 1], dtype=np.uint8), k)
    return fields


def write_image_split(
    root: str | Path,
    files: SplitFiles,
    crop: Crop,
    options: PrepareOptions = PrepareOptions(),
    *,
    flip: bool = False,
    meta_fn: Callable[[PreprocessResult], dict] | None = None,
) -> tuple[Manifest, PreprocessResult]:
    """Preprocess ``files.paths`` with ``crop`` into a split at ``root``
    (:func:`~uvit.data.shards.write_split`).

    Rows are decoded into a scratch memmap next to ``root`` (so the split need not fit in RAM),
    then sharded. Rows of skipped files are dropped from the extra fields too. ``flip``: rows
    [N, 2N) are the horizontal mirrors of rows [0, N), extra fields repeat, and a uint8 field
    ``flipped`` (0/1) marks them. The manifest's meta is ``files.meta`` with ``count``,
    ``num_skipped`` and ``skipped`` (``[{"file", "error"}]``) added, and whatever
    ``meta_fn(result)`` returns (statistics of the decoded images).
    Returns ``(manifest, PreprocessResult)``.
    """
    from uvit.data.shards import write_split

    root = Path(root)
    check_splits_absent(root.parent, [root.name], options.overwrite)
    n, what = len(files.paths), f"{files.name}/{files.split}"
    if n == 0:
        raise BadSourceError(f"no images to write for {what}")
    copies = 2 if flip else 1
    # scratch + the shards written from it, on the same filesystem
    ensure_free_space(root.parent, 2 * copies * n * int(np.prod(crop.shape)), f"Writing {what}")
    with scratch_array(root.parent, (copies * n, *crop.shape)) as arr:
        res = preprocess_images(files.paths, crop, arr, options, root=files.files_root, desc=what)
        if len(res.kept) == 0:
            raise BadImageError(
                f"all {n} images of {what} are bad (skipped), nothing to "
                f"write; first: {res.bad[0]['error'] if res.bad else '?'}"
            )
        if flip:
            _mirror_rows(arr, len(res.kept))
        fields = _split_fields(arr, files, res, flip)
        meta = {**files.meta, "count": copies * len(res.kept), "num_skipped": len(res.bad), "skipped": res.bad}
        if meta_fn is not None:
            meta.update(meta_fn(res))
        name, split = files.name, files.split
        manifest = write_split(
            root, fields, name=name, split=split, shard_size=options.shard_size, meta=meta, overwrite=options.overwrite
        )
    return manifest, res


def write_adm_split(
    root: str | Path, files: SplitFiles, resolution: int, options: PrepareOptions, *, flip: bool = False
) -> tuple[Manifest, PreprocessResult]:
    """:func:`write_image_split` with ADM's :func:`center_crop_arr` at ``resolution`` (rows
    (3, R, R); ImageNet and image folders). ``meta["num_upsampled"]`` counts the kept images whose
    short side is below ``resolution`` (the crop upsamples them)."""
    crop = Crop(functools.partial(center_crop_arr, image_size=resolution), (3, resolution, resolution))
    return write_image_split(
        root,
        files,
        crop,
        options,
        flip=flip,
        meta_fn=lambda res: {"num_upsampled": int((res.sizes.min(axis=1) < resolution).sum())},
    )
