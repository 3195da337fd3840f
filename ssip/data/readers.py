"""Readers for recorded speech datasets, each giving one :class:`Recording`.

Formats (DESIGN.md section 6):

- iBIDS NWB (Verwoert et al. 2022, SingleWordProductionDutch): ``sub-XX_task-*_ieeg.nwb`` with
  acquisitions ``iEEG`` (samples x channels; absolute clock ``timestamps`` or a ``rate``) and
  ``Audio``; beside it ``*_channels.tsv`` (status good|bad), ``*_events.tsv`` (onset and duration
  in s relative to the recording start, trial_type word|fixation, and the word) and the BIDS
  sidecar ``*_ieeg.json`` (PowerLineFrequency).
- Flinker lab HDF5 (Chen et al. 2024, HB02.h5): ``ecog_alldataset`` (frames x electrodes) of
  preprocessed high-gamma at 125 Hz, ``wave_re_alldataset`` (samples, 1) at 16 kHz,
  ``start_ind_re_valid_alldataset`` / ``end_ind_re_valid_alldataset`` (trials,) as 125 Hz frame
  indices, ``label_alldataset`` (trials,) words, ``TestNum_cum`` cumulative trials per task.
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
    split_rule: str = "contiguous"  # contiguous | flinker
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


def read_nwb(
    path: str | Path,
    *,
    trial_type: str = "word",
    transcript_column: str = "word",
    signal_name: str = "iEEG",
    audio_name: str = "Audio",
) -> Recording:
    """Read an iBIDS NWB recording (Verwoert et al. 2022 layout) with its BIDS sidecars.

    Parameters
    ----------
    path : path to ``sub-XX_task-..._ieeg.nwb``.
    trial_type : events.tsv ``trial_type`` value that marks a spoken trial.
    transcript_column : events.tsv column holding what was said.
    """
    from pynwb import NWBHDF5IO

    path = Path(path)
    subject = _subject_from_name(path)
    if not path.exists():
        raise RecordingError(path, subject, "file", "does not exist")
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
        if ts.timestamps is not None:
            n_ts = len(ts.timestamps)
            t0 = float(ts.timestamps[0])
            t_end = float(ts.timestamps[n_ts - 1]) if n_ts > 1 else t0
            if n_ts < 2 or t_end <= t0:
                raise RecordingError(path, subject, f"acquisition/{signal_name}/timestamps", "need increasing timestamps")
            # The mean spacing over the whole recording: one step's float rounding would give e.g.
            # 999.99998 Hz at 1 kHz.
            sfreq = round((n_ts - 1) / (t_end - t0), 4)
        else:
            t0 = float(ts.starting_time or 0.0)
            sfreq = float(ts.rate)
        audio_ts = acq[audio_name]
        audio = np.asarray(audio_ts.data[:], dtype=np.float32).reshape(len(audio_ts.data), -1)[:, 0]
        if audio_ts.timestamps is not None:
            a_stamps = audio_ts.timestamps
            audio_rate = 1.0 / float(a_stamps[1] - a_stamps[0])
            a0 = float(a_stamps[0])
        else:
            audio_rate = float(audio_ts.rate)
            a0 = float(audio_ts.starting_time or 0.0)
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

    events_file = _bids_sidecar(path, "events.tsv")
    if not events_file.exists():
        raise RecordingError(events_file, subject, "events.tsv", "missing: trials come from the BIDS events file beside the NWB")
    events = read_tsv(events_file)
    for col in ("onset", "duration", "trial_type", transcript_column):
        if events and col not in events[0]:
            raise RecordingError(events_file, subject, col, f"column missing (have {list(events[0])})")
    trials = []
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
    )


FLINKER_REQUIRED = (
    "ecog_alldataset",
    "wave_re_alldataset",
    "start_ind_re_valid_alldataset",
    "end_ind_re_valid_alldataset",
    "label_alldataset",
)


def read_flinker(path: str | Path, *, ecog_rate: float = 125.0, audio_rate: float = 16000.0) -> Recording:
    """Read a Flinker-lab HDF5 file (HB02.h5 layout of Chen et al. 2024).

    The electrode count is read from the file, never assumed. Tasks come from ``TestNum_cum``
    (cumulative trial counts per task) when present, else all trials form one task.
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
            start = np.asarray(f["start_ind_re_valid_alldataset"][:]).reshape(-1)
            end = np.asarray(f["end_ind_re_valid_alldataset"][:]).reshape(-1)
            labels = [x.decode() if isinstance(x, bytes) else str(x) for x in np.asarray(f["label_alldataset"][:]).reshape(-1)]
            cum = np.asarray(f["TestNum_cum"][:]).reshape(-1).astype(int) if "TestNum_cum" in f else None
        except OSError as e:
            raise RecordingError(path, subject, "data", f"unreadable dataset (truncated file?): {e}") from e
    if signal.ndim != 2:
        raise RecordingError(path, subject, "ecog_alldataset", f"expected (frames, electrodes), got {signal.shape}")
    if not (len(start) == len(end) == len(labels)):
        raise RecordingError(path, subject, "start/end/label", f"lengths differ: {len(start)}, {len(end)}, {len(labels)}")
    tasks = np.zeros(len(start), dtype=int)
    if cum is not None and len(cum):
        if cum[-1] != len(start) or np.any(np.diff(cum) < 0):
            raise RecordingError(path, subject, "TestNum_cum", f"must be non-decreasing and end at {len(start)}, got {cum.tolist()}")
        for k, (a, b) in enumerate(zip(np.r_[0, cum[:-1]], cum, strict=True)):
            tasks[a:b] = k + 1
    trials = [
        TrialSpec(float(s) / ecog_rate, float(e - s) / ecog_rate, lab, task=str(t))
        for s, e, lab, t in zip(start, end, labels, tasks, strict=True)
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
        split_rule="flinker",
    )


