"""The uvit pipeline as a Prefect flow: every stage a task calling the same `uvit.stages` function.

    python -m pipelines.flows digits --set digits.train.steps=30      # a local run (ephemeral API)
    prefect deployment run 'uvit/digits' --param overrides='{"digits.train.steps": 100}'

The flow `uvit` (`uvit_benchmark`) validates the benchmark's parameters first (`uvit.config`: a bad
value fails with its dotted key named, before any task runs), then runs the stages in DVC's order,
data -> validate -> train -> sample -> classifier (digits-classifier scoring only) -> score -> report
-> publish (the run to `artifacts.url`, S3 or a folder: uvit.stages.publish), and posts the metrics
(table) and the report (markdown) as keyed Prefect artifacts.

Caching works like `dvc repro`: a task's cache key hashes the stage name, the parameter sections it
reads, the content of its input artifacts, the stage function and the uvit version
(:func:`stage_cache_key`). Results persist under `<root>/.prefect-results/`, so a second flow run
skips every unchanged stage, and a changed parameter or input recomputes that stage and whatever
its new outputs change downstream. A cache hit is only taken when the stage's outputs on disk are
the ones that key produced (a stamp records the key and the outputs' hashes): deleted or edited
outputs, or outputs left by another parameter set, make the stage run again.

`make_flow(stages)` builds the same flow over another stage table (tests use cheap stand-ins).
"""

import argparse
import hashlib
import inspect
import json
import os
import re
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.tasks import exponential_backoff

import uvit
from uvit.config import BENCHMARKS, BenchmarkConfig, ConfigError, load_benchmark, load_params
from uvit.paths import BenchmarkPaths
from uvit.stages import STAGES

StageFn = Callable[[BenchmarkConfig, BenchmarkPaths], dict]

RESULTS_DIR = ".prefect-results"  # under the project root; gitignored
CACHE_SCHEME = 1  # bump when the cache key's recipe changes


# --------------------------------------------------------------------------------------------
# What each stage reads and writes (mirrors dvc.yaml)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StageSpec:
    """A stage's parameters (dotted, relative to the benchmark block), input and output artifacts,
    and retry policy. `retry_delay` is seconds, or a list of seconds per retry."""

    params: tuple[str, ...]
    inputs: Callable[[BenchmarkPaths], list[Path]]
    outputs: Callable[[BenchmarkPaths], list[Path]]
    retries: int = 0
    retry_delay: float | list[float] = 0


STAGE_SPECS: dict[str, StageSpec] = {
    # The network step: retried with exponential backoff (10 s, 20 s, 40 s).
    "data": StageSpec(("data",), lambda p: [], lambda p: [p.data],
                      retries=3, retry_delay=exponential_backoff(backoff_factor=10)(3)),
    "validate": StageSpec(("validate",), lambda p: [p.data], lambda p: [p.validate]),
    # Latent benchmarks only (see stage_applies); the CLIP contexts of text benchmarks ride along.
    "encode": StageSpec(("encode",), lambda p: [p.data, p.validate], lambda p: [p.latents]),
    "train": StageSpec(("model", "diffusion", "train", "encode"), lambda p: [p.data, p.validate, p.latents, p.contexts],
                       lambda p: [p.train / "model", p.train / "ema", p.train / "summary.json", p.train / "metrics.csv"]),
    "sample": StageSpec(("sample", "model", "diffusion", "validate.num_classes"),
                        lambda p: [p.train / "ema", p.train / "model"], lambda p: [p.samples]),
    "classifier": StageSpec(("score.classifier_epochs", "data.seed", "validate.num_classes"),
                            lambda p: [p.data], lambda p: [p.classifier]),
    "score": StageSpec(("score", "sample", "model", "diffusion", "train.seed", "validate.num_classes"),
                       lambda p: [p.samples, p.classifier, p.data], lambda p: [p.score / "metrics.json"],
                       retries=1, retry_delay=10),
    "report": StageSpec((), lambda p: [p.train / "summary.json", p.train / "metrics.csv", p.samples, p.score / "metrics.json"],
                        lambda p: [p.reports / f"{p.benchmark}.md", p.reports / p.benchmark, p.reports / "README.md"]),
    # Uploads to artifacts.url (S3 or a folder): a network step, retried like `data`. Its cache key
    # covers what it publishes; the Ray checkpoint rides along but is not an input (not DVC-tracked).
    "publish": StageSpec(("artifacts",),
                         lambda p: [p.train / "model", p.train / "ema", p.train / "summary.json", p.train / "metrics.csv",
                                    p.samples, p.classifier, p.run / "reference", p.score / "metrics.json",
                                    p.reports / f"{p.benchmark}.md", p.reports / p.benchmark],
                         lambda p: [p.run / "publish.json"],
                         retries=3, retry_delay=exponential_backoff(backoff_factor=10)(3)),
}
STAGE_ORDER = tuple(STAGE_SPECS)  # data, validate, encode, train, sample, classifier, score, report, publish


