"""Direct regression baselines: neural features (T, C) -> mel (80, T), one trial at a time.

Two decoders share one interface (``fit(neural_list, mel_list)``, ``predict(neural) -> mel``,
``state_dict()`` / ``from_state_dict``, saved with :func:`save_baseline` / :func:`load_baseline`
as safetensors checkpoints):

- :class:`LinearDecoder`, the linear baseline of Verwoert et al. 2022 (Sci Data 9:454,
  "Dataset of speech production in intracranial electroencephalography", code
  ``neuralinterfacinglab/SingleWordProductionDutch``): z-score each channel with train statistics,
  stack a context of +-4 frames spaced 5 frames apart (-200 ... +200 ms at 100 frames/s; trials are
  edge-padded), PCA to 50 components fitted on the train frames, then ordinary least squares to the
  80 mel bins (``ridge_alpha`` > 0 switches to ridge regression). Their code z-scores the stacked
  columns instead of the channels; the two agree except in the 20 edge frames of each trial, and
  per-channel statistics keep the state small.
- :class:`NNDecoder`: the direct decoder DPS has to beat: a non-causal temporal convolution
  network (dilated residual blocks, per-frame LayerNorm, receptive field 101 frames = +-500 ms by
  default), on electrodes scaled robustly with TRAIN statistics (median and 1.4826 x MAD; flat,
  non-finite and outlier-scale electrodes dropped; scaled values clipped to +-10), trained with
  MSE on random windows, early-stopped on the validation mel PCC (best step's weights kept), the
  best of a small width x dropout grid chosen on the same score. ``OLD_NN_CONFIG`` reproduces the
  decoder it replaced (+-300 ms, mean/std scaling, GroupNorm, early stopping on validation MSE).

PCA and least squares come from scikit-learn (fitted in float64); prediction is the same affine
map written out in numpy from the stored arrays, so a checkpoint needs no scikit-learn objects
(and no pickle).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ssip.config import ConfigError, check_option, check_range, field
from ssip.mel import N_MELS

# ---------------------------------------------------------------------------------------------
# Shared helpers.


def _check_pairs(neural_list: Sequence[np.ndarray], mel_list: Sequence[np.ndarray], what: str,
                 finite_neural: bool = True) -> int:
    """Validate trials: neural (T_i, C), mel (80, T_i); returns C. NaN/inf is an error in the
    mels, and in the neural data unless ``finite_neural`` is False."""
    if len(neural_list) != len(mel_list):
        raise ValueError(f"{what}: {len(neural_list)} neural trials but {len(mel_list)} mels")
    if not neural_list:
        raise ValueError(f"{what}: no trials given")
    n_channels = None
    for i, (x, m) in enumerate(zip(neural_list, mel_list)):
        if x.ndim != 2 or m.ndim != 2 or m.shape[0] != N_MELS:
            raise ValueError(f"{what}: trial {i} has neural {x.shape} and mel {m.shape}; expected "
                             f"neural (T, C) and mel ({N_MELS}, T)")
        if x.shape[0] != m.shape[1]:
            raise ValueError(f"{what}: trial {i} has {x.shape[0]} neural frames but {m.shape[1]} mel "
                             f"frames; align both to 100 Hz frames first")
        if n_channels is None:
            n_channels = x.shape[1]
        elif x.shape[1] != n_channels:
            raise ValueError(f"{what}: trial {i} has {x.shape[1]} channels, trial 0 has {n_channels}")
        if not ((not finite_neural or np.all(np.isfinite(x))) and np.all(np.isfinite(m))):
            raise ValueError(f"{what}: trial {i} contains NaN or inf")
    return int(n_channels)


def _channel_stats(neural_list: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    cat = np.concatenate([np.asarray(x, dtype=np.float64) for x in neural_list], axis=0)  # (N, C)
    mean = cat.mean(axis=0)
    std = cat.std(axis=0)
    # A constant channel carries no information; scale 1 maps it to exactly zero.
    std = np.where(std > 1e-12, std, 1.0)
    return mean, std


def _to_numpy(v: Any) -> np.ndarray:
    return v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)


# ---------------------------------------------------------------------------------------------
# Linear decoder (Verwoert et al. 2022).


def context_offsets(frames: int = 4, step: int = 5) -> np.ndarray:
    """Frame offsets of the stacked context: -frames*step ... +frames*step in steps of ``step``."""
    return np.arange(-frames, frames + 1, dtype=np.int64) * step


def stack_context(x: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Stack shifted copies of a trial's features, edge-padded at both ends.

    Parameters
    ----------
    x : ndarray, shape (T, C)
    offsets : ndarray of int, shape (K,)
        Frame offsets (negative = past).

    Returns
    -------
    ndarray, shape (T, K * C)
        Row t is [x(t + offsets[0]), ..., x(t + offsets[K-1])], each clipped to [0, T-1].
    """
    t = x.shape[0]
    idx = np.clip(np.arange(t)[:, None] + np.asarray(offsets)[None, :], 0, t - 1)  # (T, K)
    return x[idx].reshape(t, -1)


