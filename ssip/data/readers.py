"""Readers for recorded speech datasets, each giving one :class:`Recording`.

Formats (docs/data.md, Public datasets):

- iBIDS NWB (Verwoert et al. 2022, SingleWordProductionDutch): ``sub-XX_task-*_ieeg.nwb`` with
  acquisitions ``iEEG`` (samples x channels; absolute clock ``timestamps`` or a ``rate``) and
  ``Audio``; beside it ``*_channels.tsv`` (status good|bad), ``*_events.tsv`` (onset and duration
  in s relative to the recording start, trial_type word|fixation, and the word) and the BIDS
  sidecar ``*_ieeg.json`` (PowerLineFrequency). Without a usable events.tsv the trials come from
  the ``Stimulus`` acquisition (the word on screen, one string per sample), as the dataset's own
  ``extract_features.py`` reads them: a trial is each maximal run of one non-empty string.
- Flinker lab HDF5 (Chen et al. 2024, HB02.h5; loader ``dataset.py`` of
  flinkerlab/neural_speech_decoding): ``ecog_alldataset`` (frames x electrodes) of preprocessed
  high gamma at 125 Hz, ``wave_re_alldataset`` (samples, 1) at 16 kHz,
  ``start_ind_re_valid_alldataset`` / ``end_ind_re_valid_alldataset`` (trials,) as 125 Hz frame
  indices, ``label_alldataset`` (trials,) words (bytes), ``TestNum_cum`` (shape (1,)): the
  NUMBER of test trials, which are the LAST ``TestNum_cum[0]`` rows (the loader trains on
  ``[:-TestNum_cum]``). The rows are the train trials of every task, then the test trials of
  every task, so start indices jump back in time where the test rows begin.
- Any BIDS-iEEG dataset (BrainVision, EDF/BDF, EEGLAB) through MNE-BIDS: :mod:`ssip.data.bids`.

Readers check structure (fields present, shapes, rates) and raise :class:`RecordingError`
naming the file, subject and field. Content checks (NaN, flat channels, trial bounds) are done by
ingest so that one bad trial or channel is quarantined instead of losing the recording.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ssip.config import check_option
from ssip.config import field as config_field


class RecordingError(ValueError):
    """A recording cannot be used; the message names file, subject and field."""

    def __init__(self, path, subject: str, field_name: str, reason: str):
        self.path, self.subject, self.field, self.reason = str(path), subject, field_name, reason
        super().__init__(f"{path} (subject {subject}, field {field_name!r}): {reason}")


@dataclass
class TrialSpec:
    """One spoken trial of a recording; times in s from the recording start."""

    onset_s: float
    duration_s: float
    transcript: str
    task: str = ""
    utt_id: str = ""
    #: Set by a reader when this trial alone cannot be used (e.g. its stim_file is missing):
    #: ingest quarantines it with this field and reason, the other trials go on.
    problem_field: str = ""
    problem: str = ""
    #: The split the dataset itself fixes for this trial ("test" for Flinker's last TestNum_cum
    #: rows, "train" for the rows before them); "" = ingest's contiguous rule decides.
    split: str = ""


@dataclass
class Recording:
    """A neural recording with its audio, channels and trials.

    ``signal`` is either raw voltage (``is_raw`` True; high gamma is extracted at ingest) or
    already-extracted high-gamma features (``is_raw`` False).
    """

    subject: str
    recording: str
    path: str
    source_format: str
    signal: np.ndarray  # (n_samples, n_channels)
    sfreq: float
    is_raw: bool
    channel_names: list[str]
    audio: np.ndarray  # (n_audio,) float32
    audio_rate: float
    audio_offset_s: float  # audio start minus signal start, s
    trials: list[TrialSpec]
    bad_channels: list[str] = field(default_factory=list)
    line_freq: float = 50.0
    split_rule: str = "contiguous"  # contiguous | given (the trials' own ``split``)
    metadata: dict = field(default_factory=dict)
    #: MNE channel type per channel (ecog, seeg, ...); [] = all ecog. Used by re-referencing.
    channel_types: list[str] = field(default_factory=list)
    #: Electrode group per channel name (electrodes.tsv ``group``); else groups come from names.
    channel_groups: dict[str, str] = field(default_factory=dict)

    @property
    def duration_s(self) -> float:
        return self.signal.shape[0] / self.sfreq


def _subject_from_name(path: Path) -> str:
    m = re.search(r"sub-([A-Za-z0-9]+)", path.name)
    return m.group(1) if m else path.stem


def read_tsv(path: Path) -> list[dict[str, str]]:
    # utf-8-sig: BIDS sidecars written by Windows tools start with a byte-order mark.
    with open(path, newline="", encoding="utf-8-sig") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def _bids_sidecar(nwb_path: Path, suffix: str) -> Path:
    # sub-01_task-x_ieeg.nwb -> sub-01_task-x_<suffix>
    stem = nwb_path.name
    base = stem[: -len("_ieeg.nwb")] if stem.endswith("_ieeg.nwb") else nwb_path.stem
    return nwb_path.with_name(f"{base}_{suffix}")


def rate_from_timestamps(stamps, path, subject: str, field_name: str) -> tuple[float, float]:
    """(first time, rate) of a TimeSeries with per-sample ``timestamps``.

    The rate is (n - 1) / (t_end - t0) over the whole span: with clock times of Unix-epoch size
    (about 1.7e9 s) one step's float64 rounding is a few 1e-7 s, i.e. 1 % of a 48 kHz step.
    Equal or decreasing timestamps are a :class:`RecordingError`.
    """
    n = len(stamps)
    if n < 2:
        raise RecordingError(path, subject, field_name, f"need at least 2 timestamps, got {n}")
    t = np.asarray(stamps[:], dtype=np.float64)
    steps = np.diff(t)
    if not np.all(steps > 0):
        i = int(np.flatnonzero(~(steps > 0))[0])
        raise RecordingError(path, subject, field_name,
                             f"timestamps must increase: sample {i + 1} is at {t[i + 1]!r} s, "
                             f"sample {i} at {t[i]!r} s")
    return float(t[0]), round(float((n - 1) / (t[-1] - t[0])), 4)


def _series_timing(ts, path, subject: str, name: str) -> tuple[float, float]:
    """(start time, rate) of an NWB TimeSeries, from its timestamps or its rate."""
    if ts.timestamps is not None:
        return rate_from_timestamps(ts.timestamps, path, subject, f"acquisition/{name}/timestamps")
    if not ts.rate or ts.rate <= 0:
        raise RecordingError(path, subject, f"acquisition/{name}/rate", f"has neither timestamps nor a rate > 0 ({ts.rate!r})")
    return float(ts.starting_time or 0.0), float(ts.rate)


def trials_from_stimulus(words: np.ndarray, rate: float, offset_s: float = 0.0) -> list[TrialSpec]:
    """One trial per maximal run of one non-empty string in a per-sample word track.

    ``words`` is the ``Stimulus`` acquisition of Verwoert et al. 2022 (the word on screen at each
    sample, empty between words), ``rate`` its sampling rate and ``offset_s`` its first sample's
    time relative to the neural recording's start.
    """
    w = np.asarray([x.decode("utf-8") if isinstance(x, bytes) else str(x) for x in words]).astype(str)
    w = np.char.strip(w)
    if len(w) == 0:
        return []
    change = np.flatnonzero(w[1:] != w[:-1]) + 1
    starts = np.r_[0, change]
    ends = np.r_[change, len(w)]
    return [TrialSpec(offset_s + a / rate, (b - a) / rate, str(w[a]))
            for a, b in zip(starts, ends, strict=True) if w[a] not in ("", "n/a")]


#: NWB trials: where they may come from.
NWB_TRIALS = ("auto", "events", "stimulus")


@dataclass
class NwbConfig:
    """How the iBIDS NWB reader finds the trials (format=nwb)."""

    trials: str = config_field(
        "auto", help="events | stimulus | auto: events.tsv beside the NWB, the NWB's Stimulus "
                     "acquisition (a trial per run of one word, as Verwoert et al.'s "
                     "extract_features.py reads it), or events.tsv when it has the columns "
                     "below, else Stimulus")
    trial_type: str = config_field("word", help="events.tsv trial_type value of a spoken trial")
    transcript_column: str = config_field("word", help="events.tsv column holding what was said")
    stimulus: str = config_field("Stimulus", help="name of the per-sample word acquisition")

    def __post_init__(self) -> None:
        check_option("nwb.trials", self.trials, NWB_TRIALS)


def read_nwb(
    path: str | Path,
    *,
    trial_type: str = "word",
    transcript_column: str = "word",
    trials_from: str = "auto",
    signal_name: str = "iEEG",
    audio_name: str = "Audio",
    stimulus_name: str = "Stimulus",
) -> Recording:
    """Read an iBIDS NWB recording (Verwoert et al. 2022 layout) with its BIDS sidecars.

    Parameters
    ----------
    path : path to ``sub-XX_task-..._ieeg.nwb``.
    trial_type : events.tsv ``trial_type`` value that marks a spoken trial.
    transcript_column : events.tsv column holding what was said.
    trials_from : ``events`` (events.tsv beside the file), ``stimulus`` (the ``Stimulus``
        acquisition: each maximal run of one non-empty word is a trial, as the dataset's
        ``extract_features.py`` reads it) or ``auto`` (events.tsv when it exists and has the
        ``trial_type`` and transcript columns, else the Stimulus acquisition). The metadata's
        ``trials_source`` says which one gave the trials.
    """
    from pynwb import NWBHDF5IO

    path = Path(path)
    subject = _subject_from_name(path)
    if trials_from not in NWB_TRIALS:
        raise ValueError(f"trials_from={trials_from!r} is not allowed; choose one of {list(NWB_TRIALS)}")
    if not path.exists():
        raise RecordingError(path, subject, "file", "does not exist")
    events_file = _bids_sidecar(path, "events.tsv")
    events = read_tsv(events_file) if events_file.exists() else None
    needed = ("onset", "duration", "trial_type", transcript_column)
    missing = [c for c in needed if events and c not in events[0]]
    use_events = trials_from == "events" or (trials_from == "auto" and events is not None and not missing)
    try:
        io = NWBHDF5IO(str(path), mode="r", load_namespaces=True)
        nwb = io.read()
    except Exception as e:  # h5py/pynwb raise many types for truncated or foreign files
        raise RecordingError(path, subject, "file", f"unreadable NWB: {type(e).__name__}: {e}") from e
    try:
        acq = nwb.acquisition
        for name in (signal_name, audio_name):
            if name not in acq:
                raise RecordingError(path, subject, f"acquisition/{name}", f"missing (have {sorted(acq)})")
        ts = acq[signal_name]
        signal = np.asarray(ts.data[:], dtype=np.float32)
        if signal.ndim != 2:
            raise RecordingError(path, subject, f"acquisition/{signal_name}", f"expected 2-D (samples, channels), got shape {signal.shape}")
        t0, sfreq = _series_timing(ts, path, subject, signal_name)
        audio_ts = acq[audio_name]
        audio = np.asarray(audio_ts.data[:], dtype=np.float32).reshape(len(audio_ts.data), -1)[:, 0]
        a0, audio_rate = _series_timing(audio_ts, path, subject, audio_name)
        stim_trials = None
        if not use_events:
            if stimulus_name not in acq:
                if trials_from == "stimulus":
                    raise RecordingError(path, subject, f"acquisition/{stimulus_name}", f"missing (have {sorted(acq)})")
                why = "missing" if events is None else f"without the column(s) {missing}"
                raise RecordingError(events_file, subject, "events.tsv",
                                     f"no trials: the events file beside the NWB is {why}, and the NWB "
                                     f"has no {stimulus_name!r} acquisition (have {sorted(acq)})")
            stim = acq[stimulus_name]
            if stim.timestamps is None and stim.rate is None and len(stim.data) == signal.shape[0]:
                s0, s_rate = t0, sfreq  # one word per neural sample, as in the public files
            else:
                s0, s_rate = _series_timing(stim, path, subject, stimulus_name)
            stim_trials = trials_from_stimulus(stim.data[:], s_rate, s0 - t0)
        n_ch = signal.shape[1]
        names = [f"ch{i:03d}" for i in range(n_ch)]
        if nwb.electrodes is not None and len(nwb.electrodes) == n_ch and "label" in nwb.electrodes.colnames:
            names = [str(x) for x in nwb.electrodes["label"][:]]
    finally:
        io.close()

    bad: list[str] = []
    types: list[str] = []
    chan_file = _bids_sidecar(path, "channels.tsv")
    if chan_file.exists():
        rows = read_tsv(chan_file)
        if "name" not in (rows[0] if rows else {}):
            raise RecordingError(chan_file, subject, "name", "channels.tsv has no 'name' column")
        if len(rows) != n_ch:
            raise RecordingError(chan_file, subject, "name", f"{len(rows)} channels listed, recording has {n_ch}")
        names = [r["name"] for r in rows]
        bad = [r["name"] for r in rows if r.get("status", "good").strip().lower() == "bad"]
        types = [r.get("type", "ECOG").strip().lower() or "ecog" for r in rows]

    line_freq = 50.0
    sidecar = _bids_sidecar(path, "ieeg.json")
    if sidecar.exists():
        meta = json.loads(sidecar.read_text())
        lf = meta.get("PowerLineFrequency")
        if isinstance(lf, int | float) and lf > 0:
            line_freq = float(lf)

    if stim_trials is not None:
        trials, source = stim_trials, f"acquisition/{stimulus_name}"
    else:
        if events is None:
            raise RecordingError(events_file, subject, "events.tsv", "missing: trials=events reads the BIDS events file beside the NWB")
        if missing:
            raise RecordingError(events_file, subject, missing[0], f"column missing (have {list(events[0])})")
        trials, source = [], events_file.name
        for i, ev in enumerate(events):
            if ev["trial_type"] != trial_type:
                continue
            try:
                onset, dur = float(ev["onset"]), float(ev["duration"])
            except ValueError as e:
                raise RecordingError(events_file, subject, f"onset/duration (row {i + 1})", str(e)) from e
            trials.append(
                TrialSpec(onset, dur, ev[transcript_column], task=ev.get("task", ""), utt_id=ev.get("utt_id", ""))
            )
    return Recording(
        subject=subject,
        recording=path.name.removesuffix(".nwb"),
        path=str(path),
        source_format="nwb",
        signal=signal,
        sfreq=sfreq,
        is_raw=True,
        channel_names=names,
        audio=audio,
        audio_rate=audio_rate,
        audio_offset_s=a0 - t0,
        trials=trials,
        bad_channels=bad,
        line_freq=line_freq,
        split_rule="contiguous",
        channel_types=types,
        metadata={"trials_source": source, "sfreq": sfreq, "audio_rate": audio_rate},
    )


FLINKER_REQUIRED = (
    "ecog_alldataset",
    "wave_re_alldataset",
    "start_ind_re_valid_alldataset",
    "end_ind_re_valid_alldataset",
    "label_alldataset",
)


def _frame_indices(values: np.ndarray, path: Path, subject: str, name: str) -> np.ndarray:
    """Trial bounds as int64 frame indices; any integer dtype, or a float dtype holding integers."""
    values = np.asarray(values).reshape(-1)
    if values.dtype.kind in "iu":
        return values.astype(np.int64)
    if values.dtype.kind != "f":
        raise RecordingError(path, subject, name, f"frame indices must be numbers, got dtype {values.dtype}")
    bad = np.flatnonzero(~np.isfinite(values) | (values != np.round(values)))
    if len(bad):
        raise RecordingError(path, subject, name,
                             f"frame indices must be whole numbers; row {int(bad[0])} holds {values[bad[0]]!r}"
                             f" ({len(bad)} such row(s))")
    return values.astype(np.int64)


def _labels(values: np.ndarray, path: Path, subject: str) -> list[str]:
    """Words as str from bytes or str, fixed or variable length (h5py gives either)."""
    out = []
    for i, x in enumerate(np.asarray(values).reshape(-1)):
        if isinstance(x, bytes):
            try:
                x = x.decode("utf-8")
            except UnicodeDecodeError as e:
                raise RecordingError(path, subject, "label_alldataset", f"row {i} is not UTF-8: {e}") from e
        out.append(str(x).rstrip("\x00"))
    return out


def _test_count(values: np.ndarray, n_rows: int, path: Path, subject: str) -> int:
    """``TestNum_cum[0]``: how many of the last rows are the test set (the public loader's rule)."""
    values = np.asarray(values).reshape(-1)
    if len(values) == 0:
        raise RecordingError(path, subject, "TestNum_cum", "is empty; expected the number of test trials")
    n = values[0]
    if not (np.isfinite(n) and float(n) == int(n) and 0 <= int(n) <= n_rows):
        raise RecordingError(path, subject, "TestNum_cum",
                             f"must hold the number of test trials, a whole number in [0, {n_rows}] "
                             f"(the last rows are the test set), got {values.tolist()}")
    return int(n)


def read_flinker(path: str | Path, *, ecog_rate: float = 125.0, audio_rate: float = 16000.0) -> Recording:
    """Read a Flinker-lab HDF5 file (HB02.h5 layout of Chen et al. 2024) as its public loader does.

    The electrode count is read from the file, never assumed. ``TestNum_cum[0]`` is the number of
    test trials: the last ``TestNum_cum[0]`` rows are the test set, the rows before them train
    (ingest takes validation out of those, in time order). A file with several entries in
    ``TestNum_cum`` (one per subject when the loader stacks subjects) is read with the first; all
    are kept in the metadata. Without ``TestNum_cum`` the split is ingest's contiguous rule.
    Rows need not be in time order (the public files put the test rows last).
    """
    import h5py

    path = Path(path)
    subject = path.stem.removeprefix("sub-")
    if not path.exists():
        raise RecordingError(path, subject, "file", "does not exist")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise RecordingError(path, subject, "file", f"unreadable HDF5 (truncated or not HDF5): {e}") from e
    with f:
        for key in FLINKER_REQUIRED:
            if key not in f:
                raise RecordingError(path, subject, key, f"dataset missing (have {sorted(f.keys())})")
        subject = str(f.attrs.get("subject", subject))
        ecog_rate = float(f.attrs.get("sfreq_ecog", ecog_rate))
        audio_rate = float(f.attrs.get("sfreq_audio", audio_rate))
        try:
            signal = np.asarray(f["ecog_alldataset"][:], dtype=np.float32)
            audio = np.asarray(f["wave_re_alldataset"][:], dtype=np.float32).reshape(-1)
            start = _frame_indices(f["start_ind_re_valid_alldataset"][:], path, subject,
                                   "start_ind_re_valid_alldataset")
            end = _frame_indices(f["end_ind_re_valid_alldataset"][:], path, subject,
                                 "end_ind_re_valid_alldataset")
            labels = _labels(f["label_alldataset"][:], path, subject)
            test_num = np.asarray(f["TestNum_cum"][:]) if "TestNum_cum" in f else None
        except OSError as e:
            raise RecordingError(path, subject, "data", f"unreadable dataset (truncated file?): {e}") from e
    if signal.ndim != 2:
        raise RecordingError(path, subject, "ecog_alldataset", f"expected (frames, electrodes), got {signal.shape}")
    if not (len(start) == len(end) == len(labels)):
        raise RecordingError(path, subject, "start/end/label", f"lengths differ: {len(start)}, {len(end)}, {len(labels)}")
    n_rows = len(start)
    if test_num is not None:
        n_test = _test_count(test_num, n_rows, path, subject)
        splits = ["train"] * (n_rows - n_test) + ["test"] * n_test
        rule = (f"given: the last TestNum_cum[0]={n_test} rows are test (the public loader's "
                f"[:-TestNum_cum] rule), the {n_rows - n_test} rows before them train; "
                "val = the last val_fraction of the train rows in time order")
    else:
        splits, rule = [""] * n_rows, "contiguous (the file has no TestNum_cum)"
    trials = [
        TrialSpec(float(s) / ecog_rate, float(e - s) / ecog_rate, lab, split=sp)
        for s, e, lab, sp in zip(start, end, labels, splits, strict=True)
    ]
    return Recording(
        subject=subject,
        recording=path.stem,
        path=str(path),
        source_format="flinker",
        signal=signal,
        sfreq=ecog_rate,
        is_raw=False,
        channel_names=[f"e{i:03d}" for i in range(signal.shape[1])],
        audio=audio,
        audio_rate=audio_rate,
        audio_offset_s=0.0,
        trials=trials,
        split_rule="given" if test_num is not None else "contiguous",
        metadata={"trials_source": "start/end_ind_re_valid_alldataset, label_alldataset",
                  "split_rule": rule,
                  **({"TestNum_cum": np.asarray(test_num).reshape(-1).tolist()} if test_num is not None else {})},
    )
