"""The uvit pipeline as a Prefect flow: one task per DVC stage of a benchmark's chain.

    python -m pipelines.flows digits --set digits.train.steps=30      # a local run (ephemeral API)
    prefect deployment run 'uvit/digits' --param overrides='{"digits.train.steps": 100}'

The flow `uvit` (`uvit_benchmark`) walks the stage table (uvit.stages.table) for the benchmark and
runs each stage with `dvc repro --single-item <its address>` in the workspace (a DVC repository:
the checkout, or the clone a deployment's pull step made). DVC alone decides what is up to date:
an unchanged stage is skipped by DVC, a changed parameter, code file, input or weight file re-runs
it and whatever depends on it. Prefect adds what it is for: parameters validated before any task
runs, retries of the network stages, per-stage logs, a table artifact of what ran, the metrics and
the report as artifacts, concurrency limits and deployments.

Overrides (`{"digits.train.steps": 30}`) are written into the workspace's params.yaml, as
`dvc exp run -S` does, comments kept, and the DVC files are regenerated when a value that names a
file changed. When the workspace has a default DVC remote, the outputs are pushed at the end, so
a worker on another host (`dvc pull` in the deployment's pull step) starts from them.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.tasks import exponential_backoff

from uvit.config import BENCHMARKS, BenchmarkConfig, ConfigError, load_benchmark, load_params
from uvit.paths import BenchmarkPaths
from uvit.stages import dvcfile
from uvit.stages.table import Stage, steps

# Seconds between retries of the network stages (data, publish: 10, 20, 40) and the rest.
BACKOFF = exponential_backoff(backoff_factor=10)(3)
RETRY_DELAY = 10


class StageFailed(RuntimeError):
    """`dvc repro` of a stage exited non-zero; the message ends with its output."""


# --------------------------------------------------------------------------------------------
# Parameters: params.yaml + dotted overrides, validated before any task
# --------------------------------------------------------------------------------------------
def apply_overrides(params: dict[str, Any], overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """A copy of `params` with dotted keys set, e.g. {"digits.train.steps": 30}.

    The first part must name a benchmark block of the file; unknown leaf keys are added and then
    rejected by validation (with the key named), like any other bad parameter."""
    params = json.loads(json.dumps(params))  # deep copy of plain YAML data
    if not overrides:
        return params
    if not isinstance(overrides, Mapping):
        raise ConfigError(f"overrides: expected a mapping of dotted keys to values, got {type(overrides).__name__}")
    for key, value in overrides.items():
        parts = str(key).split(".")
        if len(parts) < 2 or not all(parts):
            raise ConfigError(f"override {key!r}: expected a dotted key like 'digits.train.steps'")
        if parts[0] not in params:
            known = ", ".join(k for k in params if k in BENCHMARKS) or ", ".join(BENCHMARKS)
            raise ConfigError(f"override {key!r}: unknown benchmark {parts[0]!r}; params define: {known}")
        node = params
        for i, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r}: {'.'.join(parts[: i + 1])} is not a section")
        node[parts[-1]] = value
    return params


def _params_path(root: str | Path, params_path: str | Path) -> Path:
    path = Path(params_path)
    return path if path.is_absolute() else Path(root) / path


def resolve_config(
    benchmark: str,
    params_path: str | Path = "params.yaml",
    root: str | Path = ".",
    overrides: Mapping[str, Any] | None = None,
) -> BenchmarkConfig:
    """Validate a benchmark's parameters (a relative `params_path` is read from `root`)."""
    if "/" in benchmark:  # the flow walks a benchmark's chain; a study run is three stages of studies/dvc.yaml
        raise ConfigError(
            f"{benchmark!r} is a study or seed-spread run: the flow runs benchmarks (digits, cifar10, ...), "
            "a benchmark's spread runs with it; run the design study with `dvc repro studies/dvc.yaml` (make study)"
        )
    return load_benchmark(benchmark, apply_overrides(load_params(_params_path(root, params_path)), overrides))


def parse_set(items: list[str] | None) -> dict[str, Any]:
    """`--set digits.train.steps=30` pairs -> overrides; values are parsed as YAML (30, true, [0.9, 0.99])."""
    overrides = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. digits.train.steps=30")
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


