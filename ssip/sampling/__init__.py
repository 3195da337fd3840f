"""EDM and DPS samplers as pure functions: no Ray, no I/O, per-trial noise and norms.

- :mod:`ssip.sampling.edm`: EDM preconditioning, Karras sigma schedule, :func:`edm_sample`.
- :mod:`ssip.sampling.dps`: :func:`dps_edm`, :func:`dps_ancestral`, :func:`posterior_draws`.
- :mod:`ssip.sampling.noise`: per-(run, trial, draw) generators and frame-stable noise.
"""

from ssip.sampling.dps import (
    PosteriorDraws,
    ddpm_alpha_bars,
    ddpm_sample,
    dps_ancestral,
    dps_edm,
    epsilon_from_denoised,
    posterior_draws,
    residual_norm_grad,
    respaced_timesteps,
    vp_sigma,
)
from ssip.sampling.edm import (
    NonFiniteSampleError,
    c_in,
    c_noise,
    c_out,
    c_skip,
    edm_sample,
    karras_sigmas,
    loss_weight,
    precondition,
)
from ssip.sampling.noise import item_noise, trial_generator, trial_seed

__all__ = [
    "NonFiniteSampleError",
    "PosteriorDraws",
    "c_in",
    "c_noise",
    "c_out",
    "c_skip",
    "ddpm_alpha_bars",
    "ddpm_sample",
    "dps_ancestral",
    "dps_edm",
    "edm_sample",
    "epsilon_from_denoised",
    "item_noise",
    "karras_sigmas",
    "loss_weight",
    "posterior_draws",
    "precondition",
    "residual_norm_grad",
    "respaced_timesteps",
    "trial_generator",
    "trial_seed",
    "vp_sigma",
]
