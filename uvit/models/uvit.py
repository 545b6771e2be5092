"""U-ViT: a ViT backbone for diffusion models (Bao et al., CVPR 2023).

Time, condition and noisy-image patches are all tokens. Shallow (in) blocks are joined to
deep (out) blocks by long skip connections, U-Net style:

    tokens = [label? | time | text?] + patches + pos_embed
    in_blocks (depth/2) -> mid_block -> out_blocks (depth/2, each fed one in-block output)
    norm -> decoder_pred (per token, to p*p*C pixels) -> drop condition tokens -> unpatchify
    -> optional 3x3 conv

Submodule names equal the official implementation's (baofff/U-ViT, libs/uvit.py and
libs/uvit_t2i.py), so released `nnet.pth` / `nnet_ema.pth` state dicts load strictly.
Only torch and einops are needed here.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

SkipMode = Literal["concat_linear", "add", "add_linear_skip", "linear_add", "none"]
SKIP_MODES: tuple[str, ...] = ("concat_linear", "add", "add_linear_skip", "linear_add", "none")

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass(frozen=True)
class UViTConfig:
    """Everything that defines a U-ViT's architecture (its weights' shapes and its forward).

    `num_classes > 0` makes the model class-conditional; the official ImageNet-256/512 models
    use K+1 classes, the last being the "null" class for classifier-free guidance.
    `clip_dim` makes it text-conditional on `num_text_tokens` CLIP embeddings (the t2i variant).
    `skip` selects the paper's long-skip ablation (default: Linear(Concat(h_m, h_s))).
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
    skip: SkipMode = "concat_linear"
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
        if self.skip not in SKIP_MODES:
            raise bad("skip", f"must be one of {SKIP_MODES}")
        if self.num_classes > 0 and self.clip_dim is not None:
            raise bad("clip_dim", "a model is class-conditional or text-conditional, not both")

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def extras(self) -> int:
        """Number of non-patch tokens in front of the patches: time (+ label) (+ text)."""
        if self.clip_dim is not None:
            return 1 + self.num_text_tokens
        return 2 if self.num_classes > 0 else 1

    @property
    def num_tokens(self) -> int:
        return self.extras + self.num_patches

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> UViTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown UViTConfig keys: {sorted(unknown)}")
        return cls(**d)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) model times t (B,) -> (B, dim), cos first."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class PatchEmbed(nn.Module):
    """Image (B, C, H, W) -> patch tokens (B, H/p * W/p, D), row-major over (h, w)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention over all tokens (no mask), through PyTorch SDPA.

    SDPA runs in the compute dtype, so under bf16 autocast on a GPU it reaches the flash
    kernel (the official code upcasts q, k, v to fp32 first, which rules flash out).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        # qkv rows split as (3, heads, head_dim): the official layout, which the weights assume.
        q, k, v = rearrange(self.qkv(x), "b n (k h d) -> k b h n d", k=3, h=self.num_heads)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(rearrange(x, "b h n d -> b n (h d)"))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-LN transformer block; an out-block first merges its long-skip input.

    Skip modes (h_m: main branch `x`, h_s: long-skip branch `skip`):
      concat_linear   Linear(Concat(h_m, h_s))   the paper's default; current activation first
      add             h_m + h_s
      add_linear_skip h_m + Linear(h_s)
      linear_add      Linear(h_m + h_s)
      none            h_m (no long skip)
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool,
                 skip: SkipMode | None = None, use_checkpoint: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.skip_mode = skip
        if skip == "concat_linear":
            self.skip_linear = nn.Linear(2 * dim, dim)
        elif skip in ("add_linear_skip", "linear_add"):
            self.skip_linear = nn.Linear(dim, dim)
        self.use_checkpoint = use_checkpoint

    def forward(self, x: Tensor, skip: Tensor | None = None) -> Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, skip, use_reentrant=False)
        return self._forward(x, skip)

    def _forward(self, x: Tensor, skip: Tensor | None) -> Tensor:
        mode = self.skip_mode
        if mode == "concat_linear":
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        elif mode == "add":
            x = x + skip
        elif mode == "add_linear_skip":
            x = x + self.skip_linear(skip)
        elif mode == "linear_add":
            x = self.skip_linear(x + skip)
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class UViT(nn.Module):
    """U-ViT noise predictor: eps_hat = model(x_t, t, y=labels | context=text tokens).

    x: (B, C, H, W) noisy image or latent; t: (B,) model time (999*t for the continuous VP
    SDE, the step index n for the discrete schedule); y: (B,) int class labels (required
    when num_classes > 0); context: (B, num_text_tokens, clip_dim) text embeddings (required
    for the text-to-image variant). Returns (B, C, H, W).
    """

    def __init__(self, config: UViTConfig):
        super().__init__()
        self.config = c = config
        D = c.embed_dim
        self.patch_embed = PatchEmbed(c.patch_size, c.in_chans, D)
        self.time_embed = (
            nn.Sequential(nn.Linear(D, 4 * D), nn.SiLU(), nn.Linear(4 * D, D)) if c.mlp_time_embed else nn.Identity()
        )
        if c.num_classes > 0:
            self.label_emb = nn.Embedding(c.num_classes, D)
        if c.clip_dim is not None:
            self.context_embed = nn.Linear(c.clip_dim, D)
        self.pos_embed = nn.Parameter(torch.zeros(1, c.num_tokens, D))

        def block(skip: SkipMode | None = None) -> Block:
            return Block(D, c.num_heads, c.mlp_ratio, c.qkv_bias, skip=skip, use_checkpoint=c.use_checkpoint)

        self.in_blocks = nn.ModuleList([block() for _ in range(c.depth // 2)])
        self.mid_block = block()
        self.out_blocks = nn.ModuleList([block(c.skip) for _ in range(c.depth // 2)])
        self.norm = nn.LayerNorm(D)
        self.patch_dim = c.patch_size**2 * c.in_chans
        self.decoder_pred = nn.Linear(D, self.patch_dim)
        self.final_layer = nn.Conv2d(c.in_chans, c.in_chans, 3, padding=1) if c.conv else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official init: trunc-normal(0.02) for Linear and pos_embed, LayerNorm (1, 0);
        convolutions and the label embedding keep PyTorch's defaults. Nothing is zeroed."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None, context: Tensor | None = None) -> Tensor:
        c = self.config
        tokens = self.patch_embed(x)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        time_token = self.time_embed(timestep_embedding(t, c.embed_dim).to(tokens.dtype)).unsqueeze(1)
        if c.clip_dim is not None:
            if context is None:
                raise ValueError("this text-to-image U-ViT needs `context` (B, num_text_tokens, clip_dim)")
            extra = [time_token, self.context_embed(context)]
        elif c.num_classes > 0:
            if y is None:
                raise ValueError("this class-conditional U-ViT needs labels `y` (B,); use the null class "
                                 f"{c.num_classes - 1} for unconditional samples if it was trained with one")
            extra = [self.label_emb(y).unsqueeze(1), time_token]
        else:
            extra = [time_token]
        x = torch.cat([*extra, tokens], dim=1) + self.pos_embed

        skips = []
        for blk in self.in_blocks:
            x = blk(x)
            skips.append(x)
        x = self.mid_block(x)
        for blk in self.out_blocks:
            x = blk(x, skips.pop())

        x = self.decoder_pred(self.norm(x))[:, c.extras:]
        p, h = c.patch_size, c.img_size // c.patch_size
        # Channel-last inside each patch: the layout the official decoder_pred weights use.
        x = rearrange(x, "b (h w) (p1 p2 c) -> b c (h p1) (w p2)", h=h, p1=p, p2=p)
        return self.final_layer(x)

    # ----------------------------------------------------------------- persistence
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write `config.json` + `model.safetensors` into `directory` (created if needed)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        tmp = directory / (WEIGHTS_NAME + ".tmp")
        save_file(state, str(tmp), metadata={"format": "pt", "library": "uvit"})
        tmp.replace(directory / WEIGHTS_NAME)
        (directory / CONFIG_NAME).write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> UViT:
        """Load a model written by `save_pretrained` (strict: every key and shape must match)."""
        from safetensors.torch import load_file

        directory = Path(directory)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory / name} not found: expected a directory written by "
                                        "UViT.save_pretrained (config.json + model.safetensors)")
        config = UViTConfig.from_dict(json.loads((directory / CONFIG_NAME).read_text()))
        model = cls(config)
        model.load_state_dict(load_file(str(directory / WEIGHTS_NAME), device=str(device)), strict=True)
        return model.to(device)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
