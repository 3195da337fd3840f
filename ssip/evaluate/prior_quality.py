"""How good is the mel prior? Held-out denoising loss per noise level, and a Fréchet distance.

Two numbers per checkpoint, both on speech the prior never trained on:

1. **Denoising loss per sigma bucket.** The EDM loss (:func:`ssip.models.prior.edm_loss`,
   about 1 for a network that outputs zero) on held-out windows at fixed noise levels. The four
   buckets are the quartiles of the training distribution ln(sigma) ~ N(P_mean, P_std^2)
   (:func:`ssip.models.prior.sigma_quartile_edges`, the buckets the training log uses). Each
   bucket is scored at ``sigmas_per_bucket`` fixed sigmas at equally spaced quantiles inside it
   (for 2: the 1/16 and 3/16 quantiles of the first bucket, ... 13/16 and 15/16 of the last),
   averaged: a midpoint rule for the bucket's expected loss under the training distribution, so
   the mean over buckets estimates the training objective on held-out speech. The windows and
   the noise are fixed by the seed, so every checkpoint sees the same noisy inputs.
2. **Fréchet distance of Whisper embeddings** (FAD, Kilgour et al. 2019, with Whisper's encoder
   as the embedding): unconditional prior samples versus held-out speech. Each window (the
   prior's training window, 128 frames = 1.28 s for the presets' default) goes through the
   Whisper encoder without padding to 30 s (:class:`ssip.models.whisper.WhisperEncoderWindow`),
   and the encoder output is mean-pooled over its 50 Hz frames: one embedding per window, so a
   prior sample and a real window are embedded identically. Mean pooling keeps what the window
   says and how it sounds and discards where in the window it happens (the prior draws windows
   at random offsets). Held-out utterances are split into two halves A and B; real windows are
   drawn from each half as the prior's training windows are drawn
   (:func:`ssip.models.prior.random_windows`). Reported: ``frechet`` = the mean of
   FD(samples, A) and FD(samples, B), and its floor ``frechet_floor`` = FD(A, B), each with N
   windows on both sides. FD is biased upward at small N (:mod:`ssip.frechet`), so
   compare checkpoints at equal N, and read ``frechet`` against ``frechet_floor``: a prior whose
   samples are as close to real speech as real speech is to itself scores the floor.

The halves A and B come from disjoint utterances; with a small held-out set they are drawn with
overlap inside each half, so the floor also measures how much the held-out set itself varies.
"""

from __future__ import annotations

import functools
import math
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ssip import storage
from ssip.data.dataset import load_trials
from ssip.data.speech_corpus import load_speech
from ssip.decode import prior_denoiser
from ssip.frechet import frechet_from_samples
from ssip.mel import MEL_FLOOR, N_MELS
from ssip.models.prior import (
    EDMPrior,
    denoising_loss,
    load_prior,
    random_windows,
    sigma_quartile_edges,
)
from ssip.sampling import edm_sample, trial_generator

#: Default Whisper embedding model (multilingual, 512-d) and a faster, English-only one (384-d).
DEFAULT_WHISPER = "base"
#: Prior samples, and real windows per half, scored by default: about 2 minutes of CPU sampling
#: for the tiny preset at 128 frames and 18 Heun steps (measured 35 windows/s per forward).
DEFAULT_N_SAMPLES = 128
#: EDM's unconditional default (35 network evaluations with Heun).
DEFAULT_STEPS = 18


