"""Text-to-image training (MS-COCO path) on a tiny caption split: each step's caption choice,
rank slicing, stored contexts, condition dropout to the empty context, and a few real steps."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from uvit.config import load_benchmark, load_params  # noqa: E402
from uvit.data.encode import EncodeRun, encode_captions, load_caption_index, load_empty_context  # noqa: E402
from uvit.data.shards import ShardedArrays, write_split  # noqa: E402
from uvit.diffusion import make_schedule  # noqa: E402
from uvit.models import UViT  # noqa: E402
from uvit.paths import BenchmarkPaths  # noqa: E402
from uvit.train.data import ShardGather, StreamingLoader, training_field  # noqa: E402
from uvit.train.step import (  # noqa: E402
    EMA,
    Batch,
    DrawConfig,
    StepConfig,
    build_optimizer,
    condition_context,
    draw_step,
    train_step,
    warmup_lambda,
)
from uvit.train.trainer import contexts_data_dir, load_training_data, training_data_dir  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = [
    ["a cat", "a dog"],
    ["the dog sat", "cat", "a dog at a cat"],
    ["dog"],
    ["cat sat", "at", "a", "t"],
    ["dog dog"],
    ["a cat sat", "cat at"],
]
N = len(CAPTIONS)
D = 32  # the tiny CLIP's width


@pytest.fixture(scope="module")
def t2i_data(tmp_path_factory, write_tiny_clip_vocab):
    """mscoco256 shrunk to a tiny model; a latent train split (moments) and its encoded captions."""
    tmp = tmp_path_factory.mktemp("t2i_train")
    clip = tmp / "clip"
    clip.mkdir()
    vocab = write_tiny_clip_vocab(clip)
    torch.manual_seed(0)
    text_model = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=D,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=77,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    ).eval()
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(clip))

    params = copy.deepcopy(load_params(ROOT / "params.yaml"))
    params["mscoco256"]["model"]["overrides"] = {
        "img_size": 4,
        "embed_dim": 32,
        "depth": 2,
        "num_heads": 2,
        "clip_dim": D,
    }
    cfg = load_benchmark("mscoco256", params)
    paths = BenchmarkPaths("mscoco256", tmp)
    width = max(len(c) for caps in CAPTIONS for c in caps)
    caps = np.full((N, 4), "", dtype=f"<U{width}")
    for i, c in enumerate(CAPTIONS):
        caps[i, : len(c)] = c
    rng = np.random.default_rng(0)
    mean = rng.normal(size=(N, 4, 4, 4)).astype(np.float32)
    moments = np.concatenate([mean, np.full_like(mean, -6.0)], axis=1).astype(np.float16)
    fields = {"moments": moments, "num_captions": np.array([len(c) for c in CAPTIONS], np.int64), "captions": caps}
    write_split(paths.latents / "train", fields, name="coco", split="train", shard_size=4)
    encode_captions(
        paths.latents / "train",
        paths.contexts / "train",
        tokenizer,
        text_model,
        run=EncodeRun(shard_size=5, progress=False),
    )
    return cfg, paths


def _loader(paths, start, end, rank=0, world=1, batch=12, p_uncond=0.1):
    split, contexts = paths.latents / "train", paths.contexts / "train"
    gather = ShardGather(split, training_field(split), with_labels=False, contexts_dir=contexts)
    draws = DrawConfig(5, batch, (4, 4, 4), make_schedule("discrete"), p_uncond, latent=True)
    return StreamingLoader(gather, draws, start, end, rank=rank, world_size=world)


def test_caption_choice_rank_slices_and_stored_contexts(t2i_data):
    cfg, paths = t2i_data
    assert training_data_dir(cfg, paths) == paths.latents and contexts_data_dir(cfg, paths) == paths.contexts
    offsets = load_caption_index(paths.contexts / "train")
    assert offsets.tolist() == np.cumsum([0] + [len(c) for c in CAPTIONS]).tolist()
    stored = np.asarray(ShardedArrays(paths.contexts / "train").field("contexts")).astype(np.float32)
    assert stored.shape == (offsets[-1], 77, D)
    with _loader(paths, 0, 8) as one:
        full = list(one)
    halves = []
    for rank in range(2):
        with _loader(paths, 0, 8, rank=rank, world=2) as s:
            halves.append(list(s))
    chosen = set()
    for b, h0, h1 in zip(full, *halves):
        rows = b.draws.caption_rows
        # Each caption row belongs to its image row.
        assert (
            (rows >= torch.from_numpy(offsets[b.draws.idx])) & (rows < torch.from_numpy(offsets[b.draws.idx + 1]))
        ).all()
        assert b.context.dtype == torch.float32 and b.context.shape == (12, 77, D)
        assert torch.equal(b.context, torch.from_numpy(stored[rows.numpy()]))  # the stored rows, as stored
        # Two ranks' slices concatenate to the one-rank batch, contexts included.
        for f in ("idx", "t", "noise", "drop", "latent_noise", "caption_rows"):
            assert torch.equal(torch.cat([getattr(h0.draws, f), getattr(h1.draws, f)]), getattr(b.draws, f)), f
        assert torch.equal(torch.cat([h0.context, h1.context]), b.context)
        assert torch.equal(torch.cat([h0.x, h1.x]), b.x)
        chosen.update(zip(b.draws.idx.tolist(), rows.tolist()))
    # Deterministic in (seed, step): a loader started at step 5 (a resume) sees the same batches.
    with _loader(paths, 5, 8) as later:
        for b in later:
            assert torch.equal(b.draws.caption_rows, full[b.step].draws.caption_rows)
            assert torch.equal(b.context, full[b.step].context)
    # Different captions of one image are chosen over the steps (image 3 has four).
    assert len({r for i, r in chosen if i == 3}) >= 2
    # The caption draw comes last: everything else is what a non-text step draws.
    sched = make_schedule("discrete")
    plain = draw_step(DrawConfig(5, 12, (4, 4, 4), sched, 0.1, latent=True), 2, N)
    for f in ("idx", "t", "noise", "drop", "latent_noise"):
        assert torch.equal(getattr(plain, f), getattr(full[2].draws, f))
    assert plain.caption_rows is None
    # The caption choice is uniform over an image's captions (many draws of one step generator).
    counts = np.zeros(4)
    offs = torch.tensor([0, 4])
    for step in range(400):
        d = draw_step(DrawConfig(1, 8, (1,), sched, 0.0), step, 1, caption_offsets=offs)
        counts += np.bincount(d.caption_rows.numpy(), minlength=4)
    assert counts.min() > 0.8 * counts.mean() and counts.max() < 1.2 * counts.mean()


def test_condition_dropout_uses_the_empty_context(t2i_data):
    _, paths = t2i_data
    empty = torch.from_numpy(load_empty_context(paths.contexts / "train")).float()
    assert empty.shape == (77, D) and empty.abs().sum() > 0  # the encoding of "", not zeros
    gather = ShardGather(paths.latents / "train", "moments", with_labels=False, contexts_dir=paths.contexts / "train")
    assert torch.equal(gather.empty_context, empty)
    ctx = gather.gather_contexts(torch.tensor([0, 3, 5, 7]))
    drop = torch.tensor([True, False, True, False])
    out = condition_context(ctx, drop, empty)
    assert torch.equal(out[0], empty) and torch.equal(out[2], empty)
    assert torch.equal(out[1], ctx[1]) and torch.equal(out[3], ctx[3])
    assert condition_context(ctx, torch.zeros(4, dtype=torch.bool), None) is ctx
    with pytest.raises(ValueError, match="empty context"):
        condition_context(ctx, drop, None)
    # p_uncond = 1: every row of every step's batch trains on the empty context.
    with _loader(paths, 0, 2, p_uncond=1.0) as s:
        for b in s:
            assert b.draws.drop.all()
            assert all(torch.equal(c, empty) for c in condition_context(b.context, b.draws.drop, empty))

    # train_step hands the model the dropped-out context: the same loss as passing it directly.
    cfg = _tiny_cfg(paths)
    sched = make_schedule("discrete")
    with _loader(paths, 0, 1, p_uncond=0.5) as s:
        b = next(iter(s))
    assert 0 < int(b.draws.drop.sum()) < 12
    losses = []
    for context, empty_context in ((b.context, empty), (condition_context(b.context, b.draws.drop, empty), None)):
        torch.manual_seed(0)
        model = UViT(cfg.uvit_config())
        opt = build_optimizer(model, lr=0.0, weight_decay=0.0, betas=(0.9, 0.9))
        sched_lr = torch.optim.lr_scheduler.LambdaLR(opt, warmup_lambda(0))
        if empty_context is None:  # no dropout left to do: mark nothing dropped
            draws = replace(b.draws, drop=torch.zeros_like(b.draws.drop))
        else:
            draws = b.draws
        losses.append(
            train_step(
                model,
                opt,
                sched_lr,
                None,
                Batch(b.step, b.x, None, draws, context),
                StepConfig(sched, empty_context=empty_context, latent_scale=0.23010),
            ).loss
        )
    assert losses[0] == losses[1]


def _tiny_cfg(paths):
    params = copy.deepcopy(load_params(ROOT / "params.yaml"))
    params["mscoco256"]["model"]["overrides"] = {
        "img_size": 4,
        "embed_dim": 32,
        "depth": 2,
        "num_heads": 2,
        "clip_dim": D,
    }
    return load_benchmark("mscoco256", params)


def test_training_steps_lower_the_loss(t2i_data):
    cfg, paths = t2i_data
    x_all, y = load_training_data(cfg, paths.latents)
    assert y is None and x_all.shape == (N, 8, 4, 4)
    uconf = cfg.uvit_config()
    assert uconf.clip_dim == D and uconf.num_classes <= 0 and cfg.diffusion.p_uncond == 0.1
    sched = make_schedule(cfg.diffusion.schedule)
    torch.manual_seed(0)
    model = UViT(uconf)
    opt = build_optimizer(model, lr=2e-3, weight_decay=0.0, betas=(0.9, 0.999))
    sched_lr = torch.optim.lr_scheduler.LambdaLR(opt, warmup_lambda(0))
    ema = EMA(model, 0.99)
    gather = ShardGather(paths.latents / "train", "moments", with_labels=False, contexts_dir=paths.contexts / "train")
    loader = StreamingLoader(gather, DrawConfig(0, 16, (4, 4, 4), sched, cfg.diffusion.p_uncond, latent=True), 0, 60)
    losses = []
    with loader:
        for b in loader:
            assert torch.equal(b.x, x_all[b.draws.idx])
            losses.append(
                train_step(
                    model,
                    opt,
                    sched_lr,
                    ema,
                    b,
                    StepConfig(sched, empty_context=gather.empty_context, latent_scale=cfg.encode.scale_factor),
                ).loss
            )
    assert all(np.isfinite(losses))
    assert sum(losses[-10:]) < 0.75 * sum(losses[:10])
