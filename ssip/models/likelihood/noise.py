"""Validation of a forward model and its noise: per-electrode sigma with the long-run factor,
or the whitened (AR + low-rank) noise model, fitted on validation residuals."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ssip.config import check_option
from ssip.mel import N_MELS
from ssip.models.likelihood.config import SPLITS
from ssip.models.likelihood.model import Likelihood
from ssip.sampling.whitening import fit_noise_model

log = logging.getLogger(__name__)


def check_trials(trials: Sequence[Mapping[str, Any]]) -> tuple[int, str | None]:
    """Validate trial dicts; return the electrode count and the (single) subject."""
    if not trials:
        raise ValueError("train_likelihood: no trials given")
    subjects = sorted({str(t.get("subject")) for t in trials if t.get("subject") is not None})
    if len(subjects) > 1:
        raise ValueError(f"train_likelihood: trials of subjects {subjects}; the likelihood is per "
                         f"subject: pass one subject's trials (load_trials(root, subject=...))")
    n_el = None
    for t in trials:
        where = f"subject {t.get('subject')!r} trial {t.get('trial_id')!r}"
        for key in ("neural", "mel", "split"):
            if key not in t:
                raise ValueError(f"{where}: field {key!r} is missing")
        x, m = np.asarray(t["neural"]), np.asarray(t["mel"])
        if x.ndim != 2 or m.ndim != 2 or m.shape[0] != N_MELS or x.shape[0] != m.shape[1]:
            raise ValueError(f"{where}: neural {x.shape} and mel {m.shape}; expected neural (T, C) "
                             f"and mel ({N_MELS}, T) aligned frame for frame")
        if x.shape[0] < 2:
            raise ValueError(f"{where}: {x.shape[0]} frame(s); a trial needs >= 2 frames")
        if n_el is None:
            n_el = x.shape[1]
        elif x.shape[1] != n_el:
            raise ValueError(f"{where}: {x.shape[1]} electrodes, earlier trials have {n_el}")
        if not (np.isfinite(x).all() and np.isfinite(m).all()):
            raise ValueError(f"{where}: neural or mel holds NaN/inf; re-run ingest or drop it")
        check_option(f"{where}: split", t["split"], SPLITS)
    return int(n_el), (subjects[0] if subjects else None)


def pad_batch(arrays: Sequence[np.ndarray], time_axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad arrays along ``time_axis`` into one batch; returns (batch, frame_mask (B, T))."""
    t_max = max(a.shape[time_axis] for a in arrays)
    out, mask = [], torch.zeros((len(arrays), t_max), dtype=torch.bool)
    for i, a in enumerate(arrays):
        n = a.shape[time_axis]
        pad = [(0, 0)] * a.ndim
        pad[time_axis] = (0, t_max - n)
        out.append(np.pad(np.asarray(a, dtype=np.float32), pad))
        mask[i, :n] = True
    return torch.from_numpy(np.stack(out)), mask


