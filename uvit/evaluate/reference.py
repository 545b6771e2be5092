"""Reference FID statistics of a stored image split, streamed: bounded memory at any split size.

The split (a :func:`uvit.data.shards.write_split` directory) is read shard by shard and, within a
shard, batch by batch straight from its ``.npy`` file (plain reads, no memory map, so neither the
split nor a whole shard is ever resident). Each batch goes through the feature extractor and into
running float64 statistics; the features of a fixed, evenly spaced subset of rows (the KID
reference) are kept as they pass. What is held at any time: one batch of images and its features,
the (D,) mean, the (D, D) co-moment matrix and the (K, D) KID rows.

- :func:`stream_statistics`: any features function (uint8 batch -> (B, D) features).
- :func:`extractor_statistics`: torch-fidelity's extractor objects (Inception or the digits
  classifier), created as :mod:`uvit.evaluate.fid` creates them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from tqdm import tqdm

from uvit.data.shards import DataIntegrityError, Manifest

__all__ = [
    "KID_REFERENCE_ROWS",
    "ReferenceStatistics",
    "RunningMoments",
    "extractor_statistics",
    "iter_image_batches",
    "kid_rows",
    "stream_statistics",
]

# Reference features kept for KID (a fixed, evenly spaced subset: KID needs features, not statistics).
KID_REFERENCE_ROWS = 10_000

FeaturesFn = Callable[[np.ndarray], "np.ndarray | torch.Tensor"]


@dataclass
class ReferenceStatistics:
    """The reference of one split: ``mu`` float64 (D,) and ``sigma`` float64 (D, D) (mean and
    sample covariance, ddof=1, of all N rows' features), ``kid_features`` float32 (K, D) (the
    features of rows :func:`kid_rows`\\ (N, K), in that order) and ``count`` N."""

    mu: np.ndarray
    sigma: np.ndarray
    kid_features: np.ndarray
    count: int


class RunningMoments:
    """Mean and covariance of rows seen in batches, in float64, merged by Chan et al.'s pairwise
    update (each batch's centred co-moments plus a correction for the shift of the mean), so the
    result matches ``np.mean``/``np.cov`` over all rows to rounding, with no cancellation."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: np.ndarray | None = None  # float64 (D,)
        self.m2: np.ndarray | None = None  # float64 (D, D): sum of outer products of centred rows

    def update(self, x: np.ndarray) -> None:
        """Add a batch of rows x (B, D)."""
        x = np.asarray(x, dtype=np.float64)
        n_b = len(x)
        if n_b == 0:
            return
        mean_b = x.mean(axis=0)
        centred = x - mean_b
        m2_b = centred.T @ centred
        if self.count == 0:
            self.count, self.mean, self.m2 = n_b, mean_b, m2_b
            return
        n = self.count + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + np.outer(delta, delta) * (self.count * n_b / n)
        self.count = n

    def statistics(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu float64 (D,), sigma float64 (D, D)), sigma with ddof=1 as ``np.cov``."""
        if self.count < 2:
            raise ValueError(f"FID statistics need at least 2 rows (a covariance), got {self.count}")
        return self.mean.copy(), self.m2 / (self.count - 1)


def kid_rows(count: int, limit: int = KID_REFERENCE_ROWS) -> np.ndarray:
    """int64 (min(count, limit),): the evenly spaced row indices whose features are kept for KID."""
    return np.linspace(0, count - 1, min(count, limit)).round().astype(np.int64)


def iter_image_batches(
    split: str | Path, field: str = "images", batch_size: int = 256
) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, uint8 images (B, C, H, W)) over the split in row order, B <= batch_size (a
    batch never spans two shards). Each batch is read from its shard file on its own, so memory
    holds one batch, whatever the shard and split sizes; shapes and dtypes are checked against the
    manifest (:class:`~uvit.data.shards.DataIntegrityError` on a mismatch)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    root = Path(split)
    manifest = Manifest.load(root)
    if field not in manifest.fields:
        raise KeyError(f"no field {field!r} in {root}; fields: {sorted(manifest.fields)}")
    spec = manifest.fields[field]
    offsets = manifest.offsets
    for k, entry in enumerate(manifest.shards):
        path = root / entry.files[field].name
        with open(path, "rb") as f:
            data_start = _check_npy_header(f, path, (entry.count, *spec.shape), spec.np_dtype)
            row_items = int(np.prod(spec.shape, dtype=np.int64))
            row_bytes = row_items * spec.np_dtype.itemsize
            for start in range(0, entry.count, batch_size):
                n = min(batch_size, entry.count - start)
                f.seek(data_start + start * row_bytes)
                batch = np.fromfile(f, dtype=spec.np_dtype, count=n * row_items)
                if batch.size != n * row_items:
                    raise DataIntegrityError(f"{path}: truncated at row {start} (run the data stage again)")
                yield int(offsets[k]) + start, batch.reshape(n, *spec.shape)


def _check_npy_header(f, path: Path, shape: tuple[int, ...], dtype: np.dtype) -> int:
    """Read the .npy header of open file f, check it against the manifest; -> offset of the data."""
    try:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        file_shape, fortran, file_dtype = read(f)
    except ValueError as e:
        raise DataIntegrityError(f"Cannot read {path}: {e} (run the data stage again)") from e
    if tuple(file_shape) != shape or file_dtype != dtype or (fortran and len(shape) > 1):
        raise DataIntegrityError(
            f"{path}: expected C-ordered {dtype} {shape}, found {file_dtype} "
            f"{tuple(file_shape)}{' (Fortran order)' if fortran else ''} "
            f"(run the data stage again)"
        )
    return f.tell()


def stream_statistics(
    split: str | Path,
    features: FeaturesFn,
    *,
    batch_size: int = 256,
    kid_limit: int = KID_REFERENCE_ROWS,
    progress: bool | None = None,
    desc: str = "reference statistics",
) -> ReferenceStatistics:
    """Statistics of ``features(images)`` over every row of the split's ``images`` field.

    features: uint8 (B, C, H, W) numpy -> float (B, D) (numpy or tensor). progress: a tqdm bar over
    the images on stderr; None shows it only when stderr is a terminal, False never.
    """
    count = Manifest.load(split).count
    rows = kid_rows(count, kid_limit)
    moments = RunningMoments()
    kid: np.ndarray | None = None
    with tqdm(
        total=count, desc=desc, unit="img", disable=None if progress is None else not progress, ascii=True
    ) as bar:
        for start, images in iter_image_batches(split, batch_size=batch_size):
            f = features(images)
            f = f.detach().cpu().numpy() if isinstance(f, torch.Tensor) else np.asarray(f)
            if f.ndim != 2 or len(f) != len(images):
                raise ValueError(f"features must be (B, D) for B={len(images)} images, got {f.shape}")
            moments.update(f)
            if kid is None:
                kid = np.empty((len(rows), f.shape[1]), np.float32)
            # Positions in `rows` that fall in this batch (rows is sorted).
            lo, hi = np.searchsorted(rows, [start, start + len(images)], side="left")
            kid[lo:hi] = f[rows[lo:hi] - start]
            bar.update(len(images))
    mu, sigma = moments.statistics()
    return ReferenceStatistics(mu=mu, sigma=sigma, kid_features=kid, count=count)


def extractor_statistics(
    split: str | Path,
    *,
    extractor: str = "inception",
    weights_path: str | Path | None = None,
    classifier_path: str | Path | None = None,
    device: str = "cpu",
    batch_size: int = 256,
    kid_limit: int = KID_REFERENCE_ROWS,
    progress: bool | None = None,
) -> ReferenceStatistics:
    """:func:`stream_statistics` in the FID feature space of ``extractor`` ("inception": the
    2048-d pool features; "digits-classifier": its penultimate features), the torch-fidelity
    extractor object created as :mod:`uvit.evaluate.fid` creates it; grey images are repeated to
    RGB for Inception."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
    from torch_fidelity.utils import create_feature_extractor

    from uvit.evaluate.fid import _on_device, _resolve

    name, weights, rgb = _resolve(extractor, weights_path, classifier_path)
    layer = FEATURE_EXTRACTORS_REGISTRY[name].get_default_feature_layer_for_metric("fid")
    with _on_device(device) as cuda:
        module = create_feature_extractor(
            name, [layer], cuda=cuda, feature_extractor_weights_path=weights, verbose=False
        )

        @torch.no_grad()
        def features(images: np.ndarray) -> torch.Tensor:
            x = torch.from_numpy(images)
            if rgb and x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1).contiguous()
            if cuda:
                x = x.cuda(non_blocking=True)
            return module.convert_features_tuple_to_dict(module(x))[layer].cpu()

        return stream_statistics(
            split,
            features,
            batch_size=batch_size,
            kid_limit=kid_limit,
            progress=progress,
            desc=f"reference statistics ({extractor})",
        )
