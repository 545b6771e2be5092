"""The Prefect flow (pipelines/flows.py): parameters, overrides, retries, and a real deployment.

The flow runs a benchmark's DVC stages with `dvc repro --single-item` in a workspace (a DVC
repository), so DVC's cache is the only one. The slow test deploys the project's prefect.yaml on a
local Prefect server (SQLite, a free loopback port): the pull step clones a test repository holding
the miniature ImageNet 256 (latent) chain into a workspace, a process worker runs it end to end
(publishing to a loopback S3), and a second run finds every stage up to date.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from uuid import UUID

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

from prefect.client.orchestration import get_client  # noqa: E402
from prefect.client.schemas.filters import FlowRunFilter  # noqa: E402
from prefect.client.schemas.filters import FlowRunFilterId  # noqa: E402
from prefect.settings import (  # noqa: E402
    PREFECT_API_URL,
    PREFECT_HOME,
    PREFECT_SERVER_ANALYTICS_ENABLED,
    temporary_settings,
)

from pipelines.flows import (  # noqa: E402
    _stage_task,
    apply_overrides,
    artifact_key,
    make_flow,
    parse_set,
    resolve_config,
    write_overrides,
)
from uvit.config import ConfigError  # noqa: E402
from uvit.stages import dvcfile  # noqa: E402
from uvit.stages.table import STAGES, get_stage  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def prefect_server(port: int, env: dict, where: Path):
    """`prefect server start` on 127.0.0.1:port until healthy; stopped on exit."""
    log_path = where / "server.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            cwd=where,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 90
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                assert server.poll() is None, log_path.read_text()[-3000:]
                assert time.monotonic() < deadline, "server did not become healthy"
                time.sleep(0.5)
            yield
        finally:
            os.killpg(server.pid, 15)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, 9)
                server.wait()


@pytest.fixture(scope="module")
def server_env(tmp_path_factory):
    """A local Prefect server for this module (SQLite in a temp dir, a free loopback port), and the
    environment that points processes at it. In-process flow runs use it through `prefect_api`."""
    where = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(where / "home"),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{where / 'prefect.db'}",
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
    }
    for var in ("PREFECT_API_KEY", "PREFECT_API_AUTH_STRING", "PREFECT_PROFILES_PATH"):
        env.pop(var, None)
    with prefect_server(port, env, where):
        yield env


@pytest.fixture(scope="module")
def prefect_api(server_env):
    """In-process clients and flow runs talk to the module's server."""
    with temporary_settings(
        {
            PREFECT_HOME: server_env["PREFECT_HOME"],
            PREFECT_API_URL: server_env["PREFECT_API_URL"],
            PREFECT_SERVER_ANALYTICS_ENABLED: False,
        }
    ):
        yield server_env["PREFECT_API_URL"]


def task_runs(flow_state, expect: int = 0, timeout: float = 30.0) -> dict[str, object]:
    """The task runs of a flow run, by task name, read back from the API.

    Task-run states reach the server as events, after the flow has returned, so wait (up to
    `timeout`) until at least `expect` runs are recorded and every one is in a final state."""
    flow_run_id = flow_state.state_details.flow_run_id
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            settled = len(runs) >= expect and all(r.state is not None and r.state.is_final() for r in runs)
            if settled or time.monotonic() > deadline:
                return {run.name: run for run in runs}
            time.sleep(0.25)


