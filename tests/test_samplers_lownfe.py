"""Low-NFE samplers (DPM-Solver++(3M), UniPC bh1/bh2), time grids and the final denoising step.

References: diffusers' DPMSolverMultistepScheduler / UniPCMultistepScheduler on the same discrete
schedule driven by the same noise function (an independent implementation, float32 inside), and
the closed-form probability-flow ODE of Gaussian data (observed convergence order).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from uvit.diffusion import (
    ALL_SAMPLERS,
    LOW_NFE_SAMPLERS,
    SAMPLERS,
    SKIP_TYPES,
    VPSDE,
    DiscreteSchedule,
    PerSampleNoise,
    UniPCOptions,
    count_nfe,
    euler_maruyama,
    get_time_steps,
    multistep_orders,
    sample,
    unipc,
    wrap_model,
)

F64 = torch.float64
M = torch.tensor([1.0, -0.5, 0.0, 2.0], dtype=F64)  # Gaussian data mean per dim
S = torch.tensor([0.5, 1.0, 2.0, 0.1], dtype=F64)  # and std


def _ts(t: float) -> torch.Tensor:
    return torch.tensor(t, dtype=F64)


def gaussian_noise_fn(schedule, m=M, s=S):
    """Exact E[eps | x_t] for data N(m, diag(s^2)): sigma (x - alpha m) / (alpha^2 s^2 + sigma^2)."""

    def noise_fn(x, t):
        a, sg = schedule.alpha(t)[:, None].to(x), schedule.sigma(t)[:, None].to(x)
        return sg * (x - a * m.to(x)) / (a**2 * s.to(x) ** 2 + sg**2)

    return noise_fn


def ode_solution(schedule, x_T, t_end, t_T=1.0):
    """Exact probability-flow ODE map x_T (at t_T) -> x at t_end for the Gaussian data."""
    aT, sT = schedule.alpha(_ts(t_T)), schedule.sigma(_ts(t_T))
    ae, se = schedule.alpha(_ts(t_end)), schedule.sigma(_ts(t_end))
    return ae * M + torch.sqrt(ae**2 * S**2 + se**2) * (x_T.to(F64) - aT * M) / torch.sqrt(aT**2 * S**2 + sT**2)


class Recorder:
    """A noise_fn recording the continuous times it is called at."""

    def __init__(self):
        self.ts: list[float] = []

    def __call__(self, x, t):
        assert t.shape == (x.shape[0],)
        self.ts.append(t[0].item())
        return 0.1 * x


# ----------------------------------------------------------------------------- registry


def test_registries():
    assert set(LOW_NFE_SAMPLERS) == {"dpm_solver_pp_3m", "unipc_bh1", "unipc_bh2"}
    assert ALL_SAMPLERS == {**SAMPLERS, **LOW_NFE_SAMPLERS} and not set(SAMPLERS) & set(LOW_NFE_SAMPLERS)
    assert SKIP_TYPES == ("logSNR", "time_uniform", "time_quadratic")


def test_multistep_orders():
    assert multistep_orders(6, 3, True, 10) == [1, 2, 3, 3, 2, 1]
    assert multistep_orders(12, 3, True, 10) == [1, 2] + [3] * 10  # reference: only below 10 steps
    assert multistep_orders(12, 3, True, None) == [1, 2] + [3] * 8 + [2, 1]  # UniPC: always
    assert multistep_orders(5, 2, False, None) == [1, 2, 2, 2, 2]
    assert multistep_orders(1, 3, True, None) == [1]
    assert multistep_orders(2, 3, True, None) == [1, 1]


# ----------------------------------------------------------------------------- time grids


@pytest.mark.parametrize("schedule", [VPSDE(), DiscreteSchedule()], ids=["vpsde", "discrete"])
@pytest.mark.parametrize("skip_type", SKIP_TYPES)
@pytest.mark.parametrize("steps", [1, 7, 50])
def test_time_grid_values(schedule, skip_type, steps):
    t_end = schedule.default_t_end
    g = get_time_steps(schedule, skip_type, 1.0, t_end, steps)
    assert g.dtype == F64 and g.shape == (steps + 1,)
    assert g[0].item() == pytest.approx(1.0, abs=1e-12) and g[-1].item() == pytest.approx(t_end, rel=1e-9)
    assert (g.diff() < 0).all()  # strictly decreasing: sampling runs from noise to data
    # the spacing each grid promises is exactly uniform
    spaced = {"logSNR": schedule.log_snr(g), "time_uniform": g, "time_quadratic": g.sqrt()}[skip_type]
    d = spaced.diff()
    torch.testing.assert_close(d, torch.full_like(d, d.mean().item()), rtol=1e-9, atol=1e-12)
    if skip_type == "logSNR":  # the lambda step is (lambda_end - lambda_T) / steps
        h = (schedule.log_snr(_ts(t_end)) - schedule.log_snr(_ts(1.0))).item() / steps
        assert d.mean().item() == pytest.approx(h, rel=1e-9)
    elif skip_type == "time_quadratic":
        assert d.mean().item() == pytest.approx((math.sqrt(t_end) - 1.0) / steps, rel=1e-9)


def test_grids_differ_where_they_should():
    v = VPSDE()
    lo, tu, tq = (get_time_steps(v, k, 1.0, 1e-4, 10) for k in SKIP_TYPES)
    # logSNR spends its steps near the data end, time-quadratic in between, time-uniform least
    assert lo[-2] < tq[-2] < tu[-2]
    with pytest.raises(ValueError, match="logSNR"):
        get_time_steps(v, "karras", 1.0, 1e-4, 10)


@pytest.mark.parametrize("name", sorted(LOW_NFE_SAMPLERS) + ["dpm_solver_pp_2m"])
@pytest.mark.parametrize("skip_type", SKIP_TYPES)
@pytest.mark.parametrize("denoise_final", [False, True])
def test_multistep_calls_land_on_the_grid(name, skip_type, denoise_final):
    """steps calls at grid[0..steps-1] (the corrector reuses the next step's call), then one more
    at t_end with denoise_final."""
    d, rec, steps = DiscreteSchedule(), Recorder(), 12
    sample(name, rec, d, torch.zeros(1, 3, dtype=F64), steps, skip_type=skip_type, denoise_final=denoise_final)
    grid = get_time_steps(d, skip_type, 1.0, d.default_t_end, steps).tolist()
    expected = grid[:-1] + ([grid[-1]] if denoise_final else [])
    assert rec.ts == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("skip_type", SKIP_TYPES)
def test_euler_maruyama_grid(skip_type):
    """steps calls at the steps-point grid from 1 to t_end (then the step to t = 0)."""
    v, rec = VPSDE(), Recorder()
    euler_maruyama(rec, v, torch.zeros(2, 3, dtype=F64), steps=9, noise=PerSampleNoise([0, 1]), skip_type=skip_type)
    assert rec.ts == pytest.approx(get_time_steps(v, skip_type, 1.0, 1e-3, 8).tolist(), abs=1e-12)


# ----------------------------------------------------------------------------- NFE


_FIXED_ORDER = ("dpm_solver_pp_2m", "dpm_solver_pp_3m", "euler_maruyama")
_NFE_CASES = [
    (name, steps, kw)
    for name in sorted(ALL_SAMPLERS)
    for steps in (1, 2, 3, 8, 12)
    for kw in (
        {},
        {"denoise_final": True},
        {"order": 2},
        {"order": 1, "denoise_final": True},
        {"skip_type": "time_quadratic"},
    )
    if not ("order" in kw and name in _FIXED_ORDER)
    and not (name == "euler_maruyama" and steps == 1 and "skip_type" in kw)  # needs 2 grid points
]


@pytest.mark.parametrize("name,steps,kw", _NFE_CASES)
def test_count_nfe_matches_instrumented_calls(name, steps, kw):
    rec = Recorder()
    sample(name, rec, VPSDE(), torch.zeros(2, 3, dtype=F64), steps, noise=PerSampleNoise([0, 1]), **kw)
    assert len(rec.ts) == count_nfe(name, steps, **kw)
    extra = kw.get("denoise_final", False) and name != "euler_maruyama"
    if name not in ("dpm_solver", "dpm_solver_pp"):
        assert len(rec.ts) == steps + extra


def test_count_nfe_new_names():
    assert count_nfe("unipc_bh2", 10) == 10 and count_nfe("unipc_bh1", 10, order=3) == 10
    assert count_nfe("dpm_solver_pp_3m", 8, denoise_final=True) == 9
    assert count_nfe("euler_maruyama", 250, denoise_final=True) == 250  # replaces the last step
    assert count_nfe("dpm_solver", 50, denoise_final=True) == 51
    with pytest.raises(ValueError, match="unipc_bh1"):
        count_nfe("unipc", 10)


# ----------------------------------------------------------------------------- diffusers reference

DIFFUSERS_TOL = 2e-5  # diffusers computes in float32 (its alphas_cumprod too); we in float64
STEP_COUNTS = [9, 27]  # 999 / steps integer: diffusers' rounded "linspace" timesteps are our grid
D = 8


def _reference_problem():
    """A nonlinear noise function of (x (B, 8), continuous t (B,)) and x_T (16, 8), float64."""
    d = DiscreteSchedule()
    g = torch.Generator().manual_seed(0)
    m, s = torch.randn(D, generator=g, dtype=F64), torch.rand(D, generator=g, dtype=F64) * 1.5 + 0.2
    w = torch.randn(D, D, generator=g, dtype=F64) / math.sqrt(D)
    gauss = gaussian_noise_fn(d, m, s)

    def eps_fn(x, t):
        return gauss(x, t) + 0.1 * d.sigma(t)[:, None].to(x) * torch.tanh(x @ w.T)

    return d, eps_fn, torch.randn(16, D, generator=g, dtype=F64)


def _diffusers_run(scheduler, eps_fn, x_T, steps=None, timesteps=None):
    """diffusers' sampling loop; its timestep k (alpha-bar of k + 1 betas) is our n = k + 1, t = n / 1000."""
    if timesteps is None:
        scheduler.set_timesteps(steps)
    else:
        scheduler.set_timesteps(timesteps=timesteps)
    x = x_T.clone()
    for k in scheduler.timesteps:
        eps = eps_fn(x, torch.full((x.shape[0],), (int(k) + 1) / 1000, dtype=F64))
        x = scheduler.step(eps, k, x).prev_sample
    return x.to(F64)


def _diffusers_config(final_sigmas_type="sigma_min"):
    # sigma_min: the last step ends at timestep 0 = our t_end = 1e-3 (n = 1), not at sigma = 0
    return dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="linspace",
        final_sigmas_type=final_sigmas_type,
    )


