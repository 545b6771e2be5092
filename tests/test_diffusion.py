"""uvit.diffusion: schedules, loss, CFG and samplers against closed forms (spec section 3).

The workhorse is Gaussian data x0 ~ N(m, diag(s^2)), for which everything is analytic:
  E[eps | x_t] = sigma_t (x_t - alpha_t m) / (alpha_t^2 s^2 + sigma_t^2)       (exact noise predictor)
  PF-ODE:  x_t = alpha_t m + sqrt(alpha_t^2 s^2 + sigma_t^2) * (x_T - alpha_T m) / sqrt(alpha_T^2 s^2 + sigma_T^2)
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from uvit.diffusion import (
    SAMPLERS,
    VPSDE,
    DiscreteSchedule,
    PerSampleNoise,
    classifier_free_guidance,
    count_nfe,
    dpm_solver,
    dpm_solver_pp,
    dpm_solver_pp_2m,
    drop_context,
    drop_labels,
    euler_maruyama,
    make_schedule,
    noise_prediction_loss,
    sample,
    singlestep_orders,
    wrap_model,
)

F64 = torch.float64
M = torch.tensor([1.0, -0.5, 0.0, 2.0], dtype=F64)  # data mean per dim
S = torch.tensor([0.5, 1.0, 2.0, 0.1], dtype=F64)  # data std per dim


def _ts(t: float) -> torch.Tensor:
    return torch.tensor(t, dtype=F64)


def gaussian_noise_fn(schedule):
    """Exact E[eps | x_t] for the Gaussian data, as a sampler noise_fn(x (B, 4), t (B,))."""

    def noise_fn(x, t):
        a, sg = schedule.alpha(t)[:, None].to(x), schedule.sigma(t)[:, None].to(x)
        m, s = M.to(x), S.to(x)
        return sg * (x - a * m) / (a**2 * s**2 + sg**2)

    return noise_fn


def ode_solution(schedule, x_T, t_end, t_T=1.0):
    """Exact probability-flow ODE map from x_T at t_T to t_end for the Gaussian data."""
    aT, sT = schedule.alpha(_ts(t_T)), schedule.sigma(_ts(t_T))
    ae, se = schedule.alpha(_ts(t_end)), schedule.sigma(_ts(t_end))
    x_T = x_T.to(F64)
    return ae * M + torch.sqrt(ae**2 * S**2 + se**2) * (x_T - aT * M) / torch.sqrt(aT**2 * S**2 + sT**2)


# ----------------------------------------------------------------------------- schedules


def test_import_needs_only_torch():
    heavy = "{'scipy', 'diffusers', 'sklearn', 'transformers', 'ray'}"
    code = f"import sys, uvit.diffusion; bad = {heavy} & set(sys.modules); assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_discrete_schedule_values():
    d = DiscreteSchedule()
    assert d.betas[0].item() == pytest.approx(0.00085, rel=1e-12)
    assert d.betas[-1].item() == pytest.approx(0.012, rel=1e-12)
    assert (d.alpha(torch.tensor(1.0)) ** 2).item() == pytest.approx(0.0046601, rel=1e-4)
    # knots: alpha(n/1000)^2 is exactly prod_{i<=n} (1 - beta_i)
    n = torch.tensor([1, 2, 500, 1000])
    expected = torch.cumprod(1 - d.betas, 0)[n - 1]
    torch.testing.assert_close(d.alpha(n.to(F64) / 1000) ** 2, expected, rtol=1e-12, atol=0)
    # linear interpolation of log alpha between knots
    mid = 0.5 * (d.log_alpha(_ts(0.5)) + d.log_alpha(_ts(0.501)))
    assert d.log_alpha(_ts(0.5005)).item() == pytest.approx(mid.item(), rel=1e-12)


def test_vpsde_values():
    v = VPSDE()
    t = torch.linspace(0, 1, 11, dtype=F64)
    torch.testing.assert_close(v.alpha(t) ** 2, torch.exp(-(0.1 * t + 0.5 * 19.9 * t**2)))
    torch.testing.assert_close(v.beta(t), 0.1 + 19.9 * t)
    # logSNR range of the official continuous DPM-Solver run (spec: -5.025 ... 5.753; the spec's
    # 5.753 is float32 round-off in 1 - alpha^2, the float64 value is 5.7515).
    assert v.log_snr(_ts(1.0)).item() == pytest.approx(-5.025, abs=1e-3)
    assert v.log_snr(_ts(1e-4)).item() == pytest.approx(5.753, abs=3e-3)


@pytest.mark.parametrize("name", ["vpsde", "discrete"])
def test_schedule_identities(name):
    sch = make_schedule(name)
    t = torch.linspace(1e-3, 1, 997, dtype=F64)
    torch.testing.assert_close(sch.alpha(t) ** 2 + sch.sigma(t) ** 2, torch.ones_like(t))
    torch.testing.assert_close(sch.log_snr(t), torch.log(sch.alpha(t) / sch.sigma(t)))
    assert (sch.log_snr(t).diff() < 0).all()  # lambda strictly decreasing
    torch.testing.assert_close(sch.inverse_log_snr(sch.log_snr(t)), t, rtol=0, atol=1e-12)
    t32 = t.float()
    out = sch.inverse_log_snr(sch.log_snr(t32))
    assert out.dtype == torch.float32 and sch.alpha(t32).dtype == torch.float32
    torch.testing.assert_close(out, t32, rtol=0, atol=1e-6)


def test_model_time_and_train_time():
    v, d = VPSDE(), DiscreteSchedule()
    torch.testing.assert_close(v.model_time(torch.tensor([0.0, 0.5, 1.0])), torch.tensor([0.0, 499.5, 999.0]))
    n = torch.arange(1, 1001)
    assert torch.equal(d.model_time(n / 1000), n.float())  # float32 n/1000 -> exactly n
    assert d.model_time(torch.tensor([0.98002])).item() == pytest.approx(980.02, abs=1e-3)  # not snapped

    g = torch.Generator().manual_seed(0)
    tv = v.sample_train_time(20000, generator=g)
    assert tv.shape == (20000,) and 0 <= tv.min() and tv.max() < 1
    assert tv.mean().item() == pytest.approx(0.5, abs=0.01)
    nd = d.model_time(d.sample_train_time(20000, generator=g))
    assert torch.equal(nd, nd.round()) and nd.min() == 1 and nd.max() == 1000
    assert nd.mean().item() == pytest.approx(500.5, abs=8)


def test_make_schedule_rejects_unknown():
    with pytest.raises(ValueError, match="vpsde"):
        make_schedule("cosine")


# ----------------------------------------------------------------------------- NFE / grids


def test_singlestep_orders_and_nfe():
    assert singlestep_orders(50, 3) == [3] * 16 + [2]
    assert singlestep_orders(51, 3) == [3] * 16 + [2, 1]
    assert singlestep_orders(52, 3) == [3] * 17 + [1]
    assert singlestep_orders(7, 2) == [2, 2, 2, 1]
    for steps in range(1, 40):
        for order in (1, 2, 3):
            assert sum(singlestep_orders(steps, order)) == steps
    assert count_nfe("dpm_solver", 50) == 50
    assert count_nfe("dpm_solver_pp", 50) == 50
    assert count_nfe("euler_maruyama", 1000) == 1000
    assert count_nfe("dpm_solver_pp_2m", 25) == 25
    with pytest.raises(ValueError, match="dpm_solver"):
        count_nfe("ddim", 50)


class Recorder:
    """A noise_fn that records the times it is called at."""

    def __init__(self):
        self.ts: list[float] = []

    def __call__(self, x, t):
        assert t.shape == (x.shape[0],)
        self.ts.append(t[0].item())
        return 0.1 * x


@pytest.mark.parametrize(
    "name,steps,kw",
    [
        ("dpm_solver", 50, {}),
        ("dpm_solver", 20, {"order": 2}),
        ("dpm_solver_pp", 50, {}),
        ("dpm_solver_pp_2m", 25, {}),
        ("dpm_solver_pp_2m", 7, {}),
        ("euler_maruyama", 30, {}),
    ],
)
def test_instrumented_nfe(name, steps, kw):
    rec = Recorder()
    sch = VPSDE()
    sample(name, rec, sch, torch.zeros(2, 3), steps, noise=PerSampleNoise([0, 1]), **kw)
    assert len(rec.ts) == count_nfe(name, steps, kw.get("order", 3)) == steps


def test_official_continuous_grid():
    """17 intervals uniform in logSNR from t=1 to 1e-4, inner points at r = 1/3, 2/3 (1/2 last)."""
    v, rec = VPSDE(), Recorder()
    dpm_solver(rec, v, torch.zeros(1, 2), steps=50)
    lam = v.log_snr(torch.tensor(rec.ts, dtype=F64))
    h = (v.log_snr(_ts(1e-4)) - v.log_snr(_ts(1.0))) / 17
    expected = [v.log_snr(_ts(1.0)) + h * (i + r) for i in range(16) for r in (0, 1 / 3, 2 / 3)]
    expected += [v.log_snr(_ts(1.0)) + h * (16 + r) for r in (0, 1 / 2)]
    torch.testing.assert_close(lam, torch.stack(expected), rtol=0, atol=1e-5)
    assert rec.ts[0] == 1.0


def test_official_discrete_grid():
    """Network inputs 1000, 980.02, ..., 20.98: every call on linspace(1, 1e-3, 51)."""
    d, rec = DiscreteSchedule(), Recorder()
    dpm_solver_pp(wrap_model(lambda x, mt: rec(x, mt), d), d, torch.zeros(1, 2), steps=50)
    expected = 1000 - 19.98 * torch.arange(50, dtype=F64)
    torch.testing.assert_close(torch.tensor(rec.ts, dtype=F64), expected, rtol=0, atol=1e-3)


# ----------------------------------------------------------------------------- Gaussian data

N_SAMPLES = 4000


def _check_moments(x, mean, std, n, slack):
    """Sample moments within 5 standard errors (mean: std/sqrt(n); std: std/sqrt(2n)) + slack
    for the solver's own bias (measured separately, precisely, in the order tests)."""
    x = x.to(F64)
    se_mean, se_std = std / math.sqrt(n), std / math.sqrt(2 * n)
    assert ((x.mean(0) - mean).abs() <= 5 * se_mean + slack).all(), (x.mean(0), mean)
    assert ((x.std(0) - std).abs() <= 5 * se_std + slack * std).all(), (x.std(0), std)


