"""The publish stage and `uvit fetch`: a run's artifacts to S3 (loopback moto) or a folder and back."""

from __future__ import annotations

import copy
import hashlib
import json
import random
import shutil
import uuid
from pathlib import Path

import pytest
import yaml

from uvit.config import load_benchmark, load_params
from uvit.paths import BenchmarkPaths
from uvit.stages.publish import collect, run_fetch, run_publish
from uvit.storage.artifacts import ArtifactIntegrityError

PARAMS = load_params(Path(__file__).resolve().parents[1] / "params.yaml")


@pytest.fixture(autouse=True)
def _aws(offline_aws_env):
    """Test credentials only; nothing but the loopback endpoint is contacted."""


def write(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)


@pytest.fixture
def project(tmp_path) -> Path:
    """A tiny fake finished digits run where the stages put it (bytes, not real weights)."""
    root = tmp_path / "project"
    rnd = random.Random(0)
    ray_run = "runs/digits/ray/0123456789abcdef/digits-run"
    for kind in ("model", "ema"):
        write(root / f"runs/digits/train/{kind}/config.json", f'{{"kind": "{kind}"}}\n')
        write(root / f"runs/digits/train/{kind}/model.safetensors", rnd.randbytes(3000))
    write(root / "runs/digits/train/metrics.csv", "step,loss\n1,1.0\n20,0.5\n")
    write(root / "runs/digits/train/summary.json", json.dumps({"steps": 20, "ray_run": ray_run}))
    for step in (10, 20):  # only the final one (the exported weights' step) is published
        ckpt = root / ray_run / f"checkpoint_{step:06d}"
        write(ckpt / "state.json", json.dumps({"step": step, "format_version": 1}))
        write(ckpt / "optimizer.pt", rnd.randbytes(500))
    write(root / "runs/digits/samples/samples.npz", rnd.randbytes(2000))
    write(root / "runs/digits/sample-summary/summary.json", '{"num_samples": 40}\n')
    write(root / "runs/digits/classifier/model.safetensors", rnd.randbytes(800))
    write(root / "runs/digits/score/metrics.json", '{"fid": 12.5}\n')
    write(root / "reports/digits.md", "# digits\n")
    write(root / "reports/digits/grid.png", rnd.randbytes(300))
    write(root / "runs/digits/validate/report.json", "{}\n")  # not published
    return root


def config(url: str, endpoint_url: str | None = None, **extra):
    params = copy.deepcopy(PARAMS)
    params["digits"]["artifacts"] = {"url": url, "endpoint_url": endpoint_url, **extra}
    return load_benchmark("digits", params)


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def expected_run(root: Path) -> dict[str, bytes]:
    """What the run should hold, by path in the run, read from the project (run.json aside)."""
    t = {f"checkpoints/{k}": v for k, v in tree(root / "runs/digits/train").items()}
    t |= {
        f"checkpoints/ray/checkpoint_000020/{k}": v
        for k, v in tree(root / "runs/digits/ray/0123456789abcdef/digits-run/checkpoint_000020").items()
    }
    t |= {f"samples/{k}": v for k, v in tree(root / "runs/digits/samples").items()}
    t |= {f"sample-summary/{k}": v for k, v in tree(root / "runs/digits/sample-summary").items()}
    t |= {f"reference/classifier/{k}": v for k, v in tree(root / "runs/digits/classifier").items()}
    t |= {
        "score/metrics.json": (root / "runs/digits/score/metrics.json").read_bytes(),
        "reports/digits.md": (root / "reports/digits.md").read_bytes(),
        "reports/digits/grid.png": (root / "reports/digits/grid.png").read_bytes(),
    }
    return t


def s3_config(s3_endpoint: str):
    bucket = f"uvit-{uuid.uuid4().hex[:12]}"
    cfg = config(f"s3://{bucket}/artifacts", s3_endpoint)
    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.create_bucket(Bucket=bucket)
    return cfg, bucket, client


