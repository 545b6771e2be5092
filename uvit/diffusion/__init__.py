"""Diffusion formulations, training loss, classifier-free guidance and samplers, as in the official U-ViT code.

Needs torch only. x_t = alpha_t x0 + sigma_t eps with alpha_t = sqrt(alpha-bar_t); samplers see
continuous time t in [0, 1] and `schedule.model_time(t)` is what the network receives.
"""

from __future__ import annotations

from .guidance import classifier_free_guidance
from .losses import NoiseModel, drop_context, drop_labels, noise_prediction_loss
from .samplers import *  # noqa: F403 (the samplers' public names, listed once in their __all__)
from .samplers import __all__ as _sampler_names
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
    *_sampler_names,
]
