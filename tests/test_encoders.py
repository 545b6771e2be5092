"""uvit.encoders (VAE, CLIP text) and the latent pre-encoding (uvit.data.encode,
uvit.data.validate_latents), with tiny models built from configs: everything offline, in tmp dirs.
The multi-GPU (Ray) path of the encoders is not tested here (no GPU)."""

from __future__ import annotations

import pickle
import re
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from uvit.data.encode import (  # noqa: E402
    CaptionEncoding,
    EncodeRun,
    ImageEncoding,
    encode_captions,
    encode_image_split,
    load_caption_index,
    load_empty_context,
    partial_dir,
)
from uvit.data.shards import ShardedArrays, verify_split, write_split  # noqa: E402
from uvit.data.validate_latents import (  # noqa: E402
    CaptionSplitExpectations,
    LatentSplitExpectations,
    validate_caption_split,
    validate_latent_split,
)
from uvit.encoders import WeightsNotAvailableError  # noqa: E402
from uvit.encoders.text import empty_context, encode_text, load_text_encoder, token_lengths  # noqa: E402
from uvit.encoders.vae import (  # noqa: E402
    UnsafeCheckpointError,
    decode,
    diffusers_to_ldm_vae,
    downsample_factor,
    encode_moments,
    load_vae,
    sample_latents,
)
from tiny_vae import tiny_vae  # noqa: E402

N_IMAGES = 10


# --------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------


def _tiny_vae(seed: int = 0):
    return tiny_vae(32, seed).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def vae():
    return _tiny_vae()


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(N_IMAGES, 3, 32, 32), dtype=np.uint8)


@pytest.fixture(scope="module")
def image_split(tmp_path_factory, images) -> Path:
    root = tmp_path_factory.mktemp("img") / "train"
    labels = np.arange(N_IMAGES, dtype=np.int64) % 5
    write_split(
        root, {"images": images, "labels": labels}, name="tiny", split="train", shard_size=4, meta={"num_classes": 5}
    )
    return root


def _x(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).float() / 127.5 - 1


@pytest.fixture(scope="module")
def clip(tmp_path_factory, write_tiny_clip_vocab):
    """A CLIP tokenizer from a hand-written vocab.json + merges.txt and a tiny CLIPTextModel."""
    d = tmp_path_factory.mktemp("clip")
    vocab = write_tiny_clip_vocab(d)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(d))
    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    model = transformers.CLIPTextModel(config).eval().requires_grad_(False)
    return tokenizer, model


# --------------------------------------------------------------------------------------------
# VAE
# --------------------------------------------------------------------------------------------


