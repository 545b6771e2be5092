"""CLIP score of text-to-image samples (Hessel et al. 2021, "CLIPScore", with w = 100).

    CLIP score = mean_i 100 * max(cos(E_image(x_i), E_text(c_i)), 0)

the definition torchmetrics' ``CLIPScore`` uses: each sample is compared with its own caption,
the cosine is taken between CLIP's projected image and text embeddings, negative cosines count
as 0, and the mean is scaled by 100. Images go through the model's own ``CLIPProcessor``
(resize + centre crop + normalisation), captions through its tokenizer, truncated to the text
model's context length (77 tokens). The U-ViT repository has no CLIP score; the paper reports
none, so this is a figure of ours (default model: CLIP ViT-L/14, as torchmetrics).

The model is loaded through transformers from a local directory or a hub id; offline, a hub id
must be in the local Hugging Face cache, and otherwise
:class:`~uvit.encoders.WeightsNotAvailableError` says which files to fetch, where to put them
and which ``params.yaml`` key to set. transformers is imported inside the functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from transformers import CLIPModel, CLIPProcessor

__all__ = ["DEFAULT_CLIP_MODEL", "REQUIRED_FILES", "clip_score", "clip_scores", "load_clip"]

DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"
# What a local CLIP directory must hold (what `huggingface-cli download` of the hub repo gives).
REQUIRED_FILES = (
    "config.json",
    "model.safetensors (or pytorch_model.bin)",
    "preprocessor_config.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
)


def load_clip(
    source: str | Path = DEFAULT_CLIP_MODEL,
    *,
    device: str | torch.device = "cpu",
    params_key: str = "mscoco256.score.clip_model",
) -> tuple[CLIPModel, CLIPProcessor]:
    """(CLIPModel in eval mode without gradients, CLIPProcessor) from a local directory holding
    :data:`REQUIRED_FILES` or a hub id (local cache only when offline)."""
    from transformers import CLIPModel, CLIPProcessor

    from uvit.encoders import WeightsNotAvailableError, from_hub, is_hub_id

    path = Path(source).expanduser()
    if path.is_dir():
        try:
            model = CLIPModel.from_pretrained(str(path), local_files_only=True)
            processor = CLIPProcessor.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as e:
            raise WeightsNotAvailableError(
                f"{path} is not a complete CLIP model directory ({type(e).__name__}: {str(e).splitlines()[0]}). "
                f"It needs {', '.join(REQUIRED_FILES)}: the files of the hub repo, e.g. "
                f"`huggingface-cli download {DEFAULT_CLIP_MODEL} --local-dir {path}`; "
                f"`{params_key}` names the directory."
            ) from e
    elif is_hub_id(source):
        model, processor = from_hub(
            source,
            [CLIPModel.from_pretrained, CLIPProcessor.from_pretrained],
            "CLIP model (CLIP score)",
            params_key,
            note=f" The directory must hold {', '.join(REQUIRED_FILES)}.",
        )
    else:
        raise FileNotFoundError(
            f"CLIP model source {str(source)!r} is neither an existing directory nor a hub "
            f"id of the form org/name (set `{params_key}`)"
        )
    return model.to(device).eval().requires_grad_(False), processor


@torch.no_grad()
def clip_scores(
    images: np.ndarray, texts: Sequence[str], model: CLIPModel, processor: CLIPProcessor, batch_size: int = 64
) -> np.ndarray:
    """Per-sample scores float64 (N,): 100 * max(cos(image_i, text_i), 0).

    images: uint8 (N, 3, H, W) in 0..255; texts: N captions, text i belonging to image i.
    """
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of captions, not one string")
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 RGB images (N, 3, H, W), got {images.dtype} {images.shape}")
    if len(images) != len(texts):
        raise ValueError(f"{len(images)} images but {len(texts)} captions")
    device = next(model.parameters()).device
    max_length = model.config.text_config.max_position_embeddings
    out = []
    for s in range(0, len(images), batch_size):
        batch = list(images[s : s + batch_size].transpose(0, 2, 3, 1))  # the processor takes HWC arrays
        inputs = processor(
            text=[str(t) for t in texts[s : s + batch_size]],
            images=batch,
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=max_length,
        )
        # The projected pooled embeddings, spelled out: get_*_features changed return types across
        # transformers versions.
        img = model.visual_projection(model.vision_model(pixel_values=inputs["pixel_values"].to(device)).pooler_output)
        txt = model.text_projection(
            model.text_model(
                input_ids=inputs["input_ids"].to(device), attention_mask=inputs["attention_mask"].to(device)
            ).pooler_output
        )
        cos = torch.nn.functional.cosine_similarity(img.double(), txt.double(), dim=-1)
        out.append((100 * cos.clamp(min=0)).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def clip_score(
    images: np.ndarray, texts: Sequence[str], model: CLIPModel, processor: CLIPProcessor, batch_size: int = 64
) -> float:
    """The CLIP score of uint8 (N, 3, H, W) images against their N captions (module docstring)."""
    return float(clip_scores(images, texts, model, processor, batch_size).mean())
