"""The U-ViT architecture's configuration: a frozen dataclass, torch-free.

Kept apart from the modules (uvit/models/uvit.py) so that reading a params file, validating a
preset name or listing presets does not import torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

SkipMode = Literal["concat_linear", "add", "add_linear_skip", "linear_add", "none"]
SKIP_MODES: tuple[str, ...] = ("concat_linear", "add", "add_linear_skip", "linear_add", "none")
TimeMode = Literal["token", "adaln"]
TIME_MODES: tuple[str, ...] = ("token", "adaln")
ConvPosition = Literal["after_unpatchify", "before_linear", "none"]
CONV_POSITIONS: tuple[str, ...] = ("after_unpatchify", "before_linear", "none")
PatchEmbedMode = Literal["linear", "conv_stem"]
PATCH_EMBEDS: tuple[str, ...] = ("linear", "conv_stem")
PosEmbedMode = Literal["learned", "sinusoidal_2d", "none"]
POS_EMBEDS: tuple[str, ...] = ("learned", "sinusoidal_2d", "none")
# The design-study switches and their values; the first value of each is the official one.
SWITCHES: dict[str, tuple[str, ...]] = {
    "skip": SKIP_MODES,
    "time": TIME_MODES,
    "conv_position": CONV_POSITIONS,
    "patch_embedding": PATCH_EMBEDS,
    "position_embedding": POS_EMBEDS,
}
# Switches added after the first release: left out of to_dict() at their default, so the
# config.json of an official-architecture model is the same bytes as before they existed.
# No field shares a name with a submodule or parameter (`patch_embed`, `pos_embed`): the
# diffusers wrapper exposes config fields as attributes of the model.
_NEW_SWITCHES = ("conv_position", "time", "patch_embedding", "position_embedding")

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass(frozen=True)
class UViTConfig:
    """Everything that defines a U-ViT's architecture (its weights' shapes and its forward).

    `num_classes > 0` makes the model class-conditional; the official ImageNet-256/512 models
    use K+1 classes, the last being the "null" class for classifier-free guidance.
    `clip_dim` makes it text-conditional on `num_text_tokens` CLIP embeddings (the t2i variant).

    The design-study switches (defaults = the official architecture):
      skip                long skip: concat_linear (Linear(Concat(h_m, h_s))) | add |
                          add_linear_skip | linear_add | none (see `Block`)
      time                token: the time embedding is a token (and the label too, class
                          models) | adaln: no time/label token; SiLU(time embedding [+ label
                          embedding]) gives each LayerNorm a scale and shift (see `Block`)
      conv                the official flag: False (the Huge models) means no extra 3x3 conv
      conv_position       after_unpatchify: Conv2d(C, C, 3) on the output image |
                          before_linear: Conv2d(D, D, 3) on the patch-token grid, between the
                          final norm and decoder_pred | none. `extra_conv` is the resolved
                          choice ("none" whenever conv=False).
      patch_embedding     linear: Conv2d(C, D, kernel=stride=p) | conv_stem (see `PatchEmbed`)
      position_embedding  learned: a 1D parameter over all tokens | sinusoidal_2d: the fixed
                          MAE/DiT 2D sin-cos table on the patch grid, zeros on condition
                          tokens, a buffer outside the state dict | none
    depth, embed_dim and patch_size are the scaling knobs.
    """

    img_size: int = 32
    patch_size: int = 2
    in_chans: int = 3
    embed_dim: int = 512
    depth: int = 12
    num_heads: int = 8
    mlp_ratio: float = 4.0
    qkv_bias: bool = False
    num_classes: int = -1
    clip_dim: int | None = None
    num_text_tokens: int = 77
    mlp_time_embed: bool = False
    conv: bool = True
    conv_position: ConvPosition = "after_unpatchify"
    skip: SkipMode = "concat_linear"
    time: TimeMode = "token"
    patch_embedding: PatchEmbedMode = "linear"
    position_embedding: PosEmbedMode = "learned"
    use_checkpoint: bool = False

    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> ValueError:
            return ValueError(f"UViTConfig.{key}={getattr(self, key)!r}: {why}")

        if self.img_size % self.patch_size:
            raise bad("img_size", f"must be divisible by patch_size={self.patch_size}")
        if self.depth < 0 or self.depth % 2:
            raise bad("depth", "must be a non-negative even number (depth/2 in-blocks and out-blocks)")
        if self.embed_dim % self.num_heads:
            raise bad("embed_dim", f"must be divisible by num_heads={self.num_heads}")
        for key, values in SWITCHES.items():
            if getattr(self, key) not in values:
                raise bad(key, f"must be one of {values}")
        if not self.conv and self.conv_position == "before_linear":
            raise bad("conv_position", "conv=False means no extra conv; set conv=True to place it before_linear")
        if self.patch_embedding == "conv_stem" and self.patch_size & (self.patch_size - 1):
            raise bad(
                "patch_size", "the conv_stem patch embedding halves the image log2(p) times: p must be a power of 2"
            )
        if self.position_embedding == "sinusoidal_2d" and self.embed_dim % 4:
            raise bad("embed_dim", "the 2D sin-cos position embedding needs a multiple of 4")
        if self.num_classes > 0 and self.clip_dim is not None:
            raise bad("clip_dim", "a model is class-conditional or text-conditional, not both")

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def extras(self) -> int:
        """Number of non-patch tokens in front of the patches: time (+ label) (+ text).

        With time="adaln" time and label condition the norms instead: only text stays a token."""
        time = 1 if self.time == "token" else 0
        if self.clip_dim is not None:
            return time + self.num_text_tokens
        return 2 * time if self.num_classes > 0 else time

    @property
    def extra_conv(self) -> ConvPosition:
        """Where the extra 3x3 conv runs, `conv` and `conv_position` resolved."""
        return self.conv_position if self.conv else "none"

    @property
    def num_tokens(self) -> int:
        return self.extras + self.num_patches

    def to_dict(self) -> dict:
        """The fields as a JSON-able dict; switches added later are left out at their default."""
        d = dataclasses.asdict(self)
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for key in _NEW_SWITCHES:
            if d[key] == defaults[key]:
                del d[key]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> UViTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown UViTConfig keys: {sorted(unknown)}")
        return cls(**d)
