"""Diffusion formulations, training loss, classifier-free guidance and samplers (spec section 3).

Needs torch only. x_t = alpha_t x0 + sigma_t eps with alpha_t = sqrt(alpha-bar_t); samplers see
continuous time t in [0, 1] and `schedule.model_time(t)` is what the network receives.
"""

from __future__ import annotations

from .guidance import classifier_free_guidance
from .losses import NoiseModel, drop_context, drop_labels, noise_prediction_loss
from .samplers import (
    ALL_SAMPLERS,
    LOW_NFE_SAMPLERS,
    SAMPLERS,
    SKIP_TYPES,
    NoiseFn,
    PerSampleNoise,
    count_nfe,
    dpm_solver,
    dpm_solver_pp,
    dpm_solver_pp_2m,
    dpm_solver_pp_3m,
    euler_maruyama,
    get_time_steps,
    multistep_orders,
    sample,
    singlestep_orders,
    singlestep_time_points,
    unipc,
    wrap_model,
)
from .schedules import VPSDE, DiscreteSchedule, NoiseSchedule, make_schedule

__all__ = [
    "NoiseSchedule",
    "VPSDE",
    "DiscreteSchedule",
    "make_schedule",
    "NoiseModel",
    "noise_prediction_loss",
    "drop_labels",
    "drop_context",
    "classifier_free_guidance",
    "NoiseFn",
    "wrap_model",
    "PerSampleNoise",
    "get_time_steps",
    "singlestep_orders",
    "singlestep_time_points",
    "euler_maruyama",
    "dpm_solver",
    "dpm_solver_pp",
    "dpm_solver_pp_2m",
    "dpm_solver_pp_3m",
    "unipc",
    "multistep_orders",
    "SKIP_TYPES",
    "SAMPLERS",
    "LOW_NFE_SAMPLERS",
    "ALL_SAMPLERS",
    "sample",
    "count_nfe",
]
