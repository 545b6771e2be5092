"""Past one machine: a Ray head and two worker hosts on this machine (network + PID namespaces on a
private bridge, :mod:`uvit.local_cluster`), checkpoints on a moto S3 bound to the bridge.

Scenarios, in file order on one cluster:
- `ray job submit` of `uvit train` to the head (the reference: 12 uninterrupted steps, rank 0 and
  rank 1 on different hosts);
- the host of rank 1 lost after the step-4 checkpoint (every process on it killed): the run goes on
  from that checkpoint once the host is back, and ends with the reference's weights;
- `uvit train` from another host, in a fresh project root, resumes the reference from S3;
- encode tasks spread over both worker hosts, output identical to one process's;
- a worker host lost mid-sampling: its shard is redone on the other host, and the merged samples
  equal a one-process run's byte for byte;
- teardown leaves no namespace, link or process behind.

Needs root, iproute2 and util-linux: skipped without them, except under CI, where it fails.
Nothing is contacted but the addresses of the links made here.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tiny_runs import tiny_digits_params

from uvit.local_cluster import ClusterSpec, LocalCluster, leftovers

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
TIMES: dict[str, float] = {}
FAKE_AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
BUCKET = "uvit-hosts"


def _cannot_build() -> str | None:
    if sys.platform != "linux" or os.geteuid() != 0:
        return "needs root on Linux (network namespaces)"
    missing = [t for t in ("ip", "unshare", "nsenter") if shutil.which(t) is None]
    return f"needs {', '.join(missing)} (iproute2, util-linux)" if missing else None


def test_cluster_spec_names_and_addresses() -> None:
    spec = ClusterSpec(prefix="ab1", subnet="10.9.8", workers=3)
    assert spec.hosts == ["head", "w1", "w2", "w3"]
    assert [spec.address(h) for h in spec.hosts] == ["10.9.8.1", "10.9.8.2", "10.9.8.3", "10.9.8.4"]
    assert spec.gateway == "10.9.8.254"
    c = LocalCluster(spec)
    assert (c.gcs_address, c.dashboard_url, c.netns("w2")) == ("10.9.8.1:6379", "http://10.9.8.1:8265", "ab1-w2")
    for bad in ({"prefix": "much-too-long"}, {"workers": 0}, {"subnet": "10.9"}):
        with pytest.raises(ValueError):
            ClusterSpec(**bad)


@pytest.fixture(scope="module")
def cluster():
    reason = _cannot_build()
    if reason and os.environ.get("CI"):
        pytest.fail(f"the multi-host tests must run in CI: {reason}")
    if reason:
        pytest.skip(reason)
    state = Path(tempfile.mkdtemp(prefix="uvc-"))  # short: Ray's socket paths live under it
    env = {**FAKE_AWS, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)])}
    tag = os.getpid() % 250
    # Outputs of sampling and encoding go under `private`: on the worker hosts it is a tmpfs of their
    # own, so only what the tasks ship back reaches the driver (no shared filesystem for outputs).
    spec = ClusterSpec(
        prefix=f"t{os.getpid() % 10**5}", subnet=f"10.214.{tag}", state_dir=state, env=env, private=(state / "local",)
    )
    c = LocalCluster(spec)
    t0 = time.perf_counter()
    try:
        c.up()
        TIMES["cluster start (head + 2 workers)"] = time.perf_counter() - t0
        yield c
    finally:
        c.down()
        assert leftovers(spec.prefix) == []
        shutil.rmtree(state, ignore_errors=True)
        print("\nmulti-host timings (s): " + json.dumps({k: round(v, 1) for k, v in TIMES.items()}))


@pytest.fixture(scope="module")
def s3(cluster):
    """A moto S3 on the bridge's address: the machine itself, reachable from every host."""
    import boto3

    from uvit.storage.s3server import local_s3

    with pytest.MonkeyPatch.context() as env, local_s3(host=cluster.spec.gateway) as endpoint:
        for k, v in FAKE_AWS.items():
            env.setenv(k, v)
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
        yield endpoint


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory) -> Path:
    from uvit.data.sources.digits import prepare_digits

    out = tmp_path_factory.mktemp("data") / "digits"
    prepare_digits(out)
    return out


