"""The public datasets' own layouts, built from scratch (not by ssip's simulator), read as their
public loaders read them.

- Flinker HDF5 mirrors HB02.h5 of Chen et al. 2024 (Mendeley fp4bv9gtwk v2) as the public loader
  ``dataset.py`` of flinkerlab/neural_speech_decoding reads it: ``ecog_alldataset`` (frames,
  electrodes) float at 125 Hz, ``wave_re_alldataset`` (samples, 1) at 16 kHz,
  ``start_ind_re_valid_alldataset`` / ``end_ind_re_valid_alldataset`` (trials,), ``label_alldataset``
  (trials,) bytes (the loader calls ``.decode('utf-8')`` on each), ``TestNum_cum`` of shape (1,)
  holding the NUMBER of test trials, the last rows (the loader trains on ``[:-TestNum_cum]``).
  The rows are every task's train trials, then every task's test trials.
- iBIDS NWB mirrors ``sub-XX_task-wordProduction_ieeg.nwb`` of Verwoert et al. 2022
  (SingleWordProductionDutch) as its ``extract_features.py`` reads it: acquisitions ``iEEG``
  (samples, channels) at 1024 Hz, ``Audio`` at 48 kHz and ``Stimulus`` (the word on screen at
  every iEEG sample), each with per-sample float64 timestamps of Unix-epoch size; channels.tsv
  beside it.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from pathlib import Path

import h5py
import numpy as np
import pytest

from ssip.data.ingest import IngestConfig, process_recording
from ssip.data.readers import RecordingError, read_flinker, read_nwb

N_TASKS, PER_TASK, TEST_PER_TASK = 5, 60, 10
FRAME_RATE, AUDIO_RATE = 125, 16000


def _hb02_like(path: Path, *, test_rows_last: bool = True, labels: str = "bytes",
               index_dtype=np.int64, n_electrodes: int = 24, seed: int = 0) -> list[int]:
    """Write a file in HB02.h5's layout: 300 trials in 5 tasks of 60, the last 10 of each task
    are test. Returns the time-order positions (0..299) of the rows, in row order."""
    rng = np.random.default_rng(seed)
    n = N_TASKS * PER_TASK
    dur = rng.integers(40, 80, n)  # 0.32-0.64 s words
    gap = rng.integers(40, 60, n)  # 0.32-0.48 s between them
    start = 60 + np.r_[0, np.cumsum(dur + gap)[:-1]]  # time order
    end = start + dur
    n_frames = int(end[-1] + 60)
    task = np.repeat(np.arange(N_TASKS), PER_TASK)
    test = np.zeros(n, dtype=bool)
    for k in range(N_TASKS):
        test[np.flatnonzero(task == k)[-TEST_PER_TASK:]] = True
    if test_rows_last:  # the public builder: every task's train rows, then every task's test rows
        rows = [*np.flatnonzero(~test), *np.flatnonzero(test)]
    else:  # rows in time order: the last 50 rows (the test set) are the last 50 trials in time
        rows = list(range(n))
    words = np.array([f"word{i % 50:02d}" for i in range(n)])
    with h5py.File(path, "w") as f:
        f["ecog_alldataset"] = rng.standard_normal((n_frames, n_electrodes)).astype(np.float32)
        f["wave_re_alldataset"] = (0.01 * rng.standard_normal((n_frames * AUDIO_RATE // FRAME_RATE, 1))
                                   ).astype(np.float32)
        f["start_ind_re_valid_alldataset"] = start[rows].astype(index_dtype)
        f["end_ind_re_valid_alldataset"] = end[rows].astype(index_dtype)
        if labels == "bytes":
            f["label_alldataset"] = np.array([w.encode() for w in words[rows]])  # fixed-length S
        else:  # variable-length str
            f.create_dataset("label_alldataset", data=list(words[rows]), dtype=h5py.string_dtype("utf-8"))
        f["TestNum_cum"] = np.array([N_TASKS * TEST_PER_TASK], dtype=np.int32)
    return [int(i) for i in rows]


@pytest.mark.parametrize("test_rows_last", [True, False], ids=["train-then-test-rows", "time-order"])
def test_flinker_public_layout_splits_exactly_the_test_rows(tmp_path, test_rows_last):
    path = tmp_path / "HB02.h5"
    rows = _hb02_like(path, test_rows_last=test_rows_last)
    rec = read_flinker(path)
    assert rec.subject == "HB02" and rec.signal.shape[1] == 24 and len(rec.trials) == 300
    res = process_recording(rec, IngestConfig())
    assert res.quarantine == []
    by_split = {s: sorted(r["trial_index"] for r in res.rows if r["split"] == s) for s in ("train", "val", "test")}
    # The test set is exactly the last TestNum_cum[0] = 50 rows of the file, trial by trial ...
    assert by_split["test"] == list(range(250, 300))
    if test_rows_last:  # ... which are the last 10 trials (in time) of each of the 5 tasks
        tasks_of_test = sorted(rows[i] // PER_TASK for i in by_split["test"])
        assert tasks_of_test == sorted(list(range(N_TASKS)) * TEST_PER_TASK)
        assert all(rows[i] % PER_TASK >= PER_TASK - TEST_PER_TASK for i in by_split["test"])
    else:  # ... which are the last 50 in time
        assert sorted(rows[i] for i in by_split["test"]) == list(range(250, 300))
    # Validation: the last 10 % (25) of the 250 train rows in time order, never a test row.
    time_of = {i: rows[i] for i in range(300)}
    train_rows = sorted(range(250), key=time_of.get)
    assert by_split["val"] == sorted(train_rows[-25:])
    assert len(by_split["train"]) == 225
    assert res.metadata["split_rule"].startswith("given: the last TestNum_cum[0]=50 rows are test")


def test_flinker_labels_and_index_dtypes(tmp_path):
    """Labels as variable-length str and indices as floats holding integers read the same."""
    a, b = tmp_path / "a" / "HB02.h5", tmp_path / "b" / "HB02.h5"
    a.parent.mkdir()
    b.parent.mkdir()
    _hb02_like(a)
    _hb02_like(b, labels="str", index_dtype=np.float64)
    ra, rb = read_flinker(a), read_flinker(b)
    assert [dataclasses.astuple(t) for t in ra.trials] == [dataclasses.astuple(t) for t in rb.trials]
    assert ra.trials[0].transcript == "word00" and isinstance(rb.trials[0].transcript, str)


def test_flinker_non_integer_index_and_bad_test_count_are_named(tmp_path):
    path = tmp_path / "HB02.h5"
    _hb02_like(path, index_dtype=np.float64)
    with h5py.File(path, "a") as f:
        f["start_ind_re_valid_alldataset"][7] += 0.5
    with pytest.raises(RecordingError, match=r"HB02\.h5 \(subject HB02, field 'start_ind_re_valid_alldataset'\): "
                                             r"frame indices must be whole numbers; row 7"):
        read_flinker(path)
    _hb02_like(path)
    with h5py.File(path, "a") as f:
        f["TestNum_cum"][0] = 301
    with pytest.raises(RecordingError, match=r"field 'TestNum_cum'.*number of test trials.*\[0, 300\]"):
        read_flinker(path)


def test_flinker_test_rows_are_not_quarantined_for_jumping_back(tmp_path):
    """Overlap is judged in time order: a real overlap is still caught, whatever the row order."""
    path = tmp_path / "HB02.h5"
    rows = _hb02_like(path)
    rec = read_flinker(path)
    # Move a test row's trial onto the previous (in time) trial: that one overlap is quarantined.
    i = 260
    prev = rows.index(rows[i] - 1)
    trials = list(rec.trials)
    trials[i] = dataclasses.replace(trials[i], onset_s=trials[prev].onset_s + 0.05)
    res = process_recording(dataclasses.replace(rec, trials=trials), IngestConfig())
    assert [(q["trial_id"], q["field"]) for q in res.quarantine] == [(f"HB02/{max(i, prev):04d}", "onset")]
    assert "overlaps trial" in res.quarantine[0]["reason"]


# ---------------------------------------------------------------- Verwoert iBIDS NWB

EPOCH_T0 = 1_548_681_422.871  # a Unix-epoch clock time (2019), as the public files carry
SFREQ, AUDIO_48K = 1024, 48000


def _verwoert_like(folder: Path, *, stimulus: bool = True, duration_s: float = 40.0,
                   bad_audio_stamps: bool = False, seed: int = 1) -> tuple[Path, list[tuple[float, float, str]]]:
    """sub-01_task-wordProduction_ieeg.nwb with iEEG, Audio (48 kHz) and Stimulus, float64 clock
    timestamps, channels.tsv beside it and NO events.tsv. Returns the path and the words
    (onset s, duration s, word) in recording time."""
    from pynwb import NWBHDF5IO, NWBFile, TimeSeries

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    n = int(duration_s * SFREQ)
    n_ch = 6
    eeg = rng.standard_normal((n, n_ch)) * 20.0
    t = EPOCH_T0 + np.arange(n, dtype=np.float64) / SFREQ
    words, stim = [], np.full(n, "", dtype=object)
    pos = 1.0
    k = 0
    while pos + 3.0 < duration_s:  # 2 s word on screen, 1 s fixation (their protocol's rhythm)
        w = ["boom", "huis", "fiets", "water"][k % 4]
        a, b = int(pos * SFREQ), int((pos + 2.0) * SFREQ)
        stim[a:b] = w
        words.append((a / SFREQ, (b - a) / SFREQ, w))
        pos += 3.0
        k += 1
    n_a = int(duration_s * AUDIO_48K)
    audio = (0.05 * rng.standard_normal(n_a)).astype(np.float32)
    ta = EPOCH_T0 + np.arange(n_a, dtype=np.float64) / AUDIO_48K
    if bad_audio_stamps:
        ta[1000] = ta[999]
    nwb = NWBFile(session_description="mirror of SingleWordProductionDutch sub-01",
                  identifier="sub-01", session_start_time=datetime.fromtimestamp(EPOCH_T0, tz=UTC))
    nwb.add_acquisition(TimeSeries(name="iEEG", data=eeg, unit="V", timestamps=t))
    nwb.add_acquisition(TimeSeries(name="Audio", data=audio, unit="a.u.", timestamps=ta))
    if stimulus:
        nwb.add_acquisition(TimeSeries(name="Stimulus", data=stim.astype(str).tolist(), unit="n/a", timestamps=t))
    path = folder / "sub-01_task-wordProduction_ieeg.nwb"
    with NWBHDF5IO(str(path), "w") as io:
        io.write(nwb)
    with open(folder / "sub-01_task-wordProduction_channels.tsv", "w") as fh:
        fh.write("name\ttype\tunits\tlow_cutoff\thigh_cutoff\tstatus\n")
        for c in range(n_ch):
            fh.write(f"LA{c + 1}\tSEEG\tV\tn/a\tn/a\tgood\n")
    return path, words


def test_verwoert_nwb_epoch_timestamps_and_stimulus_words(tmp_path):
    path, words = _verwoert_like(tmp_path / "sub-01" / "ieeg")
    with h5py.File(path) as f:  # the fixture is what the issue describes: one step is off by ~1 %
        ta = f["acquisition/Audio/timestamps"][:2]
        assert abs(1.0 / (ta[1] - ta[0]) - AUDIO_48K) > 100
    rec = read_nwb(path)
    assert rec.sfreq == pytest.approx(1024.0, abs=1e-3) and rec.audio_rate == pytest.approx(48000.0, abs=1e-2)
    assert rec.audio_offset_s == 0.0
    assert rec.metadata["trials_source"] == "acquisition/Stimulus"
    assert [(round(t.onset_s, 6), round(t.duration_s, 6), t.transcript) for t in rec.trials] == \
        [(round(a, 6), round(d, 6), w) for a, d, w in words]
    res = process_recording(rec, IngestConfig())
    assert len(res.rows) == len(words) and res.quarantine == []
    assert [r["transcript"] for r in res.rows] == [w for _, _, w in words]
    assert all(r["mel"].shape == (80, r["n_frames"]) for r in res.rows)


def test_verwoert_nwb_bad_timestamps_and_no_trials_are_named(tmp_path):
    path, _ = _verwoert_like(tmp_path / "a", bad_audio_stamps=True, duration_s=8.0)
    with pytest.raises(RecordingError, match=r"field 'acquisition/Audio/timestamps'\): timestamps must "
                                             r"increase: sample 1000"):
        read_nwb(path)
    path, _ = _verwoert_like(tmp_path / "b", stimulus=False, duration_s=8.0)
    with pytest.raises(RecordingError, match=r"events\.tsv.*no trials: the events file beside the NWB "
                                             r"is missing, and the NWB has no 'Stimulus' acquisition"):
        read_nwb(path)
    with pytest.raises(RecordingError, match=r"field 'acquisition/Stimulus'\): missing"):
        read_nwb(path, trials_from="stimulus")


def test_verwoert_nwb_events_tsv_word_column_is_configurable(tmp_path):
    """With an events.tsv that has the columns, it gives the trials; the word column's name is a
    config field on the default NWB path (IngestConfig.nwb.transcript_column)."""
    from ssip.data.ingest import read_recording
    from ssip.data.readers import NwbConfig

    path, words = _verwoert_like(tmp_path, duration_s=8.0)
    with open(tmp_path / "sub-01_task-wordProduction_events.tsv", "w") as fh:
        fh.write("onset\tduration\ttrial_type\tstim\n")
        for a, d, w in words:
            fh.write(f"{a:.6f}\t{d:.6f}\tword\t{w.upper()}\n")
    rec = read_recording(str(path), "nwb", nwb=NwbConfig(transcript_column="stim"))
    assert [t.transcript for t in rec.trials] == [w.upper() for _, _, w in words]
    assert rec.metadata["trials_source"] == "sub-01_task-wordProduction_events.tsv"
    # The default column ("word") is not there: auto falls back to Stimulus ...
    assert read_recording(str(path), "nwb").metadata["trials_source"] == "acquisition/Stimulus"
    # ... and trials=events names the missing column.
    with pytest.raises(RecordingError, match=r"field 'word'\): column missing"):
        read_recording(str(path), "nwb", nwb=NwbConfig(trials="events"))
