"""EDM (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models").

Preconditioning (Table 1), the sigma schedule (Eq. 5) and the stochastic Heun sampler
(Algorithm 2) as plain functions. The network is a callable and the noise comes from one
``torch.Generator`` per batch item (:mod:`ssip.sampling.noise`). Nothing here imports Ray or
touches files.

:func:`edm_sample` is THE sampler loop: unconditional with ``guidance=None``, posterior sampling
with a :data:`Guidance` callable that replaces the first denoiser evaluation of a step and adds a
correction to x_{i+1} (DPS's rules: :mod:`ssip.sampling.dps`, :mod:`ssip.sampling.reference`).

Conventions shared with :mod:`ssip.sampling.dps`:

- ``denoiser(x, sigma) -> D_x``: the preconditioned denoiser (an estimate of the clean x0), with
  x of shape (B, *S) float64 and sigma of shape (B,) float64; it casts to its own dtype and must
  treat batch items independently (eval mode, no batch statistics).
- The last axis of an item is time (frames). ``frame_mask`` (B, T) is True on real frames; padded
  frames evolve unguided and are set to ``pad_value`` in the output.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from itertools import pairwise
from typing import NamedTuple, overload

import torch

from ssip.sampling.noise import item_noise

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: ``denoise(x, t) -> D(x; t)``: the denoiser at one noise level t (float) for the whole batch,
#: float64 out; differentiable, so a guidance rule can take gradients through it.
Denoise = Callable[[torch.Tensor, float], torch.Tensor]


class NonFiniteSampleError(FloatingPointError):
    """A sampler step produced NaN or inf; ``step`` and ``items`` (batch indices) say where."""

    def __init__(self, message: str, step: int, items: list[int]):
        super().__init__(message)
        self.step = step
        self.items = items


# ----------------------------------------------------------------------------------------------
# Preconditioning (Karras et al. 2022, Table 1): D(x; sigma) = c_skip x + c_out F(c_in x; c_noise).


def c_skip(sigma: torch.Tensor | float, sigma_data: float | torch.Tensor) -> torch.Tensor | float:
    """Skip weight sigma_data^2 / (sigma^2 + sigma_data^2)."""
    return sigma_data**2 / (sigma**2 + sigma_data**2)


def c_out(sigma: torch.Tensor | float, sigma_data: float | torch.Tensor) -> torch.Tensor | float:
    """Output scale sigma * sigma_data / sqrt(sigma^2 + sigma_data^2)."""
    return sigma * sigma_data / (sigma**2 + sigma_data**2) ** 0.5


def c_in(sigma: torch.Tensor | float, sigma_data: float | torch.Tensor) -> torch.Tensor | float:
    """Input scale 1 / sqrt(sigma^2 + sigma_data^2)."""
    return 1.0 / (sigma**2 + sigma_data**2) ** 0.5


@overload
def c_noise(sigma: torch.Tensor) -> torch.Tensor: ...


@overload
def c_noise(sigma: float) -> float: ...


def c_noise(sigma: torch.Tensor | float) -> torch.Tensor | float:
    """Noise conditioning ln(sigma) / 4."""
    return torch.log(sigma) / 4 if isinstance(sigma, torch.Tensor) else math.log(sigma) / 4


def loss_weight(sigma: torch.Tensor | float, sigma_data: float) -> torch.Tensor | float:
    """Loss weight lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def precondition(
    F: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    sigma: torch.Tensor,
    sigma_data: float | torch.Tensor,
    mean: torch.Tensor | None = None,
) -> torch.Tensor:
    """The preconditioned denoiser D(x; sigma) = mu + c_skip (x - mu) + c_out F(c_in (x - mu); ...).

    In full, D(x; sigma) = mu + c_skip (x - mu) + c_out F(c_in (x - mu); c_noise). With ``mean``
    None (mu = 0) this is Karras et al.'s D(x; sigma) = c_skip x + c_out F(c_in x; c_noise); a
    data mean mu applies EDM to the mean-removed data (:class:`ssip.models.prior.EDMPrior`).

    Parameters
    ----------
    F : callable
        The raw network, ``F(c_in * (x - mu), c_noise) -> (B, *S)`` with c_noise of shape (B,).
    x : torch.Tensor, shape (B, *S)
        Noisy input (data units).
    sigma : torch.Tensor, shape (B,)
        Noise level per item (data units); the coefficients are computed in its dtype.
    sigma_data : float or 0-d torch.Tensor
        Standard deviation of the (mean-removed) data, measured on the training set.
    mean : torch.Tensor, broadcastable to x, optional
        The data mean mu (e.g. per mel bin).

    Returns
    -------
    torch.Tensor, shape (B, *S), in x's dtype (F's input too; its output is cast to sigma's).
    """
    s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
    xc = x if mean is None else x - mean
    F_x = F((c_in(s, sigma_data) * xc).to(x.dtype), c_noise(sigma))
    skip = c_skip(s, sigma_data) * xc
    D_x = skip if mean is None else mean + skip
    return (D_x + c_out(s, sigma_data) * F_x.to(s.dtype)).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Schedule and sampler.


