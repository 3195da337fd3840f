"""BIDS-iEEG through MNE-BIDS: simulate -> BIDS (BrainVision, EDF) -> ingest round trips against the
NWB path, real ECoG from py-neuromodulation, re-referencing against closed forms, and every class
of bad input giving its named error and quarantine row while the rest lands (on a real Ray head).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from ssip import storage
from ssip.data.bids import BidsConfig, find_recordings, read_bids, read_bids_signal
from ssip.data.ingest import IngestConfig, process_recording
from ssip.data.readers import RecordingError, read_nwb
from ssip.data.reference import bipolar_pairs, rereference, split_contact
from tests.test_ingest import MIN_ENVELOPE_R_NWB, _envelope_r, _truth

# BrainVision stores float32 µV: the features of the two paths agree to float32 rounding.
BV_NWB_FEATURE_ATOL = 1e-4
# EDF stores 16 bits over a range that MNE's exporter shares across channels of one type (here set
# by a noisy bad channel at 2 mV): the quantisation noise moves z-scored features by up to 0.1,
# but the envelope the features recover is the same (measured: see the test's print).
EDF_NWB_ENVELOPE_R_TOL = 2e-3


def _build(out: Path, **kw) -> Path:
    from ssip.data.simulate import CorpusConfig, build_corpus

    cfg = CorpusConfig(n_subjects=1, electrodes_min=32, electrodes_max=36, max_utterances=24,
                       seed=3, extra_voices=[], snr_db=10.0, **kw)
    build_corpus(cfg, out, progress=False)
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """One simulated subject as iBIDS NWB and as BIDS-iEEG BrainVision (per-run WAV)."""
    return _build(tmp_path_factory.mktemp("bids-corpus"), formats=["nwb", "brainvision"])


def _nwb(corpus: Path) -> Path:
    return next(corpus.glob("bids/sub-sim01/ieeg/*_ieeg.nwb"))


def _bv(corpus: Path) -> str:
    (path,) = find_recordings(corpus / "bids-brainvision", BidsConfig())
    return path


def _max_diff(a, b, key: str) -> float:
    assert [r["trial_id"].split("/")[-1] for r in a.rows] == [r["trial_id"].split("/")[-1] for r in b.rows]
    return max(float(np.abs(x[key] - y[key]).max()) for x, y in zip(a.rows, b.rows, strict=True))


def test_bids_round_trip_recovers_envelope_as_well_as_nwb(corpus):
    rec = read_bids(_bv(corpus))
    assert rec.source_format == "bids.vhdr" and rec.line_freq == 50.0 and len(rec.trials) == 24
    res = process_recording(rec, IngestConfig())
    nwb = process_recording(read_nwb(_nwb(corpus)), IngestConfig())
    truth = _truth(corpus, "sim01")
    r_bids, r_nwb = _envelope_r(res, truth), _envelope_r(nwb, truth)
    print(f"envelope correlation: BIDS BrainVision {r_bids:.4f}, NWB {r_nwb:.4f}")
    assert r_bids > MIN_ENVELOPE_R_NWB
    assert abs(r_bids - r_nwb) < 1e-3
    # Bad channels from channels.tsv are dropped and listed; the sidecars reach the metadata.
    bad = [str(n) for n, b in zip(truth["channel_names"], truth["bad"], strict=True) if b]
    assert bad and res.metadata["bad_channels"] == bad
    assert not set(bad) & set(res.metadata["channels"])
    src = res.metadata["source"]
    assert src["bids"]["subject"] == "sim01" and src["bids"]["task"] == "wordProduction"
    assert src["audio"]["source"] == "file" and src["audio"]["transcript_column"] == "word"
    assert [r["utt_id"] for r in res.rows] == [r["utt_id"] for r in nwb.rows]
    assert all(r["transcript"] for r in res.rows)


@pytest.mark.parametrize("reference", ["none", "average"])
def test_bids_and_nwb_give_the_same_features(corpus, reference):
    cfg = IngestConfig(reference=reference)
    a = process_recording(read_bids(_bv(corpus)), cfg)
    b = process_recording(read_nwb(_nwb(corpus)), cfg)
    assert a.metadata["channels"] == b.metadata["channels"]
    assert a.metadata["reference"] == b.metadata["reference"]
    d_neural, d_mel = _max_diff(a, b, "neural"), _max_diff(a, b, "mel")
    print(f"reference={reference}: BIDS vs NWB max |diff| neural {d_neural:.2e}, mel {d_mel:.2e}")
    assert d_neural < BV_NWB_FEATURE_ATOL and d_mel < 1e-6
    if reference == "average":  # and the reference changed the features
        c = process_recording(read_nwb(_nwb(corpus)), IngestConfig())
        assert _max_diff(a, c, "neural") > 0.05


def test_edf_and_stim_file_layouts_match_nwb(corpus, tmp_path):
    """The same subject as EDF (16-bit) and with its audio as per-prompt stim files."""
    from ssip.data import formats
    from ssip.data.simulate import CorpusConfig, deal_utterances, simulate_subject
    from ssip.data.speech import read_source

    cfg = CorpusConfig(n_subjects=1, electrodes_min=32, electrodes_max=36, max_utterances=24,
                       seed=3, extra_voices=[], snr_db=10.0)
    utts = deal_utterances(read_source(cfg.source, limit=cfg.max_utterances), 1, cfg.seed)
    sim = simulate_subject(utts[0], cfg, 0)
    formats.write_bids_ieeg_subject(sim, tmp_path / "edf", fmt="EDF")
    formats.write_bids_ieeg_subject(sim, tmp_path / "stim", audio="stim_file")
    nwb = process_recording(read_nwb(_nwb(corpus)), IngestConfig())

    (edf_path,) = find_recordings(tmp_path / "edf", BidsConfig())
    assert edf_path.endswith("_ieeg.edf")
    edf = process_recording(read_bids(edf_path), IngestConfig())
    truth = _truth(corpus, "sim01")
    r_edf, r_nwb = _envelope_r(edf, truth), _envelope_r(nwb, truth)
    x = np.concatenate([r["neural"] for r in edf.rows])
    y = np.concatenate([r["neural"] for r in nwb.rows])
    r_feat = min(np.corrcoef(x[:, c], y[:, c])[0, 1] for c in range(x.shape[1]))
    print(f"EDF vs NWB: max |diff| neural {_max_diff(edf, nwb, 'neural'):.2e}, lowest per-channel "
          f"feature correlation {r_feat:.5f}; envelope r EDF {r_edf:.4f}, NWB {r_nwb:.4f}")
    assert abs(r_edf - r_nwb) < EDF_NWB_ENVELOPE_R_TOL and r_feat > 0.99

    (stim_path,) = find_recordings(tmp_path / "stim", BidsConfig())
    stim_rec = read_bids(stim_path)
    assert stim_rec.metadata["audio"]["source"] == "stim_file"
    stim = process_recording(stim_rec, IngestConfig())
    assert _max_diff(stim, nwb, "mel") < 1e-6 and _max_diff(stim, nwb, "audio") < 1e-6


# ---------------------------------------------------------------- re-referencing


def test_common_average_per_group_and_bipolar_against_closed_forms():
    rng = np.random.default_rng(0)
    names = ["LA1", "LA2", "LA3", "LA5", "LB1", "LB2", "G1", "G2", "G3", "X7"]
    types = ["seeg"] * 6 + ["ecog"] * 3 + ["ecog"]
    x = rng.standard_normal((500, len(names))).astype(np.float32) + rng.standard_normal((500, 1))
    assert split_contact("LA12") == ("LA", 12) and split_contact("G_3") == ("G", 3)
    assert split_contact("MIC") == ("MIC", None)

    car = rereference(x, 1000.0, names, types, "average")
    ref = x.astype(np.float64).copy()
    for cols in ([0, 1, 2, 3], [4, 5], [6, 7, 8]):
        ref[:, cols] -= x[:, cols].mean(axis=1, keepdims=True)
    np.testing.assert_allclose(car.signal, ref, atol=1e-5)  # X7 (alone) is kept as recorded
    assert car.info["kept_on_recording_reference"] == ["X7"]
    # Groups from electrodes.tsv override the names: one group of all sEEG contacts.
    car2 = rereference(x, 1000.0, names, types, "average", groups={n: "shaft" for n in names[:6]})
    np.testing.assert_allclose(car2.signal[:, :6], x[:, :6] - x[:, :6].mean(1, keepdims=True), atol=1e-5)

    assert bipolar_pairs(names, types) == [("LA1", "LA2"), ("LA2", "LA3"), ("LB1", "LB2")]
    bip = rereference(x, 1000.0, names, types, "bipolar")
    assert bip.names == ["LA1-LA2", "LA2-LA3", "LB1-LB2", "G1", "G2", "G3", "X7"]
    np.testing.assert_allclose(bip.signal[:, 0], x[:, 0] - x[:, 1], atol=1e-6)
    np.testing.assert_allclose(bip.signal[:, 2], x[:, 4] - x[:, 5], atol=1e-6)
    np.testing.assert_allclose(bip.signal[:, 3:], x[:, 6:], atol=1e-6)  # ECoG keeps its reference
    assert bip.info["unpaired"] == ["LA5"]  # LA4 is missing: LA3-LA5 are not neighbours


# ---------------------------------------------------------------- real ECoG (py-neuromodulation)


@pytest.fixture(scope="module")
def pynm() -> Path:
    from ssip.data.simulate import pyneuromodulation_recording

    return pyneuromodulation_recording()


def test_pyneuromodulation_recording_channels_and_sidecars(pynm):
    sig = read_bids_signal(pynm)
    ecog = [f"ECOG_RIGHT_{i}" for i in range(6)]
    assert sig.channel_names == ecog and set(sig.channel_types) == {"ecog"}
    assert sig.metadata["excluded_channels"] == {
        "LFP_RIGHT_0": "dbs", "LFP_RIGHT_1": "dbs", "LFP_RIGHT_2": "dbs", "MOV_RIGHT": "misc"}
    assert sig.line_freq == 60.0 and sig.metadata["line_freq_source"] == "sidecar"
    assert sig.sfreq == 1000.0 and sig.signal.shape == (19001, 6)
    pos = sig.metadata["electrodes"]["positions"]
    assert pos["ECOG_RIGHT_0"] == pytest.approx([0.037318174, -0.04861012664, 0.06179765474])
    assert pos["MOV_RIGHT"] is None
    # DBS contacts are kept only when asked for.
    assert len(read_bids_signal(pynm, BidsConfig(channel_types=["ecog", "dbs"])).channel_names) == 9
    # The recording has no events.tsv: ingest says where it looked.
    with pytest.raises(RecordingError, match=r"field 'events.tsv'.*missing.*_run-0_events.tsv"):
        read_bids(pynm)


def test_pyneuromodulation_ingests_with_trials_and_honours_bad_and_line(pynm, tmp_path, speech_clips):
    """A copy of the real recording with speech events, a per-run WAV and ECOG_RIGHT_2 marked bad:
    ingest keeps 5 ECoG channels, and its features are the one high-gamma definition at 60 Hz."""
    from ssip.data.highgamma import high_gamma

    root = tmp_path / "pynm"
    shutil.copytree(pynm.parents[3], root)
    ieeg = next(root.glob("sub-*/ses-*/ieeg"))
    chan = next(ieeg.glob("*_channels.tsv"))
    text = chan.read_text(encoding="utf-8-sig").splitlines()
    text = [line.replace("\tgood\t", "\tbad\t") if line.startswith("ECOG_RIGHT_2\t") else line
            for line in text]
    chan.write_text("\n".join(text) + "\n")
    stem = pynm.name.removesuffix("_ieeg.vhdr")
    audio = np.zeros(19 * 16000, np.float32)
    rows = []
    for k, onset in enumerate([1.0, 6.0, 11.0]):
        clip = speech_clips[0][: 3 * 16000]
        audio[int(onset * 16000): int(onset * 16000) + len(clip)] = clip
        rows.append(f"{onset}\t3.0\tword\tclip {k}")
    (ieeg / f"{stem}_events.tsv").write_text("onset\tduration\ttrial_type\ttranscript\n"
                                             + "\n".join(rows) + "\n")
    sf.write(ieeg / f"{stem}_audio.wav", audio, 16000)

    rec = read_bids(ieeg / pynm.name)
    assert rec.bad_channels == ["ECOG_RIGHT_2"] and rec.line_freq == 60.0
    res = process_recording(rec, IngestConfig(val_fraction=0.0, test_fraction=0.0))
    kept = ["ECOG_RIGHT_0", "ECOG_RIGHT_1", "ECOG_RIGHT_3", "ECOG_RIGHT_4", "ECOG_RIGHT_5"]
    assert res.metadata["channels"] == kept and res.metadata["bad_channels"] == ["ECOG_RIGHT_2"]
    assert res.metadata["line_freq"] == 60.0 and len(res.rows) == 3
    assert [r["transcript"] for r in res.rows] == ["clip 0", "clip 1", "clip 2"]
    # The features are high_gamma of the µV signal with notches at 60 Hz harmonics (120 Hz).
    import mne

    raw = mne.io.read_raw_brainvision(ieeg / pynm.name, verbose="error")
    x = raw.get_data(picks=kept).T * 1e6
    feats = high_gamma(x.astype(np.float32), 1000.0, line_freq=60.0)
    f0 = [int(round(r["onset_s"] * 100)) for r in res.rows]
    ref = np.concatenate([feats[a: a + r["n_frames"]] for a, r in zip(f0, res.rows, strict=True)])
    ref = (ref - ref.mean(0)) / ref.std(0)
    got = np.concatenate([r["neural"] for r in res.rows])
    np.testing.assert_allclose(got, ref, atol=2e-3)
    wrong = high_gamma(x.astype(np.float32), 1000.0, line_freq=50.0)  # the 50 Hz notches differ
    w = np.concatenate([wrong[a: a + r["n_frames"]] for a, r in zip(f0, res.rows, strict=True)])
    assert np.abs(got - (w - w.mean(0)) / w.std(0)).max() > 10 * np.abs(got - ref).max()


def test_simulator_uses_real_ecog_as_background(pynm, tmp_path):
    from ssip.data.simulate import (
        CorpusConfig,
        _band_power,
        deal_utterances,
        load_background,
        simulate_subject,
    )
    from ssip.data.speech import read_source

    cfg = CorpusConfig(n_subjects=1, electrodes_min=8, electrodes_max=8, source="pocketsphinx",
                       extra_voices=[], unresponsive_fraction=0.5, bad_fraction=0.0, n_tasks=2,
                       background="pyneuromodulation")
    utts = deal_utterances(read_source("pocketsphinx"), 1, 0)[0]
    real = load_background("pyneuromodulation")
    assert real.channels[0] == "ECOG_RIGHT_0" and real.line_freq == 60.0
    sim = simulate_subject(utts, cfg, 0, background=real)
    sim_synth = simulate_subject(utts, CorpusConfig(**{**cfg.__dict__, "background": "simulated"}), 0)
    assert sim.line_freq == 60.0 and sim_synth.line_freq == 50.0
    import scipy.signal

    def log_psd(x, fs):  # 1 Hz bins (nperseg = fs), 2-300 Hz: the same grid at 1000 and 1024 Hz
        f, p = scipy.signal.welch(x, fs=fs, nperseg=int(fs))
        return np.log(p[(f >= 2) & (f <= 300)])

    real_psd = {c: log_psd(real.signal[:, c], real.sfreq) for c in range(6)}
    for e in np.flatnonzero(sim.unresponsive):  # background only
        x = sim.raw[:, e]
        # Scaled like the simulated background: the same 70-170 Hz RMS.
        assert np.sqrt(_band_power(x, sim.sfreq, (70.0, 170.0))) == pytest.approx(
            sim.background_band_rms[e], rel=0.02)
        # The spectrum is the real channel's, not the 1/f^chi of the synthetic one.
        mine = log_psd(x, sim.sfreq)
        r_real = np.corrcoef(mine - mine.mean(), real_psd[e % 6] - real_psd[e % 6].mean())[0, 1]
        synth = log_psd(sim_synth.raw[:, e], sim.sfreq)
        r_synth = np.corrcoef(synth, real_psd[e % 6])[0, 1]
        assert r_real > 0.95 and r_real > r_synth + 0.02, (e, r_real, r_synth)

    # The files declare the real recording's mains, so ingest notches its harmonics.
    from ssip.data import formats

    formats.write_bids_ieeg_subject(sim, tmp_path)
    meta = json.loads(next(tmp_path.glob("sub-*/ieeg/*_ieeg.json")).read_text())
    assert meta["PowerLineFrequency"] == 60.0


# ---------------------------------------------------------------- bad input


def _write_run(root: Path, run: str, *, sfreq: float = 1000.0, seconds: float = 20.0,
               audio: str = "file", events: list[list] | None = None,
               columns: tuple[str, ...] = ("onset", "duration", "trial_type", "word"),
               clip: np.ndarray | None = None) -> Path:
    """A small BIDS-iEEG run (4 ECoG contacts of noise, optionally an AUDIO channel) via MNE-BIDS."""
    import warnings

    import mne
    from mne_bids import BIDSPath, write_raw_bids

    n = int(sfreq * seconds)
    rng = np.random.default_rng(len(run))
    names, types = ["G1", "G2", "G3", "G4"], ["ecog"] * 4
    data = rng.standard_normal((4, n)) * 20e-6
    if audio == "channel":
        names.append("MIC")
        types.append("misc")
        mic = np.zeros(n)
        mic[: n // 2] = rng.standard_normal(n // 2) * 0.1
        mic[n // 2:] = np.nan  # the microphone input stopped half way
        data = np.vstack([data, mic])
    info = mne.create_info(names, sfreq, types)
    info["line_freq"] = 50.0
    raw = mne.io.RawArray(data, info, verbose="error")
    bp = BIDSPath(subject="01", task="speech", run=run, datatype="ieeg", root=root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_raw_bids(raw, bp, format="BrainVision", allow_preload=True, overwrite=True,
                       verbose="error")
    ieeg = root / "sub-01" / "ieeg"
    stem = f"sub-01_task-speech_run-{run}"
    if audio == "channel":  # declare the microphone as BIDS type AUDIO
        chan = ieeg / f"{stem}_channels.tsv"
        chan.write_text(chan.read_text().replace("MIC\tMISC", "MIC\tAUDIO"))
    if audio == "file":
        track = np.zeros(int(16000 * seconds), np.float32)
        for ev in events or []:
            s = int(float(ev[0]) * 16000)
            track[s: s + len(clip)] = clip[: max(0, len(track) - s)]
        sf.write(ieeg / f"{stem}_audio.wav", track, 16000)
    if events is not None:
        lines = ["\t".join(columns)] + ["\t".join(str(v) for v in ev) for ev in events]
        (ieeg / f"{stem}_events.tsv").write_text("\n".join(lines) + "\n")
    return ieeg / f"{stem}_ieeg.vhdr"


@pytest.fixture(scope="module")
def bad_dataset(tmp_path_factory, speech_clips) -> Path:
    root = tmp_path_factory.mktemp("bad-bids")
    clip = speech_clips[0][: 2 * 16000]
    ok = [[1.0, 2.0, "word", "one"], [5.0, 2.0, "word", "two"], [9.0, 2.0, "word", "three"],
          [13.0, 2.0, "word", "four"], [19.5, 2.0, "word", "past the end"]]
    _write_run(root, "1", events=ok, clip=clip)                          # good; last trial outside
    _write_run(root, "2", events=None, clip=clip)                        # no events.tsv
    _write_run(root, "3", events=[r[:3] for r in ok], clip=clip,
               columns=("onset", "duration", "trial_type"))              # no transcript column
    chan = _write_run(root, "4", events=ok[:4], clip=clip)               # channels.tsv disagrees
    tsv = chan.with_name(chan.name.replace("_ieeg.vhdr", "_channels.tsv"))
    tsv.write_text(tsv.read_text().replace("G4\t", "G9\t"))
    _write_run(root, "5", sfreq=250.0, events=ok[:4], clip=clip)         # too slow for high gamma
    _write_run(root, "6", audio="channel", events=ok[:4], clip=clip)     # audio channel too short
    stim = _write_run(root, "7", audio="none", events=[[*r, f"w{i}.wav"] for i, r in enumerate(ok[:4])],
                      columns=("onset", "duration", "trial_type", "word", "stim_file"))
    (root / "stimuli").mkdir()
    for i in (0, 1, 3):  # w2.wav does not exist
        sf.write(root / "stimuli" / f"w{i}.wav", clip, 16000)
    assert stim.exists()
    return root


def test_each_bad_input_is_named(bad_dataset):
    runs = {Path(p).name.split("_run-")[1].split("_")[0]: p for p in
            find_recordings(bad_dataset, BidsConfig())}
    assert sorted(runs) == ["1", "2", "3", "4", "5", "6", "7"]
    with pytest.raises(RecordingError, match=r"field 'events.tsv'.*missing.*run-2_events.tsv"):
        read_bids(runs["2"])
    with pytest.raises(RecordingError, match=r"no transcript column \(looked for \['transcript', 'word'"):
        read_bids(runs["3"])
    with pytest.raises(RecordingError, match=r"field 'sentence'.*lacks column\(s\) \['sentence'\]"):
        read_bids(runs["1"], BidsConfig(transcript_column="sentence"))
    with pytest.raises(RecordingError, match=r"channels.tsv.*in the recording only \['G4'\], in channels.tsv only \['G9'\]"):
        read_bids(runs["4"])
    with pytest.raises(RecordingError, match=r"field 'sfreq'.*250.0 Hz is too low"):
        process_recording(read_bids(runs["5"]), IngestConfig())
    rec6 = read_bids(runs["6"])
    assert rec6.metadata["audio"]["source"] == "channel" and rec6.metadata["audio"]["channel"] == "MIC"
    assert "MIC" not in rec6.channel_names
    with pytest.raises(RecordingError, match=r"field 'audio'.*audio channel 'MIC' ends at 10.00 s but neural at 20.00 s"):
        process_recording(rec6, IngestConfig())
    with pytest.raises(RecordingError, match=r"field 'audio_file'.*run-7_audio.wav does not exist"):
        read_bids(runs["7"], BidsConfig(audio="file"))
    with pytest.raises(RecordingError, match=r"no speech audio found.*no 'stim' column.*no none.wav beside"):
        read_bids(runs["3"].replace("run-3", "run-1"), BidsConfig(stim_column="stim", audio_file="none.wav"))
    with pytest.raises(FileNotFoundError, match=r"no iEEG recording matches.*subjects=\['02'\].*'subject': \['01'\]"):
        find_recordings(bad_dataset, BidsConfig(subjects=["02"]))


@pytest.mark.ray
def test_bids_ingest_on_ray_quarantines_and_continues(bad_dataset, tmp_path, ray_cluster):
    """`ssip ingest --bids ROOT OUT` on a real Ray head: every bad run gets its file-level row,
    the trial outside the recording and the missing stim file their trial-level rows, and the
    good trials land; the exit status is 3 (some files failed, others landed)."""
    from ssip.cli import main
    from ssip.data.dataset import quarantine_files, trial_files

    out = tmp_path / "out"
    assert main(["ingest", "--bids", str(bad_dataset), str(out), "--subject", "01",
                 "--set", "val_fraction=0", "--set", "test_fraction=0",
                 "--address", ray_cluster]) == 3  # some files failed, others landed
    m = json.loads((out / "manifest.json").read_text())
    status = {r["path"].split("_run-")[1].split("_")[0]: r["status"] for r in m["recordings"]}
    assert status == {"1": "ok", "2": "failed", "3": "failed", "4": "failed", "5": "failed",
                      "6": "failed", "7": "ok"}
    q = [row for f in quarantine_files(str(out)) for row in storage.read_parquet(f).to_pylist()]
    by_run: dict[str, list] = {}
    for row in q:
        by_run.setdefault(row["source_file"].split("_run-")[1].split("_")[0], []).append(row)
    assert {(r["level"], r["field"]) for r in by_run["2"]} == {("file", "events.tsv")}
    assert {(r["level"], r["field"]) for r in by_run["3"]} == {("file", "transcript_column")}
    assert {(r["level"], r["field"]) for r in by_run["4"]} == {("file", "channels.tsv")}
    assert {(r["level"], r["field"]) for r in by_run["5"]} == {("file", "sfreq")}
    assert {(r["level"], r["field"]) for r in by_run["6"]} == {("file", "audio")}
    assert [(r["level"], r["field"], r["trial_id"]) for r in by_run["1"]] == [
        ("trial", "onset", "sub-01_task-speech_run-1/0004")]
    assert [(r["level"], r["field"], r["trial_id"]) for r in by_run["7"]] == [
        ("trial", "stim_file", "sub-01_task-speech_run-7/0002")]
    assert "w2.wav" in by_run["7"][0]["reason"] and "does not exist" in by_run["7"][0]["reason"]
    rows = [r for f in trial_files(str(out)) for r in storage.read_parquet(f).to_pylist()]
    assert sorted(r["transcript"] for r in rows) == sorted(
        ["one", "two", "three", "four", "one", "two", "four"])
    assert m["n_trials"] == 7


def test_auto_format_and_job_entry_find_a_bids_dataset(corpus, tmp_path):
    """format=auto reads a folder holding only a BIDS-iEEG dataset (or one just below it) as BIDS;
    the `ray job submit` entry point takes --bids like the CLI."""
    import subprocess
    import sys

    from ssip.data.ingest import discover

    shutil.copytree(corpus / "bids-brainvision", tmp_path / "lab" / "bids-brainvision")
    assert discover(tmp_path / "lab") == [(_bv(corpus).replace(str(corpus), str(tmp_path / "lab")), "bids")]
    assert discover(corpus)[0][1] == "nwb"  # NWB first where both exist: auto never mixes
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, str(root / "jobs" / "ingest.py"), "--bids",
                          str(tmp_path / "lab"), str(tmp_path / "out"), "--subject", "sim01",
                          "--dry-run"], capture_output=True, text=True, timeout=120, check=True)
    assert "format: bids" in out.stdout and "- sim01" in out.stdout
    assert not (tmp_path / "out").exists()
