"""Typed, validated benchmark configuration read from `params.yaml`.

One top-level block per benchmark (digits, cifar10, ...), each with the stages' sections.
Everything is checked here, before any data is downloaded, model trained or file written:
unknown keys, wrong types and out-of-range values fail with the dotted key named
(e.g. `digits.train.steps: Input should be greater than 0`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

BENCHMARKS = ("digits", "cifar10", "celeba64", "imagenet64", "imagenet256", "imagenet512", "mscoco256")
PAPER_BENCHMARKS = BENCHMARKS[1:]  # digits is the project's own
DEFAULT_PARAMS = Path("params.yaml")


class ConfigError(ValueError):
    """A bad parameter; the message names the dotted key and what is wrong."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Section):
    source: Literal["digits", "cifar10", "celeba", "imagenet", "coco", "imagefolder"]
    root: str | None = None  # where a user-supplied dataset lives (ImageNet, COCO); None for downloadable ones
    # The checksum of an archive root of your own (a subset, a miniature, a re-packed copy): when
    # either is set the archive must match it instead of the official checksum; unset, the
    # official one guards the official archive (CIFAR-10's MD5, ILSVRC2012_img_train.tar's MD5).
    sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")
    md5: str | None = Field(None, pattern=r"^[0-9a-fA-F]{32}$")
    # Where archives are downloaded and extracted; None: $UVIT_DOWNLOAD_DIR, else ~/.cache/uvit/downloads.
    download_dir: str | None = None
    test_fraction: float = Field(0.2, gt=0, lt=1)
    seed: int = 0
    shard_size: PositiveInt = 50_000
    # An unreadable or truncated image: "fail" stops the data stage naming it; "skip" leaves it
    # out and lists it in the manifest (imagefolder and imagenet sources).
    on_bad: Literal["fail", "skip"] = "fail"
    # imagefolder: also store each image's horizontal mirror as extra rows (latent benchmarks,
    # which cannot flip at training time; pixel benchmarks flip with train.random_flip instead).
    store_flips: bool = False
    # The dataset's real classes, read by every stage (0: unlabelled). A class-conditional model
    # has K or K + 1 classes, the extra one being guidance's null class.
    num_classes: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _source_options(self) -> DataConfig:
        if self.store_flips and self.source != "imagefolder":
            raise ValueError(f"store_flips applies to the imagefolder source, not {self.source!r}")
        if self.on_bad == "skip" and self.source not in ("imagefolder", "imagenet"):
            raise ValueError(f"on_bad: skip applies to the imagefolder and imagenet sources, not {self.source!r}")
        return self

    @property
    def captions(self) -> bool:
        """Whether each image comes with captions (text-to-image: COCO)."""
        return self.source == "coco"


class EncodeConfig(_Section):
    """Latent benchmarks: the SD VAE (a diffusers dir, a hub id, or the official autoencoder_kl.pth)
    and, for text-to-image, the CLIP text encoder."""

    vae: str
    scale_factor: PositiveFloat = 0.18215  # 0.23010 for MS-COCO (the official configs)
    text_encoder: str | None = None
    batch_size: PositiveInt = 64
    dtype: Literal["float16", "float32"] = "float16"


class ValidateConfig(_Section):
    """What the data checks demand beyond the dataset's facts (data.num_classes)."""

    min_rows: PositiveInt = 1
    min_class_share: float = Field(0.0, ge=0, le=1)
    max_class_share: float = Field(1.0, ge=0, le=1)


class ModelConfig(_Section):
    preset: str
    overrides: dict[str, Any] = Field(default_factory=dict)

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, v: str) -> str:
        from uvit.models.presets import PRESETS

        if v not in PRESETS:
            raise ValueError(f"unknown preset {v!r}; choose one of: {', '.join(PRESETS)}")
        return v


class DiffusionConfig(_Section):
    schedule: Literal["vpsde", "discrete"]
    p_uncond: float = Field(0.0, ge=0, le=1)  # condition dropout for classifier-free guidance


