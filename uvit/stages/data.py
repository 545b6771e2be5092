"""Stage `data`: write the benchmark's splits in the common shard format under data/<benchmark>/.

Pixel benchmarks (digits, cifar10, celeba64, imagenet64) store their training images here
directly. Latent benchmarks (imagenet256/512, mscoco256) store the preprocessed images at the
VAE's input resolution (8x the latent size); the `encode` stage turns them into latents.

All splits are written into a scratch folder beside data/<benchmark>/ and renamed into place
together, so a bad input (a wrong checksum, another archive version or layout, a missing file,
an unreadable image) leaves no data/<benchmark>/ behind. Such failures are raised as the
exceptions the CLI reports in one line (DataIntegrityError, FileNotFoundError, ConfigError),
their message prefixed with the params key to fix (`<benchmark>.data.root`, `.sha256`).
"""

from __future__ import annotations

import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from uvit.config import BenchmarkConfig, ConfigError
from uvit.paths import BenchmarkPaths

if TYPE_CHECKING:
    from uvit.data.download import SourceInput

# The VAE's downsampling factor (SD KL-f8): latent presets see images 8x their latent size.
VAE_FACTOR = 8


def image_resolution(cfg: BenchmarkConfig) -> int:
    c = cfg.uvit_config()
    return c.img_size * (VAE_FACTOR if c.in_chans == 4 else 1)


def _root(cfg: BenchmarkConfig, what: str) -> str:
    if not cfg.data.root:
        raise ConfigError(
            f"{cfg.name}.data.root is not set: {what} cannot be downloaded here. Download it "
            f"yourself, then set {cfg.name}.data.root in params.yaml (a local folder or an s3:// prefix)."
        )
    return cfg.data.root


def _declared(cfg: BenchmarkConfig) -> bool:
    return cfg.data.sha256 is not None or cfg.data.md5 is not None


def _no_checksum_for_folders(cfg: BenchmarkConfig, what: str) -> None:
    if _declared(cfg):
        key = "sha256" if cfg.data.sha256 is not None else "md5"
        raise ConfigError(
            f"{cfg.name}.data.{key}: {what} is read from a folder, and a checksum applies to an "
            f"archive only (the CIFAR-10 tarball, an ImageNet tar); remove {cfg.name}.data.{key}"
        )


def _source_input(cfg: BenchmarkConfig) -> SourceInput:
    """data.root, data.download_dir and the declared checksums; none declared: the official MD5
    where the source has one (``md5="auto"``)."""
    from uvit.data.download import AUTO, SourceInput

    d = cfg.data
    return SourceInput(root=d.root, download_dir=d.download_dir, md5=d.md5 if _declared(cfg) else AUTO, sha256=d.sha256)


def _prepare(cfg: BenchmarkConfig, out: Path) -> dict:
    from uvit.data.preprocess import PrepareOptions

    source, d = cfg.data.source, cfg.data
    # Progress bars only on a terminal: in logs (CI, DVC output captured) they are noise. The
    # config allows on_bad: skip only where a source decodes image files.
    options = PrepareOptions(shard_size=d.shard_size, skip_bad=d.on_bad == "skip", progress=sys.stderr.isatty())
    if source == "digits":
        from uvit.data.sources.digits import prepare_digits

        _no_checksum_for_folders(cfg, "digits (scikit-learn's copy)")
        return prepare_digits(out, test_fraction=d.test_fraction, seed=d.seed)  # no files, no progress
    if source == "cifar10":
        from uvit.data.sources.cifar10 import prepare_cifar10

        # data.root may point at an already-downloaded cifar-10-binary.tar.gz (or an s3:// copy).
        # A declared checksum replaces the official MD5; otherwise the official one guards it.
        return prepare_cifar10(out, _source_input(cfg), options=options)
    if source == "celeba":
        from uvit.data.sources.celeba import prepare_celeba

        root = _root(cfg, "CelebA (img_align_celeba + list_eval_partition.txt)")
        _no_checksum_for_folders(cfg, "CelebA")
        return prepare_celeba(out, root, size=image_resolution(cfg), options=options)
    if source == "imagenet":
        from uvit.data.sources.imagenet import prepare_imagenet

        _root(cfg, "ILSVRC2012 (needs an image-net.org account)")
        # The latent benchmarks bake the flip augmentation into stored latents (the official recipe).
        latent = cfg.uvit_config().in_chans == 4
        return prepare_imagenet(out, _source_input(cfg), image_resolution(cfg), flip=latent, options=options)
    if source == "imagefolder":
        from uvit.data.sources.imagefolder import prepare_imagefolder

        if not d.root:
            raise ConfigError(
                f"{cfg.name}.data.root is not set: name a folder, a tar or an s3:// prefix of your "
                "images (class sub-folders for a class-conditional benchmark, a flat folder for an "
                "unconditional one)"
            )
        return prepare_imagefolder(
            out,
            _source_input(cfg),
            image_resolution(cfg),
            test_fraction=d.test_fraction,
            seed=d.seed,
            store_flips=d.store_flips,
            options=options,
        )
    if source == "coco":
        from uvit.data.sources.coco import prepare_coco

        root = _root(cfg, "MS-COCO 2014 (train2014, val2014, annotations)")
        _no_checksum_for_folders(cfg, "MS-COCO")
        return prepare_coco(out, root, image_resolution(cfg), options=options)
    raise ConfigError(f"{cfg.name}.data.source: unknown source {source!r}")


def _name_the_key(cfg: BenchmarkConfig, e: BaseException) -> None:
    """Prefix the message of a bad-input error with the params key that points at the input."""
    from uvit.data.download import ChecksumMismatch

    name, d = cfg.name, cfg.data
    where = f"{name}.data.root={d.root}" if d.root else f"{name}.data.root (unset: the official download)"
    if isinstance(e, ChecksumMismatch):
        if _declared(cfg):
            prefix = (
                f"{where} does not match the checksum declared in {name}.data.{e.algorithm} "
                f"({e.algorithm} {e.actual}, declared {e.expected}): "
            )
        else:
            prefix = (
                f"{where} is not the official archive (if it is a copy of your own, e.g. a subset or a "
                f"miniature, declare its checksum as {name}.data.sha256 in params.yaml): "
            )
    else:
        prefix = f"{where}: "
    if isinstance(e, OSError) and e.errno is not None:  # str() comes from strerror, not args
        e.strerror = prefix + str(e.strerror)
    else:
        e.args = (prefix + str(e),)


def run_data(cfg: BenchmarkConfig, paths: BenchmarkPaths) -> dict:
    from uvit.data.shards import DataIntegrityError

    out = paths.data
    if out.exists():  # DVC removes outputs before a run; a manual re-run replaces them
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = out.with_name(f".{out.name}.partial-{uuid.uuid4().hex[:8]}")
    try:
        manifests = _prepare(cfg, scratch)
        os.rename(scratch, out)
    except (DataIntegrityError, FileNotFoundError) as e:  # bad input: say which key, leave nothing
        shutil.rmtree(scratch, ignore_errors=True)
        _name_the_key(cfg, e)
        raise
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return {split: m.count for split, m in manifests.items()}
