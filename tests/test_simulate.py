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
from ssip.data.simulate import CorpusConfig, EncodingModel, build_corpus, read_ground_truth
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


# --- family mixed (the second, independent brain), phrases, and the default family unchanged ---

SMALL = dict(n_subjects=1, electrodes_min=32, electrodes_max=32, source="pocketsphinx",
             extra_voices=[], n_tasks=2, gap_s_min=2.0, gap_s_max=3.0)  # long gaps: silence


@pytest.fixture(scope="module")
def pair(utterances):
    """The same 6 prompts spoken by a spectral-family and a mixed-family subject."""
    return {fam: simulate.simulate_subject(utterances[:6], CorpusConfig(**SMALL, family=fam), 0)
            for fam in ("spectral", "mixed")}


def _frames_in(sim, pad_s=0.0):
    t = np.arange(sim.envelope.shape[0]) / melmod.FRAME_RATE
    sel = np.zeros(len(t), dtype=bool)
    for tr in sim.trials:
        sel |= (t >= tr.onset_s - pad_s) & (t < tr.onset_s + tr.duration_s + pad_s)
    return sel


def _silence_hg_correlation(sim):
    """Mean pairwise correlation across good electrodes of the high-gamma envelope (ssip's own
    extraction, 0.25 s means) in silence at least 0.5 s from any trial."""
    from ssip.data.highgamma import high_gamma

    hg = high_gamma(sim.raw, sim.sfreq, line_freq=sim.line_freq)[:, sim.good]
    n = min(len(hg), sim.envelope.shape[0])
    quiet = ~_frames_in(sim, pad_s=0.5)[:n]
    smooth = scipy.ndimage.uniform_filter1d(hg[:n], 25, axis=0)[quiet][::12]
    c = np.corrcoef(smooth.T)
    return float(c[np.triu_indices(len(c), 1)].mean()), len(smooth)


def test_mixed_noise_is_shared_across_electrodes_after_high_gamma(pair):
    r_mixed, n = _silence_hg_correlation(pair["mixed"])
    r_spectral, _ = _silence_hg_correlation(pair["spectral"])
    assert n >= 40
    assert r_mixed > 0.3 and abs(r_spectral) < 0.08, (r_mixed, r_spectral)
    # the raw drift is low-rank: the subject's 3 slow factors explain much of the slow (< 2 Hz)
    # raw signal of every good electrode; the same regression explains ~nothing of a spectral
    # subject (same timeline length), whose slow activity is independent per electrode
    factors = pair["mixed"].shared.factors.astype(np.float64)
    design = np.c_[factors, np.ones(len(factors))]

    def explained(sim):
        x = scipy.signal.sosfiltfilt(scipy.signal.butter(2, 2.0, "lowpass", fs=sim.sfreq,
                                                         output="sos"),
                                     sim.raw[:, sim.good].astype(np.float64), axis=0)
        x = x[np.minimum(np.rint(np.arange(len(factors)) / 100 * sim.sfreq).astype(int),
                         len(x) - 1)]
        res = x - design @ np.linalg.lstsq(design, x, rcond=None)[0]
        return 1 - np.sum(res**2) / np.sum((x - x.mean(axis=0)) ** 2)

    assert explained(pair["mixed"]) > 0.3 > 0.1 > explained(pair["spectral"]), (
        explained(pair["mixed"]), explained(pair["spectral"]))


def test_mixed_snr_at_configured_level_with_shared_noise(pair):
    """Word minus gap band power over gap power (the gap holds the own and the shared
    background) matches snr_db, as in the spectral family's test."""
    sim = pair["mixed"]
    counted = ~sim.bad & ~sim.unresponsive
    band, _ = _band_envelope(sim.raw, sim.sfreq)
    t = np.arange(len(band)) / sim.sfreq
    in_word = np.zeros(len(t), dtype=bool)
    near = np.zeros(len(t), dtype=bool)
    for tr in sim.trials:
        in_word |= (t >= tr.onset_s) & (t < tr.onset_s + tr.duration_s)
        near |= (t >= tr.onset_s - 0.4) & (t < tr.onset_s + tr.duration_s + 0.4)
    p_word = np.mean(band[in_word][:, counted] ** 2, axis=0)
    p_gap = np.mean(band[~near][:, counted] ** 2, axis=0)
    snr = 10 * np.log10(np.sum(p_word - p_gap) / np.sum(p_gap))
    # The shared slow state is common to all electrodes, so the gaps estimate the background
    # during the words less well than independent noise would (no averaging over electrodes).
    assert snr == pytest.approx(-6.0, abs=2.0)
    # gap power over the own background: (1 + 0.5) times the spectral subject's (whose ratio
    # holds the filters' losses: band edges, notches)
    ratio = np.sum(p_gap) / np.sum(sim.background_band_rms[counted] ** 2)
    ref = pair["spectral"]
    ref_counted = ~ref.bad & ~ref.unresponsive
    ref_band, _ = _band_envelope(ref.raw, ref.sfreq)
    ref_ratio = (np.sum(np.mean(ref_band[~near][:, ref_counted] ** 2, axis=0))
                 / np.sum(ref.background_band_rms[ref_counted] ** 2))
    assert ratio / ref_ratio == pytest.approx(1.5, rel=0.2), (ratio, ref_ratio)


