"""The U-ViT family against the official implementation's facts (shared UVIT_SPEC.md)."""

from __future__ import annotations

import dataclasses
import math
import pickle

import pytest
import torch

from uvit.models import (
    PRESETS,
    SKIP_MODES,
    UViT,
    UViTConfig,
    count_macs,
    count_params,
    get_preset,
    load_official,
    preset_config,
    read_state_dict,
    timestep_embedding,
)

# Exact parameter counts of the official classes built from the official configs (spec section 2).
OFFICIAL_COUNTS = {
    "cifar10_uvit_s2": 44_255_328,
    "celeba64_uvit_s4": 44_292_228,
    "imagenet64_uvit_m4": 130_940_292,
    "imagenet64_uvit_l4": 286_827_652,
    "imagenet256_uvit_l2": 286_763_172,
    "imagenet256_uvit_h2": 500_832_016,
    "imagenet512_uvit_l4": 286_861_524,
    "imagenet512_uvit_h4": 500_942_656,
    "mscoco256_uvit_s2": 44_692_644,
    "mscoco256_uvit_s2_deep": 58_345_636,
}
# The paper's rounded figures.
PAPER_MILLIONS = {
    "cifar10_uvit_s2": 44,
    "celeba64_uvit_s4": 44,
    "imagenet64_uvit_m4": 131,
    "imagenet64_uvit_l4": 287,
    "imagenet256_uvit_h2": 501,
    "mscoco256_uvit_s2": 45,
    "mscoco256_uvit_s2_deep": 58,
}
# Spec: GMACs per forward (batch 1, label/text tokens included).
OFFICIAL_GMACS = {
    "cifar10_uvit_s2": 12.20,
    "celeba64_uvit_s4": 12.21,
    "imagenet64_uvit_m4": 35.24,
    "imagenet64_uvit_l4": 76.47,
    "imagenet256_uvit_l2": 76.46,
    "imagenet256_uvit_h2": 133.20,
    "imagenet512_uvit_l4": 76.48,
    "imagenet512_uvit_h4": 133.23,
    "mscoco256_uvit_s2": 16.23,
    "mscoco256_uvit_s2_deep": 21.24,
}


def meta_model(config: UViTConfig) -> UViT:
    with torch.device("meta"):
        return UViT(config)


def tiny(**kw) -> UViTConfig:
    base = dict(img_size=8, patch_size=2, in_chans=3, embed_dim=32, depth=4, num_heads=4)
    return UViTConfig(**{**base, **kw})


def inputs(c: UViTConfig, batch: int = 2, device: str = "cpu", seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, c.in_chans, c.img_size, c.img_size, generator=g).to(device)
    t = (torch.rand(batch, generator=g) * 999).to(device)
    kw = {}
    if c.num_classes > 0:
        kw["y"] = torch.randint(0, c.num_classes, (batch,), generator=g).to(device)
    if c.clip_dim is not None:
        kw["context"] = torch.randn(batch, c.num_text_tokens, c.clip_dim, generator=g).to(device)
    return x, t, kw


@pytest.mark.parametrize("name", sorted(OFFICIAL_COUNTS))
def test_preset_parameter_counts_are_exact(name: str) -> None:
    preset = get_preset(name)
    assert preset.expected_params == OFFICIAL_COUNTS[name]
    assert count_params(preset.config) == OFFICIAL_COUNTS[name]
    assert meta_model(preset.config).num_parameters() == OFFICIAL_COUNTS[name]
    if name in PAPER_MILLIONS:
        assert round(OFFICIAL_COUNTS[name] / 1e6) == PAPER_MILLIONS[name]


@pytest.mark.parametrize("name", sorted(OFFICIAL_GMACS))
def test_preset_macs_match_spec(name: str) -> None:
    assert count_macs(get_preset(name).config) / 1e9 == pytest.approx(OFFICIAL_GMACS[name], abs=0.006)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_output_shapes_on_meta(name: str) -> None:
    c = get_preset(name).config
    x, t, kw = inputs(c, batch=2, device="meta")
    assert meta_model(c)(x, t, **kw).shape == (2, c.in_chans, c.img_size, c.img_size)


