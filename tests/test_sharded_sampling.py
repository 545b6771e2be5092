"""uvit.evaluate.sample_shards: sharded, resumable sampling equals one-batch `generate`, resumes only
what is missing or corrupt, and gives the same result through Ray workers."""

from __future__ import annotations

import inspect
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import uvit.evaluate.sample_shards as sample_shards
from uvit.evaluate.sample import Condition, SamplingRecipe, generate, load_samples, sample_seeds, to_uint8
from uvit.evaluate.sample_shards import (
    MANIFEST_NAME,
    MERGED_NAME,
    SampleSpec,
    SamplingRun,
    ShardIntegrityError,
    merge_shards,
    sample_to_shards,
    shard_name,
    shard_ranges,
)
from uvit.models import UViT, UViTConfig

N, K, SEED, STEPS, SCALE = 12, 4, 3, 4, 0.5
SPEC = SampleSpec(
    schedule="vpsde",
    sampler="dpm_solver",
    steps=STEPS,
    num_samples=N,
    shard_size=5,
    seed=SEED,
    guidance_scale=SCALE,
    num_classes_for_labels=K,
)
HOW = SamplingRun(batch_size=3, progress=False)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = UViT(UViTConfig(img_size=8, patch_size=2, embed_dim=32, depth=2, num_heads=2, num_classes=K + 1))
    return model.save_pretrained(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def reference(model_dir) -> np.ndarray:
    """All N samples in ONE generate batch, uint8 NCHW."""
    model = UViT.from_pretrained(model_dir)
    x = generate(
        model,
        SamplingRecipe("vpsde", "dpm_solver", STEPS, SCALE),
        sample_seeds(SEED, N),
        Condition(torch.arange(N) % K),
        batch_size=N,
        progress=False,
    )
    return to_uint8(x)


def test_shard_ranges():
    assert shard_ranges(12, 5) == [(0, 5), (5, 5), (10, 2)]
    assert shard_ranges(12, 4) == [(0, 4), (4, 4), (8, 4)]
    with pytest.raises(ValueError):
        shard_ranges(0, 5)


@pytest.mark.parametrize("shard_size", [5, 4])
def test_shards_merge_to_one_batch_generate(model_dir, reference, tmp_path, shard_size):
    res = sample_to_shards(model_dir, tmp_path, replace(SPEC, shard_size=shard_size), HOW)
    n_shards = -(-N // shard_size)
    assert res["computed"] == list(range(n_shards)) and res["reused"] == [] and res["images_per_s"] > 0
    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert sorted(manifest["shards"], key=int) == [str(k) for k in range(n_shards)]
    assert [manifest["shards"][str(k)]["count"] for k in range(n_shards)] == [c for _, c in shard_ranges(N, shard_size)]
    with np.load(tmp_path / shard_name(0)) as f:  # uint8 NHWC + labels
        assert f["arr_0"].dtype == np.uint8 and f["arr_0"].shape == (min(shard_size, N), 8, 8, 3)
        assert f["labels"].tolist() == [i % K for i in range(min(shard_size, N))]
    merged = merge_shards(tmp_path)
    assert merged.dtype == np.uint8 and merged.shape == (N, 3, 8, 8)
    np.testing.assert_array_equal(merged, reference)
    images, labels = load_samples(tmp_path / MERGED_NAME)
    np.testing.assert_array_equal(images, reference)
    assert labels.tolist() == [i % K for i in range(N)]


def test_resume_recomputes_only_missing_or_corrupt_shards(model_dir, reference, tmp_path, monkeypatch):
    sample_to_shards(model_dir, tmp_path, SPEC, HOW)
    paths = [tmp_path / shard_name(k) for k in range(3)]
    mtimes = {p.name: p.stat().st_mtime_ns for p in paths}

    calls: list[list[int]] = []
    real_generate = sample_shards.generate

    def counting_generate(*args, **kw):
        calls.append(list(inspect.signature(real_generate).bind(*args, **kw).arguments["seeds"]))
        return real_generate(*args, **kw)

    monkeypatch.setattr(sample_shards, "generate", counting_generate)

    # 1. a deleted shard: only it is recomputed
    paths[1].unlink()
    res = sample_to_shards(model_dir, tmp_path, SPEC, HOW)
    assert res["computed"] == [1] and res["reused"] == [0, 2]
    assert calls == [sample_seeds(SEED, 5, start=5)]
    assert paths[0].stat().st_mtime_ns == mtimes[paths[0].name]
    assert paths[2].stat().st_mtime_ns == mtimes[paths[2].name]
    np.testing.assert_array_equal(merge_shards(tmp_path), reference)

    # 2. a corrupted shard (same size, bytes changed): caught by sha256, recomputed
    data = bytearray(paths[2].read_bytes())
    data[-40] ^= 0xFF
    paths[2].write_bytes(bytes(data))
    with pytest.raises(ShardIntegrityError, match="sha256"):
        merge_shards(tmp_path)
    calls.clear()
    res = sample_to_shards(model_dir, tmp_path, SPEC, HOW)
    assert res["computed"] == [2] and calls == [sample_seeds(SEED, 2, start=10)]
    np.testing.assert_array_equal(merge_shards(tmp_path), reference)

    # 3. nothing to do: every shard reused, no generate call
    calls.clear()
    res = sample_to_shards(model_dir, tmp_path, SPEC, HOW)
    assert res["computed"] == [] and res["reused"] == [0, 1, 2] and calls == []
    assert (tmp_path / MERGED_NAME).is_file()  # still valid, kept

    # 4. different run parameters: nothing is reused
    res = sample_to_shards(model_dir, tmp_path, replace(SPEC, seed=SEED + 1), HOW)
    assert res["computed"] == [0, 1, 2] and not (tmp_path / MERGED_NAME).exists()


def test_incomplete_run_cannot_be_merged(model_dir, tmp_path):
    sample_to_shards(model_dir, tmp_path, SPEC, HOW)
    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    del manifest["shards"]["1"]
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ShardIntegrityError, match="shard 1"):
        merge_shards(tmp_path)


def test_unconditional_shards_have_no_labels(tmp_path):
    torch.manual_seed(0)
    model = UViT(UViTConfig(img_size=8, patch_size=2, embed_dim=32, depth=2, num_heads=2))
    model_dir = model.save_pretrained(tmp_path / "model")
    spec = replace(SPEC, num_samples=3, shard_size=2, num_classes_for_labels=None, guidance_scale=0.0)
    sample_to_shards(model_dir, tmp_path / "out", spec, HOW)
    merged = merge_shards(tmp_path / "out")
    want = to_uint8(
        generate(model, SamplingRecipe("vpsde", "dpm_solver", STEPS), sample_seeds(SEED, 3), progress=False)
    )
    np.testing.assert_array_equal(merged, want)
    assert load_samples(tmp_path / "out" / MERGED_NAME)[1] is None


@pytest.mark.slow
def test_ray_workers_give_the_same_samples(model_dir, reference, tmp_path):
    import ray

    try:
        res = sample_to_shards(model_dir, tmp_path, SPEC, replace(HOW, num_workers=2))
        assert res["computed"] == [0, 1, 2]
        np.testing.assert_array_equal(merge_shards(tmp_path), reference)
    finally:
        ray.shutdown()


def test_pngs_written_restored_and_pruned(model_dir, reference, tmp_path):
    from PIL import Image

    png = tmp_path / "png"
    sample_to_shards(model_dir, tmp_path / "out", SPEC, HOW, png_dir=png)
    names = sorted(p.name for p in png.iterdir())
    assert names == [f"{i:06d}.png" for i in range(N)]
    for i in (0, 7, N - 1):  # sample i's PNG holds exactly sample i (HWC RGB)
        np.testing.assert_array_equal(np.asarray(Image.open(png / names[i])), reference[i].transpose(1, 2, 0))
    (png / names[6]).unlink()  # a reused shard's missing PNG is rewritten from the shard file
    (png / f"{N + 3:06d}.png").write_bytes(b"stale")  # beyond N: from an earlier, larger run
    res = sample_to_shards(model_dir, tmp_path / "out", SPEC, HOW, png_dir=png)
    assert res["computed"] == [] and sorted(p.name for p in png.iterdir()) == names
    np.testing.assert_array_equal(np.asarray(Image.open(png / names[6])), reference[6].transpose(1, 2, 0))
