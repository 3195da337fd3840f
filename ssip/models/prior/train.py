"""The prior's data helpers and its one training loop (:func:`fit_prior`, on any engine;
:func:`train_prior` in one process)."""

from __future__ import annotations

import copy
import dataclasses
import logging
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ssip.mel import MEL_FLOOR
from ssip.models.prior.config import PriorConfig
from ssip.models.prior.model import EDMPrior, edm_loss, sample_sigma, sigma_quartile_edges
from ssip.models.training import Engine, LocalEngine, TrainHooks

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Data helpers (numpy in, numpy out).


def estimate_data_stats(mels: Sequence[np.ndarray]) -> tuple[np.ndarray, float]:
    """Per-mel-bin mean (80,) and sigma_data (std of all frames about that mean) of training mels.

    Parameters
    ----------
    mels : sequence of ndarray, each (80, T_i)
    """
    if not mels:
        raise ValueError("estimate_data_stats: no mels given")
    cat = np.concatenate([np.asarray(m, dtype=np.float64) for m in mels], axis=1)  # (80, sum T)
    mean = cat.mean(axis=1)
    sigma_data = float(np.sqrt(((cat - mean[:, None]) ** 2).mean()))
    return mean.astype(np.float32), sigma_data


def source_probabilities(lengths: Sequence[int], sources: Sequence[str],
                         weights: dict[str, float] | None) -> np.ndarray:
    """Probability of drawing each mel: ``weights[source]`` shared within a source by length.

    With no weights every frame of the corpus is equally likely (probability proportional to
    length). With weights, source ``s`` gets ``weights[s] / sum of the weights of the sources
    present`` of the windows; a source present but missing from ``weights`` gets none.

    Returns
    -------
    ndarray, shape (len(lengths),), float64, sums to 1.
    """
    lengths = np.asarray(lengths, dtype=np.float64)
    if not weights:
        return lengths / lengths.sum()
    if len(sources) != len(lengths):
        raise ValueError(f"source_probabilities: {len(sources)} sources for {len(lengths)} mels")
    src = np.asarray(sources)
    present = sorted(set(sources))
    total = sum(float(weights.get(s, 0.0)) for s in present)
    if total <= 0:
        raise ValueError(f"source weights {weights} give no weight to any source present "
                         f"({present}); name at least one of them")
    p = np.zeros_like(lengths)
    for s in present:
        mask = src == s
        p[mask] = float(weights.get(s, 0.0)) / total * lengths[mask] / lengths[mask].sum()
    return p


def random_windows(
    mels: Sequence[np.ndarray], window: int, n: int, rng: np.random.Generator,
    p: np.ndarray | None = None,
) -> np.ndarray:
    """Cut ``n`` random windows of ``window`` frames from a list of mels.

    A mel is chosen with probability ``p`` (default: proportional to its length, so every frame
    of the corpus is about equally likely; see :func:`source_probabilities`), then a start frame
    uniformly. A mel shorter than ``window`` is placed
    at a random offset inside the window and the rest is filled with ``MEL_FLOOR`` (silence).

    Parameters
    ----------
    mels : sequence of ndarray, each (80, T_i)
    window : int
        Window length in frames (10 ms each).
    n : int
    rng : numpy.random.Generator

    Returns
    -------
    ndarray, shape (n, 80, window), float32
    """
    if not mels:
        raise ValueError("random_windows: no mels given")
    lengths = np.array([m.shape[1] for m in mels], dtype=np.float64)
    if np.any(lengths <= 0):
        raise ValueError(f"random_windows: mel(s) {np.flatnonzero(lengths <= 0).tolist()} have no frames")
    n_mels = mels[0].shape[0]
    out = np.full((n, n_mels, window), MEL_FLOOR, dtype=np.float32)
    which = rng.choice(len(mels), size=n, p=lengths / lengths.sum() if p is None else p)
    for i, k in enumerate(which):
        m = mels[k]
        t = m.shape[1]
        if t >= window:
            start = int(rng.integers(0, t - window + 1))
            out[i] = m[:, start : start + window]
        else:
            offset = int(rng.integers(0, window - t + 1))
            out[i, :, offset : offset + t] = m
    return out


