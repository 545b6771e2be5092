"""The imagefolder source (your own images): layouts, labels, splits, tar and S3 roots, bad files,
and the data stage's one-line errors, on small folders made here (S3: a loopback moto server)."""

from __future__ import annotations

import copy
import hashlib
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from uvit.config import ConfigError, load_benchmark, load_params
from uvit.data.download import BadSourceError, ChecksumMismatch, SourceInput
from uvit.data.preprocess import BadImageError, PrepareOptions, center_crop_arr, load_rgb
from uvit.data.shards import ShardedArrays
from uvit.data.sources.imagefolder import prepare_imagefolder, split_files
from uvit.paths import BenchmarkPaths
from uvit.stages.data import run_data

ROOT = Path(__file__).resolve().parents[1]
RES = 16
QUIET = PrepareOptions(progress=False)
CLASSES = {"cat": 5, "dog": 4, "zebra": 3}  # sorted names -> labels 0, 1, 2


def _image(path: Path, seed: int, mode: str = "RGB", size=(23, 19)) -> Path:
    arr = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 4), dtype=np.uint8)
    im = Image.fromarray(arr, "RGBA").convert(mode) if mode != "RGBA" else Image.fromarray(arr, "RGBA")
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)
    return path


def class_folder(root: Path) -> Path:
    """cat/ (5 png, one grey), dog/ (4 jpg/webp, one RGBA png), zebra/ (3 in a nested folder)."""
    seed = 0
    for name, n in CLASSES.items():
        for i in range(n):
            seed += 1
            if name == "cat":
                _image(root / name / f"{i:02d}.png", seed, "L" if i == 0 else "RGB")
            elif name == "dog":
                ext, mode = [(".jpg", "RGB"), (".webp", "RGB"), (".png", "RGBA"), (".jpeg", "RGB")][i]
                _image(root / name / f"{i:02d}{ext}", seed, mode)
            else:
                _image(root / name / "nested" / f"{i:02d}.png", seed)
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    return root


def flat_folder(root: Path, n: int = 6) -> Path:
    for i in range(n):
        _image(root / f"img{i}.png", 100 + i, size=(30 + i, 17))
    return root


def arrays(split: Path) -> tuple[np.ndarray, np.ndarray | None, dict]:
    ds = ShardedArrays(split)
    labels = np.asarray(ds.field("labels")) if "labels" in ds.field_names else None
    return np.asarray(ds.field("images")), labels, ds.manifest.meta


def expected_pixels(paths: list[Path]) -> np.ndarray:
    return np.stack([center_crop_arr(load_rgb(p), RES).transpose(2, 0, 1) for p in paths])


def test_class_folders_give_sorted_labels_a_stratified_split_and_adm_crops(tmp_path) -> None:
    root = class_folder(tmp_path / "images")
    prepare_imagefolder(
        tmp_path / "out",
        SourceInput(root, download_dir=tmp_path / "dl"),
        RES,
        test_fraction=0.25,
        seed=3,
        options=QUIET,
    )
    train_x, train_y, meta = arrays(tmp_path / "out" / "train")
    test_x, test_y, _ = arrays(tmp_path / "out" / "test")
    assert meta["classes"] == ["cat", "dog", "zebra"] and meta["num_classes"] == 3
    # per class: round(0.25 n) (at least 1) test images -> cat 1, dog 1, zebra 1
    assert np.bincount(test_y).tolist() == [1, 1, 1] and np.bincount(train_y).tolist() == [4, 3, 2]
    # every stored row is ADM's centre crop of one file of its class, RGB (grey, alpha and webp converted)
    files = {c: sorted(p for p in (root / c).rglob("*") if p.suffix != ".txt" and p.is_file()) for c in CLASSES}
    for x, y in ((train_x, train_y), (test_x, test_y)):
        assert x.shape[1:] == (3, RES, RES) and x.dtype == np.uint8
        for img, label in zip(x, y):
            candidates = expected_pixels(files[list(CLASSES)[label]])
            assert any(np.array_equal(img, c) for c in candidates)
    all_rows = np.concatenate([train_x, test_x])
    assert len({r.tobytes() for r in all_rows}) == sum(CLASSES.values())  # each file once
    # the same seed gives the same split; another seed another one
    again = tmp_path / "again"
    prepare_imagefolder(
        again, SourceInput(root, download_dir=tmp_path / "dl"), RES, test_fraction=0.25, seed=3, options=QUIET
    )
    assert np.array_equal(arrays(again / "test")[0], test_x)


def test_split_rule_keeps_singletons_in_train() -> None:
    labels = np.array([0, 0, 0, 0, 1, 2, 2])
    train, test = split_files(labels, 7, 0.5, seed=0)
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(7))
    assert np.bincount(labels[test], minlength=3).tolist() == [2, 0, 1]  # class 1 (one image) stays in train


