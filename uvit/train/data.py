"""Streaming training batches: each rank gathers its slice of a step's global batch from
memory-mapped shards, a background thread prefetches the next steps, pinned memory feeds CUDA.

The rows of step s are `draw_step(config, s, ...)` (see uvit/train/step.py): a pure function of
(seed, step), so the data position needs no state of its own. A run resumed at step s starts
the loader at s and sees exactly the batches an uninterrupted run would. Nothing but the rows a
rank needs is ever read, so the split may be much larger than host or device memory (ImageNet
latents); the OS page cache keeps hot shards in memory.
"""

from __future__ import annotations

import queue
import threading
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

from uvit.train.step import Batch, DrawConfig, draw_step


class ShardGather:
    """Row gathers from one split's memory-mapped shards (uvit.data.shards layout).

    `field` is "images" (uint8, scaled to [-1, 1] float32) or "moments" (any float dtype, cast to
    float32); labels (int64) come along when `with_labels`.

    Text-to-image: `contexts_dir` is the encode stage's caption split of the same images
    (`contexts` (M, 77, D), `caption_offsets.npy`, `empty_context.npy`, uvit.data.encode);
    `caption_offsets` (N+1,) and `empty_context` (77, D) float32 are then loaded (checksums
    checked) and `gather_contexts` reads caption rows.
    """

    def __init__(self, split_dir: str | Path, field: str, with_labels: bool, contexts_dir: str | Path | None = None):
        from uvit.data.shards import ShardedArrays

        self.split = ShardedArrays(split_dir)
        if field not in self.split.field_names:
            raise KeyError(f"{split_dir}: no field {field!r}; fields: {self.split.field_names}")
        self.field = field
        self.with_labels = with_labels and "labels" in self.split.field_names
        self.offsets = self.split.manifest.offsets
        dtype = self.split.manifest.fields[field].np_dtype
        if field == "images" and dtype != np.uint8:
            raise ValueError(f"{split_dir}: expected uint8 images, got {dtype}")
        self.contexts = self.caption_offsets = self.empty_context = None
        if contexts_dir is not None:
            from uvit.data.encode import load_caption_index, load_empty_context

            self.contexts = ShardedArrays(contexts_dir)
            offsets = load_caption_index(contexts_dir)
            if len(offsets) != len(self.split) + 1:
                raise ValueError(
                    f"{contexts_dir}: captions of {len(offsets) - 1} images, but {split_dir} has "
                    f"{len(self.split)} rows (re-run the encode stage)"
                )
            if (np.diff(offsets) <= 0).any():
                raise ValueError(
                    f"{contexts_dir}: images without captions, rows "
                    f"{np.nonzero(np.diff(offsets) <= 0)[0][:10].tolist()}"
                )
            self.caption_offsets = torch.from_numpy(offsets.astype(np.int64))
            self.empty_context = torch.from_numpy(load_empty_context(contexts_dir)).float()

    def __len__(self) -> int:
        return len(self.split)

    def rows(self, name: str, idx: np.ndarray) -> np.ndarray:
        """Rows `idx` (global ids, any order, repeats allowed) of field `name`, (len(idx), *shape)."""
        return _rows(self.split, name, idx)

    def gather_contexts(self, caption_rows: Tensor) -> Tensor:
        """(b, 77, D) float32 contexts of caption rows (b,) (text-to-image)."""
        if self.contexts is None:
            raise ValueError("this gather has no caption split (contexts_dir)")
        return torch.from_numpy(_rows(self.contexts, "contexts", caption_rows.numpy())).float()

    def gather(self, idx: Tensor) -> tuple[Tensor, Tensor | None]:
        """(x, y) for global row ids idx (b,): x float32 as `load_training_data` returns it."""
        ids = idx.numpy()
        raw = torch.from_numpy(self.rows(self.field, ids))
        # The same elementwise ops as the former in-memory path, so values are bit-identical.
        x = raw.float().div_(127.5).sub_(1.0) if self.field == "images" else raw.float()
        y = torch.from_numpy(self.rows("labels", ids)).long() if self.with_labels else None
        return x, y


def _rows(split, name: str, idx: np.ndarray) -> np.ndarray:
    """Rows `idx` (global ids, any order, repeats allowed) of field `name` of a ShardedArrays."""
    offsets = split.manifest.offsets
    shard = np.searchsorted(offsets, idx, side="right") - 1
    spec = split.manifest.fields[name]
    out = np.empty((len(idx), *spec.shape), dtype=spec.np_dtype)
    for k in np.unique(shard):
        sel = np.nonzero(shard == k)[0]
        # Fancy indexing on a memmap reads just these rows (sorted reads would not change values).
        out[sel] = split.shard(name, int(k))[idx[sel] - offsets[k]]
    return out


class StreamingLoader:
    """Iterates `Batch`es for steps [start_step, end_step) of one rank, `prefetch` steps ahead.

    `draws` says what each step draws (the rows among `len(gather)`, their captions when `gather`
    has a caption split). With `draws.random_flip`, each row is mirrored horizontally with p = 0.5
    (the draw is part of the step's randomness, so resuming and splitting across ranks stay exact).

    A daemon thread draws each step's randomness and gathers the rank's rows (numpy releases
    the GIL while copying from the memmaps), pins them when `device` is CUDA, and queues them;
    iteration moves each batch to `device` (non-blocking from pinned memory). Errors in the
    thread are re-raised in the consumer. Use as a context manager, or call `close()`.
    """

    def __init__(
        self,
        gather: ShardGather,
        draws: DrawConfig,
        start_step: int,
        end_step: int,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
        prefetch: int = 2,
    ):
        self.gather, self.draws = gather, draws
        self.num_rows, self.caption_offsets = len(gather), getattr(gather, "caption_offsets", None)
        self.start, self.end, self.rank, self.world_size = start_step, end_step, rank, world_size
        self.device = torch.device(device)
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="uvit-prefetch", daemon=True)
        self._thread.start()

    def batch(self, step: int) -> Batch:
        """The batch of `step` on the CPU (what the thread produces; also usable directly)."""
        draws = draw_step(
            self.draws, step, self.num_rows, self.caption_offsets, rank=self.rank, world_size=self.world_size
        )
        x, y = self.gather.gather(draws.idx)
        if draws.flip is not None:  # mirror the width axis of the drawn rows
            x = torch.where(draws.flip[:, None, None, None], x.flip(-1), x)
        context = None if draws.caption_rows is None else self.gather.gather_contexts(draws.caption_rows)
        return Batch(step, x, y, draws, context)

    def _produce(self) -> None:
        pin = self.device.type == "cuda"
        try:
            for step in range(self.start, self.end):
                b = self.batch(step)
                if pin:
                    b = b.pin_memory()
                while not self._stop.is_set():
                    try:
                        self._queue.put(b, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
        except BaseException as e:  # handed to the consumer, which raises it
            self._queue.put(e)

    def __iter__(self) -> Iterator[Batch]:
        for _ in range(self.start, self.end):
            item = self._queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item.to(self.device, non_blocking=self.device.type == "cuda")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def __enter__(self) -> StreamingLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def training_field(split_dir: str | Path) -> str:
    """Which field a split trains on: "moments" (latent benchmarks) or "images" (pixels)."""
    from uvit.data.shards import Manifest

    fields = Manifest.load(split_dir).fields
    return "moments" if "moments" in fields else "images"
