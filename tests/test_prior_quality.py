"""Prior quality: the Fréchet distance against closed forms and its small-N bias, the held-out
denoising loss per sigma bucket against the exact posterior mean of Gaussian data, Whisper
embeddings of real speech versus noise, and `ssip evaluate-prior` end to end."""

from __future__ import annotations

import json
import math
import statistics

import numpy as np
import pytest
import torch
from scipy.stats import ortho_group

from ssip.evaluate.prior_quality import (
    bucket_sigmas,
    cut_windows,
    denoising_loss_buckets,
    heldout_reference,
    noise_shaped_mels,
    sample_prior,
    split_halves,
    whisper_embeddings,
    window_encoder,
)
from ssip.frechet import (
    FrechetError,
    frechet_distance,
    frechet_from_samples,
    gaussian_stats,
)
from ssip.mel import MEL_FLOOR
from ssip.models.prior import (
    EMA,
    EDMPrior,
    PriorConfig,
    denoising_loss,
    save_prior,
    sigma_quartile_edges,
)

# ---------------------------------------------------------------------------------------------
# Fréchet distance.


def _sqrt_psd(c: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(c)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _frechet_reference(mu1, c1, mu2, c2) -> float:
    """tr (C1 C2)^{1/2} = tr (C1^{1/2} C2 C1^{1/2})^{1/2}: a symmetric PSD eigenproblem."""
    s1 = _sqrt_psd(c1)
    e = np.linalg.eigvalsh(s1 @ c2 @ s1)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(c1) + np.trace(c2) - 2 * np.sqrt(np.clip(e, 0, None)).sum())


def _random_spd(rng, d, cond=10.0):
    q = ortho_group.rvs(d, random_state=rng)
    return (q * np.geomspace(1.0, 1.0 / cond, d)) @ q.T


@pytest.mark.parametrize("method", ["eigh", "sqrtm"])
def test_frechet_diagonal_and_one_dimensional_closed_forms(method):
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0.1, 3.0, 12), rng.uniform(0.1, 3.0, 12)
    mu1, mu2 = rng.normal(size=12), rng.normal(size=12)
    want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert math.isclose(frechet_distance(mu1, np.diag(a), mu2, np.diag(b), method=method), want, rel_tol=1e-9)
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2, scalars accepted.
    assert math.isclose(frechet_distance(1.0, 4.0, -2.0, 0.25, method=method), 9.0 + (2.0 - 0.5) ** 2, rel_tol=1e-12)
    assert frechet_distance(mu1, np.diag(a), mu1, np.diag(a), method=method) == pytest.approx(0.0, abs=1e-10)


@pytest.mark.parametrize("method", ["eigh", "sqrtm"])
def test_frechet_full_covariances_against_eigen_reference(method):
    rng = np.random.default_rng(1)
    d = 16
    q = ortho_group.rvs(d, random_state=rng)
    a, b = rng.uniform(0.2, 2.0, d), rng.uniform(0.2, 2.0, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    # Commuting: same eigenvectors, so the diagonal closed form holds in that basis.
    c1, c2 = (q * a) @ q.T, (q * b) @ q.T
    want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert math.isclose(frechet_distance(mu1, c1, mu2, c2, method=method), want, rel_tol=1e-8)
    # Non-commuting.
    c1, c2 = _random_spd(rng, d, 30.0), _random_spd(rng, d, 5.0)
    got = frechet_distance(mu1, c1, mu2, c2, method=method)
    assert math.isclose(got, _frechet_reference(mu1, c1, mu2, c2), rel_tol=1e-8)
    # Symmetric.
    assert math.isclose(got, frechet_distance(mu2, c2, mu1, c1, method=method), rel_tol=1e-8)


def test_frechet_from_samples_is_symmetric_and_matches_stats():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(300, 8)), rng.normal(size=(200, 8)) * 1.5 + 0.3
    mu, cov = gaussian_stats(x)
    np.testing.assert_allclose(mu, x.mean(axis=0))
    np.testing.assert_allclose(cov, np.cov(x.T))
    fxy, fyx = frechet_from_samples(x, y), frechet_from_samples(y, x)
    assert math.isclose(fxy, fyx, rel_tol=1e-8)
    assert math.isclose(fxy, _frechet_reference(*gaussian_stats(x), *gaussian_stats(y)), rel_tol=1e-8)