# --------------------------------------------------------------------------------------------
# Parameters (no Prefect run needed)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("benchmark", "overrides", "named"),
    [
        ("digitz", None, "unknown benchmark 'digitz'"),
        ("digits", {"digits.model.preset": "no_such_preset"}, "digits.model.preset"),
        ("digits", {"digits.train.steps": -5}, "digits.train.steps"),
        ("digits", {"digits.train.steps": "many"}, "digits.train.steps"),
        ("digits", {"digits.train.stepz": 3}, "digits.train.stepz"),
        ("digits", {"digitz.train.steps": 3}, "digitz.train.steps"),
    ],
)
def test_bad_params_name_the_key(benchmark, overrides, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        resolve_config(benchmark, ROOT / "params.yaml", ROOT, overrides)


def test_overrides_and_set_parsing():
    overrides = parse_set(["digits.train.steps=30", "digits.train.betas=[0.9, 0.99]", "digits.train.compile=true"])
    assert overrides == {"digits.train.steps": 30, "digits.train.betas": [0.9, 0.99], "digits.train.compile": True}
    cfg = resolve_config("digits", "params.yaml", ROOT, overrides)
    assert (cfg.train.steps, cfg.train.betas, cfg.train.compile) == (30, (0.9, 0.99), True)
    params = {"digits": {"train": {"steps": 1}}}
    assert apply_overrides(params, {"digits.train.steps": 2})["digits"]["train"]["steps"] == 2
    assert params["digits"]["train"]["steps"] == 1  # the input is not modified
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_set(["digits.train.steps"])
    assert artifact_key("ImageNet256", "metrics") == "uvit-imagenet256-metrics"


def test_retry_policy_comes_from_the_stage_table():
    tasks = {s.name: _stage_task(s) for s in STAGES}
    assert tasks["data"].retries == 3 and tasks["data"].retry_delay_seconds == [10, 20, 40]
    assert tasks["publish"].retries == 3  # uploads: the other network step
    assert tasks["score"].retries == 1 and tasks["score"].retry_delay_seconds == 10
    assert all(tasks[s].retries == 0 for s in ("validate", "encode", "train", "sample", "classifier", "report"))
    assert get_stage("data").retries == 3


def test_overrides_are_written_into_params_with_comments_kept_and_dvc_files_regenerated(tmp_path):
    for name in ("params.yaml", "dvc.yaml", "paper/dvc.yaml", "studies/dvc.yaml"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text((ROOT / name).read_text())
    comments = [line for line in (ROOT / "params.yaml").read_text().splitlines() if line.lstrip().startswith("#")]
    assert write_overrides(tmp_path, "params.yaml", {"digits.train.steps": 7}) == []  # no file named: no regeneration
    changed = write_overrides(tmp_path, "params.yaml", {"imagenet256.encode.vae": "/weights/vae2.pth"})
    assert changed == [dvcfile.PAPER_FILE]
    text = (tmp_path / "params.yaml").read_text()
    assert all(c in text for c in comments)  # every comment survives
    params = yaml.safe_load(text)
    assert params["digits"]["train"]["steps"] == 7 and params["imagenet256"]["encode"]["vae"] == "/weights/vae2.pth"
    assert "/weights/vae2.pth" in (tmp_path / "paper/dvc.yaml").read_text()
    assert dvcfile.stale(tmp_path) == []


@pytest.mark.parametrize(
    ("benchmark", "overrides", "named"),
    [
        ("nope", None, "unknown benchmark 'nope'"),
        ("digits", {"digits.train.steps": "abc"}, "digits.train.steps"),
        ("digits", {"digits.train.steps": -5}, "digits.train.steps: Input should be greater than 0"),
        ("digits", {"digits.model.preset": "uvit_xxl"}, "digits.model.preset"),
        ("digits", {"digits.artifacts.url": "ftp://host/x"}, "digits.artifacts.url"),
    ],
)
def test_bad_params_fail_before_any_task(prefect_api, tmp_path, benchmark, overrides, named):
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    state = make_flow()(benchmark=benchmark, root=str(tmp_path), overrides=overrides, return_state=True)
    assert state.is_failed()
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        state.result()
    assert task_runs(state) == {}
    assert (tmp_path / "params.yaml").read_text() == (ROOT / "params.yaml").read_text()  # nothing written


def test_the_digits_flow_runs_its_seed_spread_runs_before_the_spread_stage(prefect_api, tmp_path, monkeypatch):
    """The flow walks `steps`: each seed-spread run's train, sample and score (its dvc.yaml foreach
    stages) between the sampler study and the spread stage, as tasks named train@spread/s1, ...
    DVC is replaced by a recorder: the order and addresses are what is checked here, the stages
    themselves run in tests/test_pipeline.py."""
    import pipelines.flows as flows

    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    called = []

    def fake_dvc(args, root, log=None):
        called.append(args[-1])
        return f"Running stage '{args[-1]}':"

    monkeypatch.setattr(flows, "dvc", fake_dvc)
    state = make_flow(retry_delay_seconds=0)(
        benchmark="digits", root=str(tmp_path), push_outputs=False, return_state=True
    )
    assert state.is_completed(), state
    spread = [(s, f"s{seed}") for seed in (1, 2) for s in ("train", "sample", "score")]
    own = ["data", "validate", "classifier", "train", "sample", "score", "samplers"]
    assert called == [
        *(f"dvc.yaml:{s}" for s in own),
        *(f"dvc.yaml:{s}-spread@{run}" for s, run in spread),
        *(f"dvc.yaml:{s}" for s in ("spread", "report", "publish")),
    ]
    assert list(state.result()["ran"]) == [
        *own,
        *(f"{s}@spread/{run}" for s, run in spread),
        "spread",
        "report",
        "publish",
    ]
    assert set(task_runs(state, expect=len(called))) == set(state.result()["ran"])


def prefect_cli(args: list[str], env: dict, cwd: Path, timeout: int = 180) -> str:
    proc = subprocess.run(
        [str(BIN / "prefect"), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"prefect {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc.stdout + proc.stderr


def run_deployment(name: str, params: dict, env: dict, cwd: Path) -> str:
    """`prefect deployment run NAME --param ...`, then one worker pass; the flow run's id."""
    args = [a for k, v in params.items() for a in ("--param", f"{k}={v if isinstance(v, str) else json.dumps(v)}")]
    out = prefect_cli(["deployment", "run", name, *args], env, cwd)
    match = re.search(r"UUID: ([0-9a-f-]{36})", out)
    assert match, out
    prefect_cli(["worker", "start", "--pool", "uvit", "--run-once"], env, cwd, timeout=400)
    return match.group(1)


def flow_run_states(flow_run_id: str, expect: int = 0, timeout: float = 30.0) -> tuple[str, dict[str, str]]:
    """(flow run state, {task name: state}) from the API in the current settings, once the flow
    run and at least `expect` task runs are recorded in final states (states arrive as events)."""
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(flow_run_id)
            tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
            final = [run.state, *(t.state for t in tasks)]
            if (
                len(tasks) >= expect and all(s is not None and s.is_final() for s in final)
            ) or time.monotonic() > deadline:
                return run.state.name, {t.name: t.state.name for t in tasks}
            time.sleep(0.25)


@pytest.mark.slow
def test_latent_deployment_runs_the_dvc_stages_on_a_local_server(
    prefect_api, server_env, tmp_path, offline_aws_env, fake_aws, make_project
):
    """prefect.yaml deployed; uvit/imagenet256 run twice by a process worker from a clone of a test
    repository holding the miniature chain: the first run runs every stage, the second none."""
    from uvit.miniature import write_miniature
    from uvit.storage.artifacts import ArtifactStore
    from uvit.storage.s3server import AWS_OVERRIDE_VARS, local_s3

    env = {
        **{k: v for k, v in server_env.items() if k not in AWS_OVERRIDE_VARS},
        **fake_aws,
        "OMP_NUM_THREADS": "1",
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    took = {}
    with local_s3() as s3:
        store = ArtifactStore("s3://uvit-test/artifacts", endpoint_url=s3)
        store.client.create_bucket(Bucket="uvit-test")
        overrides = write_miniature(tmp_path / "inputs", ["imagenet256"])
        overrides["imagenet256"]["artifacts"] = {"url": "s3://uvit-test/artifacts", "endpoint_url": s3}
        origin = make_project(tmp_path / "origin", overrides)
        workspace = tmp_path / "workspace"
        workspace.mkdir()
        prefect_cli(["variable", "set", "uvit_repository", str(origin)], env, tmp_path)
        prefect_cli(["variable", "set", "uvit_workspace", str(workspace)], env, tmp_path)
        prefect_cli(["work-pool", "create", "uvit", "--type", "process"], env, tmp_path)
        t0 = time.monotonic()
        prefect_cli(["deploy", "--all"], env, ROOT, timeout=300)
        took["deploy"] = time.monotonic() - t0
        with get_client(sync_client=True) as client:
            deployed = {d.name: d for d in client.read_deployments()}
        assert sorted(deployed) == sorted(yaml.safe_load((ROOT / "params.yaml").read_text()))
        pull = yaml.safe_load((ROOT / "prefect.yaml").read_text())["pull"]
        for name, d in deployed.items():
            assert (d.entrypoint, d.work_pool_name, d.parameters) == (
                "pipelines/flows.py:uvit_benchmark",
                "uvit",
                {"benchmark": name},
            )
            assert d.pull_steps == pull and d.global_concurrency_limit.limit == 1

        chain = ["data", "validate", "encode", "train", "sample", "score", "report", "publish", "push"]
        runs = {}
        for attempt in ("first", "second"):
            t1 = time.monotonic()
            runs[attempt] = run_deployment("uvit/imagenet256", {}, env, tmp_path)
            took[f"{attempt} run"] = time.monotonic() - t1
            state, tasks = flow_run_states(runs[attempt], expect=len(chain))
            assert state == "Completed" and tasks == dict.fromkeys(chain, "Completed"), (state, tasks)
            with get_client(sync_client=True) as client:
                arts = {
                    a.key: a
                    for a in client.read_artifacts(
                        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[UUID(runs[attempt])]))
                    )
                }
            stages = {row["stage"]: row["ran"] for row in json.loads(arts["uvit-imagenet256-stages"].data)}
            assert stages == dict.fromkeys(chain[:-1], attempt == "first"), stages
            clone = workspace / origin.name
            metrics = json.loads((clone / "runs/imagenet256/score/metrics.json").read_text())
            posted = {(r["source"], r["metric"]): r["value"] for r in json.loads(arts["uvit-imagenet256-metrics"].data)}
            assert posted[("score", "fid")] == metrics["fid"] and posted[("train", "steps")] == 4  # this run's files
            assert arts["uvit-imagenet256-report"].data == (clone / "reports/imagenet256.md").read_text()

        assert math.isfinite(metrics["fid"]) and metrics["fid"] > 0
        published = json.loads((clone / "runs/imagenet256/publish.json").read_text())
        assert store.list_runs("imagenet256") == [published["run_id"]]
        fetched = store.download_run("imagenet256", published["run_id"], tmp_path / "fetched")
        assert (fetched / "checkpoints/ema/model.safetensors").read_bytes() == (
            clone / "runs/imagenet256/train/ema/model.safetensors"
        ).read_bytes()
        assert (fetched / "score/metrics.json").read_bytes() == (
            clone / "runs/imagenet256/score/metrics.json"
        ).read_bytes()
    print("latent deployment:", ", ".join(f"{k} {v:.0f} s" for k, v in took.items()))
