"""Text-to-image evaluation on tiny models built from configs: the CLIP score against a direct
computation, and the sample + score stages over encoded validation captions (CFG against the
empty-caption context, VAE decoding, captions stored with the samples, the example-caption grid)."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("torch_fidelity")

from uvit.config import load_benchmark, load_params  # noqa: E402
from uvit.data.encode import EncodeRun, encode_captions, load_empty_context  # noqa: E402
from uvit.data.shards import ShardedArrays, write_split  # noqa: E402
from uvit.encoders import WeightsNotAvailableError  # noqa: E402
from uvit.evaluate.captions import select_caption_rows  # noqa: E402
from uvit.evaluate.clip_score import clip_score, clip_scores, load_clip  # noqa: E402
from uvit.evaluate.sample import (  # noqa: E402
    Condition,
    SamplingRecipe,
    generate,
    load_sample_extras,
    load_samples,
    sample_seeds,
    to_uint8,
)
from uvit.models import UViT  # noqa: E402
from uvit.paths import BenchmarkPaths  # noqa: E402
from uvit.report.paper import PAPER_CAPTIONS  # noqa: E402
from tiny_vae import tiny_vae_dir  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = [["a cat", "a dog"], ["the dog sat", "cat", "a dog at a cat"], ["dog"], ["cat sat", "at"]]
FLAT = [c for caps in CAPTIONS for c in caps]
VAL_IMAGES = np.random.default_rng(2).integers(0, 256, (4, 3, 8, 8), dtype=np.uint8)  # the FID/KID reference


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory, write_tiny_clip_vocab) -> Path:
    """A tiny CLIPModel + CLIPProcessor (hand-written BPE vocabulary) saved as a hub-style directory:
    it serves as the text encoder (CLIPTextModel reads its text half) and as the CLIP-score model."""
    d = tmp_path_factory.mktemp("clip")
    vocab = write_tiny_clip_vocab(d)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(d))
    image_processor = transformers.CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    transformers.CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(str(d))
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        ),
        vision_config=dict(
            image_size=16,
            patch_size=8,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
        ),
        projection_dim=16,
    )
    transformers.CLIPModel(config).save_pretrained(str(d))
    return d


# ----------------------------------------------------------------------------- CLIP score


def test_clip_score_matches_direct_computation(clip_dir):
    model, processor = load_clip(clip_dir)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 3, 12, 12), dtype=np.uint8)
    texts = ["a cat", "a dog", "the dog sat", "cat", "at"]
    per = clip_scores(images, texts, model, processor, batch_size=2)
    # Direct: CLIPModel's own forward, logits_per_image = exp(logit_scale) * cosine of every pair.
    inputs = processor(text=texts, images=list(images.transpose(0, 2, 3, 1)), return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**inputs)
    cos = (out.logits_per_image.diagonal() / model.logit_scale.exp()).double().numpy()
    np.testing.assert_allclose(per, 100 * np.maximum(cos, 0), rtol=1e-4, atol=1e-4)
    assert (per > 0).all()
    # Negative cosines count as 0: flip the text embeddings' sign.
    model.text_projection.weight.data.neg_()
    np.testing.assert_array_equal(clip_scores(images, texts, model, processor), np.zeros(5))
    model.text_projection.weight.data.neg_()
    assert clip_score(images, texts, model, processor) == pytest.approx(per.mean(), rel=1e-6)
    with pytest.raises(ValueError, match="captions"):
        clip_scores(images, texts[:2], model, processor)
    with pytest.raises(ValueError, match="uint8"):
        clip_scores(images.astype(np.float32), texts, model, processor)


def test_clip_offline_error_says_what_to_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(WeightsNotAvailableError) as err:
        load_clip("openai/clip-vit-large-patch14", params_key="mscoco256.score.clip_model")
    msg = str(err.value)
    assert "huggingface-cli download openai/clip-vit-large-patch14" in msg
    assert "mscoco256.score.clip_model" in msg and "preprocessor_config.json" in msg
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsNotAvailableError, match="config.json"):
        load_clip(tmp_path / "empty")


# ----------------------------------------------------------------------------- stages


@pytest.fixture(scope="module")
def t2i_run(tmp_path_factory, clip_dir, random_inception_weights):
    """A mscoco256 configuration shrunk to tiny models, with encoded captions and a saved model."""
    tmp = tmp_path_factory.mktemp("t2i")
    params = copy.deepcopy(load_params(ROOT / "params.yaml"))
    block = params["mscoco256"]
    block["model"]["overrides"] = {"img_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2, "clip_dim": 32}
    block["encode"].update(vae=str(tiny_vae_dir(tmp / "vae")), text_encoder=str(clip_dir))
    block["sample"].update(steps=3, num_samples=5, batch_size=5, shard_size=2, guidance_scale=1.0)
    block["score"].update(inception_weights=random_inception_weights, clip_model=str(clip_dir), kid_subset_size=3)
    cfg = load_benchmark("mscoco256", params)
    paths = BenchmarkPaths("mscoco256", tmp)
    width = max(len(c) for c in FLAT)
    caps = np.full((len(CAPTIONS), 3), "", dtype=f"<U{width}")
    for i, c in enumerate(CAPTIONS):
        caps[i, : len(c)] = c
    write_split(
        paths.data / "val",
        {"images": VAL_IMAGES, "num_captions": np.array([len(c) for c in CAPTIONS], dtype=np.int64), "captions": caps},
        name="coco",
        split="val",
        shard_size=3,
    )
    real = np.random.default_rng(1).integers(0, 256, (6, 3, 8, 8), dtype=np.uint8)
    write_split(paths.data / "train", {"images": real}, name="coco", split="train")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(clip_dir))
    text_model = transformers.CLIPTextModel.from_pretrained(str(clip_dir)).eval()
    encode_captions(
        paths.data / "val", paths.contexts / "val", tokenizer, text_model, run=EncodeRun(shard_size=3, progress=False)
    )
    torch.manual_seed(0)
    UViT(cfg.uvit_config()).save_pretrained(paths.train / "ema")
    return cfg, paths


def test_caption_selection(t2i_run):
    _, paths = t2i_run
    root = paths.contexts / "val"
    assert select_caption_rows(root, 5, "first").tolist() == [0, 1, 2, 3, 4]
    assert select_caption_rows(root, 3, "one_per_image").tolist() == [0, 2, 5]
    with pytest.raises(ValueError, match="has 4 images"):
        select_caption_rows(root, 5, "one_per_image")


def test_text_to_image_sample_and_score_stages(t2i_run, clip_dir):
    from uvit.encoders.vae import decode, load_vae
    from uvit.stages.sample import run_sample
    from uvit.stages.score import run_score

    cfg, paths = t2i_run
    summary = run_sample(cfg, paths)
    assert summary["num_samples"] == 5 and summary["shards_computed"] == 3
    images, labels = load_samples(paths.samples / "samples.npz")
    extras = load_sample_extras(paths.samples / "samples.npz")
    assert images.shape == (5, 3, 8, 8) and labels is None  # decoded by the VAE (factor 2)
    assert extras["caption_rows"].tolist() == [0, 1, 2, 3, 4] and extras["captions"].tolist() == FLAT[:5]
    assert sorted(p.name for p in (paths.samples / "png").iterdir()) == [f"{i:06d}.png" for i in range(5)]

    # Direct: the stored contexts, guidance against the stored empty-caption context, VAE decode.
    model = UViT.from_pretrained(paths.train / "ema")
    ctx = torch.from_numpy(np.asarray(ShardedArrays(paths.contexts / "val").field("contexts")[:5], np.float32))
    recipe, seeds = SamplingRecipe("discrete", "dpm_solver_pp", 3, 1.0), sample_seeds(0, 5)
    kw = dict(batch_size=5, progress=False)
    vae = load_vae(cfg.encode.vae, scale_factor=cfg.encode.scale_factor)
    empty = torch.from_numpy(load_empty_context(paths.contexts / "val"))
    want = to_uint8(
        decode(vae, generate(model, recipe, seeds, Condition(contexts=ctx, empty_context=empty), **kw), batch_size=50)
    )
    np.testing.assert_array_equal(images, want)
    zero = Condition(contexts=ctx, empty_context=torch.zeros(77, 32))
    zeros = to_uint8(decode(vae, generate(model, recipe, seeds, zero, **kw), batch_size=50))
    assert not np.array_equal(images, zeros)  # the null context is the encoding of "", not zeros

    ex = json.loads((paths.sample_summary / "examples.json").read_text())
    assert ex["captions"] == list(PAPER_CAPTIONS) and (paths.sample_summary / "examples.png").is_file()
    assert run_sample(cfg, paths)["shards_reused"] == 3  # resumed: nothing sampled again

    metrics = run_score(cfg, paths)
    m, proc = load_clip(clip_dir)
    assert metrics["clip_score"] == pytest.approx(clip_score(images, FLAT[:5], m, proc), rel=1e-6)
    assert metrics["kid_subset_size"] == 3
    fg, logits = _inception(images, cfg.score.inception_weights)
    direct = _direct_metrics(
        fg, logits, _inception(VAL_IMAGES, cfg.score.inception_weights)[0], metrics["kid_subset_size"]
    )
    for key, want in direct.items():
        assert metrics[key] == _close(key, want), key
    # Against a reference of sample 0 and a white image, four copies each (every k = 3 ball shrinks to
    # a point), precision and recall are neither 0 nor 1.
    other = BenchmarkPaths("mscoco256", paths.root / "shared-reference")
    shutil.copytree(paths.samples, other.samples)
    shared = np.concatenate([images[[0, 0, 0, 0]], np.full((4, 3, 8, 8), 255, np.uint8)])
    write_split(other.data / "val", {"images": shared}, name="coco", split="val")
    again = run_score(cfg, other)
    direct = _direct_metrics(fg, logits, _inception(shared, cfg.score.inception_weights)[0], again["kid_subset_size"])
    assert 0 < direct["precision"] < 1 and 0 < direct["recall"] < 1
    for key, want in direct.items():
        assert again[key] == _close(key, want), key
    assert json.loads((paths.score / "metrics.json").read_text())["clip_score"] == metrics["clip_score"]


def _close(key: str, want: float):
    """IS is exact here (1 per one-sample split; a random Inception puts one split over all samples
    only ~1e-4 above it); the feature metrics differ from the direct float64 ones by float32 rounding."""
    return pytest.approx(want, abs=1e-9) if key.startswith("inception_score") else pytest.approx(want, rel=1e-4)


def _inception(images: np.ndarray, weights: str) -> tuple[np.ndarray, np.ndarray]:
    """(2048-d pool features, logits_unbiased) of uint8 images from torch-fidelity's InceptionV3 called directly."""
    from torch_fidelity import FeatureExtractorInceptionV3

    net = FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=weights
    ).eval()
    with torch.no_grad():
        return tuple(t.double().numpy() for t in net(torch.from_numpy(images)))


