"""The `uvit` command: the model family at a glance, and every pipeline stage per benchmark.

uvit models                      presets with exact parameter counts and GFLOPs
uvit data digits                 one stage (data, validate, train, sample, classifier, score, report)
uvit run digits                  every stage in order (what `dvc repro` does, without DVC's caching)
uvit publish digits              the run to digits.artifacts.url (S3 or a folder), sha256 manifest
uvit fetch digits [RUN_ID]       a published run back, every file verified
uvit dvc-remote s3://bucket/dvc  the DVC remote, at the S3 endpoint every other S3 user talks to
uvit generate runs/digits/train  images from a checkpoint: a grid, PNGs, samples.npz
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from uvit.signatures import takes_fields

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="U-ViT (Bao et al., CVPR 2023): models, diffusion, and the benchmark pipeline.",
)

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="Parameter file (one block per benchmark).")]
RootOpt = Annotated[Path, typer.Option("--root", help="Project root holding data/, runs/ and reports/.")]


@app.command()
def models(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List the paper's presets: exact parameter counts and forward GFLOPs.

    GFLOPs are counted as the paper does: G multiply-accumulates of one forward pass for one
    image (matmuls and convolutions, attention included; the paper's 133 GFLOPs for U-ViT-H/2
    is 133.2 G MACs). Multiply by 2 for FLOPs in the 1 MAC = 2 FLOPs convention.
    """
    from uvit.models import PRESETS, count_macs, count_params

    rows = []
    for p in PRESETS.values():
        c = p.config
        rows.append(
            {
                "preset": p.name,
                "model": p.title,
                "benchmark": p.benchmark,
                "input": f"{c.in_chans}x{c.img_size}x{c.img_size}",
                "tokens": c.num_tokens,
                "params": count_params(c),
                "gflops_macs": round(count_macs(c) / 1e9, 2),
            }
        )
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    header = f"{'preset':<24} {'model':<17} {'benchmark':<12} {'input':<9} {'tokens':>6} {'params':>13} {'GFLOPs*':>8}"
    typer.echo(header)
    typer.echo("-" * len(header))
    for r in rows:
        typer.echo(
            f"{r['preset']:<24} {r['model']:<17} {r['benchmark']:<12} {r['input']:<9} {r['tokens']:>6} "
            f"{r['params']:>13,} {r['gflops_macs']:>8.2f}"
        )
    typer.echo("* GFLOPs as in the paper: G multiply-accumulates per forward, one image, condition tokens included.")


