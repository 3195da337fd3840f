"""The embedded simulated corpus: encoding model, raw rendering, writers, determinism."""

from __future__ import annotations

import csv
import json
import math

import h5py
import numpy as np
import pytest
import scipy.ndimage
import scipy.signal

from ssip import mel as melmod
from ssip.config import ConfigError
from ssip.data import simulate
from ssip.data.formats import read_ground_truth
from ssip.data.simulate import CorpusConfig, EncodingModel, build_corpus
from ssip.data.speech import Utterance, read_pocketsphinx

TINY = dict(n_subjects=2, electrodes_min=32, electrodes_max=40, source="pocketsphinx", extra_voices=[],
            max_utterances=8, n_tasks=2)


@pytest.fixture(scope="module")
def utterances():
    return read_pocketsphinx()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, utterances):
    out = tmp_path_factory.mktemp("corpus")
    card = build_corpus(CorpusConfig(**TINY), out, utterances=utterances, progress=False)
    return out, card


def _tsv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def _bids(out, sub):
    return out / "bids" / f"sub-{sub}" / "ieeg" / f"sub-{sub}_task-wordProduction"


def _read_nwb(path):
    from pynwb import NWBHDF5IO

    with NWBHDF5IO(str(path), "r") as io:
        nwb = io.read()
        ieeg, audio = nwb.acquisition["iEEG"], nwb.acquisition["Audio"]
        stim = nwb.acquisition["Stimulus"]
        return {
            "raw": ieeg.data[:], "timestamps": ieeg.timestamps[:], "unit": ieeg.unit,
            "audio": audio.data[:], "audio_timestamps": audio.timestamps[:],
            "stimulus": np.array([w.decode() for w in stim.data[:]]),
            "stimulus_timestamps": stim.timestamps[:],
        }


def test_files_and_card(corpus, utterances):
    out, card = corpus
    assert json.loads((out / "corpus.json").read_text()) == card
    assert card["mel_version"] == melmod.MEL_VERSION
    assert [s["subject"] for s in card["subjects"]] == ["sim01", "sim02"]
    for s in card["subjects"]:
        for f in s["files"]:
            assert (out / f).is_file(), f
        assert 32 <= s["n_electrodes"] <= 40
    assert (out / "bids" / "dataset_description.json").is_file()
    # Every one of the first 8 prompts is spoken by exactly one subject.
    spoken = []
    for s in card["subjects"]:
        spoken += [r["utt_id"] for r in _tsv(f"{_bids(out, s['subject'])}_events.tsv")
                   if r["trial_type"] == "word"]
    assert sorted(spoken) == [u.utt_id for u in utterances[:8]]
    assert card["speech_sources"][0]["license"] == "BSD-2-Clause"


def test_nwb_shapes_timestamps_and_events(corpus):
    out, card = corpus
    for s in card["subjects"]:
        base = _bids(out, s["subject"])
        d = _read_nwb(f"{base}_ieeg.nwb")
        n, c = d["raw"].shape
        assert c == s["n_electrodes"] and d["raw"].dtype == np.float32 and d["unit"] == "uV"
        # Per-sample float64 clock timestamps of Unix-epoch size for both, as in the public files.
        assert len(d["timestamps"]) == n and d["timestamps"].dtype == np.float64
        assert d["timestamps"][0] == simulate.START_CLOCK_S == d["audio_timestamps"][0] > 1e9
        np.testing.assert_array_equal(np.diff(d["timestamps"]), 1 / 1024)
        a_ts = d["audio_timestamps"]
        assert len(a_ts) == len(d["audio"]) and a_ts.dtype == np.float64
        assert (len(a_ts) - 1) / (a_ts[-1] - a_ts[0]) == pytest.approx(16000.0, abs=1e-3)
        assert len(d["audio"]) / 16000 == n / 1024 == pytest.approx(s["duration_s"])

        events = _tsv(f"{base}_events.tsv")
        onsets = np.array([float(r["onset"]) for r in events])
        ends = onsets + np.array([float(r["duration"]) for r in events])
        # fixation/word events tile the recording, alternating, starting and ending in fixation
        np.testing.assert_allclose(onsets[1:], ends[:-1], atol=2e-6)
        assert onsets[0] == 0 and ends[-1] == pytest.approx(n / 1024, abs=2e-6)
        assert [r["trial_type"] for r in events] == ["fixation", "word"] * s["n_trials"] + [
            "fixation"]
        # the audio is non-silent in every word event and exactly zero outside them
        t = np.arange(len(d["audio"])) / 16000
        in_word = np.zeros(len(t), dtype=bool)
        for r, a, b in zip(events, onsets, ends):
            if r["trial_type"] == "word":
                sel = (t >= a - 1e-6) & (t < b - 1e-6)
                in_word |= sel
                assert np.sqrt(np.mean(d["audio"][sel] ** 2)) > 0.01, r["utt_id"]
        assert not np.any(d["audio"][~in_word])
        assert {r["task"] for r in events if r["trial_type"] == "word"} == {"1", "2"}
        # Stimulus: the word at every iEEG sample of its event, "" elsewhere, on the iEEG clock.
        np.testing.assert_array_equal(d["stimulus_timestamps"], d["timestamps"])
        expect = np.full(n, "", dtype=object)
        for r in events:
            if r["trial_type"] == "word":
                a = round(float(r["onset"]) * 1024)
                expect[a: a + round(float(r["duration"]) * 1024)] = r["word"]
        assert d["stimulus"].tolist() == expect.tolist()


