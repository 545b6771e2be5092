"""Dataset sources (CIFAR-10, CelebA, ImageNet, MS-COCO) and the reference crops, on tiny fixtures
made in tmp_path. Remote access is loopback only (an http.server and a moto S3 server)."""

from __future__ import annotations

import functools
import io
import json
import tarfile
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from uvit.data.download import BadSourceError, ChecksumMismatch, SourceInput
from uvit.data.preprocess import (
    BadImageError,
    Crop,
    PrepareOptions,
    celeba_crop,
    center_crop_arr,
    coco_crop,
    load_rgb,
    preprocess_images,
)
from uvit.data.shards import Manifest, ShardedArrays, load_split_arrays, verify_split
from uvit.data.sources.celeba import prepare_celeba, read_partition
from uvit.data.sources.cifar10 import MD5 as CIFAR_MD5
from uvit.data.sources.cifar10 import prepare_cifar10
from uvit.data.sources.coco import AnnotationError, prepare_coco
from uvit.data.sources.imagenet import prepare_imagenet

RNG = np.random.default_rng(1234)
QUIET = PrepareOptions(progress=False)


def _rand_img(w: int, h: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _save(path: Path, img: Image.Image, fmt: str = "JPEG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return path


def _truncated_jpeg(path: Path, seed: int = 99) -> Path:
    buf = io.BytesIO()
    Image.fromarray(_rand_img(64, 48, seed)).save(buf, "JPEG", quality=95)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return path


def _chw(hwc: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(hwc).transpose(2, 0, 1))


@pytest.fixture
def http_dir(tmp_path):
    """Serve tmp_path/www over HTTP on 127.0.0.1; yields (folder, base URL)."""
    www = tmp_path / "www"
    www.mkdir()

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(www)))
    t = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    t.start()
    yield www, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


# =============================================================================================
# Reference crops and decoding
# =============================================================================================


