"""The Prefect flow (pipelines/flows.py): parameters, caching, retries, and the real deployment.

In-process tests use cheap stand-in stages through `make_flow(stages)`, the same code
`uvit_benchmark` uses with the real `uvit.stages.STAGES`: the stand-ins write small deterministic
files where the real stages write their artifacts and count their calls, so caching and retries
are observed exactly. The slow test runs the REAL digits deployment of prefect.yaml on a local
Prefect server (SQLite, a free loopback port) with a process worker, on a cut-down configuration
passed as flow parameters: the whole stack (great-expectations, Ray Train, torch-fidelity, the
report, publishing to a loopback S3) in separate processes, twice (the second run all Cached).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
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
STEPS = yaml.safe_load((ROOT / "params.yaml").read_text())["digits"]["train"]["steps"]
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
    STAGE_SPECS,
    apply_overrides,
    artifact_key,
    make_flow,
    parse_set,
    resolve_config,
)
from uvit.config import ConfigError  # noqa: E402

# Stand-in stages: each appends to calls/<stage> (its call count) and writes its outputs where the
# real stage does, with content depending only on its parameters and inputs.
CHEAP_STAGES = '''
import json
from pathlib import Path


def calls(paths, name):
    """Record one call of stage `name`; return how many there have been."""
    log = Path(paths.root) / "calls" / name
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write("x")
    return len(log.read_text())


def write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, sort_keys=True) + "\\n")


def data(cfg, paths):
    calls(paths, "data")
    write(paths.data / "train" / "manifest.json", {"seed": cfg.data.seed, "rows": 100})
    write(paths.data / "test" / "manifest.json", {"seed": cfg.data.seed, "rows": 20})
    return {"train": 100, "test": 20}


def flaky_data(cfg, paths):
    if calls(paths, "flaky") == 1:
        raise ConnectionError("simulated network failure")
    return data(cfg, paths)


def validate(cfg, paths):
    calls(paths, "validate")
    write(paths.validate / "report.json", {"train": True, "test": True})
    return {"train": True, "test": True}


def train(cfg, paths):
    calls(paths, "train")
    for kind in ("model", "ema"):
        write(paths.train / kind / "weights.json", {"steps": cfg.train.steps, "kind": kind})
    (paths.train / "metrics.csv").write_text("step,loss\\n1,1.0\\n")
    summary = {"steps": cfg.train.steps, "final_loss": 1.0 / cfg.train.steps}
    write(paths.train / "summary.json", summary)
    return summary


def sample(cfg, paths):
    calls(paths, "sample")
    steps = json.loads((paths.train / "ema" / "weights.json").read_text())["steps"]
    summary = {"num_samples": cfg.sample.num_samples, "trained_steps": steps}
    write(paths.samples / "summary.json", summary)
    return summary


def classifier(cfg, paths):
    calls(paths, "classifier")
    write(paths.classifier / "metrics.json", {"test_accuracy": 0.9})
    return {"test_accuracy": 0.9}


def score(cfg, paths):
    calls(paths, "score")
    s = json.loads((paths.samples / "summary.json").read_text())
    metrics = {"fid": round(100.0 / s["trained_steps"], 4), "conditional_accuracy": 0.5}
    write(paths.score / "metrics.json", metrics)
    return metrics


def report(cfg, paths):
    calls(paths, "report")
    m = json.loads((paths.score / "metrics.json").read_text())
    page = paths.reports / f"{cfg.name}.md"
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(f"# {cfg.name}\\n\\nFID {m['fid']}\\n")
    (paths.reports / "README.md").write_text(f"- [{cfg.name}]({cfg.name}.md)\\n")
    return {"report": str(page)}


STAGES = {"data": data, "validate": validate, "train": train, "sample": sample,
          "classifier": classifier, "score": score, "report": report}
'''

ALL = ["data", "validate", "train", "sample", "classifier", "score", "report"]


def load_cheap_stages(where: Path):
    """The stand-ins as a real module file (so their source can be hashed into cache keys)."""
    path = where / "cheap_stages.py"
    path.write_text(CHEAP_STAGES)
    spec = importlib.util.spec_from_file_location(f"cheap_stages_{abs(hash(str(where)))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def new_project(tmp: Path) -> Path:
    """A project root holding only the real params.yaml: the stages write everything else."""
    tmp.mkdir(parents=True, exist_ok=True)
    shutil.copy2(ROOT / "params.yaml", tmp / "params.yaml")
    return tmp


def call_counts(root: Path) -> dict[str, int]:
    calls = root / "calls"
    return {p.name: len(p.read_text()) for p in sorted(calls.iterdir())} if calls.exists() else {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def prefect_server(port: int, env: dict, where: Path):
    """`prefect server start` on 127.0.0.1:port until healthy; stopped on exit."""
    log_path = where / "server.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                  env=env, cwd=where, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
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
    env = {**os.environ, "PREFECT_HOME": str(where / "home"), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_DATABASE_CONNECTION_URL":
           f"sqlite+aiosqlite:///{where / 'prefect.db'}", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    for var in ("PREFECT_API_KEY", "PREFECT_API_AUTH_STRING", "PREFECT_PROFILES_PATH"):
        env.pop(var, None)
    with prefect_server(port, env, where):
        yield env


@pytest.fixture(scope="module")
def prefect_api(server_env):
    """In-process clients and flow runs talk to the module's server."""
    with temporary_settings({PREFECT_HOME: server_env["PREFECT_HOME"], PREFECT_API_URL: server_env["PREFECT_API_URL"],
                             PREFECT_SERVER_ANALYTICS_ENABLED: False}):
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


