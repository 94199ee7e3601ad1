"""Gaussian diffusion (DDPM, improved DDPM, DDIM) for the unCLIP prior and decoder: the schedules
and the process's maths; the sampling loops are in :mod:`jaxaigc.sample.diffusion`, the training
losses in :mod:`jaxaigc.objectives.diffusion`."""

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
    "cosine_betas",
    "linear_betas",
    "spaced_timesteps",
]
