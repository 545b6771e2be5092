"""The tiny seeded diffusers AutoencoderKL (two blocks of 32/64 channels, 4 latent channels) that
the encode, generate and text-to-image tests share: the same seed gives the same weights."""

from __future__ import annotations

from pathlib import Path


def tiny_vae(sample_size: int = 32, seed: int = 0):
    import diffusers
    import torch

    torch.manual_seed(seed)
    return diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=sample_size,
    )


def tiny_vae_dir(root: Path, sample_size: int = 8) -> Path:
    """The tiny VAE saved as a diffusers folder at `root`."""
    tiny_vae(sample_size).save_pretrained(str(root))
    return root