def stage_applies(name: str, cfg: BenchmarkConfig) -> bool:
    """The classifier stage trains the digits feature extractor (others use Inception); the
    encode stage runs for latent benchmarks only."""
    if name == "classifier":
        return cfg.score.feature_extractor == "digits-classifier"
    if name == "encode":
        return cfg.encode is not None
    return True


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
                raise ConfigError(f"override {key!r}: {'.'.join(parts[:i + 1])} is not a section")
        node[parts[-1]] = value
    return params


def resolve_config(benchmark: str, params_path: str | Path = "params.yaml", root: str | Path = ".",
                   overrides: Mapping[str, Any] | None = None) -> BenchmarkConfig:
    """Validate a benchmark's parameters (a relative `params_path` is read from `root`)."""
    path = Path(params_path)
    if not path.is_absolute():
        path = Path(root) / path
    return load_benchmark(benchmark, apply_overrides(load_params(path), overrides))


def parse_set(items: list[str] | None) -> dict[str, Any]:
    """`--set digits.train.steps=30` pairs -> overrides; values are parsed as YAML (30, true, [0.9, 0.99])."""
    overrides = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. digits.train.steps=30")
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


def _select(tree: dict[str, Any], dotted: str) -> Any:
    node = tree
    for part in dotted.split("."):
        node = node[part]
    return node


# --------------------------------------------------------------------------------------------
# Content hashes and cache keys
# --------------------------------------------------------------------------------------------


class _HashMemo:
    """sha256 of files, remembered by (size, mtime, inode) under the results dir so weights and
    shards are not re-read on every run (DVC keeps the same kind of state)."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.memo: dict[str, list] = json.loads(path.read_text())
        except (OSError, ValueError):
            self.memo = {}
        self.dirty = False

    def file(self, path: Path) -> str:
        st = path.stat()
        stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
        key = str(path.resolve())
        hit = self.memo.get(key)
        if hit and hit[:3] == stamp:
            return hit[3]
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        self.memo[key] = [*stamp, h.hexdigest()]
        self.dirty = True
        return h.hexdigest()

    def save(self) -> None:
        if self.dirty:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.memo))
            tmp.replace(self.path)
            self.dirty = False


def fingerprint(path: Path, memo: _HashMemo) -> str | None:
    """sha256 of a file, or of a directory's (relative path, file sha256) list; None if missing."""
    if path.is_file():
        return memo.file(path)
    if not path.is_dir():
        return None
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        for name in sorted(filenames):
            f = Path(dirpath) / name
            h.update(f"{f.relative_to(path).as_posix()}\0{memo.file(f)}\n".encode())
    return h.hexdigest()


def _fingerprints(paths: list[Path], root: Path, memo: _HashMemo) -> dict[str, str | None]:
    return {_rel(p, root): fingerprint(p, memo) for p in paths}


def _rel(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path.resolve())


def _code_id(fn: Callable) -> str:
    name = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"
    try:
        source = inspect.getsource(fn)
    except (OSError, TypeError):
        source = ""
    return f"{name}:{hashlib.sha256(source.encode()).hexdigest()[:16]}"


def stage_cache_key(name: str, fn: Callable, cfg: BenchmarkConfig, paths: BenchmarkPaths,
                    memo: _HashMemo | None = None) -> str:
    """sha256 of (stage, benchmark, its parameter sections as JSON, its inputs' content hashes,
    the stage function, the uvit version). Outputs are checked separately (`outputs_stale`)."""
    spec = STAGE_SPECS[name]
    memo = memo or _HashMemo(results_dir(paths.root) / "hashes.json")
    tree = cfg.model_dump(mode="json", by_alias=True)
    payload = {
        "scheme": CACHE_SCHEME,
        "stage": name,
        "benchmark": cfg.name,
        "params": {section: _select(tree, section) for section in spec.params},
        "inputs": _fingerprints(spec.inputs(paths), paths.root, memo),
        "code": _code_id(fn),
        "uvit": uvit.__version__,
    }
    memo.save()
    blob = json.dumps(payload, sort_keys=True, default=str)
    return f"uvit-{cfg.name}-{name}-{hashlib.sha256(blob.encode()).hexdigest()}"


