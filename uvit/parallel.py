"""Fanning work out over Ray tasks (encoding chunks, sampling shards): the shared plumbing."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any


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
