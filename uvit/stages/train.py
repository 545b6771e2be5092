"""Stage `train`: Ray Train (TorchTrainer) training; final weights and metrics to runs/<benchmark>/train/."""

from __future__ import annotations

from uvit.config import BenchmarkConfig
from uvit.paths import BenchmarkPaths


def run_train(cfg: BenchmarkConfig, paths: BenchmarkPaths, resume: bool = True) -> dict:
    from uvit.train.trainer import run_training, training_data_dir

    data = training_data_dir(cfg, paths) / "train"
    if not (data / "manifest.json").is_file():
        stage = "encode" if cfg.encode is not None else "data"
        raise FileNotFoundError(f"{data} has no manifest: run `uvit {stage} {cfg.name}` first")
    return run_training(cfg, paths, resume=resume)
