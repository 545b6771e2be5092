"""Stage `data`: write the benchmark's splits in the common shard format under data/<benchmark>/."""

from __future__ import annotations

import shutil

from uvit.config import BenchmarkConfig
from uvit.paths import BenchmarkPaths


def run_data(cfg: BenchmarkConfig, paths: BenchmarkPaths) -> dict:
    source = cfg.data.source
    if source == "digits":
        from uvit.data.sources.digits import prepare_digits

        if paths.data.exists():  # DVC removes outputs before a run; a manual re-run replaces them
            shutil.rmtree(paths.data)
        manifests = prepare_digits(paths.data, test_fraction=cfg.data.test_fraction, seed=cfg.data.seed)
        return {split: m.count for split, m in manifests.items()}
    raise NotImplementedError(
        f"{cfg.name}: the data stage for source {source!r} is not implemented yet (issue #4: CIFAR10, "
        "CelebA, ImageNet and MS-COCO downloaders and latent pre-encoding). Only `digits` runs end to end."
    )