@pytest.mark.parametrize("d", [1, 4])
def test_frechet_of_one_gaussian_vanishes_as_n_grows_with_the_known_bias(d):
    """Two samples of N points from N(0, I_D): E||mu1 - mu2||^2 = 2D/N, and the covariance term is
    about (1/4) E||C1 - C2||_F^2 = D(D + 1) / (2N) (Wishart variances); so E[FD] ~ (2D + D(D+1)/2) / N."""
    rng = np.random.default_rng(3)
    bias = (2 * d + d * (d + 1) / 2)
    means = {}
    for n in (100, 1000):
        fds = [frechet_from_samples(rng.normal(size=(n, d)), rng.normal(size=(n, d))) for _ in range(200)]
        means[n] = float(np.mean(fds))
        assert means[n] * n == pytest.approx(bias, rel=0.15), (n, means[n] * n, bias)
    assert means[1000] < means[100] / 5


def test_frechet_rank_deficient_and_invalid_inputs():
    rng = np.random.default_rng(4)
    # N < D: singular covariances; still finite, >= 0, symmetric, and zero for identical sets.
    x, y = rng.normal(size=(20, 64)), rng.normal(size=(20, 64))
    f = frechet_from_samples(x, y)
    assert np.isfinite(f) and f > 0
    assert math.isclose(f, frechet_from_samples(y, x), rel_tol=1e-6)
    assert frechet_from_samples(x, x) == pytest.approx(0.0, abs=1e-6 * f)
    # The two ways of computing the trace term agree on singular covariances too.
    assert math.isclose(f, frechet_distance(*gaussian_stats(x), *gaussian_stats(y), method="sqrtm"),
                        rel_tol=1e-6)
    # A covariance that is not PSD (so (C1 C2)^{1/2} is imaginary) is refused, not made real.
    with pytest.raises(FrechetError, match="imaginary"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), -np.eye(3), method="sqrtm")
    with pytest.raises(FrechetError, match="positive semi-definite"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), -np.eye(3))
    with pytest.raises(ValueError, match="method="):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(3), method="svd")
    with pytest.raises(ValueError, match="cov2 has shape"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(2))
    with pytest.raises(ValueError, match="at least 2"):
        gaussian_stats(np.ones((1, 3)))
    with pytest.raises(ValueError, match="NaN"):
        gaussian_stats(np.array([[0.0, np.nan], [1.0, 2.0]]))


