"""Regression baselines: the Verwoert linear decoder against a plain-numpy reference and a known
linear map; the temporal conv net against predicting the mean; checkpoints of both."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter1d

from ssip.config import ConfigError
from ssip.models.baselines import (
    LinearDecoder,
    LinearDecoderConfig,
    NNDecoder,
    NNDecoderConfig,
    context_offsets,
    load_baseline,
    save_baseline,
    stack_context,
)
from ssip.models.checkpoint import CheckpointError, load_checkpoint

N_CH = 8




def _pcc_per_bin(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Pearson r per mel bin over frames; (80, N) each."""
    p = pred - pred.mean(axis=1, keepdims=True)
    t = true - true.mean(axis=1, keepdims=True)
    return (p * t).sum(axis=1) / np.sqrt((p**2).sum(axis=1) * (t**2).sum(axis=1))


def _synthetic(n_trials: int, seed: int, nonlinear: bool = False):
    """Neural (T, 8): 4 smooth latent sources mixed into 8 channels with offsets and gains, plus
    noise. Mel (80, T) = W stack_context(neural) + b (+ tanh if nonlinear) + small noise."""
    rng = np.random.default_rng(seed)
    truth = np.random.default_rng(1234)  # the same map for every split
    mix = truth.normal(size=(4, N_CH))
    offset, gain = truth.normal(size=N_CH) * 3, truth.uniform(0.5, 4, size=N_CH)
    w = truth.normal(size=(80, 9 * N_CH)) / np.sqrt(9 * N_CH)
    b = truth.normal(size=80) * 0.3
    neural, mels = [], []
    for _ in range(n_trials):
        t = int(rng.integers(120, 220))
        src = gaussian_filter1d(rng.normal(size=(t, 4)), 3, axis=0) * 3
        x = (src @ mix + 0.1 * rng.normal(size=(t, N_CH))) * gain + offset
        z = (x - offset) / gain  # the map acts on the unscaled signal
        m = (w @ stack_context(z, context_offsets()).T) + b[:, None]  # (80, T)
        if nonlinear:
            m = np.tanh(1.5 * m)
        mels.append((m + 0.05 * rng.normal(size=m.shape)).astype(np.float32))
        neural.append(x.astype(np.float32))
    return neural, mels


def test_stack_context_edges():
    x = np.arange(12, dtype=float).reshape(6, 2)  # frame t has [2t, 2t+1]
    s = stack_context(x, np.array([-2, 0, 3]))
    assert s.shape == (6, 6)
    # frame 0: offsets -2 -> clipped to 0, 0 -> 0, +3 -> 3
    np.testing.assert_array_equal(s[0], [0, 1, 0, 1, 6, 7])
    # frame 5: -2 -> 3, 0 -> 5, +3 -> clipped to 5
    np.testing.assert_array_equal(s[5], [6, 7, 10, 11, 10, 11])
    np.testing.assert_array_equal(context_offsets(), [-20, -15, -10, -5, 0, 5, 10, 15, 20])


def test_linear_decoder_matches_numpy_reference_and_recovers_map(tmp_path):
    train_x, train_y = _synthetic(30, seed=0)
    test_x, test_y = _synthetic(10, seed=1)
    dec = LinearDecoder().fit(train_x, train_y)

    # Reference in plain numpy: z-score, stack, centre, SVD -> top 50 PCs, least squares.
    cat = np.concatenate(train_x).astype(np.float64)
    mu, sd = cat.mean(axis=0), cat.std(axis=0)
    offs = np.arange(-4, 5) * 5
    feats = [stack_context((x - mu) / sd, offs) for x in train_x]
    xs = np.concatenate(feats)
    ys = np.concatenate([m.T for m in train_y]).astype(np.float64)
    centre = xs.mean(axis=0)
    _, _, vt = np.linalg.svd(xs - centre, full_matrices=False)
    pcs = vt[:50]
    design = np.c_[(xs - centre) @ pcs.T, np.ones(len(xs))]
    coef, *_ = np.linalg.lstsq(design, ys, rcond=None)
    for x in test_x:
        z = stack_context((x - mu) / sd, offs)
        ref = (np.c_[(z - centre) @ pcs.T, np.ones(len(z))] @ coef).T  # (80, T)
        np.testing.assert_allclose(dec.predict(x), ref, atol=1e-5, rtol=0)

    pred = np.concatenate([dec.predict(x) for x in test_x], axis=1)
    true = np.concatenate(test_y, axis=1)
    pcc = _pcc_per_bin(pred, true)
    assert pcc.mean() > 0.95 and pcc.min() > 0.9, (pcc.mean(), pcc.min())

    # Safetensors round trip: identical predictions, no pickle.
    save_baseline(str(tmp_path), dec)
    again = load_baseline(str(tmp_path))
    assert isinstance(again, LinearDecoder)
    np.testing.assert_array_equal(again.predict(test_x[0]), dec.predict(test_x[0]))
    state, manifest = load_checkpoint(str(tmp_path), "baseline-linear")
    assert manifest["config"]["n_components"] == 50
    assert list(state["pca_components"].shape) == [50, 9 * N_CH]


