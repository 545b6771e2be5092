"""The sampler study's bookkeeping: its settings, the mean ± spread over seeds, the cheapest setting
within the tolerance, and its page (the study end to end: tests/test_pipeline.py)."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from uvit.config import SamplerStudyConfig
from uvit.diffusion import count_nfe
from uvit.evaluate.sampler_study import cheapest_within, fid_bar, settings, steps_for_nfe, summarize
from uvit.report.samplers import fid_table, sampler_page

STUDY = SamplerStudyConfig(
    reference={"sampler": "dpm_solver", "steps": 50},
    samplers=["dpm_solver_pp_2m", "unipc_bh2"],
    skip_types=["logSNR", "time_uniform"],
    nfe=[6, 12],
    seeds=[0, 1, 2],
)


def test_settings_are_the_reference_then_every_sampler_grid_and_nfe() -> None:
    out = settings(STUDY)
    assert out[0].reference and (out[0].sampler, out[0].steps, out[0].nfe) == ("dpm_solver", 50, 50)
    rest = out[1:]
    assert len(rest) == 2 * 2 * 2 and not any(s.reference for s in rest)
    assert {(s.sampler, s.skip_type, s.nfe) for s in rest} == {
        (a, g, n) for a in STUDY.samplers for g in STUDY.skip_types for n in STUDY.nfe
    }
    for s in rest:
        assert count_nfe(s.sampler, s.steps, skip_type=s.skip_type) == s.nfe


def test_steps_for_nfe_inverts_count_nfe() -> None:
    for sampler in ("dpm_solver", "dpm_solver_pp_3m", "unipc_bh1", "euler_maruyama"):
        for nfe in (5, 8, 13):
            assert count_nfe(sampler, steps_for_nfe(sampler, nfe)) == nfe


def results(fids: dict[tuple[str, int], list[float]]) -> pd.DataFrame:
    """Per-seed rows: {(sampler, nfe): [fid per seed]}; sampler "ref" is the reference."""
    rows = []
    for (sampler, nfe), values in fids.items():
        for seed, fid in enumerate(values):
            rows.append(
                {
                    "sampler": "dpm_solver" if sampler == "ref" else sampler,
                    "skip_type": "logSNR",
                    "steps": nfe,
                    "nfe": nfe,
                    "reference": sampler == "ref",
                    "seed": seed,
                    "fid": fid,
                    "conditional_accuracy": 0.9 + 0.01 * seed,
                }
            )
    return pd.DataFrame(rows)


def test_summary_is_mean_and_sample_std_over_seeds() -> None:
    s = summarize(results({("ref", 50): [8.0, 8.2, 8.4], ("a", 6): [12.0, 13.0, 14.0]}))
    ref, a = s.iloc[0], s.iloc[1]
    assert ref["reference"] and ref["fid_mean"] == pytest.approx(8.2) and ref["fid_std"] == pytest.approx(0.2)
    assert a["fid_mean"] == pytest.approx(13.0) and a["fid_std"] == pytest.approx(1.0) and a["seeds"] == 3
    assert a["accuracy_mean"] == pytest.approx(0.91) and a["accuracy_std"] == pytest.approx(0.01)


def test_cheapest_setting_within_the_tolerance() -> None:
    fids = {
        ("ref", 50): [10.0, 10.0],
        ("a", 6): [10.5, 10.5],
        ("a", 8): [10.15, 10.15],
        ("b", 8): [10.1, 10.1],
        ("b", 12): [9.0, 9.0],
    }
    s = summarize(results(fids))
    assert fid_bar(s, 0.02) == pytest.approx(10.2)
    best = cheapest_within(s, 0.02)
    assert (best["sampler"], best["nfe"]) == ("b", 8)  # NFE 8 is the fewest within 10.2; b beats a there
    assert cheapest_within(s, 0.001)["nfe"] == 12  # only the 9.0 point is within 10.01
    assert cheapest_within(summarize(results({("ref", 50): [10.0], ("a", 6): [11.0]})), 0.02) is None


def test_page_names_the_setting_and_shows_every_cell() -> None:
    s = summarize(results({("ref", 50): [10.0, 10.2], ("a", 6): [12.0, 13.0], ("a", 8): [10.0, 10.1]}))
    page = sampler_page(
        s, benchmark="digits", tolerance=0.02, num_samples=360, guidance_scale=0.5, figure="samplers/fid_vs_nfe.png"
    )
    assert "a, grid logSNR, 8 steps, **NFE 8**" in page
    assert "FID 10.05 ± 0.07" in page  # mean 10.05, std 0.0707
    assert f"FID {10.1:.2f} ± {math.sqrt(0.02):.2f}" in page  # the reference
    table = fid_table(s)
    assert "| a | logSNR | 12.50 ± 0.71 | 10.05 ± 0.07 |" in table
    assert "![FID against NFE](samplers/fid_vs_nfe.png)" in page


def test_study_block_is_validated() -> None:
    with pytest.raises(ValueError, match="samplers"):
        SamplerStudyConfig(
            reference={"sampler": "dpm_solver", "steps": 50}, samplers=["no_such"], skip_types=["logSNR"], nfe=[6]
        )
    with pytest.raises(ValueError, match="nfe"):
        SamplerStudyConfig(
            reference={"sampler": "dpm_solver", "steps": 50}, samplers=["unipc_bh2"], skip_types=["logSNR"], nfe=[]
        )
