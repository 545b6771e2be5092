"""Reference FID statistics streamed from a stored split (uvit.evaluate.reference): the same values
as the all-in-memory computation, the fixed KID rows, the score stage's cache, bounded memory."""

from __future__ import annotations

import copy
import gc
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from uvit.config import load_benchmark, load_params
from uvit.data.shards import DataIntegrityError, ShardedArrays, write_split
from uvit.evaluate.reference import (
    RunningMoments,
    extractor_statistics,
    iter_image_batches,
    kid_rows,
    stream_statistics,
)
from uvit.paths import BenchmarkPaths

pytest.importorskip("torch_fidelity")

ROOT = Path(__file__).resolve().parents[1]


def _split(root: Path, images: np.ndarray, shard_size: int) -> Path:
    write_split(
        root,
        {"images": images, "labels": np.zeros(len(images), np.int64)},
        name="t",
        split="train",
        shard_size=shard_size,
    )
    return root


def _in_memory_reference(split: Path, weights: str, kid_limit: int):
    """What score.reference_statistics computed before streaming: every image in memory, one
    extract_features call, torch-fidelity's statistics, then the evenly spaced KID rows."""
    from uvit.evaluate.fid import FeatureSpace, extract_features
    from uvit.evaluate.score import _fid_stats

    images = np.array(ShardedArrays(split).field("images"))
    feats = extract_features(images, ("2048",), FeatureSpace("inception", weights_path=weights))["2048"]
    mu, sigma = _fid_stats(feats)
    rows = np.linspace(0, len(feats) - 1, min(len(feats), kid_limit)).round().astype(np.int64)
    return mu, sigma, feats[rows].numpy().astype(np.float32)


def test_streamed_digits_statistics_equal_torch_fidelitys(tmp_path):
    """The digits classifier's features (an untrained one: the values need not mean anything)
    of 203 images in shards of 50, batches of 16: mu, sigma equal fid_statistics' all-in-memory
    pass (torch-fidelity's own extraction and fid_featuresdict_to_statistics) to rounding."""
    import torch

    from uvit.evaluate.classifier import DigitClassifier, save_classifier
    from uvit.evaluate.fid import FeatureSpace, fid_statistics

    torch.manual_seed(0)
    clf = save_classifier(DigitClassifier(), tmp_path / "clf")
    images = np.random.default_rng(5).integers(0, 256, (203, 1, 8, 8), dtype=np.uint8)
    split = _split(tmp_path / "train", images, shard_size=50)
    mu0, sigma0 = fid_statistics(images, FeatureSpace("digits-classifier", classifier_path=clf))
    st = extractor_statistics(
        split, extractor="digits-classifier", classifier_path=clf, batch_size=16, kid_limit=20, progress=False
    )
    assert st.count == 203 and st.kid_features.shape == (20, mu0.shape[0])
    np.testing.assert_allclose(st.mu, mu0, rtol=0, atol=1e-6 * np.abs(mu0).max())
    np.testing.assert_allclose(st.sigma, sigma0, rtol=0, atol=1e-6 * np.abs(sigma0).max())


def test_running_moments_equal_numpy_over_uneven_batches():
    """Chan's merge over batches of 1..50 rows equals np.mean / np.cov (float64) over all rows,
    also with a mean far from zero (where sum-of-squares formulas lose digits)."""
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(301, 17)) * rng.uniform(0.1, 3, 17) + 1e4).astype(np.float32)
    m = RunningMoments()
    cuts = [0, 1, 2, 52, 60, 61, 200, 301]
    for a, b in zip(cuts, cuts[1:]):
        m.update(x[a:b])
    mu, sigma = m.statistics()
    np.testing.assert_allclose(mu, x.astype(np.float64).mean(0), rtol=1e-13)
    np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="at least 2"):
        one = RunningMoments()
        one.update(x[:1])
        one.statistics()


def test_kid_rows_and_batches_follow_row_order(tmp_path):
    """Features = the pixels themselves, so the kept KID rows must be exactly images[kid_rows]."""
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (23, 1, 2, 2), dtype=np.uint8)
    split = _split(tmp_path / "s", images, shard_size=10)
    starts = [(s, len(b)) for s, b in iter_image_batches(split, batch_size=4)]
    assert starts == [(0, 4), (4, 4), (8, 2), (10, 4), (14, 4), (18, 2), (20, 3)]  # never across shards
    for limit in (5, 23, 100):
        st = stream_statistics(
            split, lambda b: b.reshape(len(b), -1).astype(np.float32), batch_size=4, kid_limit=limit, progress=False
        )
        rows = kid_rows(23, limit)
        assert len(rows) == min(23, limit) and rows[0] == 0 and rows[-1] == 22
        np.testing.assert_array_equal(st.kid_features, images[rows].reshape(len(rows), -1))
        np.testing.assert_allclose(st.mu, images.reshape(23, -1).mean(0), rtol=1e-12)


def test_a_shard_that_disagrees_with_the_manifest_is_refused(tmp_path):
    split = _split(tmp_path / "s", np.zeros((6, 1, 2, 2), np.uint8), shard_size=3)
    np.save(split / "images-00001.npy", np.zeros((3, 1, 2, 3), np.uint8))
    with pytest.raises(DataIntegrityError, match="images-00001.npy"):
        list(iter_image_batches(split))


