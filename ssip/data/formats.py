"""Writers of the simulated corpus in the layouts of two public datasets, plus the ground truth.

- :func:`write_bids_subject` mimics the iBIDS release of Verwoert et al. 2022 ("Dataset of speech
  production in intracranial electroencephalography", Sci Data 9:454; OSF/DataverseNL
  SingleWordProductionDutch): ``sub-XX/ieeg/sub-XX_task-wordProduction_ieeg.nwb`` whose
  acquisition holds ``iEEG`` (samples, channels) with ABSOLUTE clock timestamps and ``Audio``,
  beside BIDS ``_channels.tsv``, ``_events.tsv`` (onsets relative to the recording start) and
  ``_ieeg.json``; per-sample float64 clock timestamps (Unix-epoch size) for iEEG and Audio and a
  ``Stimulus`` acquisition (the word at each iEEG sample, "" between words). Differences from the
  real files: audio at 16 kHz (theirs 48 kHz), prompts of one or more words.
- :func:`write_bids_ieeg_subject` writes the subject as a plain BIDS-iEEG dataset through
  MNE-BIDS (``write_raw_bids``, BrainVision), as most labs' recordings are: ``_ieeg.vhdr/.eeg/
  .vmrk`` (ECoG in µV, bad channels marked in channels.tsv, PowerLineFrequency in the sidecar),
  an ``_events.tsv`` with the prompts (trial_type word, word, utt_id, task) and the speech either
  as one 32-bit float WAV per run beside the recording (``{basename}_audio.wav``, the exact
  simulated track; listed in ``.bidsignore``) or as one WAV per prompt under ``stimuli/`` named by
  events.tsv's ``stim_file`` column (the perception-dataset layout).
- :func:`write_flinker` mimics HB02.h5 of Chen et al. 2024 (Flinker lab, Mendeley fp4bv9gtwk
  v2): ``ecog_alldataset`` high gamma at 125 Hz of the good electrodes, ``wave_re_alldataset``,
  trial start/end as 125 Hz frame indices, ``label_alldataset`` (bytes), ``TestNum_cum`` of
  shape (1,) = the number of test trials, which are the last rows: the rows are the train trials
  of every task, then the test trials of every task (the last ``test_per_task`` of each), as the
  public file's builder writes them. Formant, pitch, intensity and spectrogram datasets of the
  real file are not written.
- :func:`write_ground_truth` stores what the simulation knows: envelope, encoding-model
  parameters, masks (``.npz``, plain arrays, no pickle) and scalars (``.json``).

Units: the raw iEEG is in microvolts, written with NWB ``unit="uV"`` and ``conversion=1.0``
and ``units="uV"`` in channels.tsv.
"""

from __future__ import annotations

import csv
import json
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ssip import mel as melmod
from ssip.data.highgamma import high_gamma

if TYPE_CHECKING:
    from ssip.data.simulate import SimulatedSubject

#: Absolute clock of the first sample, s (Verwoert's NWB timestamps are absolute clock values).
#: An integer, so that t0 + n / 1024 is exact in float64.
START_CLOCK_S = 1_700_000_000.0
TASK_NAME = "wordProduction"
BIDS_VERSION = "1.9.0"
#: Flinker-lab ECoG feature rate, Hz.
FLINKER_FRAME_RATE = 125.0
#: gzip level 1 with byte shuffle: most of the size gain of higher levels at a fraction of the time
#: (noise-like float32 barely compresses; the zero gaps of the audio do).
_COMPRESSION = {"compression": "gzip", "compression_opts": 1, "shuffle": True}