class TrainConfig(_Section):
    steps: PositiveInt
    batch_size: PositiveInt  # global, split across workers
    lr: PositiveFloat
    weight_decay: float = Field(0.03, ge=0)
    betas: tuple[float, float] = (0.99, 0.999)
    warmup_steps: int = Field(0, ge=0)
    ema_decay: float = Field(0.9999, ge=0, le=1)
    grad_clip: float | None = Field(None, gt=0)
    num_workers: PositiveInt = 1
    threads_per_worker: PositiveInt = 1
    use_gpu: bool = False
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    compile: bool = False
    checkpoint_every: PositiveInt = 1000
    keep_checkpoints: PositiveInt = 2
    max_failures: int = Field(0, ge=-1)
    log_every: PositiveInt = 10
    seed: int = 0
    # Mirror each training image horizontally with p = 0.5, drawn from (seed, step): the official
    # CIFAR-10, CelebA 64 and ImageNet 64 recipes. Latent benchmarks store flipped copies instead.
    random_flip: bool = False
    # ddp (replicated weights) or fsdp (torch FSDP2 fully_shard: weights, grads and optimizer state
    # sharded across workers; for the H presets). Checkpoints are full state dicts either way.
    strategy: Literal["ddp", "fsdp"] = "ddp"
    # Ray Train storage: None = runs/<benchmark>/ray; a directory; or s3://bucket/prefix (endpoint:
    # storage_endpoint, else $AWS_ENDPOINT_URL_S3 / $AWS_ENDPOINT_URL, else AWS). Keys from the env.
    storage_path: str | None = None
    storage_endpoint: str | None = None
    async_checkpoint: bool = True  # upload checkpoints in the background (Ray's CheckpointUploadMode.ASYNC)
    prefetch: PositiveInt = 2  # batches gathered ahead of the step by the loader thread
    sample_every: int = Field(0, ge=0)  # EMA sample grid (PNG + TensorBoard) every N steps; 0 = off
    tensorboard: bool = True  # rank 0 logs scalars (and grids) under runs/<benchmark>/ray/<fingerprint>/
    # FID of fid_samples EMA samples every fid_every steps (0 = off), with score.feature_extractor
    # against the training images (or score.reference_stats): a cheap trend, not the paper's 50k FID.
    fid_every: int = Field(0, ge=0)
    fid_samples: PositiveInt = 1000


SamplerName = Literal[
    "euler_maruyama", "dpm_solver", "dpm_solver_pp", "dpm_solver_pp_2m", "dpm_solver_pp_3m", "unipc_bh1", "unipc_bh2"
]
SkipType = Literal["logSNR", "time_uniform", "time_quadratic"]


class SampleConfig(_Section):
    sampler: SamplerName
    steps: PositiveInt
    # Few-step options (uvit.diffusion.samplers); None: the sampler's own (the paper protocol's) default.
    skip_type: SkipType | None = None  # the time grid
    denoise_final: bool = False  # end with a denoising step (the x0 prediction at the last time)
    order: Literal[1, 2, 3] | None = None  # dpm_solver, dpm_solver_pp and unipc_* only
    guidance_scale: float = Field(0.0, ge=0)
    num_samples: PositiveInt
    batch_size: PositiveInt = 500
    seed: int = 0
    use_ema: bool = True
    # Sharded, resumable sampling (uvit.evaluate.sample_shards): samples do not depend on these two.
    num_workers: PositiveInt = 1  # 1: in this process; > 1: one Ray task per shard (a GPU each with train.use_gpu)
    shard_size: PositiveInt = 10_000
    png: bool = True  # also write samples/png/{i:06d}.png

    @field_validator("order")
    @classmethod
    def _order_applies(cls, v: int | None, info) -> int | None:
        sampler = info.data.get("sampler")
        if v is not None and sampler not in ("dpm_solver", "dpm_solver_pp", "unipc_bh1", "unipc_bh2"):
            raise ValueError(f"sampler {sampler!r} takes no order")
        return v

    def sampler_kwargs(self) -> dict[str, Any]:
        """The options set, as keyword arguments of uvit.diffusion's samplers (and count_nfe)."""
        kw = {"skip_type": self.skip_type, "order": self.order, "denoise_final": self.denoise_final or None}
        return {k: v for k, v in kw.items() if v is not None}

    # Text-to-image: which validation captions (uvit.evaluate.captions): "first" N caption rows, or
    # "one_per_image" (the first caption of each of the first N images).
    captions: Literal["first", "one_per_image"] = "first"
    # Latent benchmarks: the VAE that decodes samples; None = encode.vae. The official H/2 and H/4
    # ImageNet configs decode with autoencoder_kl_ema.pth and extract features with autoencoder_kl.pth.
    vae: str | None = None


