"""Diffusion Posterior Sampling (Chung et al., ICLR 2023, Algorithm 1), per trial.

Two forms over the same EDM denoiser ``denoiser(x, sigma) -> D_x`` (see :mod:`ssip.sampling.edm`):

- :func:`dps_ancestral`: the paper's DDPM ancestral sampler (linear beta schedule 1e-4..0.02 over
  1000 steps, optionally respaced), guided by x_{t-1} <- x'_{t-1} - zeta grad_{x_t} ||r||.
- :func:`dps_edm`: a few-step EDM Euler/Heun sampler with the same guidance after each step, with
  either a constant zeta or CQT-Diff's self-normalising step (Moliner et al., ICASSP 2023).

The likelihood is a callable ``residual(x0_hat) -> (r, r_mask)``: r (B, ...) is the WHITENED
residual (y - A(x0_hat)) / sigma_e of each trial, r_mask (bool, broadcastable to r, or None) is
True where r is real (padding excluded). The norm ||r|| is taken PER TRIAL, unlike the reference
code's one norm over the batch, so a batch decodes exactly as its trials would alone. Gradients
flow through the denoiser and the likelihood; only x requires grad (freeze the weights with
``requires_grad_(False)``), and nothing here uses inference_mode. Nothing here imports Ray or
touches files.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from itertools import pairwise
from typing import NamedTuple

import torch

from ssip.sampling.edm import (
    Denoiser,
    check_finite,
    check_frame_mask,
    churn_gamma,
    fill_padding,
    initial_latents,
    item_noise_like,
    karras_sigmas,
)

Residual = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]
#: ``callback(step, sigma, x0_hat, residual_norm)``; residual_norm (B,) or None when unguided.
StepCallback = Callable[[int, float, torch.Tensor, torch.Tensor | None], None]


def residual_norm_grad(
    residual: Residual, x0_hat: torch.Tensor, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-trial ||r(x0_hat)|| and its gradient with respect to x.

    Parameters
    ----------
    residual : callable
        ``residual(x0_hat) -> (r (B, ...), r_mask or None)``, whitened, items independent.
    x0_hat : torch.Tensor, shape (B, *S)
        Denoiser output, computed from x inside the autograd graph.
    x : torch.Tensor, shape (B, *S)
        The leaf that requires grad.

    Returns
    -------
    norm : torch.Tensor, shape (B,)
        Non-squared L2 norm of each trial's masked residual (detached).
    grad : torch.Tensor, shape (B, *S)
        d norm_b / d x_b for each b; the sum of per-item norms has exactly these per-item
        gradients because items do not interact.
    """
    r, r_mask = residual(x0_hat)
    if r.shape[0] != x.shape[0]:
        raise ValueError(f"residual returned batch {r.shape[0]} for a batch of {x.shape[0]} trials")
    if r_mask is not None:
        # where(), not multiplication: a non-finite value in padding must not leak into the norm.
        r = torch.where(r_mask, r, torch.zeros((), dtype=r.dtype, device=r.device))
    norm = torch.linalg.vector_norm(r.flatten(1), dim=1)
    (grad,) = torch.autograd.grad(norm.sum(), x)
    return norm.detach(), grad


