"""Diffusion Posterior Sampling (Chung et al., ICLR 2023, Algorithm 1), per trial, on the EDM loop.

DPS is :func:`ssip.sampling.edm.edm_sample` with a guidance callable (:data:`~ssip.sampling.edm.
Guidance`): at each step the denoiser runs at (x_hat, t_hat) with x_hat requiring grad, giving
D_x and g_b = grad_{x_hat} ||r_b(D_x)|| (non-squared norm, Alg. 1 line 7), and the rule turns
(||r_b||, g_b) into a correction of x_{i+1}. This module holds the pieces every rule shares
(:func:`residual_norm_grad`, :func:`dps_gradient`, :func:`check_guidance_rule`), the production
rule :func:`gaussian_score` and :func:`posterior_draws`. The reference rules (zeta, xi) and the
DDPM ancestral sampler are in :mod:`ssip.sampling.reference`, both built on this module;
:mod:`ssip.sampling.guided` picks a rule by keyword (:func:`~ssip.sampling.guided.make_guidance`,
:func:`~ssip.sampling.guided.dps_edm`).

A new likelihood (e.g. one whitened by a full noise covariance) is a new ``residual`` for the same
rules. A sampler that is not "Euler/Heun step + correction" (e.g. DAPS's decoupled sampler, which
alternates likelihood steps on x0 with re-noising to the next level) is its own function built
from the same pieces: :func:`~ssip.sampling.edm.karras_sigmas`,
:func:`~ssip.sampling.edm.initial_latents`, :func:`~ssip.sampling.edm.edm_sample` (unguided, from
given latents at sigma_max = t, as the x_t -> x0 ODE), :func:`dps_gradient`,
:func:`~ssip.sampling.edm.item_noise_like`, :func:`~ssip.sampling.edm.check_finite` and
:func:`~ssip.sampling.edm.fill_padding`.

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
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import torch

from ssip.sampling.edm import (
    Denoise,
    Guidance,
    Guided,
    StepContext,
    fill_padding,
)

Residual = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]

#: The guidance rules (DecodeConfig's switches): the Gaussian likelihood's score (production),
#: CQT-Diff's normalised step and DPS's constant step, by the name of their step size.
GUIDANCE_RULES = {
    "weight": "Gaussian likelihood score",
    "xi": "normalised step",
    "zeta": "constant step",
}


def check_guidance_rule(
    rules: Mapping[str, float | None], inflation: float = 0.0, *, sampler: str = "edm"
) -> str:
    """Validate a choice of guidance rule; return the name of the one chosen.

    The one place where a rule is checked: :func:`~ssip.sampling.guided.make_guidance`, the rule
    factories, the ancestral reference and :class:`ssip.decode.DecodeConfig` all call it.

    Parameters
    ----------
    rules : mapping
        Rule name (``weight``, ``xi``, ``zeta``) -> step size, None for the rules not chosen;
        exactly one must be given. The names offered are those the caller takes, in its order.
    inflation : float
        The PiGDM-style down-weighting of the ``weight`` rule; finite and >= 0.
    sampler : str
        ``"edm"``, or ``"ancestral"`` (which takes weight or zeta, not xi).

    Raises
    ------
    ValueError
        Not exactly one rule, a step size or inflation that is negative or not finite, or xi
        for the ancestral sampler.
    """
    unknown = sorted(set(rules) - set(GUIDANCE_RULES))
    if unknown or not rules:
        raise ValueError(f"unknown guidance rule(s) {unknown}; known: {list(GUIDANCE_RULES)}")
    chosen = {name: v for name, v in rules.items() if v is not None}
    if len(chosen) != 1:
        offered = [f"{name} ({GUIDANCE_RULES[name]})" for name in rules]
        offer = offered[0] if len(offered) == 1 else f"{', '.join(offered[:-1])} or {offered[-1]}"
        got = ", ".join(f"{name}={v}" for name, v in rules.items())
        raise ValueError(f"give exactly one of {offer}, got {got}: set the others to None "
                         f"(null in a config)")
    ((rule, step),) = chosen.items()
    if not (math.isfinite(step) and step >= 0):
        raise ValueError(f"{rule}={step!r}: the guidance step size must be finite and >= 0")
    if not (math.isfinite(inflation) and inflation >= 0):
        raise ValueError(f"inflation={inflation!r}: must be finite and >= 0")
    if sampler == "ancestral" and rule == "xi":
        raise ValueError("sampler=ancestral takes weight or zeta, not xi (the normalised step is "
                         "defined for the EDM sampler)")
    return rule


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


def dps_gradient(
    residual: Residual, denoise: Denoise, x: torch.Tensor, t: float, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """D(x; t), the per-trial ||r_b(D(x; t))|| and g_b = grad_x ||r_b||, zero on padded frames.

    Runs with grad enabled whatever the caller's mode (the samplers loop under no_grad) and
    returns detached tensors: x0_hat (B, *S), norm (B,), grad (B, *S).
    """
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        x0_hat = denoise(x, t)
        norm, grad = residual_norm_grad(residual, x0_hat, x)
    return x0_hat.detach(), norm, fill_padding(grad, mask, 0.0)


def posterior_variance(t: float, sigma_data: float) -> float:
    """r_t^2 = sd^2 t^2 / (sd^2 + t^2): the variance of x0 given x_t for data of std sd."""
    return sigma_data**2 * t**2 / (sigma_data**2 + t**2)


def gaussian_score(
    residual: Residual, weight: float = 1.0, *, inflation: float = 0.0, sigma_data: float = 0.5
) -> Guidance:
    """The Gaussian likelihood's score as the guidance (production rule, ``weight``).

    The score of log N(y; A(D_x), Sigma) under the Tweedie approximation of DPS is
    -grad (1/2)||r_b||^2 = -||r_b|| g_b; it is added to the prior score with weight
    w_t = weight / (1 + inflation * r_t^2), so the correction of x_{i+1} is
    -(t_hat - t_next) * t_hat * w_t * ||r_b|| * g_b (the Euler step of the probability-flow ODE).
    With a calibrated likelihood (whitened by the noise's long-run std) weight = 1 is the
    posterior's own weight; r_t^2 = sd^2 t^2 / (sd^2 + t^2) is the variance of x0 given x_t for
    data of std sd (``sigma_data``), and ``inflation`` ~ ||A||^2 / sigma_y^2 adds the
    x0-uncertainty to the noise as PiGDM does (Song et al., ICLR 2023): exact for a Gaussian prior
    of std sd and an isotropic linear A with inflation = a^2 / sigma_y^2.
    """
    check_guidance_rule({"weight": weight}, inflation)

    def guidance(x_hat: torch.Tensor, ctx: StepContext) -> Guided:
        x0_hat, norm, grad = dps_gradient(residual, ctx.denoise, x_hat, ctx.t_hat, ctx.mask)
        t_hat, t_next = ctx.t_hat, ctx.t_next
        w = weight / (1.0 + inflation * posterior_variance(t_hat, sigma_data))
        # Score of the Gaussian likelihood: grad (1/2)||r||^2 = ||r|| grad ||r||.
        sq_grad = norm.reshape(-1, *([1] * (grad.ndim - 1))) * grad
        return Guided(x0_hat, -((t_hat - t_next) * t_hat * w * sq_grad), norm)

    return guidance


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
    *,
    draws_per_call: int | None = 1,
    **sampler_kwargs,
) -> PosteriorDraws:
    """K posterior draws of each of B trials, ``draws_per_call`` draws of every trial per call.

    A call for k draws (d0 .. d0 + k - 1) samples B * k items: item b * k + j is draw d0 + j of
    trial b, seeded by ``generators[b][d0 + j]``. Because every sampler here treats items
    independently, draw k of trial b equals what a batch holding that trial alone (with the same
    generator) would give, up to float rounding, however the draws are batched.

    Parameters
    ----------
    sampler : callable
        E.g. ``functools.partial(dps_edm, denoiser, residual, xi=0.2)``
        (:func:`ssip.sampling.guided.dps_edm`); called as
        ``sampler(shape_or_latents=(B * k, *S), generators=[...], **sampler_kwargs)``. With
        k > 1 whatever it holds per item (residual, frame mask) must repeat each trial k times
        in a row (``repeat_interleave``), k = len(generators) // B.
    generators : sequence (B) of sequences (K) of torch.Generator
        ``generators[b][k]`` seeds draw k of trial b (see :func:`~ssip.sampling.noise.trial_generator`).
    draws_per_call : int or None
        Draws of every trial per sampler call (None: all K in one call).
    **sampler_kwargs
        Passed on; ``shape_or_latents`` must be the shape (B, *S) (fixed latents would repeat
        one draw).

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
    B = len(generators)
    if int(shape[0]) != B:
        raise ValueError(f"shape_or_latents={tuple(shape)} for {B} trials: its first axis is B")
    if draws_per_call is not None and draws_per_call < 1:
        raise ValueError(f"draws_per_call={draws_per_call}: need >= 1 (or None for all)")
    per_call = min(draws_per_call or K, K)
    chunks = []
    for d0 in range(0, K, per_call):
        draws = range(d0, min(K, d0 + per_call))
        k = len(draws)
        flat = sampler(shape_or_latents=(B * k, *shape[1:]),
                       generators=[g[d] for g in generators for d in draws], **sampler_kwargs)
        chunks.append(flat.reshape(B, k, *flat.shape[1:]).float())
    return PosteriorDraws.from_samples(torch.cat(chunks, dim=1))
