"""The sample stage (class-conditional, pixels) on a tiny model: sharded and resumable, yet the merged
samples.npz equals the one-batch in-memory sampling it replaced, whatever the shard size."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from uvit.config import load_benchmark, load_params
from uvit.evaluate.sample import load_samples
from uvit.models import UViT
from uvit.paths import BenchmarkPaths
from uvit.evaluate.draw import draw_samples
from uvit.stages.sample import run_sample

ROOT = Path(__file__).resolve().parents[1]


def digits_like(root: Path, **sample) -> tuple:
    params = copy.deepcopy(load_params(ROOT / "params.yaml"))
    params["digits"]["model"]["overrides"] = {"embed_dim": 32, "depth": 2, "num_heads": 2}
    params["digits"]["sample"].update({"steps": 3, "num_samples": 23, "batch_size": 23, **sample})
    cfg = load_benchmark("digits", params)
    paths = BenchmarkPaths("digits", root)
    torch.manual_seed(0)
    UViT(cfg.uvit_config()).save_pretrained(paths.train / "ema")
    return cfg, paths


@pytest.mark.parametrize("shard_size", [23, 10])
def test_sample_stage_equals_in_memory_sampling(tmp_path, shard_size):
    cfg, paths = digits_like(tmp_path, shard_size=shard_size, batch_size=7)
    summary = run_sample(cfg, paths)
    images, labels = load_samples(paths.samples / "samples.npz")
    want, want_labels = draw_samples(cfg, UViT.from_pretrained(paths.train / "ema"), progress=False)
    np.testing.assert_array_equal(images, want)
    np.testing.assert_array_equal(labels, want_labels)
    assert labels.tolist() == [i % 10 for i in range(23)]
    assert summary["shards_computed"] == -(-23 // shard_size) and summary["shards_reused"] == 0
    assert len(list((paths.samples / "png").glob("*.png"))) == 23 and (paths.sample_summary / "grid.png").is_file()

    # A re-run reuses every shard and keeps the timing of the run that sampled.
    again = run_sample(cfg, paths)
    assert again["shards_computed"] == 0 and again["shards_reused"] == summary["shards_computed"]
    assert again["wall_time_s"] == summary["wall_time_s"]
    np.testing.assert_array_equal(load_samples(paths.samples / "samples.npz")[0], want)
    assert json.loads((paths.sample_summary / "summary.json").read_text())["num_samples"] == 23


def test_png_off_removes_the_folder(tmp_path):
    cfg, paths = digits_like(tmp_path, png=False)
    (paths.samples / "png").mkdir(parents=True)
    run_sample(cfg, paths)
    assert not (paths.samples / "png").exists() and (paths.samples / "samples.npz").is_file()


@pytest.mark.parametrize(
    ("n", "channels", "nrow", "upscale"), [(23, 1, 8, 1), (7, 3, 3, 2), (1, 3, 4, 1), (8, 1, 8, 3)]
)
def test_sample_grid_is_torchvisions_grid_byte_for_byte(tmp_path, n, channels, nrow, upscale) -> None:
    """save_grid (numpy) writes the PNG torchvision's save_image(make_grid(...)) writes: same layout,
    gutters, grey-to-RGB and bytes."""
    from torchvision.utils import make_grid, save_image

    from uvit.evaluate.sample import save_grid

    images = np.random.default_rng(n).integers(0, 256, size=(n, channels, 5, 6), dtype=np.uint8)
    x = torch.from_numpy(images).float() / 255.0
    if upscale > 1:
        x = torch.nn.functional.interpolate(x, scale_factor=upscale, mode="nearest")
    save_image(make_grid(x, nrow=nrow, padding=2, pad_value=1.0), tmp_path / "torchvision.png")
    ours = save_grid(images, tmp_path / "ours.png", nrow=nrow, upscale=upscale)
    assert ours.read_bytes() == (tmp_path / "torchvision.png").read_bytes()
