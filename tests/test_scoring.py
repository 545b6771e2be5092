"""Scoring: the digit classifier and FID through torch-fidelity (digits-classifier and Inception)."""

from __future__ import annotations

import socket
import time

import numpy as np
import pytest
import torch

pytest.importorskip("torch_fidelity")
scipy_linalg = pytest.importorskip("scipy.linalg")
pytest.importorskip("sklearn")

from uvit.evaluate.classifier import (  # noqa: E402
    ClassifierConfig,
    DigitClassifier,
    accuracy,
    conditional_accuracy,
    load_classifier,
    save_classifier,
    train_classifier,
)
from uvit.evaluate.fid import (  # noqa: E402
    INCEPTION_WEIGHTS_FILE,
    FeatureSpace,
    fid,
    fid_from_statistics,
    fid_statistics,
    inception_score_from_logits,
    kid,
    kid_from_features,
    load_fid_statistics,
    precision_recall_from_features,
    save_fid_statistics,
)

EPOCHS = 15  # enough for >= 0.98 on the test split and ~4 s on one CPU thread


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a connection (e.g. a weights download) fails the test loudly."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted during a scoring test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def digits() -> dict[str, np.ndarray]:
    """The digits benchmark split: uint8 (N, 1, 8, 8) 0..255, stratified 80/20, random_state=0."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    images = np.floor(d.images * (255.0 / 16) + 0.5).astype(np.uint8)[:, None]
    xtr, xte, ytr, yte = train_test_split(images, d.target, test_size=0.2, stratify=d.target, random_state=0)
    return {"x_train": xtr, "y_train": ytr, "x_test": xte, "y_test": yte}


@pytest.fixture(scope="module")
def classifier(digits) -> DigitClassifier:
    return train_classifier(digits["x_train"], digits["y_train"], epochs=EPOCHS, seed=0)


@pytest.fixture(scope="module")
def classifier_dir(classifier, tmp_path_factory):
    return save_classifier(classifier, tmp_path_factory.mktemp("clf") / "digits-classifier")


# ----------------------------------------------------------------------------- classifier


def test_classifier_test_accuracy(classifier, digits):
    acc = accuracy(classifier, digits["x_test"], digits["y_test"])
    print(f"digits classifier test accuracy: {acc:.4f}")
    assert acc >= 0.97


def test_classifier_shapes_and_preprocess():
    x = torch.tensor([[[[0, 255]]]], dtype=torch.uint8)
    assert torch.allclose(DigitClassifier.preprocess(x), torch.tensor([[[[-1.0, 1.0]]]]))
    m = DigitClassifier(ClassifierConfig(width=8, feature_dim=16))
    xb = torch.zeros(5, 1, 8, 8)
    assert m.features(xb).shape == (5, 16)
    assert m(xb).shape == (5, 10)


def test_training_is_deterministic(digits):
    x, y = digits["x_train"][:200], digits["y_train"][:200]
    cfg = ClassifierConfig(width=8, feature_dim=16)
    a = train_classifier(x, y, cfg, epochs=2, seed=3)
    b = train_classifier(x, y, cfg, epochs=2, seed=3)
    c = train_classifier(x, y, cfg, epochs=2, seed=4)
    for (k, va), vb, vc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(va, vb), k
    assert not torch.equal(a.fc.weight, c.fc.weight)


def test_save_load_round_trip(classifier, classifier_dir, digits):
    loaded = load_classifier(classifier_dir)
    assert loaded.config == classifier.config
    x = DigitClassifier.preprocess(torch.as_tensor(digits["x_test"][:64]))
    with torch.no_grad():
        assert torch.equal(loaded(x), classifier(x))
    with pytest.raises(FileNotFoundError):
        load_classifier(classifier_dir.parent / "missing")


def test_conditional_accuracy(classifier, digits):
    x, y = digits["x_test"], digits["y_test"]
    acc = accuracy(classifier, x, y)
    assert conditional_accuracy(classifier, x, y) == pytest.approx(acc)
    shuffled = np.random.default_rng(0).permutation(y)
    assert abs(conditional_accuracy(classifier, x, shuffled) - 0.1) < 0.05


# ----------------------------------------------------------------------------- FID: digits classifier


def _scipy_fid(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Reference Fréchet distance, the pytorch-fid way (scipy.linalg.sqrtm), for cross-checking."""
    mu1, mu2 = feats_a.mean(0), feats_b.mean(0)
    s1, s2 = np.cov(feats_a, rowvar=False), np.cov(feats_b, rowvar=False)
    covmean = scipy_linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _eig_fid(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Fréchet distance with tr sqrt(S1 S2) = sum of sqrt(eig(S1^1/2 S2 S1^1/2)) (symmetric, so
    exact for the rank-deficient covariances of a handful of samples, where sqrtm is fragile)."""
    mu1, mu2 = feats_a.mean(0), feats_b.mean(0)
    s1, s2 = np.cov(feats_a, rowvar=False), np.cov(feats_b, rowvar=False)
    w, v = np.linalg.eigh(s1)
    root = (v * np.sqrt(w.clip(0))) @ v.T
    tr_covmean = np.sqrt(np.linalg.eigvalsh(root @ s2 @ root).clip(0)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def test_fid_digits_classifier(classifier, classifier_dir, digits):
    space = FeatureSpace("digits-classifier", classifier_path=classifier_dir)
    xtr, xte = digits["x_train"], digits["x_test"]

    self_fid = fid(xte, xte, space)
    assert abs(self_fid) < 1e-3

    floor = fid(xtr, xte, space)
    noise = np.random.default_rng(0).integers(0, 256, size=xte.shape, dtype=np.uint8)
    noise_fid = fid(xtr, noise, space)
    print(f"FID(train, test) = {floor:.4f}; FID(train, noise) = {noise_fid:.2f}")
    assert 0 < floor and noise_fid > 10 * floor

    # Same value as a direct scipy computation on features we extract ourselves.
    with torch.no_grad():
        fa = classifier.features(DigitClassifier.preprocess(torch.as_tensor(xtr))).double().numpy()
        fb = classifier.features(DigitClassifier.preprocess(torch.as_tensor(xte))).double().numpy()
    assert floor == pytest.approx(_scipy_fid(fa, fb), rel=1e-3)

    # Statistics path (for cached references) agrees with the one-call path, also via .npz.
    mu_a, s_a = fid_statistics(xtr, space)
    assert mu_a.shape == (classifier.config.feature_dim,) and s_a.shape == (mu_a.size, mu_a.size)
    np.testing.assert_allclose(mu_a, fa.mean(0), rtol=1e-4, atol=1e-4)
    path = save_fid_statistics(classifier_dir.parent / "ref" / "digits_train.npz", mu_a, s_a)
    mu_b, s_b = fid_statistics(xte, space)
    assert fid_from_statistics(*load_fid_statistics(path), mu_b, s_b) == pytest.approx(floor, rel=1e-6)


def _numpy_kid(fa: np.ndarray, fb: np.ndarray) -> float:
    """Unbiased MMD² with the polynomial kernel (x.y / D + 1)^3 (KID, Binkowski et al. 2018), written out;
    the cross term keeps its diagonal, as torch-fidelity's "unbiased" estimator does."""
    m, d = len(fa), fa.shape[1]
    k = lambda x, y: (x @ y.T / d + 1) ** 3  # noqa: E731
    kxx, kyy, kxy = k(fa, fa), k(fb, fb), k(fa, fb)
    return float((kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.sum() / m**2)


def test_kid_digits_classifier(classifier, classifier_dir, digits):
    space = FeatureSpace("digits-classifier", classifier_path=classifier_dir)
    xte = digits["x_test"]  # 360 images
    xtr = digits["x_train"][: len(xte)]
    noise = np.random.default_rng(0).integers(0, 256, size=xte.shape, dtype=np.uint8)
    self_kid, _ = kid(xte, xte, space, subsets=5)
    real_kid, real_std = kid(xte, xtr, space, subsets=5)
    noise_kid, _ = kid(xte, noise, space, subsets=5)
    print(f"KID: self {self_kid:.3g}, test vs train {real_kid:.4g} +- {real_std:.2g}, vs noise {noise_kid:.4g}")
    # Against itself KID is ~0: not exactly, as the estimator keeps the cross term's diagonal
    # (k(x_i, x_i) for identical sets), an O(1/m) negative offset.
    assert abs(self_kid) < 0.05 * noise_kid and real_kid < 0.05 * noise_kid
    # Subsets of the whole set (360 of 360 rows) are permutations: KID is the full-set MMD², exactly
    # the direct numpy computation on the same features.
    with torch.no_grad():
        fa = classifier.features(DigitClassifier.preprocess(torch.as_tensor(xte))).double().numpy()
        fb = classifier.features(DigitClassifier.preprocess(torch.as_tensor(xtr))).double().numpy()
    # The same rows summed in another order: float32 rounding only (seen up to 2e-4 relative; a
    # real subset spread is of the order of 10%).
    assert real_std < 1e-3 * abs(real_kid) + 1e-9
    assert self_kid == pytest.approx(_numpy_kid(fa, fa), rel=1e-3)
    assert real_kid == pytest.approx(_numpy_kid(fa, fb), rel=1e-3)
    assert kid_from_features(fa, fb, subsets=3)[0] == pytest.approx(_numpy_kid(fa, fb), rel=1e-3)
    # Smaller subsets: the mean is still an unbiased estimate of the same MMD²; the std is > 0.
    sub_mean, sub_std = kid_from_features(fa, fb, subset_size=100, subsets=50)
    assert sub_std > 0 and sub_mean == pytest.approx(real_kid, abs=3 * sub_std)


def test_precision_recall_from_features():
    rng = np.random.default_rng(0)
    a, c = rng.normal(size=(60, 8)), rng.normal(size=(40, 8)) * 1.5 + 0.5
    assert precision_recall_from_features(a, a) == (1.0, 1.0)  # every point lies in its own ball
    assert precision_recall_from_features(a, a + 100) == (0.0, 0.0)  # disjoint supports

    def direct(gen, real, k=3):  # Kynkaanniemi et al.: k-NN radii (self excluded), ball membership
        d = lambda x, y: np.linalg.norm(x[:, None] - y[None], axis=-1)  # noqa: E731
        r_real, r_gen = np.sort(d(real, real), 1)[:, k], np.sort(d(gen, gen), 1)[:, k]
        return (d(gen, real) <= r_real[None]).any(1).mean(), (d(real, gen) <= r_gen[None]).any(1).mean()

    p, r = precision_recall_from_features(c, a)
    assert 0 < p < 1 and 0 < r < 1
    assert (p, r) == pytest.approx(direct(c, a), abs=1e-6)


def test_inception_score_from_logits():
    uniform = torch.zeros(100, 10)  # every prediction the same: IS 1
    assert inception_score_from_logits(uniform)[0] == pytest.approx(1.0)
    confident = torch.nn.functional.one_hot(torch.arange(100) % 10, 10).float() * 50  # sure and balanced: IS K
    assert inception_score_from_logits(confident, splits=1)[0] == pytest.approx(10.0, rel=1e-3)


def test_fid_argument_errors(classifier_dir, digits):
    x = digits["x_test"][:10]
    with pytest.raises(ValueError, match="classifier_path"):
        fid(x, x, FeatureSpace("digits-classifier"))
    with pytest.raises(ValueError, match="unknown extractor"):
        fid(x, x, FeatureSpace("clip", classifier_path=classifier_dir))
    with pytest.raises(ValueError, match="uint8"):
        fid(x.astype(np.float32), x, FeatureSpace("digits-classifier", classifier_path=classifier_dir))


# ----------------------------------------------------------------------------- FID: Inception


def test_inception_without_weights_says_what_to_fetch(monkeypatch, tmp_path, digits):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    x = digits["x_test"][:4]
    with pytest.raises(FileNotFoundError) as err:
        fid(x, x, FeatureSpace("inception"))
    msg = str(err.value)
    assert INCEPTION_WEIGHTS_FILE in msg
    assert str(tmp_path / "torch_home" / "hub" / "checkpoints" / INCEPTION_WEIGHTS_FILE) in msg
    assert "weights_path" in msg and "https://" in msg
    with pytest.raises(FileNotFoundError, match=INCEPTION_WEIGHTS_FILE):
        fid_statistics(x, FeatureSpace("inception", weights_path=tmp_path / "nope.pth"))


def test_inception_fid_with_local_weights(random_inception_weights, monkeypatch, tmp_path, digits):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # no real weights found by accident
    rng = np.random.default_rng(0)
    a = digits["x_test"][:4]  # grey (N, 1, 8, 8): repeated to RGB for Inception
    b = rng.integers(0, 256, size=(4, 1, 8, 8), dtype=np.uint8)
    t0 = time.perf_counter()
    value = fid(a, b, FeatureSpace("inception", weights_path=random_inception_weights))
    print(f"random-Inception FID: {value:.4g} in {time.perf_counter() - t0:.1f} s")
    # Direct: torch-fidelity's InceptionV3 called on the RGB-repeated images, Fréchet distance in numpy.
    from torch_fidelity import FeatureExtractorInceptionV3

    net = FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048"], feature_extractor_weights_path=random_inception_weights
    ).eval()
    with torch.no_grad():
        fa, fb = (net(torch.as_tensor(x).repeat(1, 3, 1, 1))[0].double().numpy() for x in (a, b))
    assert value == pytest.approx(_eig_fid(fa, fb), rel=1e-3)
    # The same file is found at torch-fidelity's cache location without weights_path.
    ckpt = tmp_path / "torch_home" / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    (ckpt / INCEPTION_WEIGHTS_FILE).symlink_to(random_inception_weights)
    mu, sigma = fid_statistics(a[:2], FeatureSpace("inception"))
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048) and np.isfinite(mu).all()


