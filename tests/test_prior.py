"""The EDM mel prior: preconditioning identities, loss, EMA arithmetic, windows, a tiny training
run and the checkpoint round trip."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from ssip.config import ConfigError, resolve
from ssip.mel import MEL_FLOOR
from ssip.models.checkpoint import CheckpointError, save_checkpoint
from ssip.models.prior import (
    EMA,
    PRESETS,
    EDMPrior,
    PriorConfig,
    count_parameters,
    denoising_loss,
    edm_loss,
    edm_loss_weight,
    edm_preconditioning,
    ema_beta,
    estimate_data_stats,
    load_prior,
    random_windows,
    save_prior,
    sigma_quartile_edges,
    train_prior,
    window_batches,
)


def formant_mels(n: int, rng: np.random.Generator, t_range=(40, 120)) -> list[np.ndarray]:
    """Synthetic 'speech': three gliding formant ridges switched on for a random segment,
    on the silence floor. Each (80, T) with T in t_range."""
    f = np.arange(80)[:, None]
    out = []
    for _ in range(n):
        t_len = int(rng.integers(*t_range))
        t = np.arange(t_len)[None, :]
        m = np.full((80, t_len), MEL_FLOOR)
        on, off = sorted(rng.integers(0, t_len, size=2))
        env = 1 / (1 + np.exp(-(t - on) / 2)) / (1 + np.exp((t - off - 10) / 2))
        for k, (c0, w) in enumerate([(12, 3), (30, 4), (50, 5)]):
            c = c0 + rng.uniform(-5, 5) + rng.uniform(-4, 4) * np.sin(
                2 * np.pi * t / rng.uniform(30, 80) + rng.uniform(0, 6))
            m = m + (1.6 - 0.4 * k) * env * np.exp(-((f - c) ** 2) / (2 * w**2))
        out.append(m.astype(np.float32))
    return out


class _ConstantNet(nn.Module):
    """Stands in for the UNet: F(.) = K everywhere, whatever the input."""

    def __init__(self, k: float):
        super().__init__()
        self.k = k

    def forward(self, x, c_noise):
        return torch.full_like(x, self.k)


def test_preconditioning_closed_forms():
    sd = 0.4
    sigma = torch.tensor([1e-6, 1e-3, 0.1, 0.4, 2.0, 80.0, 1e4], dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = edm_preconditioning(sigma, sd)
    # Karras et al. 2022, Table 1.
    torch.testing.assert_close(c_skip, sd**2 / (sigma**2 + sd**2))
    torch.testing.assert_close(c_out, sigma * sd / torch.sqrt(sigma**2 + sd**2))
    torch.testing.assert_close(c_in, 1 / torch.sqrt(sigma**2 + sd**2))
    torch.testing.assert_close(c_noise, torch.log(sigma) / 4)
    # Unit-variance network input and training target (EDM appendix B.6).
    torch.testing.assert_close(c_in**2 * (sigma**2 + sd**2), torch.ones_like(sigma))
    torch.testing.assert_close((1 - c_skip) ** 2 * sd**2 + c_skip**2 * sigma**2, c_out**2)
    # The loss weight undoes c_out: lambda * c_out^2 = 1.
    torch.testing.assert_close(edm_loss_weight(sigma, sd) * c_out**2, torch.ones_like(sigma))
    # sigma -> 0: D is the identity; sigma -> inf: D is the network output scaled by sigma_data.
    assert abs(c_skip[0] - 1) < 1e-10 and c_out[0] < 1.1e-6
    assert c_skip[-1] < 2e-9 and abs(c_out[-1] - sd) < 1e-8
    assert abs(c_in[0] - 1 / sd) < 1e-9 and abs(c_in[-1] * 1e4 - 1) < 1e-6


@pytest.mark.parametrize("k", [0.0, 1.0, 1e3])
def test_denoiser_tends_to_identity_as_sigma_vanishes(k):
    sd = 0.35
    mu = torch.linspace(-0.8, 0.3, 80)
    model = EDMPrior("tiny", sigma_data=sd, data_mean=mu)
    model.net = _ConstantNet(k)
    x = torch.randn(2, 1, 80, 16, generator=torch.Generator().manual_seed(0)) * 0.5
    errors = []
    for s in (1e-2, 1e-4, 1e-6):
        d = model(x, torch.full((2,), s))
        c_skip, c_out, _, _ = edm_preconditioning(torch.tensor(s, dtype=torch.float64), sd)
        # Exactly the EDM formula on mean-removed data.
        expected = mu.view(1, 1, 80, 1) + c_skip.float() * (x - mu.view(1, 1, 80, 1)) + c_out.float() * k
        torch.testing.assert_close(d, expected, atol=1e-5, rtol=1e-6)
        errors.append(float((d - x).abs().max()))
    # |D - x| <= c_out K + (1 - c_skip) |x - mu| ~ sigma (K + ...): shrinks with sigma for any K.
    assert errors[-1] < 1e-6 * (k + 1) * 3 + 1e-6
    assert errors[0] > errors[1] > errors[2] or k == 0.0
    # Large sigma: D -> mu + sd * K, whatever x is.
    d_big = model(x, 1e5)
    torch.testing.assert_close(d_big, (mu.view(1, 1, 80, 1) + sd * k).expand_as(x), atol=2e-3 * (1 + k), rtol=0)


def test_forward_shapes_and_window_multiple():
    model = EDMPrior("tiny", channels=8)
    x = torch.randn(3, 80, 24)
    assert model(x, 0.5).shape == (3, 80, 24)
    assert model(x[:, None], torch.tensor([0.1, 1.0, 3.0])).shape == (3, 1, 80, 24)
    with pytest.raises(ValueError, match="multiples of 8"):
        model(torch.randn(1, 1, 80, 20), 1.0)
    with pytest.raises(ConfigError, match="window_frames=100 must be a multiple of 8"):
        PriorConfig(window_frames=100)
    with pytest.raises(ConfigError, match="preset"):
        PriorConfig(preset="huge")
    cfg = resolve(PriorConfig, None, ["window_frames=64", "batch_size=4"])
    assert (cfg.window_frames, cfg.batch_size) == (64, 4)


def test_preset_parameter_counts():
    # Stored numbers: a change to the architecture must be deliberate (and re-measured).
    assert count_parameters(EDMPrior("tiny")) == 2_669_764
    assert count_parameters(EDMPrior("base")) == 21_019_713
    assert set(PRESETS) == {"tiny", "base"}


def test_edm_loss_per_element_and_zero_network_scores_one():
    sd = 0.3
    mu = torch.linspace(-0.6, 0.2, 80)
    model = EDMPrior("tiny", sigma_data=sd, data_mean=mu, channels=8)
    g = torch.Generator().manual_seed(1)
    x0 = mu.view(1, 1, 80, 1) + sd * torch.randn(32, 1, 80, 32, generator=g)
    with torch.no_grad():
        loss = edm_loss(model, x0, torch.Generator().manual_seed(2))
    assert loss.shape == x0.shape
    # The output conv is zero at initialisation, so D = mu + c_skip (x - mu); for data of std sd
    # the expected weighted loss is exactly 1 at every sigma.
    assert abs(float(loss.mean()) - 1.0) < 0.03
    # With given sigma the loss equals the formula with the same noise.
    sigma = torch.full((32,), 0.5)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    with torch.no_grad():
        loss = edm_loss(model, x0, g1, sigma=sigma)
        n = torch.randn(x0.shape, generator=g2)
        d = model(x0 + 0.5 * n, sigma)
    torch.testing.assert_close(loss, edm_loss_weight(torch.tensor(0.5), sd) * (d - x0) ** 2)


def test_ema_half_life_closed_form():
    # beta^(h / b) = 1/2: after h samples, the old weights count one half.
    assert math.isclose(ema_beta(50, 1000) ** (1000 / 50), 0.5, rel_tol=1e-12)
    assert math.isclose(ema_beta(32, 10_000), 0.5 ** (32 / 10_000), rel_tol=1e-12)
    # Ramp-up caps the half-life at ratio * samples seen.
    assert math.isclose(ema_beta(16, 10_000, samples_seen=1_000, rampup_ratio=0.05), 0.5 ** (16 / 50))
    assert math.isclose(ema_beta(16, 10_000, samples_seen=10**7, rampup_ratio=0.05), 0.5 ** (16 / 10_000))
    net = nn.Linear(1, 1, bias=False).double()
    nn.init.zeros_(net.weight)
    ema = EMA(net)
    with torch.no_grad():
        net.weight.fill_(1.0)
    b, h = 40, 1000
    for k in range(1, 61):
        ema.update(net, ema_beta(b, h))
        expected = 1 - 0.5 ** (k * b / h)
        assert math.isclose(float(ema.model.weight), expected, rel_tol=1e-12, abs_tol=1e-15)
    assert math.isclose(float(ema.model.weight), 1 - 0.5 ** 2.4, rel_tol=1e-12)


def test_random_windows_cut_and_pad():
    rng = np.random.default_rng(0)
    long_a = np.tile(np.arange(300, dtype=np.float32), (80, 1))  # frame index as value
    long_b = np.full((80, 100), 5000.0, dtype=np.float32)
    short = np.full((80, 10), 1000.5, dtype=np.float32)
    w = random_windows([long_a, long_b, short], 32, 4000, rng)
    assert w.shape == (4000, 80, 32) and w.dtype == np.float32
    kinds = np.where((w == 5000.0).all(axis=(1, 2)), 1, np.where((w == 1000.5).any(axis=(1, 2)), 2, 0))
    # Windows of long_a are contiguous slices: consecutive frame indices.
    a = w[kinds == 0]
    assert np.all(np.diff(a[:, 0, :], axis=1) == 1.0) and np.all(a[:, 0, 0] <= 300 - 32)
    # Short mels sit whole inside the window, the rest is silence (MEL_FLOOR).
    s = w[kinds == 2]
    assert np.all((s == 1000.5).sum(axis=2) == 10)
    assert np.all((s == 1000.5) | (s == np.float32(MEL_FLOOR)))
    run = (s[:, 0, :] == 1000.5).astype(int)
    assert np.all(np.abs(np.diff(run, axis=1)).sum(axis=1) <= 2)  # one contiguous run
    # Chosen in proportion to length: 300 : 100 : 10.
    frac = np.bincount(kinds, minlength=3) / len(kinds)
    np.testing.assert_allclose(frac, np.array([300, 100, 10]) / 410, atol=0.03)
    batch = next(window_batches([long_b], 16, 3, rng))
    assert batch.shape == (3, 1, 80, 16) and batch.dtype == torch.float32


def test_data_stats():
    rng = np.random.default_rng(0)
    mels = [rng.normal(size=(80, t)).astype(np.float32) * 0.5 + np.linspace(-1, 1, 80)[:, None]
            for t in (50, 70)]
    mean, sd = estimate_data_stats(mels)
    cat = np.concatenate(mels, axis=1)
    np.testing.assert_allclose(mean, cat.mean(axis=1), rtol=1e-5, atol=1e-6)
    assert math.isclose(sd, float(np.sqrt(((cat - cat.mean(axis=1, keepdims=True)) ** 2).mean())), rel_tol=1e-5)


@pytest.mark.slow  # about 20 s on 2 idle cores; several times that when the cores are shared
def test_tiny_prior_learns_formants():
    """A test-sized prior (tiny preset at 16 channels, ~0.75 M params) trained on 1,536 windows
    of synthetic formant mels lowers its held-out denoising loss to about half (measured 0.52 of
    the initial loss over sigma in {0.05, 0.15, 0.4, 1.0}); the test asks for < 0.75."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    train, held = formant_mels(64, rng), formant_mels(16, rng)
    mean, sd = estimate_data_stats(train)
    model = EDMPrior("tiny", sigma_data=sd, data_mean=mean, channels=16)
    window = 32
    x_held = torch.from_numpy(random_windows(held, window, 32, np.random.default_rng(1)))[:, None]
    sigmas = [0.05, 0.15, 0.4, 1.0]
    before = denoising_loss(model, x_held, sigmas)
    cfg = PriorConfig(window_frames=window, batch_size=32, lr=3e-3, warmup_samples=256,
                      total_samples=1536, log_every_samples=512, ema_halflife_samples=200,
                      ema_rampup_ratio=0.1)
    stats = train_prior(model, window_batches(train, window, 32, np.random.default_rng(2)), cfg,
                        progress=False)
    assert stats["samples_seen"] == 1536 and stats["steps"] == 48
    assert len(stats["history"]) == 3 and len(stats["loss_by_sigma_quartile"]) == 4
    np.testing.assert_allclose(stats["sigma_quartile_edges"], sigma_quartile_edges(-1.2, 1.2))
    after = denoising_loss(stats["ema"].model, x_held, sigmas)
    assert np.allclose(before, 1.0, atol=0.05)  # zero-output init scores ~1 (see above)
    ratio = np.mean(after) / np.mean(before)
    assert ratio < 0.75, (before, after)
    # The model learned most where structure is visible through the noise.
    assert after[-1] < 0.6


