"""EDM and DPS samplers: closed forms, batch/padding invariance, seeds and stored numbers."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from ssip.sampling import (
    Guided,
    NonFiniteSampleError,
    c_in,
    c_out,
    c_skip,
    check_guidance_rule,
    dps_edm,
    edm_sample,
    item_noise,
    karras_sigmas,
    posterior_draws,
    precondition,
    trial_generator,
    trial_seed,
)
from ssip.sampling.reference import dps_ancestral

F64 = torch.float64


def gens(seeds):
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


# ----------------------------------------------------------------------------------------------
# A linear-Gaussian problem whose prior and posterior are known exactly.
# Prior x ~ N(mu, s^2 I) over d = 8 values laid out as a (1, 2, 4) "mel"; y = A x + e,
# e ~ N(0, sigma_e^2 I). The exact EDM denoiser is E[x0 | x0 + sigma n = x].

D_DIM, ITEM = 8, (1, 2, 4)
MU = torch.linspace(-1, 1, D_DIM, dtype=F64).reshape(ITEM)
S_PRIOR = 0.5
SIGMA_E = 0.2


def gaussian_denoiser(x, sigma):
    sg2 = sigma.reshape(-1, 1, 1, 1) ** 2
    return (S_PRIOR**2 * x + sg2 * MU) / (S_PRIOR**2 + sg2)


@functools.cache
def linear_problem():
    g = torch.Generator().manual_seed(5)
    A = torch.randn(4, D_DIM, generator=g, dtype=F64) * 2 / math.sqrt(D_DIM)
    x_true = MU.flatten() + S_PRIOR * torch.randn(D_DIM, generator=g, dtype=F64)
    y = A @ x_true + SIGMA_E * torch.randn(4, generator=g, dtype=F64)
    precision = torch.eye(D_DIM, dtype=F64) / S_PRIOR**2 + A.T @ A / SIGMA_E**2
    cov_post = torch.linalg.inv(precision)
    mean_post = cov_post @ (MU.flatten() / S_PRIOR**2 + A.T @ y / SIGMA_E**2)
    return A, y, mean_post, cov_post


def linear_residual(x0_hat):
    A, y, _, _ = linear_problem()
    return (y - x0_hat.flatten(1) @ A.T) / SIGMA_E, None


def test_preconditioning_closed_form():
    # For data N(0, sd^2): c_in x has unit variance and the training target
    # (x0 - c_skip x) / c_out has unit variance (Karras et al. 2022, Appendix B.6).
    sd = 0.7
    sigma = torch.tensor([0.002, 0.1, 1.0, 80.0], dtype=F64)
    torch.testing.assert_close(c_in(sigma, sd) ** 2 * (sd**2 + sigma**2), torch.ones_like(sigma))
    target_var = (1 - c_skip(sigma, sd)) ** 2 * sd**2 + c_skip(sigma, sd) ** 2 * sigma**2
    torch.testing.assert_close(target_var / c_out(sigma, sd) ** 2, torch.ones_like(sigma))
    # The ideal F for Gaussian data is 0, so D reduces to c_skip x, the exact posterior mean.
    x = torch.randn(4, 1, 2, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    D_x = precondition(lambda x_in, c_noise: torch.zeros_like(x_in), x, sigma, sd)
    torch.testing.assert_close(D_x, sd**2 / (sd**2 + sigma.reshape(-1, 1, 1, 1) ** 2) * x)


def test_karras_sigmas():
    t = karras_sigmas(18)
    assert t.dtype == F64 and t.shape == (19,)
    assert t[0] == 80.0 and abs(t[17].item() - 0.002) < 1e-15 and t[18] == 0.0
    assert bool((t[1:] < t[:-1]).all())
    # rho = 1 is linear spacing.
    torch.testing.assert_close(
        karras_sigmas(5, 1.0, 5.0, rho=1.0)[:-1], torch.arange(5.0, 0, -1, dtype=F64)
    )


def test_edm_ode_is_the_exact_affine_map():
    # With the exact denoiser the probability-flow ODE maps latents n to
    # mu + s sigma_max / sqrt(s^2 + sigma_max^2) (n - mu / sigma_max) per component;
    # 256 Heun steps must reproduce it (18 steps over-disperse by 5.5% here, 64 by 0.4%).
    n = torch.randn(64, *ITEM, dtype=F64, generator=torch.Generator().manual_seed(1))
    x = edm_sample(gaussian_denoiser, n, gens(range(64)), num_steps=256).double()
    smax = 80.0
    expected = MU + S_PRIOR * smax / math.sqrt(S_PRIOR**2 + smax**2) * (n - MU / smax)
    torch.testing.assert_close(x, expected, atol=2e-3, rtol=0)


def test_edm_stochastic_sampler_matches_prior():
    # 1000 draws, each item with its own generator, with churn noise on every step.
    N = 1000
    x = edm_sample(gaussian_denoiser, (N, *ITEM), gens(range(N)), num_steps=64, S_churn=20)
    x = x.double().flatten(1)
    se = S_PRIOR / math.sqrt(N)  # 0.016
    assert (x.mean(0) - MU.flatten()).abs().max() < 4 * se
    cov = torch.cov(x.T)
    # Measured: stds 0.500-0.519 (64 steps leave ~2% excess); off-diagonals ~N(0, 0.008).
    assert (cov.diagonal().sqrt() / S_PRIOR - 1).abs().max() < 0.07
    assert (cov - torch.diag(cov.diagonal())).abs().max() < 0.04


def _post_stats(x):
    _, _, mean_post, cov_post = linear_problem()
    x = x.double().flatten(1)
    return (
        (x.mean(0) - mean_post).norm().item(),
        (MU.flatten() - mean_post).norm().item(),
        x.std(0).mean().item(),
        cov_post.diagonal().sqrt().mean().item(),
    )


def test_dps_edm_approaches_the_exact_posterior():
    # DPS is approximate. Measured (N=1000, 50 Heun steps, zeta=0.02): distance of the sample
    # mean to the posterior mean 0.066 vs 1.08 for the prior mean; mean std 0.370 vs the
    # posterior's 0.367 and the prior's 0.5.
    N = 1000
    x = dps_edm(gaussian_denoiser, linear_residual, (N, *ITEM), gens(range(N)), zeta=0.02)
    err, prior_err, std, post_std = _post_stats(x)
    assert err < 0.2 * prior_err
    assert abs(std / post_std - 1) < 0.12 and std < 0.85 * S_PRIOR


def test_dps_edm_normalised_step_moves_toward_posterior():
    # The normalised step shifts every sample by RMS xi * (t_hat - t_next) per element, whatever
    # its distance: here it moves the mean (0.58 vs 1.08, measured with xi=0.1) but cannot
    # shrink the spread of a linear problem.
    N = 400
    x = dps_edm(gaussian_denoiser, linear_residual, (N, *ITEM), gens(range(N)), xi=0.1)
    err, prior_err, _, _ = _post_stats(x)
    assert err < 0.75 * prior_err


@functools.cache
def isotropic_problem():
    """y = a x + e with A = a I: (a, sigma_e, residual, posterior mean, posterior variance)."""
    a, sig_e = 1.5, 0.3
    g = torch.Generator().manual_seed(8)
    y = a * (MU.flatten() + S_PRIOR * torch.randn(D_DIM, generator=g, dtype=F64))
    y = y + sig_e * torch.randn(D_DIM, generator=g, dtype=F64)
    post_var = 1.0 / (1.0 / S_PRIOR**2 + a**2 / sig_e**2)
    post_mean = post_var * (MU.flatten() / S_PRIOR**2 + a * y / sig_e**2)

    def residual(x0_hat):
        return (y - a * x0_hat.flatten(1)) / sig_e, None

    return a, sig_e, residual, post_mean, post_var


def test_gaussian_score_with_pigdm_inflation_samples_the_exact_posterior():
    # Isotropic A = a I: under a Gaussian prior N(mu, s^2 I) the exact p(y | x_t) is
    # N(y; a E[x0 | x_t], (sigma_e^2 + a^2 r_t^2) I), r_t^2 = s^2 t^2 / (s^2 + t^2), so the
    # Gaussian score with weight 1 and inflation a^2 / sigma_e^2 IS the posterior score and the
    # ODE sampler draws the exact posterior (up to discretisation and Monte Carlo error).
    # Measured (N=2000, 64 Heun steps): max mean error 0.0086 (4 se = 0.0166), std 0.187 vs 0.186.
    a, sig_e, residual, post_mean, post_var = isotropic_problem()
    N = 2000

    def run(inflation):
        x = dps_edm(gaussian_denoiser, residual, (N, *ITEM), gens(range(N)), weight=1.0,
                    inflation=inflation, sigma_data=S_PRIOR, num_steps=64)
        return x.double().flatten(1)

    x = run(a**2 / sig_e**2)
    se = math.sqrt(post_var / N)
    assert (x.mean(0) - post_mean).abs().max() < 4 * se
    assert abs(x.std(0).mean().item() / math.sqrt(post_var) - 1) < 0.05
    # Without the inflation the likelihood is over-weighted while x0 is still uncertain: the
    # samples collapse (measured: std 0.016, max mean error 0.197).
    x0 = run(0.0)
    assert (x0.mean(0) - post_mean).abs().max() > 8 * se
    assert x0.std(0).mean().item() < 0.5 * math.sqrt(post_var)


def test_guidance_on_the_low_noise_steps_only_keeps_the_exact_posterior():
    # The isotropic problem above with guidance skipped while sigma > 10 (DecodeConfig's
    # guide_sigma_max; 43 of 64 steps guided): still the exact posterior, as x0_hat carries
    # almost nothing of y up there. Skipping down to sigma 1 does not hold. Measured (N=2000):
    # max mean error 0.0077 (all steps: 0.0086; 4 se = 0.0166), std 0.187 vs 0.186; guided at
    # sigma <= 1 only: 0.0785 and 0.207.
    a, sig_e, residual, post_mean, post_var = isotropic_problem()
    N = 2000
    sig = karras_sigmas(64, 0.002, 80.0, 7.0).tolist()[:-1]

    def run(sigma_max):
        x = dps_edm(gaussian_denoiser, residual, (N, *ITEM), gens(range(N)), weight=1.0, inflation=a**2 / sig_e**2,
                    sigma_data=S_PRIOR, num_steps=64, guide_steps=[s <= sigma_max for s in sig])
        return x.double().flatten(1)

    se = math.sqrt(post_var / N)
    x = run(10.0)
    assert (x.mean(0) - post_mean).abs().max() < 4 * se
    assert abs(x.std(0).mean().item() / math.sqrt(post_var) - 1) < 0.05
    assert (run(1.0).mean(0) - post_mean).abs().max() > 4 * se


def test_ancestral_gaussian_score_samples_the_exact_posterior():
    # The same isotropic problem as above through the paper's 1000-step ancestral sampler with
    # the Gaussian score (weight 1, inflation a^2 / sigma_e^2): the DDPM discretisation of the
    # same guidance also draws the exact posterior. Measured (N=1000): max mean error 0.0116
    # (4 se = 0.0235), std 0.1801 vs 0.1857 (without the inflation: 0.079 and 0.136).
    a, sig_e, residual, post_mean, post_var = isotropic_problem()
    N = 1000

    x = dps_ancestral(gaussian_denoiser, residual, (N, *ITEM), gens(range(N)), weight=1.0,
                      inflation=a**2 / sig_e**2, sigma_data=S_PRIOR).double().flatten(1)
    se = math.sqrt(post_var / N)
    assert (x.mean(0) - post_mean).abs().max() < 4 * se
    assert abs(x.std(0).mean().item() / math.sqrt(post_var) - 1) < 0.05
    with pytest.raises(ValueError, match="exactly one of zeta"):
        dps_ancestral(gaussian_denoiser, residual, (2, *ITEM), gens(range(2)), zeta=0.1,
                      weight=1.0)


def test_dps_ancestral_approaches_the_exact_posterior():
    # Measured (N=400, 50 respaced steps, zeta=0.05): distance 0.061 vs 1.08; mean std 0.329 vs
    # posterior 0.367 (the small-variance ancestral sampler under-disperses at 50 steps).
    N = 400
    x = dps_ancestral(
        gaussian_denoiser, linear_residual, (N, *ITEM), gens(range(N)), zeta=0.05, num_steps=50
    )
    err, prior_err, std, post_std = _post_stats(x)
    assert err < 0.2 * prior_err
    assert abs(std / post_std - 1) < 0.2 and std < 0.8 * S_PRIOR


def test_single_guided_step_closed_form():
    # One Euler step from sigma_max straight to 0 lands on D(x); the guidance then moves by
    # -zeta g (constant), -xi sigma_max sqrt(L) g / ||g|| (normalised) or the Gaussian score, with
    # g = grad_x ||r(D(x))|| = -c A^T r / (sigma_e ||r||), c = s^2 / (s^2 + sigma^2).
    A, y, _, _ = linear_problem()
    n = torch.randn(3, *ITEM, dtype=F64, generator=torch.Generator().manual_seed(2))
    smax = 80.0
    x = smax * n
    c = S_PRIOR**2 / (S_PRIOR**2 + smax**2)
    D_x = gaussian_denoiser(x, torch.full((3,), smax, dtype=F64))
    r = (y - D_x.flatten(1) @ A.T) / SIGMA_E
    g = (-c * (r @ A) / (SIGMA_E * r.norm(dim=1, keepdim=True))).reshape(x.shape)
    kw = dict(num_steps=1, sigma_max=smax, sigma_min=smax)
    out = dps_edm(gaussian_denoiser, linear_residual, n, gens(range(3)), zeta=0.3, **kw)
    torch.testing.assert_close(out.double(), D_x - 0.3 * g, atol=1e-6, rtol=1e-6)
    out = dps_edm(gaussian_denoiser, linear_residual, n, gens(range(3)), xi=0.2, **kw)
    g_unit = g / g.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)
    expected = D_x - 0.2 * smax * math.sqrt(D_DIM) * g_unit
    torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=1e-6)
    # Gaussian score: -smax^2 w ||r|| g, w = weight / (1 + inflation r^2), r^2 of sigma_data 0.5.
    r2 = 0.25 * smax**2 / (0.25 + smax**2)
    for weight, inflation in ((0.7, 0.0), (1.0, 3.0)):
        out = dps_edm(gaussian_denoiser, linear_residual, n, gens(range(3)), weight=weight,
                      inflation=inflation, sigma_data=0.5, **kw)
        w = weight / (1 + inflation * r2)
        expected = D_x - smax**2 * w * r.norm(dim=1).reshape(-1, 1, 1, 1) * g
        torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-6)
    # Ancestral, one step: x_T is VP, x0_hat = D(x_T / sqrt(abar); sigma), then x0_hat - zeta g,
    # with the chain rule through 1 / sqrt(abar).
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=F64), 0)[-1].item()
    sigma = math.sqrt((1 - abar) / abar)
    c = S_PRIOR**2 / (S_PRIOR**2 + sigma**2) / math.sqrt(abar)
    D_x = gaussian_denoiser(n / math.sqrt(abar), torch.full((3,), sigma, dtype=F64))
    r = (y - D_x.flatten(1) @ A.T) / SIGMA_E
    g = (-c * (r @ A) / (SIGMA_E * r.norm(dim=1, keepdim=True))).reshape(x.shape)
    out = dps_ancestral(
        gaussian_denoiser, linear_residual, n, gens(range(3)), zeta=0.4, num_steps=1
    )
    torch.testing.assert_close(out.double(), D_x - 0.4 * g, atol=1e-5, rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# A nonlinear formula denoiser and a frame-local likelihood on variable-length "mels"
# (B, 1, 4 bins, T frames), electrodes (T, 3) per trial.


def formula_denoiser(x, sigma):
    return x / (1 + sigma.reshape(-1, 1, 1, 1) ** 2) + 0.1 * torch.tanh(x)


W = torch.tensor([[0.5, -0.3, 0.2, 0.1], [0.0, 0.4, -0.2, 0.3], [0.3, 0.1, 0.1, -0.5]], dtype=F64)


def neural_data(n_trials, T):
    g = torch.Generator().manual_seed(11)
    return torch.randn(n_trials, T, 3, generator=g, dtype=F64)  # y, already whitened (B, T, C)


def make_residual(y, frame_mask):
    """Whitened residual (B, T, C) of a frame-local tanh(W x) forward model, padding masked."""

    def residual(x0_hat):
        pred = torch.einsum("ck,bkt->btc", W, x0_hat[:, 0])
        return y[:, : pred.shape[1]] - torch.tanh(pred), frame_mask[:, :, None]

    return residual


SAMPLERS = {
    "edm": lambda res, shape, g, **kw: edm_sample(
        formula_denoiser, shape, g, num_steps=8, S_churn=5, **kw
    ),
    "dps_edm_zeta": lambda res, shape, g, **kw: dps_edm(
        formula_denoiser, res, shape, g, zeta=0.1, num_steps=8, S_churn=5, **kw
    ),
    "dps_edm_xi": lambda res, shape, g, **kw: dps_edm(
        formula_denoiser,
        res,
        shape,
        g,
        xi=0.2,
        num_steps=8,
        guide_steps=[False] * 2 + [True] * 6,
        **kw,
    ),
    "dps_ancestral": lambda res, shape, g, **kw: dps_ancestral(
        formula_denoiser, res, shape, g, zeta=0.5, num_steps=10, **kw
    ),
}


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_batch_equals_single_trials(name):
    sampler, T = SAMPLERS[name], 12
    y = neural_data(4, T)
    mask = torch.ones(4, T, dtype=torch.bool)
    seeds = [101, 202, 303, 404]
    batch = sampler(make_residual(y, mask), (4, 1, 4, T), gens(seeds), frame_mask=mask)
    for b in range(4):
        one = sampler(make_residual(y[b : b + 1], mask[b : b + 1]), (1, 1, 4, T), gens([seeds[b]]))
        torch.testing.assert_close(batch[b : b + 1], one, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_padding_leaves_real_frames_unchanged(name):
    # Trials of 20 and 40 real frames padded to 70 (crossing noise blocks) vs each alone.
    sampler, lengths, T_max = SAMPLERS[name], [20, 40], 70
    y = neural_data(2, T_max)
    mask = torch.arange(T_max)[None, :] < torch.tensor(lengths)[:, None]
    padded = sampler(
        make_residual(y, mask), (2, 1, 4, T_max), gens([7, 8]), frame_mask=mask, pad_value=-1.5
    )
    for b, T in enumerate(lengths):
        alone = sampler(
            make_residual(y[b : b + 1, :T], mask[b : b + 1, :T]), (1, 1, 4, T), gens([7 + b])
        )
        torch.testing.assert_close(padded[b : b + 1, ..., :T], alone, atol=1e-5, rtol=0)
        assert bool((padded[b, ..., T:] == -1.5).all())


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_seeds(name):
    sampler, T = SAMPLERS[name], 10
    y = neural_data(2, T)
    mask = torch.ones(2, T, dtype=torch.bool)
    res = make_residual(y, mask)
    a = sampler(res, (2, 1, 4, T), gens([1, 2]))
    b = sampler(res, (2, 1, 4, T), gens([1, 2]))
    c = sampler(res, (2, 1, 4, T), gens([1, 3]))
    assert torch.equal(a, b)
    assert torch.equal(a[0], c[0]) and (a[1] - c[1]).abs().max() > 0.1


# Produced once by running each SAMPLERS entry on shape (2, 1, 4, 6), generators seeded [0, 1],
# y = neural_data(2, 6), all frames real, and printing (x.sum(), x.abs().sum(), x[0, 0, 0, :3]).
STORED = {
    "dps_ancestral": [3.2233829498, 35.900859833, 1.0027327538, -0.3291994333, -1.4909117222],
    "dps_edm_xi": [-29.786378861, 125.48474885, 3.1104600430, -5.1947913170, 3.0289011002],
    "dps_edm_zeta": [-1.5824689865, 135.91535950, 3.0597441196, -3.0612168312, -3.5300338268],
    "edm": [-1.6202554703, 136.07475281, 3.0134360790, -3.0468428134, -3.5207870007],
}


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_stored_numbers(name):
    T = 6
    y = neural_data(2, T)
    x = SAMPLERS[name](
        make_residual(y, torch.ones(2, T, dtype=torch.bool)), (2, 1, 4, T), gens([0, 1])
    )
    got = [x.sum().item(), x.abs().sum().item(), *x[0, 0, 0, :3].tolist()]
    torch.testing.assert_close(
        torch.tensor(got, dtype=F64), torch.tensor(STORED[name], dtype=F64), atol=1e-5, rtol=1e-5
    )


# ----------------------------------------------------------------------------------------------
# Noise, seeds, draws, errors.


def test_item_noise_is_per_item_and_frame_stable():
    long = item_noise(gens([3, 4]), (1, 4, 70))
    short = item_noise(gens([4]), (1, 4, 33))
    torch.testing.assert_close(long[1:, ..., :33], short)
    # Each call advances a generator by one draw whatever the shape.
    g1, g2 = gens([5, 5])
    item_noise([g1], (1, 4, 10))
    item_noise([g2], (2, 3, 90))
    assert torch.equal(g1.get_state(), g2.get_state())
    z = item_noise(gens(range(200)), (1, 4, 50)).flatten()
    assert abs(z.mean().item()) < 0.02 and abs(z.std().item() - 1) < 0.02


def test_trial_seed_is_stable():
    # SHA-256 based: the same on every machine and process (stored once).
    assert trial_seed(0, "sub-01/trial-0001", 0) == STORED_TRIAL_SEED
    assert trial_seed(0, "sub-01/trial-0001", 1) != STORED_TRIAL_SEED
    assert trial_generator(0, "sub-01/trial-0001", 0).initial_seed() == STORED_TRIAL_SEED


STORED_TRIAL_SEED = 647279857543317760


def test_posterior_draws_match_single_calls():
    T, K = 10, 3
    y = neural_data(2, T)
    mask = torch.ones(2, T, dtype=torch.bool)
    sampler = functools.partial(
        dps_edm, formula_denoiser, make_residual(y, mask), zeta=0.1, num_steps=6
    )
    seeds = [[10, 11, 12], [20, 21, 22]]
    draws = posterior_draws(
        sampler, [gens(s) for s in seeds], shape_or_latents=(2, 1, 4, T), frame_mask=mask
    )
    assert draws.samples.shape == (2, K, 1, 4, T)
    for k in range(K):
        one = sampler(shape_or_latents=(2, 1, 4, T), generators=gens([seeds[0][k], seeds[1][k]]))
        torch.testing.assert_close(draws.samples[:, k], one)
    torch.testing.assert_close(draws.mean, draws.samples.mean(1))
    torch.testing.assert_close(draws.std, draws.samples.std(1))
    assert draws.std.min() > 0
    with pytest.raises(ValueError, match="shape"):
        posterior_draws(sampler, [gens(s) for s in seeds], shape_or_latents=torch.zeros(2, 1, 4, T))


def test_posterior_draws_batches_several_draws_per_call():
    # draws_per_call k samples B * k items per call, item b * k + j = draw j of trial b; the
    # sampler repeats its per-item inputs k times (as ssip.decode does). Same draws as one per call.
    T, B = 10, 2
    y = neural_data(B, T)
    mask = torch.ones(B, T, dtype=torch.bool)

    def sampler(shape_or_latents, generators):
        k = len(generators) // B
        res = make_residual(y.repeat_interleave(k, 0), mask.repeat_interleave(k, 0))
        return dps_edm(formula_denoiser, res, shape_or_latents, generators, zeta=0.1, num_steps=6)

    seeds = [[10, 11, 12], [20, 21, 22]]
    one = posterior_draws(sampler, [gens(s) for s in seeds], shape_or_latents=(B, 1, 4, T))
    for per_call in (2, None):
        draws = posterior_draws(sampler, [gens(s) for s in seeds], draws_per_call=per_call,
                                shape_or_latents=(B, 1, 4, T))
        assert draws.samples.shape == (B, 3, 1, 4, T)
        torch.testing.assert_close(draws.samples, one.samples, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="first axis"):
        posterior_draws(sampler, [gens(s) for s in seeds], shape_or_latents=(3, 1, 4, T))


def test_guidance_callable_sees_the_step_and_replaces_the_first_evaluation():
    # A guidance that returns D(x_hat; t_hat) and no correction is the unguided loop, bit for
    # bit; it is called on the guided steps only, with Algorithm 2's t_hat (churn) and t_next.
    T = 6
    mask = torch.tensor([[True] * 4 + [False] * 2, [True] * 6])
    seen = []

    def guidance(x_hat, ctx):
        seen.append((ctx.step, ctx.t_hat, ctx.t_next, ctx.mask.shape, len(ctx.generators)))
        return Guided(ctx.denoise(x_hat, ctx.t_hat))

    kw = dict(num_steps=8, S_churn=5, S_min=0.05, S_max=50, frame_mask=mask, pad_value=-1.0)
    ref = edm_sample(formula_denoiser, (2, 1, 4, T), gens([3, 4]), **kw)
    steps = [False, True] * 4
    out = edm_sample(formula_denoiser, (2, 1, 4, T), gens([3, 4]), guidance=guidance,
                     guide_steps=steps, **kw)
    assert torch.equal(out, ref)
    t = karras_sigmas(8).tolist()
    gamma = min(5 / 8, math.sqrt(2) - 1)
    assert [s[0] for s in seen] == [1, 3, 5, 7]
    for i, t_hat, t_next, mask_shape, n_gen in seen:
        t_hat_expected = t[i] * (1 + gamma) if 0.05 <= t[i] <= 50 else t[i]
        assert t_hat == pytest.approx(t_hat_expected, rel=1e-12) and t_next == t[i + 1]
        assert mask_shape == (2, 1, 1, T) and n_gen == 2
    # A correction is added to x_{i+1} on real frames only.
    shifted = edm_sample(formula_denoiser, (2, 1, 4, T), gens([3, 4]), num_steps=1,
                         guidance=lambda x, ctx: Guided(ctx.denoise(x, ctx.t_hat),
                                                        torch.ones_like(x)), frame_mask=mask)
    plain = edm_sample(formula_denoiser, (2, 1, 4, T), gens([3, 4]), num_steps=1, frame_mask=mask)
    torch.testing.assert_close(shifted[0, ..., :4], plain[0, ..., :4] + 1)
    torch.testing.assert_close(shifted[1], plain[1] + 1)
    with pytest.raises(ValueError, match="guide_steps"):
        edm_sample(formula_denoiser, (2, 1, 4, T), gens([3, 4]), num_steps=8, guide_steps=[True])


def test_guidance_rule_is_checked_in_one_place():
    assert check_guidance_rule({"xi": None, "zeta": 0.5, "weight": None}) == "zeta"
    assert check_guidance_rule({"weight": 1.0}, 3.0, sampler="ancestral") == "weight"
    # The message offers the caller's rules in its order.
    with pytest.raises(ValueError, match=r"exactly one of xi \(normalised step\), zeta"):
        check_guidance_rule({"xi": 0.1, "zeta": 0.1, "weight": None})
    with pytest.raises(ValueError, match=r"exactly one of zeta \(constant step\) or weight"):
        check_guidance_rule({"zeta": None, "weight": None})
    for bad in (-0.1, math.inf, math.nan):
        with pytest.raises(ValueError, match="finite and >= 0"):
            check_guidance_rule({"weight": bad})
        with pytest.raises(ValueError, match="inflation"):
            check_guidance_rule({"weight": 1.0}, bad)
    with pytest.raises(ValueError, match="not xi"):
        check_guidance_rule({"xi": 0.1}, sampler="ancestral")
    with pytest.raises(ValueError, match="unknown"):
        check_guidance_rule({"eta": 0.1})


def test_non_finite_update_names_the_step():
    # A denoiser that breaks below sigma = 1: the error names the first step whose Heun
    # evaluation at t_next falls below 1.
    def broken(x, sigma):
        return torch.where(sigma.reshape(-1, 1, 1, 1) < 1, torch.nan, formula_denoiser(x, sigma))

    first = int((karras_sigmas(8)[1:] < 1).nonzero()[0])
    with pytest.raises(NonFiniteSampleError, match=f"step {first}") as info:
        dps_edm(
            broken,
            make_residual(neural_data(2, 5), torch.ones(2, 5, dtype=torch.bool)),
            (2, 1, 4, 5),
            gens([0, 1]),
            zeta=0.1,
            num_steps=8,
        )
    assert info.value.step == first and info.value.items == [0, 1]
    with pytest.raises(ValueError, match="exactly one of zeta"):
        dps_edm(formula_denoiser, linear_residual, (1, *ITEM), gens([0]), zeta=0.1, xi=0.1)


def test_guidance_runs_with_grad_disabled_outside():
    # Decoders may call under no_grad; DPS must still get its gradient (never inference_mode).
    y = neural_data(1, 6)
    res = make_residual(y, torch.ones(1, 6, dtype=torch.bool))
    ref = dps_edm(formula_denoiser, res, (1, 1, 4, 6), gens([0]), zeta=0.3, num_steps=5)
    with torch.no_grad():
        out = dps_edm(formula_denoiser, res, (1, 1, 4, 6), gens([0]), zeta=0.3, num_steps=5)
    torch.testing.assert_close(out, ref)
    unguided = edm_sample(formula_denoiser, (1, 1, 4, 6), gens([0]), num_steps=5)
    assert (out - unguided).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------------
# DAPS (decoupled annealing) and combined evidence on the same exact problems.


def test_daps_samples_the_exact_linear_gaussian_posterior():
    # With the exact Tweedie denoiser of the Gaussian prior and r_t^2 its exact posterior
    # variance, DAPS's inner target is the exact p(x0 | x_t, y): the chain samples p(x0 | y) up
    # to the Langevin discretisation. Measured (N=1000, 30 levels x 40 steps, step_scale 0.05):
    # mean error 0.032 of the prior's 1.080, std 0.366 vs 0.367.
    from ssip.sampling.daps import daps_sample

    N = 1000
    x = daps_sample(gaussian_denoiser, linear_residual, (N, *ITEM), gens(range(N)), num_levels=30,
                    langevin_steps=40, step_scale=0.05, sigma_data=S_PRIOR)
    err, prior_err, std, post_std = _post_stats(x)
    print(f"DAPS linear-Gaussian: mean error {err:.3f} of {prior_err:.3f}, std {std:.3f} vs {post_std:.3f}")
    assert err < 0.1 * prior_err
    assert abs(std / post_std - 1) < 0.1


def test_daps_with_a_pseudo_measurement_and_the_encoding_evidence():
    # Two independent Gaussian views of x: y = a x + e (encoding) and z = x + n with a per-item
    # noise std (a direct "pseudo-measurement", e.g. a regression decoder). stack_residuals with
    # weights 1, 1 is their product: the exact posterior has precision 1/s^2 + a^2/se^2 + 1/sn^2.
    # Weights w multiply each precision term (w = 1/2 each: one view's worth of information).
    # Measured (N=800): max |mean error| 2.0 se for w = 1 and 1/2, std ratio 1.04.
    from ssip.sampling.daps import daps_sample, gaussian_measurement, stack_residuals

    a, sig_e, encoding, _, _ = isotropic_problem()
    g = torch.Generator().manual_seed(11)
    sig_n = torch.full(ITEM, 0.4, dtype=F64)
    truth = MU + S_PRIOR * torch.randn(ITEM, generator=g, dtype=F64)
    z = (truth + sig_n * torch.randn(ITEM, generator=g, dtype=F64)).unsqueeze(0)
    N = 800
    for w in (1.0, 0.5):
        res = stack_residuals([encoding, gaussian_measurement(z.expand(N, *ITEM), sig_n)], [w, w])
        y = encoding(torch.zeros(1, D_DIM, dtype=F64))[0][0] * sig_e  # y itself
        prec = 1 / S_PRIOR**2 + w * a**2 / sig_e**2 + w / sig_n.flatten() ** 2
        mean = (MU.flatten() / S_PRIOR**2 + w * a * y / sig_e**2 + w * z.flatten() / sig_n.flatten() ** 2) / prec
        x = daps_sample(gaussian_denoiser, res, (N, *ITEM), gens(range(N)), num_levels=30,
                        langevin_steps=40, step_scale=0.05, sigma_data=S_PRIOR).double().flatten(1)
        se = torch.sqrt(1 / prec / N)
        print(f"DAPS two views w={w}: max |mean err| / se {((x.mean(0) - mean).abs() / se).max():.2f}, "
              f"std ratio {(x.std(0) / torch.sqrt(1 / prec)).mean():.3f}")
        assert ((x.mean(0) - mean).abs() / se).max() < 5
        assert abs((x.std(0) / torch.sqrt(1 / prec)).mean().item() - 1) < 0.1


def test_daps_batch_padding_and_arguments():
    from ssip.sampling.daps import daps_sample, gaussian_measurement, stack_residuals

    x1 = daps_sample(gaussian_denoiser, linear_residual, (3, *ITEM), gens([1, 2, 3]), num_levels=5,
                     langevin_steps=3, sigma_data=S_PRIOR)
    x2 = daps_sample(gaussian_denoiser, linear_residual, (1, *ITEM), gens([2]), num_levels=5,
                     langevin_steps=3, sigma_data=S_PRIOR)
    torch.testing.assert_close(x1[1:2], x2, rtol=0, atol=1e-6)  # items independent
    mask = torch.tensor([[True, True, True, False]])
    z = torch.zeros(1, *ITEM, dtype=F64)
    xm = daps_sample(gaussian_denoiser, gaussian_measurement(z, torch.ones(ITEM, dtype=F64), mask),
                     (1, *ITEM), gens([4]), num_levels=4, langevin_steps=2, sigma_data=S_PRIOR,
                     frame_mask=mask, pad_value=-7.0)
    assert (xm[..., 3] == -7.0).all() and (xm[..., :3] != -7.0).all()
    xo = daps_sample(gaussian_denoiser, linear_residual, (2, *ITEM), gens([1, 2]), num_levels=4,
                     langevin_steps=2, sigma_data=S_PRIOR, x0_estimate="ode", ode_steps=3)
    assert torch.isfinite(xo).all()
    with pytest.raises(ValueError, match="x0_estimate='euler'"):
        daps_sample(gaussian_denoiser, linear_residual, (1, *ITEM), gens([1]), x0_estimate="euler")
    with pytest.raises(ValueError, match="every sigma must be > 0"):
        gaussian_measurement(z, torch.zeros(ITEM, dtype=F64))
    with pytest.raises(ValueError, match="weights must be finite and >= 0"):
        stack_residuals([linear_residual], [-1.0])
