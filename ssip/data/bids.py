"""Any BIDS-iEEG dataset, read through MNE-BIDS, as a :class:`~ssip.data.readers.Recording`.

A BIDS-iEEG recording is ``sub-<s>[/ses-<t>]/ieeg/sub-<s>[_ses-<t>]_task-<k>[_run-<r>]_ieeg.<ext>``
(BrainVision ``.vhdr``, EDF ``.edf``, BDF ``.bdf``, EEGLAB ``.set``) with sidecars beside it or
inherited from above: ``_channels.tsv`` (name, type, status), ``_events.tsv`` (onset, duration,
trial_type, ...), ``_ieeg.json`` (PowerLineFrequency) and ``_electrodes.tsv`` with
``_coordsystem.json``. ``mne_bids.read_raw_bids`` reads the signal and applies the sidecars; this
module then chooses channels, audio and trials (every choice a :class:`BidsConfig` field):

- **Channels**: types in ``channel_types`` (default ecog and seeg) are kept; dbs, eeg, misc,
  stim, ... are left out unless listed, and named in the metadata. channels.tsv ``status=bad``
  channels are dropped and listed. channels.tsv must list exactly the recording's channels.
  Electrode positions and groups from electrodes.tsv go into the metadata.
- **Line frequency**: the sidecar's PowerLineFrequency (BIDS requires it); ``line_freq`` only
  fills in when it is missing, else the recording fails with a named error.
- **Audio** (``audio``): ``channel`` (a channel of the recording: ``audio_channel``, else the one
  typed AUDIO in channels.tsv, else one named audio/mic/microphone/sound/speech/voice), ``stim_file``
  (events.tsv's ``stim_column``, a file under ``ROOT/stimuli/`` that starts at the event's onset:
  perception datasets), ``file`` (one audio file per run beside the recording,
  ``audio_file`` with ``{basename}`` = the recording's name without ``_ieeg.<ext>``; it starts
  with the recording) or ``auto`` (the first of these that the recording has).
- **Trials**: events.tsv rows whose ``trial_type`` is in ``trial_types`` ([] = every row), with
  their onset and duration, the transcript from ``transcript_column`` (``auto``: the first of
  transcript, word, sentence, text, value; ``none``: no transcripts) and an optional
  ``utt_id_column``.

``*_ieeg.nwb`` recordings in a BIDS tree (the iBIDS layout of Verwoert et al. 2022) are read by
:func:`ssip.data.readers.read_nwb` with the same trial options (the first of ``trial_types``; the
transcript column when one is named).

The signal is returned in µV (MNE holds volts); re-referencing and the high-gamma features are
ingest's (:mod:`ssip.data.reference`, :mod:`ssip.data.highgamma`), the same for every format.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ssip import mel as melmod
from ssip.config import ConfigError, check_option, field
from ssip.data.readers import Recording, RecordingError, TrialSpec, read_nwb, read_tsv
from ssip.data.speech_corpus import AudioDecodeError, decode_audio, resample_to_16k

log = logging.getLogger(__name__)

#: Raw formats MNE-BIDS reads, plus the iBIDS NWB layout.
EXTENSIONS = [".vhdr", ".edf", ".bdf", ".set", ".nwb"]
AUDIO_SOURCES = ["auto", "channel", "stim_file", "file"]
#: Channel names taken for the microphone when no channel is named or typed AUDIO (lowercase).
AUDIO_CHANNEL_NAMES = ("audio", "mic", "microphone", "sound", "speech", "voice")
#: Columns tried, in order, for the transcript when transcript_column is "auto".
TRANSCRIPT_COLUMNS = ("transcript", "word", "sentence", "text", "value")
#: BIDS channels.tsv types -> MNE channel types (MNE-BIDS's map plus AUDIO, which it lacks).
_BIDS_TYPES = {"ECOG": "ecog", "SEEG": "seeg", "DBS": "dbs", "EEG": "eeg", "MISC": "misc",
               "TRIG": "stim", "EMG": "emg", "ECG": "ecg", "EOG": "eog", "VEOG": "eog",
               "HEOG": "eog", "RESP": "resp", "AUDIO": "audio", "REF": "ref"}
#: Folders of a BIDS root that hold no raw recordings.
_SKIP_DIRS = {"derivatives", "sourcedata", "code", "stimuli"}


@dataclass
class BidsConfig:
    """How a BIDS-iEEG dataset is read (``ssip ingest --bids ROOT``): selection, audio, trials."""

    subjects: list[str] = field(default_factory=list, help="BIDS subject labels to read ([] = all)")
    sessions: list[str] = field(default_factory=list, help="session labels ([] = all)")
    tasks: list[str] = field(default_factory=list, help="task labels ([] = all)")
    runs: list[str] = field(default_factory=list, help="run labels ([] = all)")
    extensions: list[str] = field(default_factory=lambda: list(EXTENSIONS),
                                  help="recording file types read (.vhdr .edf .bdf .set .nwb)")
    channel_types: list[str] = field(default_factory=lambda: ["ecog", "seeg"],
                                     help="channel types kept (MNE names: ecog, seeg, dbs, eeg, ...)")
    audio: str = field("auto", help="where the speech audio is: channel | stim_file | file | auto "
                                    "(the first of these the recording has)")
    audio_channel: str = field("", help="audio=channel: the microphone channel's name (\"\" = the "
                                        "channel typed AUDIO, else one named audio/mic/...)")
    audio_file: str = field("{basename}_audio.wav",
                            help="audio=file: per-run audio file beside the recording; {basename} = "
                                 "the recording's name without _ieeg.<ext>; starts with the recording")
    stim_column: str = field("stim_file", help="audio=stim_file: events.tsv column naming the audio "
                                               "played, relative to ROOT/stimuli/")
    trial_types: list[str] = field(default_factory=lambda: ["word"],
                                   help="events.tsv trial_type values that are trials ([] = every event)")
    transcript_column: str = field("auto", help="events.tsv column with what was said (auto: the "
                                                "first of transcript, word, sentence, text, value; "
                                                "none: no transcripts)")
    utt_id_column: str = field("auto", help="events.tsv column with an utterance id (auto: utt_id "
                                            "when present; \"\" = none)")
    line_freq: float | None = field(None, help="mains frequency, Hz, used only where the ieeg.json "
                                               "sidecar has no PowerLineFrequency")

    def __post_init__(self) -> None:
        check_option("audio", self.audio, AUDIO_SOURCES)
        for i, ext in enumerate(self.extensions):
            check_option(f"extensions[{i}]", ext, EXTENSIONS)
        if not self.channel_types:
            raise ConfigError("channel_types is empty; keep at least one type (e.g. [ecog, seeg])")
        if self.line_freq is not None and not self.line_freq > 0:
            raise ConfigError(f"line_freq={self.line_freq!r} must be a positive frequency in Hz")


def bids_root(path: str | Path) -> Path:
    """The BIDS root above ``path``: the nearest folder holding dataset_description.json."""
    path = Path(path).resolve()
    for parent in path.parents:
        if (parent / "dataset_description.json").exists():
            return parent
    # Without a description, the folder above sub-<label>/ is the root.
    for parent in path.parents:
        if parent.name.startswith("sub-"):
            return parent.parent
    raise RecordingError(path, "?", "dataset_description.json",
                         "not inside a BIDS dataset (no dataset_description.json above it)")


def find_recordings(root: str | Path, cfg: BidsConfig) -> list[str]:
    """Paths of every iEEG recording under the BIDS ``root`` that the selection matches."""
    from mne_bids import find_matching_paths, get_entity_vals

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such BIDS folder")
    found = find_matching_paths(
        root, subjects=cfg.subjects or None, sessions=cfg.sessions or None,
        tasks=cfg.tasks or None, runs=cfg.runs or None, datatypes="ieeg", suffixes="ieeg",
        extensions=list(cfg.extensions))
    paths = sorted({str(bp.fpath) for bp in found
                    if not _SKIP_DIRS & set(Path(bp.fpath).relative_to(root).parts[:1])})
    if not paths:
        have = {e: get_entity_vals(root, e) for e in ("subject", "session", "task", "run")}
        raise FileNotFoundError(
            f"{root}: no iEEG recording matches (looked for sub-*/[ses-*/]ieeg/*_ieeg"
            f"{{{','.join(cfg.extensions)}}} with subjects={cfg.subjects or 'any'}, "
            f"sessions={cfg.sessions or 'any'}, tasks={cfg.tasks or 'any'}, "
            f"runs={cfg.runs or 'any'}; the dataset has {have})")
    return paths


@dataclass
class BidsSignal:
    """The iEEG part of a BIDS recording, before audio and trials."""

    subject: str
    recording: str
    path: str
    signal: np.ndarray  # (n_samples, n_kept) µV, float32
    sfreq: float
    channel_names: list[str]
    channel_types: list[str]
    bad_channels: list[str]
    line_freq: float
    metadata: dict
    audio_channel: np.ndarray | None = None  # (n_samples,) when audio=channel/auto found one
    audio_channel_name: str = ""


def _bids_path(path: str | Path):
    from mne_bids import get_bids_path_from_fname

    path = Path(path)
    bp = get_bids_path_from_fname(path, check=False)
    bp.update(root=bids_root(path), check=False)
    return bp


def _recording_name(path: Path) -> str:
    # sub-01_ses-1_task-x_run-1_ieeg.vhdr -> sub-01_ses-1_task-x_run-1
    name = path.name
    return name[: name.rindex("_ieeg")] if "_ieeg" in name else path.stem


def _sidecar(bp, suffix: str, extension: str) -> Path | None:
    found = bp.find_matching_sidecar(suffix=suffix, extension=extension, on_error="ignore")
    return Path(found) if found else None


def _electrodes(path: Path, subject: str, session: str | None) -> dict:
    """Positions, groups and coordinate system from the electrodes.tsv beside the recording."""
    import json

    stem = f"sub-{subject}" + (f"_ses-{session}" if session else "")
    files = sorted(path.parent.glob(f"{stem}*_electrodes.tsv"))
    if not files:
        return {}
    rows = read_tsv(files[0])
    out: dict = {"file": files[0].name, "positions": {}, "groups": {}}

    def num(v):
        try:
            x = float(v)
        except (TypeError, ValueError):
            return None
        return x if np.isfinite(x) else None

    for r in rows:
        xyz = [num(r.get(k)) for k in ("x", "y", "z")]
        out["positions"][r["name"]] = xyz if all(v is not None for v in xyz) else None
        if r.get("group", "n/a") not in ("", "n/a", None):
            out["groups"][r["name"]] = r["group"]
    coords = sorted(path.parent.glob(f"{stem}*_coordsystem.json"))
    if coords:
        meta = json.loads(coords[0].read_text(encoding="utf-8-sig"))
        out["coordinate_system"] = meta.get("iEEGCoordinateSystem")
        out["units"] = meta.get("iEEGCoordinateUnits")
    return out


def read_bids_signal(path: str | Path, cfg: BidsConfig | None = None) -> BidsSignal:
    """Read a BIDS-iEEG recording's signal and sidecars (no audio or trials needed).

    Raises :class:`RecordingError` naming the file, subject and field when the recording or a
    sidecar is unreadable or inconsistent.
    """
    from mne_bids import read_raw_bids

    cfg = cfg or BidsConfig()
    path = Path(path)
    bp = _bids_path(path)
    subject = bp.subject or "?"
    if not path.exists():
        raise RecordingError(path, subject, "file", "does not exist")
    chan_file = _sidecar(bp, "channels", ".tsv")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # MNE-BIDS warns about every optional sidecar field
            # "warn": MNE-BIDS leaves a disagreeing channels.tsv unapplied; the check below
            # then names what differs.
            raw = read_raw_bids(bp, on_ch_mismatch="warn", verbose="error")
    except RuntimeError as e:
        if "channel" in str(e).lower():
            raise RecordingError(chan_file or path, subject, "channels.tsv", str(e)) from e
        raise RecordingError(path, subject, "file", f"unreadable: {type(e).__name__}: {e}") from e
    except Exception as e:  # MNE's readers raise many types for truncated or foreign files
        raise RecordingError(path, subject, "file", f"unreadable: {type(e).__name__}: {e}") from e

    names = list(raw.ch_names)
    types = list(raw.get_channel_types())
    bids_types: dict[str, str] = {}
    if chan_file is not None:
        rows = read_tsv(chan_file)
        listed = [r.get("name", "") for r in rows]
        if "name" not in (rows[0] if rows else {}):
            raise RecordingError(chan_file, subject, "channels.tsv", "has no 'name' column")
        if listed != names:
            missing = [n for n in names if n not in listed]
            extra = [n for n in listed if n not in names]
            raise RecordingError(
                chan_file, subject, "channels.tsv",
                f"lists {len(listed)} channel(s) but the recording has {len(names)}: in the "
                f"recording only {missing[:10]}, in channels.tsv only {extra[:10]}"
                + ("" if missing or extra else " (same names, different order)"))
        bids_types = {r["name"]: r.get("type", "").strip().upper() for r in rows}
        for i, n in enumerate(names):
            t = bids_types.get(n, "")
            if t in _BIDS_TYPES:
                types[i] = _BIDS_TYPES[t]
    bads = [n for n in raw.info["bads"] if n in names]

    line, line_source = raw.info.get("line_freq"), "sidecar"
    if line in (None, "n/a") or not float(line) > 0:
        if cfg.line_freq is None:
            sidecar = _sidecar(bp, "ieeg", ".json")
            raise RecordingError(sidecar or path, subject, "PowerLineFrequency",
                                 "missing from the ieeg.json sidecar (BIDS requires it); set "
                                 "bids.line_freq to 50 or 60")
        line, line_source = cfg.line_freq, "config (bids.line_freq)"
    line = float(line)

    keep = [i for i, t in enumerate(types) if t in cfg.channel_types and names[i] not in bads]
    excluded = {names[i]: types[i] for i, t in enumerate(types) if t not in cfg.channel_types}
    if not keep:
        raise RecordingError(chan_file or path, subject, "channels",
                             f"no good channel of type {cfg.channel_types} (types present: "
                             f"{sorted(set(types))}, bad: {bads})")
    # MNE holds volts; ssip's raw signals are µV (as the NWB and simulated recordings).
    signal = (raw.get_data(picks=keep).T * 1e6).astype(np.float32)

    audio_idx = None
    if cfg.audio in ("channel", "auto"):
        audio_idx = _find_audio_channel(names, bids_types, cfg)
        if audio_idx is None and cfg.audio == "channel":
            looked = (f"a channel named {cfg.audio_channel!r}" if cfg.audio_channel else
                      f"a channel typed AUDIO in channels.tsv or named one of {list(AUDIO_CHANNEL_NAMES)}")
            raise RecordingError(path, subject, "audio_channel",
                                 f"audio=channel: no such channel (looked for {looked}; channels: "
                                 f"{names[:20]}{' ...' if len(names) > 20 else ''})")
    audio = raw.get_data(picks=[audio_idx])[0].astype(np.float32) if audio_idx is not None else None

    electrodes = _electrodes(path, subject, bp.session)
    metadata = {
        "bids": {"root": str(bp.root), "subject": subject, "session": bp.session,
                 "task": bp.task, "run": bp.run, "acquisition": bp.acquisition,
                 "datatype": "ieeg", "extension": path.suffix},
        "channel_types": dict(zip(names, types, strict=True)),
        "excluded_channels": excluded,
        "line_freq_source": line_source,
        "electrodes": electrodes,
    }
    return BidsSignal(
        subject=subject, recording=_recording_name(path), path=str(path), signal=signal,
        sfreq=float(raw.info["sfreq"]), channel_names=[names[i] for i in keep],
        channel_types=[types[i] for i in keep], bad_channels=bads, line_freq=line,
        metadata=metadata, audio_channel=audio,
        audio_channel_name=names[audio_idx] if audio_idx is not None else "")


def _find_audio_channel(names: list[str], bids_types: dict[str, str], cfg: BidsConfig) -> int | None:
    if cfg.audio_channel:
        return names.index(cfg.audio_channel) if cfg.audio_channel in names else None
    for i, n in enumerate(names):
        if bids_types.get(n) == "AUDIO":
            return i
    for i, n in enumerate(names):
        if n.strip().lower() in AUDIO_CHANNEL_NAMES:
            return i
    return None


def _events(bp, path: Path, subject: str, cfg: BidsConfig) -> tuple[Path, list[dict], str, str]:
    """events.tsv rows and the transcript and utterance-id columns to use; RecordingError when
    unusable."""
    events_file = _sidecar(bp, "events", ".tsv")
    expected = path.with_name(f"{_recording_name(path)}_events.tsv")
    if events_file is None:
        raise RecordingError(expected, subject, "events.tsv",
                             f"missing: trials come from the BIDS events file (looked for "
                             f"{expected.name} beside the recording and inherited ones above it)")
    rows = read_tsv(events_file)
    have = list(rows[0]) if rows else []
    need = ["onset", "duration"] + (["trial_type"] if cfg.trial_types else [])
    column = cfg.transcript_column
    if column == "auto":
        column = next((c for c in TRANSCRIPT_COLUMNS if c in have), "")
        if not column and rows:
            raise RecordingError(events_file, subject, "transcript_column",
                                 f"no transcript column (looked for {list(TRANSCRIPT_COLUMNS)}; "
                                 f"have {have}); set bids.transcript_column, or none")
    elif column == "none":
        column = ""
    else:
        need.append(column)
    utt_column = cfg.utt_id_column
    if utt_column == "auto":
        utt_column = "utt_id" if "utt_id" in have else ""
    elif utt_column:
        need.append(utt_column)
    missing = [c for c in need if c not in have]
    if not rows or missing:
        raise RecordingError(events_file, subject, ",".join(missing) or "rows",
                             f"events.tsv lacks column(s) {missing} (have {have})" if rows else
                             "events.tsv has no rows")
    return events_file, rows, column, utt_column


def _trials(rows: list[dict], events_file: Path, subject: str, column: str, utt_column: str,
            cfg: BidsConfig) -> tuple[list[TrialSpec], list[dict]]:
    """Trial specs and, per trial, its events row (a bad onset/duration marks that trial only)."""
    trials, chosen = [], []
    for i, ev in enumerate(rows):
        if cfg.trial_types and ev.get("trial_type") not in cfg.trial_types:
            continue
        text = ev.get(column, "") if column else ""
        text = "" if text == "n/a" else text
        utt = ev.get(utt_column, "") if utt_column else ""
        try:
            onset, dur = float(ev["onset"]), float(ev["duration"])
            problem = ("", "")
        except ValueError:
            onset, dur = float("nan"), float("nan")
            problem = ("onset", f"events.tsv row {i + 2}: onset {ev['onset']!r} / duration "
                                f"{ev['duration']!r} are not numbers")
        trials.append(TrialSpec(onset, dur, text, task=ev.get("task", ""), utt_id=utt,
                                problem_field=problem[0], problem=problem[1]))
        chosen.append(ev)
    if not trials:
        raise RecordingError(events_file, subject, "trial_type",
                             f"no event has trial_type in {cfg.trial_types} (trial types present: "
                             f"{sorted({r.get('trial_type', '') for r in rows})})")
    return trials, chosen


def _stim_audio(root: Path, trials: list[TrialSpec], rows: list[dict], n_out: int,
                cfg: BidsConfig) -> np.ndarray:
    """A 16 kHz track of the recording's length with each trial's stim_file at its onset.

    A trial whose file is missing or unreadable is marked (quarantined by ingest), the others
    keep their audio.
    """
    track = np.zeros(n_out, dtype=np.float32)
    for tr, ev in zip(trials, rows, strict=True):
        if tr.problem:
            continue
        rel = ev.get(cfg.stim_column, "")
        if rel in ("", "n/a"):
            tr.problem_field, tr.problem = cfg.stim_column, "events.tsv gives no stim_file"
            continue
        f = root / "stimuli" / rel
        try:
            audio, rate = decode_audio(str(f))
        except (FileNotFoundError, AudioDecodeError) as e:
            tr.problem_field = cfg.stim_column
            tr.problem = (f"stim_file {rel!r} does not exist (looked for {f})"
                          if isinstance(e, FileNotFoundError) or not f.exists() else str(e))
            continue
        a = resample_to_16k(audio, rate)
        s = int(round(tr.onset_s * melmod.SAMPLE_RATE))
        if s < 0 or s >= n_out:
            continue  # ingest quarantines a trial outside the recording
        track[s: s + len(a)] = a[: n_out - s]
    return track


def read_bids(path: str | Path, cfg: BidsConfig | None = None) -> Recording:
    """Read one BIDS-iEEG recording with its audio and trials (module docstring)."""
    cfg = cfg or BidsConfig()
    path = Path(path)
    if path.suffix == ".nwb":
        return read_nwb(path, trial_type=cfg.trial_types[0] if cfg.trial_types else "word",
                        transcript_column="word" if cfg.transcript_column in ("auto", "none")
                        else cfg.transcript_column)
    bp = _bids_path(path)
    subject = bp.subject or "?"
    # Events first: a run without usable events fails before its signal is read.
    events_file, rows, column, utt_column = _events(bp, path, subject, cfg)
    trials, chosen = _trials(rows, events_file, subject, column, utt_column, cfg)
    sig = read_bids_signal(path, cfg)
    duration = sig.signal.shape[0] / sig.sfreq

    mode = cfg.audio
    audio_file = path.with_name(cfg.audio_file.format(basename=_recording_name(path)))
    if mode == "auto":
        if sig.audio_channel is not None:
            mode = "channel"
        elif rows and cfg.stim_column in rows[0]:
            mode = "stim_file"
        elif audio_file.exists():
            mode = "file"
        else:
            raise RecordingError(path, subject, "audio",
                                 f"no speech audio found: no channel typed AUDIO or named one of "
                                 f"{list(AUDIO_CHANNEL_NAMES)}, no {cfg.stim_column!r} column in "
                                 f"{events_file.name}, no {audio_file.name} beside the recording; "
                                 "set bids.audio (channel | stim_file | file) and its field")
    if mode == "channel":
        audio = sig.audio_channel
        audio_rate = sig.sfreq
        finite = np.flatnonzero(np.isfinite(audio))
        # An amplifier input that stopped recording reads NaN: the audio ends at its last sample.
        audio = audio[: finite[-1] + 1] if finite.size else audio[:0]
        audio = np.where(np.isfinite(audio), audio, 0.0).astype(np.float32)
        if audio_rate < melmod.SAMPLE_RATE:
            log.warning("%s: audio channel %s at %g Hz carries nothing above %g Hz (mel bands up to "
                        "8 kHz need 16 kHz; a per-run audio file is better)", path,
                        sig.audio_channel_name, audio_rate, audio_rate / 2)
    elif mode == "stim_file":
        if not rows or cfg.stim_column not in rows[0]:
            raise RecordingError(events_file, subject, cfg.stim_column,
                                 f"audio=stim_file but events.tsv has no {cfg.stim_column!r} column "
                                 f"(have {list(rows[0]) if rows else []})")
        audio = _stim_audio(Path(bp.root), trials, chosen,
                            int(round(duration * melmod.SAMPLE_RATE)), cfg)
        audio_rate = float(melmod.SAMPLE_RATE)
    else:
        if not audio_file.exists():
            raise RecordingError(audio_file, subject, "audio_file",
                                 f"audio=file: {audio_file.name} does not exist beside the recording "
                                 f"(bids.audio_file={cfg.audio_file!r})")
        try:
            audio, rate = decode_audio(str(audio_file))
        except AudioDecodeError as e:
            raise RecordingError(audio_file, subject, "audio_file", str(e)) from e
        audio_rate = float(rate)
    metadata = dict(sig.metadata)
    metadata["audio"] = {"source": mode, "rate": audio_rate,
                         "channel": sig.audio_channel_name if mode == "channel" else "",
                         "file": str(audio_file) if mode == "file" else "",
                         "events": str(events_file), "transcript_column": column}
    metadata["trials_source"] = events_file.name
    return Recording(
        subject=subject, recording=sig.recording, path=str(path),
        source_format=f"bids{path.suffix}", signal=sig.signal, sfreq=sig.sfreq, is_raw=True,
        channel_names=sig.channel_names, audio=audio, audio_rate=audio_rate,
        audio_offset_s=0.0, trials=trials, bad_channels=sig.bad_channels,
        line_freq=sig.line_freq, split_rule="contiguous", metadata=metadata,
        channel_types=sig.channel_types,
        channel_groups=metadata["electrodes"].get("groups", {}) if metadata["electrodes"] else {},
    )
