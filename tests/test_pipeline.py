"""The main job end to end: `dvc repro` of the digits benchmark on a cut-down configuration.

Runs the real stack (DVC, great-expectations, Ray Train, torch-fidelity, pandas report) in a
copy of the project with every outbound connection refused except loopback (the README's "no
downloads"), then checks the metrics against a direct recomputation from the written samples and
classifier, that a second `dvc repro` does nothing, and that corrupted data stops the pipeline
with a clear error.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow

IP = shutil.which("ip") or next((p for p in ("/usr/sbin/ip", "/sbin/ip") if Path(p).exists()), None)
# Imported by every Python process when no network namespace can be made: connect() or sendto()
# to anything but loopback (or a Unix socket) fails before a packet leaves. It cannot see lookups
# made inside libc (getaddrinfo), which is why the namespace is preferred.
SOCKET_GUARD = textwrap.dedent("""\
    import ipaddress, socket

    def _loopback(address):
        host = address[0] if isinstance(address, tuple) else None
        if host is None:
            return True  # AF_UNIX and friends
        try:
            return ipaddress.ip_address(host.split("%")[0]).is_loopback
        except ValueError:
            return host == "localhost"

    def _guard(method):
        def guarded(self, address, *args):
            if self.family in (socket.AF_INET, socket.AF_INET6) and not _loopback(address):
                raise OSError(101, f"network access refused by the test guard: {address}")
            return method(self, address, *args)
        return guarded

    def _guard_sendto(method):
        def guarded(self, data, *args):
            if self.family in (socket.AF_INET, socket.AF_INET6) and not _loopback(args[-1]):
                raise OSError(101, f"network access refused by the test guard: {args[-1]}")
            return method(self, data, *args)
        return guarded

    socket.socket.connect = _guard(socket.socket.connect)
    socket.socket.connect_ex = _guard(socket.socket.connect_ex)
    socket.socket.sendto = _guard_sendto(socket.socket.sendto)
""")


def network_guard(scratch: str) -> tuple[str, tuple[str, ...], tuple[tuple[str, str], ...]]:
    """(kind, command prefix, extra environment) that runs a command with outbound network refused
    except loopback. "netns": a fresh network namespace holding only `lo` (as root, or through an
    unprivileged user namespace); else "socket-guard": a sitecustomize on PYTHONPATH (`scratch`)."""
    unshare = shutil.which("unshare")
    if sys.platform.startswith("linux") and IP and unshare:
        for flags in (["--net"], ["--user", "--map-root-user", "--net"]):
            prefix = (unshare, *flags, "sh", "-c", f'{IP} link set lo up && exec "$@"', "sh")
            if subprocess.run([*prefix, "true"], capture_output=True).returncode == 0:
                return "netns", prefix, ()
    Path(scratch).mkdir(parents=True, exist_ok=True)
    (Path(scratch) / "sitecustomize.py").write_text(SOCKET_GUARD)
    path = os.pathsep.join(p for p in (scratch, os.environ.get("PYTHONPATH")) if p)
    return "socket-guard", (), (("PYTHONPATH", path),)


@pytest.fixture(scope="module")
def guard(tmp_path_factory) -> tuple[str, tuple[str, ...], tuple[tuple[str, str], ...]]:
    return network_guard(str(tmp_path_factory.mktemp("socket-guard")))


# The real stack on a cut-down run. Sample quality needs the full 2,000 steps (the committed
# runs/digits/score/metrics.json holds that run's figures); this checks the plumbing and ranges.
# The digits block's sampler (and time grid), which the cut-down run keeps at fewer steps.
DIGITS_SAMPLE = yaml.safe_load((ROOT / "params.yaml").read_text())["digits"]["sample"]
CUT_DOWN = {
    "train": {"steps": 60, "checkpoint_every": 30, "log_every": 5},
    "sample": {"num_samples": 100, "batch_size": 100, "steps": 10},
    "score": {"classifier_epochs": 5},
    "spread": {"seeds": [1]},  # one more training seed: the page's spread over two runs
    # The reference at the sample stage's own setting: its seed-0 point must reproduce the score stage.
    "sampler_study": {
        "reference": {"sampler": DIGITS_SAMPLE["sampler"], "steps": 10, "skip_type": DIGITS_SAMPLE.get("skip_type")},
        "samplers": ["unipc_bh2"],
        "skip_types": ["logSNR"],
        "nfe": [4],
        "seeds": [0, 1],
    },
}


def run(cmd: list[str], cwd: Path, check: bool = True, guard=None) -> subprocess.CompletedProcess:
    """Run `cmd` with the venv first on PATH; inside the network guard when one is given."""
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    if guard is not None:
        _, prefix, extra = guard
        cmd, env = [*prefix, *cmd], {**env, **dict(extra)}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    return proc


@pytest.fixture(scope="module")
def project(tmp_path_factory, make_project) -> Path:
    """A fresh copy of the project's pipeline files (DVC files regenerated for the cut-down
    parameters) in its own git + DVC repository."""
    return make_project(tmp_path_factory.mktemp("project") / "project", {"digits": CUT_DOWN})


@pytest.fixture(scope="module")
def reproduced(project: Path, guard) -> Path:
    run(["dvc", "repro"], project, guard=guard)
    return project


PROBE = textwrap.dedent("""\
    import json, socket, threading, time
    server = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=lambda: server.accept()[0].sendall(b"ok"), daemon=True).start()
    with socket.create_connection(server.getsockname(), timeout=5) as c:
        loopback = c.recv(2).decode()
    t0, error = time.perf_counter(), None
    try:
        socket.create_connection(("192.0.2.1", 80), timeout=5).close()  # TEST-NET-1: never routed
    except OSError as e:
        error = f"{type(e).__name__}: {e}"
    print(json.dumps({"loopback": loopback, "error": error, "seconds": time.perf_counter() - t0}))
