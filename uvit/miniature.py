"""A miniature of every paper chain: small inputs in each source's real on-disk format, tiny
random-weight stand-ins in the real weight-file formats, and the params that make each chain
(data -> validate -> encode -> train -> sample -> score -> report -> publish) run on a CPU in
seconds per stage. For checking a machine or cluster before a multi-day run, and for CI.

:func:`write_miniature` writes, under ``dest``:

    cifar10/cifar-10-binary.tar.gz           the binary tarball layout (data_batch_{1..5}.bin, test_batch.bin,
                                             batches.meta.txt; 1 label byte + 3072 pixel bytes per record)
    celeba/img_align_celeba/*.jpg            178x218 JPEGs, plus celeba/list_eval_partition.txt
    imagenet/{train,val}/<wnid>/*.JPEG       ImageNet class folders (imagenet64, imagenet512)
    imagenet-tar/ILSVRC2012_img_train.tar    the official tar-of-class-tars layout (imagenet256)
    coco/{train2014,val2014}/*.jpg           MS-COCO 2014 folders, plus coco/annotations/captions_*2014.json
    weights/inception/weights-inception-2015-12-05-6726825d.pth   a torch-fidelity InceptionV3 state dict
    weights/autoencoder_kl.pth               a KL-f8 autoencoder with LDM key names (the official file's format)
    weights/clip-text-encoder/               CLIPTextModel + CLIPTokenizer files (hidden size 768, one layer)
    weights/clip-model/                      CLIPModel + CLIPProcessor files (the CLIP score)

and returns, per benchmark, the params overrides to merge into its ``params.yaml`` block
(:func:`merge_params`). The miniature is a set of params, not a code path: the archives pass
their checksum because the params declare it (``data.sha256``); the official checksums still
guard the official archives. Everything is seeded: two calls write identical bytes (with the
same library versions).
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import io
import json
import shutil
import tarfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from uvit.config import PAPER_BENCHMARKS

__all__ = ["PAPER_BENCHMARKS", "PROJECT_FILES", "make_project", "merge_params", "write_miniature"]

# What a copy of the project needs to run its DVC chains: the DVC files and params, the code they
# depend on (paths in the stage table), and the Prefect files.
PROJECT_FILES = (
    "dvc.yaml",
    "paper",
    "studies",
    ".dvcignore",
    ".gitignore",
    "params.yaml",
    "pyproject.toml",
    "prefect.yaml",
    "uvit",
    "pipelines",
)

MARKER = "MINIATURE.json"  # marks dest as ours (written first), so a re-run may replace what it wrote

# Sizes of the miniature (rows the data stage writes).
CIFAR_TRAIN_PER_CLASS, CIFAR_TEST_PER_CLASS = 3, 1  # 30 train, 10 test rows
CELEBA_PARTITION = (24, 4, 4)  # train, valid, test images
IMAGENET_CLASSES = ("n01440764", "n01443537", "n01484850", "n01491361")  # the first four sorted synsets
IMAGENET_TRAIN_PER_CLASS, IMAGENET_VAL_PER_CLASS = 3, 1
COCO_IMAGES = {"train": 8, "val": 8}
COCO_CAPTIONS_PER_IMAGE = 5

_SMALL_UVIT = {"embed_dim": 32, "depth": 2, "num_heads": 2}  # preset's img_size/patch_size/in_chans kept
_TRAIN = {
    "steps": 4,
    "batch_size": 8,
    "warmup_steps": 2,
    "num_workers": 1,
    "threads_per_worker": 1,
    "use_gpu": False,
    "precision": "fp32",
    "checkpoint_every": 2,
    "log_every": 1,
}
_SAMPLE_STEPS = 4
_WORDS = (
    "a",
    "an",
    "the",
    "two",
    "cat",
    "dog",
    "bird",
    "horse",
    "red",
    "green",
    "blue",
    "small",
    "big",
    "sitting",
    "standing",
    "running",
    "on",
    "in",
    "near",
    "under",
    "mat",
    "grass",
    "table",
    "road",
    "field",
    "with",
    "of",
    "and",
    "at",
    "picture",
    "photo",
)
_CAPTION_SUBJECTS = ("a cat", "a dog", "two birds", "a horse", "a small dog", "a big cat", "the bird", "a red horse")
_CAPTION_VERBS = ("sitting on", "standing in", "running near", "under", "on")
_CAPTION_PLACES = ("a green mat", "the grass", "a blue table", "the road", "a big field")


# --------------------------------------------------------------------------------------------
# Pixels
# --------------------------------------------------------------------------------------------


def _picture(rng: np.random.Generator, width: int, height: int, tint: np.ndarray | None = None) -> np.ndarray:
    """uint8 (height, width, 3): a smooth random colour field (a 4x4 grid, bicubic-upsampled) with
    mild noise, pulled towards ``tint`` (a class colour) so that classes differ."""
    grid = rng.integers(0, 256, size=(4, 4, 3)).astype(np.float64)
    if tint is not None:
        grid = 0.5 * grid + 0.5 * tint
    smooth = np.asarray(Image.fromarray(grid.clip(0, 255).astype(np.uint8)).resize((width, height), Image.BICUBIC))
    noisy = smooth.astype(np.float64) + rng.normal(0, 8, size=smooth.shape)
    return noisy.clip(0, 255).round().astype(np.uint8)


def _class_tints(k: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(k, 3)).astype(np.float64)


def _jpeg(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """One regular file with fixed metadata (no mtime, owner): the same bytes on every call."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------