def test_retry_policy():
    assert STAGE_SPECS["data"].retries == 3 and STAGE_SPECS["data"].retry_delay == [10, 20, 40]
    assert STAGE_SPECS["score"].retries == 1
    assert STAGE_SPECS["publish"].retries == 3  # uploads: the other network step
    assert all(STAGE_SPECS[s].retries == 0 for s in ("validate", "train", "sample", "classifier", "report"))


# --------------------------------------------------------------------------------------------
# In-process flow runs against a temporary API
# --------------------------------------------------------------------------------------------


def test_cache_across_flow_runs(prefect_api, tmp_path):
    root = new_project(tmp_path / "project")
    stages = load_cheap_stages(tmp_path)
    uvit_flow = make_flow(stages.STAGES)
    run = dict(benchmark="digits", params_path="params.yaml", root=str(root))

    # 1. Everything runs once, artifacts land where the real stages put them.
    state = uvit_flow(**run, return_state=True)
    out = state.result()
    assert state.is_completed() and set(out["states"].values()) == {"Completed"}
    assert list(out["states"]) == ALL
    assert call_counts(root) == dict.fromkeys(ALL, 1)
    assert (root / "reports" / "digits.md").is_file() and (root / ".prefect-results").is_dir()
    assert out["results"]["score"]["fid"] == round(100.0 / STEPS, 4)

    # 2. Nothing changed: every task is served from the cache, no stage function runs.
    state = uvit_flow(**run, return_state=True)
    assert set(state.result()["states"].values()) == {"Cached"}
    assert {name: r.state.name for name, r in task_runs(state, expect=len(ALL)).items()} == dict.fromkeys(ALL, "Cached")
    assert call_counts(root) == dict.fromkeys(ALL, 1)

    # 3. A changed parameter recomputes its stage and what its outputs change downstream.
    out = uvit_flow(**run, overrides={"digits.train.steps": 30})
    assert out["states"] == {"data": "Cached", "validate": "Cached", "train": "Completed", "sample": "Completed",
                             "classifier": "Cached", "score": "Completed", "report": "Completed"}
    assert call_counts(root)["train"] == 2 and out["results"]["score"]["fid"] == round(100 / 30, 4)

    # 4. A deleted output recomputes its stage; identical content leaves downstream cached.
    (root / "runs" / "digits" / "score" / "metrics.json").unlink()
    out = uvit_flow(**run, overrides={"digits.train.steps": 30})
    assert [s for s, v in out["states"].items() if v != "Cached"] == ["score"]
    shutil.rmtree(root / "data")
    out = uvit_flow(**run, overrides={"digits.train.steps": 30})
    assert [s for s, v in out["states"].items() if v != "Cached"] == ["data"]
    assert (root / "data" / "digits" / "train" / "manifest.json").is_file()

    # 5. Back to the first parameters: the cache holds them, but the outputs on disk are the
    #    steps=30 ones, so the stages whose outputs differ run again (never a stale cache hit).
    out = uvit_flow(**run)
    assert [s for s, v in out["states"].items() if v != "Cached"] == ["train", "sample", "score", "report"]
    assert json.loads((root / "runs" / "digits" / "train" / "summary.json").read_text())["steps"] == STEPS
    assert call_counts(root) == {"data": 2, "validate": 1, "train": 3, "sample": 3, "classifier": 1,
                                 "score": 4, "report": 3}

    # Artifacts: the metrics table and the report, under stable keys.
    with get_client(sync_client=True) as client:
        arts = {a.key: a for a in client.read_latest_artifacts()}
    table = arts["uvit-digits-metrics"]
    assert table.type == "table" and '"fid"' in table.data and '"final_loss"' in table.data
    assert arts["uvit-digits-report"].type == "markdown" and "# digits" in arts["uvit-digits-report"].data


