#!/usr/bin/env python
"""Can the streaming loader (uvit/train/data.py) keep a GPU fed? Batches/s of one rank's share.

Writes a synthetic split shaped like the ImageNet-256 latents (VAE moments float16 (N, 8, 32, 32),
labels) into a temporary directory, then times `StreamingLoader` over `--steps` steps for one
rank of `--world` (global batch `--batch-size`): the whole per-step work of the data path, i.e.
drawing the step's randomness, gathering the rows from memory-mapped shards, float32 conversion.
The page cache is warm after the write, as it is for a split that fits in RAM; a colder cache
only adds disk reads. Compare `steps_per_s` with the training step rate it must sustain (the
issue's H100 target: 3.5 steps/s).

    python benchmarks/loader_throughput.py                       # 8 GPUs' worth, global batch 1024
    python benchmarks/loader_throughput.py --world 1 --batch-size 256 --json out.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--shard-size", type=int, default=2048)
    ap.add_argument("--shape", type=int, nargs=3, default=(8, 32, 32), help="per-row moments shape")
    ap.add_argument("--batch-size", type=int, default=1024, help="global batch")
    ap.add_argument("--world", type=int, default=8, help="workers the global batch is split across")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--prefetch", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from uvit.data.shards import write_split
    from uvit.diffusion import make_schedule
    from uvit.train.data import ShardGather, StreamingLoader
    from uvit.train.step import DrawConfig

    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        moments = rng.standard_normal((args.rows, *args.shape), dtype=np.float32).astype(np.float16)
        labels = rng.integers(0, 1000, args.rows)
        write_split(
            Path(tmp) / "train",
            {"moments": moments, "labels": labels},
            name="bench",
            split="train",
            shard_size=args.shard_size,
        )
        del moments
        gather = ShardGather(Path(tmp) / "train", "moments", with_labels=True)
        latent_shape = (args.shape[0] // 2, *args.shape[1:])
        draws = DrawConfig(0, args.batch_size, latent_shape, make_schedule("discrete"), 0.1, latent=True)
        kw = dict(rank=0, world_size=args.world, prefetch=args.prefetch)
        with StreamingLoader(gather, draws, 0, 3, **kw) as warm:
            list(warm)
        t0 = time.perf_counter()
        with StreamingLoader(gather, draws, 0, args.steps, **kw) as stream:
            for batch in stream:
                pass
        wall = time.perf_counter() - t0
    per_rank = args.batch_size // args.world
    result = {
        "rows": args.rows,
        "row_shape": list(args.shape),
        "global_batch": args.batch_size,
        "world": args.world,
        "per_rank_batch": per_rank,
        "steps": args.steps,
        "threads": args.threads,
        "steps_per_s": round(args.steps / wall, 2),
        "images_per_s_per_rank": round(args.steps * per_rank / wall, 1),
        "batch_mib": round(batch.x.numel() * 4 / 2**20 + batch.draws.noise.numel() * 8 / 2**20, 2),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
