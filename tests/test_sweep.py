"""Guidance sweeps on Ray Tune: on a subject whose likelihood overstates its noise fourfold
(weight 1 under-guides; weight 16 puts the score back where it belongs), the sweep finds a
setting whose validation score beats the default, its scores are the decoder's own, the preset
records what it used, and `ssip decode --preset` decodes with it (in process and on Ray)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ssip.decode import DecodeConfig, DecodeSpeed
from tests.conftest import write_trials_ingest

pytestmark = pytest.mark.ray

SUBJECT = "sub-01"
BASE = ["--decode-set", "num_steps=8", "--decode-set", "speed.batch_size=4"]


@pytest.fixture(scope="module")
def sweep_models(tmp_path_factory, speech_clips):
    """Real speech (pocketsphinx) cut into 0.64 s trials; neural = a fixed linear map of the mel
    plus noise; a tiny prior trained briefly on the train trials' mels; a conv likelihood whose
    sigma is then multiplied by 4 (the guidance at weight 1 is 16x too weak)."""
    from ssip.mel import log_mel
    from ssip.models.likelihood import LikelihoodConfig, save_likelihood, train_likelihood
    from ssip.models.prior import (
        EDMPrior,
        PriorConfig,
        estimate_data_stats,
        save_prior,
        train_prior,
        window_batches,
    )

    root = tmp_path_factory.mktemp("sweep")
    rng = np.random.default_rng(3)
    w = rng.standard_normal((80, 8)).astype(np.float32) / 9
    segments = [m[:, s:s + 64] for m in (log_mel(c).numpy().astype(np.float32)
                                         for c in speech_clips)
                for s in range(0, m.shape[1] - 64, 64)][:22]
    trials = []
    for i, mel in enumerate(segments):
        y = (mel.T - mel.mean()) @ w
        y = y + 0.5 * y.std() * rng.standard_normal(y.shape)
        split = "train" if i < 16 else "val" if i < 20 else "test"
        trials.append({"subject": SUBJECT, "trial_id": f"rec1/{split}{i:04d}", "split": split,
                       "mel": mel, "neural": y.astype(np.float32)})
    ingest = write_trials_ingest(root / "ingest", trials)
    train_mels = [t["mel"] for t in trials if t["split"] == "train"]
    mean, sigma_data = estimate_data_stats(train_mels)
    torch.manual_seed(0)
    prior = EDMPrior("tiny", sigma_data=sigma_data, data_mean=mean, channels=8)
    pcfg = PriorConfig(window_frames=32, batch_size=16, total_samples=3000, warmup_samples=0,
                       lr=2e-3, log_every_samples=1000, ema_halflife_samples=500)
    res = train_prior(prior, window_batches(train_mels, 32, 16, np.random.default_rng(0)), pcfg,
                      progress=False)
    save_prior(str(root / "prior"), prior, pcfg, ema=res["ema"])
    cfg = LikelihoodConfig(kind="conv", head_channels=8, kernel=9, lookahead=5, window_frames=32,
                           batch_size=4, epochs=150, lr=3e-3)
    model, stats = train_likelihood([t for t in trials if t["split"] != "test"], cfg,
                                    progress=False)
    assert stats["val_r_mean"] > 0.3
    with torch.no_grad():
        model.sigma.mul_(4.0)
    save_likelihood(str(root / "likelihood" / SUBJECT), model, subject=SUBJECT, stats=stats)
    return {"root": root, "ingest": ingest, "prior": str(root / "prior"),
            "likelihood": str(root / "likelihood"), "trials": trials}


def test_sweep_beats_the_default_and_decode_uses_the_preset(sweep_models, ray_cluster, tmp_path,
                                                             capsys, moto_s3):
    import boto3

    from ssip.cli import main
    from ssip.distributed.sweep import load_sweep_inputs, score_chunks

    m = sweep_models
    s3 = boto3.client("s3", endpoint_url=moto_s3, region_name="us-east-1")
    s3.create_bucket(Bucket="ssip-tune")
    rc = main(["sweep", m["ingest"], "--prior", m["prior"], "--likelihood-root", m["likelihood"],
               "--subject", SUBJECT, "--name", "strong", "--address", ray_cluster, *BASE,
               "--set", "values=[0.25, 4.0, 16.0]", "--set", "trials=4", "--set", "chunk=2",
               "--set", "n_draws=2", "--set", "storage_path=s3://ssip-tune/sweeps"])
    assert rc == 0
    assert "best" in capsys.readouterr().out
    preset = json.loads(Path(m["likelihood"], "presets", "strong.json").read_text())
    e = preset["subjects"][SUBJECT]
    assert e["n_settings"] == 4  # the default (weight 1) was added to the grid
    assert e["default"]["overrides"]["weight"] == 1.0
    assert e["score"] > e["default"]["score"] + 0.02, e["settings"]
    assert e["overrides"]["weight"] in (4.0, 16.0)
    assert e["trials"] == [f"rec1/val{i:04d}" for i in range(16, 20)]
    assert set(e["checkpoints"]) == {"prior", "likelihood"}
    # Tune kept its experiment on S3.
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="ssip-tune").get("Contents", [])]
    assert any(k.startswith(f"sweeps/sweep-strong-{SUBJECT}/") and k.endswith("result.json")
               for k in keys), keys[:20]
    assert e["tune"]["storage"] == "s3://ssip-tune/sweeps"

    # The scores Tune saw are the decoder's: recompute the winner's and the default's here.
    trials, prior, likelihood, baselines = load_sweep_inputs(m["ingest"], SUBJECT, m["prior"],
                                                             m["likelihood"], 4)
    assert baselines == {}  # evidence [encoding]: no baseline read
    base = DecodeConfig(num_steps=8, speed=DecodeSpeed(batch_size=4), n_draws=2, seed=0)
    for overrides, score in ((e["overrides"], e["score"]),
                             (e["default"]["overrides"], e["default"]["score"])):
        cfg = DecodeConfig(**{**base.__dict__, **overrides})
        *_, (n, got) = score_chunks(trials, prior, likelihood, cfg, 2)
        assert n == 4 and math.isclose(got, score, rel_tol=0, abs_tol=1e-6), (overrides, got)

    # Decoding with the preset equals decoding with the winning weight, and not the default.
    common = ["decode", m["ingest"], "--prior", m["prior"], "--likelihood-root", m["likelihood"],
              "--split", "val", "--set", "methods=[dps]", "--set", "n_draws=2",
              "--set", "num_steps=8", "--set", "speed.batch_size=4"]
    out = {}
    for tag, extra in (("preset", ["--preset", "strong"]),
                       ("won", ["--set", f"weight={e['overrides']['weight']}"]),
                       ("default", []),
                       ("preset-ray", ["--preset", "strong", "--actors", "1",
                                       "--address", ray_cluster])):
        path = str(tmp_path / f"{tag}.parquet")
        assert main([*common, *extra, "--out", path]) == 0
        import pyarrow.parquet as pq

        from ssip.data.schema import tensor_values

        out[tag] = [np.asarray(x).tobytes() for x in tensor_values(
            pq.read_table(path, columns=["mel", "mel_shape"]), "mel")]
    assert out["preset"] == out["won"] == out["preset-ray"]
    assert out["preset"] != out["default"]


def test_missing_preset_names_the_folder(sweep_models, tmp_path):
    from ssip.cli import main

    m = sweep_models
    with pytest.raises(FileNotFoundError, match=r"no preset 'nope' at .*presets/nope\.json"):
        main(["decode", m["ingest"], "--prior", m["prior"], "--likelihood-root", m["likelihood"],
              "--preset", "nope", "--set", "methods=[dps]", "--out", str(tmp_path / "x.parquet")])
