"""uvit.encoders: the frozen encoders of the latent benchmarks.

* :mod:`uvit.encoders.vae`: the KL-f8 autoencoder as a diffusers ``AutoencoderKL``, loaded from a
  diffusers directory, a Hugging Face hub id or an official U-ViT ``autoencoder_kl.pth`` (LDM key
  names, converted); ``encode_moments`` (mean ‖ logvar), ``sample_latents``, ``decode``.
* :mod:`uvit.encoders.text`: the CLIP text encoder of MS-COCO (``openai/clip-vit-large-patch14``
  ``CLIPTextModel``, ``last_hidden_state`` of 77 padded tokens, as the official ``libs/clip.py``).

The pre-encoding of whole splits (resumable, sharded) lives in :mod:`uvit.data.encode`, its
validation in :mod:`uvit.data.validate_latents`.

Importing this package is cheap (no torch, diffusers or transformers): import the submodules.
Everything here works offline; a hub id that is not in the local cache fails with
:class:`WeightsNotAvailableError`, whose message says what to download, where to put it and
which ``params.yaml`` key to point at it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable, Sequence

__all__ = ["WeightsNotAvailableError", "from_hub", "hub_offline", "is_hub_id", "missing_weights_message"]

# "org/name" (optionally "name" alone is also a valid hub id, but a bare word is far more likely
# a mistyped local path, so only the org/name form is treated as a hub id).
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


class WeightsNotAvailableError(FileNotFoundError):
    """Pretrained weights that are neither on disk nor reachable (offline / not in the HF cache)."""


def is_hub_id(source: str | os.PathLike) -> bool:
    """``"org/name"`` that is not an existing local path."""
    s = str(source)
    return bool(_HUB_ID.match(s)) and not Path(s).expanduser().exists()


def hub_offline() -> bool:
    """Whether the Hugging Face hub must not be contacted (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
            return True
    return False


def missing_weights_message(
    what: str, hub_id: str, params_key: str, cause: BaseException | None, *, local_dir_hint: str
) -> str:
    """The error text for weights that could not be found: what, how to get them, where, which key."""
    reason = (
        f" ({type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''})" if cause is not None else ""
    )
    offline = " The hub is not reachable from here (offline mode)." if hub_offline() else ""
    return (
        f"Could not load the {what} {hub_id!r}: it is not a local directory and not in the local "
        f"Hugging Face cache{reason}.{offline}\n"
        f"On a machine with internet access run\n"
        f"    huggingface-cli download {hub_id} --local-dir {local_dir_hint}\n"
        f"(or `hf download {hub_id} --local-dir {local_dir_hint}`), copy that directory to this "
        f"machine, and set `{params_key}: {local_dir_hint}` in params.yaml (a local path is loaded "
        f"without any network access)."
    )


def from_hub(
    source: str, loaders: Sequence[Callable[..., Any]], what: str, params_key: str, *, note: str = "", **kwargs: Any
) -> list[Any]:
    """`load(source, local_files_only=<offline>, **kwargs)` for each loader (e.g. a class's
    ``from_pretrained``), from the hub or, offline, the local cache only. Any failure (not cached,
    offline, no network) means "get the files": a WeightsNotAvailableError saying what and where."""
    try:
        offline = hub_offline()
        return [load(str(source), local_files_only=offline, **kwargs) for load in loaders]
    except Exception as e:
        hint = f"models/{str(source).split('/')[-1]}"
        raise WeightsNotAvailableError(
            missing_weights_message(what, str(source), params_key, e, local_dir_hint=hint) + note
        ) from e
