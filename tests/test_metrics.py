"""Metrics against closed forms and against their reference packages (scipy, pystoi, jiwer)."""

from __future__ import annotations

import math

import jiwer
import numpy as np
import pytest
import torch
from pystoi import stoi as pystoi_stoi
from scipy.stats import pearsonr

from ssip import metrics as M
from ssip.mel import MEL_FLOOR, log_mel, normalize_loudness


@pytest.fixture(scope="module")
def speech(speech_clips):
    """(audio, mel) of one loudness-normalised real speech clip."""
    audio = normalize_loudness(speech_clips[1])  # "he was not an ill disposed young man", 3 s
    return audio, log_mel(torch.from_numpy(audio)).numpy().astype(np.float64)


def test_speech_frames_threshold():
    mel = np.full((80, 5), MEL_FLOOR)
    mel[:, 1] += M.SPEECH_MARGIN + 0.01
    mel[:, 2] += M.SPEECH_MARGIN - 0.01
    mel[:40, 3] += 2 * M.SPEECH_MARGIN + 0.02  # mean over bins just above the margin
    assert M.speech_frames(mel).tolist() == [False, True, False, True, False]


def test_pcc_affine_copy_and_negation(speech):
    _, mel = speech
    assert M.mel_pcc(0.5 * mel + 3.0, mel) == pytest.approx(1.0, abs=1e-12)
    assert M.mel_pcc(-mel, mel) == pytest.approx(-1.0, abs=1e-12)
    assert M.mel_pcc_flat(2.0 * mel - 1.0, mel) == pytest.approx(1.0, abs=1e-12)
    assert M.mel_pcc_flat(-mel, mel) == pytest.approx(-1.0, abs=1e-12)


def test_pcc_matches_scipy(speech):
    _, mel = speech
    rng = np.random.default_rng(0)
    noisy = mel + rng.normal(0, 0.3, mel.shape)
    keep = M.speech_frames(mel)
    assert 0.3 < keep.mean() < 0.95  # the clip has both speech and pauses
    expected = np.mean([pearsonr(noisy[k, keep], mel[k, keep])[0] for k in range(80)])
    assert M.mel_pcc(noisy, mel) == pytest.approx(expected, abs=1e-10)
    all_frames = np.mean([pearsonr(noisy[k], mel[k])[0] for k in range(80)])
    assert M.mel_pcc(noisy, mel, speech_only=False) == pytest.approx(all_frames, abs=1e-10)
    flat = pearsonr(noisy.ravel(), mel.ravel())[0]
    assert M.mel_pcc_flat(noisy, mel) == pytest.approx(flat, abs=1e-10)
    flat_speech = pearsonr(noisy[:, keep].ravel(), mel[:, keep].ravel())[0]
    assert M.mel_pcc_flat(noisy, mel, speech_only=True) == pytest.approx(flat_speech, abs=1e-10)


def test_pcc_nan_cases(speech):
    _, mel = speech
    silence = np.full((80, 50), MEL_FLOOR)
    value, reason = M.mel_pcc_with_reason(silence, silence)
    assert math.isnan(value) and "speech frames" in reason
    # A constant bin has no correlation: it is left out, the others are still averaged.
    decoded = mel.copy()
    decoded[5] = 0.0
    keep = M.speech_frames(mel)
    expected = np.mean([pearsonr(decoded[k, keep], mel[k, keep])[0] for k in range(80) if k != 5])
    assert M.mel_pcc(decoded, mel) == pytest.approx(expected, abs=1e-10)
    with pytest.raises(ValueError, match="NaN"):
        M.mel_pcc(np.full_like(mel, np.nan), mel)
    with pytest.raises(ValueError, match="differ in shape"):
        M.mel_pcc(mel[:, :-1], mel)


def test_mcd_closed_forms(speech):
    _, mel = speech
    assert M.mcd(mel, mel) == 0.0
    # A constant offset moves only c_0: invisible without c_0, and 40 sqrt(160) delta with it
    # (Delta ln P = 4 ln10 delta in every bin; orthonormal c_0 = sqrt(80) * that).
    delta = 0.1
    assert M.mcd(mel + delta, mel) == pytest.approx(0.0, abs=1e-9)
    assert M.mcd(mel + delta, mel, include_c0=True) == pytest.approx(
        40 * math.sqrt(160) * delta, rel=1e-9)
    # An offset shaped like the 3rd DCT basis moves c_3 by 4 ln10 delta sqrt(40).
    k = np.arange(80)
    shaped = delta * np.cos(np.pi * 3 * (k + 0.5) / 80)[:, None]
    assert M.mcd(mel + shaped, mel) == pytest.approx(40 * math.sqrt(80) * delta, rel=1e-9)
    assert M.mcd(mel + shaped, mel, n_coeffs=2) == pytest.approx(0.0, abs=1e-9)
    assert M.MCD_CONSTANT == pytest.approx(10 / math.log(10) * math.sqrt(2))


