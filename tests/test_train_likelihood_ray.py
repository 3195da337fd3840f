"""The likelihood on Ray Train + DeepSpeed: windows with their receptive field from Ray Data, a
2-worker step equal to a single-process step on the global batch, and `ssip train likelihood
--workers 2` end to end on an ingest root (val picks the epoch, sigma is the closed form of the
val residual, re-running the run name resumes), all on the test's `ray start` cluster."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ssip.models.likelihood import LikelihoodConfig
from tests.conftest import write_trials_ingest
from tests.test_likelihood import N_EL, forward_problem

REPO = Path(__file__).resolve().parent.parent


def test_cut_trial_windows_carry_their_receptive_field_and_are_seeded():
    from ssip.distributed.train_likelihood import cut_trial_windows

    lengths = (50, 300)
    # Every frame names its trial and position: mel[0, j] = neural[j, 0] = 1000 k + j.
    mels, ys = [], []
    for k, t in enumerate(lengths):
        code = 1000.0 * k + np.arange(t, dtype=np.float32)
        mels.append(np.tile(code, (80, 1)))
        ys.append(np.tile(code[:, None], (1, 3)))
    batch = {"trial_id": np.array(["a", "b"], object), "n_frames": np.array(lengths),
             "mel": np.empty(2, object), "neural": np.empty(2, object)}
    batch["mel"][:], batch["neural"][:] = mels, ys
    kw = dict(window=100, past=15, lookahead=35, windows_per_epoch=700, per_frame=1 / 350,
              epoch_seed=3, n_electrodes=3)
    out = cut_trial_windows(batch, pass_index=0, **kw)
    span = 150
    assert out["mel"].shape[1:] == (80, span) and out["neural"].shape[1:] == (span, 3)
    counts = np.bincount([int(m[0, 0] // 1000) for m in out["mel"]], minlength=2)
    # Poisson(700 x 50 / 350 = 100) and Poisson(600): windows in proportion to trial length.
    assert 60 < counts[0] < 140 and 500 < counts[1] < 700, counts
    for mel, y, real, loss in zip(out["mel"], out["neural"], out["real"], out["loss"],
                                  strict=True):
        k, lo = int(mel[0, 0] // 1000), int(mel[0, 0] % 1000)  # trial, first frame of the crop
        t, n_real = lengths[k], int(real.sum())
        assert real[:n_real].all() and not real[n_real:].any()
        np.testing.assert_array_equal(mel[:, :n_real], mels[k][:, lo:lo + n_real])
        np.testing.assert_array_equal(y[:n_real], ys[k][lo:lo + n_real])
        assert not mel[:, n_real:].any() and not y[n_real:].any()
        first, m = int(np.argmax(loss)), int(loss.sum())
        assert loss[first:first + m].all() and m == min(100, t)
        s = lo + first  # the window's first frame in its trial
        # Context: 15 frames before and 35 after the window, clipped only by the trial's ends.
        assert first == min(15, s) and n_real - first - m == min(35, t - s - m)
    again = cut_trial_windows(batch, pass_index=0, **kw)
    np.testing.assert_array_equal(again["mel"], out["mel"])
    other = cut_trial_windows(batch, pass_index=1, **kw)
    assert len(other["mel"]) != len(out["mel"]) or not np.array_equal(other["mel"], out["mel"])
    empty = cut_trial_windows({k: v[:0] for k, v in batch.items()}, pass_index=0, **kw)
    assert empty["neural"].shape == (0, span, 3) and empty["loss"].dtype == bool


def _windows(trials, n, span, rng, min_loss):
    """n random windows (mel, neural, real, loss) of length span; loss frames >= min_loss."""
    out = {"mel": [], "neural": [], "real": [], "loss": []}
    for _ in range(n):
        t = trials[int(rng.integers(len(trials)))]
        s = int(rng.integers(0, t["mel"].shape[1] - span))
        a = int(rng.integers(0, span - min_loss))
        b = int(rng.integers(a + min_loss, span + 1))
        out["mel"].append(t["mel"][:, s:s + span])
        out["neural"].append(t["neural"][s:s + span])
        out["real"].append(np.ones(span, bool))
        out["loss"].append((np.arange(span) >= a) & (np.arange(span) < b))
    return {k: np.stack(v) for k, v in out.items()}


@pytest.mark.ray
def test_deepspeed_step_equals_single_process_step_on_the_global_batch(ray_connected, tmp_path):
    """ZeRO-1 on 2 gloo workers, whose windows hold different numbers of loss frames, equals one
    process taking the MSE over the global batch (the workers share the global frame count)."""
    from ssip.distributed.engine import RayTrainConfig
    from ssip.distributed.train_likelihood import run_likelihood_trainer
    from ssip.models.likelihood import (
        build_likelihood,
        load_likelihood,
        mel_normaliser,
        set_mel_normaliser,
        window_mse,
    )

    trials = forward_problem(seed=1, n_train=8, n_val=0, t=200)
    cfg = LikelihoodConfig(kind="conv", dropout=0.0, lr=3e-3, batch_size=4, head_channels=16,
                           kernel=9, lookahead=4, seed=2)
    rng = np.random.default_rng(5)
    # Rank 0's windows have many loss frames, rank 1's few: per-rank means would weigh them
    # equally, the global MSE does not.
    steps = [[_windows(trials, 2, 60, rng, 50), _windows(trials, 2, 60, rng, 50)],
             [_windows(trials, 2, 60, rng, 5), _windows(trials, 2, 60, rng, 5)]]
    for b in steps[1]:
        b["loss"][:] = np.arange(60)[None] < np.array([[8], [5]])
    mean, std = mel_normaliser([t["mel"] for t in trials])
    out = tmp_path / "lk"
    loop = {"likelihood": {**cfg.__dict__}, "subject": "S1", "n_electrodes": N_EL,
            "mel_mean": mean.tolist(), "mel_std": std.tolist(), "steps_per_epoch": 2,
            "epochs": 1, "local_batch_size": 2, "out": str(out), "data": {"kind": "test"},
            "progress": False, "ingest": None, "debug_batches": steps}
    run_likelihood_trainer(loop, {}, RayTrainConfig(workers=2, zero_stage=1,
                                                    storage_path=str(tmp_path / "runs")))
    model, manifest = load_likelihood(str(out))
    stats = manifest["extra"]["stats"]
    assert stats["samples_seen"] == 8 and stats["steps"] == 2 and stats["data"]["workers"] == 2

    def reference(global_mse: bool) -> dict[str, torch.Tensor]:
        """One process: the MSE over the global batch (or the mean of the per-rank MSEs)."""
        torch.manual_seed(cfg.seed)
        ref = build_likelihood(cfg, N_EL)
        set_mel_normaliser(ref, mean, std)
        opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=cfg.lr,
                                weight_decay=cfg.weight_decay)
        ref.train()
        for k in range(2):
            parts = [{key: torch.as_tensor(v) for key, v in steps[r][k].items()} for r in (0, 1)]
            if global_mse:
                b = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
                loss = window_mse(ref(b["mel"], b["real"]), b["neural"], b["loss"])
            else:
                loss = sum(window_mse(ref(p["mel"], p["real"]), p["neural"], p["loss"])
                           for p in parts) / 2
            opt.zero_grad()
            loss.backward()
            opt.step()
        return dict(ref.named_parameters())

    got = dict(model.named_parameters())
    want, per_rank = reference(True), reference(False)
    for name, p in want.items():
        torch.testing.assert_close(got[name], p, atol=2e-5, rtol=1e-4, msg=name)
    # The test tells the two apart: per-rank means end elsewhere.
    assert max(float((per_rank[n] - want[n]).detach().abs().max()) for n in want) > 1e-3


@pytest.fixture(scope="module")
def subject_ingest(tmp_path_factory):
    trials = forward_problem(seed=0, n_train=24, n_val=8, t=240)
    return write_trials_ingest(tmp_path_factory.mktemp("ingest"), trials), trials


@pytest.mark.ray
@pytest.mark.slow
def test_cli_trains_on_two_workers_and_resumes_by_run_name(ray_connected, subject_ingest,
                                                           tmp_path, capsys):
    from ssip.cli import main
    from ssip.models.likelihood import (
        build_likelihood,
        evaluate_likelihood,
        load_likelihood,
        pearson_per_electrode,
        variance_inflation,
    )

    root, trials = subject_ingest
    val = [t for t in trials if t["split"] == "val"]
    common = ["--subject", "S1", "--workers", "2", "--storage-path", str(tmp_path / "runs"),
              "--name", "lk", "--set", "kind=conv", "--set", "head_channels=32",
              "--set", "batch_size=8", "--set", "window_frames=100", "--set", "lr=3e-3"]
    out1 = tmp_path / "lk1"
    assert main(["train", "likelihood", root, str(out1), *common, "--set", "epochs=4"]) == 0
    text = capsys.readouterr().out
    assert "# RayTrainConfig" in text and "on 2 Ray Train worker(s)" in text
    model, manifest = load_likelihood(str(out1))
    stats = manifest["extra"]["stats"]
    assert stats["epochs"] == 4 and stats["data"]["workers"] == 2 and not stats["resumed_from"]

    # The saved numbers are those of the saved model on the val trials, and sigma is the closed
    # form: val RMS x sqrt(long-run variance factor), floored.
    m = evaluate_likelihood(model, val, 8, noise_lags=10)
    assert abs(m["r_mean"] - stats["val_r_mean"]) < 1e-5
    preds = [p for p in evaluate_likelihood.__globals__["predict_trials"](
        model, [t["mel"] for t in val])]
    res = [t["neural"] - p for t, p in zip(val, preds, strict=True)]
    rms = np.sqrt(np.mean(np.concatenate(res) ** 2, axis=0))
    sigma = np.maximum(rms * np.sqrt(variance_inflation(res, 10)), 1e-3)
    np.testing.assert_allclose(model.sigma.numpy(), sigma, rtol=1e-4)
    # It learned the forward model: far above an untrained head, toward the oracle's r.
    torch.manual_seed(0)
    untrained = build_likelihood(LikelihoodConfig(kind="conv", head_channels=32), N_EL).eval()
    r0 = evaluate_likelihood(untrained, val, 8)["r_mean"]
    oracle = float(np.nanmean(pearson_per_electrode(
        np.concatenate([t["signal"] for t in val]), np.concatenate([t["neural"] for t in val]))))
    assert stats["val_r_mean"] > max(r0 + 0.3, 0.5 * oracle), (stats["val_r_mean"], r0, oracle)

    # Same run name, more epochs: continues after epoch 4 (the checkpoint on disk), not anew.
    out2 = tmp_path / "lk2"
    assert main(["train", "likelihood", root, str(out2), *common, "--set", "epochs=6"]) == 0
    assert "resumed at" in capsys.readouterr().out
    _, manifest2 = load_likelihood(str(out2))
    s2 = manifest2["extra"]["stats"]
    assert s2["resumed_from"] == stats["samples_seen"] and s2["epochs"] == 6
    assert s2["samples_seen"] == stats["samples_seen"] * 6 // 4
    run = tmp_path / "runs" / "lk"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(r["val_mse"]) and r["samples_per_s"] > 0 for r in rows)
    # The best epoch is chosen over all six, the first run's four included.
    assert s2["best_epoch"] == min(rows, key=lambda r: r["val_mse"])["epoch"]
    last = sorted(p for p in run.glob("checkpoint_*") if p.is_dir())[-1]
    exported, _ = load_likelihood(str(last / "model"))
    assert exported.n_electrodes == N_EL


def test_job_entry_point_prints_both_configs_on_dry_run(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "train_likelihood.py"), str(tmp_path), str(tmp_path / "o"),
         "--subject", "S1", "--workers", "2", "--ray-set", "zero_stage=2", "--set", "kind=conv",
         "--dry-run"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "# RayTrainConfig" in proc.stdout and "zero_stage: 2" in proc.stdout
    assert "# LikelihoodConfig" in proc.stdout and "kind: conv" in proc.stdout