def test_publish_to_s3_and_fetch_identical_files(s3_endpoint, project, tmp_path):
    cfg, bucket, client = s3_config(s3_endpoint)
    paths = BenchmarkPaths("digits", project)
    out = run_publish(cfg, paths)

    run_id = out["run_id"]
    assert len(run_id) == 16 and int(run_id, 16) >= 0
    assert out["ray_checkpoint"] == "checkpoints/ray/checkpoint_000020"
    record = json.loads((project / "runs/digits/publish.json").read_text())
    assert record == out and record["url"] == f"s3://{bucket}/artifacts"
    assert str(tmp_path) not in json.dumps(record)  # no local paths in the committed record

    # The versioned layout on S3: <prefix>/<benchmark>/<run-id>/..., manifest with every sha256.
    listed = client.list_objects_v2(Bucket=bucket, Prefix=f"artifacts/digits/{run_id}/")["Contents"]
    keys = {o["Key"].removeprefix(f"artifacts/digits/{run_id}/") for o in listed}
    want = expected_run(project)
    assert keys == set(want) | {"run.json", "run_manifest.json"}
    manifest = json.loads(
        client.get_object(Bucket=bucket, Key=f"artifacts/digits/{run_id}/run_manifest.json")["Body"].read()
    )
    shas = {f["path"]: f["sha256"] for f in manifest["files"]}
    assert {p: shas[p] for p in want} == {p: hashlib.sha256(b).hexdigest() for p, b in want.items()}
    assert out["files"] == len(want) + 1 and manifest["run_id"] == run_id

    # Fetch into a fresh directory: byte-identical files, run.json says what produced them.
    fetched = run_fetch(cfg, BenchmarkPaths("digits", tmp_path / "elsewhere"), run_id, tmp_path / "fetched")
    got = tree(tmp_path / "fetched")
    assert fetched["files"] == len(got) and {k: v for k, v in got.items() if k != "run.json"} == want
    meta = json.loads(got["run.json"])
    assert meta["benchmark"] == "digits" and meta["config"]["artifacts"]["url"] == cfg.artifacts.url
    assert len(meta["train_fingerprint"]) == 16

    # Content-addressed: the same outputs publish to the same id; changed outputs to a new one.
    assert run_publish(cfg, paths)["run_id"] == run_id
    write(project / "runs/digits/score/metrics.json", '{"fid": 9.0}\n')
    second = run_publish(cfg, paths)["run_id"]
    assert second != run_id
    assert run_fetch(cfg, paths, "latest", tmp_path / "latest")["run_id"] == second
    assert (tmp_path / "latest/score/metrics.json").read_text() == '{"fid": 9.0}\n'


def test_corrupted_object_is_refused_on_fetch(s3_endpoint, project, tmp_path):
    from typer.testing import CliRunner

    from uvit.cli import app

    cfg, bucket, client = s3_config(s3_endpoint)
    run_id = run_publish(cfg, BenchmarkPaths("digits", project))["run_id"]
    key = f"artifacts/digits/{run_id}/checkpoints/ema/model.safetensors"
    client.put_object(Bucket=bucket, Key=key, Body=b"bit rot")  # same key, other bytes
    dest = tmp_path / "dest"
    with pytest.raises(ArtifactIntegrityError) as err:
        run_fetch(cfg, BenchmarkPaths("digits", project), run_id, dest)
    assert key in str(err.value) and hashlib.sha256(b"bit rot").hexdigest() in str(err.value)
    assert not (dest / "checkpoints/ema/model.safetensors").exists()

    # The CLI says so without a traceback and exits non-zero (run id from publish.json).
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"digits": cfg.model_dump(mode="json", by_alias=True, exclude={"name"})}))
    result = CliRunner().invoke(
        app, ["fetch", "digits", "--params", str(params), "--root", str(project), "--dest", str(tmp_path / "cli")]
    )
    assert result.exit_code == 1 and "integrity check failed" in result.output, result.output
    assert not (tmp_path / "cli/checkpoints/ema/model.safetensors").exists()


def test_local_folder_default_through_the_cli(project, tmp_path):
    """digits' default: a folder under the project root, no credentials; `uvit fetch` finds the run."""
    from typer.testing import CliRunner

    from uvit.cli import app

    assert load_benchmark("digits", PARAMS).artifacts.url == "artifacts"
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(PARAMS))
    runner = CliRunner()
    base = ["--params", str(params), "--root", str(project)]
    result = runner.invoke(app, ["publish", "digits", *base])
    assert result.exit_code == 0, result.output
    run_id = json.loads((project / "runs/digits/publish.json").read_text())["run_id"]
    stored = project / "artifacts/digits" / run_id
    assert (stored / "run_manifest.json").is_file() and (stored / "checkpoints/ema/model.safetensors").is_file()

    result = runner.invoke(app, ["fetch", "digits", *base])
    assert result.exit_code == 0, result.output
    fetched = tree(project / "fetched/digits" / run_id)
    assert {k: v for k, v in fetched.items() if k != "run.json"} == expected_run(project)

    (stored / "samples/samples.npz").write_bytes(b"tampered")
    result = runner.invoke(app, ["fetch", "digits", run_id, *base, "--dest", str(tmp_path / "again")])
    assert result.exit_code == 1 and "samples/samples.npz" in result.output


def test_without_ray_checkpoint_and_missing_outputs(project):
    paths = BenchmarkPaths("digits", project)
    files, ray = collect(config("artifacts", ray_checkpoint=False), paths)
    assert ray is None and not [p for p in files if p.startswith("checkpoints/ray/")]
    files, ray = collect(config("artifacts"), paths)
    assert ray == "checkpoints/ray/checkpoint_000020" and "checkpoints/ray/checkpoint_000010/state.json" not in files

    for sub in ("train/ema", "samples"):
        shutil.rmtree(project / "runs/digits" / sub)
        with pytest.raises(FileNotFoundError, match="uvit (train|sample) digits"):
            run_publish(config("artifacts"), paths)
        assert not (project / "runs/digits/publish.json").exists()
        write(project / "runs/digits" / sub / "x.bin", b"x")
