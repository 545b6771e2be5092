"""`uvit generate`: images from any U-ViT checkpoint, with the sample stage's own code.

Sources (:func:`load_checkpoint`):

    a trained run        runs/<b>/train (or runs/<b>): the weights the sample stage samples
                         (ema/, or model/ when <b>.sample.use_ema is false); settings from
                         params.yaml's block <b>
    save_pretrained dir  config.json + model.safetensors; settings from the params.yaml block
                         whose model is this architecture (or the one named with `benchmark`)
    official .pth        with its preset name (uvit.models.load_official); settings from the
                         preset's benchmark block

Sample i has seed ``sample_seeds(seed, N)[i]`` and label ``classes[i % len(classes)]`` (all
real classes when none are chosen: the sample stage's balanced labels), or prompt
``prompts[i % len(prompts)]``. It is sampled by :func:`uvit.evaluate.sample.generate`, decoded
with the VAE in batches of 50 for latent models and rounded by ``to_uint8``: the calls the sample
stage makes, so the same seeds and settings give the stage's pixels.

Defaults (:func:`resolve_settings`) come from the benchmark block's diffusion and sample sections;
without a block: schedule vpsde for pixel models and discrete for latent ones (every paper
model), sampler dpm_solver_pp_2m, 25 steps, guidance 0, the VAE scale 0.18215 (0.23010 for
text-to-image), and the model's last class taken as classifier-free guidance's null class.

Output (:func:`write_outputs`): ``grid.png``, ``images/{i:06d}.png``, ``samples.npz`` (uint8
NHWC ``arr_0`` + ``labels``, or ``captions`` for prompts: the sample stage's layout) and
``generate.json`` (the settings, to reproduce the run).
"""

from __future__ import annotations

import contextlib
import difflib
import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, get_args

import numpy as np
import torch

from uvit.config import BenchmarkConfig, ConfigError, SkipType, load_benchmark, load_params
from uvit.encoders.vae import LatentDecoder
from uvit.evaluate.sample import Condition, SamplingRecipe
from uvit.models import UViT, UViTConfig

SKIP_TYPES = get_args(SkipType)  # the samplers' time grids, as params.yaml names them

__all__ = [
    "Checkpoint",
    "GenerateError",
    "Overrides",
    "Request",
    "Runtime",
    "SamplingRecipe",
    "Source",
    "class_names",
    "draw",
    "generate_images",
    "load_checkpoint",
    "make_labels",
    "parse_classes",
    "read_prompts",
    "resolve_settings",
    "run_generate",
    "write_outputs",
]

FALLBACK_SAMPLER = "dpm_solver_pp_2m"
FALLBACK_STEPS = 25
FALLBACK_BATCH_SIZE = 64
DECODE_BATCH_SIZE = 50  # the sample stage's (and the official scripts') VAE batch
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class GenerateError(ValueError):
    """Bad input to `uvit generate`; the message (one line) says what and how to fix it."""


@dataclass(frozen=True)
class Checkpoint:
    """A loaded model, where it came from, and the params.yaml block that describes it (if any)."""

    model: UViT
    kind: str  # "run" | "pretrained" | "official"
    path: Path
    benchmark: BenchmarkConfig | None = None
    root: Path | None = None  # the project root that relative paths of the block are under

    @property
    def config(self) -> UViTConfig:
        return self.model.config

    @property
    def is_latent(self) -> bool:
        return self.config.in_chans == 4

    @property
    def is_text(self) -> bool:
        return self.config.clip_dim is not None

    @property
    def num_real_classes(self) -> int:
        """K classes a label may name: the block's data.num_classes, else all but the last
        (the null class of classifier-free guidance); 0 for unconditional and text models."""
        k = self.config.num_classes
        if k <= 0:  # -1 or 0: no labels
            return 0
        if self.benchmark is not None and self.benchmark.data.num_classes > 0:
            return min(self.benchmark.data.num_classes, k)
        return k - 1


