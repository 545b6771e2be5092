"""The KL-f8 autoencoder of the latent benchmarks, as a diffusers ``AutoencoderKL``.

U-ViT's ``libs/autoencoder.py`` is the LDM / Stable-Diffusion KL-f8 ``Encoder``/``Decoder`` with
``quant_conv`` and ``post_quant_conv`` (the official autoencoder). Its three operations map to
diffusers as

* ``encode_moments(x)`` = quant_conv(encoder(x)) = ``vae.encode(x).latent_dist.parameters``:
  (B, 2·C, H/f, W/f), channels [0, C) the posterior mean, [C, 2C) the (unclamped) log-variance;
* ``sample(moments)`` = scale · (mean + exp(½·clamp(logvar, −30, 20)) · ε);
* ``decode(z)`` = decoder(post_quant_conv(z / scale)) = ``vae.decode(z / scale).sample``.

``scale`` is ``vae.config.scaling_factor``: 0.18215 for ImageNet 256/512, 0.23010 for MS-COCO
(:data:`SCALE_FACTORS`); :func:`load_vae` sets it.

:func:`load_vae` reads a diffusers directory (``save_pretrained``, or a pipeline directory with a
``vae/`` subfolder), a hub id from the local Hugging Face cache, or an official
``autoencoder_kl.pth`` / ``autoencoder_kl_ema.pth`` (LDM key names: converted with
:func:`ldm_to_diffusers_vae`, the mapping of diffusers' ``convert_unidiffuser_to_diffusers.py``,
and loaded strictly: no missing, unexpected or mis-shaped keys). A ``.pth`` is read with
``torch.load(weights_only=True)``: a file that pickles anything but tensors is refused.

Precision: on CUDA the encoder/decoder run under bf16 autocast (the official scripts use fp16
autocast) unless the model itself was loaded in a reduced dtype; on CPU everything is fp32.
Outputs are always float32.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from uvit.encoders import from_hub, is_hub_id

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

__all__ = [
    "DEFAULT_VAE",
    "LatentDecoder",
    "SCALE_FACTORS",
    "UnsafeCheckpointError",
    "decode",
    "diffusers_to_ldm_vae",
    "downsample_factor",
    "encode_moments",
    "encoder_fingerprint",
    "ldm_to_diffusers_vae",
    "load_vae",
    "pixels_to_unit",
    "sample_latents",
    "vae_config_from_ldm",
]

DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"
SCALE_FACTORS = {"imagenet": 0.18215, "mscoco": 0.23010}
# The official ddconfig as diffusers AutoencoderKL arguments; used when a
# .pth is converted and for the defaults that cannot be read from a state dict.
OFFICIAL_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 256,
    "scaling_factor": SCALE_FACTORS["imagenet"],
}
_PTH_SUFFIXES = {".pth", ".pt", ".ckpt", ".bin"}
_DEFAULT_PARAMS_KEY = "<benchmark>.encode.vae"


class UnsafeCheckpointError(ValueError):
    """A checkpoint file that pickles something other than tensors (refused, never executed)."""


# --------------------------------------------------------------------------------------------
# LDM <-> diffusers key names
# --------------------------------------------------------------------------------------------

_RESNET_SUB = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
_RESNET_SUB_INV = {v: k for k, v in _RESNET_SUB.items()}
_ATTN_SUB = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_ATTN_SUB_INV = {v: k for k, v in _ATTN_SUB.items()}


def _same(value: str, levels: int) -> str:
    return value


def _reversed_level(value: str, levels: int) -> str:
    return str(levels - 1 - int(value))


# Each key family's (LDM name, diffusers name). A {slot} stands for the values _SLOTS gives it
# on each side: (LDM regex, diffusers regex, LDM -> diffusers value, diffusers -> LDM value); the
# decoder's level {up} is reversed (LDM up.{L-1-i} = diffusers up_blocks.{i}), the mid block's
# resnet {mid} counts from 1 in LDM and from 0 in diffusers.
_SLOTS = {
    "part": ("encoder|decoder", "encoder|decoder", _same, _same),
    "io": ("conv_in|conv_out", "conv_in|conv_out", _same, _same),
    "quant": ("quant_conv|post_quant_conv", "quant_conv|post_quant_conv", _same, _same),
    "p": ("weight|bias", "weight|bias", _same, _same),
    "n": (r"\d+", r"\d+", _same, _same),
    "m": (r"\d+", r"\d+", _same, _same),
    "up": (r"\d+", r"\d+", _reversed_level, _reversed_level),
    "mid": ("[12]", "[01]", lambda v, L: str(int(v) - 1), lambda v, L: str(int(v) + 1)),
    "res": (
        "|".join(_RESNET_SUB),
        "|".join(_RESNET_SUB_INV),
        lambda v, L: _RESNET_SUB[v],
        lambda v, L: _RESNET_SUB_INV[v],
    ),
    "attn": (
        "|".join(_ATTN_SUB),
        "|".join(map(re.escape, _ATTN_SUB_INV)),
        lambda v, L: _ATTN_SUB[v],
        lambda v, L: _ATTN_SUB_INV[v],
    ),
}
_KEY_RULES = [
    ("{part}.norm_out.{p}", "{part}.conv_norm_out.{p}"),
    ("{part}.{io}.{p}", "{part}.{io}.{p}"),
    ("{quant}.{p}", "{quant}.{p}"),
    ("encoder.down.{n}.block.{m}.{res}.{p}", "encoder.down_blocks.{n}.resnets.{m}.{res}.{p}"),
    ("encoder.down.{n}.downsample.conv.{p}", "encoder.down_blocks.{n}.downsamplers.0.conv.{p}"),
    ("decoder.up.{up}.block.{m}.{res}.{p}", "decoder.up_blocks.{up}.resnets.{m}.{res}.{p}"),
    ("decoder.up.{up}.upsample.conv.{p}", "decoder.up_blocks.{up}.upsamplers.0.conv.{p}"),
    ("{part}.mid.block_{mid}.{res}.{p}", "{part}.mid_block.resnets.{mid}.{res}.{p}"),
    ("{part}.mid.attn_1.{attn}.{p}", "{part}.mid_block.attentions.0.{attn}.{p}"),
]
_ATTN_LINEAR = re.compile(
    r"\.(mid\.attn_1\.(q|k|v|proj_out)|mid_block\.attentions\.0\."
    r"(to_q|to_k|to_v|to_out\.0))\.weight$"
)


def _compile_rules(side: int) -> list[tuple[re.Pattern, str]]:
    """(regex of a side's name, the other side's template) per rule; side 0: LDM, 1: diffusers."""
    rules = []
    for names in _KEY_RULES:
        pieces = re.split(r"\{(\w+)\}", names[side])  # literal, slot, literal, ...
        regex = "".join(re.escape(x) if i % 2 == 0 else f"(?P<{x}>{_SLOTS[x][side]})" for i, x in enumerate(pieces))
        rules.append((re.compile(f"^{regex}$"), names[1 - side]))
    return rules


_RULES = (_compile_rules(0), _compile_rules(1))


def _num_levels(keys, pattern: str) -> int:
    levels = {int(m[1]) for k in keys if (m := re.match(pattern, k))}
    if not levels:
        raise ValueError(f"no keys match {pattern!r}: not a KL autoencoder state dict")
    return max(levels) + 1


def _rename_state(state: dict[str, torch.Tensor], from_ldm: bool) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(state under the other side's names, the keys no rule knows); the mid-block attention's
    weights go from 1x1 convs (LDM) to linear (diffusers) or back."""
    side = 0 if from_ldm else 1
    levels = _num_levels(state, r"^encoder\.down\.(\d+)\." if from_ldm else r"^encoder\.down_blocks\.(\d+)\.")
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        match, target = next(((m, t) for pattern, t in _RULES[side] if (m := pattern.match(key))), (None, None))
        if match is None:
            unknown.append(key)
            continue
        if _ATTN_LINEAR.search(key) and value.ndim == (4 if from_ldm else 2):
            value = value[:, :, 0, 0] if from_ldm else value[:, :, None, None]
        out[target.format(**{k: _SLOTS[k][2 + side](v, levels) for k, v in match.groupdict().items()})] = value
    return out, unknown