def project(tmp: Path, name: str, digits_dir: Path, s3: str, prefix: str, **train) -> tuple[Path, Path]:
    """A fresh project root with the digits data and a params.yaml of a tiny 2-worker run whose
    checkpoints go to s3://BUCKET/<prefix>. Returns (root, params file)."""
    root = tmp / name
    (root / "data").mkdir(parents=True)
    (root / "data" / "digits").symlink_to(digits_dir)
    params = tiny_digits_params(2, storage_path=f"s3://{BUCKET}/{prefix}", storage_endpoint=s3, **train)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root, root / "params.yaml"


def run_job(cluster: LocalCluster, host: str, job: str, args: dict, tmp: Path, timeout: float = 600) -> dict:
    """Run tests/multihost_jobs.py `job` as a driver on `host`; its result."""
    args_file, result_file = tmp / f"{job}-args.json", tmp / f"{job}-result.json"
    args_file.write_text(json.dumps(args))
    argv = [sys.executable, str(ROOT / "tests" / "multihost_jobs.py"), job, str(args_file), str(result_file)]
    p = cluster.run(host, argv, env={"RAY_ADDRESS": cluster.gcs_address}, **_captured())
    out, _ = p.communicate(timeout=timeout)
    assert p.returncode == 0, out[-4000:]
    return json.loads(result_file.read_text())


def _captured() -> dict:
    return {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}


def read_log(path: Path) -> list[list[str]]:
    return [line.split() for line in path.read_text().splitlines()] if path.is_file() else []


def host_of(cluster: LocalCluster, address: str) -> str:
    return next(h for h in cluster.spec.hosts if cluster.spec.address(h) == address)


def metrics(root: Path) -> list[dict]:
    return list(csv.DictReader((root / "runs/digits/train/metrics.csv").open()))


def weights(root: Path, which: str) -> dict[str, torch.Tensor]:
    from uvit.models import UViT

    return UViT.from_pretrained(root / "runs/digits/train" / which).state_dict()


# ---------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def reference(cluster, s3, digits_dir, tmp_path_factory) -> Path:
    """`ray job submit` of `uvit train digits` to the head, as infra/README.md documents it: 12 steps."""
    root, params = project(tmp_path_factory.mktemp("ref"), "p", digits_dir, s3, "reference")
    argv = ["ray", "job", "submit", "--address", cluster.dashboard_url, "--working-dir", str(ROOT), "--"]
    argv += ["uvit", "train", "digits", "--root", str(root), "--params", str(params)]
    t0 = time.perf_counter()
    p = subprocess.run(argv, env=cluster._env(), timeout=600, cwd=ROOT, **_captured())
    TIMES["train 12 steps, ray job submit"] = time.perf_counter() - t0
    assert p.returncode == 0 and "succeeded" in p.stdout, p.stdout[-4000:]
    return root


def test_ray_job_submit_trains_on_the_worker_hosts(reference, s3) -> None:
    import boto3

    assert [int(r["step"]) for r in metrics(reference)] == [2, 4, 6, 8, 10, 12]
    summary = json.loads((reference / "runs/digits/train/summary.json").read_text())
    assert summary["steps"] == 12 and summary["ray_run"].startswith(f"s3://{BUCKET}/reference/")
    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=s3).list_objects_v2(Bucket=BUCKET)["Contents"]]
    assert len([k for k in keys if k.startswith("reference/") and k.endswith("/state.json")]) == 2  # keep-last-2
    assert not list((reference / "runs/digits/ray").glob("*/*/checkpoint_*"))  # none on the driver's disk


