"""Ingest one recording: validate, extract high gamma, align with the mel, cut trials, split,
z-score with train-split statistics, and write its parquet shards.

The per-recording work is plain Python so that it is testable without Ray; Ray Data runs one of
these per recording in ssip.distributed.ingest. Bad content is quarantined at the smallest level
that contains it: a channel (flat, exploding, non-finite throughout), a trial (empty, outside the
recording, overlapping another, NaN/Inf samples, audio/neural mismatch) or, when nothing of the
file can be trusted, the whole file (unreadable, fields missing, wrong sampling rate, audio and
neural durations that disagree). :func:`discover` lists the recordings of a source and
:func:`read_recording` reads one in any supported format.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.signal import resample_poly

from ssip import mel as melmod
from ssip import storage
from ssip.config import check_option, check_range, field
from ssip.data import schema
from ssip.data.bids import BidsConfig, find_recordings, read_bids
from ssip.data.highgamma import high_gamma, resample_features
from ssip.data.readers import NwbConfig, Recording, RecordingError, read_flinker, read_nwb
from ssip.data.reference import REFERENCES, rereference

log = logging.getLogger(__name__)

#: ``ssip ingest`` exit status: every file ingested (quarantined trials or channels do not change
#: it) / some files failed and others landed / nothing landed.
EXIT_OK, EXIT_SOME_FAILED, EXIT_NOTHING_LANDED = 0, 3, 4


@dataclass
class IngestConfig:
    """How recordings become trials. Every field is saved in the ingest manifest."""

    format: str = field("auto", help="auto | nwb | flinker | bids: which recordings under the input "
                                     "to read (bids: any BIDS-iEEG dataset, through MNE-BIDS)")
    margin_s: float = field(0.3, help="s of context kept before and after each trial's speech "
                            "(neural leads speech by 50-200 ms; the likelihood sees both sides)")
    frame_rate: float = field(100.0, help="frames/s of neural features; must equal the mel's 100")
    band_low: float = field(70.0, help="high-gamma band lower edge, Hz")
    band_high: float = field(170.0, help="high-gamma band upper edge, Hz")
    min_raw_sfreq: float = field(400.0, help="raw recordings below this rate cannot carry high gamma")
    val_fraction: float = field(0.1, help="share of the non-test trials for validation: the last "
                                          "ones in time order before the test block (or before "
                                          "the dataset's own test trials)")
    test_fraction: float = field(0.1, help="contiguous split: share of trials (the last in time) "
                                           "for test; a dataset that fixes its test trials "
                                           "(Flinker TestNum_cum) keeps its own")
    flat_std_ratio: float = field(1e-3, help="a channel whose std is below this times the median is flat")
    exploding_std_ratio: float = field(20.0, help="a channel whose std is above this times the median is exploding")
    max_duration_mismatch_s: float = field(1.0, help="audio and neural durations may differ by this much")
    reference: str = field("none", help="re-referencing of raw signals: none | average (common "
                                        "average per electrode group) | bipolar (neighbouring "
                                        "contacts of each sEEG shaft); see ssip.data.reference")
    bids: BidsConfig = field(default_factory=BidsConfig,
                             help="format=bids: entity selection, channel types, audio and trials")
    nwb: NwbConfig = field(default_factory=NwbConfig,
                           help="format=nwb: where the trials come from (events.tsv or Stimulus)")

    def __post_init__(self) -> None:
        check_option("format", self.format, ["auto", "nwb", "flinker", "bids"])
        check_option("reference", self.reference, REFERENCES)
        check_range("margin_s", self.margin_s, 0.0, 5.0)
        check_option("frame_rate", self.frame_rate, [melmod.FRAME_RATE])
        check_range("val_fraction", self.val_fraction, 0.0, 0.5)
        check_range("test_fraction", self.test_fraction, 0.0, 0.5)
        if not 0 < self.band_low < self.band_high:
            raise ValueError(f"band_low={self.band_low}, band_high={self.band_high}: need 0 < low < high")


@dataclass
class RecordingResult:
    """What ingest made of one recording."""

    subject: str
    recording: str
    rows: list[dict]
    quarantine: list[dict]
    metadata: dict


# ---------------------------------------------------------------------------------------------
# Finding and reading recordings (the readers: ssip.data.readers, ssip.data.bids).


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


def read_recording(path: str, fmt: str, bids=None, nwb: NwbConfig | None = None) -> Recording:
    """Read one recording; ``bids`` is the :class:`~ssip.data.bids.BidsConfig` for ``fmt="bids"``,
    ``nwb`` the :class:`~ssip.data.readers.NwbConfig` for ``fmt="nwb"``."""
    if fmt == "nwb":
        nwb = nwb or NwbConfig()
        return read_nwb(path, trial_type=nwb.trial_type, transcript_column=nwb.transcript_column,
                        trials_from=nwb.trials, stimulus_name=nwb.stimulus)
    if fmt == "flinker":
        return read_flinker(path)
    if fmt == "bids":
        return read_bids(path, bids)
    raise ValueError(f"format={fmt!r} is not allowed; choose one of ['nwb', 'flinker', 'bids']")


# ---------------------------------------------------------------------------------------------
# One recording -> trials.


def _q(rec: Recording, level: str, field_name: str, reason: str, trial_id: str = "") -> dict:
    log.warning("quarantine %s subject=%s file=%s trial=%s field=%s: %s",
                level, rec.subject, rec.path, trial_id or "-", field_name, reason)
    return {
        "subject": rec.subject, "recording": rec.recording, "source_file": rec.path,
        "level": level, "trial_id": trial_id, "field": field_name, "reason": reason,
    }


def file_quarantine_row(path: str, subject: str, field_name: str, reason: str) -> dict:
    return {"subject": subject, "recording": "", "source_file": path, "level": "file",
            "trial_id": "", "field": field_name, "reason": reason}


def _resample_audio(audio: np.ndarray, rate: float) -> np.ndarray:
    if rate == melmod.SAMPLE_RATE:
        return audio.astype(np.float32)
    from fractions import Fraction

    frac = Fraction(melmod.SAMPLE_RATE / rate).limit_denominator(1000)
    return resample_poly(audio, frac.numerator, frac.denominator).astype(np.float32)


def assign_splits(rec: Recording, kept: list[int], cfg: IngestConfig) -> dict[int, str]:
    """Split kept trial indices (given in time order) into train/val/test, never by random frames.

    given (a dataset that fixes its test set, e.g. Flinker's last ``TestNum_cum`` rows): the
    trials marked test are test; of the others, the last ``val_fraction`` in time order are
    validation, the rest train. Validation never comes out of the test trials.
    contiguous: in time order, the first trials are train, then a val block, the last
    ``test_fraction`` are test.
    """
    splits: dict[int, str] = {}
    if rec.split_rule == "given":
        test = [i for i in kept if rec.trials[i].split == "test"]
        rest = [i for i in kept if rec.trials[i].split != "test"]
        n_val = int(round(len(rest) * cfg.val_fraction))
        splits.update({i: "test" for i in test})
        splits.update({i: "val" if j >= len(rest) - n_val else "train" for j, i in enumerate(rest)})
        return splits
    n = len(kept)
    n_test = int(round(n * cfg.test_fraction))
    n_val = int(round(n * cfg.val_fraction))
    for j, i in enumerate(kept):
        splits[i] = "test" if j >= n - n_test else ("val" if j >= n - n_test - n_val else "train")
    return splits


def split_rule_text(rec: Recording, cfg: IngestConfig) -> str:
    """The split rule in words, for the manifest."""
    if rec.split_rule == "given":
        return rec.metadata.get("split_rule", "given: the dataset's own test trials") + \
            f" (val_fraction={cfg.val_fraction})"
    return (f"contiguous in time order: train, then the last val_fraction={cfg.val_fraction} "
            f"before test, then the last test_fraction={cfg.test_fraction} as test")


def _channel_checks(rec: Recording, cfg: IngestConfig, quarantine: list[dict]) -> np.ndarray:
    """Boolean mask of channels to keep; drops bads from the sidecar and flat/exploding ones."""
    x = rec.signal
    keep = np.ones(x.shape[1], dtype=bool)
    bad = set(rec.bad_channels)
    for c, name in enumerate(rec.channel_names):
        if name in bad:
            keep[c] = False
    finite = np.isfinite(x)
    frac_bad = 1.0 - finite.mean(axis=0)
    for c in np.flatnonzero(keep & (frac_bad > 0.5)):
        keep[c] = False
        quarantine.append(_q(rec, "channel", rec.channel_names[c], f"{frac_bad[c]:.0%} of samples are NaN/Inf"))
    std = np.array([np.nanstd(np.where(finite[:, c], x[:, c], np.nan)) if keep[c] else np.nan
                    for c in range(x.shape[1])])
    med = np.nanmedian(std[keep]) if keep.any() else np.nan
    for c in np.flatnonzero(keep):
        if not np.isfinite(med) or med <= 0:
            break
        if std[c] < cfg.flat_std_ratio * med:
            keep[c] = False
            quarantine.append(_q(rec, "channel", rec.channel_names[c],
                                 f"flat channel: std {std[c]:.3g} < {cfg.flat_std_ratio} x median {med:.3g}"))
        elif std[c] > cfg.exploding_std_ratio * med:
            keep[c] = False
            quarantine.append(_q(rec, "channel", rec.channel_names[c],
                                 f"exploding channel: std {std[c]:.3g} > {cfg.exploding_std_ratio} x median {med:.3g}"))
    return keep


def process_recording(rec: Recording, cfg: IngestConfig) -> RecordingResult:
    """Turn one recording into trial rows (not yet z-scored stats applied) and quarantine rows.

    Raises RecordingError when nothing of the recording can be used.
    """
    quarantine: list[dict] = []
    fr = cfg.frame_rate
    if rec.is_raw and rec.sfreq < cfg.min_raw_sfreq:
        raise RecordingError(rec.path, rec.subject, "sfreq",
                             f"{rec.sfreq} Hz is too low for {cfg.band_low}-{cfg.band_high} Hz high gamma "
                             f"(need >= {cfg.min_raw_sfreq} Hz)")
    if rec.signal.shape[0] == 0 or rec.signal.shape[1] == 0:
        raise RecordingError(rec.path, rec.subject, "signal", f"empty signal of shape {rec.signal.shape}")
    audio = _resample_audio(rec.audio, rec.audio_rate)
    audio_dur = len(audio) / melmod.SAMPLE_RATE + rec.audio_offset_s
    if abs(audio_dur - rec.duration_s) > cfg.max_duration_mismatch_s:
        src = rec.metadata.get("audio", {})
        what = (f"audio channel {src['channel']!r}" if src.get("channel") else
                f"audio file {src['file']}" if src.get("file") else "audio")
        raise RecordingError(rec.path, rec.subject, "audio",
                             f"{what} ends at {audio_dur:.2f} s but neural at {rec.duration_s:.2f} s "
                             f"(tolerance {cfg.max_duration_mismatch_s} s): wrong sampling rate or a cut file?")

    keep = _channel_checks(rec, cfg, quarantine)
    if not keep.any():
        raise RecordingError(rec.path, rec.subject, "channels", "no usable channel left after bad/flat/exploding checks")
    sig = rec.signal[:, keep]
    names = [n for n, k in zip(rec.channel_names, keep, strict=True) if k]
    finite = np.isfinite(sig).all(axis=1)  # (n_samples,)
    if not finite.all():
        sig = np.where(np.isfinite(sig), sig, 0.0).astype(np.float32)
    reference = {"scheme": "none"}
    if rec.is_raw and cfg.reference != "none":
        types = [t for t, k in zip(rec.channel_types or ["ecog"] * len(keep), keep, strict=True) if k]
        try:
            ref = rereference(sig, rec.sfreq, names, types, cfg.reference, rec.channel_groups)
        except ValueError as e:
            raise RecordingError(rec.path, rec.subject, "reference", str(e)) from e
        sig, names, reference = ref.signal, ref.names, ref.info

    # Features at 100 Hz; frame k is centred at k / 100 s (same as mel frame k).
    if rec.is_raw:
        feats = high_gamma(sig, rec.sfreq, band=(cfg.band_low, cfg.band_high), line_freq=rec.line_freq, frame_rate=fr)
    else:
        feats = resample_features(sig, rec.sfreq, fr)
    n_feat = feats.shape[0]
    # Non-finite samples corrupt everything the filters touch near them: mark those frames
    # (plus 0.25 s each side for filter transients) so overlapping trials are quarantined.
    bad_frames = np.zeros(n_feat, dtype=bool)
    if not finite.all():
        bad_idx = np.flatnonzero(~finite)
        pad = int(0.25 * fr) + 1
        frames = (bad_idx / rec.sfreq * fr).astype(int)
        for f0 in np.unique(frames):
            bad_frames[max(0, f0 - pad): f0 + pad + 1] = True

    kept: list[int] = []
    windows: dict[int, tuple[int, int]] = {}
    prev_end = -np.inf
    prev_id = ""
    # Checks run in TIME order: public files need not list trials by onset (Flinker's test rows
    # come last). Trial ids keep the file's row index.
    order = sorted(range(len(rec.trials)), key=lambda k: (
        rec.trials[k].onset_s if np.isfinite(rec.trials[k].onset_s) else np.inf, k))
    for i in order:
        tr = rec.trials[i]
        tid = f"{rec.recording}/{i:04d}"
        if tr.problem:
            quarantine.append(_q(rec, "trial", tr.problem_field or "trial", tr.problem, tid))
            continue
        if not np.isfinite(tr.onset_s) or not np.isfinite(tr.duration_s) or tr.duration_s * fr < 1:
            quarantine.append(_q(rec, "trial", "duration", f"empty trial (onset {tr.onset_s}, duration {tr.duration_s} s)", tid))
            continue
        if tr.onset_s < prev_end:
            quarantine.append(_q(rec, "trial", "onset", f"overlaps trial {prev_id} (starts {tr.onset_s:.3f} s before it ends {prev_end:.3f} s)", tid))
            prev_end = max(prev_end, tr.onset_s + tr.duration_s)
            continue
        prev_end, prev_id = tr.onset_s + tr.duration_s, tid
        f0 = int(round((tr.onset_s - cfg.margin_s) * fr))
        f1 = int(round((tr.onset_s + tr.duration_s + cfg.margin_s) * fr))
        a0 = int(round((tr.onset_s - cfg.margin_s - rec.audio_offset_s) * melmod.SAMPLE_RATE))
        if f0 < 0 or f1 > n_feat or a0 < 0 or a0 + (f1 - f0) * melmod.HOP_LENGTH > len(audio):
            quarantine.append(_q(rec, "trial", "onset", f"window {tr.onset_s - cfg.margin_s:.3f}-{tr.onset_s + tr.duration_s + cfg.margin_s:.3f} s lies outside the recording (0-{rec.duration_s:.3f} s neural, audio {audio_dur:.3f} s)", tid))
            continue
        if bad_frames[f0:f1].any():
            quarantine.append(_q(rec, "trial", "neural", "NaN/Inf samples inside the trial window", tid))
            continue
        windows[i] = (f0, f1)
        kept.append(i)
    if not kept:
        raise RecordingError(rec.path, rec.subject, "trials", f"no usable trial among {len(rec.trials)}")

    splits = assign_splits(rec, kept, cfg)
    train = [i for i in kept if splits[i] == "train"] or kept
    train_frames = np.concatenate([feats[windows[i][0]: windows[i][1]] for i in train])
    mean = train_frames.mean(axis=0)
    std = train_frames.std(axis=0)
    std = np.where(std > 0, std, 1.0)

    rows = []
    for i in kept:
        tr = rec.trials[i]
        f0, f1 = windows[i]
        n = f1 - f0
        a0 = int(round((tr.onset_s - cfg.margin_s - rec.audio_offset_s) * melmod.SAMPLE_RATE))
        clip = melmod.normalize_loudness(audio[a0: a0 + n * melmod.HOP_LENGTH])
        m = melmod.log_mel(clip).numpy()  # (80, n)
        neural = ((feats[f0:f1] - mean) / std).astype(np.float32)
        rows.append({
            "subject": rec.subject, "recording": rec.recording, "trial_id": f"{rec.recording}/{i:04d}",
            "trial_index": i, "split": splits[i], "task": tr.task, "transcript": tr.transcript,
            "utt_id": tr.utt_id, "onset_s": f0 / fr, "speech_onset_s": tr.onset_s,
            "speech_duration_s": tr.duration_s, "n_frames": n, "n_electrodes": neural.shape[1],
            "frame_rate": fr, "neural": neural, "mel": m.astype(np.float32), "audio": clip,
            "mel_version": melmod.MEL_VERSION, "source_format": rec.source_format, "source_file": rec.path,
        })
    metadata = {
        "subject": rec.subject, "recording": rec.recording, "source_file": rec.path,
        "source_format": rec.source_format, "source_sfreq": rec.sfreq, "is_raw": rec.is_raw,
        "line_freq": rec.line_freq, "frame_rate": fr, "channels": names,
        "bad_channels": list(rec.bad_channels), "reference": reference,
        "dropped_channels": [q["field"] for q in quarantine if q["level"] == "channel"],
        "zscore_mean": mean.tolist(), "zscore_std": std.tolist(), "zscore_split": "train",
        "n_trials": len(rows), "n_quarantined": len(quarantine),
        "split_rule": split_rule_text(rec, cfg),
        "splits": {s: sum(1 for r in rows if r["split"] == s) for s in schema.SPLITS},
        "mel_version": melmod.MEL_VERSION, "schema_version": schema.SCHEMA_VERSION,
        **({"source": rec.metadata} if rec.metadata else {}),
    }
    return RecordingResult(rec.subject, rec.recording, rows, quarantine, metadata)


def ingest_status(manifest: dict) -> tuple[int, str]:
    """(exit status, verdict in words) of an ingest manifest (``EXIT_*``)."""
    recs = manifest["recordings"]
    landed = [r for r in recs if r["status"] == "ok" and r["n_trials"] > 0]
    if not landed:
        return EXIT_NOTHING_LANDED, "NOTHING LANDED"
    if len(landed) < len(recs):
        return EXIT_SOME_FAILED, f"SOME FILES FAILED ({len(recs) - len(landed)} of {len(recs)})"
    return EXIT_OK, "all files ingested"


def write_result(out: str, res: RecordingResult) -> list[str]:
    """Write one recording's shards whole; returns the URIs written (relative to ``out``)."""
    written = []
    for split in schema.SPLITS:
        rows = [r for r in res.rows if r["split"] == split]
        rel = f"trials/{res.subject}/{res.recording}-{split}.parquet"
        if rows:
            storage.write_parquet(storage.join(out, rel), schema.trials_table(rows))
            written.append(rel)
        else:
            storage.delete(storage.join(out, rel))  # a stale shard of an earlier run
    rel = f"quarantine/{res.subject}/{res.recording}.parquet"
    storage.write_parquet(storage.join(out, rel), schema.quarantine_table(res.quarantine))
    written.append(rel)
    rel = f"recordings/{res.subject}/{res.recording}.json"
    storage.write_json(storage.join(out, rel), res.metadata)
    written.append(rel)
    return written
