"""FID (and KID, IS) through torch-fidelity, in one of two feature spaces.

- ``extractor="inception"``: torch-fidelity's ``inception-v3-compat`` (the TF-FID Inception, 2048-d
  pool3 features, as in U-ViT's evaluation), loaded from a LOCAL weights file. Nothing is ever
  downloaded: a missing file is a :class:`FileNotFoundError` that says what to fetch and where
  to put it.
- ``extractor="digits-classifier"``: the penultimate features of the small
  :class:`~uvit.evaluate.classifier.DigitClassifier` (Inception means nothing on 8x8 digits). It
  is plugged into torch-fidelity as a ``FeatureExtractorBase`` subclass registered under
  :data:`DIGITS_EXTRACTOR`; the classifier directory travels through torch-fidelity's own
  ``feature_extractor_weights_path`` argument.

KID (Kernel Inception Distance: the unbiased polynomial-kernel MMD², averaged over random subsets,
unbiased also on small sets) and IS (Inception Score, from the Inception logits) are
torch-fidelity's too (``kid_features_to_metric`` on the features ``calculate_metrics`` would extract,
``isc_features_to_metric``).

The Fréchet distance itself is always torch-fidelity's (``calculate_metrics`` or, for cached
reference statistics, ``metric_fid.fid_statistics_to_metric``); this module only prepares inputs.
Images are uint8 (N, C, H, W) in 0..255 throughout. torch_fidelity is imported inside functions
because it pulls in torchvision.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from uvit.fileio import write_npz

__all__ = [
    "fid_from_features",
    "EXTRACTORS",
    "DIGITS_EXTRACTOR",
    "INCEPTION_EXTRACTOR",
    "INCEPTION_WEIGHTS_FILE",
    "INCEPTION_WEIGHTS_URL",
    "FeatureSpace",
    "fid",
    "fid_statistics",
    "fid_from_statistics",
    "save_fid_statistics",
    "load_fid_statistics",
    "inception_weights_path",
    "extract_features",
    "kid",
    "kid_from_features",
    "inception_score_from_logits",
    "precision_recall_from_features",
]

EXTRACTORS = ("inception", "digits-classifier")
INCEPTION_EXTRACTOR = "inception-v3-compat"  # torch-fidelity registry name
DIGITS_EXTRACTOR = "uvit-digits-classifier"  # our registry name in torch-fidelity
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
# Where torch-fidelity 0.4.0 itself would download the file from
# (torch_fidelity.feature_extractor_inceptionv3.URL_INCEPTION_V3).
INCEPTION_WEIGHTS_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_WEIGHTS_FILE


class UInt8Images(Dataset):
    """torch-fidelity input: a Dataset whose items are uint8 tensors (C, H, W).

    ``rgb=True`` repeats grey (C=1) images to 3 channels, which the Inception extractor requires.
    """

    def __init__(self, images: np.ndarray | Tensor, rgb: bool = False) -> None:
        t = torch.as_tensor(images)
        if t.dtype != torch.uint8 or t.dim() != 4:
            raise ValueError(f"expected uint8 images (N, C, H, W), got {t.dtype} {tuple(t.shape)}")
        if len(t) < 2:
            raise ValueError(f"FID needs at least 2 images per set (a covariance), got {len(t)}")
        if rgb and t.shape[1] not in (1, 3):
            raise ValueError(f"Inception needs 1 or 3 channels, got {t.shape[1]}")
        self.images = t
        self.rgb = rgb

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Tensor:
        x = self.images[i]
        return x.expand(3, -1, -1).contiguous() if self.rgb and x.shape[0] == 1 else x


# --------------------------------------------------------------------------- extractors


@functools.cache
def _register_digits_extractor() -> str:
    """Define the torch-fidelity extractor class for DigitClassifier and register it (once per
    process: torch-fidelity refuses to register a name twice). Returns the registry name."""
    from torch_fidelity import FeatureExtractorBase, register_feature_extractor
    from torch_fidelity.helpers import vassert
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    from uvit.evaluate.classifier import DigitClassifier, load_classifier

    class FeatureExtractorDigitClassifier(FeatureExtractorBase):
        """DigitClassifier as a torch-fidelity feature extractor.

        torch-fidelity builds it as ``cls(name, features_list, **calculate_metrics_kwargs)``, so the
        classifier directory (written by ``save_classifier``) arrives as
        ``feature_extractor_weights_path``. forward: uint8 (B, C, H, W) -> tuple of float32
        features in the order of ``features_list``: "features" (B, feature_dim), "logits"
        (B, num_classes).
        """

        def __init__(
            self, name: str, features_list: list[str], feature_extractor_weights_path: str | None = None, **kwargs: Any
        ) -> None:
            super().__init__(name, features_list)
            vassert(
                feature_extractor_weights_path is not None,
                f"{name} needs feature_extractor_weights_path: a directory written by save_classifier",
            )
            self.classifier = load_classifier(feature_extractor_weights_path)
            self.requires_grad_(False)
            self.eval()

        @staticmethod
        def get_provided_features_list() -> tuple[str, ...]:
            return ("features", "logits")

        @staticmethod
        def get_default_feature_layer_for_metric(metric: str) -> str:
            return "logits" if metric == "isc" else "features"

        @staticmethod
        def can_be_compiled() -> bool:
            return False  # tiny network; compiling would cost more than it saves

        @staticmethod
        def get_dummy_input_for_compile() -> Tensor:
            return torch.zeros(1, 1, 8, 8, dtype=torch.uint8)

        def forward(self, x: Tensor) -> tuple[Tensor, ...]:
            vassert(torch.is_tensor(x) and x.dtype == torch.uint8, "Expecting uint8 images")
            f = self.classifier.features(DigitClassifier.preprocess(x))
            out = {"features": f, "logits": self.classifier.classify(f)}
            return tuple(out[k].to(torch.float32) for k in self.features_list)

    if DIGITS_EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(DIGITS_EXTRACTOR, FeatureExtractorDigitClassifier)
    return DIGITS_EXTRACTOR


def inception_weights_path(weights_path: str | Path | None = None) -> Path:
    """The local Inception weights file to use; raises FileNotFoundError with instructions.

    ``weights_path=None`` means torch-fidelity's own download location,
    ``$TORCH_HOME/hub/checkpoints/weights-inception-2015-12-05-6726825d.pth`` (via
    ``torch.hub.get_dir()``), which we only read, never download to.
    """
    default = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE
    path = Path(weights_path) if weights_path is not None else default
    if path.is_file():
        return path
    where = f"the file {path} does not exist" if weights_path is not None else f"it is not at {path}"
    raise FileNotFoundError(
        f"FID with Inception needs torch-fidelity's InceptionV3 weights {INCEPTION_WEIGHTS_FILE}, "
        f"but {where}. Nothing is downloaded automatically: fetch {INCEPTION_WEIGHTS_URL} on a "
        f"connected machine and either place it at {default} (torch-fidelity's cache under "
        f"$TORCH_HOME/hub/checkpoints) or pass its location as weights_path=..."
    )


def _resolve(
    extractor: str, weights_path: str | Path | None, classifier_path: str | Path | None
) -> tuple[str, str, bool]:
    """-> (torch-fidelity extractor name, its feature_extractor_weights_path, needs RGB input)."""
    if extractor == "inception":
        return INCEPTION_EXTRACTOR, str(inception_weights_path(weights_path)), True
    if extractor == "digits-classifier":
        if classifier_path is None:
            raise ValueError(
                "extractor='digits-classifier' needs classifier_path "
                "(the directory written by uvit.evaluate.classifier.save_classifier)"
            )
        if not Path(classifier_path).is_dir():
            raise FileNotFoundError(f"classifier directory {classifier_path} does not exist")
        return _register_digits_extractor(), str(classifier_path), False
    raise ValueError(f"unknown extractor {extractor!r}; choose one of {EXTRACTORS}")


@contextlib.contextmanager
def _on_device(device: str) -> Iterator[bool]:
    """torch-fidelity only takes ``cuda: bool`` and calls ``.cuda()``: select the CUDA device
    for the duration so that e.g. "cuda:1" is honoured. Yields the ``cuda`` flag."""
    dev = torch.device(device)
    if dev.type == "cuda":
        with torch.cuda.device(dev):
            yield True
    elif dev.type == "cpu":
        yield False
    else:
        raise ValueError(f"torch-fidelity runs on cpu or cuda, not {device!r}")


# Shared calculate_metrics settings: 2-core machines (no loader workers), no feature cache written
# to $TORCH_HOME (in-memory Datasets have no cache name anyway), quiet.
_FIDELITY_KWARGS = dict(save_cpu_ram=True, cache=False, verbose=False)


# --------------------------------------------------------------------------- public API


@dataclass(frozen=True)
class FeatureSpace:
    """The feature space images are compared in, and where its extractor runs.

    extractor: "inception" (weights from ``weights_path`` or torch-fidelity's cache location;
    grey images are repeated to RGB) or "digits-classifier" (``classifier_path``: the directory
    written by ``save_classifier``); batch_size images per pass on device ("cpu", "cuda[:i]").
    """

    extractor: str = "inception"
    weights_path: str | Path | None = None
    classifier_path: str | Path | None = None
    batch_size: int = 256
    device: str = "cpu"

    def resolve(self) -> tuple[str, str, bool]:
        """(torch-fidelity extractor name, its feature_extractor_weights_path, needs RGB input)."""
        return _resolve(self.extractor, self.weights_path, self.classifier_path)

    def layer_for(self, metric: str) -> str:
        """The extractor's feature layer for a torch-fidelity metric ("fid", "kid", "isc")."""
        from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

        return FEATURE_EXTRACTORS_REGISTRY[self.resolve()[0]].get_default_feature_layer_for_metric(metric)