@dataclass(frozen=True)
class Source:
    """Where the model comes from: path (a trained run, a save_pretrained directory or an official
    .pth), preset (the architecture of a .pth), params (a params.yaml) and benchmark (its block)
    that give the defaults; see `load_checkpoint`."""

    path: str | Path
    preset: str | None = None
    params: Path | None = None
    benchmark: str | None = None


@dataclass(frozen=True)
class Overrides:
    """The sampling settings given by the user; None takes the block's, else the fallbacks
    (see `resolve_settings`)."""

    schedule: str | None = None
    sampler: str | None = None
    steps: int | None = None
    guidance: float | None = None
    skip_type: str | None = None


@dataclass(frozen=True)
class Request:
    """What to draw: num images (None: 8 per class or prompt given, else 64) of seed (None: the
    block's sample.seed, else 0), for classes (ids or names, or comma lists of them) or prompts;
    with vae, the autoencoder that decodes a latent model's samples, and text_encoder, the CLIP
    text encoder of a text-to-image model's prompts (None: the block's)."""

    num: int | None = None
    seed: int | None = None
    classes: tuple[str, ...] = ()
    prompts: tuple[str, ...] = ()
    vae: str | None = None
    text_encoder: str | None = None


@dataclass(frozen=True)
class Runtime:
    """Where and how the model runs (none of it changes the fp32 images): images per forward pass
    (None: the block's sample.batch_size, else 64), the device (None: cuda when there is one),
    the precision (fp32, or bf16 / fp16 autocast) and a progress bar."""

    batch_size: int | None = None
    device: str | None = None
    precision: str = "fp32"
    progress: bool = True


# ------------------------------------------------------------------------------------ sources
def _params_path(params: Path | None, candidates: list[Path]) -> Path | None:
    if params is not None:
        if not params.is_file():
            raise GenerateError(f"--params {params}: no such file")
        return params
    return next((p for p in candidates if p.is_file()), None)


def _block(name: str, params: Path) -> BenchmarkConfig:
    try:
        return load_benchmark(name, load_params(params))
    except ConfigError as e:
        raise GenerateError(f"{params}: {_one_line(str(e))}") from None


def _block_for(config: UViTConfig, params: Path | None, name: str | None) -> BenchmarkConfig | None:
    """The block named `name`, else the first block of `params` whose model is `config`."""
    if params is None:
        if name is not None:
            raise GenerateError(f"--benchmark {name}: no params.yaml here; pass --params")
        return None
    if name is not None:
        return _block(name, params)
    blocks = load_params(params)
    for key in blocks:
        try:
            cfg = load_benchmark(key, blocks)
        except ConfigError:  # a broken or foreign block describes no model
            continue
        if cfg.uvit_config() == config:
            return cfg
    return None


def _is_run(path: Path) -> bool:
    return any((path / w / "config.json").is_file() for w in ("ema", "model"))


def _read_pretrained(path: Path) -> UViT:
    try:
        return UViT.from_pretrained(path)
    except (RuntimeError, ValueError, TypeError) as e:  # a config or weights that do not load
        raise GenerateError(f"{path}: not a loadable save_pretrained directory ({_one_line(str(e))})") from None