def test_channel_status_and_fractions(corpus):
    out, card = corpus
    for s in card["subjects"]:
        base = _bids(out, s["subject"])
        rows = _tsv(f"{base}_channels.tsv")
        c = len(rows)
        _, gt = read_ground_truth(out / "ground_truth" / f"sub-{s['subject']}.npz")
        bad = np.array([r["status"] == "bad" for r in rows])
        np.testing.assert_array_equal(bad, gt["bad"])
        assert bad.sum() == round(0.05 * c) and gt["unresponsive"].sum() == round(0.25 * c)
        assert not np.any(bad & gt["unresponsive"])
        assert {r["type"] for r in rows} == {"ECOG"} and {r["units"] for r in rows} == {"uV"}
        # unresponsive electrodes have no envelope; responsive ones do
        assert not np.any(gt["envelope"][:, gt["unresponsive"]])
        assert np.all(gt["envelope"][:, ~gt["unresponsive"]].max(axis=0) > 0)
        raw = _read_nwb(f"{base}_ieeg.nwb")["raw"]
        for e in np.flatnonzero(bad):
            if gt["bad_kind"][e] == "flat":
                assert not np.any(raw[:, e])
            else:
                assert raw[:, e].std() > 20 * np.median(raw[:, ~bad].std(axis=0))
        meta = json.loads(open(f"{base}_ieeg.json").read())
        assert (meta["SamplingFrequency"], meta["PowerLineFrequency"]) == (1024.0, 50.0)


def test_flinker_layout(corpus):
    """HB02.h5's layout: every task's train rows, then every task's test rows (the last
    flinker_test_per_task=10 of each task, here all but one of each 2-trial task), TestNum_cum of
    shape (1,) = the number of test rows, labels as bytes."""
    out, card = corpus
    for s in card["subjects"]:
        events = [r for r in _tsv(f"{_bids(out, s['subject'])}_events.tsv")
                  if r["trial_type"] == "word"]
        tasks = np.array([int(r["task"]) for r in events])
        test = np.zeros(len(events), dtype=bool)
        for k in (1, 2):
            idx = np.flatnonzero(tasks == k)
            test[idx[len(idx) - min(10, len(idx) - 1):]] = True
        rows = [*np.flatnonzero(~test), *np.flatnonzero(test)]
        with h5py.File(out / "flinker" / f"sub-{s['subject']}.h5", "r") as f:
            ecog = f["ecog_alldataset"][:]
            n_samples = round(s["duration_s"] * 1024)
            assert ecog.shape == (math.floor(n_samples * 125 / 1024), s["n_good"])
            assert ecog.dtype == np.float32 and np.all(np.isfinite(ecog))
            assert f["wave_re_alldataset"].shape == (round(s["duration_s"] * 16000), 1)
            assert f["label_alldataset"].dtype.kind == "S"
            labels = [x.decode() for x in f["label_alldataset"][:]]
            assert labels == [events[i]["word"] for i in rows]
            start, end = f["start_ind_re_valid_alldataset"][:], f["end_ind_re_valid_alldataset"][:]
            onsets = np.array([float(events[i]["onset"]) for i in rows])
            durations = np.array([float(events[i]["duration"]) for i in rows])
            np.testing.assert_allclose(start / 125, onsets, atol=0.5 / 125 + 1e-9)
            np.testing.assert_allclose(end / 125, onsets + durations, atol=0.5 / 125 + 1e-9)
            assert f["TestNum_cum"].shape == (1,) and f["TestNum_cum"][0] == test.sum() == 2
            assert np.any(np.diff(start) < 0)  # the test rows jump back in time
            assert (f.attrs["sfreq_ecog"], f.attrs["sfreq_audio"]) == (125.0, 16000.0)
            assert f.attrs["subject"] == s["subject"]


