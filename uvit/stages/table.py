"""THE stage table: every stage of the pipeline, declared once.

Each `Stage` says what its command runs, which code and artifacts it depends on, which external
files its parameters name (the VAE, the text encoder, Inception weights, reference statistics, a
user-supplied archive or folder), which parameter keys it reads, what it writes, and which
benchmarks it applies to. Everything else is derived from this table:

- `uvit pipeline write` generates `dvc.yaml` (the default benchmark) and `paper/dvc.yaml` (every
  other block of params.yaml) from it (uvit.stages.dvcfile), and a test holds the committed files
  equal to what it would write;
- `uvit run <benchmark>` calls the stage functions in table order;
- the Prefect flow (pipelines/flows.py) runs the same stages through `dvc repro`, so DVC alone
  decides what is up to date.

A new stage or benchmark is one entry here (or one block of params.yaml).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from uvit.config import BenchmarkConfig
from uvit.paths import BenchmarkPaths

# Code every stage runs: the parameter schema (its defaults decide behaviour), the artifact layout,
# file plumbing and the shard format.
SHARED_CODE = ("uvit/config.py", "uvit/paths.py", "uvit/fileio.py", "uvit/data/shards.py")

# The benchmarks `dvc repro` (no target) runs: the root dvc.yaml. Every other block goes to paper/dvc.yaml.
DEFAULT_BENCHMARKS = ("digits",)


@dataclass(frozen=True)
class Out:
    """One output of a stage: a path, and how DVC keeps it."""

    path: str
    cache: bool = True
    persist: bool = False  # kept across runs (resumable shards carry their own fingerprints)
    kind: str = "outs"  # "outs", "metrics" or "plots"
    plot: tuple[tuple[str, str], ...] = ()  # plots: (("x", "step"), ("y", "loss"))


@dataclass(frozen=True)
class Stage:
    """One pipeline stage.

    `run` is "module:function", a function (cfg, paths, **kw) -> dict. The callables take the
    validated config and the benchmark's paths and return what the stage reads or writes:
    `deps` upstream artifacts, `params` dotted keys relative to the benchmark block,
    `externals` {dotted param key: value} for the files the parameters name, `outs` its outputs.
    """

    name: str
    run: str
    help: str
    code: tuple[str, ...]
    params: Callable[[BenchmarkConfig], list[str]]
    deps: Callable[[BenchmarkConfig, BenchmarkPaths], list[Path]]
    outs: Callable[[BenchmarkConfig, BenchmarkPaths], list[Out]]
    externals: Callable[[BenchmarkConfig], dict[str, str | None]] = field(default=lambda cfg: {})
    code_if: Callable[[BenchmarkConfig], tuple[str, ...]] = field(default=lambda cfg: ())  # code for some benchmarks
    applies: Callable[[BenchmarkConfig], bool] = field(default=lambda cfg: True)
    retries: int = 0  # for network stages, under orchestrators that retry (Prefect)

    def code_deps(self, cfg: BenchmarkConfig) -> list[str]:
        """The code this stage runs for `cfg`: its own, what every stage shares, and kind-specific code."""
        return [*self.code, *self.code_if(cfg), *SHARED_CODE]

    def function(self) -> Callable[..., dict]:
        module, _, name = self.run.partition(":")
        return getattr(importlib.import_module(module), name)


# -- facts about a benchmark that decide its chain --------------------------------------------------
def kind(cfg: BenchmarkConfig) -> str:
    """ "pixel", "latent" (SD-VAE latents) or "text" (text-to-image on latents)."""
    if cfg.text_to_image:
        return "text"
    return "latent" if cfg.uvit_config().in_chans == 4 else "pixel"


def uses_classifier(cfg: BenchmarkConfig) -> bool:
    return cfg.score.feature_extractor == "digits-classifier"


def training_split(cfg: BenchmarkConfig, paths: BenchmarkPaths) -> list[Path]:
    """What the train stage reads: pixel shards, or VAE moments (+ CLIP contexts for text)."""
    k = kind(cfg)
    if k == "pixel":
        return [paths.data, paths.validate]
    return [paths.latents, *([paths.contexts] if k == "text" else [])]


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_FILE_SUFFIX = re.compile(r"\.(pth|pt|ckpt|bin|safetensors|npz|npy|tar|tgz|gz|zip|json)$")


def external_path(value: str | None, root: Path = Path(".")) -> str | None:
    """The dependency a parameter value names, or None when it names no file.

    A value is a file (or folder) dependency when it is an s3:// URL, an absolute or ./-relative
    path, has a file suffix, or exists under `root`; an "owner/name" value that is none of these
    is a model-hub id, resolved from the hub's cache and not tracked.
    """
    if not value:
        return None
    if value.startswith(("s3://", "/", "./", "../", "~")) or _FILE_SUFFIX.search(value):
        return value
    if (root / value).exists() or not _HUB_ID.match(value):
        return value
    return None


# -- the table ----------------------------------------------------------------------------------------
def _sections(*names: str) -> Callable[[BenchmarkConfig], list[str]]:
    return lambda cfg: list(names)


def _train_params(cfg: BenchmarkConfig) -> list[str]:
    keys = ["model", "diffusion", "train", "data.num_classes"]
    if cfg.encode is not None:
        keys.append("encode.scale_factor")
    if cfg.train.fid_every:
        keys += ["score.feature_extractor", "score.inception_weights", "score.reference_stats"]
    return keys


def _train_deps(cfg: BenchmarkConfig, p: BenchmarkPaths) -> list[Path]:
    deps = training_split(cfg, p)
    if cfg.train.fid_every:  # periodic FID compares with the training images (or reference stats)
        deps += [p.data] if p.data not in deps else []
        deps += [p.classifier] if uses_classifier(cfg) else []
    return deps


def _train_outs(cfg: BenchmarkConfig, p: BenchmarkPaths) -> list[Out]:
    outs = [
        Out(str(p.train / "model")),
        Out(str(p.train / "ema")),
        Out(str(p.train / "summary.json"), cache=False),
        Out(str(p.train / "metrics.csv"), cache=False, kind="plots", plot=(("x", "step"), ("y", "loss"))),
    ]
    if cfg.train.fid_every:  # the periodic FID, step by step
        outs.append(Out(str(p.train / "fid.csv"), cache=False, kind="plots", plot=(("x", "step"), ("y", "fid"))))
    return outs


def _sample_params(cfg: BenchmarkConfig) -> list[str]:
    keys = ["sample", "model", "diffusion", "data.num_classes", "train.use_gpu", "train.threads_per_worker"]
    if cfg.encode is not None:
        keys += ["encode.vae", "encode.scale_factor", "encode.text_encoder"]
    return keys


def _sample_deps(cfg: BenchmarkConfig, p: BenchmarkPaths) -> list[Path]:
    deps = [p.train / ("ema" if cfg.sample.use_ema else "model")]
    if kind(cfg) == "text":  # validation captions and their contexts
        deps += [p.data, p.contexts]
    return deps


def _decoder_externals(cfg: BenchmarkConfig) -> dict[str, str | None]:
    if cfg.encode is None:
        return {}
    vae, key = cfg.decoder_vae()
    return {key.split(".", 1)[1]: vae, "encode.text_encoder": cfg.encode.text_encoder}


def _score_params(cfg: BenchmarkConfig) -> list[str]:
    return ["score", "sample", "train.seed", "train.use_gpu", "train.threads_per_worker", "data.num_classes"]


def _score_deps(cfg: BenchmarkConfig, p: BenchmarkPaths) -> list[Path]:
    return [p.samples, p.data, *([p.classifier] if uses_classifier(cfg) else [])]


def _score_outs(cfg: BenchmarkConfig, p: BenchmarkPaths) -> list[Out]:
    outs = [Out(f"{p.score}/metrics.json", cache=False, kind="metrics")]
    if not uses_classifier(cfg):  # Inception statistics of the reference split, cached by content
        outs.append(Out(str(p.run / "reference"), persist=True))
    return outs


def _score_externals(cfg: BenchmarkConfig) -> dict[str, str | None]:
    s = cfg.score
    if uses_classifier(cfg):
        return {}
    return {
        "score.inception_weights": s.inception_weights,
        "score.reference_stats": s.reference_stats,
        "score.clip_model": s.clip_model if kind(cfg) == "text" else None,
    }


def _report_deps(cfg: BenchmarkConfig, p: BenchmarkPaths) -> list[Path]:
    deps = [p.train / "summary.json", p.train / "metrics.csv", p.sample_summary, p.score / "metrics.json"]
    return deps + ([p.spread / "summary.json"] if cfg.spread is not None else [])


def _spread_deps(cfg: BenchmarkConfig, p: BenchmarkPaths) -> list[Path]:
    """The figures of the benchmark's own run and of each of its seed-spread runs."""
    from uvit.config import spread_runs

    runs = [p, *(p.study_run(run) for run in spread_runs(cfg))]
    return [f for rp in runs for f in (rp.train / "summary.json", rp.score / "metrics.json")]