@pytest.mark.parametrize("steps", STEP_COUNTS)  # 9: both lower the final orders; 27: neither
@pytest.mark.parametrize("order", [2, 3])
def test_dpm_solver_pp_multistep_matches_diffusers(order, steps):
    diffusers = pytest.importorskip("diffusers")
    d, eps_fn, x_T = _reference_problem()
    sch = diffusers.DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=order, **_diffusers_config())
    ref = _diffusers_run(sch, eps_fn, x_T, steps)
    name = {2: "dpm_solver_pp_2m", 3: "dpm_solver_pp_3m"}[order]
    ours = sample(name, eps_fn, d, x_T, steps, skip_type="time_uniform")
    torch.testing.assert_close(ours, ref, rtol=0, atol=DIFFUSERS_TOL)
    other = sample(
        {2: "dpm_solver_pp_3m", 3: "dpm_solver_pp_2m"}[order], eps_fn, d, x_T, steps, skip_type="time_uniform"
    )
    assert (other - ref).abs().max() > 20 * DIFFUSERS_TOL  # the tolerance tells the orders apart


@pytest.mark.parametrize("order", [2, 3])
def test_denoise_final_matches_diffusers_zero_sigma(order):
    """Our 27 steps to t_end, then x0 at t_end == diffusers over timesteps 999, 962, ..., 0 and a
    final step to sigma = 0 (first order there: the x0 prediction)."""
    diffusers = pytest.importorskip("diffusers")
    d, eps_fn, x_T = _reference_problem()
    sch = diffusers.DPMSolverMultistepScheduler(
        algorithm_type="dpmsolver++", solver_order=order, **_diffusers_config("zero")
    )
    ref = _diffusers_run(sch, eps_fn, x_T, timesteps=list(range(999, -1, -37)))
    name = {2: "dpm_solver_pp_2m", 3: "dpm_solver_pp_3m"}[order]
    ours = sample(name, eps_fn, d, x_T, 27, skip_type="time_uniform", denoise_final=True)
    torch.testing.assert_close(ours, ref, rtol=0, atol=DIFFUSERS_TOL)
    plain = sample(name, eps_fn, d, x_T, 27, skip_type="time_uniform")
    assert (plain - ref).abs().max() > 20 * DIFFUSERS_TOL


