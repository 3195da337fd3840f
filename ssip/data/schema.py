"""The versioned parquet schema of ingested trials and of the quarantine table.

Arrays are stored as Ray Data's variable-shape tensor extension (one tensor per row, each with
its own shape), not nested lists: nested lists come back from Ray Data as object arrays of
arrays, tensors come back as ndarrays (DESIGN.md section 7). Readers without Ray see the
extension's storage (a struct of flat data and shape).

Dataset layout under an ingest root (local path or s3:// URI)::

    ROOT/manifest.json                                 written LAST; lists every file below
    ROOT/trials/<subject>/<recording>-<split>.parquet  one row per trial (TRIAL_COLUMNS)
    ROOT/quarantine/<subject>/<recording>.parquet      one row per rejected trial/channel/file
    ROOT/recordings/<subject>/<recording>.json         sampling metadata, channels, z-score stats
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from ray.data.extensions import ArrowVariableShapedTensorArray

SCHEMA_VERSION = "ssip-trials-v1"
SPLITS = ("train", "val", "test")

#: column -> (arrow type or "tensor", description). "tensor" columns hold one ndarray per row.
TRIAL_COLUMNS: dict[str, tuple[object, str]] = {
    "schema_version": (pa.string(), "SCHEMA_VERSION of the writer"),
    "subject": (pa.string(), "subject label"),
    "recording": (pa.string(), "recording key (file stem) within the subject"),
    "trial_id": (pa.string(), "unique trial id: '<recording>/<index:04d>'"),
    "trial_index": (pa.int32(), "position of the trial in its recording"),
    "split": (pa.string(), "train | val | test"),
    "task": (pa.string(), "task or block label"),
    "transcript": (pa.string(), "what was said"),
    "utt_id": (pa.string(), "id of the spoken utterance (empty if unknown)"),
    "onset_s": (pa.float64(), "window start in s from the recording start"),
    "speech_onset_s": (pa.float64(), "speech start in s from the recording start"),
    "speech_duration_s": (pa.float64(), "speech duration in s"),
    "n_frames": (pa.int32(), "frames T of the window at frame_rate"),
    "n_electrodes": (pa.int32(), "electrodes C kept"),
    "frame_rate": (pa.float32(), "frames per second of neural and mel (100)"),
    "neural": ("tensor", "(T, C) float32 high-gamma, z-scored with train-split stats"),
    "mel": ("tensor", "(80, T) float32 ssip log-mel (ssip.mel) of the loudness-normalised audio"),
    "audio": ("tensor", "(T*160,) float32 16 kHz audio of the window, loudness-normalised"),
    "mel_version": (pa.string(), "ssip.mel.MEL_VERSION"),
    "source_format": (pa.string(), "nwb | flinker | bids"),
    "source_file": (pa.string(), "file the trial was read from"),
}

QUARANTINE_COLUMNS: dict[str, pa.DataType] = {
    "schema_version": pa.string(),
    "subject": pa.string(),
    "recording": pa.string(),
    "source_file": pa.string(),
    "level": pa.string(),  # file | channel | trial
    "trial_id": pa.string(),  # empty for file/channel rows
    "field": pa.string(),  # the field or channel that was wrong
    "reason": pa.string(),
}


def tensor_column(arrays: list[np.ndarray]) -> pa.ExtensionArray:
    """Ragged list of float32 ndarrays -> Ray variable-shape tensor column."""
    return ArrowVariableShapedTensorArray.from_numpy([np.ascontiguousarray(a, np.float32) for a in arrays])


def _table(columns: dict[str, tuple[object, str]], version: str, rows: list[dict]) -> pa.Table:
    cols = {}
    for name, (tp, _) in columns.items():
        if name == "schema_version":
            cols[name] = pa.array([version] * len(rows), pa.string())
        elif tp == "tensor":
            cols[name] = tensor_column([r[name] for r in rows])
        else:
            cols[name] = pa.array([r[name] for r in rows], type=tp)
    return pa.table(cols)


def _string_table(columns: dict[str, pa.DataType], version: str, rows: list[dict]) -> pa.Table:
    return pa.table({name: pa.array([version if name == "schema_version" else
                                     str(r.get(name, "") or "") for r in rows], tp)
                     for name, tp in columns.items()})


def trials_table(rows: list[dict]) -> pa.Table:
    """Build the trial table from row dicts with every key of TRIAL_COLUMNS (schema_version optional)."""
    return _table(TRIAL_COLUMNS, SCHEMA_VERSION, rows)


def quarantine_table(rows: list[dict]) -> pa.Table:
    return _string_table(QUARANTINE_COLUMNS, SCHEMA_VERSION, rows)


# --- Speech corpora for the prior (ssip speech ingest) -------------------------------------------
#
# Layout under a speech root (local path or s3:// URI)::
#
#     ROOT/card.json                        corpus card, written LAST; lists every shard
#     ROOT/shards/<group>.parquet           one row per utterance (SPEECH_COLUMNS)
#     ROOT/quarantine/<group>.parquet       one row per rejected file (SPEECH_QUARANTINE_COLUMNS)

SPEECH_SCHEMA_VERSION = "ssip-speech-v1"

#: column -> (arrow type or "tensor", description).
SPEECH_COLUMNS: dict[str, tuple[object, str]] = {
    "schema_version": (pa.string(), "SPEECH_SCHEMA_VERSION of the writer"),
    "utt_id": (pa.string(), "unique utterance id: '<source>/<path relative to the corpus root, "
                            "without extension>' unless the manifest gives one"),
    "source": (pa.string(), "corpus name (e.g. 'librispeech', 'asterisk-fr')"),
    "speaker": (pa.string(), "speaker id, prefixed by the source ('<source>:<speaker>')"),
    "language": (pa.string(), "BCP-47 language tag, '' if unknown"),
    "transcript": (pa.string(), "what is said, '' if unknown"),
    "license": (pa.string(), "licence as given by the corpus, '' if unknown"),
    "source_file": (pa.string(), "audio file the utterance was read from"),
    "source_rate": (pa.int32(), "sampling rate of the file before resampling to 16 kHz, Hz"),
    "duration_s": (pa.float32(), "length of the 16 kHz audio, s"),
    "n_frames": (pa.int32(), "mel frames T"),
    "mel": ("tensor", "(80, T) float32 ssip log-mel of the loudness-normalised 16 kHz audio"),
    "mel_version": (pa.string(), "ssip.mel.MEL_VERSION"),
}

SPEECH_QUARANTINE_COLUMNS: dict[str, pa.DataType] = {
    "schema_version": pa.string(),
    "source": pa.string(),
    "source_file": pa.string(),
    "utt_id": pa.string(),
    "reason_class": pa.string(),  # unreadable | silent | clipped | too_short | too_long | manifest
    "reason": pa.string(),
}


def speech_table(rows: list[dict]) -> pa.Table:
    """Build a speech shard from row dicts with every key of SPEECH_COLUMNS (schema_version optional)."""
    return _table(SPEECH_COLUMNS, SPEECH_SCHEMA_VERSION, rows)


def speech_quarantine_table(rows: list[dict]) -> pa.Table:
    return _string_table(SPEECH_QUARANTINE_COLUMNS, SPEECH_SCHEMA_VERSION, rows)
