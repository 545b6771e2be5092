"""Training objective and classifier-free-guidance condition dropout, as the official training scripts do."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .schedules import NoiseSchedule

__all__ = ["NoiseModel", "noise_prediction_loss", "drop_labels", "drop_context"]

# model(x_t, model_time, **cond) -> eps_hat, same shape as x_t
NoiseModel = Callable[..., Tensor]


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    """(B,) -> (B, 1, ..., 1) to broadcast against `like`."""
    return v.reshape(-1, *([1] * (like.dim() - 1)))


def _on_generator(fn, shape, generator: torch.Generator | None, device, **kw) -> Tensor:
    # Draw where the generator lives (a CPU generator cannot fill a CUDA tensor), then move.
    src = generator.device if generator is not None else device
    return fn(shape, generator=generator, device=src, **kw).to(device)


def noise_prediction_loss(
    model: NoiseModel,
    x0: Tensor,
    schedule: NoiseSchedule,
    generator: torch.Generator | None = None,
    *,
    t: Tensor | None = None,
    noise: Tensor | None = None,
    **cond: Tensor,
) -> Tensor:
    """Per-example epsilon-prediction MSE (the official LSimple).

    `t` (B,) and `noise` (like x0) may be given instead of drawn: the trainer draws them for the
    whole global batch so that every worker's slice is the one a single worker would use.

    x0: (B, ...) clean data (pixels or latents). t ~ schedule.sample_train_time, eps ~ N(0, I),
    x_t = alpha_t x0 + sigma_t eps. Returns (B,): mean over non-batch dims of (eps - eps_hat)^2;
    the caller takes .mean() over the batch.
    """
    b = x0.shape[0]
    if t is None:
        t = schedule.sample_train_time(b, generator=generator, device=x0.device)
    eps = noise if noise is not None else _on_generator(torch.randn, x0.shape, generator, x0.device, dtype=x0.dtype)
    alpha = _bcast(schedule.alpha(t).to(x0.dtype), x0)
    sigma = _bcast(schedule.sigma(t).to(x0.dtype), x0)
    x_t = alpha * x0 + sigma * eps
    eps_hat = model(x_t, schedule.model_time(t), **cond)
    err = eps - eps_hat
    # Average in at least float32 so half-precision outputs do not lose the small per-example sums.
    return err.to(torch.promote_types(err.dtype, torch.float32)).pow(2).flatten(1).mean(1)


def _drop_mask(batch: int, p_uncond: float, generator: torch.Generator | None, device) -> Tensor:
    """(B,) bool, each True independently with probability p_uncond."""
    if not 0.0 <= p_uncond <= 1.0:
        raise ValueError(f"p_uncond must be in [0, 1], got {p_uncond}")
    # rand is in [0, 1): p=0 never drops, p=1 always does.
    return _on_generator(torch.rand, (batch,), generator, device) < p_uncond


def drop_labels(y: Tensor, p_uncond: float, null_class: int, generator: torch.Generator | None = None) -> Tensor:
    """Replace class labels y (B,) by `null_class` (1000 for ImageNet) with probability p_uncond."""
    mask = _drop_mask(y.shape[0], p_uncond, generator, y.device)
    return torch.where(mask, torch.full_like(y, null_class), y)


def drop_context(
    context: Tensor, p_uncond: float, empty_context: Tensor, generator: torch.Generator | None = None
) -> Tensor:
    """Replace text contexts (B, 77, 768) by the empty-prompt embedding (77, 768) (or (1, 77, 768))
    with probability p_uncond per sample. The empty context is CLIP(""), not zeros (the official text-to-image recipe)."""
    mask = _drop_mask(context.shape[0], p_uncond, generator, context.device)
    empty = empty_context.to(context).reshape(1, *context.shape[1:])
    return torch.where(_bcast(mask, context), empty, context)