def _band_envelope(raw, fs):
    """|hilbert| of 70-170 Hz band-passed raw with 100/150 Hz notches, 10 ms means (scipy only)."""
    x = raw.astype(np.float64)
    x = scipy.signal.sosfiltfilt(scipy.signal.butter(4, (70, 170), "bandpass", fs=fs,
                                                     output="sos"), x, axis=0)
    for f0 in (100, 150):
        x = scipy.signal.sosfiltfilt(scipy.signal.butter(4, (f0 - 2, f0 + 2), "bandstop", fs=fs,
                                                         output="sos"), x, axis=0)
    return x, np.abs(scipy.signal.hilbert(x, axis=0))


def test_raw_high_gamma_follows_envelope_at_configured_snr(corpus):
    out, _ = corpus
    sub = "sim02"
    d = _read_nwb(f"{_bids(out, sub)}_ieeg.nwb")
    _, gt = read_ground_truth(out / "ground_truth" / f"sub-{sub}.npz")
    fs = 1024.0
    counted = ~gt["bad"] & ~gt["unresponsive"]
    band, env = _band_envelope(d["raw"], fs)

    # Hilbert envelope of the electrode with the most speech power, at the 100 Hz frame times, vs the truth.
    frame = np.rint(np.arange(gt["envelope"].shape[0]) / 100 * fs).astype(int)
    frame = frame[frame < len(env)]
    smooth = scipy.ndimage.uniform_filter1d(env, size=51, axis=0)[frame]  # 50 ms means
    power = np.where(counted, np.mean(gt["envelope"] ** 2, axis=0), 0.0)
    best = int(np.argmax(power))
    r_best = np.corrcoef(smooth[:, best], gt["envelope"][: len(frame), best])[0, 1]
    quiet = np.flatnonzero(gt["unresponsive"] & ~gt["bad"])[0]
    r_quiet = np.corrcoef(smooth[:, quiet], gt["envelope"][: len(frame), best])[0, 1]
    assert r_best > 0.35 and abs(r_quiet) < 0.15, (r_best, r_quiet)

    # SNR: band power during words minus the gap (background) power, over the background,
    # summed over good responsive electrodes; gaps exclude 0.3 s around words (the lead).
    t = np.arange(len(band)) / fs
    in_word = np.zeros(len(t), dtype=bool)
    near = np.zeros(len(t), dtype=bool)
    for a, dur in zip(gt["trial_onset_s"], gt["trial_duration_s"]):
        in_word |= (t >= a) & (t < a + dur)
        near |= (t >= a - 0.3) & (t < a + dur + 0.3)
    p_word = np.mean(band[in_word][:, counted] ** 2, axis=0)
    p_gap = np.mean(band[~near][:, counted] ** 2, axis=0)
    snr = 10 * np.log10(np.sum(p_word - p_gap) / np.sum(p_gap))
    assert snr == pytest.approx(-6.0, abs=1.5)


def test_ground_truth_model_reproduces_envelope(corpus):
    out, _ = corpus
    model, gt = read_ground_truth(out / "ground_truth" / "sub-sim01.npz")
    np.testing.assert_allclose(model.envelope(gt["mel"]), gt["envelope"], rtol=1e-5, atol=1e-5)
    # leads are drawn in [50, 200] ms, kernels sum to 1, tuning rows sum to 1 or 0
    assert np.all((model.lead_s >= 0.05) & (model.lead_s <= 0.2))
    np.testing.assert_allclose(model.temporal.sum(axis=1), 1.0)
    np.testing.assert_allclose(model.spectral.sum(axis=1), np.where(gt["unresponsive"], 0, 1))


def test_encoding_model_closed_form():
    # One electrode tuned to bin 40 only, no temporal smoothing, lead 50 ms: a mel step at frame
    # 100 must show in the neural envelope from frame 95 on, at g (sp(b (d - th)) - sp(-b th)) / b.
    temporal = np.zeros((1, 19))
    temporal[0, 9] = 1.0
    spectral = np.zeros((1, 80))
    spectral[0, 40] = 1.0
    model = EncodingModel(spectral, temporal, lead_s=np.array([0.05]), slope=np.array([4.0]),
                          threshold=np.array([0.5]), gain=np.array([3.0]))
    mel = np.full((80, 200), melmod.MEL_FLOOR)
    mel[40, 100:] = melmod.MEL_FLOOR + 1.5
    env = model.envelope(mel)[:, 0]
    sp = lambda x: math.log1p(math.exp(x))  # noqa: E731
    expected = 3.0 * (sp(4.0 * (1.5 - 0.5)) - sp(-4.0 * 0.5)) / 4.0
    assert np.all(env[:95] == 0)
    np.testing.assert_allclose(env[95:195], expected, rtol=1e-12)
    assert np.all(env[195:] == 0)  # r(t + lead) past the last frame is 0


