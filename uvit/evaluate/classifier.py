"""A small digit classifier: the feature space for FID on the `digits` benchmark, and a judge of
whether class-conditional samples show the class they were asked for.

Inception features mean nothing for 8x8 digits (and its weights cannot be fetched offline), so
for `digits` FID is computed on the penultimate features of this CNN, trained on the real train
split. The same network scores conditional generation with :func:`conditional_accuracy`.

Images everywhere in this module are uint8 (N, C, H, W) in 0..255 unless a docstring says
otherwise; the network itself sees float (B, C, H, W) in [-1, 1].
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from uvit.fileio import commit_file, temp_path, write_json

__all__ = [
    "ClassifierConfig",
    "DigitClassifier",
    "train_classifier",
    "predict",
    "accuracy",
    "conditional_accuracy",
    "save_classifier",
    "load_classifier",
]

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


@dataclass
class ClassifierConfig:
    in_chans: int = 1
    image_size: int = 8
    num_classes: int = 10
    width: int = 32  # channels of the first conv; the second has 2 * width
    feature_dim: int = 64  # size of the penultimate features used for FID


class DigitClassifier(nn.Module):
    """conv3x3-ReLU-conv3x3-ReLU-maxpool2 -> flatten -> linear(feature_dim) [features] -> ReLU -> linear(num_classes)."""

    def __init__(self, config: ClassifierConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or ClassifierConfig()
        if config.image_size % 2:
            raise ValueError(f"image_size must be even (one 2x2 pool), got {config.image_size}")
        w = config.width
        self.conv1 = nn.Conv2d(config.in_chans, w, 3, padding=1)
        self.conv2 = nn.Conv2d(w, 2 * w, 3, padding=1)
        flat = 2 * w * (config.image_size // 2) ** 2
        self.fc = nn.Linear(flat, config.feature_dim)
        self.head = nn.Linear(config.feature_dim, config.num_classes)

    def features(self, x: Tensor) -> Tensor:
        """x: float (B, C, H, W) in [-1, 1] -> penultimate features (B, feature_dim), pre-ReLU.

        Taken before the ReLU on purpose: after it roughly a third of the units are dead (always
        0), which would make the feature covariance singular and FID's matrix square root
        ill-conditioned. The pre-activation keeps all feature_dim directions informative.
        """
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))

    def classify(self, features: Tensor) -> Tensor:
        """Penultimate features (B, feature_dim) from :meth:`features` -> logits (B, num_classes)."""
        return self.head(F.relu(features))

    def forward(self, x: Tensor) -> Tensor:
        """x: float (B, C, H, W) in [-1, 1] -> logits (B, num_classes)."""
        return self.classify(self.features(x))

    @staticmethod
    def preprocess(images_uint8: Tensor) -> Tensor:
        """uint8 (B, C, H, W) in 0..255 -> float32 (B, C, H, W) in [-1, 1] (the diffusion models' range)."""
        return images_uint8.to(torch.float32) / 127.5 - 1.0


def _as_uint8_tensor(images: np.ndarray | Tensor) -> Tensor:
    """Check and convert images to a uint8 (N, C, H, W) CPU tensor (no copy when possible)."""
    t = torch.as_tensor(images)
    if t.dtype != torch.uint8 or t.dim() != 4:
        raise ValueError(f"expected uint8 images (N, C, H, W), got {t.dtype} {tuple(t.shape)}")
    return t


def _random_shift(x: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Translate each image of x (B, C, H, W) by an integer offset in [-max_shift, max_shift]^2,
    filling with the background value -1 (black) rather than wrapping around."""
    b, _, h, w = x.shape
    p = max_shift
    padded = F.pad(x, (p, p, p, p), value=-1.0)
    dy, dx = torch.randint(0, 2 * p + 1, (2, b), generator=generator)
    # Gather each crop with one indexing op instead of a Python loop over the batch.
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]  # (B, 1, H, 1)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]  # (B, 1, 1, W)
    bidx = torch.arange(b)[:, None, None, None]
    cidx = torch.arange(x.shape[1])[None, :, None, None]
    return padded[bidx, cidx, rows, cols]


def train_classifier(
    images: np.ndarray | Tensor,
    labels: np.ndarray | Tensor,
    config: ClassifierConfig | None = None,
    epochs: int = 30,
    batch_size: int = 128,
    lr: float = 3e-3,
    seed: int = 0,
    augment: bool = True,
) -> DigitClassifier:
    """Train a :class:`DigitClassifier` on uint8 images (N, C, H, W) with int labels (N,).

    AdamW with a cosine learning-rate decay; with ``augment`` each batch is randomly shifted by up
    to one pixel (8x8 digits are not centred exactly, so this is the augmentation that helps).
    Deterministic for a given seed on CPU; a few seconds for the ~1.4k digits train split.
    Returns the model in eval mode on CPU.
    """
    x_all = DigitClassifier.preprocess(_as_uint8_tensor(images))
    y_all = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    if len(y_all) != len(x_all):
        raise ValueError(f"{len(x_all)} images but {len(y_all)} labels")
    config = config or ClassifierConfig(in_chans=x_all.shape[1], image_size=x_all.shape[-1])
    if int(y_all.max()) >= config.num_classes or int(y_all.min()) < 0:
        raise ValueError(f"labels must be in 0..{config.num_classes - 1}")

    # Own RNG state for init, shuffling and shifts: training neither depends on nor disturbs the
    # caller's global torch RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitClassifier(config)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = (len(x_all) + batch_size - 1) // batch_size
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)

    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x_all), generator=gen)
        for i in range(0, len(perm), batch_size):
            idx = perm[i : i + batch_size]
            x, y = x_all[idx], y_all[idx]
            if augment:
                x = _random_shift(x, 1, gen)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def predict(model: DigitClassifier, images: np.ndarray | Tensor, batch_size: int = 1024) -> np.ndarray:
    """Predicted classes int64 (N,) for uint8 images (N, C, H, W)."""
    model.eval()
    device = next(model.parameters()).device
    x = _as_uint8_tensor(images)
    out = [
        model(DigitClassifier.preprocess(x[i : i + batch_size].to(device))).argmax(1).cpu()
        for i in range(0, len(x), batch_size)
    ]
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.int64)


def accuracy(model: DigitClassifier, images: np.ndarray | Tensor, labels: np.ndarray | Tensor) -> float:
    """Share of uint8 images (N, C, H, W) whose predicted class equals ``labels`` (N,)."""
    labels = np.asarray(labels)
    if len(labels) == 0:
        raise ValueError("no images to score")
    return float((predict(model, images) == labels).mean())


def conditional_accuracy(
    model: DigitClassifier, images: np.ndarray | Tensor, requested_labels: np.ndarray | Tensor
) -> float:
    """Share of generated uint8 samples (N, C, H, W) classified as the class they were asked for.

    The same computation as :func:`accuracy`, named for what it measures on class-conditional
    samples: ~accuracy of the classifier for a perfect generator, ~1/num_classes for one that
    ignores the label.
    """
    return accuracy(model, images, requested_labels)


def save_classifier(model: DigitClassifier, path: str | Path) -> Path:
    """Write ``path/model.safetensors`` (weights) and ``path/config.json`` (ClassifierConfig)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = temp_path(path / WEIGHTS_FILE)
    try:
        save_file(state, str(tmp))
        commit_file(tmp, path / WEIGHTS_FILE)
    finally:
        tmp.unlink(missing_ok=True)
    write_json(path / CONFIG_FILE, asdict(model.config))
    return path


def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> DigitClassifier:
    """Load a classifier written by :func:`save_classifier` (a directory); eval mode."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / WEIGHTS_FILE).is_file() or not (path / CONFIG_FILE).is_file():
        raise FileNotFoundError(
            f"{path} is not a saved classifier: expected {WEIGHTS_FILE} and {CONFIG_FILE} in it "
            "(written by uvit.evaluate.classifier.save_classifier)"
        )
    config = ClassifierConfig(**json.loads((path / CONFIG_FILE).read_text()))
    model = DigitClassifier(config)
    model.load_state_dict(load_file(str(path / WEIGHTS_FILE)))
    return model.to(device).eval()
