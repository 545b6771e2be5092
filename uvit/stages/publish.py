"""Stage `publish`: a finished run to S3 (or a local folder), content-addressed, with a sha256 manifest.

Where: `<benchmark>.artifacts.url` in params.yaml (`s3://bucket/prefix`, `file:///dir` or a directory
relative to the project root; digits uses the git-ignored `artifacts/`). Credentials only from the
environment (the boto3 chain); the endpoint from `artifacts.endpoint_url`, else the environment
(`uvit.storage.s3.s3_endpoint_url`).

    <url>/<benchmark>/<run-id>/
        checkpoints/model/, ema/, summary.json, metrics.csv   final weights (train stage)
        checkpoints/ray/checkpoint_NNNNNN/                    the final Ray Train checkpoint (resumable)
        samples/                                              samples.npz, png/, shards/
        sample-summary/                                       summary.json, grid.png (+ examples for text)
        reference/                                            FID reference: Inception statistics, or
                                                              the digits classifier (classifier/)
        score/metrics.json
        reports/<benchmark>.md, reports/<benchmark>/*.png
        run.json                                              benchmark, validated config, training
                                                              fingerprint, uvit version
        run_manifest.json                                     size + sha256 of every file (written last)

The run id is the first 16 hex digits of the sha256 of the manifest's file list (path, size,
sha256 of every file): a function of the content alone. Publishing the same outputs again is a
no-op, and different outputs never overwrite a run. run.json holds no timestamp for that reason
(the manifest's `created` field is not part of the id).

`runs/<benchmark>/publish.json` records the url and run id (no absolute paths, no credentials);
`uvit fetch <benchmark>` downloads that run, `uvit fetch <benchmark> <run-id>` any other, and
every file is checked against the manifest's sha256 before it is put in place.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import uvit
from uvit.config import BenchmarkConfig
from uvit.fileio import is_temp_name, write_json
from uvit.paths import BenchmarkPaths

if TYPE_CHECKING:
    from uvit.storage.artifacts import ArtifactStore

log = logging.getLogger(__name__)


def open_store(cfg: BenchmarkConfig, paths: BenchmarkPaths) -> ArtifactStore:
    """The benchmark's artifact store; a relative directory resolves against the project root."""
    from urllib.parse import urlparse

    from uvit.storage.artifacts import ArtifactStore

    url = cfg.artifacts.url
    if urlparse(url).scheme == "" and not Path(url).expanduser().is_absolute():
        url = str(paths.root / url)
    return ArtifactStore(url, endpoint_url=cfg.artifacts.endpoint_url)


def _tree(src: Path, prefix: str) -> dict[str, Path]:
    """Every file under `src` (a file or directory) at `prefix/<relative path>`; hidden temp files skipped."""
    if src.is_file():
        return {prefix: src}
    return {
        f"{prefix}/{p.relative_to(src).as_posix()}": p
        for p in sorted(src.rglob("*"))
        if p.is_file() and not p.name.endswith((".tmp", ".part")) and not is_temp_name(p.name)
    }