def _check_step_rule(zeta: float | None, xi: float | None, weight: float | None,
                     inflation: float) -> None:
    if sum(v is not None for v in (zeta, xi, weight)) != 1:
        raise ValueError(
            f"dps_edm: give exactly one of zeta (constant step), xi (normalised step) or weight "
            f"(Gaussian likelihood score), got zeta={zeta}, xi={xi}, weight={weight}"
        )
    if not (math.isfinite(inflation) and inflation >= 0):
        raise ValueError(f"inflation={inflation}: must be finite and >= 0")
    for name, v in (("zeta", zeta), ("xi", xi), ("weight", weight)):
        if v is not None and not (math.isfinite(v) and v >= 0):
            raise ValueError(f"{name}={v}: the guidance step size must be finite and >= 0")


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
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    S_churn: float = 0.0,
    S_min: float = 0.0,
    S_max: float = float("inf"),
    S_noise: float = 1.0,
    heun: bool = True,
    guide_steps: Sequence[bool] | None = None,
    frame_mask: torch.Tensor | None = None,
    pad_value: float = 0.0,
    device: str | torch.device | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """DPS on the EDM sampler: an Euler/Heun step, then a guidance step per trial.

    At step i the denoiser runs at (x_hat, t_hat) with x_hat requiring grad, giving D_x and
    g_b = grad_{x_hat} ||r_b(D_x)|| (Chung et al. 2023, Alg. 1, non-squared norm). After the
    Euler (or Heun) update to x_next,

    - constant step: x_next <- x_next - zeta * g_b (zeta as in the DPS code's ``scale``);
    - Gaussian likelihood score: the score of log N(y; A(D_x), Sigma) under the Tweedie
      approximation of DPS, -grad (1/2)||r_b||^2 = -||r_b|| g_b, added to the prior score with
      weight w_t = weight / (1 + inflation * r_t^2), so x_next <- x_next - (t_hat - t_next) *
      t_hat * w_t * ||r_b|| * g_b (the Euler step of the probability-flow ODE). With a calibrated
      likelihood (whitened by the noise's long-run std) weight = 1 is the posterior's own
      weight; r_t^2 = sd^2 t^2 / (sd^2 + t^2) is the variance of x0 given x_t for data of std sd
      (``sigma_data``), and ``inflation`` ~ ||A||^2 / sigma_y^2 adds the x0-uncertainty to the
      noise as PiGDM does (Song et al., ICLR 2023): exact for a Gaussian prior of std sd and
      an isotropic linear A with inflation = a^2 / sigma_y^2;
    - normalised step (CQT-Diff): s_b = xi / (||g_b|| / sqrt(L_b) * t_hat) is the weight of g_b
      in the score, so x_next <- x_next - (t_hat - t_next) * t_hat * s_b * g_b, i.e. a move of
      RMS xi * (t_hat - t_next) per element whatever the gradient's scale. L_b counts the real
      elements of item b. For Euler steps this equals CQT-Diff's guided score; with Heun the
      guidance is applied once per step (CQT-Diff also guides the second evaluation).

    Parameters
    ----------
    denoiser, shape_or_latents, generators, num_steps, sigma_min, sigma_max, rho, S_churn, S_min,
    S_max, S_noise, heun, frame_mask, pad_value, device
        As in :func:`ssip.sampling.edm.edm_sample`.
    residual : callable
        ``residual(x0_hat) -> (r, r_mask)``, the whitened per-trial residual; see module doc.
    zeta, xi, weight : float
        Exactly one: constant step on the non-squared norm, CQT-Diff's normalised step
        (DESIGN.md: xi about 0.1-0.3 was robust with ~50 steps; retune on any sampler change),
        or the Gaussian likelihood score's weight (1 = calibrated).
    inflation, sigma_data : float
        With ``weight``: the PiGDM-style down-weighting at high noise (0 = none) and the data
        std it assumes.
    guide_steps : sequence of bool, length num_steps, optional
        Guide only the steps marked True (default: all).
    callback : callable, optional
        ``callback(step, t_hat, D_x, norm)`` after each step, for logging; must not modify.

    Returns
    -------
    torch.Tensor, shape (B, *S), float32
        One posterior sample per item; padded frames hold ``pad_value``.
    """
    _check_step_rule(zeta, xi, weight, inflation)
    if guide_steps is None:
        guide_steps = [True] * num_steps
    if len(guide_steps) != num_steps:
        raise ValueError(f"guide_steps has {len(guide_steps)} entries for num_steps={num_steps}")
    latents = initial_latents(shape_or_latents, generators, device)
    mask = check_frame_mask(frame_mask, latents)
    # Real elements L_b per item, shaped (B, 1, ..., 1), for the normalised step.
    real = torch.ones_like(latents, dtype=torch.bool) if mask is None else mask.expand_as(latents)
    n_real = real.flatten(1).sum(dim=1).double().reshape(-1, *([1] * (latents.ndim - 1)))
    t_steps = karras_sigmas(num_steps, sigma_min, sigma_max, rho).tolist()
    B = latents.shape[0]

    def D(x: torch.Tensor, t: float) -> torch.Tensor:
        return denoiser(x, torch.full((B,), t, dtype=torch.float64, device=x.device)).double()

    x_next = latents * t_steps[0]
    for i, (t_cur, t_next) in enumerate(pairwise(t_steps)):
        x_cur = x_next
        guided = bool(guide_steps[i])
        # Increase noise temporarily.
        gamma = churn_gamma(t_cur, num_steps, S_churn, S_min, S_max)
        t_hat = t_cur + gamma * t_cur
        x_hat = x_cur
        if gamma > 0:
            x_hat = x_cur + math.sqrt(t_hat**2 - t_cur**2) * S_noise * item_noise_like(
                generators, x_cur
            )
        # Denoise at t_hat; keep the graph only when this step is guided.
        norm = grad = None
        with torch.enable_grad() if guided else torch.no_grad():
            x_hat = x_hat.detach().requires_grad_(guided)
            D_x = D(x_hat, t_hat)
            if guided:
                norm, grad = residual_norm_grad(residual, D_x, x_hat)
        D_x, x_hat = D_x.detach(), x_hat.detach()
        with torch.no_grad():
            # Euler step.
            d_cur = (x_hat - D_x) / t_hat
            x_next = x_hat + (t_next - t_hat) * d_cur
            # Apply 2nd order correction.
            if heun and i < num_steps - 1:
                d_prime = (x_next - D(x_next, t_next)) / t_next
                x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
            # Guidance step, per trial, on real frames only.
            if guided:
                grad = fill_padding(grad, mask, 0.0)
                if zeta is not None:
                    x_next = x_next - zeta * grad
                elif weight is not None:
                    # Score of the Gaussian likelihood: grad (1/2)||r||^2 = ||r|| grad ||r||.
                    r2 = sigma_data**2 * t_hat**2 / (sigma_data**2 + t_hat**2)
                    w = weight / (1.0 + inflation * r2)
                    sq_grad = norm.reshape(n_real.shape) * grad
                    x_next = x_next - (t_hat - t_next) * t_hat * w * sq_grad
                else:
                    g_norm = torch.linalg.vector_norm(grad.flatten(1), dim=1).reshape(n_real.shape)
                    normguide = g_norm / n_real.sqrt()
                    s = torch.where(g_norm > 0, xi / (normguide * t_hat), 0.0)
                    x_next = x_next - (t_hat - t_next) * t_hat * s * grad
            check_finite(x_next, i, t_hat, "dps_edm")
        if callback is not None:
            callback(i, t_hat, D_x, norm)
    return fill_padding(x_next, mask, pad_value).float()


