"""High-gamma amplitude features: the one definition ssip uses for every recording format.

The recipe follows Verwoert et al. (2022, Scientific Data 9:454, "Dataset of speech production
in intracranial electroencephalography"), section "Technical validation":

1. linear detrend of each channel;
2. band-pass ``band`` (default 70-170 Hz), Butterworth IIR as second-order sections, applied
   forward and backward (zero phase, as ``scipy.signal.sosfiltfilt``);
3. band-stop notches of +-2 Hz around every harmonic of the line frequency that falls inside
   the band (100 and 150 Hz for 50 Hz mains, 120 Hz for 60 Hz), same filter type;
4. amplitude envelope ``|hilbert(x)|``;
5. the mean of the envelope over a 50 ms window per frame, at ``frame_rate`` (default 100 Hz).

How steps 2-4 are computed: forward-backward filtering multiplies the spectrum by the squared
magnitude response ``|H(f)|^2`` of the filter, and the Hilbert transform weights the spectrum by
(1, 2 ... 2, 1 at Nyquist, 0 ... 0). Both are applied at once in the frequency domain: one real
FFT, one multiplication by ``prod_i |H_i(f)|^2`` x the Hilbert weights (the ``H_i`` from
``scipy.signal.freqz_sos`` of the same Butterworth designs), one inverse complex FFT whose
modulus is the envelope. That is 2 transforms per channel instead of 6 recursive filter passes
plus 2 transforms (2.5-3.5x faster on one core; bench/ingest.py), and there is no recursion
whose narrow-notch poles need float64 state.

Away from the ends of the recording this equals ``sosfiltfilt`` + ``hilbert`` (the previous
implementation, kept as the per-channel reference in tests/test_highgamma.py): per-frame
relative differences below 1e-3 (5e-4 the worst measured) beyond 2 s from either end on
synthetic ECoG; over whole 10-20 s recordings, per-channel correlation >= 0.99 and relative RMS
difference <= 0.033, nearly all of it in the first and last 0.5 s. Within ~1 s of the ends the
two differ, because each extends the recording differently: ``sosfiltfilt`` by a 27-sample odd
reflection with its recursion started in steady state, here by the detrended recording followed
by >= ``_EDGE_PAD_S`` of zeros. Neither is exact there. Against features computed with 10 s of
real context on both sides (synthetic ECoG, white noise, 15x mains; tests/test_highgamma.py
checks the first case), the mean error of this implementation is 1.1-1.5x that of
``sosfiltfilt`` in the first 50 ms, 0.75-1.15x from 50 ms to 2 s (0.01-0.04 of the feature
at 0.25-0.5 s), and 4.5-7x smaller 2-3 s from the ends, where ``sosfiltfilt``'s start-up
transient still shows (~1e-5).

Frame-time convention (differs from Verwoert's code on purpose): neural frame ``k`` is centred
at ``t_k = k / frame_rate`` seconds, exactly as ssip's mel frame ``k`` (Whisper's centred STFT,
hop 160 at 16 kHz) is centred at ``k * 10 ms``. So feature frame ``k`` and mel frame ``k``
describe the same instant, and any neural lead or lag is a modelling choice, not an off-by-
half-window artefact. Verwoert's windows start at ``k * 10 ms``, i.e. are centred 25 ms later.

In samples, frame ``k`` averages the envelope over samples ``[s_k, s_k + L)`` with
``L = max(1, round(window_s * sfreq))`` and ``s_k = round(k * sfreq / frame_rate) - L // 2``
(centred exactly for odd ``L``, half a sample early for even ``L``). Windows that run past
either end of the recording are truncated and averaged over the samples that exist.

This module is pure signal code: no file I/O, no Ray.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import scipy.fft
import scipy.ndimage
import scipy.signal

__all__ = ["high_gamma", "high_gamma_filters", "line_harmonics", "resample_features"]

# Band-stop half-width around each line harmonic (Verwoert et al. 2022: 98-102, 148-152 Hz).
NOTCH_HALF_WIDTH_HZ = 2.0
# The band's upper edge must sit this far below Nyquist: a Butterworth edge close to Nyquist
# is badly conditioned and the bilinear warp distorts the band.
NYQUIST_MARGIN = 1.1
# Working memory per channel block (bytes); a 10 min x 128 ch recording at 1024 Hz is then
# processed in blocks of a few channels instead of needing several GiB at once. Blocks of
# 16-64 MiB (6-26 channels at 60 s) measured ~10% faster than one 256 MiB block (cache).
_BLOCK_BYTES = 64 * 2**20
# Zeros appended after the recording before the FFT (seconds, at least; the FFT length rounds
# it up), so that the FFT's circular convolution does not wrap the end of the recording onto
# its start. The +-2 Hz notches ring with a time constant of ~0.2 s: after 1 s, e^-5.
_EDGE_PAD_S = 1.0


def line_harmonics(line_freq: float | None, band: tuple[float, float]) -> list[float]:
    """Harmonics of the line frequency that fall strictly inside ``band``.

    Parameters
    ----------
    line_freq : float | None
        Mains frequency in Hz (50 or 60); ``None`` means no notches.
    band : tuple of float
        ``(low, high)`` band edges in Hz.

    Returns
    -------
    list of float
        Harmonic frequencies in Hz, ascending, e.g. ``[100.0, 150.0]`` for 50 Hz and 70-170 Hz.
    """
    if line_freq is None:
        return []
    low, high = band
    first = max(1, math.ceil(low / line_freq))
    return [
        h * line_freq
        for h in range(first, int(high // line_freq) + 1)
        if low < h * line_freq < high
    ]


def high_gamma_filters(
    sfreq: float,
    *,
    band: tuple[float, float] = (70.0, 170.0),
    line_freq: float | None = 50.0,
    order: int = 4,
) -> list[np.ndarray]:
    """Second-order-section filters of the high-gamma recipe, in the order they are applied.

    Parameters
    ----------
    sfreq : float
        Sampling rate in Hz.
    band : tuple of float
        Band-pass edges in Hz.
    line_freq : float | None
        Mains frequency in Hz; notches go at its harmonics inside ``band``.
    order : int
        Butterworth order of the band-pass and of each band-stop.

    Returns
    -------
    list of numpy.ndarray
        The band-pass SOS array first, then one band-stop SOS array per harmonic;
        each has shape (n_sections, 6), float64.
    """
    sos = [scipy.signal.butter(order, band, btype="bandpass", fs=sfreq, output="sos")]
    for f in line_harmonics(line_freq, band):
        edges = (f - NOTCH_HALF_WIDTH_HZ, f + NOTCH_HALF_WIDTH_HZ)
        sos.append(scipy.signal.butter(order, edges, btype="bandstop", fs=sfreq, output="sos"))
    return sos


def _check_args(
    raw: np.ndarray,
    sfreq: float,
    band: tuple[float, float],
    line_freq: float | None,
    frame_rate: float,
    order: int,
    window_s: float,
) -> None:
    """Raise ValueError naming the argument (or channel) that is wrong and what to do."""
    if raw.ndim != 2:
        raise ValueError(
            f"high_gamma: raw must be 2-D (n_samples, n_channels), got shape {raw.shape}; "
            "reshape a single channel with raw[:, None]"
        )
    if not np.issubdtype(raw.dtype, np.floating) and not np.issubdtype(raw.dtype, np.integer):
        raise ValueError(f"high_gamma: raw must be real numeric, got dtype {raw.dtype}")
    if not (math.isfinite(sfreq) and sfreq > 0):
        raise ValueError(f"high_gamma: sfreq must be a positive number of Hz, got {sfreq!r}")
    low, high = (float(b) for b in band)
    if not (0 < low < high):
        raise ValueError(f"high_gamma: band must be (low, high) with 0 < low < high Hz, got {band}")
    if sfreq / 2 <= NYQUIST_MARGIN * high:
        raise ValueError(
            f"high_gamma: sfreq {sfreq} Hz is too low for band {band} Hz: Nyquist ({sfreq / 2} Hz) "
            f"must exceed the band's upper edge by {NYQUIST_MARGIN}x, i.e. sfreq > "
            f"{2 * NYQUIST_MARGIN * high:g} Hz; lower the band or use a recording sampled faster"
        )
    if line_freq is not None and not (math.isfinite(line_freq) and line_freq > 0):
        raise ValueError(f"high_gamma: line_freq must be > 0 Hz or None, got {line_freq!r}")
    if not (math.isfinite(frame_rate) and 0 < frame_rate <= sfreq):
        raise ValueError(
            f"high_gamma: frame_rate must be in (0, sfreq={sfreq}] Hz, got {frame_rate!r}"
        )
    if not (isinstance(order, int | np.integer) and order >= 1):
        raise ValueError(f"high_gamma: order must be a positive integer, got {order!r}")
    if not (math.isfinite(window_s) and window_s > 0):
        raise ValueError(f"high_gamma: window_s must be > 0 s, got {window_s!r}")
    finite = np.isfinite(raw).all(axis=0) if np.issubdtype(raw.dtype, np.floating) else None
    if finite is not None and not finite.all():
        bad = np.flatnonzero(~finite)
        first = int(bad[0])
        n_bad = int((~np.isfinite(raw[:, first])).sum())
        raise ValueError(
            f"high_gamma: channel index {first} contains {n_bad} NaN/Inf samples "
            f"(channels with NaN/Inf: {bad[:10].tolist()}{' ...' if bad.size > 10 else ''}); "
            "interpolate the gaps or mark the channel bad and drop it before feature extraction"
        )


def _detrend_inplace(x: np.ndarray) -> None:
    """Remove the least-squares line from each row of ``x`` (n_rows, n_samples), in place.

    Same result as ``scipy.signal.detrend(x, type="linear")`` (to rounding), written out
    because the closed form for a straight line is two dot products per row, whereas scipy
    builds a design matrix and calls a general least-squares solver (measured 0.2 s against
    0.02 s for 64 channels x 61440 samples).
    """
    n = x.shape[-1]
    tc = np.arange(n, dtype=np.float64) - (n - 1) / 2.0  # centred time, so mean and slope decouple
    slope = (x @ tc) / (tc @ tc)  # (n_rows,)
    x -= x.mean(axis=-1, keepdims=True)
    x -= slope[:, None] * tc


def _frame_bounds(
    n_samples: int, sfreq: float, frame_rate: float, window_s: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centre sample of each frame and its window's bounds ``[start, stop)``, clipped to the
    recording."""
    # Small tolerance so that e.g. 61440 * 100 / 1024 = 6000 is not floored to 5999.
    n_frames = math.floor(n_samples * frame_rate / sfreq + 1e-9)
    length = max(1, round(window_s * sfreq))
    centres = np.rint(np.arange(n_frames) * (sfreq / frame_rate)).astype(np.int64)
    start = np.clip(centres - length // 2, 0, n_samples)
    stop = np.clip(centres - length // 2 + length, 0, n_samples)
    return centres, start, stop


def high_gamma(
    raw: np.ndarray,
    sfreq: float,
    *,
    band: tuple[float, float] = (70.0, 170.0),
    line_freq: float | None = 50.0,
    frame_rate: float = 100.0,
    order: int = 4,
    window_s: float = 0.05,
) -> np.ndarray:
    """High-gamma amplitude features of a multichannel recording.

    Detrend -> band-pass -> line-harmonic band-stops -> Hilbert envelope -> 50 ms window means,
    as described in the module docstring (Verwoert et al. 2022). Frame ``k`` is centred at
    ``k / frame_rate`` seconds, aligned with ssip's mel frame ``k``.

    Parameters
    ----------
    raw : numpy.ndarray, shape (n_samples, n_channels)
        Voltage traces, any unit (features come out in the same unit); must be finite.
    sfreq : float
        Sampling rate of ``raw`` in Hz; ``sfreq / 2`` must exceed ``1.1 * band[1]``.
    band : tuple of float
        Band-pass edges in Hz.
    line_freq : float | None
        Mains frequency in Hz (50 Europe, 60 Americas); ``None`` disables the notches.
    frame_rate : float
        Output frame rate in Hz (100 Hz = ssip's mel frame rate).
    order : int
        Butterworth order of the band-pass and band-stops, each applied with zero phase
        (its squared magnitude response, as forward-backward filtering would).
    window_s : float
        Length in seconds of the averaging window centred on each frame time.

    Returns
    -------
    numpy.ndarray, shape (n_frames, n_channels), float32
        Mean envelope amplitude per frame, ``n_frames = floor(n_samples * frame_rate / sfreq)``.

    Raises
    ------
    ValueError
        If ``raw`` is not 2-D or has NaN/Inf (the message names the channel index), if ``sfreq``
        is too low for ``band``, or if the recording is not longer than ``sosfiltfilt``'s edge
        padding for these filters (27 samples at order 4): too short to filter meaningfully.
    """
    raw = np.asarray(raw)
    _check_args(raw, sfreq, band, line_freq, frame_rate, order, window_s)
    n_samples, n_channels = raw.shape
    sos_list = high_gamma_filters(sfreq, band=band, line_freq=line_freq, order=order)
    # sosfiltfilt's default odd-extension length (the filters' scale in samples); kept as the
    # minimum length so that what the sosfiltfilt implementation rejected is still rejected.
    padlen = max(3 * (2 * len(s) + 1 - min((s[:, 2] == 0).sum(), (s[:, 5] == 0).sum()))
                 for s in sos_list)
    if n_samples <= padlen:
        raise ValueError(
            f"high_gamma: recording has {n_samples} samples but the filters need more than "
            f"{padlen} ({padlen / sfreq:.3f} s at {sfreq} Hz); use a longer recording"
        )

    length = max(1, round(window_s * sfreq))
    centres, start, stop = _frame_bounds(n_samples, sfreq, frame_rate, window_s)
    scale = length / (stop - start).astype(np.float64)  # samples per window / samples that exist

    # A fast (5-smooth: the real forward transform has no radix-7 or -11 kernels) length with
    # at least _EDGE_PAD_S of zeros after the recording.
    n_fft = scipy.fft.next_fast_len(n_samples + math.ceil(_EDGE_PAD_S * sfreq), real=True)
    weights = _analytic_band_weights(sos_list, n_fft, sfreq)
    out = np.empty((start.size, n_channels), dtype=np.float32)

    # Channels go to the last (contiguous) axis, which is the layout the FFT wants (measured
    # 2x faster than transforming along axis 0). Blocks bound memory for long recordings:
    # float64 signal, complex128 half spectrum, complex64 analytic signal, float32 envelope and
    # running mean are ~40 bytes per FFT sample and channel.
    block = max(1, _BLOCK_BYTES // (40 * n_fft))
    for c0 in range(0, n_channels, block):
        c1 = min(n_channels, c0 + block)
        x = np.array(raw[:, c0:c1].T, dtype=np.float64, order="C")  # (cb, n_samples)
        _detrend_inplace(x)
        # Forward transform in float64: a float32 one rounds relative to the whole signal's
        # power, and high gamma can be far below a recording's slow drifts (DC-coupled
        # amplifiers: mV drifts, µV high gamma). On synthetic ECoG float32 would add only 3e-7
        # relative for ~8% less time, so the margin is kept. After the band mask the analytic
        # signal is band-limited, so the inverse runs in complex64 (1.4e-7 relative RMS).
        spectrum = scipy.fft.rfft(x, n=n_fft, axis=-1)  # zero-pads to n_fft
        del x
        analytic = np.zeros((c1 - c0, n_fft), dtype=np.complex64)
        np.multiply(spectrum, weights, out=analytic[:, :weights.size], casting="same_kind")
        del spectrum
        analytic = scipy.fft.ifft(analytic, axis=-1, overwrite_x=True)
        env = np.abs(analytic[:, :n_samples])  # (cb, n_samples), float32
        del analytic
        # Window means: a running mean (scipy.ndimage, accumulated in float64) read at the frame
        # centres; with zeros outside the recording it is the sum of the samples that exist
        # over ``length``, rescaled to their mean. Its window for even ``length`` starts
        # ``length // 2`` before the centre, as ``_frame_bounds`` defines.
        means = scipy.ndimage.uniform_filter1d(env, length, axis=-1, mode="constant")
        out[:, c0:c1] = (means[:, centres] * scale).T
    return out


def _analytic_band_weights(sos_list: list[np.ndarray], n_fft: int, sfreq: float) -> np.ndarray:
    """Spectral weights on the ``n_fft // 2 + 1`` rfft bins that turn a real signal's rfft,
    zero-filled to ``n_fft`` bins and inverse complex FFT'd, into the analytic signal of the
    signal filtered forward and backward by every SOS filter of ``sos_list``.

    Forward-backward filtering multiplies by ``|H(f)|^2``; the analytic signal keeps DC and
    Nyquist and doubles the positive frequencies (the weighting ``scipy.signal.hilbert`` uses).
    """
    freqs = scipy.fft.rfftfreq(n_fft, d=1.0 / sfreq)
    weights = np.ones(freqs.size)
    for sos in sos_list:
        _, h = scipy.signal.freqz_sos(sos, worN=freqs, fs=sfreq)
        weights *= h.real**2 + h.imag**2
    weights[1:(n_fft + 1) // 2] *= 2.0  # positive frequencies; DC and an even n_fft's Nyquist x1
    return weights


def resample_features(x: np.ndarray, from_rate: float, to_rate: float) -> np.ndarray:
    """Resample frame-rate features along time by a rational factor (polyphase FIR).

    Used to bring features computed elsewhere to ssip's 100 Hz frame rate, e.g. the Flinker
    lab's 125 Hz high-gamma (up 4, down 5). Wraps ``scipy.signal.resample_poly``. Its default
    Kaiser beta of 5 leaves a per-phase gain ripple of ~5e-4 of the signal (seen as a period-4
    wobble at 125 -> 100 Hz); beta 10 brings it to ~1e-5 at the cost of a wider transition
    band near the new Nyquist, where high-gamma envelopes carry little. Edges are padded by
    extrapolating a line (``padtype="line"``) because envelopes are positive with a large mean,
    and zero padding would pull the first and last frames toward 0.

    Parameters
    ----------
    x : numpy.ndarray, shape (n_frames, ...)
        Features with time on axis 0 (e.g. (n_frames, n_channels)).
    from_rate : float
        Frame rate of ``x`` in Hz.
    to_rate : float
        Wanted frame rate in Hz; ``to_rate / from_rate`` must be a ratio of integers up to 1000.

    Returns
    -------
    numpy.ndarray, shape (ceil(n_frames * to_rate / from_rate), ...)
        Resampled features; float32 input stays float32, anything else becomes float64.
        Frame ``k`` of the output sits at ``k / to_rate`` s when input frame ``j`` sat at
        ``j / from_rate`` s.
    """
    x = np.asarray(x)
    if x.ndim < 1 or x.shape[0] == 0:
        raise ValueError(f"resample_features: x must have frames on axis 0, got shape {x.shape}")
    for name, rate in (("from_rate", from_rate), ("to_rate", to_rate)):
        if not (math.isfinite(rate) and rate > 0):
            raise ValueError(f"resample_features: {name} must be a positive number of Hz, "
                             f"got {rate!r}")
    ratio = Fraction(to_rate / from_rate).limit_denominator(1000)
    if abs(float(ratio) - to_rate / from_rate) > 1e-9 * (to_rate / from_rate):
        raise ValueError(
            f"resample_features: {from_rate} Hz -> {to_rate} Hz is not a ratio of small integers; "
            "pick rates whose ratio is p/q with q <= 1000"
        )
    dtype = np.float32 if x.dtype == np.float32 else np.float64
    if ratio == 1:
        return x.astype(dtype, copy=True)
    y = scipy.signal.resample_poly(
        x.astype(np.float64), ratio.numerator, ratio.denominator, axis=0,
        window=("kaiser", 10.0), padtype="line",
    )
    return y.astype(dtype, copy=False)
