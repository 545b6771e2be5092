"""`uvit generate`: a trained run, a save_pretrained directory or an official .pth gives the sample
stage's pixels for the same seeds and settings, writes the grid, PNGs and samples.npz, and refuses
bad input with one line naming the problem."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from uvit.cli import app
from uvit.config import load_benchmark, load_params
from uvit.evaluate.sample import Condition, SamplingRecipe, generate, load_samples, sample_seeds, to_uint8
from uvit.generate import Overrides, make_labels, parse_classes, resolve_settings
from uvit.models import UViT, UViTConfig, preset_config
from uvit.paths import BenchmarkPaths
from uvit.stages.sample import run_sample
from tiny_vae import tiny_vae_dir

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, ["generate", *map(str, args)])


def _project(root: Path, name: str, edit) -> tuple:
    """A project at `root`: params.yaml with block `name` shrunk by `edit`, and random EMA weights in
    runs/<name>/train/ema (what the train stage leaves)."""
    params = copy.deepcopy(load_params(ROOT / "params.yaml"))
    edit(params[name])
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    cfg = load_benchmark(name, params)
    paths = BenchmarkPaths(name, root)
    torch.manual_seed(0)
    UViT(cfg.uvit_config()).save_pretrained(paths.train / "ema")
    return cfg, paths


def _digits(block: dict) -> None:
    block["model"]["overrides"] = {"embed_dim": 32, "depth": 2, "num_heads": 2}
    block["sample"].update({"steps": 3, "num_samples": 13, "batch_size": 13, "shard_size": 5, "seed": 4})


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """A tiny digits project whose sample stage has run: (cfg, paths, stage images, stage labels)."""
    cfg, paths = _project(tmp_path_factory.mktemp("digits"), "digits", _digits)
    run_sample(cfg, paths)
    images, labels = load_samples(paths.samples / "samples.npz")
    return cfg, paths, images, labels


# ------------------------------------------------------------------------- the stage's pixels
def test_run_and_pretrained_dir_give_the_sample_stages_pixels(digits, tmp_path):
    cfg, paths, want, want_labels = digits
    # The trained run: every default (sampler, steps, guidance, seed, batch) is the digits block's.
    r = invoke(paths.run, "--num", 13, "--out", tmp_path / "run", "-q")
    assert r.exit_code == 0, r.output
    got, labels = load_samples(tmp_path / "run" / "samples.npz")
    assert got.dtype == np.uint8 and np.array_equal(got, want)
    np.testing.assert_array_equal(labels, want_labels)

    # A save_pretrained copy outside the project, every setting given (another batch size: no change).
    shutil.copytree(paths.train / "ema", tmp_path / "pretrained")
    s = cfg.sample
    grid = ("--skip-type", s.skip_type) if s.skip_type else ()
    r = invoke(
        tmp_path / "pretrained",
        "--num",
        13,
        "--seed",
        s.seed,
        "--sampler",
        s.sampler,
        "--steps",
        s.steps,
        *grid,
        "--guidance",
        s.guidance_scale,
        "--schedule",
        cfg.diffusion.schedule,
        "--batch-size",
        4,
        "--device",
        "cpu",
        "--out",
        tmp_path / "pre",
        "-q",
    )
    assert r.exit_code == 0, r.output
    got, labels = load_samples(tmp_path / "pre" / "samples.npz")
    assert np.array_equal(got, want)
    np.testing.assert_array_equal(labels, [i % 10 for i in range(13)])
    # Another seed gives other images (the seed is used, not ignored).
    r = invoke(
        tmp_path / "pretrained",
        "--num",
        13,
        "--seed",
        s.seed + 1,
        "--sampler",
        s.sampler,
        "--steps",
        s.steps,
        *grid,
        "--guidance",
        s.guidance_scale,
        "--out",
        tmp_path / "other",
        "-q",
    )
    assert r.exit_code == 0 and not np.array_equal(load_samples(tmp_path / "other" / "samples.npz")[0], want)


def test_chosen_classes_give_the_stage_images_of_those_labels(digits, tmp_path):
    cfg, paths, _, _ = digits
    r = invoke(paths.train, "--class", "7", "--class", "2,7", "--num", 6, "--out", tmp_path, "-q")
    assert r.exit_code == 0, r.output
    images, labels = load_samples(tmp_path / "samples.npz")
    assert labels.tolist() == [7, 2, 7, 7, 2, 7]
    s = cfg.sample
    model = UViT.from_pretrained(paths.train / "ema")
    x = generate(
        model,
        SamplingRecipe(cfg.diffusion.schedule, s.sampler, s.steps, s.guidance_scale, s.sampler_kwargs()),
        sample_seeds(s.seed, 6),
        Condition(torch.tensor([7, 2, 7, 7, 2, 7])),
        progress=False,
    )
    assert np.array_equal(images, to_uint8(x))


def test_official_pth_with_its_preset_equals_the_pretrained_dir(digits, tmp_path):
    _, paths, _, _ = digits
    torch.manual_seed(1)
    model = UViT(preset_config("digits_uvit_tiny"))
    torch.save({"state_dict": model.state_dict()}, tmp_path / "nnet_ema.pth")
    model.save_pretrained(tmp_path / "pre")
    common = ("--num", 4, "--steps", 2, "--sampler", "dpm_solver", "--guidance", 0.5, "-q")
    r = invoke(tmp_path / "nnet_ema.pth", "--preset", "digits_uvit_tiny", "--out", tmp_path / "a", *common)
    assert r.exit_code == 0, r.output
    r = invoke(tmp_path / "pre", "--out", tmp_path / "b", *common)
    assert r.exit_code == 0, r.output
    a, b = (load_samples(tmp_path / d / "samples.npz")[0] for d in "ab")
    assert np.array_equal(a, b) and a.shape == (4, 1, 8, 8)


def test_latent_run_decodes_as_the_sample_stage(tmp_path, monkeypatch):
    root = tmp_path / "project"

    def edit(block: dict) -> None:
        block["model"]["overrides"] = {"img_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 5}
        block["data"]["num_classes"] = 4
        block["encode"]["vae"] = "vae"  # relative to the project root, as models/... in params.yaml
        block["sample"].update({"steps": 2, "num_samples": 6, "batch_size": 6, "shard_size": 6, "vae": None})
        tiny_vae_dir(root / "vae")

    cfg, paths = _project(root, "imagenet256", edit)
    monkeypatch.chdir(root)  # stages run in the project root
    run_sample(cfg, paths)
    monkeypatch.chdir(tmp_path)
    want, want_labels = load_samples(paths.samples / "samples.npz")
    assert want.shape == (6, 3, 8, 8)
    # The block's VAE (found under the run's project root) decodes; --vae names the same folder.
    for extra in ((), ("--vae", root / "vae")):
        out = tmp_path / f"out{len(extra)}"
        r = invoke(paths.train, "--num", 6, "--out", out, "-q", *extra)
        assert r.exit_code == 0, r.output
        got, labels = load_samples(out / "samples.npz")
        assert np.array_equal(got, want) and labels.tolist() == want_labels.tolist() == [0, 1, 2, 3, 0, 1]


def test_prompts_condition_a_text_model(tmp_path, write_tiny_clip_vocab):
    """Prompts cycle over the images; contexts are the CLIP encoding of each image's prompt, the
    unconditional branch the empty prompt's, decoded by the VAE: the calls the stage makes."""
    import transformers

    from uvit.encoders.text import empty_context, encode_text, load_text_encoder
    from uvit.encoders.vae import decode, load_vae

    clip = tmp_path / "clip"
    clip.mkdir()
    vocab = write_tiny_clip_vocab(clip)
    torch.manual_seed(0)
    transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=77,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    ).save_pretrained(str(clip))
    vae = tiny_vae_dir(tmp_path / "vae")
    model = UViT(
        UViTConfig(
            img_size=4, in_chans=4, clip_dim=16, num_text_tokens=77, embed_dim=32, depth=2, num_heads=2, patch_size=2
        )
    )
    model.save_pretrained(tmp_path / "t2i")
    (tmp_path / "prompts.txt").write_text("a dog\n\nthe cat\n")
    r = invoke(
        tmp_path / "t2i",
        "--prompt",
        "a cat",
        "--prompts-file",
        tmp_path / "prompts.txt",
        "--num",
        4,
        "--text-encoder",
        clip,
        "--vae",
        vae,
        "--steps",
        2,
        "--guidance",
        1.0,
        "--seed",
        3,
        "--out",
        tmp_path / "out",
        "-q",
    )
    assert r.exit_code == 0, r.output
    with np.load(tmp_path / "out" / "samples.npz") as f:
        images, captions = f["arr_0"].transpose(0, 3, 1, 2), f["captions"].tolist()
        assert "labels" not in f.files
    assert captions == ["a cat", "a dog", "the cat", "a cat"]
    tokenizer, text_model = load_text_encoder(clip)
    x = generate(
        model,
        SamplingRecipe("discrete", "dpm_solver_pp_2m", 2, 1.0),
        sample_seeds(3, 4),
        Condition(
            contexts=encode_text(tokenizer, text_model, captions), empty_context=empty_context(tokenizer, text_model)
        ),
        progress=False,
    )
    want = to_uint8(decode(load_vae(vae, scale_factor=0.2301), x, batch_size=50))
    assert images.shape == (4, 3, 8, 8) and np.array_equal(images, want)


