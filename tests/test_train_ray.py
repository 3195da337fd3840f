"""Distributed prior training as users run it: DeepSpeed on Ray Train workers, a worker killed
mid-run, run checkpoints on local disk and on a moto S3 server, resume by run name, metrics, and
`ray job submit` of jobs/train_prior.py to a real head node (all on 127.0.0.1, token auth on)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ssip.models.prior import PriorConfig
from tests.conftest import _stop_ray_head, start_ray_head
from tests.test_train_prior_ray import _speech_root

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
W = 32
UNET = {"channels": 8, "emb_channels": 16}


@pytest.fixture(scope="module")
def speech_root(tmp_path_factory, speech_clips):
    from ssip.mel import log_mel

    mels = [log_mel(c[: 16000 * 3]).numpy().astype(np.float32) for c in speech_clips[:4]]
    return _speech_root(tmp_path_factory.mktemp("speech"), [("clips", m) for m in mels]), mels


def _cfg(total: int) -> PriorConfig:
    return PriorConfig(window_frames=W, batch_size=8, total_samples=total, warmup_samples=0,
                       lr=2e-3, log_every_samples=16, seed=1)


def _checkpoints(run_folder: Path) -> list[Path]:
    return sorted(p for p in run_folder.glob("checkpoint_*") if p.is_dir())


def test_worker_killed_mid_run_resumes_from_the_last_checkpoint(ray_connected, tmp_path,
                                                                 speech_root):
    from ssip.distributed.engine import RayTrainConfig
    from ssip.distributed.train_prior import train_prior_on_ray
    from ssip.models.prior import EDMPrior, denoising_loss, load_prior, random_windows
    from ssip.sampling.edm import edm_sample

    root, mels = speech_root
    ray_cfg = RayTrainConfig(workers=2, zero_stage=1, checkpoint_every_samples=32,
                             max_failures=2, storage_path=str(tmp_path / "runs"), name="killed",
                             shuffle_buffer=16, keep_checkpoints=3)
    marker = tmp_path / "killed.txt"
    out = tmp_path / "prior"
    res = train_prior_on_ray(root, str(out), _cfg(96), ray_cfg, unet=UNET, progress=False,
                             debug_kill={"rank": 1, "after_samples": 40, "marker": str(marker)})
    assert marker.exists(), "the worker was never killed"
    m = res["metrics"]
    assert m["samples"] == 96
    # Killed after 40 samples: the newest registered checkpoint is the one at 32.
    assert m["resumed_from"] == 32, m
    run = tmp_path / "runs" / "killed"
    ckpts = _checkpoints(run)
    assert ckpts, list(run.iterdir())
    last = ckpts[-1]
    assert {"deepspeed", "model", "state.json", "ema.safetensors", "rng-rank0.safetensors",
            "rng-rank1.safetensors"} <= {p.name for p in last.iterdir()}
    ds_files = {p.name for p in (last / "deepspeed").iterdir()}
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt",
            "mp_rank_00_model_states.pt"} <= ds_files
    state = json.loads((last / "state.json").read_text())
    assert state["world_size"] == 2 and state["samples_seen"] == 96
    assert state["ray"]["zero_stage"] == 1 and state["prior"]["total_samples"] == 96
    # The run's metrics file: one row per interval, resumed rows not duplicated.
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    samples = [r["samples"] for r in rows]
    assert samples == sorted(set(samples)) and samples[-1] == 96, samples
    assert all(r["samples_per_s"] > 0 and r["data_wait_s"] >= 0 for r in rows)
    assert all(np.isfinite(r["loss"]) and len(r["loss_by_sigma_quartile"]) == 4 for r in rows)

    # The final weights load through the safetensors path (the checkpoint's export too) ...
    model, manifest = load_prior(str(out))
    assert manifest["extra"]["train_stats"]["resumed_from"] == 32
    assert manifest["extra"]["data"]["data_hash"] == res["data"]["data_hash"]
    exported, _ = load_prior(str(last / "model"))
    for k, v in model.state_dict().items():
        torch.testing.assert_close(exported.state_dict()[k], v, msg=k)
    # ... denoise real speech better than the untrained network ...
    x0 = torch.from_numpy(random_windows(mels, W, 16, np.random.default_rng(9)))[:, None]
    untrained = EDMPrior("tiny", sigma_data=float(model.sigma_data), data_mean=model.data_mean,
                         **UNET)
    before = denoising_loss(untrained, x0, [0.2, 0.5, 1.0])
    after = denoising_loss(model, x0, [0.2, 0.5, 1.0])
    assert np.mean(after) < 0.9 * np.mean(before), (before, after)

    # ... and decode: unconditional samples of the right shape, finite, on the data's scale.
    from ssip.decode import prior_denoiser

    denoiser = prior_denoiser(model)
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    x = edm_sample(denoiser, (2, 1, 80, W), gens, num_steps=8)
    assert x.shape == (2, 1, 80, W) and torch.isfinite(x).all()
    assert abs(float(x.mean()) - float(model.data_mean.mean())) < 3.0


def test_run_checkpoints_on_s3_resume_in_a_second_run(ray_connected, tmp_path, speech_root,
                                                      moto_s3):
    import boto3

    from ssip.distributed.engine import RayTrainConfig
    from ssip.distributed.train_prior import train_prior_on_ray
    from ssip.models.prior import load_prior

    boto3.client("s3", endpoint_url=moto_s3, region_name="us-east-1").create_bucket(
        Bucket="ssip-train")
    root, _ = speech_root
    ray_cfg = RayTrainConfig(workers=2, zero_stage=2, storage_path="s3://ssip-train/runs",
                             name="s3run", shuffle_buffer=16)
    first = train_prior_on_ray(root, str(tmp_path / "p1"), _cfg(48), ray_cfg, unet=UNET,
                               progress=False)
    assert first["metrics"]["samples"] == 48 and not first["metrics"]["resumed_from"]
    s3 = boto3.client("s3", endpoint_url=moto_s3, region_name="us-east-1")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="ssip-train", Prefix="runs/s3run/")
            .get("Contents", [])]
    assert any(k.endswith("/state.json") for k in keys), keys
    assert any("zero_pp_rank_1" in k for k in keys), keys
    assert "runs/s3run/metrics.jsonl" in keys
    # Same name, longer budget: continues from the 48 samples stored on S3.
    second = train_prior_on_ray(root, str(tmp_path / "p2"), _cfg(80), ray_cfg, unet=UNET,
                                progress=False)
    assert second["metrics"]["resumed_from"] == 48 and second["metrics"]["samples"] == 80
    _, manifest = load_prior(str(tmp_path / "p2"))
    assert manifest["extra"]["train_stats"]["steps"] == 10  # 80 / 8, counting the first run's 6


def test_resume_with_another_worker_count_is_refused(ray_connected, tmp_path, speech_root):
    from ray.train import TrainingFailedError

    from ssip.distributed.engine import RayTrainConfig
    from ssip.distributed.train_prior import train_prior_on_ray

    root, _ = speech_root
    base = dict(storage_path=str(tmp_path / "runs"), name="two", shuffle_buffer=16,
                max_failures=0)
    train_prior_on_ray(root, str(tmp_path / "p"), _cfg(16), RayTrainConfig(workers=2, **base),
                       unet=UNET, progress=False)
    with pytest.raises((TrainingFailedError, Exception), match="written by 2 workers, resumed with 1"):
        train_prior_on_ray(root, str(tmp_path / "q"), _cfg(32), RayTrainConfig(workers=1, **base),
                           unet=UNET, progress=False)


@pytest.fixture(scope="module")
def job_head(tmp_path_factory, moto_s3):
    """A Ray head with the dashboard (the job server) on 127.0.0.1; yields its HTTP address."""
    ray_bin = shutil.which("ray", path=os.path.dirname(sys.executable))
    tmp = tmp_path_factory.mktemp("rayjobs")
    head = start_ray_head(tmp, dashboard=True)
    port, address = head["port"], head["dashboard"]
    try:
        # The job server answers before the head's job agent has registered ("No available agent
        # to submit job"): wait until a trivial job goes through.
        deadline = time.monotonic() + 180
        while True:
            proc = subprocess.run([ray_bin, "job", "submit", "--address", address, "--",
                                   sys.executable, "-c", "pass"], capture_output=True, text=True,
                                  env={**os.environ, "RAY_ADDRESS": address}, timeout=180)
            if proc.returncode == 0:
                break
            if time.monotonic() > deadline:
                pytest.fail(f"the head's job server never accepted a job: {proc.stderr[-2000:]}")
            time.sleep(2)
        yield address
    finally:
        _stop_ray_head(str(tmp), port)


def test_ray_job_submit_trains_the_prior(job_head, tmp_path, speech_root):
    from ssip.models.prior import load_prior

    root, _ = speech_root
    out = tmp_path / "prior"
    ray_bin = shutil.which("ray", path=os.path.dirname(sys.executable))
    env = {**os.environ, "RAY_ADDRESS": job_head}
    cmd = [ray_bin, "job", "submit", "--address", job_head, "--",
           sys.executable, str(REPO / "jobs" / "train_prior.py"), root, str(out),
           "--workers", "2", "--config", str(REPO / "configs" / "prior-cpu-tiny.yaml"),
           "--ray-config", str(REPO / "configs" / "train-ray-cpu.yaml"),
           "--storage-path", str(tmp_path / "runs"), "--name", "submitted",
           "--set", f"window_frames={W}", "--set", "batch_size=8", "--set", "total_samples=32",
           "--set", "log_every_samples=16", "--set", "warmup_samples=0"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    assert "succeeded" in text, text[-4000:]
    assert "# RayTrainConfig" in text and "zero_stage: 1" in text
    _, manifest = load_prior(str(out))
    assert manifest["extra"]["train_stats"]["samples_seen"] == 32
    assert manifest["extra"]["data"]["run"] == "submitted"
    assert (tmp_path / "runs" / "submitted" / "metrics.jsonl").exists()