def test_deal_utterances_each_prompt_once():
    utts = [Utterance(f"x/{i:03d}", np.zeros(160, np.float32), "w", "s", "x") for i in range(11)]
    dealt = simulate.deal_utterances(utts[::-1], 3, seed=5)
    ids = sorted(u.utt_id for part in dealt for u in part)
    assert ids == [u.utt_id for u in utts]
    assert sorted(len(p) for p in dealt) == [3, 4, 4]
    again = simulate.deal_utterances(utts, 3, seed=5)
    other = simulate.deal_utterances(utts, 3, seed=6)
    assert [[u.utt_id for u in p] for p in dealt] == [[u.utt_id for u in p] for p in again]
    assert [[u.utt_id for u in p] for p in dealt] != [[u.utt_id for u in p] for p in other]


def test_rebuild_is_identical(corpus, utterances, tmp_path):
    out, _ = corpus
    build_corpus(CorpusConfig(**{**TINY, "formats": ["flinker"]}), tmp_path, utterances=utterances,
                 progress=False)
    for sub in ("sim01", "sim02"):
        with np.load(out / "ground_truth" / f"sub-{sub}.npz") as a, \
             np.load(tmp_path / "ground_truth" / f"sub-{sub}.npz") as b:
            assert a.files == b.files
            for k in a.files:
                np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        with h5py.File(out / "flinker" / f"sub-{sub}.h5") as a, \
             h5py.File(tmp_path / "flinker" / f"sub-{sub}.h5") as b:
            np.testing.assert_array_equal(a["ecog_alldataset"][:], b["ecog_alldataset"][:])
            np.testing.assert_array_equal(a["wave_re_alldataset"][:], b["wave_re_alldataset"][:])
    # a different seed gives a different subject
    sims = [simulate.simulate_subject(utterances[:1], CorpusConfig(**{**TINY, "n_tasks": 1,
                                                                      "seed": seed}), 0)
            for seed in (0, 1)]
    assert sims[0].raw.shape != sims[1].raw.shape or not np.array_equal(sims[0].raw, sims[1].raw)


@pytest.mark.parametrize("override, match", [
    ({"unresponsive_fraction": 0.8, "bad_fraction": 0.3}, "exceeds 1"),
    ({"source": "librispeech"}, "source='librispeech' is not allowed"),
    ({"formats": ["edf"]}, r"formats\[0\]='edf' is not allowed"),
    ({"electrodes_min": 64, "electrodes_max": 32}, "electrodes_max=32 is out of range"),
    ({"sfreq": 250.0}, "sfreq=250.0 is out of range"),
])
def test_config_validation(override, match):
    with pytest.raises(ConfigError, match=match):
        CorpusConfig(**override)


def test_too_few_prompts_for_tasks(utterances):
    with pytest.raises(ConfigError, match="subject sim01 has 2 prompt"):
        simulate.simulate_subject(utterances[:2], CorpusConfig(**{**TINY, "n_tasks": 3}), 0)


def test_extra_voice_subject(tmp_path, utterances):
    """An extra subject speaks a Debian voice of its own (the cross-speaker subject)."""
    cfg = CorpusConfig(**{**TINY, "n_subjects": 1, "extra_voices": ["asterisk-fr"],
                          "extra_voice_utterances": 4, "formats": ["nwb"]})
    card = build_corpus(cfg, tmp_path, utterances=utterances[:4], progress=False)
    assert [s["subject"] for s in card["subjects"]] == ["sim01", "sim02"]
    assert card["subjects"][0]["voice"] != ["asterisk:june"]
    assert card["subjects"][1]["voice"] == ["asterisk:june"]
    assert card["subjects"][1]["language"] == ["fr-CA"]
    events = _tsv(str(_bids(tmp_path, "sim02")) + "_events.tsv")
    ids = [e["utt_id"] for e in events if e["trial_type"] == "word"]
    assert ids == [u.utt_id for u in simulate.extra_voice_utterances("asterisk-fr", 4, cfg.seed)]
    assert all(i.startswith("asterisk-fr/") for i in ids)
    assert len(_tsv(tmp_path / "bids" / "participants.tsv")) == 2