class ScoreConfig(_Section):
    feature_extractor: Literal["digits-classifier", "inception"] = "inception"
    classifier_epochs: PositiveInt = 30
    inception_weights: str | None = None
    reference_stats: str | None = None  # a user-supplied .npz (mu, sigma), e.g. ADM's ImageNet statistics
    clip_model: str | None = None  # text-to-image: CLIP for the CLIP score (a local directory or hub id)
    kid_subset_size: PositiveInt = 1000  # KID subsets of min(this, number of samples) images


class StudyReference(_Section):
    """The protocol the study measures against (the paper's: DPM-Solver, 50 steps)."""

    sampler: SamplerName
    steps: PositiveInt
    skip_type: SkipType | None = None


class SamplerStudyConfig(_Section):
    """The sampler study (`uvit samplers <benchmark>`; digits-classifier benchmarks): FID and
    conditional accuracy of every sampler x time grid x NFE, each over `seeds` (sample.seed values),
    with the benchmark's guidance, sample count and batch size; reports/samplers.md names the
    cheapest setting whose mean FID is within `tolerance` of the reference's."""

    reference: StudyReference
    samplers: list[SamplerName] = Field(min_length=1)
    skip_types: list[SkipType] = Field(min_length=1)
    nfe: list[PositiveInt] = Field(min_length=1)
    seeds: list[int] = Field(default=[0, 1, 2], min_length=1)
    tolerance: float = Field(0.02, gt=0, lt=1)


# The design study's groups: the model switches (UViTConfig fields) and "scaling" (depth, width, patch size).
ABLATION_SWITCHES = ("skip", "time", "conv_position", "patch_embedding", "position_embedding")
SCALING_KEYS = ("depth", "embed_dim", "patch_size")
ABLATION_GROUPS = (*ABLATION_SWITCHES, "scaling")
STUDY = "ablation"  # a study run is named <benchmark>/ablation/<variant>-s<seed>
SPREAD = "spread"  # a seed-spread run is named <benchmark>/spread/s<seed>


