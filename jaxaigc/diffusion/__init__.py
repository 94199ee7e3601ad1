"""Gaussian diffusion (DDPM, improved DDPM, DDIM) for the unCLIP prior and decoder: schedules and
the process's maths in ``schedules``, sampling loops in ``samplers``; the training losses are in
:mod:`jaxaigc.objectives.diffusion`."""

from jaxaigc.diffusion.samplers import (
    classifier_free_guidance,
    dynamic_threshold,
    guided,
    predict,
    sample_ddim,
    sample_ddpm,
    static_clip,
)
from jaxaigc.diffusion.schedules import (
    PREDICTIONS,
    VARIANCES,
    Diffusion,
    cosine_betas,
    linear_betas,
    spaced_timesteps,
)

__all__ = [
    "PREDICTIONS",
    "VARIANCES",
    "Diffusion",
    "classifier_free_guidance",
    "cosine_betas",
    "dynamic_threshold",
    "guided",
    "linear_betas",
    "predict",
    "sample_ddim",
    "sample_ddpm",
    "spaced_timesteps",
    "static_clip",
]
