"""The training step, EMA, checkpoints and exact resume (plain torch, no Ray)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from uvit.diffusion import make_schedule
from uvit.models import UViT, UViTConfig
from uvit.train.checkpoint import (
    CheckpointError,
    TrainingState,
    save_checkpoint,
)
from uvit.train.step import (
    EMA,
    Batch,
    DrawConfig,
    StepConfig,
    build_optimizer,
    draw_step,
    gather_rows,
    train_step,
    warmup_lambda,
)
from checkpoints import load_checkpoint

CFG = UViTConfig(img_size=8, patch_size=2, in_chans=1, embed_dim=32, depth=2, num_heads=2, num_classes=4)
SCHEDULE = make_schedule("vpsde")


def toy_data(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Four classes of 8x8 images: a bright quadrant per class, in [-1, 1]."""
    y = torch.arange(n) % 4
    x = -torch.ones(n, 1, 8, 8)
    for k in range(4):
        r, c = divmod(k, 2)
        x[y == k, :, r * 4 : (r + 1) * 4, c * 4 : (c + 1) * 4] = 1.0
    return x, y


def make_state(seed: int = 0, lr: float = 2e-3, warmup: int = 0) -> tuple[TrainingState, EMA]:
    torch.manual_seed(seed)
    model = UViT(CFG)
    ema = EMA(model, 0.9)
    opt = build_optimizer(model, lr=lr, weight_decay=0.03, betas=(0.9, 0.999))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_lambda(warmup))
    return TrainingState(model, ema.model, opt, sched, 0), ema


def run_steps(state: TrainingState, ema: EMA, data, start: int, stop: int, batch: int = 16) -> list[float]:
    x, y = data
    losses = []
    for step in range(start, stop):
        draws = draw_step(DrawConfig(0, batch, (1, 8, 8), SCHEDULE, p_uncond=0.1), step, len(x))
        stats = train_step(
            state.model,
            state.optimizer,
            state.scheduler,
            ema,
            Batch(step, *gather_rows(x, y, draws.idx), draws),
            StepConfig(SCHEDULE, null_class=3),
        )
        losses.append(stats.loss)
        state.step = step + 1
    return losses


def test_workers_split_the_global_batch_exactly() -> None:
    spec = DrawConfig(7, 8, (1, 8, 8), SCHEDULE, p_uncond=0.5)
    one = draw_step(spec, 12, 100)
    halves = [draw_step(spec, 12, 100, rank=r, world_size=2) for r in range(2)]
    for field in ("idx", "t", "noise", "drop"):
        assert torch.equal(torch.cat([getattr(h, field) for h in halves]), getattr(one, field))
    other = draw_step(spec, 13, 100)
    assert not torch.equal(other.noise, one.noise)
    with pytest.raises(ValueError, match="not divisible"):
        draw_step(DrawConfig(0, 9, (1, 8, 8), SCHEDULE, 0.0), 0, 100, rank=0, world_size=2)


def test_two_half_batches_give_the_full_batch_gradient() -> None:
    """What DDP averages across two workers equals one worker's gradient on the global batch."""
    x, y = toy_data()
    schedule = SCHEDULE
    from uvit.diffusion import noise_prediction_loss

    torch.manual_seed(0)
    model = UViT(CFG)

    def grads(rank: int, world: int) -> list[torch.Tensor]:
        model.zero_grad()
        d = draw_step(DrawConfig(3, 16, (1, 8, 8), schedule, 0.0), 5, len(x), rank=rank, world_size=world)
        noise_prediction_loss(model, x[d.idx], schedule, t=d.t, noise=d.noise, y=y[d.idx]).mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    full = grads(0, 1)
    halves = [grads(r, 2) for r in range(2)]
    for g, a, b in zip(full, *halves, strict=True):
        torch.testing.assert_close((a + b) / 2, g, atol=1e-6, rtol=1e-5)


def test_loss_goes_down() -> None:
    state, ema = make_state()
    losses = run_steps(state, ema, toy_data(), 0, 60)
    # An untrained predictor sits near 1.0; the objective plateaus around 0.35-0.5 on digits.
    assert sum(losses[-10:]) / 10 < 0.75 * sum(losses[:10]) / 10


def test_warmup_is_linear_then_constant() -> None:
    f = warmup_lambda(4)
    assert [f(s) for s in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert warmup_lambda(0)(0) == 1.0


def test_ema_update_is_the_official_formula() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.9)
    before = ema.model.weight.clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    torch.testing.assert_close(ema.model.weight, 0.9 * before + 0.1 * model.weight)