class AblationConfig(_Section):
    """The design study (`dvc repro studies/dvc.yaml`, reports/ablations.md): the benchmark retrained
    with one thing changed at a time, each variant for every `seeds` value (train.seed) and the
    default architecture (shared by every group) for every `default_seeds` value, all with the
    same `train` overrides (the study's budget), then sampled and scored as the benchmark is.

    `groups` maps a switch (skip, time, conv_position, patch_embedding, position_embedding) to the
    values it tries besides the benchmark's own, and `scaling` to a list of model overrides
    ({depth: 2}, {embed_dim: 64}, {patch_size: 1}, ...).
    """

    train: dict[str, Any] = Field(default_factory=dict)
    seeds: list[int] = Field(default=[0, 1], min_length=2)
    default_seeds: list[int] = Field(default=[0, 1, 2], min_length=2)
    groups: dict[str, list[Any]] = Field(min_length=1)

    @field_validator("groups")
    @classmethod
    def _known_groups(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        from uvit.models.config import SWITCHES

        for group, values in v.items():
            if group not in ABLATION_GROUPS:
                raise ValueError(f"unknown group {group!r}; groups: {', '.join(ABLATION_GROUPS)}")
            if not values:
                raise ValueError(f"{group}: list at least one variant")
            for value in values:
                if group == "scaling":
                    if not isinstance(value, dict) or len(value) != 1 or set(value) - set(SCALING_KEYS):
                        raise ValueError(
                            f"scaling: each variant changes one of {', '.join(SCALING_KEYS)} "
                            f"({{depth: 2}}), got {value!r}"
                        )
                elif value not in SWITCHES[group]:
                    raise ValueError(f"{group}: {value!r} is not one of {SWITCHES[group]}")
        return v

    @field_validator("seeds", "default_seeds")
    @classmethod
    def _distinct(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError(f"repeated seed in {v}")
        return v

    def variants(self) -> dict[str, dict[str, Any]]:
        """{variant label: model overrides}: "default" ({}) first, then each group's variants in order,
        labelled "<switch>-<value>" or "<key>-<value>[_<key>-<value>]" (scaling)."""
        out: dict[str, dict[str, Any]] = {"default": {}}
        for group, values in self.groups.items():
            for value in values:
                overrides = dict(value) if group == "scaling" else {group: value}
                out[variant_label(overrides)] = overrides
        return out

    def group_variants(self, group: str) -> list[str]:
        """The variant labels a group's table compares, the default first."""
        values = self.groups[group]
        return ["default", *(variant_label(dict(v) if group == "scaling" else {group: v}) for v in values)]

    def runs(self) -> dict[str, tuple[str, int]]:
        """{run id: (variant, seed)} of every training run, run ids "<variant>-s<seed>"."""
        out = {}
        for variant in self.variants():
            for seed in self.default_seeds if variant == "default" else self.seeds:
                out[f"{variant}-s{seed}"] = (variant, seed)
        return out


class SpreadConfig(_Section):
    """The report's seed spread: the benchmark trained, sampled and scored again, unchanged but
    for `train.seed`, once per `seeds` value (runs <benchmark>/spread/s<seed>). The `spread` stage
    gives each figure's mean and standard deviation over these runs and the benchmark's own, and
    the report shows them. Only the default benchmark's chain (dvc.yaml) runs them."""

    seeds: list[int] = Field(min_length=1)

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError(f"repeated seed in {v}")
        return v


def variant_label(overrides: dict[str, Any]) -> str:
    return "_".join(f"{k}-{v}" for k, v in overrides.items())


def study_runs(cfg: BenchmarkConfig) -> list[str]:
    """The names of a benchmark's study runs (`<benchmark>/ablation/<run id>`); [] without a study."""
    if cfg.ablation is None:
        return []
    return [f"{cfg.name}/{STUDY}/{run}" for run in cfg.ablation.runs()]


def spread_runs(cfg: BenchmarkConfig) -> list[str]:
    """The names of a benchmark's seed-spread runs (`<benchmark>/spread/s<seed>`); [] without a spread."""
    if cfg.spread is None:
        return []
    return [f"{cfg.name}/{SPREAD}/s{seed}" for seed in cfg.spread.seeds]


class ArtifactsConfig(_Section):
    """Where the publish stage puts a finished run (uvit.stages.publish): `s3://bucket/prefix`,
    `file:///dir` or a directory (relative to the project root). Credentials never go here: they
    come from the environment (AWS_ACCESS_KEY_ID, ...) or the AWS config files."""

    url: str = "artifacts"
    endpoint_url: str | None = None  # an S3-compatible server (MinIO); else $UVIT_S3_ENDPOINT_URL or AWS
    ray_checkpoint: bool = True  # also publish the final Ray Train checkpoint (optimizer state: resumable)

    @field_validator("url")
    @classmethod
    def _store_url(cls, v: str) -> str:
        from urllib.parse import urlparse

        u = urlparse(v)
        if not v.strip():
            raise ValueError("empty; use s3://bucket/prefix, file:///dir or a directory")
        if u.scheme not in ("", "s3", "file"):
            raise ValueError(f"unsupported scheme {u.scheme!r}; use s3://bucket/prefix, file:///dir or a directory")
        if "@" in u.netloc:
            raise ValueError("credentials do not belong in params.yaml: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY")
        if u.scheme == "s3" and len(u.netloc) < 3:
            raise ValueError(f"{v!r} names no bucket (s3://bucket/prefix, bucket names >= 3 characters)")
        return v

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        from urllib.parse import urlparse

        if v is None:
            return v
        u = urlparse(v)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"expected http(s)://host[:port], got {v!r}")
        if "@" in u.netloc:
            raise ValueError("credentials do not belong in params.yaml: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY")
        return v


class BenchmarkConfig(_Section):
    name: str
    data: DataConfig
    encode: EncodeConfig | None = None  # latent benchmarks only
    validate_: ValidateConfig = Field(alias="validate")
    model: ModelConfig
    diffusion: DiffusionConfig
    train: TrainConfig
    sample: SampleConfig
    score: ScoreConfig
    artifacts: ArtifactsConfig = Field(default_factory=ArtifactsConfig)
    sampler_study: SamplerStudyConfig | None = None
    ablation: AblationConfig | None = None
    spread: SpreadConfig | None = None

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @property
    def text_to_image(self) -> bool:
        """Whether the data has captions and the model is conditioned on their CLIP features."""
        return self.data.captions

    @property
    def base(self) -> str:
        """The benchmark whose data this one reads: itself, or a study run's benchmark."""
        return self.name.split("/")[0]

    @property
    def study(self) -> str | None:
        """The study a run of it belongs to (STUDY, SPREAD), or None for a benchmark's own block."""
        parts = self.name.split("/")
        return parts[1] if len(parts) > 1 else None

    def decoder_vae(self) -> tuple[str, str]:
        """(the VAE that decodes samples, the params key naming it): sample.vae, else encode.vae."""
        if self.encode is None:
            raise ConfigError(f"{self.name}: a pixel benchmark has no VAE")
        if self.sample.vae:
            return self.sample.vae, f"{self.name}.sample.vae"
        return self.encode.vae, f"{self.name}.encode.vae"

    def uvit_config(self):
        """The model's UViTConfig: the preset with this benchmark's overrides applied."""
        from uvit.models.presets import preset_config

        try:
            return preset_config(self.model.preset, **self.model.overrides)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{self.name}.model.overrides: {e}") from None


def load_params(path: str | Path = DEFAULT_PARAMS) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} not found: run from the project root or pass --params")
    params = yaml.safe_load(path.read_text()) or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{path}: expected a mapping of benchmark name -> parameters")
    return params