""")


def test_the_network_guard_refuses_all_but_loopback(guard, tmp_path) -> None:
    """Inside the guard the pipeline runs in, loopback works and any other address fails at once."""
    kind = guard[0]
    print(f"network guard: {kind}")
    assert kind in ("netns", "socket-guard")
    if kind == "netns":
        ip_out = run([IP, "-o", "link"], tmp_path, guard=guard).stdout.splitlines()
        assert len(ip_out) == 1 and ": lo:" in ip_out[0]  # the namespace holds loopback only
    result = json.loads(run([sys.executable, "-c", PROBE], tmp_path, guard=guard).stdout)
    assert result["loopback"] == "ok"
    assert result["error"] is not None and result["seconds"] < 2, result
    assert (
        ("unreachable" in result["error"].lower())
        if kind == "netns"
        else ("refused by the test guard" in result["error"])
    )


def _frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance of two feature sets, tr sqrt(S_a S_b) from symmetric eigenvalues."""
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(sa)
    root = (v * np.sqrt(w.clip(0))) @ v.T
    covmean = np.sqrt(np.linalg.eigvalsh(root @ sb @ root).clip(0)).sum()
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(sa) + np.trace(sb) - 2 * covmean)


def test_repro_metrics_equal_a_direct_recomputation(reproduced: Path) -> None:
    """FID, its floor and the conditional accuracy recomputed here from the written samples, data
    splits and classifier (features and logits called directly, numpy for the rest)."""
    import torch

    from uvit.data.shards import load_split_arrays
    from uvit.evaluate.classifier import load_classifier

    metrics = json.loads((reproduced / "runs/digits/score/metrics.json").read_text())
    assert metrics["num_samples"] == 100 and metrics["classifier_test_accuracy"] > 0.8
    with np.load(reproduced / "runs/digits/samples/samples.npz") as f:
        samples, labels = f["arr_0"].transpose(0, 3, 1, 2), f["labels"]  # stored NHWC uint8
    train_x, _ = load_split_arrays(reproduced / "data/digits/train")
    test_x, _ = load_split_arrays(reproduced / "data/digits/test")
    clf = load_classifier(reproduced / "runs/digits/classifier").eval()

    def features(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return clf.features(torch.from_numpy(x).float() / 127.5 - 1).double().numpy()

    f_train = features(train_x)
    fid, floor = _frechet(features(samples), f_train), _frechet(features(test_x[:100]), f_train)
    assert metrics["fid"] == pytest.approx(fid, rel=1e-3) and metrics["fid_floor"] == pytest.approx(floor, rel=1e-3)
    assert metrics["fid_over_floor"] == pytest.approx(fid / floor, rel=2e-3)
    with torch.no_grad():
        predicted = clf(torch.from_numpy(samples).float() / 127.5 - 1).argmax(1).numpy()
    assert metrics["conditional_accuracy"] == pytest.approx(float((predicted == labels).mean()), abs=1e-9)
    # The untrained model's samples are further from the data than the trained model's.
    assert metrics["fid_floor"] < metrics["fid"] < metrics["fid_ceiling"] and math.isfinite(metrics["fid_ceiling"])


def test_repro_trains_through_ray_and_logs_every_step(reproduced: Path) -> None:
    summary = json.loads((reproduced / "runs/digits/train/summary.json").read_text())
    assert summary["steps"] == 60 and summary["images_seen"] == 60 * 128
    assert summary["params"] == 731_406
    rows = (reproduced / "runs/digits/train/metrics.csv").read_text().strip().splitlines()
    assert rows[0] == "step,loss,lr,grad_norm,images_per_s,elapsed_s,peak_mem_gib"  # peak GPU memory: empty on CPU
    assert [int(r.split(",")[0]) for r in rows[1:]] == list(range(5, 61, 5))
    checkpoints = list((reproduced / "runs/digits/ray").glob("*/*/checkpoint_*/state.json"))  # <config-hash>/<run>/
    assert len(checkpoints) == 2  # every 30 steps, kept by Ray's CheckpointConfig


def test_repro_writes_the_report(reproduced: Path) -> None:
    page = (reproduced / "reports/digits.md").read_text()
    metrics = json.loads((reproduced / "runs/digits/score/metrics.json").read_text())
    assert f"{metrics['fid']:.2f}" in page
    assert DIGITS_SAMPLE["sampler"] in page and "731,406" in page
    for png in ("reports/digits/samples.png", "reports/digits/loss.png"):
        assert (reproduced / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    index = (reproduced / "reports/README.md").read_text()
    assert "digits" in index and "not run" in index  # the paper benchmarks have not been run


def test_repro_runs_the_seed_spread_and_shows_it(reproduced: Path) -> None:
    """The spread run is the cut-down run but for train.seed: trained with another seed (its loss
    curve differs), scored by the same stages, and the spread stage's mean and std over the two runs
    are what numpy says; the page shows them."""
    own, other = reproduced / "runs/digits", reproduced / "runs/digits/spread/s1"
    fids = [json.loads((r / "score/metrics.json").read_text())["fid"] for r in (own, other)]
    summary = json.loads((own / "spread/summary.json").read_text())
    assert summary["seeds"] == [0, 1] and [r["fid"] for r in summary["runs"]] == pytest.approx(fids)
    assert summary["fid"]["mean"] == pytest.approx(np.mean(fids))
    assert summary["fid"]["std"] == pytest.approx(np.std(fids, ddof=1))
    losses = [(r / "train/metrics.csv").read_text().splitlines()[1:] for r in (own, other)]
    assert len(losses[0]) == len(losses[1]) and losses[0] != losses[1]  # same steps, another seed
    s1 = json.loads((other / "train/summary.json").read_text())
    assert s1["steps"] == 60 and s1["params"] == json.loads((own / "train/summary.json").read_text())["params"]
    page = (reproduced / "reports/digits.md").read_text()
    assert f"{summary['fid']['mean']:.2f} ± {summary['fid']['std']:.2f}" in page
    assert "`digits/spread/s1`" in page


def test_sampler_study_reproduces_the_score_stage_at_its_setting(reproduced: Path) -> None:
    """The study's reference point at the sample stage's setting and seed draws the same samples,
    so its FID and conditional accuracy are the score stage's; the page and summary hold its rows."""
    import pandas as pd

    rows = pd.read_csv(reproduced / "runs/digits/samplers/results.csv")
    assert len(rows) == (1 + 1) * 2  # (reference + 1 sampler x 1 grid x 1 NFE) x 2 seeds
    metrics = json.loads((reproduced / "runs/digits/score/metrics.json").read_text())
    ref0 = rows[rows["reference"] & (rows["seed"] == 0)].iloc[0]
    assert ref0["fid"] == pytest.approx(metrics["fid"], rel=1e-6)
    assert ref0["conditional_accuracy"] == pytest.approx(metrics["conditional_accuracy"], abs=1e-9)
    assert rows.loc[~rows["reference"], "nfe"].tolist() == [4, 4]
    summary = json.loads((reproduced / "runs/digits/samplers/summary.json").read_text())
    assert summary["reference"]["fid_mean"] == pytest.approx(rows.loc[rows["reference"], "fid"].mean())
    page = (reproduced / "reports/samplers.md").read_text()
    assert f"FID {summary['reference']['fid_mean']:.2f}" in page
    assert (reproduced / "reports/samplers/fid_vs_nfe.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dvc_lists_the_metrics(reproduced: Path) -> None:
    shown = run(["dvc", "metrics", "show", "--json"], reproduced).stdout
    assert "fid_over_floor" in shown and "conditional_accuracy" in shown


def test_second_repro_does_nothing(reproduced: Path, guard) -> None:
    out = run(["dvc", "repro"], reproduced, guard=guard).stdout
    assert "Running stage" not in out
    assert "up to date" in out


def _checkpoint_steps(project: Path) -> set[int]:
    """Steps of every Ray checkpoint under the workspace's runs/digits/ray/."""
    return {
        json.loads(p.read_text())["step"] for p in (project / "runs/digits/ray").glob("*/*/checkpoint_*/state.json")
    }


def test_exp_run_continues_training(reproduced: Path, guard) -> None:
    """`dvc exp run --temp -S digits.train.steps=N` (a copy under .dvc/tmp/exps/, the way a queued
    experiment runs) resumes the workspace's run and writes its checkpoints to the workspace's
    runs/digits/ray/. (Raising steps in the workspace itself is a plain `dvc repro` of the train
    stage; tests/test_ray_train.py checks that continuing equals an uninterrupted run.) The
    experiment targets the train stage: what runs after it is the same `dvc repro` as above."""
    steps = CUT_DOWN["train"]["steps"]
    out = run(
        ["dvc", "exp", "run", "--temp", "-S", f"digits.train.steps={steps + 10}", "train"], reproduced, guard=guard
    ).stdout
    assert re.search(rf"resuming from \S+ \(step {steps}\)", out), out[-3000:]
    assert set(re.findall(r"Running stage '([^']+)'", out)) == {"train"}, out[-3000:]
    assert steps + 10 in _checkpoint_steps(reproduced)  # written to the workspace's checkpoints


def test_corrupted_shard_stops_the_pipeline(reproduced: Path) -> None:
    shard = reproduced / "data/digits/train/images-00000.npy"
    original = shard.read_bytes()
    try:
        corrupted = bytearray(original)
        corrupted[-5] ^= 0xFF
        shard.write_bytes(bytes(corrupted))
        proc = run(["uvit", "validate", "digits"], reproduced, check=False)
        assert proc.returncode != 0
        text = proc.stdout + proc.stderr
        assert "images-00000.npy" in text and "sha256" in text
    finally:
        shard.write_bytes(original)


def test_manifest_checksum_mismatch_stops_the_pipeline(reproduced: Path) -> None:
    manifest = reproduced / "data/digits/test/manifest.json"
    original = manifest.read_text()
    try:
        data = json.loads(original)
        data["shards"][0]["files"]["labels"]["sha256"] = "0" * 64
        manifest.write_text(json.dumps(data))
        proc = run(["uvit", "validate", "digits"], reproduced, check=False)
        assert proc.returncode != 0
        assert "labels-00000.npy" in proc.stdout + proc.stderr
    finally:
        manifest.write_text(original)


# A study of two variants (the default and no long skip) over two seeds, a few steps each.
TINY_STUDY = {
    "train": {"steps": 6, "checkpoint_every": 6, "log_every": 3, "fid_every": 3, "fid_samples": 40, "num_workers": 1},
    "seeds": [0, 1],
    "default_seeds": [0, 1],
    "groups": {"skip": ["none"]},
}


def test_the_design_study_runs_through_dvc_and_its_page_holds_every_run(reproduced: Path, guard) -> None:
    """`dvc repro studies/dvc.yaml` trains, samples and scores every run of the study (on the
    workspace's data and classifier), and the page's cells are the runs' own scores; a second
    repro runs nothing."""
    import pandas as pd

    params = yaml.safe_load((reproduced / "params.yaml").read_text())
    params["digits"]["ablation"] = TINY_STUDY
    (reproduced / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["uvit", "pipeline", "write"], reproduced)
    out = run(["dvc", "repro", "studies/dvc.yaml"], reproduced, guard=guard).stdout
    runs = ["default-s0", "default-s1", "skip-none-s0", "skip-none-s1"]
    expected = {f"studies/dvc.yaml:{stage}@{r}" for stage in ("train", "sample", "score") for r in runs}
    assert set(re.findall(r"Running stage '([^']+)'", out)) == expected | {"studies/dvc.yaml:ablation"}, out[-3000:]

    results = pd.read_csv(reproduced / "runs/digits/ablation/results.csv")
    assert results["run"].tolist() == runs
    for r in results.itertuples():
        metrics = json.loads((reproduced / f"runs/digits/ablation/{r.run}/score/metrics.json").read_text())
        assert r.fid == metrics["fid"] and r.accuracy == metrics["conditional_accuracy"]
        assert (reproduced / f"runs/digits/ablation/{r.run}/train/fid.csv").read_text().splitlines()[0] == "step,fid"
        assert pd.read_csv(reproduced / f"runs/digits/ablation/{r.run}/train/fid.csv")["step"].tolist() == [3, 6]
    assert results.loc[results["variant"] == "skip-none", "params"].nunique() == 1
    assert (
        results.loc[results["variant"] == "skip-none", "params"].iloc[0]
        < results.loc[results["variant"] == "default", "params"].iloc[0]
    )  # no skip: no skip Linear layers
    page = (reproduced / "reports/ablations.md").read_text()
    for variant, label in (("default", "concat_linear (default)"), ("skip-none", "none")):
        fids = results.loc[results["variant"] == variant, "fid"]
        assert f"| {label} |" in page and f"{fids.mean():.2f} ± {fids.std():.2f}" in page, page
    summary = json.loads((reproduced / "runs/digits/ablation/summary.json").read_text())
    assert summary["runs"] == 4 and summary["groups"]["skip"] in ("agrees", "disagrees", "within the seed spread")
    assert (reproduced / "reports/ablations/skip.png").is_file()
    again = run(["dvc", "repro", "studies/dvc.yaml"], reproduced, guard=guard).stdout
    assert "Running stage" not in again, again[-2000:]


def test_committed_digits_run_meets_the_bars() -> None:
    """The full run's figures, as committed by `dvc repro` (tests/test_committed_results.py ties the
    file to dvc.lock's hash): conditional accuracy >= 0.90 and FID <= 4x the real-vs-real floor
    (issue #3's bars)."""
    committed = json.loads((ROOT / "runs/digits/score/metrics.json").read_text())
    assert committed["conditional_accuracy"] >= 0.90
    assert committed["fid"] <= 4 * committed["fid_floor"]
    summary = json.loads((ROOT / "runs/digits/train/summary.json").read_text())
    params = yaml.safe_load((ROOT / "params.yaml").read_text())["digits"]
    assert summary["steps"] == params["train"]["steps"]  # the figures belong to the current params