@dataclass
class LinearDecoderConfig:
    """Verwoert et al. 2022 linear baseline."""

    n_components: int = field(50, help="PCA components kept (capped by the stacked feature count)")
    context_frames: int = field(4, help="context frames on each side of the current one")
    context_step: int = field(5, help="spacing of the context frames, in 10 ms frames")
    ridge_alpha: float = field(0.0, help="0: ordinary least squares (as published); > 0: ridge "
                               "penalty on the regression from PCA scores to mel")

    def __post_init__(self) -> None:
        check_range("n_components", self.n_components, 1, None)
        check_range("context_frames", self.context_frames, 0, None)
        check_range("context_step", self.context_step, 1, None)
        check_range("ridge_alpha", self.ridge_alpha, 0.0, None)


class LinearDecoder:
    """z-score -> context stacking -> PCA -> linear regression to 80 mel bins.

    Attributes (after ``fit``; all float64 except ``offsets``)
    ----------------------------------------------------------
    channel_mean, channel_std : (C,)
    offsets : (K,) int64
    pca_mean : (K*C,)
    pca_components : (n_components, K*C)
    coef : (80, n_components)
    intercept : (80,)
    """

    KIND = "baseline-linear"

    def __init__(self, config: LinearDecoderConfig | None = None):
        self.config = config or LinearDecoderConfig()
        self.arrays: dict[str, np.ndarray] = {}
        self.n_channels: int | None = None

    def _features(self, neural: np.ndarray) -> np.ndarray:
        a = self.arrays
        z = (np.asarray(neural, dtype=np.float64) - a["channel_mean"]) / a["channel_std"]
        return stack_context(z, a["offsets"])  # (T, K*C)

    def fit(self, neural_list: Sequence[np.ndarray], mel_list: Sequence[np.ndarray]) -> LinearDecoder:
        """Fit on training trials: neural (T_i, C) and mel (80, T_i) per trial. Returns self."""
        from sklearn.decomposition import PCA
        from sklearn.linear_model import LinearRegression, Ridge

        n_channels = _check_pairs(neural_list, mel_list, "LinearDecoder.fit")
        cfg = self.config
        mean, std = _channel_stats(neural_list)
        self.arrays = {"channel_mean": mean, "channel_std": std,
                       "offsets": context_offsets(cfg.context_frames, cfg.context_step)}
        x = np.concatenate([self._features(n) for n in neural_list], axis=0)  # (N, K*C)
        y = np.concatenate([np.asarray(m, dtype=np.float64).T for m in mel_list], axis=0)  # (N, 80)
        n_comp = min(cfg.n_components, x.shape[1], x.shape[0])
        # "full" SVD: deterministic and exact (the "auto" choice goes randomized above 500 columns).
        pca = PCA(n_components=n_comp, svd_solver="full").fit(x)
        scores = pca.transform(x)  # (N, n_comp)
        reg = Ridge(alpha=cfg.ridge_alpha) if cfg.ridge_alpha > 0 else LinearRegression()
        reg.fit(scores, y)
        self.arrays.update(pca_mean=pca.mean_.astype(np.float64),
                           pca_components=pca.components_.astype(np.float64),
                           coef=np.asarray(reg.coef_, dtype=np.float64),
                           intercept=np.asarray(reg.intercept_, dtype=np.float64))
        self.n_channels = n_channels
        return self

    def predict(self, neural: np.ndarray) -> np.ndarray:
        """Mel of one trial: neural (T, C) -> (80, T), float32."""
        if not self.arrays:
            raise RuntimeError("LinearDecoder.predict: call fit() or from_state_dict() first")
        a = self.arrays
        if neural.ndim != 2 or neural.shape[1] != a["channel_mean"].shape[0]:
            raise ValueError(f"LinearDecoder.predict: neural has shape {neural.shape}; expected "
                             f"(T, {a['channel_mean'].shape[0]})")
        scores = (self._features(neural) - a["pca_mean"]) @ a["pca_components"].T  # (T, n_comp)
        return (scores @ a["coef"].T + a["intercept"]).T.astype(np.float32)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The fitted arrays as CPU tensors (float64; offsets int64), for safetensors."""
        if not self.arrays:
            raise RuntimeError("LinearDecoder.state_dict: the decoder is not fitted")
        return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in self.arrays.items()}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any],
                        config: LinearDecoderConfig | Mapping[str, Any] | None = None) -> LinearDecoder:
        keys = {"channel_mean", "channel_std", "offsets", "pca_mean", "pca_components", "coef", "intercept"}
        missing = sorted(keys - set(state))
        if missing:
            raise ValueError(f"LinearDecoder.from_state_dict: missing tensor(s) {missing}")
        if isinstance(config, Mapping):
            config = LinearDecoderConfig(**config)
        dec = cls(config)
        dec.arrays = {k: _to_numpy(state[k]).astype(np.int64 if k == "offsets" else np.float64)
                      for k in keys}
        dec.n_channels = int(dec.arrays["channel_mean"].shape[0])
        return dec


# ---------------------------------------------------------------------------------------------
# Neural-network decoder.

#: MAD of a Gaussian times this is its standard deviation.
MAD_TO_STD = 1.4826
#: Options of NNDecoderConfig.scaling / .norm / .select_on.
NN_SCALINGS = ("robust", "zscore")
NN_NORMS = ("layer", "group")
NN_SELECT = ("pcc", "mse")
#: Hyperparameters of the decoder that issue #22 replaced ("old nn"), for comparisons:
#: ``NNDecoderConfig(**OLD_NN_CONFIG)`` trains that network the way it was trained (one config,
#: mean/std scaling of every channel, no clipping, GroupNorm, early stopping on validation MSE).
OLD_NN_CONFIG: dict[str, Any] = {
    "hidden": 64, "dropout": 0.1, "kernel": 5, "dilations": (1, 2, 4, 8), "norm": "group",
    "window_frames": 128, "scaling": "zscore", "clip_z": 0.0, "select_on": "mse"}


def receptive_field(kernel: int, dilations: Sequence[int]) -> int:
    """Receptive field in frames of :class:`TemporalConvNet`: ``1 + (kernel - 1) * sum(dilations)``.

    Each residual block has one centred dilated convolution (the other one is 1x1), which widens
    the field by ``(kernel - 1) * dilation`` frames, half on each side; the field is symmetric,
    ``(kernel - 1) * sum(dilations) / 2`` frames into the past and as many into the future.
    """
    return 1 + (int(kernel) - 1) * int(sum(dilations))


def _as_tuple(value: Any, kind: type) -> tuple:
    if isinstance(value, list | tuple):
        return tuple(kind(v) for v in value)
    return (kind(value),)


@dataclass
class NNDecoderConfig:
    """Temporal conv net regressor: neural (B, C, T) -> mel (B, 80, T).

    ``hidden`` and ``dropout`` may be lists: every (hidden, dropout) pair is trained with early
    stopping and the one with the best validation score (``select_on``) is kept; all scores are
    saved with the model (:attr:`NNDecoder.grid_results`).
    """

    hidden: int | tuple[int, ...] = field((64, 128), help="conv width; a list is a grid axis "
                                          "(every hidden x dropout pair is trained, the best on "
                                          "validation kept)")
    dropout: float | tuple[float, ...] = field((0.1, 0.3), help="dropout inside the residual "
                                               "blocks; a list is a grid axis (see hidden)")
    kernel: int = field(5, help="temporal kernel size of the dilated convolutions (odd)")
    dilations: tuple[int, ...] = field((1, 2, 4, 8, 10), help="one residual block per dilation; "
                                       "receptive field = 1 + (kernel - 1) * sum(dilations) "
                                       "frames, centred (default 101 frames: +-500 ms at 100 Hz)")
    norm: str = field("layer", help="normalisation in the blocks: 'layer' (over channels, each "
                                    "frame on its own: the same at train and test time whatever "
                                    "the window) or 'group' (GroupNorm over channels and time, "
                                    "the old nn)")
    scaling: str = field("robust", help="per-electrode input scaling from the TRAIN frames: "
                                        "'robust' (median and 1.4826 x MAD; flat, non-finite and "
                                        "outlier-scale electrodes dropped, see "
                                        "bad_channel_factor) or 'zscore' (mean and std, every "
                                        "electrode kept: the old nn)")
    bad_channel_factor: float = field(10.0, help="scaling=robust: drop an electrode whose robust "
                                                 "scale is more than this factor above or below "
                                                 "the median electrode's (0: keep outliers; flat "
                                                 "and non-finite electrodes are dropped anyway)")
    clip_z: float = field(10.0, help="clip the scaled inputs to +-clip_z so that one exploding "
                                     "electrode cannot dominate (0: no clipping)")
    lr: float = field(1e-3, help="AdamW learning rate")
    weight_decay: float = field(1e-4, help="AdamW weight decay")
    batch_size: int = field(16, help="windows per step")
    window_frames: int = field(256, help="training window length in frames (shorter trials are "
                                         "padded and masked)")
    max_steps: int = field(3000, help="upper bound on optimizer steps per grid config")
    eval_every: int = field(50, help="validate every this many steps")
    patience: int = field(6, help="stop after this many validations without improvement")
    select_on: str = field("pcc", help="validation score that picks the step (early stopping) "
                                       "and the grid config: 'pcc' (mel PCC, "
                                       "ssip.metrics.mel_pcc over the concatenated "
                                       "validation frames) or 'mse' (standardised mel MSE: the "
                                       "old nn)")
    val_speech_only: bool = field(True, help="score the validation PCC on the reference's speech "
                                             "frames only, as ssip evaluate does (all frames "
                                             "when fewer than 3 are speech)")
    val_fraction: float = field(0.2, help="fraction of the fit() trials held out for early "
                                          "stopping when no explicit validation trials are given")
    seed: int = field(0, help="seed of initialisation, window sampling and dropout (the same "
                              "for every grid config)")

    def __post_init__(self) -> None:
        self.hidden = _as_tuple(self.hidden, int)
        self.dropout = _as_tuple(self.dropout, float)
        self.dilations = tuple(int(d) for d in self.dilations)
        if not self.hidden or min(self.hidden) < 1:
            raise ConfigError(f"hidden={self.hidden} must be an int >= 1 or a non-empty list of them")
        if not self.dropout or not all(0.0 <= d <= 0.9 for d in self.dropout):
            raise ConfigError(f"dropout={self.dropout} must be in [0, 0.9] (or a non-empty list "
                              f"of such)")
        check_range("kernel", self.kernel, 1, None)
        if self.kernel % 2 == 0:
            raise ConfigError(f"kernel={self.kernel} must be odd (a centred, non-causal filter)")
        if not self.dilations or min(self.dilations) < 1:
            raise ConfigError(f"dilations={self.dilations} must be a non-empty list of ints >= 1")
        check_option("norm", self.norm, NN_NORMS)
        check_option("scaling", self.scaling, NN_SCALINGS)
        check_option("select_on", self.select_on, NN_SELECT)
        check_range("bad_channel_factor", self.bad_channel_factor, 0.0, None)
        if 0 < self.bad_channel_factor <= 1:
            raise ConfigError(f"bad_channel_factor={self.bad_channel_factor} must be 0 (off) or "
                              f"> 1")
        check_range("clip_z", self.clip_z, 0.0, None)
        check_range("lr", self.lr, 0.0, 1.0)
        check_range("weight_decay", self.weight_decay, 0.0, None)
        check_range("batch_size", self.batch_size, 1, None)
        check_range("window_frames", self.window_frames, 1, None)
        check_range("max_steps", self.max_steps, 1, None)
        check_range("eval_every", self.eval_every, 1, None)
        check_range("patience", self.patience, 1, None)
        check_range("val_fraction", self.val_fraction, 0.0, 0.9)

    @property
    def receptive_field(self) -> int:
        """Receptive field of the network in frames (see :func:`receptive_field`)."""
        return receptive_field(self.kernel, self.dilations)

    def grid(self) -> list[tuple[int, float]]:
        """The (hidden, dropout) pairs trained by :meth:`NNDecoder.fit`, in order."""
        return [(h, d) for h in self.hidden for d in self.dropout]


def robust_channel_scaling(neural_list: Sequence[np.ndarray], bad_channel_factor: float = 10.0
                           ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, list[int]]]:
    """Per-electrode median and robust scale (1.4826 x MAD) over the given frames, and bad
    electrodes.

    Parameters
    ----------
    neural_list : sequence of ndarray, shape (T_i, C)
        Training trials (may contain NaN/inf: such electrodes are dropped).
    bad_channel_factor : float
        An electrode whose scale is above ``factor`` times or below ``1 / factor`` times the
        median scale of the usable electrodes is dropped; 0 keeps them.

    Returns
    -------
    center, scale : ndarray (C,) float64
        Median and robust scale; 0 and 1 for dropped electrodes.
    keep : ndarray (C,) bool
    bad : dict
        Dropped electrode indices by reason: ``nonfinite``, ``flat`` (MAD ~ 0), ``outlier``.
    """
    cat = np.concatenate([np.asarray(x, dtype=np.float64) for x in neural_list], axis=0)  # (N, C)
    finite = np.isfinite(cat).all(axis=0)
    safe = np.where(finite[None, :], cat, 0.0)
    center = np.median(safe, axis=0)
    scale = np.median(np.abs(safe - center), axis=0) * MAD_TO_STD
    ref_pool = scale[finite & (scale > 0)]
    ref = float(np.median(ref_pool)) if ref_pool.size else 0.0
    flat = finite & (scale <= max(1e-12, 1e-6 * ref))
    outlier = np.zeros_like(finite)
    usable = finite & ~flat
    if bad_channel_factor > 0 and usable.any():
        ref = float(np.median(scale[usable]))
        outlier = usable & ((scale > bad_channel_factor * ref) | (scale < ref / bad_channel_factor))
    keep = usable & ~outlier
    center = np.where(keep, center, 0.0)
    scale = np.where(keep, scale, 1.0)
    bad = {"nonfinite": np.flatnonzero(~finite).tolist(), "flat": np.flatnonzero(flat).tolist(),
           "outlier": np.flatnonzero(outlier).tolist()}
    return center, scale, keep, bad


class _ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels of each frame of (B, C, T)."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = nn.LayerNorm(ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.transpose(1, 2)).transpose(1, 2)


def _norm(kind: str, ch: int) -> nn.Module:
    return _ChannelLayerNorm(ch) if kind == "layer" else nn.GroupNorm(min(8, ch), ch)


class _Block(nn.Module):
    def __init__(self, ch: int, kernel: int, dilation: int, dropout: float, norm: str):
        super().__init__()
        self.norm1 = _norm(norm, ch)
        self.conv1 = nn.Conv1d(ch, ch, kernel, dilation=dilation, padding=dilation * (kernel - 1) // 2)
        self.norm2 = _norm(norm, ch)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv1d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return x + self.conv2(self.drop(F.silu(self.norm2(h))))


class TemporalConvNet(nn.Module):
    """(B, C, T) scaled neural -> (B, 80, T) standardised mel: a 1x1 input projection, one
    pre-norm residual block per dilation (norm, SiLU, centred dilated conv, norm, SiLU, dropout,
    1x1 conv), norm, SiLU, 1x1 output. Receptive field: :func:`receptive_field` frames."""

    def __init__(self, n_channels: int, hidden: int, kernel: int, dilations: Sequence[int],
                 dropout: float, norm: str = "layer", n_mels: int = N_MELS):
        super().__init__()
        self.inp = nn.Conv1d(n_channels, hidden, 1)
        self.blocks = nn.ModuleList(_Block(hidden, kernel, d, dropout, norm) for d in dilations)
        self.norm = _norm(norm, hidden)
        self.out = nn.Conv1d(hidden, n_mels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)  # (B, hidden, T)
        for block in self.blocks:
            h = block(h)
        return self.out(F.silu(self.norm(h)))  # (B, 80, T)


#: Tensors of an NNDecoder state besides the network's own (``net.*``).
_NN_ARRAYS = ("channel_mask", "in_center", "in_scale", "out_mean", "out_std", "noise_std",
              "grid_hidden", "grid_dropout", "grid_val_pcc", "grid_val_mse", "grid_best_step",
              "grid_choice", "val_step", "val_pcc", "val_mse", "train_mse")


class NNDecoder:
    """Temporal conv net baseline with the :class:`LinearDecoder` interface.

    ``fit`` scales each electrode with statistics of the TRAIN trials (``scaling``), drops bad
    electrodes, clips the scaled inputs, and trains one network per grid config (``hidden`` x
    ``dropout``) with AdamW on random windows (masked MSE on standardised mels), validating every
    ``eval_every`` steps and keeping the weights of the best validation step; the config with the
    best validation score wins.

    Attributes (after ``fit`` or ``from_state_dict``)
    -------------------------------------------------
    net : TemporalConvNet
        The chosen network (inputs: the kept electrodes).
    arrays : dict of ndarray
        ``channel_mask`` (C,) bool, ``in_center``/``in_scale`` (C,), ``out_mean``/``out_std``
        (80,), ``noise_std`` (80,) (per-bin RMS error of the chosen network on the validation
        frames, in mel units: the pseudo-measurement noise of DecodeConfig evidence 'nn'), the
        grid table ``grid_*`` and the chosen config's validation curve ``val_*``/``train_mse``.
    grid_results : list of dict
        Per grid config: ``hidden``, ``dropout``, ``val_pcc``, ``val_mse``, ``best_step``,
        ``chosen``.
    history : list of dict
        The chosen config's validations: ``step``, ``train_mse``, ``val_mse``, ``val_pcc``.
    best_val_pcc, best_val_mse : float
        The chosen config's scores at the kept step.
    """

    KIND = "baseline-nn"

    def __init__(self, config: NNDecoderConfig | None = None):
        self.config = config or NNDecoderConfig()
        self.net: TemporalConvNet | None = None
        self.arrays: dict[str, np.ndarray] = {}
        self.history: list[dict[str, float]] = []
        self.grid_results: list[dict[str, Any]] = []
        self.bad_channels: dict[str, list[int]] = {}  # set by fit (not saved: see channel_mask)
        self.n_channels: int | None = None

    # -- inputs ----------------------------------------------------------------------------

    def _scale_inputs(self, neural: np.ndarray) -> np.ndarray:
        """Raw (T, C) -> scaled kept electrodes (T, C_kept) float32, clipped to +-clip_z.

        NaN in a kept electrode becomes 0 (its median), +-inf the clip bound (or 0 unclipped)."""
        a, clip = self.arrays, self.config.clip_z
        keep = a["channel_mask"]
        x = np.asarray(neural, dtype=np.float64)[:, keep]
        z = (x - a["in_center"][keep]) / a["in_scale"][keep]
        if not np.isfinite(z).all():
            z = np.nan_to_num(z, nan=0.0, posinf=clip, neginf=-clip)
        if clip > 0:
            z = np.clip(z, -clip, clip)
        return z.astype(np.float32)

    def _fit_scaling(self, neural_list: Sequence[np.ndarray], n_channels: int) -> None:
        cfg = self.config
        if cfg.scaling == "robust":
            center, scale, keep, bad = robust_channel_scaling(neural_list, cfg.bad_channel_factor)
        else:
            center, scale = _channel_stats(neural_list)
            keep = np.ones(n_channels, dtype=bool)
            bad = {"nonfinite": [], "flat": [], "outlier": []}
        if not keep.any():
            raise ValueError(f"NNDecoder.fit: every electrode is bad ({bad}); nothing to decode "
                             f"from")
        self.arrays = {"channel_mask": keep, "in_center": center, "in_scale": scale}
        self.bad_channels = bad

    # -- training --------------------------------------------------------------------------

    def _windows(self, xs: list[np.ndarray], ys: list[np.ndarray], rng: np.random.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # Random crops of window_frames; trials shorter than that are zero-padded (zero is the
        # centre after scaling) and masked out of the loss.
        cfg = self.config
        w = cfg.window_frames
        lengths = np.array([x.shape[0] for x in xs], dtype=np.float64)
        which = rng.choice(len(xs), size=cfg.batch_size, p=lengths / lengths.sum())
        xb = np.zeros((cfg.batch_size, xs[0].shape[1], w), dtype=np.float32)
        yb = np.zeros((cfg.batch_size, N_MELS, w), dtype=np.float32)
        mask = np.zeros((cfg.batch_size, 1, w), dtype=np.float32)
        for i, k in enumerate(which):
            t = xs[k].shape[0]
            start = int(rng.integers(0, max(t - w, 0) + 1))
            n = min(w, t)
            xb[i, :, :n] = xs[k][start : start + n].T
            yb[i, :, :n] = ys[k][:, start : start + n]
            mask[i, :, :n] = 1.0
        return torch.from_numpy(xb), torch.from_numpy(yb), torch.from_numpy(mask)

    @torch.no_grad()
    def _validate(self, net: TemporalConvNet, vxs: list[np.ndarray], vys: list[np.ndarray],
                  v_mel: np.ndarray) -> tuple[float, float, np.ndarray]:
        """(mel PCC, standardised MSE, predicted mel (80, N)) over the concatenated val frames."""
        from ssip.metrics import mel_pcc

        net.eval()
        preds = [net(torch.from_numpy(x.T[None]))[0].numpy() for x in vxs]  # (80, T_i) each
        pz = np.concatenate(preds, axis=1).astype(np.float64)
        mse = float(np.mean((pz - np.concatenate(vys, axis=1)) ** 2))
        a = self.arrays
        pred = pz * a["out_std"][:, None] + a["out_mean"][:, None]
        pcc = mel_pcc(pred, v_mel, speech_only=self.config.val_speech_only)
        if np.isnan(pcc) and self.config.val_speech_only:
            pcc = mel_pcc(pred, v_mel, speech_only=False)
        return float(pcc), mse, pred

    def _train_one(self, hidden: int, dropout: float, xs, ys, vxs, vys, v_mel) -> dict[str, Any]:
        cfg = self.config
        rng = np.random.default_rng(cfg.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            net = TemporalConvNet(xs[0].shape[1], hidden, cfg.kernel, cfg.dilations, dropout,
                                  cfg.norm)
            opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
            sign = 1.0 if cfg.select_on == "pcc" else -1.0  # larger score = better
            best, best_state, best_i, bad, train_acc = -np.inf, None, -1, 0, []
            history: list[dict[str, float]] = []
            for step in range(1, cfg.max_steps + 1):
                net.train()
                xb, yb, mask = self._windows(xs, ys, rng)
                # Masked MSE over valid frames.
                loss = (((net(xb) - yb) ** 2) * mask).sum() / (mask.sum() * N_MELS)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"NNDecoder.fit: loss is {loss.item()} at step {step} "
                                             f"(hidden={hidden}, dropout={dropout}); lower lr "
                                             f"(now {cfg.lr})")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                train_acc.append(loss.item())
                if step % cfg.eval_every == 0 or step == cfg.max_steps:
                    pcc, mse, _ = self._validate(net, vxs, vys, v_mel)
                    history.append({"step": step, "train_mse": float(np.mean(train_acc)),
                                    "val_mse": mse, "val_pcc": pcc})
                    train_acc = []
                    score = sign * (pcc if cfg.select_on == "pcc" else mse)
                    if np.isnan(score):
                        raise ValueError("NNDecoder.fit: the validation PCC is NaN (every "
                                         "validation mel bin is constant); give other "
                                         "validation trials")
                    if score > best:
                        best, best_i, bad = score, len(history) - 1, 0
                        best_state = copy.deepcopy(net.state_dict())
                    else:
                        bad += 1
                        if bad >= cfg.patience:
                            break
        assert best_state is not None
        net.load_state_dict(best_state)
        net.eval()
        return {"net": net, "history": history, "best_index": best_i}

    def fit(self, neural_list: Sequence[np.ndarray], mel_list: Sequence[np.ndarray],
            val_neural: Sequence[np.ndarray] | None = None,
            val_mel: Sequence[np.ndarray] | None = None) -> NNDecoder:
        """Train on trials (neural (T_i, C), mel (80, T_i)); early-stop and pick the grid config
        on the validation trials (the ``val`` split; never test).

        Without ``val_neural``/``val_mel`` the last ``val_fraction`` of the given trials (at least
        one) are held out for validation. Scaling statistics come from the training trials only.
        Neural values may be NaN/inf only in electrodes that scaling=robust drops. Returns self.
        """
        cfg = self.config
        n_channels = _check_pairs(neural_list, mel_list, "NNDecoder.fit",
                                  finite_neural=cfg.scaling != "robust")
        neural_list, mel_list = list(neural_list), list(mel_list)
        if val_neural is None or val_mel is None:
            if len(neural_list) < 2:
                raise ValueError("NNDecoder.fit: need >= 2 trials to hold one out for early stopping")
            n_val = max(1, int(round(cfg.val_fraction * len(neural_list))))
            val_neural, val_mel = neural_list[-n_val:], mel_list[-n_val:]
            neural_list, mel_list = neural_list[:-n_val], mel_list[:-n_val]
        elif _check_pairs(val_neural, val_mel, "NNDecoder.fit (validation)",
                          finite_neural=cfg.scaling != "robust") != n_channels:
            raise ValueError("NNDecoder.fit: validation trials have another channel count")
        self._fit_scaling(neural_list, n_channels)
        y_cat = np.concatenate([np.asarray(m, dtype=np.float64) for m in mel_list], axis=1)  # (80, N)
        out_mean = y_cat.mean(axis=1)
        out_std = np.maximum(y_cat.std(axis=1), 1e-6)
        self.arrays.update(out_mean=out_mean, out_std=out_std)

        def standardise(xs, ys):
            return ([self._scale_inputs(x) for x in xs],
                    [((np.asarray(y, np.float64) - out_mean[:, None]) / out_std[:, None]).astype(np.float32)
                     for y in ys])

        xs, ys = standardise(neural_list, mel_list)
        vxs, vys = standardise(val_neural, val_mel)
        v_mel = np.concatenate([np.asarray(m, dtype=np.float64) for m in val_mel], axis=1)
        runs = [self._train_one(h, d, xs, ys, vxs, vys, v_mel) for h, d in cfg.grid()]
        bests = [r["history"][r["best_index"]] for r in runs]
        key = "val_pcc" if cfg.select_on == "pcc" else "val_mse"
        scores = np.array([b[key] for b in bests]) * (1.0 if cfg.select_on == "pcc" else -1.0)
        choice = int(np.argmax(scores))  # first of equals
        run = runs[choice]
        self.net, self.history = run["net"], run["history"]
        _, _, pred = self._validate(self.net, vxs, vys, v_mel)
        noise_std = np.sqrt(np.mean((pred - v_mel) ** 2, axis=1))
        grid = cfg.grid()
        self.arrays.update(
            noise_std=noise_std,
            grid_hidden=np.array([h for h, _ in grid], dtype=np.int64),
            grid_dropout=np.array([d for _, d in grid], dtype=np.float64),
            grid_val_pcc=np.array([b["val_pcc"] for b in bests], dtype=np.float64),
            grid_val_mse=np.array([b["val_mse"] for b in bests], dtype=np.float64),
            grid_best_step=np.array([b["step"] for b in bests], dtype=np.int64),
            grid_choice=np.array([choice], dtype=np.int64),
            **{k: np.array([h[k] for h in self.history], dtype=np.float64)
               for k in ("val_pcc", "val_mse", "train_mse")},
            val_step=np.array([h["step"] for h in self.history], dtype=np.int64))
        self.n_channels = n_channels
        self._summarise()
        return self

    def _summarise(self) -> None:
        """grid_results, history and best scores from self.arrays."""
        a = self.arrays
        choice = int(a["grid_choice"][0])
        self.grid_results = [
            {"hidden": int(h), "dropout": float(d), "val_pcc": float(p), "val_mse": float(m),
             "best_step": int(s), "chosen": i == choice}
            for i, (h, d, p, m, s) in enumerate(zip(a["grid_hidden"], a["grid_dropout"],
                                                    a["grid_val_pcc"], a["grid_val_mse"],
                                                    a["grid_best_step"]))]
        self.history = [{"step": int(s), "train_mse": float(t), "val_mse": float(m),
                         "val_pcc": float(p)}
                        for s, t, m, p in zip(a["val_step"], a["train_mse"], a["val_mse"],
                                              a["val_pcc"])]
        self.best_val_pcc = float(a["grid_val_pcc"][choice])
        self.best_val_mse = float(a["grid_val_mse"][choice])
        self.best_step = int(a["grid_best_step"][choice])

    @property
    def noise_std(self) -> np.ndarray | None:
        """Per-bin RMS validation error (80,) of the chosen network, mel units (None unfitted)."""
        return self.arrays.get("noise_std")

    @noise_std.setter
    def noise_std(self, value: np.ndarray) -> None:
        self.arrays["noise_std"] = np.asarray(value, dtype=np.float64).reshape(N_MELS)

    def summary(self) -> dict[str, Any]:
        """JSON-ready description of the fit (saved in the checkpoint manifest's ``extra``)."""
        if self.net is None:
            raise RuntimeError("NNDecoder.summary: the decoder is not fitted")
        keep = self.arrays["channel_mask"]
        choice = next(r for r in self.grid_results if r["chosen"])
        return {"grid": self.grid_results, "chosen": {"hidden": choice["hidden"],
                                                      "dropout": choice["dropout"]},
                "best_val_pcc": self.best_val_pcc, "best_val_mse": self.best_val_mse,
                "best_step": self.best_step, "receptive_field_frames": self.config.receptive_field,
                "n_channels": int(keep.size), "dropped_channels": np.flatnonzero(~keep).tolist()}

    # -- inference and state ---------------------------------------------------------------

    @torch.no_grad()
    def predict(self, neural: np.ndarray) -> np.ndarray:
        """Mel of one trial: neural (T, C) -> (80, T), float32."""
        if self.net is None:
            raise RuntimeError("NNDecoder.predict: call fit() or from_state_dict() first")
        self.net.eval()
        c = self.arrays["channel_mask"].shape[0]
        if neural.ndim != 2 or neural.shape[1] != c:
            raise ValueError(f"NNDecoder.predict: neural has shape {neural.shape}; expected (T, {c})")
        x = torch.from_numpy(self._scale_inputs(neural).T[None])  # (1, C_kept, T)
        z = self.net(x)[0].numpy().astype(np.float64)
        a = self.arrays
        return (z * a["out_std"][:, None] + a["out_mean"][:, None]).astype(np.float32)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Network weights (``net.*``) and the arrays above, as CPU tensors (no pickle)."""
        if self.net is None:
            raise RuntimeError("NNDecoder.state_dict: the decoder is not fitted")
        out = {f"net.{k}": v.detach().clone() for k, v in self.net.state_dict().items()}
        for k in _NN_ARRAYS:
            v = self.arrays[k]
            out[k] = torch.from_numpy(np.ascontiguousarray(v.astype(np.uint8) if v.dtype == bool
                                                          else v))
        return out

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any],
                        config: NNDecoderConfig | Mapping[str, Any] | None = None) -> NNDecoder:
        """Rebuild from :meth:`state_dict` and the config it was trained with."""
        if isinstance(config, Mapping):
            config = NNDecoderConfig(**config)
        dec = cls(config)
        missing = sorted({"net.inp.weight", *_NN_ARRAYS} - set(state))
        if missing:
            raise ValueError(f"NNDecoder.from_state_dict: tensor(s) {missing} missing; not an "
                             f"NNDecoder state (or one saved before the issue #22 rewrite)")
        a = {k: _to_numpy(state[k]) for k in _NN_ARRAYS}
        a["channel_mask"] = a["channel_mask"].astype(bool)
        dec.arrays = a
        choice = int(a["grid_choice"][0])
        cfg = dec.config
        w = state["net.inp.weight"]
        dec.net = TemporalConvNet(int(w.shape[1]), int(w.shape[0]), cfg.kernel, cfg.dilations,
                                  float(a["grid_dropout"][choice]), cfg.norm)
        dec.net.load_state_dict({k[4:]: torch.as_tensor(_to_numpy(v)) for k, v in state.items()
                                 if k.startswith("net.")})
        dec.net.eval()
        dec.n_channels = int(a["channel_mask"].shape[0])
        dec._summarise()
        return dec

# ---------------------------------------------------------------------------------------------
# Checkpoints.


def save_baseline(directory: str, decoder: LinearDecoder | NNDecoder,
                  extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Save a fitted decoder as a safetensors checkpoint (kind ``baseline-linear``/``baseline-nn``);
    an NNDecoder's :meth:`NNDecoder.summary` (grid scores, chosen config, dropped electrodes) goes
    into the manifest's ``extra``."""
    from ssip.models.checkpoint import save_checkpoint

    summary = decoder.summary() if isinstance(decoder, NNDecoder) else {}
    manifest = {"kind": decoder.KIND, "config": dataclasses.asdict(decoder.config),
                "extra": {**summary, **dict(extra or {})}}
    return save_checkpoint(directory, decoder.state_dict(), manifest)


def load_baseline(directory: str) -> LinearDecoder | NNDecoder:
    """Load a decoder saved by :func:`save_baseline`; refuses other kinds and mel versions."""
    from ssip.models.checkpoint import load_checkpoint

    state, manifest = load_checkpoint(directory, (LinearDecoder.KIND, NNDecoder.KIND))
    cls = LinearDecoder if manifest["kind"] == LinearDecoder.KIND else NNDecoder
    return cls.from_state_dict(state, manifest.get("config") or None)
