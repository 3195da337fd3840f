"""Speech-decoding metrics: pure functions on numpy arrays (no Ray, no file I/O).

Mel metrics take ssip log-mels (see ``ssip.mel``): arrays of shape (80, T), values
(log10(mel power) + 4) / 4, silence at ``MEL_FLOOR``. The decoded mel comes first, the reference
(ground truth) second, everywhere.

- :func:`mel_pcc`: mean over mel bins of the per-bin Pearson r across time, on the reference's
  speech frames (:func:`speech_frames`); the usual score of speech-decoding papers.
- :func:`mel_pcc_flat`: one Pearson r over all bins and frames.
- :func:`mcd`: mel cepstral distortion in dB.
- :func:`stoi` / :func:`estoi`: (extended) short-time objective intelligibility via ``pystoi``.
- :func:`wer` / :func:`cer`: word / character error rate via ``jiwer`` after
  :func:`normalize_text`.
- :func:`chance_level`: any mel metric against a time-shifted copy of the decoded mel.
- :func:`closed_set_identification`: the closed-set score of docs/method.md (Metrics and the report).

A metric that cannot be computed returns NaN, and the ``*_with_reason`` variants say why; no
metric returns a made-up number.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Sequence

import jiwer
import numpy as np
from num2words import num2words
from pystoi import stoi as _pystoi
from rapidfuzz.distance import Levenshtein
from scipy.fft import dct

from ssip.mel import HOP_LENGTH, MEL_FLOOR, N_MELS, SAMPLE_RATE

#: A reference frame is speech when its mean over the 80 bins exceeds MEL_FLOOR + SPEECH_MARGIN.
#: 0.5 ssip units = 2 decades = 20 dB of mel power above the floor. On loudness-normalised
#: asterisk prompts, silence sits within 0.1 of the floor and speech frames about 0.8 above it;
#: 0.5 keeps about 74 % of their frames.
SPEECH_MARGIN = 0.5
#: MCD constant: (10 / ln 10) * sqrt(2) (see :func:`mcd`).
MCD_CONSTANT = 10.0 / math.log(10.0) * math.sqrt(2.0)
#: pystoi needs this many 10 kHz STFT frames (30 x 12.8 ms = 384 ms) left after it removes
#: frames more than 40 dB below the loudest one; otherwise it warns and returns 1e-5.
STOI_MIN_FRAMES = 30


def _check_mels(decoded: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d = np.asarray(decoded, dtype=np.float64)
    r = np.asarray(reference, dtype=np.float64)
    if d.ndim != 2 or d.shape[0] != N_MELS:
        raise ValueError(f"decoded mel has shape {d.shape}; expected ({N_MELS}, T)")
    if d.shape != r.shape:
        raise ValueError(
            f"decoded mel {d.shape} and reference mel {r.shape} differ in shape; "
            "crop both to the same frames first"
        )
    if not (np.isfinite(d).all() and np.isfinite(r).all()):
        raise ValueError("mel contains NaN or inf; fix the decoder output before scoring it")
    return d, r


def speech_frames(reference: np.ndarray, margin: float = SPEECH_MARGIN) -> np.ndarray:
    """Frames of a reference mel that hold speech.

    Parameters
    ----------
    reference : ndarray, shape (80, T)
        Ground-truth ssip mel.
    margin : float
        Threshold above ``MEL_FLOOR`` of the frame's mean over bins, in ssip units
        (1 unit = 4 decades = 40 dB of mel power).

    Returns
    -------
    ndarray of bool, shape (T,)
    """
    r = np.asarray(reference, dtype=np.float64)
    return r.mean(axis=0) > MEL_FLOOR + margin


def _pearson_rows(d: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Pearson r of each row pair of (K, T) arrays; NaN where a row is constant."""
    dc = d - d.mean(axis=1, keepdims=True)
    rc = r - r.mean(axis=1, keepdims=True)
    denom = np.sqrt((dc**2).sum(axis=1) * (rc**2).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = (dc * rc).sum(axis=1) / denom
    rho[denom <= 1e-12 * max(1.0, float(np.max(denom, initial=0.0)))] = np.nan
    return np.clip(rho, -1.0, 1.0)


def mel_pcc_with_reason(
    decoded: np.ndarray,
    reference: np.ndarray,
    speech_only: bool = True,
    margin: float = SPEECH_MARGIN,
) -> tuple[float, str | None]:
    """:func:`mel_pcc` and, when it is NaN, why (else None)."""
    d, r = _check_mels(decoded, reference)
    if speech_only:
        keep = speech_frames(r, margin)
        d, r = d[:, keep], r[:, keep]
    if d.shape[1] < 3:
        return math.nan, f"only {d.shape[1]} speech frames (need >= 3)"
    rho = _pearson_rows(d, r)
    if np.isnan(rho).all():
        return math.nan, "every mel bin is constant over the frames scored"
    return float(np.nanmean(rho)), None


def mel_pcc(
    decoded: np.ndarray,
    reference: np.ndarray,
    speech_only: bool = True,
    margin: float = SPEECH_MARGIN,
) -> float:
    """Mean over mel bins of the per-bin Pearson correlation across time.

    Parameters
    ----------
    decoded, reference : ndarray, shape (80, T)
        ssip mels, decoded and ground truth.
    speech_only : bool
        Score only the reference's speech frames (:func:`speech_frames`); silence is easy to
        predict and would inflate the score.
    margin : float
        Speech threshold above ``MEL_FLOOR`` (ssip units).

    Returns
    -------
    float
        In [-1, 1]. Bins that are constant in either mel over the scored frames have no
        correlation and are left out of the mean; NaN when fewer than 3 frames are scored or
        every bin is constant (see :func:`mel_pcc_with_reason`).
    """
    return mel_pcc_with_reason(decoded, reference, speech_only, margin)[0]


def mel_pcc_flat(
    decoded: np.ndarray,
    reference: np.ndarray,
    speech_only: bool = False,
    margin: float = SPEECH_MARGIN,
) -> float:
    """One Pearson correlation over all bins and frames, flattened.

    Parameters
    ----------
    decoded, reference : ndarray, shape (80, T)
        ssip mels.
    speech_only : bool
        Restrict to the reference's speech frames (default: all frames).
    margin : float
        Speech threshold above ``MEL_FLOOR`` (ssip units).

    Returns
    -------
    float
        In [-1, 1]; NaN when either flattened mel is constant or no frame is scored.
    """
    d, r = _check_mels(decoded, reference)
    if speech_only:
        keep = speech_frames(r, margin)
        d, r = d[:, keep], r[:, keep]
    if d.size < 3:
        return math.nan
    return float(_pearson_rows(d.reshape(1, -1), r.reshape(1, -1))[0])


def mel_cepstrum(mel: np.ndarray) -> np.ndarray:
    """Mel cepstrum of an ssip mel: orthonormal DCT-II over bins of the natural-log mel power.

    Parameters
    ----------
    mel : ndarray, shape (80, T)
        ssip mel, x = (log10 P + 4) / 4, so ln P = ln(10) * (4 x - 4).

    Returns
    -------
    ndarray, shape (80, T)
        Coefficients c_0 (energy) ... c_79.
    """
    ln_power = math.log(10.0) * (4.0 * np.asarray(mel, dtype=np.float64) - 4.0)
    return dct(ln_power, type=2, norm="ortho", axis=0)


def mcd(
    decoded: np.ndarray,
    reference: np.ndarray,
    n_coeffs: int = 24,
    include_c0: bool = False,
    speech_only: bool = True,
    margin: float = SPEECH_MARGIN,
) -> float:
    """Mel cepstral distortion in dB, averaged over frames.

    Convention: c = :func:`mel_cepstrum` (orthonormal DCT-II of the natural log of mel POWER);
    per frame MCD_t = (10 / ln 10) * sqrt(2 * sum_{d=1}^{D} (c_d - c'_d)^2) with D = ``n_coeffs``
    (c_0, the frame energy, left out unless ``include_c0``); then the mean over frames. With the
    log of power (not amplitude) and an orthonormal DCT, 10 / ln 10 turns nepers of power into
    dB; the sqrt(2) is the customary factor of Kubichek (1993). The scale is NOT that of SPTK-style
    MCD (cepstra of log amplitude with the cepstrum's 2/N scaling, not an orthonormal DCT over 80
    mel bins): values here are several times larger. Compare MCDs only within ssip.

    Parameters
    ----------
    decoded, reference : ndarray, shape (80, T)
        ssip mels.
    n_coeffs : int
        Cepstral coefficients c_1..c_D compared (1 <= D <= 79).
    include_c0 : bool
        Also compare c_0 (overall level).
    speech_only : bool
        Average over the reference's speech frames only.
    margin : float
        Speech threshold above ``MEL_FLOOR`` (ssip units).

    Returns
    -------
    float
        dB, >= 0; NaN when no frame is scored.
    """
    if not 1 <= n_coeffs < N_MELS:
        raise ValueError(f"n_coeffs={n_coeffs} must be in [1, {N_MELS - 1}]")
    d, r = _check_mels(decoded, reference)
    if speech_only:
        keep = speech_frames(r, margin)
        d, r = d[:, keep], r[:, keep]
    if d.shape[1] == 0:
        return math.nan
    diff = mel_cepstrum(d) - mel_cepstrum(r)  # (80, T')
    lo = 0 if include_c0 else 1
    per_frame = MCD_CONSTANT * np.sqrt((diff[lo : n_coeffs + 1] ** 2).sum(axis=0))
    return float(per_frame.mean())


def _check_audio(reference: np.ndarray, decoded: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(reference, dtype=np.float64)
    y = np.asarray(decoded, dtype=np.float64)
    if x.ndim != 1 or y.ndim != 1:
        raise ValueError(f"audio must be 1-D; got reference {x.shape}, decoded {y.shape}")
    # A vocoder renders T * 160 samples from the N // 160 frames of an N-sample clip: forgive
    # that remainder by cropping the reference, nothing more.
    if 0 < len(x) - len(y) < HOP_LENGTH:
        x = x[: len(y)]
    if len(x) != len(y):
        raise ValueError(
            f"reference ({len(x)} samples) and decoded ({len(y)} samples) audio differ in length "
            "by more than one hop; crop them to the same span"
        )
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("audio contains NaN or inf")
    return x, y


def stoi_with_reason(
    reference: np.ndarray,
    decoded: np.ndarray,
    extended: bool = False,
    sample_rate: int = SAMPLE_RATE,
) -> tuple[float, str | None]:
    """:func:`stoi` (or ESTOI) and, when it is NaN, why (else None)."""
    x, y = _check_audio(reference, decoded)
    if not np.any(x):
        return math.nan, "reference audio is all zeros"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = float(_pystoi(x, y, sample_rate, extended=extended))
    for w in caught:
        if "Not enough STFT frames" in str(w.message):
            return math.nan, (
                f"fewer than {STOI_MIN_FRAMES} frames (384 ms) of the reference are within 40 dB "
                "of its loudest frame; pystoi would return a meaningless 1e-5"
            )
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if not math.isfinite(value):
        return math.nan, "pystoi returned a non-finite value (is the decoded audio silent?)"
    return value, None


def stoi(reference: np.ndarray, decoded: np.ndarray, extended: bool = False,
         sample_rate: int = SAMPLE_RATE) -> float:
    """Short-time objective intelligibility (Taal et al. 2011) via ``pystoi``.

    Parameters
    ----------
    reference : ndarray, shape (n_samples,)
        Clean original audio.
    decoded : ndarray, shape (n_samples,)
        Audio to score; may be shorter than ``reference`` by less than one hop (160 samples),
        the reference is then cropped.
    extended : bool
        ESTOI (Jensen & Taal 2016) instead of STOI.
    sample_rate : int
        Hz of both signals (pystoi resamples to 10 kHz).

    Returns
    -------
    float
        About 0.38 for unrelated speech-like signals, 1 for identical ones; NaN when too little
        speech survives pystoi's silence removal (see :func:`stoi_with_reason`).
    """
    return stoi_with_reason(reference, decoded, extended, sample_rate)[0]


def estoi(reference: np.ndarray, decoded: np.ndarray, sample_rate: int = SAMPLE_RATE) -> float:
    """Extended STOI (Jensen & Taal 2016); see :func:`stoi`."""
    return stoi_with_reason(reference, decoded, True, sample_rate)[0]


_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")
_ORDINAL = re.compile(r"\b(\d+)(st|nd|rd|th)\b")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_APOSTROPHE = re.compile(r"['’`]")
_NON_WORD = re.compile(r"[^\w\s]|_")


def _number_words(digits: str, to: str = "cardinal") -> str:
    try:
        return num2words(float(digits) if "." in digits else int(digits), to=to)
    except OverflowError:
        # Past num2words' range (an ASR hallucination of hundreds of zeros does happen on
        # decoded audio): read it digit by digit, as a person would.
        return " ".join("point" if c == "." else num2words(int(c)) for c in digits)


def normalize_text(text: str) -> str:
    """Normalise a transcript for WER/CER.

    Lowercase; digits spelled out as English words with ``num2words`` ("press 1" -> "press
    one", "3rd" -> "third", "28.8" -> "twenty eight point eight"), so a spoken number matches
    whichever way a transcript or the ASR wrote it; apostrophes dropped ("you'd" -> "youd");
    every other punctuation mark becomes a space; whitespace collapsed. A number too long for
    ``num2words`` is read digit by digit.
    """
    t = _THOUSANDS.sub("", text.lower())
    t = _ORDINAL.sub(lambda m: f" {_number_words(m.group(1), to='ordinal')} ", t)
    t = _NUMBER.sub(lambda m: f" {_number_words(m.group())} ", t)
    t = _APOSTROPHE.sub("", t)
    t = _NON_WORD.sub(" ", t)
    return " ".join(t.split())


def _normalized_pairs(
    references: str | Sequence[str], hypotheses: str | Sequence[str]
) -> tuple[list[str], list[str]]:
    refs = [references] if isinstance(references, str) else list(references)
    hyps = [hypotheses] if isinstance(hypotheses, str) else list(hypotheses)
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    if not refs:
        raise ValueError("no transcripts to score")
    refs = [normalize_text(r) for r in refs]
    hyps = [normalize_text(h) for h in hyps]
    empty = [i for i, r in enumerate(refs) if not r]
    if empty:
        raise ValueError(f"references {empty} are empty after normalisation; drop those trials")
    return refs, hyps


def wer(references: str | Sequence[str], hypotheses: str | Sequence[str]) -> float:
    """Word error rate over a corpus after :func:`normalize_text`, via ``jiwer``.

    Parameters
    ----------
    references, hypotheses : str or sequence of str
        Ground-truth and recognised transcripts, paired by position.

    Returns
    -------
    float
        (substitutions + deletions + insertions) / reference words, summed over all pairs
        (>= 0, may exceed 1).
    """
    refs, hyps = _normalized_pairs(references, hypotheses)
    return float(jiwer.wer(refs, hyps))


def cer(references: str | Sequence[str], hypotheses: str | Sequence[str]) -> float:
    """Character error rate over a corpus after :func:`normalize_text`, via ``jiwer``."""
    refs, hyps = _normalized_pairs(references, hypotheses)
    return float(jiwer.cer(refs, hyps))


def chance_level(
    metric: Callable[[np.ndarray, np.ndarray], float],
    decoded: np.ndarray,
    reference: np.ndarray,
    n_shifts: int = 20,
    min_fraction: float = 0.1,
    seed: int = 0,
) -> tuple[float, float]:
    """Chance level of a mel metric: the decoded mel circularly shifted in time.

    A shift keeps the decoded mel's own statistics (spectral shape, dynamics) but breaks its
    alignment with the reference, so the score it gets is what a decoder gets for free.

    Parameters
    ----------
    metric : callable (decoded (80, T), reference (80, T)) -> float
        E.g. :func:`mel_pcc`.
    decoded, reference : ndarray, shape (80, T)
        ssip mels.
    n_shifts : int
        K distinct shifts, drawn without replacement from [ceil(f T), T - ceil(f T)].
    min_fraction : float
        f: the smallest shift as a fraction of T, in both directions.
    seed : int
        Seed of the shift draw.

    Returns
    -------
    mean, std : float
        Over the K shifted scores (NaN scores left out; NaN if all are NaN).
    """
    d, r = _check_mels(decoded, reference)
    n = d.shape[1]
    lo = math.ceil(min_fraction * n)
    shifts = np.arange(lo, n - lo + 1)
    if lo < 1 or len(shifts) == 0:
        raise ValueError(
            f"chance_level: a mel of {n} frames has no shift of at least {min_fraction:.0%} of "
            "its length each way; use a longer mel or a smaller min_fraction"
        )
    rng = np.random.default_rng(seed)
    chosen = rng.choice(shifts, size=min(n_shifts, len(shifts)), replace=False)
    scores = np.array([metric(np.roll(d, int(s), axis=1), r) for s in chosen], dtype=np.float64)
    if np.isnan(scores).all():
        return math.nan, math.nan
    return float(np.nanmean(scores)), float(np.nanstd(scores))


def closed_set_identification(
    asr_outputs: Sequence[str], transcripts: Sequence[str]
) -> tuple[np.ndarray, float]:
    """Closed-set identification of trials from ASR output (docs/method.md, Metrics and the report).

    The candidates are the distinct (normalised) transcripts of the evaluated trials. A trial is
    identified when the candidate nearest to its ASR output in character edit distance
    (Levenshtein, on :func:`normalize_text` output) is its own transcript. When several
    candidates tie for nearest and its own is among them, the trial scores 1 / (number tied),
    the expected hit of a random tie-break (an empty ASR output thus scores chance, not 0 or 1).

    Parameters
    ----------
    asr_outputs : sequence of str, length N
        Transcripts recognised from the decoded audio.
    transcripts : sequence of str, length N
        Ground-truth transcripts of the same trials.

    Returns
    -------
    hits : ndarray, shape (N,), float
        1 (identified), 0 (not), or 1/m for an m-way tie; the mean is the identification rate.
    chance : float
        1 / number of distinct candidates.
    """
    if len(asr_outputs) != len(transcripts):
        raise ValueError(f"{len(asr_outputs)} ASR outputs but {len(transcripts)} transcripts")
    truth = [normalize_text(t) for t in transcripts]
    candidates = sorted(set(truth))
    if len(candidates) < 2:
        raise ValueError(
            f"closed-set identification needs at least 2 distinct transcripts, got {candidates}"
        )
    hits = np.zeros(len(truth))
    for i, (out, own) in enumerate(zip(asr_outputs, truth, strict=True)):
        hyp = normalize_text(out)
        dist = np.array([Levenshtein.distance(hyp, c) for c in candidates])
        nearest = np.flatnonzero(dist == dist.min())
        if candidates.index(own) in nearest:
            hits[i] = 1.0 / len(nearest)
    return hits, 1.0 / len(candidates)
