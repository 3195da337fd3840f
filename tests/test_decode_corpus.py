"""Whole-corpus decoding on Ray: the bulk decode of a 2-subject corpus equals the in-process
decoder byte for byte; killed part way (one decode actor, then the driver) and re-run, every trial
is decoded exactly once with the same bytes; a corrupt shard and NaN trials are quarantined with
their reasons while the rest decodes; the same with input and output on a moto S3 server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from ssip.decode import DecodeConfig
from tests.conftest import write_trials_ingest
from tests.test_decode import _trial

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parent.parent
# Units (trials of one padded length, speed.batch_size 2): sub-01 pads to 40, 40 | 48, 48; sub-02 to
# 32 | 56, 56: 4 units.
LENGTHS = {"sub-01": (33, 37, 45, 47), "sub-02": (30, 50, 52)}
FAST = ["--set", "n_draws=2", "--set", "num_steps=6", "--set", "speed.batch_size=2",
        "--set", "methods=[dps, prior, dps-shuffled, linear]", "--set", "control_draws=1"]


def _subject_trials(subject: str, n_el: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for split, lengths in (("train", (60,) * 4), ("val", (50, 50)), ("test", LENGTHS[subject])):
        for i, n in enumerate(lengths):
            t = _trial(rng, i, n, split)
            if t["neural"].shape[1] != n_el:
                t["neural"] = t["neural"][:, :n_el]
            out.append({**t, "subject": subject, "trial_id": f"rec1/{split}{i:04d}"})
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Ingest root of 2 subjects and their checkpoints (tiny prior, conv likelihoods, linear)."""
    from ssip.models.baselines import LinearDecoder, LinearDecoderConfig, save_baseline
    from ssip.models.likelihood import LikelihoodConfig, save_likelihood, train_likelihood
    from ssip.models.prior import EDMPrior, PriorConfig, save_prior

    root = tmp_path_factory.mktemp("bulk")
    trials = _subject_trials("sub-01", 6, 0) + _subject_trials("sub-02", 5, 1)
    ingest = write_trials_ingest(root / "ingest", trials)
    torch.manual_seed(0)
    prior = EDMPrior("tiny", sigma_data=0.5, data_mean=np.full(80, -0.2), channels=8)
    save_prior(str(root / "prior"), prior, PriorConfig(window_frames=32))
    cfg = LikelihoodConfig(kind="conv", head_channels=8, kernel=9, lookahead=5, window_frames=32,
                           batch_size=4, epochs=1)
    for subject in LENGTHS:
        ts = [t for t in trials if t["subject"] == subject]
        model, stats = train_likelihood([t for t in ts if t["split"] != "test"], cfg,
                                        progress=False)
        save_likelihood(str(root / "likelihood" / subject), model, subject=subject, stats=stats)
        train = [t for t in ts if t["split"] == "train"]
        dec = LinearDecoder(LinearDecoderConfig(n_components=4)).fit(
            [t["neural"] for t in train], [t["mel"] for t in train])
        save_baseline(str(root / "baselines" / subject / "linear"), dec)
    return {"root": root, "ingest": ingest, "prior": str(root / "prior"),
            "likelihood": str(root / "likelihood"), "baselines": str(root / "baselines"),
            "trials": trials}


def _argv(m, ingest: str, out: str, *extra: str) -> list[str]:
    return ["decode", ingest, "--prior", m["prior"], "--likelihood-root", m["likelihood"],
            "--baselines-root", m["baselines"], "--out", out, *FAST, *extra]


def _rows(uri: str) -> dict[tuple, bytes]:
    """(subject, trial_id, method, draw) -> the mel's bytes; fails on a duplicate key."""
    from ssip import storage

    table = storage.read_parquet(uri)
    from ssip.data.schema import tensor_values

    mels = tensor_values(table, "mel")
    out: dict[tuple, bytes] = {}
    for s, t, m, d, mel in zip(*(table.column(c).to_pylist() for c in
                                 ("subject", "trial_id", "method", "draw")), mels, strict=True):
        key = (s, t, m, d)
        assert key not in out, f"duplicate row {key}"
        out[key] = np.ascontiguousarray(mel, np.float32).tobytes()
    return out


