"""The paper's U-ViT presets by name, with the official implementation's exact sizes.

`expected_params` is the parameter count of the official classes built from the official
configs; tests hold every preset to it digit for digit.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from uvit.models.config import UViTConfig


@dataclass(frozen=True)
class Preset:
    name: str
    title: str  # the paper's name, e.g. "U-ViT-H/2"
    benchmark: str
    config: UViTConfig
    expected_params: int | None  # official count; None for presets of our own


def _preset(name: str, title: str, benchmark: str, expected: int | None, **config) -> Preset:
    return Preset(name, title, benchmark, UViTConfig(**config), expected)


_SMALL = dict(embed_dim=512, depth=12, num_heads=8)
_MID = dict(embed_dim=768, depth=16, num_heads=12, use_checkpoint=True)
_LARGE = dict(embed_dim=1024, depth=20, num_heads=16, use_checkpoint=True)
_HUGE = dict(embed_dim=1152, depth=28, num_heads=16, conv=False, use_checkpoint=True)
_LATENT256 = dict(img_size=32, in_chans=4)
_LATENT512 = dict(img_size=64, in_chans=4)
_T2I = dict(clip_dim=768, num_text_tokens=77)

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        _preset("cifar10_uvit_s2", "U-ViT-S/2", "cifar10", 44_255_328, img_size=32, patch_size=2, **_SMALL),
        _preset("celeba64_uvit_s4", "U-ViT-S/4", "celeba64", 44_292_228, img_size=64, patch_size=4, **_SMALL),
        _preset(
            "imagenet64_uvit_m4",
            "U-ViT-M/4",
            "imagenet64",
            130_940_292,
            img_size=64,
            patch_size=4,
            num_classes=1000,
            **_MID,
        ),
        _preset(
            "imagenet64_uvit_l4",
            "U-ViT-L/4",
            "imagenet64",
            286_827_652,
            img_size=64,
            patch_size=4,
            num_classes=1000,
            **_LARGE,
        ),
        _preset(
            "imagenet256_uvit_l2",
            "U-ViT-L/2",
            "imagenet256",
            286_763_172,
            patch_size=2,
            num_classes=1001,
            **_LATENT256,
            **_LARGE,
        ),
        _preset(
            "imagenet256_uvit_h2",
            "U-ViT-H/2",
            "imagenet256",
            500_832_016,
            patch_size=2,
            num_classes=1001,
            **_LATENT256,
            **_HUGE,
        ),
        _preset(
            "imagenet512_uvit_l4",
            "U-ViT-L/4",
            "imagenet512",
            286_861_524,
            patch_size=4,
            num_classes=1001,
            **_LATENT512,
            **_LARGE,
        ),
        _preset(
            "imagenet512_uvit_h4",
            "U-ViT-H/4",
            "imagenet512",
            500_942_656,
            patch_size=4,
            num_classes=1001,
            **_LATENT512,
            **_HUGE,
        ),
        _preset(
            "mscoco256_uvit_s2", "U-ViT-S/2", "mscoco256", 44_692_644, patch_size=2, **_LATENT256, **_T2I, **_SMALL
        ),
        _preset(
            "mscoco256_uvit_s2_deep",
            "U-ViT-S/2 (Deep)",
            "mscoco256",
            58_345_636,
            patch_size=2,
            **_LATENT256,
            **_T2I,
            **{**_SMALL, "depth": 16},
        ),
        # Ours: the embedded CPU benchmark (8x8 grey digits, 10 classes + the null class for CFG).
        # Shape chosen by measured quality per CPU-second: at 2,000 steps it beat D128/depth-4/mlp-4
        # (more FLOPs) and D96/depth-4 (fewer) on FID.
        _preset(
            "digits_uvit_tiny",
            "U-ViT-T/2",
            "digits",
            None,
            img_size=8,
            patch_size=2,
            in_chans=1,
            embed_dim=128,
            depth=4,
            num_heads=4,
            mlp_ratio=2.0,
            num_classes=11,
        ),
    ]
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None


def preset_config(name: str, **overrides) -> UViTConfig:
    """The preset's config with fields replaced, e.g. preset_config("cifar10_uvit_s2", skip="add")."""
    return dataclasses.replace(get_preset(name).config, **overrides)
