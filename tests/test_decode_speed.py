"""The decoder's speed switches (DecodeConfig): each keeps a trial's draws within a stated
tolerance of the exact path (fp32, every step guided, one sampler call per batch), same seeds."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from ssip.config import ConfigError
from ssip.decode import MOVED_TO_SPEED, DecodeConfig, DecodeSpeed, decode_trials
from ssip.sampling import karras_sigmas
from tests.test_decode import FAST, setup  # noqa: F401 (the module fixture)


def _cfg(**kw) -> DecodeConfig:
    """DecodeConfig from flat keywords: the speed switches (precision, batch_size, ...) go to
    its speed section, over those of a ``speed`` given (FAST's)."""
    speed = dataclasses.asdict(kw.pop("speed", DecodeSpeed()))
    speed.update({k: kw.pop(k) for k in list(kw) if k in MOVED_TO_SPEED})
    return DecodeConfig(**kw, speed=DecodeSpeed(**speed))


def _mels(rows):
    return {(r["trial_id"], r["method"], r["draw"]): r["mel"] for r in rows}


def _max_diff(a, b):
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


@pytest.fixture(scope="module")
def exact(setup):  # noqa: F811
    prior, likelihood, _, test = setup
    cfg = _cfg(methods=["dps", "prior"], precision="fp32", **FAST)
    return _mels(decode_trials(test, prior, likelihood, cfg))


def test_one_trial_one_draw_per_call_equals_the_batched_decode(setup, exact):  # noqa: F811
    prior, likelihood, _, test = setup
    cfg = _cfg(methods=["dps", "prior"], precision="fp32",
                       **{**FAST, "batch_size": 1}, draws_per_call=1)
    assert _max_diff(_mels(decode_trials(test, prior, likelihood, cfg)), exact) < 1e-5


def test_gradient_checkpointing_is_exact(setup, exact):  # noqa: F811
    prior, likelihood, _, test = setup
    cfg = _cfg(methods=["dps", "prior"], precision="fp32", grad_checkpoint=True, **FAST)
    assert _max_diff(_mels(decode_trials(test, prior, likelihood, cfg)), exact) < 1e-6


def test_bf16_autocast_stays_close(setup, exact):  # noqa: F811
    # bf16 keeps 8 mantissa bits; the sampler's update stays float64. Measured on CPU: max
    # difference 5e-4 (mels span about 3 units); the test allows 1e-2.
    prior, likelihood, _, test = setup
    cfg = _cfg(methods=["dps", "prior"], precision="bf16", **FAST)
    got = _mels(decode_trials(test, prior, likelihood, cfg))
    diff = _max_diff(got, exact)
    assert 0 < diff < 1e-2
    assert DecodeConfig().speed.resolved_precision("cpu") == "fp32"
    assert DecodeConfig().speed.resolved_precision("cuda") == "bf16"


def test_guide_sigma_max_selects_the_low_noise_steps(setup, exact):  # noqa: F811
    prior, likelihood, _, test = setup
    sig = karras_sigmas(FAST["num_steps"], 0.002, 80.0, 7.0).tolist()[:-1]
    cfg = _cfg(methods=["dps"], guide_sigma_max=1.0, **FAST)
    assert cfg.guide_steps() == [s <= 1.0 for s in sig]
    assert 0 < sum(cfg.guide_steps()) < len(sig)
    # Guiding every step is the exact path, bit for bit.
    all_cfg = _cfg(methods=["dps"], guide_sigma_max=80.0, precision="fp32", **FAST)
    every = _mels(decode_trials(test[:1], prior, likelihood, all_cfg))
    assert all(every[k].tobytes() == exact[k].tobytes() for k in every)
    # Guiding none of them is the prior's sampler with the same seeds.
    none_cfg = _cfg(methods=["dps"], guide_sigma_max=0.0, precision="fp32", **FAST)
    unguided = _mels(decode_trials(test[:1], prior, likelihood, none_cfg))
    for (tid, _, draw), mel in unguided.items():
        np.testing.assert_allclose(mel, exact[(tid, "prior", draw)], atol=1e-6)


def test_ancestral_sampler_and_its_prior_control(setup):  # noqa: F811
    prior, likelihood, _, test = setup
    kw = dict(sampler="ancestral", num_steps=12, n_draws=2, precision="fp32")
    rows = _mels(decode_trials(test[:1], prior, likelihood,
                               _cfg(methods=["dps", "prior"], **kw)))
    # Zero guidance is the unguided DDPM sampler with the same seeds.
    zero = _mels(decode_trials(test[:1], prior, likelihood,
                               _cfg(methods=["dps"], weight=0.0, **kw)))
    for (tid, _, draw), mel in zero.items():
        np.testing.assert_allclose(mel, rows[(tid, "prior", draw)], atol=1e-6)
    assert np.abs(rows[("rec/0020", "dps", 0)] - rows[("rec/0020", "prior", 0)]).mean() > 1e-3
    # The paper's constant step is the other rule it takes.
    zeta = _mels(decode_trials(test[:1], prior, likelihood,
                               _cfg(methods=["dps"], weight=None, zeta=0.5, **kw)))
    assert np.isfinite(zeta[("rec/0020", "dps", 0)]).all()


def test_switch_config_errors(setup):  # noqa: F811
    prior, likelihood, _, test = setup
    with pytest.raises(ConfigError, match="not xi"):
        _cfg(sampler="ancestral", weight=None, xi=0.1)
    with pytest.raises(ConfigError, match="guide_sigma_max"):
        _cfg(sampler="ancestral", guide_sigma_max=1.0)
    with pytest.raises(ConfigError, match=r"1\.\.1000"):
        _cfg(sampler="ancestral", num_steps=2000)
    with pytest.raises(ConfigError, match="sampler"):
        _cfg(sampler="ddim")
    with pytest.raises(ConfigError, match="precision"):
        DecodeSpeed(precision="fp16")
    with pytest.raises(ValueError, match="need a Whisper likelihood"):
        decode_trials(test[:1], prior, likelihood,
                      _cfg(methods=["dps"], whisper_window="30s", **FAST))


def test_torch_compile_matches_eager(setup, exact):  # noqa: F811
    # torch.compile (inductor, CPU here) of the denoiser and the likelihood: the same draws to
    # float rounding (measured 3.5e-6). The compile itself takes about a minute on 2 cores.
    prior, likelihood, _, test = setup
    cfg = _cfg(methods=["dps"], precision="fp32", compile=True, **FAST)
    got = _mels(decode_trials(test[:1], prior, likelihood, cfg))
    assert max(float(np.abs(m - exact[k]).max()) for k, m in got.items()) < 1e-4


def test_naive_whisper_input_decodes_like_the_short_window(setup):  # noqa: F811
    # A Whisper likelihood (tiny.en tapped at layer 2, untrained head: the switches concern the
    # encoder): padding to 3000 frames and running all 4 layers give the production draws to
    # float rounding, and the decoder puts the likelihood back as it found it.
    from ssip.models.likelihood import LikelihoodConfig, WhisperLikelihood
    from ssip.models.whisper import load_whisper

    prior, _, _, test = setup
    torch.manual_seed(0)
    lik = WhisperLikelihood(test[0]["neural"].shape[1],
                            LikelihoodConfig(kind="whisper", layer=2, head_channels=16),
                            whisper=load_whisper("tiny.en")[0])
    kw = dict(methods=["dps"], n_draws=1, num_steps=4, precision="fp32")
    state = {k: v.clone() for k, v in lik.state_dict().items()}
    fast = _mels(decode_trials(test[:1], prior, lik, _cfg(**kw)))
    naive = _mels(decode_trials(test[:1], prior, lik, _cfg(
        whisper_window="30s", whisper_layers="all", batch_size=1, draws_per_call=1, **kw)))
    after = lik.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(v, after[k]) for k, v in state.items())
    assert not hasattr(lik, "pad_to") and not hasattr(lik, "all_layers")
    assert _max_diff(naive, fast) < 1e-4
    # The switches live on a view for the length of a decode: the shared likelihood (one per
    # Serve replica, used by concurrent requests) never carries them.
    from ssip.decode import whisper_switches

    with whisper_switches(lik, _cfg(whisper_window="30s", whisper_layers="all", **kw)) as view:
        assert view is not lik and (view.pad_to, view.all_layers) == (3000, True)
        assert not hasattr(lik, "pad_to") and view.encoder is lik.encoder
    with whisper_switches(lik, _cfg(**kw)) as view:
        assert view is lik
    assert np.abs(fast[("rec/0020", "dps", 0)] - decode_trials(
        test[:1], prior, lik, _cfg(**{**kw, "weight": 0.0}))[0]["mel"]).mean() > 1e-4


