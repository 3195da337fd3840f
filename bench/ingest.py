"""High-gamma feature extraction: ssip against MNE and against a per-channel scipy loop.

Builds a synthetic multichannel recording (pink-ish background + amplitude-modulated high
gamma + a linear drift + 50 Hz mains with harmonics), then times, in the same process on the
same data, the same definition (70-170 Hz Butterworth band-pass and +-2 Hz band-stops at the
line harmonics in the band, all order 4 and zero phase; Hilbert envelope; 50 ms window means
centred on k / 100 s) three ways:

- ``ssip.data.highgamma.high_gamma``: detrend, then band-pass, notches and Hilbert as one
  spectral mask (one real FFT and one inverse complex FFT per channel), running-mean frames;
- MNE, the library a lab would use: ``mne.io.RawArray`` of the data,
  ``raw.notch_filter(f, method="iir")`` for f = 100 and 150 Hz (edges 98-102 and 148-152 Hz,
  as ssip's; MNE takes one IIR stop-band per call),
  ``raw.filter(70, 170, method="iir")``, ``raw.apply_hilbert(envelope=True)``, then the same
  frame means (vectorised with a cumulative sum); ``--mne-notch fir`` times MNE's default FIR
  notch instead (a different filter, so agreement is not checked for it);
- a plain reference written the way the recipe is usually coded (Verwoert et al. 2022): per
  channel scipy detrend -> sosfiltfilt band-pass -> sosfiltfilt notches -> scipy hilbert at the
  signal's own length, then a Python loop over frames (timed separately, so the gain from the
  filters is visible apart from the gain from not looping over frames). This is also what
  ``high_gamma`` computed before its filtering moved to the frequency domain.

Throughput is seconds of recording processed per CPU-second of this process
(``time.process_time``, the best of ``--repeats`` runs; wall time is printed too, and equals
CPU time when nothing else runs, since every path is single-threaded: BLAS/OpenMP pools are
pinned to 1 below, scipy's filters and FFTs use one thread unless asked, MNE runs with
``n_jobs=1``).

Agreement, checked and printed (exit status 1 on a mismatch):

- ssip vs the scipy loop: the same filters, so away from the ends (>= 2 s, where both edge
  extensions have decayed) the features must agree to 1e-3 of the largest feature (measured
  ~1e-4); whole-recording per-channel correlation is printed.
- ssip vs MNE: the same filter designs, but MNE pads differently before its forward-backward
  filters and does not detrend, so the ends differ more. Required: per-channel correlation of
  the 100 Hz features >= 0.999 over frames >= 1 s from the ends, and max |difference| <= 1e-3 of
  the largest feature beyond 2 s.

Run: ``.venv/bin/python bench/ingest.py [--seconds 60] [--channels 128] [--repeats 3]``;
``--quick`` is a 10 s x 16 channel smoke run. Add ``--extra-samples 1`` to make the length
awkward for the FFT (61441 samples is prime at 60 s x 1024 Hz + 1).
"""

from __future__ import annotations

import os

# Pin BLAS/OpenMP pools before numpy loads so "per core" means one core for every path
# (threadpoolctl below pins them again at run time, in case a library resized them).
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import scipy.signal  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from ssip.data.highgamma import high_gamma, line_harmonics  # noqa: E402

SFREQ = 1024.0
FRAME_RATE = 100.0
WINDOW_S = 0.05
BAND = (70.0, 170.0)
LINE_FREQ = 50.0


def synthetic_recording(seconds: float, n_channels: int, extra_samples: int, seed: int = 0):
    """Synthetic ECoG-like recording, shape (n_samples, n_channels), float64, microvolt-ish."""
    rng = np.random.default_rng(seed)
    n = round(seconds * SFREQ) + extra_samples
    t = np.arange(n) / SFREQ
    # 1/f background: integrate white noise once and leak it (a first-order AR process).
    background = scipy.signal.lfilter([1.0], [1.0, -0.97], rng.standard_normal((n, n_channels)),
                                      axis=0)
    # High gamma: noise band-limited to ~100 Hz, modulated by slow "speech" envelopes.
    carrier = scipy.signal.sosfilt(
        scipy.signal.butter(4, (80.0, 150.0), btype="bandpass", fs=SFREQ, output="sos"),
        rng.standard_normal((n, n_channels)), axis=0,
    )
    envelope = 1.0 + np.abs(np.sin(2 * np.pi * rng.uniform(0.5, 3.0, n_channels) * t[:, None]))
    mains = sum(np.sin(2 * np.pi * h * LINE_FREQ * t + h)[:, None] / h for h in (1, 2, 3))
    drift = rng.normal(0.0, 0.05, n_channels) * t[:, None]
    return 10.0 * background + 3.0 * envelope * carrier + 20.0 * mains + drift