def ddpm_alpha_bars(
    num_train_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
) -> torch.Tensor:
    """Cumulative alpha_bar_t = prod_{s<=t} (1 - beta_s) of the linear DDPM schedule, float64."""
    betas = torch.linspace(beta_start, beta_end, num_train_steps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


def vp_sigma(alpha_bar: torch.Tensor | float) -> torch.Tensor | float:
    """EDM noise level of a VP/DDPM state: x_t / sqrt(alpha_bar) = x0 + sigma eps,
    sigma = sqrt((1 - alpha_bar) / alpha_bar)."""
    return ((1.0 - alpha_bar) / alpha_bar) ** 0.5


def epsilon_from_denoised(
    x_t: torch.Tensor, x0_hat: torch.Tensor, alpha_bar: float
) -> torch.Tensor:
    """DDPM noise prediction eps = (x_t - sqrt(alpha_bar) x0_hat) / sqrt(1 - alpha_bar)."""
    return (x_t - math.sqrt(alpha_bar) * x0_hat) / math.sqrt(1.0 - alpha_bar)


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
    r_t^2) as in :func:`dps_edm` (sigma_t = sqrt((1 - abar_t) / abar_t)): the same guidance as the
    EDM sampler's ``weight`` rule, discretised for DDPM, with no step size to retune.

    Parameters
    ----------
    denoiser, residual, generators, frame_mask, pad_value, device, callback
        As in :func:`dps_edm`.
    shape_or_latents : shape or torch.Tensor, (B, *S)
        x_T ~ N(0, I) in VP units, drawn per item or given.
    zeta : float
        Step on the non-squared norm (the DPS code's ``scale``; 0.3-1.0 there), in VP units.
    weight, inflation, sigma_data : float
        Instead of zeta: the Gaussian likelihood score's weight (1 = calibrated), and the
        PiGDM-style down-weighting as in :func:`dps_edm`.
    num_steps : int
        Sampling steps; 1000 is the paper's sampler, fewer respaces the schedule.
    num_train_steps, beta_start, beta_end
        The linear DDPM schedule.

    Returns
    -------
    torch.Tensor, shape (B, *S), float32
    """
    if (zeta is None) == (weight is None):
        raise ValueError(f"dps_ancestral: give exactly one of zeta (the paper's constant step) or "
                         f"weight (Gaussian likelihood score), got zeta={zeta}, weight={weight}")
    _check_step_rule(zeta, None, weight, inflation)
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
        # x0_hat through the EDM denoiser, with the graph to x_t when guided.
        guided = residual is not None
        norm = grad = None
        with torch.enable_grad() if guided else torch.no_grad():
            x_t = x.detach().requires_grad_(guided)
            sigma = torch.full((B,), sigma_t, dtype=torch.float64, device=x.device)
            x0_hat = denoiser(x_t / math.sqrt(abar_t), sigma).double()
            if guided:
                norm, grad = residual_norm_grad(residual, x0_hat, x_t)
        x0_hat, x_t = x0_hat.detach(), x_t.detach()
        with torch.no_grad():
            # Ancestral step: posterior q(x_{t-1} | x_t, x0_hat).
            mean = (
                math.sqrt(abar_prev) * beta_t / (1.0 - abar_t) * x0_hat
                + math.sqrt(1.0 - beta_t) * (1.0 - abar_prev) / (1.0 - abar_t) * x_t
            )
            var = beta_t * (1.0 - abar_prev) / (1.0 - abar_t)
            x = mean + math.sqrt(var) * item_noise_like(generators, x_t) if i > 0 else mean
            # DPS step, per trial, on real frames only.
            if not guided:
                pass
            elif zeta is not None:
                grad = fill_padding(grad, mask, 0.0)
                x = x - zeta * grad
            else:
                grad = fill_padding(grad, mask, 0.0)
                r2 = sigma_data**2 * sigma_t**2 / (sigma_data**2 + sigma_t**2)
                w = weight / (1.0 + inflation * r2)
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


class PosteriorDraws(NamedTuple):
    """K posterior samples per trial and their pointwise summary."""

    samples: torch.Tensor  # (B, K, *S)
    mean: torch.Tensor  # (B, *S)
    std: torch.Tensor  # (B, *S), over draws with Bessel's correction; zeros when K == 1

    @classmethod
    def from_samples(cls, samples: torch.Tensor) -> PosteriorDraws:
        """Summarise samples (B, K, *S): pointwise mean and std over the K draws."""
        k = samples.shape[1]
        std = samples.std(dim=1, correction=1) if k > 1 else torch.zeros_like(samples[:, 0])
        return cls(samples=samples, mean=samples.mean(dim=1), std=std)


def posterior_draws(
    sampler: Callable[..., torch.Tensor],
    generators: Sequence[Sequence[torch.Generator]],
    **sampler_kwargs,
) -> PosteriorDraws:
    """K posterior draws of each of B trials: one sampler call per draw.

    Because every sampler here treats items independently, draw k of trial b equals what a
    batch holding that trial alone (with the same generator) would give, so the draws can be
    batched however the caller likes.

    Parameters
    ----------
    sampler : callable
        E.g. ``functools.partial(dps_edm, denoiser, residual, xi=0.2)``; called as
        ``sampler(shape_or_latents=..., generators=[...], **sampler_kwargs)``.
    generators : sequence (B) of sequences (K) of torch.Generator
        ``generators[b][k]`` seeds draw k of trial b (see :func:`~ssip.sampling.noise.trial_generator`).
    **sampler_kwargs
        Passed on; ``shape_or_latents`` must be a shape (fixed latents would repeat one draw).

    Returns
    -------
    PosteriorDraws
        samples (B, K, *S), mean and std over draws (B, *S), float32.
    """
    shape = sampler_kwargs.pop("shape_or_latents", None)
    if shape is None or isinstance(shape, torch.Tensor):
        raise ValueError(
            "posterior_draws needs shape_or_latents=(B, *S) as a shape: each draw must draw "
            "its own latents from its generator"
        )
    n_draws = {len(g) for g in generators}
    if len(n_draws) != 1 or 0 in n_draws:
        raise ValueError(f"every trial needs the same number (>= 1) of generators, got {n_draws}")
    (K,) = n_draws
    draws = [
        sampler(shape_or_latents=shape, generators=[g[k] for g in generators], **sampler_kwargs)
        for k in range(K)
    ]
    return PosteriorDraws.from_samples(torch.stack(draws, dim=1))