@pytest.fixture(scope="module")
def reference(models, ray_cluster):
    """The in-process decoder's table, and an uninterrupted bulk decode of the same trials."""
    from ssip.cli import main

    root = models["root"]
    ref = str(root / "inprocess.parquet")
    assert main(_argv(models, models["ingest"], ref)) == 0
    bulk = str(root / "bulk.parquet")
    assert main(_argv(models, models["ingest"], bulk, "--actors", "2",
                      "--address", ray_cluster)) == 0
    return ref, bulk


def test_bulk_decode_equals_the_in_process_decoder_byte_for_byte(models, reference):
    ref, bulk = reference
    a, b = _rows(ref), _rows(bulk)
    assert a.keys() == b.keys()
    n_test = sum(len(v) for v in LENGTHS.values())
    # dps 2 draws + mean, prior 1 + mean, dps-shuffled 1 + mean, linear 1.
    assert len(a) == n_test * (3 + 2 + 2 + 1)
    assert all(a[k] == b[k] for k in a), [k for k in a if a[k] != b[k]][:5]
    summary = json.loads(Path(bulk + ".d", "summary.json").read_text())
    assert summary["n_trials"] == summary["n_decoded"] == n_test
    assert summary["n_quarantined"] == 0 and summary["n_units"] == 4
    assert summary["per_subject"]["sub-02"] == {"planned": 3, "decoded": 3, "quarantined": 0}
    assert summary["seconds_per_trial"] > 0 and summary["samples_per_second"] > 0
    runs = set(pq.read_table(bulk, columns=["run"]).column("run").to_pylist())
    assert runs == {summary["run"]}