def _lose_host_at_checkpoint(cluster: LocalCluster, s3: str, pid_file: Path, prefix: str, lost: dict) -> None:
    """Once rank 1 has paused (pid_file) and Ray has registered a checkpoint on S3, kill every process
    on rank 1's host, then start Ray on it again (capacity back). Bounded: gives up after 300 s."""
    import boto3

    client, end = boto3.client("s3", endpoint_url=s3), time.monotonic() + 300
    while time.monotonic() < end:
        keys = [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])]
        if pid_file.is_file() and any(k.endswith("checkpoint_manager_snapshot.json") for k in keys):
            lost["host"] = host_of(cluster, pid_file.read_text().split()[1])
            lost["at"] = time.perf_counter()
            cluster.kill(lost["host"])
            cluster.start(lost["host"], wait=False)
            return
        time.sleep(0.1)


def test_lost_host_resumes_from_the_last_checkpoint_exactly(cluster, s3, digits_dir, reference, tmp_path) -> None:
    root, params = project(tmp_path, "p", digits_dir, s3, "lost-host", max_failures=2)
    log, pid_file, lost = tmp_path / "reports.log", tmp_path / "rank1.pid", {}
    plan = {"pause": "report", "rank": 1, "step": 4, "pid_file": str(pid_file), "log": str(log), "pause_s": 300}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    killer = threading.Thread(
        target=_lose_host_at_checkpoint, args=(cluster, s3, pid_file, "lost-host/", lost), daemon=True
    )
    killer.start()
    t0 = time.perf_counter()
    summary = run_job(
        cluster,
        "head",
        "train",
        {"params": str(params), "root": str(root), "plan": str(tmp_path / "plan.json")},
        tmp_path,
    )
    TIMES["train 12 steps, rank 1's host lost at step 4"] = time.perf_counter() - t0
    TIMES["  of which after the loss"] = time.perf_counter() - lost["at"]
    ref_wall = json.loads((reference / "runs/digits/train/summary.json").read_text())["wall_time_s"]
    TIMES["  trainer.fit wall, reference"] = ref_wall
    TIMES["  trainer.fit wall, host lost"] = summary["wall_time_s"]
    killer.join(timeout=10)
    assert lost.get("host") in ("w1", "w2")  # the host really was lost

    reports = read_log(log)
    first = {int(rank): host for _, rank, step, _, host in reports if step == "4"}
    assert sorted(host_of(cluster, h) for h in first.values()) == ["w1", "w2"]  # one worker per host
    for rank in ("0", "1"):  # the new workers went on from step 4: no step reported twice, none lost
        assert sorted(int(step) for _, r, step, _, _ in reports if r == rank) == [4, 8, 12]
    pids = {(r, int(step)): pid for _, r, step, pid, _ in reports}
    assert pids[("1", 8)] != pids[("1", 4)] and pids[("0", 8)] != pids[("0", 4)]  # both workers were replaced
    assert summary["steps"] == 12
    assert [int(r["step"]) for r in metrics(root)] == [2, 4, 6, 8, 10, 12]
    for which in ("model", "ema"):  # weights, EMA and optimizer state came back from S3 exactly
        ref, got = weights(reference, which), weights(root, which)
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], atol=1e-6, rtol=1e-5, msg=f"{which}.{k}")
    cluster.wait_for_nodes(3)