def _cifar_like(tmp_path: Path, weights: str):
    params = copy.deepcopy(load_params(ROOT / "params.yaml"))
    params["cifar10"]["score"].update(inception_weights=weights)
    cfg = load_benchmark("cifar10", params)
    paths = BenchmarkPaths("cifar10", tmp_path)
    images = np.random.default_rng(3).integers(0, 256, (4, 3, 16, 16), dtype=np.uint8)
    _split(paths.data / "train", images, shard_size=3)
    return cfg, paths


def test_score_reference_statistics_equal_the_in_memory_ones_then_read_the_cache(
    tmp_path, random_inception_weights, monkeypatch
):
    """score.reference_statistics (Inception, 4 images in shards of 3 and 1) against the code it
    replaced (one in-memory pass): mu, sigma and the KID features agree to float32 rounding of the
    features (the old mean was a float32 mean, ours is float64); then the cache keyed by the
    manifest digest is read back without extracting again."""
    import uvit.evaluate.reference as reference
    from uvit.evaluate.score import reference_statistics
    from uvit.fileio import sha256_file

    cfg, paths = _cifar_like(tmp_path, random_inception_weights)
    mu, sigma, kid_features = reference_statistics(cfg, paths, progress=False)
    mu0, sigma0, kid0 = _in_memory_reference(paths.data / "train", random_inception_weights, kid_limit=10_000)
    assert mu.dtype == sigma.dtype == np.float64 and kid_features.dtype == np.float32
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048) and kid_features.shape == (4, 2048)
    assert np.abs(sigma0).max() > 0
    np.testing.assert_allclose(mu, mu0, rtol=0, atol=1e-5 * np.abs(mu0).max())
    np.testing.assert_allclose(sigma, sigma0, rtol=0, atol=1e-5 * np.abs(sigma0).max())
    np.testing.assert_allclose(kid_features, kid0, rtol=0, atol=1e-5 * np.abs(kid0).max())
    digest = sha256_file(paths.data / "train" / "manifest.json")[:16]
    assert [p.name for p in (paths.run / "reference").iterdir()] == [f"stats-{digest}.npz"]

    def fail(*a, **k):
        raise AssertionError("the cached statistics should have been read")

    monkeypatch.setattr(reference, "extractor_statistics", fail)
    mu2, sigma2, kid2 = reference_statistics(cfg, paths, progress=False)
    np.testing.assert_array_equal(mu2, mu)
    np.testing.assert_array_equal(sigma2, sigma)
    np.testing.assert_array_equal(kid2, kid_features)


# ----------------------------------------------------------------------------- bounded memory


def _rss_bytes(field: str) -> int:
    """VmRSS or VmHWM (peak RSS) of this process, from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _measure(fn):
    """(result, peak traced Python/numpy allocation, peak RSS growth or None) of fn()."""
    gc.collect()
    rss_ok = _reset_peak_rss()
    rss0 = _rss_bytes("VmRSS") if rss_ok else 0
    tracemalloc.start()
    try:
        out = fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return out, peak, (_rss_bytes("VmHWM") - rss0 if rss_ok else None)


def test_streaming_memory_stays_far_below_the_split_size(tmp_path):
    """A 48 MiB split (16384 RGB 32x32 uint8 images in 4 shards of 12 MiB), through a cheap
    extractor (8x8 block means: D = 48) in batches of 64.

    The bound: streaming holds one batch (64 x 3072 B = 192 KiB of pixels, plus its float32
    copy, 768 KiB), the running (D,) mean and (D, D) co-moments, and the (K, D) KID rows
    (K = 1000: 188 KiB): about 1-2 MiB whatever N is. We allow split/16 (3 MiB) of traced
    numpy/Python allocations and split/4 (12 MiB) of peak-RSS growth (the RSS figure also
    carries allocator slack); measured here: about 1.3 MiB and under 1 MiB. Reading through
    memory maps instead would pass the traced bound but not the RSS one (the touched pages stay
    resident: 48 MiB). Loading the split
    as the old code did (``np.array(field("images"))``) needs at least the whole split in both
    measures (about twice: the concatenation and its copy): checked too, so the measures can tell.
    """
    n, shape = 16384, (3, 32, 32)
    images = np.random.default_rng(4).integers(0, 256, (n, *shape), dtype=np.uint8)
    split_bytes = images.nbytes  # 48 MiB
    split = _split(tmp_path / "big", images, shard_size=4096)

    def cheap(batch: np.ndarray) -> np.ndarray:
        b = batch.astype(np.float32).reshape(len(batch), 3, 4, 8, 4, 8)
        return b.mean(axis=(3, 5)).reshape(len(batch), 48)

    expected = cheap(images).astype(np.float64)
    rows = kid_rows(n, 1000)
    expected_kid = cheap(images[rows])
    del images

    st, traced, rss = _measure(lambda: stream_statistics(split, cheap, batch_size=64, kid_limit=1000, progress=False))
    np.testing.assert_allclose(st.mu, expected.mean(0), rtol=1e-12)
    np.testing.assert_allclose(st.sigma, np.cov(expected, rowvar=False), rtol=1e-9)
    np.testing.assert_allclose(st.kid_features, expected_kid, rtol=1e-6)
    assert traced < split_bytes / 16, f"streaming traced peak {traced / 2**20:.1f} MiB"
    if rss is not None:
        assert rss < split_bytes / 4, f"streaming peak RSS growth {rss / 2**20:.1f} MiB"

    _, traced_all, rss_all = _measure(lambda: np.array(ShardedArrays(split).field("images")).nbytes)
    assert traced_all >= split_bytes
    if rss_all is not None:
        assert rss_all >= 0.9 * split_bytes  # some of it may land in pages the process already held
