"""The miniature of the paper chains (uvit.miniature): its inputs go through the real data stage
in each source's real format, its checksums are declared in params (the official ones still
refuse it), and its weight stand-ins load through the real loaders."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from uvit.config import load_benchmark, load_params
from uvit.data.shards import ShardedArrays, load_split_arrays
from uvit.miniature import (
    CELEBA_PARTITION,
    COCO_CAPTIONS_PER_IMAGE,
    COCO_IMAGES,
    IMAGENET_CLASSES,
    IMAGENET_TRAIN_PER_CLASS,
    PAPER_BENCHMARKS,
    merge_params,
    write_miniature,
)
from uvit.paths import BenchmarkPaths
from uvit.stages.data import run_data

ROOT = Path(__file__).resolve().parents[1]
UVIT = str(Path(sys.executable).parent / "uvit")


@pytest.fixture(scope="module")
def mini(tmp_path_factory) -> tuple[Path, dict]:
    dest = tmp_path_factory.mktemp("miniature")
    return dest, write_miniature(dest)


@pytest.fixture(scope="module")
def params(mini) -> dict:
    return merge_params(load_params(ROOT / "params.yaml"), mini[1])


def _files(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _cli(args: list[str], tmp: Path, params: dict) -> subprocess.CompletedProcess:
    (tmp / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [UVIT, *args, "--params", str(tmp / "params.yaml"), "--root", str(tmp)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: [data "), proc.stderr
    return lines[0]


def test_overrides_are_absolute_and_validate(mini, params) -> None:
    dest, overrides = mini
    assert set(overrides) == set(PAPER_BENCHMARKS)
    for b in PAPER_BENCHMARKS:
        cfg = load_benchmark(b, params)  # every merged block is a valid config
        u, preset = cfg.uvit_config(), cfg.model.preset
        from uvit.models.presets import get_preset

        p = get_preset(preset).config
        assert (u.img_size, u.patch_size, u.in_chans, u.num_classes, u.clip_dim) == (
            p.img_size,
            p.patch_size,
            p.in_chans,
            p.num_classes,
            p.clip_dim,
        )  # the preset's shape kept
        assert u.embed_dim < p.embed_dim and cfg.train.steps <= 10 and not cfg.train.use_gpu
        assert cfg.sample.sampler == load_benchmark(b, ROOT / "params.yaml").sample.sampler
        for path in (cfg.data.root, cfg.score.inception_weights, cfg.encode and cfg.encode.vae):
            if path:
                assert Path(path).is_absolute() and Path(path).exists() and Path(path).is_relative_to(dest)


def test_same_bytes_on_every_call(mini, tmp_path) -> None:
    dest, overrides = mini
    again = write_miniature(tmp_path / "again", ["cifar10", "imagenet256"])
    first, second = _files(dest), _files(tmp_path / "again")
    differ = [name for name, digest in second.items() if name != "MINIATURE.json" and first[name] != digest]
    assert len(second) > 20 and not differ
    assert again["imagenet256"]["data"]["sha256"] == overrides["imagenet256"]["data"]["sha256"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not written by write_miniature"):
        write_miniature(tmp_path / "other", ["cifar10"])  # a folder not ours is never cleared
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def _cifar_records(archive: Path, split_files: list[str]) -> tuple[np.ndarray, np.ndarray]:
    with tarfile.open(archive) as tar:
        raw = b"".join(tar.extractfile(f"cifar-10-batches-bin/{f}").read() for f in split_files)
    rec = np.frombuffer(raw, np.uint8).reshape(-1, 3073)
    return rec[:, 1:].reshape(-1, 3, 32, 32), rec[:, 0].astype(np.int64)


@pytest.mark.parametrize("benchmark", PAPER_BENCHMARKS)
def test_data_stage_on_the_miniature(benchmark, mini, params, tmp_path) -> None:
    from uvit.data.preprocess import center_crop_arr, load_rgb

    cfg = load_benchmark(benchmark, params)
    paths = BenchmarkPaths(benchmark, tmp_path)
    counts = run_data(cfg, paths)
    n_imagenet = len(IMAGENET_CLASSES) * IMAGENET_TRAIN_PER_CLASS
    if benchmark == "cifar10":
        assert counts == {"train": 30, "test": 10}
        archive = Path(cfg.data.root)
        with gzip.open(archive) as f:
            assert f.read(1)  # a gzip stream, as the official tarball
        for split, files in (("train", [f"data_batch_{i}.bin" for i in range(1, 6)]), ("test", ["test_batch.bin"])):
            images, labels = load_split_arrays(paths.data / split)
            ref_images, ref_labels = _cifar_records(archive, files)
            np.testing.assert_array_equal(images, ref_images)
            np.testing.assert_array_equal(labels, ref_labels)
            assert np.bincount(labels, minlength=10).tolist() == [counts[split] // 10] * 10
    elif benchmark == "celeba64":
        assert counts == {"train": CELEBA_PARTITION[0]}
        images = ShardedArrays(paths.data / "train").field("images")
        assert images.shape == (CELEBA_PARTITION[0], 3, 64, 64) and images.dtype == np.uint8
        partition = (Path(cfg.data.root) / "list_eval_partition.txt").read_text().split()
        assert partition[1::2].count("0") == CELEBA_PARTITION[0]
    elif benchmark in ("imagenet64", "imagenet256", "imagenet512"):
        res = {"imagenet64": 64, "imagenet256": 256, "imagenet512": 512}[benchmark]
        flip = benchmark != "imagenet64"
        assert counts == {"train": n_imagenet * (2 if flip else 1)}
        split = ShardedArrays(paths.data / "train")
        assert split.manifest.meta["classes"] == list(IMAGENET_CLASSES)
        images, labels = np.asarray(split.field("images")), np.asarray(split.field("labels"))
        assert images.shape == (counts["train"], 3, res, res)
        once = np.repeat(np.arange(len(IMAGENET_CLASSES)), IMAGENET_TRAIN_PER_CLASS)
        np.testing.assert_array_equal(labels, np.concatenate([once, once]) if flip else once)
        if flip:  # rows [N, 2N) mirror rows [0, N)
            np.testing.assert_array_equal(images[n_imagenet:], images[:n_imagenet, :, :, ::-1])
        else:  # row 0 is ADM's centre crop of the first file of the first class
            first = sorted((Path(cfg.data.root) / "train" / IMAGENET_CLASSES[0]).iterdir())[0]
            np.testing.assert_array_equal(images[0], center_crop_arr(load_rgb(first), res).transpose(2, 0, 1))
        if benchmark == "imagenet256":  # the tar, extracted into data.download_dir
            assert Path(cfg.data.root).name == "ILSVRC2012_img_train.tar"
            assert (Path(cfg.data.download_dir) / "ILSVRC2012_img_train" / ".extracted").is_file()
    else:
        assert counts == COCO_IMAGES
        for split, n in COCO_IMAGES.items():
            ds = ShardedArrays(paths.data / split)
            ann = json.loads((Path(cfg.data.root) / "annotations" / f"captions_{split}2014.json").read_text())
            ids = sorted(img["id"] for img in ann["images"])
            np.testing.assert_array_equal(ds.field("image_ids"), ids)
            assert ds.field("images").shape == (n, 3, 256, 256)
            assert np.asarray(ds.field("num_captions")).tolist() == [COCO_CAPTIONS_PER_IMAGE] * n
            first = [a["caption"] for a in ann["annotations"] if a["image_id"] == ids[0]]
            assert np.asarray(ds.field("captions"))[0].tolist() == first
    assert sorted(p.name for p in paths.data.parent.iterdir()) == [benchmark]  # no scratch left


def test_wrong_declared_sha256_is_one_error_line(params, tmp_path) -> None:
    bad = merge_params(params, {"cifar10": {"data": {"sha256": "0" * 64}}})
    line = _one_error_line(_cli(["data", "cifar10"], tmp_path, bad))
    assert "ChecksumMismatch" in line and "cifar10.data.sha256" in line and "0" * 64 in line
    assert not (tmp_path / "data" / "cifar10").exists()
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir())


def test_official_md5_refuses_the_miniature_archive(params, tmp_path) -> None:
    from uvit.cli import _user_errors
    from uvit.data.download import ChecksumMismatch
    from uvit.data.sources.cifar10 import MD5

    block = {**params["cifar10"], "data": {k: v for k, v in params["cifar10"]["data"].items() if k != "sha256"}}
    cfg = load_benchmark("cifar10", {"cifar10": block})
    with pytest.raises(ChecksumMismatch) as ei:
        run_data(cfg, BenchmarkPaths("cifar10", tmp_path))
    assert ei.value.algorithm == "md5" and ei.value.expected == MD5
    assert isinstance(ei.value, _user_errors()) and "declare its checksum as cifar10.data.sha256" in str(ei.value)
    assert not (tmp_path / "data" / "cifar10").exists()
    # the ImageNet tar carries the official name, so without its declared sha256 the official MD5 applies too
    block = {**params["imagenet256"], "data": {k: v for k, v in params["imagenet256"]["data"].items() if k != "sha256"}}
    with pytest.raises(ChecksumMismatch, match="1d675b47d978889d74fa0da5fadfb00e"):
        run_data(load_benchmark("imagenet256", {"imagenet256": block}), BenchmarkPaths("imagenet256", tmp_path))


def test_vae_stand_in_is_an_ldm_file_that_encodes(params) -> None:
    from uvit.encoders.vae import downsample_factor, encode_moments, load_vae, vae_config_from_ldm

    path = load_benchmark("imagenet256", params).encode.vae
    state = torch.load(path, weights_only=True)
    assert "encoder.down.0.block.0.conv1.weight" in state and "decoder.up.3.upsample.conv.weight" in state
    config = vae_config_from_ldm(state)
    assert config["block_out_channels"] == [8, 8, 8, 8] and config["norm_num_groups"] == 8
    vae = load_vae(path, scale_factor=0.18215)
    assert downsample_factor(vae) == 8 and vae.config.latent_channels == 4
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 3, 256, 256), dtype=np.uint8))
    moments = encode_moments(vae, x)
    assert moments.shape == (2, 8, 32, 32) and torch.isfinite(moments).all()
    assert moments[0].std() > 0 and not torch.equal(moments[0], moments[1])
    assert load_benchmark("mscoco256", params).encode.vae == path  # one VAE file for every latent benchmark


def test_inception_stand_in_gives_discriminating_features(params) -> None:
    from uvit.evaluate.fid import INCEPTION_WEIGHTS_FILE, FeatureSpace, extract_features

    weights = load_benchmark("cifar10", params).score.inception_weights
    assert Path(weights).name == INCEPTION_WEIGHTS_FILE
    images = np.random.default_rng(0).integers(0, 256, (4, 3, 32, 32), dtype=np.uint8)
    feats = extract_features(images, ("2048",), FeatureSpace("inception", weights_path=weights))["2048"]
    assert feats.shape == (4, 2048) and torch.isfinite(feats).all()
    assert feats.std(dim=0).mean() > 0  # features differ between images


def test_clip_stand_ins_load(params) -> None:
    from uvit.encoders.text import encode_text, load_text_encoder
    from uvit.evaluate.clip_score import clip_score, load_clip

    cfg = load_benchmark("mscoco256", params)
    tokenizer, model = load_text_encoder(cfg.encode.text_encoder)
    contexts = encode_text(tokenizer, model, ["a cat sitting on a green mat", "two birds"])
    assert contexts.shape == (2, 77, cfg.uvit_config().clip_dim) == (2, 77, 768)
    assert tokenizer.tokenize("a cat sitting")[-1] == "sitting</w>"  # whole caption words in the vocabulary
    clip, processor = load_clip(cfg.score.clip_model)
    images = np.random.default_rng(0).integers(0, 256, (2, 3, 64, 64), dtype=np.uint8)
    assert 0 <= clip_score(images, ["a dog", "a red horse"], clip, processor) <= 100


def test_miniature_outside_a_checkout_is_one_error_line_and_writes_nothing(tmp_path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "uvit"), "miniature", str(tmp_path / "mini"), "--benchmarks", "cifar10"],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {elsewhere} is not a uvit checkout (no params.yaml): run from the project root or pass --root"
    ]
    assert not (tmp_path / "mini").exists()
