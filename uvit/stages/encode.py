"""Stage `encode` (latent benchmarks): SD-VAE moments of every image split, CLIP features of
every caption, each checked by its great-expectations suite before the stage succeeds.

Pixel benchmarks skip it. Resumable: finished chunks are reused on a re-run.
"""

from __future__ import annotations

from uvit.config import BenchmarkConfig
from uvit.paths import BenchmarkPaths


def run_encode(cfg: BenchmarkConfig, paths: BenchmarkPaths) -> dict:
    if cfg.encode is None:
        return {"skipped": f"{cfg.name} trains in pixel space"}
    import torch

    from uvit.data.encode import CaptionEncoding, EncodeRun, ImageEncoding, encode_captions, encode_image_split
    from uvit.data.validate import ValidationFailed
    from uvit.data.validate_latents import (
        CaptionSplitExpectations,
        LatentSplitExpectations,
        validate_caption_split,
        validate_latent_split,
    )
    from uvit.encoders.vae import load_vae

    e = cfg.encode
    device = "cuda" if torch.cuda.is_available() else "cpu"
    splits = sorted(p.name for p in paths.data.iterdir() if (p / "manifest.json").is_file())
    if not splits:
        raise FileNotFoundError(f"no image splits under {paths.data}: run `uvit data {cfg.name}` first")
    vae = load_vae(e.vae, scale_factor=e.scale_factor, device=device, params_key=f"{cfg.name}.encode.vae")
    result = {}
    for split in splits:
        out = paths.latents / split
        manifest = encode_image_split(
            paths.data / split,
            out,
            vae,
            ImageEncoding(batch_size=e.batch_size, flip=False, dtype=e.dtype),
            EncodeRun(shard_size=cfg.data.shard_size, device=device),
        )
        # flip=False: this stage encodes each stored row once (ImageNet stores its mirrors as rows).
        report = validate_latent_split(
            out,
            LatentSplitExpectations(scale_factor=e.scale_factor, flip=False, num_classes=cfg.data.num_classes),
            source_root=paths.data / split,
        )
        print(f"[{split} latents]\n{report.summary()}")
        if not report.success:
            raise ValidationFailed(report)
        result[f"{split}_latents"] = manifest.count
    if e.text_encoder:
        from uvit.encoders.text import load_text_encoder

        tokenizer, text_model = load_text_encoder(
            e.text_encoder, device=device, params_key=f"{cfg.name}.encode.text_encoder"
        )
        for split in splits:
            out = paths.contexts / split
            manifest = encode_captions(
                paths.data / split, out, tokenizer, text_model, CaptionEncoding(dtype=e.dtype), EncodeRun(device=device)
            )
            report = validate_caption_split(
                paths.data / split, CaptionSplitExpectations(), tokenizer=tokenizer, contexts_root=out
            )
            print(f"[{split} captions]\n{report.summary()}")
            if not report.success:
                raise ValidationFailed(report)
            result[f"{split}_contexts"] = manifest.count
    return result