def test_coarser_length_buckets_batch_more_and_still_equal_each_trial_alone(setup):  # noqa: F811
    # pad_multiple=48: all four test trials (33-45 frames) pad to 48 and share one batch; each
    # trial still decodes as it does alone at that bucket. The UNet (here with random weights
    # everywhere, so that it mixes frames: a fresh prior's zero-initialised output layers do
    # not) then sees 3-15 frames of unguided continuation past a trial, which moves its real
    # frames a little. Measured: posterior-mean mean |diff| 0.023-0.031 (7e-8 for the 45-frame
    # trial, padded to 48 either way), against mels of mean |x| 0.39.
    prior, likelihood, _, test = setup
    prior = copy.deepcopy(prior)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in prior.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    kw = dict(methods=["dps"], precision="fp32", **FAST)
    tight = _mels(decode_trials(test, prior, likelihood, _cfg(**kw)))
    cfg = _cfg(pad_multiple=48, **kw)
    assert cfg.pad_factor(8) == 48
    batched = _mels(decode_trials(test, prior, likelihood, cfg))
    for t in test:
        alone = _mels(decode_trials([t], prior, likelihood, cfg))
        assert _max_diff(alone, {k: batched[k] for k in alone}) < 1e-5
    diffs = {k[0]: float(np.abs(m - tight[k]).mean()) for k, m in batched.items() if k[2] == -1}
    assert diffs["rec/0023"] < 1e-6
    assert 0 < max(diffs.values()) < 0.1