def test_prior_checkpoint_round_trip(tmp_path):
    model = EDMPrior("tiny", sigma_data=0.37, data_mean=torch.linspace(-0.5, 0.5, 80), channels=8)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    cfg = PriorConfig(window_frames=32)
    ema = EMA(model)
    manifest = save_prior(str(tmp_path), model, cfg, ema=ema, stats={"loss": 0.5, "ema": ema})
    assert manifest["extra"]["weights"] == "ema" and manifest["extra"]["train_stats"] == {"loss": 0.5}
    loaded, manifest = load_prior(str(tmp_path))
    assert manifest["config"]["window_frames"] == 32
    for k, v in ema.model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    x = torch.randn(2, 1, 80, 32)
    torch.testing.assert_close(loaded(x, 0.3), ema.model(x, 0.3), rtol=0, atol=0)
    # A checkpoint of another kind is refused by the prior loader.
    other = tmp_path / "nn"
    save_checkpoint(str(other), {"w": torch.zeros(1)}, {"kind": "baseline-nn"})
    with pytest.raises(CheckpointError, match="'kind' is 'baseline-nn'"):
        load_prior(str(other))


def test_source_probabilities_closed_form():
    from ssip.models.prior import random_windows, source_probabilities

    lengths, sources = [100, 300, 50, 50], ["a", "a", "b", "c"]
    # No weights: every frame equally likely.
    np.testing.assert_allclose(source_probabilities(lengths, sources, None), np.array(lengths) / 500)
    # a: 0.6 shared 1:3 by length; b: 0.4; c present but unweighted: 0.
    p = source_probabilities(lengths, sources, {"a": 3.0, "b": 2.0, "missing": 5.0})
    np.testing.assert_allclose(p, [0.15, 0.45, 0.4, 0.0])
    with pytest.raises(ValueError, match="no weight to any source present"):
        source_probabilities(lengths, sources, {"missing": 1.0})
    # Windows follow the probabilities: mels tagged by a constant value.
    mels = [np.full((80, n), float(i), np.float32) for i, n in enumerate(lengths)]
    w = random_windows(mels, 16, 4000, np.random.default_rng(0), p=p)
    share = np.bincount(w[:, 0, 8].astype(int), minlength=4) / 4000
    np.testing.assert_allclose(share, p, atol=0.03)