def _frechet(x: np.ndarray, y: np.ndarray) -> float:
    """:func:`frechet_from_samples` on one BLAS thread: on the 2 shared cores of the dev machine
    a 512-d distance took 0.2 s with one OpenBLAS thread and 9 s with two (measured, under load).
    threadpoolctl comes with scikit-learn, a dependency."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        return frechet_from_samples(x, y)


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(f"[evaluate-prior] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Whisper embeddings.


@functools.lru_cache(maxsize=4)
def window_encoder(model_name: str = DEFAULT_WHISPER, layer: int | None = None) -> nn.Module:
    """A frozen :class:`~ssip.models.whisper.WhisperEncoderWindow` of a shipped (or local) Whisper,
    cached per (model, layer) so that several checkpoints share one encoder."""
    from ssip.models.whisper import WhisperEncoderWindow, load_whisper

    whisper = load_whisper(model_name)[0]
    window = WhisperEncoderWindow(whisper.get_encoder(), layer=layer, truncate=True)
    return window.eval().requires_grad_(False)


def cut_windows(mels: Sequence[np.ndarray], window_frames: int) -> np.ndarray:
    """Consecutive non-overlapping windows of each mel.

    A mel of T >= ``window_frames`` frames gives floor(T / window_frames) windows (the remainder is
    dropped); a shorter one gives one window, padded at the end with ``MEL_FLOOR`` (silence), as
    the prior's training windows pad short utterances.

    Parameters
    ----------
    mels : sequence of ndarray, each (80, T_i)
    window_frames : int

    Returns
    -------
    ndarray, shape (M, 80, window_frames), float32
    """
    if window_frames < 1:
        raise ValueError(f"cut_windows: window_frames={window_frames} must be >= 1")
    out = []
    for i, m in enumerate(mels):
        m = np.asarray(m, dtype=np.float32)
        if m.ndim != 2 or m.shape[0] != N_MELS or m.shape[1] < 1:
            raise ValueError(f"cut_windows: mel {i} has shape {m.shape}; expected ({N_MELS}, T>=1)")
        t = m.shape[1]
        if t < window_frames:
            w = np.full((N_MELS, window_frames), MEL_FLOOR, dtype=np.float32)
            w[:, :t] = m
            out.append(w)
        else:
            out.extend(m[:, k * window_frames:(k + 1) * window_frames] for k in range(t // window_frames))
    if not out:
        raise ValueError("cut_windows: no mels given")
    return np.stack(out)


@torch.no_grad()
def whisper_embeddings(
    mels: Sequence[np.ndarray] | np.ndarray,
    model_name: str = DEFAULT_WHISPER,
    layer: int | None = None,
    window_frames: int = 128,
    batch_size: int = 32,
    encoder: nn.Module | None = None,
) -> np.ndarray:
    """One Whisper embedding per fixed-length mel window: the encoder output, mean-pooled over time.

    Parameters
    ----------
    mels : sequence of ndarray (80, T_i), or ndarray (M, 80, window_frames)
        ssip log-mels; cut with :func:`cut_windows` (windows of exactly ``window_frames`` frames
        pass through unchanged).
    model_name : str
        Shipped Whisper ("base", "tiny.en") or a local Hugging Face Whisper directory.
    layer : int, optional
        Encoder hidden state to pool (:class:`~ssip.models.whisper.WhisperEncoderWindow`); the
        final, layer-normed output when None.
    window_frames : int
        Window length in mel frames (10 ms each). Use the prior's training window so that prior
        samples and real speech are embedded identically.
    batch_size : int
        Windows per encoder forward.
    encoder : nn.Module, optional
        A ready ``WhisperEncoderWindow`` (overrides ``model_name`` and ``layer``).

    Returns
    -------
    ndarray, shape (M, d_model), float64
        d_model is 512 for base, 384 for tiny.en.
    """
    windows = cut_windows(list(mels), window_frames)  # (M, 80, W)
    encoder = encoder if encoder is not None else window_encoder(model_name, layer)
    out = []
    for start in range(0, len(windows), batch_size):
        x = torch.from_numpy(windows[start:start + batch_size])
        h = encoder(x)  # (B, ceil(W / 2), d)
        out.append(h.double().mean(dim=1).cpu().numpy())
    return np.concatenate(out)


# ---------------------------------------------------------------------------------------------
# Held-out windows, controls.


def split_halves(mels: Sequence[np.ndarray], seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Two halves of disjoint utterances (shuffled by ``seed``, then alternated)."""
    if len(mels) < 2:
        raise ValueError(f"need at least 2 held-out utterances to form two halves, got {len(mels)}")
    order = np.random.default_rng([seed, 1]).permutation(len(mels))
    return [mels[i] for i in order[0::2]], [mels[i] for i in order[1::2]]


def heldout_windows(mels: Sequence[np.ndarray], n: int, window_frames: int, seed: int) -> np.ndarray:
    """``n`` random windows (n, 80, window_frames) of ``mels``, drawn as the prior's training
    windows are (:func:`ssip.models.prior.random_windows`), reproducibly for a seed."""
    return random_windows(list(mels), window_frames, n, np.random.default_rng(seed))


