"""Ingest on Ray Data: one task per recording, many subjects in parallel.

Every recording is read, processed and written by its own task
(:func:`ssip.data.ingest.process_recording` + :func:`~ssip.data.ingest.write_result`); a file that
cannot be used becomes a file-level quarantine row and the others go on. The manifest is written
last, so a reader never sees a half-finished run, and re-running over the same output replaces
each recording's shards whole (no duplicates). Readers list the shards with
:func:`ssip.data.dataset.trial_files`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

from ssip import storage
from ssip.config import config_hash, from_dict
from ssip.data import schema
from ssip.data.dataset import MANIFEST
from ssip.data.ingest import (
    IngestConfig,
    discover,
    file_quarantine_row,
    process_recording,
    read_recording,
    write_result,
)
from ssip.data.readers import RecordingError
from ssip.distributed.runtime import init_ray

log = logging.getLogger(__name__)


def ingest_one(item: dict) -> dict:
    """Ray Data map function: ingest the recording named by ``item`` and write its shards."""
    out, path, fmt = item["out"], item["path"], item["format"]
    cfg = from_dict(IngestConfig, item["config"])
    t0 = time.time()
    try:
        rec = read_recording(path, fmt, cfg.bids, cfg.nwb)
        res = process_recording(rec, cfg)
    except RecordingError as e:
        log.error("%s", e)
        rel = f"quarantine/_files/{Path(path).name}.parquet"
        storage.write_parquet(storage.join(out, rel),
                              schema.quarantine_table([file_quarantine_row(path, e.subject, e.field, e.reason)]))
        return {"path": path, "subject": e.subject, "recording": "", "status": "failed",
                "error": str(e), "files": [rel], "n_trials": 0, "n_quarantined": 1,
                "split_rule": "", "trials_source": "", "seconds": time.time() - t0}
    files = write_result(out, res)
    # A successful run replaces an earlier file-level failure of the same file.
    storage.delete(storage.join(out, f"quarantine/_files/{Path(path).name}.parquet"))
    return {"path": path, "subject": res.subject, "recording": res.recording, "status": "ok",
            "error": "", "files": files, "n_trials": len(res.rows),
            "n_quarantined": len(res.quarantine), "split_rule": res.metadata["split_rule"],
            "trials_source": res.metadata.get("source", {}).get("trials_source", ""),
            "seconds": time.time() - t0}


def run_ingest(source: str, out: str, cfg: IngestConfig, *, address: str | None = None,
               num_cpus: int | None = None) -> dict:
    """Ingest every recording under ``source`` into ``out`` (local path or s3://) on Ray Data.

    Returns the manifest (also written to ``out/manifest.json``).
    """
    import ray

    recordings = discover(source, cfg.format, cfg.bids)
    log.info("ingesting %d recording(s) from %s into %s", len(recordings), source, out)
    embedded = init_ray(address, num_cpus)
    cfg_dict = dataclasses.asdict(cfg)
    items = [{"out": str(out), "path": p, "format": f, "config": cfg_dict} for p, f in recordings]
    t0 = time.time()
    try:
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        results = sorted(ds.map(ingest_one, num_cpus=1).take_all(), key=lambda r: r["path"])
    finally:
        if embedded:
            ray.shutdown()
    elapsed = time.time() - t0

    manifest_uri = storage.join(out, MANIFEST)
    previous = storage.read_json(manifest_uri) if storage.exists(manifest_uri) else {"recordings": []}
    done = {r["path"] for r in results}
    kept = [r for r in previous.get("recordings", []) if r["path"] not in done]
    recs = sorted(kept + [{k: r[k] for k in ("path", "subject", "recording", "status", "error",
                                             "files", "n_trials", "n_quarantined", "split_rule",
                                             "trials_source")} for r in results],
                  key=lambda r: r["path"])
    manifest = {
        "schema_version": schema.SCHEMA_VERSION,
        "config": cfg_dict,
        "config_hash": config_hash(cfg),
        "source": str(source),
        "recordings": recs,
        "n_trials": sum(r["n_trials"] for r in recs),
        "n_quarantined": sum(r["n_quarantined"] for r in recs),
        "seconds": round(elapsed, 2),
    }
    storage.write_json(manifest_uri, manifest)
    failed = [r for r in results if r["status"] != "ok"]
    log.info("ingest done in %.1f s: %d trials, %d quarantine rows, %d failed file(s)",
             elapsed, manifest["n_trials"], manifest["n_quarantined"], len(failed))
    return manifest
