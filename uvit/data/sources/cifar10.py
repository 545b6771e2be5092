"""CIFAR-10 from the official *binary* archive (``cifar-10-binary.tar.gz``).

The binary version is used, not the Python one: the Python version's batches are pickles, and
unpickling a downloaded file can run arbitrary code. Each ``data_batch_{1..5}.bin`` /
``test_batch.bin`` is a sequence of 3073-byte records: one label byte (0..9), then the 32x32 image
as 1024 red, 1024 green, 1024 blue bytes (row-major), i.e. already uint8 CHW. The archive is read in
place (no extraction). Train: 50,000 images, test: 10,000.

U-ViT's CIFAR-10 transform (ToTensor, Normalize(0.5, 0.5), RandomHorizontalFlip on train) happens
at training time; the splits store the raw pixels.
"""

from __future__ import annotations

import tarfile
import zlib
from pathlib import Path, PurePosixPath

import numpy as np

from uvit.data.download import BadSourceError, SourceInput, fetch, is_remote, open_tar, verify_file
from uvit.data.preprocess import PrepareOptions, check_splits_absent
from uvit.data.shards import Manifest, write_split

NAME = "cifar10"
URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
ARCHIVE_NAME = "cifar-10-binary.tar.gz"
MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
NUM_CLASSES = 10
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
SPLIT_FILES = {
    "train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
    "test": ("test_batch.bin",),
}
EXPECTED_COUNTS = {"train": 50_000, "test": 10_000}
RECORD_BYTES = 1 + 3 * 32 * 32

__all__ = [
    "ARCHIVE_NAME",
    "CLASSES",
    "EXPECTED_COUNTS",
    "MD5",
    "NAME",
    "NUM_CLASSES",
    "URL",
    "prepare_cifar10",
    "read_cifar10_binary",
]


def parse_records(data: bytes, source: str) -> tuple[np.ndarray, np.ndarray]:
    """One ``.bin`` batch -> images uint8 (N, 3, 32, 32), labels int64 (N,)."""
    if len(data) == 0 or len(data) % RECORD_BYTES:
        raise BadSourceError(
            f"{source}: {len(data)} bytes is not a whole number of {RECORD_BYTES}-byte "
            f"CIFAR-10 records; the archive is corrupt or not the binary version."
        )
    rec = np.frombuffer(data, dtype=np.uint8).reshape(-1, RECORD_BYTES)
    labels = rec[:, 0].astype(np.int64)
    if labels.max() >= NUM_CLASSES:
        bad = int(np.argmax(labels >= NUM_CLASSES))
        raise BadSourceError(
            f"{source}: record {bad} has label {labels[bad]}, expected 0..9; the "
            f"archive is corrupt or not the CIFAR-10 binary version."
        )
    return rec[:, 1:].reshape(-1, 3, 32, 32).copy(), labels


