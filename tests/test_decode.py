"""ssip.decode end to end on tiny models: shapes, batch == alone, seeds, the controls."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ssip.config import ConfigError
from ssip.decode import (
    MEAN_DRAW,
    DecodeConfig,
    DecodeSpeed,
    baseline_rows,
    decode_trials,
    padded_length,
    trial_key,
)
from ssip.mel import MEL_FLOOR, N_MELS
from ssip.models.baselines import LinearDecoder, LinearDecoderConfig
from ssip.models.likelihood import LikelihoodConfig, train_likelihood
from ssip.models.prior import EDMPrior

N_EL = 6
SUBJECT = "sub-01"
# Test trials pad to 40 frames (one batch of 3) except the last (48 frames).
TEST_LENGTHS = (33, 37, 40, 45)


def _trial(rng: np.random.Generator, index: int, n_frames: int, split: str) -> dict:
    # Smooth random mel; neural = fixed linear map of the mel + noise, so the likelihood has
    # something to fit.
    base = rng.standard_normal((N_MELS, n_frames + 4)).cumsum(axis=1) * 0.05
    mel = (base[:, 2:-2] - 0.2).astype(np.float32)
    w = np.random.default_rng(7).standard_normal((N_MELS, N_EL)) / np.sqrt(N_MELS)
    neural = (mel.T @ w + 0.3 * rng.standard_normal((n_frames, N_EL))).astype(np.float32)
    return {"subject": SUBJECT, "trial_id": f"rec/{index:04d}", "split": split,
            "neural": neural, "mel": mel}


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    train = [_trial(rng, i, 60, "train") for i in range(4)]
    val = [_trial(rng, 10 + i, 50, "val") for i in range(2)]
    test = [_trial(rng, 20 + i, n, "test") for i, n in enumerate(TEST_LENGTHS)]
    cfg = LikelihoodConfig(kind="conv", head_channels=8, kernel=9, lookahead=5, window_frames=32,
                           batch_size=4, epochs=1)
    likelihood, _ = train_likelihood(train + val, cfg, progress=False)
    prior = EDMPrior("tiny", sigma_data=0.5, data_mean=np.full(N_MELS, -0.2), channels=8)
    return prior, likelihood, train, test


FAST = dict(n_draws=2, num_steps=10, speed=DecodeSpeed(batch_size=8))


@pytest.fixture(scope="module")
def decoded(setup):
    prior, likelihood, _, test = setup
    cfg = DecodeConfig(methods=["dps", "prior", "dps-shuffled"], **FAST)
    return decode_trials(test, prior, likelihood, cfg)


def _by_key(rows):
    return {(r["trial_id"], r["method"], r["draw"]): r["mel"] for r in rows}


def test_rows_keys_shapes_and_order(setup, decoded):
    _, _, _, test = setup
    # 4 trials x 3 methods x (2 draws + mean).
    assert len(decoded) == 4 * 3 * 3
    assert [(r["trial_id"], r["method"], r["draw"]) for r in decoded[:6]] == [
        ("rec/0020", "dps", 0), ("rec/0020", "dps", 1), ("rec/0020", "dps", -1),
        ("rec/0020", "prior", 0), ("rec/0020", "prior", 1), ("rec/0020", "prior", -1)]
    for r in decoded:
        keys = {"subject", "trial_id", "method", "draw", "mel"}
        assert set(r) == (keys | {"spread"} if r["draw"] == MEAN_DRAW else keys)
        assert r["subject"] == SUBJECT
        n = dict((t["trial_id"], t["neural"].shape[0]) for t in test)[r["trial_id"]]
        assert r["mel"].shape == (N_MELS, n) and r["mel"].dtype == np.float32
        assert np.isfinite(r["mel"]).all()
        # Cropped: no MEL_FLOOR-filled padding columns survive.
        assert not np.all(r["mel"][:, -1] == np.float32(MEL_FLOOR))


def test_mean_row_is_mean_of_draws(decoded):
    d = _by_key(decoded)
    for (tid, method, draw), mel in d.items():
        if draw == MEAN_DRAW:
            np.testing.assert_allclose(mel, (d[(tid, method, 0)] + d[(tid, method, 1)]) / 2,
                                       atol=1e-6)
    # Two draws differ (their seeds differ).
    assert np.abs(d[("rec/0020", "dps", 0)] - d[("rec/0020", "dps", 1)]).mean() > 1e-2
    # The mean row's spread is the draws' std (Bessel, K = 2: |a - b| / sqrt(2)), averaged.
    for r in decoded:
        if r["draw"] == MEAN_DRAW:
            a, b = d[(r["trial_id"], r["method"], 0)], d[(r["trial_id"], r["method"], 1)]
            assert r["spread"] == pytest.approx(float(np.abs(a - b).mean() / np.sqrt(2)), rel=1e-4)


def test_batch_equals_each_alone(setup, decoded):
    prior, likelihood, _, test = setup
    assert {padded_length(t["neural"].shape[0], 8) for t in test[:3]} == {40}
    d = _by_key(decoded)
    # The shuffled control of trial i borrows trial i+1's neural: keep the list cyclic order by
    # decoding "dps" and "prior" only, one trial at a time.
    cfg = DecodeConfig(methods=["dps", "prior"], **FAST)
    for t in test:
        alone = _by_key(decode_trials([t], prior, likelihood, cfg))
        for key, mel in alone.items():
            np.testing.assert_allclose(mel, d[key], atol=1e-5, rtol=0, err_msg=str(key))


def test_same_seed_same_bytes_other_seed_differs(setup, decoded):
    prior, likelihood, _, test = setup
    cfg = DecodeConfig(methods=["dps", "prior", "dps-shuffled"], **FAST)
    again = decode_trials(test, prior, likelihood, cfg)
    assert all(a["mel"].tobytes() == b["mel"].tobytes() for a, b in zip(decoded, again, strict=True))
    other = decode_trials(test[:1], prior, likelihood,
                          DecodeConfig(methods=["dps"], seed=1, **FAST))
    assert np.abs(other[0]["mel"] - _by_key(decoded)[("rec/0020", "dps", 0)]).mean() > 1e-2


def test_prior_uses_the_same_seeds_and_guidance_changes_the_sample(setup, decoded):
    prior, likelihood, _, test = setup
    d = _by_key(decoded)
    # Zero guidance turns DPS into the unconditional sampler with the same seeds: equal to "prior".
    cfg0 = DecodeConfig(methods=["dps"], weight=0.0, **FAST)
    unguided = _by_key(decode_trials(test[:1], prior, likelihood, cfg0))
    np.testing.assert_allclose(unguided[("rec/0020", "dps", 0)], d[("rec/0020", "prior", 0)],
                               atol=1e-5)
    assert np.abs(d[("rec/0020", "dps", 0)] - d[("rec/0020", "prior", 0)]).mean() > 1e-3


def test_control_draws_are_the_first_draws_of_the_same_seeds(setup, decoded):
    prior, likelihood, _, test = setup
    cfg = DecodeConfig(methods=["dps", "prior", "dps-shuffled"], control_draws=1, **FAST)
    rows = decode_trials(test[:2], prior, likelihood, cfg)
    d, full = _by_key(rows), _by_key(decoded)
    for tid in ("rec/0020", "rec/0021"):
        assert sorted(k[2] for k in d if k[:2] == (tid, "prior")) == [MEAN_DRAW, 0]
        assert sorted(k[2] for k in d if k[:2] == (tid, "dps")) == [MEAN_DRAW, 0, 1]
        # One control draw: its mean row is that draw, and it is draw 0 of the full run.
        np.testing.assert_array_equal(d[(tid, "prior", MEAN_DRAW)], d[(tid, "prior", 0)])
        np.testing.assert_allclose(d[(tid, "prior", 0)], full[(tid, "prior", 0)], atol=1e-5)
    with pytest.raises(ConfigError, match="control_draws"):
        DecodeConfig(control_draws=0)


def test_shuffled_control_uses_the_next_trials_neural(setup, decoded):
    prior, likelihood, _, test = setup
    d = _by_key(decoded)
    cfg = DecodeConfig(methods=["dps"], **FAST)
    for i, t in enumerate(test):
        # Trial i with trial i+1's neural (cyclic), cropped or zero-padded to trial i's length.
        src = test[(i + 1) % len(test)]["neural"]
        n = t["neural"].shape[0]
        borrowed = np.zeros((n, N_EL), np.float32)
        borrowed[:min(n, len(src))] = src[:n]
        swapped = decode_trials([{**t, "neural": borrowed}], prior, likelihood, cfg)
        for r in swapped:
            np.testing.assert_allclose(r["mel"], d[(r["trial_id"], "dps-shuffled", r["draw"])],
                                       atol=1e-5)
        assert np.abs(d[(t["trial_id"], "dps-shuffled", 0)]
                      - d[(t["trial_id"], "dps", 0)]).mean() > 1e-4


def test_baselines(setup):
    prior, likelihood, train, test = setup
    dec = LinearDecoder(LinearDecoderConfig(n_components=8)).fit(
        [t["neural"] for t in train], [t["mel"] for t in train])
    rows = decode_trials(test, prior, likelihood, DecodeConfig(methods=["linear"], **FAST),
                         baselines={"linear": dec})
    assert [(r["trial_id"], r["method"], r["draw"]) for r in rows] == [
        (t["trial_id"], "linear", -1) for t in test]
    for r, t in zip(rows, test, strict=True):
        np.testing.assert_array_equal(r["mel"], dec.predict(t["neural"]))
    assert [r["mel"].tobytes() for r in baseline_rows(test, dec, "linear")] == [
        r["mel"].tobytes() for r in rows]


def test_daps_and_nn_pseudo_measurement_evidence(setup):
    """sampler=daps with the encoding likelihood, the nn-style pseudo-measurement, or both:
    batch == alone, the shuffled control reads the next trial's neural for BOTH views, and with
    a near-exact pseudo-measurement (tiny noise std) the posterior follows it."""
    prior, likelihood, train, test = setup
    dec = LinearDecoder(LinearDecoderConfig(n_components=8)).fit(
        [t["neural"] for t in train], [t["mel"] for t in train])
    dec.noise_std = np.full(N_MELS, 0.3)
    fast = dict(FAST, sampler="daps", daps_langevin_steps=3)
    for evidence, weights in ((["encoding"], None), (["nn"], None), (["encoding", "nn"], [0.5, 0.5])):
        cfg = DecodeConfig(methods=["dps", "dps-shuffled"], evidence=evidence,
                           evidence_weights=weights, **fast)
        rows = decode_trials(test, prior, likelihood, cfg, baselines={"nn": dec})
        d = _by_key(rows)
        alone = decode_trials([test[1], test[2]], prior, likelihood, cfg, baselines={"nn": dec},
                              shuffled_neural=[test[2]["neural"], test[3]["neural"]])
        for r in alone:
            np.testing.assert_allclose(r["mel"], d[(r["trial_id"], r["method"], r["draw"])],
                                       atol=1e-5)
    # A pseudo-measurement of std 0.01 pins the posterior to the nn's mel.
    dec.noise_std = np.full(N_MELS, 0.01)
    cfg = DecodeConfig(methods=["dps", "prior"], evidence=["nn"],
                       **dict(fast, daps_langevin_steps=10))
    rows = {r["method"]: r["mel"] for r in decode_trials(test[:1], prior, None, cfg,
                                                         baselines={"nn": dec}) if r["draw"] == -1}
    target = dec.predict(test[0]["neural"])
    err, err_prior = (np.abs(rows[m] - target).mean() for m in ("dps", "prior"))
    print(f"pseudo-measurement pin: {err:.3f} vs prior {err_prior:.3f}")  # measured 0.056 vs 0.387
    assert err < 0.25 * err_prior, (err, err_prior)
    with pytest.raises(ValueError, match="evidence 'nn' needs the subject's fitted nn decoder"):
        decode_trials(test, prior, likelihood, DecodeConfig(evidence=["nn"], **FAST))
    with pytest.raises(ConfigError, match="evidence_weights"):
        DecodeConfig(evidence=["encoding", "nn"], evidence_weights=[1.0])
    with pytest.raises(ConfigError, match="sampler=ancestral is the published reference"):
        DecodeConfig(sampler="ancestral", evidence=["nn"])


def test_errors(setup):
    prior, likelihood, _, test = setup
    with pytest.raises(ConfigError, match="exactly one of xi"):
        DecodeConfig(xi=0.2, zeta=0.5, weight=None)
    with pytest.raises(ConfigError, match="exactly one of xi"):
        DecodeConfig(xi=0.2)  # weight is on by default
    with pytest.raises(ConfigError, match="methods"):
        DecodeConfig(methods=["dps", "oracle"])
    with pytest.raises(ValueError, match="needs >= 2 trials"):
        decode_trials(test[:1], prior, likelihood, DecodeConfig(methods=["dps-shuffled"], **FAST))
    with pytest.raises(ValueError, match="no fitted decoder"):
        decode_trials(test, prior, likelihood, DecodeConfig(methods=["nn"], **FAST))
    with pytest.raises(ValueError, match="subjects"):
        decode_trials([test[0], {**test[1], "subject": "sub-02"}], prior, likelihood,
                      DecodeConfig(methods=["prior"], **FAST))
    assert trial_key(test[0]) == "sub-01/rec/0020"


@pytest.fixture(scope="module")
def ingest_root(tmp_path_factory):
    """8 trials (4 train, 2 val, 2 test) of real speech with noise as 'neural', on disk."""
    from tests.conftest import make_speech_ingest

    return make_speech_ingest(tmp_path_factory.mktemp("ingest"), n_trials=8, step_s=0.75,
                              duration_s=0.6, n_electrodes=N_EL, val_fraction=0.25,
                              test_fraction=0.25)


def test_cli_train_and_decode_end_to_end(ingest_root, tmp_path):
    from ssip.cli import main
    from ssip.data.dataset import load_trials
    from ssip.evaluate.report import read_decoded

    root, models = str(ingest_root), tmp_path / "models"
    assert main(["train", "prior", root, str(models / "prior"), "--set", "total_samples=4",
                 "--set", "batch_size=2", "--set", "window_frames=32",
                 "--set", "warmup_samples=0", "--set", "log_every_samples=4"]) == 0
    assert main(["train", "likelihood", root, str(models / "lik" / "s1"), "--subject", "s1",
                 "--set", "kind=conv", "--set", "epochs=1", "--set", "head_channels=8",
                 "--set", "kernel=9", "--set", "lookahead=4", "--set", "window_frames=32"]) == 0
    assert main(["train", "baseline", root, str(models / "base" / "s1" / "linear"),
                 "--subject", "s1", "--kind", "linear", "--set", "n_components=8"]) == 0
    assert main(["train", "baseline", root, str(models / "base" / "s1" / "nn"), "--subject", "s1",
                 "--kind", "nn", "--set", "hidden=8", "--set", "max_steps=2",
                 "--set", "eval_every=1"]) == 0
    # --dry-run resolves and stops: nothing is written.
    assert main(["decode", root, "--prior", "nowhere", "--out", str(tmp_path / "x.parquet"),
                 "--dry-run"]) == 0
    assert not (tmp_path / "x.parquet").exists()
    out = tmp_path / "decoded.parquet"
    assert main(["decode", root, "--prior", str(models / "prior"),
                 "--likelihood-root", str(models / "lik"), "--baselines-root",
                 str(models / "base"), "--out", str(out), "--set", "n_draws=1",
                 "--set", "num_steps=2"]) == 0
    rows = read_decoded(str(out))
    test = load_trials(root, split="test")
    assert len(test) == 2
    # Per trial: dps, prior, dps-shuffled (1 draw + mean each), linear, nn.
    assert sorted((r["trial_id"], r["method"], r["draw"]) for r in rows) == sorted(
        (t["trial_id"], m, d) for t in test
        for m, d in [("dps", 0), ("dps", -1), ("prior", 0), ("prior", -1), ("dps-shuffled", 0),
                     ("dps-shuffled", -1), ("linear", -1), ("nn", -1)])
    n_frames = {t["trial_id"]: t["mel"].shape[1] for t in test}
    assert all(r["mel"].shape == (N_MELS, n_frames[r["trial_id"]]) for r in rows)

    # The resolved config is saved beside the table with its hash, the trial selection included.
    from ssip.commands.decode import config_uri
    from ssip.config import config_hash, from_dict

    def saved(path):
        text = Path(config_uri(str(path))).read_text()
        digest = re.match(r"# DecodeConfig \(hash (\w+)\)", text).group(1)
        cfg = from_dict(DecodeConfig, yaml.safe_load(text))
        assert config_hash(cfg) == digest
        return cfg, digest

    cfg, _ = saved(out)
    assert (cfg.selection.split, cfg.selection.subjects, cfg.selection.max_trials) == ("test", [], 0)
    # The flags set the selection (a flag overrides --set); runs differing only in --max-trials
    # save different configs and hashes, and decode what they say.
    hashes = {}
    for n in (1, 2):
        path = tmp_path / f"linear-{n}.parquet"
        assert main(["decode", root, "--prior", str(models / "prior"), "--baselines-root",
                     str(models / "base"), "--out", str(path), "--set", "methods=[linear]",
                     "--set", "selection.max_trials=5", "--split", "test", "--subject", "s1",
                     "--max-trials", str(n)]) == 0
        cfg, hashes[n] = saved(path)
        assert (cfg.selection.split, cfg.selection.subjects, cfg.selection.max_trials) == (
            "test", ["s1"], n)
        assert len(read_decoded(str(path))) == n
    assert hashes[1] != hashes[2]
