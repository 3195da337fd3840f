"""Prior training on Ray: windows streamed by Ray Data, DDP workers in Ray Train, the CLI.

Runs on the session's 2-CPU `ray start` head (tests/conftest.py, token auth on).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from ssip.config import ConfigError
from ssip.data import schema
from ssip.mel import MEL_FLOOR
from ssip.models.prior import PriorConfig
from ssip.storage import write_json, write_parquet

W = 32


def _speech_root(root, utterances: list[tuple[str, np.ndarray]]) -> str:
    """A speech corpus root with one shard per source: (source, mel (80, T)) per utterance."""
    by_source: dict[str, list[dict]] = {}
    for i, (src, mel) in enumerate(utterances):
        by_source.setdefault(src, []).append({
            "utt_id": f"{src}/u{i}", "source": src, "speaker": f"{src}:a", "language": "en",
            "transcript": "", "license": "", "source_file": f"u{i}.wav", "source_rate": 16000,
            "duration_s": mel.shape[1] / 100, "n_frames": mel.shape[1], "mel": mel,
            "mel_version": "x"})
    shards = []
    for src, rows in by_source.items():
        write_parquet(str(root / "shards" / f"{src}.parquet"), schema.speech_table(rows))
        shards.append({"path": f"shards/{src}.parquet", "rows": len(rows)})
    write_json(str(root / "card.json"), {"schema_version": schema.SPEECH_SCHEMA_VERSION,
                                         "shards": shards})
    return str(root)


@pytest.fixture(scope="module")
def two_source_root(tmp_path_factory):
    """Source a: mels near 0 (two of 100 frames, one of 20 frames, shorter than a window);
    source b: mels near 1 (two of 100 frames)."""
    rng = np.random.default_rng(0)

    def mel(offset, t):
        return (offset + 0.1 * rng.standard_normal((80, t))).astype(np.float32)

    utts = [("a", mel(0.0, 100)), ("a", mel(0.0, 100)), ("a", mel(0.0, 20)),
            ("b", mel(1.0, 100)), ("b", mel(1.0, 100))]
    return _speech_root(tmp_path_factory.mktemp("speech2"), utts)


def test_cut_windows_is_seeded_per_utterance_and_pass():
    from ssip.distributed.train_prior import cut_windows

    rng = np.random.default_rng(1)
    mels = np.empty(2, object)
    mels[:] = [rng.standard_normal((80, 50)).astype(np.float32), rng.standard_normal((80, 70)).astype(np.float32)]
    batch = {"utt_id": np.array(["s/x", "s/y"]), "source": np.array(["s", "s"]),
             "n_frames": np.array([50, 70]), "mel": mels}
    kw = {"window": 16, "windows_per_epoch": 400, "epoch_seed": 5, "per_frame": {"s": 1 / 120}}
    x = cut_windows(batch, pass_index=0, **kw)["x"]
    assert x.shape[1:] == (80, 16) and x.dtype == np.float32
    assert abs(len(x) - 400) < 4 * np.sqrt(400)
    np.testing.assert_array_equal(x, cut_windows(batch, pass_index=0, **kw)["x"])
    assert not np.array_equal(x[:10], cut_windows(batch, pass_index=1, **kw)["x"][:10])
    # An utterance's windows do not depend on its batch-mates.
    one = {k: v[1:] for k, v in batch.items()}
    tail = cut_windows(one, pass_index=0, **kw)["x"]
    np.testing.assert_array_equal(x[-len(tail):], tail)
    # A source without weight gives no windows.
    assert len(cut_windows(batch, pass_index=0, **{**kw, "per_frame": {"t": 1.0}})["x"]) == 0


def test_window_dataset_weights_shapes_seeds_and_padding(ray_connected, two_source_root):
    from ssip.distributed.train_prior import window_dataset

    cfg = PriorConfig(window_frames=W, source_weights={"a": 3.0, "b": 1.0})

    def windows(ds):
        return np.stack([r["x"] for r in ds.take_all()])

    ds1 = window_dataset([two_source_root], cfg, windows_per_epoch=1200, epoch_seed=1)
    x = windows(ds1)
    assert x.shape[1:] == (80, W) and x.dtype == np.float32
    assert abs(len(x) - 1200) < 4 * np.sqrt(1200)
    share_b = float(np.mean(x.mean(axis=(1, 2)) > 0.5))
    assert share_b == pytest.approx(0.25, abs=0.04)
    # The 20-frame utterance sits at a random offset inside a MEL_FLOOR-padded window.
    padded = x[(x == np.float32(MEL_FLOOR)).all(axis=1).any(axis=1)]
    assert len(padded) > 10
    for w in padded:
        speech = ~(w == np.float32(MEL_FLOOR)).all(axis=0)  # (W,) frames holding the mel
        cols = np.flatnonzero(speech)
        assert len(cols) == 20 and cols[-1] - cols[0] == 19
    assert len({int(np.flatnonzero(~(w == np.float32(MEL_FLOOR)).all(axis=0))[0]) for w in padded}) > 1

    def key(a):
        return np.sort(a.sum(axis=(1, 2)))

    # Same seed: the same windows (order aside); another seed or the next pass: others.
    again = windows(window_dataset([two_source_root], cfg, windows_per_epoch=1200, epoch_seed=1))
    np.testing.assert_allclose(key(again), key(x), rtol=1e-6)
    other = windows(window_dataset([two_source_root], cfg, windows_per_epoch=1200, epoch_seed=2))
    assert len(other) != len(x) or not np.allclose(key(other), key(x))
    second_pass = windows(ds1)
    assert len(second_pass) != len(x) or not np.allclose(key(second_pass), key(x))


def test_deepspeed_step_equals_single_process_step_on_the_global_batch(ray_connected, tmp_path):
    """DeepSpeed ZeRO-1 on 2 gloo workers = one process on the global batch (same noise)."""
    from ssip.distributed.engine import RayTrainConfig
    from ssip.distributed.train_prior import rank_seed, run_prior_trainer
    from ssip.models.prior import (
        EMA,
        EDMPrior,
        edm_loss,
        ema_beta,
        learning_rate,
        load_prior,
        sample_sigma,
    )

    cfg = PriorConfig(window_frames=16, batch_size=4, lr=1e-3, warmup_samples=0, total_samples=8,
                      log_every_samples=4, seed=3)
    rng = np.random.default_rng(0)
    steps = [rng.standard_normal((4, 80, 16)).astype(np.float32) for _ in range(2)]  # global batches
    mean = (0.1 * rng.standard_normal(80)).astype(np.float32)
    unet = {"channels": 8, "emb_channels": 16}
    loop = {"prior": dataclasses.asdict(cfg), "data_mean": mean.tolist(), "sigma_data": 0.7,
            "local_batch_size": 2, "shuffle_buffer": 8, "out": str(tmp_path / "ddp"),
            "data": {"kind": "test"}, "unet": unet, "progress": False,
            "debug_batches": [[b[:2] for b in steps], [b[2:] for b in steps]]}
    run_prior_trainer(loop, {}, RayTrainConfig(workers=2, zero_stage=1,
                                               storage_path=str(tmp_path / "runs")))
    model, manifest = load_prior(str(tmp_path / "ddp"))
    stats = manifest["extra"]["train_stats"]
    assert stats["samples_seen"] == 8 and stats["steps"] == 2
    assert manifest["extra"]["data"]["workers"] == 2
    assert manifest["extra"]["data"]["zero_stage"] == 1

    def reference(ranks):
        """Single process: the global batch, each sample with the noise its rank drew."""
        torch.manual_seed(cfg.seed)
        net = EDMPrior(cfg.preset, sigma_data=0.7, data_mean=mean, **unet)
        ema = EMA(net)
        opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
        gens = {r: torch.Generator().manual_seed(rank_seed(cfg.seed, r)) for r in ranks}
        seen = 0
        for b in steps:
            net.train()
            losses = []
            for r in ranks:
                x0 = torch.from_numpy(b[2 * r:2 * r + 2])[:, None]
                sigma = sample_sigma(2, gens[r], cfg.p_mean, cfg.p_std)
                losses.append(edm_loss(net, x0, gens[r], sigma=sigma).mean())
            for g in opt.param_groups:
                g["lr"] = learning_rate(seen, cfg)
            opt.zero_grad()
            torch.stack(losses).mean().backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
            opt.step()
            seen += 4
            ema.update(net, ema_beta(4, cfg.ema_halflife_samples, seen, cfg.ema_rampup_ratio))
        return ema.model.state_dict()

    got = model.state_dict()
    ref = reference([0, 1])
    for k, v in ref.items():
        torch.testing.assert_close(got[k], v, atol=2e-5, rtol=1e-4, msg=k)
    # Control: without gradient averaging (rank 0's half alone) the weights differ.
    alone = reference([0])
    assert max(float((alone[k] - ref[k]).abs().max()) for k in ref) > 1e-3


def test_cli_trains_on_two_workers_end_to_end(ray_connected, tmp_path, monkeypatch, capsys, speech_clips):
    from ssip.cli import main
    from ssip.mel import log_mel
    from ssip.models.prior import EDMPrior, denoising_loss, load_prior, random_windows

    monkeypatch.setenv("RAY_ADDRESS", ray_connected)
    mels = [log_mel(c[: 16000 * 3]).numpy().astype(np.float32) for c in speech_clips[:4]]
    root = _speech_root(tmp_path / "speech", [("clips", m) for m in mels])
    out = tmp_path / "prior"
    args = ["train", "prior", root, str(out), "--workers", "2", "--storage-path", str(tmp_path / "runs"),
            "--set", f"window_frames={W}", "--set", "batch_size=8", "--set", "total_samples=96",
            "--set", "warmup_samples=0", "--set", "lr=2e-3", "--set", "log_every_samples=32"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "Ray Train worker(s)" in text and "2 Ray" in text
    model, manifest = load_prior(str(out))
    data = manifest["extra"]["data"]
    assert data["workers"] == 2 and data["n_utterances"] == 4 and data["per_source"] == {"clips": 4}
    assert manifest["extra"]["weights"] == "ema"
    assert manifest["extra"]["train_stats"]["samples_seen"] == 96
    # The trained EMA denoises real speech windows better than the untrained network.
    x0 = torch.from_numpy(random_windows(mels, W, 16, np.random.default_rng(9)))[:, None]
    untrained = EDMPrior("tiny", sigma_data=float(model.sigma_data), data_mean=model.data_mean)
    sigmas = [0.2, 0.5, 1.0]
    before = denoising_loss(untrained, x0, sigmas)
    after = denoising_loss(model, x0, sigmas)
    assert np.mean(after) < 0.9 * np.mean(before), (before, after)
    json.dumps(manifest)  # the manifest stays plain JSON


def test_cli_refuses_an_ingest_root_with_workers(tmp_path):
    from ssip.cli import main

    write_json(str(tmp_path / "manifest.json"), {"recordings": []})
    with pytest.raises(FileNotFoundError, match=r"card\.json does not exist.*ingest root"):
        main(["train", "prior", str(tmp_path), str(tmp_path / "out"), "--workers", "2"])
    with pytest.raises(ConfigError, match="multiple of workers"):
        main(["train", "prior", str(tmp_path), str(tmp_path / "o"), "--workers", "3"])
