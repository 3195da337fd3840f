"""The residual noise model of ssip.sampling.whitening against closed forms: AR(1) Yule-Walker and
its prediction-error filter, exact whitening of the stationary process (dense covariance), a
rank-one shared drift, Woodbury, gradients, padding masks and the tensors' round trip."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from safetensors.torch import load_file, save_file

from ssip.sampling.whitening import (
    NoiseModel,
    fit_noise_model,
    levinson_durbin,
    pooled_autocovariance,
    woodbury_inverse,
)


def ar1_trials(rng, phi, sigma, lengths, n_el):
    """AR(1) trials with a stationary start, simulated directly (independent of the module)."""
    out = []
    for n in lengths:
        x = np.empty((n, n_el))
        x[0] = rng.standard_normal(n_el) * sigma / math.sqrt(1 - phi**2)
        for t in range(1, n):
            x[t] = phi * x[t - 1] + sigma * rng.standard_normal(n_el)
        out.append(x)
    return out


def lag1_corr(e: np.ndarray) -> np.ndarray:
    """Pooled lag-1 autocorrelation per electrode of a (B, T, C) array (within trials)."""
    return (e[:, 1:] * e[:, :-1]).sum(axis=(0, 1)) / (e * e).sum(axis=(0, 1))


def small_model(ar=((0.6, -0.2), (0.3, 0.1), (0.9, -0.3))) -> NoiseModel:
    return NoiseModel(mean=torch.tensor([0.1, -0.2, 0.3]), ar=torch.tensor(ar, dtype=torch.float64),
                      innov_std=torch.tensor([0.7, 1.1, 0.5]),
                      loadings=torch.tensor([[0.8], [0.5], [-0.6]]),
                      psi=torch.tensor([0.4, 0.7, 0.3]))


def jacobian(model: NoiseModel, n_frames: int) -> torch.Tensor:
    """d vec(whiten(r)) / d vec(r) of one trial, (T C, T C), row-major over (t, c)."""
    c = model.n_electrodes
    r0 = torch.zeros(n_frames * c, dtype=torch.float64)
    return torch.autograd.functional.jacobian(
        lambda x: model.whiten(x.reshape(1, n_frames, c)).reshape(-1), r0)


# ---------------------------------------------------------------------------------------------
# AR(1): Yule-Walker, closed-form filter, whitened statistics.


def test_ar1_fit_within_standard_errors_and_whitens():
    rng = np.random.default_rng(0)
    phi, sigma, n_el = 0.8, 0.5, 4
    lengths = rng.integers(300, 700, size=40)
    trials = ar1_trials(rng, phi, sigma, lengths, n_el)
    n = int(lengths.sum())
    model = fit_noise_model(trials, order=1, rank=0, center=False)
    se_phi = math.sqrt((1 - phi**2) / n)
    z_phi = (model.ar[:, 0].numpy() - phi) / se_phi
    z_std = (model.innov_std.numpy() - sigma) / (sigma / math.sqrt(2 * n))
    print(f"AR(1) n={n}: phi_hat={model.ar[:, 0].numpy().round(4)} (se {se_phi:.4f}, "
          f"z {z_phi.round(2)}), innov_std={model.innov_std.numpy().round(4)} z {z_std.round(2)}")
    assert np.abs(z_phi).max() < 4
    assert np.abs(z_std).max() < 4
    # Higher order: the extra coefficients are ~0 (se ~ 1/sqrt(n)).
    model3 = fit_noise_model(trials, order=3, rank=0, center=False)
    assert np.abs(model3.ar[:, 1:].numpy()).max() < 4 / math.sqrt(n)

    # Whitened: unit variance, no lag-1 autocorrelation (within trials).
    es = [model.whiten(torch.from_numpy(x)[None])[0].numpy() for x in trials]
    flat = np.concatenate(es)
    rho1 = sum((e[1:] * e[:-1]).sum(0) for e in es) / sum((e * e).sum(0) for e in es)
    var = flat.var(axis=0)
    raw_rho = sum((x[1:] * x[:-1]).sum(0) for x in trials) / sum((x * x).sum(0) for x in trials)
    print(f"whitened var {var.round(4)}, lag-1 rho {rho1.round(4)} (raw {raw_rho.round(3)})")
    assert np.abs(rho1).max() < 4 / math.sqrt(n)
    assert np.abs(var - 1).max() < 4 * math.sqrt(2 / n)


def test_ar1_prediction_error_filter_is_the_closed_form():
    phi, sigma = 0.8, 0.5
    model = NoiseModel(mean=torch.zeros(2), ar=torch.tensor([[phi], [phi]]),
                       innov_std=torch.tensor([sigma, sigma]), loadings=torch.zeros((2, 0)),
                       psi=torch.ones(2))
    r = torch.randn(3, 50, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    e = model.whiten(r)
    torch.testing.assert_close(e[:, 1:], (r[:, 1:] - phi * r[:, :-1]) / sigma)
    # Frame 0: the exact stationary start, r_0 / (sigma / sqrt(1 - phi^2)).
    torch.testing.assert_close(e[:, 0], r[:, 0] * math.sqrt(1 - phi**2) / sigma)


def test_levinson_matches_scipy_toeplitz_and_step_down():
    rng = np.random.default_rng(2)
    trials = [rng.standard_normal((n, 3)).cumsum(0) * 0.1 + rng.standard_normal((n, 3))
              for n in (200, 350, 90)]
    acov = pooled_autocovariance(trials, 4)
    coefs, var = levinson_durbin(acov)
    for c in range(3):
        for m in range(1, 5):
            ref = scipy.linalg.solve_toeplitz(acov[:m, c], acov[1:m + 1, c])
            np.testing.assert_allclose(coefs[m, c, :m], ref, rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(var[m, c], acov[0, c] - ref @ acov[1:m + 1, c],
                                       rtol=1e-9)
    # The model rebuilds the partial orders from the order-4 model alone (inverse Levinson).
    model = NoiseModel(mean=torch.zeros(3), ar=torch.from_numpy(coefs[4]),
                       innov_std=torch.from_numpy(np.sqrt(var[4])),
                       loadings=torch.zeros((3, 0)), psi=torch.ones(3))
    tables = model._cache["cpu64"]
    np.testing.assert_allclose(tables["coefs"].numpy(), coefs, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(tables["std"].numpy() ** 2, var, rtol=1e-9)
    # Lagged products never cross trial boundaries.
    glued = pooled_autocovariance([np.concatenate(trials)], 4)
    assert not np.allclose(glued[1:], acov[1:])


def test_pooled_autocovariance_closed_form():
    a = np.arange(1.0, 5.0)[:, None]  # one trial 1, 2, 3, 4
    b = np.array([[2.0], [-1.0]])
    acov = pooled_autocovariance([a, b], 2)
    np.testing.assert_allclose(acov[:, 0], [(30 + 5) / 6, (2 + 6 + 12 - 2) / 6, (3 + 8) / 6])


# ---------------------------------------------------------------------------------------------
# Exact whitening against dense covariances.


def stationary_ar_acov(ar: np.ndarray, n_lags: int, burn: int = 3000) -> np.ndarray:
    """Autocovariance of x_t = sum_j a_j x_{t-j} + u_t (unit innovation variance) from its
    impulse response (MA(inf) weights), independent of Yule-Walker."""
    h = np.zeros(burn)
    h[0] = 1.0
    for t in range(1, burn):
        h[t] = sum(ar[j] * h[t - 1 - j] for j in range(min(len(ar), t)))
    return np.array([h[: burn - k] @ h[k:] for k in range(n_lags)])


def test_whitening_is_exact_for_a_shared_ar_filter():
    """Electrodes sharing one AR(2) filter: Cov(r) = s s^T * Sigma (x) Toeplitz(gamma) exactly,
    and the whitening's Jacobian J gives J Cov J^T = I on every frame, the first p included."""
    ar = np.array([0.6, -0.25])
    model = small_model(ar=[ar.tolist()] * 3)
    n_frames, c = 7, 3
    gamma = stationary_ar_acov(ar, n_frames)
    toeplitz = torch.from_numpy(scipy.linalg.toeplitz(gamma))
    s = model.innov_std
    cross = s[:, None] * model.covariance() * s[None, :]
    cov = torch.kron(toeplitz, cross)  # index (t, c) row-major
    jac = jacobian(model, n_frames)
    torch.testing.assert_close(jac @ cov @ jac.T, torch.eye(n_frames * c, dtype=torch.float64),
                               atol=1e-9, rtol=0)
    # nll is the exact Gaussian negative log-density of the same covariance.
    r = model.sample(2, n_frames, generator=torch.Generator().manual_seed(3))
    dist = torch.distributions.MultivariateNormal(model.mean.repeat(n_frames), cov)
    torch.testing.assert_close(model.nll(r), -dist.log_prob(r.reshape(2, -1)))