def _write_cifar10(dest: Path) -> tuple[Path, dict]:
    """cifar-10-binary.tar.gz with every class in every batch; returns (path, rows per split)."""
    from uvit.data.sources.cifar10 import ARCHIVE_NAME, CLASSES, SPLIT_FILES

    rng = np.random.default_rng(10)
    tints = _class_tints(10, 11)
    path = dest / "cifar10" / ARCHIVE_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    per_file = {"train": CIFAR_TRAIN_PER_CLASS * 10 // len(SPLIT_FILES["train"]), "test": CIFAR_TEST_PER_CLASS * 10}
    with (
        open(path, "wb") as raw,
        gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.USTAR_FORMAT) as tar,
    ):
        for split in ("train", "test"):
            for j, fname in enumerate(SPLIT_FILES[split]):  # every class equally often in the split
                labels = (j * per_file[split] + np.arange(per_file[split])) % 10
                records = [
                    np.concatenate([[lab], _picture(rng, 32, 32, tints[lab]).transpose(2, 0, 1).ravel()])
                    for lab in labels
                ]
                _tar_add(tar, f"cifar-10-batches-bin/{fname}", np.stack(records).astype(np.uint8).tobytes())
        _tar_add(tar, "cifar-10-batches-bin/batches.meta.txt", ("\n".join(CLASSES) + "\n\n").encode())
    return path, {s: per_file[s] * len(SPLIT_FILES[s]) for s in ("train", "test")}


def _write_celeba(dest: Path) -> Path:
    root = dest / "celeba"
    rng = np.random.default_rng(20)
    lines = []
    for i, part in enumerate(p for p, n in enumerate(CELEBA_PARTITION) for _ in range(n)):
        name = f"{i + 1:06d}.jpg"
        _write(root / "img_align_celeba" / name, _jpeg(_picture(rng, 178, 218)))
        lines.append(f"{name} {part}\n")
    (root / "list_eval_partition.txt").write_text("".join(lines))
    return root


def _imagenet_images(seed: int, per_class: int) -> dict[str, list[tuple[str, bytes]]]:
    """{wnid: [(file stem index, JPEG bytes)]}, sizes varying around 500x400 like ImageNet's."""
    rng = np.random.default_rng(seed)
    tints = _class_tints(len(IMAGENET_CLASSES), seed + 1)
    sizes = ((560, 520), (520, 600), (640, 540), (600, 600))
    out = {}
    for c, wnid in enumerate(IMAGENET_CLASSES):
        out[wnid] = [_jpeg(_picture(rng, *sizes[(c + i) % len(sizes)], tints[c])) for i in range(per_class)]
    return out


def _write_imagenet_folders(dest: Path) -> Path:
    root = dest / "imagenet"
    for wnid, images in _imagenet_images(30, IMAGENET_TRAIN_PER_CLASS).items():
        for i, data in enumerate(images):
            _write(root / "train" / wnid / f"{wnid}_{i + 1}.JPEG", data)
    n = 0
    for wnid, images in _imagenet_images(31, IMAGENET_VAL_PER_CLASS).items():  # val sorted into class folders
        for data in images:
            n += 1
            _write(root / "val" / wnid / f"ILSVRC2012_val_{n:08d}.JPEG", data)
    return root