@pytest.mark.parametrize(
    "name,schedule,kw",
    [
        ("dpm_solver", VPSDE(), {}),
        ("dpm_solver_pp", DiscreteSchedule(), {}),
        ("dpm_solver_pp_2m", VPSDE(), {}),
        ("dpm_solver_pp_2m", DiscreteSchedule(), {}),  # logSNR: time-uniform needs ~4x the steps here
    ],
)
def test_ode_samplers_reproduce_gaussian(name, schedule, kw):
    """x_T ~ N(0, I) pushed through the exact ODE map gives N(mean_e, std_e^2) at t_end: the data
    up to alpha_T m (the prior ignores it: 0.7% of m for the VP SDE, 6.8% for the discrete
    schedule) and the noise left at t_end. Compare to that, with 5 SE + 1% slack."""
    x_T = PerSampleNoise(range(N_SAMPLES)).randn((4,))
    x = sample(name, gaussian_noise_fn(schedule), schedule, x_T, steps=50 if "pp_2m" not in name else 25, **kw)
    t_end = schedule.default_t_end
    aT, sT, ae, se = (f(_ts(t)) for t in (1.0, t_end) for f in (schedule.alpha, schedule.sigma))
    std_e = torch.sqrt(ae**2 * S**2 + se**2) / torch.sqrt(aT**2 * S**2 + sT**2)
    mean_e = ae * M - std_e * aT * M
    _check_moments(x, mean_e, std_e, N_SAMPLES, slack=0.01)
    # and the data itself, loosely: the end-point effects above are at most ~7% of m or s
    _check_moments(x, M, S, N_SAMPLES, slack=0.1)