def noise_shaped_mels(mels: Sequence[np.ndarray], seed: int = 0) -> list[np.ndarray]:
    """A control set: Gaussian noise with the per-mel-bin mean and std of ``mels``.

    Same lengths as ``mels``; the long-term spectrum of speech without any of its structure in
    time or across bins. Real speech should be far from it in any useful embedding.

    Returns
    -------
    list of ndarray, each (80, T_i), float32
    """
    cat = np.concatenate([np.asarray(m, np.float64) for m in mels], axis=1)  # (80, sum T)
    mu, sd = cat.mean(axis=1, keepdims=True), cat.std(axis=1, keepdims=True)
    rng = np.random.default_rng([seed, 2])
    return [(mu + sd * rng.standard_normal(np.shape(m))).astype(np.float32) for m in mels]


def heldout_reference(
    heldout_mels: Sequence[np.ndarray],
    *,
    n: int = DEFAULT_N_SAMPLES,
    window_frames: int = 128,
    seed: int = 0,
    whisper_model: str = DEFAULT_WHISPER,
    layer: int | None = None,
    batch_size: int = 32,
    control_mels: Sequence[np.ndarray] | None = None,
    encoder: nn.Module | None = None,
) -> dict[str, Any]:
    """Embeddings of the held-out halves A and B (and of an optional control), computed once and
    shared by every checkpoint evaluated at the same ``n`` and ``window_frames``.

    Parameters
    ----------
    heldout_mels : sequence of ndarray, each (80, T_i)
        Speech the prior never trained on; at least two utterances.
    n : int
        Windows per half (use the number of prior samples: FD is compared at equal N).
    window_frames : int
    seed : int
    whisper_model, layer, batch_size, encoder
        See :func:`whisper_embeddings`.
    control_mels : sequence of ndarray, optional
        A second reference set (e.g. :func:`noise_shaped_mels`), windowed like a half.

    Returns
    -------
    dict
        ``a``, ``b`` (n, D) embeddings, ``control`` (n, D) or None, ``n``, ``window_frames``,
        ``embedding`` (a description), ``floor`` = FD(A, B), and the ``seed``,
        ``whisper_model`` and ``layer`` they were computed with.
    """
    if n < 2:
        raise ValueError(f"n={n}: need at least 2 windows per set for a covariance")
    half_a, half_b = split_halves(heldout_mels, seed)
    emb = functools.partial(whisper_embeddings, model_name=whisper_model, layer=layer,
                            window_frames=window_frames, batch_size=batch_size, encoder=encoder)
    a = emb(heldout_windows(half_a, n, window_frames, seed + 11))
    b = emb(heldout_windows(half_b, n, window_frames, seed + 12))
    control = None
    if control_mels is not None:
        control = emb(heldout_windows(control_mels, n, window_frames, seed + 13))
    tap = "final layer" if layer is None else f"layer {layer}"
    return {
        "a": a, "b": b, "control": control, "n": n, "window_frames": window_frames,
        "embedding": f"whisper-{whisper_model} encoder {tap}, mean-pooled over each "
                     f"{window_frames}-frame window (D={a.shape[1]})",
        "floor": _frechet(a, b),
        "seed": seed, "whisper_model": whisper_model, "layer": layer,
    }


# ---------------------------------------------------------------------------------------------
# Denoising loss per sigma bucket.


def bucket_sigmas(sigmas_per_bucket: int = 2, p_mean: float = -1.2, p_std: float = 1.2) -> list[list[float]]:
    """Fixed sigmas for each quartile bucket of ln(sigma) ~ N(p_mean, p_std^2), low to high.

    Bucket k (0..3) gets the quantiles (k + (j + 0.5) / m) / 4, j = 0..m-1, of that distribution:
    equally spaced in probability inside the bucket (a midpoint rule for its mean loss).
    """
    if sigmas_per_bucket < 1:
        raise ValueError(f"sigmas_per_bucket={sigmas_per_bucket} must be >= 1")
    nd = statistics.NormalDist(p_mean, p_std)
    m = sigmas_per_bucket
    return [[math.exp(nd.inv_cdf((k + (j + 0.5) / m) / 4)) for j in range(m)] for k in range(4)]


