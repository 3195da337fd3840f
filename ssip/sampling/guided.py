"""DPS with the guidance rule chosen by keyword: :func:`make_guidance` and :func:`dps_edm`.

The rules are the production Gaussian score (:func:`ssip.sampling.dps.gaussian_score`,
``weight``) and the reference rules (:func:`ssip.sampling.reference.normalised_step`, ``xi``;
:func:`ssip.sampling.reference.constant_step`, ``zeta``). The reference rules are built on
:mod:`ssip.sampling.dps`; choosing among all of them happens here, above both. Nothing here
imports Ray or touches files.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ssip.sampling.dps import Residual, check_guidance_rule, gaussian_score
from ssip.sampling.edm import Denoiser, Guidance, edm_sample
from ssip.sampling.reference import constant_step, normalised_step


def make_guidance(
    residual: Residual,
    *,
    zeta: float | None = None,
    xi: float | None = None,
    weight: float | None = None,
    inflation: float = 0.0,
    sigma_data: float = 0.5,
) -> Guidance:
    """The guidance callable of the one rule given: ``weight``
    (:func:`~ssip.sampling.dps.gaussian_score`), ``xi``
    (:func:`~ssip.sampling.reference.normalised_step`) or ``zeta``
    (:func:`~ssip.sampling.reference.constant_step`)."""
    rule = check_guidance_rule({"zeta": zeta, "xi": xi, "weight": weight}, inflation)
    if rule == "weight" and weight is not None:
        return gaussian_score(residual, weight, inflation=inflation, sigma_data=sigma_data)
    if rule == "xi" and xi is not None:
        return normalised_step(residual, xi)
    assert zeta is not None  # check_guidance_rule: exactly one rule is given
    return constant_step(residual, zeta)


def dps_edm(
    denoiser: Denoiser,
    residual: Residual,
    shape_or_latents: Sequence[int] | torch.Tensor,
    generators: Sequence[torch.Generator],
    *,
    zeta: float | None = None,
    xi: float | None = None,
    weight: float | None = None,
    inflation: float = 0.0,
    sigma_data: float = 0.5,
    num_steps: int = 50,
    **sampler_kwargs,
) -> torch.Tensor:
    """DPS on the EDM sampler: :func:`~ssip.sampling.edm.edm_sample` guided by one rule.

    At step i the denoiser runs at (x_hat, t_hat) with x_hat requiring grad, giving D_x and
    g_b = grad_{x_hat} ||r_b(D_x)|| (Chung et al. 2023, Alg. 1, non-squared norm); after the
    Euler (or Heun) update to x_next the rule's correction is added: -zeta g_b (constant step),
    CQT-Diff's normalised step (xi), or the Gaussian likelihood's score (weight); see
    :func:`~ssip.sampling.dps.gaussian_score` and :mod:`ssip.sampling.reference`.

    Parameters
    ----------
    denoiser, residual, shape_or_latents, generators
        As in :func:`~ssip.sampling.edm.edm_sample`; ``residual(x0_hat) -> (r, r_mask)`` is the
        whitened per-trial residual (:mod:`ssip.sampling.dps`).
    zeta, xi, weight : float
        Exactly one: constant step on the non-squared norm, CQT-Diff's normalised step
        (docs/method.md: xi about 0.1-0.3 was robust with ~50 steps; retune on any sampler change),
        or the Gaussian likelihood score's weight (1 = calibrated).
    inflation, sigma_data : float
        With ``weight``: the PiGDM-style down-weighting at high noise (0 = none) and the data
        std it assumes.
    num_steps, **sampler_kwargs
        :func:`~ssip.sampling.edm.edm_sample`'s schedule, churn, ``heun``, ``guide_steps``,
        ``frame_mask``, ``pad_value``, ``device`` and ``callback``.

    Returns
    -------
    torch.Tensor, shape (B, *S), float32
        One posterior sample per item; padded frames hold ``pad_value``.
    """
    guidance = make_guidance(residual, zeta=zeta, xi=xi, weight=weight, inflation=inflation,
                             sigma_data=sigma_data)
    return edm_sample(denoiser, shape_or_latents, generators, num_steps=num_steps,
                      guidance=guidance, **sampler_kwargs)
