"""The design-study switches of UViTConfig: each computes what it says, the defaults are the
official architecture bit for bit, and the parameter and MAC counts stay exact."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from uvit.models import SWITCHES, UViT, UViTConfig, count_macs, count_params, timestep_embedding

D = 32  # tiny width used throughout


def tiny(**kw) -> UViTConfig:
    base = dict(img_size=8, patch_size=2, in_chans=3, embed_dim=D, depth=4, num_heads=4)
    return UViTConfig(**{**base, **kw})


def inputs(c: UViTConfig, batch: int = 2, seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, c.in_chans, c.img_size, c.img_size, generator=g)
    t = torch.rand(batch, generator=g) * 999
    kw = {}
    if c.num_classes > 0:
        kw["y"] = torch.randint(0, c.num_classes, (batch,), generator=g)
    if c.clip_dim is not None:
        kw["context"] = torch.randn(batch, c.num_text_tokens, c.clip_dim, generator=g)
    return x, t, kw


def build(c: UViTConfig, seed: int = 0) -> UViT:
    torch.manual_seed(seed)
    return UViT(c).eval()


def record(module: torch.nn.Module, seen: dict, key: str, output: bool = False) -> None:
    """Store the module's first input (or its output) of its first call in seen[key]; changes nothing."""

    def hook(m, args, out) -> None:
        seen.setdefault(key, out if output else args[0])

    module.register_forward_hook(hook)


def numel(model: UViT) -> int:
    return sum(p.numel() for p in model.parameters())


# Every single switch value on the three conditioning kinds, and a few combinations.
CONDITIONING = {"uncond": {}, "class": dict(num_classes=5), "text": dict(clip_dim=16, num_text_tokens=3)}
SINGLE = [(key, value) for key, values in SWITCHES.items() for value in values[1:]]
COMBOS = [
    dict(time="adaln", conv_position="before_linear", patch_embedding="conv_stem", position_embedding="sinusoidal_2d"),
    dict(time="adaln", skip="none", conv=False, position_embedding="none"),
    dict(patch_embedding="conv_stem", conv_position="before_linear", skip="add_linear_skip", qkv_bias=True),
    dict(img_size=16, patch_size=4, in_chans=1, patch_embedding="conv_stem", time="adaln", mlp_time_embed=True),
    dict(patch_size=1, patch_embedding="conv_stem", position_embedding="sinusoidal_2d", depth=2),
]
CASES = [tiny(**CONDITIONING[k], **{key: value}) for k in CONDITIONING for key, value in SINGLE]
CASES += [tiny(**CONDITIONING[k], **combo) for k in CONDITIONING for combo in COMBOS]


def case_id(c: UViTConfig) -> str:
    default = UViTConfig()
    diff = [
        f"{f.name}={getattr(c, f.name)}"
        for f in dataclasses.fields(c)
        if getattr(c, f.name) != getattr(default, f.name)
        and f.name not in ("img_size", "embed_dim", "depth", "num_heads", "num_text_tokens")
    ]
    return ",".join(diff)


