"""Your own images end to end through DVC: two params blocks with `data.source: imagefolder` (a
folder of class sub-folders, and a flat folder), `uvit pipeline write`, then
`dvc repro paper/dvc.yaml:publish@<name>`; each ends in a report that shows this run's numbers
and, for the class folder, the class names. Tiny model, 4 steps, random-weight Inception."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from chains import ran
from PIL import Image

pytestmark = pytest.mark.slow
CLASSES = ("apple", "banana", "cherry")
RES = 16


def _folder(root: Path, classes: tuple[str, ...], per: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes or ("",)):
        tint = np.array([60 + 80 * c, 200 - 60 * c, 120], dtype=np.float64)
        for i in range(per):
            arr = (0.5 * rng.integers(0, 256, size=(20 + i, 24, 3)) + 0.5 * tint).astype(np.uint8)
            path = root / name / f"{i:02d}.png" if name else root / f"{i:02d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(path)
    return root


def _block(root: Path, num_classes: int, inception: str) -> dict:
    model = {
        "embed_dim": 32,
        "depth": 2,
        "num_heads": 2,
        "img_size": RES,
        "num_classes": num_classes + 1 if num_classes else -1,
    }  # + the guidance null class
    return {
        "data": {"source": "imagefolder", "root": str(root), "test_fraction": 0.25, "num_classes": num_classes},
        "validate": {"min_rows": 4},
        "model": {"preset": "cifar10_uvit_s2", "overrides": model},
        "diffusion": {"schedule": "vpsde", "p_uncond": 0.1 if num_classes else 0.0},
        "train": {
            "steps": 4,
            "batch_size": 8,
            "lr": 0.0002,
            "warmup_steps": 2,
            "random_flip": True,
            "num_workers": 1,
            "threads_per_worker": 1,
            "checkpoint_every": 2,
            "log_every": 1,
        },
        "sample": {
            "sampler": "dpm_solver",
            "steps": 4,
            "num_samples": 6,
            "batch_size": 6,
            "guidance_scale": 0.5 if num_classes else 0.0,
        },
        "score": {"feature_extractor": "inception", "inception_weights": inception},
        "artifacts": {"url": "artifacts"},
    }


@pytest.fixture(scope="module")
def project(tmp_path_factory, make_project) -> Path:
    from uvit.evaluate.fid import INCEPTION_WEIGHTS_FILE
    from uvit.miniature import write_random_inception

    inputs = tmp_path_factory.mktemp("own-images")
    inception = str(write_random_inception(inputs / "weights" / INCEPTION_WEIGHTS_FILE))
    blocks = {
        "fruit": _block(_folder(inputs / "fruit", CLASSES, 6, seed=0), len(CLASSES), inception),
        "textures": _block(_folder(inputs / "textures", (), 10, seed=1), 0, inception),
    }
    return make_project(tmp_path_factory.mktemp("imagefolder") / "project", blocks)


@pytest.mark.parametrize("benchmark", ["fruit", "textures"])
def test_own_images_run_end_to_end_into_a_report(project, benchmark, dvc) -> None:
    out = dvc(["repro", f"paper/dvc.yaml:publish@{benchmark}"], project)
    stages = {s.split("@")[0] for s in ran(out) if s.endswith(f"@{benchmark}")}
    assert stages == {"data", "validate", "train", "sample", "score", "report", "publish"}, out[-3000:]
    manifest = json.loads((project / f"data/{benchmark}/train/manifest.json").read_text())
    classes = list(CLASSES) if benchmark == "fruit" else []
    # test_fraction 0.25: round(1.5) = 2 of each class's 6 images, round(2.5) = 2 of the 10 flat ones
    assert manifest["meta"]["classes"] == classes and manifest["count"] == (3 * 4 if classes else 8)
    metrics = json.loads((project / f"runs/{benchmark}/score/metrics.json").read_text())
    assert math.isfinite(metrics["fid"]) and metrics["fid"] > 0 and metrics["num_samples"] == 6
    with np.load(project / f"runs/{benchmark}/samples/samples.npz") as f:
        assert f["arr_0"].shape == (6, RES, RES, 3)
        if classes:  # class-balanced labels over the folder's classes
            assert f["labels"].tolist() == [0, 1, 2, 0, 1, 2]
        else:
            assert "labels" not in f.files
    summary = json.loads((project / f"runs/{benchmark}/train/summary.json").read_text())
    assert summary["steps"] == 4 and summary["data"] == {
        "source": "imagefolder train",
        "rows": manifest["count"],
        "classes": classes,
    }
    page = (project / f"reports/{benchmark}.md").read_text()
    assert f"{metrics['fid']:.2f}" in page
    assert (f"classes: {', '.join(CLASSES)}" in page) == bool(classes)
    assert (project / f"runs/{benchmark}/publish.json").is_file()
