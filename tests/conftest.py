"""Shared fixtures. Tests run on a 2-core machine: one torch thread per process keeps
parallel jobs (Ray workers, helpers) from thrashing each other."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

torch.set_num_threads(1)


# The longest files (minutes each: whole pipelines through DVC, Ray, Prefect) first in collection
# order (a plain `pytest` run; under `make test`, xdist orders files by their number of tests).
LONGEST_FIRST = (
    "test_latent_chains.py",
    "test_paper_chains.py",
    "test_ray_train.py",
    "test_pipeline.py",
    "test_prefect.py",
    "test_text_to_image.py",
    "test_text_to_image_training.py",
)


def pytest_collection_modifyitems(items) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept otherwise


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)


@pytest.fixture(scope="session")
def random_inception_weights(tmp_path_factory) -> str:
    """A randomly initialised torch-fidelity InceptionV3 state dict saved where a real one would go
    (uvit.miniature.write_random_inception, seed 0)."""
    from uvit.evaluate.fid import INCEPTION_WEIGHTS_FILE
    from uvit.miniature import write_random_inception

    return str(write_random_inception(tmp_path_factory.mktemp("inc") / INCEPTION_WEIGHTS_FILE, seed=0))


# -- S3 on loopback (moto's server mode) with throwaway credentials ------------------------------
@pytest.fixture(scope="module")
def s3_endpoint():
    """URL of a moto S3 server on 127.0.0.1, up for the module's tests."""
    from uvit.storage.s3server import local_s3

    with local_s3() as url:
        yield url


@pytest.fixture
def fake_aws(tmp_path) -> dict[str, str]:
    """Environment variables with test credentials and no user AWS config or instance metadata,
    so nothing but the loopback endpoint is ever asked for credentials or contacted."""
    return {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
    }


@pytest.fixture
def offline_aws_env(monkeypatch, fake_aws) -> None:
    """`fake_aws` set in this process's environment, with profiles and endpoint overrides removed."""
    from uvit.storage.s3server import AWS_OVERRIDE_VARS

    for var in AWS_OVERRIDE_VARS:
        monkeypatch.delenv(var, raising=False)
    for var, value in fake_aws.items():
        monkeypatch.setenv(var, value)


# -- a tiny CLIP tokenizer (no hub): a hand-written BPE vocabulary ---------------------------------
@pytest.fixture(scope="session")
def write_tiny_clip_vocab():
    """A function that writes a CLIP BPE vocabulary (letters plus the words "at", "cat", "dog")
    as vocab.json + merges.txt into a directory and returns the vocabulary {token: id}; the
    directory then loads with `transformers.CLIPTokenizer.from_pretrained`."""
    import json

    def write(d) -> dict[str, int]:
        letters = "abcdefghijklmnopqrstuvwxyz"
        vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
        for c in letters:
            vocab[c] = len(vocab)
        for c in letters:
            vocab[c + "</w>"] = len(vocab)
        merges = ["a t</w>", "c at</w>", "d o", "do g</w>"]
        for tok in ("at</w>", "cat</w>", "do", "dog</w>"):
            vocab[tok] = len(vocab)
        (d / "vocab.json").write_text(json.dumps(vocab))
        (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        return vocab

    return write


# -- a copy of the project as its own git + DVC repository ----------------------------------------
@pytest.fixture(scope="session")
def make_project():
    """A function (dest, params_patch) -> dest: `uvit.miniature.make_project` of this checkout."""
    from pathlib import Path

    from uvit.miniature import make_project as make

    root = Path(__file__).resolve().parents[1]
    return lambda dest, params_patch=None: make(root, dest, params_patch)


@pytest.fixture(scope="session")
def dvc():
    """A function (args, cwd) -> output that runs the venv's `dvc` quietly and offline (analytics,
    Ray usage stats and auth off, one torch thread) and fails the test with the output's tail."""
    import subprocess
    import sys
    from pathlib import Path

    bin_dir = Path(sys.executable).parent

    def run(args: list[str], cwd) -> str:
        env = {
            **os.environ,
            "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            "DVC_NO_ANALYTICS": "1",
            "RAY_AUTH_MODE": "disabled",
            "RAY_USAGE_STATS_ENABLED": "0",
            "OMP_NUM_THREADS": "1",
        }
        proc = subprocess.run(
            [str(bin_dir / "dvc"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
        )
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"dvc {' '.join(args)} failed ({proc.returncode}):\n{out[-6000:]}"
        return out

    return run