# ------------------------------------------------------------------------------------ outputs
def test_files_written(digits, tmp_path):
    _, paths, _, _ = digits
    out = tmp_path / "out"
    (out / "images").mkdir(parents=True)
    Image.new("L", (8, 8)).save(out / "images" / "000099.png")  # from an earlier, larger run
    r = invoke(paths.train, "--class", "1,4,9", "--num", 7, "--out", out, "-q")
    assert r.exit_code == 0, r.output
    with np.load(out / "samples.npz") as f:
        assert f["arr_0"].dtype == np.uint8 and f["arr_0"].shape == (7, 8, 8, 1)  # NHWC
        assert f["labels"].tolist() == [1, 4, 9, 1, 4, 9, 1]
        nhwc = f["arr_0"]
    pngs = sorted(p.name for p in (out / "images").glob("*.png"))
    assert pngs == [f"{i:06d}.png" for i in range(7)]
    assert np.array_equal(np.asarray(Image.open(out / "images" / "000005.png")), nhwc[5, ..., 0])
    # The grid: 3 columns (one per class), 3 rows, 8x8 images upscaled 8x with 2-pixel padding.
    grid = Image.open(out / "grid.png")
    assert grid.size == (3 * 66 + 2, 3 * 66 + 2)
    info = json.loads((out / "generate.json").read_text())
    assert info["kind"] == "run" and info["benchmark"] == "digits" and info["classes"] == [1, 4, 9]


