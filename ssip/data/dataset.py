"""Reading ingested trials back: the manifest's shard lists, and rows in memory.

The manifest (``ROOT/manifest.json``, written last by ``ssip ingest``) lists every shard; readers
go through it, so a half-finished ingest is never read. :func:`trial_files` gives the shards to
Ray Data's ``read_parquet`` in the distributed paths; :func:`load_trials` reads them into one
process (single-process training, evaluation, tests).
"""

from __future__ import annotations

from ssip import storage
from ssip.data import schema

MANIFEST = "manifest.json"


def trial_files(root: str, split: str | None = None, subject: str | None = None) -> list[str]:
    """URIs of the trial shards listed in an ingest manifest, optionally filtered."""
    manifest = storage.read_json(storage.join(root, MANIFEST))
    files = []
    for r in manifest["recordings"]:
        for rel in r["files"]:
            if not rel.startswith("trials/"):
                continue
            if subject is not None and r["subject"] != subject:
                continue
            if split is not None and not rel.endswith(f"-{split}.parquet"):
                continue
            files.append(storage.join(root, rel))
    return files


def quarantine_files(root: str) -> list[str]:
    """URIs of the quarantine tables listed in an ingest manifest."""
    manifest = storage.read_json(storage.join(root, MANIFEST))
    return [storage.join(root, rel) for r in manifest["recordings"] for rel in r["files"]
            if rel.startswith("quarantine/")]


def load_trials(root: str, *, subject: str | None = None, split: str | None = None,
                columns: list[str] | None = None) -> list[dict]:
    """Rows of the ingest dataset at ``root`` as dicts with ndarray tensor fields.

    Files come from the manifest (written last), so a half-finished ingest is never read.
    """
    rows: list[dict] = []
    for uri in trial_files(root, split=split, subject=subject):
        fs, path = storage.filesystem(uri)
        table = schema.read_table(path, filesystem=fs, columns=columns)
        if table.num_rows and "schema_version" in table.column_names:
            for version in set(table.column("schema_version").to_pylist()):
                schema.check_version(uri, version, schema.SCHEMA_VERSIONS, "ssip ingest")
        data = {}
        for name in table.column_names:
            if schema.is_shape_column(name, table.column_names):
                continue  # read with its tensor
            kind = schema.TRIAL_COLUMNS.get(name, (None,))[0]
            data[name] = (schema.tensor_values(table, name) if kind == "tensor"
                          else table.column(name).to_pylist())
        rows.extend(dict(zip(data, vals, strict=True)) for vals in zip(*data.values(), strict=True))
    rows.sort(key=lambda r: (r.get("subject", ""), r.get("trial_id", "")))
    return rows
