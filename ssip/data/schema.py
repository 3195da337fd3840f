"""The versioned parquet schema of ingested trials, of the quarantine table and of decoded tables.

Arrays are stored as Ray Data's variable-shape tensor extension (one tensor per row, each with
its own shape), not nested lists: nested lists come back from Ray Data as object arrays of
arrays, tensors come back as ndarrays (docs/data.md, Output layout and schema). The extension is written here with
pyarrow alone (:func:`tensor_column`: the bytes Ray's ``ArrowVariableShapedTensorArray`` writes,
the same extension name and metadata), so that this layer never imports Ray; readers without Ray
see the extension's storage (a struct of flat data and shape), which :func:`tensor_values`
turns back into ndarrays, as it does Ray's extension arrays.

Dataset layout under an ingest root (local path or s3:// URI)::

    ROOT/manifest.json                                 written LAST; lists every file below
    ROOT/trials/<subject>/<recording>-<split>.parquet  one row per trial (TRIAL_COLUMNS)
    ROOT/quarantine/<subject>/<recording>.parquet      one row per rejected trial/channel/file
    ROOT/recordings/<subject>/<recording>.json         sampling metadata, channels, z-score stats
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

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


#: Extension name of Ray Data's variable-shape tensor type (``ArrowVariableShapedTensorType``).
TENSOR_EXTENSION = "ray.data.arrow_variable_shaped_tensor"


class VariableShapedTensorType(pa.ExtensionType):
    """Ray Data's variable-shape tensor type, as pyarrow sees it in a file: storage
    ``struct<data: large_list<value>, shape: list<int64>>``, metadata the JSON of ``ndim``.

    Never registered with pyarrow (Ray registers its own class under the same name when it is
    imported, and Ray Data needs its own to read columns as ndarrays): it only labels the arrays
    :func:`tensor_column` writes.
    """

    def __init__(self, value_type: pa.DataType, ndim: int):
        self._ndim = int(ndim)
        super().__init__(pa.struct([("data", pa.large_list(value_type)),
                                    ("shape", pa.list_(pa.int64()))]), TENSOR_EXTENSION)

    @property
    def ndim(self) -> int:
        return self._ndim

    def __arrow_ext_serialize__(self) -> bytes:
        return json.dumps(self._ndim).encode()

    @classmethod
    def __arrow_ext_deserialize__(cls, storage_type, serialized):
        return cls(storage_type["data"].type.value_type, json.loads(serialized))


def tensor_column(arrays: Sequence[np.ndarray]) -> pa.ExtensionArray:
    """Ragged list of float32 ndarrays -> Ray variable-shape tensor column.

    The array ``ray.data.extensions.ArrowVariableShapedTensorArray.from_numpy`` builds (C-order
    data of every tensor back to back, int64 offsets, int64 shapes), so a file written with it
    is the same bytes, and ``ray.data.read_parquet`` reads it as ndarrays.
    """
    tensors = [np.ascontiguousarray(a, np.float32) for a in arrays]
    if not tensors:
        raise ValueError("Creating empty ragged tensor arrays is not supported.")
    ndim = tensors[0].ndim
    if any(t.ndim != ndim for t in tensors):
        raise ValueError(f"tensor_column: every tensor needs {ndim} dimension(s), got "
                         f"{sorted({t.ndim for t in tensors})}")
    data = np.concatenate([t.ravel() for t in tensors]) if len(tensors) > 1 else tensors[0].ravel()
    offsets = np.insert(np.cumsum([t.size for t in tensors], dtype=np.int64), 0, 0)
    values = pa.Array.from_buffers(pa.float32(), len(data), [None, pa.py_buffer(data)])
    storage = pa.StructArray.from_arrays(
        [pa.LargeListArray.from_arrays(pa.array(offsets), values),
         pa.array([t.shape for t in tensors], pa.list_(pa.int64()))], ["data", "shape"])
    return pa.ExtensionArray.from_storage(VariableShapedTensorType(pa.float32(), ndim), storage)


def tensor_values(col: pa.Array | pa.ChunkedArray) -> list[np.ndarray]:
    """A tensor column (of :func:`tensor_column`, read with or without Ray) -> one ndarray per row.

    Rows are views of the column's buffer, C-ordered, of the stored dtype and shape (what Ray's
    ``ArrowVariableShapedTensorArray.to_numpy`` gives). A column of plain lists gives
    ``np.asarray`` of each row.
    """
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    storage = arr.storage if isinstance(arr, pa.ExtensionArray) else arr
    if not (pa.types.is_struct(storage.type) and storage.type.get_field_index("data") >= 0
            and storage.type.get_field_index("shape") >= 0):
        return [np.asarray(x) for x in arr.to_pylist()]
    data = storage.field("data")
    shapes = storage.field("shape").to_pylist()
    if storage.offset:  # a slice: StructArray.field ignores the parent's offset
        data = data.slice(storage.offset, len(storage))
        shapes = shapes[storage.offset:storage.offset + len(storage)]
    offsets = data.offsets.to_numpy()
    values = data.values
    if pa.types.is_boolean(values.type) or not pa.types.is_primitive(values.type):
        flat = values.to_numpy(zero_copy_only=False)
        return [flat[offsets[i]:offsets[i + 1]].reshape(shape) for i, shape in enumerate(shapes)]
    # Views of the buffer, as Ray makes them (writable when the buffer is).
    dtype = np.dtype(values.type.to_pandas_dtype())
    buf = values.buffers()[1]
    return [np.ndarray(tuple(shape), dtype, buffer=buf,
                       offset=(values.offset + int(offsets[i])) * dtype.itemsize)
            for i, shape in enumerate(shapes)]


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


# --- Decoded tables (ssip decode; scored by ssip evaluate) ---------------------------------------


def decoded_table(rows: list[dict]) -> pa.Table:
    """Build a decoded table from dicts with subject, trial_id, method, mel (80, T)."""
    return pa.table({
        "subject": pa.array([r["subject"] for r in rows], pa.string()),
        "trial_id": pa.array([r["trial_id"] for r in rows], pa.string()),
        "method": pa.array([r["method"] for r in rows], pa.string()),
        "mel": tensor_column([r["mel"] for r in rows]),
    })


def decoded_rows_table(rows: list[dict]) -> pa.Table:
    """The decoded table of :func:`decoded_table` plus an int32 ``draw`` and a float ``spread``
    (posterior std of the mean rows, null elsewhere): what ``ssip decode`` writes."""
    return decoded_table(rows).append_column(
        "draw", pa.array([int(r.get("draw", -1)) for r in rows], pa.int32())).append_column(
        "spread", pa.array([r.get("spread") for r in rows], pa.float32()))