def test_linear_decoder_ridge_and_errors():
    train_x, train_y = _synthetic(6, seed=3)
    ols = LinearDecoder().fit(train_x, train_y)
    ridge = LinearDecoder(LinearDecoderConfig(ridge_alpha=1e4)).fit(train_x, train_y)
    # A strong ridge shrinks the map toward the mean.
    assert np.abs(ridge.arrays["coef"]).sum() < 0.5 * np.abs(ols.arrays["coef"]).sum()
    # Few stacked features: PCA keeps all of them.
    small = LinearDecoder(LinearDecoderConfig(context_frames=1)).fit(train_x, train_y)
    assert small.arrays["pca_components"].shape == (3 * N_CH, 3 * N_CH)
    with pytest.raises(ValueError, match="trial 1 has 10 neural frames but 11 mel frames"):
        LinearDecoder().fit([train_x[0], train_x[1][:10]], [train_y[0], train_y[1][:, :11]])
    with pytest.raises(ValueError, match=r"expected \(T, 8\)"):
        ols.predict(np.zeros((20, 5)))
    with pytest.raises(ConfigError, match="ridge_alpha"):
        LinearDecoderConfig(ridge_alpha=-1.0)


def test_nn_decoder_beats_the_mean(tmp_path):
    train_x, train_y = _synthetic(40, seed=10, nonlinear=True)
    test_x, test_y = _synthetic(8, seed=11, nonlinear=True)
    cfg = NNDecoderConfig(hidden=32, dilations=(1, 2, 4, 8), window_frames=64, batch_size=16,
                          lr=3e-3, max_steps=300, eval_every=25, patience=4, dropout=0.0, seed=0)
    dec = NNDecoder(cfg).fit(train_x, train_y)
    assert dec.history and dec.best_val_mse == min(h["val_mse"] for h in dec.history)
    pred = np.concatenate([dec.predict(x) for x in test_x], axis=1)
    true = np.concatenate(test_y, axis=1)
    mean_mel = np.concatenate(train_y, axis=1).mean(axis=1, keepdims=True)
    mse_nn = float(((pred - true) ** 2).mean())
    mse_mean = float(((mean_mel - true) ** 2).mean())
    # Measured 0.285 vs 0.727 (ratio 0.39) after 300 steps.
    assert mse_nn < 0.5 * mse_mean, (mse_nn, mse_mean)

    save_baseline(str(tmp_path), dec)
    again = load_baseline(str(tmp_path))
    assert isinstance(again, NNDecoder) and again.config == cfg
    np.testing.assert_array_equal(again.predict(test_x[0]), dec.predict(test_x[0]))
    with pytest.raises(CheckpointError, match="'kind' is 'baseline-nn'"):
        load_checkpoint(str(tmp_path), "baseline-linear")


def test_nn_decoder_config_checks():
    with pytest.raises(ConfigError, match="kernel=4 must be odd"):
        NNDecoderConfig(kernel=4)
    with pytest.raises(ValueError, match="need >= 2 trials"):
        NNDecoder(NNDecoderConfig(max_steps=1)).fit([np.zeros((10, 2))], [np.zeros((80, 10))])