def window_batches(
    mels: Sequence[np.ndarray], window: int, batch_size: int, rng: np.random.Generator,
    n_batches: int | None = None, p: np.ndarray | None = None,
) -> Iterator[torch.Tensor]:
    """Endless (or ``n_batches``) batches of random windows, as tensors (B, 1, 80, window)."""
    i = 0
    while n_batches is None or i < n_batches:
        yield torch.from_numpy(random_windows(mels, window, batch_size, rng, p))[:, None]
        i += 1



# ---------------------------------------------------------------------------------------------
# Config, EMA, training.


def ema_beta(batch_size: int, halflife_samples: float, samples_seen: int | None = None,
             rampup_ratio: float | None = None) -> float:
    """Per-step EMA decay so that a weight's influence halves every ``halflife_samples`` samples.

    beta = 0.5 ** (batch_size / halflife), with the half-life capped at
    ``rampup_ratio * samples_seen`` when both are given (EDM's ramp-up, so early weights fade fast).
    """
    h = float(halflife_samples)
    if rampup_ratio and samples_seen is not None:
        h = min(h, rampup_ratio * samples_seen)
    return 0.5 ** (batch_size / max(h, 1e-8))


class EMA:
    """Exponential moving average of a model's weights (buffers are copied, not averaged)."""

    def __init__(self, model: nn.Module):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, beta: float) -> None:
        for p_ema, p in zip(self.model.parameters(), model.parameters(), strict=True):
            p_ema.lerp_(p.detach(), 1.0 - beta)
        for b_ema, b in zip(self.model.buffers(), model.buffers(), strict=True):
            b_ema.copy_(b)


def learning_rate(samples_seen: int, cfg: PriorConfig) -> float:
    """Linear warm-up over ``warmup_samples``, then constant (EDM)."""
    if cfg.warmup_samples <= 0:
        return cfg.lr
    return cfg.lr * min(1.0, samples_seen / cfg.warmup_samples)


