"""The versioned parquet schema of ingested trials, of the quarantine table and of decoded tables.

Arrays (``neural``, ``mel``, ``audio``: one tensor per row, each with its own shape) are stored
as two plain Arrow columns, readable by any Arrow reader (pyarrow, pandas, polars, DuckDB, Spark)
without Ray or any extension type:

- ``<name>``: ``large_list<float32>``, the row's tensor flattened in C (row-major) order;
- ``<name>_shape``: ``list<int32>``, its shape, so ``np.asarray(data).reshape(shape)`` is the
  tensor (:func:`tensor_values` does that for a whole column without copying).

Why not an extension type: schema v1 (``ssip-trials-v1``, ``ssip-speech-v1``) stored Ray Data's
``ray.data.arrow_variable_shaped_tensor`` extension, which readers without Ray see as an opaque
struct. Arrow's canonical ``arrow.variable_shape_tensor`` is no better here: pyarrow (26) has no
Python class for it (a file holding it reads back as a bare ``BaseExtensionType``, without
``to_numpy_ndarray``), Ray Data (2.60) does not know it and fails to move a block holding it
between processes, and pandas/DuckDB/polars still see its storage struct. Plain data and shape
columns are understood by everything, and Ray Data hands them to map functions as an object array
of flat ndarrays plus an array of shapes (:func:`tensor_rows` turns a numpy batch back into
per-row tensors).

Reading: :func:`tensor_values` (tables) and :func:`tensor_rows` (numpy batches) read both layouts,
the current one and v1's extension (with or without Ray's type registered), so ingest and speech
roots written before v2 keep working; :func:`read_table` reads a shard with a column projection
that brings each tensor's shape column along; :func:`check_version` refuses an unknown
``schema_version``, naming the file and the field. docs/data.md (Output layout and schema) shows
how to read a shard with plain pyarrow + numpy, pandas and DuckDB.

Dataset layout under an ingest root (local path or s3:// URI)::

    ROOT/manifest.json                                 written LAST; lists every file below
    ROOT/trials/<subject>/<recording>-<split>.parquet  one row per trial (TRIAL_COLUMNS)
    ROOT/quarantine/<subject>/<recording>.parquet      one row per rejected trial/channel/file
    ROOT/recordings/<subject>/<recording>.json         sampling metadata, channels, z-score stats
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA_VERSION = "ssip-trials-v2"
#: Trial schema versions this code reads (v1: tensors as Ray's extension type).
SCHEMA_VERSIONS = ("ssip-trials-v1", SCHEMA_VERSION)
SPLITS = ("train", "val", "test")

#: column -> (arrow type or "tensor", description). A "tensor" column holds one ndarray per row,
#: stored as the columns ``<name>`` (flat data) and ``<name>_shape`` (module docstring).
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


#: Suffix of the column that holds the shapes of a tensor column (``mel`` -> ``mel_shape``).
SHAPE_SUFFIX = "_shape"
#: Arrow types of a tensor's two columns (schema v2).
TENSOR_DATA_TYPE = pa.large_list(pa.float32())
TENSOR_SHAPE_TYPE = pa.list_(pa.int32())


def shape_column(name: str) -> str:
    """Name of the column holding the shapes of tensor column ``name``."""
    return name + SHAPE_SUFFIX


def is_shape_column(name: str, names: Iterable[str]) -> bool:
    """Whether column ``name`` is the shape column of another column of ``names``."""
    return name.endswith(SHAPE_SUFFIX) and name[: -len(SHAPE_SUFFIX)] in set(names)


def tensor_columns(name: str, arrays: Sequence[np.ndarray]) -> dict[str, pa.Array]:
    """Ragged list of float32 ndarrays -> ``{name: flat data, name_shape: shapes}`` (schema v2).

    Every tensor needs the same number of dimensions; data is C-ordered float32, back to back.
    """
    tensors, flat = _flat_tensors(arrays, f"tensor column {name!r}", "no rows")
    return {name: flat,
            shape_column(name): pa.array([t.shape for t in tensors], TENSOR_SHAPE_TYPE)}


def _flat_tensors(arrays: Sequence[np.ndarray], what: str,
                  empty: str) -> tuple[list[np.ndarray], pa.LargeListArray]:
    """The tensors as C-ordered float32 and their data back to back as one large_list per row
    (the data column of both layouts); ``what`` and ``empty`` word the errors."""
    tensors = [np.ascontiguousarray(a, np.float32) for a in arrays]
    if not tensors:
        raise ValueError(f"{what}: {empty}")
    ndim = tensors[0].ndim
    if any(t.ndim != ndim for t in tensors):
        raise ValueError(f"{what}: every tensor needs {ndim} dimension(s), got "
                         f"{sorted({t.ndim for t in tensors})}")
    data = np.concatenate([t.ravel() for t in tensors]) if len(tensors) > 1 else tensors[0].ravel()
    offsets = np.insert(np.cumsum([t.size for t in tensors], dtype=np.int64), 0, 0)
    values = pa.Array.from_buffers(pa.float32(), len(data), [None, pa.py_buffer(data)])
    return tensors, pa.LargeListArray.from_arrays(pa.array(offsets), values)


def is_v1_tensor(tp: pa.DataType) -> bool:
    """Whether ``tp`` is a v1 tensor column's type: Ray's extension (or ssip's copy of it) or
    its storage ``struct<data: large_list, shape: list<int64>>``."""
    if isinstance(tp, pa.BaseExtensionType):
        tp = tp.storage_type
    return (pa.types.is_struct(tp) and tp.get_field_index("data") >= 0
            and tp.get_field_index("shape") >= 0)


def _views(data: pa.Array, shapes: list) -> list[np.ndarray]:
    """Rows of a list array ``data`` (flat tensors) reshaped to ``shapes``: views of its buffer."""
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


def _combine(col: pa.Array | pa.ChunkedArray) -> pa.Array:
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


def tensor_values(source: pa.Table | pa.RecordBatch | pa.Array | pa.ChunkedArray,
                  name: str | None = None) -> list[np.ndarray]:
    """A tensor column -> one ndarray per row, whatever the schema version.

    Parameters
    ----------
    source : Table or RecordBatch (with ``name``), or one column
        A table holding ``name`` and ``name_shape`` (schema v2), or ``name`` alone as v1's
        extension column (ssip's or Ray's, or their storage struct). A column alone is read as
        v1 (a column of nested plain lists gives ``np.asarray`` of each row).
    name : str
        The column, when ``source`` is a table.

    Returns
    -------
    list of ndarray
        C-ordered views of the column's buffer, of the stored dtype and shape.

    Raises
    ------
    ValueError
        The column holds flat tensors but the table has no shape column for them.
    """
    if isinstance(source, (pa.Table, pa.RecordBatch)):
        if name is None:
            raise TypeError("tensor_values(table, name): the name of the tensor column is needed")
        if shape_column(name) in source.column_names:
            data = _combine(source.column(name))
            shapes = _combine(source.column(shape_column(name))).to_pylist()
            return _views(data, shapes)
        col = _combine(source.column(name))
        if not is_v1_tensor(col.type) and (pa.types.is_list(col.type)
                                             or pa.types.is_large_list(col.type)) \
                and not pa.types.is_nested(col.type.value_type):
            raise ValueError(f"field {name!r} holds flat tensors but the table has no "
                             f"{shape_column(name)!r} column: read both (schema.read_table)")
        return _v1_values(col)
    return _v1_values(_combine(source))


def _v1_values(arr: pa.Array) -> list[np.ndarray]:
    """Rows of a v1 tensor column (extension or its storage struct)."""
    storage = arr.storage if isinstance(arr, pa.ExtensionArray) else arr
    if not is_v1_tensor(storage.type):
        return [np.asarray(x) for x in arr.to_pylist()]
    data = storage.field("data")
    shapes = storage.field("shape").to_pylist()
    if storage.offset:  # a slice: StructArray.field ignores the parent's offset
        data = data.slice(storage.offset, len(storage))
        shapes = shapes[storage.offset:storage.offset + len(storage)]
    return _views(data, shapes)


def tensor_rows(batch: Mapping[str, Any], name: str) -> list[np.ndarray]:
    """Per-row tensors of column ``name`` of a numpy batch (dict of arrays, as Ray Data's
    ``map_batches(batch_format="numpy")`` gives): flat rows reshaped with ``name_shape`` when
    the batch has it (schema v2), else the rows as they are (v1, which Ray reads as ndarrays)."""
    rows = batch[name]
    shapes = batch.get(shape_column(name))
    if shapes is None:
        return list(rows)
    return [np.asarray(r).reshape(tuple(int(d) for d in shape))
            for r, shape in zip(rows, shapes, strict=True)]


def current_layout(table: pa.Table) -> pa.Table:
    """``table`` with every v1 tensor column (Ray's extension or its struct) replaced by the v2
    pair ``name`` + ``name_shape`` (the same data buffer, no copy); v2 tables come back as they
    are. The ``schema_version`` column is left as written."""
    for name in list(table.column_names):
        col = table.column(name)
        if not is_v1_tensor(col.type):
            continue
        storage_type = (col.type.storage_type if isinstance(col.type, pa.BaseExtensionType)
                        else col.type)
        data_type = pa.large_list(storage_type["data"].type.value_type)
        datas, shapes = [], []
        for chunk in col.chunks:
            storage = chunk.storage if isinstance(chunk, pa.ExtensionArray) else chunk
            fields = dict(zip([f.name for f in storage.type], storage.flatten(), strict=True))
            datas.append(fields["data"].cast(data_type))
            shapes.append(fields["shape"].cast(TENSOR_SHAPE_TYPE))
        i = table.column_names.index(name)
        table = table.set_column(i, pa.field(name, data_type), pa.chunked_array(datas, data_type))
        table = table.add_column(i + 1, pa.field(shape_column(name), TENSOR_SHAPE_TYPE),
                                 pa.chunked_array(shapes, TENSOR_SHAPE_TYPE))
    return table


def with_shape_columns(columns: Sequence[str], available: Iterable[str]) -> list[str]:
    """``columns`` plus, after each, its shape column when ``available`` has one."""
    have = set(available)
    out: list[str] = []
    for c in columns:
        out.append(c)
        if shape_column(c) in have and shape_column(c) not in columns:
            out.append(shape_column(c))
    return out


def read_table(path: str, *, filesystem: Any = None, columns: Sequence[str] | None = None
               ) -> pa.Table:
    """``pq.read_table`` of a shard of any schema version; reading a tensor column reads its
    shape column too (when the file has one), so :func:`tensor_values` can use the table."""
    if columns is not None:
        names = pq.read_schema(path, filesystem=filesystem).names
        columns = with_shape_columns(columns, names)
    return pq.read_table(path, filesystem=filesystem, columns=columns)


def check_version(where: str, version: object, known: Sequence[str], rerun: str) -> str:
    """``version`` if it is one of ``known``, else a ValueError naming ``where`` (the file) and
    the field; ``rerun`` is the command that rewrites the data."""
    if version not in known:
        raise ValueError(f"{where}: field 'schema_version' is {version!r}; this version of ssip "
                         f"reads {', '.join(repr(k) for k in known)}; re-run `{rerun}`")
    return str(version)


# --- Schema v1's tensor columns (read by the functions above; written only by tests) ----------

#: Extension name of Ray Data's variable-shape tensor type (``ArrowVariableShapedTensorType``),
#: the tensor columns of schema v1.
TENSOR_EXTENSION = "ray.data.arrow_variable_shaped_tensor"


class VariableShapedTensorType(pa.ExtensionType):
    """Ray Data's variable-shape tensor type, as pyarrow sees it in a v1 file: storage
    ``struct<data: large_list<value>, shape: list<int64>>``, metadata the JSON of ``ndim``.

    Never registered with pyarrow (Ray registers its own class under the same name when it is
    imported): it only labels the arrays :func:`tensor_column_v1` writes.
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


def tensor_column_v1(arrays: Sequence[np.ndarray]) -> pa.ExtensionArray:
    """Ragged list of float32 ndarrays -> the v1 tensor column (Ray's variable-shape tensor
    extension, the bytes ``ArrowVariableShapedTensorArray.from_numpy`` builds). Kept to write
    v1 files for the reader's tests; ssip writes :func:`tensor_columns`."""
    tensors, flat = _flat_tensors(arrays, "tensor_column_v1",
                                  "Creating empty ragged tensor arrays is not supported.")
    storage = pa.StructArray.from_arrays(
        [flat, pa.array([t.shape for t in tensors], pa.list_(pa.int64()))], ["data", "shape"])
    return pa.ExtensionArray.from_storage(VariableShapedTensorType(pa.float32(), tensors[0].ndim),
                                          storage)


def _table(columns: dict[str, tuple[object, str]], version: str, rows: list[dict]) -> pa.Table:
    cols = {}
    for name, (tp, _) in columns.items():
        if name == "schema_version":
            cols[name] = pa.array([version] * len(rows), pa.string())
        elif tp == "tensor":
            cols.update(tensor_columns(name, [r[name] for r in rows]))
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

SPEECH_SCHEMA_VERSION = "ssip-speech-v2"
#: Speech schema versions this code reads (v1: mel as Ray's extension type).
SPEECH_SCHEMA_VERSIONS = ("ssip-speech-v1", SPEECH_SCHEMA_VERSION)

#: column -> (arrow type or "tensor", description); "tensor": ``<name>`` + ``<name>_shape``.
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
    """Build a decoded table from dicts with subject, trial_id, method, mel (80, T).

    The table has no schema_version column: its mel is ``mel`` + ``mel_shape`` (the layout of
    schema v2) since ssip-trials-v2; older tables hold v1's extension column, which
    :func:`tensor_values` and :func:`current_layout` read too.
    """
    return pa.table({
        "subject": pa.array([r["subject"] for r in rows], pa.string()),
        "trial_id": pa.array([r["trial_id"] for r in rows], pa.string()),
        "method": pa.array([r["method"] for r in rows], pa.string()),
        **tensor_columns("mel", [r["mel"] for r in rows]),
    })


def decoded_rows_table(rows: list[dict]) -> pa.Table:
    """The decoded table of :func:`decoded_table` plus an int32 ``draw`` and a float ``spread``
    (posterior std of the mean rows, null elsewhere): what ``ssip decode`` writes."""
    return decoded_table(rows).append_column(
        "draw", pa.array([int(r.get("draw", -1)) for r in rows], pa.int32())).append_column(
        "spread", pa.array([r.get("spread") for r in rows], pa.float32()))