def test_help_lists_the_options():
    r = runner.invoke(app, ["generate", "--help"], env={"COLUMNS": "200", "TERM": "dumb"})
    assert r.exit_code == 0
    for option in (
        "--preset",
        "--vae",
        "--text-encoder",
        "--class",
        "--prompt",
        "--prompts-file",
        "--num",
        "--guidance",
        "--sampler",
        "--steps",
        "--seed",
        "--batch-size",
        "--device",
        "--precision",
        "--out",
        "dpm_solver_pp_2m",
        "unipc_bh2",
    ):
        assert option in r.output, option


# ------------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """save_pretrained dirs of a tiny class-conditional pixel model, a latent one and a text one."""
    d = tmp_path_factory.mktemp("models")
    tiny = dict(embed_dim=32, depth=2, num_heads=2, patch_size=2)
    configs = {
        "class": UViTConfig(img_size=8, in_chans=1, num_classes=11, **tiny),
        "latent": UViTConfig(img_size=4, in_chans=4, num_classes=5, **tiny),
        "text": UViTConfig(img_size=4, in_chans=4, clip_dim=16, num_text_tokens=77, **tiny),
    }
    torch.manual_seed(0)
    for name, c in configs.items():
        UViT(c).save_pretrained(d / name)
    torch.save(UViT(preset_config("digits_uvit_tiny")).state_dict(), d / "digits.pth")
    return {**{k: d / k for k in configs}, "pth": d / "digits.pth"}