def test_real_forward_small_preset() -> None:
    c = get_preset("cifar10_uvit_s2").config
    x, t, kw = inputs(c, batch=1)
    out = UViT(c)(x, t, **kw)
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()


@pytest.mark.parametrize("mode", SKIP_MODES)
def test_skip_variants_change_parameter_count(mode: str) -> None:
    base = preset_config("cifar10_uvit_s2")
    c = dataclasses.replace(base, skip=mode)
    D, half = c.embed_dim, c.depth // 2
    delta = {"concat_linear": 2 * D * D + D, "add": 0, "add_linear_skip": D * D + D, "linear_add": D * D + D, "none": 0}
    no_skip = OFFICIAL_COUNTS["cifar10_uvit_s2"] - half * (2 * D * D + D)
    assert count_params(c) == meta_model(c).num_parameters() == no_skip + half * delta[mode]


def test_skip_variants_compute_what_they_say() -> None:
    x = torch.randn(2, 5, 16)
    s = torch.randn(2, 5, 16)
    for mode in SKIP_MODES:
        c = tiny(embed_dim=16, skip=mode)
        blk = UViT(c).out_blocks[0]
        with torch.no_grad():
            for norm in (blk.norm1, blk.norm2):
                norm.weight.zero_()
                norm.bias.zero_()
        # With both norms zeroed, attention and MLP see zeros and add only their biases,
        # which the official init sets to 0: the block returns its merged input.
        merged = {
            "concat_linear": lambda: blk.skip_linear(torch.cat([x, s], -1)),
            "add": lambda: x + s,
            "add_linear_skip": lambda: x + blk.skip_linear(s),
            "linear_add": lambda: blk.skip_linear(x + s),
            "none": lambda: x,
        }[mode]()
        torch.testing.assert_close(blk(x, s), merged)


