"""Data-parallel strategies for the training loop: DDP (replicated) or FSDP2 (sharded).

DDP keeps a full copy of the weights, gradients and AdamW state on every worker (Ray's
`prepare_model`). FSDP (`torch.distributed.fsdp.fully_shard`, "FSDP2") shards each transformer
block's parameters, gradients and optimizer state across the workers and all-gathers a block's
weights just for its forward/backward: what lets U-ViT-H (500M parameters, ~8 GB of weights +
AdamW state in fp32) leave room for activations. The EMA copy is sharded the same way.

Both write the same checkpoints (uvit/train/checkpoint.py): full, unsharded state dicts, with
the optimizer state keyed by parameter index as `torch.optim.AdamW.state_dict()` keys it, so a
checkpoint saved under one strategy resumes under the other (or on a single process).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from uvit.train.step import EMA, unwrap

STRATEGIES = ("ddp", "fsdp")


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The units FSDP shards one by one: U-ViT's transformer blocks (shallow, middle, deep)."""
    return [*model.in_blocks, model.mid_block, *model.out_blocks]


def fsdp_shard(model: nn.Module, mesh=None) -> nn.Module:
    """Shard `model` in place with FSDP2: each block, then the root (embeddings, head)."""
    from torch.distributed.fsdp import fully_shard

    for block in _blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


class Strategy:
    """How one worker holds the model. `wrap` the plain model (after loading a checkpoint into
    it), build the optimizer on `net.parameters()`, then `load_optimizer`; `full_state` gathers
    the unsharded state for a checkpoint (a collective under FSDP: every rank must call it)."""

    def __init__(self, name: str, world_size: int, device: torch.device):
        if name not in STRATEGIES:
            raise ValueError(f"unknown strategy {name!r}; choose one of {STRATEGIES}")
        if name == "fsdp" and not _fsdp_available():
            raise RuntimeError("strategy fsdp needs torch.distributed.fsdp.fully_shard (torch >= 2.6)")
        self.name, self.world, self.device = name, world_size, device

    @property
    def sharded(self) -> bool:
        return self.name == "fsdp" and self.world > 1

    def wrap(self, model: nn.Module) -> nn.Module:
        if self.sharded:
            return fsdp_shard(model)
        if self.world > 1:
            import ray.train.torch

            return ray.train.torch.prepare_model(model, move_to_device=False)
        return model

    def make_ema(self, model: nn.Module, decay: float, state: dict[str, torch.Tensor] | None = None) -> EMA:
        """EMA of the (not yet wrapped) model, with weights `state` if resuming; sharded like the
        model under FSDP, so the per-step lerp runs on local shards only."""
        ema = EMA(model, decay)
        if state is not None:
            ema.model.load_state_dict(state)
        if self.sharded:
            fsdp_shard(ema.model)
        return ema

    # -- state dicts ---------------------------------------------------------------------------
    def model_state(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """Full state dict of `module` (collective under FSDP; rank 0 gets the tensors, on CPU)."""
        module = unwrap(module)
        if not self.sharded:
            return module.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def optimizer_state(self, net: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """`optimizer.state_dict()` layout (state keyed by parameter index), gathered if sharded."""
        if not self.sharded:
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        osd = get_optimizer_state_dict(
            unwrap(net), optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        return _fqn_to_index(osd, _names(net)) if osd else {}

    def load_optimizer(self, net: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        """Load an index-keyed full optimizer state (every rank holds it) into the optimizer."""
        if not self.sharded:
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(
            unwrap(net), optimizer, _index_to_fqn(state, _names(net)), options=StateDictOptions(full_state_dict=True)
        )


def _fsdp_available() -> bool:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


def _names(net: nn.Module) -> list[str]:
    """Parameter names in `parameters()` order: index i of a plain AdamW state is names[i]."""
    return [n for n, _ in unwrap(net).named_parameters()]


def _fqn_to_index(osd: dict[str, Any], names: list[str]) -> dict[str, Any]:
    index = {n: i for i, n in enumerate(names)}
    groups = [{**g, "params": [index[p] for p in g["params"]]} for g in osd["param_groups"]]
    return {"state": {index[k]: v for k, v in osd["state"].items()}, "param_groups": groups}


def _index_to_fqn(osd: dict[str, Any], names: list[str]) -> dict[str, Any]:
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in osd["param_groups"]]
    return {"state": {names[int(k)]: v for k, v in osd["state"].items()}, "param_groups": groups}


def as_float(x: Any) -> float:
    """A scalar that may be a DTensor (FSDP's grad norm) as a Python float."""
    if hasattr(x, "full_tensor"):
        x = x.full_tensor()
    return float(x)
