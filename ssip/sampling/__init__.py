"""EDM and DPS samplers as pure functions: no Ray, no I/O, per-trial noise and norms.

- :mod:`ssip.sampling.edm`: EDM preconditioning, Karras sigma schedule, and :func:`edm_sample`,
  the one Euler/Heun loop (Karras et al. 2022, Algorithm 2), unconditional or with a guidance
  callable (:data:`Guidance`).
- :mod:`ssip.sampling.dps`: DPS's shared pieces, the production rule :func:`gaussian_score` and
  :func:`posterior_draws`.
- :mod:`ssip.sampling.reference`: the reference rules (``zeta``, ``xi``) and the paper's DDPM
  ancestral sampler, for tests, benchmarks and DecodeConfig's switches.
- :mod:`ssip.sampling.guided`: :func:`make_guidance` / :func:`dps_edm` (a rule by keyword).
- :mod:`ssip.sampling.noise`: per-(run, trial, draw) generators and frame-stable noise.
"""

from ssip.sampling.dps import (
    GUIDANCE_RULES,
    PosteriorDraws,
    check_guidance_rule,
    dps_gradient,
    gaussian_score,
    posterior_draws,
    residual_norm_grad,
)
from ssip.sampling.edm import (
    Guidance,
    Guided,
    NonFiniteSampleError,
    StepContext,
    c_in,
    c_noise,
    c_out,
    c_skip,
    edm_sample,
    karras_sigmas,
    loss_weight,
    precondition,
)
from ssip.sampling.guided import dps_edm, make_guidance
from ssip.sampling.noise import item_noise, trial_generator, trial_seed

__all__ = [
    "GUIDANCE_RULES",
    "Guidance",
    "Guided",
    "NonFiniteSampleError",
    "PosteriorDraws",
    "StepContext",
    "c_in",
    "c_noise",
    "c_out",
    "c_skip",
    "check_guidance_rule",
    "dps_edm",
    "dps_gradient",
    "edm_sample",
    "gaussian_score",
    "item_noise",
    "karras_sigmas",
    "loss_weight",
    "make_guidance",
    "posterior_draws",
    "precondition",
    "residual_norm_grad",
    "trial_generator",
    "trial_seed",
]