def test_load_vae_directory_encode_decode(tmp_path: Path, vae, images) -> None:
    vae.save_pretrained(tmp_path / "vae")
    loaded = load_vae(tmp_path / "vae", scale_factor=0.5)
    assert loaded.config.scaling_factor == 0.5
    ref = vae.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in loaded.state_dict().items())
    # a pipeline directory with a vae/ subfolder is found too
    assert load_vae(tmp_path).config.scaling_factor == vae.config.scaling_factor

    x = _x(images[:3])
    m = encode_moments(loaded, x)
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    assert downsample_factor(loaded) == f == 2
    assert m.shape == (3, 2 * vae.config.latent_channels, 32 // f, 32 // f) and m.dtype == torch.float32
    with torch.no_grad():
        direct = vae.encode(x).latent_dist.parameters
    torch.testing.assert_close(m, direct, rtol=0, atol=0)
    torch.testing.assert_close(
        encode_moments(loaded, images[:3], batch_size=2), direct, rtol=1e-5, atol=1e-5
    )  # uint8 input, batched

    z = sample_latents(m, 0.5, torch.Generator().manual_seed(1))
    mean, logvar = m.chunk(2, dim=1)
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(z, 0.5 * (mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * eps))
    out = decode(loaded, z)
    assert out.shape == (3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(out, vae.decode(z / 0.5).sample, rtol=0, atol=0)


def test_ldm_checkpoint_converts_strictly(tmp_path: Path, vae, images) -> None:
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    ours = vae.state_dict()
    ldm = diffusers_to_ldm_vae(ours)
    # LDM structure (Encoder/Decoder of ldm.modules.diffusionmodules.model), written out by hand:
    assert ldm["encoder.down.1.block.0.nin_shortcut.weight"].shape == (64, 32, 1, 1)
    assert "encoder.down.0.downsample.conv.weight" in ldm
    assert not any(k.startswith("encoder.down.1.downsample") for k in ldm)
    assert "decoder.up.1.upsample.conv.weight" in ldm  # LDM up[i] is level i: up[0] is full-res
    assert not any(k.startswith("decoder.up.0.upsample") for k in ldm)
    assert ldm["decoder.up.0.block.0.nin_shortcut.weight"].shape == (32, 64, 1, 1)
    assert {k.split(".")[4] for k in ldm if k.startswith("decoder.up.0.block.")} == {"0", "1"}
    assert ldm["encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
    assert {"encoder.norm_out.weight", "quant_conv.weight", "post_quant_conv.bias"} <= set(ldm)
    assert len(ldm) == len(ours)
    # diffusers' own converter (independent code) maps our LDM dict back to the original
    back = convert_ldm_vae_checkpoint(ldm, dict(vae.config))
    assert set(back) == set(ours)
    assert all(torch.equal(back[k].reshape(ours[k].shape), ours[k]) for k in ours)

    pth = tmp_path / "autoencoder_kl.pth"
    torch.save(ldm, pth)
    loaded = load_vae(pth, sample_size=32)
    assert tuple(loaded.config.block_out_channels) == (32, 64)
    assert loaded.config.layers_per_block == 1 and loaded.config.scaling_factor == 0.18215
    x = _x(images[:2])
    with torch.no_grad():
        torch.testing.assert_close(encode_moments(loaded, x), vae.encode(x).latent_dist.parameters, rtol=0, atol=0)
        z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(decode(loaded, z), decode(vae, z), rtol=0, atol=0)

    # strict: a missing or an unknown key is an error naming it
    partial = dict(ldm)
    del partial["decoder.up.1.upsample.conv.bias"]
    torch.save(partial, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="decoder.up_blocks.0.upsamplers.0.conv.bias"):
        load_vae(tmp_path / "missing.pth")
    torch.save({**ldm, "loss.logvar": torch.zeros(())}, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match="loss.logvar"):
        load_vae(tmp_path / "extra.pth")


def test_official_size_config_is_inferred_from_ldm_names() -> None:
    """The full KL-f8 layout (built on the meta device: shapes only, no memory)."""
    from uvit.encoders.vae import OFFICIAL_CONFIG, vae_config_from_ldm

    with torch.device("meta"):
        full = diffusers.AutoencoderKL(**OFFICIAL_CONFIG)
    ldm = diffusers_to_ldm_vae(full.state_dict())
    assert sum(t.numel() for t in ldm.values()) == 83_653_863  # the SD / U-ViT KL-f8 autoencoder
    cfg = vae_config_from_ldm(ldm)
    assert {k: cfg[k] for k in OFFICIAL_CONFIG} == OFFICIAL_CONFIG
    # LDM Decoder: up[i] outputs ch*ch_mult[i]; its first block maps from the level below
    assert ldm["decoder.up.3.block.0.conv1.weight"].shape == (512, 512, 3, 3)
    assert ldm["decoder.up.1.block.0.nin_shortcut.weight"].shape == (256, 512, 1, 1)
    assert ldm["decoder.up.0.block.0.nin_shortcut.weight"].shape == (128, 256, 1, 1)
    # 3 blocks (layers_per_block + 1) of 8 tensors, plus the first one's shortcut
    assert len([k for k in ldm if k.startswith("decoder.up.0.block.")]) == 3 * 8 + 2


def test_small_ldm_file_infers_its_group_count(tmp_path: Path, images) -> None:
    """GroupNorm groups are not in the weights: 32 whenever the channels allow it (the official
    file), else the largest count below 32 dividing every level (8 channels: 8 groups)."""
    from uvit.encoders.vae import vae_config_from_ldm

    torch.manual_seed(1)
    small = diffusers.AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 24),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
    ).eval()
    ldm = diffusers_to_ldm_vae(small.state_dict())
    assert vae_config_from_ldm(ldm)["norm_num_groups"] == 8  # 8 and 24: 8 is the largest common divisor <= 32
    assert vae_config_from_ldm(ldm, norm_num_groups=4)["norm_num_groups"] == 4  # explicit wins
    with pytest.raises(ValueError, match="norm_num_groups=32"):
        vae_config_from_ldm(ldm, norm_num_groups=32)
    torch.save(ldm, tmp_path / "small.pth")
    loaded = load_vae(tmp_path / "small.pth")
    assert loaded.config.norm_num_groups == 8
    x = _x(images[:2])
    with torch.no_grad():  # the same function as the model it was written from, bit for bit
        torch.testing.assert_close(encode_moments(loaded, x), small.encode(x).latent_dist.parameters, rtol=0, atol=0)


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_malicious_checkpoint_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "autoencoder_kl.pth"
    with open(path, "wb") as f:
        pickle.dump({"encoder.conv_in.weight": _Payload(marker)}, f, protocol=2)
    with pytest.raises(UnsafeCheckpointError, match="weights_only"):
        load_vae(path)
    assert not marker.exists()


def test_hub_ids_offline_give_instructions(monkeypatch) -> None:
    cache = Path.home() / ".cache/huggingface/hub"
    if (cache / "models--stabilityai--sd-vae-ft-ema").exists():
        pytest.skip("the VAE is in the local HF cache")

    attempts = []

    def no_network(sock, address, *args, **kwargs):
        attempts.append(address)
        raise OSError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket.socket, "connect_ex", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: no_network(None, host))
    with pytest.raises(WeightsNotAvailableError) as info:
        load_vae("stabilityai/sd-vae-ft-ema", params_key="imagenet256.encode.vae")
    msg = str(info.value)
    assert "huggingface-cli download stabilityai/sd-vae-ft-ema --local-dir models/sd-vae-ft-ema" in msg
    assert "imagenet256.encode.vae" in msg and "params.yaml" in msg
    if not (cache / "models--openai--clip-vit-large-patch14").exists():
        with pytest.raises(WeightsNotAvailableError, match="openai/clip-vit-large-patch14 --local-dir"):
            load_text_encoder("openai/clip-vit-large-patch14")
    assert attempts == []  # offline: nothing was even tried


