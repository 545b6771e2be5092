"""Classifier-free guidance: eps = eps_c + s (eps_c - eps_u) = (1 + s) eps_c - s eps_u."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .losses import NoiseModel

__all__ = ["Condition", "classifier_free_guidance", "guided_network"]


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


@dataclass(frozen=True)
class Condition:
    """What N samples are conditioned on: class labels, or text contexts, or nothing (unconditional).

    labels: (N,) int64 class ids; guidance's unconditional branch is the null class.
    contexts: (N, L, D) text contexts (e.g. CLIP, L = 77), any float dtype, any device.
    empty_context: (L, D) or (1, L, D) the context of the empty caption: guidance's unconditional
        branch for text (not zeros), needed when the guidance scale is > 0.
    """

    labels: Tensor | None = None
    contexts: Tensor | None = None
    empty_context: Tensor | None = None

    def __post_init__(self) -> None:
        if self.labels is not None and self.contexts is not None:
            raise ValueError("a condition is class labels or text contexts, not both")

    def rows(self, start: int, stop: int) -> Condition:
        """The condition of samples [start, stop) (the empty context is shared)."""
        labels = None if self.labels is None else self.labels[start:stop]
        contexts = None if self.contexts is None else self.contexts[start:stop]
        return Condition(labels, contexts, self.empty_context)

    def to(self, device: str | torch.device) -> Condition:
        """On `device`: labels as they are, contexts as float32, the empty context with a batch dim of 1."""
        labels = None if self.labels is None else self.labels.to(device)
        contexts = None if self.contexts is None else torch.as_tensor(self.contexts).to(device, torch.float32)
        empty = None if self.empty_context is None else torch.as_tensor(self.empty_context).to(device, torch.float32)
        if empty is not None and empty.dim() == 2:
            empty = empty[None]
        return Condition(labels, contexts, empty)


def guided_network(model: NoiseModel, scale: float, condition: Condition, null_class: int | None = None) -> NoiseModel:
    """net(x, model_time) -> eps for one batch: model(x, t, y=labels) or model(x, t, context=contexts),
    guided with scale s when s > 0 (unconditional branch: `null_class`, or the empty context), or the
    model itself when the condition is empty. The condition's tensors must be on the model's device."""
    if condition.labels is not None:
        y = condition.labels
        if scale > 0:
            if null_class is None:
                raise ValueError("guidance on class labels needs the null class")
            return classifier_free_guidance(model, scale, {"y": y}, {"y": torch.full_like(y, null_class)})
        return lambda x, t: model(x, t, y=y)
    if condition.contexts is not None:
        ctx = condition.contexts
        if scale > 0:
            if condition.empty_context is None:
                raise ValueError("guidance on text contexts needs the empty caption's context")
            return classifier_free_guidance(model, scale, {"context": ctx}, {"context": condition.empty_context})
        return lambda x, t: model(x, t, context=ctx)
    return model