def test_whitening_of_a_diagonal_var_is_exact_after_p_frames():
    """Different AR filters per electrode with correlated innovations (a diagonal VAR(2)):
    past the first p frames the whitened frames are iid N(0, I) and uncorrelated with earlier
    ones; the covariance comes from the recursion run over a long burn-in."""
    model = small_model()
    ar, s, sigma = model.ar.numpy(), model.innov_std.numpy(), model.covariance().numpy()
    c, p, n_frames, burn = 3, 2, 8, 400
    total = burn + n_frames
    # r = G u (u the innovations, iid over time with covariance diag(s) Sigma diag(s)).
    g = np.zeros((total, c, total, c))
    for t in range(total):
        g[t, :, t, :] = np.eye(c)
        for j in range(min(p, t)):
            g[t] += ar[:, j][:, None, None] * g[t - 1 - j]
    g = g[burn:].reshape(n_frames * c, total * c)
    cov_u = np.kron(np.eye(total), s[:, None] * sigma * s[None, :])
    cov = torch.from_numpy(g @ cov_u @ g.T)
    jac = jacobian(model, n_frames)
    out = jac @ cov @ jac.T
    late = slice(p * c, None)
    torch.testing.assert_close(out[late, late], torch.eye((n_frames - p) * c,
                                                          dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(out[late, : p * c], torch.zeros((n_frames - p) * c, p * c,
                                                               dtype=torch.float64),
                               atol=1e-9, rtol=0)
    # Per electrode the temporal part is exact on the first p frames too: the innovations z
    # there are uncorrelated in time with variance Sigma_cc.
    c_c = torch.autograd.functional.jacobian(
        lambda x: model.innovations(x.reshape(1, n_frames, c)).reshape(-1),
        torch.zeros(n_frames * c, dtype=torch.float64))
    first = (c_c @ cov @ c_c.T)[: p * c, : p * c].reshape(p, c, p, c)
    for e in range(c):
        torch.testing.assert_close(first[:, e, :, e],
                                   sigma[e, e] * torch.eye(p, dtype=torch.float64),
                                   atol=1e-9, rtol=0)


def test_log_det_is_minus_twice_log_det_of_the_jacobian():
    model = small_model()
    jac = jacobian(model, 6)
    torch.testing.assert_close(model.log_det(batch=1, n_frames=6),
                               -2 * torch.linalg.slogdet(jac)[1].reshape(1))


def test_woodbury_and_cross_electrode_whitening_match_dense_algebra():
    gen = torch.Generator().manual_seed(4)
    c, k = 6, 2
    loadings = torch.randn(c, k, dtype=torch.float64, generator=gen)
    psi = torch.rand(c, dtype=torch.float64, generator=gen) + 0.2
    sigma = loadings @ loadings.T + torch.diag(psi)
    torch.testing.assert_close(woodbury_inverse(loadings, psi), torch.linalg.inv(sigma))
    model = NoiseModel(mean=torch.zeros(c), ar=torch.zeros((c, 0)), innov_std=torch.ones(c),
                       loadings=loadings, psi=psi)
    torch.testing.assert_close(model.precision(), torch.linalg.inv(sigma))
    torch.testing.assert_close(model.log_det_sigma(), torch.logdet(sigma))
    # W (e_t = W z_t): W^T W = Sigma^-1, and W equals the dense (I + M M^T)^{-1/2} D^{-1/2}.
    w = model.decorrelate(torch.eye(c, dtype=torch.float64)[None])[0].T
    torch.testing.assert_close(w.T @ w, torch.linalg.inv(sigma))
    torch.testing.assert_close(w @ sigma @ w.T, torch.eye(c, dtype=torch.float64))
    m = loadings / psi.sqrt()[:, None]
    evals, evecs = torch.linalg.eigh(torch.eye(c, dtype=torch.float64) + m @ m.T)
    w_dense = (evecs * evals.rsqrt()) @ evecs.T @ torch.diag(psi.rsqrt())
    torch.testing.assert_close(w, w_dense)
    # whiten(r) of a full model equals the dense computation, frame by frame.
    full = small_model()
    r = torch.randn(2, 9, 3, dtype=torch.float64, generator=gen)
    x = (r - full.mean).numpy()
    a, s = full.ar.numpy(), full.innov_std.numpy()
    coefs, var = levinson_durbin(np.stack([stationary_ar_acov(a[e], 3) for e in range(3)], 1)
                                 * s**2)
    z = np.zeros_like(x)
    for t in range(9):
        m_t = min(t, 2)
        pred = sum(coefs[m_t][:, j] * x[:, t - 1 - j] for j in range(m_t))
        z[:, t] = (x[:, t] - pred) / np.sqrt(var[m_t])
    m3 = (full.loadings / full.psi.sqrt()[:, None])
    ev, evec = torch.linalg.eigh(torch.eye(3, dtype=torch.float64) + m3 @ m3.T)
    w3 = (evec * ev.rsqrt()) @ evec.T @ torch.diag(full.psi.rsqrt())
    torch.testing.assert_close(full.whiten(r), torch.from_numpy(z) @ w3.T)


# ---------------------------------------------------------------------------------------------
# A rank-one shared drift.


def test_rank_one_shared_drift_fit_and_whitened_covariance():
    rng = np.random.default_rng(5)
    c = 8
    load = np.linspace(0.5, 1.5, c) * np.where(np.arange(c) % 3 == 0, -1, 1)
    psi = np.linspace(0.3, 0.9, c)[::-1].copy()
    trials = [rng.standard_normal((n, 1)) * load + rng.standard_normal((n, c)) * np.sqrt(psi)
              for n in rng.integers(300, 500, size=60)]
    model = fit_noise_model(trials, order=2, rank=1)
    true = np.outer(load, load) + np.diag(psi)
    s = model.innov_std.numpy()
    fitted = s[:, None] * model.covariance().numpy() * s[None, :]
    rel = np.linalg.norm(fitted - true) / np.linalg.norm(true)
    es = np.concatenate([model.whiten(torch.from_numpy(x)[None])[0].numpy() for x in trials])
    cov_e = es.T @ es / len(es)
    dev = np.abs(cov_e - np.eye(c)).max()
    print(f"rank-one: n={len(es)}, |ar|max={np.abs(model.ar.numpy()).max():.4f}, relative "
          f"Frobenius error of the covariance {rel:.4f}, max|cov(e) - I| = {dev:.4f}")
    assert np.abs(model.ar.numpy()).max() < 0.05
    assert rel < 0.05
    assert dev < 0.05


@pytest.mark.parametrize("phi", [0.0, 0.95])
def test_shared_drift_is_attenuated_against_sigma_only_scaling(phi):
    """A drift shared by all electrodes (d(t) l^T, white or slow) versus an equally strong drift
    that is independent per electrode: per-electrode sigma scaling cannot tell them apart
    (||e||^2 ratio ~1); the fitted low-rank model down-weights the shared one by about
    1 / (1 + l~^T psi^-1 l~) with l~ the fitted loading of the standardised innovations."""
    rng = np.random.default_rng(6)
    c = 8
    load = np.linspace(0.6, 1.4, c)
    psi = np.full(c, 0.3)

    def drift(n, k):
        return ar1_trials(rng, phi, math.sqrt(1 - phi**2), [n], k)[0]

    lengths = rng.integers(300, 500, size=60)
    trials = [drift(n, 1) * load + rng.standard_normal((n, c)) * np.sqrt(psi) for n in lengths]
    model = fit_noise_model(trials, order=3, rank=1)
    sigma_only = NoiseModel.diagonal(np.concatenate(trials).std(axis=0))

    shared = torch.from_numpy(np.stack([drift(400, 1) * load for _ in range(30)]))
    indep = torch.from_numpy(np.stack([drift(400, c) * load for _ in range(30)]))
    ratio_full = float(model.sq_norm(shared).sum() / model.sq_norm(indep).sum())
    ratio_diag = float(sigma_only.sq_norm(shared).sum() / sigma_only.sq_norm(indep).sum())
    snr = float((model.loadings[:, 0] ** 2 / model.psi).sum())
    print(f"phi={phi}: shared/independent ||e||^2: low-rank model {ratio_full:.4f}, sigma-only "
          f"{ratio_diag:.4f} (attenuation x{ratio_diag / ratio_full:.1f}); fitted "
          f"1/(1 + l~^T psi^-1 l~) = {1 / (1 + snr):.4f}")
    assert 0.7 < ratio_diag < 1.4
    if phi == 0.0:  # the model is right: the full factor-model attenuation
        assert ratio_full < 0.1 * ratio_diag
        assert ratio_full == pytest.approx(1 / (1 + snr), rel=0.3)
    else:
        # A slow shared drift under white private noise is not "per-electrode AR + shared
        # innovations": each electrode's AR filter removes most of the slow drift from its
        # innovations, so the factor sees a weak shared part and attenuates ~3.5x, not ~30x.
        assert ratio_full < 0.4 * ratio_diag


# ---------------------------------------------------------------------------------------------
# Samples of the fitted model whiten to iid N(0, 1); gradients; masks; serialisation.


def test_samples_of_a_fitted_model_whiten_to_iid_unit_normals():
    rng = np.random.default_rng(7)
    trials = [rng.standard_normal((n, 1)).cumsum(0) * 0.05 + rng.standard_normal((n, 5))
              for n in rng.integers(200, 400, size=30)]
    model = fit_noise_model(trials, order=3, rank=2)
    r = model.sample(40, 300, generator=torch.Generator().manual_seed(8))
    e = model.whiten(r)
    torch.testing.assert_close(model.unwhiten(e), r)
    flat = e.reshape(-1, 5).numpy()
    n = flat.shape[0]
    rho1 = lag1_corr(e.numpy())
    cov = flat.T @ flat / n
    print(f"model samples: whitened cov diag {np.diag(cov).round(3)}, lag-1 {rho1.round(4)}")
    assert np.abs(cov - np.eye(5)).max() < 5 / math.sqrt(n)
    assert np.abs(rho1).max() < 5 / math.sqrt(n)


def test_gradcheck():
    model = small_model()
    r = torch.randn(2, 6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(9),
                    requires_grad=True)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    mask[0, 2] = False
    assert torch.autograd.gradcheck(lambda x: model.whiten(x, mask), (r,))
    assert torch.autograd.gradcheck(lambda x: model.nll(x, mask), (r,))
    assert torch.autograd.gradgradcheck(lambda x: model.sq_norm(x, mask), (r,))


def test_padded_frames_change_nothing():
    model = small_model()
    gen = torch.Generator().manual_seed(10)
    a = torch.randn(1, 7, 3, dtype=torch.float64, generator=gen)
    b = torch.randn(1, 10, 3, dtype=torch.float64, generator=gen)
    batch = torch.cat([torch.cat([a, torch.full((1, 3, 3), float("nan"))], 1), b])
    batch = batch.clone().requires_grad_(True)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[0, 7:] = False
    e = model.whiten(batch, mask)
    torch.testing.assert_close(e[0, :7], model.whiten(a)[0])
    torch.testing.assert_close(e[1], model.whiten(b)[0])
    assert bool((e[0, 7:] == 0).all())
    torch.testing.assert_close(model.sq_norm(batch, mask[..., None]),
                               torch.cat([model.sq_norm(a), model.sq_norm(b)]))
    torch.testing.assert_close(model.nll(batch, mask), torch.cat([model.nll(a), model.nll(b)]))
    (grad,) = torch.autograd.grad(model.nll(batch, mask).sum(), batch)
    assert bool(torch.isfinite(grad).all()) and bool((grad[0, 7:] == 0).all())
    # Other padding values: identical results.
    other = batch.detach().clone()
    other[0, 7:] = 1e6
    torch.testing.assert_close(model.whiten(other, mask), e.detach())
    # A hole restarts the prediction: the two runs whiten as separate trials.
    hole = torch.cat([a, torch.full((1, 2, 3), 5.0), a[:, :4]], 1)
    hmask = torch.ones(1, 13, dtype=torch.bool)
    hmask[0, 7:9] = False
    eh = model.whiten(hole, hmask)
    torch.testing.assert_close(eh[0, :7], model.whiten(a)[0])
    torch.testing.assert_close(eh[0, 9:], model.whiten(a[:, :4])[0])


def test_diagonal_model_is_sigma_scaling():
    sigma = torch.tensor([0.5, 2.0, 1.5], dtype=torch.float64)
    model = NoiseModel.diagonal(sigma)
    r = torch.randn(2, 5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    torch.testing.assert_close(model.whiten(r), r / sigma)
    ref = -torch.distributions.Normal(0.0, sigma).log_prob(r).sum(dim=(1, 2))
    torch.testing.assert_close(model.nll(r), ref)


def test_tensors_round_trip_through_safetensors(tmp_path):
    model = small_model()
    save_file(model.to_tensors("noise."), tmp_path / "noise.safetensors")
    back = NoiseModel.from_tensors(load_file(tmp_path / "noise.safetensors"), "noise.")
    r = torch.randn(1, 8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(12))
    torch.testing.assert_close(back.whiten(r), model.whiten(r), rtol=0, atol=0)
    assert back.order == 2 and back.rank == 1 and back.n_electrodes == 3
    # float32 residuals work and agree with float64.
    torch.testing.assert_close(back.whiten(r.float()), model.whiten(r).float(), rtol=1e-5,
                               atol=1e-5)


def test_invalid_inputs_raise():
    with pytest.raises(ValueError, match="stationary"):
        NoiseModel(mean=torch.zeros(1), ar=torch.tensor([[1.2]]), innov_std=torch.ones(1),
                   loadings=torch.zeros((1, 0)), psi=torch.ones(1))
    with pytest.raises(ValueError, match="rank"):
        fit_noise_model([np.zeros((10, 2))], order=1, rank=2)
    with pytest.raises(ValueError, match="shape"):
        small_model().whiten(torch.zeros(1, 4, 2))
    with pytest.raises(ValueError, match="mask"):
        small_model().whiten(torch.zeros(1, 4, 3), torch.ones(1, 5, dtype=torch.bool))


def test_fit_floors_psi_and_bounds_the_temporal_gain():
    rng = np.random.default_rng(13)
    # Electrode 0 is almost exactly the shared factor (psi -> 0 by ML): the floor caps it.
    f = rng.standard_normal((3000, 1))
    x = np.concatenate([f * 1.0 + 1e-4 * rng.standard_normal((3000, 1)),
                        f * 0.5 + rng.standard_normal((3000, 3))], 1)
    model = fit_noise_model([x], order=0, rank=1, psi_floor=0.1)
    psi = model.psi.numpy()
    assert psi.min() >= 0.1 * np.median(psi) * (1 - 1e-9)
    # A random walk (near unit root): the diagonal loading bounds the innovation variance.
    walk = rng.standard_normal((2000, 2)).cumsum(0)
    m = fit_noise_model([walk], order=2, rank=0, ar_ridge=1e-2)
    var0 = walk.var(axis=0)
    assert (m.innov_std.numpy() ** 2 >= 1e-2 * var0 * 0.99).all()