def _report_outs(cfg: BenchmarkConfig, p: BenchmarkPaths) -> list[Out]:
    outs = [Out(f"{p.reports}/{p.benchmark}.md", cache=False), Out(f"{p.reports}/{p.benchmark}", cache=False)]
    if cfg.name in DEFAULT_BENCHMARKS:  # the index is the default chain's output (others refresh it)
        outs.append(Out(f"{p.reports}/README.md", cache=False))
    return outs


def _publish_deps(cfg: BenchmarkConfig, p: BenchmarkPaths) -> list[Path]:
    deps = [
        p.train / "model",
        p.train / "ema",
        p.train / "summary.json",
        p.train / "metrics.csv",
        p.samples,
        p.sample_summary,
    ]
    deps += [p.classifier] if uses_classifier(cfg) else [p.run / "reference"]
    return deps + [p.score / "metrics.json", p.reports / f"{p.benchmark}.md", p.reports / p.benchmark]


STAGES: tuple[Stage, ...] = (
    Stage(
        "data",
        "uvit.stages.data:run_data",
        "Download/locate and preprocess a benchmark's data into shards + manifest (data/<benchmark>/).",
        code=("uvit/data", "uvit/stages/data.py"),
        params=_sections("data", "model"),  # the model's resolution decides the crop size
        deps=lambda cfg, p: [],
        outs=lambda cfg, p: [Out(str(p.data))],
        externals=lambda cfg: {"data.root": cfg.data.root},
        retries=3,
    ),
    Stage(
        "validate",
        "uvit.stages.validate:run_validate",
        "Check the data with great-expectations suites; exit non-zero with a summary on failure.",
        code=("uvit/data/validate.py", "uvit/stages/validate.py"),
        params=_sections("validate", "data.num_classes"),
        deps=lambda cfg, p: [p.data],
        outs=lambda cfg, p: [Out(str(p.validate))],
    ),
    Stage(
        "encode",
        "uvit.stages.encode:run_encode",
        "Latent benchmarks: SD-VAE moments (and CLIP text features) of the data, validated.",
        code=("uvit/encoders", "uvit/data/encode.py", "uvit/data/validate_latents.py", "uvit/stages/encode.py"),
        params=_sections("encode", "data.shard_size", "data.num_classes"),
        deps=lambda cfg, p: [p.data, p.validate],
        outs=lambda cfg, p: [Out(str(p.latents)), *([Out(str(p.contexts))] if kind(cfg) == "text" else [])],
        externals=lambda cfg: {"encode.vae": cfg.encode.vae, "encode.text_encoder": cfg.encode.text_encoder},
        applies=lambda cfg: cfg.encode is not None,
    ),
    Stage(
        "classifier",
        "uvit.stages.classifier:run_classifier",
        "Train the digits feature extractor used for FID and conditional accuracy.",
        code=("uvit/evaluate/classifier.py", "uvit/stages/classifier.py"),
        params=_sections("score.classifier_epochs", "data.seed", "data.num_classes", "train.threads_per_worker"),
        deps=lambda cfg, p: [p.data],
        outs=lambda cfg, p: [Out(str(p.classifier))],
        applies=uses_classifier,
    ),
    Stage(
        "train",
        "uvit.stages.train:run_train",
        "Train with Ray Train (TorchTrainer, DDP or FSDP over train.num_workers workers); resumes by default.",
        code=("uvit/models", "uvit/diffusion", "uvit/train", "uvit/stages/train.py"),
        params=_train_params,
        deps=_train_deps,
        outs=_train_outs,
        externals=lambda cfg: (
            {"score.inception_weights": cfg.score.inception_weights, "score.reference_stats": cfg.score.reference_stats}
            if cfg.train.fid_every
            else {}
        ),
    ),
    Stage(
        "sample",
        "uvit.stages.sample:run_sample",
        "Draw samples from the trained EMA weights in resumable shards (runs/<benchmark>/samples/).",
        code=("uvit/models", "uvit/diffusion", "uvit/evaluate", "uvit/stages/sample.py"),
        code_if=lambda cfg: ("uvit/encoders", "uvit/report/paper.py") if cfg.encode is not None else (),
        params=_sample_params,
        deps=_sample_deps,
        # samples/ (cached): every sample; sample-summary/ (in git): the summary and grids the report shows.
        outs=lambda cfg, p: [Out(str(p.samples), persist=True), Out(str(p.sample_summary), cache=False, persist=True)],
        externals=_decoder_externals,
    ),
    Stage(
        "score",
        "uvit.stages.score:run_score",
        "FID, KID, precision/recall (torch-fidelity), conditional accuracy or CLIP score of the samples.",
        code=("uvit/models", "uvit/diffusion", "uvit/evaluate", "uvit/stages/score.py"),  # + the ceiling's samples
        code_if=lambda cfg: ("uvit/encoders",) if kind(cfg) == "text" else (),  # CLIP score
        params=_score_params,
        deps=_score_deps,
        outs=_score_outs,
        externals=_score_externals,
        retries=1,
    ),
    Stage(
        "samplers",
        "uvit.stages.samplers:run_samplers",
        "The sampler study: FID and conditional accuracy against NFE for every sampler and time grid, "
        "over seeds (runs/<benchmark>/samplers/, reports/samplers.md); benchmarks with a sampler_study block.",
        code=(
            "uvit/models",
            "uvit/diffusion",
            "uvit/evaluate/sampler_study.py",
            "uvit/evaluate/sample.py",
            "uvit/evaluate/draw.py",
            "uvit/evaluate/fid.py",
            "uvit/evaluate/classifier.py",
            "uvit/report/samplers.py",
            "uvit/stages/samplers.py",
        ),
        # Not sample.sampler/steps: the study's settings are its own, so the sample stage can adopt one.
        params=_sections(
            "sampler_study",
            "sample.guidance_scale",
            "sample.num_samples",
            "sample.batch_size",
            "sample.use_ema",
            "model",
            "diffusion",
            "data.num_classes",
            "train.use_gpu",
            "train.threads_per_worker",
        ),
        deps=lambda cfg, p: [p.train / ("ema" if cfg.sample.use_ema else "model"), p.classifier, p.data],
        outs=lambda cfg, p: [
            Out(f"{p.samplers}/results.csv", cache=False),
            Out(f"{p.samplers}/summary.json", cache=False, kind="metrics"),
            Out(f"{p.reports}/samplers.md", cache=False),
            Out(f"{p.reports}/samplers", cache=False),
        ],
        applies=lambda cfg: cfg.sampler_study is not None and uses_classifier(cfg),
    ),
    Stage(
        "spread",
        "uvit.stages.spread:run_spread",
        "The seed spread: FID, FID/floor, conditional accuracy and final loss over the benchmark's run and "
        "its spread runs (spread.seeds), mean ± std (runs/<benchmark>/spread/summary.json); needs a spread block.",
        code=("uvit/report/spread.py", "uvit/report/ablations.py", "uvit/stages/spread.py"),
        params=_sections("spread", "train.seed"),
        deps=_spread_deps,
        outs=lambda cfg, p: [Out(f"{p.spread}/summary.json", cache=False, kind="metrics")],
        applies=lambda cfg: cfg.spread is not None,
    ),
    Stage(
        "report",
        "uvit.stages.report:run_report",
        "Write reports/<benchmark>.md and the reports/README.md index from the artifacts.",
        code=("uvit/report", "uvit/stages/report.py"),
        params=_sections(),
        deps=_report_deps,
        outs=_report_outs,
    ),
    Stage(
        "publish",
        "uvit.stages.publish:run_publish",
        "Upload the run to <benchmark>.artifacts.url (S3 or a folder), content-addressed with a sha256 "
        "manifest; records the run id in runs/<benchmark>/publish.json.",
        code=("uvit/storage", "uvit/stages/publish.py"),
        params=_sections("artifacts"),
        deps=_publish_deps,
        outs=lambda cfg, p: [Out(str(p.run / "publish.json"), cache=False)],
        retries=3,
    ),
)
STAGE_NAMES = tuple(s.name for s in STAGES)

