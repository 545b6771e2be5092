"""uvit.evaluate: scoring generated samples (FID through torch-fidelity, a digit classifier)."""

from uvit.evaluate.classifier import (
    ClassifierConfig,
    DigitClassifier,
    accuracy,
    conditional_accuracy,
    load_classifier,
    save_classifier,
    train_classifier,
)
from uvit.evaluate.fid import (
    fid,
    fid_from_statistics,
    fid_statistics,
    inception_weights_path,
    load_fid_statistics,
    save_fid_statistics,
)

__all__ = [
    "ClassifierConfig",
    "DigitClassifier",
    "accuracy",
    "conditional_accuracy",
    "fid",
    "fid_from_statistics",
    "fid_statistics",
    "inception_weights_path",
    "load_classifier",
    "load_fid_statistics",
    "save_classifier",
    "save_fid_statistics",
    "train_classifier",
]