@contextlib.contextmanager
def workspace_lock(root: Path) -> Iterator[None]:
    """An exclusive lock on the workspace: runs of different benchmarks may share one, and DVC
    allows one `dvc repro` per repository at a time, so they take turns stage by stage."""
    path = Path(root) / ".dvc" / "tmp" / "uvit-flow.lock"  # .dvc/tmp is git-ignored
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def write_overrides(root: Path, params_path: str | Path, overrides: Mapping[str, Any] | None) -> list[Path]:
    """Set the overrides in the workspace's params file (comments and layout kept) and regenerate
    the DVC files if a value that names a file changed; returns the regenerated files."""
    from dvc.utils.serialize import modify_yaml

    path = _params_path(root, params_path)
    with workspace_lock(root):
        if overrides:
            with modify_yaml(path) as data:
                for key, value in overrides.items():
                    *sections, leaf = str(key).split(".")
                    node = data
                    for part in sections:
                        node = node.setdefault(part, {})
                    node[leaf] = value
        return dvcfile.write(Path(root), params_path)


# --------------------------------------------------------------------------------------------
# DVC, one stage at a time
# --------------------------------------------------------------------------------------------
def dvc(args: list[str], root: Path, log=None) -> str:
    """Run `dvc ARGS` in the workspace, its output streamed to `log` line by line; raises on failure."""
    exe = Path(sys.executable).with_name("dvc")
    env = {
        **os.environ,
        "DVC_NO_ANALYTICS": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    proc = subprocess.Popen(
        [str(exe) if exe.exists() else "dvc", *args],
        cwd=root,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        if log is not None:
            log(lines[-1])
    if proc.wait() != 0:
        tail = "\n".join(lines[-40:])
        raise StageFailed(f"dvc {' '.join(args)} failed (exit {proc.returncode}):\n{tail}")
    return "\n".join(lines)


def has_remote(root: Path) -> bool:
    return (
        subprocess.run(
            [str(Path(sys.executable).with_name("dvc")), "remote", "default"], cwd=root, capture_output=True, text=True
        ).returncode
        == 0
    )


def _stage_task(stage: Stage, retry_delay: float | list[float] | None = None, label: str | None = None):
    """The Prefect task that runs `stage` through DVC; `label` names it (default: the stage's name;
    a seed-spread run's stages are "train@spread/s1", ...)."""
    label = label or stage.name

    def run_stage(target: str, root: str) -> dict[str, Any]:
        logger = get_run_logger()
        with workspace_lock(Path(root)):
            out = dvc(["repro", "--single-item", target], Path(root), logger.info)
        ran = re.search(r"^Running stage ", out, flags=re.M) is not None
        logger.info("%s: %s", target, "ran" if ran else "up to date (DVC skipped it)")
        return {"stage": label, "target": target, "ran": ran}

    run_stage.__name__ = run_stage.__qualname__ = f"run_{stage.name}"
    delay = retry_delay if retry_delay is not None else (BACKOFF if stage.retries > 1 else RETRY_DELAY)
    return task(
        run_stage,
        name=label,
        task_run_name=label,
        retries=stage.retries,
        retry_delay_seconds=delay if stage.retries else None,
        retry_jitter_factor=0.2 if stage.retries else None,
    )


@task(name="push", task_run_name="push", retries=3, retry_delay_seconds=BACKOFF)
def push(targets: list[str], root: str) -> bool:
    """The stages' outputs to the workspace's default DVC remote (if any)."""
    if not has_remote(Path(root)):
        get_run_logger().info("no default DVC remote in %s: nothing pushed", root)
        return False
    with workspace_lock(Path(root)):
        dvc(["push", *targets], Path(root), get_run_logger().info)
    return True


# --------------------------------------------------------------------------------------------
# Artifacts and the flow
# --------------------------------------------------------------------------------------------
def artifact_key(benchmark: str, kind: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", f"uvit-{benchmark}-{kind}".lower()).strip("-")


def _flat(prefix: str, value: Any) -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        return [row for k, v in value.items() for row in _flat(f"{prefix}.{k}" if prefix else str(k), v)]
    if isinstance(value, (list, tuple)):
        return [(prefix, json.dumps(value, default=str))]
    return [(prefix, value)]


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _post_artifacts(cfg: BenchmarkConfig, paths: BenchmarkPaths, runs: list[dict]) -> None:
    create_table_artifact(
        table=[{"stage": r["stage"], "dvc": r["target"], "ran": r["ran"]} for r in runs],
        key=artifact_key(cfg.name, "stages"),
        description=f"uvit {cfg.name}: which stages DVC ran (False: up to date)",
    )
    sources = {"score": _read_json(paths.score / "metrics.json"), "train": _read_json(paths.train / "summary.json")}
    rows = [{"source": s, "metric": k, "value": v} for s, d in sources.items() if d for k, v in _flat("", d)]
    if rows:
        create_table_artifact(
            table=rows,
            key=artifact_key(cfg.name, "metrics"),
            description=f"uvit {cfg.name}: score metrics and training summary",
        )
    page = paths.reports / f"{cfg.name}.md"
    if page.is_file():
        create_markdown_artifact(
            markdown=page.read_text(),
            key=artifact_key(cfg.name, "report"),
            description=f"uvit {cfg.name}: generated report (reports/{cfg.name}.md)",
        )


def make_flow(*, name: str = "uvit", retry_delay_seconds: float | None = None):
    """The pipeline flow; `retry_delay_seconds` replaces every stage's retry delay (tests use 0)."""

    def uvit_benchmark(
        benchmark: str = "digits",
        params_path: str = "params.yaml",
        root: str = ".",
        overrides: dict[str, Any] | None = None,
        push_outputs: bool = True,
    ) -> dict[str, Any]:
        """Run one benchmark's chain through DVC: validate params, then each stage of the stage
        table with `dvc repro --single-item`, then push the outputs to the DVC remote (if any).

        Args:
            benchmark: a block of params.yaml (digits, cifar10, celeba64, imagenet64, ...).
            params_path: the parameter file; a relative path is read from `root`.
            root: the workspace, a DVC repository (default: the working directory).
            overrides: dotted keys to values written into params.yaml first, e.g. {"digits.train.steps": 30}.
            push_outputs: `dvc push` the chain's outputs when the workspace has a default remote.
        """
        logger = get_run_logger()
        workspace = Path(root).resolve()
        cfg = resolve_config(benchmark, params_path, workspace, overrides)  # ConfigError before any task
        regenerated = write_overrides(workspace, params_path, overrides)
        if regenerated:
            logger.info("regenerated %s for the new parameters", ", ".join(map(str, regenerated)))
        params = load_params(_params_path(workspace, params_path))
        where = dvcfile.addresses(params, workspace)
        targets, runs = [], []
        for run_name, stage in steps(cfg, params):  # a seed-spread run's stages are labelled "train@spread/s1"
            label = stage.name if run_name == benchmark else f"{stage.name}@{run_name.split('/', 1)[1]}"
            targets.append(where[run_name][stage.name].target())
            runs.append(_stage_task(stage, retry_delay_seconds, label)(targets[-1], str(workspace)))
        pushed = push(targets, str(workspace)) if push_outputs else False
        _post_artifacts(cfg, BenchmarkPaths(benchmark, workspace), runs)
        logger.info("%s: %s", benchmark, ", ".join(f"{r['stage']} {'ran' if r['ran'] else 'up to date'}" for r in runs))
        return {"benchmark": benchmark, "ran": {r["stage"]: r["ran"] for r in runs}, "pushed": pushed}

    return flow(uvit_benchmark, name=name, log_prints=True)


uvit_benchmark = make_flow()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.flows", description="Run the uvit Prefect flow locally.")
    parser.add_argument("benchmark", nargs="?", default="digits", help="a block of params.yaml (default: digits)")
    parser.add_argument(
        "--set",
        "-S",
        dest="sets",
        action="append",
        metavar="KEY=VALUE",
        help="set a parameter in params.yaml first, e.g. --set digits.train.steps=30 (repeatable)",
    )
    parser.add_argument(
        "--params", default="params.yaml", help="parameter file, relative to --root (default: params.yaml)"
    )
    parser.add_argument("--root", default=".", help="the workspace: a DVC repository (default: .)")
    parser.add_argument("--no-push", action="store_true", help="do not push the outputs to the DVC remote")
    args = parser.parse_args(argv)
    try:
        overrides = parse_set(args.sets)
        resolve_config(args.benchmark, args.params, args.root, overrides)  # fail fast, before Prefect starts
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = uvit_benchmark(
        benchmark=args.benchmark,
        params_path=args.params,
        root=args.root,
        overrides=overrides or None,
        push_outputs=not args.no_push,
    )
    print(json.dumps(out["ran"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