@pytest.mark.parametrize("variant", ["bh1", "bh2"])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("steps", STEP_COUNTS)
def test_unipc_matches_diffusers(variant, order, steps):
    diffusers = pytest.importorskip("diffusers")
    d, eps_fn, x_T = _reference_problem()
    sch = diffusers.UniPCMultistepScheduler(
        solver_type=variant, solver_order=order, predict_x0=True, **_diffusers_config()
    )
    ref = _diffusers_run(sch, eps_fn, x_T, steps)
    ours = sample(f"unipc_{variant}", eps_fn, d, x_T, steps, order=order, skip_type="time_uniform")
    torch.testing.assert_close(ours, ref, rtol=0, atol=DIFFUSERS_TOL)
    other = "bh2" if variant == "bh1" else "bh1"
    for wrong in (
        sample(f"unipc_{other}", eps_fn, d, x_T, steps, order=order, skip_type="time_uniform"),
        sample("dpm_solver_pp_2m", eps_fn, d, x_T, steps, skip_type="time_uniform"),
    ):
        assert (wrong - ref).abs().max() > 20 * DIFFUSERS_TOL


# ----------------------------------------------------------------------------- convergence order


def _errors(name, schedule, steps_list, **kw):
    x_T = torch.randn(256, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    exact = ode_solution(schedule, x_T, schedule.default_t_end)
    f = gaussian_noise_fn(schedule)
    return [(sample(name, f, schedule, x_T, n, **kw) - exact).abs().max().item() for n in steps_list]


def _observed_orders(errs):
    return [math.log2(a / b) for a, b in zip(errs, errs[1:])]


# logSNR grids (h halves with the steps). UniPC-p with its corrector is of order p + 1.
@pytest.mark.parametrize(
    "name,kw,schedule,steps,lo,hi",
    [
        ("unipc_bh1", {"order": 1}, VPSDE(), [20, 40, 80], 1.9, 2.4),  # measured 2.20, 2.12
        ("unipc_bh2", {"order": 1}, VPSDE(), [20, 40, 80], 1.8, 2.2),  # 1.92, 1.98
        ("unipc_bh1", {"order": 2}, VPSDE(), [20, 40, 80], 2.8, 3.3),  # 3.13, 3.08
        ("unipc_bh2", {"order": 2}, VPSDE(), [20, 40, 80], 2.7, 3.2),  # 2.83, 2.96
        ("unipc_bh1", {"order": 2}, DiscreteSchedule(), [20, 40, 80], 2.8, 3.3),  # 3.09, 3.06
        ("unipc_bh2", {"order": 2}, DiscreteSchedule(), [20, 40, 80], 2.8, 3.3),  # 2.95, 3.00
        # order 3 (nominally 4): the warm-up steps' lower order caps it at ~3 asymptotically; no
        # first-order final step, which would cap it at 2.
        ("unipc_bh1", {"order": 3, "lower_order_final": False}, VPSDE(), [40, 80, 160], 2.9, 4.2),  # 3.12, 3.73
        ("unipc_bh2", {"order": 3, "lower_order_final": False}, VPSDE(), [40, 80, 160], 2.9, 4.2),  # 3.12, 3.72
        # 3M: the reference third-order update has local error O(h^3) (its D2 is half the Taylor
        # term), so order 2 is what it does; the first-order warm-up also caps it at 2 on the discrete
        # schedule, where x0_hat already varies at t = 1 (lambda_T = -2.7).
        ("dpm_solver_pp_3m", {}, VPSDE(), [40, 80, 160], 1.9, 2.3),  # 2.18, 2.06
        ("dpm_solver_pp_3m", {}, DiscreteSchedule(), [20, 40, 80], 1.8, 2.2),  # 2.07, 1.99
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_observed_convergence_order(name, kw, schedule, steps, lo, hi):
    errs = _errors(name, schedule, steps, **kw)
    p = _observed_orders(errs)
    assert all(lo <= q <= hi for q in p), (errs, p)


def test_low_nfe_samplers_beat_2m_at_equal_nfe():
    """On the Gaussian ODE at 20 and 40 NFE (logSNR), 3M and UniPC-2/3 are more accurate than 2M.
    (Not so at 8 NFE on the VP SDE: max errors 0.21 for 2M, 0.37 for UniPC-bh2-2, 1.3 for 3M and
    UniPC-3; which sampler wins at 8-12 NFE on a real model is the sampler study's question.)"""
    for schedule in (VPSDE(), DiscreteSchedule()):
        base = _errors("dpm_solver_pp_2m", schedule, [20, 40])
        for name, kw in [("dpm_solver_pp_3m", {}), ("unipc_bh2", {"order": 2}), ("unipc_bh1", {"order": 3})]:
            errs = _errors(name, schedule, [20, 40], **kw)
            assert all(e < b for e, b in zip(errs, base)), (schedule, name, errs, base)


# ----------------------------------------------------------------------------- denoise_final


@pytest.mark.parametrize(
    "name,kw",
    [
        ("dpm_solver", {}),
        ("dpm_solver_pp", {}),
        ("dpm_solver_pp_2m", {}),
        ("dpm_solver_pp_3m", {}),
        ("unipc_bh1", {"order": 3}),
        ("unipc_bh2", {}),
    ],
)
def test_denoise_final_is_x0_at_t_end(name, kw):
    """denoise_final returns (x - sigma eps(x, t_end)) / alpha of the plain run's end point."""
    v, steps = VPSDE(), 12
    f = gaussian_noise_fn(v)
    x_T = torch.randn(64, 4, generator=torch.Generator().manual_seed(1), dtype=F64)
    plain = sample(name, f, v, x_T, steps, **kw)
    den = sample(name, f, v, x_T, steps, denoise_final=True, **kw)
    t = v.default_t_end
    tv = torch.full((64,), t, dtype=F64)
    torch.testing.assert_close(den, (plain - v.sigma(_ts(t)) * f(plain, tv)) / v.alpha(_ts(t)), rtol=0, atol=1e-12)
    assert (den - plain).abs().max() > 1e-4


def test_euler_maruyama_denoise_final_by_hand():
    """Two steps (grid 0, t_end, 1): the SDE step 1 -> t_end with its noise, then x0 at t_end."""
    v, f = VPSDE(), gaussian_noise_fn(VPSDE())
    seeds = [5, 6, 7]
    x_T = PerSampleNoise(seeds).randn((4,), dtype=F64)
    out = euler_maruyama(f, v, x_T, steps=2, noise=PerSampleNoise(seeds), t_end=1e-3, denoise_final=True)
    z = torch.stack([torch.randn(4, generator=torch.Generator().manual_seed(s), dtype=F64) for s in seeds])
    beta, sig, dt = v.beta(_ts(1.0)).item(), v.sigma(_ts(1.0)).item(), 1.0 - 1e-3
    eps = f(x_T, torch.ones(3, dtype=F64))
    x = x_T + 0.5 * beta * dt * x_T - beta * dt / sig * eps + math.sqrt(beta * dt) * z
    ts = torch.full((3,), 1e-3, dtype=F64)
    expected = (x - v.sigma(_ts(1e-3)) * f(x, ts)) / v.alpha(_ts(1e-3))
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- determinism


def row_model(x, t):
    """Nonlinear but row-wise: sample i's output depends only on row i."""
    return torch.tanh(1.3 * x + torch.roll(x, 1, dims=-1) + 1e-3 * t.view(-1, *[1] * (x.dim() - 1)))


@pytest.mark.parametrize(
    "name,kw",
    [
        ("dpm_solver_pp_3m", {}),
        ("unipc_bh1", {"order": 3}),
        ("unipc_bh2", {"skip_type": "time_quadratic", "denoise_final": True}),
        ("euler_maruyama", {"skip_type": "logSNR"}),
    ],
)
def test_batch_size_independence(name, kw):
    d = DiscreteSchedule() if name != "euler_maruyama" else VPSDE()

    def run(seeds):
        noise = PerSampleNoise(seeds)
        x_T = noise.randn((2, 3, 3))
        return sample(name, wrap_model(row_model, d), d, x_T, 8, noise=noise, **kw)

    whole = run(list(range(8)))
    parts = torch.cat([run([0, 1, 2]), run([3, 4, 5, 6, 7])])
    torch.testing.assert_close(whole, parts, rtol=0, atol=1e-6)
    assert torch.equal(whole, run(list(range(8))))
    assert not torch.allclose(whole[0], whole[1])


def test_argument_errors():
    d = DiscreteSchedule()
    with pytest.raises(ValueError, match="bh1"):
        unipc(row_model, d, torch.zeros(1, 3), steps=4, options=UniPCOptions(variant="bh3"))
    with pytest.raises(ValueError, match="order"):
        unipc(row_model, d, torch.zeros(1, 3), steps=4, options=UniPCOptions(order=4))
    with pytest.raises(ValueError, match="steps >= 2"):
        euler_maruyama(row_model, VPSDE(), torch.zeros(1, 3), steps=1, noise=PerSampleNoise([0]), skip_type="logSNR")


def test_euler_maruyama_default_grid_is_the_official_one():
    """Time-uniform Euler-Maruyama keeps U-ViT's own linspace(t_end, 1, steps), bit for bit."""
    v = VPSDE()
    x_T = torch.randn(8, 4, generator=torch.Generator().manual_seed(2), dtype=F64)
    rec_a, rec_b = Recorder(), Recorder()
    euler_maruyama(rec_a, v, x_T, steps=20, noise=PerSampleNoise(range(8)))
    euler_maruyama(rec_b, v, x_T, steps=20, noise=PerSampleNoise(range(8)), skip_type="time_uniform")
    assert rec_a.ts == rec_b.ts == torch.linspace(1e-3, 1.0, 20, dtype=F64).flip(0).tolist()


# ----------------------------------------------------------------------------- --nfe-sweep benchmark


@pytest.fixture(scope="module")
def bench():
    import importlib.util
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "sampling_throughput.py"
    spec = importlib.util.spec_from_file_location("sampling_throughput_sweep", script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_paper_protocols(bench):
    from uvit.models import get_preset

    assert (
        bench.paper_protocol("cifar10_uvit_s2") == bench.paper_protocol("celeba64_uvit_s4") == ("euler_maruyama", 1000)
    )
    assert bench.paper_protocol("imagenet64_uvit_l4") == bench.paper_protocol("digits_uvit_tiny") == ("dpm_solver", 50)
    for p in ("imagenet256_uvit_h2", "imagenet512_uvit_l4", "mscoco256_uvit_s2"):
        assert bench.paper_protocol(p) == ("dpm_solver_pp", 50)
    assert bench.sweep_variant(get_preset("cifar10_uvit_s2").config, 0.4) == "no_cfg"  # unconditional
    assert bench.sweep_variant(get_preset("imagenet256_uvit_h2").config, 0.4) == "cfg_batched"
    assert bench.sweep_variant(get_preset("imagenet256_uvit_h2").config, 0.0) == "no_cfg"


def test_nfe_sweep_rows(bench, tmp_path, capsys):
    out = tmp_path / "sweep.json"
    result = bench.main(
        [
            "--nfe-sweep",
            "--presets",
            "digits_uvit_tiny",
            "--samplers",
            "dpm_solver_pp_3m,unipc_bh2,euler_maruyama",
            "--nfe",
            "2,3",
            "--protocol",
            "dpm_solver:4",
            "--batch-size",
            "2",
            "--iters",
            "1",
            "--warmup",
            "0",
            "--device",
            "cpu",
            "--guidance-scale",
            "0.5",
            "--json",
            str(out),
        ]
    )
    rows = result["results"]
    assert [(r["role"], r["sampler"], r["nfe"]) for r in rows] == [
        ("paper", "dpm_solver", 4),
        ("sweep", "dpm_solver_pp_3m", 2),
        ("sweep", "dpm_solver_pp_3m", 3),
        ("sweep", "unipc_bh2", 2),
        ("sweep", "unipc_bh2", 3),
        ("sweep", "euler_maruyama", 2),
        ("sweep", "euler_maruyama", 3),
    ]  # with its per-sample noise
    assert all(r["error"] is None and r["variant"] == "cfg_batched" for r in rows)
    assert [r["forwards"] for r in rows] == [4, 2, 3, 2, 3, 2, 3] and all(r["forward_batch"] == 4 for r in rows)
    base = rows[0]["images_per_s"]
    assert rows[0]["ratio_vs_paper"] == 1.0
    assert all(r["ratio_vs_paper"] == pytest.approx(r["images_per_s"] / base, rel=1e-12) for r in rows)
    written = json.loads(out.read_text())
    assert written["meta"]["mode"] == "nfe_sweep" and written["meta"]["nfe"] == [2, 3]
    assert len(written["results"]) == 7
    printed = capsys.readouterr().out
    assert "x paper" in printed and "dpm_solver (paper)" in printed
    with pytest.raises(SystemExit, match="SAMPLER:STEPS"):
        bench.main(["--nfe-sweep", "--presets", "digits_uvit_tiny", "--protocol", "dpm_solver"])