def test_second_invocation_on_another_host_resumes_from_s3(cluster, s3, digits_dir, reference, tmp_path) -> None:
    """`uvit train` on worker host w2, in a fresh project root, with 16 steps: it finds the reference's
    step-12 checkpoint on S3 (written by workers of a driver on the head) and trains 13-16 only."""
    root, params = project(tmp_path, "p", digits_dir, s3, "reference", steps=16)
    t0 = time.perf_counter()
    argv = [sys.executable, "-m", "uvit", "train", "digits", "--root", str(root), "--params", str(params)]
    p = cluster.run("w2", argv, env={"RAY_ADDRESS": cluster.gcs_address}, **_captured())
    out, _ = p.communicate(timeout=600)
    TIMES["train 12 -> 16 from S3, driver on w2"] = time.perf_counter() - t0
    assert p.returncode == 0, out[-4000:]
    assert f"resuming from s3://{BUCKET}/reference/" in out and "(step 12)" in out
    rows, ref_rows = metrics(root), metrics(reference)
    assert [int(r["step"]) for r in rows] == [2, 4, 6, 8, 10, 12, 14, 16]
    assert [r["loss"] for r in rows[:6]] == [r["loss"] for r in ref_rows]  # steps 2-12 came from S3
    moved = [
        k for k in weights(root, "model") if not torch.equal(weights(root, "model")[k], weights(reference, "model")[k])
    ]
    assert "decoder_pred.weight" in moved  # and it trained on


# ---------------------------------------------------------------------------- encoding and sampling
def test_worker_hosts_have_their_own_disk_for_outputs(cluster) -> None:
    local = cluster.spec.private[0]
    (local / "from-driver").write_text("driver")
    argv = ["sh", "-c", f"ls {local}; echo w1 > {local}/from-w1"]
    p = cluster.run("w1", argv, **_captured())
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 0 and "from-driver" not in out  # w1 sees an empty tmpfs there
    assert sorted(f.name for f in local.iterdir()) == ["from-driver"]  # and its file stays on w1


@pytest.fixture(scope="module")
def image_split(tmp_path_factory) -> Path:
    from uvit.data.shards import write_split

    root = tmp_path_factory.mktemp("img") / "train"
    images = np.random.default_rng(0).integers(0, 256, size=(10, 3, 32, 32), dtype=np.uint8)
    labels = np.arange(10, dtype=np.int64) % 5
    write_split(
        root, {"images": images, "labels": labels}, name="tiny", split="train", shard_size=4, meta={"num_classes": 5}
    )
    return root


def test_encode_tasks_spread_over_the_hosts(cluster, image_split, tmp_path) -> None:
    import multihost_jobs

    from uvit.data.shards import ShardedArrays

    plan = {"log": str(tmp_path / "tasks.log")}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    args = {"image_root": str(image_split), "shard_size": 3, "num_workers": 2, "plan": str(tmp_path / "plan.json")}
    t0 = time.perf_counter()
    hosts = cluster.spec.private[0] / "encoded"  # the driver's disk: the worker hosts cannot write it
    result = run_job(cluster, "head", "encode", {**args, "out_root": str(hosts)}, tmp_path)
    TIMES["encode 10 images in 4 tasks"] = time.perf_counter() - t0
    assert result == {"count": 10, "shards": 4}
    done = {int(i): host_of(cluster, h) for kind, event, i, _, h in read_log(tmp_path / "tasks.log") if event == "done"}
    assert sorted(done) == [0, 1, 2, 3] and set(done.values()) == {"w1", "w2"}

    multihost_jobs.encode({**args, "num_workers": 1, "out_root": str(tmp_path / "one")})  # here, one process
    a, b = ShardedArrays(hosts), ShardedArrays(tmp_path / "one")
    for name in ("moments", "labels"):
        np.testing.assert_array_equal(a.field(name), b.field(name))
    shipped, here = (json.loads((d / "manifest.json").read_text())["shards"] for d in (hosts, tmp_path / "one"))
    assert shipped == here  # every shard file's sha256: byte-identical