def denoising_loss_buckets(
    model: EDMPrior,
    windows: np.ndarray | torch.Tensor,
    *,
    sigmas_per_bucket: int = 2,
    p_mean: float = -1.2,
    p_std: float = 1.2,
    seed: int = 0,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Held-out EDM loss of a prior in each quartile bucket of the training sigma distribution.

    Parameters
    ----------
    model : EDMPrior
        Any ``model(x, sigma)`` denoiser with a ``sigma_data`` attribute (evaluated in eval mode).
    windows : ndarray or Tensor, shape (N, 80, T) or (N, 1, 80, T)
        Clean held-out mel windows.
    sigmas_per_bucket : int
        Fixed sigmas per bucket (:func:`bucket_sigmas`), whose losses are averaged.
    p_mean, p_std : float
        The training distribution of ln(sigma) (the checkpoint's PriorConfig).
    seed : int
        Fixes the noise: the same seed, windows and ``batch_size`` give every checkpoint the same
        noisy inputs.
    batch_size : int
        Windows per forward (the noise is drawn per chunk, so it also depends on this).

    Returns
    -------
    dict
        ``loss`` (4 floats, low to high sigma), ``mean`` (their mean), ``edges`` (the 3 bucket
        edges of :func:`~ssip.models.prior.sigma_quartile_edges`), ``sigmas`` (4 lists) and
        ``loss_per_sigma`` (4 lists).
    """
    x0 = torch.as_tensor(np.asarray(windows) if not torch.is_tensor(windows) else windows,
                         dtype=torch.float32)
    if x0.ndim == 3:
        x0 = x0[:, None]  # (N, 80, T) -> (N, 1, 80, T)
    if x0.ndim != 4 or x0.shape[1] != 1 or x0.shape[0] < 1:
        raise ValueError(f"denoising_loss_buckets: windows must be (N, 80, T) or (N, 1, 80, T) "
                         f"with N >= 1, got {tuple(x0.shape)}")
    x0 = x0.to(next(model.parameters()).device)
    per_bucket = bucket_sigmas(sigmas_per_bucket, p_mean, p_std)
    flat = [s for bucket in per_bucket for s in bucket]
    total = np.zeros(len(flat))
    for c, start in enumerate(range(0, x0.shape[0], batch_size)):
        chunk = x0[start:start + batch_size]
        # denoising_loss seeds sigma i with seed + i: chunks take disjoint runs of seeds.
        losses = denoising_loss(model, chunk, flat, seed=seed * 1_000_003 + c * len(flat))
        total += np.asarray(losses) * chunk.shape[0]
    total /= x0.shape[0]
    if not np.isfinite(total).all():
        raise FloatingPointError(f"denoising_loss_buckets: loss is not finite at sigma "
                                 f"{[s for s, v in zip(flat, total) if not np.isfinite(v)]}")
    m = sigmas_per_bucket
    loss_per_sigma = [total[k * m:(k + 1) * m].tolist() for k in range(4)]
    loss = [float(np.mean(v)) for v in loss_per_sigma]
    return {"loss": loss, "mean": float(np.mean(loss)), "edges": sigma_quartile_edges(p_mean, p_std),
            "sigmas": per_bucket, "loss_per_sigma": loss_per_sigma}


# ---------------------------------------------------------------------------------------------
# Unconditional samples.


def sample_prior(
    model: nn.Module,
    n: int,
    window_frames: int,
    num_steps: int = DEFAULT_STEPS,
    seed: int = 0,
    *,
    batch_size: int = 32,
    progress: bool = False,
    **schedule: Any,
) -> np.ndarray:
    """Unconditional samples of the prior with the EDM Heun sampler (:func:`ssip.sampling.edm_sample`).

    Sample i is seeded by (seed, i) alone (:func:`ssip.sampling.trial_generator`), so it does not
    depend on ``batch_size`` or on ``n``.

    Parameters
    ----------
    model : EDMPrior
        Frozen and put in eval mode here.
    n : int
    window_frames : int
        Frames per sample; a multiple of the UNet's downsampling factor.
    num_steps : int
    seed : int
    batch_size : int
    progress : bool
        One line per batch on stderr.
    **schedule
        Other :func:`~ssip.sampling.edm_sample` arguments (sigma_min, sigma_max, rho, S_churn...).

    Returns
    -------
    ndarray, shape (n, 80, window_frames), float32
    """
    denoiser = prior_denoiser(model)
    device = next(model.parameters()).device
    n_mels = int(getattr(model, "data_mean", torch.zeros(N_MELS)).shape[0])
    out = []
    start_time = time.perf_counter()
    for start in range(0, n, batch_size):
        idx = range(start, min(start + batch_size, n))
        gens = [trial_generator(seed, "evaluate-prior/sample", i, device=device) for i in idx]
        x = edm_sample(denoiser, (len(idx), 1, n_mels, window_frames), gens, num_steps=num_steps,
                       device=device, **schedule)  # (B, 1, 80, T)
        out.append(x[:, 0].cpu().numpy())
        _log(progress, f"sampled {idx.stop}/{n} windows ({time.perf_counter() - start_time:.0f} s)")
    return np.concatenate(out).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Everything, for one checkpoint.


def evaluate_prior(
    prior_dir: str,
    heldout_mels: Sequence[np.ndarray],
    *,
    n_samples: int = DEFAULT_N_SAMPLES,
    seed: int = 0,
    num_steps: int = DEFAULT_STEPS,
    window_frames: int | None = None,
    whisper_model: str = DEFAULT_WHISPER,
    layer: int | None = None,
    n_loss_windows: int = 64,
    sigmas_per_bucket: int = 2,
    batch_size: int = 32,
    control_mels: Sequence[np.ndarray] | None = None,
    reference: dict[str, Any] | None = None,
    encoder: nn.Module | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Held-out denoising loss per sigma bucket and Whisper-Fréchet distance of one prior checkpoint.

    Parameters
    ----------
    prior_dir : str
        Checkpoint folder written by :func:`ssip.models.prior.save_prior`.
    heldout_mels : sequence of ndarray, each (80, T_i)
        Speech the prior never trained on (e.g. the test split of an ingest root).
    n_samples : int
        Prior samples, and real windows per held-out half (the N of every distance).
    seed : int
        Fixes the samples, the held-out windows, the halves and the noise of the loss.
    num_steps : int
        EDM Heun steps per sample.
    window_frames : int, optional
        Sample and embedding window; the prior's training window (its manifest) when None.
    whisper_model, layer
        Embedding (see :func:`whisper_embeddings`).
    n_loss_windows : int
        Held-out windows scored by the denoising loss.
    sigmas_per_bucket : int
    batch_size : int
        Windows per prior / encoder forward.
    control_mels : sequence of ndarray, optional
        A second reference set (e.g. :func:`noise_shaped_mels` of the held-out set); its distance
        to the held-out halves is reported as ``frechet_control``.
    reference : dict, optional
        :func:`heldout_reference` computed earlier for the same arguments (reused across
        checkpoints); computed here when None.
    encoder : nn.Module, optional
        A ready ``WhisperEncoderWindow``.
    progress : bool
        Progress lines on stderr.

    Returns
    -------
    dict
        ``prior``, ``loss_per_bucket`` ({"q1".."q4"}, low to high sigma), ``loss_mean``,
        ``sigma_edges``, ``bucket_sigmas``, ``frechet`` (mean of FD(samples, A) and
        FD(samples, B)), ``frechet_a``, ``frechet_b``, ``frechet_floor`` (FD(A, B)),
        ``frechet_control`` (mean FD(control, A/B), or None), ``n``, ``window_frames``,
        ``num_steps``, ``embedding``, ``sampling_seconds``, ``seconds``.
    """
    t0 = time.perf_counter()
    model, manifest = load_prior(prior_dir)
    cfg = manifest.get("config", {})
    window = int(window_frames or cfg.get("window_frames", 128))
    p_mean, p_std = float(cfg.get("p_mean", -1.2)), float(cfg.get("p_std", 1.2))
    _log(progress, f"{prior_dir}: preset {manifest.get('extra', {}).get('preset')}, window {window} "
                   f"frames, {len(heldout_mels)} held-out utterances")

    if reference is None:
        _log(progress, f"embedding {n_samples} held-out windows per half with whisper-{whisper_model}")
        reference = heldout_reference(heldout_mels, n=n_samples, window_frames=window, seed=seed,
                                      whisper_model=whisper_model, layer=layer,
                                      batch_size=batch_size, control_mels=control_mels,
                                      encoder=encoder)
    else:
        want = {"n": n_samples, "window_frames": window, "seed": seed,
                "whisper_model": whisper_model, "layer": layer}
        got = {k: reference.get(k) for k in want}
        if got != want:
            raise ValueError(f"reference was computed with {got}; this evaluation asks for "
                             f"{want}: compute a new heldout_reference")

    loss_windows = random_windows(list(heldout_mels), window, n_loss_windows,
                                  np.random.default_rng([seed, 3]))
    losses = denoising_loss_buckets(model, loss_windows, sigmas_per_bucket=sigmas_per_bucket,
                                    p_mean=p_mean, p_std=p_std, seed=seed, batch_size=batch_size)
    _log(progress, "held-out loss by sigma quartile [" + " ".join(f"{v:.4f}" for v in losses["loss"])
         + "]")

    t_sample = time.perf_counter()
    samples = sample_prior(model, n_samples, window, num_steps, seed, batch_size=batch_size,
                           progress=progress)
    sampling_seconds = time.perf_counter() - t_sample
    emb = whisper_embeddings(samples, model_name=whisper_model, layer=layer, window_frames=window,
                             batch_size=batch_size, encoder=encoder)
    fd_a = _frechet(emb, reference["a"])
    fd_b = _frechet(emb, reference["b"])
    control = None
    if reference.get("control") is not None:
        control = 0.5 * (_frechet(reference["control"], reference["a"])
                         + _frechet(reference["control"], reference["b"]))
    result = {
        "prior": str(prior_dir),
        "loss_per_bucket": {f"q{k + 1}": v for k, v in enumerate(losses["loss"])},
        "loss_mean": losses["mean"],
        "sigma_edges": losses["edges"],
        "bucket_sigmas": losses["sigmas"],
        "frechet": 0.5 * (fd_a + fd_b),
        "frechet_a": fd_a,
        "frechet_b": fd_b,
        "frechet_floor": reference["floor"],
        "frechet_control": control,
        "n": n_samples,
        "n_loss_windows": n_loss_windows,
        "window_frames": window,
        "num_steps": num_steps,
        "seed": seed,
        "embedding": reference["embedding"],
        "sampling_seconds": sampling_seconds,
        "seconds": time.perf_counter() - t0,
    }
    _log(progress, f"frechet {result['frechet']:.3f} (floor {result['frechet_floor']:.3f}) in "
                   f"{result['seconds']:.0f} s")
    return result


# ---------------------------------------------------------------------------------------------
# Held-out speech from disk.


def load_heldout_mels(src: str, split: str = "test") -> tuple[list[np.ndarray], str]:
    """Held-out mels from an ingest root or a speech-corpus root, told apart by their index file.

    Parameters
    ----------
    src : str
        Local path or s3:// URI of either an ingest root (``manifest.json``, written by
        ``ssip ingest``; the trials of ``split`` are read) or a speech-corpus root
        (``card.json``, written by ``ssip speech ingest``; every utterance is read: hold the
        whole corpus out of the prior's training).
    split : str
        Split of an ingest root ("test" or "val"; "train" is refused: the prior trained on it).

    Returns
    -------
    mels : list of ndarray, each (80, T_i), float32
    description : str
        What was read, for the report.
    """
    if storage.exists(storage.join(src, "manifest.json")):
        if split == "train":
            raise ValueError(f"--split train: {src} trains the prior on its train split; score it on "
                             "held-out speech (test or val)")
        trials = load_trials(src, split=split, columns=["schema_version", "subject", "trial_id", "mel"])
        if not trials:
            raise ValueError(f"{src}: no trials of split {split!r}; try --split val or test")
        mels = [np.asarray(t["mel"], np.float32) for t in trials]
        what = f"ingest {src} split {split}: {len(mels)} trials"
    elif storage.exists(storage.join(src, "card.json")):
        rows = load_speech(src)
        if not rows:
            raise ValueError(f"{src}: the speech corpus holds no utterances")
        mels = [np.asarray(r["mel"], np.float32) for r in rows]
        what = f"speech corpus {src}: {len(mels)} utterances"
    else:
        raise FileNotFoundError(f"{src}: neither manifest.json (an ingest root, `ssip ingest`) nor "
                                "card.json (a speech corpus, `ssip speech ingest`) is there")
    bad = [i for i, m in enumerate(mels) if m.ndim != 2 or m.shape[0] != N_MELS or m.shape[1] < 1]
    if bad:
        raise ValueError(f"{src}: mel(s) {bad[:10]} are not ({N_MELS}, T >= 1)")
    frames = sum(m.shape[1] for m in mels)
    return mels, f"{what}, {frames / 100:.0f} s"