def fid(images_a: np.ndarray | Tensor, images_b: np.ndarray | Tensor, space: FeatureSpace = FeatureSpace()) -> float:
    """FID between two sets of uint8 images (N, C, H, W) in 0..255, by torch-fidelity, in
    `space`. Set sizes may differ."""
    import torch_fidelity

    name, weights, rgb = space.resolve()
    with _on_device(space.device) as cuda:
        metrics = torch_fidelity.calculate_metrics(
            input1=UInt8Images(images_a, rgb=rgb),
            input2=UInt8Images(images_b, rgb=rgb),
            fid=True,
            feature_extractor=name,
            feature_extractor_weights_path=weights,
            batch_size=space.batch_size,
            cuda=cuda,
            **_FIDELITY_KWARGS,
        )
    return float(metrics[torch_fidelity.KEY_METRIC_FID])


def _features(images: np.ndarray | Tensor, layers: tuple[str, ...], space: FeatureSpace, progress: bool | None):
    """torch-fidelity's {layer: float32 (N, D)} of uint8 images, as its calculate_metrics extracts them."""
    from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

    name, weights, rgb = space.resolve()
    with _on_device(space.device) as cuda:
        module = create_feature_extractor(
            name, list(layers), cuda=cuda, feature_extractor_weights_path=weights, verbose=False
        )
        return get_featuresdict_from_dataset(
            UInt8Images(images, rgb=rgb), module, space.batch_size, cuda, save_cpu_ram=True, verbose=_show(progress)
        )