def test_retry_then_success(prefect_api, tmp_path):
    root = new_project(tmp_path / "project")
    stages = load_cheap_stages(tmp_path)
    uvit_flow = make_flow({**stages.STAGES, "data": stages.flaky_data}, retry_delay_seconds=0)
    state = uvit_flow(benchmark="digits", root=str(root), return_state=True)
    assert state.is_completed()
    assert call_counts(root)["flaky"] == 2 and call_counts(root)["data"] == 1
    data_run = task_runs(state, expect=1)["data"]
    assert data_run.run_count == 2 and data_run.state.name == "Completed"


@pytest.mark.parametrize(
    ("benchmark", "overrides", "named"),
    [("nope", None, "unknown benchmark 'nope'"),
     ("digits", {"digits.train.steps": "abc"}, "digits.train.steps"),
     ("digits", {"digits.train.steps": -5}, "digits.train.steps: Input should be greater than 0"),
     ("digits", {"digits.model.preset": "uvit_xxl"}, "digits.model.preset"),
     ("digits", {"digits.artifacts.url": "ftp://host/x"}, "digits.artifacts.url")],
)
def test_bad_params_fail_before_any_task(prefect_api, tmp_path, benchmark, overrides, named):
    root = new_project(tmp_path / "project")
    uvit_flow = make_flow(load_cheap_stages(tmp_path).STAGES)
    state = uvit_flow(benchmark=benchmark, root=str(root), overrides=overrides, return_state=True)
    assert state.is_failed()
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        state.result()
    assert call_counts(root) == {} and task_runs(state) == {}


# --------------------------------------------------------------------------------------------
# The real digits deployment: a server, a process work pool, prefect.yaml, a worker (processes)
# --------------------------------------------------------------------------------------------

# Flow parameters that cut the real digits pipeline down to well under a minute on 2 cores.
CUT_DOWN = {
    "digits.train.steps": 20, "digits.train.num_workers": 1, "digits.train.warmup_steps": 5,
    "digits.train.checkpoint_every": 20, "digits.train.log_every": 5,
    "digits.sample.num_samples": 40, "digits.sample.batch_size": 40, "digits.sample.steps": 5,
    "digits.score.classifier_epochs": 2,
}
REAL_STAGES = ["data", "validate", "train", "sample", "classifier", "score", "report", "publish"]