def karras_sigmas(
    num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0
) -> torch.Tensor:
    """Karras et al. (2022) Eq. 5 noise levels, float64, shape (num_steps + 1,), ending in 0.

    sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho for
    i < N, then sigma_N = 0. With N = 1 the single level is sigma_max.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps}: need at least 1 step")
    if not 0 < sigma_min <= sigma_max:
        raise ValueError(f"need 0 < sigma_min <= sigma_max, got {sigma_min}, {sigma_max}")
    i = torch.arange(num_steps, dtype=torch.float64)
    frac = i / max(num_steps - 1, 1)
    t = (sigma_max ** (1 / rho) + frac * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([t, torch.zeros(1, dtype=torch.float64)])


def churn_gamma(t_cur: float, num_steps: int, S_churn: float, S_min: float, S_max: float) -> float:
    """Algorithm 2's gamma_i: min(S_churn / N, sqrt(2) - 1) inside [S_min, S_max], else 0."""
    return min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0.0


def initial_latents(
    shape_or_latents: Sequence[int] | torch.Tensor,
    generators: Sequence[torch.Generator],
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Unit-variance starting noise (B, *S) float64: drawn per item, or the caller's latents."""
    if isinstance(shape_or_latents, torch.Tensor):
        latents = shape_or_latents.to(dtype=torch.float64)
        if len(generators) != latents.shape[0]:
            raise ValueError(
                f"{len(generators)} generators for a batch of {latents.shape[0]} latents: "
                "pass one torch.Generator per batch item"
            )
        return latents if device is None else latents.to(device)
    shape = tuple(int(s) for s in shape_or_latents)
    if len(generators) != shape[0]:
        raise ValueError(
            f"{len(generators)} generators for shape {shape}: pass one torch.Generator per item"
        )
    return item_noise(generators, shape[1:], device=device)


def item_noise_like(generators: Sequence[torch.Generator], x: torch.Tensor) -> torch.Tensor:
    """Per-item frame-stable standard normal noise shaped, typed and placed like x (B, *S)."""
    return item_noise(generators, x.shape[1:], device=x.device, dtype=x.dtype)


def check_frame_mask(frame_mask: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """Validate a (B, T) bool frame mask against x (B, ..., T); return it broadcastable to x."""
    if frame_mask is None:
        return None
    if frame_mask.dtype != torch.bool or tuple(frame_mask.shape) != (x.shape[0], x.shape[-1]):
        raise ValueError(
            f"frame_mask must be bool of shape (B, T) = ({x.shape[0]}, {x.shape[-1]}), "
            f"got {frame_mask.dtype} {tuple(frame_mask.shape)}"
        )
    empty = (~frame_mask.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"frame_mask has no real frame for batch items {empty}: drop those trials")
    return frame_mask.to(x.device).reshape(x.shape[0], *([1] * (x.ndim - 2)), x.shape[-1])


def check_finite(x: torch.Tensor, step: int, sigma: float, what: str) -> None:
    """Raise NonFiniteSampleError naming the step and the batch items whose x is not finite."""
    bad = ~torch.isfinite(x.flatten(1)).all(dim=1)
    if bad.any():
        items = bad.nonzero().flatten().tolist()
        raise NonFiniteSampleError(
            f"{what}: step {step} (sigma={sigma:.4g}) produced NaN/inf for batch items {items}; "
            "lower the guidance step size (zeta or xi) or check the denoiser and likelihood",
            step=step,
            items=items,
        )


def fill_padding(x: torch.Tensor, mask: torch.Tensor | None, pad_value: float) -> torch.Tensor:
    """x with padded frames (mask False) set to pad_value; x itself when there is no mask."""
    return x if mask is None else torch.where(mask, x, pad_value)


# ----------------------------------------------------------------------------------------------
# Guidance: what a posterior sampler adds to the loop.


class StepContext(NamedTuple):
    """Step i of :func:`edm_sample` as a :data:`Guidance` callable sees it."""

    step: int  # i, from 0
    t_hat: float  # noise level of x_hat (t_i raised by the churn)
    t_next: float  # t_{i+1}, where the step lands
    denoise: Denoise  # D(x; t), float64, differentiable
    mask: torch.Tensor | None  # frame mask broadcastable to x (True = real frame), or None
    generators: Sequence[torch.Generator]  # one per item, for a rule that draws noise


class Guided(NamedTuple):
    """What a :data:`Guidance` callable returns for one step."""

    denoised: torch.Tensor  # D(x_hat; t_hat) (B, *S) float64, the Euler step's x0 estimate
    correction: torch.Tensor | None = None  # added to x_{i+1} after the Euler/Heun update
    norm: torch.Tensor | None = None  # (B,) per-trial residual norm, for the callback


#: ``guidance(x_hat, ctx) -> Guided(denoised, correction, norm)``: evaluates the denoiser at
#: (x_hat, ctx.t_hat) itself, so that it can differentiate through it (DPS's
#: grad_{x_t} ||y - A(D(x_t))||), and returns a correction of x_{i+1}; the loop zeroes it on
#: padded frames. The rules: :func:`ssip.sampling.dps.gaussian_score` (production),
#: :func:`ssip.sampling.reference.normalised_step`, :func:`ssip.sampling.reference.constant_step`.
Guidance = Callable[[torch.Tensor, StepContext], Guided]
#: ``callback(step, sigma, x0_hat, residual_norm)``; residual_norm (B,) or None when unguided.
StepCallback = Callable[[int, float, torch.Tensor, torch.Tensor | None], None]


def edm_sample(
    denoiser: Denoiser,
    shape_or_latents: Sequence[int] | torch.Tensor,
    generators: Sequence[torch.Generator],
    *,
    num_steps: int = 18,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    S_churn: float = 0.0,
    S_min: float = 0.0,
    S_max: float = float("inf"),
    S_noise: float = 1.0,
    heun: bool = True,
    guidance: Guidance | None = None,
    guide_steps: Sequence[bool] | None = None,
    frame_mask: torch.Tensor | None = None,
    pad_value: float = 0.0,
    device: str | torch.device | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """EDM sampling (Karras et al. 2022, Algorithm 2; Euler when heun=False), optionally guided.

    Step i raises t_i to t_hat = (1 + gamma_i) t_i with fresh noise (churn), takes the Euler step
    x_{i+1} = x_hat + (t_{i+1} - t_hat) d_i with d_i = (x_hat - D(x_hat; t_hat)) / t_hat, and, but
    on the last step, Heun's correction with d'_i = (x_{i+1} - D(x_{i+1}; t_{i+1})) / t_{i+1}. On a
    guided step ``guidance`` supplies D(x_hat; t_hat) and a correction that is added to x_{i+1}
    (the DPS update); with ``guidance=None`` this is the unconditional sampler.

    Parameters
    ----------
    denoiser : callable
        ``denoiser(x (B, *S) float64, sigma (B,) float64) -> D_x (B, *S)``, items independent.
    shape_or_latents : (B, *S) shape or torch.Tensor
        A shape: unit-variance latents are drawn per item from ``generators``; a tensor: the
        caller's unit-variance latents (scaled by sigma_max here).
    generators : sequence of torch.Generator, length B
        One per item, seeded per (run, trial, draw); also feed the churn noise.
    num_steps, sigma_min, sigma_max, rho
        Schedule (:func:`karras_sigmas`); EDM's defaults are 18, 0.002, 80, 7.
    S_churn, S_min, S_max, S_noise
        Stochasticity (Algorithm 2); S_churn = 0 is the deterministic ODE sampler.
    heun : bool
        Second-order correction on every step but the last.
    guidance : callable, optional
        ``guidance(x_hat, ctx) -> Guided`` (:data:`Guidance`); None samples the prior.
    guide_steps : sequence of bool, length num_steps, optional
        With ``guidance``: guide only the steps marked True (default: all); an unguided step
        skips the likelihood and its backward pass.
    frame_mask : torch.Tensor, shape (B, T), bool, optional
        True on real frames; padded frames evolve unguided and are set to ``pad_value`` in the
        output.
    device
        Device of the drawn latents (ignored when latents are given).
    callback : callable, optional
        ``callback(i, t_hat, D_x, norm)`` after each step, for logging; must not modify.

    Returns
    -------
    torch.Tensor, shape (B, *S), float32
    """
    if guide_steps is None:
        guide_steps = [True] * num_steps
    if len(guide_steps) != num_steps:
        raise ValueError(f"guide_steps has {len(guide_steps)} entries for num_steps={num_steps}")
    latents = initial_latents(shape_or_latents, generators, device)
    mask = check_frame_mask(frame_mask, latents)
    t_steps = karras_sigmas(num_steps, sigma_min, sigma_max, rho).tolist()
    B = latents.shape[0]
    what = "edm_sample" if guidance is None else "guided edm_sample"

    def D(x: torch.Tensor, t: float) -> torch.Tensor:
        return denoiser(x, torch.full((B,), t, dtype=torch.float64, device=x.device)).double()

    # No graph outside the guidance: a guidance callable enables grad for its own evaluation.
    with torch.no_grad():
        x_next = latents * t_steps[0]
        for i, (t_cur, t_next) in enumerate(pairwise(t_steps)):
            x_cur = x_next
            # Increase noise temporarily.
            gamma = churn_gamma(t_cur, num_steps, S_churn, S_min, S_max)
            t_hat = t_cur + gamma * t_cur
            x_hat = x_cur
            if gamma > 0:
                eps = item_noise_like(generators, x_cur)
                x_hat = x_cur + math.sqrt(t_hat**2 - t_cur**2) * S_noise * eps
            # Denoise at t_hat, through the guidance on a guided step.
            if guidance is not None and guide_steps[i]:
                ctx = StepContext(i, t_hat, t_next, D, mask, generators)
                D_x, correction, norm = guidance(x_hat, ctx)
                D_x = D_x.detach()
            else:
                D_x, correction, norm = D(x_hat, t_hat), None, None
            # Euler step.
            d_cur = (x_hat - D_x) / t_hat
            x_next = x_hat + (t_next - t_hat) * d_cur
            # Apply 2nd order correction.
            if heun and i < num_steps - 1:
                d_prime = (x_next - D(x_next, t_next)) / t_next
                x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
            # Guidance step, per trial, on real frames only.
            if correction is not None:
                x_next = x_next + fill_padding(correction, mask, 0.0)
            check_finite(x_next, i, t_hat, what)
            if callback is not None:
                callback(i, t_hat, D_x, norm)
    return fill_padding(x_next, mask, pad_value).float()
