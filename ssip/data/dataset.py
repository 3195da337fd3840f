"""Reading ingested trials back into memory (single-process training, evaluation, tests).

Ray Data reads the same shards in the distributed paths (``ray.data.read_parquet`` on
:func:`ssip.distributed.ingest.trial_files`); this module is for data that fits one process.
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq

from ssip import storage
from ssip.data import schema


def _tensor_values(col) -> list[np.ndarray]:
    # Ray's variable-shape tensor extension converts to a list of ndarrays.
    arr = col.combine_chunks() if hasattr(col, "combine_chunks") else col
    if hasattr(arr, "to_numpy") and hasattr(arr.type, "ndim"):
        return list(arr.to_numpy())
    return [np.asarray(x) for x in arr.to_pylist()]


def load_trials(root: str, *, subject: str | None = None, split: str | None = None,
                columns: list[str] | None = None) -> list[dict]:
    """Rows of the ingest dataset at ``root`` as dicts with ndarray tensor fields.

    Files come from the manifest (written last), so a half-finished ingest is never read.
    """
    from ssip.distributed.ingest import trial_files

    rows: list[dict] = []
    for uri in trial_files(root, split=split, subject=subject):
        fs, path = storage.filesystem(uri)
        table = pq.read_table(path, filesystem=fs, columns=columns)
        version = (table.column("schema_version")[0].as_py()
                   if table.num_rows and "schema_version" in table.column_names else schema.SCHEMA_VERSION)
        if version != schema.SCHEMA_VERSION:
            raise ValueError(f"{uri}: schema {table.column('schema_version')[0]} is not "
                             f"{schema.SCHEMA_VERSION}; re-run `ssip ingest`")
        data = {}
        for name in table.column_names:
            kind = schema.TRIAL_COLUMNS.get(name, (None,))[0]
            data[name] = _tensor_values(table.column(name)) if kind == "tensor" else table.column(name).to_pylist()
        rows.extend(dict(zip(data, vals, strict=True)) for vals in zip(*data.values(), strict=True))
    rows.sort(key=lambda r: (r.get("subject", ""), r.get("trial_id", "")))
    return rows
