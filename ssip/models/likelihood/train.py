"""The likelihood's one training loop (:func:`fit_likelihood`, on any engine) and its use in one
process (:func:`train_likelihood`: feature cache, random windows from trials in memory)."""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
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
from ssip.models.training import Engine, LocalEngine, TrainHooks

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

@dataclass
class BestEpoch:
    """The best epoch so far (on rank 0): its number, validation score and trained weights."""

    epoch: int = 0
    score: float = -math.inf
    state: dict[str, torch.Tensor] | None = None


def _forward(engine: Engine, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Prediction (B, L, C) of a window batch: the head on cached backbone ``features``
    (``lengths``), else the whole model on ``mel`` with its ``real`` frames."""
    if "features" in batch:
        return engine.module.head(batch["features"], batch["lengths"])
    return engine(batch["mel"], batch["real"])


def fit_likelihood(engine: Engine, model: Likelihood, batches: Iterable[Mapping[str, Any]],
                   cfg: LikelihoodConfig, *, epochs: int, steps_per_epoch: int,
                   validate: Callable[[int], dict[str, Any]] | None, subject: str | None,
                   best: BestEpoch | None = None, resume: dict[str, Any] | None = None,
                   hooks: TrainHooks | None = None, progress: bool = True
                   ) -> dict[str, Any]:
    """THE training loop of the likelihood, on any :class:`~ssip.models.training.Engine`.

    ``epochs`` epochs of ``steps_per_epoch`` global steps. A step: the window batch's
    prediction, the squared error over its loss frames divided by the GLOBAL count of loss
    frames x electrodes / workers (one scalar all-reduce; in one process simply the MSE), so the
    averaged gradient is that of the MSE over the global batch, then ``engine.step``. After each
    epoch rank 0 scores the model with ``validate`` and keeps the best epoch's trained weights
    (``cfg.select_on``); ``hooks.checkpoint`` (every ``hooks.checkpoint_every`` samples, 0 =
    every epoch, and the last) or ``hooks.report``. At the end rank 0 loads the best epoch and
    sets the noise model from the validation residuals (:func:`set_noise_sigma`).

    Parameters
    ----------
    engine : Engine
    model : Likelihood
        The module inside the engine.
    batches : iterable of dict of Tensor
        This worker's batches: ``neural`` (B, L, C), ``loss`` (B, L) the frames the loss
        counts, and either ``mel`` (B, 80, L) with ``real`` (B, L), or cached backbone
        ``features`` (B, L, F) with ``lengths`` (B,).
    cfg : LikelihoodConfig
    epochs, steps_per_epoch : int
    validate : callable(noise_lags) -> metrics, or None
        Rank 0's validation (:func:`~ssip.models.likelihood.noise.evaluate_likelihood`);
        None (test runs without val trials): the last epoch is kept and sigma is not set.
    subject : str or None
        For messages.
    best : BestEpoch, optional
        Updated in place (a checkpoint hook reads it); restored from a checkpoint on resume.
    resume : dict, optional
        The run checkpoint's state: ``epoch``, ``samples_seen``, ``steps``, ``history``,
        ``data_wait_s``, ``seconds``.
    hooks : TrainHooks, optional
    progress : bool
        One line per epoch on stderr (rank 0), and ``hooks.progress_bar``.

    Returns
    -------
    dict
        ``subject``, ``n_electrodes``, the noise numbers of :func:`set_noise_sigma` (``val_mse``,
        ``val_r_mean``, ``val_r``, ``sigma``, ...; rank 0 with ``validate``), ``best_epoch``,
        ``epochs`` (run in total), ``samples_seen`` (global windows), ``steps``,
        ``samples_per_s`` (of this run's training steps), ``train_s`` (seconds in training
        steps), ``seconds`` (in all), ``data_wait_s``, ``resumed_from``, ``history`` (one row
        per epoch: ``train_mse`` over the global batch, ``val_mse``, ``val_r_mean``, ...).
    """
    hooks = hooks or TrainHooks()
    best = best if best is not None else BestEpoch()
    rank, world_size = engine.rank, engine.world_size
    device = next(model.parameters()).device
    n_el = model.n_electrodes
    resume = resume or {}
    epoch, samples_seen, steps = (int(resume.get(k, 0)) for k in ("epoch", "samples_seen", "steps"))
    history: list[dict[str, Any]] = list(resume.get("history", []))
    wait = float(resume.get("data_wait_s", 0.0))
    seconds_before = float(resume.get("seconds", 0.0))
    ckpt_every = hooks.checkpoint_every
    next_ckpt = (samples_seen // ckpt_every + 1) * ckpt_every if ckpt_every else 0
    start, start_samples, train_s = time.perf_counter(), samples_seen, 0.0
    name = f"likelihood {subject or ''}".strip()
    bar = hooks.bar(engine, progress, total=epochs, desc=f"{name} x{world_size}", unit="epoch")
    if bar is not None:
        bar.update(epoch)
    it = iter(batches)

    def state() -> dict[str, Any]:
        return {"epoch": epoch, "samples_seen": samples_seen, "steps": steps,
                "world_size": world_size, "history": history, "best_epoch": best.epoch,
                "best_score": best.score, "data_wait_s": wait,
                "seconds": seconds_before + time.perf_counter() - start,
                "likelihood": dataclasses.asdict(cfg), "subject": subject}

    ran_out = False
    while epoch < epochs and not ran_out:
        engine.train()
        t_epoch = time.perf_counter()
        sums = torch.zeros(2, dtype=torch.float64)  # squared error, loss frames x electrodes
        for _ in range(steps_per_epoch):
            t0 = time.perf_counter()
            b = next(it, None)
            wait += time.perf_counter() - t0
            # Stop together: a worker without a batch would leave the others in all-reduce.
            if int(engine.all_reduce(torch.tensor([0 if b is None else 1]), "min")) == 0:
                ran_out = True
                break
            b = {k: v.to(device) for k, v in b.items()}
            y, lmask = b["neural"].float(), b["loss"].bool()
            if "real" in b:
                b["mel"], b["real"] = b["mel"].float(), b["real"].bool()
            count = engine.all_reduce(lmask.sum().double().reshape(1).cpu())  # global loss frames
            denom = float(count) * n_el / world_size
            loss = window_mse(_forward(engine, b).float(), y, lmask, denominator=denom,
                              where=f"{name}, epoch {epoch + 1}", lr=cfg.lr)
            engine.step(loss)
            sums += torch.tensor([loss.item() * denom, float(lmask.sum()) * n_el],
                                 dtype=torch.float64)
            samples_seen += lmask.shape[0] * world_size
            steps += 1
            if hooks.after_step is not None:
                hooks.after_step(samples_seen)
        train_s += time.perf_counter() - t_epoch
        if ran_out:
            if rank == 0:
                log.warning("%s: a worker ran out of batches in epoch %d", name, epoch + 1)
            break
        epoch += 1
        total = engine.all_reduce(sums.clone())
        row: dict[str, Any] = {"epoch": epoch, "samples": samples_seen, "steps": steps,
                               "train_mse": float(total[0] / total[1].clamp_min(1)),
                               "loss": float(total[0] / total[1].clamp_min(1)),
                               "seconds": seconds_before + time.perf_counter() - start}
        if rank == 0 and validate is None:  # no val trials (debug runs): the last epoch
            best.epoch, best.state = epoch, copy.deepcopy(model.trained_state())
        elif rank == 0:
            model.eval()
            m = validate(0)  # the long-run noise factor is needed once, for sigma: not here
            row.update(val_mse=m["mse"], val_r_mean=m["r_mean"])
            score = -m["mse"] if cfg.select_on == "mse" else m["r_mean"]
            if score > best.score or best.state is None:
                best.score, best.epoch = score, epoch
                best.state = copy.deepcopy(model.trained_state())
            row["best_epoch"] = best.epoch
            if progress:
                print(f"[{name} x{world_size}] epoch {epoch}/{epochs}  train mse "
                      f"{row['train_mse']:.4f}  val mse {m['mse']:.4f}  val r {m['r_mean']:.3f}"
                      f"  data wait {wait:.1f} s", file=sys.stderr, flush=True)
            log.debug("%s epoch %d: %s", name, epoch, row)
        if bar is not None:
            bar.update(1)
        if hooks.metrics is not None:
            row = hooks.metrics.log(row, samples_seen=samples_seen, data_wait_s=wait)
        history.append(row)
        report = {k: row[k] for k in ("epoch", "samples", "steps", "train_mse")}
        if hooks.checkpoint is not None and (epoch == epochs or not ckpt_every
                                             or samples_seen >= next_ckpt):
            hooks.checkpoint(state(), report)
            if ckpt_every:
                next_ckpt = (samples_seen // ckpt_every + 1) * ckpt_every
        elif hooks.report is not None:
            hooks.report(report)
    if bar is not None:
        bar.close()
    stats: dict[str, Any] = {"subject": subject, "n_electrodes": n_el}
    if rank == 0 and best.state is not None:
        model.load_state_dict(best.state, strict=False)
        model.eval()
        if validate is not None:
            stats.update(set_noise_sigma(model, validate(cfg.noise_lags), cfg.sigma_min))
    stats.update({
        "best_epoch": best.epoch, "epochs": epoch, "samples_seen": samples_seen, "steps": steps,
        "samples_per_s": (samples_seen - start_samples) / max(train_s, 1e-9),
        "train_s": train_s, "seconds": seconds_before + time.perf_counter() - start,
        "data_wait_s": wait, "resumed_from": resume.get("samples_seen"), "history": history})
    return stats


def _local_batches(lengths: np.ndarray, rng: np.random.Generator, cfg: LikelihoodConfig, *,
                   mels: Sequence[np.ndarray], neurals: Sequence[np.ndarray],
                   feats: Sequence[torch.Tensor] | None, ys: Sequence[torch.Tensor] | None
                   ) -> Iterator[dict[str, torch.Tensor]]:
    """Endless window batches from trials in memory (trials drawn in proportion to length):
    crops of cached features with their receptive field, or mel/neural windows."""
    while True:
        which, starts, ns = _window_starts(lengths, rng, cfg.batch_size, cfg.window_frames)
        if feats is not None and ys is not None:
            x, lens, y, lmask = _feature_batch(feats, ys, which, starts, ns, cfg.past,
                                               cfg.lookahead)
            yield {"features": x, "lengths": lens, "neural": y, "loss": lmask}
        else:
            mel, y, lmask = _mel_batch(mels, neurals, which, starts, ns)
            yield {"mel": mel, "real": lmask, "neural": y, "loss": lmask}


def train_likelihood(trials: Sequence[Mapping[str, Any]], cfg: LikelihoodConfig | None = None,
                     progress: bool = True, whisper: nn.Module | None = None,
                     device: str | torch.device = "cpu") -> tuple[Likelihood, dict[str, Any]]:
    """Fit A(mel) -> neural for one subject in this process (:func:`fit_likelihood` on a
    :class:`~ssip.models.training.LocalEngine`); best epoch on val; noise on val.

    Parameters
    ----------
    trials : sequence of dict
        ``neural`` (T, C) float32 z-scored high gamma at 100 Hz, ``mel`` (80, T) ssip mel aligned
        frame for frame, ``split`` ("train" | "val" | "test"), ``subject``, ``trial_id``. Test
        trials are ignored. Needs >= 1 train and >= 1 val trial, all of one subject.
    cfg : LikelihoodConfig, optional
    progress : bool
        One line per epoch on stderr.
    whisper : transformers Whisper model, optional
        Already loaded ``cfg.whisper_model`` to reuse (kind "whisper").
    device : str or torch.device
        Where the model trains.

    Returns
    -------
    model : Likelihood
        Best-epoch weights, eval mode, ``sigma`` = RMS val residual per electrode x the
        long-run factor (floored at ``cfg.sigma_min``), or the whitened noise model.
    stats : dict
        :func:`fit_likelihood`'s numbers, and ``cached_features`` (bool), ``feature_cache_s``
        (0 unless cached).
    """
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
    lengths = np.array([m.shape[1] for m in mels], dtype=np.int64)
    steps_per_epoch, epochs = epochs_of(int(lengths.sum()), cfg)
    rng = np.random.default_rng(cfg.seed)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = build_likelihood(cfg, n_el, whisper=whisper)
        if isinstance(model, ConvLikelihood):
            set_mel_normaliser(model, *mel_normaliser(mels))
        model.to(device)
        cached = cfg.cache_features and model.backbone_frozen
        cache_s = 0.0
        feats = ys = None
        if cached:
            t0 = time.perf_counter()
            model.eval()
            feats = _cached_features(model, mels, cfg.batch_size)
            val_feats = _cached_features(model, [np.asarray(t["mel"], np.float32) for t in val],
                                         cfg.batch_size)
            ys = [torch.from_numpy(y).to(device) for y in neurals]
            cache_s = time.perf_counter() - t0
        val_y = [np.asarray(t["neural"], np.float32) for t in val]

        def validate(noise_lags: int) -> dict[str, Any]:
            if cached:
                return residual_metrics(_predict_cached(model, val_feats, cfg.batch_size), val_y,
                                        noise_lags)
            return evaluate_likelihood(model, val, cfg.batch_size, noise_lags)

        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                      lr=cfg.lr, weight_decay=cfg.weight_decay)
        batches = _local_batches(lengths, rng, cfg, mels=mels, neurals=neurals, feats=feats, ys=ys)
        stats = fit_likelihood(LocalEngine(model, optimizer), model, batches, cfg, epochs=epochs,
                               steps_per_epoch=steps_per_epoch, validate=validate,
                               subject=subject, progress=progress)
    return model, {**stats, "cached_features": cached, "feature_cache_s": cache_s}


def epochs_of(n_frames: int, cfg: LikelihoodConfig) -> tuple[int, int]:
    """(steps per epoch, epochs) for ``n_frames`` train frames: an epoch covers the train
    frames once with windows; ``total_samples`` rounds up to whole epochs."""
    windows = max(1, math.ceil(n_frames / cfg.window_frames))
    steps = max(1, math.ceil(windows / cfg.batch_size))
    epochs = (cfg.epochs if cfg.total_samples == 0
              else max(1, math.ceil(cfg.total_samples / (steps * cfg.batch_size))))
    return steps, epochs
