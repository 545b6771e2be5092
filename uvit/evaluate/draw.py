"""Samples of a benchmark's model with the benchmark's settings: labels, captions, the VAE decoder.

What the `sample` and `score` stages and the in-training grids and FID (:mod:`uvit.train.monitor`)
share: the device, the class labels of N samples, the validation captions that condition a
text-to-image model, the VAE that decodes latent samples, and in-memory sampling
(:func:`draw_samples`, uint8 (N, C, H, W)). The paper's eight example captions are sampled by
:func:`paper_caption_images`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from uvit.config import BenchmarkConfig
from uvit.encoders.vae import LatentDecoder
from uvit.paths import BenchmarkPaths

__all__ = ["caption_set", "decoder_spec", "device_for", "draw_samples", "paper_caption_images", "sample_labels"]


def device_for(cfg: BenchmarkConfig) -> str:
    """ "cuda" when the benchmark asks for a GPU and one is there, else "cpu"."""
    return "cuda" if cfg.train.use_gpu and torch.cuda.is_available() else "cpu"


def sample_labels(cfg: BenchmarkConfig, num_samples: int) -> torch.Tensor | None:
    """Class labels int64 (N,) of N samples (i % K, balanced); None for unconditional models."""
    from uvit.evaluate.sample import balanced_labels

    k = cfg.data.num_classes
    return balanced_labels(num_samples, k) if cfg.uvit_config().num_classes > 0 and k > 0 else None


def decoder_spec(cfg: BenchmarkConfig) -> LatentDecoder | None:
    """The VAE that turns latent samples into images (latent benchmarks)."""
    if cfg.encode is None:
        return None
    return LatentDecoder(cfg.decoder_vae()[0], cfg.encode.scale_factor)


def caption_set(cfg: BenchmarkConfig, paths: BenchmarkPaths, num_samples: int):
    """The validation captions (CLIP contexts from the encode stage) that condition the samples."""
    from uvit.evaluate.captions import CaptionSet, select_caption_rows

    split = "val" if (paths.contexts / "val").is_dir() else "test"
    root = paths.contexts / split
    if not (root / "manifest.json").is_file():
        raise FileNotFoundError(
            f"{paths.contexts}/val: no encoded validation captions; run "
            f"`uvit encode {cfg.name}` first (it writes the CLIP contexts of every caption)"
        )
    texts = paths.data / split
    return CaptionSet(
        str(root),
        select_caption_rows(root, num_samples, cfg.sample.captions),
        captions_root=str(texts) if (texts / "manifest.json").is_file() else None,
    )


def sampling_recipe(cfg: BenchmarkConfig):
    """The benchmark's sampling recipe: its schedule and its sample section's sampler, steps, guidance, options."""
    from uvit.evaluate.sample import SamplingRecipe

    s = cfg.sample
    return SamplingRecipe(cfg.diffusion.schedule, s.sampler, s.steps, s.guidance_scale, s.sampler_kwargs())


def draw_samples(
    cfg: BenchmarkConfig, model, num_samples: int | None = None, progress: bool = True, captions=None
) -> tuple[np.ndarray, np.ndarray | None]:
    """uint8 (N, C, H, W) samples of `model` with the benchmark's sampler settings, and their labels,
    in memory (the untrained-model ceiling; the stage itself samples through shards).
    captions: a CaptionSet for a text-to-image model."""
    from uvit.evaluate.sample import Condition, generate, sample_seeds, to_uint8

    s = cfg.sample
    n = num_samples or s.num_samples
    text = {}
    if model.config.clip_dim is not None:
        if captions is None:
            raise ValueError(
                f"{cfg.name}: a text-to-image model samples from captions (pass captions=caption_set(...))"
            )
        text = {"contexts": captions.contexts(0, n), "empty_context": captions.empty_context()}
    labels = sample_labels(cfg, n)
    seeds, condition = sample_seeds(s.seed, n), Condition(labels, **text)
    x = generate(
        model,
        sampling_recipe(cfg),
        seeds,
        condition,
        batch_size=s.batch_size,
        device=device_for(cfg),
        progress=progress,
    )
    if cfg.encode is not None:  # latent benchmarks: decode with the VAE, in chunks of 50 as the official code
        from uvit.encoders.vae import decode, load_vae

        path, key = cfg.decoder_vae()
        vae = load_vae(path, scale_factor=cfg.encode.scale_factor, device=device_for(cfg), params_key=key)
        x = decode(vae, x.to(device_for(cfg)), batch_size=50).cpu()
    return to_uint8(x), None if labels is None else labels.numpy()


def paper_caption_images(cfg: BenchmarkConfig, weights: Path, per_caption: int = 4) -> np.ndarray:
    """uint8 (8 * per_caption, C, H, W) samples of the model at `weights` for the paper's eight
    example captions (encoded with the benchmark's CLIP text encoder), caption by caption, seeds
    from `sample.seed + 1`."""
    from uvit.encoders.text import empty_context, encode_text, load_text_encoder
    from uvit.evaluate.sample import Condition, generate, sample_seeds, to_uint8
    from uvit.models import UViT
    from uvit.report.paper import PAPER_CAPTIONS

    s, dev = cfg.sample, device_for(cfg)
    tokenizer, text_model = load_text_encoder(
        cfg.encode.text_encoder, device=dev, params_key=f"{cfg.name}.encode.text_encoder"
    )
    prompts = [c for c in PAPER_CAPTIONS for _ in range(per_caption)]
    contexts = encode_text(tokenizer, text_model, prompts).cpu()
    empty = empty_context(tokenizer, text_model).cpu()
    model = UViT.from_pretrained(weights)
    seeds, condition = sample_seeds(s.seed + 1, len(prompts)), Condition(contexts=contexts, empty_context=empty)
    x = generate(model, sampling_recipe(cfg), seeds, condition, batch_size=s.batch_size, device=dev, progress=False)
    return to_uint8(decoder_spec(cfg).images(x, dev))
