"""The U-ViT model family: the modules, the paper's presets and official-checkpoint loading.

Importable with torch and einops alone. Names load on first use, so that reading params or
checking a preset name (`uvit.models.presets`, `uvit.models.config`) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "count_macs": "flops",
    "count_params": "flops",
    "OFFICIAL_CHECKPOINTS": "official",
    "load_official": "official",
    "load_state_dict_strict": "official",
    "read_state_dict": "official",
    "PRESETS": "presets",
    "Preset": "presets",
    "get_preset": "presets",
    "preset_config": "presets",
    "CONV_POSITIONS": "config",
    "PATCH_EMBEDS": "config",
    "POS_EMBEDS": "config",
    "SKIP_MODES": "config",
    "SWITCHES": "config",
    "TIME_MODES": "config",
    "UViTConfig": "config",
    "UViT": "uvit",
    "timestep_embedding": "uvit",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