def test_flat_folder_is_unconditional_and_flips_can_be_stored(tmp_path) -> None:
    root = flat_folder(tmp_path / "flat")
    prepare_imagefolder(
        tmp_path / "out",
        SourceInput(root, download_dir=tmp_path / "dl"),
        RES,
        test_fraction=0.34,
        store_flips=True,
        options=QUIET,
    )
    train_x, train_y, meta = arrays(tmp_path / "out" / "train")
    assert train_y is None and meta["num_classes"] == 0 and meta["classes"] == []
    ds = ShardedArrays(tmp_path / "out" / "train")
    n = len(train_x) // 2
    assert len(train_x) == 2 * 4 and np.asarray(ds.field("flipped")).tolist() == [0] * n + [1] * n
    assert np.array_equal(train_x[n:], train_x[:n, :, :, ::-1])  # rows [N, 2N) mirror rows [0, N)


def test_presplit_folders_keep_their_split_and_the_train_class_order(tmp_path) -> None:
    root = tmp_path / "split"
    class_folder(root / "train")
    _image(root / "val" / "zebra" / "z.png", 7)
    _image(root / "val" / "cat" / "c.png", 8)
    prepare_imagefolder(tmp_path / "out", SourceInput(root, download_dir=tmp_path / "dl"), RES, options=QUIET)
    _, train_y, meta = arrays(tmp_path / "out" / "train")
    test_x, test_y, _ = arrays(tmp_path / "out" / "test")
    assert len(train_y) == sum(CLASSES.values()) and meta["split_rule"] == "the train/ and test/ folders"
    assert test_y.tolist() == [0, 2]  # cat, zebra: the train split's label ids
    assert np.array_equal(test_x, expected_pixels([root / "val/cat/c.png", root / "val/zebra/z.png"]))


def _tar(folder: Path, dest: Path, extra: dict[str, bytes] | None = None) -> Path:
    with tarfile.open(dest, "w:gz") as tar:
        tar.add(folder, arcname="images")
        for name, data in (extra or {}).items():
            import io

            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return dest


def test_a_tar_root_equals_its_folder_and_is_checked_and_contained(tmp_path) -> None:
    root = class_folder(tmp_path / "images")
    png = (root / "cat" / "01.png").read_bytes()
    tar = _tar(root, tmp_path / "mine.tar.gz", {"../escape.png": png, "/abs.png": png})
    sha = hashlib.sha256(tar.read_bytes()).hexdigest()
    from_folder, from_tar = tmp_path / "a", tmp_path / "b"
    prepare_imagefolder(from_folder, SourceInput(root, download_dir=tmp_path / "dl"), RES, options=QUIET)
    # the tar's single top folder ("images/") stands for ROOT; unsafe member names are never written
    prepare_imagefolder(from_tar, SourceInput(tar, download_dir=tmp_path / "dl", sha256=sha), RES, options=QUIET)
    for split in ("train", "test"):
        a, b = arrays(from_folder / split), arrays(from_tar / split)
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not list(tmp_path.rglob("escape.png")) and not list(tmp_path.rglob("abs.png"))
    assert not Path("/abs.png").exists()
    with pytest.raises(ChecksumMismatch):
        prepare_imagefolder(
            tmp_path / "c", SourceInput(tar, download_dir=tmp_path / "dl", sha256="0" * 64), RES, options=QUIET
        )


def test_an_s3_prefix_root_equals_its_folder(tmp_path, s3_endpoint, monkeypatch) -> None:
    import boto3

    for k, v in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "UVIT_S3_ENDPOINT_URL": s3_endpoint,
    }.items():
        monkeypatch.setenv(k, v)
    root = class_folder(tmp_path / "images")
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.create_bucket(Bucket="mine")
    for p in root.rglob("*"):
        if p.is_file():
            client.put_object(Bucket="mine", Key=f"pets/{p.relative_to(root).as_posix()}", Body=p.read_bytes())
    prepare_imagefolder(tmp_path / "a", SourceInput(root, download_dir=tmp_path / "dl"), RES, options=QUIET)
    prepare_imagefolder(tmp_path / "b", SourceInput("s3://mine/pets", download_dir=tmp_path / "dl"), RES, options=QUIET)
    for split in ("train", "test"):
        a, b = arrays(tmp_path / "a" / split), arrays(tmp_path / "b" / split)
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2]["classes"] == b[2]["classes"]


def test_mixed_layout_and_empty_folders_are_refused(tmp_path) -> None:
    root = class_folder(tmp_path / "images")
    _image(root / "stray.png", 1)
    with pytest.raises(BadSourceError, match="both image files"):
        prepare_imagefolder(tmp_path / "out", SourceInput(root, download_dir=tmp_path / "dl"), RES, options=QUIET)
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no images"):
        prepare_imagefolder(
            tmp_path / "out2", SourceInput(tmp_path / "empty", download_dir=tmp_path / "dl"), RES, options=QUIET
        )


