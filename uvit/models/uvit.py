"""U-ViT: a ViT backbone for diffusion models (Bao et al., CVPR 2023).

Time, condition and noisy-image patches are all tokens. Shallow (in) blocks are joined to
deep (out) blocks by long skip connections, U-Net style:

    tokens = [label? | time | text?] + patches + pos_embed
    in_blocks (depth/2) -> mid_block -> out_blocks (depth/2, each fed one in-block output)
    norm -> decoder_pred (per token, to p*p*C pixels) -> drop condition tokens -> unpatchify
    -> optional 3x3 conv

Submodule names equal the official implementation's (baofff/U-ViT, libs/uvit.py and
libs/uvit_t2i.py), so released `nnet.pth` / `nnet_ema.pth` state dicts load strictly.

`UViTConfig` also carries the switches of the paper's design study (long skip, time
conditioning, extra conv, patch embedding, position embedding); their defaults are the
official architecture, which builds exactly the official modules and forward.
Only torch and einops are needed here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from uvit.models.config import (  # noqa: F401 (re-exported: the config lives beside the modules)
    CONFIG_NAME,
    CONV_POSITIONS,
    PATCH_EMBEDS,
    POS_EMBEDS,
    SKIP_MODES,
    SWITCHES,
    TIME_MODES,
    WEIGHTS_NAME,
    ConvPosition,
    PatchEmbedMode,
    PosEmbedMode,
    SkipMode,
    TimeMode,
    UViTConfig,
)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) model times t (B,) -> (B, dim), cos first."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def sincos_2d_pos_embed(grid: int, dim: int) -> Tensor:
    """The fixed 2D sin-cos position embedding of MAE/DiT for a grid x grid of patches, (grid*grid, dim).

    Patches are row-major. The first dim/2 channels encode the column, the last dim/2 the row,
    each as [sin(pos * w_i), cos(pos * w_i)] with w_i = 10000^(-i / (dim/4)), i < dim/4.
    Computed in float64 and rounded once, so it is the same on every machine.
    """
    quarter = dim // 4
    omega = 1.0 / 10000.0 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    pos = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(pos, pos, indexing="ij")

    def encode(p: Tensor) -> Tensor:
        args = p.reshape(-1, 1) * omega
        return torch.cat([torch.sin(args), torch.cos(args)], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1).float()


def conv_stem_strides(patch_size: int) -> list[int]:
    """Strides of the conv_stem's 3x3 convs: log2(p) of stride 2, or one of stride 1 when p = 1."""
    return [2] * (patch_size.bit_length() - 1) or [1]


