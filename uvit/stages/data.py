"""Stage `data`: write the benchmark's splits in the common shard format under data/<benchmark>/.

Pixel benchmarks (digits, cifar10, celeba64, imagenet64) store their training images here
directly. Latent benchmarks (imagenet256/512, mscoco256) store the preprocessed images at the
VAE's input resolution (8x the latent size); the `encode` stage turns them into latents.
"""

from __future__ import annotations

import shutil

from uvit.config import BenchmarkConfig, ConfigError
from uvit.paths import BenchmarkPaths

# The VAE's downsampling factor (SD KL-f8): latent presets see images 8x their latent size.
VAE_FACTOR = 8


def image_resolution(cfg: BenchmarkConfig) -> int:
    c = cfg.uvit_config()
    return c.img_size * (VAE_FACTOR if c.in_chans == 4 else 1)


def _root(cfg: BenchmarkConfig, what: str) -> str:
    if not cfg.data.root:
        raise ConfigError(f"{cfg.name}.data.root is not set: {what} cannot be downloaded here. Download it "
                          f"yourself, then set {cfg.name}.data.root in params.yaml (a local folder or an s3:// prefix).")
    return cfg.data.root


def run_data(cfg: BenchmarkConfig, paths: BenchmarkPaths) -> dict:
    source, out = cfg.data.source, paths.data
    if out.exists():  # DVC removes outputs before a run; a manual re-run replaces them
        shutil.rmtree(out)
    kw = {"shard_size": cfg.data.shard_size}
    if source == "digits":
        from uvit.data.sources.digits import prepare_digits

        manifests = prepare_digits(out, test_fraction=cfg.data.test_fraction, seed=cfg.data.seed)
    elif source == "cifar10":
        from uvit.data.sources.cifar10 import prepare_cifar10

        # data.root may point at an already-downloaded cifar-10-binary.tar.gz (or an s3:// copy).
        manifests = prepare_cifar10(out, archive=cfg.data.root, **kw)
    elif source == "celeba":
        from uvit.data.sources.celeba import prepare_celeba

        manifests = prepare_celeba(out, _root(cfg, "CelebA (img_align_celeba + list_eval_partition.txt)"),
                                   size=image_resolution(cfg), **kw)
    elif source == "imagenet":
        from uvit.data.sources.imagenet import prepare_imagenet

        latent = cfg.uvit_config().in_chans == 4
        # The latent benchmarks bake the flip augmentation into stored latents (the official recipe).
        manifests = prepare_imagenet(out, _root(cfg, "ILSVRC2012 (needs an image-net.org account)"),
                                     image_resolution(cfg), flip=latent, **kw)
    elif source == "coco":
        from uvit.data.sources.coco import prepare_coco

        manifests = prepare_coco(out, _root(cfg, "MS-COCO 2014 (train2014, val2014, annotations)"),
                                 image_resolution(cfg), **kw)
    else:
        raise ConfigError(f"{cfg.name}.data.source: unknown source {source!r}")
    return {split: m.count for split, m in manifests.items()}