def _write_imagenet_tar(dest: Path) -> Path:
    """ILSVRC2012_img_train.tar: a tar of flat per-class tars nXXXXXXXX.tar (the official layout)."""
    from uvit.data.sources.imagenet import TRAIN_TAR

    path = dest / "imagenet-tar" / TRAIN_TAR
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as outer:
        for wnid, images in _imagenet_images(40, IMAGENET_TRAIN_PER_CLASS).items():
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as inner:
                for i, data in enumerate(images):
                    _tar_add(inner, f"{wnid}_{i + 1}.JPEG", data)
            _tar_add(outer, f"{wnid}.tar", buf.getvalue())
    return path


def _captions(rng: np.random.Generator, n: int) -> list[str]:
    return [
        f"{rng.choice(_CAPTION_SUBJECTS)} {rng.choice(_CAPTION_VERBS)} {rng.choice(_CAPTION_PLACES)}" for _ in range(n)
    ]


def _write_coco(dest: Path) -> Path:
    root = dest / "coco"
    rng = np.random.default_rng(50)
    sizes = ((640, 480), (480, 640), (500, 375), (427, 640))
    ann_id = 0
    for split, n in COCO_IMAGES.items():
        images, annotations = [], []
        for i in range(n):
            image_id = 9 + 17 * i + (0 if split == "train" else 100_000)
            w, h = sizes[i % len(sizes)]
            name = f"COCO_{split}2014_{image_id:012d}.jpg"
            _write(root / f"{split}2014" / name, _jpeg(_picture(rng, w, h)))
            images.append({"license": 1, "file_name": name, "height": h, "width": w, "id": image_id})
            for caption in _captions(rng, COCO_CAPTIONS_PER_IMAGE):
                ann_id += 1
                annotations.append({"image_id": image_id, "id": ann_id, "caption": caption})
        doc = {
            "info": {"description": "uvit miniature of COCO 2014 captions", "year": 2014},
            "licenses": [{"id": 1, "name": "none"}],
            "images": images,
            "annotations": annotations,
        }
        _write(root / "annotations" / f"captions_{split}2014.json", json.dumps(doc).encode())
    return root


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------


def write_random_inception(path: Path, seed: int = 60) -> Path:
    """torch-fidelity's InceptionV3 with random weights, saved at `path` as the state dict its
    loader reads. Convs are kaiming-initialised: PyTorch's default init gives near-zero pool3
    features after 90+ layers (FID 0.0 between anything)."""
    from unittest import mock

    import torch
    from torch_fidelity import FeatureExtractorInceptionV3

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    empty = path.with_name(f".{path.name}.empty.pth")
    torch.save({}, empty)
    try:  # the constructor insists on loading weights: give it none
        with (
            torch.random.fork_rng(devices=[]),
            mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None),
        ):
            torch.manual_seed(seed)
            model = FeatureExtractorInceptionV3(
                "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty)
            )
            for m in model.modules():
                if isinstance(m, torch.nn.Conv2d):
                    torch.nn.init.kaiming_normal_(m.weight)
    finally:
        empty.unlink()
    torch.save(model.state_dict(), path)
    return path


def _write_inception(dest: Path) -> Path:
    from uvit.evaluate.fid import INCEPTION_WEIGHTS_FILE

    return write_random_inception(dest / "weights" / "inception" / INCEPTION_WEIGHTS_FILE)


def _three_sig(x: float) -> float:
    """Calibration factors rounded to 3 significant digits: the same bytes on any thread count."""
    return float(f"{x:.3g}")


