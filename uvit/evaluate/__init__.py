"""uvit.evaluate: sampling at scale and scoring generated samples (FID, KID, IS through torch-fidelity;
a digit classifier; the CLIP score in uvit.evaluate.clip_score). A benchmark's sampling settings are
in uvit.evaluate.draw, its scores (and reference statistics) in uvit.evaluate.score."""

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
    extract_features,
    fid,
    fid_from_statistics,
    fid_statistics,
    inception_score_from_logits,
    inception_weights_path,
    kid,
    kid_from_features,
    load_fid_statistics,
    precision_recall_from_features,
    save_fid_statistics,
)

__all__ = [
    "ClassifierConfig",
    "DigitClassifier",
    "accuracy",
    "conditional_accuracy",
    "extract_features",
    "fid",
    "fid_from_statistics",
    "fid_statistics",
    "inception_score_from_logits",
    "inception_weights_path",
    "kid",
    "kid_from_features",
    "load_classifier",
    "load_fid_statistics",
    "precision_recall_from_features",
    "save_classifier",
    "save_fid_statistics",
    "train_classifier",
]
