"""Resumable sharded work: rows [0, total) in pieces of `piece_size` rows, each piece one set of output files
that can be checked on disk.

    plan -> skip the pieces already verified on disk -> run the rest (in this process, or one Ray task each)
         -> every piece's result, in piece order, for the caller to assemble

Used by the encode stage (:mod:`uvit.data.encode`: chunks of VAE moments or CLIP contexts) and by sharded
sampling (:mod:`uvit.evaluate.sample_shards`). The caller says how to verify a finished piece, how to compute one
here and as a Ray task, and what to record as each piece finishes; the runner owns the loop, the Ray tasks and the
progress bar.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Piece",
    "Progress",
    "RemoteTask",
    "ShardedWork",
    "WorkResult",
    "Workers",
    "for_each_completed",
    "init_ray_for_tasks",
    "plan_pieces",
    "run_sharded",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Piece:
    """Rows [start, start + count) of the work: the index-th piece (one output shard)."""

    index: int
    start: int
    count: int


def plan_pieces(total: int, size: int) -> list[Piece]:
    """Piece k holds rows [k*size, min((k+1)*size, total)); size >= 1."""
    return [Piece(k, s, min(size, total - s)) for k, s in enumerate(range(0, total, size))]


@dataclass(frozen=True)
class Workers:
    """How to parallelise: 1 runs the pieces one after another in this process; more run one Ray task per piece
    (num_cpus=1 and one torch thread each, or num_gpus=1 with use_gpu) on RAY_ADDRESS's cluster or a local Ray
    sized for num_workers tasks."""

    num_workers: int = 1
    use_gpu: bool = False

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {self.num_workers}")


@dataclass(frozen=True)
class RemoteTask:
    """A piece's work as a Ray task: `fn(*shared(), piece, device)` -> what it ships back (see
    `ShardedWork.receive`), in a worker on any machine of the cluster, whose
    device is "cuda" or "cpu". `shared` is called once, only when Ray runs (it may pack a model's state dict),
    and each of its values is put in the object store once, not once per task."""

    fn: Callable[..., Any]
    shared: Callable[[], tuple]


@dataclass(frozen=True)
class Progress:
    """The tqdm bar over rows (disabled unless `show`)."""

    desc: str = ""
    unit: str = "row"
    show: bool = True


def _nothing(*args: Any) -> None:
    return None


@dataclass(frozen=True)
class ShardedWork:
    """One resumable job.

    verified(piece): the result of a piece whose files are already on disk and check out, else None.
    local(): a function piece -> result computing a piece in this process; built once and only when there is
        work (it may load a model).
    remote: the same work as a Ray task.
    prepare(reused, todo): called once after the check, before any piece runs (prune stale files, ...).
    finished(piece, result): the driver's bookkeeping after each computed piece, in completion order.
    receive(piece, shipped): on the driver, a Ray task's result -> the piece's result. A task may run on another
        machine, whose disk the driver cannot see: tasks ship their files back, and `receive` writes them here.
    """

    total: int
    piece_size: int
    verified: Callable[[Piece], Any]
    local: Callable[[], Callable[[Piece], Any]]
    remote: RemoteTask
    prepare: Callable[[list[Piece], list[Piece]], None] = _nothing
    finished: Callable[[Piece, Any], None] = _nothing
    progress: Progress = field(default_factory=Progress)
    receive: Callable[[Piece, Any], Any] = lambda piece, shipped: shipped

    def __post_init__(self) -> None:
        if self.piece_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {self.piece_size}")


@dataclass(frozen=True)
class WorkResult:
    """What a run did. results: every piece's result by index, in index order."""

    pieces: list[Piece]
    results: dict[int, Any]
    computed: list[int]
    reused: list[int]
    seconds: float
    rows_computed: int


def run_sharded(work: ShardedWork, workers: Workers) -> WorkResult:
    """Plan the pieces, keep the verified ones, compute the others locally or as Ray tasks."""
    from tqdm import tqdm

    pieces = plan_pieces(work.total, work.piece_size)
    results: dict[int, Any] = {}
    for piece in pieces:
        result = work.verified(piece)
        if result is not None:
            results[piece.index] = result
    reused = [piece for piece in pieces if piece.index in results]
    todo = [piece for piece in pieces if piece.index not in results]
    if reused:
        log.info("%s: %d of %d pieces already done, %d to do", work.progress.desc, len(reused), len(pieces), len(todo))
    work.prepare(reused, todo)

    t0 = time.perf_counter()
    rows = 0
    shown = work.progress
    initial = sum(piece.count for piece in reused)
    bar = tqdm(total=work.total, initial=initial, desc=shown.desc, unit=shown.unit, disable=not shown.show, ascii=True)
    bar.set_postfix(reused=f"{len(reused)}/{len(pieces)}", refresh=False)

    def done(piece: Piece, result: Any) -> None:
        nonlocal rows
        results[piece.index] = result
        work.finished(piece, result)
        rows += piece.count
        bar.update(piece.count)
        bar.set_postfix({f"{shown.unit}_per_s": f"{rows / max(time.perf_counter() - t0, 1e-9):.1f}"}, refresh=False)

    try:
        if todo and workers.num_workers == 1:
            compute = work.local()
            for piece in todo:
                done(piece, compute(piece))
        elif todo:
            _run_on_ray(work.remote, todo, workers, lambda piece, shipped: done(piece, work.receive(piece, shipped)))
    finally:
        bar.close()
    return WorkResult(
        pieces=pieces,
        results=dict(sorted(results.items())),
        computed=[piece.index for piece in todo],
        reused=[piece.index for piece in reused],
        seconds=time.perf_counter() - t0,
        rows_computed=rows,
    )


def _run_on_ray(remote: RemoteTask, todo: list[Piece], workers: Workers, done: Callable[[Piece, Any], None]) -> None:
    import ray

    init_ray_for_tasks(workers.num_workers, workers.use_gpu)
    shared = [ray.put(value) for value in remote.shared()]
    task = ray.remote(_remote_piece).options(num_cpus=1, num_gpus=1 if workers.use_gpu else 0, max_retries=1)
    device = "cuda" if workers.use_gpu else "cpu"
    for_each_completed({task.remote(remote.fn, piece, device, *shared): piece for piece in todo}, done)


def _remote_piece(fn: Callable[..., Any], piece: Piece, device: str, *shared: Any) -> Any:
    """A Ray task: one torch thread on a CPU worker (the tasks share the machine), then the piece's work."""
    if device == "cpu":
        import torch

        torch.set_num_threads(1)
    return fn(*shared, piece, device)


def init_ray_for_tasks(num_workers: int, use_gpu: bool) -> None:
    """Join RAY_ADDRESS's cluster, or start a local Ray sized for `num_workers` tasks.

    No runtime_env: workers inherit this environment, and a runtime_env would make Ray start a
    second set of workers instead of using the ones it prestarts. Tasks set their torch threads.
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        ray.init(num_cpus=None if use_gpu else num_workers, num_gpus=None if use_gpu else 0, include_dashboard=False)


def for_each_completed(pending: dict[Any, Any], on_done: Callable[[Any, Any], None]) -> None:
    """Call on_done(key, result) as each Ray task in {ref: key} finishes (in completion order);
    if anything fails, cancel the tasks still running and re-raise."""
    import ray

    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            on_done(pending.pop(ready[0]), ray.get(ready[0]))
    except BaseException:
        for ref in pending:
            ray.cancel(ref)
        raise