# ------------------------------------------------------------------ defaults = official
def official_forward(model: UViT, x, t, y=None, context=None):
    """The official U-ViT forward, written out over the model's weights with functional ops."""
    c, w = model.config, dict(model.named_parameters())
    p, h = c.patch_size, c.img_size // c.patch_size
    tokens = F.conv2d(x, w["patch_embed.proj.weight"], w["patch_embed.proj.bias"], stride=p).flatten(2).transpose(1, 2)
    extra = [timestep_embedding(t, c.embed_dim).unsqueeze(1)]
    if y is not None:
        extra = [F.embedding(y, w["label_emb.weight"]).unsqueeze(1)] + extra
    if context is not None:
        extra.append(F.linear(context, w["context_embed.weight"], w["context_embed.bias"]))
    z = torch.cat([*extra, tokens], dim=1) + w["pos_embed"]

    def ln(v, name):
        return F.layer_norm(v, (c.embed_dim,), w[f"{name}.weight"], w[f"{name}.bias"], 1e-5)

    def block(v, b, skip=None):
        if skip is not None:
            v = F.linear(torch.cat([v, skip], -1), w[f"{b}.skip_linear.weight"], w[f"{b}.skip_linear.bias"])
        q, k, vv = rearrange(
            F.linear(ln(v, f"{b}.norm1"), w[f"{b}.attn.qkv.weight"]), "b n (k h d) -> k b h n d", k=3, h=c.num_heads
        )
        a = rearrange(F.scaled_dot_product_attention(q, k, vv), "b h n d -> b n (h d)")
        v = v + F.linear(a, w[f"{b}.attn.proj.weight"], w[f"{b}.attn.proj.bias"])
        m = F.gelu(F.linear(ln(v, f"{b}.norm2"), w[f"{b}.mlp.fc1.weight"], w[f"{b}.mlp.fc1.bias"]))
        return v + F.linear(m, w[f"{b}.mlp.fc2.weight"], w[f"{b}.mlp.fc2.bias"])

    skips = []
    for i in range(c.depth // 2):
        z = block(z, f"in_blocks.{i}")
        skips.append(z)
    z = block(z, "mid_block")
    for i in range(c.depth // 2):
        z = block(z, f"out_blocks.{i}", skips.pop())
    z = F.linear(ln(z, "norm"), w["decoder_pred.weight"], w["decoder_pred.bias"])[:, c.extras :]
    img = rearrange(z, "b (h w) (p1 p2 c) -> b c (h p1) (w p2)", h=h, p1=p, p2=p)
    return F.conv2d(img, w["final_layer.weight"], w["final_layer.bias"], padding=1)


@pytest.mark.parametrize("kind", sorted(CONDITIONING))
def test_defaults_are_the_official_forward_bit_for_bit(kind: str) -> None:
    c = tiny(**CONDITIONING[kind])
    explicit = dataclasses.replace(
        c,
        time="token",
        conv_position="after_unpatchify",
        patch_embedding="linear",
        position_embedding="learned",
        skip="concat_linear",
    )
    assert explicit == c and c.extra_conv == "after_unpatchify"
    model = build(c)
    x, t, kw = inputs(c)
    with torch.no_grad():
        assert torch.equal(model(x, t, **kw), official_forward(model, x, t, **kw))


def test_default_config_json_has_only_the_original_keys() -> None:
    """New switches at their default are not written: official-architecture config.json files keep their bytes."""
    original = [
        "img_size",
        "patch_size",
        "in_chans",
        "embed_dim",
        "depth",
        "num_heads",
        "mlp_ratio",
        "qkv_bias",
        "num_classes",
        "clip_dim",
        "num_text_tokens",
        "mlp_time_embed",
        "conv",
        "skip",
        "use_checkpoint",
    ]
    assert list(tiny().to_dict()) == original
    assert list(tiny(conv=False, skip="none").to_dict()) == original
    assert tiny(time="adaln", position_embedding="none").to_dict() == {
        **tiny().to_dict(),
        "time": "adaln",
        "position_embedding": "none",
    }


def test_an_old_config_json_loads_as_the_official_architecture(tmp_path) -> None:
    """A config.json written before the switches existed (the Huge models' conv=False) loads unchanged."""
    old = {
        "img_size": 8,
        "patch_size": 2,
        "in_chans": 4,
        "embed_dim": 32,
        "depth": 4,
        "num_heads": 4,
        "mlp_ratio": 4.0,
        "qkv_bias": False,
        "num_classes": 11,
        "clip_dim": None,
        "num_text_tokens": 77,
        "mlp_time_embed": False,
        "conv": False,
        "skip": "concat_linear",
        "use_checkpoint": False,
    }
    c = UViTConfig.from_dict(old)
    assert (c.time, c.extra_conv, c.patch_embedding, c.position_embedding) == ("token", "none", "linear", "learned")
    assert c.to_dict() == old
    model = build(c)
    model.save_pretrained(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text()) == old
    assert not any(k.startswith("final_layer") for k in model.state_dict())


# ------------------------------------------------------------------ each switch computes what it says
def test_adaln_block_is_a_layernorm_with_condition_given_scale_and_shift() -> None:
    """With a constant modulation (weight 0, bias = shifts/scales), an adaLN block equals the official
    block whose norms have weight 1 + scale and bias shift."""
    ada = build(tiny(time="adaln")).in_blocks[0]
    plain = build(tiny()).in_blocks[0]
    assert ada.norm1.weight is None and ada.norm2.weight is None
    shift1, scale1, shift2, scale2 = torch.randn(4, D)
    with torch.no_grad():
        ada.modulation.weight.zero_()
        ada.modulation.bias.copy_(torch.cat([shift1, scale1, shift2, scale2]))
        state = {k: v for k, v in ada.state_dict().items() if not k.startswith("modulation")}
        state |= {"norm1.weight": 1 + scale1, "norm1.bias": shift1, "norm2.weight": 1 + scale2, "norm2.bias": shift2}
        plain.load_state_dict(state, strict=True)
        x, cond = torch.randn(2, 5, D), torch.randn(2, D)
        torch.testing.assert_close(ada(x, cond=cond), plain(x), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", ["uncond", "class"])
def test_adaln_condition_is_silu_of_time_plus_label_and_no_token(kind: str) -> None:
    c = tiny(time="adaln", **CONDITIONING[kind])
    model = build(c)
    assert c.extras == 0 and model.pos_embed.shape == (1, c.num_patches, D)
    seen = {}
    record(model.in_blocks[0].modulation, seen, "cond")
    record(model.in_blocks[0], seen, "tokens")
    x, t, kw = inputs(c)
    with torch.no_grad():
        out = model(x, t, **kw)
        emb = timestep_embedding(t, D) + (model.label_emb(kw["y"]) if kw else 0)
        torch.testing.assert_close(seen["cond"], F.silu(emb))
        assert seen["tokens"].shape == (2, c.num_patches, D)  # patches only
        # The final norm is modulated too: the output moves with t and (class models) with y.
        assert not torch.allclose(out, model(x, t + 100, **kw), atol=1e-4)
        if kw:
            assert not torch.allclose(out, model(x, t, y=(kw["y"] + 1) % 5), atol=1e-4)


def test_adaln_text_model_keeps_the_text_tokens() -> None:
    c = tiny(time="adaln", clip_dim=16, num_text_tokens=3)
    model = build(c)
    assert c.extras == 3 and model.pos_embed.shape == (1, 3 + c.num_patches, D)
    x, t, kw = inputs(c, batch=3)
    with torch.no_grad():
        out = model(x, t, **kw)
        assert out.shape == x.shape
        assert not torch.allclose(out, model(x, t, context=kw["context"].flip(0)), atol=1e-4)
        # Batch independence: condition vectors are per sample.
        parts = torch.cat([model(x[i : i + 1], t[i : i + 1], context=kw["context"][i : i + 1]) for i in range(3)])
        torch.testing.assert_close(out, parts, atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="needs `context`"):
            model(x, t)


def test_adaln_with_activation_checkpointing_gives_the_same_gradients() -> None:
    c = tiny(time="adaln", num_classes=3)
    plain, ckpt = build(c).train(), UViT(dataclasses.replace(c, use_checkpoint=True)).train()
    ckpt.load_state_dict(plain.state_dict())
    x, t, kw = inputs(c)
    for m in (plain, ckpt):
        m(x, t, **kw).square().mean().backward()
    for (k, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters(), strict=True):
        assert a.grad.abs().sum() > 0, k
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5, msg=k)


def test_conv_before_linear_runs_on_the_patch_token_grid() -> None:
    """token_conv sees the normalised patch tokens as a (D, h, w) grid: a kernel that copies each
    token's left neighbour shifts the decoder's input by one column (zeros at the left edge)."""
    c = tiny(conv_position="before_linear", num_classes=5)
    model = build(c)
    assert isinstance(model.final_layer, torch.nn.Identity)
    with torch.no_grad():
        model.token_conv.weight.zero_()
        model.token_conv.weight[:, :, 1, 0] = torch.eye(D)
        model.token_conv.bias.zero_()
    seen = {}
    record(model.norm, seen, "normed", output=True)
    x, t, kw = inputs(c)
    with torch.no_grad():
        out = model(x, t, **kw)
        h = c.img_size // c.patch_size
        grid = seen["normed"][:, c.extras :].reshape(2, h, h, D)
        shifted = torch.cat([torch.zeros_like(grid[:, :, :1]), grid[:, :, :-1]], dim=2).reshape(2, h * h, D)
        want = rearrange(model.decoder_pred(shifted), "b (h w) (p1 p2 c) -> b c (h p1) (w p2)", h=h, p1=2, p2=2)
        torch.testing.assert_close(out, want)


def test_conv_none_and_conv_false_are_the_same_model() -> None:
    a, b = tiny(conv=False), tiny(conv_position="none")
    assert a.extra_conv == b.extra_conv == "none"
    ma, mb = build(a), build(b)
    assert ma.state_dict().keys() == mb.state_dict().keys()
    mb.load_state_dict(ma.state_dict())
    x, t, _ = inputs(a)
    with torch.no_grad():
        assert torch.equal(ma(x, t), mb(x, t))
    assert dataclasses.replace(a, conv=True).extra_conv == "after_unpatchify"  # re-enabling the flag works


@pytest.mark.parametrize("p, strides", [(1, [1]), (2, [2]), (4, [2, 2])])
def test_conv_stem_layers(p: int, strides: list[int]) -> None:
    """conv_stem = [3x3 conv (stride 2, padding 1) -> SiLU] x log2(p), then a 1x1 conv to D."""
    c = tiny(img_size=8, patch_size=p, patch_embedding="conv_stem")
    pe = build(c).patch_embed
    convs = [m for m in pe.stem if isinstance(m, torch.nn.Conv2d)]
    assert [m.stride[0] for m in convs] == strides and all(m.kernel_size == (3, 3) for m in convs)
    assert pe.proj.kernel_size == (1, 1)
    x = torch.randn(2, 3, 8, 8)
    h = x
    for m in convs:
        h = F.silu(F.conv2d(h, m.weight, m.bias, stride=m.stride, padding=1))
    want = F.conv2d(h, pe.proj.weight, pe.proj.bias).flatten(2).transpose(1, 2)
    with torch.no_grad():
        got = pe(x)
    assert got.shape == (2, c.num_patches, D)
    torch.testing.assert_close(got, want)


def mae_2d_sincos(dim: int, grid: int) -> np.ndarray:
    """MAE's 2D sin-cos position embedding (its get_2d_sincos_pos_embed), restated in numpy."""

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    g = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))  # w goes first
    g = np.stack(g, axis=0).reshape(2, 1, grid, grid)
    return np.concatenate([one_d(dim // 2, g[0]), one_d(dim // 2, g[1])], axis=1)


@pytest.mark.parametrize("kind", sorted(CONDITIONING))
def test_sinusoidal_2d_is_the_fixed_mae_table_and_not_saved(kind: str) -> None:
    c = tiny(position_embedding="sinusoidal_2d", img_size=12, **CONDITIONING[kind])
    model = build(c)
    table = model.pos_embed
    assert not isinstance(table, torch.nn.Parameter) and "pos_embed" not in model.state_dict()
    assert torch.equal(table[0, : c.extras], torch.zeros(c.extras, D))  # condition tokens: no position
    want = torch.from_numpy(mae_2d_sincos(D, 6)).float()
    torch.testing.assert_close(table[0, c.extras :], want, atol=1e-6, rtol=0)
    assert torch.equal(table, build(c, seed=1).pos_embed)  # independent of the seed
    # The forward adds exactly this table: a learned model holding it gives the same output.
    learned = build(dataclasses.replace(c, position_embedding="learned"))
    learned.load_state_dict({**model.state_dict(), "pos_embed": table.clone()})
    x, t, kw = inputs(c)
    with torch.no_grad():
        assert torch.equal(model(x, t, **kw), learned(x, t, **kw))


def test_no_position_embedding_equals_a_zero_learned_one() -> None:
    c = tiny(position_embedding="none", num_classes=5)
    model = build(c)
    assert not hasattr(model, "pos_embed") or model.pos_embed is None
    learned = build(dataclasses.replace(c, position_embedding="learned"))
    learned.load_state_dict({**model.state_dict(), "pos_embed": torch.zeros(1, c.num_tokens, D)})
    x, t, kw = inputs(c)
    with torch.no_grad():
        assert torch.equal(model(x, t, **kw), learned(x, t, **kw))


# ------------------------------------------------------------------ sizes: params and MACs
def expected_param_delta(c: UViTConfig) -> int:
    """Parameters a config has beyond the same config with every new switch at its default,
    written from each switch's definition (independently of count_params)."""
    Dm, C, p = c.embed_dim, c.in_chans, c.patch_size
    base = dataclasses.replace(
        c,
        time="token",
        conv_position="after_unpatchify",
        patch_embedding="linear",
        position_embedding="learned",
        conv=True,
    )
    delta = 0
    if c.time == "adaln":
        blocks = c.depth + 1
        delta += blocks * (4 * Dm * Dm + 4 * Dm) - blocks * 4 * Dm  # modulation in, norm affines out
        delta += (2 * Dm * Dm + 2 * Dm) - 2 * Dm  # final norm
    tokens = c.num_tokens if c.position_embedding == "learned" else 0
    delta += tokens * Dm - base.num_tokens * Dm
    delta += {"after_unpatchify": 0, "before_linear": 9 * Dm * Dm + Dm - (9 * C * C + C), "none": -(9 * C * C + C)}[
        c.extra_conv
    ]
    if c.patch_embedding == "conv_stem":
        k = max(1, int(math.log2(p)))
        stem = (9 * C * Dm + Dm) + (k - 1) * (9 * Dm * Dm + Dm) + (Dm * Dm + Dm)
        delta += stem - (C * p * p * Dm + Dm)
    return delta


@pytest.mark.parametrize("c", CASES, ids=case_id)
def test_param_count_is_exact_for_every_switch(c: UViTConfig) -> None:
    model = build(c)
    base = dataclasses.replace(
        c,
        time="token",
        conv_position="after_unpatchify",
        patch_embedding="linear",
        position_embedding="learned",
        conv=True,
    )
    assert count_params(c) == numel(model)
    assert numel(model) - numel(build(base)) == expected_param_delta(c)


@pytest.mark.parametrize("c", CASES, ids=case_id)
def test_mac_count_equals_flop_counter_for_every_switch(c: UViTConfig) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    model = build(c)
    x, t, kw = inputs(c, batch=1)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        out = model(x, t, **kw)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert counter.get_total_flops() == 2 * count_macs(c)  # 2 FLOPs per multiply-accumulate


def test_mac_deltas_of_the_switches() -> None:
    """The MAC cost each switch adds, in closed form (batch 1, tiny class model: L = 2 + 16 tokens)."""
    c = tiny(num_classes=5)
    L, N, C = c.num_tokens, c.num_patches, c.in_chans
    base = count_macs(c)
    blocks = c.depth + 1
    attn_per_token = 4 * D * D + 2 * D * 4 * D  # qkv, proj, fc1, fc2
    # adaLN: two tokens fewer everywhere, plus one Linear(D, 4D) per block and Linear(D, 2D) at the end.
    shorter = blocks * (2 * attn_per_token + 2 * (L * L - N * N) * D) + (c.depth // 2) * 2 * 2 * D * D + 2 * D * 12
    assert base - count_macs(dataclasses.replace(c, time="adaln")) == shorter - blocks * 4 * D * D - 2 * D * D
    assert count_macs(dataclasses.replace(c, conv_position="before_linear")) - base == (
        N * 9 * D * D - c.img_size**2 * 9 * C * C - (L - N) * D * 12
    )
    assert base - count_macs(dataclasses.replace(c, conv=False)) == c.img_size**2 * 9 * C * C
    assert count_macs(dataclasses.replace(c, position_embedding="sinusoidal_2d")) == base
    assert count_macs(dataclasses.replace(c, patch_embedding="conv_stem")) - base == (
        N * 9 * C * D + N * D * D - N * C * 4 * D
    )


# ------------------------------------------------------------------ persistence
@pytest.mark.parametrize("c", CASES, ids=case_id)
def test_save_pretrained_round_trips_every_switch(c: UViTConfig, tmp_path) -> None:
    from safetensors.torch import load_file

    model = build(c)
    model.save_pretrained(tmp_path / "m")
    loaded = UViT.from_pretrained(tmp_path / "m")
    assert loaded.config == c
    saved = load_file(str(tmp_path / "m" / "model.safetensors"))
    assert saved.keys() == model.state_dict().keys()
    assert ("pos_embed" in saved) == (c.position_embedding == "learned")
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)
    x, t, kw = inputs(c)
    with torch.no_grad():
        assert torch.equal(model(x, t, **kw), loaded(x, t, **kw))


def test_switch_state_dict_keys() -> None:
    """Each switch adds and removes exactly the weights it names; the rest keep the official keys."""

    def keys(**kw) -> set[str]:
        return set(build(tiny(**kw)).state_dict())

    official = keys()
    blocks = [f"in_blocks.{i}" for i in range(2)] + ["mid_block"] + [f"out_blocks.{i}" for i in range(2)]
    norms = {f"{b}.{n}.{w}" for b in blocks for n in ("norm1", "norm2") for w in ("weight", "bias")}
    norms |= {"norm.weight", "norm.bias"}
    mods = {f"{b}.modulation.{w}" for b in blocks for w in ("weight", "bias")}
    mods |= {"final_modulation.weight", "final_modulation.bias"}
    assert keys(time="adaln") == official - norms | mods
    final = {"final_layer.weight", "final_layer.bias"}
    assert keys(conv_position="before_linear") == official - final | {"token_conv.weight", "token_conv.bias"}
    assert keys(conv_position="none") == keys(conv=False) == official - final
    stem = {"patch_embed.stem.0.weight", "patch_embed.stem.0.bias"}
    assert keys(patch_embedding="conv_stem") == official | stem  # proj stays, now the 1x1 conv
    assert keys(position_embedding="sinusoidal_2d") == keys(position_embedding="none") == official - {"pos_embed"}


def test_no_config_field_is_named_like_a_submodule_or_weight() -> None:
    """The diffusers wrapper exposes config fields as model attributes, which would shadow these."""
    fields = {f.name for f in dataclasses.fields(UViTConfig)}
    for c in (tiny(), tiny(num_classes=3, **COMBOS[0]), tiny(clip_dim=8, **COMBOS[2])):
        model = build(c)
        top = {n.split(".")[0] for n, _ in model.named_parameters()} | {n for n, _ in model.named_children()}
        top |= {n.split(".")[0] for n, _ in model.named_buffers()}
        assert "patch_embed" in top and "pos_embed" in top
        assert not fields & top


def test_switch_validation_names_the_key() -> None:
    for key in SWITCHES:
        with pytest.raises(ValueError, match=f"UViTConfig.{key}="):
            tiny(**{key: "bogus"})
    with pytest.raises(ValueError, match="conv_position.*conv=False"):
        tiny(conv=False, conv_position="before_linear")
    with pytest.raises(ValueError, match="patch_size.*power of 2"):
        tiny(img_size=9, patch_size=3, patch_embedding="conv_stem")
    with pytest.raises(ValueError, match="embed_dim.*multiple of 4"):
        tiny(embed_dim=30, num_heads=3, position_embedding="sinusoidal_2d")
