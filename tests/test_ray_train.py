"""Ray Train on CPU (gloo): DDP equivalence and recovery from a worker the test kills."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from tiny_runs import tiny_digits_params

from uvit.config import load_benchmark
from uvit.models import UViT
from uvit.paths import BenchmarkPaths

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pause_plan(tmp_path_factory) -> Path:
    """Where a test tells the Ray workers to pause (see `ray_session`); absent, none ever does."""
    return tmp_path_factory.mktemp("faults") / "pause.json"


@pytest.fixture(scope="module")
def ray_session(pause_plan):
    import os

    import ray

    plan_path = str(pause_plan)

    def pause_hook() -> None:
        """Runs in every Ray worker process of the session: wraps `ray.train.report` so that, while
        a test's pause plan exists, every report is logged ("rank step pid") and the planned rank
        writes its pid and sleeps after reporting the planned step, once, for the test to kill it."""
        import json
        import os
        import time
        from pathlib import Path

        import ray.train

        report = ray.train.report

        def report_then_maybe_pause(metrics, *args, **kwargs):
            report(metrics, *args, **kwargs)
            if not Path(plan_path).is_file():
                return
            plan = json.loads(Path(plan_path).read_text())
            rank, pid_file = ray.train.get_context().get_world_rank(), Path(plan["pid_file"])
            with open(plan["log"], "a") as f:
                f.write(f"{rank} {metrics['step']} {os.getpid()}\n")
            if rank == plan["rank"] and metrics["step"] == plan["step"] and not pid_file.exists():
                pid_file.with_suffix(".tmp").write_text(str(os.getpid()))
                pid_file.with_suffix(".tmp").replace(pid_file)
                time.sleep(plan["pause_s"])  # bounded: the test kills this process long before

        ray.train.report = report_then_maybe_pause

    # Credentials of the loopback moto S3 (any value is accepted there); set before ray.init so
    # the workers inherit them. Nothing is sent anywhere but 127.0.0.1.
    fake = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in fake}
    os.environ.update(fake)
    runtime_env = {"env_vars": {"OMP_NUM_THREADS": "1"}, "worker_process_setup_hook": pause_hook}
    ray.init(num_cpus=4, include_dashboard=False, runtime_env=runtime_env)
    yield
    ray.shutdown()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def digits_data(tmp_path_factory) -> Path:
    from uvit.data.sources.digits import prepare_digits

    root = tmp_path_factory.mktemp("root")
    prepare_digits(root / "data" / "digits")
    return root


def tiny_config(workers: int, **train):
    params = tiny_digits_params(workers, **train)
    return load_benchmark("digits", params)


def train(root: Path, tmp: Path, workers: int, **kw) -> dict:
    from uvit.train.trainer import run_training

    run_root = tmp / f"run-{workers}-{len(list(tmp.iterdir()))}"
    (run_root / "data").mkdir(parents=True)
    (run_root / "data" / "digits").symlink_to(root / "data" / "digits")
    cfg = tiny_config(workers, **kw.pop("train", {}))
    if kw.pop("classifier", False):  # a random-weight FID feature extractor where `uvit classifier` puts it
        from uvit.evaluate.classifier import ClassifierConfig, DigitClassifier, save_classifier

        torch.manual_seed(0)
        save_classifier(DigitClassifier(ClassifierConfig()), run_root / "runs" / "digits" / "classifier")
    summary = run_training(cfg, BenchmarkPaths("digits", run_root), **kw)
    return {"summary": summary, "dir": run_root / "runs" / "digits" / "train"}


def weights(run: dict, which: str = "model") -> dict[str, torch.Tensor]:
    return UViT.from_pretrained(run["dir"] / which).state_dict()


@pytest.fixture(scope="module")
def two_workers(ray_session, digits_data, tmp_path_factory) -> dict:
    """The reference: 12 uninterrupted steps on two DDP workers (shared by the tests below)."""
    return train(digits_data, tmp_path_factory.mktemp("ref"), workers=2)


@pytest.fixture(scope="module")
def one_worker(ray_session, digits_data, tmp_path_factory) -> dict:
    """12 uninterrupted steps on one worker (shared by the tests below)."""
    return train(digits_data, tmp_path_factory.mktemp("one"), workers=1)


def test_two_workers_equal_one_worker_with_the_same_global_batch(ray_session, two_workers, one_worker) -> None:
    one = one_worker
    two = two_workers
    assert one["summary"]["steps"] == two["summary"]["steps"] == 12
    w1, w2 = weights(one), weights(two)
    torch.manual_seed(0)  # the trainer's init: train.seed = 0
    init = UViT(UViT.from_pretrained(one["dir"] / "model").config).state_dict()
    assert all(not torch.equal(w1[k], init[k]) for k in ("pos_embed", "decoder_pred.weight"))  # it trained
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], atol=2e-5, rtol=1e-4, msg=k)

    # The logged loss is the whole global batch's, not rank 0's half of it.
    def losses(run: dict) -> list[float]:
        return [float(r["loss"]) for r in csv.DictReader((run["dir"] / "metrics.csv").open())]

    l1, l2 = losses(one), losses(two)
    assert len(l1) == len(l2) == 6
    torch.testing.assert_close(torch.tensor(l2), torch.tensor(l1), atol=1e-5, rtol=1e-4)


def kill_when_checkpointed(pid_file: Path, runs: Path, deadline_s: float, killed: dict) -> None:
    """SIGKILL the worker whose pid `pid_file` names once Ray has registered a checkpoint of a run
    under `runs` (its checkpoint_manager_snapshot.json exists); give up after `deadline_s`."""
    import os
    import signal
    import time

    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if pid_file.is_file() and any(runs.glob("run-*/runs/digits/ray/*/*/checkpoint_manager_snapshot.json")):
            killed["pid"] = int(pid_file.read_text())
            os.kill(killed["pid"], signal.SIGKILL)
            return
        time.sleep(0.05)


def test_killed_worker_is_replaced_and_training_resumes_exactly(
    ray_session, pause_plan, digits_data, two_workers, tmp_path
) -> None:
    import threading

    reference = two_workers
    # Rank 1 pauses right after reporting its step-4 checkpoint and is killed from here once Ray
    # has registered that checkpoint: after the step-4 checkpoint, before the step-8 one.
    log, pid_file, killed = tmp_path / "reports.log", tmp_path / "rank1.pid", {}
    plan = {"rank": 1, "step": 4, "pid_file": str(pid_file), "log": str(log), "pause_s": 300}
    pause_plan.write_text(json.dumps(plan))
    killer = threading.Thread(target=kill_when_checkpointed, args=(pid_file, tmp_path, 300, killed), daemon=True)
    killer.start()
    try:
        crashed = train(digits_data, tmp_path, workers=2, train={"max_failures": 2})
    finally:
        pause_plan.unlink()
        killer.join(timeout=10)
    assert "pid" in killed  # the worker really was killed
    reports = [tuple(int(v) for v in line.split()) for line in log.read_text().splitlines()]
    for rank in (0, 1):  # the replacement workers went on from step 4: no step reported twice
        assert sorted(step for r, step, _ in reports if r == rank) == [4, 8, 12]
    rank1 = {step: pid for r, step, pid in reports if r == 1}
    assert rank1[4] == killed["pid"] and rank1[8] == rank1[12] != killed["pid"]
    assert crashed["summary"]["steps"] == 12
    rows = (crashed["dir"] / "metrics.csv").read_text().strip().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == [2, 4, 6, 8, 10, 12]  # no lost or repeated steps
    for which in ("model", "ema"):  # EMA and optimizer state were restored, not restarted
        ref, got = weights(reference, which), weights(crashed, which)
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], atol=1e-6, rtol=1e-5, msg=f"{which}.{k}")


def test_raising_steps_continues_a_previous_run(ray_session, digits_data, one_worker, tmp_path) -> None:
    first = train(digits_data, tmp_path, workers=1, train={"steps": 8})
    run_root = first["dir"].parents[2]
    from uvit.train.trainer import run_training

    summary = run_training(tiny_config(1), BenchmarkPaths("digits", run_root))  # resumes by default
    assert summary["steps"] == 12
    # Asking again for 12 steps finds the step-12 checkpoint and exports it without training: no new
    # Ray run or checkpoint appears, the export comes from the run above, and the logged steps and
    # weights are those of the first 12.
    ray_dir = run_root / "runs/digits/ray"
    before = sorted(p.relative_to(ray_dir) for p in ray_dir.glob("*/*/checkpoint_*/state.json"))
    exported = {
        f: (first["dir"] / f).read_bytes() for f in ("metrics.csv", "model/model.safetensors", "ema/model.safetensors")
    }
    again = run_training(tiny_config(1), BenchmarkPaths("digits", run_root))
    assert sorted(p.relative_to(ray_dir) for p in ray_dir.glob("*/*/checkpoint_*/state.json")) == before
    assert again["steps"] == 12 and again["ray_run"] == summary["ray_run"]
    assert again["wall_time_s"] == summary["wall_time_s"] > 0  # the training's time, not this export's
    assert {f: (first["dir"] / f).read_bytes() for f in exported} == exported
    # Other parameters never resume from these checkpoints: their trajectory differs.
    from uvit.train.trainer import train_fingerprint

    data = run_root / "data" / "digits"
    assert train_fingerprint(tiny_config(1), data) == train_fingerprint(tiny_config(1, steps=99), data)
    assert train_fingerprint(tiny_config(1), data) != train_fingerprint(tiny_config(1, lr=0.5), data)
    got = UViT.from_pretrained(run_root / "runs/digits/train/model").state_dict()
    for k, v in weights(one_worker).items():  # 8 steps, then 4 more == 12 uninterrupted
        torch.testing.assert_close(got[k], v, atol=1e-6, rtol=1e-5, msg=k)
    saved = json.loads((run_root / "runs/digits/train/summary.json").read_text())
    assert saved["steps"] == 12


def test_s3_checkpoints_resume_under_fsdp(ray_session, digits_data, two_workers, tmp_path) -> None:
    """Checkpoints go to a (loopback moto) S3 bucket; a second invocation on another machine (a
    fresh project root) resumes from them with FSDP and ends where the DDP reference ends.
    The same run checks the monitor: metrics columns, TensorBoard, EMA sample grids."""
    import boto3
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from uvit.storage.s3server import local_s3

    with local_s3() as endpoint:
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="uvit-ray")
        s3 = {"storage_path": "s3://uvit-ray/ckpt", "storage_endpoint": endpoint}
        first = train(digits_data, tmp_path, workers=2, train={"steps": 8, **s3})
        keys = [
            o["Key"] for o in boto3.client("s3", endpoint_url=endpoint).list_objects_v2(Bucket="uvit-ray")["Contents"]
        ]
        states = sorted(k for k in keys if k.endswith("/state.json"))
        assert len(states) == 2 and all(k.startswith("ckpt/") for k in states)  # steps 4 and 8, keep-last-2
        assert first["summary"]["ray_run"].startswith("s3://uvit-ray/ckpt/")
        assert not list((first["dir"].parent / "ray").glob("*/*/checkpoint_*"))  # none kept locally

        resumed = train(
            digits_data,
            tmp_path,
            workers=2,
            classifier=True,
            train={"steps": 12, "strategy": "fsdp", "sample_every": 2, "fid_every": 4, "fid_samples": 40, **s3},
        )
        assert resumed["summary"]["steps"] == 12
        rows = list(csv.DictReader((resumed["dir"] / "metrics.csv").open()))
        assert [int(r["step"]) for r in rows] == [2, 4, 6, 8, 10, 12]  # steps 2-8 came from S3
        assert list(rows[0]) == ["step", "loss", "lr", "grad_norm", "images_per_s", "elapsed_s", "peak_mem_gib"]
        assert all(float(r["grad_norm"]) > 0 and float(r["images_per_s"]) > 0 for r in rows)
        for which in ("model", "ema"):  # FSDP resumed from DDP state == DDP all the way
            ref, got = weights(two_workers, which), weights(resumed, which)
            for k in ref:
                torch.testing.assert_close(got[k], ref[k], atol=2e-5, rtol=1e-4, msg=f"{which}.{k}")

        # The FSDP checkpoint on S3 is a full one: it loads into a plain single-process state.
        import ray.train

        from checkpoints import load_checkpoint
        from uvit.train.checkpoint import TrainingState
        from uvit.train.step import EMA, build_optimizer, warmup_lambda
        from uvit.train.checkpoint_storage import find_checkpoints, resolve_storage

        storage = resolve_storage("s3://uvit-ray/ckpt", endpoint)
        fp = resumed["summary"]["ray_run"].split("/")[-2]
        step, _, path = find_checkpoints(storage.child(fp))[0]
        local = ray.train.Checkpoint(path, filesystem=storage.fs).to_directory(str(tmp_path / "ckpt12"))
        model = UViT(UViT.from_pretrained(resumed["dir"] / "model").config)
        opt = build_optimizer(model, 1e-3, 0.0, (0.9, 0.999))
        state = TrainingState(
            model, EMA(model, 0.9).model, opt, torch.optim.lr_scheduler.LambdaLR(opt, warmup_lambda(2)), 0
        )
        load_checkpoint(local, state)
        assert step == state.step == 12 and len(opt.state) == len(list(model.parameters()))

    run_local = resumed["dir"].parent / "ray" / fp
    assert sorted(p.name for p in (run_local / "samples").iterdir()) == ["step_0000010.png", "step_0000012.png"]
    events = EventAccumulator(str(run_local / "tensorboard")).Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [10, 12]  # this invocation's steps
    assert len(events.Images("samples/ema")) == 2
    fid = [line.split(",") for line in (run_local / "fid.csv").read_text().split()]
    assert [int(step) for step, _ in fid] == [12] and float(fid[0][1]) > 0  # fid_every 4, from step 8
    assert [e.step for e in events.Scalars("eval/fid")] == [12]


def test_trainer_leaves_out_the_placement_group_cleaner() -> None:
    """Ray's cleaner took a missed State API lookup for a dead controller and removed a live
    run's placement group; the trainer keeps every other default callback."""
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    from uvit.train.trainer import _torch_trainer

    scaling = ray.train.ScalingConfig(num_workers=1)
    stock = [type(c) for c in TorchTrainer(lambda: None, scaling_config=scaling)._create_default_callbacks()]
    ours = [type(c) for c in _torch_trainer()(lambda: None, scaling_config=scaling)._create_default_callbacks()]
    assert PlacementGroupCleanerCallback in stock
    assert ours == [c for c in stock if c is not PlacementGroupCleanerCallback]