def load_checkpoint(
    source: str | Path, *, preset: str | None = None, params: Path | None = None, benchmark: str | None = None
) -> Checkpoint:
    """Load the model at `source` (a trained run, a save_pretrained directory or an official
    .pth with its `preset`) and find the params.yaml block that gives its defaults: `params`, or
    for a run its project's params.yaml, else ./params.yaml."""
    path = Path(source).expanduser()
    if not path.exists():
        raise GenerateError(f"{path}: no such file or directory")
    if path.is_dir() and not _is_run(path) and _is_run(path / "train"):
        path = path / "train"  # runs/<b> given for runs/<b>/train
    if preset is not None and not path.is_file():
        raise GenerateError(f"--preset names the architecture of an official .pth file; {path} is a directory")
    if path.is_file():
        return _load_official(path, preset, _params_path(params, [Path("params.yaml")]), benchmark)
    if _is_run(path):
        root = path.parent.parent.parent  # <root>/runs/<b>/train
        found = _params_path(params, [root / "params.yaml", Path("params.yaml")])
        name = benchmark or path.parent.name
        block = _block(name, found) if found is not None and name in load_params(found) else None
        weights = path / ("ema" if block is None or block.sample.use_ema else "model")
        model = _read_pretrained(weights)
        if block is None:
            block = _block_for(model.config, found, None)
        return Checkpoint(model, "run", weights, block, found.parent if found else None)
    if (path / "config.json").is_file():
        found = _params_path(params, [Path("params.yaml")])
        model = _read_pretrained(path)
        return Checkpoint(
            model, "pretrained", path, _block_for(model.config, found, benchmark), found.parent if found else None
        )
    raise GenerateError(
        f"{path}: neither a trained run (runs/<benchmark>/train with ema/), a save_pretrained "
        "directory (config.json + model.safetensors) nor an official .pth file"
    )


def _shapes(config: UViTConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):  # shapes only: no memory, even for the Huge presets
        return {k: tuple(v.shape) for k, v in UViT(config).state_dict().items()}


def _fitting_presets(state: dict[str, torch.Tensor]) -> list[str]:
    from uvit.models import PRESETS

    want = {k: tuple(v.shape) for k, v in state.items()}
    return [name for name, p in PRESETS.items() if _shapes(p.config) == want]


def _mismatch(config: UViTConfig, state: dict[str, torch.Tensor]) -> str | None:
    """'N missing, M unexpected, K mis-shaped keys (e.g. ...)', or None when `state` fits."""
    own = _shapes(config)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shaped = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs preset {own[k]}"
        for k in sorted(set(own) & set(state))
        if own[k] != tuple(state[k].shape)
    ]
    if not (missing or unexpected or shaped):
        return None
    example = (shaped or missing or unexpected)[0]
    return f"{len(missing)} missing, {len(unexpected)} unexpected, {len(shaped)} mis-shaped keys (e.g. {example})"


def _load_official(path: Path, preset: str | None, params: Path | None, benchmark: str | None) -> Checkpoint:
    from uvit.models import get_preset, load_state_dict_strict, read_state_dict

    if preset is None:
        raise GenerateError(
            f"{path} is a checkpoint file: name its architecture with --preset (`uvit models` lists the presets)"
        )
    try:
        p = get_preset(preset)
    except KeyError as e:
        raise GenerateError(f"--preset: {e.args[0]}") from None
    try:
        state = read_state_dict(path)
    except ValueError as e:
        raise GenerateError(_one_line(str(e))) from None
    problem = _mismatch(p.config, state)
    if problem is not None:
        fits = _fitting_presets(state)
        hint = f"it fits preset {', '.join(fits)}" if fits else "no preset fits it"
        raise GenerateError(f"{path.name} does not fit preset {preset}: {problem}; {hint}")
    model = load_state_dict_strict(UViT(p.config), state)
    block = None
    if params is not None:
        name = benchmark or (p.benchmark if p.benchmark in load_params(params) else None)
        block = _block(name, params) if name is not None else None
    return Checkpoint(model, "official", path, block, params.parent if params else None)


