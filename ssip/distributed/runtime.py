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
