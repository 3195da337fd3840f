"""Training a likelihood in one process (feature cache, random windows, best epoch on val)."""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ssip.models.likelihood.config import LikelihoodConfig
from ssip.models.likelihood.model import (
    ConvLikelihood,
    Likelihood,
    build_likelihood,
    frame_lengths,
    mel_normaliser,
    set_mel_normaliser,
)
from ssip.models.likelihood.noise import (
    check_trials,
    evaluate_likelihood,
    pad_batch,
    residual_metrics,
    set_noise_sigma,
)

log = logging.getLogger(__name__)

log = logging.getLogger(__name__)

@torch.no_grad()
def _cached_features(model: Likelihood, mels: Sequence[np.ndarray], batch_size: int
                     ) -> list[torch.Tensor]:
    """Backbone features of whole trials, (T_i, F) each, computed in length-sorted batches."""
    device = model.sigma.device
    order = np.argsort([m.shape[1] for m in mels])
    out: list[torch.Tensor | None] = [None] * len(mels)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        mel, mask = pad_batch([mels[i] for i in idx], time_axis=1)
        lengths = frame_lengths(mask, mel.shape[0], mel.shape[2])
        feats = model.features(mel.to(device), lengths.to(device))
        for j, i in enumerate(idx):
            out[i] = feats[j, : mels[i].shape[1]].clone()
    return out  # type: ignore[return-value]


@torch.no_grad()
def _predict_cached(model: Likelihood, feats: Sequence[torch.Tensor], batch_size: int
                    ) -> list[np.ndarray]:
    out = []
    for s in range(0, len(feats), batch_size):
        chunk = feats[s:s + batch_size]
        lengths = torch.tensor([f.shape[0] for f in chunk], device=chunk[0].device)
        x = nn.utils.rnn.pad_sequence(list(chunk), batch_first=True)  # (B, T, F)
        pred = model.head(x, lengths).cpu().numpy()
        out.extend(pred[j, : f.shape[0]] for j, f in enumerate(chunk))
    return out


