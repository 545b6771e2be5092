"""The jobs of tests/test_multihost.py, run as drivers on the cluster's hosts, and the test-side
instrumentation of their Ray workers.

    python tests/multihost_jobs.py train|sample|encode ARGS.json RESULT.json

`setup` is every Ray worker's `worker_process_setup_hook` (the drivers pass it in their runtime_env).
It reads the fault plan named by $UVIT_TEST_FAULT_PLAN and appends to its log what ran where:

    report RANK STEP PID HOST        after each `ray.train.report`
    shard start|done INDEX PID HOST  around each sampling shard's Ray task
    encode start|done INDEX PID HOST around each encode chunk's Ray task

and pauses (writes "PID HOST" to plan["pid_file"], then sleeps, bounded) where the plan says, so that
the test can take the host away at a known point: after rank `rank` reports step `step`, or when a
task starts on host `host`.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from pathlib import Path

PLAN_ENV = "UVIT_TEST_FAULT_PLAN"


# ---------------------------------------------------------------------------- worker side
def setup() -> None:
    if not os.environ.get(PLAN_ENV):
        return
    plan = json.loads(Path(os.environ[PLAN_ENV]).read_text())
    import ray.train

    import uvit.data.encode as encode
    import uvit.evaluate.sample_shards as sample_shards

    ray.train.report = _reporting(ray.train.report, plan)
    sample_shards._sample_shard_remote = _task(sample_shards._sample_shard_remote, "shard", plan)
    encode._encode_chunk_remote = _task(encode._encode_chunk_remote, "encode", plan)


def _host() -> str:
    import ray

    return ray.util.get_node_ip_address()


def _log(plan: dict, *fields: object) -> None:
    with open(plan["log"], "a") as f:  # one short append per line: lines from many processes stay whole
        f.write(" ".join(map(str, fields)) + "\n")


def _pause(plan: dict) -> None:
    pid_file = Path(plan["pid_file"])
    if pid_file.exists():  # once per plan
        return
    pid_file.with_suffix(".tmp").write_text(f"{os.getpid()} {_host()}")
    pid_file.with_suffix(".tmp").replace(pid_file)
    time.sleep(plan.get("pause_s", 300))  # bounded: the test takes the host away long before


def _reporting(report, plan: dict):
    @functools.wraps(report)
    def report_and_log(metrics, *args, **kwargs):
        import ray.train

        report(metrics, *args, **kwargs)
        rank = ray.train.get_context().get_world_rank()
        _log(plan, "report", rank, metrics["step"], os.getpid(), _host())
        if plan.get("pause") == "report" and rank == plan["rank"] and metrics["step"] == plan["step"]:
            _pause(plan)

    return report_and_log


def _task(fn, kind: str, plan: dict):
    @functools.wraps(fn)
    def logged(*args):
        piece = args[-2]  # every remote piece function ends (..., piece, device)
        _log(plan, kind, "start", piece.index, os.getpid(), _host())
        if plan.get("pause") == kind and _host() == plan["host"]:
            _pause(plan)
        result = fn(*args)
        _log(plan, kind, "done", piece.index, os.getpid(), _host())
        return result

    return logged


# ---------------------------------------------------------------------------- drivers
def _init_ray(args: dict) -> None:
    import ray

    env = {"OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled"}
    if args.get("plan"):
        env[PLAN_ENV] = args["plan"]
    ray.init(runtime_env={"env_vars": env, "worker_process_setup_hook": "multihost_jobs.setup"})


def train(args: dict) -> dict:
    from uvit.config import load_benchmark, load_params
    from uvit.paths import BenchmarkPaths
    from uvit.train.trainer import run_training

    _init_ray(args)
    cfg = load_benchmark("digits", load_params(Path(args["params"])))
    return run_training(cfg, BenchmarkPaths("digits", Path(args["root"])))


def sample(args: dict) -> dict:
    from uvit.evaluate.sample_shards import SampleSpec, SamplingRun, sample_to_shards

    if args["num_workers"] > 1:
        _init_ray(args)
    how = SamplingRun(batch_size=args["batch_size"], num_workers=args["num_workers"], progress=False)
    return sample_to_shards(args["model_dir"], args["out_dir"], SampleSpec(**args["spec"]), how)


def encode(args: dict) -> dict:
    from tiny_vae import tiny_vae

    from uvit.data.encode import EncodeRun, ImageEncoding, encode_image_split

    if args["num_workers"] > 1:
        _init_ray(args)
    vae = tiny_vae(32, 0).eval().requires_grad_(False)
    run = EncodeRun(shard_size=args["shard_size"], num_workers=args["num_workers"], progress=False)
    manifest = encode_image_split(args["image_root"], args["out_root"], vae, ImageEncoding(batch_size=2), run)
    return {"count": manifest.count, "shards": len(manifest.shards)}


if __name__ == "__main__":
    job, args_file, result_file = sys.argv[1:4]
    result = {"train": train, "sample": sample, "encode": encode}[job](json.loads(Path(args_file).read_text()))
    Path(result_file).write_text(json.dumps(result, default=str))