def test_frechet_retries_with_a_diagonal_offset(monkeypatch):
    """method "sqrtm": a failed square root (as for a near-singular C1 C2) is retried on (C1 + eps s I)(C2 + eps s I);
    the result is the distance between the offset Gaussians, within O(eps) of the exact one."""
    import ssip.frechet as fr

    rng = np.random.default_rng(5)
    c1, c2 = _random_spd(rng, 6), _random_spd(rng, 6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    exact = _frechet_reference(mu1, c1, mu2, c2)
    calls = []
    real_sqrtm = fr.linalg.sqrtm

    def flaky_sqrtm(a):
        calls.append(a)
        return np.full_like(a, np.nan) if len(calls) == 1 else real_sqrtm(a)

    monkeypatch.setattr(fr.linalg, "sqrtm", flaky_sqrtm)
    got = fr.frechet_distance(mu1, c1, mu2, c2, method="sqrtm", eps=1e-6)
    assert len(calls) == 2 and not np.allclose(calls[0], calls[1])
    assert got == pytest.approx(exact, rel=1e-4)
    monkeypatch.setattr(fr.linalg, "sqrtm", lambda a: np.full_like(a, np.nan))
    with pytest.raises(FrechetError, match="stayed inaccurate"):
        fr.frechet_distance(mu1, c1, mu2, c2, method="sqrtm")


# ---------------------------------------------------------------------------------------------
# Denoising loss per sigma bucket.


def test_bucket_sigmas_lie_inside_their_quartiles():
    edges = [0.0, *sigma_quartile_edges(), math.inf]
    per_bucket = bucket_sigmas(3)
    assert len(per_bucket) == 4 and all(len(b) == 3 for b in per_bucket)
    flat = [s for b in per_bucket for s in b]
    assert flat == sorted(flat)
    for k, bucket in enumerate(per_bucket):
        assert all(edges[k] < s < edges[k + 1] for s in bucket), (k, bucket, edges)
    # One sigma per bucket: the within-bucket median of ln(sigma) ~ N(-1.2, 1.2^2) (1/8, 3/8, ...).
    nd = statistics.NormalDist(-1.2, 1.2)
    np.testing.assert_allclose([b[0] for b in bucket_sigmas(1)],
                               [math.exp(nd.inv_cdf(q)) for q in (1 / 8, 3 / 8, 5 / 8, 7 / 8)])


def _gaussian_windows(n, t, sd, mean, seed):
    rng = np.random.default_rng(seed)
    return (mean[None, :, None] + sd * rng.standard_normal((n, 80, t))).astype(np.float32)


def test_denoising_loss_buckets_against_the_exact_posterior_mean():
    """For data x0 ~ N(mu, sd^2) per element, E[x0 | x0 + sigma n] = mu + c_skip (x - mu): the EDM
    prior whose network outputs 0 (its initial state) is the exact posterior mean, with weighted
    loss lambda c_out^2 = 1 at every sigma. A network that outputs the constant k scores 1 + k^2."""
    torch.manual_seed(0)
    sd, mean = 0.6, np.linspace(-0.8, 0.4, 80).astype(np.float32)
    windows = _gaussian_windows(24, 32, sd, mean, seed=0)
    exact = EDMPrior("tiny", sigma_data=sd, data_mean=mean, channels=8)
    res = denoising_loss_buckets(exact, windows, sigmas_per_bucket=2, seed=5, batch_size=10)
    assert len(res["loss"]) == 4 and len(res["sigmas"]) == 4 and len(res["edges"]) == 3
    np.testing.assert_allclose(res["loss"], 1.0, atol=0.03)
    assert res["mean"] == pytest.approx(float(np.mean(res["loss"])))

    perturbed = EDMPrior("tiny", sigma_data=sd, data_mean=mean, channels=8)
    with torch.no_grad():
        perturbed.net.conv_out.bias.fill_(0.5)  # F = 0.5 everywhere (the weights are zero)
    worse = denoising_loss_buckets(perturbed, windows, sigmas_per_bucket=2, seed=5, batch_size=10)
    np.testing.assert_allclose(worse["loss"], 1.25, atol=0.03)
    assert all(w > e + 0.2 for w, e in zip(worse["loss"], res["loss"]))


def test_denoising_loss_buckets_is_deterministic_and_matches_denoising_loss():
    torch.manual_seed(1)
    sd, mean = 0.5, np.zeros(80, np.float32)
    windows = _gaussian_windows(10, 16, sd, mean, seed=1)
    model = EDMPrior("tiny", sigma_data=sd, data_mean=mean, channels=8)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    a = denoising_loss_buckets(model, windows, seed=3)
    b = denoising_loss_buckets(model, torch.from_numpy(windows)[:, None], seed=3)
    c = denoising_loss_buckets(model, windows, seed=4)
    assert a == b
    assert a["loss"] != c["loss"]
    # One chunk: the per-sigma losses are denoising_loss at the bucket sigmas, in order.
    flat = [s for bucket in a["sigmas"] for s in bucket]
    want = denoising_loss(model, torch.from_numpy(windows)[:, None], flat, seed=3 * 1_000_003)
    np.testing.assert_allclose([v for bucket in a["loss_per_sigma"] for v in bucket], want, rtol=1e-6)
    with pytest.raises(ValueError, match="windows must be"):
        denoising_loss_buckets(model, windows[0])


# ---------------------------------------------------------------------------------------------
# Windows, samples.


def test_cut_windows_and_halves():
    long = np.arange(80 * 70, dtype=np.float32).reshape(80, 70)
    short = np.ones((80, 10), np.float32)
    w = cut_windows([long, short], 32)
    assert w.shape == (3, 80, 32)
    np.testing.assert_array_equal(w[1], long[:, 32:64])
    np.testing.assert_array_equal(w[2, :, :10], 1.0)
    np.testing.assert_array_equal(w[2, :, 10:], np.float32(MEL_FLOOR))
    mels = [np.full((80, 5), i, np.float32) for i in range(7)]
    a, b = split_halves(mels, seed=0)
    ids_a, ids_b = {int(m[0, 0]) for m in a}, {int(m[0, 0]) for m in b}
    assert len(a) == 4 and len(b) == 3 and not ids_a & ids_b and ids_a | ids_b == set(range(7))
    noise = noise_shaped_mels([long, short], seed=0)
    assert [m.shape for m in noise] == [(80, 70), (80, 10)]


def test_sample_prior_is_seeded_per_sample():
    torch.manual_seed(2)
    model = EDMPrior("tiny", sigma_data=0.5, data_mean=np.full(80, -0.3, np.float32), channels=8)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    x = sample_prior(model, 5, 16, num_steps=3, seed=7, batch_size=2)
    assert x.shape == (5, 80, 16) and x.dtype == np.float32 and np.isfinite(x).all()
    y = sample_prior(model, 3, 16, num_steps=3, seed=7, batch_size=3)
    np.testing.assert_allclose(x[:3], y, atol=1e-5)  # sample i does not depend on its batch
    z = sample_prior(model, 2, 16, num_steps=3, seed=8)
    assert not np.allclose(x[:2], z)


def test_prior_sample_command_writes_the_seeded_samples_as_mels_wavs_and_a_figure(tmp_path):
    import soundfile as sf

    from ssip.cli import main

    torch.manual_seed(2)
    model = EDMPrior("tiny", sigma_data=0.5, data_mean=np.full(80, -0.3, np.float32), channels=8)
    save_prior(str(tmp_path / "prior"), model, PriorConfig(window_frames=32))
    out = tmp_path / "samples"
    assert main(["prior", "sample", str(out), "--prior", str(tmp_path / "prior"), "-n", "3",
                 "--frames", "20", "--steps", "3", "--seed", "7"]) == 0
    mels = [np.load(out / f"sample_{i:02d}.npy") for i in range(3)]
    # 20 frames round up to the UNet's factor (8): 24; the same samples as the library's.
    np.testing.assert_allclose(np.stack(mels), sample_prior(model, 3, 24, num_steps=3, seed=7),
                               atol=1e-5)
    for i in range(3):
        audio, rate = sf.read(out / f"sample_{i:02d}.wav")
        assert rate == 16000 and len(audio) == 24 * 160 and np.abs(audio).max() <= 1.0
    assert (out / "samples.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="-n 0"):
        main(["prior", "sample", str(out), "--prior", str(tmp_path / "prior"), "-n", "0"])


# ---------------------------------------------------------------------------------------------
# Whisper embeddings of real speech.


@pytest.fixture(scope="module")
def asterisk_mels():
    from ssip.data.simulate import prompt_mel
    from ssip.data.speech import read_asterisk

    return [prompt_mel(u) for u in read_asterisk(limit=30)]


def test_real_speech_floor_is_far_below_noise_shaped_control(asterisk_mels):
    """Whisper tiny.en embeddings: two halves of real speech (one speaker, disjoint prompts) are
    much closer to each other than real speech is to Gaussian noise with speech's per-bin mean and
    std, at the same N; and the control only enters through the reference set."""
    encoder = window_encoder("tiny.en")
    ref = heldout_reference(asterisk_mels, n=40, window_frames=64, seed=0, whisper_model="tiny.en",
                            control_mels=noise_shaped_mels(asterisk_mels, seed=0), encoder=encoder)
    assert ref["a"].shape == ref["b"].shape == ref["control"].shape == (40, 384)
    control = 0.5 * (frechet_from_samples(ref["control"], ref["a"])
                     + frechet_from_samples(ref["control"], ref["b"]))
    assert ref["floor"] > 0
    # Measured 229 vs 54 (D = 384 > N = 40, so both carry a large small-N bias).
    assert control > 3 * ref["floor"], (control, ref["floor"])
    # Embedding a window is independent of its batch-mates and of how the mels were cut.
    one = whisper_embeddings([asterisk_mels[0][:, :64]], window_frames=64, encoder=encoder)
    many = whisper_embeddings(asterisk_mels[:3], window_frames=64, encoder=encoder, batch_size=5)
    np.testing.assert_allclose(many[0], one[0], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# The command, end to end.


@pytest.fixture(scope="module")
def ingest_root(tmp_path_factory):
    """10 trials of real speech (4 of them test) with noise as 'neural', on disk."""
    from tests.conftest import make_speech_ingest

    return make_speech_ingest(tmp_path_factory.mktemp("ingest"), n_trials=10, step_s=0.7,
                              duration_s=0.6, val_fraction=0.2, test_fraction=0.4)


def _tiny_prior(out, mels, steps: int, seed: int = 0) -> str:
    from ssip.models.prior import estimate_data_stats, train_prior, window_batches

    torch.manual_seed(seed)
    mean, sd = estimate_data_stats(mels)
    model = EDMPrior("tiny", sigma_data=sd, data_mean=mean, channels=8)
    cfg = PriorConfig(window_frames=32, batch_size=8, lr=2e-3, warmup_samples=8,
                      total_samples=8 * steps, log_every_samples=8 * steps)
    stats = train_prior(model, window_batches(mels, 32, 8, np.random.default_rng(seed)), cfg,
                        progress=False)
    save_prior(str(out), model, cfg, ema=stats["ema"], stats=stats)
    return str(out)


def test_cli_end_to_end_on_ingest_and_speech_roots(ingest_root, tmp_path, capsys, monkeypatch):
    from ssip.cli import main
    from ssip.data.dataset import load_trials
    from ssip.storage import write_json

    train = [t["mel"] for t in load_trials(str(ingest_root), split="train")]
    test = [t["mel"] for t in load_trials(str(ingest_root), split="test")]
    assert len(test) >= 2
    p1 = _tiny_prior(tmp_path / "p1", train, steps=3)
    out = tmp_path / "q.json"
    args = ["evaluate-prior", p1, p1, "--heldout", str(ingest_root), "--n-samples", "6",
            "--steps", "2", "--whisper", "tiny.en", "--n-loss-windows", "5", "--json", str(out)]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "split test: 4 trials" in text and text.count(p1[-20:]) == 2
    results = json.loads(out.read_text())["results"]
    assert len(results) == 2
    r = results[0]
    assert list(r["loss_per_bucket"]) == ["q1", "q2", "q3", "q4"]
    assert r["n"] == 6 and r["window_frames"] == 32 and r["num_steps"] == 2
    assert np.isfinite([r["frechet"], r["frechet_floor"], r["loss_mean"]]).all()
    assert r["frechet_floor"] > 0 and r["frechet"] > 0 and r["frechet_control"] > 0
    assert "whisper-tiny.en" in r["embedding"] and "mean-pooled" in r["embedding"]
    # Same checkpoint twice: the same noise, windows and samples, so the same numbers.
    for key in ("loss_per_bucket", "frechet", "frechet_floor"):
        assert results[1][key] == r[key]

    # A speech-corpus root (card.json, shards of the speech schema) works the same way.
    from ssip.data import schema
    from ssip.storage import write_parquet

    speech = tmp_path / "speech"
    rows = [{"utt_id": f"u{i}", "source": "s", "speaker": "s:a", "language": "en",
             "transcript": "", "license": "", "source_file": f"u{i}.wav", "source_rate": 16000,
             "duration_s": m.shape[1] / 100, "n_frames": m.shape[1], "mel": m, "mel_version": "x"}
            for i, m in enumerate(test)]
    write_parquet(str(speech / "shards" / "a.parquet"), schema.speech_table(rows))
    write_json(str(speech / "card.json"), {"schema_version": schema.SPEECH_SCHEMA_VERSION,
                                           "shards": [{"path": "shards/a.parquet", "rows": 4}]})
    assert main(["evaluate-prior", p1, "--heldout", str(speech), "--n-samples", "6", "--steps", "2",
                 "--whisper", "tiny.en", "--n-loss-windows", "5"]) == 0
    text = capsys.readouterr().out
    assert "speech corpus" in text and "4 utterances" in text
    # Same held-out mels, seed and N: the same floor and losses as from the ingest root.
    row = text.strip().splitlines()[-1].split()
    assert float(row[-4]) == pytest.approx(r["frechet_floor"], abs=1e-3)
    assert float(row[2]) == pytest.approx(r["loss_per_bucket"]["q1"], abs=1e-4)


def test_cli_errors_name_the_problem(ingest_root, tmp_path):
    from ssip.cli import main

    with pytest.raises(FileNotFoundError, match=r"no manifest\.json"):
        main(["evaluate-prior", str(tmp_path / "nope"), "--heldout", str(ingest_root)])
    prior = EDMPrior("tiny", channels=8)
    save_prior(str(tmp_path / "p"), prior, PriorConfig(window_frames=32), ema=EMA(prior))
    with pytest.raises(FileNotFoundError, match=r"neither manifest\.json"):
        main(["evaluate-prior", str(tmp_path / "p"), "--heldout", str(tmp_path)])
    with pytest.raises(ValueError, match="--n-samples=1"):
        main(["evaluate-prior", str(tmp_path / "p"), "--heldout", str(ingest_root), "--n-samples", "1"])