# -- the design study (studies/dvc.yaml) -----------------------------------------------------------
# Each study run (<benchmark>/ablation/<run id>, uvit.config.AblationConfig) is these stages of the
# table above, reading its benchmark's data, validation and classifier; then one stage per study.
# A seed-spread run (<benchmark>/spread/s<seed>) is the same stages, in the benchmark's own chain.
RUN_STAGES = ("train", "sample", "score")


def _run_files(cfg: BenchmarkConfig, p: BenchmarkPaths) -> list[Path]:
    from uvit.config import study_runs

    files = []
    for run in study_runs(cfg):
        rp = p.study_run(run)
        files += [rp.train / "summary.json", rp.train / "fid.csv", rp.score / "metrics.json"]
    return files


STUDY_STAGES: tuple[Stage, ...] = (
    Stage(
        "ablation",
        "uvit.stages.ablation:run_ablation",
        "The design study's page: every ablation run's FID, FID/floor and conditional accuracy per group, "
        "mean ± spread over seeds, FID against training step, the paper's finding beside ours "
        "(runs/<benchmark>/ablation/, reports/ablations.md); `dvc repro studies/dvc.yaml` runs the study.",
        code=("uvit/report/ablations.py", "uvit/report/data/paper_ablations.yaml", "uvit/stages/ablation.py"),
        params=_sections("ablation"),
        deps=_run_files,
        outs=lambda cfg, p: [
            Out(f"{p.ablation}/results.csv", cache=False),
            Out(f"{p.ablation}/summary.json", cache=False, kind="metrics"),
            Out(f"{p.reports}/ablations.md", cache=False),
            Out(f"{p.reports}/ablations", cache=False),
        ],
        applies=lambda cfg: cfg.ablation is not None,
    ),
)