def test_stoi_matches_pystoi(speech):
    audio, _ = speech
    rng = np.random.default_rng(1)
    noisy = audio + rng.normal(0, 0.05, audio.shape).astype(np.float32)
    expected = pystoi_stoi(audio.astype(np.float64), noisy.astype(np.float64), 16000)
    assert M.stoi(audio, noisy) == pytest.approx(expected, abs=1e-12)
    expected_e = pystoi_stoi(audio.astype(np.float64), noisy.astype(np.float64), 16000,
                             extended=True)
    assert M.estoi(audio, noisy) == pytest.approx(expected_e, abs=1e-12)
    assert 0.5 < M.estoi(audio, noisy) < M.stoi(audio, noisy) < M.stoi(audio, audio)
    assert M.stoi(audio, audio) == pytest.approx(1.0, abs=1e-6)
    # A vocoder's output lacks the last partial frame: up to 159 samples are forgiven.
    assert M.stoi(audio, audio[:-100]) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="differ in length"):
        M.stoi(audio, audio[:-500])


def test_stoi_short_clip_is_nan_not_1e5(speech):
    audio, _ = speech
    short = audio[:3000]  # 0.19 s: fewer than 30 STFT frames survive
    with pytest.warns(RuntimeWarning, match="Not enough STFT frames"):
        assert pystoi_stoi(short.astype(np.float64), short.astype(np.float64), 16000) == 1e-5
    value, reason = M.stoi_with_reason(short, short)
    assert math.isnan(value) and "30 frames" in reason
    assert math.isnan(M.estoi(short, short))


def test_wer_cer_known_pairs():
    assert M.wer("the cat sat on the mat", "the cat sit on mat") == pytest.approx(2 / 6)
    refs = ["Please press 1, then the pound key.", "Agent logged off."]
    hyps = ["please press one then the pound key", "agent logged of"]
    assert M.wer(refs, hyps) == pytest.approx(1 / 10)
    norm_r = [M.normalize_text(r) for r in refs]
    norm_h = [M.normalize_text(h) for h in hyps]
    assert norm_r[0] == "please press one then the pound key"
    assert M.wer(refs, hyps) == pytest.approx(jiwer.wer(norm_r, norm_h))
    assert M.cer(refs, hyps) == pytest.approx(jiwer.cer(norm_r, norm_h))
    assert M.cer("abcd", "abd") == pytest.approx(1 / 4)
    assert M.wer("hello world", "") == pytest.approx(1.0)
    with pytest.raises(ValueError, match="empty after normalisation"):
        M.wer(["...", "ok"], ["a", "ok"])
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        M.wer(["a", "b"], ["a"])


def test_normalize_text():
    assert M.normalize_text("  You'd  dial 1,234 on the 3rd  try;  28.8 kbit!") == (
        "youd dial one thousand two hundred and thirty four on the third try twenty eight "
        "point eight kbit")
    # Whisper can hallucinate hundreds of digits on decoded audio: past num2words' range the
    # number is read digit by digit instead of aborting the evaluation.
    huge = "1" + "0" * 400
    assert M.normalize_text(f"a {huge} b") == "a one " + "zero " * 400 + "b"
    assert M.normalize_text(f"{huge}th 2.5") == "one " + "zero " * 400 + "two point five"


def test_chance_level_noise_and_shifts(speech):
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(80, 400)), rng.normal(size=(80, 400))
    mean, std = M.chance_level(M.mel_pcc, a, b, n_shifts=20)
    assert abs(mean) < 0.02 and 0 < std < 0.05
    # A real mel against itself: aligned PCC is 1, shifted copies score far less.
    _, mel = speech
    mean, _ = M.chance_level(M.mel_pcc, mel, mel, n_shifts=10)
    assert mean < 0.6
    # Shifts are distinct and at least 10 % of the length away from zero, both ways.
    n = 200
    ramp = np.tile(np.arange(n, dtype=float), (80, 1))
    seen = []

    def shift_of(decoded, reference):
        seen.append(int((n - decoded[0, 0]) % n))
        return 0.0

    M.chance_level(shift_of, ramp, ramp, n_shifts=30)
    assert len(set(seen)) == 30 and min(seen) >= 20 and max(seen) <= 180
    with pytest.raises(ValueError, match="no shift"):
        M.chance_level(M.mel_pcc, a[:, :1], b[:, :1])


def test_closed_set_identification():
    truth = ["Agent logged off.", "Please hold.", "Goodbye", "Please hold"]
    hits, chance = M.closed_set_identification(
        ["agent logged of", "please hold", "good bye", "goodbye"], truth)
    assert chance == pytest.approx(1 / 3)  # "please hold" counts once
    assert hits.tolist() == [1.0, 1.0, 1.0, 0.0]
    # An empty output is equally far (by length) from equal-length candidates: a fair share.
    hits, chance = M.closed_set_identification(["", ""], ["abc", "xyz"])
    assert hits.tolist() == [0.5, 0.5] and chance == 0.5
    with pytest.raises(ValueError, match="at least 2 distinct"):
        M.closed_set_identification(["a"], ["a"])
