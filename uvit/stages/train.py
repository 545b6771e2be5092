"""Stage `train`: Ray Train (TorchTrainer) training; final weights and metrics to runs/<benchmark>/train/."""

from __future__ import annotations

from uvit.config import BenchmarkConfig
from uvit.paths import BenchmarkPaths


def run_train(cfg: BenchmarkConfig, paths: BenchmarkPaths, resume: bool = False) -> dict:
    from uvit.train.trainer import run_training

    if not (paths.data / "train" / "manifest.json").is_file():
        raise FileNotFoundError(f"{paths.data / 'train'} has no manifest: run `uvit data {cfg.name}` first")
    return run_training(cfg, paths, resume=resume)