def test_lost_host_mid_sampling_is_redone_elsewhere(cluster, reference, tmp_path) -> None:
    from uvit.evaluate.sample_shards import SampleSpec, SamplingRun, merge_shards, sample_to_shards

    spec = {"schedule": "vpsde", "sampler": "dpm_solver", "steps": 4, "num_samples": 24, "shard_size": 4, "seed": 3}
    spec |= {"guidance_scale": 0.5, "num_classes_for_labels": 10}
    model_dir = str(reference / "runs/digits/train/ema")
    log, pid_file = tmp_path / "tasks.log", tmp_path / "shard.pid"
    victim = cluster.spec.address("w1")
    plan = {"pause": "shard", "host": victim, "pid_file": str(pid_file), "log": str(log), "pause_s": 300}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    lost: dict = {}

    def lose_w1() -> None:
        end = time.monotonic() + 300
        while time.monotonic() < end and not pid_file.is_file():
            time.sleep(0.05)
        lost["at"] = time.perf_counter()
        cluster.kill("w1")

    killer = threading.Thread(target=lose_w1, daemon=True)
    killer.start()
    hosts = cluster.spec.private[0] / "samples"  # the driver's disk: the worker hosts cannot write it
    args = {"model_dir": model_dir, "out_dir": str(hosts), "spec": spec, "batch_size": 4, "num_workers": 2}
    t0 = time.perf_counter()
    run_job(cluster, "head", "sample", {**args, "plan": str(tmp_path / "plan.json")}, tmp_path)
    TIMES["sample 24 images in 6 shards, w1 lost"] = time.perf_counter() - t0
    killer.join(timeout=10)
    cluster.start("w1")  # back for whatever runs next

    events = read_log(log)
    paused = next(int(i) for _, event, i, _, h in events if event == "start" and h == victim)
    done = {int(i): h for _, event, i, _, h in events if event == "done"}
    assert "at" in lost and sorted(done) == list(range(6))
    assert done[paused] == cluster.spec.address("w2")  # the lost host's shard was redone on the other one

    t0 = time.perf_counter()
    sample_to_shards(model_dir, tmp_path / "one", SampleSpec(**spec), SamplingRun(batch_size=4, progress=False))
    TIMES["sample 24 images, one process, no Ray"] = time.perf_counter() - t0
    shipped, here = (json.loads((d / "shards.json").read_text())["shards"] for d in (hosts, tmp_path / "one"))
    assert shipped == here  # every shard's sha256: byte-identical files
    np.testing.assert_array_equal(merge_shards(hosts), merge_shards(tmp_path / "one"))


def local_cluster_script(cluster: LocalCluster, *args: str) -> str:
    """`infra/local-cluster ARGS` for this cluster's names; its output."""
    spec = cluster.spec
    argv = [str(ROOT / "infra" / "local-cluster"), *args, "--prefix", spec.prefix, "--subnet", spec.subnet]
    p = subprocess.run(argv, env={**os.environ, "PYTHON": sys.executable}, timeout=300, **_captured())
    assert p.returncode == 0, p.stdout[-2000:]
    return p.stdout


def test_local_cluster_script_lists_the_hosts_then_stops_them(cluster) -> None:
    """The user's way in: `infra/local-cluster status` and `down` find the cluster by its names."""
    prefix, state = cluster.spec.prefix, str(cluster.spec.state_dir)
    status = local_cluster_script(cluster, "status").splitlines()
    assert [line.split()[:3] for line in status[:3]] == [
        [host, f"{prefix}-{host}", cluster.spec.address(host)] for host in ("head", "w1", "w2")
    ]
    assert all(int(line.split()[3]) > 0 for line in status[:3])  # processes on every host
    assert status[3].split() == ["bridge", f"{prefix}-br", cluster.spec.gateway]
    assert len(leftovers(prefix)) > 3  # three namespaces, their links, Ray's processes
    assert local_cluster_script(cluster, "down").strip() == f"stopped {prefix!r}; nothing left"
    assert leftovers(prefix) == []
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout.splitlines()
    assert [line for line in ps if state in line] == []  # no Ray process of this cluster, anywhere
    assert local_cluster_script(cluster, "status").strip() == f"no cluster named {prefix!r}"