def test_killed_actor_then_driver_rerun_decodes_each_trial_once_with_the_same_bytes(
        models, reference, ray_cluster, tmp_path):
    from ssip.cli import main
    from ssip.config import resolve
    from ssip.distributed.decode_corpus import BulkDecodeConfig, decode_corpus

    _, bulk = reference
    out = str(tmp_path / "killed.parquet")
    work = Path(out + ".d")
    # 1. One decode actor SIGKILLs itself after its first unit; Ray restarts it and retries.
    marker = tmp_path / "actor-killed.txt"
    cfg = resolve(DecodeConfig, None, [a for a in FAST if a != "--set"])
    try:
        decode_corpus(models["ingest"], out, prior=models["prior"],
                      likelihood_root=models["likelihood"], baselines_root=models["baselines"],
                      cfg=cfg, bulk=BulkDecodeConfig(actors=2), address=ray_cluster,
                      progress=False, debug={"kill_after_units": 1, "marker": str(marker)})
    except Exception as e:  # either outcome is fine: the re-run must finish it
        print(f"the attempt with a killed actor failed: {e}")
    assert marker.exists(), "no actor was killed"
    # 2. Remove some finished units (as if they had never been written), then start the driver
    # and SIGKILL it once it has written a unit, before it finishes.
    units = sorted((work / "units").rglob("*.parquet"))
    assert units
    for u in units[1:]:
        u.unlink()
    (work / "summary.json").unlink(missing_ok=True)
    before = {u.name for u in (work / "units").rglob("*.parquet")}
    env = {**os.environ, "RAY_ADDRESS": ray_cluster}
    proc = subprocess.Popen([sys.executable, "-m", "ssip.cli",
                             *_argv(models, models["ingest"], out, "--actors", "1",
                                    "--debug-unit-delay", "30")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if {u.name for u in (work / "units").rglob("*.parquet")} - before:
            break
        time.sleep(0.2)
    killed = proc.poll() is None
    if killed:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert killed, "the driver finished before it could be killed"
    assert not (work / "summary.json").exists()
    # 3. Re-run to completion.
    assert main(_argv(models, models["ingest"], out, "--actors", "2",
                      "--address", ray_cluster)) == 0
    a, b = _rows(bulk), _rows(out)
    assert a.keys() == b.keys()  # none lost, none twice (_rows refuses duplicates)
    assert all(a[k] == b[k] for k in a)
    summary = json.loads((work / "summary.json").read_text())
    assert summary["n_decoded"] == summary["n_trials"] == 7
    assert summary["n_units_this_attempt"] < summary["n_units"]  # it resumed


def test_corrupt_shard_and_nan_trials_are_quarantined_and_the_rest_decodes(models, ray_cluster,
                                                                            tmp_path, capsys):
    from ssip.cli import main

    trials = [dict(t) for t in models["trials"]]
    # sub-01: two test trials hold NaN / Inf; sub-02 gets a second recording whose shard is
    # corrupt on disk.
    for t in trials:
        if t["subject"] == "sub-01" and t["trial_id"] in ("rec1/test0001", "rec1/test0003"):
            t["neural"] = t["neural"].copy()
            t["neural"][5, 2] = np.nan if t["trial_id"].endswith("1") else np.inf
    extra = [{**t, "recording": "rec2", "trial_id": t["trial_id"].replace("rec1", "rec2")}
             for t in trials if t["subject"] == "sub-02" and t["split"] == "test"]
    ingest = write_trials_ingest(tmp_path / "ingest", trials + extra)
    bad = tmp_path / "ingest" / "trials" / "sub-02" / "rec2-test.parquet"
    bad.write_bytes(bad.read_bytes()[:200] + b"garbage")
    out = str(tmp_path / "decoded.parquet")
    assert main(_argv(models, ingest, out, "--actors", "2", "--address", ray_cluster)) == 0
    text = capsys.readouterr().out
    summary = json.loads(Path(out + ".d", "summary.json").read_text())
    reasons = {(q["trial_id"] or q["source_file"]): q["reason"] for q in summary["quarantine"]}
    assert "NaN/Inf" in reasons["rec1/test0001"] and "frame 5" in reasons["rec1/test0001"]
    assert "NaN/Inf" in reasons["rec1/test0003"]
    assert any(k.endswith("rec2-test.parquet") and "unreadable shard" in v
               for k, v in reasons.items()), reasons
    assert "quarantined: " in text
    decoded = {(s, t) for s, t, *_ in _rows(out)}
    assert decoded == ({("sub-01", "rec1/test0000"), ("sub-01", "rec1/test0002")}
                       | {("sub-02", f"rec1/test{i:04d}") for i in range(3)})
    assert summary["per_subject"]["sub-01"] == {"planned": 4, "decoded": 2, "quarantined": 2}


@pytest.mark.slow
def test_bulk_decode_with_input_and_output_on_s3(models, reference, ray_cluster, moto_s3):
    import boto3

    from ssip.cli import main

    _, bulk = reference
    s3 = boto3.client("s3", endpoint_url=moto_s3, region_name="us-east-1")
    s3.create_bucket(Bucket="ssip-decode")
    base = Path(models["ingest"])
    for f in base.rglob("*"):
        if f.is_file():
            s3.upload_file(str(f), "ssip-decode", f"ingest/{f.relative_to(base)}")
    out = "s3://ssip-decode/runs/decoded.parquet"
    assert main(_argv(models, "s3://ssip-decode/ingest", out, "--actors", "2",
                      "--address", ray_cluster)) == 0
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="ssip-decode", Prefix="runs/")["Contents"]]
    assert "runs/decoded.parquet.d/summary.json" in keys
    assert sum(k.startswith("runs/decoded.parquet.d/units/") for k in keys) == 4
    a, b = _rows(bulk), _rows(out)
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)
    # A second run finds every unit on S3 and decodes nothing.
    assert main(_argv(models, "s3://ssip-decode/ingest", out, "--actors", "2",
                      "--address", ray_cluster)) == 0
    obj = s3.get_object(Bucket="ssip-decode", Key="runs/decoded.parquet.d/summary.json")
    assert json.loads(obj["Body"].read())["n_units_this_attempt"] == 0


def test_job_entry_points_print_their_configs_on_dry_run(tmp_path):
    for job, args, expect in (
            ("decode_corpus.py", [str(tmp_path), "--prior", "p", "--likelihood-root", "l",
                                  "--out", str(tmp_path / "d.parquet")],
             ["# BulkDecodeConfig", "actors: 2", "# DecodeConfig"]),
            ("sweep_guidance.py", [str(tmp_path), "--prior", "p", "--likelihood-root", "l",
                                   "--subject", "s1", "--name", "n", "--set", "trials=3"],
             ["# DecodeConfig, base", "# SweepConfig", "trials: 3"])):
        proc = subprocess.run([sys.executable, str(REPO / "jobs" / job), *args, "--dry-run"],
                              capture_output=True, text=True, timeout=300, cwd=REPO)
        assert proc.returncode == 0, proc.stderr[-3000:]
        for e in expect:
            assert e in proc.stdout, (job, e, proc.stdout[-2000:])