def results_dir(root: str | Path) -> Path:
    return Path(root).resolve() / RESULTS_DIR


def _stamp_path(paths: BenchmarkPaths, name: str) -> Path:
    return results_dir(paths.root) / "stamps" / paths.benchmark / f"{name}.json"


def outputs_stale(name: str, key: str, paths: BenchmarkPaths, memo: _HashMemo) -> str | None:
    """None when the stage's outputs on disk are exactly what the run with this cache key left;
    otherwise why not (then the stage runs even if the cache holds a result for the key)."""
    try:
        stamp = json.loads(_stamp_path(paths, name).read_text())
    except (OSError, ValueError):
        return "no completed run recorded here"
    current = _fingerprints(STAGE_SPECS[name].outputs(paths), paths.root, memo)
    memo.save()
    if stamp.get("key") != key:
        return "the outputs on disk come from other parameters or inputs"
    if stamp.get("outputs") != current:
        changed = [p for p, h in current.items() if stamp.get("outputs", {}).get(p) != h]
        return f"outputs deleted or modified since its last run: {', '.join(changed)}"
    return None


# --------------------------------------------------------------------------------------------
# Tasks and the flow
# --------------------------------------------------------------------------------------------


def _key_from_parameters(context, parameters: dict[str, Any]) -> str:
    """The flow computes each stage's key (it needs the upstream outputs on disk) and passes it in."""
    return parameters["cache_key"]


def _stage_task(name: str, fn: StageFn, retry_delay_seconds: float | None = None):
    spec = STAGE_SPECS[name]

    def run_stage(cfg: BenchmarkConfig, paths: BenchmarkPaths, cache_key: str) -> dict:
        logger = get_run_logger()
        stamp = _stamp_path(paths, name)
        stamp.unlink(missing_ok=True)  # a failed or interrupted run leaves no claim on the outputs
        logger.info("stage %s (%s): start", name, cfg.name)
        t0 = time.perf_counter()
        result = fn(cfg, paths)
        wall = time.perf_counter() - t0
        memo = _HashMemo(results_dir(paths.root) / "hashes.json")
        outputs = _fingerprints(spec.outputs(paths), paths.root, memo)
        memo.save()
        missing = [p for p, h in outputs.items() if h is None]
        if missing:
            logger.warning("stage %s left no %s", name, ", ".join(missing))
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.write_text(json.dumps({"key": cache_key, "outputs": outputs}, indent=2) + "\n")
        logger.info("stage %s (%s): done in %.1f s: %s", name, cfg.name, wall,
                    json.dumps(result, default=str)[:2000])
        return result

    run_stage.__name__ = run_stage.__qualname__ = f"run_{name}"
    delay = spec.retry_delay if retry_delay_seconds is None else retry_delay_seconds
    return task(run_stage, name=name, task_run_name=name, retries=spec.retries,
                retry_delay_seconds=delay if spec.retries else None, retry_jitter_factor=0.2 if spec.retries else None,
                cache_key_fn=_key_from_parameters, persist_result=True)