def _write_vae(dest: Path, calibration: np.ndarray) -> Path:
    """A 4-level KL-f8 autoencoder with 8 channels per level, saved with LDM key names (the
    format of the official autoencoder_kl.pth). Random, then calibrated on ``calibration``
    (uint8 (N, 3, 256, 256)) so that, like the real VAE, latents times the paper's scale factors
    (0.18215, 0.23010) have std about 1 and decoded images span the pixel range."""
    import torch
    from diffusers import AutoencoderKL

    from uvit.encoders.vae import SCALE_FACTORS, diffusers_to_ldm_vae, pixels_to_unit

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(70)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 8, 8),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=256,
        ).eval()
    target = 2.0 / (SCALE_FACTORS["imagenet"] + SCALE_FACTORS["mscoco"])  # latent std: 1 / mean scale
    with torch.no_grad():
        x = pixels_to_unit(calibration)
        moments = vae.quant_conv(vae.encoder(x))
        mean = moments[:, :4]
        w, b = vae.quant_conv.weight, vae.quant_conv.bias
        for c in range(4):  # mean channels: centred, std `target`
            m, s = float(mean[:, c].mean()), float(mean[:, c].std())
            k = _three_sig(target / s)
            w[c] *= k
            b[c] = (b[c] - _three_sig(m)) * k
        w[4:] *= 0.1  # log-variance channels: small, nearly constant posterior noise (sigma ~ 0.37)
        b[4:] = -2.0
        z = vae.quant_conv(vae.encoder(x))[:, :4]
        out = vae.decoder(vae.post_quant_conv(z))
        wo, bo = vae.decoder.conv_out.weight, vae.decoder.conv_out.bias
        for c in range(3):  # decoded images: centred, std 0.5 in [-1, 1] units
            m, s = float(out[:, c].mean()), float(out[:, c].std())
            k = _three_sig(0.5 / s)
            wo[c] *= k
            bo[c] = (bo[c] - _three_sig(m)) * k
    path = dest / "weights" / "autoencoder_kl.pth"
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().clone().contiguous() for k, v in diffusers_to_ldm_vae(vae.state_dict()).items()}
    torch.save(state, path)
    return path