def _stage(name: str, benchmark: str, params: Path, root: Path, fn=None, **kwargs) -> None:
    from uvit.config import ConfigError, load_benchmark
    from uvit.paths import BenchmarkPaths
    from uvit.stages.table import get_stage

    try:
        cfg = load_benchmark(benchmark, params)
        if os.environ.get("DVC_STAGE"):  # run by DVC: its stage must be the one the table declares now
            _check_dvc_files(root, params)
    except ConfigError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    try:
        result = (fn or get_stage(name).function())(cfg, BenchmarkPaths(benchmark, root), **kwargs)
    except _user_errors() as e:  # bad input the user can fix: say what, without a traceback
        typer.echo(f"error: [{name} {benchmark}] {type(e).__name__}: {e}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"[{name} {benchmark}] {json.dumps(result, default=str)}")


def _check_dvc_files(root: Path, params: Path) -> None:
    from uvit.config import ConfigError
    from uvit.stages import dvcfile

    params_path = params if params.is_absolute() else Path(os.environ.get("DVC_ROOT", root)) / params
    dvc_root = params_path.parent
    behind = dvcfile.stale(dvc_root, params_path.name)
    if behind:
        raise ConfigError(
            f"{', '.join(map(str, behind))} no longer match(es) params.yaml and the stage table "
            "(a parameter naming a file changed?): run `uvit pipeline write`, then `dvc repro` again"
        )


def _user_errors() -> tuple[type[BaseException], ...]:
    from uvit.config import ConfigError
    from uvit.data.shards import DataIntegrityError
    from uvit.data.validate import ValidationFailed
    from uvit.storage.artifacts import ArtifactIntegrityError

    return (
        ConfigError,
        DataIntegrityError,
        ValidationFailed,
        FileNotFoundError,
        NotImplementedError,
        ArtifactIntegrityError,
        FileExistsError,
    )


def _make_stage_command(name: str, doc: str):
    def command(
        benchmark: Annotated[
            str,
            typer.Argument(
                help="Benchmark name: a block of params.yaml (e.g. digits), a "
                "study run (digits/ablation/skip-none-s0) or a seed-spread run (digits/spread/s1)."
            ),
        ],
        params: ParamsOpt = Path("params.yaml"),
        root: RootOpt = Path("."),
    ) -> None:
        _stage(name, benchmark, params, root)

    command.__doc__ = doc
    app.command(name=name)(command)


def _register_stage_commands() -> None:
    from uvit.stages.table import STAGES, STUDY_STAGES

    for stage in (*STAGES, *STUDY_STAGES):
        if stage.name != "train":  # train has its own command (--resume/--fresh)
            _make_stage_command(stage.name, stage.help)


_register_stage_commands()


@app.command()
def train(
    benchmark: Annotated[str, typer.Argument(help="Benchmark name: a block of params.yaml (e.g. digits).")],
    params: ParamsOpt = Path("params.yaml"),
    root: RootOpt = Path("."),
    resume: Annotated[
        bool,
        typer.Option(
            "--resume/--fresh",
            help="Continue from the newest good checkpoint of the "
            "same configuration in runs/<benchmark>/ray/ (exact), or start afresh.",
        ),
    ] = True,
) -> None:
    """Train with Ray Train (TorchTrainer; DDP across train.num_workers workers).

    Resumes by default: checkpoints are kept per configuration, so an interrupted run continues
    and raising train.steps extends the previous run instead of starting over.
    """
    _stage("train", benchmark, params, root, resume=resume)


@app.command()
def fetch(
    benchmark: Annotated[str, typer.Argument(help="Benchmark name: a block of params.yaml (e.g. digits).")],
    run_id: Annotated[
        str | None,
        typer.Argument(help="A published run id, or 'latest'; default: the one in runs/<benchmark>/publish.json."),
    ] = None,
    dest: Annotated[
        Path | None, typer.Option("--dest", help="Where to put it (default: fetched/<benchmark>/<run-id>/).")
    ] = None,
    params: ParamsOpt = Path("params.yaml"),
    root: RootOpt = Path("."),
) -> None:
    """Download a published run from <benchmark>.artifacts.url; every file is checked against the
    manifest's sha256 (a corrupted object is refused)."""
    from uvit.stages.publish import run_fetch

    _stage("fetch", benchmark, params, root, fn=run_fetch, run_id=run_id, dest=dest)


@app.command("dvc-remote")
def dvc_remote(
    url: Annotated[str, typer.Argument(help="Where DVC keeps its cache on S3: s3://bucket/prefix.")],
    name: Annotated[str, typer.Option("--name", help="The remote's name in .dvc/config.")] = "s3",
    endpoint_url: Annotated[
        str | None,
        typer.Option(
            "--endpoint-url",
            help="The S3 endpoint (MinIO, moto). Default: $UVIT_S3_ENDPOINT_URL, else $AWS_ENDPOINT_URL_S3, "
            "else $AWS_ENDPOINT_URL, else AWS.",
            show_default=False,
        ),
    ] = None,
    root: Annotated[Path, typer.Option("--root", help="The DVC repository (holding .dvc/).")] = Path("."),
) -> None:
    """Set DVC's default remote to URL, at the S3 endpoint the rest of uvit uses.

    URL (alone) goes to the committed .dvc/config; the endpoint to the git-ignored .dvc/config.local (removed there for AWS).

    The endpoint: --endpoint-url, else $UVIT_S3_ENDPOINT_URL, else $AWS_ENDPOINT_URL_S3, else $AWS_ENDPOINT_URL, else AWS; the rule that artifacts, downloads and Ray checkpoints follow (DVC alone does not read UVIT_S3_ENDPOINT_URL). Run this again after changing the endpoint.

    Credentials stay in the environment (or `dvc remote modify --local s3 access_key_id ...`). Then `dvc push` / `dvc pull`.
    """
    import subprocess

    from uvit.storage.s3 import set_dvc_remote

    try:
        endpoint = set_dvc_remote(url, name, endpoint_url, root)
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    except subprocess.CalledProcessError as e:
        typer.echo(f"error: dvc {' '.join(e.cmd[3:])}: {(e.stderr or '').strip()}", err=True)
        raise typer.Exit(1) from None
    where = f"{endpoint} (in .dvc/config.local)" if endpoint else "AWS"
    typer.echo(f"DVC remote {name!r} (the default): {url} at {where}")


@app.command()
def run(
    benchmark: Annotated[
        str,
        typer.Argument(
            help="Benchmark name: a block of params.yaml (e.g. digits), a study run "
            "(digits/ablation/skip-none-s0) or a seed-spread run (digits/spread/s1)."
        ),
    ],
    params: ParamsOpt = Path("params.yaml"),
    root: RootOpt = Path("."),
) -> None:
    """Run every stage of a benchmark in the stage table's order (its seed-spread runs' train,
    sample and score before its spread stage; a study run: train, sample, score), without DVC
    (prefer `dvc repro`, which skips what is up to date)."""
    from uvit.config import ConfigError, load_benchmark, load_params
    from uvit.stages.table import steps

    try:
        raw = load_params(params)
        todo = steps(load_benchmark(benchmark, raw), raw)
    except ConfigError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    for run_name, stage in todo:
        _stage(stage.name, run_name, params, root)


pipeline_app = typer.Typer(no_args_is_help=True, help="The stage table and the DVC files generated from it.")
app.add_typer(pipeline_app, name="pipeline")


@pipeline_app.command("write")
def pipeline_write(params: ParamsOpt = Path("params.yaml"), root: RootOpt = Path(".")) -> None:
    """Generate dvc.yaml (the default benchmark) and paper/dvc.yaml (every other block of
    params.yaml) from the stage table. Run it after changing a parameter that names a file."""
    from uvit.config import ConfigError
    from uvit.stages import dvcfile

    try:
        changed = dvcfile.write(root, params)
    except ConfigError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"wrote {', '.join(map(str, changed))}" if changed else "up to date")