def prefect_cli(args: list[str], env: dict, cwd: Path, timeout: int = 180) -> str:
    proc = subprocess.run([str(BIN / "prefect"), *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"prefect {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
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
            if (len(tasks) >= expect and all(s is not None and s.is_final() for s in final)) \
                    or time.monotonic() > deadline:
                return run.state.name, {t.name: t.state.name for t in tasks}
            time.sleep(0.25)


@pytest.mark.slow
def test_real_digits_deployment_on_a_local_server(prefect_api, server_env, tmp_path, offline_aws_env, fake_aws):
    from uvit.storage.artifacts import ArtifactStore
    from uvit.storage.s3server import AWS_OVERRIDE_VARS, local_s3

    # S3 (the publish stage, a loopback moto server): credentials from the environment only, here
    # (offline_aws_env) and in the worker's flow-run processes.
    env = {**{k: v for k, v in server_env.items() if k not in AWS_OVERRIDE_VARS},
           **fake_aws, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    root = new_project(tmp_path / "project")  # params.yaml only: the flow writes everything else here
    t0 = time.monotonic()
    took = {}

    with local_s3() as s3:
        store = ArtifactStore("s3://uvit-test/artifacts", endpoint_url=s3)
        store.client.create_bucket(Bucket="uvit-test")
        overrides = {**CUT_DOWN, "digits.artifacts.url": "s3://uvit-test/artifacts", "digits.artifacts.endpoint_url": s3}

        # The project's prefect.yaml, deployed from the repository root: one deployment per benchmark
        # on the process pool `uvit`, whose runs start in the repository root.
        prefect_cli(["work-pool", "create", "uvit", "--type", "process"], env, tmp_path)
        prefect_cli(["deploy", "--all"], env, ROOT, timeout=300)
        took["deploy"] = time.monotonic() - t0
        with get_client(sync_client=True) as client:
            deployed = {d.name: d for d in client.read_deployments()}
        assert sorted(deployed) == sorted(["digits", "cifar10", "celeba64", "imagenet64", "imagenet256", "imagenet512",
                                           "mscoco256"])
        for name, d in deployed.items():
            assert (d.entrypoint, d.work_pool_name) == ("pipelines/flows.py:uvit_benchmark", "uvit")
            assert d.parameters == {"benchmark": name, "params_path": "params.yaml"}
            assert d.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}]

        # 1. The real digits pipeline through `prefect deployment run 'uvit/digits'` and a worker.
        params = {"root": str(root), "overrides": overrides}
        t1 = time.monotonic()
        first = run_deployment("uvit/digits", params, env, tmp_path)
        took["first run"] = time.monotonic() - t1
        state, tasks = flow_run_states(first, expect=len(REAL_STAGES))
        assert state == "Completed" and tasks == dict.fromkeys(REAL_STAGES, "Completed"), (state, tasks)

        metrics = json.loads((root / "runs/digits/score/metrics.json").read_text())
        for key in ("fid", "fid_floor", "fid_ceiling"):
            assert math.isfinite(metrics[key]) and metrics[key] > 0, key
        assert metrics["fid_floor"] < metrics["fid"] and 0.0 <= metrics["conditional_accuracy"] <= 1.0
        assert metrics["num_samples"] == 40
        summary = json.loads((root / "runs/digits/train/summary.json").read_text())
        assert (summary["steps"], summary["num_workers"]) == (20, 1) and math.isfinite(summary["final_loss"])
        assert (root / "reports/digits.md").is_file()
        with get_client(sync_client=True) as client:  # this flow run's table and report artifacts
            arts = {a.key: a for a in client.read_artifacts(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[UUID(first)])))}
        assert '"fid"' in arts["uvit-digits-metrics"].data and '"final_loss"' in arts["uvit-digits-metrics"].data
        assert arts["uvit-digits-report"].data.startswith("# ")

        # The run is on S3 under its content id; fetched back it is byte-identical to the outputs.
        published = json.loads((root / "runs/digits/publish.json").read_text())
        assert store.list_runs("digits") == [published["run_id"]]
        fetched = store.download_run("digits", published["run_id"], tmp_path / "fetched")
        assert (fetched / "checkpoints/ema/model.safetensors").read_bytes() == \
            (root / "runs/digits/train/ema/model.safetensors").read_bytes()
        assert (fetched / "score/metrics.json").read_bytes() == (root / "runs/digits/score/metrics.json").read_bytes()
        assert (fetched / published["ray_checkpoint"] / "optimizer.pt").is_file()

        # 2. Again, unchanged: every task is served from the cache (no stage function runs).
        t1 = time.monotonic()
        second = run_deployment("uvit/digits", params, env, tmp_path)
        took["cached run"] = time.monotonic() - t1
        state, tasks = flow_run_states(second, expect=len(REAL_STAGES))
        assert state == "Completed" and tasks == dict.fromkeys(REAL_STAGES, "Cached"), (state, tasks)
        assert store.list_runs("digits") == [published["run_id"]]
    print("real digits deployment:", ", ".join(f"{k} {v:.0f} s" for k, v in took.items()))