# ----------------------------------------------------------------------------------- settings
def resolve_settings(ckpt: Checkpoint, overrides: Overrides | None = None) -> SamplingRecipe:
    """The given values, else the benchmark block's, else the fallbacks (module docstring).
    The block's sampler options (order, skip_type, denoise_final) apply only to its own sampler;
    a given `skip_type` (the time grid) replaces the block's."""
    from uvit.diffusion import make_schedule
    from uvit.diffusion.samplers import ALL_SAMPLERS

    o, b = overrides or Overrides(), ckpt.benchmark
    schedule, sampler, steps, guidance = o.schedule, o.sampler, o.steps, o.guidance
    schedule = schedule or (b.diffusion.schedule if b else ("discrete" if ckpt.is_latent else "vpsde"))
    sampler = sampler or (b.sample.sampler if b else FALLBACK_SAMPLER)
    if sampler not in ALL_SAMPLERS:
        raise GenerateError(f"--sampler {sampler!r}: choose one of {', '.join(ALL_SAMPLERS)}")
    try:
        make_schedule(schedule)
    except ValueError as e:
        raise GenerateError(f"--schedule: {e}") from None
    if steps is None:
        steps = b.sample.steps if b and sampler == b.sample.sampler else FALLBACK_STEPS
    if steps < 1:
        raise GenerateError(f"--steps must be >= 1, got {steps}")
    if guidance is None:
        guidance = b.sample.guidance_scale if b else 0.0
    if guidance < 0:
        raise GenerateError(f"--guidance must be >= 0, got {guidance}")
    if guidance > 0 and ckpt.config.num_classes > 0 and ckpt.num_real_classes >= ckpt.config.num_classes:
        raise GenerateError(
            f"--guidance {guidance}: this model has no null class (its {ckpt.config.num_classes} "
            "classes are all real), so it was not trained for classifier-free guidance; use 0"
        )
    kwargs = b.sample.sampler_kwargs() if b and sampler == b.sample.sampler else {}
    if o.skip_type is not None:
        if o.skip_type not in SKIP_TYPES:
            raise GenerateError(f"--skip-type {o.skip_type!r}: choose one of {', '.join(SKIP_TYPES)}")
        kwargs = {**kwargs, "skip_type": o.skip_type}
    return SamplingRecipe(schedule, sampler, int(steps), float(guidance), kwargs)


# ------------------------------------------------------------------------------- conditioning
def class_names(ckpt: Checkpoint) -> list[str] | None:
    """The names of the K real classes: the data manifest's `class_names` or `classes` (a trained
    run), the ImageNet names for 1000 classes (torchvision's list, in the standard synset order),
    digits '0'..'9'; None when unknown."""
    k, b = ckpt.num_real_classes, ckpt.benchmark
    if b is not None and ckpt.root is not None:
        from uvit.paths import BenchmarkPaths

        manifest = BenchmarkPaths(b.name, ckpt.root).data / "train" / "manifest.json"
        if manifest.is_file():
            meta = json.loads(manifest.read_text()).get("meta", {})
            names = meta.get("class_names", meta.get("classes"))
            if isinstance(names, list) and len(names) == k:
                return [str(n) for n in names]
    if k == 1000 and (b is None or b.data.source == "imagenet"):
        from torchvision.models._meta import _IMAGENET_CATEGORIES

        return list(_IMAGENET_CATEGORIES)
    if b is not None and b.data.source == "digits":
        return [str(i) for i in range(k)]
    return None


def parse_classes(values: list[str], num_classes: int, names: list[str] | None) -> list[int]:
    """Class ids of `values` (each an id or a name, or a comma-separated list of them)."""
    lookup: dict[str, list[int]] = {}
    for i, n in enumerate(names or []):
        lookup.setdefault(n.lower(), []).append(i)
    out = []
    for token in (t.strip() for v in values for t in v.split(",")):
        if not token:
            continue
        if token.lstrip("-").isdigit():
            i = int(token)
            if not 0 <= i < num_classes:
                raise GenerateError(f"--class {i} is out of range: this model has classes 0..{num_classes - 1}")
            out.append(i)
            continue
        if names is None:
            raise GenerateError(f"--class {token!r}: this model's classes have no names; use ids 0..{num_classes - 1}")
        ids = lookup.get(token.lower())
        if ids is None:
            close = difflib.get_close_matches(token.lower(), list(lookup), n=3)
            hint = f" (closest: {', '.join(close)})" if close else ""
            raise GenerateError(f"--class {token!r} is not a class name of this model{hint}")
        if len(ids) > 1:
            raise GenerateError(f"--class {token!r} names classes {', '.join(map(str, ids))}; give the id")
        out.append(ids[0])
    return out