@pipeline_app.command("check")
def pipeline_check(params: ParamsOpt = Path("params.yaml"), root: RootOpt = Path(".")) -> None:
    """Exit 1 when dvc.yaml or paper/dvc.yaml differ from what `uvit pipeline write` would write."""
    from uvit.stages import dvcfile

    behind = dvcfile.stale(root, params)
    if behind:
        typer.echo(f"out of date: {', '.join(map(str, behind))} (run `uvit pipeline write`)", err=True)
        raise typer.Exit(1)
    typer.echo("up to date")


@pipeline_app.command("show")
def pipeline_show(
    benchmark: Annotated[str, typer.Argument(help="Benchmark name: a block of params.yaml (e.g. digits).")],
    params: ParamsOpt = Path("params.yaml"),
    root: RootOpt = Path("."),
) -> None:
    """List a benchmark's stages in order with their DVC addresses (for `dvc repro <address>`)."""
    from uvit.config import ConfigError, load_params
    from uvit.stages import dvcfile

    try:
        where = dvcfile.addresses(load_params(root / params), root)
    except ConfigError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    if benchmark not in where:
        typer.echo(f"error: unknown benchmark {benchmark!r}; params define: {', '.join(where)}", err=True)
        raise typer.Exit(2)
    for stage, address in where[benchmark].items():
        typer.echo(f"{stage:<11} {address.target()}")