def test_train_prior_runs_the_one_loop_as_a_hand_written_adamw_loop():
    """``train_prior`` is :func:`fit_prior` on a LocalEngine: bit for bit the plain loop
    (warm-up lr, EDM loss with sigma and noise from the cfg.seed generator, AdamW, global-norm
    clip, EMA at the batch size) written out here; the same loop runs under DeepSpeed on Ray
    (tests/test_train_prior_ray.py checks that one against the global-batch step)."""
    from ssip.models.prior import EMA, edm_loss, ema_beta, learning_rate, sample_sigma

    cfg = PriorConfig(window_frames=16, batch_size=4, lr=2e-3, warmup_samples=8,
                      total_samples=20, log_every_samples=8, grad_clip=0.5, seed=5)
    rng = np.random.default_rng(1)
    batches = [rng.standard_normal((4, 80, 16)).astype(np.float32) for _ in range(5)]
    mean = (0.1 * rng.standard_normal(80)).astype(np.float32)

    def net() -> EDMPrior:
        torch.manual_seed(0)
        return EDMPrior("tiny", sigma_data=0.7, data_mean=mean, channels=8, emb_channels=16)

    model = net()
    stats = train_prior(model, iter(batches), cfg, progress=False)
    assert stats["samples_seen"] == 20 and stats["steps"] == 5
    assert [r["samples"] for r in stats["history"]] == [8, 16, 20]

    ref = net()
    ema = EMA(ref)
    opt = torch.optim.AdamW(ref.parameters(), lr=cfg.lr, betas=(0.9, 0.99),
                            weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    seen = 0
    for b in batches:
        ref.train()
        for g in opt.param_groups:
            g["lr"] = learning_rate(seen, cfg)
        x0 = torch.from_numpy(b)[:, None]
        sigma = sample_sigma(4, gen, cfg.p_mean, cfg.p_std)
        loss = edm_loss(ref, x0, gen, sigma=sigma).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), cfg.grad_clip)
        opt.step()
        seen += 4
        ema.update(ref, ema_beta(4, cfg.ema_halflife_samples, seen, cfg.ema_rampup_ratio))
    for (k, a), b in zip(stats["ema"].model.state_dict().items(), ema.model.state_dict().values(),
                         strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=k)
    for (k, a), b in zip(model.state_dict().items(), ref.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=k)