@pytest.mark.parametrize(
    "case, args, message",
    [
        (
            "wrong preset",
            ["pth", "--preset", "cifar10_uvit_s2"],
            ["does not fit preset cifar10_uvit_s2", "mis-shaped", "it fits preset digits_uvit_tiny"],
        ),
        ("pth without preset", ["pth"], ["--preset"]),
        ("unknown preset", ["pth", "--preset", "nope"], ["unknown preset 'nope'"]),
        ("class id out of range", ["class", "--class", "10"], ["--class 10 is out of range", "0..9"]),
        ("class name without names", ["class", "--class", "cat"], ["no names", "0..9"]),
        ("prompt for a class model", ["class", "--prompt", "a dog"], ["--prompt", "class-conditional"]),
        ("class for a text model", ["text", "--class", "1"], ["--class", "text-to-image"]),
        ("text model without prompt", ["text"], ["--prompt"]),
        ("text model without encoder", ["text", "--prompt", "a cat"], ["--text-encoder"]),
        ("missing text encoder", ["text", "--prompt", "a cat", "--text-encoder", "MISSING"], ["MISSING"]),
        ("latent without --vae", ["latent"], ["latent model", "--vae"]),
        ("missing VAE path", ["latent", "--vae", "no/such/vae.pth"], ["no/such/vae.pth"]),
        ("missing checkpoint", ["missing"], ["no such file or directory"]),
        ("unknown sampler", ["class", "--sampler", "ddim"], ["--sampler 'ddim'", "dpm_solver"]),
        ("missing prompts file", ["text", "--prompts-file", "MISSING.txt"], ["MISSING.txt"]),
        ("unknown precision", ["class", "--precision", "fp8"], ["--precision 'fp8'"]),
        ("bad device", ["class", "--device", "gpu0"], ["--device 'gpu0'"]),
    ],
)
def test_bad_input_fails_with_one_line(models, tmp_path, monkeypatch, case, args, message):
    monkeypatch.chdir(tmp_path)  # no params.yaml here: no block applies
    source = models.get(args[0], tmp_path / args[0])
    r = invoke(source, *args[1:], "--out", tmp_path / "out", "-q")
    assert r.exit_code != 0, (case, r.output)
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), (case, r.output)
    assert "Traceback" not in r.output and isinstance(r.exception, SystemExit)
    for m in message:
        assert m in lines[0], (case, m, lines[0])
    assert not (tmp_path / "out").exists()  # nothing written


def test_class_names_and_imagenet_labels():
    names = ["tench", "goldfish", "cardigan", "Cardigan"]
    assert parse_classes(["Goldfish, 3", "tench"], 4, names) == [1, 3, 0]
    with pytest.raises(ValueError, match="closest: goldfish"):
        parse_classes(["goldfsh"], 4, names)
    with pytest.raises(ValueError, match="names classes 2, 3"):
        parse_classes(["cardigan"], 4, names)
    assert make_labels([5, 1], 5).tolist() == [5, 1, 5, 1, 5]


def test_class_names_of_a_run_come_from_its_data_manifest(digits, tmp_path):
    cfg, paths, _, _ = digits
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    manifest = paths.data / "train" / "manifest.json"
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps({"meta": {"classes": names}}))
    try:
        r = invoke(paths.train, "--class", "Seven,two", "--num", 3, "--steps", 1, "--out", tmp_path, "-q")
    finally:
        manifest.unlink()
    assert r.exit_code == 0, r.output
    assert load_samples(tmp_path / "samples.npz")[1].tolist() == [7, 2, 7]


def test_official_imagenet_defaults_come_from_its_block(tmp_path):
    """An official ImageNet 256 checkpoint (stand-in: the preset's shapes on the meta device are
    checked, then a tiny state dict of the same keys would not fit) takes imagenet256's sampler,
    steps and guidance, and the ImageNet class names."""
    from uvit.generate import Checkpoint, class_names

    cfg = load_benchmark("imagenet256", ROOT / "params.yaml")
    with torch.device("meta"):
        model = UViT(cfg.uvit_config())
    ckpt = Checkpoint(model, "official", tmp_path / "x.pth", cfg, ROOT)
    s = resolve_settings(ckpt)
    assert (s.schedule, s.sampler, s.steps, s.guidance_scale) == ("discrete", "dpm_solver_pp", 50, 0.4)
    assert resolve_settings(ckpt, Overrides(sampler="unipc_bh2")).steps == 25  # the block's steps are for its sampler
    names = class_names(ckpt)
    assert ckpt.num_real_classes == 1000 and names[207] == "golden retriever"
    assert parse_classes(["golden retriever", "1"], 1000, names) == [207, 1]
