"""A diffusers scheduler for U-ViT's samplers (spec section 3): config + whole-trajectory sampling.

`UViTDPMSolverScheduler` is a `SchedulerMixin`/`ConfigMixin`, so it is saved and loaded with
`save_pretrained`/`from_pretrained` (`scheduler_config.json`), rebuilt with
`from_config(cfg, solver=...)` and swapped inside a `UViTPipeline` like any diffusers scheduler.

Why `sample()` instead of diffusers' per-timestep `step()`
-------------------------------------------------------------
diffusers pipelines drive a scheduler from outside: `for t in scheduler.timesteps: eps = unet(x, t);
x = scheduler.step(eps, t, x)`. That contract assumes every network evaluation happens at a point of
a grid fixed in advance and that one evaluation advances x by one grid interval. The paper's
solver, singlestep DPM-Solver-fast (orders [3]*16 + [2]), breaks both assumptions: a third-order
step from s to t evaluates the network at s, then at an intermediate point s1 on an *intermediate
state* x_s1 (not a point of the trajectory), then at s2 on x_s2, and only then produces x_t. The
intermediate states are private to the step, so a `step()` would have to return them as "samples"
and keep a hidden stage machine, and `timesteps` would mix trajectory points and stage points.
diffusers' own DPMSolverSinglestepScheduler avoids this by *changing the algorithm* (it turns the
singlestep solver into lower-order steps on a fixed grid using past outputs), which would no
longer reproduce the official sampler.

So this scheduler owns the configuration and delegates the whole trajectory to
`uvit.diffusion.sample` (the single implementation the rest of the project, and its tests, use):

    x0 = scheduler.sample(noise_fn, x_T, num_inference_steps, noise=PerSampleNoise(seeds))

`set_timesteps(n)` still fills `self.timesteps` with the exact model-time values the sampler will
feed the network, in order, one per network evaluation (found by a dry run of the sampler with a
recording zero model on a 1-element tensor, so they cannot drift from the sampler's own grid).

The multistep DPM-Solver++(2M) *does* fit the per-timestep contract (one evaluation per grid point,
on the trajectory), so for `solver="dpm_solver_pp_2m"` a diffusers-style loop works as well:

    scheduler.set_timesteps(25)
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t, y=y), t, x).prev_sample

and is bit-identical to `scheduler.sample(...)` (same formulas, same float64 coefficients).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import ConfigMixin, SchedulerMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput
from torch import Tensor

from uvit.diffusion import NoiseFn, PerSampleNoise, count_nfe, make_schedule, sample
from uvit.diffusion.samplers import _ExpIntegrator, _f64, get_time_steps
from uvit.diffusion.schedules import NoiseSchedule

__all__ = ["UViTDPMSolverScheduler", "UViTSchedulerOutput", "SOLVERS", "SCHEDULES", "SKIP_TYPES"]

SOLVERS: tuple[str, ...] = ("dpm_solver", "dpm_solver_pp", "dpm_solver_pp_2m", "euler_maruyama")
SCHEDULES: tuple[str, ...] = ("vpsde", "discrete")
SKIP_TYPES: tuple[str, ...] = ("logSNR", "time_uniform", "time_quadratic")

# Which sampler keyword arguments each solver takes (besides noise_fn, schedule, x_T, steps).
_SOLVER_KWARGS: dict[str, tuple[str, ...]] = {
    "dpm_solver": ("order", "skip_type", "t_end"),
    "dpm_solver_pp": ("order", "skip_type", "t_end"),
    "dpm_solver_pp_2m": ("skip_type", "t_end"),
    "euler_maruyama": ("t_end",),
}


@dataclass
class UViTSchedulerOutput(BaseOutput):
    """Output of `UViTDPMSolverScheduler.step` (the diffusers `SchedulerOutput` shape)."""

    prev_sample: Tensor


class UViTDPMSolverScheduler(SchedulerMixin, ConfigMixin):
    """U-ViT's samplers behind diffusers' scheduler API.

    Args:
        schedule: "vpsde" (continuous linear VP SDE, network time 999 t) or "discrete"
            (Stable-Diffusion scaled-linear betas, network time n = 1000 t).
        solver: "dpm_solver" (singlestep DPM-Solver-fast, noise prediction: the continuous
            models' official sampler), "dpm_solver_pp" (singlestep DPM-Solver++, data prediction:
            the discrete models' official sampler), "dpm_solver_pp_2m" (multistep 2M) or
            "euler_maruyama" (reverse SDE; needs per-sample noise).
        order: order of the singlestep solvers (1, 2 or 3); ignored by the other two.
        skip_type: time grid ("logSNR", "time_uniform", "time_quadratic"); None keeps the
            sampler's own default (logSNR for dpm_solver / 2M, time_uniform for dpm_solver_pp).
            Ignored by euler_maruyama.
        t_end: last time of the grid; None keeps the sampler's default (the schedule's
            `default_t_end` for DPM-Solvers, 1e-3 for euler_maruyama).
        lower_order_final: (2M only) first-order last step when fewer than 10 steps.
    """

    _compatibles: list[str] = []
    order = 1  # diffusers' "model evaluations per step()" class attribute (see `solver_order`)

    @register_to_config
    def __init__(
        self,
        schedule: str = "vpsde",
        solver: str = "dpm_solver",
        order: int = 3,
        skip_type: str | None = None,
        t_end: float | None = None,
        lower_order_final: bool = True,
    ):
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule={schedule!r}: valid choices are {SCHEDULES}")
        if solver not in SOLVERS:
            raise ValueError(f"solver={solver!r}: valid choices are {SOLVERS}")
        if order not in (1, 2, 3):
            raise ValueError(f"order={order!r}: must be 1, 2 or 3")
        if skip_type is not None and skip_type not in SKIP_TYPES:
            raise ValueError(f"skip_type={skip_type!r}: valid choices are {SKIP_TYPES} or None")
        if solver == "euler_maruyama" and schedule != "vpsde":
            raise ValueError("euler_maruyama integrates the continuous VP SDE: it needs schedule='vpsde'")
        self.noise_schedule: NoiseSchedule = make_schedule(schedule)
        self.init_noise_sigma = 1.0  # x_T ~ N(0, I) for a VP schedule
        self.num_inference_steps: int | None = None
        self.timesteps: Tensor = torch.empty(0)
        self.continuous_timesteps: Tensor = torch.empty(0, dtype=torch.float64)
        self._grid: list[float] = []  # 2M: the steps + 1 continuous times step() walks
        self._step_index = 0
        self._history: list[tuple[float, Tensor]] = []

    # ------------------------------------------------------------------ presets
    @classmethod
    def official(cls, schedule: str) -> UViTDPMSolverScheduler:
        """The paper's sampler for a schedule: DPM-Solver (order 3, logSNR, t_end 1e-4) for the
        continuous VP SDE, DPM-Solver++ (order 3, time-uniform, t_end 1e-3) for the discrete one."""
        solver = {"vpsde": "dpm_solver", "discrete": "dpm_solver_pp"}.get(schedule)
        if solver is None:
            raise ValueError(f"schedule={schedule!r}: valid choices are {SCHEDULES}")
        return cls(schedule=schedule, solver=solver)

    # ------------------------------------------------------------------ sampling
    @property
    def sampler_kwargs(self) -> dict:
        """Keyword arguments this config hands to `uvit.diffusion.sample` (None = sampler default)."""
        c = self.config
        kwargs = {"order": c.order, "skip_type": c.skip_type, "t_end": c.t_end}
        out = {k: kwargs[k] for k in _SOLVER_KWARGS[c.solver] if kwargs[k] is not None}
        if c.solver == "dpm_solver_pp_2m":
            out["lower_order_final"] = c.lower_order_final
        return out

    def num_model_evaluations(self, num_inference_steps: int) -> int:
        """Network evaluations of one `sample` call (before the CFG doubling of the batch)."""
        return count_nfe(self.config.solver, num_inference_steps, self.config.order)

    def sample(self, noise_fn: NoiseFn, x_T: Tensor, num_inference_steps: int,
               noise: PerSampleNoise | None = None) -> Tensor:
        """Run the configured sampler from x_T (B, ...) to x_0 with `num_inference_steps` steps.

        noise_fn(x, t) -> eps takes CONTINUOUS time t in [0, 1]; build it from a network with
        `uvit.diffusion.wrap_model(net, scheduler.noise_schedule)`. `noise` (one generator per
        sample) is required by euler_maruyama only.
        """
        if self.config.solver == "euler_maruyama" and noise is None:
            raise ValueError("solver 'euler_maruyama' needs `noise` (a PerSampleNoise) for its Brownian increments")
        return sample(self.config.solver, noise_fn, self.noise_schedule, x_T, num_inference_steps,
                      noise=noise, **self.sampler_kwargs)

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Fill `self.timesteps` (float32 network times, one per model evaluation, in call order)
        and `self.continuous_timesteps` (the same points as continuous t, float64)."""
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        seen: list[float] = []

        def record(x: Tensor, t: Tensor) -> Tensor:
            seen.append(float(t[0]))
            return torch.zeros_like(x)

        x = torch.zeros(1, 1)
        noise = PerSampleNoise([0]) if self.config.solver == "euler_maruyama" else None
        self.sample(record, x, num_inference_steps, noise=noise)
        t32 = torch.tensor(seen, dtype=torch.float32)  # what the samplers hand noise_fn
        self.continuous_timesteps = torch.tensor(seen, dtype=torch.float64)
        self.timesteps = self.noise_schedule.model_time(t32).to(device)
        self.num_inference_steps = num_inference_steps
        if self.config.solver == "dpm_solver_pp_2m":
            kw = self.sampler_kwargs
            t_end = self.noise_schedule.default_t_end if kw.get("t_end") is None else kw["t_end"]
            self._grid = get_time_steps(self.noise_schedule, kw.get("skip_type", "logSNR"),
                                        self.noise_schedule.t_max, t_end, num_inference_steps).tolist()
        self._step_index = 0
        self._history = []

    # ------------------------------------------------------------------ diffusers loop (2M only)
    def scale_model_input(self, sample: Tensor, timestep: Tensor | float | None = None) -> Tensor:
        """Identity: VP samplers feed x_t to the network unscaled."""
        return sample

    def step(self, model_output: Tensor, timestep: Tensor | float, sample: Tensor,
             return_dict: bool = True) -> UViTSchedulerOutput | tuple[Tensor]:
        """One DPM-Solver++(2M) step from timesteps[i] to the next grid point (2M solver only).

        model_output: the network's eps prediction at (sample, timestep). The singlestep solvers
        and euler_maruyama raise NotImplementedError: use `sample()` (see the module docstring).
        """
        c = self.config
        if c.solver != "dpm_solver_pp_2m":
            raise NotImplementedError(
                f"step() exists only for solver='dpm_solver_pp_2m'; {c.solver!r} evaluates the network at "
                "intermediate states off the trajectory grid, so drive it with scheduler.sample(noise_fn, x_T, steps)")
        if self.num_inference_steps is None:
            raise RuntimeError("call set_timesteps(num_inference_steps) before step()")
        i, n = self._step_index, self.num_inference_steps
        if i >= n:
            raise RuntimeError(f"all {n} steps are done; call set_timesteps() to start a new trajectory")
        expected = float(self.timesteps[i])
        if abs(float(torch.as_tensor(timestep)) - expected) > 1e-3 * max(1.0, abs(expected)):
            raise ValueError(f"step {i} expects timestep {expected}, got {float(torch.as_tensor(timestep))}")
        sched = self.noise_schedule
        solver = _ExpIntegrator(None, sched, predict_x0=True)
        s, t = self._grid[i], self._grid[i + 1]
        alpha, sigma = _f64(sched.alpha, s), _f64(sched.sigma, s)
        m_s = (sample - sigma * model_output) / alpha  # data prediction, as _ExpIntegrator.model
        if not self._history or (c.lower_order_final and n < 10 and i + 1 == n):
            x = solver.first(sample, s, t, m_s=m_s)
        else:
            x = solver.multistep_second(sample, self._history[-1], (s, m_s), t)
        self._history = [(s, m_s)]
        self._step_index += 1
        return UViTSchedulerOutput(prev_sample=x) if return_dict else (x,)

    def __len__(self) -> int:
        return self.noise_schedule.n_steps if self.config.schedule == "discrete" else 1000

