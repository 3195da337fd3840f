"""What the embedded local Ray that `ssip ingest`/`decode`/`train` start listens on, and that it
stops.

Ray 2.60 has no setting that binds its servers to loopback: with ``_node_ip_address=127.0.0.1``
the GCS, raylet, core workers and the dashboard agent still listen on all interfaces (0.0.0.0 /
::), and the runtime-env agent on the machine's own address. Each of these servers requires the
session's auth token (Ray's token auth, on in ssip), so a peer that can reach a port but lacks
the token is refused. docs/distributed.md states this; this test lists the sockets so that the
statement stays true when Ray changes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, os, time
import psutil, ray
from ssip.distributed.runtime import init_ray

init_ray(num_cpus=1)

@ray.remote
def f():
    return 1

ray.get(f.remote())
session = ray._private.worker._global_node.get_session_dir_path()
pids = {os.getpid()}
for p in psutil.process_iter(["cmdline"]):
    if session in " ".join(p.info["cmdline"] or []):
        pids.add(p.pid)
        pids.update(c.pid for c in p.children(recursive=True))
rows = []
for c in psutil.net_connections(kind="inet"):
    if c.status == psutil.CONN_LISTEN and c.pid in pids:
        rows.append({"ip": c.laddr.ip, "port": c.laddr.port, "name": psutil.Process(c.pid).name()})
ray.shutdown()
time.sleep(2)
left = [p.pid for p in psutil.process_iter(["cmdline"])
        if session in " ".join(p.info["cmdline"] or []) and p.is_running()
        and p.status() != psutil.STATUS_ZOMBIE]
print("RESULT", json.dumps({"sockets": rows, "left": left, "session": session}))
"""

#: Ray's own processes that may listen (names as the OS reports them).
KNOWN = ("gcs_server", "raylet", "ray::", "python", "DashboardAgent", "RuntimeEnvAgent")


@pytest.mark.ray
def test_embedded_ray_listens_only_as_documented_and_stops():
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                         env=env, timeout=300)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    assert line, out.stdout[-2000:] + out.stderr[-3000:]
    res = json.loads(line[0][len("RESULT "):])
    for s in res["sockets"]:
        print(f"{s['name']:>24s} {s['ip']}:{s['port']}")
    assert res["sockets"], "the embedded Ray listened on nothing?"
    import psutil

    own = {a.address for addrs in psutil.net_if_addrs().values() for a in addrs}
    for s in res["sockets"]:
        assert any(k in s["name"] for k in KNOWN), s
        # loopback, all interfaces, or one of this machine's own addresses: nothing else.
        assert s["ip"] in ("0.0.0.0", "::") or s["ip"].startswith("127.") or s["ip"] == "::1" \
            or s["ip"] in own, s
        if s["ip"] not in ("0.0.0.0", "::") and not s["ip"].startswith("127."):
            assert "RuntimeEnvAgent" in s["name"], s  # the only one on the machine's address
    # The GCS and the raylet are among them: the ports token auth has to cover.
    names = {s["name"] for s in res["sockets"]}
    assert {"gcs_server", "raylet"} <= names
    assert res["left"] == [], f"processes of {res['session']} still running after shutdown"
