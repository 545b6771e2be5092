"""Which validation captions condition text-to-image samples, read from the encode stage's output.

The encode stage writes one row per caption (``contexts`` (M, 77, D), ``image_rows``,
``caption_index``) plus ``caption_offsets.npy`` and ``empty_context.npy``
(:mod:`uvit.data.encode`). A :class:`CaptionSet` names the caption rows that samples 0..N-1 use;
it holds paths and an index array only, so it pickles cheaply into Ray tasks, and each shard
reads just its own rows.

Selection (:func:`select_caption_rows`):

- ``"first"``: caption rows 0..N-1, i.e. every caption of the first images in turn;
- ``"one_per_image"``: the first caption of each of the first N images, so the N samples come
  from N different images. The official ``eval_t2i_discrete.py`` draws a random caption of a
  random validation image per sample (shuffled loader); this is its deterministic counterpart.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["CAPTION_SELECTIONS", "CaptionSet", "select_caption_rows"]

CAPTION_SELECTIONS = ("first", "one_per_image")


def select_caption_rows(contexts_root: str | Path, num_samples: int, mode: str = "first") -> np.ndarray:
    """int64 (N,) caption rows of the caption split at `contexts_root` for samples 0..N-1."""
    from uvit.data.encode import load_caption_index

    offsets = load_caption_index(contexts_root)  # (images + 1,)
    if mode == "first":
        available = int(offsets[-1])
        rows = np.arange(num_samples, dtype=np.int64)
    elif mode == "one_per_image":
        available = len(offsets) - 1
        rows = offsets[:num_samples].astype(np.int64)
    else:
        raise ValueError(f"unknown caption selection {mode!r}; choose one of {CAPTION_SELECTIONS}")
    if num_samples > available:
        raise ValueError(
            f"{num_samples} samples asked for but {contexts_root} has {available} "
            f"{'captions' if mode == 'first' else 'images'} (caption selection {mode!r})"
        )
    return rows


@dataclass(frozen=True, eq=False)
class CaptionSet:
    """Sample i is conditioned on caption row `rows[i]` of the caption split at `contexts_root`.

    captions_root: the image split holding the caption texts (`captions` (N, K)), to store each
    sample's text next to it; None stores the row indices only.
    """

    contexts_root: str
    rows: np.ndarray = field(repr=False)
    captions_root: str | None = None

    def fingerprint(self) -> str:
        """sha256 over the caption split's manifest and the selected rows: decides shard reuse."""
        h = hashlib.sha256((Path(self.contexts_root) / "manifest.json").read_bytes())
        h.update(np.ascontiguousarray(self.rows, dtype=np.int64).tobytes())
        return h.hexdigest()

    def contexts(self, start: int, count: int) -> Tensor:
        """float32 (count, 77, D) contexts of samples [start, start + count)."""
        from uvit.data.shards import ShardedArrays

        ds = ShardedArrays(self.contexts_root)
        rows = self.rows[start : start + count].tolist()
        return torch.from_numpy(np.stack([_row(ds, "contexts", r).astype(np.float32) for r in rows]))

    def empty_context(self) -> Tensor:
        """float32 (77, D): the CLIP context of "" (the unconditional branch of guidance)."""
        from uvit.data.encode import load_empty_context

        return torch.from_numpy(np.asarray(load_empty_context(self.contexts_root), dtype=np.float32))

    def metadata(self, start: int, count: int) -> dict[str, np.ndarray]:
        """Per-sample arrays stored with the samples: `caption_rows` int64 (count,), and the
        caption texts `captions` (fixed-width unicode, count) when `captions_root` is set."""
        rows = np.ascontiguousarray(self.rows[start : start + count], dtype=np.int64)
        out = {"caption_rows": rows}
        if self.captions_root is not None:
            from uvit.data.shards import ShardedArrays

            ctx = ShardedArrays(self.contexts_root)
            src = ShardedArrays(self.captions_root)
            texts = [
                str(_row(src, "captions", int(_row(ctx, "image_rows", r)))[int(_row(ctx, "caption_index", r))])
                for r in rows.tolist()
            ]
            out["captions"] = np.array(texts, dtype=str)
        return out


def _row(ds, name: str, r: int) -> np.ndarray:
    """Row r of one field of a ShardedArrays, through the shard offsets (reads no other field)."""
    off = ds.manifest.offsets
    k = int(np.searchsorted(off, r, side="right")) - 1
    return np.asarray(ds.shard(name, k)[r - int(off[k])])
