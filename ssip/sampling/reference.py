"""Reference samplers and guidance rules: kept for tests, benchmarks and DecodeConfig's switches.

Production decodes with :func:`ssip.sampling.edm.edm_sample` guided by the Gaussian likelihood's
score (:func:`ssip.sampling.dps.gaussian_score`). This module holds what is compared against it:

- :func:`constant_step` (``zeta``): DPS's own step x_{i+1} <- x_{i+1} - zeta g_b (Chung et al.,
  ICLR 2023, Algorithm 1; zeta as in the DPS code's ``scale``), as an EDM guidance callable;
- :func:`normalised_step` (``xi``): CQT-Diff's self-normalising step (Moliner et al., ICASSP
  2023), as an EDM guidance callable;
- :func:`dps_ancestral` / :func:`ddpm_sample`: the paper's DDPM ancestral sampler (linear beta
  schedule 1e-4..0.02 over 1000 steps, optionally respaced) over the same EDM denoiser, guided
  by x_{t-1} <- x'_{t-1} - zeta grad_{x_t} ||r|| or by the Gaussian score, and unguided.

g_b = grad_{x_hat} ||r_b(D(x_hat; t_hat))|| is the per-trial gradient of the non-squared residual
norm (:func:`ssip.sampling.dps.dps_gradient`). Nothing here imports Ray or touches files.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import overload

import torch

from ssip.sampling.dps import (
    Residual,
    check_guidance_rule,
    dps_gradient,
    posterior_variance,
)
from ssip.sampling.edm import (
    Denoiser,
    Guidance,
    Guided,
    StepCallback,
    StepContext,
    check_finite,
    check_frame_mask,
    fill_padding,
    initial_latents,
    item_noise_like,
)

# ----------------------------------------------------------------------------------------------
# The reference guidance rules of the EDM loop.


def constant_step(residual: Residual, zeta: float) -> Guidance:
    """DPS's constant step (``zeta``): the correction of x_{i+1} is -zeta g_b, whatever the step.

    zeta is the DPS code's ``scale`` on the non-squared norm; it must be retuned whenever the
    schedule or the likelihood's scale changes.
    """
    check_guidance_rule({"zeta": zeta})

    def guidance(x_hat: torch.Tensor, ctx: StepContext) -> Guided:
        x0_hat, norm, grad = dps_gradient(residual, ctx.denoise, x_hat, ctx.t_hat, ctx.mask)
        return Guided(x0_hat, -(zeta * grad), norm)

    return guidance


def normalised_step(residual: Residual, xi: float) -> Guidance:
    """CQT-Diff's normalised step (``xi``; Moliner et al., ICASSP 2023).

    s_b = xi / (||g_b|| / sqrt(L_b) * t_hat) is the weight of g_b in the score, so the correction
    of x_{i+1} is -(t_hat - t_next) * t_hat * s_b * g_b, i.e. a move of RMS xi * (t_hat - t_next)
    per element whatever the gradient's scale. L_b counts the real elements of item b. For Euler
    steps this equals CQT-Diff's guided score; with Heun the guidance is applied once per step
    (CQT-Diff also guides the second evaluation). docs/method.md: xi about 0.1-0.3 was robust with
    ~50 steps; retune on any sampler change.
    """
    check_guidance_rule({"xi": xi})

    def guidance(x_hat: torch.Tensor, ctx: StepContext) -> Guided:
        x0_hat, norm, grad = dps_gradient(residual, ctx.denoise, x_hat, ctx.t_hat, ctx.mask)
        t_hat, t_next = ctx.t_hat, ctx.t_next
        # Real elements L_b per item, shaped (B, 1, ..., 1).
        real = torch.ones_like(x_hat, dtype=torch.bool) if ctx.mask is None else \
            ctx.mask.expand_as(x_hat)
        n_real = real.flatten(1).sum(dim=1).double().reshape(-1, *([1] * (x_hat.ndim - 1)))
        g_norm = torch.linalg.vector_norm(grad.flatten(1), dim=1).reshape(n_real.shape)
        normguide = g_norm / n_real.sqrt()
        s = torch.where(g_norm > 0, xi / (normguide * t_hat), 0.0)
        return Guided(x0_hat, -((t_hat - t_next) * t_hat * s * grad), norm)

    return guidance


# ----------------------------------------------------------------------------------------------
# The paper's DDPM ancestral sampler.


def ddpm_alpha_bars(
    num_train_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
) -> torch.Tensor:
    """Cumulative alpha_bar_t = prod_{s<=t} (1 - beta_s) of the linear DDPM schedule, float64."""
    betas = torch.linspace(beta_start, beta_end, num_train_steps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


@overload
def vp_sigma(alpha_bar: torch.Tensor) -> torch.Tensor: ...


@overload
def vp_sigma(alpha_bar: float) -> float: ...


def vp_sigma(alpha_bar: torch.Tensor | float) -> torch.Tensor | float:
    """EDM noise level of a VP/DDPM state: x_t / sqrt(alpha_bar) = x0 + sigma eps,
    sigma = sqrt((1 - alpha_bar) / alpha_bar)."""
    return ((1.0 - alpha_bar) / alpha_bar) ** 0.5


def respaced_timesteps(num_steps: int, num_train_steps: int = 1000) -> torch.Tensor:
    """num_steps training timesteps evenly spaced over [0, T-1], as guided-diffusion respaces."""
    if not 1 <= num_steps <= num_train_steps:
        raise ValueError(f"num_steps={num_steps}: need 1 <= num_steps <= {num_train_steps}")
    if num_steps == 1:
        return torch.tensor([num_train_steps - 1])
    return torch.round(
        torch.linspace(0, num_train_steps - 1, num_steps, dtype=torch.float64)
    ).long()


def dps_ancestral(
    denoiser: Denoiser,
    residual: Residual | None,
    shape_or_latents: Sequence[int] | torch.Tensor,
    generators: Sequence[torch.Generator],
    *,
    zeta: float | None = None,
    weight: float | None = None,
    inflation: float = 0.0,
    sigma_data: float = 0.5,
    num_steps: int = 1000,
    num_train_steps: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    frame_mask: torch.Tensor | None = None,
    pad_value: float = 0.0,
    device: str | torch.device | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """DPS with the DDPM ancestral sampler (Chung et al. 2023, Algorithm 1), per trial.

    For t = T..1 (respaced to ``num_steps`` of the ``num_train_steps`` linear schedule):
    x0_hat = D(x_t / sqrt(abar_t); sigma_t) with sigma_t = sqrt((1 - abar_t) / abar_t);
    x'_{t-1} = sqrt(abar_{t-1}) beta_t / (1 - abar_t) x0_hat
               + sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) x_t + sigma~_t z,
    with the posterior variance sigma~_t^2 = beta_t (1 - abar_{t-1}) / (1 - abar_t) (no noise on
    the last step); then x_{t-1} = x'_{t-1} - zeta grad_{x_t} ||r_b(x0_hat)|| per trial (the
    paper's step), or, with ``weight``, the Gaussian likelihood's score in the ancestral step:
    x'_{t-1} is (x_t + beta_t score) / sqrt(alpha_t), so the guidance adds
    -(beta_t / sqrt(alpha_t)) w_t ||r_b|| grad_{x_t} ||r_b||, w_t = weight / (1 + inflation
    r_t^2) as in :func:`ssip.sampling.dps.gaussian_score` (sigma_t = sqrt((1 - abar_t) /
    abar_t)): the same guidance as the EDM sampler's ``weight`` rule, discretised for DDPM, with
    no step size to retune.

    Parameters
    ----------
    denoiser, generators, frame_mask, pad_value, device, callback
        As in :func:`ssip.sampling.edm.edm_sample`.
    residual : callable or None
        ``residual(x0_hat) -> (r, r_mask)`` as in :mod:`ssip.sampling.dps`; None samples the
        prior (:func:`ddpm_sample`).
    shape_or_latents : shape or torch.Tensor, (B, *S)
        x_T ~ N(0, I) in VP units, drawn per item or given.
    zeta : float
        Step on the non-squared norm (the DPS code's ``scale``; 0.3-1.0 there), in VP units.
    weight, inflation, sigma_data : float
        Instead of zeta: the Gaussian likelihood score's weight (1 = calibrated), and the
        PiGDM-style down-weighting as in :func:`ssip.sampling.dps.gaussian_score`.
    num_steps : int
        Sampling steps; 1000 is the paper's sampler, fewer respaces the schedule.
    num_train_steps, beta_start, beta_end
        The linear DDPM schedule.

    Returns
    -------
    torch.Tensor, shape (B, *S), float32
    """
    check_guidance_rule({"zeta": zeta, "weight": weight}, inflation, sampler="ancestral")
    alpha_bar_train = ddpm_alpha_bars(num_train_steps, beta_start, beta_end)
    alpha_bars = alpha_bar_train[respaced_timesteps(num_steps, num_train_steps)].tolist()
    x = initial_latents(shape_or_latents, generators, device)
    mask = check_frame_mask(frame_mask, x)
    B = x.shape[0]
    for i in reversed(range(num_steps)):
        step = num_steps - 1 - i
        abar_t = alpha_bars[i]
        abar_prev = alpha_bars[i - 1] if i > 0 else 1.0
        beta_t = 1.0 - abar_t / abar_prev
        sigma_t = vp_sigma(abar_t)

        def denoise(x_t: torch.Tensor, t: float, abar_t: float = abar_t) -> torch.Tensor:
            # x0_hat through the EDM denoiser, from the VP state.
            sigma = torch.full((B,), t, dtype=torch.float64, device=x_t.device)
            return denoiser(x_t / math.sqrt(abar_t), sigma).double()

        with torch.no_grad():
            x_t, norm, grad = x, None, None
            if residual is None:
                x0_hat = denoise(x_t, sigma_t)
            else:
                x0_hat, norm, grad = dps_gradient(residual, denoise, x_t, sigma_t, mask)
            # Ancestral step: posterior q(x_{t-1} | x_t, x0_hat).
            mean = (
                math.sqrt(abar_prev) * beta_t / (1.0 - abar_t) * x0_hat
                + math.sqrt(1.0 - beta_t) * (1.0 - abar_prev) / (1.0 - abar_t) * x_t
            )
            var = beta_t * (1.0 - abar_prev) / (1.0 - abar_t)
            x = mean + math.sqrt(var) * item_noise_like(generators, x_t) if i > 0 else mean
            # DPS step, per trial, on real frames only (grad is zero on padding).
            if grad is None:
                pass
            elif zeta is not None:
                x = x - zeta * grad
            else:
                # check_guidance_rule: without zeta, weight is given; dps_gradient gave norm.
                assert weight is not None and norm is not None
                w = weight / (1.0 + inflation * posterior_variance(sigma_t, sigma_data))
                sq_grad = norm.reshape(-1, *([1] * (grad.ndim - 1))) * grad
                x = x - beta_t / math.sqrt(1.0 - beta_t) * w * sq_grad
            check_finite(x, step, sigma_t, "dps_ancestral")
        if callback is not None:
            callback(step, sigma_t, x0_hat, norm)
    return fill_padding(x, mask, pad_value).float()


def ddpm_sample(
    denoiser: Denoiser,
    shape_or_latents: Sequence[int] | torch.Tensor,
    generators: Sequence[torch.Generator],
    **kwargs,
) -> torch.Tensor:
    """Unguided DDPM ancestral samples from the EDM denoiser (:func:`dps_ancestral` without a
    likelihood): the prior control of the ancestral reference. Keywords as there, but for the
    guidance rule."""
    return dps_ancestral(denoiser, None, shape_or_latents, generators, zeta=0.0, **kwargs)
