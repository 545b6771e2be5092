"""Stages `sample`, `classifier` and `score`.

sample:     EMA weights -> runs/<b>/samples/: shards/ (resumable, uvit.evaluate.sharded), samples.npz
            (all shards merged: uint8 NHWC + labels, or caption rows/texts for text-to-image),
            png/{i:06d}.png, grid.png, summary.json; text-to-image also examples.png, the
            paper's eight example captions
classifier: (digits) a small CNN on the real train split: the FID feature extractor and the judge
            of conditional accuracy -> runs/<b>/classifier/
score:      FID and KID of the samples against the real train split (torch-fidelity), with the
            real-vs-real floor (as many test images vs train) and the untrained-model ceiling, and conditional
            accuracy; Inception benchmarks: FID, IS, KID (against our reference images), and the CLIP
            score for text-to-image -> runs/<b>/score/metrics.json (DVC metrics)
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from uvit.config import BenchmarkConfig
from uvit.fileio import sha256_file, write_json, write_npz
from uvit.paths import BenchmarkPaths


def _device(cfg: BenchmarkConfig) -> str:
    return "cuda" if cfg.train.use_gpu and torch.cuda.is_available() else "cpu"


def sample_labels(cfg: BenchmarkConfig, num_samples: int) -> torch.Tensor | None:
    from uvit.evaluate.sample import balanced_labels

    k = cfg.validate_.num_classes
    return balanced_labels(num_samples, k) if cfg.uvit_config().num_classes > 0 and k > 0 else None


def _decoder(cfg: BenchmarkConfig) -> dict | None:
    """The VAE that turns latent samples into images (latent benchmarks), as sharded sampling takes it."""
    if cfg.encode is None:
        return None
    return {"vae": cfg.encode.vae, "scale_factor": cfg.encode.scale_factor, "batch_size": 50}


def caption_set(cfg: BenchmarkConfig, paths: BenchmarkPaths, num_samples: int):
    """The validation captions (CLIP contexts from the encode stage) that condition the samples."""
    from uvit.evaluate.captions import CaptionSet, select_caption_rows

    split = "val" if (paths.contexts / "val").is_dir() else "test"
    root = paths.contexts / split
    if not (root / "manifest.json").is_file():
        raise FileNotFoundError(f"{paths.contexts}/val: no encoded validation captions; run "
                                f"`uvit encode {cfg.name}` first (it writes the CLIP contexts of every caption)")
    texts = paths.data / split
    return CaptionSet(str(root), select_caption_rows(root, num_samples, cfg.sample.captions),
                      captions_root=str(texts) if (texts / "manifest.json").is_file() else None)


def draw_samples(cfg: BenchmarkConfig, model, num_samples: int | None = None, progress: bool = True,
                 captions=None) -> tuple[np.ndarray, np.ndarray | None]:
    """uint8 (N, C, H, W) samples of `model` with the benchmark's sampler settings, and their labels,
    in memory (the untrained-model ceiling; the stage itself samples through shards).
    captions: a CaptionSet for a text-to-image model."""
    from uvit.evaluate.sample import generate, sample_seeds, to_uint8

    s = cfg.sample
    n = num_samples or s.num_samples
    text = {}
    if model.config.clip_dim is not None:
        if captions is None:
            raise ValueError(f"{cfg.name}: a text-to-image model samples from captions (pass captions=caption_set(...))")
        text = {"contexts": captions.contexts(0, n), "empty_context": captions.empty_context()}
    labels = sample_labels(cfg, n)
    x = generate(model, schedule=cfg.diffusion.schedule, sampler=s.sampler, steps=s.steps,
                 seeds=sample_seeds(s.seed, n), labels=labels, guidance_scale=s.guidance_scale,
                 batch_size=s.batch_size, device=_device(cfg), progress=progress, **text)
    if cfg.encode is not None:  # latent benchmarks: decode with the VAE, in chunks of 50 as the official code
        from uvit.encoders.vae import decode, load_vae

        vae = load_vae(cfg.encode.vae, scale_factor=cfg.encode.scale_factor, device=_device(cfg),
                       params_key=f"{cfg.name}.encode.vae")
        x = decode(vae, x.to(_device(cfg)), batch_size=50).cpu()
    return to_uint8(x), None if labels is None else labels.numpy()


def run_sample(cfg: BenchmarkConfig, paths: BenchmarkPaths) -> dict:
    """Sample through resumable shards (finished shards are reused on a re-run), merge them into
    samples.npz, write the PNGs and the grid; for text-to-image also the example-caption grid."""
    from uvit.diffusion import count_nfe
    from uvit.evaluate.sample import save_grid
    from uvit.evaluate.sharded import merge_shards, sample_to_shards

    s = cfg.sample
    torch.set_num_threads(max(1, cfg.train.threads_per_worker))
    weights = paths.train / ("ema" if s.use_ema else "model")
    out = paths.samples
    t2i = cfg.uvit_config().clip_dim is not None
    labels_k = cfg.validate_.num_classes if sample_labels(cfg, 1) is not None else None
    if cfg.encode is not None:  # fail before sampling, not after, when the VAE is not there
        from uvit.encoders.vae import load_vae

        load_vae(cfg.encode.vae, scale_factor=cfg.encode.scale_factor, params_key=f"{cfg.name}.encode.vae")
    result = sample_to_shards(
        weights, out / "shards", schedule=cfg.diffusion.schedule, sampler=s.sampler, steps=s.steps,
        num_samples=s.num_samples, shard_size=s.shard_size, seed=s.seed, guidance_scale=s.guidance_scale,
        num_classes_for_labels=labels_k, batch_size=s.batch_size, num_workers=s.num_workers,
        use_gpu=cfg.train.use_gpu, device=_device(cfg),
        captions=caption_set(cfg, paths, s.num_samples) if t2i else None, decoder=_decoder(cfg),
        png_dir=out / "png" if s.png else None)
    if not s.png:
        import shutil

        shutil.rmtree(out / "png", ignore_errors=True)
    images = merge_shards(out / "shards", out / "samples.npz")
    if t2i:  # the first 64 samples, eight per row
        save_grid(images[:64], out / "grid.png", nrow=8)
        examples = sample_paper_captions(cfg, paths, weights)
    else:
        k = cfg.validate_.num_classes or 10
        # Grid: one column per class, ten rows (labels cycle through the classes).
        grid = images[: k * min(10, math.ceil(len(images) / k))]
        save_grid(grid, out / "grid.png", nrow=k, upscale=max(1, 64 // cfg.uvit_config().img_size))
        examples = None
    summary = {"sampler": s.sampler, "steps": s.steps, "nfe": count_nfe(s.sampler, s.steps),
               "guidance_scale": s.guidance_scale, "num_samples": len(images),
               # Time and rate of the shards sampled by this run (reused shards cost nothing).
               "wall_time_s": round(result["seconds"], 2), "images_per_s": round(result["images_per_s"], 2),
               "shards_computed": len(result["computed"]), "shards_reused": len(result["reused"]),
               "num_workers": s.num_workers, "seed": s.seed, "weights": "ema" if s.use_ema else "raw"}
    previous = out / "summary.json"
    if not result["computed"] and previous.is_file():  # all reused: keep the timing of the run that sampled
        old = json.loads(previous.read_text())
        summary.update({k: old[k] for k in ("wall_time_s", "images_per_s") if k in old})
    if t2i:
        summary["captions"] = s.captions
        summary["examples"] = examples
    write_json(out / "summary.json", summary)
    return summary


def sample_paper_captions(cfg: BenchmarkConfig, paths: BenchmarkPaths, weights: Path,
                          per_caption: int = 4) -> str:
    """Samples for the paper's eight example captions (encoded here with the benchmark's CLIP text
    encoder) -> samples/examples.png, one row per caption, and examples.json (the captions)."""
    from uvit.encoders.text import empty_context, encode_text, load_text_encoder
    from uvit.evaluate.sample import generate, sample_seeds, save_grid, to_uint8
    from uvit.models import UViT
    from uvit.report.paper import PAPER_CAPTIONS

    s, dev = cfg.sample, _device(cfg)
    tokenizer, text_model = load_text_encoder(cfg.encode.text_encoder, device=dev,
                                              params_key=f"{cfg.name}.encode.text_encoder")
    prompts = [c for c in PAPER_CAPTIONS for _ in range(per_caption)]
    contexts = encode_text(tokenizer, text_model, prompts).cpu()
    empty = empty_context(tokenizer, text_model).cpu()
    model = UViT.from_pretrained(weights)
    x = generate(model, schedule=cfg.diffusion.schedule, sampler=s.sampler, steps=s.steps,
                 seeds=sample_seeds(s.seed + 1, len(prompts)), contexts=contexts, empty_context=empty,
                 guidance_scale=s.guidance_scale, batch_size=s.batch_size, device=dev, progress=False)
    decoder = _decoder(cfg)
    from uvit.encoders.vae import decode, load_vae

    vae = load_vae(decoder["vae"], scale_factor=decoder["scale_factor"], device=dev)
    images = to_uint8(decode(vae, x.to(dev), batch_size=50).cpu())
    save_grid(images, paths.samples / "examples.png", nrow=per_caption)
    write_json(paths.samples / "examples.json", {"captions": list(PAPER_CAPTIONS), "per_caption": per_caption,
                                                  "seed": s.seed + 1})
    return "examples.png"


def run_classifier(cfg: BenchmarkConfig, paths: BenchmarkPaths) -> dict:
    if cfg.score.feature_extractor != "digits-classifier":
        raise ValueError(f"{cfg.name}.score.feature_extractor is {cfg.score.feature_extractor!r}: "
                         "the classifier stage only serves the digits benchmark")
    from uvit.data.shards import load_split_arrays
    from uvit.evaluate.classifier import ClassifierConfig, accuracy, save_classifier, train_classifier

    torch.set_num_threads(max(1, cfg.train.threads_per_worker))
    train_x, train_y = load_split_arrays(paths.data / "train")
    test_x, test_y = load_split_arrays(paths.data / "test")
    config = ClassifierConfig(in_chans=train_x.shape[1], image_size=train_x.shape[2],
                              num_classes=cfg.validate_.num_classes)
    model = train_classifier(train_x, train_y, config, epochs=cfg.score.classifier_epochs, seed=cfg.data.seed)
    save_classifier(model, paths.classifier)
    result = {"test_accuracy": accuracy(model, test_x, test_y)}
    write_json(paths.classifier / "metrics.json", result)
    return result


def run_score(cfg: BenchmarkConfig, paths: BenchmarkPaths) -> dict:
    from uvit.evaluate.sample import load_samples

    samples, labels = load_samples(paths.samples / "samples.npz")
    if cfg.score.feature_extractor == "inception":
        return _score_inception(cfg, paths, samples)
    from uvit.evaluate.fid import kid
    from uvit.data.shards import load_split_arrays
    from uvit.evaluate.classifier import conditional_accuracy, load_classifier
    from uvit.evaluate.fid import fid
    from uvit.models import UViT

    torch.set_num_threads(max(1, cfg.train.threads_per_worker))
    train_x, _ = load_split_arrays(paths.data / "train")
    test_x, _ = load_split_arrays(paths.data / "test")
    kw = {"extractor": "digits-classifier", "classifier_path": paths.classifier}
    fid_samples = fid(samples, train_x, **kw)
    # The floor uses as many real test images as there are samples: FID's bias depends on the count.
    floor = fid(test_x[: len(samples)], train_x, **kw)
    # Ceiling: the same sampler on an untrained model (same init seed as training).
    torch.manual_seed(cfg.train.seed)
    untrained, _ = draw_samples(cfg, UViT(cfg.uvit_config()), num_samples=len(samples), progress=False)
    ceiling = fid(untrained, train_x, **kw)
    classifier = load_classifier(paths.classifier)
    kid_mean, kid_std = kid(samples, train_x, subset_size=cfg.score.kid_subset_size, **kw)
    kid_floor, _ = kid(test_x[: len(samples)], train_x, subset_size=cfg.score.kid_subset_size, **kw)
    precision, recall = _precision_recall(samples, train_x, **kw)
    metrics = {
        "fid": fid_samples,
        "fid_floor": floor,
        "fid_ceiling": ceiling,
        "fid_over_floor": fid_samples / floor,
        "kid": kid_mean,
        "kid_std": kid_std,
        "kid_floor": kid_floor,
        "kid_subset_size": min(cfg.score.kid_subset_size, len(samples)),
        "precision": precision,  # against the whole train split, in the classifier's feature space
        "recall": recall,
        "conditional_accuracy": conditional_accuracy(classifier, samples, labels) if labels is not None else None,
        "classifier_test_accuracy": json.loads((paths.classifier / "metrics.json").read_text())["test_accuracy"],
        "feature_extractor": "digits-classifier",
        "num_samples": int(len(samples)),
        "num_reference": int(len(train_x)),
    }
    write_json(paths.score / "metrics.json", metrics)
    return metrics


# Reference features kept for KID (a fixed, evenly spaced subset: KID needs features, not statistics).
KID_REFERENCE_ROWS = 10_000


def _precision_recall(generated: np.ndarray, real: np.ndarray, **kw) -> tuple[float, float]:
    """Improved precision/recall of uint8 image sets in the feature space of `fid(..., **kw)`."""
    from uvit.evaluate.fid import extract_features, precision_recall_from_features

    layer = ("features",) if kw.get("extractor") == "digits-classifier" else ("2048",)
    fg = extract_features(generated, layer, **kw)[layer[0]]
    fr = extract_features(real, layer, **kw)[layer[0]]
    return precision_recall_from_features(fg, fr)


def reference_statistics(cfg: BenchmarkConfig, paths: BenchmarkPaths):
    """(mu, sigma, kid_features) of the real data's Inception features: a user-supplied `.npz`
    (score.reference_stats, e.g. ADM's ImageNet statistics: kid_features None unless the file has a
    `kid_features` array), else computed once from the training images and cached in
    runs/<benchmark>/reference/stats-<manifest digest>.npz (new data recomputes), with the 2048-d
    features of up to KID_REFERENCE_ROWS evenly spaced images for KID. Text-to-image benchmarks
    use the validation images (the official reference), the others the training images."""
    from uvit.data.shards import ShardedArrays
    from uvit.evaluate.fid import extract_features, load_fid_statistics

    if cfg.score.reference_stats:
        mu, sigma = load_fid_statistics(cfg.score.reference_stats)
        with np.load(cfg.score.reference_stats) as f:
            kid_features = f["kid_features"] if "kid_features" in f.files else None
        return mu, sigma, kid_features
    split = _reference_split(cfg, paths)
    digest = sha256_file(split / "manifest.json")[:16]
    cache = paths.run / "reference" / f"stats-{digest}.npz"
    if cache.is_file():
        with np.load(cache) as f:
            return f["mu"], f["sigma"], (f["kid_features"] if "kid_features" in f.files else None)
    images = np.array(ShardedArrays(split).field("images"))
    feats = extract_features(images, ("2048",), extractor="inception", weights_path=cfg.score.inception_weights,
                             device=_device(cfg))["2048"]
    mu, sigma = _fid_stats(feats)
    rows = np.linspace(0, len(feats) - 1, min(len(feats), KID_REFERENCE_ROWS)).round().astype(np.int64)
    kid_features = feats[rows].numpy().astype(np.float32)
    write_npz(cache, mu=mu, sigma=sigma, kid_features=kid_features)
    return mu, sigma, kid_features


def _reference_split(cfg: BenchmarkConfig, paths: BenchmarkPaths) -> Path:
    """The real images our reference statistics come from. Text-to-image samples follow validation
    captions, and the official reference is COCO val (fid_stats_mscoco256_val.npz); class and
    unconditional benchmarks use the training images."""
    val = paths.data / "val"
    if cfg.uvit_config().clip_dim is not None and (val / "manifest.json").is_file():
        return val
    return paths.data / "train"


def _fid_stats(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """float64 (mu (D,), sigma (D, D)) of (N, D) features, by torch-fidelity (as fid_statistics)."""
    from torch_fidelity.metric_fid import fid_featuresdict_to_statistics

    st = fid_featuresdict_to_statistics({"f": features}, "f")
    return st["mu"].astype(np.float64), st["sigma"].astype(np.float64)


def _score_inception(cfg: BenchmarkConfig, paths: BenchmarkPaths, samples: np.ndarray) -> dict:
    """FID against the reference statistics, IS, KID (when reference features exist) and, for
    text-to-image, the CLIP score; one Inception pass over the samples."""
    from uvit.evaluate.fid import (
        extract_features,
        fid_from_statistics,
        inception_score_from_logits,
        kid_from_features,
        precision_recall_from_features,
    )

    ref_mu, ref_sigma, ref_kid = reference_statistics(cfg, paths)
    feats = extract_features(samples, ("2048", "logits_unbiased"), extractor="inception",
                             weights_path=cfg.score.inception_weights, device=_device(cfg))
    mu, sigma = _fid_stats(feats["2048"])
    is_mean, is_std = inception_score_from_logits(feats["logits_unbiased"])
    metrics = {"fid": fid_from_statistics(mu, sigma, ref_mu, ref_sigma), "inception_score": is_mean,
               "inception_score_std": is_std}
    if ref_kid is not None:
        metrics["kid"], metrics["kid_std"] = kid_from_features(feats["2048"], ref_kid,
                                                               subset_size=cfg.score.kid_subset_size)
        metrics["kid_subset_size"] = min(cfg.score.kid_subset_size, len(samples), len(ref_kid))
        # Against the same reference features (up to KID_REFERENCE_ROWS images).
        metrics["precision"], metrics["recall"] = precision_recall_from_features(feats["2048"], ref_kid)
    else:
        metrics["kid"] = None  # a statistics-only reference (mu, sigma) has no features to compare with
    if cfg.uvit_config().clip_dim is not None:
        metrics.update(_score_clip(cfg, paths, samples))
    metrics.update({"feature_extractor": "inception", "num_samples": int(len(samples)),
                    "reference": cfg.score.reference_stats
                    or f"{_reference_split(cfg, paths).name} images (runs/<benchmark>/reference/)"})
    write_json(paths.score / "metrics.json", metrics)
    return metrics


def _score_clip(cfg: BenchmarkConfig, paths: BenchmarkPaths, samples: np.ndarray) -> dict:
    """CLIP score of the samples against the captions stored with them (samples.npz `captions`)."""
    from uvit.evaluate.clip_score import DEFAULT_CLIP_MODEL, clip_score, load_clip
    from uvit.evaluate.sample import load_sample_extras

    extras = load_sample_extras(paths.samples / "samples.npz")
    if "captions" not in extras:
        raise ValueError(f"{paths.samples / 'samples.npz'} holds no caption texts: the CLIP score needs them "
                         f"(they are stored when data/{cfg.name}/val has the captions)")
    source = cfg.score.clip_model or DEFAULT_CLIP_MODEL
    model, processor = load_clip(source, device=_device(cfg), params_key=f"{cfg.name}.score.clip_model")
    return {"clip_score": clip_score(samples, [str(t) for t in extras["captions"]], model, processor),
            "clip_model": str(source)}
