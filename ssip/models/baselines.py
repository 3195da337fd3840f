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
- :class:`NNDecoder`: a small non-causal temporal convolution network (dilated residual blocks,
  receptive field about +-300 ms) trained with MSE on random windows of the train trials and
  early-stopped on a validation split.

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

from ssip.config import ConfigError, check_range, field
from ssip.mel import N_MELS

# ---------------------------------------------------------------------------------------------
# Shared helpers.


def _check_pairs(neural_list: Sequence[np.ndarray], mel_list: Sequence[np.ndarray], what: str) -> int:
    """Validate trials: neural (T_i, C), mel (80, T_i); returns C."""
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
        if not (np.all(np.isfinite(x)) and np.all(np.isfinite(m))):
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


@dataclass
class NNDecoderConfig:
    """Temporal conv net regressor: neural (B, C, T) -> mel (B, 80, T)."""

    hidden: int = field(64, help="channels of the conv net")
    kernel: int = field(5, help="temporal kernel size of the dilated convolutions (odd)")
    dilations: tuple[int, ...] = field((1, 2, 4, 8), help="one residual block per dilation; "
                                       "receptive field = 1 + (kernel - 1) * sum(dilations) frames")
    dropout: float = field(0.1, help="dropout inside the residual blocks")
    lr: float = field(1e-3, help="AdamW learning rate")
    weight_decay: float = field(1e-4, help="AdamW weight decay")
    batch_size: int = field(16, help="windows per step")
    window_frames: int = field(128, help="training window length in frames (shorter trials are "
                                         "padded and masked)")
    max_steps: int = field(3000, help="upper bound on optimizer steps")
    eval_every: int = field(50, help="validate every this many steps")
    patience: int = field(6, help="stop after this many validations without improvement")
    val_fraction: float = field(0.2, help="fraction of the fit() trials held out for early "
                                          "stopping when no explicit validation trials are given")
    seed: int = field(0, help="seed of initialisation, window sampling and dropout")

    def __post_init__(self) -> None:
        self.dilations = tuple(int(d) for d in self.dilations)
        check_range("hidden", self.hidden, 1, None)
        check_range("kernel", self.kernel, 1, None)
        if self.kernel % 2 == 0:
            raise ConfigError(f"kernel={self.kernel} must be odd (a centred, non-causal filter)")
        if not self.dilations or min(self.dilations) < 1:
            raise ConfigError(f"dilations={self.dilations} must be a non-empty list of ints >= 1")
        check_range("dropout", self.dropout, 0.0, 0.9)
        check_range("lr", self.lr, 0.0, 1.0)
        check_range("weight_decay", self.weight_decay, 0.0, None)
        check_range("batch_size", self.batch_size, 1, None)
        check_range("window_frames", self.window_frames, 1, None)
        check_range("max_steps", self.max_steps, 1, None)
        check_range("eval_every", self.eval_every, 1, None)
        check_range("patience", self.patience, 1, None)
        check_range("val_fraction", self.val_fraction, 0.0, 0.9)