def artifact_key(benchmark: str, kind: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", f"uvit-{benchmark}-{kind}".lower()).strip("-")


def _flat(prefix: str, value: Any) -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        return [row for k, v in value.items() for row in _flat(f"{prefix}.{k}" if prefix else str(k), v)]
    if isinstance(value, (list, tuple)):
        return [(prefix, json.dumps(value, default=str))]
    return [(prefix, value)]


def _post_artifacts(cfg: BenchmarkConfig, results: dict[str, dict], paths: BenchmarkPaths) -> None:
    rows = [{"source": stage, "metric": k, "value": v}
            for stage in ("score", "train") if isinstance(results.get(stage), dict)
            for k, v in _flat("", results[stage])]
    if rows:
        create_table_artifact(table=rows, key=artifact_key(cfg.name, "metrics"),
                              description=f"uvit {cfg.name}: score metrics and training summary")
    page = paths.reports / f"{cfg.name}.md"
    if "report" in results and page.is_file():
        create_markdown_artifact(markdown=page.read_text(), key=artifact_key(cfg.name, "report"),
                                 description=f"uvit {cfg.name}: generated report ({_rel(page, paths.root)})")


def _run_pipeline(tasks: dict[str, tuple[Any, StageFn]], benchmark: str, params_path: str, root: str,
                  overrides: dict[str, Any] | None, refresh: bool) -> dict[str, Any]:
    logger = get_run_logger()
    cfg = resolve_config(benchmark, params_path, root, overrides)  # ConfigError before any task
    paths = BenchmarkPaths(benchmark, Path(root))
    storage = results_dir(root)
    logger.info("%s: parameters valid (%s%s); results and cache under %s", benchmark, params_path,
                f" + overrides {json.dumps(overrides)}" if overrides else "", storage)
    results: dict[str, dict] = {}
    states: dict[str, str] = {}
    for name, (stage_task, fn) in tasks.items():
        if not stage_applies(name, cfg):
            logger.info("stage %s: skipped (%s scores with %s)", name, benchmark, cfg.score.feature_extractor)
            continue
        memo = _HashMemo(storage / "hashes.json")
        key = stage_cache_key(name, fn, cfg, paths, memo)
        stale = "refresh requested" if refresh else outputs_stale(name, key, paths, memo)
        state = stage_task.with_options(result_storage=storage, refresh_cache=True if stale else None)(
            cfg, paths, key, return_state=True)
        results[name] = state.result()  # raises the stage's error once retries are spent
        states[name] = state.name
        logger.info("stage %s: %s (key %s%s)", name, state.name, key[-12:], f"; ran because {stale}" if stale else "")
    _post_artifacts(cfg, results, paths)
    logger.info("%s: %s", benchmark, ", ".join(f"{k} {v}" for k, v in states.items()))
    return {"benchmark": benchmark, "states": states, "results": results}


def make_flow(stages: Mapping[str, StageFn] | None = None, *, name: str = "uvit",
              retry_delay_seconds: float | None = None):
    """The pipeline flow over a stage table (default: `uvit.stages.STAGES`).

    Stages must be names of STAGE_SPECS; they run in DVC's order whatever the table's order.
    `retry_delay_seconds` replaces every stage's retry delay (tests use 0)."""
    stages = dict(STAGES if stages is None else stages)
    unknown = set(stages) - set(STAGE_SPECS)
    if unknown:
        raise ValueError(f"unknown stages {sorted(unknown)}; known: {', '.join(STAGE_ORDER)}")
    tasks = {stage: (_stage_task(stage, stages[stage], retry_delay_seconds), stages[stage])
             for stage in STAGE_ORDER if stage in stages}

    def uvit_benchmark(benchmark: str = "digits", params_path: str = "params.yaml", root: str = ".",
                       overrides: dict[str, Any] | None = None, refresh: bool = False) -> dict[str, Any]:
        """Run one benchmark's pipeline: validate params, then data -> validate -> train -> sample
        -> classifier (digits) -> score -> report -> publish, each stage cached on its params and inputs.

        Args:
            benchmark: a block of params.yaml (digits, cifar10, celeba64, imagenet64, ...).
            params_path: the parameter file; a relative path is read from `root`.
            root: the project root holding data/, runs/ and reports/.
            overrides: dotted keys to values applied before validation, e.g. {"digits.train.steps": 30}.
            refresh: recompute every stage, ignoring the cache.
        """
        return _run_pipeline(tasks, benchmark, params_path, root, overrides, refresh)

    return flow(uvit_benchmark, name=name, log_prints=True)


uvit_benchmark = make_flow(STAGES)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.flows", description="Run the uvit Prefect flow locally.")
    parser.add_argument("benchmark", nargs="?", default="digits", help="a block of params.yaml (default: digits)")
    parser.add_argument("--set", "-S", dest="sets", action="append", metavar="KEY=VALUE",
                        help="override a parameter, e.g. --set digits.train.steps=30 (repeatable)")
    parser.add_argument("--params", default="params.yaml", help="parameter file, relative to --root (default: params.yaml)")
    parser.add_argument("--root", default=".", help="project root with data/, runs/, reports/ (default: .)")
    parser.add_argument("--refresh", action="store_true", help="recompute every stage, ignoring the cache")
    args = parser.parse_args(argv)
    try:
        overrides = parse_set(args.sets)
        resolve_config(args.benchmark, args.params, args.root, overrides)  # fail fast, before Prefect starts
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = uvit_benchmark(benchmark=args.benchmark, params_path=args.params, root=args.root,
                         overrides=overrides or None, refresh=args.refresh)
    print(json.dumps(out["states"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
