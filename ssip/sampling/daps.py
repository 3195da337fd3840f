"""Decoupled annealing posterior sampling (DAPS; Zhang et al., CVPR 2025) on the EDM pieces, and
the residuals that combine several pieces of evidence.

DAPS decouples the likelihood from the denoiser: at each noise level t_i of an annealing schedule
it (1) estimates x0 from x_{t_i} with the prior alone, (2) runs a few Langevin steps on x0 that use
only grad_x0 log p(y | x0) (no backpropagation through the denoiser) under the Gaussian
approximation p(x0 | x_{t_i}) ~ N(x0_hat, r_i^2 I), and (3) re-noises x0 to the next level,
x_{t_{i+1}} = x0 + t_{i+1} eps. The inner target is

    log pi(x0) = -1/2 ||r_b(x0)||^2 - ||x0 - x0_hat||^2 / (2 r_i^2),

with ``r_b`` the whitened residual of trial b (the same ``residual`` callable as DPS). If
p(x0 | x_t) is exact (a Gaussian prior with the Tweedie estimate and r_i^2 the posterior
variance of x0 given x_t), the chain samples p(x0 | y) exactly up to the Langevin discretisation:
``tests/test_sampling.py`` checks it on the linear-Gaussian problem. The split-Gibbs sampler of
PnP-DM (Wu et al., NeurIPS 2024) has the same shape (likelihood step on x0, then a denoising
step), so the choice here is between the two x0 estimates and the step rule.

``x0_estimate``: ``"tweedie"`` uses D(x_t; t) (one denoiser call per level); ``"ode"`` solves the
probability-flow ODE from x_t at t to 0 in ``ode_steps`` Heun steps (DAPS's choice: a sharper x0
at ``ode_steps`` times the cost).

Evidence: :func:`gaussian_measurement` turns any estimate of the mel with a per-bin noise std
(e.g. a regression decoder's output with its validation error, a "pseudo-measurement") into a
residual, and :func:`stack_residuals` concatenates weighted residuals into one (a product of
likelihoods with exponents = weights; weights summing to 1 over two views of the same neural
data count that data once in the log-likelihood's scale). Nothing here imports Ray or touches files.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol, cast

import torch

from ssip.sampling.dps import Residual, posterior_variance, residual_norm_grad
from ssip.sampling.edm import (
    Denoiser,
    check_finite,
    check_frame_mask,
    edm_sample,
    fill_padding,
    initial_latents,
    item_noise_like,
    karras_sigmas,
)

X0_ESTIMATES = ("tweedie", "ode")


class CurvedResidual(Protocol):
    """A residual (:data:`~ssip.sampling.dps.Residual`) that carries the part of
    -d^2 log p(y | x0) / dx0^2 known in closed form as its ``curvature``."""

    curvature: torch.Tensor | float

    def __call__(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]: ...


def gaussian_measurement(y: torch.Tensor, sigma: torch.Tensor, mask: torch.Tensor | None = None
                         ) -> Residual:
    """Residual of a direct Gaussian measurement of x: r = (y - x0) / sigma.

    Parameters
    ----------
    y : torch.Tensor, shape (B, *S)
        The measured mel of each trial (e.g. a regression decoder's prediction).
    sigma : torch.Tensor, broadcastable to (B, *S)
        Noise std per element (e.g. per mel bin, shape (80, 1)), > 0.
    mask : torch.Tensor, optional
        (B, T) bool frame mask (True = real frame).
    """
    if not bool((sigma > 0).all()):
        raise ValueError("gaussian_measurement: every sigma must be > 0")
    r_mask = None if mask is None else mask.reshape(mask.shape[0], *([1] * (y.ndim - 2)),
                                                    mask.shape[-1])

    def residual(x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return (y.to(x0.dtype) - x0) / sigma.to(x0.dtype), r_mask

    curved = cast(CurvedResidual, residual)
    curved.curvature = 1.0 / sigma.double() ** 2  # -d^2 log p / dx0^2, known exactly
    return curved


def stack_residuals(residuals: Sequence[Residual], weights: Sequence[float]) -> Residual:
    """One residual whose squared norm is sum_k w_k ||r_k||^2 (likelihoods raised to w_k)."""
    if len(residuals) != len(weights) or not residuals:
        raise ValueError(f"stack_residuals: {len(residuals)} residuals, {len(weights)} weights")
    if any(not (math.isfinite(w) and w >= 0) for w in weights):
        raise ValueError(f"stack_residuals: weights must be finite and >= 0, got {list(weights)}")

    def residual(x0: torch.Tensor) -> tuple[torch.Tensor, None]:
        parts = []
        for res, w in zip(residuals, weights, strict=True):
            r, m = res(x0)
            if m is not None:
                r = torch.where(m, r, torch.zeros((), dtype=r.dtype, device=r.device))
            parts.append(math.sqrt(w) * r.flatten(1))
        return torch.cat(parts, dim=1), None

    known = [w * c for res, w in zip(residuals, weights, strict=True)
             if (c := getattr(res, "curvature", None)) is not None]
    if known:
        cast(CurvedResidual, residual).curvature = sum(known)
    return residual


def curvature(residual: Residual) -> torch.Tensor | float:
    """The part of -d^2 log p(y | x0) / dx0^2 known in closed form (diagonal), else 0."""
    c = getattr(residual, "curvature", None)
    return 0.0 if c is None else c


def likelihood_grad(residual: Residual, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """grad_x0 of -1/2 ||r_b(x0)||^2 per trial, and ||r_b|| (both detached): DPS's per-trial
    :func:`~ssip.sampling.dps.residual_norm_grad` with x0 itself as the leaf, since
    grad 1/2 ||r||^2 = ||r|| grad ||r||."""
    with torch.enable_grad():
        x = x0.detach().requires_grad_(True)
        norm, grad = residual_norm_grad(residual, x, x)
    return -norm.reshape(-1, *([1] * (grad.ndim - 1))) * grad, norm


def daps_sample(
    denoiser: Denoiser,
    residual: Residual,
    shape_or_latents: Sequence[int] | torch.Tensor,
    generators: Sequence[torch.Generator],
    *,
    num_levels: int = 50,
    langevin_steps: int = 20,
    step_scale: float = 0.05,
    sigma_min: float = 0.01,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    sigma_data: float = 0.5,
    x0_estimate: str = "tweedie",
    ode_steps: int = 4,
    frame_mask: torch.Tensor | None = None,
    pad_value: float = 0.0,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """One posterior sample per item by DAPS (module doc).

    Parameters
    ----------
    denoiser, residual, shape_or_latents, generators
        As in :func:`ssip.sampling.guided.dps_edm`; ``residual(x0) -> (r, r_mask)`` is whitened
        per trial (``None`` residual is not allowed: use ``edm_sample`` for the prior).
    num_levels : int
        Annealing levels t_0 = sigma_max > ... > t_{N-1} = sigma_min (Karras schedule with
        ``rho``); the last x0 is the sample.
    langevin_steps, step_scale : int, float
        Langevin steps on x0 per level, preconditioned by M = 1 / (1 / r_i^2 + c) with c the
        likelihood curvature known in closed form (a :func:`gaussian_measurement`'s 1 / sigma^2;
        0 for a learned forward model): x0 += step_scale M grad log pi + sqrt(2 step_scale M) eps.
        A step of step_scale is then that fraction of a Newton step on the known Gaussian part:
        stable for step_scale < 2, with a stationary-variance bias of about step_scale / 2.
    sigma_data : float
        Data std: r_i^2 = sd^2 t_i^2 / (sd^2 + t_i^2), the variance of x0 given x_t for data of
        std sd (exact for a Gaussian prior of that std).
    x0_estimate, ode_steps
        ``"tweedie"`` (D(x_t; t)) or ``"ode"`` (probability-flow ODE in ``ode_steps`` steps).
    frame_mask : torch.Tensor, shape (B, T), bool, optional
        True on real frames; padded frames are not updated and hold ``pad_value`` at the end.

    Returns
    -------
    torch.Tensor, shape (B, *S), float32
    """
    if x0_estimate not in X0_ESTIMATES:
        raise ValueError(f"x0_estimate={x0_estimate!r} is not allowed; choose one of {list(X0_ESTIMATES)}")
    if num_levels < 1 or langevin_steps < 0 or ode_steps < 1:
        raise ValueError(f"need num_levels >= 1, langevin_steps >= 0, ode_steps >= 1; got "
                         f"{num_levels}, {langevin_steps}, {ode_steps}")
    if not (math.isfinite(step_scale) and step_scale > 0):
        raise ValueError(f"step_scale={step_scale!r}: must be finite and > 0")
    x = initial_latents(shape_or_latents, generators, device)
    mask = check_frame_mask(frame_mask, x)
    levels = karras_sigmas(num_levels, sigma_min, sigma_max, rho).tolist()  # ends in 0
    x = x * levels[0]
    x0 = x
    for i, t in enumerate(levels[:-1]):
        with torch.no_grad():
            if x0_estimate == "tweedie":
                x0_hat = denoiser(x, torch.full((x.shape[0],), t, dtype=x.dtype,
                                                device=x.device)).to(x.dtype)
            else:
                x0_hat = edm_sample(denoiser, x / t, generators, num_steps=ode_steps,
                                    sigma_min=min(sigma_min, t), sigma_max=t, rho=rho).to(x.dtype)
        r2 = posterior_variance(t, sigma_data)
        eta = step_scale / (1.0 / r2 + curvature(residual))  # step_scale * M
        if isinstance(eta, torch.Tensor):
            eta = eta.to(device=x.device, dtype=x.dtype)
        x0 = x0_hat.clone()
        for _ in range(langevin_steps):
            g_lik, _ = likelihood_grad(residual, x0)
            grad = g_lik - (x0 - x0_hat) / r2
            noise = item_noise_like(generators, x0)
            step = eta * grad + (2 * eta) ** 0.5 * noise
            x0 = x0 + fill_padding(step, mask, 0.0)
        check_finite(x0, i, t, "daps_sample")
        t_next = levels[i + 1]
        x = x0 + t_next * item_noise_like(generators, x0) if t_next > 0 else x0
    return fill_padding(x0, mask, pad_value).float()