@app.command()
def miniature(
    dest: Annotated[
        Path,
        typer.Argument(
            help="An empty folder: gets inputs/ (the miniature data and weights) and "
            "project/ (a copy of this project pointed at them)."
        ),
    ],
    benchmarks: Annotated[
        str | None, typer.Option(help="Comma-separated paper benchmarks (default: every one)")
    ] = None,
    root: RootOpt = Path("."),
) -> None:
    """A miniature of the paper chains, to check a machine or cluster before a multi-day run.

    Writes small inputs in each source's real on-disk format and tiny random-weight stand-ins in
    the real weight formats to DEST/inputs/, and DEST/project/: a git + DVC copy of this project
    whose params.yaml points each benchmark at them (every check still runs). Then:
    cd DEST/project && dvc repro paper/dvc.yaml:publish@cifar10
    """
    from uvit.miniature import PAPER_BENCHMARKS, make_project, write_miniature

    names = [b.strip() for b in benchmarks.split(",") if b.strip()] if benchmarks else list(PAPER_BENCHMARKS)
    unknown = sorted(set(names) - set(PAPER_BENCHMARKS))
    if unknown:
        typer.echo(f"error: no miniature for {', '.join(unknown)}; choose from {', '.join(PAPER_BENCHMARKS)}", err=True)
        raise typer.Exit(2)
    if (dest / "project").exists():
        typer.echo(f"error: {dest / 'project'} exists; choose an empty folder", err=True)
        raise typer.Exit(2)
    if not (root / "params.yaml").is_file():  # checked before any input is written
        typer.echo(
            f"error: {root.resolve()} is not a uvit checkout (no params.yaml): run from the project root "
            "or pass --root",
            err=True,
        )
        raise typer.Exit(2)
    try:
        overrides = write_miniature(dest / "inputs", names)
    except FileExistsError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    project = make_project(root, dest / "project", overrides)
    typer.echo(
        f"miniature inputs in {dest / 'inputs'}; project in {project}. Run one chain with:\n"
        f"  cd {project} && dvc repro paper/dvc.yaml:publish@{names[0]}"
    )


def _sampler_names() -> str:
    from typing import get_args

    from uvit.config import SampleConfig

    return ", ".join(get_args(SampleConfig.model_fields["sampler"].annotation))


