"""The one mel definition: parity with Whisper's feature extractor, the fixed floor, inverse."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import WhisperFeatureExtractor

from ssip import mel


@pytest.fixture(scope="module")
def whisper_fe():
    return WhisperFeatureExtractor(feature_size=80, sampling_rate=16000, hop_length=160, n_fft=400)


def _whisper(fe, audio):
    return fe(audio, sampling_rate=16000, return_tensors="np")["input_features"][0]


def test_parity_with_whisper_feature_extractor(whisper_fe, speech_clips):
    # Without ssip's fixed floor, ssip's mel equals Whisper's wherever Whisper's own per-clip
    # floor (max - 8) is not active: there it is max(ssip, whisper floor).
    for clip in speech_clips:
        a = mel.normalize_loudness(clip)
        w = _whisper(whisper_fe, a)
        s = mel.log_mel(torch.from_numpy(a), log10_floor=None).numpy()
        T = mel.num_frames(len(a))
        assert s.shape == (80, T)
        w = w[:, :T]
        w_floor = w.min()
        above = s > w_floor + 1e-3
        assert above.mean() > 0.5
        np.testing.assert_allclose(s[above], w[above], atol=1e-5)
        np.testing.assert_allclose(np.maximum(s, w_floor), w, atol=1e-5)


def test_fixed_floor_differs_only_below_the_floors(whisper_fe, speech_clips):
    for clip in speech_clips:
        a = mel.normalize_loudness(clip)
        w = _whisper(whisper_fe, a)[:, : mel.num_frames(len(a))]
        s = mel.log_mel(torch.from_numpy(a)).numpy()
        assert s.min() >= mel.MEL_FLOOR - 1e-6
        both = (s > mel.MEL_FLOOR + 1e-4) & (w > w.min() + 1e-4)
        np.testing.assert_allclose(s[both], w[both], atol=1e-5)
        # Where they differ, one of the two floors is active.
        diff = np.abs(s - w) > 1e-4
        assert np.all((s[diff] <= mel.MEL_FLOOR + 1e-4) | (w[diff] <= w.min() + 1e-4))


def test_floor_sits_where_whispers_would_on_normalised_speech(speech_clips):
    maxima = [float(mel.log_mel(torch.from_numpy(mel.normalize_loudness(c)), log10_floor=None).max() * 4 - 4)
              for c in speech_clips]
    assert abs(np.median(maxima) - 8.0 - mel.LOG10_FLOOR) < 0.5, maxima


def test_normalize_loudness_hits_target_and_ignores_silence(speech_clips):
    clip = speech_clips[0]
    padded = np.concatenate([np.zeros(16000, np.float32), clip * 0.01, np.zeros(16000, np.float32)])
    a, b = mel.normalize_loudness(clip), mel.normalize_loudness(padded)
    np.testing.assert_allclose(b[16000:16000 + len(clip)], a, rtol=1e-3, atol=1e-6)
    assert np.all(mel.normalize_loudness(np.zeros(800)) == 0)


def test_batched_equals_single_and_differentiable(speech_clips):
    a = torch.from_numpy(mel.normalize_loudness(speech_clips[0][:32000]))
    b = torch.from_numpy(mel.normalize_loudness(speech_clips[1][:32000]))
    batch = mel.log_mel(torch.stack([a, b]))
    torch.testing.assert_close(batch[0], mel.log_mel(a))
    torch.testing.assert_close(batch[1], mel.log_mel(b))
    x = a.clone().requires_grad_(True)
    mel.log_mel(x).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_mel_to_power_inverts_filterbank():
    rng = np.random.default_rng(0)
    power = torch.from_numpy(rng.gamma(2.0, 1e-3, size=(201, 50)))
    m = (torch.log10(mel.mel_filters(dtype=torch.float64) @ power) + 4) / 4
    rec = mel.mel_to_power(m, n_iter=200)
    m2 = (torch.log10(mel.mel_filters(dtype=torch.float64) @ rec.double()) + 4) / 4
    torch.testing.assert_close(m2, m, atol=2e-3, rtol=0)


def test_griffin_lim_round_trip(speech_clips):
    a = mel.normalize_loudness(speech_clips[0][:48000])
    m = mel.log_mel(torch.from_numpy(a))
    audio = mel.griffin_lim(m, n_iter=32)
    assert audio.shape == (m.shape[-1] * mel.HOP_LENGTH,)
    m2 = mel.log_mel(audio)
    r = np.corrcoef(m.numpy().ravel(), m2.numpy().ravel())[0, 1]
    assert r > 0.95, r