def make_labels(classes: list[int], num: int) -> torch.Tensor:
    """int64 (num,): label i = classes[i % len(classes)]; for classes 0..K-1 the sample stage's
    balanced labels."""
    from uvit.evaluate.sample import balanced_labels

    return torch.as_tensor(classes, dtype=torch.int64)[balanced_labels(num, len(classes))]


def read_prompts(prompts: list[str], prompts_file: Path | None) -> list[str]:
    """The prompts given, then the non-empty lines of `prompts_file`."""
    out = [p for p in prompts]
    if prompts_file is not None:
        if not prompts_file.is_file():
            raise GenerateError(f"--prompts-file {prompts_file}: no such file")
        out += [line.strip() for line in prompts_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    return out


def _check_conditioning(ckpt: Checkpoint, classes: list[str], prompts: list[str]) -> None:
    c = ckpt.config
    if prompts and not ckpt.is_text:
        kind = "a class-conditional" if c.num_classes > 0 else "an unconditional"
        raise GenerateError(f"--prompt given, but {ckpt.path} is {kind} model (prompts need a text-to-image model)")
    if classes and c.num_classes <= 0:
        kind = "a text-to-image" if ckpt.is_text else "an unconditional"
        raise GenerateError(f"--class given, but {ckpt.path} is {kind} model (it takes no class labels)")
    if ckpt.is_text and not prompts:
        raise GenerateError(f"{ckpt.path} is a text-to-image model: give --prompt or --prompts-file")


def _local(path: str, ckpt: Checkpoint) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() or ckpt.root is None else ckpt.root / p


def _decoder(ckpt: Checkpoint, vae: str | None) -> LatentDecoder | None:
    """The VAE that decodes a latent model's samples (the sample stage's decoder_spec)."""
    if not ckpt.is_latent:
        if vae is not None:
            raise GenerateError(f"--vae given, but {ckpt.path} is a pixel model (nothing to decode)")
        return None
    from uvit.encoders import is_hub_id
    from uvit.encoders.vae import SCALE_FACTORS

    b = ckpt.benchmark
    if vae is None and b is not None and b.encode is not None:
        default = _local(b.decoder_vae()[0], ckpt)
        if default.exists():
            vae = str(default)
    if vae is not None and not Path(vae).expanduser().exists() and not is_hub_id(vae):
        raise GenerateError(f"--vae {vae}: no such file or directory")
    if vae is None:
        named = f" (params.yaml's {b.decoder_vae()[1]} names {b.decoder_vae()[0]}, not there)" if b and b.encode else ""
        raise GenerateError(
            f"{ckpt.path} is a latent model: pass --vae FILE|DIR, the autoencoder that decodes "
            f"its samples (e.g. models/autoencoder_kl_ema.pth){named}"
        )
    scale = b.encode.scale_factor if b and b.encode else SCALE_FACTORS["mscoco" if ckpt.is_text else "imagenet"]
    return LatentDecoder(vae, scale, DECODE_BATCH_SIZE)


def _text_encoder(ckpt: Checkpoint, text_encoder: str | None) -> str:
    b = ckpt.benchmark
    if text_encoder is None and b is not None and b.encode is not None and b.encode.text_encoder:
        text_encoder = b.encode.text_encoder
        local = _local(text_encoder, ckpt)
        text_encoder = str(local) if local.exists() else text_encoder  # else a hub id (local cache)
    if text_encoder is None:
        raise GenerateError(f"{ckpt.path} is a text-to-image model: pass --text-encoder DIR (a CLIP text encoder)")
    from uvit.encoders import is_hub_id

    if not Path(text_encoder).expanduser().exists() and not is_hub_id(text_encoder):
        raise GenerateError(f"--text-encoder {text_encoder}: no such file or directory")
    return text_encoder


def _device(device: str | None) -> str:
    """`device`, checked, or cuda when there is one, else cpu."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise GenerateError(f"--device {device!r}: expected cpu, cuda or cuda:N") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise GenerateError(f"--device {device}: no CUDA device here; use --device cpu")
    return device


# ----------------------------------------------------------------------------------- sampling
def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise GenerateError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")


def draw(
    model: UViT,
    settings: SamplingRecipe,
    seeds: list[int],
    condition: Condition | None = None,
    decoder: LatentDecoder | None = None,
    runtime: Runtime | None = None,
) -> np.ndarray:
    """uint8 (N, C, H, W) images: generate -> VAE decode (latent models) -> to_uint8, the sample
    stage's calls. fp32 gives the stage's pixels; bf16/fp16 run the model under autocast.
    runtime: batch_size None is 64, device None is the CPU here."""
    from uvit.evaluate.sample import generate, to_uint8

    rt = runtime or Runtime()
    _check_precision(rt.precision)
    device, dtype = rt.device or "cpu", PRECISIONS[rt.precision]
    autocast = torch.autocast(torch.device(device).type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    with autocast:
        x = generate(
            model,
            settings,
            seeds,
            condition,
            batch_size=rt.batch_size or FALLBACK_BATCH_SIZE,
            device=device,
            progress=rt.progress,
        )
    if decoder is not None:
        x = decoder.images(x, device)
    return to_uint8(x)


def _encode_prompts(source: str, prompts: list[str], device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP contexts (P, 77, D) of the prompts and the empty prompt's (77, D), on the CPU."""
    from uvit.encoders.text import empty_context, encode_text, load_text_encoder

    tokenizer, text_model = load_text_encoder(source, device=device, params_key="--text-encoder")
    return encode_text(tokenizer, text_model, prompts).cpu(), empty_context(tokenizer, text_model).cpu()


@dataclass
class Generated:
    """uint8 (N, C, H, W) images, their labels (N,) or prompts, the grid's images per row, the seed."""

    images: np.ndarray
    labels: np.ndarray | None
    prompts: list[str] | None
    nrow: int
    seed: int


def _batch_size(ckpt: Checkpoint, given: int | None) -> int:
    """The given batch size, else the block's sample.batch_size, else 64; checked."""
    batch_size = given or (ckpt.benchmark.sample.batch_size if ckpt.benchmark else FALLBACK_BATCH_SIZE)
    if batch_size < 1:
        raise GenerateError(f"--batch-size must be >= 1, got {batch_size}")
    return batch_size


def _text_condition(encoder: str, prompts: list[str], num: int, guided: bool, device: str):
    """(Condition of image i = prompt i mod P, the prompt of each image)."""
    contexts, empty = _encode_prompts(encoder, prompts, device)
    rows = torch.arange(num) % len(prompts)
    condition = Condition(contexts=contexts[rows], empty_context=empty if guided else None)
    return condition, [prompts[i] for i in rows.tolist()]


def generate_images(
    ckpt: Checkpoint,
    settings: SamplingRecipe,
    request: Request | None = None,
    runtime: Runtime | None = None,
) -> Generated:
    """Sample `request.num` images (default 8 per class or prompt given, else 64) of seeds
    sample_seeds(seed, num) (seed default: the block's sample.seed, else 0), decoded with the
    request's `vae` (latent models) and conditioned through its `text_encoder` (text models);
    every input is checked before the model runs."""
    from uvit.evaluate.sample import sample_seeds

    request = request or Request()
    classes, prompts = list(request.classes), list(request.prompts)
    _check_conditioning(ckpt, classes, prompts)
    runtime = runtime or Runtime()
    _check_precision(runtime.precision)
    device = _device(runtime.device)
    ids = parse_classes(classes, ckpt.num_real_classes, class_names(ckpt)) if classes else None
    encoder = _text_encoder(ckpt, request.text_encoder) if ckpt.is_text else None
    decoder = _decoder(ckpt, request.vae)
    groups = len(ids or prompts)
    num = request.num if request.num is not None else (8 * groups if groups else 64)
    if num < 1:
        raise GenerateError(f"--num must be >= 1, got {num}")
    runtime = replace(runtime, device=device, batch_size=_batch_size(ckpt, runtime.batch_size))
    seed = request.seed if request.seed is not None else (ckpt.benchmark.sample.seed if ckpt.benchmark else 0)
    condition, per_image = Condition(), None
    if ckpt.config.num_classes > 0:
        condition = Condition(labels=make_labels(ids if ids else list(range(ckpt.num_real_classes)), num))
    if encoder is not None:
        guided = settings.guidance_scale > 0
        condition, per_image = _text_condition(encoder, prompts, num, guided, runtime.device)
    images = draw(ckpt.model, settings, sample_seeds(seed, num), condition, decoder, runtime)
    columns = groups or ckpt.num_real_classes
    nrow = columns if 0 < columns <= 16 else 8
    labels = None if condition.labels is None else condition.labels.numpy()
    return Generated(images, labels, per_image, nrow, seed)


# ------------------------------------------------------------------------------------- output
def write_outputs(out: Path, result: Generated, info: dict[str, Any]) -> dict[str, str]:
    """grid.png, images/{i:06d}.png, samples.npz and generate.json in `out`; returns their paths.
    PNGs left in images/ by an earlier, larger run are removed."""
    from uvit.evaluate.sample import save_grid, save_pngs, save_samples
    from uvit.fileio import write_json

    out.mkdir(parents=True, exist_ok=True)
    images = result.images
    for p in (out / "images").glob("*.png"):
        if p.stem.isdigit() and int(p.stem) >= len(images):
            p.unlink()
    save_pngs(images, out / "images")
    # Small images are upscaled in the grid (nearest neighbour) as the sample stage's grid is.
    grid = save_grid(images, out / "grid.png", nrow=result.nrow, upscale=max(1, 64 // images.shape[-1]))
    extras = None if result.prompts is None else {"captions": np.array(result.prompts)}
    npz = save_samples(out / "samples.npz", images, result.labels, extras)
    write_json(out / "generate.json", info)
    return {"grid": str(grid), "images": str(out / "images"), "npz": str(npz), "info": str(out / "generate.json")}


def run_generate(
    source: Source,
    out: Path,
    overrides: Overrides | None = None,
    request: Request | None = None,
    runtime: Runtime | None = None,
) -> dict[str, Any]:
    """Load, sample, write: what `uvit generate` does."""
    ckpt = load_checkpoint(source.path, preset=source.preset, params=source.params, benchmark=source.benchmark)
    settings = resolve_settings(ckpt, overrides)
    runtime = runtime or Runtime()
    result = generate_images(ckpt, settings, request, runtime)
    info = {
        "source": str(ckpt.path),
        "kind": ckpt.kind,
        "preset": source.preset,
        "benchmark": ckpt.benchmark.name if ckpt.benchmark else None,
        **asdict(settings),
        "num": len(result.images),
        "seed": result.seed,
        # label i is classes[i % len(classes)] (make_labels), prompt i likewise
        "classes": None if result.labels is None else list(dict.fromkeys(result.labels.tolist())),
        "prompts": list(dict.fromkeys(result.prompts)) if result.prompts else None,
        "precision": runtime.precision,
    }
    return {
        **write_outputs(out, result, info),
        "num": len(result.images),
        "grid_rows": math.ceil(len(result.images) / result.nrow),
        **asdict(settings),
    }


def _one_line(message: str) -> str:
    return "; ".join(line.strip() for line in message.splitlines() if line.strip())