def ldm_to_diffusers_vae(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an LDM/U-ViT ``AutoencoderKL`` state dict (``encoder.down.0.block.0...``) to
    diffusers names (``encoder.down_blocks.0.resnets.0...``).

    The decoder's level index is reversed (LDM ``up.{L-1-i}`` = diffusers ``up_blocks.{i}``),
    ``nin_shortcut`` becomes ``conv_shortcut``, ``norm_out`` ``conv_norm_out``, and the mid-block
    attention's 1×1 convs ``q/k/v/proj_out`` become the linear ``to_q/to_k/to_v/to_out.0``
    (weights squeezed to 2-D). Raises ``ValueError`` listing every key it does not know (a
    checkpoint with attention outside the mid block, loss/discriminator weights, a prefix).
    """
    out, unknown = _rename_state(state, from_ldm=True)
    if unknown:
        raise ValueError(
            f"{len(unknown)} key(s) are not part of an LDM KL autoencoder "
            f"(encoder.*, decoder.*, quant_conv.*, post_quant_conv.*): "
            + ", ".join(sorted(unknown)[:10])
            + (" ..." if len(unknown) > 10 else "")
        )
    return out


def diffusers_to_ldm_vae(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`ldm_to_diffusers_vae`: diffusers ``AutoencoderKL`` names to LDM names
    (attention weights back to 1×1 convs). Useful to export a diffusers VAE for official code."""
    out, unknown = _rename_state(state, from_ldm=False)
    if unknown:
        raise ValueError(f"{len(unknown)} key(s) have no LDM name: " + ", ".join(sorted(unknown)[:10]))
    return out


def _default_groups(channels: list[int]) -> int:
    """GroupNorm groups of an LDM autoencoder: the official 32 when every level's channel count
    divides by 32, else the largest count below 32 that divides them all (a small autoencoder,
    e.g. 8 channels per level: 8 groups; such a file could not be loaded with 32 at all)."""
    return next(g for g in range(32, 0, -1) if all(c % g == 0 for c in channels))


def vae_config_from_ldm(
    state: dict[str, torch.Tensor],
    *,
    norm_num_groups: int | None = None,
    sample_size: int = 256,
    scaling_factor: float = SCALE_FACTORS["imagenet"],
) -> dict[str, Any]:
    """diffusers ``AutoencoderKL`` config for an LDM-named state dict, read from its shapes.

    Levels, channels per level, blocks per level, in/out/latent channels, quant convs and the
    mid-block attention come from the weights; the GroupNorm group count and ``sample_size``
    cannot (no weights hold them): ``sample_size`` defaults to the official 256 and
    ``norm_num_groups=None`` to the official 32 whenever the channels allow it (see
    :func:`_default_groups`).
    """

    def shape(key: str) -> tuple[int, ...]:
        if key not in state:
            raise ValueError(f"state dict has no {key!r}: not an LDM KL autoencoder")
        return tuple(state[key].shape)

    if any(re.match(r"^(encoder\.down|decoder\.up)\.\d+\.attn\.", k) for k in state):
        raise ValueError(
            "this autoencoder has attention outside the mid block (attn_resolutions "
            "non-empty); diffusers AutoencoderKL cannot represent it"
        )
    L = _num_levels(state, r"^encoder\.down\.(\d+)\.")
    channels = [shape(f"encoder.down.{i}.block.0.conv1.weight")[0] for i in range(L)]
    layers = _num_levels(state, r"^encoder\.down\.0\.block\.(\d+)\.")
    latent = shape("decoder.conv_in.weight")[1]
    if shape("encoder.conv_out.weight")[0] != 2 * latent:
        raise ValueError(
            f"encoder.conv_out has {shape('encoder.conv_out.weight')[0]} outputs, "
            f"expected 2 x z_channels = {2 * latent} (double_z)"
        )
    if "post_quant_conv.weight" in state and shape("post_quant_conv.weight")[0] != latent:
        raise ValueError("embed_dim != z_channels: diffusers AutoencoderKL needs them equal")
    if norm_num_groups is None:
        norm_num_groups = _default_groups(channels)
    if any(c % norm_num_groups for c in channels):
        raise ValueError(f"channels {channels} are not divisible by norm_num_groups={norm_num_groups}")
    return {
        "in_channels": shape("encoder.conv_in.weight")[1],
        "out_channels": shape("decoder.conv_out.weight")[0],
        "down_block_types": ["DownEncoderBlock2D"] * L,
        "up_block_types": ["UpDecoderBlock2D"] * L,
        "block_out_channels": channels,
        "layers_per_block": layers,
        "act_fn": "silu",
        "latent_channels": latent,
        "norm_num_groups": norm_num_groups,
        "sample_size": sample_size,
        "scaling_factor": float(scaling_factor),
        "use_quant_conv": "quant_conv.weight" in state,
        "use_post_quant_conv": "post_quant_conv.weight" in state,
        "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in state,
    }


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _read_ldm_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    from uvit.models.official import read_state_dict

    try:
        return read_state_dict(path)
    except ValueError as e:
        raise UnsafeCheckpointError(
            f"Refusing to load {path}: it is not a plain tensor state dict, and it is only ever "
            f"read with torch.load(weights_only=True), which does not run pickled code ({e}). "
            f"Use the official autoencoder_kl.pth (or a diffusers directory) instead."
        ) from e


def _load_from_ldm_file(path: Path, norm_num_groups: int | None, sample_size: int) -> AutoencoderKL:
    from diffusers import AutoencoderKL

    from uvit.models.official import check_state_dict

    state = _read_ldm_state(path)
    state = {k.removeprefix("first_stage_model."): v for k, v in state.items()}
    if any(k.startswith("encoder.down_blocks.") for k in state):
        raise ValueError(
            f"{path} has diffusers key names; save the model with save_pretrained() and pass that directory instead"
        )
    config = vae_config_from_ldm(state, norm_num_groups=norm_num_groups, sample_size=sample_size)
    converted = ldm_to_diffusers_vae(state)
    vae = AutoencoderKL.from_config(config)
    header = f"{path} does not match the AutoencoderKL its shapes imply:"
    check_state_dict(vae.state_dict(), converted, header, "file")
    vae.load_state_dict(converted, strict=True)
    return vae


def load_vae(
    source: str | Path = DEFAULT_VAE,
    scale_factor: float | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    *,
    subfolder: str | None = None,
    norm_num_groups: int | None = None,
    sample_size: int = 256,
    params_key: str = _DEFAULT_PARAMS_KEY,
) -> AutoencoderKL:
    """Load the autoencoder, in eval mode with gradients off, on ``device``.

    ``source``: a diffusers directory (``config.json`` + weights, or a pipeline directory with a
    ``vae/`` subfolder); an official LDM-format ``.pth``/``.ckpt``/``.safetensors`` file
    (``autoencoder_kl.pth``); or a hub id such as ``"stabilityai/sd-vae-ft-ema"``, looked up in
    the local Hugging Face cache only when offline — if it is not there,
    :class:`~uvit.encoders.WeightsNotAvailableError` says what to download and which
    ``params.yaml`` key (``params_key``) to set. ``scale_factor`` overrides
    ``config.scaling_factor`` (:data:`SCALE_FACTORS`). ``norm_num_groups`` (None: 32, or the
    largest count below 32 that divides every level's channels) and ``sample_size`` only matter
    for a converted ``.pth`` (they are not stored in its weights).
    """
    from diffusers import AutoencoderKL

    path = Path(source).expanduser()
    if path.is_dir():
        sub = subfolder
        if sub is None and not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file():
            sub = "vae"
        vae = AutoencoderKL.from_pretrained(str(path), subfolder=sub, local_files_only=True)
    elif path.is_file():
        if path.suffix not in _PTH_SUFFIXES | {".safetensors"}:
            raise ValueError(
                f"{path}: expected a diffusers directory or an LDM checkpoint "
                f"({', '.join(sorted(_PTH_SUFFIXES))}, .safetensors)"
            )
        vae = _load_from_ldm_file(path, norm_num_groups, sample_size)
    elif is_hub_id(source):
        [vae] = from_hub(source, [AutoencoderKL.from_pretrained], "autoencoder (VAE)", params_key, subfolder=subfolder)
    else:
        raise FileNotFoundError(
            f"VAE source {str(source)!r} is neither an existing file or directory nor a hub id of the form org/name"
        )
    if scale_factor is not None:
        if not scale_factor > 0:
            raise ValueError(f"scale_factor must be > 0, got {scale_factor}")
        vae.register_to_config(scaling_factor=float(scale_factor))
    vae = vae.to(device=device, dtype=dtype) if dtype is not None else vae.to(device)
    vae.eval().requires_grad_(False)
    return vae


# --------------------------------------------------------------------------------------------
# Operations
# --------------------------------------------------------------------------------------------


def downsample_factor(vae: AutoencoderKL) -> int:
    """Spatial reduction of the encoder: 2^(levels − 1) (8 for the KL-f8 autoencoder)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def _param(vae: torch.nn.Module) -> torch.Tensor:
    return next(vae.parameters())


@contextlib.contextmanager
def _precision(device: torch.device, model_dtype: torch.dtype, autocast_dtype: torch.dtype | None) -> Iterator[None]:
    if device.type == "cuda" and model_dtype == torch.float32 and autocast_dtype is not None:
        with torch.autocast("cuda", dtype=autocast_dtype):
            yield
    else:
        yield


def pixels_to_unit(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] (as stored in image splits) to float32 [−1, 1] (x/127.5 − 1); float input
    is taken to be in [−1, 1] already."""
    if isinstance(images, np.ndarray):  # may be a read-only memory map: convert in numpy
        x = images.astype(np.float32)
        return torch.from_numpy(x / 127.5 - 1.0 if images.dtype == np.uint8 else x)
    if images.dtype == torch.uint8:
        return images.float() / 127.5 - 1.0
    return images.float()


@torch.no_grad()
def encode_moments(
    vae: AutoencoderKL,
    x: torch.Tensor,
    *,
    batch_size: int | None = None,
    autocast_dtype: torch.dtype | None = torch.bfloat16,
) -> torch.Tensor:
    """The official ``encode_moments``: quant_conv(encoder(x)) for x in [−1, 1] (uint8 is
    converted). Returns float32 (B, 2·latent_channels, H/f, W/f) on the VAE's device: mean ‖
    logvar along channels, logvar unclamped."""
    p = _param(vae)
    x = pixels_to_unit(x)
    outs = []
    for xb in x.split(batch_size or max(len(x), 1)):
        xb = xb.to(device=p.device, dtype=p.dtype)
        with _precision(p.device, p.dtype, autocast_dtype):
            outs.append(vae.encode(xb).latent_dist.parameters.float())
    return torch.cat(outs)


def sample_latents(
    moments: torch.Tensor, scale: float, generator: torch.Generator | None = None, noise: torch.Tensor | None = None
) -> torch.Tensor:
    """z = scale · (mean + exp(½·clamp(logvar, −30, 20)) · ε), ε ~ N(0, I) from ``generator``
    (drawn on the generator's device, then moved) unless ``noise`` gives it; float32, on the
    moments' device. Training re-samples z from the stored moments every step (the official recipe)."""
    m = torch.as_tensor(moments).float()
    mean, logvar = m.chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    if noise is None:
        gen_device = generator.device if generator is not None else mean.device
        noise = torch.randn(mean.shape, generator=generator, device=gen_device, dtype=torch.float32)
    return scale * (mean + std * noise.to(mean.device, torch.float32))


@torch.no_grad()
def decode(
    vae: AutoencoderKL,
    z: torch.Tensor,
    *,
    scale: float | None = None,
    batch_size: int | None = None,
    autocast_dtype: torch.dtype | None = torch.bfloat16,
) -> torch.Tensor:
    """Images in (about) [−1, 1] from scaled latents: ``vae.decode(z / scale).sample``, with
    ``scale`` = ``vae.config.scaling_factor`` unless given. float32 on the VAE's device."""
    p = _param(vae)
    scale = float(vae.config.scaling_factor if scale is None else scale)
    outs = []
    for zb in torch.as_tensor(z).split(batch_size or max(len(z), 1)):
        zb = (zb.to(device=p.device, dtype=torch.float32) / scale).to(p.dtype)
        with _precision(p.device, p.dtype, autocast_dtype):
            outs.append(vae.decode(zb).sample.float())
    return torch.cat(outs)


def encoder_fingerprint(vae: torch.nn.Module, prefixes: tuple[str, ...] = ("encoder.", "quant_conv.")) -> str:
    """sha256 over the names, dtypes, shapes and bytes of the parameters/buffers the moments
    depend on (encoder + quant_conv); decides whether encoded chunks can be reused."""
    h = hashlib.sha256()
    for name, t in sorted(vae.state_dict().items()):
        if prefixes and not name.startswith(prefixes):
            continue
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class LatentDecoder:
    """The VAE that turns a latent model's samples into images: `vae` (a file, a diffusers folder or
    a hub id), the latents' `scale_factor`, and `batch_size` latents per decode call (the official
    scripts' 50)."""

    vae: str
    scale_factor: float
    batch_size: int = 50

    def images(self, z: torch.Tensor, device: str | torch.device) -> torch.Tensor:
        """Images in (about) [-1, 1], float32 on the CPU, from scaled latents (N, C, h, w)."""
        vae = _cached_vae(self.vae, float(self.scale_factor), str(device))
        return decode(vae, z.to(device), batch_size=self.batch_size).cpu()


@functools.lru_cache(maxsize=2)
def _cached_vae(source: str, scale_factor: float, device: str) -> AutoencoderKL:
    """Loaded once per process: a Ray worker decodes several shards with the same VAE."""
    return load_vae(source, scale_factor=scale_factor, device=device)