def _chunks(shape: tuple[int, ...]) -> tuple[int, ...]:
    # About 1 MiB of float32 per chunk, whole rows of channels (time-major reads).
    if len(shape) == 1:
        return (min(shape[0], 2**18),)
    return (max(1, min(shape[0], 2**18 // max(1, shape[1]))), shape[1])


def _write_tsv(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh, delimiter="\t", lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


def write_bids_dataset(root: str | Path, n_subjects: int, config_hash: str) -> list[Path]:
    """Write ``dataset_description.json`` and ``participants.tsv`` at the BIDS root."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    desc = {
        "Name": "ssip simulated speech-production iEEG (real prompts, simulated responses)",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "raw",
        "License": "CC-BY-SA-3.0 (asterisk prompts) / BSD-2-Clause (pocketsphinx); see corpus.json",
        "GeneratedBy": [{"Name": "ssip corpus build", "Description": f"config hash {config_hash}"}],
        "HowToAcknowledge": "Layout after Verwoert et al. 2022, Sci Data 9:454.",
    }
    paths = [root / "dataset_description.json", root / "participants.tsv"]
    paths[0].write_text(json.dumps(desc, indent=2) + "\n")
    _write_tsv(paths[1], ["participant_id"], [[f"sub-sim{i + 1:02d}"] for i in range(n_subjects)])
    return paths


def write_bids_subject(sim: SimulatedSubject, root: str | Path,
                       start_clock: float | None = None) -> list[Path]:
    """Write one subject as iBIDS: NWB recording, channels/events TSVs and the ieeg.json sidecar.

    Parameters
    ----------
    sim : SimulatedSubject
    root : path
        BIDS root; files go to ``root/sub-<label>/ieeg/``.
    start_clock : float, optional
        Absolute clock time of the first sample, s (default ``START_CLOCK_S``).

    Returns
    -------
    list of Path
        The files written.
    """
    from pynwb import NWBHDF5IO, H5DataIO, NWBFile, TimeSeries
    from pynwb.file import Subject


    t0 = START_CLOCK_S if start_clock is None else float(start_clock)
    base = Path(root) / f"sub-{sim.subject}" / "ieeg"
    base.mkdir(parents=True, exist_ok=True)
    stem = f"sub-{sim.subject}_task-{TASK_NAME}"
    n_samples, n_channels = sim.raw.shape
    # Absolute clock timestamps, as in the real files; t0 + n / sfreq in float64.
    timestamps = t0 + np.arange(n_samples, dtype=np.float64) / sim.sfreq
    start = datetime.fromtimestamp(t0, tz=UTC)
    nwb = NWBFile(
        session_description=f"simulated {TASK_NAME}: subject {sim.subject} speaks real prompts; "
                            "iEEG simulated by ssip.data.simulate",
        identifier=f"ssip-sim-{sim.subject}",
        session_start_time=start,
        file_create_date=start,  # fixed, so a rebuild gives the same file contents
        subject=Subject(subject_id=sim.subject, description="simulated subject"),
    )
    nwb.add_acquisition(TimeSeries(
        name="iEEG",
        data=H5DataIO(sim.raw, chunks=_chunks(sim.raw.shape), **_COMPRESSION),
        unit="uV",
        conversion=1.0,
        timestamps=H5DataIO(timestamps, chunks=_chunks(timestamps.shape), **_COMPRESSION),
        description=f"raw iEEG, {n_channels} ECoG channels (names and status in "
                    f"{stem}_channels.tsv), microvolts",
    ))
    # Per-sample clock timestamps for the audio too, as in the real files (their 48 kHz steps
    # are not exact in float64 at this magnitude: a reader must use the whole span).
    audio_stamps = t0 + np.arange(len(sim.audio), dtype=np.float64) / melmod.SAMPLE_RATE
    nwb.add_acquisition(TimeSeries(
        name="Audio",
        data=H5DataIO(sim.audio, chunks=_chunks(sim.audio.shape), **_COMPRESSION),
        unit="a.u.",
        timestamps=H5DataIO(audio_stamps, chunks=_chunks(audio_stamps.shape), **_COMPRESSION),
        description="speech audio at 16 kHz, loudness-normalised per prompt, full scale +-1",
    ))
    # The word of each prompt at every iEEG sample it spans, "" between prompts (Verwoert's
    # Stimulus acquisition; their extract_features.py reads the words from it).
    words = np.full(n_samples, b"", dtype=f"S{max([1, *(len(t.transcript.encode()) for t in sim.trials)])}")
    for tr in sim.trials:
        a = int(round(tr.onset_s * sim.sfreq))
        words[a: a + int(round(tr.duration_s * sim.sfreq))] = tr.transcript.encode()
    nwb.add_acquisition(TimeSeries(
        name="Stimulus",
        data=H5DataIO(words, chunks=_chunks(words.shape), **_COMPRESSION),
        unit="n/a",
        timestamps=nwb.acquisition["iEEG"],  # the iEEG's timestamps, linked
        description="the word being spoken at each iEEG sample (empty between words)",
    ))
    nwb_path = base / f"{stem}_ieeg.nwb"
    with NWBHDF5IO(str(nwb_path), mode="w") as io:
        io.write(nwb)

    channels = base / f"{stem}_channels.tsv"
    _write_tsv(channels, ["name", "type", "units", "sampling_frequency", "status",
                          "status_description"], [
        [name, "ECOG", "uV", f"{sim.sfreq:g}", "bad" if sim.bad[e] else "good",
         f"simulated {sim.bad_kind[e]} channel" if sim.bad[e] else "n/a"]
        for e, name in enumerate(sim.channel_names)
    ])

    events = base / f"{stem}_events.tsv"
    rows, prev_end = [], 0.0
    for tr in sim.trials:
        rows.append([f"{prev_end:.6f}", f"{tr.onset_s - prev_end:.6f}", "fixation",
                     "n/a", "n/a", "n/a"])
        rows.append([f"{tr.onset_s:.6f}", f"{tr.duration_s:.6f}", "word", tr.transcript,
                     tr.utt_id, str(tr.task)])
        prev_end = tr.onset_s + tr.duration_s
    rows.append([f"{prev_end:.6f}", f"{n_samples / sim.sfreq - prev_end:.6f}", "fixation",
                 "n/a", "n/a", "n/a"])
    _write_tsv(events, ["onset", "duration", "trial_type", "word", "utt_id", "task"], rows)

    sidecar = base / f"{stem}_ieeg.json"
    sidecar.write_text(json.dumps({
        "TaskName": TASK_NAME,
        "SamplingFrequency": sim.sfreq,
        "PowerLineFrequency": sim.line_freq,
        "SoftwareFilters": "n/a",
        "iEEGReference": "simulated (no reference)",
        "ECOGChannelCount": n_channels,
        "RecordingDuration": round(n_samples / sim.sfreq, 6),
        "RecordingType": "continuous",
    }, indent=2) + "\n")
    return [nwb_path, channels, events, sidecar]


#: Where the simulated corpus keeps its MNE-BIDS (BrainVision) tree, beside the iBIDS NWB one.
BIDS_IEEG_DIR = "bids-brainvision"


def write_bids_ieeg_dataset(root: str | Path, config_hash: str) -> Path:
    """``dataset_description.json`` of the BrainVision tree (MNE-BIDS's writer)."""
    from mne_bids import make_dataset_description

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    make_dataset_description(
        path=root, name="ssip simulated speech-production iEEG (real prompts, simulated responses)",
        dataset_type="raw", data_license="CC-BY-SA-3.0 (asterisk prompts); see ../corpus.json",
        authors=["ssip corpus build"], generated_by=[{"Name": "ssip corpus build",
                                                      "Description": f"config hash {config_hash}"}],
        overwrite=True, verbose="error")
    return root / "dataset_description.json"


def write_bids_ieeg_subject(sim: SimulatedSubject, root: str | Path, *,
                            audio: str = "file", fmt: str = "BrainVision") -> list[Path]:
    """Write one subject as BIDS-iEEG (BrainVision) through MNE-BIDS; see the module docstring.

    Parameters
    ----------
    sim : SimulatedSubject
    root : path
        BIDS root (``dataset_description.json`` is written by MNE-BIDS when missing).
    audio : str
        ``file`` (one WAV per run beside the recording) or ``stim_file`` (a WAV per prompt
        under ``root/stimuli/``, named in events.tsv).
    fmt : str
        MNE-BIDS raw format: ``BrainVision`` (float32, exact) or ``EDF`` (16-bit per channel
        over its own range; needs the edfio package).

    Returns
    -------
    list of Path
        The recording's files (header, data, markers, sidecars, audio).
    """
    import mne
    import soundfile as sf
    from mne_bids import BIDSPath, write_raw_bids

    if audio not in ("file", "stim_file"):
        raise ValueError(f"audio={audio!r} is not allowed; choose one of ['file', 'stim_file']")
    root = Path(root)
    info = mne.create_info(list(sim.channel_names), sim.sfreq, "ecog")
    info["line_freq"] = sim.line_freq
    raw = mne.io.RawArray(sim.raw.T.astype(np.float64) * 1e-6, info, verbose="error")  # µV -> V
    raw.info["bads"] = [n for n, b in zip(sim.channel_names, sim.bad, strict=True) if b]
    raw.set_meas_date(None)  # no clock time: a rebuild writes the same files
    bp = BIDSPath(subject=sim.subject, task=TASK_NAME, datatype="ieeg", root=root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MNE-BIDS warns about optional fields a simulation lacks
        write_raw_bids(raw, bp, format=fmt, allow_preload=True, overwrite=True, verbose="error")
    del raw
    base = root / f"sub-{sim.subject}" / "ieeg"
    stem = f"sub-{sim.subject}_task-{TASK_NAME}"
    files = sorted(base.glob(f"{stem}_*"))
    header = ["onset", "duration", "trial_type", "word", "utt_id", "task"]
    rows = []
    for tr in sim.trials:
        rows.append([f"{tr.onset_s:.6f}", f"{tr.duration_s:.6f}", "word", tr.transcript,
                     tr.utt_id, str(tr.task)])
    if audio == "file":
        wav = base / f"{stem}_audio.wav"
        sf.write(wav, sim.audio, melmod.SAMPLE_RATE, subtype="FLOAT")
        files.append(wav)
        ignore = root / ".bidsignore"
        lines = ignore.read_text().splitlines() if ignore.exists() else []
        if "*_audio.wav" not in lines:
            ignore.write_text("\n".join([*lines, "*_audio.wav"]) + "\n")
    else:
        header.append("stim_file")
        (root / "stimuli").mkdir(parents=True, exist_ok=True)
        for tr, row in zip(sim.trials, rows, strict=True):
            s0 = int(round(tr.onset_s * melmod.SAMPLE_RATE))
            clip = sim.audio[s0: s0 + int(round(tr.duration_s * melmod.SAMPLE_RATE))]
            rel = f"sub-{sim.subject}/{tr.utt_id.replace('/', '_')}.wav"
            (root / "stimuli" / rel).parent.mkdir(parents=True, exist_ok=True)
            sf.write(root / "stimuli" / rel, clip, melmod.SAMPLE_RATE, subtype="FLOAT")
            row.append(rel)
    events = base / f"{stem}_events.tsv"
    _write_tsv(events, header, rows)
    (base / f"{stem}_events.json").write_text(json.dumps({
        "trial_type": {"Description": "word: a spoken prompt"},
        "word": {"Description": "what was said (the prompt's transcript)"},
        "utt_id": {"Description": "speech corpus utterance id of the prompt"},
        "task": {"Description": "task block (1-based)"},
        **({"stim_file": {"Description": "the prompt's audio, relative to stimuli/"}}
           if audio == "stim_file" else {}),
    }, indent=2) + "\n")
    return sorted({*files, events})


def write_flinker(sim: SimulatedSubject, path: str | Path, test_per_task: int = 10) -> Path:
    """Write one subject in the Flinker-lab HB02.h5 layout (Chen et al. 2024).

    ``ecog_alldataset`` is high gamma of the GOOD electrodes computed from the raw signal with
    :func:`ssip.data.highgamma.high_gamma` at 125 frames/s (frame ``k`` at ``k / 125`` s). Trial
    bounds are the prompt's extent in 125 Hz frames: ``start = round(onset * 125)``,
    ``end = round((onset + duration) * 125)``. The last ``test_per_task`` trials of each task
    (at most all but one) are the test rows, written after every task's train rows;
    ``TestNum_cum = [number of test rows]``.

    Returns
    -------
    Path
        The file written.
    """
    import h5py

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    good = np.flatnonzero(sim.good)
    # All channels, then keep the good ones: indexing raw first would copy it (~250 MB).
    ecog = high_gamma(sim.raw, sim.sfreq, line_freq=sim.line_freq,
                      frame_rate=FLINKER_FRAME_RATE)[:, good]  # (frames, good electrodes)
    tasks = np.array([t.task for t in sim.trials])
    # The last test_per_task trials of each task are test; rows: every task's train trials, then
    # every task's test trials (start indices jump back in time at the first test row).
    is_test = np.zeros(len(tasks), dtype=bool)
    for k in np.unique(tasks):
        idx = np.flatnonzero(tasks == k)
        is_test[idx[len(idx) - min(test_per_task, len(idx) - 1):]] = True
    rows = np.r_[np.flatnonzero(~is_test), np.flatnonzero(is_test)]
    onset = np.array([sim.trials[i].onset_s for i in rows])
    offset = onset + np.array([sim.trials[i].duration_s for i in rows])
    with h5py.File(path, "w") as f:
        f.create_dataset("ecog_alldataset", data=ecog.astype(np.float32),
                         chunks=_chunks(ecog.shape), **_COMPRESSION)
        f.create_dataset("wave_re_alldataset", data=sim.audio[:, None].astype(np.float32),
                         chunks=(min(len(sim.audio), 2**18), 1), **_COMPRESSION)
        f.create_dataset("start_ind_re_valid_alldataset",
                         data=np.rint(onset * FLINKER_FRAME_RATE).astype(np.int64))
        f.create_dataset("end_ind_re_valid_alldataset",
                         data=np.rint(offset * FLINKER_FRAME_RATE).astype(np.int64))
        f.create_dataset("label_alldataset",
                         data=np.array([sim.trials[i].transcript.encode() for i in rows]))
        f.create_dataset("TestNum_cum", data=np.array([int(is_test.sum())], dtype=np.int64))
        f.attrs["sfreq_ecog"] = FLINKER_FRAME_RATE
        f.attrs["sfreq_audio"] = float(melmod.SAMPLE_RATE)
        f.attrs["subject"] = sim.subject
        f.attrs["electrodes"] = [sim.channel_names[e] for e in good]
        f.attrs["ecog_unit"] = "uV (mean 70-170 Hz Hilbert amplitude)"
    return path


def write_ground_truth(sim: SimulatedSubject, folder: str | Path) -> list[Path]:
    """Write ``sub-<label>.npz`` (arrays) and ``sub-<label>.json`` (scalars) of the ground truth.

    The npz holds only plain numeric, bool and fixed-width unicode arrays, so
    ``np.load(path)`` works with the default ``allow_pickle=False``. Keys (C electrodes, T mel
    frames at 100 Hz): ``envelope`` (T, C) µV; ``mel`` (80, T); ``spectral`` (C, 80);
    ``temporal`` (C, 19); ``lead_s``, ``slope``, ``threshold``, ``gain`` (C,);
    ``unresponsive``, ``bad`` (C,) bool; ``bad_kind``, ``channel_names`` (C,) str;
    ``background_band_rms``, ``aperiodic_exponent``, ``line_amplitude`` (C,);
    ``trial_onset_s``, ``trial_duration_s``, ``trial_task`` (n_trials,); ``utt_id``,
    ``transcript`` (n_trials,) str.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    m = sim.model
    arrays = {
        "envelope": sim.envelope.astype(np.float32),
        "mel": sim.mel.astype(np.float32),
        "spectral": m.spectral, "temporal": m.temporal, "lead_s": m.lead_s, "slope": m.slope,
        "threshold": m.threshold, "gain": m.gain,
        "unresponsive": sim.unresponsive, "bad": sim.bad,
        "bad_kind": np.array(sim.bad_kind, dtype="U8"),
        "channel_names": np.array(sim.channel_names, dtype="U16"),
        "background_band_rms": sim.background_band_rms,
        "aperiodic_exponent": sim.aperiodic_exponent,
        "line_amplitude": sim.line_amplitude,
        "trial_onset_s": np.array([t.onset_s for t in sim.trials]),
        "trial_duration_s": np.array([t.duration_s for t in sim.trials]),
        "trial_task": np.array([t.task for t in sim.trials], dtype=np.int64),
        "utt_id": np.array([t.utt_id for t in sim.trials], dtype=str),
        "transcript": np.array([t.transcript for t in sim.trials], dtype=str),
    }
    npz = folder / f"sub-{sim.subject}.npz"
    np.savez_compressed(npz, **arrays)
    scalars = {
        "subject": sim.subject,
        "n_electrodes": int(sim.raw.shape[1]),
        "n_good": int(sim.good.sum()),
        "n_bad": int(sim.bad.sum()),
        "n_unresponsive": int(sim.unresponsive.sum()),
        "n_trials": len(sim.trials),
        "n_tasks": sim.n_tasks,
        "duration_s": sim.duration_s,
        "sfreq": sim.sfreq,
        "line_freq": sim.line_freq,
        "frame_rate": melmod.FRAME_RATE,
        "snr_db": sim.snr_db,
        "snr_scale": sim.scale,
        "units": "uV",
        "mel_version": melmod.MEL_VERSION,
    }
    js = folder / f"sub-{sim.subject}.json"
    js.write_text(json.dumps(scalars, indent=2) + "\n")
    return [npz, js]

