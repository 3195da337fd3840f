"""Shared fixtures: real speech clips, a local Ray cluster, a moto S3 server (all on 127.0.0.1)."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

POCKETSPHINX = Path("/usr/share/pocketsphinx/test/data")

# Token auth stays on: a fresh token for this test session, given to every head node and driver.
# Ray reads these when it is imported, so they are set before any test module imports it.
_TOKEN_DIR = Path(tempfile.mkdtemp(prefix="ssip-ray-token-"))
(_TOKEN_DIR / "auth_token").write_text(secrets.token_hex(32))
(_TOKEN_DIR / "auth_token").chmod(0o600)
os.environ["RAY_AUTH_MODE"] = "token"
os.environ["RAY_AUTH_TOKEN_PATH"] = str(_TOKEN_DIR / "auth_token")


def pytest_configure(config):
    # One intra-op thread for every test: on the 2 shared cores of the test machine a second
    # OpenMP thread made small convs and matmuls 3-10x slower (measured). Speed is measured in
    # bench/, never in tests.
    import torch

    torch.set_num_threads(1)


def make_speech_ingest(root: Path, *, n_trials: int, step_s: float, duration_s: float,
                       n_electrodes: int = 8, val_fraction: float = 0.0,
                       test_fraction: float = 0.0) -> Path:
    """A small ingest dataset on disk: trials cut from real speech (a pocketsphinx librivox
    clip between 1 s gaps) with Gaussian noise as the 'neural' signal, subject s1."""
    from ssip import storage
    from ssip.data.ingest import IngestConfig, process_recording, write_result
    from ssip.data.readers import Recording, TrialSpec

    clip, _ = sf.read(sorted((POCKETSPHINX / "librivox").glob("*.wav"))[0], dtype="float32")
    gap = np.zeros(16000, np.float32)
    audio = np.concatenate([gap, clip, gap])
    trials = [TrialSpec(1.0 + step_s * k, duration_s, f"word {k}") for k in range(n_trials)]
    sig = np.random.default_rng(0).standard_normal(
        (int(len(audio) / 16000 * 1024), n_electrodes)).astype(np.float32)
    rec = Recording("s1", "rec1", "mem://rec1", "nwb", sig, 1024.0, True,
                    [f"c{i}" for i in range(n_electrodes)], audio, 16000.0, 0.0, trials)
    res = process_recording(rec, IngestConfig(val_fraction=val_fraction, test_fraction=test_fraction))
    files = write_result(str(root), res)
    storage.write_json(str(root / "manifest.json"), {"recordings": [
        {"path": rec.path, "subject": "s1", "recording": "rec1", "status": "ok", "files": files}]})
    return root


def write_trials_ingest(root: Path, trials: list[dict]) -> str:
    """An ingest root holding ``trials`` as shards of the current schema plus its manifest.

    Each trial: ``mel`` (80, T), ``neural`` (T, C), ``split``; optional ``subject`` (default
    S1), ``recording`` (rec1), ``utt_id`` ('') and ``trial_id`` (``<recording>/<split><index>``). One shard per
    (subject, recording, split), as `ssip ingest` writes them.
    """
    from collections import defaultdict

    from ssip import storage
    from ssip.data import schema
    from ssip.mel import MEL_VERSION

    shards: dict[tuple[str, str, str], list[dict]] = defaultdict(list)
    for t in trials:
        shards[(t.get("subject", "S1"), t.get("recording", "rec1"), t["split"])].append(t)
    recordings: dict[tuple[str, str], list[str]] = defaultdict(list)
    for (subject, rec, split), ts in sorted(shards.items()):
        rows = []
        for i, t in enumerate(ts):
            n = t["mel"].shape[1]
            rows.append({"subject": subject, "recording": rec,
                         "trial_id": t.get("trial_id", f"{rec}/{split}{i:04d}"),
                         "trial_index": i, "split": split, "task": "t", "transcript": "",
                         "utt_id": t.get("utt_id", ""), "onset_s": 0.0, "speech_onset_s": 0.0,
                         "speech_duration_s": n / 100, "n_frames": n,
                         "n_electrodes": t["neural"].shape[1], "frame_rate": 100.0,
                         "neural": t["neural"], "mel": t["mel"],
                         "audio": np.zeros(n * 160, np.float32), "mel_version": MEL_VERSION,
                         "source_format": "nwb", "source_file": f"mem://{rec}"})
        rel = f"trials/{subject}/{rec}-{split}.parquet"
        storage.write_parquet(storage.join(str(root), rel), schema.trials_table(rows))
        recordings[(subject, rec)].append(rel)
    storage.write_json(storage.join(str(root), "manifest.json"), {"recordings": [
        {"path": f"mem://{rec}", "subject": subject, "recording": rec, "status": "ok",
         "files": files} for (subject, rec), files in sorted(recordings.items())]})
    return str(root)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def speech_clips() -> list[np.ndarray]:
    """Real recorded English speech at 16 kHz (Debian pocketsphinx-testdata, librivox clips)."""
    files = sorted((POCKETSPHINX / "librivox").glob("*.wav"))
    if not files:
        pytest.fail("pocketsphinx-testdata is missing: run `make setup` (installs system packages)")
    clips = []
    for f in files:
        a, sr = sf.read(f, dtype="float32")
        assert sr == 16000, f
        clips.append(a)
    return clips


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory, moto_s3):
    """A real Ray head started with `ray start` on 127.0.0.1 (2 CPUs); yields its address.

    Started after the moto S3 server so that its workers see the endpoint and test keys in their
    environment, as cluster nodes see an instance role: credentials never travel with a job.
    """
    ray_bin = shutil.which("ray", path=os.path.dirname(sys.executable))
    tmp = tmp_path_factory.mktemp("ray")

    def cmd(port: int) -> list[str]:
        return [ray_bin, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                "--num-cpus=2", "--include-dashboard=false", f"--temp-dir={tmp}",
                "--disable-usage-stats"]

    port = start_head_process(cmd, tmp)
    address = f"127.0.0.1:{port}"
    try:
        yield address
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        _stop_ray_head(str(tmp), port)


@pytest.fixture(scope="module")
def ray_connected(ray_cluster):
    """This process connected to the session's ``ray_cluster`` (RAY_ADDRESS set), for a module."""
    import ray

    old = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = ray_cluster
    if not ray.is_initialized():
        ray.init(address=ray_cluster)
    yield ray_cluster
    ray.shutdown()
    if old is None:
        os.environ.pop("RAY_ADDRESS", None)
    else:
        os.environ["RAY_ADDRESS"] = old