def read_cifar10_binary(
    archive: str | Path,
    splits: tuple[str, ...] = ("train", "test"),
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Read the splits straight out of the (gzipped) tar: split -> (images, labels)."""
    archive = Path(archive)
    fix = f"; expected {ARCHIVE_NAME} from {URL}. Delete it and run again to re-download."
    with open_tar(archive, fix) as tar:
        try:
            members = {PurePosixPath(m.name).name: m for m in tar.getmembers() if m.isfile()}
        except (tarfile.TarError, EOFError, zlib.error) as e:
            raise BadSourceError(
                f"{archive}: cannot list the archive ({type(e).__name__}: {e}); it is "
                f"truncated or corrupt: fetch {ARCHIVE_NAME} from {URL} again."
            ) from e
        wanted = [f for s in splits for f in SPLIT_FILES[s]]
        missing = [f for f in wanted if f not in members]
        if missing:
            hint = (
                f" This looks like the Python (pickle) version, which is not accepted: use {ARCHIVE_NAME}."
                if "data_batch_1" in members
                else ""
            )
            raise BadSourceError(
                f"{archive} lacks {', '.join(missing)}; expected the CIFAR-10 binary "
                f"archive {ARCHIVE_NAME} from {URL}.{hint}"
            )
        out = {}
        for split in splits:
            parts = []
            for fname in SPLIT_FILES[split]:
                try:
                    with tar.extractfile(members[fname]) as f:
                        data = f.read()
                except (tarfile.TarError, EOFError, zlib.error) as e:  # truncated or damaged gzip/tar
                    raise BadSourceError(
                        f"{archive}: cannot read {members[fname].name} ({type(e).__name__}: "
                        f"{e}); the archive is truncated or corrupt: fetch {ARCHIVE_NAME} "
                        f"from {URL} again."
                    ) from e
                parts.append(parse_records(data, f"{archive}:{members[fname].name}"))
            out[split] = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    return out


def _locate_archive(source: SourceInput, md5: str | None, url: str, progress: bool) -> Path:
    """The local archive ``source.root`` stands for (fetched when it is None or a URL), verified."""
    sha256, archive = source.sha256, source.root
    if archive is None:
        return fetch(url, source.downloads() / ARCHIVE_NAME, md5=md5, sha256=sha256, progress=progress)
    if is_remote(archive):
        name = PurePosixPath(str(archive).split("?")[0]).name or ARCHIVE_NAME
        return fetch(str(archive), source.downloads() / name, md5=md5, sha256=sha256, progress=progress)
    path = Path(archive)
    if not path.is_file():
        raise FileNotFoundError(
            f"CIFAR-10 archive {path} does not exist (or is not a file). Leave "
            f"the root unset to download {URL}, or place {ARCHIVE_NAME} there."
        )
    return verify_file(path, md5=md5, sha256=sha256) if md5 or sha256 else path


def _check_official_counts(path: Path, data: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """The verified official archive: its counts are known."""
    for split, (images, _) in data.items():
        if len(images) != EXPECTED_COUNTS[split]:
            raise BadSourceError(f"{path}: {split} has {len(images)} images, expected {EXPECTED_COUNTS[split]}")


def _split_meta(source: SourceInput, url: str, path: Path, md5: str | None, split: str, count: int) -> dict:
    return {
        "source": str(source.root) if source.root is not None else url,
        "archive": path.name,
        "archive_md5": md5,
        "md5_verified": md5 is not None,
        "archive_sha256": source.sha256,
        "sha256_verified": source.sha256 is not None,
        "files": list(SPLIT_FILES[split]),
        "num_classes": NUM_CLASSES,
        "classes": list(CLASSES),
        "preprocessing": "none: the binary records' uint8 CHW pixels as stored; U-ViT's "
        "ToTensor/Normalize(0.5, 0.5)/RandomHorizontalFlip happen at training",
        "count": int(count),
        "expected_count": EXPECTED_COUNTS[split],
    }


def prepare_cifar10(
    out_dir: str | Path,
    source: SourceInput = SourceInput(),
    *,
    splits: tuple[str, ...] = ("train", "test"),
    options: PrepareOptions = PrepareOptions(),
    url: str = URL,
) -> dict[str, Manifest]:
    """Write ``out_dir/train`` (50k) and ``out_dir/test`` (10k): images uint8 (N, 3, 32, 32),
    labels int64.

    ``source.root`` (the archive): None downloads ``url`` into ``source.download_dir`` with
    :func:`~uvit.data.download.fetch` (resumable; skipped when the verified file is already
    there); an ``http(s)://`` / ``s3://`` URL is fetched the same way; a local path is read in
    place. The archive's MD5 must be ``source.md5`` (``"auto"``: the official one unless a
    ``sha256`` is declared) and its SHA-256 ``source.sha256`` when given: a copy of your own (a
    subset, a miniature) passes with its ``sha256``; only ``md5=None`` without ``sha256`` skips
    the check (test fixtures). Of ``options`` only ``shard_size``, ``overwrite`` and ``progress``
    apply (nothing is decoded).
    """
    unknown = set(splits) - set(SPLIT_FILES)
    if unknown:
        raise ValueError(f"unknown CIFAR-10 split(s) {sorted(unknown)}; choose from {list(SPLIT_FILES)}")
    out_dir = Path(out_dir)
    check_splits_absent(out_dir, splits, options.overwrite)
    md5 = source.md5_for(MD5)
    path = _locate_archive(source, md5, url, options.progress)
    data = read_cifar10_binary(path, splits)
    if md5 == MD5:
        _check_official_counts(path, data)
    manifests = {}
    for split, (images, labels) in data.items():
        meta = _split_meta(source, url, path, md5, split, len(images))
        manifests[split] = write_split(
            out_dir / split,
            {"images": images, "labels": labels},
            name=NAME,
            split=split,
            shard_size=options.shard_size,
            meta=meta,
            overwrite=options.overwrite,
        )
    return manifests
