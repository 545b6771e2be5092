"""benchmarks/sampling_throughput.py runs end to end on a tiny preset and writes its JSON; its two
guidance variants compute the same thing. No speed figure is asserted."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "sampling_throughput.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("sampling_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


@pytest.mark.parametrize("preset", ["digits_uvit_tiny", "mscoco256_uvit_s2"])
def test_batched_and_two_pass_guidance_agree(bench, preset):
    from uvit.models import UViT, get_preset

    config = get_preset(preset).config
    if preset != "digits_uvit_tiny":  # a small model with the preset's conditioning (77 CLIP tokens)
        from dataclasses import replace

        config = replace(config, img_size=4, embed_dim=32, depth=2, num_heads=2)
    torch.manual_seed(0)
    model = UViT(config).eval()
    cond, uncond = bench.conditions(config, 3, "cpu")
    x = torch.randn(3, config.in_chans, config.img_size, config.img_size)
    t = torch.full((3,), 500.0)
    with torch.no_grad():
        a = bench.guided_net(model, "cfg_batched", 0.7, cond, uncond)(x, t)
        b = bench.guided_net(model, "cfg_two_pass", 0.7, cond, uncond)(x, t)
        c = bench.guided_net(model, "no_cfg", 0.7, cond, uncond)(x, t)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(a, c)  # guidance changes eps
    assert bench.schedule_for(preset) == ("vpsde" if preset == "digits_uvit_tiny" else "discrete")


def test_main_writes_json(bench, tmp_path, capsys):
    out = tmp_path / "bench.json"
    result = bench.main(
        [
            "--presets",
            "digits_uvit_tiny,cifar10_uvit_s2",
            "--samplers",
            "dpm_solver_pp_2m",
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--iters",
            "1",
            "--warmup",
            "0",
            "--device",
            "cpu",
            "--json",
            str(out),
        ]
    )
    rows = result["results"]
    # cifar10 is unconditional: no guidance variants for it.
    assert [(r["preset"], r["variant"]) for r in rows] == [
        ("digits_uvit_tiny", "no_cfg"),
        ("digits_uvit_tiny", "cfg_batched"),
        ("digits_uvit_tiny", "cfg_two_pass"),
        ("cifar10_uvit_s2", "no_cfg"),
    ]
    assert all(r["error"] is None and r["images_per_s"] > 0 for r in rows)
    assert rows[0]["ratio_vs_no_cfg"] == 1.0 and rows[3]["ratio_vs_no_cfg"] == 1.0
    assert [r["forward_batch"] for r in rows[:3]] == [2, 4, 2] and [r["forwards"] for r in rows[:3]] == [2, 2, 4]
    written = json.loads(out.read_text())
    assert written["meta"]["batch_size"] == 2 and len(written["results"]) == 4
    assert "x no_cfg" in capsys.readouterr().out