def discover(root: str | Path, fmt: str = "auto", bids=None) -> list[tuple[str, str]]:
    """(path, format) of every recording under ``root`` (a file or a folder).

    fmt: ``nwb`` (``*_ieeg.nwb``), ``flinker`` (``*.h5``), ``bids`` (any BIDS-iEEG recording
    matching the :class:`~ssip.data.bids.BidsConfig` selection ``bids``, through MNE-BIDS) or
    ``auto`` (NWB if any, else HDF5: a simulated corpus holds both formats of the same subjects,
    so auto never mixes them; else ``bids`` when ``root`` or a folder just below it is a BIDS
    dataset).
    """
    root = Path(root)
    if fmt == "bids":
        from ssip.data.bids import BidsConfig, find_recordings

        if root.is_file():
            return [(str(root), "bids")]
        return [(p, "bids") for p in find_recordings(root, bids or BidsConfig())]
    if root.is_file():
        kind = "nwb" if root.suffix == ".nwb" else "flinker"
        return [(str(root), kind)]
    if not root.exists():
        raise FileNotFoundError(f"{root}: no such file or folder to ingest")
    nwb = sorted(str(p) for p in root.rglob("*_ieeg.nwb"))
    h5 = sorted(str(p) for p in root.rglob("*.h5"))
    if fmt == "auto" and not nwb and not h5:
        # A BIDS dataset in another raw format: ROOT itself, or one folder below it (a simulated
        # corpus written with formats=[brainvision] keeps it in bids-brainvision/).
        for desc in [root / "dataset_description.json", *sorted(root.glob("*/dataset_description.json"))]:
            if desc.exists():
                return discover(desc.parent, "bids", bids)
    if fmt == "nwb" or (fmt == "auto" and nwb):
        found = [(p, "nwb") for p in nwb]
    elif fmt in ("flinker", "auto"):
        found = [(p, "flinker") for p in h5]
    else:
        raise ValueError(f"format={fmt!r} is not allowed; choose one of ['auto', 'nwb', 'flinker', 'bids']")
    if not found:
        raise FileNotFoundError(f"{root}: no recordings found (looked for *_ieeg.nwb and *.h5, format={fmt})")
    return found


def read_recording(path: str, fmt: str, bids=None) -> Recording:
    """Read one recording; ``bids`` is the :class:`~ssip.data.bids.BidsConfig` for ``fmt="bids"``."""
    if fmt == "nwb":
        return read_nwb(path)
    if fmt == "flinker":
        return read_flinker(path)
    if fmt == "bids":
        from ssip.data.bids import read_bids

        return read_bids(path, bids)
    raise ValueError(f"format={fmt!r} is not allowed; choose one of ['nwb', 'flinker', 'bids']")
