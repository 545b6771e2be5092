"""One optimisation step of U-ViT, in plain torch (no Ray, unit-testable).

The official recipe: AdamW on all parameters, linear warmup then a
constant learning rate, EMA of the parameters after every step, condition dropout for
classifier-free guidance, per-example noise-prediction loss averaged over the batch.

Every random draw of a step (which rows, which times, which noise, which labels dropped)
comes from a generator seeded by (seed, step). A resumed run therefore continues exactly
where it stopped without saving any RNG state, and N workers split the very batch that one
worker would draw.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from uvit.diffusion import noise_prediction_loss
from uvit.diffusion.schedules import NoiseSchedule


def step_generator(seed: int, step: int) -> torch.Generator:
    """The CPU generator of one training step: the same on every worker (see `draw_step`)."""
    # A large prime multiplier keeps (seed, step) pairs from colliding for any real run.
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


@dataclass
class StepDraws:
    """One worker's share of a step's randomness: rows, times, noise, dropped conditions."""

    idx: Tensor  # (b,) row indices into the training set
    t: Tensor  # (b,) continuous diffusion times
    noise: Tensor  # (b, *sample_shape)
    drop: Tensor  # (b,) bool: condition replaced by the null condition
    latent_noise: Tensor | None = None  # (b, *sample_shape): draws z from stored VAE moments
    caption_rows: Tensor | None = None  # (b,) int64 text-to-image: the caption row (context) of each image row
    flip: Tensor | None = None  # (b,) bool: mirror the image horizontally (pixel recipes with random flips)


@dataclass(frozen=True)
class DrawConfig:
    """What every step of a run draws, whatever the data: a global batch of `global_batch` rows,
    their diffusion times under `schedule`, noise of `sample_shape` (C, H, W), condition dropout
    with probability `p_uncond`; with `latent`, the noise that samples z from stored VAE moments;
    with `random_flip`, a horizontal flip per row (p = 0.5)."""

    seed: int
    global_batch: int
    sample_shape: tuple[int, ...]
    schedule: NoiseSchedule
    p_uncond: float
    latent: bool = False
    random_flip: bool = False


def draw_step(
    config: DrawConfig,
    step: int,
    num_rows: int,
    caption_offsets: Tensor | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> StepDraws:
    """Draw the whole global batch's randomness of `step` over `num_rows` training rows, then keep
    this worker's slice.

    Text-to-image (`caption_offsets` (num_rows + 1,) int64: image i's captions are caption rows
    [offsets[i], offsets[i+1])): each drawn image row also gets one of its captions uniformly at
    random, as the official MS-COCO dataset does per item. That draw comes after all the others,
    so every other benchmark draws exactly what it drew before. Random horizontal flips
    (`config.random_flip`, p = 0.5 per row, the official CIFAR-10 / CelebA / ImageNet 64 recipes)
    are drawn after that.

    Every worker draws the same global batch, so N workers compute exactly the step that one
    worker with the same global batch would (up to float summation order), and a resumed run
    repeats nothing and skips nothing.
    """
    global_batch, sample_shape = config.global_batch, config.sample_shape
    if global_batch % world_size:
        raise ValueError(f"global batch {global_batch} is not divisible by {world_size} workers")
    g = step_generator(config.seed, step)
    idx = torch.randint(num_rows, (global_batch,), generator=g)
    t = config.schedule.sample_train_time(global_batch, generator=g)
    noise = torch.randn(global_batch, *sample_shape, generator=g)
    drop = torch.rand(global_batch, generator=g) < config.p_uncond
    latent_noise = torch.randn(global_batch, *sample_shape, generator=g) if config.latent else None  # drawn last
    caption_rows = None
    if caption_offsets is not None:  # drawn last: the draws above are unchanged
        u = torch.rand(global_batch, generator=g, dtype=torch.float64)
        first, count = caption_offsets[idx], caption_offsets[idx + 1] - caption_offsets[idx]
        caption_rows = first + torch.minimum((u * count).long(), count - 1)
    flips = torch.rand(global_batch, generator=g) < 0.5 if config.random_flip else None  # drawn last
    local = slice(rank * global_batch // world_size, (rank + 1) * global_batch // world_size)

    def mine(x: Tensor | None) -> Tensor | None:
        return None if x is None else x[local]

    return StepDraws(
        idx[local], t[local], noise[local], drop[local], mine(latent_noise), mine(caption_rows), mine(flips)
    )


def _map_tensors(batch: Batch, fn) -> Batch:
    """`batch` with `fn` applied to its tensors, but idx and drop, which stay on the host
    (train_step tests `drop.any()`, which would sync a GPU)."""

    def apply(t: Tensor | None) -> Tensor | None:
        return None if t is None else fn(t)

    d = batch.draws
    draws = replace(d, t=apply(d.t), noise=apply(d.noise), latent_noise=apply(d.latent_noise))
    return Batch(batch.step, apply(batch.x), apply(batch.y), draws, apply(batch.context))


@dataclass
class Batch:
    """One rank's share of one step: the training rows and that step's random draws.

    x: (b, C, H, W) float32 images in [-1, 1], or (b, 2C, h, w) float32 VAE moments;
    y: (b,) int64 labels or None; draws: the rank's `StepDraws` (idx are global row ids);
    context: text-to-image, (b, 77, D) float32 CLIP features of caption rows `draws.caption_rows`
    as stored (condition dropout is applied by `train_step`), else None.
    """

    step: int
    x: Tensor
    y: Tensor | None
    draws: StepDraws
    context: Tensor | None = None

    def to(self, device: torch.device, non_blocking: bool = False) -> Batch:
        return _map_tensors(self, lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        """Page-locked copies, so `to(cuda, non_blocking=True)` overlaps with compute."""
        return _map_tensors(self, Tensor.pin_memory)


def build_optimizer(
    model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float], fused: bool | None = None
) -> torch.optim.AdamW:
    """AdamW over every parameter (the official code has no parameter groups)."""
    if fused is None:
        fused = next(model.parameters()).is_cuda
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=betas, fused=fused)


def warmup_lambda(warmup_steps: int):
    """min(step / warmup, 1): linear warmup from 0, then constant (the official schedule)."""

    def factor(step: int) -> float:
        return 1.0 if warmup_steps == 0 else min(step / warmup_steps, 1.0)

    return factor


class EMA(nn.Module):
    """Exponential moving average of a model's parameters (buffers are copied).

    Starts as an exact copy, no warmup: theta_ema <- decay * theta_ema + (1 - decay) * theta.
    """

    def __init__(self, model: nn.Module, decay: float):
        super().__init__()
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema = [p for p in self.model.parameters()]
        src = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema, src, 1.0 - self.decay)
        for b_ema, b in zip(self.model.buffers(), model.buffers(), strict=True):
            b_ema.copy_(b)


def gather_rows(images: Tensor, labels: Tensor | None, idx: Tensor) -> tuple[Tensor, Tensor | None]:
    """Rows idx (b,) of in-memory training data: images (N, ...) -> (b, ...), labels (N,) -> (b,)."""
    idx = idx.to(images.device)
    return images[idx], None if labels is None else labels[idx]


def condition_context(context: Tensor, drop: Tensor, empty_context: Tensor | None) -> Tensor:
    """Condition dropout for text: rows with `drop` get the empty prompt's context, not zeros.

    context: (b, L, D) the captions' CLIP features; drop: (b,) bool; empty_context: (L, D), the
    encoding of "" (what classifier-free guidance pairs with at sampling time).
    """
    if not bool(drop.any()):
        return context
    if empty_context is None:
        raise ValueError("condition dropout needs the empty context (empty_context.npy of the caption split)")
    keep = ~drop.to(context.device).view(-1, *([1] * (context.dim() - 1)))
    return torch.where(keep, context, empty_context.to(context.device, context.dtype).unsqueeze(0))


@dataclass
class StepStats:
    """A step's loss and gradient norm as 0-d tensors on the model's device, and its lr.

    Reading `loss` / `grad_norm` as floats waits for the GPU, so the trainer does it only at
    log and checkpoint steps: the other steps queue their kernels without a host sync.
    """

    loss_t: Tensor
    grad_norm_t: Tensor
    lr: float

    @property
    def loss(self) -> float:
        return float(self.loss_t)

    @property
    def grad_norm(self) -> float:
        return float(self.grad_norm_t)


@dataclass(frozen=True)
class StepConfig:
    """The fixed recipe of every training step of a run.

    schedule: the noise schedule of the loss; null_class: the label index that condition dropout
    substitutes (class-conditional runs); empty_context: (77, D) the encoding of "" that it
    substitutes (text-to-image); grad_clip: max gradient norm or None; autocast_dtype: bf16/fp16
    autocast or None (fp32); latent_scale: the VAE scale factor when x holds stored moments.
    """

    schedule: NoiseSchedule
    null_class: int | None = None
    empty_context: Tensor | None = None
    grad_clip: float | None = None
    autocast_dtype: torch.dtype | None = None
    latent_scale: float | None = None


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    ema: EMA | None,
    batch: Batch,
    config: StepConfig,
    scaler: torch.amp.GradScaler | None = None,
) -> StepStats:
    """Noise-prediction loss on one batch, backward, (clip), AdamW, LR schedule, EMA.

    batch.x: (b, C, H, W) the batch's rows `draws.idx` in [-1, 1] on the model's device, or
    (b, 2C, h, w) VAE moments when `config.latent_scale` is given (z is re-sampled from them with
    `draws.latent_noise`); batch.y: (b,) class labels or None. `gather_rows` picks them from
    in-memory tensors, `uvit.train.data.StreamingLoader` from shards on disk. Text-to-image:
    batch.context (b, 77, D) the chosen captions' CLIP features (`draws.caption_rows`), replaced by
    `config.empty_context` in the rows `draws.drop` marks. `scaler`: fp16's loss scaler.
    """
    device, draws = batch.x.device, batch.draws
    x0 = batch.x
    if config.latent_scale is not None:
        from uvit.encoders.vae import sample_latents

        x0 = sample_latents(x0, config.latent_scale, noise=draws.latent_noise)
    cond = _conditions(batch, config)
    autocast = config.autocast_dtype
    with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
        loss = noise_prediction_loss(
            model, x0, config.schedule, t=draws.t.to(device), noise=draws.noise.to(device, x0.dtype), **cond
        ).mean()
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    grad_clip = config.grad_clip if config.grad_clip is not None else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    lr = optimizer.param_groups[0]["lr"]
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    scheduler.step()
    if ema is not None:
        ema.update(unwrap(model))
    if hasattr(grad_norm, "full_tensor"):  # FSDP: a replicated DTensor (every rank calls this)
        grad_norm = grad_norm.full_tensor()
    return StepStats(loss_t=loss.detach(), grad_norm_t=grad_norm.detach(), lr=lr)


def _conditions(batch: Batch, config: StepConfig) -> dict[str, Tensor]:
    """The model's condition inputs after condition dropout: y (b,) labels, context (b, L, D)."""
    draws, cond = batch.draws, {}
    if batch.y is not None:
        y = batch.y
        if draws.drop.any():
            if config.null_class is None:
                raise ValueError("condition dropout needs the null class index")
            y = torch.where(draws.drop.to(batch.x.device), torch.full_like(y, config.null_class), y)
        cond["y"] = y
    if batch.context is not None:
        cond["context"] = condition_context(batch.context, draws.drop, config.empty_context)
    return cond


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module under DDP / torch.compile wrappers (what checkpoints store)."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model
