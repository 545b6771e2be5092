"""Loading the officially released U-ViT checkpoints (baofff/U-ViT `nnet.pth`, `nnet_ema.pth`).

They are plain fp32 state dicts of the unwrapped module whose key names equal ours, so loading
is a strict `load_state_dict` after a safe (weights-only) unpickle. Preset names map to the
released files in `OFFICIAL_CHECKPOINTS`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from uvit.models.presets import get_preset
from uvit.models.uvit import UViT

# Released checkpoint file names per preset (README of baofff/U-ViT); users download them
# themselves: this machine class has no route to the hosting site.
OFFICIAL_CHECKPOINTS: dict[str, str] = {
    "cifar10_uvit_s2": "cifar10_uvit_small.pth",
    "celeba64_uvit_s4": "celeba64_uvit_small.pth",
    "imagenet64_uvit_m4": "imagenet64_uvit_mid.pth",
    "imagenet64_uvit_l4": "imagenet64_uvit_large.pth",
    "imagenet256_uvit_l2": "imagenet256_uvit_large.pth",
    "imagenet256_uvit_h2": "imagenet256_uvit_huge.pth",
    "imagenet512_uvit_l4": "imagenet512_uvit_large.pth",
    "imagenet512_uvit_h4": "imagenet512_uvit_huge.pth",
    "mscoco256_uvit_s2": "mscoco_uvit_small.pth",
    "mscoco256_uvit_s2_deep": "mscoco_uvit_small_deep.pth",
}


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a `.pth` state dict without executing pickled code (weights_only=True).

    Accepts a bare state dict or one wrapped as {"state_dict"/"model"/"nnet": ...}, and strips
    a DDP `module.` prefix.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # the weights-only unpickler refuses anything but tensors and containers
        raise ValueError(f"refusing to load {path}: it is not a plain tensor state dict ({e})") from e
    for key in ("state_dict", "model", "nnet"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def check_state_dict(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor], header: str, source: str) -> None:
    """Raise ValueError, under `header`, listing the keys of `state` (named `source` in the message)
    that are missing from, unknown to, or mis-shaped for a model whose state dict is `own`."""
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: {source} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if own[k].shape != state[k].shape
    ]
    if missing or unexpected or shapes:
        lines = [header]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:8]) + (" ..." if len(items) > 8 else ""))
        raise ValueError("\n".join(lines))


def load_state_dict_strict(model: UViT, state: dict[str, torch.Tensor]) -> UViT:
    """Strict load with a readable error listing missing, unexpected and mis-shaped keys."""
    header = f"checkpoint does not match the model ({model.num_parameters():,} parameters):"
    check_state_dict(model.state_dict(), state, header, "checkpoint")
    model.load_state_dict(state, strict=True)
    return model


def load_official(preset: str, path: str | Path, device: str | torch.device = "cpu") -> UViT:
    """Build `preset` and load an official checkpoint into it (strict key and shape match)."""
    model = UViT(get_preset(preset).config)
    return load_state_dict_strict(model, read_state_dict(path)).to(device)