def _bpe_files(d: Path) -> int:
    """A CLIP BPE vocabulary (vocab.json + merges.txt): letters, plus merges that build the
    captions' words; returns the vocabulary size."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in letters:
        vocab.setdefault(c, len(vocab))
    for c in letters:
        vocab.setdefault(c + "</w>", len(vocab))
    merges: list[str] = []
    for word in _WORDS:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        cur = symbols[0]
        for s in symbols[1:]:
            if f"{cur} {s}" not in merges:
                merges.append(f"{cur} {s}")
            cur += s
            vocab.setdefault(cur, len(vocab))
    d.mkdir(parents=True, exist_ok=True)
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return len(vocab)


def _text_config(vocab_size: int, hidden: int, **kw):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        **kw,
    )


def _write_text_encoder(dest: Path, hidden: int) -> Path:
    """CLIPTextModel (``hidden`` wide: the preset's clip_dim, one layer) + CLIPTokenizer files."""
    import torch
    from transformers import CLIPTextModel, CLIPTokenizer

    d = dest / "weights" / "clip-text-encoder"
    n = _bpe_files(d)
    CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt")).save_pretrained(str(d))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(80)
        model = CLIPTextModel(_text_config(n, hidden, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2))
    model.save_pretrained(str(d))
    return d


def _write_clip_model(dest: Path) -> Path:
    """CLIPModel + CLIPProcessor files (what uvit.evaluate.clip_score.load_clip reads)."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    d = dest / "weights" / "clip-model"
    n = _bpe_files(d)
    tokenizer = CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"))
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(str(d))
    text = _text_config(n, 32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2).to_dict()
    config = CLIPConfig(
        text_config=text,
        projection_dim=16,
        vision_config=dict(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
        ),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(90)
        model = CLIPModel(config)
    model.save_pretrained(str(d))
    return d


def _vae_calibration_images(imagenet: list[Path], coco: Path) -> np.ndarray:
    """The latent benchmarks' images as the VAE sees them at 256x256: uint8 (N, 3, 256, 256)."""
    from uvit.data.preprocess import center_crop_arr, coco_crop, load_rgb

    rows = [center_crop_arr(load_rgb(p), 256) for root in imagenet for p in sorted(root.rglob("*.JPEG"))]
    rows += [coco_crop(load_rgb(p), 256) for p in sorted((coco / "train2014").glob("*.jpg"))]
    return np.stack(rows).transpose(0, 3, 1, 2)


# --------------------------------------------------------------------------------------------
# The miniature
# --------------------------------------------------------------------------------------------


def _sample(num: int, batch: int | None = None) -> dict:
    return {"steps": _SAMPLE_STEPS, "num_samples": num, "batch_size": batch or num}


def _extract_imagenet_tar(tar_path: Path) -> tuple[Path, Path]:
    """The class folders inside the tar, extracted to a scratch folder (for VAE calibration)."""
    import tempfile

    from uvit.data.sources.imagenet import extract_train_tar

    scratch = Path(tempfile.mkdtemp(prefix="uvit-miniature-"))
    return extract_train_tar(tar_path, scratch, progress=False) / "train", scratch


def _claim(dest: Path, benchmarks: tuple[str, ...]) -> dict:
    """Check ``dest`` may be written (empty, absent or ours), clear what an earlier call wrote and
    write the marker first (incomplete), so that an interrupted call may be re-run."""
    if dest.exists() and any(dest.iterdir()) and not (dest / MARKER).is_file():
        raise FileExistsError(f"{dest} is not empty and was not written by write_miniature; choose another folder")
    for sub in ("cifar10", "celeba", "imagenet", "imagenet-tar", "coco", "weights", "downloads"):
        if (dest / sub).is_dir():
            shutil.rmtree(dest / sub)
    dest.mkdir(parents=True, exist_ok=True)
    marker = {"benchmarks": list(benchmarks), "complete": False}
    (dest / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return marker


def _write_datasets(dest: Path, benchmarks: tuple[str, ...]) -> dict[str, Any]:
    """The miniature datasets ``benchmarks`` read (the latent ones also need the ImageNet folders,
    the tar and COCO, to calibrate the VAE): {"cifar10": (path, rows), "celeba64", "imagenet",
    "imagenet-tar", "coco": path}."""
    latent = bool({"imagenet256", "imagenet512", "mscoco256"} & set(benchmarks))
    made: dict[str, Any] = {}
    if "cifar10" in benchmarks:
        made["cifar10"] = _write_cifar10(dest)
    if "celeba64" in benchmarks:
        made["celeba64"] = _write_celeba(dest)
    if {"imagenet64", "imagenet512"} & set(benchmarks) or latent:
        made["imagenet"] = _write_imagenet_folders(dest)
    if "imagenet256" in benchmarks or latent:
        made["imagenet-tar"] = _write_imagenet_tar(dest)
    if "mscoco256" in benchmarks or latent:
        made["coco"] = _write_coco(dest)
    return made


def _write_weights(dest: Path, benchmarks: tuple[str, ...], made: dict[str, Any], inception: Path) -> dict[str, str]:
    """The stand-in weight files besides ``inception`` (written first): {"vae"} for the latent
    benchmarks (one for all, as the official autoencoder_kl.pth), {"text_encoder", "clip_model"}
    for mscoco256."""
    weights = {"inception": str(inception)}
    if {"imagenet256", "imagenet512", "mscoco256"} & set(benchmarks):
        tar_train, scratch = _extract_imagenet_tar(made["imagenet-tar"])
        try:
            calibration = _vae_calibration_images([made["imagenet"] / "train", tar_train], made["coco"])
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        weights["vae"] = str(_write_vae(dest, calibration))
    if "mscoco256" in benchmarks:
        from uvit.models.presets import get_preset

        weights["text_encoder"] = str(_write_text_encoder(dest, get_preset("mscoco256_uvit_s2").config.clip_dim))
        weights["clip_model"] = str(_write_clip_model(dest))
    return weights


def _overrides(b: str, dest: Path, made: dict[str, Any], weights: dict[str, str]) -> dict[str, Any]:
    """The params overrides of benchmark ``b``."""
    score = {"feature_extractor": "inception", "inception_weights": weights["inception"]}
    o: dict[str, Any] = {"model": {"overrides": dict(_SMALL_UVIT)}, "train": dict(_TRAIN), "score": score}
    imagenet_train = len(IMAGENET_CLASSES) * IMAGENET_TRAIN_PER_CLASS
    if b == "cifar10":
        path, rows = made["cifar10"]
        o["data"] = {"root": str(path), "sha256": _sha256(path), "num_classes": 10}
        o["validate"] = {"min_rows": rows["train"]}
        o["sample"] = _sample(20)
    elif b == "celeba64":
        o["data"] = {"root": str(made["celeba64"])}
        o["validate"] = {"min_rows": CELEBA_PARTITION[0]}
        o["sample"] = _sample(16)
    elif b == "imagenet64":
        o["data"] = {"root": str(made["imagenet"]), "num_classes": len(IMAGENET_CLASSES)}
        o["validate"] = {"min_rows": imagenet_train}
        o["sample"] = _sample(16)
    elif b in ("imagenet256", "imagenet512"):
        if b == "imagenet256":  # the tar: its checksum declared, extracted into dest/downloads
            tar = made["imagenet-tar"]
            o["data"] = {"root": str(tar), "sha256": _sha256(tar), "download_dir": str(dest / "downloads")}
        else:
            o["data"] = {"root": str(made["imagenet"])}
        o["data"]["num_classes"] = len(IMAGENET_CLASSES)
        o["encode"] = {"vae": weights["vae"], "batch_size": 8}
        # flips are stored for the latent benchmarks: 2 rows per image
        o["validate"] = {"min_rows": 2 * imagenet_train}
        o["sample"] = {**_sample(8), "vae": weights["vae"]}  # the H configs decode with a second (EMA) VAE file
    elif b == "mscoco256":
        o["data"] = {"root": str(made["coco"])}
        o["encode"] = {"vae": weights["vae"], "text_encoder": weights["text_encoder"], "batch_size": 8}
        o["validate"] = {"min_rows": COCO_IMAGES["train"]}
        o["sample"] = _sample(8)
        o["score"]["clip_model"] = weights["clip_model"]
    return o


def write_miniature(dest: str | Path, benchmarks: Iterable[str] = PAPER_BENCHMARKS) -> dict[str, dict]:
    """Write the miniature inputs of ``benchmarks`` under ``dest`` and return
    ``{benchmark: params overrides}`` (nested dicts, absolute paths), to be merged into each
    benchmark's params block with :func:`merge_params`.

    ``dest`` must be empty, absent, or a folder this function wrote before (its files are then
    replaced). Raises ValueError for a benchmark without a miniature.
    """
    benchmarks = tuple(benchmarks)
    unknown = sorted(set(benchmarks) - set(PAPER_BENCHMARKS))
    if unknown:
        raise ValueError(f"no miniature for {unknown}; choose from {', '.join(PAPER_BENCHMARKS)}")
    dest = Path(dest).resolve()
    marker = _claim(dest, benchmarks)
    # The Inception weights first, then the data, then the other weights: the order fixes the bytes.
    inception = _write_inception(dest)
    made = _write_datasets(dest, benchmarks)
    weights = _write_weights(dest, benchmarks, made, inception)
    out = {b: _overrides(b, dest, made, weights) for b in benchmarks}
    (dest / MARKER).write_text(json.dumps({**marker, "complete": True}, indent=2) + "\n")
    return out


def merge_params(params: dict[str, Any], overrides: dict[str, dict]) -> dict[str, Any]:
    """A copy of ``params`` (a parsed params.yaml) with each benchmark's overrides merged in,
    section by section and key by key (nested mappings such as ``model.overrides`` merged too)."""

    def merge(base: Any, extra: Any) -> Any:
        if isinstance(base, dict) and isinstance(extra, dict):
            return {**base, **{k: merge(base.get(k), v) for k, v in extra.items()}}
        return copy.deepcopy(extra)

    out = copy.deepcopy(params)
    for name, o in overrides.items():
        out[name] = merge(out.get(name, {}), o)
    return out


def make_project(source: str | Path, dest: str | Path, params_patch: dict[str, dict] | None = None) -> Path:
    """A copy of the project at `source` in `dest`, ready for `dvc repro`: its pipeline files
    (PROJECT_FILES), params.yaml with `params_patch` ({benchmark: nested overrides}) merged in, the
    DVC files regenerated for those parameters, and `dest` a git + DVC repository with everything
    committed (so `dvc exp run` works and a Prefect pull step can clone it)."""
    import subprocess
    import sys

    import yaml

    from uvit.config import load_params
    from uvit.stages import dvcfile

    source, dest = Path(source), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        src = source / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        elif src.is_file():
            shutil.copy2(src, dest / name)
    params = merge_params(load_params(source / "params.yaml"), params_patch or {})
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dvcfile.write(dest)

    def run(*cmd: str) -> None:
        subprocess.run(cmd, cwd=dest, check=True, capture_output=True)

    run("git", "init", "-q", "-b", "main")
    run(str(Path(sys.executable).with_name("dvc")), "init", "-q")
    run("git", "add", "-A")
    run("git", "-c", "user.name=uvit", "-c", "user.email=uvit@localhost", "commit", "-q", "-m", "uvit project")
    return dest