def reference_envelope(raw: np.ndarray, sfreq: float) -> np.ndarray:
    """Filters and envelope written per channel in their plainest form, (n_samples, n_ch)."""
    bandpass = scipy.signal.butter(4, BAND, btype="bandpass", fs=sfreq, output="sos")
    notches = [
        scipy.signal.butter(4, (f - 2.0, f + 2.0), btype="bandstop", fs=sfreq, output="sos")
        for f in line_harmonics(LINE_FREQ, BAND)
    ]
    envelope = np.empty(raw.shape)
    for c in range(raw.shape[1]):
        x = scipy.signal.detrend(raw[:, c])
        x = scipy.signal.sosfiltfilt(bandpass, x)
        for sos in notches:
            x = scipy.signal.sosfiltfilt(sos, x)
        envelope[:, c] = np.abs(scipy.signal.hilbert(x))
    return envelope


def reference_frames(envelope: np.ndarray, sfreq: float) -> np.ndarray:
    """50 ms window means centred on k / FRAME_RATE, as a loop over frames, (n_frames, n_ch)."""
    n_samples, n_channels = envelope.shape
    n_frames = int(np.floor(n_samples * FRAME_RATE / sfreq + 1e-9))
    length = round(WINDOW_S * sfreq)
    out = np.empty((n_frames, n_channels), dtype=np.float32)
    for c in range(n_channels):
        for k in range(n_frames):
            centre = round(k * sfreq / FRAME_RATE)
            lo = max(0, centre - length // 2)
            hi = min(n_samples, centre - length // 2 + length)
            out[k, c] = envelope[lo:hi, c].mean()
    return out


def frame_means(envelope: np.ndarray, sfreq: float) -> np.ndarray:
    """The same window means as ``reference_frames``, vectorised with a cumulative sum, for an
    (n_channels, n_samples) envelope as MNE returns it; (n_frames, n_channels) float32."""
    n_channels, n_samples = envelope.shape
    n_frames = int(np.floor(n_samples * FRAME_RATE / sfreq + 1e-9))
    length = round(WINDOW_S * sfreq)
    centres = np.rint(np.arange(n_frames) * (sfreq / FRAME_RATE)).astype(np.int64)
    lo = np.clip(centres - length // 2, 0, n_samples)
    hi = np.clip(centres - length // 2 + length, 0, n_samples)
    csum = np.zeros((n_channels, n_samples + 1))
    np.cumsum(envelope, axis=-1, out=csum[:, 1:])
    return ((csum[:, hi] - csum[:, lo]) / (hi - lo)).T.astype(np.float32)


def mne_high_gamma(raw: np.ndarray, sfreq: float, notch_method: str = "iir") -> np.ndarray:
    """The recipe with MNE's filtering and Hilbert, then ``frame_means``; (n_frames, n_ch)."""
    import mne

    n_channels = raw.shape[1]
    info = mne.create_info([f"E{c}" for c in range(n_channels)], sfreq, ch_types="ecog")
    # copy="data": MNE filters in place, and without a copy RawArray may wrap (and filter)
    # the caller's array.
    rec = mne.io.RawArray(raw.T, info, copy="data", verbose="error")
    harmonics = line_harmonics(LINE_FREQ, BAND)
    if notch_method == "iir":
        # MNE's IIR band-stop edges are freq -+ (notch_widths + trans_bandwidth) / 2: 3 + 1
        # gives ssip's +-2 Hz; iir_params default to a 4th-order Butterworth, zero phase.
        # MNE takes one IIR stop-band per call.
        for f in harmonics:
            rec.notch_filter(f, method="iir", notch_widths=3.0, trans_bandwidth=1.0,
                             picks="all", verbose="error")
    else:  # MNE's default: FIR notches of width freq / 200
        rec.notch_filter(harmonics, picks="all", verbose="error")
    rec.filter(BAND[0], BAND[1], method="iir", picks="all", verbose="error")
    rec.apply_hilbert(envelope=True, picks="all", verbose="error")
    return frame_means(rec.get_data(), sfreq)


def best_time(fn, repeats: int) -> tuple[float, float, np.ndarray]:
    """Fastest CPU time and fastest wall time over ``repeats`` runs (s), and the last result."""
    cpu, wall = [], []
    for _ in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        result = fn()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    return min(cpu), min(wall), result


def agreement(a: np.ndarray, b: np.ndarray, edge: int) -> tuple[float, float, float]:
    """Min per-channel correlation over all frames and over frames >= ``edge`` from the ends,
    and max |a - b| beyond 2 * ``edge`` frames, relative to b's largest feature."""
    def min_corr(x, y):
        return min(float(np.corrcoef(x[:, c], y[:, c])[0, 1]) for c in range(x.shape[1]))

    inner = slice(2 * edge, -2 * edge)
    return (min_corr(a, b), min_corr(a[edge:-edge], b[edge:-edge]),
            float(np.abs(a - b)[inner].max() / np.abs(b).max()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="recording length (s)")
    parser.add_argument("--channels", type=int, default=128, help="number of channels")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs; the best is kept")
    parser.add_argument("--extra-samples", type=int, default=0,
                        help="samples added to the length (1 makes 60 s at 1024 Hz prime)")
    parser.add_argument("--mne-notch", choices=("iir", "fir"), default="iir",
                        help="MNE notch method: iir = ssip's filters (default), fir = MNE's default")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 10 s x 16 channels, 1 repeat")
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.channels, args.repeats = 10.0, 16, 1

    cores_available = len(os.sched_getaffinity(0))
    raw = synthetic_recording(args.seconds, args.channels, args.extra_samples)
    n_samples = raw.shape[0]
    duration = n_samples / SFREQ
    print(f"recording: {duration:.3f} s x {args.channels} channels at {SFREQ:g} Hz "
          f"({n_samples} samples); cores available {cores_available}, used 1; "
          f"best of {args.repeats}")

    with threadpool_limits(limits=1):
        mne_high_gamma(raw[: round(2 * SFREQ)], SFREQ, args.mne_notch)  # import and warm up
        t_ssip = best_time(lambda: high_gamma(raw, SFREQ, line_freq=LINE_FREQ), args.repeats)
        t_mne = best_time(lambda: mne_high_gamma(raw, SFREQ, args.mne_notch), args.repeats)
        t_env = best_time(lambda: reference_envelope(raw, SFREQ), args.repeats)
        t_frames = best_time(lambda: reference_frames(t_env[2], SFREQ), args.repeats)
    y_ssip, y_mne, y_ref = t_ssip[2], t_mne[2], t_frames[2]

    edge = round(1.0 * FRAME_RATE)  # 1 s of frames
    ok = True
    r_all, r_in, d_in = agreement(y_ssip, y_ref, edge)
    print(f"ssip vs scipy loop: min per-channel r {r_all:.5f} (all frames), {r_in:.6f} "
          f"(>= 1 s from the ends); max |diff| beyond 2 s {d_in:.1e} of the largest feature "
          "(required <= 1e-3)")
    ok &= d_in <= 1e-3
    r_all, r_in, d_in = agreement(y_ssip, y_mne, edge)
    print(f"ssip vs MNE ({args.mne_notch} notch): min per-channel r {r_all:.5f} (all frames), "
          f"{r_in:.6f} (>= 1 s from the ends; required >= 0.999); max |diff| beyond 2 s "
          f"{d_in:.1e} of the largest feature (required <= 1e-3)")
    if args.mne_notch == "iir":
        ok &= r_in >= 0.999 and d_in <= 1e-3

    rows = (
        ("ssip high_gamma", t_ssip),
        (f"MNE ({args.mne_notch} notch)", t_mne),
        ("scipy loop, total", (t_env[0] + t_frames[0], t_env[1] + t_frames[1])),
        ("scipy loop, filters+env", t_env),
        ("scipy loop, frame loop", t_frames),
    )
    rate = {}
    for name, (cpu, wall, *_) in rows:
        rate[name] = duration / cpu
        print(f"{name:>24}: {cpu:7.3f} CPU-s ({wall:7.3f} s wall) -> {rate[name]:7.1f} s of "
              f"{args.channels}-channel recording per CPU-second")
    print(f"ratios: ssip / MNE {rate['ssip high_gamma'] / rate[rows[1][0]]:.2f}x; ssip / scipy "
          f"loop {rate['ssip high_gamma'] / rate['scipy loop, total']:.2f}x (filters+envelope "
          f"alone {rate['ssip high_gamma'] / rate['scipy loop, filters+env']:.2f}x)")
    if not ok:
        print("MISMATCH: see the agreement lines above")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