class PatchEmbed(nn.Module):
    """Image (B, C, H, W) -> patch tokens (B, H/p * W/p, D), row-major over (h, w).

    linear (official): `proj` = Conv2d(C, D, kernel=stride=p), a linear map of each patch.
    conv_stem: `stem` = log2(p) x [Conv2d(3x3, stride 2, padding 1, width D) -> SiLU] (one
    stride-1 3x3 conv when p = 1), then `proj` = Conv2d(D, D, 1): the paper's stack of 3x3
    convs followed by a 1x1 conv, the 3x3 convs doing the downsampling.
    """

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, mode: PatchEmbedMode = "linear"):
        super().__init__()
        self.patch_size = patch_size
        if mode == "linear":
            self.stem = None
            self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        else:
            layers: list[nn.Module] = []
            for i, stride in enumerate(conv_stem_strides(patch_size)):
                layers += [
                    nn.Conv2d(in_chans if i == 0 else embed_dim, embed_dim, 3, stride=stride, padding=1),
                    nn.SiLU(),
                ]
            self.stem = nn.Sequential(*layers)
            self.proj = nn.Conv2d(embed_dim, embed_dim, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        if self.stem is not None:
            x = self.stem(x)
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


def modulate(h: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: normalised tokens h (B, L, D) scaled and shifted per sample ((B, 1, D) each)."""
    return h * (1 + scale) + shift


class Block(nn.Module):
    """Pre-LN transformer block; an out-block first merges its long-skip input.

    Skip modes (h_m: main branch `x`, h_s: long-skip branch `skip`):
      concat_linear   Linear(Concat(h_m, h_s))   the paper's default; current activation first
      add             h_m + h_s
      add_linear_skip h_m + Linear(h_s)
      linear_add      Linear(h_m + h_s)
      none            h_m (no long skip)

    With `adaln` the two LayerNorms lose their affine weights and `modulation` =
    Linear(D, 4D) maps the condition vector `cond` (B, D) to (shift1, scale1, shift2, scale2):
    x + Attn(LN(x)(1 + scale1) + shift1), then the same with the MLP (DiT's adaLN, no gates).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        qkv_bias: bool,
        skip: SkipMode | None = None,
        use_checkpoint: bool = False,
        adaln: bool = False,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=not adaln)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=not adaln)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.skip_mode = skip
        if skip == "concat_linear":
            self.skip_linear = nn.Linear(2 * dim, dim)
        elif skip in ("add_linear_skip", "linear_add"):
            self.skip_linear = nn.Linear(dim, dim)
        self.modulation = nn.Linear(dim, 4 * dim) if adaln else None
        self.use_checkpoint = use_checkpoint

    def forward(self, x: Tensor, skip: Tensor | None = None, cond: Tensor | None = None) -> Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, skip, cond, use_reentrant=False)
        return self._forward(x, skip, cond)

    def _forward(self, x: Tensor, skip: Tensor | None, cond: Tensor | None = None) -> Tensor:
        mode = self.skip_mode
        if mode == "concat_linear":
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        elif mode == "add":
            x = x + skip
        elif mode == "add_linear_skip":
            x = x + self.skip_linear(skip)
        elif mode == "linear_add":
            x = self.skip_linear(x + skip)
        if self.modulation is None:
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))
        shift1, scale1, shift2, scale2 = self.modulation(cond).unsqueeze(1).chunk(4, dim=-1)
        x = x + self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + self.mlp(modulate(self.norm2(x), shift2, scale2))


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
        # The forward reads the UViTConfig itself: a subclass may present `config` in another
        # form (the diffusers wrapper's is a dict of the fields it registers).
        self._arch = config
        D, adaln = c.embed_dim, c.time == "adaln"
        # Construction order is the official one: it fixes which random numbers each
        # default-initialised convolution and embedding draws.
        self.patch_embed = PatchEmbed(c.patch_size, c.in_chans, D, c.patch_embedding)
        self.time_embed = (
            nn.Sequential(nn.Linear(D, 4 * D), nn.SiLU(), nn.Linear(4 * D, D)) if c.mlp_time_embed else nn.Identity()
        )
        if c.num_classes > 0:
            self.label_emb = nn.Embedding(c.num_classes, D)
        if c.clip_dim is not None:
            self.context_embed = nn.Linear(c.clip_dim, D)
        if c.position_embedding == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, c.num_tokens, D))
        elif c.position_embedding == "sinusoidal_2d":
            # Condition tokens get zeros (MAE's class token); not saved: it is a function of the config.
            table = torch.zeros(1, c.num_tokens, D)
            table[0, c.extras :] = sincos_2d_pos_embed(c.img_size // c.patch_size, D)
            self.register_buffer("pos_embed", table, persistent=False)

        def block(skip: SkipMode | None = None) -> Block:
            return Block(
                D, c.num_heads, c.mlp_ratio, c.qkv_bias, skip=skip, use_checkpoint=c.use_checkpoint, adaln=adaln
            )

        self.in_blocks = nn.ModuleList([block() for _ in range(c.depth // 2)])
        self.mid_block = block()
        self.out_blocks = nn.ModuleList([block(c.skip) for _ in range(c.depth // 2)])
        self.norm = nn.LayerNorm(D, elementwise_affine=not adaln)
        if adaln:
            self.final_modulation = nn.Linear(D, 2 * D)  # (shift, scale) of the final norm
        if c.extra_conv == "before_linear":
            self.token_conv = nn.Conv2d(D, D, 3, padding=1)
        self.patch_dim = c.patch_size**2 * c.in_chans
        self.decoder_pred = nn.Linear(D, self.patch_dim)
        self.final_layer = (
            nn.Conv2d(c.in_chans, c.in_chans, 3, padding=1) if c.extra_conv == "after_unpatchify" else nn.Identity()
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official init: trunc-normal(0.02) for Linear and pos_embed, LayerNorm (1, 0);
        convolutions and the label embedding keep PyTorch's defaults. Nothing is zeroed.
        The adaLN modulations are Linears too, so every norm starts close to a plain LayerNorm."""
        if self._arch.position_embedding == "learned":
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None, context: Tensor | None = None) -> Tensor:
        c = self._arch
        tokens = self.patch_embed(x)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        time_emb = self.time_embed(timestep_embedding(t, c.embed_dim).to(tokens.dtype))  # (B, D)
        text = label = None
        if c.clip_dim is not None:
            if context is None:
                raise ValueError("this text-to-image U-ViT needs `context` (B, num_text_tokens, clip_dim)")
            text = self.context_embed(context)
        elif c.num_classes > 0:
            if y is None:
                raise ValueError(
                    "this class-conditional U-ViT needs labels `y` (B,); use the null class "
                    f"{c.num_classes - 1} for unconditional samples if it was trained with one"
                )
            label = self.label_emb(y)

        cond = None
        if c.time == "token":  # official order: [label | time | text] + patches
            extra = [time_emb.unsqueeze(1)]
            if label is not None:
                extra.insert(0, label.unsqueeze(1))
            if text is not None:
                extra.append(text)
        else:  # adaln: time (+ label) condition every norm; text stays a sequence of tokens
            cond = F.silu(time_emb if label is None else time_emb + label)
            extra = [] if text is None else [text]
        x = torch.cat([*extra, tokens], dim=1)
        if c.position_embedding != "none":
            x = x + self.pos_embed

        skips = []
        for blk in self.in_blocks:
            x = blk(x, cond=cond)
            skips.append(x)
        x = self.mid_block(x, cond=cond)
        for blk in self.out_blocks:
            x = blk(x, skips.pop(), cond=cond)

        x = self.norm(x)
        if cond is not None:
            x = modulate(x, *self.final_modulation(cond).unsqueeze(1).chunk(2, dim=-1))
        p, h = c.patch_size, c.img_size // c.patch_size
        if c.extra_conv == "before_linear":
            grid = rearrange(x[:, c.extras :], "b (h w) d -> b d h w", h=h)
            x = self.decoder_pred(rearrange(self.token_conv(grid), "b d h w -> b (h w) d"))
        else:
            # The official head runs decoder_pred on every token, then drops the condition tokens.
            x = self.decoder_pred(x)[:, c.extras :]
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
                raise FileNotFoundError(
                    f"{directory / name} not found: expected a directory written by "
                    "UViT.save_pretrained (config.json + model.safetensors)"
                )
        config = UViTConfig.from_dict(json.loads((directory / CONFIG_NAME).read_text()))
        model = cls(config)
        model.load_state_dict(load_file(str(directory / WEIGHTS_NAME), device=str(device)), strict=True)
        return model.to(device)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