#: Room for Ray's start-up on a busy machine: the `ray start` command's own limit, and the
#: raylet's wait for its dashboard agent (RAY_agent_register_timeout_ms; Ray's default 30 s was
#: too short beside a 2-core `make demo`). Both can be raised from the environment.
RAY_START_TIMEOUT_S = float(os.environ.get("SSIP_TEST_RAY_START_TIMEOUT_S", "300"))
RAY_AGENT_TIMEOUT_MS = os.environ.get("SSIP_TEST_RAY_AGENT_TIMEOUT_MS", "120000")


def _head_logs(temp_dir: Path, lines: int = 30) -> str:
    """The last lines of a head's own error logs (raylet, dashboard agent, GCS), for a message."""
    out = []
    logs = Path(temp_dir) / "session_latest" / "logs"
    for name in ("raylet.err", "raylet.out", "dashboard_agent.log", "gcs_server.err", "monitor.err"):
        f = logs / name
        if f.exists():
            tail = f.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {f} (last {len(tail)} lines)\n" + "\n".join(tail))
    return "\n".join(out) or f"(no logs under {logs})"


def start_head_process(cmd, temp_dir: Path, port: int | None = None) -> int:
    """Run ``cmd(port)`` (a `ray start --head` argv) and return the port; on failure stop what
    it started, retry once on a fresh port, and then fail with Ray's own error logs.

    Whatever happens, no process of this head is left running when this raises.
    """
    env = dict(os.environ)
    env.setdefault("RAY_agent_register_timeout_ms", RAY_AGENT_TIMEOUT_MS)
    errors = []
    for attempt in (1, 2):
        port = port if attempt == 1 and port is not None else _free_port()
        try:
            subprocess.run(cmd(port), check=True, env=env, capture_output=True,
                           timeout=RAY_START_TIMEOUT_S)
            return port
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
            stderr = (e.stderr or b"").decode(errors="replace")[-3000:]
            errors.append(f"attempt {attempt}: {e}\n{stderr}\n{_head_logs(temp_dir)}")
            _stop_ray_head(str(temp_dir), port)
    raise RuntimeError(f"`ray start --head` (temp dir {temp_dir}) failed twice; its logs:\n"
                       + "\n".join(errors))