def pearson_per_electrode(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Pearson r of each column: pred, target (N, C) -> (C,); NaN where either is constant."""
    p = np.asarray(pred, np.float64) - np.mean(pred, axis=0)
    y = np.asarray(target, np.float64) - np.mean(target, axis=0)
    den = np.sqrt((p**2).sum(0) * (y**2).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (p * y).sum(0) / den, np.nan)


def residual_metrics(preds: Sequence[np.ndarray], targets: Sequence[np.ndarray],
             noise_lags: int = 0) -> dict[str, Any]:
    residuals = [np.asarray(y, np.float64) - p for p, y in zip(preds, targets)]
    pred = np.concatenate(preds, axis=0)  # (N, C)
    y = np.concatenate(targets, axis=0)
    res = np.concatenate(residuals, axis=0)
    r = pearson_per_electrode(pred, y)
    return {"mse": float(np.mean(res**2)), "r": r, "r_mean": float(np.nanmean(r)),
            "rms": np.sqrt(np.mean(res**2, axis=0)), "n_frames": int(y.shape[0]),
            "vif": variance_inflation(residuals, noise_lags), "residuals": residuals}


def variance_inflation(residuals: Sequence[np.ndarray], max_lag: int) -> np.ndarray:
    """Long-run over per-frame variance of each electrode's residual: 1 + 2 sum_k rho_k.

    The likelihood treats frames as independent, but high-gamma features are smoothed over tens
    of ms, so their noise is correlated over a few frames (lag-1 autocorrelation about 0.86 on
    the default corpus). A residual that varies slowly, as speech does, then carries
    ``1 + 2 sum_{k=1}^{L} rho_k`` times fewer independent samples than frames: the long-run
    variance of the noise (its spectral density at zero frequency) is that factor times the
    per-frame variance. Multiplying sigma^2 by it keeps the likelihood's weight on slow residuals
    right (about 5x smaller on the default corpus) instead of counting every frame as new
    evidence. rho_k are pooled over trials (lagged products within each trial, never across
    trials) with the truncated (flat) kernel at ``max_lag`` frames.

    Parameters
    ----------
    residuals : sequence of ndarray, shape (T_i, C)
        Held-out residuals y - A(mel) of whole trials.
    max_lag : int
        L, frames; 0 returns ones.

    Returns
    -------
    ndarray, shape (C,)
        Factor >= 1/(2L+1) (ones where an electrode has no variance).
    """
    n_el = residuals[0].shape[1] if residuals else 0
    if max_lag == 0 or not residuals:
        return np.ones(n_el)
    centred = [r - r.mean(axis=0) for r in residuals]  # per-trial offsets are not noise memory
    var = sum((r * r).sum(axis=0) for r in centred)
    lagged = np.zeros((max_lag, n_el))
    for r in centred:
        for k in range(1, min(max_lag, r.shape[0] - 1) + 1):
            lagged[k - 1] += (r[k:] * r[:-k]).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = lagged / var
    factor = 1.0 + 2.0 * np.nansum(rho, axis=0)
    factor = np.where(var > 0, factor, 1.0)
    # The flat kernel can go below the true factor on noisy estimates; 1 / (2L + 1) is the
    # smallest long-run factor a correlation over L lags can have.
    return np.maximum(factor, 1.0 / (2 * max_lag + 1))


@torch.no_grad()
def predict_trials(model: Likelihood, mels: Sequence[np.ndarray], batch_size: int = 8
                   ) -> list[np.ndarray]:
    """A(mel) of whole trials: mels (80, T_i) -> list of (T_i, C) float32 arrays."""
    model.eval()
    device = model.sigma.device
    order = np.argsort([m.shape[1] for m in mels])  # similar lengths together: less padding
    out: list[np.ndarray | None] = [None] * len(mels)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        mel, mask = pad_batch([mels[i] for i in idx], time_axis=1)
        pred = model(mel.to(device), mask.to(device)).cpu().numpy()
        for j, i in enumerate(idx):
            out[i] = pred[j, : mels[i].shape[1]]
    return out  # type: ignore[return-value]


def evaluate_likelihood(model: Likelihood, trials: Sequence[Mapping[str, Any]],
                        batch_size: int = 8, noise_lags: int = 0) -> dict[str, Any]:
    """Fit of A on whole trials.

    Returns
    -------
    dict
        ``mse`` (mean over frames and electrodes), ``r`` (C,) Pearson r per electrode over the
        concatenated frames, ``r_mean`` (NaN-mean over electrodes), ``rms`` (C,) residual RMS
        per electrode, ``n_frames``, ``vif`` (C,) the residual's long-run variance factor over
        ``noise_lags`` frames (:func:`variance_inflation`), ``residuals`` (per trial, (T_i, C)
        y - A(mel), for the whitened noise model's fit).
    """
    preds = predict_trials(model, [np.asarray(t["mel"]) for t in trials], batch_size)
    return residual_metrics(preds, [np.asarray(t["neural"]) for t in trials], noise_lags)



def set_noise_sigma(model: Likelihood, m: Mapping[str, Any], sigma_min: float) -> dict[str, Any]:
    """Set ``model.sigma`` from validation metrics ``m`` (with the long-run factor ``vif``):
    sigma = max(rms x sqrt(vif), sigma_min). Returns the validation numbers for the stats."""
    vif = m["vif"]
    sigma = np.maximum(m["rms"] * np.sqrt(vif), sigma_min)
    model.sigma.copy_(torch.from_numpy(sigma).to(model.sigma))
    out = {"val_mse": m["mse"], "val_r_mean": m["r_mean"], "val_r": [float(v) for v in m["r"]],
           "sigma": [float(v) for v in model.sigma], "val_rms": [float(v) for v in m["rms"]],
           "noise_vif": [float(v) for v in vif]}
    cfg = model.config
    if cfg.noise_model == "whitened":
        rank = min(cfg.noise_rank, max(model.n_electrodes - 1, 0))
        noise = fit_noise_model(m["residuals"], cfg.noise_order, rank)
        model.set_noise(noise)
        out["noise"] = {"model": "whitened", "order": noise.order, "rank": noise.rank,
                        "innov_std": [float(v) for v in noise.innov_std],
                        "val_nll_per_frame": float(noise.nll(
                            *_padded_residuals(m["residuals"])).sum()
                            / max(1, m["n_frames"] * model.n_electrodes))}
    return out


def _padded_residuals(residuals: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T_max, C) float64 residuals right-padded with zeros, and their (B, T_max) mask."""
    n = max(r.shape[0] for r in residuals)
    r = torch.zeros((len(residuals), n, residuals[0].shape[1]), dtype=torch.float64)
    mask = torch.zeros((len(residuals), n), dtype=torch.bool)
    for i, x in enumerate(residuals):
        r[i, :x.shape[0]] = torch.from_numpy(np.asarray(x, np.float64))
        mask[i, :x.shape[0]] = True
    return r, mask