def _direct_metrics(fg: np.ndarray, logits: np.ndarray, fr: np.ndarray, kid_subset: int) -> dict:
    """FID, IS, KID and precision/recall of sample features `fg` (+ their logits) against reference
    features `fr`, written out in numpy: the Fréchet distance through symmetric eigenvalues; IS over
    min(10, N) splits (one sample per split here, so exactly 1); KID as the mean/std of the unbiased
    polynomial-kernel MMD² over 100 subsets drawn with RandomState(2020), the protocol's seed;
    improved precision/recall with k = 3 nearest-neighbour radii."""
    sg, sr = np.cov(fg, rowvar=False), np.cov(fr, rowvar=False)
    w, v = np.linalg.eigh(sg)
    root = (v * np.sqrt(w.clip(0))) @ v.T
    fid = (
        ((fg.mean(0) - fr.mean(0)) ** 2).sum()
        + np.trace(sg)
        + np.trace(sr)
        - 2 * np.sqrt(np.linalg.eigvalsh(root @ sr @ root).clip(0)).sum()
    )

    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    scores = [
        np.exp((q * (np.log(q) - np.log(q.mean(0, keepdims=True)))).sum(1).mean())
        for q in np.array_split(p, min(10, len(p)))
    ]

    def mmd2(a, b):
        k = lambda x, y: (x @ y.T / x.shape[1] + 1) ** 3  # noqa: E731
        m = len(a)
        kxx, kyy = k(a, a), k(b, b)
        return (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * k(a, b).sum() / m**2

    rng = np.random.RandomState(2020)
    kids = [
        mmd2(fg[rng.choice(len(fg), kid_subset, replace=False)], fr[rng.choice(len(fr), kid_subset, replace=False)])
        for _ in range(100)
    ]

    d = lambda x, y: np.linalg.norm(x[:, None] - y[None], axis=-1)  # noqa: E731
    r_real, r_gen = np.sort(d(fr, fr), 1)[:, 3], np.sort(d(fg, fg), 1)[:, 3]
    return {
        "fid": fid,
        "inception_score": np.mean(scores),
        "inception_score_std": np.std(scores),
        "kid": np.mean(kids),
        "kid_std": np.std(kids),
        "precision": (d(fg, fr) <= r_real[None]).any(1).mean(),
        "recall": (d(fr, fg) <= r_gen[None]).any(1).mean(),
    }


@pytest.mark.slow
def test_text_to_image_shards_through_ray_workers(t2i_run, tmp_path):
    """Two Ray workers (caption rows and the VAE spec travel into the tasks) give the same samples."""
    import ray

    from uvit.evaluate.sample_shards import SampleSpec, SamplingRun, merge_shards, sample_to_shards
    from uvit.evaluate.draw import caption_set
    from uvit.evaluate.draw import decoder_spec as _decoder

    cfg, paths = t2i_run
    spec = SampleSpec(
        schedule="discrete",
        sampler="dpm_solver_pp",
        steps=3,
        num_samples=5,
        shard_size=2,
        seed=0,
        guidance_scale=1.0,
        num_classes_for_labels=None,
        captions=caption_set(cfg, paths, 5),
        decoder=_decoder(cfg),
    )
    try:
        sample_to_shards(
            paths.train / "ema", tmp_path / "ray", spec, SamplingRun(batch_size=5, num_workers=2, progress=False)
        )
    finally:
        ray.shutdown()
    sample_to_shards(
        paths.train / "ema", tmp_path / "one", spec, SamplingRun(batch_size=5, num_workers=1, progress=False)
    )
    np.testing.assert_array_equal(merge_shards(tmp_path / "ray"), merge_shards(tmp_path / "one"))
    assert load_sample_extras(tmp_path / "ray" / "samples.npz")["captions"].tolist() == FLAT[:5]