def _window_starts(lengths: np.ndarray, rng: np.random.Generator, n: int, w: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(trial, start, frames) of n random windows, trials drawn in proportion to length."""
    which = rng.choice(len(lengths), size=n, p=lengths / lengths.sum())
    starts = np.array([rng.integers(0, max(lengths[k] - w, 0) + 1) for k in which])
    return which, starts, np.minimum(w, lengths[which])


def _feature_batch(feats: Sequence[torch.Tensor], ys: Sequence[torch.Tensor], which, starts, ns,
                   past: int, lookahead: int):
    """Crops covering each window's receptive field: the head then predicts the window frames
    exactly as it would inside the whole trial. Returns (x (B, L, F), lengths (B,),
    y (B, L, C), loss_mask (B, L))."""
    crops, targets, spans = [], [], []
    for k, s, n in zip(which, starts, ns):
        t = feats[k].shape[0]
        lo, hi = max(0, s - past), min(t, s + n + lookahead)
        crops.append(feats[k][lo:hi])
        targets.append(ys[k][lo:hi])
        spans.append((s - lo, s - lo + n))
    lengths = torch.tensor([c.shape[0] for c in crops])
    x = nn.utils.rnn.pad_sequence(crops, batch_first=True)
    y = nn.utils.rnn.pad_sequence(targets, batch_first=True)
    pos = torch.arange(x.shape[1])[None, :]
    a = torch.tensor([sp[0] for sp in spans])[:, None]
    b = torch.tensor([sp[1] for sp in spans])[:, None]
    return x, lengths, y, (pos >= a) & (pos < b)


def _mel_batch(mels: Sequence[np.ndarray], neurals: Sequence[np.ndarray], which, starts, ns):
    """Windows of mel and neural (when the backbone trains): (mel (B, 80, W), y (B, W, C),
    mask (B, W))."""
    mel, mask = pad_batch([mels[k][:, s:s + n] for k, s, n in zip(which, starts, ns)], 1)
    y, _ = pad_batch([neurals[k][s:s + n] for k, s, n in zip(which, starts, ns)], 0)
    return mel, y, mask



def window_mse(pred: torch.Tensor, y: torch.Tensor, loss_mask: torch.Tensor, *,
               denominator: torch.Tensor | float | None = None, where: str = "likelihood",
               lr: float | None = None) -> torch.Tensor:
    """The training loss: squared error summed over the masked frames and all electrodes,
    divided by ``denominator`` (default: masked frames x electrodes, i.e. the MSE).

    A data-parallel worker passes the GLOBAL count divided by the number of workers, so that the
    averaged gradient equals the gradient of the MSE over the global batch. Raises
    FloatingPointError (naming ``where``) when the loss is not finite.
    """
    sq = ((pred - y) ** 2).sum(-1)  # (B, L)
    if denominator is None:
        denominator = loss_mask.sum() * pred.shape[-1]
    loss = torch.where(loss_mask, sq, 0.0).sum() / denominator
    if not torch.isfinite(loss):
        raise FloatingPointError(f"{where}: loss is {loss.item()}; lower lr"
                                 f"{f' (now {lr})' if lr is not None else ''} or check the "
                                 f"trials for NaN/inf")
    return loss

def train_likelihood(trials: Sequence[Mapping[str, Any]], cfg: LikelihoodConfig | None = None,
                     progress: bool = True, whisper: nn.Module | None = None,
                     device: str | torch.device = "cpu") -> tuple[Likelihood, dict[str, Any]]:
    """Fit A(mel) -> neural for one subject; pick the best epoch on val; estimate sigma on val.

    Parameters
    ----------
    trials : sequence of dict
        ``neural`` (T, C) float32 z-scored high gamma at 100 Hz, ``mel`` (80, T) ssip mel aligned
        frame for frame, ``split`` ("train" | "val" | "test"), ``subject``, ``trial_id``. Test
        trials are ignored. Needs >= 1 train and >= 1 val trial, all of one subject.
    cfg : LikelihoodConfig, optional
    progress : bool
        Show a tqdm bar over epochs.
    whisper : transformers Whisper model, optional
        Already loaded ``cfg.whisper_model`` to reuse (kind "whisper").
    device : str or torch.device
        Where the model trains.

    Returns
    -------
    model : Likelihood
        Best-epoch weights, eval mode, ``sigma`` = RMS val residual per electrode
        (floored at ``cfg.sigma_min``).
    stats : dict
        ``val_mse``, ``val_r_mean``, ``val_r`` (list, per electrode), ``sigma`` (list),
        ``best_epoch`` (1-based), ``epochs``, ``samples_seen`` (windows), ``samples_per_s``
        (train windows per second of the training loop), ``cached_features`` (bool),
        ``feature_cache_s`` (0 unless cached), ``train_s``,
        ``history`` (per epoch: train_mse, val_mse, val_r_mean), ``subject``, ``n_electrodes``.
    """
    from tqdm.auto import tqdm

    cfg = cfg or LikelihoodConfig()
    n_el, subject = check_trials(trials)
    train = [t for t in trials if t["split"] == "train"]
    val = [t for t in trials if t["split"] == "val"]
    if not train or not val:
        raise ValueError(f"train_likelihood (subject {subject!r}): {len(train)} train and "
                         f"{len(val)} val trials; both splits are needed (val picks the epoch "
                         f"and estimates the noise sigma)")
    mels = [np.asarray(t["mel"], np.float32) for t in train]
    neurals = [np.asarray(t["neural"], np.float32) for t in train]
    lengths = np.array([m.shape[1] for m in mels], dtype=np.float64)
    windows_per_epoch = max(1, math.ceil(lengths.sum() / cfg.window_frames))
    steps_per_epoch = max(1, math.ceil(windows_per_epoch / cfg.batch_size))
    epochs = (cfg.epochs if cfg.total_samples == 0
              else max(1, math.ceil(cfg.total_samples / (steps_per_epoch * cfg.batch_size))))
    rng = np.random.default_rng(cfg.seed)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = build_likelihood(cfg, n_el, whisper=whisper)
        if isinstance(model, ConvLikelihood):
            set_mel_normaliser(model, *mel_normaliser(mels))
        model.to(device)
        cached = cfg.cache_features and model.backbone_frozen
        cache_s = 0.0
        if cached:
            t0 = time.perf_counter()
            model.eval()
            feats = _cached_features(model, mels, cfg.batch_size)
            val_feats = _cached_features(model, [np.asarray(t["mel"], np.float32) for t in val],
                                         cfg.batch_size)
            ys = [torch.from_numpy(y).to(device) for y in neurals]
            cache_s = time.perf_counter() - t0
        val_y = [np.asarray(t["neural"], np.float32) for t in val]

        def validate(noise_lags: int = 0) -> dict[str, Any]:
            # The noise's long-run factor is needed once, for sigma: not on every epoch.
            if cached:
                return residual_metrics(_predict_cached(model, val_feats, cfg.batch_size), val_y,
                                noise_lags)
            return evaluate_likelihood(model, val, cfg.batch_size, noise_lags)

        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        history: list[dict[str, float]] = []
        best_score, best_state, best_epoch = -math.inf, None, 0
        train_s, seen = 0.0, 0
        bar = tqdm(range(1, epochs + 1), desc=f"likelihood {subject or ''}".strip(),
                   disable=not progress)
        for epoch in bar:
            model.train()
            t1 = time.perf_counter()
            losses = []
            for _ in range(steps_per_epoch):
                which, starts, ns = _window_starts(lengths.astype(np.int64), rng,
                                                   cfg.batch_size, cfg.window_frames)
                if cached:
                    x, lens, y, lmask = (v.to(device) for v in _feature_batch(
                        feats, ys, which, starts, ns, cfg.past, cfg.lookahead))
                    pred = model.head(x, lens)
                else:
                    mel, y, lmask = (v.to(device) for v in _mel_batch(
                        mels, neurals, which, starts, ns))
                    pred = model(mel, lmask)
                loss = window_mse(pred, y, lmask, where=f"train_likelihood (subject "
                                  f"{subject!r}), epoch {epoch}", lr=cfg.lr)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(loss.item())
                seen += len(which)
            train_s += time.perf_counter() - t1
            model.eval()
            m = validate()
            history.append({"epoch": epoch, "train_mse": float(np.mean(losses)),
                            "val_mse": m["mse"], "val_r_mean": m["r_mean"]})
            bar.set_postfix(val_mse=f"{m['mse']:.4f}", val_r=f"{m['r_mean']:.3f}")
            log.debug("likelihood epoch %d: %s", epoch, history[-1])
            score = -m["mse"] if cfg.select_on == "mse" else m["r_mean"]
            if score > best_score or best_state is None:
                best_score, best_epoch = score, epoch
                best_state = copy.deepcopy(model.trained_state())

    model.load_state_dict(best_state, strict=False)
    model.eval()
    stats = {
        "subject": subject,
        "n_electrodes": n_el,
        **set_noise_sigma(model, validate(cfg.noise_lags), cfg.sigma_min),
        "best_epoch": best_epoch,
        "epochs": epochs,
        "samples_seen": seen,
        "samples_per_s": seen / max(train_s, 1e-9),
        "train_s": train_s,
        "cached_features": cached,
        "feature_cache_s": cache_s,
        "history": history,
    }
    return model, stats
