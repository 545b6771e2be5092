"""Closed-form size and compute of any U-ViT config, without building a model.

`count_params` equals `sum(p.numel())` of the built `UViT` and `count_macs` equals torch's
FlopCounterMode / 2 on the math attention path, for every design-study switch.
"""

from __future__ import annotations

from uvit.models.uvit import UViTConfig, conv_stem_strides

# Extra weights of one out-block's long-skip merge, and its MACs per token (biases are free).
_SKIP_PARAMS = {"concat_linear": (2, 1), "add_linear_skip": (1, 1), "linear_add": (1, 1)}


def _patch_embed_params(c: UViTConfig) -> int:
    D, C, p = c.embed_dim, c.in_chans, c.patch_size
    if c.patch_embedding == "linear":
        return C * p * p * D + D
    n_convs = len(conv_stem_strides(p))
    return (9 * C * D + D) + (n_convs - 1) * (9 * D * D + D) + (D * D + D)  # 3x3 convs, then the 1x1


def _patch_embed_macs(c: UViTConfig) -> int:
    D, C, p = c.embed_dim, c.in_chans, c.patch_size
    if c.patch_embedding == "linear":
        return c.num_patches * C * p * p * D
    macs, side, cin = 0, c.img_size, C
    for stride in conv_stem_strides(p):
        side //= stride
        macs += side * side * 9 * cin * D
        cin = D
    return macs + c.num_patches * D * D


def count_params(c: UViTConfig) -> int:
    """Parameter count of `UViT(c)`:

    (depth+1)·block + (depth/2)·skip + patch_embed + pos_embed + label/text/time-MLP embeddings
    + final norm + decoder_pred + extra conv, where
      block       = 12D² + 10D for mlp_ratio 4 (time token: attention 4D² + D, MLP 8D² + 5D, two
                    affine norms 4D), [+ 3D qkv bias]; adaLN drops the 4D of norm weights and adds
                    the Linear(D, 4D) modulation, 4D² + 4D: 16D² + 10D
      skip        = 2D² + D (concat_linear), D² + D (add_linear_skip, linear_add), 0 (add, none)
      patch_embed = Cp²D + D (linear); conv_stem with k = max(1, log2 p) 3x3 convs:
                    (9CD + D) + (k-1)(9D² + D) + (D² + D)
      pos_embed   = (extras + N)·D if learned, else 0
      final norm  = 2D (affine), or 2D² + 2D (adaLN: Linear(D, 2D))
      extra conv  = 9C² + C (after_unpatchify), 9D² + D (before_linear), 0 (none)
    """
    D, C, p = c.embed_dim, c.in_chans, c.patch_size
    hidden = int(D * c.mlp_ratio)
    adaln = c.time == "adaln"
    block = (3 * D * D + (3 * D if c.qkv_bias else 0)) + (D * D + D) + (D * hidden + hidden) + (hidden * D + D)
    block += (4 * D * D + 4 * D) if adaln else 4 * D  # adaLN modulation, or the two norms' affine weights
    w, b = _SKIP_PARAMS.get(c.skip, (0, 0))
    n = (c.depth + 1) * block + (c.depth // 2) * (w * D * D + b * D)
    n += _patch_embed_params(c)
    n += c.num_tokens * D if c.position_embedding == "learned" else 0
    n += max(c.num_classes, 0) * D
    n += (c.clip_dim * D + D) if c.clip_dim is not None else 0
    n += (D * 4 * D + 4 * D + 4 * D * D + D) if c.mlp_time_embed else 0
    n += (2 * D * D + 2 * D) if adaln else 2 * D  # final norm
    n += D * p * p * C + p * p * C  # decoder_pred
    n += {"after_unpatchify": 9 * C * C + C, "before_linear": 9 * D * D + D, "none": 0}[c.extra_conv]
    return n


def count_macs(c: UViTConfig) -> int:
    """Multiply-accumulates of one forward for one image (matmuls and convolutions).

    This is the paper's "GFLOPs" unit: its 133 GFLOPs for U-ViT-H/2 is 133.2 G MACs.
    With L = extras + N tokens and hidden = mlp_ratio·D:
      (depth+1)·[L(4D² + 2D·hidden) + 2L²D + (4D² adaLN)] + (depth/2)·L·(2D² | D² | 0 skip)
      + patch_embed (N·Cp²D linear; conv stem: Σ out_pixels·9·c_in·D + N·D²)
      + text 77·768·D + time MLP 8D² + (2D² adaLN final norm)
      + decoder_pred (L·D·p²C; N·D·p²C before_linear, which drops the condition tokens first)
      + extra conv (H²·9C² after_unpatchify, N·9D² before_linear).
    Attention's two L x L products are included; elementwise work is not.
    """
    D, C, p, L, N = c.embed_dim, c.in_chans, c.patch_size, c.num_tokens, c.num_patches
    hidden = int(D * c.mlp_ratio)
    adaln = c.time == "adaln"
    per_block = L * (3 * D * D + D * D + 2 * D * hidden) + 2 * L * L * D + (4 * D * D if adaln else 0)
    macs = (c.depth + 1) * per_block + (c.depth // 2) * L * _SKIP_PARAMS.get(c.skip, (0, 0))[0] * D * D
    macs += _patch_embed_macs(c)
    macs += c.num_text_tokens * c.clip_dim * D if c.clip_dim is not None else 0
    macs += 8 * D * D if c.mlp_time_embed else 0  # Linear(D, 4D) and Linear(4D, D) on one vector
    macs += 2 * D * D if adaln else 0  # the final norm's modulation
    if c.extra_conv == "before_linear":
        macs += N * 9 * D * D + N * D * p * p * C
    else:  # the official head runs decoder_pred on every token before dropping the condition tokens
        macs += L * D * p * p * C
    macs += c.img_size**2 * 9 * C * C if c.extra_conv == "after_unpatchify" else 0
    return macs
