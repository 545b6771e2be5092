"""The U-ViT model family: the modules, the paper's presets and official-checkpoint loading.

Importable with torch and einops alone.
"""

from uvit.models.flops import count_macs, count_params
from uvit.models.official import OFFICIAL_CHECKPOINTS, load_official, load_state_dict_strict, read_state_dict
from uvit.models.presets import PRESETS, Preset, get_preset, preset_config
from uvit.models.uvit import (
    CONV_POSITIONS,
    PATCH_EMBEDS,
    POS_EMBEDS,
    SKIP_MODES,
    SWITCHES,
    TIME_MODES,
    UViT,
    UViTConfig,
    timestep_embedding,
)

__all__ = [
    "CONV_POSITIONS", "OFFICIAL_CHECKPOINTS", "PATCH_EMBEDS", "POS_EMBEDS", "PRESETS", "SKIP_MODES", "SWITCHES",
    "TIME_MODES", "Preset", "UViT", "UViTConfig", "count_macs", "count_params", "get_preset", "load_official",
    "load_state_dict_strict", "preset_config", "read_state_dict", "timestep_embedding",
]
