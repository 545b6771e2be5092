"""benchmarks/model_throughput.py runs end to end on a tiny preset and writes its JSON.

No speed figure is asserted: the structure of the results (variants present) and their arithmetic
(images/s from the timed loop, every ratio recomputed from the rows' own images/s against the
eager fp32 row). Compiled variants are left out (too slow here).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from uvit.models import get_preset

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "model_throughput.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("model_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_variant_names(bench):
    v = bench.parse_variant("compiled_bf16+fused+ckpt")
    assert (v.compiled, v.amp, v.checkpoint, v.fused_adamw, v.tf32) == (True, "bf16", True, True, False)
    assert v.amp_dtype is torch.bfloat16 and bench.parse_variant("eager_fp32").amp_dtype is None
    for bad in ("eager_fp64", "eager_fp32+turbo", "eager_fp32+ckpt+nockpt"):
        with pytest.raises(ValueError):
            bench.parse_variant(bad)

    assert bench.default_variants("cpu") == ["eager_fp32", "compiled_fp32"]
    assert bench.default_variants("cpu", compile=False) == ["eager_fp32"]
    assert bench.default_variants("cuda") == ["eager_fp32", "compiled_fp32", "eager_bf16", "compiled_bf16"]

    # The baseline always leads; flags add the flipped checkpointing, fused AdamW, TF32 (fp32 only).
    names = bench.expand_variants(
        ["eager_bf16", "eager_fp32", "compiled_fp32"],
        preset_checkpoint=False,
        checkpointing=True,
        fused_adamw=True,
        tf32=True,
        compile=False,
    )
    assert names == [
        "eager_fp32",
        "eager_bf16",
        "eager_bf16+ckpt",
        "eager_bf16+fused",
        "eager_fp32+ckpt",
        "eager_fp32+fused",
        "eager_fp32+tf32",
    ]
    assert "eager_fp32+nockpt" in bench.expand_variants(["eager_fp32"], preset_checkpoint=True, checkpointing=True)


def test_make_inputs_shapes(bench):
    c = get_preset("digits_uvit_tiny").config
    inputs, target = bench.make_inputs(c, 3, "cpu")
    assert inputs["x"].shape == target.shape == (3, c.in_chans, c.img_size, c.img_size)
    assert inputs["y"].shape == (3,) and int(inputs["y"].max()) < c.num_classes
    assert bool(((inputs["t"] >= 0) & (inputs["t"] < 999)).all()) and "context" not in inputs

    t2i = get_preset("mscoco256_uvit_s2").config
    inputs, _ = bench.make_inputs(t2i, 2, "cpu")
    assert inputs["context"].shape == (2, 77, 768) and "y" not in inputs


def test_peak_flops_and_mfu(bench):
    assert bench.peak_flops_for("NVIDIA H100 80GB HBM3")[:2] == (989e12, 494e12)
    assert bench.peak_flops_for("NVIDIA H200")[:2] == (989e12, 494e12)
    assert bench.peak_flops_for("NVIDIA A100-SXM4-80GB")[0] == 312e12
    assert bench.peak_flops_for("Some GPU")[:2] == (None, None)
    assert bench.peak_flops_for("NVIDIA H100 80GB HBM3", "100")[:2] == (100e12, None)

    row = {"amp": "bf16", "images_per_s": 1000.0}
    bench.add_mfu(row, 1e9, peak_bf16=1e13, peak_tf32=None)
    assert row["mfu"] == pytest.approx(0.1) and row["mfu_peak"] == "bf16"
    row = {"amp": "fp32", "images_per_s": 1000.0}
    bench.add_mfu(row, 1e9, peak_bf16=1e13, peak_tf32=None)
    assert row["mfu"] is None


def test_time_variant(bench):
    c = get_preset("digits_uvit_tiny").config
    row = bench.time_variant(c, "eager_fp32+ckpt", batch_size=2, iters=2, warmup=0, device="cpu")
    assert row["variant"] == "eager_fp32+ckpt" and row["checkpoint"] is True and row["compile_s"] is None
    assert row["images_per_s"] > 0 and row["step_ms_median"] > 0 and row["peak_mem_bytes"] >= 0
    assert row["params"] == 731_406 and row["iters"] == 2
    # images/s is over the whole timed loop; the loop holds every timed step.
    assert row["images_per_s"] == pytest.approx(2 * 2 / row["total_s"], rel=1e-12)
    assert row["step_ms_min"] <= row["step_ms_median"] and 2 * row["step_ms_min"] <= row["total_s"] * 1e3


def test_main_writes_json(bench, tmp_path, capsys):
    out = tmp_path / "bench.json"
    results = bench.main(
        [
            "--preset",
            "digits_uvit_tiny",
            "--batch-size",
            "2",
            "--iters",
            "2",
            "--warmup",
            "1",
            "--device",
            "cpu",
            "--no-compile",
            "--variants",
            "eager_fp32,eager_bf16,compiled_fp32",
            "--fused-adamw",
            "--json",
            str(out),
        ]
    )
    expected = ["eager_fp32", "eager_fp32+fused", "eager_bf16", "eager_bf16+fused"]  # compiled dropped
    rows = results["results"]
    assert [r["variant"] for r in rows] == expected
    assert all(r["error"] is None and r["images_per_s"] > 0 for r in rows)
    # Every ratio is the row's images/s over the baseline's (eager fp32, the first row), recomputed here.
    base = rows[0]["images_per_s"]
    for r in rows:
        assert r["ratio_vs_eager_fp32"] == pytest.approx(r["images_per_s"] / base, rel=1e-12), r["variant"]
        assert r["images_per_s"] == pytest.approx(2 * 2 / r["total_s"], rel=1e-12) and r["mfu"] is None

    written = json.loads(out.read_text())
    assert written["meta"]["preset"] == "digits_uvit_tiny" and written["meta"]["batch_size"] == 2
    assert written["meta"]["params"] == 731_406 and written["meta"]["peak_mem_kind"] == "cpu_peak_rss_delta"
    assert [r["variant"] for r in written["results"]] == expected
    for r, got in zip(written["results"], rows, strict=True):
        for key in ("step_ms_median", "images_per_s", "ratio_vs_eager_fp32", "peak_mem_bytes", "mfu", "compile_s"):
            assert r[key] == got[key], (r["variant"], key)  # the file holds the figures returned

    table = capsys.readouterr().out
    assert "x eager fp32" in table and "1.00x" in table and "digits_uvit_tiny" in table
