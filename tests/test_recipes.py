"""Every paper block of params.yaml against the official configs, field by field.

The official values are transcribed here from the released configs (configs/*.py of the
official repository: optimizer, schedule, EMA, condition dropout, sampler, guidance, autoencoder,
flips). A change to a paper block that leaves the official recipe fails here with the field named.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from uvit.config import load_benchmark, load_params

ROOT = Path(__file__).resolve().parents[1]

# Shared by every official config: AdamW, linear warmup then constant lr, EMA 0.9999 of the
# parameters after every step, no gradient clipping.
COMMON = {"train.weight_decay": 0.03, "train.ema_decay": 0.9999, "train.grad_clip": None}

OFFICIAL = {
    # cifar10_uvit_small: train.py, euler_maruyama_sde 1000 steps, unconditional, RandomHorizontalFlip.
    "cifar10": {
        "model.preset": "cifar10_uvit_s2",
        "diffusion.schedule": "vpsde",
        "diffusion.p_uncond": 0.0,
        "train.batch_size": 128,
        "train.steps": 500_000,
        "train.lr": 2e-4,
        "train.betas": (0.99, 0.999),
        "train.warmup_steps": 2500,
        "train.random_flip": True,
        "sample.sampler": "euler_maruyama",
        "sample.steps": 1000,
        "sample.guidance_scale": 0.0,
        "sample.num_samples": 50_000,
    },
    # celeba64_uvit_small: 128x128 crop at (57, 25), Resize(64), RandomHorizontalFlip.
    "celeba64": {
        "model.preset": "celeba64_uvit_s4",
        "diffusion.schedule": "vpsde",
        "diffusion.p_uncond": 0.0,
        "train.batch_size": 128,
        "train.steps": 500_000,
        "train.lr": 2e-4,
        "train.betas": (0.99, 0.99),
        "train.warmup_steps": 5000,
        "train.random_flip": True,
        "sample.sampler": "euler_maruyama",
        "sample.steps": 1000,
        "sample.guidance_scale": 0.0,
        "sample.num_samples": 50_000,
    },
    # imagenet64_uvit_large: class-conditional without CFG, continuous DPM-Solver 50 NFE, flips.
    "imagenet64": {
        "model.preset": "imagenet64_uvit_l4",
        "diffusion.schedule": "vpsde",
        "diffusion.p_uncond": 0.0,
        "train.batch_size": 1024,
        "train.steps": 300_000,
        "train.lr": 3e-4,
        "train.betas": (0.99, 0.99),
        "train.warmup_steps": 5000,
        "train.random_flip": True,
        "sample.sampler": "dpm_solver",
        "sample.steps": 50,
        "sample.guidance_scale": 0.0,
        "sample.num_samples": 50_000,
    },
    # imagenet256_uvit_huge: discrete schedule, DPM-Solver++ 50 NFE, CFG 0.4; flips baked into the
    # stored features (no training-time flip), autoencoder_kl.pth features at scale 0.18215, decoded
    # with autoencoder_kl_ema.pth (the huge configs' decoder).
    "imagenet256": {
        "model.preset": "imagenet256_uvit_h2",
        "diffusion.schedule": "discrete",
        "diffusion.p_uncond": 0.1,
        "train.batch_size": 1024,
        "train.steps": 500_000,
        "train.lr": 2e-4,
        "train.betas": (0.99, 0.99),
        "train.warmup_steps": 5000,
        "train.random_flip": False,
        "sample.sampler": "dpm_solver_pp",
        "sample.steps": 50,
        "sample.guidance_scale": 0.4,
        "sample.num_samples": 50_000,
        "encode.scale_factor": 0.18215,
        "encode.vae": "models/autoencoder_kl.pth",
        "sample.vae": "models/autoencoder_kl_ema.pth",
    },
    # mscoco_uvit_small: betas (0.9, 0.9), 1M steps, CFG 1.0, 30k samples, scale 0.23010, no flip.
    "mscoco256": {
        "model.preset": "mscoco256_uvit_s2",
        "diffusion.schedule": "discrete",
        "diffusion.p_uncond": 0.1,
        "train.batch_size": 256,
        "train.steps": 1_000_000,
        "train.lr": 2e-4,
        "train.betas": (0.9, 0.9),
        "train.warmup_steps": 5000,
        "train.random_flip": False,
        "sample.sampler": "dpm_solver_pp",
        "sample.steps": 50,
        "sample.guidance_scale": 1.0,
        "sample.num_samples": 30_000,
        "encode.scale_factor": 0.2301,
        "encode.vae": "models/autoencoder_kl.pth",
        "sample.vae": None,
        "encode.text_encoder": "openai/clip-vit-large-patch14",
    },
}
# imagenet512_uvit_huge: imagenet256's recipe on 64x64 latents, CFG 0.7.
OFFICIAL["imagenet512"] = {
    **OFFICIAL["imagenet256"],
    "model.preset": "imagenet512_uvit_h4",
    "sample.guidance_scale": 0.7,
}


def _get(cfg, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, "validate_" if part == "validate" else part)
    return node


@pytest.mark.parametrize("benchmark", sorted(OFFICIAL))
def test_paper_block_is_the_official_recipe(benchmark):
    cfg = load_benchmark(benchmark, load_params(ROOT / "params.yaml"))
    expected = {**COMMON, **OFFICIAL[benchmark]}
    wrong = {k: (_get(cfg, k), v) for k, v in expected.items() if _get(cfg, k) != v}
    assert not wrong, f"{benchmark}: params.yaml differs from the official config (got, official): {wrong}"


def test_every_paper_block_is_checked():
    params = load_params(ROOT / "params.yaml")
    assert sorted(k for k in params if k != "digits") == sorted(OFFICIAL)


def test_digits_does_not_flip():
    cfg = load_benchmark("digits", load_params(ROOT / "params.yaml"))
    assert cfg.train.random_flip is False  # digits are not mirror-symmetric (2 vs S, 7, ...)