def run_stages(cfg: BenchmarkConfig) -> list[Stage]:
    """The stages each study run of `cfg` goes through."""
    return [s for s in STAGES if s.name in RUN_STAGES and s.applies(cfg)]


def get_stage(name: str) -> Stage:
    for s in (*STAGES, *STUDY_STAGES):
        if s.name == name:
            return s
    raise KeyError(f"unknown stage {name!r}; stages: {', '.join(STAGE_NAMES + tuple(s.name for s in STUDY_STAGES))}")


def chain(cfg: BenchmarkConfig) -> list[Stage]:
    """The stages that apply to a benchmark (or a study run: train, sample, score), in order."""
    if cfg.base != cfg.name:
        return run_stages(cfg)
    return [s for s in STAGES if s.applies(cfg)]


def steps(cfg: BenchmarkConfig, params: dict) -> list[tuple[str, Stage]]:
    """(run name, stage) in the order `uvit run` and Prefect run them: the benchmark's chain, with
    each seed-spread run's train, sample and score just before the spread stage that reads them.
    `params` is the parsed params.yaml the runs' configs come from."""
    from uvit.config import load_benchmark, spread_runs

    out: list[tuple[str, Stage]] = []
    for stage in chain(cfg):
        if stage.name == "spread":
            out += [(run, s) for run in spread_runs(cfg) for s in run_stages(load_benchmark(run, params))]
        out.append((cfg.name, stage))
    return out


def posix(path: Path | str) -> str:
    return PurePosixPath(Path(path)).as_posix()
