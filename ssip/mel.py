"""The one log-mel definition of ssip, its inverse, and the audio loudness normalisation.

Prior, likelihood, metrics and vocoders all work in this space: Whisper's log-mel
(16 kHz, n_fft 400, hop 160 -> 100 frames/s, Hann window, power spectrum, 80 Slaney mel bands over
0-8 kHz, log10 clamped at 1e-10, then (x + 4) / 4), with two documented departures:

1. Whisper floors each clip at (its own max - 8) in log10 units. That per-clip floor is a global,
   nearly non-differentiable op, so ssip uses a FIXED floor :data:`LOG10_FLOOR` instead.
2. To make a fixed floor meaningful, audio is first brought to a fixed loudness by
   :func:`normalize_loudness` (active-speech RMS of :data:`TARGET_RMS`). On normalised speech
   the loudest log10 mel bin sits near :data:`LOG10_FLOOR` + 8, so the floor lands where
   Whisper's own would.

Like Whisper, the last STFT frame is dropped, so a clip of N samples has N // 160 frames.
Nothing here imports Ray or touches the filesystem.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

#: Bumped whenever anything below changes the numbers a mel holds. Checkpoints record it.
MEL_VERSION = "whisper-logmel-v1-floor-7.2"

SAMPLE_RATE = 16_000
N_FFT = 400
HOP_LENGTH = 160
N_MELS = 80
FRAME_RATE = SAMPLE_RATE / HOP_LENGTH  # 100 frames/s
#: Fixed floor in log10(power) units, replacing Whisper's per-clip (max - 8).
#: Chosen on loudness-normalised real speech (asterisk prompts): the median clip max of log10 mel
#: power is 0.83 (10th-90th percentile 0.67-1.05), so Whisper's max - 8 sits near -7.2
#: (tests/test_mel.py checks this).
LOG10_FLOOR = -7.2
#: Active-speech RMS that :func:`normalize_loudness` brings audio to (about -23 dBFS).
TARGET_RMS = 0.07
#: The value a fully silent frame takes after scaling: (LOG10_FLOOR + 4) / 4.
MEL_FLOOR = (LOG10_FLOOR + 4.0) / 4.0


@dataclass(frozen=True)
class MelSpec:
    """Numbers that define the mel space; stored in every checkpoint manifest."""

    version: str = MEL_VERSION
    sample_rate: int = SAMPLE_RATE
    n_fft: int = N_FFT
    hop_length: int = HOP_LENGTH
    n_mels: int = N_MELS
    log10_floor: float = LOG10_FLOOR
    target_rms: float = TARGET_RMS


def slaney_filterbank(sample_rate: int, n_fft: int, n_mels: int = N_MELS,
                      fmax: float = 8000.0) -> np.ndarray:
    """Slaney-style mel filterbank, shape (1 + n_fft // 2, n_mels), float64.

    transformers' Slaney filterbank equals librosa.filters.mel(sr, n_fft, n_mels, fmax=fmax) to
    1e-9 and is what WhisperFeatureExtractor uses; the HiFi-GAN bridge uses it at 22,050 Hz.
    """
    from transformers.audio_utils import mel_filter_bank

    return mel_filter_bank(
        num_frequency_bins=1 + n_fft // 2,
        num_mel_filters=n_mels,
        min_frequency=0.0,
        max_frequency=fmax,
        sampling_rate=sample_rate,
        norm="slaney",
        mel_scale="slaney",
    ).astype(np.float64)


@functools.lru_cache(maxsize=4)
def _filters_np() -> np.ndarray:
    return slaney_filterbank(SAMPLE_RATE, N_FFT)  # (201, 80)


def mel_filters(device=None, dtype=torch.float32) -> torch.Tensor:
    """Slaney mel filterbank, shape (n_mels=80, n_freq=201)."""
    return torch.from_numpy(_filters_np().T.copy()).to(device=device, dtype=dtype)


def num_frames(num_samples: int) -> int:
    """Mel frames for a clip of ``num_samples`` samples at 16 kHz (Whisper drops the last)."""
    return int(num_samples) // HOP_LENGTH


def normalize_loudness(audio: np.ndarray, target_rms: float = TARGET_RMS) -> np.ndarray:
    """Scale audio so that its active-speech RMS equals ``target_rms``.

    Active speech = the 10 ms frames within 40 dB of the loudest frame, so leading and trailing
    silence do not change the gain. Silent input is returned unchanged.

    Parameters
    ----------
    audio : ndarray, shape (n_samples,)
        Mono audio at 16 kHz, float.
    """
    x = np.asarray(audio, dtype=np.float64)
    n = len(x) // HOP_LENGTH
    if n == 0:
        return x.astype(np.float32)
    frame_pow = (x[: n * HOP_LENGTH].reshape(n, HOP_LENGTH) ** 2).mean(axis=1)
    peak = frame_pow.max()
    if peak <= 1e-20:
        return x.astype(np.float32)
    active = frame_pow >= peak * 1e-4
    rms = float(np.sqrt(frame_pow[active].mean()))
    return (x * (target_rms / rms)).astype(np.float32)


def _stft(audio: torch.Tensor) -> torch.Tensor:
    # Whisper pads the clip with zeros (to 30 s) and then lets torch.stft reflect-pad both ends:
    # the first frame sees reflected audio, the last ones see zeros. Padding n_fft // 2 zeros on
    # the right before a reflect-padded STFT reproduces that for any clip length.
    window = torch.hann_window(N_FFT, device=audio.device, dtype=audio.dtype)
    audio = torch.nn.functional.pad(audio, (0, N_FFT // 2))
    return torch.stft(
        audio,
        N_FFT,
        HOP_LENGTH,
        window=window,
        center=True,
        pad_mode="reflect",
        return_complex=True,
    )


def log_mel(audio: torch.Tensor | np.ndarray, log10_floor: float | None = LOG10_FLOOR) -> torch.Tensor:
    """ssip log-mel of 16 kHz audio; differentiable, batched.

    Parameters
    ----------
    audio : Tensor, shape (..., n_samples)
        Audio at 16 kHz (loudness-normalise first with :func:`normalize_loudness`).
    log10_floor : float or None
        Fixed floor in log10 units; None keeps only Whisper's 1e-10 clamp (for parity tests).

    Returns
    -------
    Tensor, shape (..., 80, n_samples // 160)
        (log10(max(mel power, 1e-10, 10**floor)) + 4) / 4.
    """
    x = torch.as_tensor(audio)
    if not x.is_floating_point():
        x = x.float()
    batch_shape = x.shape[:-1]
    x = x.reshape(-1, x.shape[-1])
    n_frames = num_frames(x.shape[-1])
    spec = _stft(x)[..., :n_frames]  # (B, 201, T): Whisper keeps N // 160 frames
    power = spec.real**2 + spec.imag**2
    mel = mel_filters(x.device, x.dtype) @ power  # (B, 80, T)
    floor = 1e-10 if log10_floor is None else max(1e-10, 10.0**log10_floor)
    logmel = torch.log10(torch.clamp(mel, min=floor))
    out = (logmel + 4.0) / 4.0
    return out.reshape(*batch_shape, N_MELS, out.shape[-1])


@functools.lru_cache(maxsize=1)
def _filters_pinv() -> torch.Tensor:
    # Minimum-norm least-squares inverse of the filterbank, (201, 80). torch.linalg.lstsq needs
    # driver="gelsd" here (the 80x201 filterbank is rank-deficient in float32 for other
    # drivers); computing it once as a matrix makes every later inversion one matmul.
    fb = mel_filters(dtype=torch.float64)
    eye = torch.eye(N_MELS, dtype=torch.float64)
    return torch.linalg.lstsq(fb, eye, driver="gelsd").solution


def mel_to_power(mel: torch.Tensor, n_iter: int = 50) -> torch.Tensor:
    """Invert the log and the filterbank: ssip mel (..., 80, T) -> power spectrum (..., 201, T).

    Starts from the minimum-norm least-squares solution, then runs multiplicative updates
    (Lee & Seung) for min ||fb p - mel power|| with p >= 0 (NNLS). All frames of all items go
    through one (201 x 201) matmul per update (float32 after the float64 start: 50 updates
    bring the mel error under 1e-2 and cost about 0.6 GFLOP per 300 frames).
    """
    m = torch.as_tensor(mel, dtype=torch.float64)
    shape = m.shape
    target = 10.0 ** (m.reshape(-1, N_MELS, shape[-1]) * 4.0 - 4.0)  # (B, 80, T) mel power
    t2 = target.permute(1, 0, 2).reshape(N_MELS, -1)  # (80, B*T)
    fb = mel_filters(dtype=torch.float64)  # (80, 201)
    fbt = fb.T.contiguous()
    p = (_filters_pinv() @ t2).clamp_min(1e-12).float()  # (201, B*T)
    numer = (fbt @ t2).float()
    gram = (fbt @ fb).float()  # (201, 201)
    for _ in range(n_iter):
        p = p * numer / (gram @ p + 1e-30)
    p = p.reshape(1 + N_FFT // 2, -1, shape[-1]).permute(1, 0, 2)
    return p.reshape(*shape[:-2], 1 + N_FFT // 2, shape[-1]).float()


def griffin_lim(
    mel: torch.Tensor | np.ndarray, n_iter: int = 64, momentum: float = 0.99, seed: int = 0
) -> torch.Tensor:
    """Audio from an ssip mel by Griffin-Lim (fast variant, Perraudin et al. 2013).

    Parameters
    ----------
    mel : Tensor, shape (..., 80, T)

    Returns
    -------
    Tensor, shape (..., T * 160), 16 kHz audio at the normalised loudness.
    """
    mel = torch.as_tensor(mel, dtype=torch.float32)
    batch_shape = mel.shape[:-2]
    mel = mel.reshape(-1, N_MELS, mel.shape[-1])
    n_frames = mel.shape[-1]
    mag = mel_to_power(mel).sqrt()  # (B, 201, T)
    # Restore the dropped last frame (repeat the final one) so istft covers T * 160 samples.
    mag = torch.cat([mag, mag[..., -1:]], dim=-1)
    length = n_frames * HOP_LENGTH
    window = torch.hann_window(N_FFT)
    gen = torch.Generator().manual_seed(seed)
    angles = torch.exp(2j * torch.pi * torch.rand(mag.shape, generator=gen))
    prev = torch.zeros_like(angles)
    audio = torch.zeros(mag.shape[0], length)
    for _ in range(n_iter):
        audio = torch.istft(mag * angles, N_FFT, HOP_LENGTH, window=window, length=length)
        rebuilt = torch.stft(
            audio, N_FFT, HOP_LENGTH, window=window, center=True, pad_mode="constant",
            return_complex=True,
        )
        accel = rebuilt - (momentum / (1 + momentum)) * prev
        angles = accel / accel.abs().clamp_min(1e-16)
        prev = rebuilt
    audio = torch.istft(mag * angles, N_FFT, HOP_LENGTH, window=window, length=length)
    return audio.reshape(*batch_shape, length)
