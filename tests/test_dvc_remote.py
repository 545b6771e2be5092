"""DVC with an S3 remote on a loopback moto server: add, push, wipe cache + data, pull."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


pytestmark = pytest.mark.slow

DVC = Path(sys.executable).parent / "dvc"
BUCKET = "uvit-dvc"


def tree(root: Path) -> dict[str, bytes]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in files}


def test_dvc_push_pull_through_s3_remote(s3_endpoint, fake_aws, tmp_path):
    import boto3

    repo = tmp_path / "repo"
    repo.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "DVC_", "GIT_"))}
    env.update(
        **fake_aws,  # credentials from the environment only
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
    run(str(DVC), "remote", "add", "-d", "s3remote", f"s3://{BUCKET}/dvc")
    run(str(DVC), "remote", "modify", "s3remote", "endpointurl", s3_endpoint)
    config = (repo / ".dvc" / "config").read_text()
    assert s3_endpoint in config and "testing" not in config  # no secret in the committed config
    run(str(DVC), "push", "-q")

    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="dvc/")["Contents"]]
    assert len(keys) == 4  # 3 files + the directory listing (.dir)

    shutil.rmtree(repo / ".dvc" / "cache")
    shutil.rmtree(data)
    run(str(DVC), "pull", "-q")
    assert tree(data) == original
