"""Stage `classifier` (digits): a small CNN on the real train split, the FID feature extractor and
the judge of conditional accuracy -> runs/<b>/classifier/ (weights, config.json, metrics.json)."""

from __future__ import annotations

import torch

from uvit.config import BenchmarkConfig
from uvit.fileio import write_json
from uvit.paths import BenchmarkPaths


def run_classifier(cfg: BenchmarkConfig, paths: BenchmarkPaths) -> dict:
    if cfg.score.feature_extractor != "digits-classifier":
        raise ValueError(
            f"{cfg.name}.score.feature_extractor is {cfg.score.feature_extractor!r}: "
            "the classifier stage only serves the digits benchmark"
        )
    from uvit.data.shards import load_split_arrays
    from uvit.evaluate.classifier import ClassifierConfig, accuracy, save_classifier, train_classifier

    torch.set_num_threads(max(1, cfg.train.threads_per_worker))
    train_x, train_y = load_split_arrays(paths.data / "train")
    test_x, test_y = load_split_arrays(paths.data / "test")
    config = ClassifierConfig(in_chans=train_x.shape[1], image_size=train_x.shape[2], num_classes=cfg.data.num_classes)
    model = train_classifier(train_x, train_y, config, epochs=cfg.score.classifier_epochs, seed=cfg.data.seed)
    save_classifier(model, paths.classifier)
    result = {"test_accuracy": accuracy(model, test_x, test_y)}
    write_json(paths.classifier / "metrics.json", result)
    return result