def final_ray_checkpoint(paths: BenchmarkPaths, summary: dict) -> Path | None:
    """The Ray Train checkpoint the exported weights came from (its step equals summary's), if still on disk."""
    ray_run = summary.get("ray_run")
    if not ray_run:
        return None
    run_dir = Path(ray_run) if Path(ray_run).is_absolute() else paths.root / ray_run
    for state in sorted(run_dir.glob("checkpoint_*/state.json")):
        try:
            if int(json.loads(state.read_text())["step"]) == int(summary["steps"]):
                return state.parent
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def collect(cfg: BenchmarkConfig, paths: BenchmarkPaths) -> tuple[dict[str, Path], str | None]:
    """{path in the run: local file} of everything published, and the Ray checkpoint's path in the run."""
    required = {
        "checkpoints/model": (paths.train / "model", "train"),
        "checkpoints/ema": (paths.train / "ema", "train"),
        "checkpoints/summary.json": (paths.train / "summary.json", "train"),
        "samples": (paths.samples, "sample"),
        "sample-summary": (paths.sample_summary, "sample"),
        "score/metrics.json": (paths.score / "metrics.json", "score"),
    }
    files: dict[str, Path] = {}
    for prefix, (src, stage) in required.items():
        found = _tree(src, prefix) if src.exists() else {}
        if not found:
            raise FileNotFoundError(f"{src} is missing: run `uvit {stage} {cfg.name}` before publishing")
        files.update(found)
    optional = {
        "checkpoints/metrics.csv": paths.train / "metrics.csv",
        "reference/classifier": paths.classifier,  # the digits FID feature extractor
        "reference": paths.run / "reference",  # cached Inception statistics of the training images
        f"reports/{cfg.name}.md": paths.reports / f"{cfg.name}.md",
        f"reports/{cfg.name}": paths.reports / cfg.name,
    }
    if cfg.score.reference_stats and Path(cfg.score.reference_stats).is_file():
        optional[f"reference/{Path(cfg.score.reference_stats).name}"] = Path(cfg.score.reference_stats)
    for prefix, src in optional.items():
        if src.exists():
            files.update(_tree(src, prefix))
    ray_prefix = None
    if cfg.artifacts.ray_checkpoint:
        summary = json.loads((paths.train / "summary.json").read_text())
        ckpt = final_ray_checkpoint(paths, summary)
        if ckpt is None:
            log.warning(
                "%s: the final Ray checkpoint (%s) is not on disk; publishing the exported weights only",
                cfg.name,
                summary.get("ray_run"),
            )
        else:
            ray_prefix = f"checkpoints/ray/{ckpt.name}"
            files.update(_tree(ckpt, ray_prefix))
    return files, ray_prefix


def run_record(cfg: BenchmarkConfig, paths: BenchmarkPaths) -> dict:
    """run.json: what produced the run (deterministic: it is part of the content id)."""
    from uvit.train.fingerprint import train_fingerprint, training_data_dir

    return {
        "benchmark": cfg.name,
        "uvit": uvit.__version__,
        "train_fingerprint": train_fingerprint(cfg, training_data_dir(cfg, paths).resolve()),
        "config": cfg.model_dump(mode="json", by_alias=True),
    }


def run_publish(cfg: BenchmarkConfig, paths: BenchmarkPaths, *, progress: bool | None = None) -> dict:
    """Upload the run (see the module doc); progress: a bar over its bytes on stderr (None: only
    when stderr is a terminal, False: never)."""
    files, ray_prefix = collect(cfg, paths)
    store = open_store(cfg, paths)
    with tempfile.TemporaryDirectory(prefix="uvit-publish-") as tmp:
        record = Path(tmp) / "run.json"
        write_json(record, run_record(cfg, paths), sort_keys=True)
        ref = store.upload_files({**files, "run.json": record}, cfg.name, progress=progress)
    manifest = store.manifest(cfg.name, ref.run_id)
    result = {
        "benchmark": cfg.name,
        "url": cfg.artifacts.url,
        "run_id": ref.run_id,
        "files": len(manifest["files"]),
        "total_size": manifest["total_size"],
        "ray_checkpoint": ray_prefix,
    }
    write_json(paths.run / "publish.json", result)
    return result


def run_fetch(
    cfg: BenchmarkConfig,
    paths: BenchmarkPaths,
    run_id: str | None = None,
    dest: str | Path | None = None,
    *,
    progress: bool | None = None,
) -> dict:
    """Download a published run, every file verified against the manifest's sha256.

    `run_id`: an id, `latest` (the newest complete run in the store), or None for the run recorded
    in runs/<benchmark>/publish.json. `dest` defaults to fetched/<benchmark>/<run-id>/.
    progress: a bar over the run's bytes on stderr (None: only when stderr is a terminal).
    """
    store = open_store(cfg, paths)
    if run_id is None:
        record = paths.run / "publish.json"
        if not record.is_file():
            raise FileNotFoundError(f"{record} is missing: pass a run id, or run `uvit publish {cfg.name}`")
        run_id = json.loads(record.read_text())["run_id"]
    elif run_id == "latest":
        run_id = store.latest_run(cfg.name)
        if run_id is None:
            raise FileNotFoundError(f"no published {cfg.name} runs at {cfg.artifacts.url}")
    target = Path(dest) if dest is not None else paths.root / "fetched" / cfg.name / run_id
    manifest = store.manifest(cfg.name, run_id)
    store.download_run(cfg.name, run_id, target, progress=progress)
    return {
        "benchmark": cfg.name,
        "run_id": run_id,
        "dest": str(target),
        "files": len(manifest["files"]),
        "total_size": manifest["total_size"],
    }