@dataclass(frozen=True)
class GenerateOptions:
    """The options of `uvit generate`, declared once: typer makes one option per field (with its
    help), and the command turns them into the `uvit.generate` inputs."""

    source: Annotated[
        Path,
        typer.Argument(
            help="A trained run (runs/<benchmark>/train or runs/<benchmark>: its ema/ weights, as the sample stage), "
            "a save_pretrained directory (config.json + model.safetensors), or an official .pth (with --preset).",
            show_default=False,
        ),
    ]
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="Output folder: grid.png, images/{i:06d}.png, samples.npz "
            "(uint8 NHWC arr_0 + labels/captions), generate.json.",
        ),
    ] = Path("generated")
    preset: Annotated[
        str | None,
        typer.Option(help="The architecture of an official .pth, e.g. imagenet256_uvit_h2 (`uvit models` lists them)."),
    ] = None
    vae: Annotated[
        str | None,
        typer.Option(
            help="Latent models: the autoencoder that decodes samples (an official "
            "autoencoder_kl*.pth or a diffusers directory). Default: the benchmark "
            "block's sample.vae / encode.vae when that file is there."
        ),
    ] = None
    text_encoder: Annotated[
        str | None,
        typer.Option(
            "--text-encoder",
            help="Text-to-image models: the CLIP text "
            "encoder (a local directory). Default: the block's "
            "encode.text_encoder.",
        ),
    ] = None
    classes: Annotated[
        list[str] | None,
        typer.Option(
            "--class",
            "-c",
            help="Class-conditional models: class ids "
            "or names (ImageNet names such as 'golden retriever'); "
            "repeat it or give a comma list. Image i gets class i mod the "
            "number given. Default: every class in turn, as the sample "
            "stage.",
        ),
    ] = None
    prompts: Annotated[
        list[str] | None,
        typer.Option(
            "--prompt", help="Text-to-image models: a caption (repeatable); image i gets prompt i mod the number given."
        ),
    ] = None
    prompts_file: Annotated[
        Path | None, typer.Option("--prompts-file", help="A text file of prompts, one per line (added after --prompt).")
    ] = None
    num: Annotated[
        int | None,
        typer.Option(
            "--num", "-n", help="How many images. Default: 8 per --class or prompt given, else 64.", show_default=False
        ),
    ] = None
    guidance: Annotated[
        float | None,
        typer.Option(
            help="Classifier-free guidance scale (0: none; the official "
            "scale, output = (1+s) cond - s uncond). Default: the block's "
            "sample.guidance_scale, else 0.",
            show_default=False,
        ),
    ] = None
    sampler: Annotated[
        str | None,
        typer.Option(
            help=f"One of: {_sampler_names()}. Default: the block's sample.sampler, else dpm_solver_pp_2m.",
            show_default=False,
        ),
    ] = None
    steps: Annotated[
        int | None,
        typer.Option(
            help="Sampler steps. Default: the block's sample.steps (for its own sampler), else 25.", show_default=False
        ),
    ] = None
    skip_type: Annotated[
        str | None,
        typer.Option(
            "--skip-type",
            help="The sampler's time grid: logSNR, "
            "time_uniform or time_quadratic. Default: the block's "
            "sample.skip_type (for its own sampler), else the sampler's "
            "own.",
            show_default=False,
        ),
    ] = None
    schedule: Annotated[
        str | None,
        typer.Option(
            help="Noise schedule: vpsde or discrete. Default: the block's "
            "diffusion.schedule, else vpsde for pixel models and discrete "
            "for latent ones.",
            show_default=False,
        ),
    ] = None
    seed: Annotated[
        int | None,
        typer.Option(
            help="Image i uses seed seed*10^7 + i, the sample stage's rule (same "
            "seed, settings and labels: the stage's pixels). Default: the block's "
            "sample.seed, else 0.",
            show_default=False,
        ),
    ] = None
    batch_size: Annotated[
        int | None,
        typer.Option(
            "--batch-size",
            help="Images per forward pass (does not change "
            "the images). Default: the block's sample.batch_size, else 64.",
            show_default=False,
        ),
    ] = None
    device: Annotated[
        str | None, typer.Option(help="cpu, cuda or cuda:N. Default: cuda when there is one.", show_default=False)
    ] = None
    precision: Annotated[
        str, typer.Option(help="fp32 (the sample stage's pixels), or bf16 / fp16 autocast for the model's forward.")
    ] = "fp32"
    benchmark: Annotated[
        str | None,
        typer.Option(
            help="The params.yaml block whose settings are the defaults. "
            "Default: the run's benchmark, the preset's, or the block whose "
            "model has this architecture.",
            show_default=False,
        ),
    ] = None
    params: Annotated[
        Path | None,
        typer.Option(
            "--params",
            "-p",
            help="Parameter file. Default: the run's project params.yaml, else ./params.yaml if there.",
            show_default=False,
        ),
    ] = None
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False

    def source_spec(self):
        from uvit.generate import Source

        return Source(self.source, self.preset, self.params, self.benchmark)

    def overrides(self):
        from uvit.generate import Overrides

        return Overrides(self.schedule, self.sampler, self.steps, self.guidance, self.skip_type)

    def request(self):
        """The images asked for; reads --prompts-file (a GenerateError when it is missing)."""
        from uvit.generate import Request, read_prompts

        prompts = read_prompts(self.prompts or [], self.prompts_file)
        return Request(self.num, self.seed, tuple(self.classes or ()), tuple(prompts), self.vae, self.text_encoder)

    def runtime(self):
        from uvit.generate import Runtime

        return Runtime(self.batch_size, self.device, self.precision, progress=not self.quiet)


@app.command()
@takes_fields(GenerateOptions)
def generate(options: GenerateOptions) -> None:
    """Images from a checkpoint: a PNG grid, one PNG per image and an ADM-style samples.npz.

    The sampling is the sample stage's own (its generate call, seed and label rules, VAE decoding), so the same seeds and settings give the same pixels.

    Examples: `uvit generate runs/digits/train --class 3 --num 16 --out out/threes`;
    `uvit generate imagenet256_uvit_huge.pth --preset imagenet256_uvit_h2 --vae models/autoencoder_kl_ema.pth --class "golden retriever,207"`.
    """
    from uvit.config import ConfigError
    from uvit.encoders import WeightsNotAvailableError
    from uvit.generate import GenerateError, run_generate

    o = options
    try:
        result = run_generate(o.source_spec(), o.out, o.overrides(), o.request(), o.runtime())
    except (GenerateError, ConfigError, FileNotFoundError, WeightsNotAvailableError) as e:
        message = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
        typer.echo(f"error: {message}", err=True)
        raise typer.Exit(2) from None
    typer.echo(
        f"{result['num']} images ({result['sampler']} x{result['steps']}, guidance {result['guidance_scale']}) "
        f"-> {result['grid']}, {result['images']}/, {result['npz']}"
    )


def main() -> None:  # pragma: no cover
    sys.exit(app())