def test_euler_maruyama_reproduces_gaussian():
    """The reverse SDE ends at t = 0, i.e. on the data N(m, s^2). 250 steps instead of 1000 keep
    the test fast; the Euler bias there is < 1% of s (measured with 2e5 samples), hence slack 2%."""
    n, v = 2000, VPSDE()
    noise = PerSampleNoise(range(n))
    x = euler_maruyama(gaussian_noise_fn(v), v, noise.randn((4,)), steps=250, noise=noise)
    _check_moments(x, M, S, n, slack=0.02)


# ----------------------------------------------------------------------------- convergence order


def _errors(run, schedule, steps_list, n=256):
    x_T = torch.randn(n, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    exact = ode_solution(schedule, x_T, schedule.default_t_end)
    return [(run(gaussian_noise_fn(schedule), schedule, x_T, steps) - exact).abs().max().item() for steps in steps_list]


def _observed_orders(errs):
    return [math.log2(a / b) for a, b in zip(errs, errs[1:])]


# steps chosen so the number of order-k intervals doubles and every interval has order k
# (3K+2 -> [3]*K + [2], 2K -> [2]*K), i.e. the logSNR step h halves each time.
@pytest.mark.parametrize(
    "order,steps,lo,hi",
    [
        (3, [23, 47, 95], 2.8, 3.8),  # measured 3.33, 3.31
        (2, [16, 32, 64], 1.8, 2.5),  # measured 2.13, 2.08
        (1, [20, 40, 80], 0.8, 1.2),  # measured 0.95, 0.98
    ],
)
def test_dpm_solver_convergence_order(order, steps, lo, hi):
    errs = _errors(lambda f, sch, x, n: dpm_solver(f, sch, x, steps=n, order=order), VPSDE(), steps)
    p = _observed_orders(errs)
    assert all(lo <= q <= hi for q in p), (errs, p)


def test_dpm_solver_higher_order_is_more_accurate():
    v = VPSDE()
    errs = {k: _errors(lambda f, sch, x, n: dpm_solver(f, sch, x, steps=n, order=k), v, [48])[0] for k in (1, 2, 3)}
    assert errs[3] < errs[2] / 10 < errs[1] / 10, errs


def test_dpm_solver_pp_convergence_order():
    """Data-prediction third order on the discrete schedule (logSNR skip so h halves);
    pre-asymptotic, measured 2.69, 2.87."""
    run = lambda f, sch, x, n: dpm_solver_pp(f, sch, x, steps=n, skip_type="logSNR")
    p = _observed_orders(_errors(run, DiscreteSchedule(), [47, 95, 191]))
    assert all(2.5 <= q <= 3.8 for q in p), p


def test_official_configs_are_accurate():
    """The paper's 50-NFE settings against the exact ODE solution (data std up to 2)."""
    v, d = VPSDE(), DiscreteSchedule()
    assert _errors(lambda f, s, x, n: dpm_solver(f, s, x, steps=n), v, [50])[0] < 5e-3
    # time-uniform steps are large in lambda near t_end = 1e-3, so this one converges slowly
    errs = _errors(lambda f, s, x, n: dpm_solver_pp(f, s, x, steps=n), d, [11, 23, 50, 95])
    assert errs[2] < 0.05 and all(a > 1.4 * b for a, b in zip(errs, errs[1:])), errs


@pytest.mark.parametrize(
    "schedule,kw,steps",
    [
        (VPSDE(), {}, [20, 40, 80, 160]),  # measured 1.87, 1.97, 1.99
        (DiscreteSchedule(), {}, [20, 40, 80, 160]),  # measured 1.95, 1.99, 2.00
        # non-uniform lambda steps exercise the step ratio r0 = h_0 / h; t_end = 1e-2 keeps the
        # last lambda step shrinking with the grid. Measured 1.94, 2.05.
        (VPSDE(), {"skip_type": "time_uniform", "t_end": 1e-2}, [40, 80, 160]),
    ],
    ids=["vpsde", "discrete", "vpsde-time_uniform"],
)
def test_dpm_solver_pp_2m_second_order(schedule, kw, steps):
    t_end = kw.get("t_end", schedule.default_t_end)
    x_T = torch.randn(256, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    exact = ode_solution(schedule, x_T, t_end)
    f = gaussian_noise_fn(schedule)
    errs = [(dpm_solver_pp_2m(f, schedule, x_T, steps=n, **kw) - exact).abs().max().item() for n in steps]
    p = _observed_orders(errs)
    assert all(1.8 <= q <= 2.3 for q in p), (errs, p)


# ----------------------------------------------------------------------------- CFG


class CountingModel:
    """model(x, t, y=...) or model(x, t, context=...), records batch sizes of its calls."""

    def __init__(self):
        self.batches: list[int] = []

    def __call__(self, x, t, y=None, context=None):
        self.batches.append(x.shape[0])
        c = y.to(x)[:, None] if y is not None else context.mean(dim=(1, 2))[:, None]
        return torch.sin(x * (1 + c)) + 0.01 * t[:, None] * c


def test_cfg_scale_zero_is_conditional():
    model, x, t = CountingModel(), torch.randn(5, 3), torch.full((5,), 500.0)
    y = torch.arange(5)
    guided = classifier_free_guidance(model, 0.0, {"y": y}, {"y": torch.full((5,), 1000)})
    out = guided(x, t)
    assert model.batches == [5]
    assert torch.equal(out, model(x, t, y=y))


@pytest.mark.parametrize("scale", [0.4, 1.0, 3.0])
def test_cfg_combination_and_single_batched_call(scale):
    model, x, t = CountingModel(), torch.randn(5, 3), torch.linspace(10, 900, 5)
    y, null = torch.arange(5), torch.full((5,), 1000)
    out = classifier_free_guidance(model, scale, {"y": y}, {"y": null})(x, t)
    assert model.batches == [10]  # one forward of batch 2B
    expected = (1 + scale) * model(x, t, y=y) - scale * model(x, t, y=null)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_cfg_broadcasts_empty_context():
    model, x, t = CountingModel(), torch.randn(4, 3), torch.full((4,), 20.0)
    ctx, empty = torch.randn(4, 77, 768), torch.randn(1, 77, 768)
    out = classifier_free_guidance(model, 1.0, {"context": ctx}, {"context": empty})(x, t)
    expected = 2 * model(x, t, context=ctx) - model(x, t, context=empty.expand(4, -1, -1))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        classifier_free_guidance(model, 1.0, {"context": ctx}, {"y": torch.zeros(4)})


def test_cfg_inside_sampler_costs_one_call_per_nfe():
    d, model = DiscreteSchedule(), CountingModel()
    guided = classifier_free_guidance(model, 0.4, {"y": torch.arange(3)}, {"y": torch.full((3,), 1000)})
    dpm_solver_pp(wrap_model(guided, d), d, torch.randn(3, 2), steps=50)
    assert model.batches == [6] * count_nfe("dpm_solver_pp", 50)


# ----------------------------------------------------------------------------- determinism


def row_model(x, t):
    """Nonlinear but row-wise: sample i's output depends only on row i."""
    return torch.tanh(1.3 * x + torch.roll(x, 1, dims=-1) + 1e-3 * t.view(-1, *[1] * (x.dim() - 1)))


def _run_seeds(name, seeds, schedule, steps):
    noise = PerSampleNoise(seeds)
    x_T = noise.randn((2, 3, 3))
    return sample(name, wrap_model(row_model, schedule), schedule, x_T, steps, noise=noise)


def test_per_sample_noise_rows():
    a = PerSampleNoise([3, 7]).randn((2, 5))
    assert a.shape == (2, 2, 5)
    assert torch.equal(a[1], torch.randn(2, 5, generator=torch.Generator().manual_seed(7)))
    assert torch.equal(PerSampleNoise([7]).randn((2, 5))[0], a[1])


@pytest.mark.parametrize("name,steps", [("euler_maruyama", 40), ("dpm_solver", 20), ("dpm_solver_pp_2m", 10)])
def test_batch_size_independence(name, steps):
    v = VPSDE()
    whole = _run_seeds(name, list(range(8)), v, steps)
    parts = torch.cat([_run_seeds(name, [0, 1, 2], v, steps), _run_seeds(name, [3, 4, 5, 6, 7], v, steps)])
    torch.testing.assert_close(whole, parts, rtol=0, atol=1e-6)
    assert torch.equal(whole, _run_seeds(name, list(range(8)), v, steps))  # same seeds, same samples
    assert not torch.allclose(whole[0], whole[1])


def test_sampler_argument_errors():
    v = VPSDE()
    with pytest.raises(ValueError, match="noise"):
        euler_maruyama(row_model, v, torch.zeros(2, 3), steps=5)
    with pytest.raises(ValueError, match="euler_maruyama"):
        sample("heun", row_model, v, torch.zeros(2, 3), 5)
    with pytest.raises(TypeError):
        euler_maruyama(row_model, DiscreteSchedule(), torch.zeros(1, 3), steps=5, noise=PerSampleNoise([0]))
    assert set(SAMPLERS) == {"euler_maruyama", "dpm_solver", "dpm_solver_pp", "dpm_solver_pp_2m"}


def test_wrap_model_applies_model_time():
    seen = []
    f = wrap_model(lambda x, mt: seen.append(mt) or x, VPSDE())
    f(torch.zeros(2, 1), torch.tensor([1.0, 0.5]))
    torch.testing.assert_close(seen[0], torch.tensor([999.0, 499.5]))


# ----------------------------------------------------------------------------- loss / dropout


def _gaussian_model(schedule, scale):
    """A NoiseModel taking the network time input (so it also checks model_time)."""
    f = gaussian_noise_fn(schedule)
    return lambda x_t, mt: f(x_t, mt / scale)


@pytest.mark.parametrize("schedule,scale", [(VPSDE(), 999.0), (DiscreteSchedule(), 1000.0)], ids=["vpsde", "discrete"])
def test_noise_prediction_loss(schedule, scale):
    g = torch.Generator().manual_seed(0)
    n = 8192
    x0 = (M + S * torch.randn(n, 4, generator=g, dtype=F64)).float()
    loss = noise_prediction_loss(_gaussian_model(schedule, scale), x0, schedule, generator=g)
    assert loss.shape == (n,)
    zero = noise_prediction_loss(lambda x, t: torch.zeros_like(x), x0, schedule, generator=g)
    # zero predictor: E|eps|^2 = 1; exact predictor: Var(eps | x_t) = a^2 s^2 / (a^2 s^2 + sig^2) < 1
    assert zero.mean().item() == pytest.approx(1.0, abs=0.04)
    t = schedule.sample_train_time(200000, generator=g).to(F64)[:, None]
    a2, sg2 = schedule.alpha(t) ** 2, schedule.sigma(t) ** 2
    expected = (a2 * S**2 / (a2 * S**2 + sg2)).mean().item()
    assert loss.mean().item() == pytest.approx(expected, abs=0.03)
    assert loss.mean() < zero.mean() - 0.2


def test_loss_builds_x_t_correctly():
    """A model that knows x0 recovers eps = (x_t - alpha x0) / sigma exactly -> zero loss."""
    for schedule, scale in [(VPSDE(), 999.0), (DiscreteSchedule(), 1000.0)]:
        x0 = torch.randn(64, 2, 3, dtype=F64)

        def oracle(x_t, mt):
            t = mt / scale
            a, s = schedule.alpha(t).view(-1, 1, 1), schedule.sigma(t).view(-1, 1, 1)
            return (x_t - a * x0) / s

        loss = noise_prediction_loss(oracle, x0, schedule, generator=torch.Generator().manual_seed(1))
        assert loss.max().item() < 1e-12


def test_drop_labels():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 1000, (20000,), generator=g)
    out = drop_labels(y, 0.1, 1000, generator=g)
    dropped = out == 1000
    assert abs(dropped.float().mean().item() - 0.1) < 4 * math.sqrt(0.09 / 20000)
    assert torch.equal(out[~dropped], y[~dropped])
    assert torch.equal(drop_labels(y, 0.0, 1000), y)
    assert (drop_labels(y, 1.0, 1000) == 1000).all()


def test_drop_context():
    g = torch.Generator().manual_seed(0)
    ctx, empty = torch.randn(2000, 77, 8), torch.randn(77, 8)
    out = drop_context(ctx, 0.3, empty, generator=g)
    dropped = (out == empty).all(dim=(1, 2))
    assert abs(dropped.float().mean().item() - 0.3) < 4 * math.sqrt(0.21 / 2000)
    assert torch.equal(out[~dropped], ctx[~dropped])
    assert torch.equal(drop_context(ctx, 0.0, empty), ctx)
    assert (drop_context(ctx, 1.0, empty[None]) == empty).all()