# --------------------------------------------------------------------------------------------
# encode_image_split
# --------------------------------------------------------------------------------------------


def test_encode_image_split_matches_direct(tmp_path: Path, vae, images, image_split) -> None:
    m = encode_image_split(
        image_split,
        tmp_path / "lat",
        vae,
        ImageEncoding(batch_size=3, dtype="float32"),
        EncodeRun(shard_size=4, progress=False),
    )
    assert m.count == N_IMAGES and len(m.shards) == 3
    verify_split(tmp_path / "lat")
    ds = ShardedArrays(tmp_path / "lat")
    assert set(ds.field_names) == {"moments", "labels"}
    direct = encode_moments(vae, _x(images)).numpy()
    np.testing.assert_allclose(ds.field("moments"), direct, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(ds.field("labels"), np.arange(N_IMAGES) % 5)
    assert m.meta["scale_factor"] == vae.config.scaling_factor
    assert m.meta["source"]["count"] == N_IMAGES
    assert m.fields["labels"].stats["counts"] == {str(i): 2 for i in range(5)}
    report = validate_latent_split(tmp_path / "lat", LatentSplitExpectations(num_classes=5), source_root=image_split)
    ok = {r.name: r.success for r in report.results}  # (a random VAE's latent std is arbitrary)
    assert ok["encoded from this source split"] and ok["row count = source rows x 1 (10)"]
    assert ok["latents finite (no NaN/inf)"] and ok["every class 0..4 present"]
    # float16 storage (the default)
    m16 = encode_image_split(
        image_split, tmp_path / "lat16", vae, ImageEncoding(batch_size=4), EncodeRun(shard_size=4, progress=False)
    )
    assert m16.fields["moments"].dtype == "float16"
    np.testing.assert_allclose(ShardedArrays(tmp_path / "lat16").field("moments"), direct, rtol=2e-3, atol=2e-3)


def test_encode_image_split_with_flips(tmp_path: Path, vae, images, image_split) -> None:
    m = encode_image_split(
        image_split,
        tmp_path / "lat",
        vae,
        ImageEncoding(batch_size=4, flip=True, dtype="float32"),
        EncodeRun(shard_size=6, progress=False),
    )
    assert m.count == 2 * N_IMAGES  # shard 1 = rows [6, 12) straddles the mirrors' start
    ds = ShardedArrays(tmp_path / "lat")
    moments = ds.field("moments")
    np.testing.assert_allclose(moments[:N_IMAGES], encode_moments(vae, _x(images)).numpy(), rtol=1e-5, atol=1e-5)
    mirrored = encode_moments(vae, _x(np.ascontiguousarray(images[..., ::-1]))).numpy()
    np.testing.assert_allclose(moments[N_IMAGES:], mirrored, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(ds.field("flipped"), [0] * N_IMAGES + [1] * N_IMAGES)
    np.testing.assert_array_equal(ds.field("labels"), np.tile(np.arange(N_IMAGES) % 5, 2))
    assert m.meta["flip"]["stored"] is True
    report = validate_latent_split(tmp_path / "lat", source_root=image_split)
    assert {r.name: r.success for r in report.results}["row count = source rows x 2 (20)"]


def test_encode_image_split_resumes(tmp_path: Path, vae, image_split, monkeypatch) -> None:
    enc, run = ImageEncoding(batch_size=2, dtype="float32"), EncodeRun(shard_size=4, progress=False)
    encode_image_split(image_split, tmp_path / "ref", vae, enc, run)
    out = tmp_path / "lat"
    original = vae.encode
    calls = []

    def interrupted(x, *a, **k):  # chunks: rows 0-3 (2 calls), 4-7 (2 calls), 8-9 (1 call)
        if len(calls) == 4:
            raise KeyboardInterrupt("simulated interruption")
        calls.append(len(x))
        return original(x, *a, **k)

    monkeypatch.setattr(vae, "encode", interrupted)
    with pytest.raises(KeyboardInterrupt):
        encode_image_split(image_split, out, vae, enc, run)
    part = partial_dir(out)
    assert not out.exists()
    assert sorted(p.name for p in part.glob("chunk-*.json")) == ["chunk-00000.json", "chunk-00001.json"]
    assert not list((part / "split").glob(".*tmp*"))  # the interrupted chunk left nothing behind
    (part / "split" / "moments-00000.npy").unlink()  # lose one finished chunk's output

    calls.clear()

    def counting(x, *a, **k):
        calls.append(len(x))
        return original(x, *a, **k)

    monkeypatch.setattr(vae, "encode", counting)
    info: dict = {}
    m = encode_image_split(image_split, out, vae, enc, run, run_info=info)
    assert calls == [2, 2, 2]  # chunk 0 (deleted) and chunk 2 (never done); chunk 1 reused
    assert info["reused_chunks"] == 1 and info["encoded_chunks"] == 2 and info["chunks"] == 3
    assert not part.exists()
    # identical to an uninterrupted run: every shard file and the manifest itself
    assert (out / "manifest.json").read_bytes() == (tmp_path / "ref" / "manifest.json").read_bytes()
    ref = ShardedArrays(tmp_path / "ref")
    got = ShardedArrays(out)
    for f in ("moments", "labels"):
        np.testing.assert_array_equal(got.field(f), ref.field(f))
    # a finished split of the same job is returned as is
    calls.clear()
    again = encode_image_split(image_split, out, vae, enc, run, run_info=info)
    assert calls == [] and again.count == m.count and info["encoded_chunks"] == 0
    # a different job does not silently reuse it
    with pytest.raises(FileExistsError):
        encode_image_split(image_split, out, vae, ImageEncoding(batch_size=2, dtype="float16"), run)


# --------------------------------------------------------------------------------------------
# CLIP text
# --------------------------------------------------------------------------------------------


def test_encode_text_and_empty_context(tmp_path: Path, clip) -> None:
    tokenizer, model = clip
    prompts = ["a cat", "the dog sat", " ".join(["dog"] * 100)]
    ctx = encode_text(tokenizer, model, prompts)
    assert ctx.shape == (3, 77, 32) and ctx.dtype == torch.float32
    ids = tokenizer(prompts, truncation=True, max_length=77, padding="max_length", return_tensors="pt")["input_ids"]
    assert ids.shape == (3, 77)
    assert (ids[0, 4:] == tokenizer.pad_token_id).all()  # <s> a cat </s> then padding
    with torch.no_grad():
        torch.testing.assert_close(ctx, model(input_ids=ids).last_hidden_state, rtol=0, atol=0)
    torch.testing.assert_close(encode_text(tokenizer, model, prompts, batch_size=2), ctx)
    np.testing.assert_array_equal(token_lengths(tokenizer, prompts), [4, 8, 102])
    torch.testing.assert_close(empty_context(tokenizer, model), encode_text(tokenizer, model, [""])[0], rtol=0, atol=0)
    tokenizer.save_pretrained(str(tmp_path / "clip"))
    model.save_pretrained(str(tmp_path / "clip"))
    tok2, model2 = load_text_encoder(tmp_path / "clip")
    torch.testing.assert_close(encode_text(tok2, model2, prompts), ctx, rtol=0, atol=0)


def _caption_split(root: Path, captions: list[list[str]]) -> Path:
    n = len(captions)
    k = max(len(c) for c in captions)
    width = max(1, max(len(s) for c in captions for s in c))
    arr = np.full((n, k), "", dtype=f"<U{width}")
    for i, c in enumerate(captions):
        arr[i, : len(c)] = c
    write_split(
        root,
        {
            "images": np.zeros((n, 3, 8, 8), np.uint8),
            "image_ids": np.arange(100, 100 + n, dtype=np.int64),
            "num_captions": np.array([len(c) for c in captions], dtype=np.int64),
            "captions": arr,
        },
        name="coco",
        split="val",
        shard_size=3,
    )
    return root


CAPTIONS = [["a cat", "a dog"], ["the dog sat", "cat", "a dog at a cat"], ["dog"], ["cat sat", "at"]]


def test_encode_captions(tmp_path: Path, clip) -> None:
    tokenizer, model = clip
    src = _caption_split(tmp_path / "src", CAPTIONS)
    m = encode_captions(
        src,
        tmp_path / "ctx",
        tokenizer,
        model,
        CaptionEncoding(batch_size=2, dtype="float32"),
        EncodeRun(shard_size=3, progress=False),
    )
    flat = [c for caps in CAPTIONS for c in caps]
    assert m.count == len(flat) == 8 and len(m.shards) == 3
    ds = ShardedArrays(tmp_path / "ctx", verify=True)
    np.testing.assert_allclose(ds.field("contexts"), encode_text(tokenizer, model, flat).numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(ds.field("image_rows"), [0, 0, 1, 1, 1, 2, 3, 3])
    np.testing.assert_array_equal(ds.field("caption_index"), [0, 1, 0, 1, 2, 0, 0, 1])
    np.testing.assert_array_equal(ds.field("image_ids"), [100, 100, 101, 101, 101, 102, 103, 103])
    np.testing.assert_array_equal(load_caption_index(tmp_path / "ctx"), [0, 2, 5, 6, 8])
    empty = load_empty_context(tmp_path / "ctx")
    assert empty.shape == (77, 32) and empty.dtype == np.float32
    np.testing.assert_allclose(empty, empty_context(tokenizer, model).numpy(), rtol=0, atol=0)

    report = validate_caption_split(
        src, CaptionSplitExpectations(expected_rows=4), tokenizer=tokenizer, contexts_root=tmp_path / "ctx"
    )
    assert report.success, report.summary()
    assert "contexts finite (no NaN/inf)" in [r.name for r in report.results]
    # a tampered empty_context.npy is caught by its checksum
    np.save(tmp_path / "ctx" / "empty_context.npy", np.zeros((77, 32), np.float32))
    bad = validate_caption_split(src, tokenizer=tokenizer, contexts_root=tmp_path / "ctx")
    assert [r.name for r in bad.failures] == ["empty_context present, finite, shape matches"]


# --------------------------------------------------------------------------------------------
# validate_latents
# --------------------------------------------------------------------------------------------

SCALE = 0.18215


def _latent_split(root: Path, *, n: int = 40, nan: bool = False, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    mean = rng.standard_normal((n, 4, 4, 4)) / SCALE
    logvar = np.full((n, 4, 4, 4), -20.0)
    moments = np.concatenate([mean, logvar], axis=1).astype(np.float16)
    if nan:
        moments[7, 2, 1, 1] = np.nan
    write_split(
        root,
        {"moments": moments, "labels": np.arange(n, dtype=np.int64) % 4},
        name="tiny",
        split="train",
        shard_size=16,
        meta={"scale_factor": SCALE, "source": {"count": n}, "flip": {"stored": False}},
    )
    return root


def test_validate_latent_split(tmp_path: Path) -> None:
    good = _latent_split(tmp_path / "good")
    e = LatentSplitExpectations(scale_factor=SCALE, source_rows=40, num_classes=4)
    report = validate_latent_split(good, e)
    assert report.success, report.summary()
    std = next(r for r in report.results if r.name.startswith("latent std (all channels)"))
    measured = float(re.search(r"overall std ([0-9.]+)", std.details)[1])
    assert 0.9 < measured < 1.1 and "per-channel std [" in std.details

    nan = validate_latent_split(_latent_split(tmp_path / "nan", nan=True), e)
    assert [r.name for r in nan.failures] == ["latents finite (no NaN/inf)"]
    assert "row 7" in nan.failures[0].details

    wrong = validate_latent_split(good, LatentSplitExpectations(scale_factor=1.0, source_rows=40))
    names = [r.name for r in wrong.failures]
    assert "latent std (all channels) in [0.75, 1.25] at scale 1" in names
    assert "per-channel latent std in [0.5, 1.5]" in names
    overall = next(r for r in wrong.failures if r.name.startswith("latent std (all"))
    assert "overall std 5.4" in overall.details or "overall std 5.5" in overall.details
    assert "implied scale factor 0.18" in overall.details

    flipped = validate_latent_split(good, LatentSplitExpectations(source_rows=40, flip=True))
    assert [r.name for r in flipped.failures] == ["row count = source rows x 2 (80)"]
    classes = validate_latent_split(good, LatentSplitExpectations(source_rows=40, num_classes=5))
    assert [r.name for r in classes.failures] == ["every class 0..4 present"]


def test_validate_caption_split_flags_empty_and_long(tmp_path: Path, clip) -> None:
    tokenizer, _ = clip
    long = " ".join(["dog"] * 100)
    src = _caption_split(tmp_path / "src", [["a cat", "  "], ["dog", long], ["cat"]])
    report = validate_caption_split(src, tokenizer=tokenizer)
    failed = {r.name: r for r in report.failures}
    assert set(failed) == {"captions non-empty", "captions over 77 tokens (truncated) <= 1.00%"}
    assert "caption_row 1" in failed["captions non-empty"].details
    assert "1 of 5 captions" in failed["captions over 77 tokens (truncated) <= 1.00%"].details
    lenient = validate_caption_split(src, CaptionSplitExpectations(max_truncated_share=0.5), tokenizer=tokenizer)
    assert [r.name for r in lenient.failures] == ["captions non-empty"]
    trunc = next(r for r in lenient.results if r.name.startswith("captions over 77"))
    assert trunc.success and "1 of 5 captions" in trunc.details and "102 tokens" in trunc.details
