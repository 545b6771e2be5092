"""DVC with an S3 remote on a loopback moto server: `uvit dvc-remote` (the one S3 endpoint rule
written for DVC), then add, push, wipe cache + data, pull."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from configobj import ConfigObj
from typer.testing import CliRunner

from uvit.cli import app
from uvit.storage.s3 import ENDPOINT_ENV

pytestmark = pytest.mark.slow

DVC = Path(sys.executable).parent / "dvc"
BUCKET = "uvit-dvc"


def tree(root: Path) -> dict[str, bytes]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in files}


def remote(repo: Path, level: str, name: str = "s3") -> dict[str, str] | None:
    """The remote's section of .dvc/config (level "config") or .dvc/config.local ("config.local")."""
    path = repo / ".dvc" / level
    return dict(ConfigObj(str(path)).get(f'remote "{name}"', {})) if path.is_file() else None


def test_dvc_remote_command_writes_the_endpoint_rule(tmp_path, monkeypatch):
    """--endpoint-url, else $UVIT_S3_ENDPOINT_URL, else $AWS_ENDPOINT_URL_S3, else $AWS_ENDPOINT_URL,
    else AWS (no endpoint): the rule's answer is in config.local, the committed config holds the URL."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for var in ENDPOINT_ENV:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    for args in (["git", "init", "-q"], [str(DVC), "init", "-q"]):
        subprocess.run(args, cwd=repo, check=True, capture_output=True)
    # A remote set up by hand the old way: an endpoint in the committed config.
    subprocess.run([str(DVC), "remote", "add", "s3", "s3://old/dvc"], cwd=repo, check=True)
    subprocess.run([str(DVC), "remote", "modify", "s3", "endpointurl", "http://127.0.0.1:7"], cwd=repo, check=True)

    runner = CliRunner()

    def dvc_remote(*args: str) -> str | None:
        result = runner.invoke(app, ["dvc-remote", "s3://uvit-dvc/dvc", "--root", str(repo), *args])
        assert result.exit_code == 0, result.output
        assert remote(repo, "config") == {"url": "s3://uvit-dvc/dvc"}  # no endpoint, no secret committed
        assert ConfigObj(str(repo / ".dvc" / "config"))["core"]["remote"] == "s3"
        return remote(repo, "config.local").get("endpointurl")

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:3")
    assert dvc_remote() == "http://127.0.0.1:3"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:2")
    assert dvc_remote() == "http://127.0.0.1:2"
    monkeypatch.setenv("UVIT_S3_ENDPOINT_URL", "http://127.0.0.1:1")
    assert dvc_remote() == "http://127.0.0.1:1"
    assert dvc_remote("--endpoint-url", "http://127.0.0.1:9000") == "http://127.0.0.1:9000"
    for var in ENDPOINT_ENV:
        monkeypatch.delenv(var)
    assert dvc_remote() is None  # AWS: the pinned endpoint is gone
    ignored = subprocess.run(["git", "check-ignore", "-q", ".dvc/config.local"], cwd=repo)
    assert (repo / ".dvc" / "config.local").is_file() and ignored.returncode == 0  # dvc init's .dvc/.gitignore

    result = runner.invoke(app, ["dvc-remote", "/srv/dvc", "--root", str(repo)])
    assert result.exit_code == 2 and "s3://" in result.output
    result = runner.invoke(app, ["dvc-remote", "s3://uvit-dvc/dvc", "--root", str(tmp_path)])
    assert result.exit_code == 1 and "DVC repo" in result.output


def test_dvc_push_pull_through_s3_remote(s3_endpoint, fake_aws, tmp_path):
    """The endpoint only in $UVIT_S3_ENDPOINT_URL (which DVC alone ignores): `uvit dvc-remote`
    makes push and pull reach it."""
    import boto3

    repo = tmp_path / "repo"
    repo.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "DVC_", "GIT_", "UVIT_"))}
    env.update(
        **fake_aws,  # credentials from the environment only
        UVIT_S3_ENDPOINT_URL=s3_endpoint,
        DVC_NO_ANALYTICS="1",
        DVC_SITE_CACHE_DIR=str(tmp_path / "dvc-site-cache"),
        XDG_CONFIG_HOME=str(tmp_path / "xdg-config"),  # no user-level dvc/git config leaks in
    )

    def run(*args: str) -> str:
        proc = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"{args}\n{proc.stdout}\n{proc.stderr}"
        return proc.stdout

    s3 = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    s3.create_bucket(Bucket=BUCKET)

    data = repo / "data"
    (data / "train").mkdir(parents=True)
    (data / "train" / "shard-000.bin").write_bytes(random.Random(0).randbytes(50_000))
    (data / "train" / "labels.txt").write_text("0\n1\n2\n")
    (data / "manifest.json").write_text('{"n": 3}\n')
    original = tree(data)

    run("git", "init", "-q")
    run(str(DVC), "init", "-q")
    run(str(DVC), "add", "-q", "data")
    run(sys.executable, "-m", "uvit", "dvc-remote", f"s3://{BUCKET}/dvc", "--name", "s3remote")
    config = (repo / ".dvc" / "config").read_text()
    assert f"s3://{BUCKET}/dvc" in config and s3_endpoint not in config and "testing" not in config
    assert remote(repo, "config.local", "s3remote") == {"endpointurl": s3_endpoint}
    run(str(DVC), "push", "-q")

    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="dvc/")["Contents"]]
    assert len(keys) == 4  # 3 files + the directory listing (.dir)

    shutil.rmtree(repo / ".dvc" / "cache")
    shutil.rmtree(data)
    run(str(DVC), "pull", "-q")
    assert tree(data) == original