def test_resume_continues_exactly(tmp_path) -> None:
    """N steps straight == N/2 steps, checkpoint, fresh process state, N/2 more."""
    data = toy_data()
    straight, ema_s = make_state(warmup=5)
    run_steps(straight, ema_s, data, 0, 20)

    first, ema_1 = make_state(warmup=5)
    run_steps(first, ema_1, data, 0, 10)
    save_checkpoint(tmp_path / "ckpt", first)

    resumed, ema_r = make_state(seed=123, warmup=5)  # different init: everything must come from the file
    load_checkpoint(tmp_path / "ckpt", resumed)
    assert resumed.step == 10
    run_steps(resumed, ema_r, data, resumed.step, 20)

    for a, b in zip(straight.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(straight.ema.parameters(), resumed.ema.parameters(), strict=True):
        assert torch.equal(a, b)
    assert straight.scheduler.get_last_lr() == resumed.scheduler.get_last_lr()


def test_truncated_checkpoint_is_refused_and_the_previous_one_still_loads(tmp_path) -> None:
    state, ema = make_state()
    run_steps(state, ema, toy_data(), 0, 2)
    save_checkpoint(tmp_path / "a", state)
    run_steps(state, ema, toy_data(), 2, 4)
    save_checkpoint(tmp_path / "b", state)
    weights = tmp_path / "b" / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a crash mid-upload

    fresh, _ = make_state(seed=5)
    with pytest.raises(CheckpointError, match="cannot be loaded"):
        load_checkpoint(tmp_path / "b", fresh)
    load_checkpoint(tmp_path / "a", fresh)
    assert fresh.step == 2


def test_incomplete_checkpoint_is_not_taken_for_a_good_one(tmp_path) -> None:
    state, _ = make_state()
    save_checkpoint(tmp_path / "c", state)
    (tmp_path / "c" / "state.json").unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        load_checkpoint(tmp_path / "c", state)


class _Exploit:
    """Unpickling this runs open(marker, "w"): the file appears only if the pickle is executed."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_malicious_optimizer_pickle_is_refused(tmp_path) -> None:
    state, _ = make_state()
    save_checkpoint(tmp_path / "c", state)
    marker = tmp_path / "pwned"
    # A well-formed torch file with both keys, so a full (unsafe) load would succeed and execute
    # the payload: only the weights-only unpickler stops it, at load time.
    torch.save({"optimizer": _Exploit(marker), "scheduler": {}}, tmp_path / "c" / "optimizer.pt")
    with pytest.raises(CheckpointError, match="cannot be loaded .*UnpicklingError") as err:
        load_checkpoint(tmp_path / "c", state)
    assert isinstance(err.value.__cause__, pickle.UnpicklingError)
    assert "Weights only load failed" in str(err.value.__cause__)
    assert not marker.exists()


def test_save_is_atomic_when_interrupted(tmp_path, monkeypatch) -> None:
    state, _ = make_state()
    save_checkpoint(tmp_path / "c", state)
    good = (tmp_path / "c" / "model" / "model.safetensors").read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path / "c", state)
    # The previous checkpoint is untouched and no temp directory is left behind.
    assert (tmp_path / "c" / "model" / "model.safetensors").read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_latent_draws_leave_the_pixel_draws_unchanged() -> None:
    pixel = draw_step(DrawConfig(3, 8, (4, 4, 4), SCHEDULE, 0.1), 9, 50)
    latent = draw_step(DrawConfig(3, 8, (4, 4, 4), SCHEDULE, 0.1, latent=True), 9, 50)
    for field in ("idx", "t", "noise", "drop"):
        assert torch.equal(getattr(pixel, field), getattr(latent, field))
    assert pixel.latent_noise is None and latent.latent_noise.shape == (8, 4, 4, 4)


def test_training_on_stored_vae_moments(tmp_path) -> None:
    """Latent benchmarks train on (mean, logvar) moments, re-sampling z every step."""
    from uvit.config import load_benchmark, load_params
    from uvit.data.shards import write_split
    from uvit.train.trainer import load_training_data

    n = 64
    labels = torch.arange(n) % 4
    mean = labels.float().view(-1, 1, 1, 1).expand(n, 4, 4, 4) / 2 - 0.75  # class-dependent latents
    logvar = torch.full((n, 4, 4, 4), -6.0)
    moments = torch.cat([mean, logvar], dim=1).numpy().astype("float16")
    write_split(tmp_path / "train", {"moments": moments, "labels": labels.numpy()}, name="toy", split="train")

    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    cfg = load_benchmark("imagenet256", params)
    x, y = load_training_data(cfg, tmp_path)
    assert x.shape == (n, 8, 4, 4) and x.dtype == torch.float32 and torch.equal(y, labels)

    config = UViTConfig(img_size=4, patch_size=2, in_chans=4, embed_dim=32, depth=2, num_heads=2, num_classes=5)
    torch.manual_seed(0)
    model = UViT(config)
    opt = build_optimizer(model, lr=2e-3, weight_decay=0.0, betas=(0.9, 0.999))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_lambda(0))
    losses = []
    for step in range(60):
        d = draw_step(DrawConfig(0, 16, (4, 4, 4), SCHEDULE, 0.1, latent=True), step, n)
        batch = Batch(step, *gather_rows(x, y, d.idx), d)
        losses.append(
            train_step(model, opt, sched, None, batch, StepConfig(SCHEDULE, null_class=4, latent_scale=0.5)).loss
        )
    assert sum(losses[-10:]) < 0.75 * sum(losses[:10])


def test_loop_time_sums_the_invocations_of_a_resumed_run() -> None:
    from uvit.train.trainer import loop_time

    assert loop_time([1.0, 2.0, 3.0]) == 3.0  # one invocation: its last elapsed_s
    assert loop_time([1.0, 2.0, 3.0, 0.5, 1.5]) == 4.5  # resumed once: elapsed_s restarted
    assert loop_time([]) == 0.0