def load_benchmark(name: str, params: str | Path | dict[str, Any] = DEFAULT_PARAMS) -> BenchmarkConfig:
    """Read and validate one benchmark's block (or a study run, `<benchmark>/ablation/<run id>`,
    or a seed-spread run, `<benchmark>/spread/s<seed>`); raise ConfigError naming the bad key."""
    params = params if isinstance(params, dict) else load_params(params)
    if "/" in name:
        return _study_run(name, params)
    if name not in params:
        known = [k for k in params if k in BENCHMARKS] or list(BENCHMARKS)
        raise ConfigError(f"unknown benchmark {name!r}; params.yaml defines: {', '.join(known)}")
    block = params[name]
    if not isinstance(block, dict):
        raise ConfigError(f"{name}: expected a mapping of stage sections, got {type(block).__name__}")
    cfg = _validated(name, block)
    if cfg.ablation is not None:
        _check_study(cfg)
        for run in study_runs(cfg):  # every run of the study must be a valid benchmark
            _study_run(run, params, cfg)
    if cfg.spread is not None and cfg.train.seed in cfg.spread.seeds:
        raise ConfigError(
            f"{name}.{SPREAD}.seeds: {cfg.train.seed} is {name}.train.seed, the benchmark's own run; "
            "list only the other seeds"
        )
    return cfg


def _check_study(cfg: BenchmarkConfig) -> None:
    """A variant must differ from the benchmark's own model (which is the study's "default")."""
    model = cfg.uvit_config()
    for variant, overrides in cfg.ablation.variants().items():
        if overrides and all(getattr(model, k) == v for k, v in overrides.items()):
            raise ConfigError(
                f"{cfg.name}.{STUDY}.groups: {variant} is the benchmark's own model, which every "
                "group has as its default; list only the variants that differ"
            )