def start_ray_head(tmp: Path, *, dashboard: bool = False, num_cpus: int = 2) -> dict:
    """``ray start --head`` on 127.0.0.1 beside the session's ``ray_cluster``, every port its own.

    Another head (the session's) already holds the default agent, metrics and client ports on
    this machine: a second head's dashboard agent would fail to bind them (and a job server
    would answer "No available agent" forever). Returns ``address``, ``port``, ``temp_dir``,
    ``metrics_port`` and, with the dashboard, ``dashboard`` (its http URL); stop it with
    ``_stop_ray_head(info["temp_dir"], info["port"])``.
    """
    ray_bin = shutil.which("ray", path=os.path.dirname(sys.executable))
    metrics = _free_port()
    info = {"temp_dir": str(tmp), "metrics_port": metrics}
    dash = _free_port()

    def cmd(port: int) -> list[str]:
        argv = [ray_bin, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                f"--num-cpus={num_cpus}", f"--temp-dir={tmp}", "--disable-usage-stats",
                f"--dashboard-agent-listen-port={_free_port()}",
                f"--dashboard-agent-grpc-port={_free_port()}", f"--metrics-export-port={metrics}",
                f"--runtime-env-agent-port={_free_port()}",
                f"--ray-client-server-port={_free_port()}"]
        if dashboard:
            return [*argv, "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={dash}"]
        return [*argv, "--include-dashboard=false"]

    port = start_head_process(cmd, tmp)
    info.update(address=f"127.0.0.1:{port}", port=port)
    if dashboard:
        info["dashboard"] = f"http://127.0.0.1:{dash}"
    return info


def _stop_ray_head(temp_dir: str, port: int) -> None:
    """Stop the processes of the Ray head started with ``--temp-dir=temp_dir --port=port`` only.

    ``ray stop`` stops every Ray process on the machine, including a user's own cluster or a
    second test run's; here only the processes naming this head's temp dir, their children (the
    raylet's agents and workers) and the Ray client server of this port are stopped.
    """
    import psutil

    own: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if temp_dir in cmd or ("ray.util.client.server" in cmd and f":{port} " in f"{cmd} "):
            own[proc.pid] = proc
            for child in _children(proc):
                own[child.pid] = child
    own.pop(os.getpid(), None)
    for proc in own.values():
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(list(own.values()), timeout=10)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)


def _children(proc):
    import psutil

    try:
        return proc.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


@pytest.fixture(scope="session")
def moto_s3(tmp_path_factory):
    """A real S3 endpoint (moto server) on 127.0.0.1; sets SSIP_S3_ENDPOINT and dummy keys."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            time.sleep(0.2)
    old = {k: os.environ.get(k) for k in ("SSIP_S3_ENDPOINT", "AWS_ACCESS_KEY_ID",
                                          "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update({"SSIP_S3_ENDPOINT": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"})
    try:
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