def prior_loss(
    model: nn.Module, x0: torch.Tensor, generator: torch.Generator, cfg: PriorConfig,
    lr: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The training loss of one batch: sigma ~ lognormal(p_mean, p_std), EDM-weighted denoising.

    Returns the scalar loss (in the graph), the per-sample losses (B,) (detached) and the sigmas
    (B,). Raises FloatingPointError, naming the sigma range, when the loss is not finite.
    """
    model.train()
    sigma = sample_sigma(x0.shape[0], generator, cfg.p_mean, cfg.p_std, device=x0.device)
    per_element = edm_loss(model, x0, generator, sigma=sigma)  # (B, 1, 80, T)
    per_sample = per_element.float().mean(dim=tuple(range(1, per_element.ndim)))  # (B,)
    loss = per_sample.mean()
    if not torch.isfinite(loss):
        raise FloatingPointError(
            f"prior training: loss is {loss.item()} at sigma in [{sigma.min().item():.3g}, "
            f"{sigma.max().item():.3g}]; lower lr{f' (now {lr:.3g})' if lr is not None else ''} "
            f"or check the mels for NaN/inf"
        )
    return loss, per_sample.detach(), sigma


def _as_batch(batch: Any, device: torch.device) -> torch.Tensor:
    x = torch.as_tensor(batch, dtype=torch.float32)
    if x.ndim == 3:
        x = x[:, None]  # (B, 80, T) -> (B, 1, 80, T)
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"prior batch must be (B, 80, T) or (B, 1, 80, T), got {tuple(x.shape)}")
    return x.to(device)


def fit_prior(engine: Engine, net: EDMPrior, batches: Iterable[Any], cfg: PriorConfig, *,
              generator: torch.Generator, ema: EMA, resume: dict[str, Any] | None = None,
              hooks: TrainHooks | None = None, progress: bool = True) -> dict[str, Any]:
    """THE training loop of the prior, on any :class:`~ssip.models.training.Engine`: until
    ``cfg.total_samples`` windows have been seen by all workers together.

    Each step: learning rate (warm-up), the EDM loss of the local batch (sigma and noise from
    ``generator``), ``engine.step``, the EMA update at the global batch, the loss per sigma
    quartile; every ``cfg.log_every_samples`` a log row (summed over the workers), a progress
    line, and ``hooks.checkpoint`` or ``hooks.report``.

    Parameters
    ----------
    engine : Engine
        :class:`~ssip.models.training.LocalEngine` in one process, DeepSpeed under Ray Train.
    net : EDMPrior
        The module inside the engine (the EMA follows it).
    batches : iterable of Tensor or ndarray (B, 80, T) or (B, 1, 80, T)
        This worker's batches; every worker must use the same B. The run stops when any worker
        runs out.
    cfg : PriorConfig
    generator : torch.Generator
        This worker's sigma/noise generator (restored on resume).
    ema : EMA
    resume : dict, optional
        State of the run checkpoint resumed from (``samples_seen``, ``steps``, ``history``,
        ``data_wait_s``, ``seconds``).
    hooks : TrainHooks, optional
    progress : bool
        A progress line per log interval on stderr (rank 0), and ``hooks.progress_bar``.

    Returns
    -------
    dict
        ``samples_seen`` (global), ``steps``, ``seconds``, ``samples_per_s``, ``loss`` (mean over
        the last log interval), ``loss_by_sigma_quartile`` (same interval, low to high sigma),
        ``sigma_quartile_edges``, ``history`` (one row per log interval), ``lr``,
        ``data_wait_s`` (seconds this worker waited for batches), ``resumed_from``.
    """
    hooks = hooks or TrainHooks()
    rank, world_size = engine.rank, engine.world_size
    device = next(net.parameters()).device
    edges = torch.tensor(sigma_quartile_edges(cfg.p_mean, cfg.p_std))
    buckets = torch.zeros(2, 4, dtype=torch.float64)  # (sum of loss, count) per sigma quartile
    resume = resume or {}
    history: list[dict[str, Any]] = list(resume.get("history", []))
    samples_seen, steps = int(resume.get("samples_seen", 0)), int(resume.get("steps", 0))
    wait = float(resume.get("data_wait_s", 0.0))
    seconds_before = float(resume.get("seconds", 0.0))
    every = cfg.log_every_samples
    next_log = (samples_seen // every + 1) * every
    ckpt_every = hooks.checkpoint_every or every
    next_ckpt = (samples_seen // ckpt_every + 1) * ckpt_every
    lr = learning_rate(samples_seen, cfg)
    start, start_samples = time.perf_counter(), samples_seen
    it = iter(batches)
    bar = hooks.bar(engine, progress, total=cfg.total_samples, desc=f"prior x{world_size}",
                    unit="windows")
    if bar is not None:
        bar.update(samples_seen)

    def state() -> dict[str, Any]:
        return {"samples_seen": samples_seen, "steps": steps, "world_size": world_size,
                "history": history, "data_wait_s": wait,
                "seconds": seconds_before + time.perf_counter() - start,
                "prior": dataclasses.asdict(cfg)}

    def emit(final: bool = False) -> None:
        nonlocal next_ckpt
        total = engine.all_reduce(buckets.clone())  # the loss over all workers' samples
        by_q = (total[0] / total[1].clamp_min(1)).tolist()
        row = {"samples": samples_seen, "steps": steps,
               "loss": float(total[0].sum() / total[1].sum().clamp_min(1)),
               "loss_by_sigma_quartile": by_q, "lr": lr,
               "seconds": seconds_before + time.perf_counter() - start}
        if hooks.metrics is not None:
            row = hooks.metrics.log(row, samples_seen=samples_seen, data_wait_s=wait)
        history.append(row)
        if progress and rank == 0:
            q = " ".join(f"{v:.3f}" for v in by_q)
            print(f"[prior x{world_size}] {samples_seen:>9d} samples  loss {row['loss']:.4f}  by "
                  f"sigma quartile [{q}]  lr {lr:.2e}  "
                  f"{(samples_seen - start_samples) / max(time.perf_counter() - start, 1e-9):.1f} "
                  f"samples/s  data wait {wait:.1f} s", file=sys.stderr, flush=True)
        metrics = {k: row[k] for k in ("samples", "steps", "loss", "lr", "seconds")} | {
            f"loss_q{i + 1}": v for i, v in enumerate(by_q)}
        if hooks.checkpoint is not None and (final or samples_seen >= next_ckpt):
            hooks.checkpoint(state(), metrics)
            next_ckpt = (samples_seen // ckpt_every + 1) * ckpt_every
        elif hooks.report is not None:
            hooks.report(metrics)
        buckets.zero_()

    while samples_seen < cfg.total_samples:
        t0 = time.perf_counter()
        batch = next(it, None)
        wait += time.perf_counter() - t0
        # Stop together: a worker without a batch would leave the others waiting in all-reduce.
        if int(engine.all_reduce(torch.tensor([0 if batch is None else 1]), "min")) == 0:
            if world_size > 1 and rank == 0:
                log.warning("prior training: a worker ran out of batches at %d of %d samples",
                            samples_seen, cfg.total_samples)
            break
        x0 = _as_batch(batch, device)
        lr = learning_rate(samples_seen, cfg)
        engine.set_lr(lr)
        loss, per_sample, sigma = prior_loss(engine, x0, generator, cfg, lr=lr)
        engine.step(loss)
        global_batch = x0.shape[0] * world_size
        samples_seen += global_batch
        steps += 1
        ema.update(net, ema_beta(global_batch, cfg.ema_halflife_samples, samples_seen,
                                 cfg.ema_rampup_ratio or None))
        bucket = torch.bucketize(sigma.cpu(), edges)  # 0..3, low to high sigma
        buckets[0].index_add_(0, bucket, per_sample.cpu().double())
        buckets[1].index_add_(0, bucket, torch.ones_like(per_sample.cpu(), dtype=torch.float64))
        if bar is not None:
            bar.update(global_batch)
        if samples_seen >= next_log or samples_seen >= cfg.total_samples:
            emit(final=samples_seen >= cfg.total_samples)
            next_log = (samples_seen // every + 1) * every
        if hooks.after_step is not None:
            hooks.after_step(samples_seen)
    if int(engine.all_reduce(buckets[1].sum().reshape(1).clone())) > 0:
        emit(final=True)
    if bar is not None:
        bar.close()
    seconds = seconds_before + time.perf_counter() - start
    last = history[-1] if history else {"loss": float("nan"), "loss_by_sigma_quartile": [float("nan")] * 4}
    return {"samples_seen": samples_seen, "steps": steps, "seconds": seconds,
            "samples_per_s": (samples_seen - start_samples) / max(time.perf_counter() - start, 1e-9),
            "loss": last["loss"], "loss_by_sigma_quartile": last["loss_by_sigma_quartile"],
            "sigma_quartile_edges": edges.tolist(), "history": history, "lr": lr,
            "data_wait_s": wait, "resumed_from": start_samples or None}


def train_prior(
    model: EDMPrior,
    batches: Iterable[Any],
    cfg: PriorConfig,
    progress: bool = True,
    *,
    ema: EMA | None = None,
) -> dict[str, Any]:
    """Train the prior in this process (:func:`fit_prior` on a
    :class:`~ssip.models.training.LocalEngine` with AdamW) until ``cfg.total_samples`` have been
    seen.

    Parameters
    ----------
    model : EDMPrior
        Trained in place (its ``sigma_data`` and ``data_mean`` should already be set).
    batches : iterable of Tensor or ndarray, each (B, 80, T) or (B, 1, 80, T)
        E.g. :func:`window_batches`; stops early if it runs out.
    cfg : PriorConfig
    progress : bool
        Print one line per ``cfg.log_every_samples`` to stderr.
    ema : EMA, optional
        Continue an existing EMA (resume); a new one is made from ``model`` when None.

    Returns
    -------
    dict
        :func:`fit_prior`'s numbers and ``ema`` (the :class:`EMA` whose ``.model`` is the
        network to sample with).
    """
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    ema = ema if ema is not None else EMA(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99),
                                  weight_decay=cfg.weight_decay)
    engine = LocalEngine(model, optimizer, grad_clip=cfg.grad_clip)
    stats = fit_prior(engine, model, batches, cfg, generator=generator, ema=ema,
                      progress=progress)
    return {**stats, "ema": ema}


@torch.no_grad()
def denoising_loss(model: EDMPrior, x0: torch.Tensor, sigmas: Sequence[float], seed: int = 0) -> list[float]:
    """Mean EDM loss of ``model`` on clean windows ``x0`` (B, 1, 80, T) at each fixed sigma
    (same noise for every model given the same seed): a held-out score of a prior."""
    model.eval()
    out = []
    for i, s in enumerate(sigmas):
        g = torch.Generator(device=x0.device).manual_seed(seed + i)
        sigma = torch.full((x0.shape[0],), float(s), device=x0.device)
        out.append(float(edm_loss(model, x0, g, sigma=sigma).mean()))
    return out