def _study_run(name: str, params: dict[str, Any], cfg: BenchmarkConfig | None = None) -> BenchmarkConfig:
    """A study run's config: its benchmark's block (`cfg`, loaded when not given) with the study's
    train overrides, the run's seed and the variant's model overrides; without the studies (a run
    has none of its own)."""
    base, _, rest = name.partition("/")
    study, _, run = rest.partition("/")
    cfg = cfg or load_benchmark(base, params)
    block = {k: v for k, v in params[base].items() if k not in (STUDY, SPREAD, "sampler_study")}
    if study == SPREAD and cfg.spread is not None:
        seeds = {f"s{seed}": seed for seed in cfg.spread.seeds}
        if run not in seeds:
            raise ConfigError(f"{base}.{SPREAD}: no run {run!r}; runs: {', '.join(seeds)}")
        block["train"] = {**block["train"], "seed": seeds[run]}
        return _validated(name, block, where=f"{base}.{SPREAD} (run {run})")
    if study != STUDY or cfg.ablation is None:
        raise ConfigError(
            f"{name!r} names no study run: runs are <benchmark>/{STUDY}/<run id> (a benchmark with an "
            f"`{STUDY}` block) or <benchmark>/{SPREAD}/s<seed> (one with a `{SPREAD}` block)"
        )
    runs = cfg.ablation.runs()
    if run not in runs:
        raise ConfigError(f"{base}.{STUDY}: no run {run!r}; runs: {', '.join(runs)}")
    variant, seed = runs[run]
    block["train"] = {**block["train"], **cfg.ablation.train, "seed": seed}
    model = dict(block["model"])
    model["overrides"] = {**model.get("overrides", {}), **cfg.ablation.variants()[variant]}
    block["model"] = model
    return _validated(name, block, where=f"{base}.{STUDY} (run {run})")


def _validated(name: str, block: dict[str, Any], where: str | None = None) -> BenchmarkConfig:
    if isinstance(block.get("validate"), dict) and "num_classes" in block["validate"]:
        raise ConfigError(
            f"{where or name}.validate.num_classes: the class count is a fact of the data now; move it "
            f"to {name}.data.num_classes"
        )
    try:
        cfg = BenchmarkConfig.model_validate({"name": name, **block})
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"])
            got = f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], dict) else ""
            lines.append(f"{where or name}.{loc}: {err['msg']}{got}")
        raise ConfigError("invalid parameters:\n  " + "\n  ".join(lines)) from None
    model = cfg.uvit_config()  # overrides must build a valid model
    if model.in_chans == 4 and cfg.encode is None:
        raise ConfigError(
            f"{name}.encode: preset {cfg.model.preset} is a latent model and needs an encode "
            "section (vae, scale_factor)"
        )
    if model.in_chans == 4 and cfg.train.random_flip:
        raise ConfigError(
            f"{name}.train.random_flip: latent benchmarks cannot flip at training time (the latents "
            "are stored already; the data stage stores mirrored copies where the recipe flips)"
        )
    if model.clip_dim is not None and (cfg.encode is None or not cfg.encode.text_encoder):
        raise ConfigError(f"{name}.encode.text_encoder: a text-to-image preset needs a CLIP text encoder")
    if (model.clip_dim is not None) != cfg.data.captions:
        raise ConfigError(
            f"{name}.model.preset: {cfg.model.preset} is {'' if model.clip_dim is not None else 'not '}a "
            f"text-to-image model, and the {cfg.data.source} source has {'' if cfg.data.captions else 'no '}captions"
        )
    k = cfg.data.num_classes
    if model.num_classes > 0 and not 0 < k <= model.num_classes:
        raise ConfigError(
            f"{name}.data.num_classes: {k}, but {cfg.model.preset} is class-conditional on "
            f"{model.num_classes} classes: the data needs labels 0..K-1 with K <= {model.num_classes} "
            "(or set model.overrides.num_classes: -1 for an unconditional model)"
        )
    return cfg
