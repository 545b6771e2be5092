"""Streaming training data (uvit/train/data.py), storage resolution and the training monitor."""

from __future__ import annotations

import copy
import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from uvit.config import load_benchmark, load_params
from uvit.data.shards import write_split
from uvit.diffusion import make_schedule
from uvit.train.data import ShardGather, StreamingLoader, training_field
from uvit.train.step import DrawConfig, draw_step, gather_rows
from uvit.train.trainer import load_training_data

ROOT = Path(__file__).resolve().parents[1]
SCHEDULE = make_schedule("vpsde")


def digits_cfg():
    return load_benchmark("digits", copy.deepcopy(load_params(ROOT / "params.yaml")))


@pytest.fixture
def split(tmp_path) -> Path:
    """53 rows of random uint8 8x8 images in shards of 10 (the last one short), labels 0..9."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (53, 1, 8, 8), dtype=np.uint8)
    labels = (np.arange(53) % 10).astype(np.int64)
    write_split(tmp_path / "train", {"images": images, "labels": labels}, name="toy", split="train", shard_size=10)
    return tmp_path


def loader(
    split: Path, start: int, end: int, rank: int = 0, world: int = 1, prefetch: int = 2, random_flip: bool = False
) -> StreamingLoader:
    gather = ShardGather(split / "train", training_field(split / "train"), with_labels=True)
    draws = DrawConfig(3, 16, (1, 8, 8), SCHEDULE, 0.1, latent=False, random_flip=random_flip)
    return StreamingLoader(gather, draws, start, end, rank=rank, world_size=world, prefetch=prefetch)


def test_streamed_batches_equal_the_in_memory_gather(split) -> None:
    x_all, y_all = load_training_data(digits_cfg(), split)
    for rank in range(2):
        with loader(split, 0, 6, rank=rank, world=2, prefetch=3) as stream:
            batches = list(stream)
        assert [b.step for b in batches] == list(range(6))
        for b in batches:
            d = draw_step(DrawConfig(3, 16, (1, 8, 8), SCHEDULE, 0.1), b.step, 53, rank=rank, world_size=2)
            x, y = gather_rows(x_all, y_all, d.idx)
            assert b.x.shape == (8, 1, 8, 8) and b.x.dtype == torch.float32
            assert torch.equal(b.x, x) and torch.equal(b.y, y)  # bit for bit
            for f in ("idx", "t", "noise", "drop"):
                assert torch.equal(getattr(b.draws, f), getattr(d, f))
    # The rows span several shards, so the gather really crossed shard boundaries.
    assert len({int(i) // 10 for b in batches for i in b.draws.idx}) > 3


def test_data_position_on_resume_is_a_function_of_the_step(split) -> None:
    with loader(split, 0, 8) as stream:
        straight = list(stream)
    with loader(split, 5, 8) as stream:  # a run resumed from its step-5 checkpoint
        resumed = list(stream)
    assert [b.step for b in resumed] == [5, 6, 7]
    for a, b in zip(straight[5:], resumed, strict=True):
        assert torch.equal(a.x, b.x) and torch.equal(a.draws.noise, b.draws.noise)
    assert not torch.equal(straight[4].x, straight[5].x)


def test_loader_errors_reach_the_training_loop(split) -> None:
    gather = ShardGather(split / "train", "images", with_labels=True)
    gather.rows = lambda name, idx: (_ for _ in ()).throw(OSError("disk gone"))  # noqa: ARG005
    stream = StreamingLoader(gather, DrawConfig(0, 4, (1, 8, 8), SCHEDULE, 0.0, latent=False), 0, 3)
    with pytest.raises(OSError, match="disk gone"), stream:
        list(stream)


def test_latent_moments_stream_as_float32(tmp_path) -> None:
    moments = np.random.default_rng(1).standard_normal((20, 8, 4, 4)).astype(np.float16)
    write_split(
        tmp_path / "train", {"moments": moments, "labels": np.arange(20) % 4}, name="t", split="train", shard_size=7
    )
    gather = ShardGather(tmp_path / "train", training_field(tmp_path / "train"), with_labels=True)
    idx = torch.tensor([19, 0, 7, 7, 13])
    x, y = gather.gather(idx)
    assert x.dtype == torch.float32 and torch.equal(x, torch.from_numpy(moments[idx.numpy()]).float())
    assert y.tolist() == [3, 0, 3, 3, 1]


def test_storage_locations(tmp_path, monkeypatch) -> None:
    from uvit.train.checkpoint_storage import find_checkpoints, resolve_storage

    local = resolve_storage(tmp_path / "ray").child("fp")
    assert local.is_local and local.path == str((tmp_path / "ray" / "fp").resolve())
    for step, name in ((4, "checkpoint_a"), (8, "checkpoint_b")):
        (tmp_path / "ray/fp/run1" / name).mkdir(parents=True)
        (tmp_path / "ray/fp/run1" / name / "state.json").write_text(f'{{"step": {step}}}')
    (tmp_path / "ray/fp/run1/checkpoint_c").mkdir()  # incomplete: no state.json
    assert [(s, Path(p).name) for s, _, p in find_checkpoints(local)] == [(8, "checkpoint_b"), (4, "checkpoint_a")]

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    s3 = resolve_storage("s3://bucket/prefix/", None)
    assert not s3.is_local and s3.path == "bucket/prefix" and s3.uri == "s3://bucket/prefix"
    assert type(s3.fs).__name__ == "S3FileSystem"
    with pytest.raises(ValueError, match="unsupported storage"):
        resolve_storage("gs://bucket/x")


def test_metrics_log_truncates_on_resume_and_keeps_new_columns(tmp_path) -> None:
    from uvit.train.monitor import METRICS_FIELDS, MetricsLog

    path = tmp_path / "metrics.csv"
    # A metrics file from before peak_mem_gib existed, with steps past the checkpoint.
    path.write_text(
        "step,loss,lr,grad_norm,images_per_s,elapsed_s\n2,1.0,0.1,1,5,1\n4,0.9,0.1,1,5,2\n6,0.8,0.1,1,5,3\n"
    )
    log = MetricsLog(path, resume_step=4)
    log.append(
        {
            "step": 6,
            "loss": 0.5,
            "lr": 0.1,
            "grad_norm": 2.0,
            "images_per_s": 9.0,
            "elapsed_s": 1.0,
            "peak_mem_gib": None,
        }
    )
    rows = list(csv.DictReader(path.open()))
    assert tuple(rows[0]) == METRICS_FIELDS
    assert [(r["step"], r["loss"]) for r in rows] == [("2", "1.0"), ("4", "0.9"), ("6", "0.5")]


def test_sample_grid_and_tensorboard(tmp_path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from uvit.models import UViT
    from uvit.train.monitor import TensorBoard, sample_grid

    cfg = digits_cfg()
    torch.manual_seed(0)
    model = UViT(cfg.uvit_config()).eval()
    png = sample_grid(cfg, model, tmp_path / "grid.png", rows=2)
    from PIL import Image

    # Ten classes of 8x8 digits, upscaled x8, two rows, 2-pixel padding.
    assert Image.open(png).size == (10 * 66 + 2, 2 * 66 + 2)
    tb = TensorBoard(tmp_path / "tb")
    tb.scalars(10, {"loss": 0.5, "peak_mem_gib": None})
    tb.scalars(20, {"loss": 0.25})
    tb.image("samples/ema", png, 20)
    tb.close()
    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(10, 0.5), (20, 0.25)]
    assert "train/peak_mem_gib" not in events.Tags()["scalars"]
    assert events.Images("samples/ema")[0].width == 10 * 66 + 2


def test_periodic_fid_against_training_images(tmp_path) -> None:
    from uvit.data.sources.digits import prepare_digits
    from uvit.evaluate.classifier import ClassifierConfig, DigitClassifier, save_classifier
    from uvit.models import UViT
    from uvit.train.monitor import PeriodicFID, reference_images

    prepare_digits(tmp_path / "digits")
    torch.manual_seed(0)
    save_classifier(DigitClassifier(ClassifierConfig()), tmp_path / "classifier")
    cfg = digits_cfg()
    with pytest.raises(FileNotFoundError, match="uvit classifier digits"):
        PeriodicFID(cfg, 200, tmp_path / "digits" / "train", tmp_path / "missing")
    fid = PeriodicFID(cfg, 200, tmp_path / "digits" / "train", tmp_path / "classifier")
    real = reference_images(tmp_path / "digits" / "train", 200)
    assert real.shape == (200, 1, 8, 8) and real.dtype == np.uint8
    assert abs(fid.score(real)) < 1e-3  # the reference against itself
    noise = np.random.default_rng(0).integers(0, 256, real.shape, dtype=np.uint8)
    untrained = fid(UViT(cfg.uvit_config()).eval())  # samples of an untrained model: far off
    # (A random-weight classifier has small features: the scale is arbitrary, the order is not.)
    assert fid.score(noise) > 0.05 and untrained > 0.05


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pinned_batches_reach_the_gpu_unchanged(split) -> None:
    with loader(split, 0, 3) as stream:
        on_cpu = list(stream)
    with loader(split, 0, 3, device="cuda") as stream:
        on_gpu = list(stream)
    for a, b in zip(on_cpu, on_gpu, strict=True):
        assert b.x.is_cuda and b.draws.noise.is_cuda and not b.draws.drop.is_cuda
        assert torch.equal(a.x, b.x.cpu()) and torch.equal(a.y, b.y.cpu())


def test_truncated_checkpoint_is_skipped_when_choosing_where_to_resume(tmp_path) -> None:
    """The driver picks the newest checkpoint whose files have the sizes state.json recorded."""
    from uvit.models import UViT
    from uvit.train.checkpoint import TrainingState, save_checkpoint
    from uvit.train.step import EMA, build_optimizer, warmup_lambda
    from uvit.train.checkpoint_storage import find_checkpoints, resolve_storage

    model = UViT(digits_cfg().uvit_config())
    opt = build_optimizer(model, 1e-3, 0.0, (0.9, 0.999))
    state = TrainingState(
        model, EMA(model, 0.9).model, opt, torch.optim.lr_scheduler.LambdaLR(opt, warmup_lambda(0)), 4
    )
    save_checkpoint(tmp_path / "fp/run/checkpoint_a", state)
    state.step = 8
    save_checkpoint(tmp_path / "fp/run/checkpoint_b", state)
    storage = resolve_storage(tmp_path / "fp")
    assert [s for s, _, _ in find_checkpoints(storage)] == [8, 4]
    weights = tmp_path / "fp/run/checkpoint_b/ema/model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # an upload cut short
    with pytest.warns(UserWarning, match="ema/model.safetensors is 1000 bytes.*falling back"):
        found = find_checkpoints(storage)
    assert [(s, Path(p).name) for s, _, p in found] == [(4, "checkpoint_a")]


# -- random horizontal flips (the official CIFAR-10 / CelebA 64 / ImageNet 64 recipes) ------------
def test_flips_mirror_exactly_the_drawn_rows_and_leave_other_draws_unchanged(split) -> None:
    x_all, y_all = load_training_data(digits_cfg(), split)
    flipped_rows = total = 0
    for step in range(8):
        plain = draw_step(DrawConfig(3, 16, (1, 8, 8), SCHEDULE, 0.1), step, 53)
        with loader(split, step, step + 1, random_flip=True) as stream:
            (b,) = list(stream)
        for f in ("idx", "t", "noise", "drop"):  # drawn before the flips: identical to a no-flip run
            assert torch.equal(getattr(b.draws, f), getattr(plain, f))
        x, _ = gather_rows(x_all, y_all, plain.idx)
        flip = b.draws.flip
        assert flip.dtype == torch.bool and flip.shape == (16,)
        assert torch.equal(b.x[flip], x[flip].flip(-1)) and torch.equal(b.x[~flip], x[~flip])
        flipped_rows += int(flip.sum())
        total += 16
    assert 0.3 < flipped_rows / total < 0.7  # p = 0.5 over 128 rows
    assert plain.flip is None  # off by default (digits)


def test_flips_split_across_ranks_and_resume_exactly(split) -> None:
    with loader(split, 0, 5, random_flip=True) as stream:
        whole = list(stream)
    with loader(split, 3, 5, random_flip=True) as stream:  # resumed at step 3
        resumed = list(stream)
    for a, b in zip(whole[3:], resumed):
        assert torch.equal(a.x, b.x) and torch.equal(a.draws.flip, b.draws.flip)
    halves = []
    for rank in range(2):
        with loader(split, 0, 5, rank=rank, world=2, random_flip=True) as stream:
            halves.append(list(stream))
    for step in range(5):
        joined = torch.cat([halves[0][step].x, halves[1][step].x])
        assert torch.equal(joined, whole[step].x)
        assert torch.equal(torch.cat([halves[0][step].draws.flip, halves[1][step].draws.flip]), whole[step].draws.flip)


def test_latent_benchmarks_refuse_training_time_flips() -> None:
    from uvit.config import ConfigError

    params = copy.deepcopy(load_params(ROOT / "params.yaml"))
    params["imagenet256"]["train"]["random_flip"] = True
    with pytest.raises(ConfigError, match="imagenet256.train.random_flip"):
        load_benchmark("imagenet256", params)
