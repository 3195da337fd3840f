"""The DPS residual of a likelihood: ``residual(x0_hat) -> (r, r_mask)``."""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch

from ssip.mel import N_MELS
from ssip.models.likelihood.model import Likelihood, frame_lengths

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# DPS.


def make_residual(model: Likelihood, neural: torch.Tensor | np.ndarray,
                  frame_mask: torch.Tensor | None = None, forward: Callable | None = None
                  ) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The ``residual(x0_hat) -> (r, r_mask)`` callable that :mod:`ssip.sampling.dps` guides with.

    Puts ``model`` in eval mode and freezes its weights (``requires_grad_(False)``), so that under
    ``torch.enable_grad`` only the sampler's x carries gradients.

    Parameters
    ----------
    model : Likelihood
    neural : Tensor or ndarray, shape (B, T, C)
        Observed neural features of the trials (z-scored, 100 Hz), right-padded.
    frame_mask : bool Tensor, shape (B, T), optional
        True on real frames.
    forward : callable, optional
        ``forward(mel, frame_mask) -> A(mel)`` to use instead of ``model`` itself (the decoder's
        autocast / checkpointed / compiled call of it).

    Returns
    -------
    callable
        ``residual(x0_hat)`` with x0_hat (B, 1, 80, T) (or (B, 80, T)), any float dtype, returning
        r (B, T, C) = (neural - A(x0_hat)) / sigma (0 on padding) and r_mask (B, T, 1) bool.
    """
    model.eval()
    model.requires_grad_(False)
    device = model.sigma.device
    y = torch.as_tensor(neural, dtype=torch.float32, device=device)
    if y.ndim != 3 or y.shape[2] != model.n_electrodes:
        raise ValueError(f"make_residual: neural has shape {tuple(y.shape)}; expected (B, T, "
                         f"{model.n_electrodes})")
    mask = None if frame_mask is None else frame_mask.to(device)
    frame_lengths(mask, y.shape[0], y.shape[1])  # validate now, not at the first sampler step

    def residual(x0_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mel = x0_hat[:, 0] if x0_hat.ndim == 4 and x0_hat.shape[1] == 1 else x0_hat
        if mel.ndim != 3 or tuple(mel.shape) != (y.shape[0], N_MELS, y.shape[1]):
            raise ValueError(f"residual: x0_hat has shape {tuple(x0_hat.shape)}; expected "
                             f"({y.shape[0]}, 1, {N_MELS}, {y.shape[1]}) to match the neural data")
        return model.whitened_residual(mel, y, mask, forward=forward)

    return residual
