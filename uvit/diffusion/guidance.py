"""Classifier-free guidance (spec 3.3): eps = eps_c + s (eps_c - eps_u) = (1 + s) eps_c - s eps_u."""

from __future__ import annotations

import torch
from torch import Tensor

from .losses import NoiseModel

__all__ = ["classifier_free_guidance"]


def _to_batch(v: Tensor, b: int, key: str) -> Tensor:
    """Expand a condition with batch dim 1 (e.g. the empty context (1, 77, 768)) to b."""
    if v.shape[0] == b:
        return v
    if v.shape[0] == 1:
        return v.expand(b, *v.shape[1:])
    raise ValueError(f"condition {key!r} has batch {v.shape[0]}, expected 1 or {b}")


def classifier_free_guidance(
    model: NoiseModel, scale: float, cond: dict[str, Tensor], uncond: dict[str, Tensor]
) -> NoiseModel:
    """Wrap model(x, model_time, **cond) into a guided NoiseModel(x, model_time) -> eps.

    cond: e.g. {"y": (B,)} or {"context": (B, 77, 768)}; uncond: the same keys, e.g.
    {"y": full(1000)} or {"context": empty (1, 77, 768)}; batch 1 is expanded.
    Conditional and unconditional branches share ONE forward of batch 2B, as the official
    scripts do. scale == 0 is plain conditional sampling (a single forward of batch B).
    """
    if set(cond) != set(uncond):
        raise ValueError(f"cond and uncond need the same keys, got {sorted(cond)} vs {sorted(uncond)}")

    def guided(x: Tensor, model_time: Tensor) -> Tensor:
        b = x.shape[0]
        c = {k: _to_batch(v, b, k) for k, v in cond.items()}
        if scale == 0:
            return model(x, model_time, **c)
        t = torch.as_tensor(model_time, device=x.device)
        t = t.expand(b) if t.dim() == 0 else t
        both = {k: torch.cat([c[k], _to_batch(uncond[k], b, k).to(c[k])]) for k in c}
        eps_c, eps_u = model(torch.cat([x, x]), torch.cat([t, t]), **both).chunk(2)
        return eps_c + scale * (eps_c - eps_u)

    return guided