class _Block(nn.Module):
    def __init__(self, ch: int, kernel: int, dilation: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(min(8, ch), ch)
        self.conv1 = nn.Conv1d(ch, ch, kernel, dilation=dilation, padding=dilation * (kernel - 1) // 2)
        self.norm2 = nn.GroupNorm(min(8, ch), ch)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv1d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return x + self.conv2(self.drop(F.silu(self.norm2(h))))


class TemporalConvNet(nn.Module):
    """(B, C, T) z-scored neural -> (B, 80, T) mel, with the normalisation kept as buffers.

    ``forward`` maps standardised inputs to standardised mels; :meth:`decode` applies the stored
    input z-score and output de-standardisation around it.
    """

    def __init__(self, n_channels: int, cfg: NNDecoderConfig, n_mels: int = N_MELS):
        super().__init__()
        self.inp = nn.Conv1d(n_channels, cfg.hidden, 1)
        self.blocks = nn.ModuleList(_Block(cfg.hidden, cfg.kernel, d, cfg.dropout) for d in cfg.dilations)
        self.norm = nn.GroupNorm(min(8, cfg.hidden), cfg.hidden)
        self.out = nn.Conv1d(cfg.hidden, n_mels, 1)
        self.register_buffer("in_mean", torch.zeros(n_channels))
        self.register_buffer("in_std", torch.ones(n_channels))
        self.register_buffer("out_mean", torch.zeros(n_mels))
        self.register_buffer("out_std", torch.ones(n_mels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)  # (B, hidden, T)
        for block in self.blocks:
            h = block(h)
        return self.out(F.silu(self.norm(h)))  # (B, 80, T)

    def decode(self, neural: torch.Tensor) -> torch.Tensor:
        """Raw neural (B, C, T) -> mel (B, 80, T) in ssip mel units."""
        z = (neural - self.in_mean[:, None]) / self.in_std[:, None]
        return self(z) * self.out_std[:, None] + self.out_mean[:, None]


class NNDecoder:
    """Temporal conv net baseline with the :class:`LinearDecoder` interface."""

    KIND = "baseline-nn"

    def __init__(self, config: NNDecoderConfig | None = None):
        self.config = config or NNDecoderConfig()
        self.net: TemporalConvNet | None = None
        self.history: list[dict[str, float]] = []

    def _windows(self, xs: list[np.ndarray], ys: list[np.ndarray], rng: np.random.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # Random crops of window_frames; trials shorter than that are zero-padded (zero is the
        # mean after standardisation) and masked out of the loss.
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
    def _val_loss(self, xs: list[np.ndarray], ys: list[np.ndarray]) -> float:
        assert self.net is not None
        self.net.eval()
        se, n = 0.0, 0
        for x, y in zip(xs, ys):
            pred = self.net(torch.from_numpy(x.T[None].astype(np.float32)))[0]  # (80, T)
            se += float(((pred - torch.from_numpy(y.astype(np.float32))) ** 2).sum())
            n += y.size
        return se / n

    def fit(self, neural_list: Sequence[np.ndarray], mel_list: Sequence[np.ndarray],
            val_neural: Sequence[np.ndarray] | None = None,
            val_mel: Sequence[np.ndarray] | None = None) -> NNDecoder:
        """Train on trials (neural (T_i, C), mel (80, T_i)); early-stop on the validation trials.

        Without ``val_neural``/``val_mel`` the last ``val_fraction`` of the given trials (at least
        one) are held out for early stopping. Returns self; ``self.history`` lists
        ``{"step", "train_mse", "val_mse"}`` (MSE in standardised mel units) per validation.
        """
        cfg = self.config
        n_channels = _check_pairs(neural_list, mel_list, "NNDecoder.fit")
        neural_list, mel_list = list(neural_list), list(mel_list)
        if val_neural is None or val_mel is None:
            if len(neural_list) < 2:
                raise ValueError("NNDecoder.fit: need >= 2 trials to hold one out for early stopping")
            n_val = max(1, int(round(cfg.val_fraction * len(neural_list))))
            val_neural, val_mel = neural_list[-n_val:], mel_list[-n_val:]
            neural_list, mel_list = neural_list[:-n_val], mel_list[:-n_val]
        elif _check_pairs(val_neural, val_mel, "NNDecoder.fit (validation)") != n_channels:
            raise ValueError("NNDecoder.fit: validation trials have another channel count")
        in_mean, in_std = _channel_stats(neural_list)
        y_cat = np.concatenate([np.asarray(m, dtype=np.float64) for m in mel_list], axis=1)  # (80, N)
        out_mean = y_cat.mean(axis=1)
        out_std = np.maximum(y_cat.std(axis=1), 1e-6)

        def standardise(xs, ys):
            return ([((np.asarray(x, np.float64) - in_mean) / in_std).astype(np.float32) for x in xs],
                    [((np.asarray(y, np.float64) - out_mean[:, None]) / out_std[:, None]).astype(np.float32)
                     for y in ys])

        xs, ys = standardise(neural_list, mel_list)
        vxs, vys = standardise(val_neural, val_mel)
        rng = np.random.default_rng(cfg.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.net = TemporalConvNet(n_channels, cfg)
            for name, arr in (("in_mean", in_mean), ("in_std", in_std), ("out_mean", out_mean),
                              ("out_std", out_std)):
                getattr(self.net, name).copy_(torch.from_numpy(arr))
            opt = torch.optim.AdamW(self.net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
            best, best_state, bad, train_acc = float("inf"), None, 0, []
            self.history = []
            for step in range(1, cfg.max_steps + 1):
                self.net.train()
                xb, yb, mask = self._windows(xs, ys, rng)
                # Masked MSE over valid frames.
                loss = (((self.net(xb) - yb) ** 2) * mask).sum() / (mask.sum() * N_MELS)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"NNDecoder.fit: loss is {loss.item()} at step {step}; "
                                             f"lower lr (now {cfg.lr})")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                train_acc.append(loss.item())
                if step % cfg.eval_every == 0 or step == cfg.max_steps:
                    val = self._val_loss(vxs, vys)
                    self.history.append({"step": step, "train_mse": float(np.mean(train_acc)),
                                         "val_mse": val})
                    train_acc = []
                    if val < best:
                        best, bad = val, 0
                        best_state = copy.deepcopy(self.net.state_dict())
                    else:
                        bad += 1
                        if bad >= cfg.patience:
                            break
        assert best_state is not None
        self.net.load_state_dict(best_state)
        self.net.eval()
        self.best_val_mse = best
        return self

    @torch.no_grad()
    def predict(self, neural: np.ndarray) -> np.ndarray:
        """Mel of one trial: neural (T, C) -> (80, T), float32."""
        if self.net is None:
            raise RuntimeError("NNDecoder.predict: call fit() or from_state_dict() first")
        self.net.eval()
        c = self.net.in_mean.shape[0]
        if neural.ndim != 2 or neural.shape[1] != c:
            raise ValueError(f"NNDecoder.predict: neural has shape {neural.shape}; expected (T, {c})")
        x = torch.from_numpy(np.asarray(neural, dtype=np.float32).T[None])  # (1, C, T)
        return self.net.decode(x)[0].numpy()

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.net is None:
            raise RuntimeError("NNDecoder.state_dict: the decoder is not fitted")
        return {k: v.detach().clone() for k, v in self.net.state_dict().items()}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any],
                        config: NNDecoderConfig | Mapping[str, Any] | None = None) -> NNDecoder:
        """Rebuild from :meth:`state_dict` and the config it was trained with."""
        if isinstance(config, Mapping):
            config = NNDecoderConfig(**config)
        dec = cls(config)
        if "inp.weight" not in state:
            raise ValueError("NNDecoder.from_state_dict: tensor 'inp.weight' missing; not an "
                             "NNDecoder state")
        n_channels = int(state["inp.weight"].shape[1])
        dec.net = TemporalConvNet(n_channels, dec.config)
        dec.net.load_state_dict({k: torch.as_tensor(_to_numpy(v)) for k, v in state.items()})
        dec.net.eval()
        return dec


# ---------------------------------------------------------------------------------------------
# Checkpoints.


def save_baseline(directory: str, decoder: LinearDecoder | NNDecoder,
                  extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Save a fitted decoder as a safetensors checkpoint (kind ``baseline-linear``/``baseline-nn``)."""
    from ssip.models.checkpoint import save_checkpoint

    manifest = {"kind": decoder.KIND, "config": dataclasses.asdict(decoder.config),
                "extra": dict(extra or {})}
    return save_checkpoint(directory, decoder.state_dict(), manifest)


def load_baseline(directory: str) -> LinearDecoder | NNDecoder:
    """Load a decoder saved by :func:`save_baseline`; refuses other kinds and mel versions."""
    from ssip.models.checkpoint import load_checkpoint

    state, manifest = load_checkpoint(directory, (LinearDecoder.KIND, NNDecoder.KIND))
    cls = LinearDecoder if manifest["kind"] == LinearDecoder.KIND else NNDecoder
    return cls.from_state_dict(state, manifest.get("config") or None)
