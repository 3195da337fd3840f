"""Connecting to Ray: an existing cluster (RAY_ADDRESS / --address) or an embedded local one.

The embedded instance advertises 127.0.0.1 (its node address) and keeps Ray's token
authentication on (Ray 2.60's default); nothing here disables it. Ray 2.60 has no setting that
binds its servers to loopback: its GCS, raylet, workers and dashboard agent listen on all
interfaces and its runtime-env agent on the machine's own address, each requiring the session's
token (tests/test_listening.py lists them; docs/distributed.md says what listens where).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

from ssip import storage
from ssip.data import schema

log = logging.getLogger(__name__)


def init_ray(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Connect to ``address`` (or $RAY_ADDRESS), else start an embedded local Ray (node 127.0.0.1).

    Returns True when this call started an embedded instance (the caller should
    ``ray.shutdown()`` it when its Ray work is done, so that a long process, such as
    ``ssip pipeline`` training after ingest, does not depend on Ray processes it no longer
    uses), False when Ray was already up or a cluster was joined.
    """
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    # Workers must import ssip from the same checkout as the driver; the working directory is
    # on their path when the package is installed in editable mode or on PYTHONPATH.
    if address:
        # Clusters run with token auth (ssip/__init__.py keeps RAY_AUTH_MODE=token); the driver
        # sends the cluster's token from ~/.ray/auth_token, RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN.
        log.info("connecting to Ray at %s", address)
        ray.init(address=address, log_to_driver=True)
    else:
        log.info("starting an embedded local Ray (num_cpus=%s, node 127.0.0.1, token auth on)",
                 num_cpus)
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            log_to_driver=True,
        )
        return True
    return False


def read_shards(uris: Sequence[str], columns: Sequence[str], **read_kw: Any):
    """``ray.data.read_parquet`` of ssip shards (trials, speech) of any schema version, with
    every tensor column in the current layout (``<name>`` flat + ``<name>_shape``).

    Each tensor column of ``columns`` brings its shape column, so a map function gets per-row
    tensors from a numpy batch with :func:`ssip.data.schema.tensor_rows`. Shards of schema v1
    (Ray's tensor extension) are converted on the fly (:func:`ssip.data.schema.current_layout`,
    no copy of the data); a mix of v1 and v2 shards (an old root partly re-ingested) is read as
    two datasets, v1's shards first, and unioned. ``read_kw`` goes to both reads (e.g.
    ``shuffle``). All ``uris`` must be on one filesystem.
    """
    import pyarrow.parquet as pq
    import ray

    fs, _ = storage.filesystem(uris[0])
    paths = [storage.filesystem(u)[1] for u in uris]
    old, new, wanted = [], [], list(columns)
    for path in paths:
        file_schema = pq.read_schema(path, filesystem=fs)
        if any(c in file_schema.names and schema.is_v1_tensor(file_schema.field(c).type)
               for c in columns):
            old.append(path)
        else:
            new.append(path)
            wanted = schema.with_shape_columns(wanted, file_schema.names)
    parts = []
    if new:
        parts.append(ray.data.read_parquet(new, filesystem=fs, columns=wanted, **read_kw))
    if old:
        parts.append(ray.data.read_parquet(old, filesystem=fs, columns=list(columns), **read_kw)
                     .map_batches(schema.current_layout, batch_format="pyarrow"))
    return parts[0] if len(parts) == 1 else parts[1].union(parts[0])
