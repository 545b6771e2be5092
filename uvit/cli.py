"""The `uvit` command: the model family at a glance, and every pipeline stage per benchmark.

    uvit models                      presets with exact parameter counts and GFLOPs
    uvit data digits                 one stage (data, validate, train, sample, classifier, score, report)
    uvit run digits                  every stage in order (what `dvc repro` does, without DVC's caching)
    uvit publish digits              the run to digits.artifacts.url (S3 or a folder), sha256 manifest
    uvit fetch digits [RUN_ID]       a published run back, every file verified
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="U-ViT (Bao et al., CVPR 2023): models, diffusion, and the benchmark pipeline.")

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
        rows.append({"preset": p.name, "model": p.title, "benchmark": p.benchmark,
                     "input": f"{c.in_chans}x{c.img_size}x{c.img_size}", "tokens": c.num_tokens,
                     "params": count_params(c), "gflops_macs": round(count_macs(c) / 1e9, 2)})
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    header = f"{'preset':<24} {'model':<17} {'benchmark':<12} {'input':<9} {'tokens':>6} {'params':>13} {'GFLOPs*':>8}"
    typer.echo(header)
    typer.echo("-" * len(header))
    for r in rows:
        typer.echo(f"{r['preset']:<24} {r['model']:<17} {r['benchmark']:<12} {r['input']:<9} {r['tokens']:>6} "
                   f"{r['params']:>13,} {r['gflops_macs']:>8.2f}")
    typer.echo("* GFLOPs as in the paper: G multiply-accumulates per forward, one image, condition tokens included.")


def _stage(name: str, benchmark: str, params: Path, root: Path, fn=None, **kwargs) -> None:
    from uvit.config import ConfigError, load_benchmark
    from uvit.paths import BenchmarkPaths
    from uvit.stages import STAGES

    try:
        cfg = load_benchmark(benchmark, params)
    except ConfigError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    try:
        result = (fn or STAGES[name])(cfg, BenchmarkPaths(benchmark, root), **kwargs)
    except _user_errors() as e:  # bad input the user can fix: say what, without a traceback
        typer.echo(f"error: [{name} {benchmark}] {type(e).__name__}: {e}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"[{name} {benchmark}] {json.dumps(result, default=str)}")


def _user_errors() -> tuple[type[BaseException], ...]:
    from uvit.config import ConfigError
    from uvit.data.shards import DataIntegrityError
    from uvit.data.validate import ValidationFailed
    from uvit.storage.artifacts import ArtifactIntegrityError

    return (ConfigError, DataIntegrityError, ValidationFailed, FileNotFoundError, NotImplementedError,
            ArtifactIntegrityError, FileExistsError)


def _make_stage_command(name: str, doc: str):
    def command(
        benchmark: Annotated[str, typer.Argument(help="Benchmark name: a block of params.yaml (e.g. digits).")],
        params: ParamsOpt = Path("params.yaml"),
        root: RootOpt = Path("."),
    ) -> None:
        _stage(name, benchmark, params, root)

    command.__doc__ = doc
    app.command(name=name)(command)


for _name, _doc in {
    "data": "Download/locate and preprocess a benchmark's data into shards + manifest (data/<benchmark>/).",
    "validate": "Check the data with great-expectations suites; exit non-zero with a summary on failure.",
    "encode": "Latent benchmarks: SD-VAE moments and CLIP text features of the data, validated (pixel ones skip).",
    "sample": "Draw samples from the trained EMA weights (runs/<benchmark>/samples/).",
    "classifier": "Train the digits feature extractor used for FID and conditional accuracy.",
    "score": "FID (torch-fidelity) and conditional accuracy of the samples (runs/<benchmark>/score/metrics.json).",
    "report": "Write reports/<benchmark>.md and the reports/README.md index from the artifacts.",
    "publish": "Upload the run (checkpoints, samples, reference, score, report) to <benchmark>.artifacts.url, "
               "content-addressed with a sha256 manifest; records the run id in runs/<benchmark>/publish.json.",
}.items():
    _make_stage_command(_name, _doc)


@app.command()
def train(
    benchmark: Annotated[str, typer.Argument(help="Benchmark name: a block of params.yaml (e.g. digits).")],
    params: ParamsOpt = Path("params.yaml"),
    root: RootOpt = Path("."),
    resume: Annotated[bool, typer.Option("--resume/--fresh", help="Continue from the newest good checkpoint of the "
                                         "same configuration in runs/<benchmark>/ray/ (exact), or start afresh.")] = True,
) -> None:
    """Train with Ray Train (TorchTrainer; DDP across train.num_workers workers).

    Resumes by default: checkpoints are kept per configuration, so an interrupted run continues
    and raising train.steps extends the previous run instead of starting over.
    """
    _stage("train", benchmark, params, root, resume=resume)


@app.command()
def fetch(
    benchmark: Annotated[str, typer.Argument(help="Benchmark name: a block of params.yaml (e.g. digits).")],
    run_id: Annotated[str | None, typer.Argument(help="A published run id, or 'latest'; default: the one in "
                                                      "runs/<benchmark>/publish.json.")] = None,
    dest: Annotated[Path | None, typer.Option("--dest", help="Where to put it (default: fetched/<benchmark>/<run-id>/).")] = None,
    params: ParamsOpt = Path("params.yaml"),
    root: RootOpt = Path("."),
) -> None:
    """Download a published run from <benchmark>.artifacts.url; every file is checked against the
    manifest's sha256 (a corrupted object is refused)."""
    from uvit.stages.publish import run_fetch

    _stage("fetch", benchmark, params, root, fn=run_fetch, run_id=run_id, dest=dest)


@app.command()
def run(
    benchmark: Annotated[str, typer.Argument(help="Benchmark name: a block of params.yaml (e.g. digits).")],
    params: ParamsOpt = Path("params.yaml"),
    root: RootOpt = Path("."),
) -> None:
    """Run every stage of a benchmark in order, without DVC (prefer `dvc repro` for caching)."""
    from uvit.stages import STAGES

    for name in STAGES:
        if name == "classifier" and benchmark != "digits":
            continue  # the digits FID feature extractor
        _stage(name, benchmark, params, root)


def main() -> None:  # pragma: no cover
    sys.exit(app())