# ------------------------------------------------------------------ official key names
def official_key_shapes(c: UViTConfig) -> dict[str, tuple[int, ...]]:
    """The official state-dict key table, written out from the spec (section 1.4)."""
    D, C, p = c.embed_dim, c.in_chans, c.patch_size
    keys: dict[str, tuple[int, ...]] = {
        "pos_embed": (1, c.num_tokens, D),
        "patch_embed.proj.weight": (D, C, p, p),
        "patch_embed.proj.bias": (D,),
    }
    if c.num_classes > 0:
        keys["label_emb.weight"] = (c.num_classes, D)
    if c.clip_dim is not None:
        keys["context_embed.weight"] = (D, 768)
        keys["context_embed.bias"] = (D,)
    blocks = [f"in_blocks.{i}" for i in range(c.depth // 2)] + ["mid_block"]
    blocks += [f"out_blocks.{i}" for i in range(c.depth // 2)]
    for b in blocks:
        for n in ("norm1", "norm2"):
            keys[f"{b}.{n}.weight"] = keys[f"{b}.{n}.bias"] = (D,)
        keys[f"{b}.attn.qkv.weight"] = (3 * D, D)
        keys[f"{b}.attn.proj.weight"] = (D, D)
        keys[f"{b}.attn.proj.bias"] = (D,)
        keys[f"{b}.mlp.fc1.weight"] = (4 * D, D)
        keys[f"{b}.mlp.fc1.bias"] = (4 * D,)
        keys[f"{b}.mlp.fc2.weight"] = (D, 4 * D)
        keys[f"{b}.mlp.fc2.bias"] = (D,)
        if b.startswith("out_blocks"):
            keys[f"{b}.skip_linear.weight"] = (D, 2 * D)
            keys[f"{b}.skip_linear.bias"] = (D,)
    keys["norm.weight"] = keys["norm.bias"] = (D,)
    keys["decoder_pred.weight"] = (p * p * C, D)
    keys["decoder_pred.bias"] = (p * p * C,)
    if c.conv:
        keys["final_layer.weight"] = (C, C, 3, 3)
        keys["final_layer.bias"] = (C,)
    return keys


@pytest.mark.parametrize("name", sorted(OFFICIAL_COUNTS))
def test_state_dict_keys_and_shapes_are_official(name: str) -> None:
    c = get_preset(name).config
    ours = {k: tuple(v.shape) for k, v in meta_model(c).state_dict().items()}
    assert ours == official_key_shapes(c)


def test_official_tensor_counts() -> None:
    """Our models hold the official number of tensors, and the table above (the reference of the
    key test) adds up to the official parameter count."""
    for name, n in {"cifar10_uvit_s2": 164, "mscoco256_uvit_s2": 166, "imagenet256_uvit_h2": 355}.items():
        c = get_preset(name).config
        assert len(meta_model(c).state_dict()) == n, name
        table = official_key_shapes(c)
        assert len(table) == n and sum(math.prod(s) for s in table.values()) == OFFICIAL_COUNTS[name], name


@pytest.mark.parametrize("name", ["cifar10_uvit_s2", "mscoco256_uvit_s2"])
def test_official_checkpoint_loads_strictly(name: str, tmp_path) -> None:
    c = get_preset(name).config
    g = torch.Generator().manual_seed(1)
    state = {k: torch.randn(s, generator=g) for k, s in official_key_shapes(c).items()}
    path = tmp_path / "nnet_ema.pth"
    torch.save({f"module.{k}": v for k, v in state.items()}, path)  # a DDP prefix is stripped
    model = load_official(name, path)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_mismatched_checkpoint_names_the_keys(tmp_path) -> None:
    c = get_preset("cifar10_uvit_s2").config
    state = {k: torch.zeros(s) for k, s in official_key_shapes(c).items()}
    del state["norm.weight"]
    state["extra.weight"] = torch.zeros(1)
    state["decoder_pred.bias"] = torch.zeros(7)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ValueError) as err:
        load_official("cifar10_uvit_s2", tmp_path / "bad.pth")
    msg = str(err.value)
    assert "missing (1): norm.weight" in msg and "unexpected (1): extra.weight" in msg
    assert "decoder_pred.bias: checkpoint (7,) vs model (12,)" in msg


class _Exploit:
    """Unpickling this runs open(marker, "w"): the file appears only if the pickle is executed."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_malicious_pickle_is_refused(tmp_path) -> None:
    path, marker = tmp_path / "evil.pth", tmp_path / "pwned"
    # A well-formed torch file: a full (unsafe) load would succeed, run the payload and fail only
    # later ("not a state dict of tensors"); the weights-only unpickler refuses it at load.
    torch.save({"pos_embed": _Exploit(marker)}, path)
    with pytest.raises(ValueError, match="refusing to load .*Weights only load failed") as err:
        read_state_dict(path)
    assert isinstance(err.value.__cause__, pickle.UnpicklingError)
    assert not marker.exists()


def test_save_pretrained_round_trip_is_bit_identical(tmp_path) -> None:
    c = tiny(num_classes=5, skip="linear_add", conv=False)
    model = UViT(c)
    model.save_pretrained(tmp_path / "m")
    loaded = UViT.from_pretrained(tmp_path / "m")
    assert loaded.config == c
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)
    x, t, kw = inputs(c)
    assert torch.equal(model(x, t, **kw), loaded(x, t, **kw))


def test_from_pretrained_names_missing_files(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="config.json"):
        UViT.from_pretrained(tmp_path)


# ------------------------------------------------------------------ forward semantics
def test_timestep_embedding_is_cos_then_sin() -> None:
    t = torch.tensor([0.0, 3.5, 999.0])
    emb = timestep_embedding(t, 8)
    freqs = torch.exp(-math.log(10000) * torch.arange(4) / 4)
    torch.testing.assert_close(emb, torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], -1))


def test_attention_matches_official_math() -> None:
    """Our SDPA attention equals the official math path with its (K, H, D) qkv split."""
    c = tiny(embed_dim=24, num_heads=3)
    attn = UViT(c).in_blocks[0].attn
    x = torch.randn(2, 7, 24)
    B, L, D = x.shape
    qkv = attn.qkv(x).reshape(B, L, 3, 3, D // 3).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    w = (q @ k.transpose(-2, -1) * (D // 3) ** -0.5).softmax(-1)
    ref = attn.proj((w @ v).transpose(1, 2).reshape(B, L, D))
    torch.testing.assert_close(attn(x), ref, atol=1e-6, rtol=1e-5)


def test_unpatchify_is_channel_last_inside_the_patch() -> None:
    """decoder_pred's output for patch 0 lands on pixels [0:p, 0:p] as (p1, p2, C)."""
    c = tiny(conv=False, in_chans=3, patch_size=2)
    model = UViT(c)
    seen = {}
    model.decoder_pred.register_forward_hook(lambda m, i, o: seen.setdefault("tokens", o))
    x, t, _ = inputs(c, batch=1)
    out = model(x, t)
    patch0 = seen["tokens"][0, c.extras]  # (p*p*C,)
    torch.testing.assert_close(out[0, :, 0:2, 0:2].permute(1, 2, 0).reshape(-1), patch0)


def test_token_order_and_conditioning() -> None:
    c = tiny(num_classes=4)
    model = UViT(c).eval()
    x, t, kw = inputs(c, batch=2)
    with pytest.raises(ValueError, match="needs labels"):
        model(x, t)
    other = (kw["y"] + 1) % 4
    assert not torch.allclose(model(x, t, **kw), model(x, t, y=other))
    t2i = UViT(tiny(clip_dim=16, num_text_tokens=5))
    assert t2i.pos_embed.shape[1] == 1 + 5 + 16
    with pytest.raises(ValueError, match="needs `context`"):
        t2i(x, t)


def test_batch_independence_of_forward() -> None:
    c = tiny(num_classes=4)
    model = UViT(c).eval()
    x, t, kw = inputs(c, batch=4)
    full = model(x, t, **kw)
    parts = torch.cat([model(x[i : i + 1], t[i : i + 1], y=kw["y"][i : i + 1]) for i in range(4)])
    torch.testing.assert_close(full, parts, atol=1e-5, rtol=1e-5)


def test_activation_checkpointing_gives_the_same_gradients() -> None:
    c = tiny(num_classes=3)
    torch.manual_seed(0)
    plain = UViT(c)
    ckpt = UViT(dataclasses.replace(c, use_checkpoint=True))
    ckpt.load_state_dict(plain.state_dict())
    x, t, kw = inputs(c)
    for m in (plain, ckpt):
        m(x, t, **kw).square().mean().backward()
    for (k, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5, msg=k)


def test_count_macs_equals_flop_counter_with_math_attention() -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    for c in (tiny(num_classes=5), tiny(clip_dim=16, num_text_tokens=3, skip="add_linear_skip", conv=False)):
        model = UViT(c)
        x, t, kw = inputs(c, batch=1)
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
            model(x, t, **kw)
        # FlopCounterMode counts 2 FLOPs per multiply-accumulate.
        assert counter.get_total_flops() == 2 * count_macs(c)


def test_no_graph_breaks_under_torch_compile() -> None:
    import torch._dynamo

    c = tiny(num_classes=4)
    model = UViT(c)
    x, t, kw = inputs(c)
    explanation = torch._dynamo.explain(model)(x, t, **kw)
    assert explanation.graph_break_count == 0
    assert explanation.graph_count == 1


def test_config_validation_names_the_key() -> None:
    with pytest.raises(ValueError, match="img_size"):
        UViTConfig(img_size=30, patch_size=4)
    with pytest.raises(ValueError, match="depth"):
        UViTConfig(depth=7)
    with pytest.raises(ValueError, match="skip"):
        UViTConfig(skip="sum")
    with pytest.raises(KeyError, match="unknown preset"):
        get_preset("uvit_xxl")


def test_core_imports_with_torch_and_einops_alone() -> None:
    """The GPU machines have no diffusers/ray/dvc/prefect: the core must not need them."""
    import subprocess
    import sys

    code = """
import sys
BLOCKED = ("diffusers", "ray", "dvc", "prefect", "pandas", "great_expectations", "transformers",
           "torch_fidelity", "sklearn", "pydantic", "yaml", "scipy", "boto3")
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
import torch
from uvit.models import UViT, get_preset
from uvit.diffusion import make_schedule, sample, wrap_model, PerSampleNoise
m = UViT(get_preset("digits_uvit_tiny").config).eval()
s = make_schedule("vpsde")
y = torch.zeros(2, dtype=torch.long)
x = sample("dpm_solver", wrap_model(lambda x, t: m(x, t, y=y), s), s, PerSampleNoise([0, 1]).randn((1, 8, 8)), 3)
print(tuple(x.shape))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(2, 1, 8, 8)"
