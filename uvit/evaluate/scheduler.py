"""A diffusers scheduler for U-ViT's samplers (those of the official U-ViT code): config + whole-trajectory sampling.

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

The multistep DPM-Solver++(2M) and (3M) *do* fit the per-timestep contract (one evaluation per
grid point, on the trajectory), so for those solvers a diffusers-style loop works as well:

    scheduler.set_timesteps(25)
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t, y=y), t, x).prev_sample

and is bit-identical to `scheduler.sample(...)` (same formulas, same float64 coefficients).
UniPC does not: its corrector rewrites the previous step's result with the next network call.

Stock diffusers schedulers (DPMSolverMultistepScheduler, DDIMScheduler, UniPCMultistepScheduler, ...)
are a different thing: `UViTPipeline` runs them with its own step loop on the discrete schedule. This
scheduler's config carries diffusers' beta keys (`DIFFUSERS_BETAS`) so that
`DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)` builds one on the model's betas.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import ConfigMixin, SchedulerMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput
from torch import Tensor

from uvit.diffusion import ALL_SAMPLERS, NoiseFn, PerSampleNoise, count_nfe, make_schedule, multistep_orders, sample
from uvit.diffusion import SKIP_TYPES as SAMPLER_SKIP_TYPES
from uvit.diffusion.samplers import _ExpIntegrator, _f64, get_time_steps
from uvit.diffusion.schedules import NoiseSchedule
from uvit.signatures import takes_fields

__all__ = [
    "UViTDPMSolverScheduler",
    "UViTSchedulerOutput",
    "SolverConfig",
    "SOLVERS",
    "STEP_SOLVERS",
    "SCHEDULES",
    "SKIP_TYPES",
    "DIFFUSERS_BETAS",
]

SOLVERS: tuple[str, ...] = tuple(ALL_SAMPLERS)  # every sampler of uvit.diffusion
STEP_SOLVERS: tuple[str, ...] = ("dpm_solver_pp_2m", "dpm_solver_pp_3m")  # those with a step() loop
SCHEDULES: tuple[str, ...] = ("vpsde", "discrete")
SKIP_TYPES: tuple[str, ...] = SAMPLER_SKIP_TYPES

# Which sampler keyword arguments each solver takes (besides noise_fn, schedule, x_T, steps, noise).
_SOLVER_KWARGS: dict[str, tuple[str, ...]] = {
    "euler_maruyama": ("skip_type", "t_end", "denoise_final"),
    "dpm_solver": ("order", "skip_type", "t_end", "denoise_final"),
    "dpm_solver_pp": ("order", "skip_type", "t_end", "denoise_final"),
    "dpm_solver_pp_2m": ("skip_type", "t_end", "lower_order_final", "denoise_final"),
    "dpm_solver_pp_3m": ("skip_type", "t_end", "lower_order_final", "denoise_final"),
    "unipc_bh1": ("order", "skip_type", "t_end", "lower_order_final", "denoise_final"),
    "unipc_bh2": ("order", "skip_type", "t_end", "lower_order_final", "denoise_final"),
}
assert set(_SOLVER_KWARGS) == set(SOLVERS), "a sampler of uvit.diffusion is missing from _SOLVER_KWARGS"

# diffusers' beta keys for each schedule, so `DPMSolverMultistepScheduler.from_config(ours.config)`
# builds a stock scheduler on the same betas. "discrete" IS diffusers' scaled-linear schedule;
# "vpsde" has no discrete equivalent (its keys are the DDPM chain the SDE is the limit of, and
# UViTPipeline refuses stock schedulers on it).
DIFFUSERS_BETAS: dict[str, dict] = {
    "discrete": dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"),
    "vpsde": dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear"),
}


@dataclass
class UViTSchedulerOutput(BaseOutput):
    """Output of `UViTDPMSolverScheduler.step` (the diffusers `SchedulerOutput` shape)."""

    prev_sample: Tensor


@dataclass(frozen=True)
class SolverConfig:
    """The config of a `UViTDPMSolverScheduler` (its `__init__` arguments and config keys), checked.

    schedule: "vpsde" (continuous linear VP SDE, network time 999 t) or "discrete"
        (Stable-Diffusion scaled-linear betas, network time n = 1000 t). None: the schedule
        whose diffusers beta keys are given (so `from_config(stock_scheduler.config)` works),
        else "vpsde".
    solver: any sampler of `uvit.diffusion.ALL_SAMPLERS`: "dpm_solver" (singlestep
        DPM-Solver-fast, noise prediction: the continuous models' official sampler),
        "dpm_solver_pp" (singlestep DPM-Solver++, data prediction: the discrete models'
        official sampler), "dpm_solver_pp_2m" / "dpm_solver_pp_3m" (multistep),
        "unipc_bh1" / "unipc_bh2" (UniPC predictor-corrector) or "euler_maruyama" (reverse
        SDE; needs per-sample noise and schedule "vpsde").
    order: order of the singlestep solvers and UniPC (1, 2 or 3); None keeps the sampler's
        default (3 for the singlestep solvers, 2 for UniPC). Ignored by the others.
    skip_type: time grid ("logSNR", "time_uniform", "time_quadratic"); None keeps the
        sampler's own default (time_uniform for dpm_solver_pp and euler_maruyama, else logSNR).
    t_end: last time of the grid; None keeps the sampler's default (the schedule's
        `default_t_end` for the ODE solvers, 1e-3 for euler_maruyama).
    lower_order_final: (multistep and UniPC) lower the orders of the last steps, as the
        samplers do.
    denoise_final: end with the x0 prediction at t_end (one more network call for the ODE
        solvers; replaces the last step of euler_maruyama).
    num_train_timesteps, beta_start, beta_end, beta_schedule: diffusers' names for the
        schedule's betas (see `DIFFUSERS_BETAS`), filled in from `schedule`; given values must
        agree with it. They let a stock diffusers scheduler be built `from_config` of this one.
    prediction_type: what the network predicts; U-ViT predicts noise, so only "epsilon".
    clip_sample: always False (no sampler clips x0); recorded so that e.g.
        `DDIMScheduler.from_config` does not clip latents by its own default.
    """

    schedule: str | None = None
    solver: str = "dpm_solver"
    order: int | None = None
    skip_type: str | None = None
    t_end: float | None = None
    lower_order_final: bool = True
    denoise_final: bool = False
    num_train_timesteps: int | None = None
    beta_start: float | None = None
    beta_end: float | None = None
    beta_schedule: str | None = None
    prediction_type: str = "epsilon"
    clip_sample: bool = False

    @property
    def given_betas(self) -> dict:
        """The diffusers beta keys that were given (not None)."""
        keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}

    @property
    def resolved_schedule(self) -> str:
        """`schedule`, or when None the schedule whose diffusers beta keys are given, else "vpsde"."""
        if self.schedule is not None:
            return self.schedule
        given = self.given_betas
        matches = [name for name, betas in DIFFUSERS_BETAS.items() if given and _betas_agree(given, betas)]
        return matches[0] if matches else "vpsde"

    def __post_init__(self) -> None:
        schedule, solver, order = self.resolved_schedule, self.solver, self.order
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule={schedule!r}: valid choices are {SCHEDULES}")
        if not _betas_agree(self.given_betas, DIFFUSERS_BETAS[schedule]):
            raise ValueError(
                f"beta keys {self.given_betas} disagree with schedule={schedule!r}, whose betas are "
                f"{DIFFUSERS_BETAS[schedule]}"
            )
        if solver not in SOLVERS:
            raise ValueError(f"solver={solver!r}: valid choices are {SOLVERS}")
        if order is not None and order not in (1, 2, 3):
            raise ValueError(f"order={order!r}: must be 1, 2, 3 or None")
        if self.skip_type is not None and self.skip_type not in SKIP_TYPES:
            raise ValueError(f"skip_type={self.skip_type!r}: valid choices are {SKIP_TYPES} or None")
        if solver == "euler_maruyama" and schedule != "vpsde":
            raise ValueError("euler_maruyama integrates the continuous VP SDE: it needs schedule='vpsde'")
        if self.prediction_type != "epsilon":
            raise ValueError(f"prediction_type={self.prediction_type!r}: U-ViT networks predict noise ('epsilon')")
        if self.clip_sample:
            raise ValueError("clip_sample=True: U-ViT's samplers never clip the x0 prediction")


class UViTDPMSolverScheduler(SchedulerMixin, ConfigMixin):
    """U-ViT's samplers behind diffusers' scheduler API; its arguments are `SolverConfig`'s fields."""

    _compatibles: list[str] = []
    order = 1  # diffusers' "model evaluations per step()" class attribute (not the solver's order)

    @register_to_config
    @takes_fields(SolverConfig)  # the config keys are SolverConfig's fields, declared and checked there
    def __init__(self, cfg: SolverConfig):
        schedule = cfg.resolved_schedule
        self.register_to_config(schedule=schedule, **DIFFUSERS_BETAS[schedule])
        # diffusers' from_config drops keys listed as "defaults used": the beta keys must reach a
        # stock scheduler built from this config (saved JSON files never carry the list)
        shared = {"schedule", "prediction_type", "clip_sample", *DIFFUSERS_BETAS[schedule]}
        used = [k for k in self.config.get("_use_default_values", []) if k not in shared]
        self.register_to_config(_use_default_values=used)
        self.noise_schedule: NoiseSchedule = make_schedule(schedule)
        self.init_noise_sigma = 1.0  # x_T ~ N(0, I) for a VP schedule
        self.num_inference_steps: int | None = None
        self.timesteps: Tensor = torch.empty(0)
        self.continuous_timesteps: Tensor = torch.empty(0, dtype=torch.float64)
        self._grid: list[float] = []  # step(): the steps + 1 continuous times it walks
        self._orders: list[int] = []  # step(): each step's order
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
        return cls(schedule=schedule, solver=solver, order=3)

    # ------------------------------------------------------------------ sampling
    @property
    def sampler_kwargs(self) -> dict:
        """Keyword arguments this config hands to `uvit.diffusion.sample` (None = sampler default)."""
        c = self.config
        kwargs = {
            "order": c.order,
            "skip_type": c.skip_type,
            "t_end": c.t_end,
            "lower_order_final": c.lower_order_final,
            "denoise_final": c.denoise_final,
        }
        return {k: kwargs[k] for k in _SOLVER_KWARGS[c.solver] if kwargs[k] is not None}

    @property
    def has_step_loop(self) -> bool:
        """Whether `step()` can drive this solver (one network call per step, on the trajectory)."""
        return self.config.solver in STEP_SOLVERS

    def num_model_evaluations(self, num_inference_steps: int) -> int:
        """Network evaluations of one `sample` call (before the CFG doubling of the batch)."""
        c = self.config
        return count_nfe(
            c.solver, num_inference_steps, 3 if c.order is None else c.order, denoise_final=c.denoise_final
        )

    def sample(
        self, noise_fn: NoiseFn, x_T: Tensor, num_inference_steps: int, noise: PerSampleNoise | None = None
    ) -> Tensor:
        """Run the configured sampler from x_T (B, ...) to x_0 with `num_inference_steps` steps.

        noise_fn(x, t) -> eps takes CONTINUOUS time t in [0, 1]; build it from a network with
        `uvit.diffusion.wrap_model(net, scheduler.noise_schedule)`. `noise` (one generator per
        sample) is required by euler_maruyama only.
        """
        if self.config.solver == "euler_maruyama" and noise is None:
            raise ValueError("solver 'euler_maruyama' needs `noise` (a PerSampleNoise) for its Brownian increments")
        return sample(
            self.config.solver,
            noise_fn,
            self.noise_schedule,
            x_T,
            num_inference_steps,
            noise=noise,
            **self.sampler_kwargs,
        )

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
        if self.has_step_loop:
            kw = self.sampler_kwargs
            t_end = self.noise_schedule.default_t_end if kw.get("t_end") is None else kw["t_end"]
            self._grid = get_time_steps(
                self.noise_schedule,
                kw.get("skip_type", "logSNR"),
                self.noise_schedule.t_max,
                t_end,
                num_inference_steps,
            ).tolist()
            max_order = {"dpm_solver_pp_2m": 2, "dpm_solver_pp_3m": 3}[self.config.solver]
            # both samplers lower their final orders below 10 steps only (dpm_solver_pp_2m's rule)
            self._orders = multistep_orders(num_inference_steps, max_order, self.config.lower_order_final, 10)
        self._step_index = 0
        self._history = []

    # ------------------------------------------------------------------ diffusers loop (multistep only)
    def scale_model_input(self, sample: Tensor, timestep: Tensor | float | None = None) -> Tensor:
        """Identity: VP samplers feed x_t to the network unscaled."""
        return sample

    def step(
        self, model_output: Tensor, timestep: Tensor | float, sample: Tensor, return_dict: bool = True, **_: object
    ) -> UViTSchedulerOutput | tuple[Tensor]:
        """One DPM-Solver++(2M / 3M) step from timesteps[i] to the next grid point, or, with
        denoise_final, after the last one the x0 prediction at t_end.

        model_output: the network's eps prediction at (sample, timestep). The singlestep solvers,
        UniPC and euler_maruyama raise NotImplementedError: use `sample()` (see the module docstring).
        """
        c = self.config
        if not self.has_step_loop:
            raise NotImplementedError(
                f"step() exists only for solvers {STEP_SOLVERS}; {c.solver!r} evaluates the network at "
                "intermediate states off the trajectory grid or corrects a step with the next call, so "
                "drive it with scheduler.sample(noise_fn, x_T, steps)"
            )
        if self.num_inference_steps is None:
            raise RuntimeError("call set_timesteps(num_inference_steps) before step()")
        i, n = self._step_index, self.num_inference_steps
        if i >= len(self.timesteps):
            raise RuntimeError(
                f"all {len(self.timesteps)} steps are done; call set_timesteps() to start a new trajectory"
            )
        expected = float(self.timesteps[i])
        if abs(float(torch.as_tensor(timestep)) - expected) > 1e-3 * max(1.0, abs(expected)):
            raise ValueError(f"step {i} expects timestep {expected}, got {float(torch.as_tensor(timestep))}")
        sched = self.noise_schedule
        s = self._grid[i]
        alpha, sigma = _f64(sched.alpha, s), _f64(sched.sigma, s)
        m_s = (sample - sigma * model_output) / alpha  # data prediction, as _ExpIntegrator.model
        self._step_index += 1
        if i == n:  # denoise_final: the extra call at t_end returns its x0 prediction
            return UViTSchedulerOutput(prev_sample=m_s) if return_dict else (m_s,)
        solver = _ExpIntegrator(None, sched, predict_x0=True)
        self._history = self._history[-2:] + [(s, m_s)]
        t, k = self._grid[i + 1], self._orders[i]
        if k == 1:
            x = solver.first(sample, s, t, m_s=m_s)
        elif k == 2:
            x = solver.multistep_second(sample, self._history[-2], self._history[-1], t)
        else:
            x = solver.multistep_third(sample, self._history, t)
        return UViTSchedulerOutput(prev_sample=x) if return_dict else (x,)

    def __len__(self) -> int:
        return self.noise_schedule.n_steps if self.config.schedule == "discrete" else 1000


def _betas_agree(given: dict, betas: dict) -> bool:
    """Whether the given diffusers beta keys (any subset) match a schedule's."""
    for k, v in given.items():
        want = betas[k]
        if isinstance(want, float) and not (isinstance(v, (int, float)) and abs(v - want) <= 1e-9 * want):
            return False
        if not isinstance(want, float) and v != want:
            return False
    return True
