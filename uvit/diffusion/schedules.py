"""Variance-preserving noise schedules of the official U-ViT code.

Notation (DPM-Solver's): x_t = alpha_t * x0 + sigma_t * eps, with alpha_t the *square root* of
the spec's alpha-bar, sigma_t = sqrt(1 - alpha_t^2) and lambda_t = log(alpha_t) - log(sigma_t)
(the half log-SNR). Time t is continuous in [0, 1]; `model_time` maps it to what the network
was trained to see (999 t for the VP SDE, 1000 t = n for the discrete schedule).

All arithmetic runs in float64 and results come back in the input's dtype, because the
samplers difference nearby lambdas and invert lambda, where float32 loses digits.
"""

from __future__ import annotations

import abc
import math

import torch
from torch import Tensor

__all__ = ["NoiseSchedule", "VPSDE", "DiscreteSchedule", "make_schedule"]


def _as_f64(t: Tensor | float) -> tuple[Tensor, torch.dtype]:
    """Return (t in float64, dtype to hand results back in)."""
    t = torch.as_tensor(t)
    out_dtype = t.dtype if t.is_floating_point() else torch.get_default_dtype()
    return t.to(torch.float64), out_dtype


class NoiseSchedule(abc.ABC):
    """A VP schedule given by log(alpha_t); everything else derives from it."""

    name: str
    t_max: float = 1.0  # sampling starts here
    default_t_end: float  # samplers stop here by default

    @abc.abstractmethod
    def _log_alpha64(self, t: Tensor) -> Tensor:
        """log(alpha_t) for float64 t, any shape."""

    def log_alpha(self, t: Tensor) -> Tensor:
        """log(alpha_t), same shape and dtype as t."""
        t64, dt = _as_f64(t)
        return self._log_alpha64(t64).to(dt)

    def alpha(self, t: Tensor) -> Tensor:
        t64, dt = _as_f64(t)
        return self._log_alpha64(t64).exp().to(dt)

    def sigma(self, t: Tensor) -> Tensor:
        # sqrt(-expm1(2 log alpha)) keeps precision near t=0, where 1 - alpha^2 cancels.
        t64, dt = _as_f64(t)
        return torch.sqrt(-torch.expm1(2.0 * self._log_alpha64(t64))).to(dt)

    def log_snr(self, t: Tensor) -> Tensor:
        """lambda_t = log(alpha_t) - log(sigma_t) (half log-SNR)."""
        t64, dt = _as_f64(t)
        la = self._log_alpha64(t64)
        return (la - 0.5 * torch.log(-torch.expm1(2.0 * la))).to(dt)

    @staticmethod
    def _log_alpha_of_lambda(lam: Tensor) -> Tensor:
        # alpha^2 = sigmoid(2 lambda)  =>  log alpha = -0.5 * log(1 + exp(-2 lambda))
        return -0.5 * torch.logaddexp(torch.zeros_like(lam), -2.0 * lam)

    @abc.abstractmethod
    def inverse_log_snr(self, lam: Tensor) -> Tensor:
        """t such that lambda_t = lam, same shape and dtype as lam."""

    @abc.abstractmethod
    def model_time(self, t: Tensor) -> Tensor:
        """The network's time input for continuous time t."""

    @abc.abstractmethod
    def sample_train_time(
        self, batch: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> Tensor:
        """Training times, shape (batch,), float32."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _rand_on(batch: int, generator: torch.Generator | None, device) -> Tensor:
    # Draw on the generator's device (a CPU generator cannot fill a CUDA tensor), then move.
    src = generator.device if generator is not None else device
    return torch.rand(batch, generator=generator, device=src).to(device)


class VPSDE(NoiseSchedule):
    """Linear VP SDE: beta(t) = beta_0 + t (beta_1 - beta_0), t in [0, 1] (the pixel-space benchmarks)."""

    name = "vpsde"
    default_t_end = 1e-4  # DPM-Solver's eps for the continuous models

    def __init__(self, beta_0: float = 0.1, beta_1: float = 20.0):
        self.beta_0 = float(beta_0)
        self.beta_1 = float(beta_1)

    def beta(self, t: Tensor) -> Tensor:
        t64, dt = _as_f64(t)
        return (self.beta_0 + t64 * (self.beta_1 - self.beta_0)).to(dt)

    def _log_alpha64(self, t: Tensor) -> Tensor:
        return -0.25 * (self.beta_1 - self.beta_0) * t**2 - 0.5 * self.beta_0 * t

    def inverse_log_snr(self, lam: Tensor) -> Tensor:
        # Solve (b1-b0)/2 t^2 + b0 t = -2 log alpha = log(1 + e^{-2 lam}) =: c for t >= 0, in the
        # cancellation-free form t = 2c / (b0 + sqrt(b0^2 + 2 (b1-b0) c)).
        lam64, dt = _as_f64(lam)
        c = torch.logaddexp(torch.zeros_like(lam64), -2.0 * lam64)
        db = self.beta_1 - self.beta_0
        t = 2.0 * c / (self.beta_0 + torch.sqrt(self.beta_0**2 + 2.0 * db * c))
        return t.to(dt)

    def model_time(self, t: Tensor) -> Tensor:
        return 999.0 * t  # ScoreModel.predict feeds t * 999

    def sample_train_time(self, batch, generator=None, device=None):
        return _rand_on(batch, generator, device)

    def __repr__(self) -> str:
        return f"VPSDE(beta_0={self.beta_0}, beta_1={self.beta_1})"


def _interp(x: Tensor, xp: Tensor, yp: Tensor) -> Tensor:
    """Piecewise-linear y(x) through (xp, yp), xp increasing, extended linearly past both ends
    (like DPM-Solver's interpolate_fn). x: any shape."""
    k = xp.numel()
    idx = torch.searchsorted(xp, x.reshape(-1).contiguous()).clamp(1, k - 1)
    x0, x1, y0, y1 = xp[idx - 1], xp[idx], yp[idx - 1], yp[idx]
    y = y0 + (x.reshape(-1) - x0) * (y1 - y0) / (x1 - x0)
    return y.reshape(x.shape)


class DiscreteSchedule(NoiseSchedule):
    """Stable-Diffusion "scaled linear" betas over N=1000 steps (the latent benchmarks).

    Step n (1..N) sits at t_n = n/N; log(alpha_t) interpolates 0.5 * cumsum(log(1 - beta))
    linearly between the knots, which is what dpm_solver_pp.py's NoiseScheduleVP does.
    """

    name = "discrete"
    default_t_end = 1e-3  # = t_1, the first training step

    def __init__(self, n_steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012):
        self.n_steps = int(n_steps)
        self.betas = torch.linspace(math.sqrt(beta_start), math.sqrt(beta_end), self.n_steps, dtype=torch.float64) ** 2
        self.log_alphas = 0.5 * torch.log1p(-self.betas).cumsum(0)  # knots' log alpha, (N,)
        self.t_knots = torch.arange(1, self.n_steps + 1, dtype=torch.float64) / self.n_steps  # (N,)
        self._cache: dict[torch.device, tuple[Tensor, Tensor]] = {}

    @property
    def alphas_cumprod(self) -> Tensor:
        """The spec's alpha-bar_n, n = 1..N, float64."""
        return torch.exp(2.0 * self.log_alphas)

    def _knots(self, device: torch.device) -> tuple[Tensor, Tensor]:
        if device not in self._cache:
            self._cache[device] = (self.t_knots.to(device), self.log_alphas.to(device))
        return self._cache[device]

    def _log_alpha64(self, t: Tensor) -> Tensor:
        tk, la = self._knots(t.device)
        return _interp(t, tk, la)

    def inverse_log_snr(self, lam: Tensor) -> Tensor:
        lam64, dt = _as_f64(lam)
        tk, la = self._knots(lam64.device)
        # log alpha decreases with t; flip so the abscissae increase.
        t = _interp(self._log_alpha_of_lambda(lam64), la.flip(0), tk.flip(0))
        return t.to(dt)

    def model_time(self, t: Tensor) -> Tensor:
        # t = n/N maps to the integer n seen in training. float32(n/N) is off by up to an ulp,
        # so snap products within 1e-4 of an integer (float32 error is ~6e-5 at n=1000);
        # fractional sampling times (e.g. 980.02) are left alone.
        t64, dt = _as_f64(t)
        m = t64 * self.n_steps
        r = m.round()
        return torch.where((m - r).abs() < 1e-4, r, m).to(dt)

    def sample_train_time(self, batch, generator=None, device=None):
        src = generator.device if generator is not None else device
        n = torch.randint(1, self.n_steps + 1, (batch,), generator=generator, device=src)
        return (n.to(torch.float64) / self.n_steps).to(device=device, dtype=torch.float32)

    def __repr__(self) -> str:
        return f"DiscreteSchedule(n_steps={self.n_steps})"


_SCHEDULES = {"vpsde": VPSDE, "discrete": DiscreteSchedule}


def make_schedule(name: str) -> NoiseSchedule:
    """Build a schedule by name: "vpsde" (continuous) or "discrete"."""
    if name not in _SCHEDULES:
        raise ValueError(f"unknown noise schedule {name!r}; valid choices: {sorted(_SCHEDULES)}")
    return _SCHEDULES[name]()
