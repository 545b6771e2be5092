"""The stage table (uvit.stages.table) and the DVC files generated from it (uvit.stages.dvcfile)."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from uvit.config import ConfigError, load_benchmark, load_params, spread_runs, study_runs
from uvit.stages import dvcfile
from uvit.stages.table import STAGE_NAMES, STAGES, STUDY_STAGES, chain, external_path, get_stage, steps

ROOT = Path(__file__).resolve().parents[1]
UVIT = str(Path(sys.executable).parent / "uvit")


def params() -> dict:
    return copy.deepcopy(load_params(ROOT / "params.yaml"))


def test_committed_dvc_files_are_what_the_table_generates():
    for rel, text in dvcfile.render(ROOT / "params.yaml", ROOT).items():
        assert (ROOT / rel).read_text() == text, f"{rel} is stale: run `uvit pipeline write`"


def test_every_code_dependency_exists_and_every_stage_function_imports():
    for stage in (*STAGES, *STUDY_STAGES):
        for cfg_name in ("digits", "imagenet256", "mscoco256"):
            for path in stage.code_deps(load_benchmark(cfg_name, params())):
                assert (ROOT / path).exists(), f"{stage.name}: {path}"
        assert callable(stage.function())


def test_a_study_run_is_trained_sampled_and_scored():
    assert [s.name for s in chain(load_benchmark("digits/ablation/time-adaln-s1", params()))] == [
        "train",
        "sample",
        "score",
    ]


@pytest.mark.parametrize(
    ("benchmark", "expected"),
    [
        (
            "digits",
            ["data", "validate", "classifier", "train", "sample", "score", "samplers", "spread", "report", "publish"],
        ),
        ("cifar10", ["data", "validate", "train", "sample", "score", "report", "publish"]),
        ("imagenet256", ["data", "validate", "encode", "train", "sample", "score", "report", "publish"]),
    ],
)
def test_chain_of_a_benchmark(benchmark, expected):
    assert [s.name for s in chain(load_benchmark(benchmark, params()))] == expected


def _expanded(text: str) -> dict[str, dict]:
    """{stage address: body} of a DVC file, foreach groups expanded the way DVC does."""
    out = {}
    for name, body in yaml.safe_load(text)["stages"].items():
        if "foreach" not in body:
            out[name] = body
            continue
        items = body["foreach"]
        for key, item in items.items() if isinstance(items, dict) else ((i, i) for i in items):
            blob = yaml.safe_dump(body["do"])
            blob = blob.replace("${key}", key) if isinstance(items, dict) else blob.replace("${item}", key)
            for slot, value in item.items() if isinstance(item, dict) else ():
                blob = blob.replace(f"${{item.{slot}}}", value)
            out[f"{name}@{key}"] = yaml.safe_load(blob)
    return out


def test_addresses_name_the_generated_stages_with_the_external_files_as_deps():
    p = params()
    p["imagenet256"]["encode"]["vae"] = "/weights/other-vae.pth"
    files = dvcfile.render(p, ROOT)
    stages = {f: _expanded(t) for f, t in files.items()}
    where = dvcfile.addresses(p, ROOT)
    digits = load_benchmark("digits", p)
    assert set(where) == set(p) | set(study_runs(digits)) | set(spread_runs(digits))  # benchmarks and their runs
    for benchmark, addrs in where.items():
        for stage, addr in addrs.items():
            body = stages[addr.file][addr.name]
            assert body["cmd"] == f"uvit {stage} {benchmark}"
    enc = stages[dvcfile.PAPER_FILE][where["imagenet256"]["encode"].name]
    assert "/weights/other-vae.pth" in enc["deps"] and "data/imagenet256" in enc["deps"]
    enc512 = stages[dvcfile.PAPER_FILE][where["imagenet512"]["encode"].name]
    assert "models/autoencoder_kl.pth" in enc512["deps"] and "/weights/other-vae.pth" not in enc512["deps"]
    score = stages[dvcfile.PAPER_FILE][where["cifar10"]["score"].name]
    assert "models/weights-inception-2015-12-05-6726825d.pth" in score["deps"]
    text_train = stages[dvcfile.PAPER_FILE][where["mscoco256"]["train"].name]
    assert {"data/mscoco256-latents", "data/mscoco256-contexts"} <= set(text_train["deps"])
    text_sample = stages[dvcfile.PAPER_FILE][where["mscoco256"]["sample"].name]
    assert {"data/mscoco256-contexts", "models/autoencoder_kl.pth", "uvit/stages/sample.py"} <= set(text_sample["deps"])
    # Which keys each stage reads are DVC params: a VAE swap re-runs encode, sample (decoding) and train.
    assert "imagenet256.encode" in enc["params"][0]["params.yaml"]
    assert (
        "imagenet256.encode.vae"
        in stages[dvcfile.PAPER_FILE][where["imagenet256"]["sample"].name]["params"][0]["params.yaml"]
    )


def test_external_path_tells_files_from_hub_ids(tmp_path):
    assert external_path("models/autoencoder_kl.pth", tmp_path) == "models/autoencoder_kl.pth"
    assert external_path("s3://bucket/cifar.tar.gz", tmp_path) == "s3://bucket/cifar.tar.gz"
    assert external_path("/data/imagenet", tmp_path) == "/data/imagenet"
    assert external_path("openai/clip-vit-large-patch14", tmp_path) is None  # a hub id
    (tmp_path / "openai" / "clip-vit-large-patch14").mkdir(parents=True)
    assert external_path("openai/clip-vit-large-patch14", tmp_path) == "openai/clip-vit-large-patch14"  # a local copy
    assert external_path(None, tmp_path) is None


def test_only_the_table_lists_the_stages():
    """The CLI, Prefect and the DVC files all come from the table: no module spells the chain out."""
    chain_text = " -> ".join(STAGE_NAMES)
    for path in [*(ROOT / "uvit").rglob("*.py"), *(ROOT / "pipelines").rglob("*.py")]:
        text = path.read_text()
        if path.name == "table.py":
            continue
        listed = [n for n in STAGE_NAMES if f'"{n}":' in text or f"'{n}':" in text]
        assert len(listed) < 4, f"{path.relative_to(ROOT)} lists stages {listed}: derive them from the table"
        assert chain_text not in text


def _run(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [UVIT, *args], cwd=cwd, capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})}
    )


def test_pipeline_cli_write_check_and_the_stale_guard(tmp_path):
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    assert _run(["pipeline", "check"], tmp_path).returncode == 1  # nothing generated yet
    assert _run(["pipeline", "write"], tmp_path).returncode == 0
    assert _run(["pipeline", "check"], tmp_path).returncode == 0
    assert (tmp_path / "dvc.yaml").read_text() == (ROOT / "dvc.yaml").read_text()
    shown = _run(["pipeline", "show", "mscoco256"], tmp_path).stdout.split()
    assert "paper/dvc.yaml:encode-text@mscoco256" in shown and "paper/dvc.yaml:publish@mscoco256" in shown
    # A parameter that names a file changes without regenerating: a stage run by DVC refuses.
    p = yaml.safe_load((tmp_path / "params.yaml").read_text())
    p["imagenet256"]["encode"]["vae"] = "models/another-vae.pth"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p))
    proc = _run(["validate", "digits"], tmp_path, env={"DVC_STAGE": "validate", "DVC_ROOT": str(tmp_path)})
    assert proc.returncode == 2 and "uvit pipeline write" in proc.stderr and "Traceback" not in proc.stderr


def test_the_seed_spread_runs_before_its_stage_in_the_default_chain():
    """digits' spread runs (train.seed 1 and 2) are its own block but for the seed; `steps` puts
    their train, sample and score before the spread stage, and dvc.yaml holds them as foreach groups
    whose stages feed the spread stage, which feeds the report."""
    p = params()
    cfg = load_benchmark("digits", p)
    assert spread_runs(cfg) == ["digits/spread/s1", "digits/spread/s2"]
    s1 = load_benchmark("digits/spread/s1", p)
    assert s1.train.seed == 1 and s1.spread is None and s1.ablation is None and s1.study == "spread"
    assert s1.train.model_copy(update={"seed": cfg.train.seed}) == cfg.train and s1.model == cfg.model
    order = [(run, stage.name) for run, stage in steps(cfg, p)]
    i = order.index(("digits", "spread"))
    assert order[i - 6 : i] == [
        (f"digits/spread/s{seed}", name) for seed in (1, 2) for name in ("train", "sample", "score")
    ]
    assert order[: i - 6] == [("digits", s.name) for s in chain(cfg)[: chain(cfg).index(get_stage("spread"))]]
    root = _expanded(dvcfile.render(p, ROOT)[dvcfile.ROOT_FILE])
    assert root["train-spread@s2"]["cmd"] == "uvit train digits/spread/s2"
    assert "runs/digits/spread/s2/train/ema" in root["sample-spread@s2"]["deps"]
    assert "runs/digits/spread/s2/score/metrics.json" in root["spread"]["deps"]
    assert "runs/digits/spread/summary.json" in root["report"]["deps"]
    assert "digits.spread" in root["spread"]["params"]


def test_a_seed_spread_is_refused_where_it_cannot_run():
    p = params()
    p["digits"]["spread"] = {"seeds": [p["digits"]["train"]["seed"], 5]}
    with pytest.raises(ConfigError, match=r"digits.spread.seeds: 0 is digits.train.seed"):
        load_benchmark("digits", p)
    p["digits"]["spread"] = {"seeds": [3, 3]}
    with pytest.raises(ConfigError, match="repeated seed"):
        load_benchmark("digits", p)
    p["digits"]["spread"] = {"seeds": [3]}
    with pytest.raises(ConfigError, match=r"no run 's1'; runs: s3"):
        load_benchmark("digits/spread/s1", p)
    p["cifar10"]["spread"] = {"seeds": [1]}  # paper/dvc.yaml has no seed-spread chains
    with pytest.raises(ConfigError, match=r"cifar10.spread: only the default benchmark"):
        dvcfile.render(p, ROOT)
    del p["cifar10"]["spread"], p["digits"]["spread"]
    assert "train-spread" not in yaml.safe_load(dvcfile.render(p, ROOT)[dvcfile.ROOT_FILE])["stages"]
    assert "spread" not in [s.name for s in chain(load_benchmark("digits", p))]


def test_uvit_run_walks_the_spread_runs_in_order(monkeypatch):
    """`uvit run digits` calls each stage function for the run it belongs to: the spread runs'
    stages get the spread run's config (train.seed 1, then 2) and its paths."""
    from typer.testing import CliRunner

    import uvit.cli as cli

    calls = []
    monkeypatch.setattr(cli, "_stage", lambda name, run, params, root: calls.append((name, run)))
    result = CliRunner().invoke(cli.app, ["run", "digits", "--params", str(ROOT / "params.yaml")])
    assert result.exit_code == 0, result.output
    p = params()
    assert calls == [(run, stage.name)[::-1] for run, stage in steps(load_benchmark("digits", p), p)]
    assert ("train", "digits/spread/s2") in calls and calls.index(("score", "digits/spread/s2")) + 1 == calls.index(
        ("spread", "digits")
    )
    bad = CliRunner().invoke(cli.app, ["run", "digits/spread/s9", "--params", str(ROOT / "params.yaml")])
    assert bad.exit_code == 2 and "no run 's9'; runs: s1, s2" in bad.output