def fid_statistics(
    images: np.ndarray | Tensor, space: FeatureSpace = FeatureSpace(), *, progress: bool | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """FID statistics of uint8 images (N, C, H, W) in `space`: mu float64 (D,), sigma float64 (D, D).
    progress: torch-fidelity's bar over the images on stderr (None: only on a terminal).

    Extracted with torch-fidelity's own ``get_featuresdict_from_dataset`` and
    ``fid_featuresdict_to_statistics``, so
    ``fid_from_statistics(*fid_statistics(a), *fid_statistics(b))`` equals ``fid(a, b)``.
    """
    from torch_fidelity.metric_fid import fid_featuresdict_to_statistics

    layer = space.layer_for("fid")
    stats = fid_featuresdict_to_statistics(_features(images, (layer,), space, progress), layer)
    return stats["mu"].astype(np.float64), stats["sigma"].astype(np.float64)


def fid_from_statistics(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """FID from two sets of statistics (mu (D,), sigma (D, D)), e.g. against a cached reference
    ``.npz``; torch-fidelity's ``fid_statistics_to_metric`` does the maths."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    # torch-fidelity asserts equal dtypes; references saved as float32 must not trip it.
    s1 = {"mu": np.asarray(mu1, np.float64), "sigma": np.asarray(sigma1, np.float64)}
    s2 = {"mu": np.asarray(mu2, np.float64), "sigma": np.asarray(sigma2, np.float64)}
    if s1["mu"].shape != s2["mu"].shape or s1["sigma"].shape != s2["sigma"].shape:
        raise ValueError(f"statistics of different dimensions: {s1['mu'].shape} vs {s2['mu'].shape}")
    return float(fid_statistics_to_metric(s1, s2, verbose=False)[KEY_METRIC_FID])


def save_fid_statistics(path: str | Path, mu: np.ndarray, sigma: np.ndarray) -> Path:
    """Write reference statistics as ``.npz`` with keys ``mu`` and ``sigma`` (U-ViT's format)."""
    return write_npz(path, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64))


def load_fid_statistics(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read ``mu`` (D,) and ``sigma`` (D, D) from an ``.npz`` such as U-ViT's assets/fid_stats files."""
    with np.load(path) as data:
        return np.asarray(data["mu"], np.float64), np.asarray(data["sigma"], np.float64)


# --------------------------------------------------------------------------- KID and IS


def _show(progress: bool | None) -> bool:
    """Whether to show a progress bar: as asked, else only when stderr is a terminal (in logs,
    such as DVC's captured output, a bar is noise)."""
    return sys.stderr.isatty() if progress is None else progress


def extract_features(
    images: np.ndarray | Tensor,
    layers: tuple[str, ...],
    space: FeatureSpace = FeatureSpace(),
    *,
    progress: bool | None = None,
) -> dict[str, Tensor]:
    """{layer: float32 (N, D) on CPU} of uint8 images (N, C, H, W) in one pass of the extractor;
    progress: torch-fidelity's bar over the images on stderr (None: only on a terminal).

    layers: torch-fidelity layer names, e.g. ("2048", "logits_unbiased") for Inception (FID/KID
    features and IS logits) or ("features", "logits") for the digits classifier.
    """
    return {k: v.cpu() for k, v in _features(images, layers, space, progress).items()}


def fid_from_features(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """FID of two (N, D) float32 feature sets by torch-fidelity's own statistics and metric steps
    (float32 means, as ``calculate_metrics(fid=True)`` computes them)."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric

    stats_a, stats_b = fid_features_to_statistics(features_a), fid_features_to_statistics(features_b)
    return float(fid_statistics_to_metric(stats_a, stats_b, verbose=False)[KEY_METRIC_FID])


def kid_from_features(
    features_a: np.ndarray | Tensor,
    features_b: np.ndarray | Tensor,
    *,
    subset_size: int = 1000,
    subsets: int = 100,
    seed: int = 2020,
) -> tuple[float, float]:
    """(mean, std) of KID over `subsets` random subsets of min(subset_size, N_a, N_b) rows each:
    torch-fidelity's ``kid_features_to_metric`` (kernel (x.y / D + 1)^3) on float (N, D) features."""
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    a, b = torch.as_tensor(features_a).float(), torch.as_tensor(features_b).float()
    m = kid_features_to_metric(
        a,
        b,
        kid_subsets=subsets,
        kid_subset_size=min(subset_size, len(a), len(b)),
        kid_kernel="poly",
        kid_kernel_poly_degree=3,
        kid_kernel_poly_gamma=None,
        kid_kernel_poly_coef0=1,
        rng_seed=seed,
        verbose=False,
    )
    return float(m[KEY_METRIC_KID_MEAN]), float(m[KEY_METRIC_KID_STD])


def kid(
    images_a: np.ndarray | Tensor,
    images_b: np.ndarray | Tensor,
    space: FeatureSpace = FeatureSpace(),
    *,
    subset_size: int = 1000,
    subsets: int = 100,
) -> tuple[float, float]:
    """(mean, std) KID between two sets of uint8 images (N, C, H, W) in `space`: each set's
    features as torch-fidelity's ``calculate_metrics(kid=True)`` extracts them, then
    :func:`kid_from_features` (its ``kid_features_to_metric``, seed 2020 as there); subsets hold
    min(subset_size, N_a, N_b) images, so small sets (the 360 digits samples) work."""
    layer = space.layer_for("kid")
    features = [extract_features(x, (layer,), space)[layer] for x in (images_a, images_b)]
    return kid_from_features(*features, subset_size=subset_size, subsets=subsets)


def inception_score_from_logits(logits: np.ndarray | Tensor, splits: int = 10, seed: int = 2020) -> tuple[float, float]:
    """(mean, std) Inception Score of classifier logits (N, classes) over `splits` splits
    (torch-fidelity's ``isc_features_to_metric``; Inception's "logits_unbiased" layer)."""
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric

    logits = torch.as_tensor(logits)
    # Fewer samples than splits would leave empty splits (NaN): small test runs use one per sample.
    m = isc_features_to_metric(logits, splits=min(splits, len(logits)), shuffle=True, rng_seed=seed)
    return float(m[KEY_METRIC_ISC_MEAN]), float(m[KEY_METRIC_ISC_STD])


def precision_recall_from_features(
    generated: np.ndarray | Tensor, real: np.ndarray | Tensor, neighborhood: int = 3
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of float features (N, D), (M, D):
    precision = share of generated samples inside some real sample's k-NN ball (k = neighborhood),
    recall = share of real samples inside some generated sample's ball. torch-fidelity's
    ``prc_features_to_metric`` (memory-saving path). Both depend on the set sizes: compare runs
    at equal counts."""
    from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric

    g, r = torch.as_tensor(generated).float(), torch.as_tensor(real).float()
    m = prc_features_to_metric(
        g, r, prc_neighborhood=neighborhood, prc_batch_size=10_000, save_cpu_ram=True, verbose=False
    )
    return float(m[KEY_METRIC_PRECISION]), float(m[KEY_METRIC_RECALL])
