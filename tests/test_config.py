"""Bad parameters are rejected before any work starts, with the key named."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from uvit.config import BENCHMARKS, ConfigError, load_benchmark, load_params

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


@pytest.fixture
def params() -> dict:
    return copy.deepcopy(load_params(PARAMS))


def test_every_benchmark_block_is_valid(params) -> None:
    assert set(params) == set(BENCHMARKS)
    for name in BENCHMARKS:
        cfg = load_benchmark(name, params)
        assert cfg.name == name and cfg.train.steps > 0


def test_paper_recipes_match_the_official_configs(params) -> None:
    c = load_benchmark("imagenet256", params)
    assert (c.model.preset, c.diffusion.schedule, c.sample.sampler, c.sample.steps, c.sample.guidance_scale) == (
        "imagenet256_uvit_h2",
        "discrete",
        "dpm_solver_pp",
        50,
        0.4,
    )
    assert c.uvit_config().num_classes == 1001
    coco = load_benchmark("mscoco256", params)
    assert coco.train.betas == (0.9, 0.9) and coco.train.batch_size == 256 and coco.sample.guidance_scale == 1.0
    cifar = load_benchmark("cifar10", params)
    assert (cifar.sample.sampler, cifar.sample.steps, cifar.train.betas) == ("euler_maruyama", 1000, (0.99, 0.999))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda p: p["digits"]["train"].update(steps=-5), "digits.train.steps: Input should be greater than 0"),
        (lambda p: p["digits"]["train"].update(lr="fast"), "digits.train.lr"),
        (lambda p: p["digits"]["model"].update(preset="uvit_xxl"), "digits.model.preset"),
        (lambda p: p["digits"]["train"].update(stepz=10), "digits.train.stepz: Extra inputs are not permitted"),
        (lambda p: p["digits"]["sample"].update(sampler="ddim"), "digits.sample.sampler"),
        (lambda p: p["digits"]["diffusion"].update(p_uncond=1.5), "digits.diffusion.p_uncond"),
        (lambda p: p["digits"]["model"].update(overrides={"depth": 7}), "digits.model.overrides"),
        (lambda p: p["digits"].pop("train"), "digits.train: Field required"),
        (
            lambda p: p["digits"].update(artifacts={"url": "ftp://host/x"}),
            "digits.artifacts.url: Value error, unsupported scheme",
        ),
        (
            lambda p: p["digits"].update(artifacts={"url": "s3://KEY:SECRET@bucket/x"}),
            "digits.artifacts.url: Value error, credentials",
        ),
        (lambda p: p["digits"].update(artifacts={"url": "s3://b"}), "digits.artifacts.url: Value error"),
        (
            lambda p: p["digits"].update(artifacts={"url": "s3://uvit/a", "endpoint_url": "127.0.0.1:9000"}),
            "digits.artifacts.endpoint_url",
        ),
        (
            lambda p: p["digits"].update(artifacts={"url": "artifacts", "secret_key": "x"}),
            "digits.artifacts.secret_key: Extra inputs are not permitted",
        ),
        # The class count is a fact of the data, in one place.
        (lambda p: p["digits"]["validate"].update(num_classes=10), "move it to digits.data.num_classes"),
        (lambda p: p["digits"]["data"].update(num_classes=0), "digits.data.num_classes: 0, but digits_uvit_tiny"),
        (lambda p: p["digits"]["data"].update(num_classes=12), "digits.data.num_classes: 12"),
    ],
)
def test_bad_parameters_name_the_key(params, edit, message) -> None:
    edit(params)
    with pytest.raises(ConfigError) as err:
        load_benchmark("digits", params)
    assert message in str(err.value)


def test_unknown_benchmark(params) -> None:
    with pytest.raises(ConfigError, match="unknown benchmark 'mnist'"):
        load_benchmark("mnist", params)


def test_cli_rejects_bad_params_before_any_work(tmp_path, params) -> None:
    from typer.testing import CliRunner

    from uvit.cli import app

    params["digits"]["train"]["steps"] = -5
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    result = CliRunner().invoke(app, ["data", "digits", "--params", str(path), "--root", str(tmp_path)])
    assert result.exit_code == 2
    assert "digits.train.steps" in result.output
    assert not (tmp_path / "data").exists()  # nothing was written


def test_models_command_lists_exact_counts() -> None:
    from typer.testing import CliRunner

    from uvit.cli import app

    result = CliRunner().invoke(app, ["models"])
    assert result.exit_code == 0
    assert "500,832,016" in result.output and "133.20" in result.output and "58,345,636" in result.output


def test_flow_command_rejects_bad_overrides_before_any_work(tmp_path, capsys) -> None:
    """`python -m pipelines.flows` checks params + --set overrides before Prefect starts a run."""
    import shutil

    from pipelines.flows import main

    shutil.copy2(PARAMS, tmp_path / "params.yaml")
    for sets, named in [
        (["digits.train.steps=-5"], "digits.train.steps: Input should be greater than 0"),
        (["digits.train.steps=many"], "digits.train.steps"),
        (["digits.model.preset=uvit_xxl"], "digits.model.preset"),
        (["digits.artifacts.url=ftp://x"], "digits.artifacts.url"),
    ]:
        argv = ["digits", "--root", str(tmp_path), *[a for s in sets for a in ("--set", s)]]
        assert main(argv) == 2
        assert named in capsys.readouterr().err
    assert main(["mnist", "--root", str(tmp_path)]) == 2
    assert "unknown benchmark 'mnist'" in capsys.readouterr().err
    assert main(["digits/ablation/default-s0", "--root", str(tmp_path)]) == 2
    assert "dvc repro studies/dvc.yaml" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # nothing was written


def test_few_step_sampler_options_reach_the_samplers():
    from uvit.diffusion import count_nfe

    params = copy.deepcopy(load_params(PARAMS))
    params["digits"]["sample"].update(sampler="unipc_bh2", steps=10, order=3, skip_type="logSNR", denoise_final=True)
    s = load_benchmark("digits", params).sample
    assert s.sampler_kwargs() == {"skip_type": "logSNR", "order": 3, "denoise_final": True}
    assert count_nfe(s.sampler, s.steps, **s.sampler_kwargs()) == 11  # 10 steps + the denoising step
    assert load_benchmark("cifar10", load_params(PARAMS)).sample.sampler_kwargs() == {}  # the paper's protocol
    assert load_benchmark("digits", load_params(PARAMS)).sample.sampler_kwargs() == {"skip_type": "time_quadratic"}
    params["digits"]["sample"]["sampler"] = "dpm_solver_pp_2m"  # a multistep solver has no order to set
    with pytest.raises(ConfigError, match="digits.sample.order"):
        load_benchmark("digits", params)


def test_the_dataset_facts_live_in_the_data_section(params) -> None:
    digits, coco = load_benchmark("digits", params), load_benchmark("mscoco256", params)
    assert digits.data.num_classes == 10 and digits.uvit_config().num_classes == 11  # + guidance's null class
    assert (digits.text_to_image, coco.text_to_image) == (False, True) and coco.data.num_classes == 0
    # An unconditional model may train on labelled data (CIFAR-10's recipe ignores the labels).
    cifar = load_benchmark("cifar10", params)
    assert cifar.data.num_classes == 10 and cifar.uvit_config().num_classes == -1
    bad = copy.deepcopy(params)
    bad["mscoco256"]["model"] = {"preset": "imagenet256_uvit_l2", "overrides": {"num_classes": -1}}
    with pytest.raises(ConfigError, match="is not a text-to-image model, and the coco source has captions"):
        load_benchmark("mscoco256", bad)