def test_mixed_onset_electrodes_peak_at_word_onsets(pair):
    """Onset electrodes peak within a few frames after (acoustic onset - lead) and are nearly
    silent in sustained speech; the spectral family's electrodes are not."""
    def stats(sim, electrodes):
        loud = (sim.mel.astype(np.float64) - melmod.MEL_FLOOR).mean(axis=0)
        delays, ratios = [], []
        for tr in sim.trials:
            f0 = int(round(tr.onset_s * 100))
            f1 = int(round((tr.onset_s + tr.duration_s) * 100))
            on = f0 + int(np.flatnonzero(loud[f0:f1] > 0.6 * np.percentile(loud[f0:f1], 95))[0])
            for e in electrodes:
                lead = int(round(sim.model.lead_s[e] * 100))
                a = sim.envelope[:, e].astype(np.float64)
                lo = max(0, f0 - 60)
                delays.append(lo + int(np.argmax(a[lo: f1])) - (on - lead))
                ratios.append(a[on - lead + 40: f1 - lead].mean() / a[lo: f1].max())
        return np.array(delays), np.array(ratios)

    mixed = pair["mixed"]
    onset = np.flatnonzero((mixed.model.kind == "onset") & ~mixed.unresponsive)
    assert len(onset) == round(0.3 * (~mixed.unresponsive).sum())
    delays, ratios = stats(mixed, onset)
    assert np.mean((delays >= -3) & (delays <= 25)) > 0.75, delays
    assert 0 <= np.median(delays) <= 20
    assert np.median(ratios) < 0.15, ratios
    spectral = pair["spectral"]
    _, ratios_spectral = stats(spectral, np.flatnonzero(~spectral.unresponsive))
    assert np.median(ratios_spectral) > 2 * np.median(ratios)


def test_mixed_onset_closed_form():
    """A loudness step of height H in every bin (threshold 0, no smoothing, lead 50 ms): the
    onset electrode's envelope is g H (1 - alpha)^k, k frames after the step (from frame 95)."""
    temporal = np.zeros((1, 19))
    temporal[0, 9] = 1.0
    model = simulate.MixedEncodingModel(
        np.full((1, 80), 1 / 80), temporal, lead_s=np.array([0.05]), slope=np.array([1.0]),
        threshold=np.array([0.0]), gain=np.array([2.0]), kind=np.array(["onset"]),
        projection=np.zeros((6, 80)), weights=np.zeros((1, 6)), adapt_tau=np.array([20.0]))
    mel = np.full((80, 200), melmod.MEL_FLOOR)
    mel[:, 100:] += 1.5
    env = model.envelope(mel)[:, 0]
    alpha = 1 - math.exp(-1 / 20)
    assert np.all(env[:95] == 0)
    np.testing.assert_allclose(env[95:195], 2.0 * 1.5 * (1 - alpha) ** np.arange(100),
                               rtol=1e-9, atol=1e-12)


def test_mixed_gain_spread_and_leads(pair, utterances):
    """Per-electrode SNR (true envelope in words over the background) spreads by several dB,
    set by gain_log_sd; leads reach 250 ms and more (U(50, 300) ms)."""
    def snr_db(sim):
        counted = ~sim.bad & ~sim.unresponsive
        p = np.mean(sim.envelope[_frames_in(sim)][:, counted].astype(np.float64) ** 2, axis=0)
        return 10 * np.log10(p / (1.5 * sim.background_band_rms[counted] ** 2))

    spread = snr_db(pair["mixed"]).std()
    flat = simulate.simulate_subject(utterances[:6],
                                     CorpusConfig(**SMALL, family="mixed", gain_log_sd=0.0), 0)
    assert spread > 3.5 and snr_db(flat).std() < 2.5, (spread, snr_db(flat).std())
    lead = pair["mixed"].model.lead_s
    assert lead.max() >= 0.25 and np.all((lead >= 0.05) & (lead <= 0.3))
    assert pair["spectral"].model.lead_s.max() <= 0.2
    assert CorpusConfig(family="mixed").lead_ms_upper == 300.0
    assert CorpusConfig(family="mixed", lead_ms_max=150.0).lead_ms_upper == 150.0


def test_mixed_corpus_ground_truth_reproduces_envelope(tmp_path, utterances):
    cfg = CorpusConfig(**{**TINY, "family": "mixed", "formats": ["flinker"]})
    card = build_corpus(cfg, tmp_path, utterances=utterances, progress=False)
    for s in card["subjects"]:
        assert f"ground_truth/sub-{s['subject']}_mixed.npz" in s["files"]
        kinds = s["electrode_kinds"]
        assert kinds["none"] == round(0.25 * s["n_electrodes"]) and min(kinds.values()) > 0
        model, gt = simulate.read_mixed_ground_truth(tmp_path / "ground_truth" /
                                                     f"sub-{s['subject']}.npz")
        np.testing.assert_allclose(model.envelope(gt["mel"]), gt["envelope"], rtol=1e-4,
                                   atol=1e-4)
        assert gt["factors"].shape == (gt["envelope"].shape[0], 3)
        np.testing.assert_allclose(gt["hg_loadings"].sum(axis=1), 1.0)
        # the spectral reader still reads the common file (its keys are unchanged)
        base, _ = read_ground_truth(tmp_path / "ground_truth" / f"sub-{s['subject']}.npz")
        assert base.n_electrodes == s["n_electrodes"]
    assert "family mixed" in card["encoding_model"]