def test_digits_metrics_extract_each_set_once_and_equal_the_one_call_metrics(
    classifier, classifier_dir, digits, tmp_path, monkeypatch
):
    """The score stage's digits metrics: one classifier pass per image set (train, samples, floor,
    ceiling), and every figure exactly the value of the one-call fid()/kid() on the same images."""
    import json
    import shutil

    import importlib

    from uvit.evaluate.score import DigitsReal, digits_metrics

    fid_module = importlib.import_module("uvit.evaluate.fid")  # uvit.evaluate.fid is also a function's name

    clf = tmp_path / "clf"
    shutil.copytree(classifier_dir, clf)
    (clf / "metrics.json").write_text(json.dumps({"test_accuracy": 0.5}))
    rng = np.random.default_rng(1)
    xtr, xte = digits["x_train"], digits["x_test"]
    samples = np.clip(xte[:120].astype(int) + rng.integers(-40, 40, xte[:120].shape), 0, 255).astype(np.uint8)
    untrained = rng.integers(0, 256, size=samples.shape, dtype=np.uint8)
    labels = digits["y_test"][:120]
    passes = []
    real_extract = fid_module.extract_features
    monkeypatch.setattr(
        fid_module, "extract_features", lambda x, *a, **k: passes.append(len(x)) or real_extract(x, *a, **k)
    )

    m = digits_metrics(samples, labels, untrained, DigitsReal(train=xtr, test=xte, classifier=clf), kid_subset_size=50)
    assert sorted(passes) == sorted([len(xtr), 120, 120, 120])  # the train split once, not six times
    space = FeatureSpace("digits-classifier", classifier_path=clf)
    assert m["fid"] == fid(samples, xtr, space)
    assert m["fid_floor"] == fid(xte[:120], xtr, space)
    assert m["fid_ceiling"] == fid(untrained, xtr, space)
    assert (m["kid"], m["kid_std"]) == kid(samples, xtr, space, subset_size=50)
    assert m["kid_floor"] == kid(xte[:120], xtr, space, subset_size=50)[0]
    assert m["fid_over_floor"] == m["fid"] / m["fid_floor"] and m["fid_ceiling"] > m["fid"]
    assert m["num_samples"] == 120 and m["num_reference"] == len(xtr) and m["classifier_test_accuracy"] == 0.5
    assert 0 <= m["conditional_accuracy"] <= 1 and 0 <= m["precision"] <= 1 and 0 <= m["recall"] <= 1
