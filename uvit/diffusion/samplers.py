"""Samplers used by the official U-ViT evaluation scripts (continuous VP SDE and discrete schedules).

Every sampler takes `noise_fn(x, t) -> eps`, with t the schedule's CONTINUOUS time of shape
(B,); `wrap_model` turns a network into one by applying `schedule.model_time`. All samples in a
batch share the same time grid, so step coefficients are Python floats computed in float64 and
sample i depends only on x_T[i] (and, for the SDE, on its own noise generator): results do not
depend on how a set of seeds is split into batches.

- `euler_maruyama`: reverse VP SDE, score_sde/U-ViT `sde.py` (CIFAR-10, CelebA: 1000 steps).
- `dpm_solver`: singlestep DPM-Solver "fast" (orders [3]*16 + [2] for 50 NFE), noise prediction.
- `dpm_solver_pp`: the same in data prediction ("DPM-Solver++"), the official discrete-time config
  (time-uniform grid).
- `dpm_solver_pp_2m`: multistep second-order DPM-Solver++ (not used by the paper; handy for CFG).
- `dpm_solver_pp_3m`: multistep third-order DPM-Solver++ (for few steps).
- `unipc` (`unipc_bh1`, `unipc_bh2` in LOW_NFE_SAMPLERS): UniPC, the multistep predictor-corrector of
  Zhao et al. 2023 (data prediction, order 1-3, the corrector reusing the next step's model call);
  its settings are a `UniPCOptions`, which `sample` builds from its keyword options.

Grids: every sampler takes `skip_type` ("logSNR", "time_uniform", "time_quadratic"); the ODE
samplers also take `denoise_final` (one more network call: return the x0 prediction at t_end).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from .losses import NoiseModel
from .schedules import NoiseSchedule

__all__ = [
    "NoiseFn",
    "wrap_model",
    "PerSampleNoise",
    "get_time_steps",
    "multistep_orders",
    "singlestep_orders",
    "singlestep_time_points",
    "euler_maruyama",
    "dpm_solver",
    "dpm_solver_pp",
    "dpm_solver_pp_2m",
    "dpm_solver_pp_3m",
    "unipc",
    "UniPCOptions",
    "SKIP_TYPES",
    "SAMPLERS",
    "LOW_NFE_SAMPLERS",
    "ALL_SAMPLERS",
    "sample",
    "count_nfe",
]

NoiseFn = Callable[[Tensor, Tensor], Tensor]  # (x (B, ...), t (B,)) -> eps (B, ...)


def wrap_model(model: NoiseModel, schedule: NoiseSchedule) -> NoiseFn:
    """model(x, model_time) -> eps  ==>  noise_fn(x, t) with t continuous."""

    def noise_fn(x: Tensor, t: Tensor) -> Tensor:
        return model(x, schedule.model_time(t))

    return noise_fn


class PerSampleNoise:
    """One CPU torch.Generator per sample, so sample i's randomness depends only on seeds[i].

    Drawing on CPU also makes samples identical across devices; rows are then moved to `device`.
    """

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu"):
        self.seeds = [int(s) for s in seeds]
        self.device = torch.device(device)
        self.generators = [torch.Generator().manual_seed(s) for s in self.seeds]

    def __len__(self) -> int:
        return len(self.generators)

    def randn(self, shape_per_sample: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
        """(B, *shape_per_sample) standard normal; row i drawn from generator i."""
        rows = [torch.randn(tuple(shape_per_sample), generator=g, dtype=dtype) for g in self.generators]
        return torch.stack(rows).to(self.device)


# ----------------------------------------------------------------------------- helpers


def _f64(fn: Callable[[Tensor], Tensor], t: float) -> float:
    """Evaluate a schedule function at one float64 time, as a Python float."""
    return float(fn(torch.tensor(t, dtype=torch.float64)))


def _time_vec(t: float, x: Tensor) -> Tensor:
    """The (B,) time tensor handed to noise_fn; at least float32 so e.g. bf16 x keeps t exact-ish."""
    return torch.full((x.shape[0],), t, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)


SKIP_TYPES: tuple[str, ...] = ("logSNR", "time_uniform", "time_quadratic")


def get_time_steps(schedule: NoiseSchedule, skip_type: str, t_T: float, t_0: float, n: int) -> Tensor:
    """n + 1 decreasing times from t_T to t_0, float64 (DPM-Solver's get_time_steps).

    "logSNR": uniform in lambda; "time_uniform": uniform in t; "time_quadratic": uniform in sqrt(t).
    """
    if skip_type == "logSNR":
        lam_T, lam_0 = _f64(schedule.log_snr, t_T), _f64(schedule.log_snr, t_0)
        return schedule.inverse_log_snr(torch.linspace(lam_T, lam_0, n + 1, dtype=torch.float64))
    if skip_type == "time_uniform":
        return torch.linspace(t_T, t_0, n + 1, dtype=torch.float64)
    if skip_type == "time_quadratic":
        return torch.linspace(math.sqrt(t_T), math.sqrt(t_0), n + 1, dtype=torch.float64) ** 2
    raise ValueError(f"unknown skip_type {skip_type!r}; valid: 'logSNR', 'time_uniform', 'time_quadratic'")


def singlestep_orders(steps: int, order: int = 3) -> list[int]:
    """Per-interval orders of DPM-Solver-fast; they sum to `steps` (the NFE).

    order 3: K = steps//3 + 1 intervals, [3]*(K-2)+[2,1] / [3]*(K-1)+[1] / [3]*(K-1)+[2] for
    steps % 3 == 0 / 1 / 2 (so 50 steps -> [3]*16 + [2]); order 2: [2]*(steps//2) (+[1] if odd);
    order 1: [1]*steps.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if order == 3:
        k = steps // 3 + 1
        tail = {0: [2, 1], 1: [1], 2: [2]}[steps % 3]
        return [3] * (k - len(tail)) + tail
    if order == 2:
        return [2] * (steps // 2) + [1] * (steps % 2)
    if order == 1:
        return [1] * steps
    raise ValueError(f"order must be 1, 2 or 3, got {order}")


def singlestep_time_points(
    schedule: NoiseSchedule, steps: int, order: int, skip_type: str, t_T: float, t_0: float
) -> Tensor:
    """Outer time points (len(orders) + 1,) of DPM-Solver-fast.

    logSNR: uniform in lambda over the K intervals (reproduces the DPM-Solver paper). Otherwise
    the (steps + 1)-point grid taken at cumsum([0] + orders), so every model call lands on it.
    """
    orders = singlestep_orders(steps, order)
    if skip_type == "logSNR":
        # (The reference uses K = 1 here for order 1, which would index past the end.)
        return get_time_steps(schedule, skip_type, t_T, t_0, len(orders))
    grid = get_time_steps(schedule, skip_type, t_T, t_0, steps)
    return grid[torch.cumsum(torch.tensor([0] + orders), 0)]


class _ExpIntegrator:
    """DPM-Solver updates from time s to t, in half-log-SNR lambda (h = lambda_t - lambda_s).

    The noise form (DPM-Solver) integrates eps_hat, the data form (DPM-Solver++) integrates
    x0_hat = (x - sigma eps_hat) / alpha. Both read, for the first-order step,
        x_t = a * x_s - m_t * expm1(hh) * model_s
    with noise form: a = alpha_t / alpha_s, m_t = sigma_t, hh = +h;
         data form : a = sigma_t / sigma_s, m_t = alpha_t, hh = -h,
    and the higher-order corrections of the reference (solver_type "dpmsolver") keep the same
    shape in terms of hh, so one implementation serves both.
    """

    def __init__(self, noise_fn: NoiseFn, schedule: NoiseSchedule, predict_x0: bool):
        self.noise_fn, self.schedule, self.predict_x0 = noise_fn, schedule, predict_x0
        self.nfe = 0

    def lam(self, t: float) -> float:
        return _f64(self.schedule.log_snr, t)

    def t_of(self, lam: float) -> float:
        return _f64(self.schedule.inverse_log_snr, lam)

    def model(self, x: Tensor, t: float) -> Tensor:
        """eps_hat (noise form) or x0_hat (data form) at time t."""
        self.nfe += 1
        eps = self.noise_fn(x, _time_vec(t, x))
        if not self.predict_x0:
            return eps
        alpha, sigma = _f64(self.schedule.alpha, t), _f64(self.schedule.sigma, t)
        return (x - sigma * eps) / alpha

    def _coef(self, s: float, t: float, h: float) -> tuple[float, float, float]:
        """(a, m_t, hh) for a step s -> t spanning h in lambda."""
        sc = self.schedule
        if self.predict_x0:
            return _f64(sc.sigma, t) / _f64(sc.sigma, s), _f64(sc.alpha, t), -h
        la_s, la_t = _f64(sc.log_alpha, s), _f64(sc.log_alpha, t)
        return math.exp(la_t - la_s), _f64(sc.sigma, t), h

    def first(self, x: Tensor, s: float, t: float, m_s: Tensor | None = None) -> Tensor:
        """DPM-Solver-1 (= DDIM)."""
        m_s = self.model(x, s) if m_s is None else m_s
        a, m, hh = self._coef(s, t, self.lam(t) - self.lam(s))
        return a * x - (m * math.expm1(hh)) * m_s

    def second(self, x: Tensor, s: float, t: float, r1: float = 0.5) -> Tensor:
        """Singlestep DPM-Solver-2 with the intermediate point at lambda_s + r1 h."""
        lam_s, h = self.lam(s), self.lam(t) - self.lam(s)
        s1 = self.t_of(lam_s + r1 * h)
        m_s = self.model(x, s)
        a1, mm1, hh1 = self._coef(s, s1, r1 * h)
        m_s1 = self.model(a1 * x - (mm1 * math.expm1(hh1)) * m_s, s1)
        a, m, hh = self._coef(s, t, h)
        phi1 = math.expm1(hh)
        return a * x - (m * phi1) * m_s - (0.5 / r1 * m * phi1) * (m_s1 - m_s)

    def third(self, x: Tensor, s: float, t: float, r1: float = 1 / 3, r2: float = 2 / 3) -> Tensor:
        """Singlestep DPM-Solver-3 with intermediate points at lambda_s + r1 h and + r2 h."""
        lam_s, h = self.lam(s), self.lam(t) - self.lam(s)
        s1, s2 = self.t_of(lam_s + r1 * h), self.t_of(lam_s + r2 * h)
        m_s = self.model(x, s)
        a1, mm1, hh1 = self._coef(s, s1, r1 * h)
        m_s1 = self.model(a1 * x - (mm1 * math.expm1(hh1)) * m_s, s1)
        a2, mm2, hh2 = self._coef(s, s2, r2 * h)
        phi22 = math.expm1(hh2) / hh2 - 1.0
        x_s2 = a2 * x - (mm2 * math.expm1(hh2)) * m_s - (r2 / r1 * mm2 * phi22) * (m_s1 - m_s)
        m_s2 = self.model(x_s2, s2)
        a, m, hh = self._coef(s, t, h)
        phi1 = math.expm1(hh)
        phi2 = phi1 / hh - 1.0
        return a * x - (m * phi1) * m_s - (m * phi2 / r2) * (m_s2 - m_s)

    def multistep_second(self, x: Tensor, prev: tuple[float, Tensor], last: tuple[float, Tensor], t: float) -> Tensor:
        """Multistep DPM-Solver-2 from `last` = (t_0, model_0) to t, using `prev` = (t_-1, model_-1)."""
        (t_m1, m_m1), (t_0, m_0) = prev, last
        lam_0 = self.lam(t_0)
        h, h_0 = self.lam(t) - lam_0, lam_0 - self.lam(t_m1)
        d1 = (m_0 - m_m1) * (h / h_0)  # (1 / r0) * difference, r0 = h_0 / h
        a, m, hh = self._coef(t_0, t, h)
        phi1 = math.expm1(hh)
        return a * x - (m * phi1) * m_0 - (0.5 * m * phi1) * d1

    def multistep_third(self, x: Tensor, hist: Sequence[tuple[float, Tensor]], t: float) -> Tensor:
        """Multistep DPM-Solver++-3 (data form) from hist[-1] = (t_0, x0_0) to t, using
        hist[-2], hist[-3]: divided differences in lambda estimate x0' and x0'' at t_0."""
        (t_m2, m_m2), (t_m1, m_m1), (t_0, m_0) = hist[-3:]
        lam_m2, lam_m1, lam_0 = self.lam(t_m2), self.lam(t_m1), self.lam(t_0)
        h, h_0, h_1 = self.lam(t) - lam_0, lam_0 - lam_m1, lam_m1 - lam_m2
        r0, r1 = h_0 / h, h_1 / h
        d1_0, d1_1 = (m_0 - m_m1) * (1.0 / r0), (m_m1 - m_m2) * (1.0 / r1)
        d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
        d2 = (d1_0 - d1_1) * (1.0 / (r0 + r1))
        a, m, _ = self._coef(t_0, t, h)
        phi1 = math.expm1(-h)  # e^{-h} - 1
        return a * x - (m * phi1) * m_0 + (m * (phi1 / h + 1.0)) * d1 - (m * ((phi1 + h) / h**2 - 0.5)) * d2

    def denoise(self, x: Tensor, t: float) -> Tensor:
        """The final denoising step: x0_hat = (x - sigma_t eps_hat) / alpha_t (one call)."""
        self.nfe += 1
        eps = self.noise_fn(x, _time_vec(t, x))
        return (x - _f64(self.schedule.sigma, t) * eps) / _f64(self.schedule.alpha, t)


# ----------------------------------------------------------------------------- samplers


@torch.no_grad()
def euler_maruyama(
    noise_fn: NoiseFn,
    schedule: NoiseSchedule,
    x_T: Tensor,
    steps: int = 1000,
    noise: PerSampleNoise | None = None,
    t_end: float = 1e-3,
    skip_type: str = "time_uniform",
    denoise_final: bool = False,
) -> Tensor:
    """Reverse-SDE Euler-Maruyama of U-ViT's sde.py (steps NFE), ending at t = 0.

    Grid {0} U linspace(t_end, 1, steps), walked downward (other skip_types: the same `steps`
    points from 1 to t_end spaced by `get_time_steps`). From t to s < t:
        x <- x + [f - g^2 score](s - t) + g sqrt(t - s) z,  f = -beta x / 2, g^2 = beta,
    score = -eps / sigma_t; no noise on the last step (s = 0). z comes from `noise`, so each
    sample's path depends only on its own seed. denoise_final replaces that last Euler step
    (t_end -> 0) by the x0 prediction at t_end, so the NFE stays `steps`.
    """
    if noise is None:
        raise ValueError("euler_maruyama needs `noise` (a PerSampleNoise) for its Brownian increments")
    if not hasattr(schedule, "beta"):
        raise TypeError(f"euler_maruyama needs a continuous VP SDE with beta(t), got {schedule!r}")
    if len(noise) != x_T.shape[0]:
        raise ValueError(f"noise has {len(noise)} generators for a batch of {x_T.shape[0]}")
    if skip_type == "time_uniform":  # the official grid, bit for bit
        grid = [0.0] + torch.linspace(t_end, schedule.t_max, steps, dtype=torch.float64).tolist()
    elif steps < 2:
        raise ValueError(f"skip_type {skip_type!r} needs steps >= 2 (1 to t_end, then 0)")
    else:
        grid = [0.0] + get_time_steps(schedule, skip_type, schedule.t_max, t_end, steps - 1).flip(0).tolist()
    x = x_T
    for i in range(steps, 0, -1):
        t, s = grid[i], grid[i - 1]
        eps = noise_fn(x, _time_vec(t, x))
        if s == 0 and denoise_final:
            return (x - _f64(schedule.sigma, t) * eps) / _f64(schedule.alpha, t)
        beta, sigma, dt = _f64(schedule.beta, t), _f64(schedule.sigma, t), t - s
        # (f - g^2 score)(s - t) = dt * (beta x / 2 - beta eps / sigma)
        x = x + (0.5 * beta * dt) * x - (beta * dt / sigma) * eps
        if s > 0:
            x = x + math.sqrt(beta * dt) * noise.randn(tuple(x.shape[1:]), dtype=x.dtype).to(x.device)
    return x


def _ode_grid(schedule: NoiseSchedule, skip_type: str, t_end: float | None, steps: int) -> list[float]:
    """The steps + 1 times of a multistep solver, schedule.t_max down to t_end (None: the
    schedule's default_t_end), spaced by skip_type."""
    t_end = schedule.default_t_end if t_end is None else t_end
    return get_time_steps(schedule, skip_type, schedule.t_max, t_end, steps).tolist()


def _dpm_solver_fast(
    solver: _ExpIntegrator,
    x_T: Tensor,
    steps: int,
    order: int,
    skip_type: str,
    t_end: float | None,
    denoise_final: bool,
) -> Tensor:
    """Singlestep DPM-Solver-fast in the solver's form (noise or data prediction); see dpm_solver."""
    schedule = solver.schedule
    t_end = schedule.default_t_end if t_end is None else t_end
    orders = singlestep_orders(steps, order)
    outer = singlestep_time_points(schedule, steps, order, skip_type, schedule.t_max, t_end).tolist()
    x = x_T
    for i, k in enumerate(orders):
        s, t = outer[i], outer[i + 1]
        # Intermediate points follow the same skip rule inside [s, t]: r = 1/3, 2/3 (or 1/2) in
        # logSNR; for time_uniform they are grid points and r follows from their lambdas.
        lam_in = schedule.log_snr(get_time_steps(schedule, skip_type, s, t, k)).tolist()
        h = lam_in[-1] - lam_in[0]
        r = [(lam - lam_in[0]) / h for lam in lam_in[1:-1]]
        if k == 1:
            x = solver.first(x, s, t)
        elif k == 2:
            x = solver.second(x, s, t, r1=r[0])
        else:
            x = solver.third(x, s, t, r1=r[0], r2=r[1])
    return solver.denoise(x, outer[-1]) if denoise_final else x


@torch.no_grad()
def dpm_solver(
    noise_fn: NoiseFn,
    schedule: NoiseSchedule,
    x_T: Tensor,
    steps: int = 50,
    order: int = 3,
    skip_type: str = "logSNR",
    t_end: float | None = None,
    denoise_final: bool = False,
) -> Tensor:
    """Singlestep DPM-Solver-fast (noise prediction) from schedule.t_max to t_end (steps NFE, no
    final denoising unless denoise_final: then one more call returns the x0 prediction at t_end).

    The official continuous config: order 3, logSNR, t_end=1e-4. dpm_solver_pp is the same solver
    in data prediction (DPM-Solver++ without thresholding).
    """
    solver = _ExpIntegrator(noise_fn, schedule, predict_x0=False)
    return _dpm_solver_fast(solver, x_T, steps, order, skip_type, t_end, denoise_final)


@torch.no_grad()
def dpm_solver_pp(
    noise_fn: NoiseFn,
    schedule: NoiseSchedule,
    x_T: Tensor,
    steps: int = 50,
    order: int = 3,
    skip_type: str = "time_uniform",
    t_end: float | None = None,
    denoise_final: bool = False,
) -> Tensor:
    """Singlestep DPM-Solver++ (data prediction), the official discrete-time config:
    50 NFE on linspace(1, 1e-3, 51), orders [3]*16 + [2]."""
    solver = _ExpIntegrator(noise_fn, schedule, predict_x0=True)
    return _dpm_solver_fast(solver, x_T, steps, order, skip_type, t_end, denoise_final)


def multistep_orders(steps: int, order: int, lower_order_final: bool, final_below: int | None) -> list[int]:
    """Order of each of the `steps` steps of a multistep solver: warm-up 1, 2, ... (no history
    yet), then `order`; with lower_order_final the last steps count down to 1 (for every step
    count when final_below is None, else only when steps < final_below)."""
    out = []
    for i in range(1, steps + 1):
        k = min(order, i)
        if lower_order_final and (final_below is None or steps < final_below):
            k = min(k, steps + 1 - i)
        out.append(k)
    return out


def _dpm_multistep(
    noise_fn: NoiseFn,
    schedule: NoiseSchedule,
    x_T: Tensor,
    ts: Sequence[float],
    order: int,
    lower_order_final: bool,
    denoise_final: bool,
) -> Tensor:
    """Multistep DPM-Solver++ of order 2 or 3 (data prediction) over the grid ts (len(ts) - 1 NFE,
    +1 with denoise_final). Step orders `multistep_orders(steps, order, lower_order_final, 10)`."""
    steps = len(ts) - 1
    solver = _ExpIntegrator(noise_fn, schedule, predict_x0=True)
    x = x_T
    hist = [(ts[0], solver.model(x, ts[0]))]  # (time, x0_hat), newest last
    for i, k in enumerate(multistep_orders(steps, order, lower_order_final, final_below=10), start=1):
        t = ts[i]
        if k == 1:
            x = solver.first(x, hist[-1][0], t, m_s=hist[-1][1])
        elif k == 2:
            x = solver.multistep_second(x, hist[-2], hist[-1], t)
        else:
            x = solver.multistep_third(x, hist, t)
        if i < steps:  # the final model value is never needed
            hist = hist[-2:] + [(t, solver.model(x, t))]
    return solver.denoise(x, ts[-1]) if denoise_final else x


@torch.no_grad()
def dpm_solver_pp_2m(
    noise_fn: NoiseFn,
    schedule: NoiseSchedule,
    x_T: Tensor,
    steps: int = 25,
    skip_type: str = "logSNR",
    t_end: float | None = None,
    lower_order_final: bool = True,
    denoise_final: bool = False,
) -> Tensor:
    """Multistep DPM-Solver++(2M), data prediction, steps NFE (+1 with denoise_final).

    The first step is first order (no history yet); with lower_order_final and steps < 10 the
    last one is too, as in the reference implementation (it stabilises very few steps).
    """
    ts = _ode_grid(schedule, skip_type, t_end, steps)
    return _dpm_multistep(noise_fn, schedule, x_T, ts, 2, lower_order_final, denoise_final)


@torch.no_grad()
def dpm_solver_pp_3m(
    noise_fn: NoiseFn,
    schedule: NoiseSchedule,
    x_T: Tensor,
    steps: int = 20,
    skip_type: str = "logSNR",
    t_end: float | None = None,
    lower_order_final: bool = True,
    denoise_final: bool = False,
) -> Tensor:
    """Multistep DPM-Solver++(3M), data prediction, steps NFE (+1 with denoise_final).

    Step orders 1, 2, 3, 3, ...; with lower_order_final and steps < 10 the last two steps are
    orders 2 and 1, as in the reference implementation. The third-order update is the
    reference's (and diffusers'), whose D2 is h^2 x0''/2 where its coefficient wants h^2 x0'',
    so the local error stays O(h^3): against an exact ODE it converges at order 2, with a
    smaller constant than 2M.
    """
    ts = _ode_grid(schedule, skip_type, t_end, steps)
    return _dpm_multistep(noise_fn, schedule, x_T, ts, 3, lower_order_final, denoise_final)


def _unipc_coefficients(h: float, rks: Sequence[float], variant: str) -> tuple[float, Tensor]:
    """UniPC's B(h) and the right-hand side b of R rho = b for p = len(rks) points (data form,
    hh = -h); rks are the history's lambda offsets over h, the last one 1 (the target point)."""
    hh = -h
    if variant == "bh1":
        b_h = hh
    elif variant == "bh2":
        b_h = math.expm1(hh)
    else:
        raise ValueError(f"unknown UniPC variant {variant!r}; valid: 'bh1', 'bh2'")
    h_phi_k = math.expm1(hh) / hh - 1.0  # h phi_{k+1}(h) recursion, k! factors folded in
    factorial, b = 1, []
    for i in range(1, len(rks) + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    return b_h, torch.tensor(b, dtype=torch.float64)


def _unipc_rhos(rks: Sequence[float], b: Tensor) -> list[float]:
    """rho solving R rho = b, R[i, j] = rks[j] ** i (the reference hard-codes 0.5 for one unknown)."""
    if len(rks) == 1:
        return [0.5]
    r = torch.tensor(rks, dtype=torch.float64)
    vander = torch.stack([r**i for i in range(len(rks))])
    return torch.linalg.solve(vander, b).tolist()


@dataclass(frozen=True)
class UniPCOptions:
    """UniPC's settings (see `unipc`).

    order: the predictor's order p, 1 to 3 (the corrector raises it to p + 1); variant: "bh1"
    (B(h) = h, for unconditional sampling) or "bh2" (B(h) = e^h - 1, for guided sampling);
    skip_type, t_end (None: the schedule's default_t_end): the time grid; lower_order_final:
    lower the last steps' orders; denoise_final: one more call returns the x0 prediction at t_end.
    """

    order: int = 2
    variant: str = "bh2"
    skip_type: str = "logSNR"
    t_end: float | None = None
    lower_order_final: bool = True
    denoise_final: bool = False


@torch.no_grad()
def unipc(
    noise_fn: NoiseFn,
    schedule: NoiseSchedule,
    x_T: Tensor,
    steps: int = 20,
    options: UniPCOptions = UniPCOptions(),
) -> Tensor:
    """UniPC multistep (data prediction): predictor UniP-p and corrector UniC, steps NFE (+1
    with options.denoise_final).

    Step orders as `multistep_orders(steps, order, lower_order_final, None)` (the reference
    lowers the final orders at any step count). After each step but the last, the model call
    at the predicted point serves the corrector, which refines the point (order p + 1), and is
    kept as history: the corrector costs no extra NFE.
    """
    order = options.order
    if order not in (1, 2, 3):
        raise ValueError(f"UniPC order must be 1, 2 or 3, got {order}")
    ts = _ode_grid(schedule, options.skip_type, options.t_end, steps)
    solver = _ExpIntegrator(noise_fn, schedule, predict_x0=True)
    sc = schedule
    x = x_T
    hist = [(ts[0], solver.model(x, ts[0]))]  # (time, x0_hat), newest last
    for i, p in enumerate(multistep_orders(steps, order, options.lower_order_final, None), start=1):
        t = ts[i]
        t_0, m_0 = hist[-1]
        lam_0 = solver.lam(t_0)
        h = solver.lam(t) - lam_0
        older = hist[-p:-1][::-1]  # hist[-2], hist[-3], ... (p - 1 of them)
        rks = [(solver.lam(t_k) - lam_0) / h for t_k, _ in older] + [1.0]
        d1s = [(m_k - m_0) * (1.0 / r) for (_, m_k), r in zip(older, rks)]
        b_h, b = _unipc_coefficients(h, rks, options.variant)
        alpha_t = _f64(sc.alpha, t)
        # DDIM part (first order) of both the predictor and the corrector
        x_ddim = (_f64(sc.sigma, t) / _f64(sc.sigma, t_0)) * x - (alpha_t * math.expm1(-h)) * m_0
        x_pred = x_ddim
        if p >= 2:  # the predictor solves the system without the (unknown) target point
            rhos_p = _unipc_rhos(rks[:-1], b[:-1])
            x_pred = x_ddim - (alpha_t * b_h) * sum(r * d for r, d in zip(rhos_p, d1s))
        if i == steps:  # no model call at the end, so no corrector
            x = x_pred
            break
        m_t = solver.model(x_pred, t)
        rhos_c = _unipc_rhos(rks, b)
        corr = sum((r * d for r, d in zip(rhos_c[:-1], d1s)), torch.zeros_like(x)) + rhos_c[-1] * (m_t - m_0)
        x = x_ddim - (alpha_t * b_h) * corr
        hist = hist[-(order - 1) :] + [(t, m_t)] if order > 1 else [(t, m_t)]
    return solver.denoise(x, ts[-1]) if options.denoise_final else x


def _unipc_variant(variant: str) -> Callable[..., Tensor]:
    """The sampler `unipc_<variant>`: `sample`'s keyword options are UniPCOptions fields."""

    def run(noise_fn: NoiseFn, schedule: NoiseSchedule, x_T: Tensor, steps: int = 20, **options) -> Tensor:
        return unipc(noise_fn, schedule, x_T, steps, UniPCOptions(variant=variant, **options))

    run.__name__ = f"unipc_{variant}"
    run.__doc__ = f"UniPC with variant {variant!r} (see `unipc`)."
    return run


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "euler_maruyama": euler_maruyama,
    "dpm_solver": dpm_solver,
    "dpm_solver_pp": dpm_solver_pp,
    "dpm_solver_pp_2m": dpm_solver_pp_2m,
}
# Samplers for few steps (not in the paper's protocols); `sample` and `count_nfe` take both sets.
LOW_NFE_SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "dpm_solver_pp_3m": dpm_solver_pp_3m,
    "unipc_bh1": _unipc_variant("bh1"),
    "unipc_bh2": _unipc_variant("bh2"),
}
ALL_SAMPLERS: dict[str, Callable[..., Tensor]] = {**SAMPLERS, **LOW_NFE_SAMPLERS}


def sample(
    name: str,
    noise_fn: NoiseFn,
    schedule: NoiseSchedule,
    x_T: Tensor,
    steps: int,
    noise: PerSampleNoise | None = None,
    **kwargs,
) -> Tensor:
    """Dispatch to ALL_SAMPLERS[name]; `noise` is used only by the stochastic euler_maruyama."""
    if name not in ALL_SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid choices: {sorted(ALL_SAMPLERS)}")
    if name == "euler_maruyama":
        kwargs["noise"] = noise
    return ALL_SAMPLERS[name](noise_fn, schedule, x_T, steps=steps, **kwargs)


def count_nfe(name: str, steps: int, order: int = 3, denoise_final: bool = False, **sampler_kwargs) -> int:
    """Network evaluations of `sample(name, ..., steps, order=order, denoise_final=...,
    **sampler_kwargs)` (before CFG doubling of the batch). `order` matters only to the singlestep
    solvers; the multistep ones and UniPC (its corrector reuses the next step's call) cost `steps`;
    denoise_final adds one call, except for euler_maruyama where it replaces the last step."""
    if name not in ALL_SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid choices: {sorted(ALL_SAMPLERS)}")
    nfe = sum(singlestep_orders(steps, order)) if name in ("dpm_solver", "dpm_solver_pp") else steps
    return nfe + int(bool(denoise_final) and name != "euler_maruyama")
