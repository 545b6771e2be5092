"""The CLIP text encoder of the MS-COCO benchmark (official ``libs/clip.py::FrozenCLIPEmbedder``).

Captions are tokenized with truncation and ``padding="max_length"`` at 77 tokens and encoded by
``CLIPTextModel``; the context is the whole ``last_hidden_state`` (B, 77, 768), padding positions
included (U-ViT attends to all 77 tokens). Like the official code, only ``input_ids`` are passed
to the model (no attention mask): CLIP's causal mask alone decides what each position sees, so
the padding positions' states match the official features.

The default model is ``openai/clip-vit-large-patch14`` (hidden size 768). Offline, a hub id must
be in the local Hugging Face cache; otherwise :class:`~uvit.encoders.WeightsNotAvailableError`
says what to download and which ``params.yaml`` key to set.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from uvit.encoders import from_hub, is_hub_id

if TYPE_CHECKING:
    from transformers import CLIPTextModel, CLIPTokenizer

__all__ = [
    "DEFAULT_TEXT_ENCODER",
    "MAX_LENGTH",
    "empty_context",
    "encode_text",
    "load_text_encoder",
    "text_encoder_fingerprint",
    "token_lengths",
]

DEFAULT_TEXT_ENCODER = "openai/clip-vit-large-patch14"
MAX_LENGTH = 77
_DEFAULT_PARAMS_KEY = "mscoco256.encode.text_encoder"


def _tokenizer_and_model_dirs(path: Path) -> tuple[Path, Path]:
    """A model directory, or a pipeline directory with ``tokenizer/`` and ``text_encoder/``."""
    if (path / "tokenizer").is_dir() and (path / "text_encoder").is_dir():
        return path / "tokenizer", path / "text_encoder"
    return path, path


def load_text_encoder(
    source: str | Path = DEFAULT_TEXT_ENCODER,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    params_key: str = _DEFAULT_PARAMS_KEY,
) -> tuple[CLIPTokenizer, CLIPTextModel]:
    """(tokenizer, CLIPTextModel in eval mode, no gradients) from a local directory (the hub
    repo's files, or a pipeline directory with ``tokenizer/`` + ``text_encoder/``) or a hub id
    (local cache only when offline)."""
    from transformers import CLIPTextModel, CLIPTokenizer

    path = Path(source).expanduser()
    if path.is_dir():
        tok_dir, model_dir = _tokenizer_and_model_dirs(path)
        tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
        model = CLIPTextModel.from_pretrained(str(model_dir), local_files_only=True)
    elif is_hub_id(source):
        tokenizer, model = from_hub(
            source, [CLIPTokenizer.from_pretrained, CLIPTextModel.from_pretrained], "CLIP text encoder", params_key
        )
    else:
        raise FileNotFoundError(
            f"text encoder source {str(source)!r} is neither an existing directory nor a hub id of the form org/name"
        )
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    model.eval().requires_grad_(False)
    return tokenizer, model


@torch.no_grad()
def encode_text(
    tokenizer: CLIPTokenizer,
    model: CLIPTextModel,
    prompts: Sequence[str],
    max_length: int = MAX_LENGTH,
    *,
    batch_size: int | None = None,
) -> torch.Tensor:
    """``last_hidden_state`` (B, max_length, hidden) float32 on the model's device, of ``prompts``
    tokenized with truncation and padding to ``max_length`` (the official ``libs/clip.py``)."""
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not one string")
    prompts = [str(p) for p in prompts]
    device = next(model.parameters()).device
    outs = []
    step = batch_size or max(len(prompts), 1)
    for i in range(0, len(prompts), step):
        tokens = tokenizer(
            prompts[i : i + step], truncation=True, max_length=max_length, padding="max_length", return_tensors="pt"
        )
        out = model(input_ids=tokens["input_ids"].to(device)).last_hidden_state
        outs.append(out.float())
    if not outs:
        hidden = model.config.hidden_size
        return torch.zeros((0, max_length, hidden), device=device)
    return torch.cat(outs)


def empty_context(tokenizer: CLIPTokenizer, model: CLIPTextModel, max_length: int = MAX_LENGTH) -> torch.Tensor:
    """The context of the empty prompt (max_length, hidden): the unconditional branch of
    classifier-free guidance (official ``extract_empty_feature.py``)."""
    return encode_text(tokenizer, model, [""], max_length)[0]


def token_lengths(tokenizer: CLIPTokenizer, prompts: Sequence[str]) -> np.ndarray:
    """Number of tokens of each prompt without truncation, start and end tokens included; a
    prompt is truncated by :func:`encode_text` iff its length exceeds ``max_length``."""
    if not len(prompts):
        return np.zeros(0, dtype=np.int64)
    ids = tokenizer([str(p) for p in prompts], truncation=False, padding=False)["input_ids"]
    return np.array([len(x) for x in ids], dtype=np.int64)


def text_encoder_fingerprint(tokenizer: CLIPTokenizer, model: torch.nn.Module) -> str:
    """sha256 over the model's weights and the tokenizer's vocabulary (reuse of encoded chunks)."""
    import hashlib
    import json

    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)  # vocabulary, merges, normalizer
    h.update(
        backend.to_str().encode() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items())).encode()
    )
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