# -- through the data stage and its config ---------------------------------------------------------
def config(data: dict, validate: dict | None = None, **model):
    params = copy.deepcopy(load_params(ROOT / "params.yaml"))
    block = params["cifar10"]
    block["data"] = {"num_classes": 3, **data}
    block["validate"] = validate or {"min_rows": 1}
    block["model"] = {
        "preset": "cifar10_uvit_s2",
        "overrides": {"img_size": RES, "embed_dim": 32, "depth": 2, "num_heads": 2, **model},
    }
    return load_benchmark("cifar10", params)


def test_a_truncated_image_fails_naming_it_or_is_skipped_and_counted(tmp_path) -> None:
    root = class_folder(tmp_path / "images")
    bad = root / "dog" / "00.jpg"
    bad.write_bytes(bad.read_bytes()[:200])  # truncated JPEG
    cfg = config({"source": "imagefolder", "root": str(root), "download_dir": str(tmp_path / "dl")})
    paths = BenchmarkPaths("cifar10", tmp_path / "project")
    with pytest.raises(BadImageError, match="00.jpg"):
        run_data(cfg, paths)
    assert not paths.data.exists() and not any(paths.data.parent.iterdir())  # nothing half-written
    cfg = config({"source": "imagefolder", "root": str(root), "download_dir": str(tmp_path / "dl"), "on_bad": "skip"})
    counts = run_data(cfg, paths)
    assert sum(counts.values()) == sum(CLASSES.values()) - 1
    metas = [ShardedArrays(paths.data / s).manifest.meta for s in ("train", "test")]
    assert sum(m["num_skipped"] for m in metas) == 1
    assert any("00.jpg" in s["file"] for m in metas for s in m["skipped"])


def test_source_options_are_checked_before_any_work() -> None:
    with pytest.raises(ConfigError, match=r"cifar10\.data: .*store_flips applies to the imagefolder source"):
        config({"source": "cifar10", "store_flips": True})
    with pytest.raises(ConfigError, match=r"cifar10\.data\.source"):
        config({"source": "my-folder"})


def test_unset_or_missing_root_is_one_error_line(tmp_path) -> None:
    params = copy.deepcopy(load_params(ROOT / "params.yaml"))
    params["cifar10"]["data"] = {"source": "imagefolder", "root": str(tmp_path / "nope")}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "uvit"), "data", "cifar10"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1 and "Traceback" not in proc.stderr
    assert f"{tmp_path / 'nope'} does not exist" in lines[0] and "cifar10.data.root" in lines[0]


def test_the_commented_example_in_params_yaml_validates() -> None:
    """The `myimages` block params.yaml shows (commented out) is a valid imagefolder benchmark."""
    text = (ROOT / "params.yaml").read_text()
    lines = text[text.index("# myimages:") :].splitlines()
    block = yaml.safe_load("\n".join(line[2:] for line in lines if line.startswith("# ")))
    cfg = load_benchmark("myimages", block)
    assert cfg.data.source == "imagefolder" and cfg.data.on_bad == "skip"
    assert cfg.uvit_config().num_classes == cfg.data.num_classes + 1 and cfg.train.random_flip


def test_latent_benchmark_from_own_images_encodes_with_stored_flips(tmp_path) -> None:
    """A latent preset on an imagefolder: images at 8x the latent size, mirrors stored as rows, and
    the encode stage turns both into VAE moments with the labels kept."""
    import diffusers
    import torch

    from uvit.stages.encode import run_encode

    torch.manual_seed(0)
    diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    ).save_pretrained(tmp_path / "vae")  # KL-f8, as SD's
    params = copy.deepcopy(load_params(ROOT / "params.yaml"))
    block = params["imagenet256"]
    block["data"] = {
        "source": "imagefolder",
        "root": str(class_folder(tmp_path / "images")),
        "store_flips": True,
        "download_dir": str(tmp_path / "dl"),
        "num_classes": 3,
    }
    # scale 1.0: this random VAE's latents have std ~0.18, so scaled they pass the latent suite's std check
    block["encode"] = {"vae": str(tmp_path / "vae"), "scale_factor": 1.0, "batch_size": 4, "dtype": "float32"}
    block["validate"] = {"min_rows": 1}
    block["model"] = {
        "preset": "imagenet256_uvit_l2",
        "overrides": {"img_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 4},
    }
    cfg = load_benchmark("imagenet256", params)
    paths = BenchmarkPaths("imagenet256", tmp_path / "project")
    counts = run_data(cfg, paths)
    assert ShardedArrays(paths.data / "train").field("images").shape[1:] == (3, 32, 32)  # 8 x img_size
    assert counts == {"train": 2 * 9, "test": 2 * 3}  # every image and its mirror
    result = run_encode(cfg, paths)
    assert result["train_latents"] == 18 and result["test_latents"] == 6
    latents = ShardedArrays(paths.latents / "train")
    assert latents.field("moments").shape == (18, 8, 4, 4)  # mean and log-variance of 4 channels
    labels = np.asarray(latents.field("labels"))
    assert np.array_equal(labels, np.asarray(ShardedArrays(paths.data / "train").field("labels")))
    assert np.array_equal(labels[:9], labels[9:])  # a mirror keeps its image's label