def _adm_center_crop_arr(pil_image, image_size):
    """guided-diffusion/improved_diffusion image_datasets.py, verbatim."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size]


def test_center_crop_arr_exact_on_block_image():
    # 4x4-constant blocks: two BOX halvings average equal pixels, the final BICUBIC is 1:1.
    blocks = RNG.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    img = Image.fromarray(blocks.repeat(4, axis=0).repeat(4, axis=1))  # 64x64
    out = center_crop_arr(img, 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, blocks)


@pytest.mark.parametrize("wh", [(300, 200), (201, 333), (50, 40), (64, 64)])
def test_center_crop_arr_matches_adm(wh):
    img = Image.fromarray(_rand_img(*wh, seed=wh[0]))
    out = center_crop_arr(img, 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, _adm_center_crop_arr(img, 32))


def test_celeba_crop_matches_torchvision():
    import torchvision.transforms as T
    import torchvision.transforms.functional as F

    img = Image.fromarray(_rand_img(178, 218, seed=5))
    ref = T.Resize(64)(F.crop(img, 57, 25, 128, 128))  # U-ViT: Crop(x1=57, x2=185, y1=25, y2=153)
    out = celeba_crop(img, 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.asarray(ref))
    with pytest.raises(BadImageError, match="at least 153x185"):
        celeba_crop(Image.fromarray(_rand_img(150, 218, seed=6)))


@pytest.mark.parametrize("wh", [(300, 200), (201, 300), (31, 31)])
def test_coco_crop_center_square_lanczos(wh):
    w, h = wh
    arr = _rand_img(w, h, seed=w + h)
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    ref = Image.fromarray(arr).crop((left, top, left + side, top + side)).resize((32, 32), Image.LANCZOS)
    out = coco_crop(Image.fromarray(arr), 32)
    assert out.shape == (32, 32, 3)
    np.testing.assert_array_equal(out, np.asarray(ref))


def test_load_rgb_converts_modes(tmp_path):
    grey = _save(tmp_path / "grey.jpg", Image.fromarray(_rand_img(20, 10, 1)[..., 0]))
    cmyk = _save(tmp_path / "cmyk.jpg", Image.fromarray(_rand_img(20, 10, 2)).convert("CMYK"))
    rgba_arr = np.zeros((10, 20, 4), dtype=np.uint8)
    rgba_arr[:, :10] = (255, 0, 0, 0)  # fully transparent red -> white
    rgba_arr[:, 10:] = (0, 0, 255, 255)  # opaque blue stays blue
    rgba = _save(tmp_path / "rgba.png", Image.fromarray(rgba_arr, "RGBA"), "PNG")
    pal = Image.fromarray(_rand_img(20, 10, 3)).convert("P")
    pal.info["transparency"] = 0
    palp = _save(tmp_path / "pal.png", pal, "PNG")
    i16 = _save(tmp_path / "i16.png", Image.fromarray(np.full((10, 20), 0x8040, np.uint16)), "PNG")
    for p in (grey, cmyk, rgba, palp, i16):
        im = load_rgb(p)
        assert im.mode == "RGB" and im.size == (20, 10), p
    px = np.asarray(load_rgb(rgba))
    assert (px[:, :10] == 255).all() and (px[:, 10:] == (0, 0, 255)).all()
    g = np.asarray(load_rgb(grey))
    assert (g[..., 0] == g[..., 1]).all() and (g[..., 1] == g[..., 2]).all()
    assert (np.asarray(load_rgb(i16)) == 0x80).all()


def test_load_rgb_bad_files(tmp_path):
    trunc = _truncated_jpeg(tmp_path / "trunc.jpg")
    with pytest.raises(BadImageError) as ei:
        load_rgb(trunc)
    assert str(trunc) in str(ei.value) and "skip_bad=True" in str(ei.value)
    assert ei.value.path == trunc
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"definitely not a jpeg")
    with pytest.raises(BadImageError, match="junk.jpg"):
        load_rgb(junk)
    with pytest.raises(BadImageError, match="no such image"):
        load_rgb(tmp_path / "missing.jpg")
    small = _save(tmp_path / "small.jpg", Image.fromarray(_rand_img(30, 40, 4)))
    with pytest.raises(BadImageError, match="smaller than the 178x218"):
        load_rgb(small, min_size=(178, 218))


# =============================================================================================
# CIFAR-10 (binary records)
# =============================================================================================


def _cifar_tarball(path: Path, per_batch: int = 4, test_n: int = 5, seed: int = 0):
    rng = np.random.default_rng(seed)
    expect = {}
    with tarfile.open(path, "w:gz") as tar:

        def add(name: str, data: bytes):
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        for split, names, n in (
            ("train", [f"data_batch_{i}.bin" for i in range(1, 6)], per_batch),
            ("test", ["test_batch.bin"], test_n),
        ):
            imgs, labs = [], []
            for name in names:
                labels = rng.integers(0, 10, size=n, dtype=np.uint8)
                images = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
                rec = np.concatenate([labels[:, None], images.reshape(n, -1)], axis=1)
                add(name, rec.tobytes())
                imgs.append(images)
                labs.append(labels.astype(np.int64))
            expect[split] = (np.concatenate(imgs), np.concatenate(labs))
        add("batches.meta.txt", b"airplane\nautomobile\n")
    return expect


def test_cifar10_binary_records_exact(tmp_path):
    archive = tmp_path / "cifar-10-binary.tar.gz"
    expect = _cifar_tarball(archive)
    out = tmp_path / "data" / "cifar10"
    ms = prepare_cifar10(out, SourceInput(archive, md5=None), options=QUIET)
    assert set(ms) == {"train", "test"}
    for split, (images, labels) in expect.items():
        verify_split(out / split)
        got_images, got_labels = load_split_arrays(out / split)
        assert got_images.dtype == np.uint8 and got_images.shape == (len(images), 3, 32, 32)
        assert got_labels.dtype == np.int64
        np.testing.assert_array_equal(got_images, images)
        np.testing.assert_array_equal(got_labels, labels)
        assert ms[split].meta["count"] == len(images) and ms[split].meta["md5_verified"] is False
    assert ms["train"].count == 20 and ms["test"].count == 5


def test_cifar10_checksum_verified_by_default(tmp_path):
    archive = tmp_path / "cifar-10-binary.tar.gz"
    _cifar_tarball(archive)
    with pytest.raises(ChecksumMismatch) as ei:  # the default md5 is the official one
        prepare_cifar10(tmp_path / "out", SourceInput(archive), options=QUIET)
    assert ei.value.expected == CIFAR_MD5 and str(archive) in str(ei.value)
    assert not (tmp_path / "out").exists()


def test_cifar10_download_over_http_and_no_overwrite(tmp_path, http_dir):
    import hashlib

    www, url = http_dir
    expect = _cifar_tarball(www / "cifar-10-binary.tar.gz", seed=3)
    md5 = hashlib.md5((www / "cifar-10-binary.tar.gz").read_bytes()).hexdigest()
    out, dl = tmp_path / "cifar10", tmp_path / "downloads"
    prepare_cifar10(out, SourceInput(download_dir=dl, md5=md5), url=f"{url}/cifar-10-binary.tar.gz", options=QUIET)
    assert (dl / "cifar-10-binary.tar.gz").is_file()
    np.testing.assert_array_equal(load_split_arrays(out / "test")[1], expect["test"][1])
    before = (out / "train" / "manifest.json").read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        prepare_cifar10(out, SourceInput(www / "cifar-10-binary.tar.gz", md5=None), options=QUIET)
    assert (out / "train" / "manifest.json").read_bytes() == before
    _cifar_tarball(www / "other.tar.gz", seed=4)
    prepare_cifar10(
        out, SourceInput(www / "other.tar.gz", md5=None), options=PrepareOptions(overwrite=True, progress=False)
    )
    assert (out / "train" / "manifest.json").read_bytes() != before


def test_cifar10_rejects_pickle_version_and_corrupt_records(tmp_path):
    py = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(py, "w:gz") as tar:
        info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    with pytest.raises(ValueError, match="pickle"):
        prepare_cifar10(tmp_path / "o1", SourceInput(py, md5=None), options=QUIET)
    bad = tmp_path / "bad.tar.gz"
    with tarfile.open(bad, "w:gz") as tar:
        for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = 3000
            tar.addfile(info, io.BytesIO(bytes(3000)))
    with pytest.raises(ValueError, match="3073-byte"):
        prepare_cifar10(tmp_path / "o2", SourceInput(bad, md5=None), options=QUIET)


# =============================================================================================
# ImageNet (class folders, tar of class tars, s3://)
# =============================================================================================

RES = 16


@pytest.fixture
def imagenet_root(tmp_path):
    """train/ with 3 class folders: sizes and modes vary, one nested file, one truncated file,
    one image smaller than the crop. Returns (root, good files in row order, their labels)."""
    train = tmp_path / "imagenet" / "train"
    a, b, c = train / "n01440764", train / "n01443537", train / "n01484850"
    files = [
        (_save(a / "n01440764_1.JPEG", Image.fromarray(_rand_img(80, 60, 10))), 0),
        (_save(a / "n01440764_2.JPEG", Image.fromarray(_rand_img(50, 90, 11))), 0),
        (_save(a / "sub" / "n01440764_3.JPEG", Image.fromarray(_rand_img(40, 40, 12))), 0),
        (_save(b / "n01443537_1.JPEG", Image.fromarray(_rand_img(70, 50, 13)[..., 0])), 1),  # L
        (_save(b / "n01443537_2.JPEG", Image.fromarray(_rand_img(64, 48, 14)).convert("CMYK")), 1),
        (
            _save(
                c / "n01484850_1.png",
                Image.fromarray(np.dstack([_rand_img(33, 45, 15), np.full((45, 33), 128, np.uint8)]), "RGBA"),
                "PNG",
            ),
            2,
        ),
        (_save(c / "n01484850_2.JPEG", Image.fromarray(_rand_img(12, 10, 16))), 2),  # < RES
    ]
    _truncated_jpeg(c / "n01484850_9.JPEG")
    (a / "notes.txt").write_text("not an image")
    return tmp_path / "imagenet", [f for f, _ in files], np.array([l for _, l in files])


def _expected_rows(paths, fn):
    return np.stack([_chw(fn(load_rgb(p))) for p in paths])


def test_imagenet_bad_file_raises_and_writes_nothing(imagenet_root, tmp_path):
    root, _, _ = imagenet_root
    out = tmp_path / "out"
    with pytest.raises(BadImageError) as ei:
        prepare_imagenet(out, SourceInput(root), RES, options=QUIET)
    assert "n01484850_9.JPEG" in str(ei.value) and "skip_bad=True" in str(ei.value)
    assert not (out / "train").exists()
    assert not list(out.glob(".*"))  # no scratch or temp split left behind


def test_imagenet_skip_bad_labels_pixels_and_meta(imagenet_root, tmp_path):
    root, paths, labels = imagenet_root
    out = tmp_path / "out"
    m = prepare_imagenet(out, SourceInput(root), RES, options=PrepareOptions(skip_bad=True, progress=False))["train"]
    verify_split(out / "train")
    images, got_labels = load_split_arrays(out / "train")
    assert images.shape == (7, 3, RES, RES) and images.dtype == np.uint8
    np.testing.assert_array_equal(got_labels, labels)
    np.testing.assert_array_equal(images, _expected_rows(paths, functools.partial(center_crop_arr, image_size=RES)))
    assert m.meta["skipped"] == [{"file": "n01484850/n01484850_9.JPEG", "error": m.meta["skipped"][0]["error"]}]
    assert "truncated" in m.meta["skipped"][0]["error"]
    assert m.meta["num_skipped"] == 1 and m.meta["count"] == 7
    assert m.meta["classes"] == ["n01440764", "n01443537", "n01484850"]
    assert m.meta["num_upsampled"] == 1 and m.meta["flip"] == {"stored": False}
    assert m.fields["labels"].stats["counts"] == {"0": 3, "1": 2, "2": 2}
    assert m.name == f"imagenet{RES}"


def test_imagenet_flip_rows_and_train_folder_root(imagenet_root, tmp_path):
    root, paths, labels = imagenet_root
    out = tmp_path / "out"
    m = prepare_imagenet(
        out, SourceInput(root / "train"), RES, flip=True, options=PrepareOptions(skip_bad=True, progress=False)
    )["train"]
    ds = ShardedArrays(out / "train")
    images = ds.field("images")
    n = len(paths)
    assert m.count == 2 * n and m.meta["flip"]["stored"] is True
    np.testing.assert_array_equal(images[n:], images[:n, :, :, ::-1])
    np.testing.assert_array_equal(ds.field("labels"), np.concatenate([labels, labels]))
    np.testing.assert_array_equal(ds.field("flipped"), np.repeat([0, 1], n).astype(np.uint8))


def test_imagenet_missing_root_explains(tmp_path):
    for root in (None, tmp_path / "nowhere"):
        with pytest.raises(FileNotFoundError) as ei:
            prepare_imagenet(tmp_path / "out", SourceInput(root), 256, options=QUIET)
        msg = str(ei.value)
        assert "image-net.org" in msg and "imagenet256.data.root" in msg
        assert "train/" in msg and "ILSVRC2012_img_train.tar" in msg


def test_imagenet_parallel_workers_match_serial(imagenet_root, tmp_path):
    root, paths, _ = imagenet_root
    fn = functools.partial(center_crop_arr, image_size=RES)
    serial = np.zeros((len(paths), 3, RES, RES), np.uint8)
    parallel = np.zeros_like(serial)
    crop = Crop(fn, (3, RES, RES))
    r0 = preprocess_images(paths, crop, serial, QUIET)
    r2 = preprocess_images(paths, crop, parallel, PrepareOptions(num_workers=2, progress=False), batch=2)
    np.testing.assert_array_equal(serial, parallel)
    np.testing.assert_array_equal(r0.kept, r2.kept)
    np.testing.assert_array_equal(r0.sizes, r2.sizes)


@pytest.fixture
def moto_s3(monkeypatch):
    import boto3
    from moto.server import ThreadedMotoServer

    srv = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    host, port = srv.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    for k, v in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "UVIT_S3_ENDPOINT_URL": endpoint,
    }.items():
        monkeypatch.setenv(k, v)
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket="datasets")
    yield client
    srv.stop()


def test_imagenet_tar_of_class_tars_from_s3(imagenet_root, tmp_path, moto_s3):
    root, paths, labels = imagenet_root
    tar_path = tmp_path / "ILSVRC-mini_train.tar"
    with tarfile.open(tar_path, "w") as outer:
        for cls in sorted((root / "train").iterdir()):
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as inner:
                for f in sorted(cls.rglob("*")):
                    if f.is_file() and f.name != "n01484850_9.JPEG":
                        inner.add(f, arcname=f.name)  # official class tars are flat
                evil = tarfile.TarInfo("../../evil.JPEG")
                evil.size = 1
                inner.addfile(evil, io.BytesIO(b"x"))
            info = tarfile.TarInfo(f"{cls.name}.tar")
            info.size = buf.tell()
            buf.seek(0)
            outer.addfile(info, buf)
    moto_s3.upload_file(str(tar_path), "datasets", "imagenet/ILSVRC-mini_train.tar")
    dl = tmp_path / "downloads"
    out = tmp_path / "out"
    m = prepare_imagenet(
        out,
        SourceInput("s3://datasets/imagenet/ILSVRC-mini_train.tar", download_dir=dl),
        RES,
        options=PrepareOptions(skip_bad=True, progress=False),
    )["train"]
    extracted = dl / "ILSVRC-mini_train"
    assert (extracted / ".extracted").is_file()
    assert sorted(p.name for p in (extracted / "train").iterdir()) == m.meta["classes"]
    # '../../evil.JPEG' lands only under its base name inside its class folder (then it is
    # skipped as undecodable), never outside the extraction folder
    evil = sorted(tmp_path.rglob("evil.JPEG"))
    assert evil and all(p.parent.parent == extracted / "train" for p in evil)
    assert m.meta["num_skipped"] == 3  # one per class folder
    images, got = load_split_arrays(out / "train")
    np.testing.assert_array_equal(got, labels)  # flattened 'sub/' keeps the same order
    np.testing.assert_array_equal(images, _expected_rows(paths, functools.partial(center_crop_arr, image_size=RES)))


# =============================================================================================
# CelebA
# =============================================================================================


@pytest.fixture
def celeba_root(tmp_path):
    root = tmp_path / "celeba"
    img_dir = root / "img_align_celeba"
    names = [f"{i:06d}.jpg" for i in range(1, 7)]
    for i, name in enumerate(names):
        _save(img_dir / name, Image.fromarray(_rand_img(178, 218, 100 + i)))
    (root / "list_eval_partition.txt").write_text("".join(f"{n} {p}\n" for n, p in zip(names, [0, 0, 0, 0, 1, 2])))
    return root, img_dir, names


def test_celeba_train_split_pixels(celeba_root, tmp_path):
    import torchvision.transforms as T
    import torchvision.transforms.functional as F

    root, img_dir, names = celeba_root
    out = tmp_path / "out"
    ms = prepare_celeba(out, root, splits=("train", "test"), options=QUIET)
    assert set(ms) == {"train", "test"}
    train = ShardedArrays(out / "train", verify=True)
    assert len(train) == 4 and list(train.field_names) == ["images"]
    ref = np.stack(
        [_chw(np.asarray(T.Resize(64)(F.crop(Image.open(img_dir / n), 57, 25, 128, 128)))) for n in names[:4]]
    )
    np.testing.assert_array_equal(train.field("images"), ref)
    assert ms["test"].count == 1 and ms["train"].meta["expected_count"] == 162_770


def test_celeba_small_image_error_and_skip(celeba_root, tmp_path):
    root, img_dir, names = celeba_root
    _save(img_dir / names[1], Image.fromarray(_rand_img(100, 120, 7)))  # smaller than 178x218
    with pytest.raises(BadImageError) as ei:
        prepare_celeba(tmp_path / "out", root, options=QUIET)
    assert names[1] in str(ei.value) and "smaller" in str(ei.value)
    m = prepare_celeba(tmp_path / "out", root, options=PrepareOptions(skip_bad=True, progress=False))["train"]
    assert m.count == 3 and [s["file"] for s in m.meta["skipped"]] == [names[1]]
    (img_dir / names[2]).unlink()  # listed but missing
    m = prepare_celeba(tmp_path / "out", root, options=PrepareOptions(overwrite=True, skip_bad=True, progress=False))[
        "train"
    ]
    assert [s["file"] for s in m.meta["skipped"]] == [names[1], names[2]]


def test_celeba_missing_root_and_partition_formats(tmp_path):
    with pytest.raises(FileNotFoundError) as ei:
        prepare_celeba(tmp_path / "out", tmp_path / "nope", options=QUIET)
    msg = str(ei.value)
    for word in ("Google Drive", "Kaggle", "img_align_celeba", "list_eval_partition.txt", "celeba64.data.root"):
        assert word in msg
    csv = tmp_path / "list_eval_partition.csv"
    csv.write_text("image_id,partition\n000001.jpg,0\n000002.jpg,2\n")
    assert read_partition(csv) == [("000001.jpg", 0), ("000002.jpg", 2)]
    bad = tmp_path / "list_eval_partition.txt"
    bad.write_text("000001.jpg 0\n000002.jpg seven\n")
    with pytest.raises(ValueError, match=r"list_eval_partition.txt:2"):
        read_partition(bad)


# =============================================================================================
# MS-COCO
# =============================================================================================

COCO_RES = 32


@pytest.fixture
def coco_root(tmp_path):
    root = tmp_path / "coco"
    specs = {"train": [(9, (64, 48), "RGB"), (25, (40, 60), "L"), (3, (50, 50), "RGB")], "val": [(42, (70, 30), "RGB")]}
    captions = {
        9: ["A cat on a mat.", "Un café ☕ près de la fenêtre"],
        25: ["A dog."],
        3: ["Three", "captions", "here  "],
        42: ["Validation image."],
    }
    for split, imgs in specs.items():
        images, anns = [], []
        for image_id, (w, h), mode in imgs:
            name = f"COCO_{split}2014_{image_id:012d}.jpg"
            arr = _rand_img(w, h, image_id)
            _save(root / f"{split}2014" / name, Image.fromarray(arr if mode == "RGB" else arr[..., 0]))
            images.append({"id": image_id, "file_name": name, "width": w, "height": h})
        for image_id, _, _ in imgs:
            for cap in captions[image_id]:
                anns.append({"id": len(anns) + 1000, "image_id": image_id, "caption": cap})
        ann_dir = root / "annotations"
        ann_dir.mkdir(parents=True, exist_ok=True)
        (ann_dir / f"captions_{split}2014.json").write_text(json.dumps({"images": images, "annotations": anns}))
    return root, captions


def test_coco_images_captions_ids(coco_root, tmp_path):
    root, captions = coco_root
    out = tmp_path / "out"
    ms = prepare_coco(out, root, COCO_RES, options=QUIET)
    train = ShardedArrays(out / "train", verify=True)
    np.testing.assert_array_equal(train.field("image_ids"), [3, 9, 25])  # ascending ids
    np.testing.assert_array_equal(train.field("num_captions"), [3, 2, 1])
    caps = train.field("captions")
    assert caps.dtype.kind == "U" and caps.shape == (3, 3)
    for row, image_id in enumerate([3, 9, 25]):
        k = int(train.field("num_captions")[row])
        assert list(caps[row, :k]) == captions[image_id]
        assert all(c == "" for c in caps[row, k:])
    files = [root / "train2014" / f"COCO_train2014_{i:012d}.jpg" for i in (3, 9, 25)]
    np.testing.assert_array_equal(
        train.field("images"), _expected_rows(files, functools.partial(coco_crop, size=COCO_RES))
    )
    assert train.field("images").shape == (3, 3, COCO_RES, COCO_RES)
    assert ms["val"].count == 1 and ms["train"].meta["num_captions_total"] == 6
    assert Manifest.load(out / "val").meta["expected_count"] == 40_504


def test_coco_bad_annotations(coco_root, tmp_path):
    root, _ = coco_root
    ann = root / "annotations" / "captions_train2014.json"
    good = ann.read_text()
    ann.write_text(good[:-20])
    with pytest.raises(AnnotationError) as ei:
        prepare_coco(tmp_path / "out", root, COCO_RES, splits=("train",), options=QUIET)
    assert str(ann) in str(ei.value) and "not valid JSON" in str(ei.value)
    data = json.loads(good)
    data["annotations"].append({"id": 7, "image_id": 12345, "caption": "orphan"})
    ann.write_text(json.dumps(data))
    with pytest.raises(AnnotationError, match="image id 12345"):
        prepare_coco(tmp_path / "out", root, COCO_RES, splits=("train",), options=QUIET)
    ann.write_text(json.dumps({"images": "nope"}))
    with pytest.raises(AnnotationError, match="'images' and 'annotations'"):
        prepare_coco(tmp_path / "out", root, COCO_RES, splits=("train",), options=QUIET)
    assert not (tmp_path / "out" / "train").exists()


def test_coco_missing_image_error_and_skip(coco_root, tmp_path):
    root, _ = coco_root
    missing = root / "train2014" / "COCO_train2014_000000000009.jpg"
    missing.unlink()
    with pytest.raises(BadImageError) as ei:
        prepare_coco(tmp_path / "out", root, COCO_RES, splits=("train",), options=QUIET)
    assert "image id 9" in str(ei.value) and str(missing) in str(ei.value)
    _truncated_jpeg(root / "train2014" / "COCO_train2014_000000000025.jpg")
    m = prepare_coco(
        tmp_path / "out", root, COCO_RES, splits=("train",), options=PrepareOptions(skip_bad=True, progress=False)
    )["train"]
    assert m.count == 1
    assert [(s["image_id"], s["file"]) for s in m.meta["skipped"]] == [
        (9, "COCO_train2014_000000000009.jpg"),
        (25, "COCO_train2014_000000000025.jpg"),
    ]
    np.testing.assert_array_equal(ShardedArrays(tmp_path / "out" / "train").field("image_ids"), [3])
    with pytest.raises(FileNotFoundError, match="mscoco256.data.root"):
        prepare_coco(tmp_path / "o2", tmp_path / "nope", options=QUIET)


# =============================================================================================
# Bad inputs through the data stage: one CLI error line naming the key, nothing half-written
# =============================================================================================

REPO = Path(__file__).resolve().parents[1]


def _stage_params(benchmark: str, data: dict) -> dict:
    from uvit.config import load_params
    from uvit.miniature import merge_params

    return merge_params({benchmark: load_params(REPO / "params.yaml")[benchmark]}, {benchmark: {"data": data}})


def _cli_data(benchmark: str, data: dict, tmp: Path) -> str:
    """`uvit data <benchmark>` (the console script) in tmp; returns its one stderr line."""
    import os
    import subprocess
    import sys

    import yaml

    (tmp / "params.yaml").write_text(yaml.safe_dump(_stage_params(benchmark, data)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            str(Path(sys.executable).parent / "uvit"),
            "data",
            benchmark,
            "--params",
            str(tmp / "params.yaml"),
            "--root",
            str(tmp / "project"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and lines[0].startswith(f"error: [data {benchmark}] "), proc.stderr
    data_dir = tmp / "project" / "data"
    assert not data_dir.exists() or not list(data_dir.iterdir())  # no split, no scratch folder
    return lines[0]


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_cli_wrong_archive_version_is_one_line(tmp_path):
    py = tmp_path / "cifar-10-python.tar.gz"  # the pickle version, its checksum declared: right file, wrong format
    with tarfile.open(py, "w:gz") as tar:
        for name in ("data_batch_1", "test_batch", "batches.meta"):
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = 3
            tar.addfile(info, io.BytesIO(b"abc"))
    line = _cli_data("cifar10", {"root": str(py), "sha256": _sha256(py)}, tmp_path)
    assert "BadSourceError" in line and f"cifar10.data.root={py}" in line and "pickle" in line


def test_cli_unreadable_image_is_one_line(imagenet_root, tmp_path):
    root, _, _ = imagenet_root  # holds a truncated JPEG
    line = _cli_data("imagenet64", {"root": str(root)}, tmp_path)
    assert "BadImageError" in line and "n01484850_9.JPEG" in line and "imagenet64.data.root=" in line


def test_cli_missing_root_is_one_line(tmp_path):
    line = _cli_data("celeba64", {"root": str(tmp_path / "nowhere")}, tmp_path)
    assert "FileNotFoundError" in line and f"celeba64.data.root={tmp_path / 'nowhere'}" in line
    assert "img_align_celeba" in line  # says what to provide


def test_data_stage_bad_inputs_are_user_errors(coco_root, tmp_path):
    from uvit.cli import _user_errors
    from uvit.config import ConfigError, load_benchmark
    from uvit.paths import BenchmarkPaths
    from uvit.stages.data import run_data

    root, _ = coco_root
    (root / "val2014" / "COCO_val2014_000000000042.jpg").unlink()  # listed in captions_val2014.json
    cfg = load_benchmark("mscoco256", _stage_params("mscoco256", {"root": str(root)}))
    paths = BenchmarkPaths("mscoco256", tmp_path)
    with pytest.raises(BadImageError) as ei:  # train is written first, then val fails
        run_data(cfg, paths)
    assert isinstance(ei.value, _user_errors()) and str(ei.value).startswith(f"mscoco256.data.root={root}: ")
    assert "image id 42" in str(ei.value)
    assert not list((tmp_path / "data").iterdir())  # train, written before val failed, is gone too
    # a checksum declared for a folder root is a parameter error, before anything is read
    cfg = load_benchmark("mscoco256", _stage_params("mscoco256", {"root": str(root), "sha256": "a" * 64}))
    with pytest.raises(ConfigError, match="mscoco256.data.sha256"):
        run_data(cfg, paths)
    with pytest.raises(ConfigError, match="sha256"):  # not a hex digest
        load_benchmark("cifar10", _stage_params("cifar10", {"sha256": "abc"}))


def test_truncated_cifar_archive_is_a_bad_source(tmp_path):
    from uvit.data.download import BadSourceError
    from uvit.data.shards import DataIntegrityError

    archive = tmp_path / "cifar-10-binary.tar.gz"
    _cifar_tarball(archive)
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(BadSourceError, match="truncated or corrupt") as ei:
        prepare_cifar10(tmp_path / "out", SourceInput(archive, md5=None), options=QUIET)
    assert isinstance(ei.value, DataIntegrityError) and isinstance(ei.value, ValueError)


def test_cifar_declared_sha256_replaces_the_official_md5(tmp_path):
    archive = tmp_path / "cifar-10-binary.tar.gz"
    _cifar_tarball(archive)
    ms = prepare_cifar10(tmp_path / "out", SourceInput(archive, md5=None, sha256=_sha256(archive)), options=QUIET)
    assert ms["train"].meta["sha256_verified"] is True and ms["train"].meta["archive_sha256"] == _sha256(archive)
    with pytest.raises(ChecksumMismatch) as ei:
        prepare_cifar10(tmp_path / "out2", SourceInput(archive, md5=None, sha256="1" * 64), options=QUIET)
    assert ei.value.expected == "1" * 64


def _class_tar(path: Path, classes: dict[str, list[np.ndarray]]) -> Path:
    with tarfile.open(path, "w") as outer:
        for wnid, images in classes.items():
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as inner:
                for i, img in enumerate(images):
                    data = io.BytesIO()
                    Image.fromarray(img).save(data, "PNG")
                    info = tarfile.TarInfo(f"{wnid}_{i}.png")
                    info.size = data.tell()
                    data.seek(0)
                    inner.addfile(info, data)
            info = tarfile.TarInfo(f"{wnid}.tar")
            info.size = buf.tell()
            buf.seek(0)
            outer.addfile(info, buf)
    return path


def test_imagenet_tar_replaced_is_verified_and_extracted_afresh(tmp_path):
    from uvit.data.sources.imagenet import TRAIN_TAR, TRAIN_TAR_MD5

    tar = tmp_path / "in" / TRAIN_TAR
    tar.parent.mkdir()
    a = {"n00000001": [_rand_img(20, 20, 1), _rand_img(20, 20, 2)], "n00000002": [_rand_img(20, 20, 3)]}
    _class_tar(tar, a)
    dl = tmp_path / "dl"
    with pytest.raises(ChecksumMismatch) as ei:  # the official name: the official MD5 unless one is declared
        prepare_imagenet(tmp_path / "o0", SourceInput(tar, download_dir=dl), RES, options=QUIET)
    assert ei.value.expected == TRAIN_TAR_MD5
    m = prepare_imagenet(tmp_path / "o1", SourceInput(tar, download_dir=dl, sha256=_sha256(tar)), RES, options=QUIET)[
        "train"
    ]
    assert m.count == 3 and m.meta["classes"] == ["n00000001", "n00000002"]
    # another tar at the same path: its classes replace the first one's (none left over)
    b = {"n00000003": [_rand_img(20, 20, 4)], "n00000004": [_rand_img(20, 20, 5), _rand_img(20, 20, 6)]}
    _class_tar(tar, b)
    with pytest.raises(ChecksumMismatch):  # verified again although an extraction exists
        prepare_imagenet(
            tmp_path / "o2", SourceInput(tar, download_dir=dl, md5=None, sha256="2" * 64), RES, options=QUIET
        )
    m = prepare_imagenet(
        tmp_path / "o3", SourceInput(tar, download_dir=dl, md5=None, sha256=_sha256(tar)), RES, options=QUIET
    )["train"]
    assert m.meta["classes"] == ["n00000003", "n00000004"] and m.count == 3
    images, labels = load_split_arrays(tmp_path / "o3" / "train")
    np.testing.assert_array_equal(labels, [0, 1, 1])
    np.testing.assert_array_equal(images[0], _chw(center_crop_arr(Image.fromarray(b["n00000003"][0]), RES)))
    with pytest.raises(BadSourceError, match="folder"):  # a folder root takes no checksum
        prepare_imagenet(
            tmp_path / "o4", SourceInput(dl / TRAIN_TAR.removesuffix(".tar"), sha256=_sha256(tar)), RES, options=QUIET
        )