def test_phrases(tmp_path, utterances):
    """phrase_fraction: trials of 2-4 consecutive prompts, one events row each, utt_ids joined
    by '+', pauses of 50-150 ms between the prompts; every prompt still spoken exactly once."""
    cfg = CorpusConfig(**{**TINY, "phrase_fraction": 0.7, "formats": ["nwb"]})
    card = build_corpus(cfg, tmp_path, utterances=utterances, progress=False)
    by_id = {u.utt_id: u for u in utterances}
    spoken, n_phrases = [], 0
    for s in card["subjects"]:
        events = [r for r in _tsv(f"{_bids(tmp_path, s['subject'])}_events.tsv")
                  if r["trial_type"] == "word"]
        _, gt = read_ground_truth(tmp_path / "ground_truth" / f"sub-{s['subject']}.npz")
        assert [r["utt_id"] for r in events] == gt["utt_id"].tolist()
        assert s["n_phrases"] == sum("+" in r["utt_id"] for r in events)
        for r in events:
            parts = r["utt_id"].split(simulate.PHRASE_JOIN)
            spoken += parts
            assert r["word"] == " ".join(by_id[p].transcript for p in parts)
            if len(parts) > 1:
                n_phrases += 1
                assert 2 <= len(parts) <= 4
                speech = sum(len(by_id[p].audio) for p in parts) / 16000
                pause = (float(r["duration"]) - speech) / (len(parts) - 1)
                assert 0.045 <= pause <= 0.165, pause
    assert n_phrases >= 1
    assert sorted(spoken) == [u.utt_id for u in utterances[:8]]


def test_phrases_keep_the_subjects_electrodes(utterances):
    """The grouping has its own stream: the same electrodes, leads and tuning with or without
    phrases (only kappa, set on the new timeline, may move)."""
    cfg = CorpusConfig(**{**TINY, "n_tasks": 1})
    one = simulate.simulate_subject(utterances[:6], cfg, 0)
    grouped = simulate.simulate_subject(utterances[:6], CorpusConfig(**{**TINY, "n_tasks": 1,
                                                                        "phrase_fraction": 1.0}), 0)
    assert len(grouped.trials) < len(one.trials) == 6
    np.testing.assert_array_equal(one.bad, grouped.bad)
    np.testing.assert_array_equal(one.model.lead_s, grouped.model.lead_s)
    np.testing.assert_array_equal(one.model.spectral, grouped.model.spectral)
    np.testing.assert_array_equal(one.background_band_rms, grouped.background_band_rms)


def test_default_family_unchanged(utterances):
    """Numbers stored from the simulator before the mixed family existed (seed 7, 16 electrodes,
    2 prompts): the default family draws and renders exactly as it did; family/phrase_fraction
    set to their defaults explicitly change nothing."""
    kw = {**TINY, "n_tasks": 1, "seed": 7, "electrodes_min": 16, "electrodes_max": 16}
    sim = simulate.simulate_subject(utterances[:2], CorpusConfig(**kw), 0)
    assert sim.raw.shape == (6912, 16) and sim.family == "spectral" and sim.shared is None
    assert float(sim.raw.astype(np.float64).std()) == pytest.approx(498.66130818410664, rel=1e-6)
    assert sim.scale == pytest.approx(1.97928857559376, rel=1e-9)
    np.testing.assert_allclose(sim.model.lead_s[:3],
                               [0.16417761815622253, 0.05183010932680286, 0.14195616948323117],
                               rtol=1e-12)
    np.testing.assert_allclose(sim.raw[1000, :4], [-33.3433723449707, -1.861910343170166,
                                                   90.856689453125, -63.34736251831055], rtol=1e-5)
    assert float(np.abs(sim.envelope).sum()) == pytest.approx(2667.743896484375, rel=1e-5)
    same = simulate.simulate_subject(utterances[:2], CorpusConfig(
        **kw, family="spectral", phrase_fraction=0.0, lead_ms_max=200.0), 0)
    np.testing.assert_array_equal(sim.raw, same.raw)
    np.testing.assert_array_equal(sim.envelope, same.envelope)


@pytest.mark.parametrize("override, match", [
    ({"family": "onset"}, "family='onset' is not allowed"),
    ({"phrase_fraction": 1.5}, "phrase_fraction=1.5 is out of range"),
    ({"family": "mixed", "lead_ms_min": 400.0}, "lead_ms_max=300.0 is out of range"),
])
def test_family_config_validation(override, match):
    with pytest.raises(ConfigError, match=match):
        CorpusConfig(**override)
