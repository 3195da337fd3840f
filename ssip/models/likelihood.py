"""The likelihood p(neural | mel) of DPS: a forward model A(mel) -> neural with Gaussian noise.

    y = A(mel) + e,   e_{t,c} ~ N(0, sigma_c^2) independent over frames t and electrodes c,

where y (T, C) is a trial's z-scored high-gamma at 100 Hz and mel (80, T) its ssip log-mel
(:mod:`ssip.mel`), aligned frame for frame. Neural activity LEADS the audio by about 50-200 ms, so
A sees mel context on both sides, mostly in the future of each neural frame.

Two forward models share one temporal head (:class:`TemporalHead`: 1-D conv over
``kernel`` frames reaching ``lookahead`` frames into the future, then a per-electrode output):

- :class:`WhisperLikelihood` (docs/method.md, The likelihood): a frozen pretrained Whisper encoder on the
  mel window WITHOUT padding to 30 s, tapped at ``layer`` (50 Hz), upsampled to 100 Hz, then the
  head. Optionally the last ``train_last_layers`` encoder layers up to the tap are trained.
- :class:`ConvLikelihood`: the head directly on the standardised mel (the alternative).

Per-electrode noise ``sigma`` (a buffer) is the RMS residual on held-out (val) trials times the
square root of its long-run variance factor (:func:`variance_inflation`): the features' noise is
correlated over a few frames, and counting each frame as independent evidence would weight the
likelihood about 5x too much against the prior. With ``noise_model: whitened`` the noise is
instead e = AR(p) per electrode driven by innovations with covariance L L^T + diag(psi) across
electrodes (:mod:`ssip.sampling.whitening`), fitted on the same val residuals and stored in
``noise_*`` buffers: a slow drift shared by all electrodes is then read as noise, not evidence.
:meth:`Likelihood.whitened_residual` gives (y - A(mel)) / sigma (or the AR + low-rank whitened
residual) with the padding mask, and
:func:`make_residual` wraps it as the ``residual(x0_hat) -> (r, r_mask)`` callable that
:mod:`ssip.sampling.dps` differentiates (Chung et al., ICLR 2023, Algorithm 1, line 7).

Batches are an optimisation only: every trial's prediction on its real frames is exactly what
the trial would get alone (padding is masked inside the encoder and the head), so a batch
decodes as its trials would one by one.

:func:`train_likelihood` fits one subject (MSE on random windows of the train split, best epoch on
val, sigma on val); :func:`save_likelihood` / :func:`load_likelihood` store it as a safetensors
checkpoint of kind "likelihood". Nothing here imports Ray; only the save/load helpers touch
files (through :mod:`ssip.models.checkpoint`).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ssip.config import ConfigError, check_option, check_range, field, from_dict
from ssip.mel import MEL_FLOOR, N_MELS
from ssip.sampling.whitening import TENSOR_NAMES as NOISE_TENSORS
from ssip.sampling.whitening import NoiseModel, fit_noise_model

log = logging.getLogger(__name__)

KIND = "likelihood"
#: State-dict prefix of the whitened noise model's buffers (noise_model: whitened).
NOISE_PREFIX = "noise_"
SPLITS = ("train", "val", "test")

# ---------------------------------------------------------------------------------------------
# Config.


@dataclass
class LikelihoodConfig:
    """Forward model A(mel) -> neural of one subject, and how it is trained."""

    kind: str = field("whisper", help="'whisper': frozen Whisper encoder + temporal head; "
                                      "'conv': temporal head directly on the mel")
    whisper_model: str = field("tiny.en", help="shipped Whisper ('tiny.en', 'base') or the path "
                                               "of a Hugging Face Whisper directory (kind=whisper)")
    layer: int = field(2, help="encoder layer whose hidden state feeds the head: 0 = after the "
                               "conv front-end, k = after layer k (tiny.en has 4, base 6)")
    train_last_layers: int = field(0, help="train this many encoder layers just below the tap "
                                           "(0 = whole encoder frozen); must be <= layer")
    head_channels: int = field(128, help="channels of the temporal head")
    kernel: int = field(51, help="temporal kernel of the head in 100 Hz frames (51 = 0.5 s)")
    lookahead: int = field(35, help="future frames the kernel reaches (the rest is past): 35 of "
                                    "51 spans -150..+350 ms, as neural activity leads the audio")
    output: str = field("softplus", help="per-electrode output: 'softplus' (offset + gain * "
                                         "softplus(z), models the silent floor) or 'affine'")
    dropout: float = field(0.1, help="dropout in the head while training")
    lr: float = field(1e-3, help="AdamW learning rate")
    weight_decay: float = field(1e-4, help="AdamW weight decay")
    epochs: int = field(30, help="training epochs (an epoch = as many windows as cover the train "
                                 "frames once); ignored when total_samples > 0")
    total_samples: int = field(0, help="training length in windows seen (0 = use epochs); "
                                       "rounded up to whole epochs")
    batch_size: int = field(16, help="windows per optimizer step")
    window_frames: int = field(200, help="random training window in 100 Hz frames (2 s)")
    select_on: str = field("mse", help="best-epoch criterion on val: 'mse' (lowest) or 'r' "
                                       "(highest mean per-electrode Pearson r)")
    sigma_min: float = field(1e-3, help="floor of the per-electrode noise sigma (z-score units), "
                                        "so a flat electrode cannot divide by zero")
    noise_lags: int = field(10, help="frames of residual autocorrelation (on val) folded into "
                                     "sigma as its long-run variance; 0 = frames independent")
    noise_model: str = field("diagonal", help="noise of p(neural | mel): 'diagonal' (one sigma "
                                              "per electrode, frames and electrodes "
                                              "independent) or 'whitened' (an AR(noise_order) "
                                              "filter per electrode and a rank-noise_rank + "
                                              "diagonal covariance across electrodes, fitted on "
                                              "val residuals: a drift shared by all electrodes "
                                              "is not read as speech evidence; "
                                              "ssip.sampling.whitening)")
    noise_order: int = field(3, help="whitened noise: AR order per electrode (frames)")
    noise_rank: int = field(2, help="whitened noise: shared factors across electrodes")
    cache_features: bool = field(True, help="with a frozen backbone, compute its features once "
                                            "per whole trial and train the head on crops of them "
                                            "(exact, and much faster than re-running Whisper)")
    seed: int = field(0, help="seed of initialisation, window sampling and dropout")

    def __post_init__(self) -> None:
        check_option("kind", self.kind, ("whisper", "conv"))
        check_option("output", self.output, ("softplus", "affine"))
        check_option("select_on", self.select_on, ("mse", "r"))
        check_range("layer", self.layer, 0, None)
        check_range("train_last_layers", self.train_last_layers, 0, self.layer)
        check_range("head_channels", self.head_channels, 1, None)
        check_range("kernel", self.kernel, 1, None)
        check_range("lookahead", self.lookahead, 0, self.kernel - 1)
        check_range("dropout", self.dropout, 0.0, 0.9)
        check_range("lr", self.lr, 1e-12, 1.0)
        check_range("weight_decay", self.weight_decay, 0.0, None)
        check_range("epochs", self.epochs, 1, None)
        check_range("total_samples", self.total_samples, 0, None)
        check_range("batch_size", self.batch_size, 1, None)
        check_range("window_frames", self.window_frames, 2, None)
        check_range("sigma_min", self.sigma_min, 1e-12, None)
        check_range("noise_lags", self.noise_lags, 0, None)
        check_option("noise_model", self.noise_model, ("diagonal", "whitened"))
        check_range("noise_order", self.noise_order, 0, 64)
        check_range("noise_rank", self.noise_rank, 0, None)
        if not self.whisper_model:
            raise ConfigError("whisper_model='' must name a shipped model or a directory")

    @property
    def past(self) -> int:
        """Past frames the head's kernel reaches."""
        return self.kernel - 1 - self.lookahead


# ---------------------------------------------------------------------------------------------
# Masks.


def frame_lengths(frame_mask: torch.Tensor | None, batch: int, n_frames: int,
                  device: torch.device | None = None) -> torch.Tensor:
    """Frames each item's forward model sees: 1 + the index of its last real frame.

    Parameters
    ----------
    frame_mask : bool Tensor, shape (B, T), or None
        True on real frames; None means every frame is real.

    Returns
    -------
    Tensor, shape (B,), int64
        Items are right-padded: frames at or past the length are padding and never influence
        the prediction on real frames. Frames before it that the mask marks False (holes) are
        fed to the model but excluded from the residual.
    """
    if frame_mask is None:
        return torch.full((batch,), n_frames, dtype=torch.long, device=device)
    if frame_mask.dtype != torch.bool or tuple(frame_mask.shape) != (batch, n_frames):
        raise ValueError(f"frame_mask must be bool of shape (B, T) = ({batch}, {n_frames}), got "
                         f"{frame_mask.dtype} {tuple(frame_mask.shape)}")
    idx = torch.arange(1, n_frames + 1, device=frame_mask.device)
    lengths = (frame_mask * idx).amax(dim=1)  # (B,)
    empty = (lengths == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"frame_mask has no real frame for batch items {empty}: drop those trials")
    return lengths.to(device=device)


def _valid(lengths: torch.Tensor, n_frames: int) -> torch.Tensor:
    """(B, n_frames) bool, True before each item's length."""
    return torch.arange(n_frames, device=lengths.device)[None, :] < lengths[:, None]


# ---------------------------------------------------------------------------------------------
# Modules.


class TemporalHead(nn.Module):
    """Features at 100 Hz (B, T, F) -> predicted neural (B, T, C).

    norm -> linear F->H -> conv over ``kernel`` frames (offsets ``lookahead - kernel + 1`` ..
    ``lookahead``) -> GELU -> 1x1 conv -> GELU -> 1x1 conv to C -> per-electrode output.
    The conv is the only temporal operation, so the receptive field is exactly the kernel.
    Frames past each item's length are zeroed after the projection, which is what zero padding
    does at the end of a trial computed alone.

    Parameters
    ----------
    in_features : int
        F, feature size per frame.
    n_electrodes : int
        C.
    cfg : LikelihoodConfig
        Uses head_channels, kernel, lookahead, output, dropout.
    layer_norm : bool
        Learned LayerNorm over features first (for Whisper hidden states, whose scale varies
        across dimensions); the conv model standardises its mel instead.
    """

    def __init__(self, in_features: int, n_electrodes: int, cfg: LikelihoodConfig,
                 layer_norm: bool):
        super().__init__()
        h = cfg.head_channels
        self.past, self.lookahead = cfg.past, cfg.lookahead
        self.norm = nn.LayerNorm(in_features) if layer_norm else nn.Identity()
        self.inp = nn.Linear(in_features, h)
        self.conv = nn.Conv1d(h, h, cfg.kernel)
        self.mix = nn.Conv1d(h, h, 1)
        self.drop = nn.Dropout(cfg.dropout)
        self.out = nn.Conv1d(h, n_electrodes, 1)
        self.softplus = cfg.output == "softplus"
        if self.softplus:
            self.gain = nn.Parameter(torch.ones(n_electrodes))
            self.offset = nn.Parameter(torch.zeros(n_electrodes))

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """feats (B, T, F), lengths (B,) -> (B, T, C)."""
        h = self.inp(self.norm(feats))  # (B, T, H)
        # where(), not multiply: padding may hold anything, NaN included.
        h = torch.where(_valid(lengths, h.shape[1])[..., None], h, 0.0)
        h = F.pad(h.transpose(1, 2), (self.past, self.lookahead))  # (B, H, past + T + lookahead)
        h = F.gelu(self.conv(h))  # (B, H, T)
        h = F.gelu(self.mix(self.drop(h)))
        z = self.out(self.drop(h)).transpose(1, 2)  # (B, T, C)
        if self.softplus:
            # Offset + gain * softplus: a floor in silence and a rising response above it.
            return self.offset + self.gain * F.softplus(z)
        return z


class Likelihood(nn.Module):
    """Base of the forward models: backbone ``features`` -> :class:`TemporalHead` -> (B, T, C).

    Attributes
    ----------
    config : LikelihoodConfig
    sigma : Tensor buffer, shape (C,)
        Per-electrode noise std in the neural units (z-score), set by :func:`train_likelihood`.
    """

    def __init__(self, n_electrodes: int, config: LikelihoodConfig, in_features: int,
                 layer_norm: bool):
        super().__init__()
        if n_electrodes < 1:
            raise ValueError(f"n_electrodes={n_electrodes} must be >= 1")
        self.config = config
        self.head = TemporalHead(in_features, n_electrodes, config, layer_norm)
        self.register_buffer("sigma", torch.ones(n_electrodes))
        if config.noise_model == "whitened":
            rank = min(config.noise_rank, max(n_electrodes - 1, 0))
            identity = NoiseModel.diagonal(torch.ones(n_electrodes))
            shapes = {"ar": (n_electrodes, config.noise_order), "loadings": (n_electrodes, rank)}
            for name, value in identity.to_tensors().items():
                self.register_buffer(NOISE_PREFIX + name, torch.zeros(shapes[name], dtype=torch.float64)
                                     if name in shapes else value)
        self._noise_cache: tuple[tuple, NoiseModel] | None = None

    def noise(self) -> NoiseModel | None:
        """The fitted whitening noise model (``noise_model: whitened``), else None."""
        if self.config.noise_model != "whitened":
            return None
        bufs = [getattr(self, NOISE_PREFIX + n) for n in NOISE_TENSORS]
        key = tuple((b.data_ptr(), b._version) for b in bufs)
        if self._noise_cache is None or self._noise_cache[0] != key:
            self._noise_cache = (key, NoiseModel(*bufs))
        return self._noise_cache[1]

    def set_noise(self, noise: NoiseModel) -> None:
        """Store a fitted noise model in the buffers (saved with the checkpoint)."""
        for name, value in noise.to_tensors().items():
            buf = getattr(self, NOISE_PREFIX + name)
            if tuple(buf.shape) != tuple(value.shape):
                raise ValueError(f"noise {name}: shape {tuple(value.shape)} but the model holds "
                                 f"{tuple(buf.shape)}")
            buf.copy_(value.to(buf))

    @property
    def n_electrodes(self) -> int:
        return int(self.sigma.shape[0])

    @property
    def backbone_frozen(self) -> bool:
        """Whether ``features`` has no trained parameters (then it can be cached per trial)."""
        return True

    def features(self, mel: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Backbone features at 100 Hz: mel (B, 80, T), lengths (B,) -> (B, T, F)."""
        raise NotImplementedError

    def forward(self, mel: torch.Tensor, frame_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Predicted neural features A(mel).

        Parameters
        ----------
        mel : Tensor, shape (B, 80, T)
            ssip log-mel at 100 frames/s (any float dtype; cast to the model's).
        frame_mask : bool Tensor, shape (B, T), optional
            True on real frames; items are right-padded (see :func:`frame_lengths`).

        Returns
        -------
        Tensor, shape (B, T, C)
            In the units of the training neural data (z-scored high gamma). Values on padded
            frames are meaningless.
        """
        if mel.ndim != 3 or mel.shape[1] != N_MELS:
            raise ValueError(f"{type(self).__name__}: mel must be (B, {N_MELS}, T), got "
                             f"{tuple(mel.shape)}")
        lengths = frame_lengths(frame_mask, mel.shape[0], mel.shape[2], device=mel.device)
        return self.head(self.features(mel, lengths), lengths)

    def whitened_residual(self, mel: torch.Tensor, neural: torch.Tensor,
                          frame_mask: torch.Tensor | None = None,
                          forward: Callable | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """(neural - A(mel)) / sigma per electrode, zero on padding, and its mask.

        Parameters
        ----------
        mel : Tensor, shape (B, 80, T)
        neural : Tensor, shape (B, T, C)
        frame_mask : bool Tensor, shape (B, T), optional
        forward : callable, optional
            ``forward(mel, frame_mask)`` computing A(mel) in place of ``self``.

        Returns
        -------
        r : Tensor, shape (B, T, C), float32
            Whitened residual; exactly 0 where ``r_mask`` is False.
        r_mask : bool Tensor, shape (B, T, 1)
            True on real frames (broadcasts over electrodes).
        """
        b, _, t = mel.shape
        if tuple(neural.shape) != (b, t, self.n_electrodes):
            raise ValueError(f"neural has shape {tuple(neural.shape)}; expected (B, T, C) = "
                             f"({b}, {t}, {self.n_electrodes}) to match the mel and the model")
        pred = (forward or self)(mel, frame_mask)  # (B, T, C)
        if frame_mask is None:
            r_mask = torch.ones((b, t, 1), dtype=torch.bool, device=pred.device)
        else:
            r_mask = frame_mask.to(pred.device)[..., None]
        noise = self.noise()
        if noise is not None:  # AR + low-rank whitening: e ~ iid N(0, 1) under the model
            return noise.whiten(neural.to(pred) - pred, r_mask[..., 0]), r_mask
        r = (neural.to(pred) - pred) / self.sigma
        return torch.where(r_mask, r, 0.0), r_mask

    def trained_state(self) -> dict[str, torch.Tensor]:
        """Everything a checkpoint must hold: the state dict minus frozen pretrained weights."""
        skip = set(self.frozen_keys())
        return {k: v for k, v in self.state_dict().items() if k not in skip}

    def frozen_keys(self) -> list[str]:
        """State-dict keys of pretrained weights that are not trained (rebuilt on load)."""
        return []


class ConvLikelihood(Likelihood):
    """Conv-only forward model: standardised mel -> :class:`TemporalHead` -> (B, T, C).

    Buffers ``mel_mean``, ``mel_std`` (80,) hold the per-bin train statistics.
    """

    def __init__(self, n_electrodes: int, config: LikelihoodConfig | None = None):
        config = config or LikelihoodConfig(kind="conv")
        super().__init__(n_electrodes, config, N_MELS, layer_norm=False)
        self.register_buffer("mel_mean", torch.zeros(N_MELS))
        self.register_buffer("mel_std", torch.ones(N_MELS))

    def features(self, mel: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        x = mel.to(self.mel_mean)
        return ((x - self.mel_mean[:, None]) / self.mel_std[:, None]).transpose(1, 2)  # (B, T, 80)


#: Frames of context on each inner side of the 30 s windows that encode a longer mel.
LONG_CONTEXT = 250


class WhisperLikelihood(Likelihood):
    """Whisper encoder (tapped at ``config.layer``) -> 50->100 Hz -> :class:`TemporalHead`.

    Parameters
    ----------
    n_electrodes : int
    config : LikelihoodConfig
    whisper : transformers WhisperForConditionalGeneration or WhisperEncoder, optional
        Loaded with :func:`ssip.models.whisper.load_whisper`; loaded from
        ``config.whisper_model`` when None. Frozen weights are shared with it (not copied);
        the ``train_last_layers`` trained layers are copied, so ``whisper`` never changes.
    """

    def __init__(self, n_electrodes: int, config: LikelihoodConfig | None = None,
                 whisper: nn.Module | None = None):
        from ssip.models.whisper import WhisperEncoderWindow, load_whisper

        config = config or LikelihoodConfig(kind="whisper")
        if whisper is None:
            whisper = load_whisper(config.whisper_model)[0]
        encoder = whisper.get_encoder() if hasattr(whisper, "get_encoder") else whisper
        n_layers = len(encoder.layers)
        if config.layer > n_layers:
            raise ConfigError(f"layer={config.layer} but Whisper {config.whisper_model!r} has "
                              f"{n_layers} encoder layers; choose 0..{n_layers}")
        window = WhisperEncoderWindow(encoder, layer=config.layer, truncate=True)
        d_model = int(encoder.conv2.out_channels)
        super().__init__(n_electrodes, config, d_model, layer_norm=True)
        window.requires_grad_(False)
        first = config.layer - config.train_last_layers
        for i in range(first, config.layer):
            window.layers[i] = copy.deepcopy(window.layers[i]).requires_grad_(True)
        self.encoder = window
        self._trained_layers = set(range(first, config.layer))
        # The layers past the tap, for the naive reference path only (`all_layers`): held in a
        # tuple, not registered, so checkpoints and state dicts do not change.
        self._rest_layers = tuple(list(encoder.layers)[config.layer:])
        #: Speed switches of the decoder (DecodeConfig), both off on the production path:
        #: ``pad_to`` pads every window to that many frames (3000 = Whisper's 30 s input) with
        #: the padding's keys masked, so results equal the short window's up to float rounding;
        #: ``all_layers`` runs the encoder's layers past the tap too (their output is unused).
        self.pad_to: int | None = None
        self.all_layers = False

    def set_speed(self, pad_to: int | None = None, all_layers: bool = False) -> None:
        """Set the naive-path switches (see ``pad_to`` / ``all_layers``); defaults = production."""
        if pad_to is not None and not 1 <= int(pad_to) <= self.encoder.max_frames:
            raise ValueError(f"pad_to={pad_to}: Whisper takes 1..{self.encoder.max_frames} frames")
        self.pad_to = None if pad_to is None else int(pad_to)
        self.all_layers = bool(all_layers)
        if all_layers:
            w = self.encoder.conv1.weight
            for block in self._rest_layers:
                block.to(device=w.device, dtype=w.dtype).requires_grad_(False)

    @property
    def backbone_frozen(self) -> bool:
        return not self._trained_layers

    def frozen_keys(self) -> list[str]:
        keys = []
        for name, _ in self.encoder.named_parameters():
            parts = name.split(".")
            if parts[0] == "layers" and int(parts[1]) in self._trained_layers:
                continue
            keys.append(f"encoder.{name}")
        return keys

    def features(self, mel: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Tapped hidden state upsampled to 100 Hz: (B, 80, T) -> (B, T, d_model).

        Each item runs as it would alone on its first ``length`` frames (odd lengths padded by
        one mel-floor frame, as Whisper's conv2 has stride 2): the mel past the item's length is
        zeroed, which is what conv1 zero-pads alone, and attention masks the keys of padded
        50 Hz positions. A mel longer than Whisper's 30 s is encoded in overlapping 30 s
        windows (:data:`LONG_CONTEXT` frames of context on each inner side), each window's
        centre kept.
        """
        t = mel.shape[2]
        w = self.encoder.max_frames
        if t <= w:
            return self._window_features(mel, lengths)
        core = w - 2 * LONG_CONTEXT
        parts = []
        for c0 in range(0, t, core):
            a, b = max(0, c0 - LONG_CONTEXT), min(t, c0 + core + LONG_CONTEXT)
            feats = self._window_features(mel[:, :, a:b], (lengths - a).clamp(0, b - a))
            parts.append(feats[:, c0 - a: min(t, c0 + core) - a])
        return torch.cat(parts, dim=1)

    def _window_features(self, mel: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        enc = self.encoder
        b, _, t = mel.shape
        t_even = t + t % 2
        if self.pad_to is not None:
            t_even = max(t_even, int(self.pad_to))
        enc_len = lengths + lengths % 2  # (B,) even encoder lengths
        x = F.pad(mel.to(enc.conv1.weight), (0, t_even - t))  # (B, 80, T_even)
        pos = torch.arange(t_even, device=x.device)[None, None, :]
        floor = torch.full((), MEL_FLOOR, dtype=x.dtype, device=x.device)
        x = torch.where(pos < lengths[:, None, None], x,
                        torch.where(pos < enc_len[:, None, None], floor, 0.0))
        # conv2's output j reads conv1 frames 2j-1..2j+1, so real positions (2j+1 < enc_len)
        # never see conv1 outputs past the item.
        x = F.gelu(enc.conv1(x))  # (B, d, T_even)
        x = F.gelu(enc.conv2(x)).transpose(1, 2)  # (B, T2, d) at 50 Hz
        t2 = x.shape[1]
        x = x + enc.embed_positions.weight[:t2]
        half = enc_len // 2
        if bool((half < t2).any()):
            # Additive key mask (B, 1, 1, T2): padded positions get no attention weight.
            keep = torch.arange(t2, device=x.device)[None, :] < half[:, None]
            bias = torch.zeros((b, 1, 1, t2), dtype=x.dtype, device=x.device)
            bias = bias.masked_fill(~keep[:, None, None, :], torch.finfo(x.dtype).min)
        else:
            bias = None
        for block in enc.layers[: enc.layer]:
            x = block(x, bias)  # (B, T2, d)
        if enc.layer == enc.num_layers:
            x = enc.layer_norm(x)
        elif self.all_layers:
            # The naive reference: the whole encoder runs, the tap is read off the way.
            h = x
            for block in self._rest_layers:
                h = block(h, bias)
            enc.layer_norm(h)
        # Nearest 50 -> 100 Hz (frame t -> position t // 2; position j is centred on frame 2j):
        # pointwise in time, so it never mixes padding into real frames; the head smooths.
        return x.repeat_interleave(2, dim=1)[:, :t]  # (B, T, d)


def build_likelihood(config: LikelihoodConfig, n_electrodes: int,
                     whisper: nn.Module | None = None) -> Likelihood:
    """An untrained :class:`WhisperLikelihood` or :class:`ConvLikelihood` for ``config.kind``."""
    if config.kind == "conv":
        return ConvLikelihood(n_electrodes, config)
    return WhisperLikelihood(n_electrodes, config, whisper=whisper)


# ---------------------------------------------------------------------------------------------
# DPS.


def make_residual(model: Likelihood, neural: torch.Tensor | np.ndarray,
                  frame_mask: torch.Tensor | None = None, forward: Callable | None = None
                  ) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The ``residual(x0_hat) -> (r, r_mask)`` callable that :mod:`ssip.sampling.dps` guides with.

    Puts ``model`` in eval mode and freezes its weights (``requires_grad_(False)``), so that under
    ``torch.enable_grad`` only the sampler's x carries gradients.

    Parameters
    ----------
    model : Likelihood
    neural : Tensor or ndarray, shape (B, T, C)
        Observed neural features of the trials (z-scored, 100 Hz), right-padded.
    frame_mask : bool Tensor, shape (B, T), optional
        True on real frames.
    forward : callable, optional
        ``forward(mel, frame_mask) -> A(mel)`` to use instead of ``model`` itself (the decoder's
        autocast / checkpointed / compiled call of it).

    Returns
    -------
    callable
        ``residual(x0_hat)`` with x0_hat (B, 1, 80, T) (or (B, 80, T)), any float dtype, returning
        r (B, T, C) = (neural - A(x0_hat)) / sigma (0 on padding) and r_mask (B, T, 1) bool.
    """
    model.eval()
    model.requires_grad_(False)
    device = model.sigma.device
    y = torch.as_tensor(neural, dtype=torch.float32, device=device)
    if y.ndim != 3 or y.shape[2] != model.n_electrodes:
        raise ValueError(f"make_residual: neural has shape {tuple(y.shape)}; expected (B, T, "
                         f"{model.n_electrodes})")
    mask = None if frame_mask is None else frame_mask.to(device)
    frame_lengths(mask, y.shape[0], y.shape[1])  # validate now, not at the first sampler step

    def residual(x0_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mel = x0_hat[:, 0] if x0_hat.ndim == 4 and x0_hat.shape[1] == 1 else x0_hat
        if mel.ndim != 3 or tuple(mel.shape) != (y.shape[0], N_MELS, y.shape[1]):
            raise ValueError(f"residual: x0_hat has shape {tuple(x0_hat.shape)}; expected "
                             f"({y.shape[0]}, 1, {N_MELS}, {y.shape[1]}) to match the neural data")
        return model.whitened_residual(mel, y, mask, forward=forward)

    return residual


# ---------------------------------------------------------------------------------------------
# Training.


def _check_trials(trials: Sequence[Mapping[str, Any]]) -> tuple[int, str | None]:
    """Validate trial dicts; return the electrode count and the (single) subject."""
    if not trials:
        raise ValueError("train_likelihood: no trials given")
    subjects = sorted({str(t.get("subject")) for t in trials if t.get("subject") is not None})
    if len(subjects) > 1:
        raise ValueError(f"train_likelihood: trials of subjects {subjects}; the likelihood is per "
                         f"subject: pass one subject's trials (load_trials(root, subject=...))")
    n_el = None
    for t in trials:
        where = f"subject {t.get('subject')!r} trial {t.get('trial_id')!r}"
        for key in ("neural", "mel", "split"):
            if key not in t:
                raise ValueError(f"{where}: field {key!r} is missing")
        x, m = np.asarray(t["neural"]), np.asarray(t["mel"])
        if x.ndim != 2 or m.ndim != 2 or m.shape[0] != N_MELS or x.shape[0] != m.shape[1]:
            raise ValueError(f"{where}: neural {x.shape} and mel {m.shape}; expected neural (T, C) "
                             f"and mel ({N_MELS}, T) aligned frame for frame")
        if x.shape[0] < 2:
            raise ValueError(f"{where}: {x.shape[0]} frame(s); a trial needs >= 2 frames")
        if n_el is None:
            n_el = x.shape[1]
        elif x.shape[1] != n_el:
            raise ValueError(f"{where}: {x.shape[1]} electrodes, earlier trials have {n_el}")
        if not (np.isfinite(x).all() and np.isfinite(m).all()):
            raise ValueError(f"{where}: neural or mel holds NaN/inf; re-run ingest or drop it")
        check_option(f"{where}: split", t["split"], SPLITS)
    return int(n_el), (subjects[0] if subjects else None)


def _pad_batch(arrays: Sequence[np.ndarray], time_axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad arrays along ``time_axis`` into one batch; returns (batch, frame_mask (B, T))."""
    t_max = max(a.shape[time_axis] for a in arrays)
    out, mask = [], torch.zeros((len(arrays), t_max), dtype=torch.bool)
    for i, a in enumerate(arrays):
        n = a.shape[time_axis]
        pad = [(0, 0)] * a.ndim
        pad[time_axis] = (0, t_max - n)
        out.append(np.pad(np.asarray(a, dtype=np.float32), pad))
        mask[i, :n] = True
    return torch.from_numpy(np.stack(out)), mask


def pearson_per_electrode(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Pearson r of each column: pred, target (N, C) -> (C,); NaN where either is constant."""
    p = np.asarray(pred, np.float64) - np.mean(pred, axis=0)
    y = np.asarray(target, np.float64) - np.mean(target, axis=0)
    den = np.sqrt((p**2).sum(0) * (y**2).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (p * y).sum(0) / den, np.nan)


def _metrics(preds: Sequence[np.ndarray], targets: Sequence[np.ndarray],
             noise_lags: int = 0) -> dict[str, Any]:
    residuals = [np.asarray(y, np.float64) - p for p, y in zip(preds, targets)]
    pred = np.concatenate(preds, axis=0)  # (N, C)
    y = np.concatenate(targets, axis=0)
    res = np.concatenate(residuals, axis=0)
    r = pearson_per_electrode(pred, y)
    return {"mse": float(np.mean(res**2)), "r": r, "r_mean": float(np.nanmean(r)),
            "rms": np.sqrt(np.mean(res**2, axis=0)), "n_frames": int(y.shape[0]),
            "vif": variance_inflation(residuals, noise_lags), "residuals": residuals}


def variance_inflation(residuals: Sequence[np.ndarray], max_lag: int) -> np.ndarray:
    """Long-run over per-frame variance of each electrode's residual: 1 + 2 sum_k rho_k.

    The likelihood treats frames as independent, but high-gamma features are smoothed over tens
    of ms, so their noise is correlated over a few frames (lag-1 autocorrelation about 0.86 on
    the default corpus). A residual that varies slowly, as speech does, then carries
    ``1 + 2 sum_{k=1}^{L} rho_k`` times fewer independent samples than frames: the long-run
    variance of the noise (its spectral density at zero frequency) is that factor times the
    per-frame variance. Multiplying sigma^2 by it keeps the likelihood's weight on slow residuals
    right (about 5x smaller on the default corpus) instead of counting every frame as new
    evidence. rho_k are pooled over trials (lagged products within each trial, never across
    trials) with the truncated (flat) kernel at ``max_lag`` frames.

    Parameters
    ----------
    residuals : sequence of ndarray, shape (T_i, C)
        Held-out residuals y - A(mel) of whole trials.
    max_lag : int
        L, frames; 0 returns ones.

    Returns
    -------
    ndarray, shape (C,)
        Factor >= 1/(2L+1) (ones where an electrode has no variance).
    """
    n_el = residuals[0].shape[1] if residuals else 0
    if max_lag == 0 or not residuals:
        return np.ones(n_el)
    centred = [r - r.mean(axis=0) for r in residuals]  # per-trial offsets are not noise memory
    var = sum((r * r).sum(axis=0) for r in centred)
    lagged = np.zeros((max_lag, n_el))
    for r in centred:
        for k in range(1, min(max_lag, r.shape[0] - 1) + 1):
            lagged[k - 1] += (r[k:] * r[:-k]).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = lagged / var
    factor = 1.0 + 2.0 * np.nansum(rho, axis=0)
    factor = np.where(var > 0, factor, 1.0)
    # The flat kernel can go below the true factor on noisy estimates; 1 / (2L + 1) is the
    # smallest long-run factor a correlation over L lags can have.
    return np.maximum(factor, 1.0 / (2 * max_lag + 1))


@torch.no_grad()
def predict_trials(model: Likelihood, mels: Sequence[np.ndarray], batch_size: int = 8
                   ) -> list[np.ndarray]:
    """A(mel) of whole trials: mels (80, T_i) -> list of (T_i, C) float32 arrays."""
    model.eval()
    device = model.sigma.device
    order = np.argsort([m.shape[1] for m in mels])  # similar lengths together: less padding
    out: list[np.ndarray | None] = [None] * len(mels)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        mel, mask = _pad_batch([mels[i] for i in idx], time_axis=1)
        pred = model(mel.to(device), mask.to(device)).cpu().numpy()
        for j, i in enumerate(idx):
            out[i] = pred[j, : mels[i].shape[1]]
    return out  # type: ignore[return-value]


def evaluate_likelihood(model: Likelihood, trials: Sequence[Mapping[str, Any]],
                        batch_size: int = 8, noise_lags: int = 0) -> dict[str, Any]:
    """Fit of A on whole trials.

    Returns
    -------
    dict
        ``mse`` (mean over frames and electrodes), ``r`` (C,) Pearson r per electrode over the
        concatenated frames, ``r_mean`` (NaN-mean over electrodes), ``rms`` (C,) residual RMS
        per electrode, ``n_frames``, ``vif`` (C,) the residual's long-run variance factor over
        ``noise_lags`` frames (:func:`variance_inflation`), ``residuals`` (per trial, (T_i, C)
        y - A(mel), for the whitened noise model's fit).
    """
    preds = predict_trials(model, [np.asarray(t["mel"]) for t in trials], batch_size)
    return _metrics(preds, [np.asarray(t["neural"]) for t in trials], noise_lags)


@torch.no_grad()
def _cached_features(model: Likelihood, mels: Sequence[np.ndarray], batch_size: int
                     ) -> list[torch.Tensor]:
    """Backbone features of whole trials, (T_i, F) each, computed in length-sorted batches."""
    device = model.sigma.device
    order = np.argsort([m.shape[1] for m in mels])
    out: list[torch.Tensor | None] = [None] * len(mels)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        mel, mask = _pad_batch([mels[i] for i in idx], time_axis=1)
        lengths = frame_lengths(mask, mel.shape[0], mel.shape[2])
        feats = model.features(mel.to(device), lengths.to(device))
        for j, i in enumerate(idx):
            out[i] = feats[j, : mels[i].shape[1]].clone()
    return out  # type: ignore[return-value]


@torch.no_grad()
def _predict_cached(model: Likelihood, feats: Sequence[torch.Tensor], batch_size: int
                    ) -> list[np.ndarray]:
    out = []
    for s in range(0, len(feats), batch_size):
        chunk = feats[s:s + batch_size]
        lengths = torch.tensor([f.shape[0] for f in chunk], device=chunk[0].device)
        x = nn.utils.rnn.pad_sequence(list(chunk), batch_first=True)  # (B, T, F)
        pred = model.head(x, lengths).cpu().numpy()
        out.extend(pred[j, : f.shape[0]] for j, f in enumerate(chunk))
    return out


def _window_starts(lengths: np.ndarray, rng: np.random.Generator, n: int, w: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(trial, start, frames) of n random windows, trials drawn in proportion to length."""
    which = rng.choice(len(lengths), size=n, p=lengths / lengths.sum())
    starts = np.array([rng.integers(0, max(lengths[k] - w, 0) + 1) for k in which])
    return which, starts, np.minimum(w, lengths[which])


def _feature_batch(feats: Sequence[torch.Tensor], ys: Sequence[torch.Tensor], which, starts, ns,
                   past: int, lookahead: int):
    """Crops covering each window's receptive field: the head then predicts the window frames
    exactly as it would inside the whole trial. Returns (x (B, L, F), lengths (B,),
    y (B, L, C), loss_mask (B, L))."""
    crops, targets, spans = [], [], []
    for k, s, n in zip(which, starts, ns):
        t = feats[k].shape[0]
        lo, hi = max(0, s - past), min(t, s + n + lookahead)
        crops.append(feats[k][lo:hi])
        targets.append(ys[k][lo:hi])
        spans.append((s - lo, s - lo + n))
    lengths = torch.tensor([c.shape[0] for c in crops])
    x = nn.utils.rnn.pad_sequence(crops, batch_first=True)
    y = nn.utils.rnn.pad_sequence(targets, batch_first=True)
    pos = torch.arange(x.shape[1])[None, :]
    a = torch.tensor([sp[0] for sp in spans])[:, None]
    b = torch.tensor([sp[1] for sp in spans])[:, None]
    return x, lengths, y, (pos >= a) & (pos < b)


def _mel_batch(mels: Sequence[np.ndarray], neurals: Sequence[np.ndarray], which, starts, ns):
    """Windows of mel and neural (when the backbone trains): (mel (B, 80, W), y (B, W, C),
    mask (B, W))."""
    mel, mask = _pad_batch([mels[k][:, s:s + n] for k, s, n in zip(which, starts, ns)], 1)
    y, _ = _pad_batch([neurals[k][s:s + n] for k, s, n in zip(which, starts, ns)], 0)
    return mel, y, mask


def mel_normaliser(mels: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per-bin mean and std (floored at 1e-3) of training mels (80, T_i): the input
    normalisation of :class:`ConvLikelihood`."""
    total = sum(m.shape[1] for m in mels)
    s1 = sum(np.asarray(m, np.float64).sum(1) for m in mels)
    mean = s1 / total
    var = sum(((np.asarray(m, np.float64) - mean[:, None]) ** 2).sum(1) for m in mels) / total
    return mean, np.maximum(np.sqrt(var), 1e-3)


def set_mel_normaliser(model: ConvLikelihood, mean, std) -> None:
    model.mel_mean.copy_(torch.as_tensor(np.asarray(mean), dtype=model.mel_mean.dtype))
    model.mel_std.copy_(torch.as_tensor(np.asarray(std), dtype=model.mel_std.dtype))


def window_mse(pred: torch.Tensor, y: torch.Tensor, loss_mask: torch.Tensor, *,
               denominator: torch.Tensor | float | None = None, where: str = "likelihood",
               lr: float | None = None) -> torch.Tensor:
    """The training loss: squared error summed over the masked frames and all electrodes,
    divided by ``denominator`` (default: masked frames x electrodes, i.e. the MSE).

    A data-parallel worker passes the GLOBAL count divided by the number of workers, so that the
    averaged gradient equals the gradient of the MSE over the global batch. Raises
    FloatingPointError (naming ``where``) when the loss is not finite.
    """
    sq = ((pred - y) ** 2).sum(-1)  # (B, L)
    if denominator is None:
        denominator = loss_mask.sum() * pred.shape[-1]
    loss = torch.where(loss_mask, sq, 0.0).sum() / denominator
    if not torch.isfinite(loss):
        raise FloatingPointError(f"{where}: loss is {loss.item()}; lower lr"
                                 f"{f' (now {lr})' if lr is not None else ''} or check the "
                                 f"trials for NaN/inf")
    return loss


def set_noise_sigma(model: Likelihood, m: Mapping[str, Any], sigma_min: float) -> dict[str, Any]:
    """Set ``model.sigma`` from validation metrics ``m`` (with the long-run factor ``vif``):
    sigma = max(rms x sqrt(vif), sigma_min). Returns the validation numbers for the stats."""
    vif = m["vif"]
    sigma = np.maximum(m["rms"] * np.sqrt(vif), sigma_min)
    model.sigma.copy_(torch.from_numpy(sigma).to(model.sigma))
    out = {"val_mse": m["mse"], "val_r_mean": m["r_mean"], "val_r": [float(v) for v in m["r"]],
           "sigma": [float(v) for v in model.sigma], "val_rms": [float(v) for v in m["rms"]],
           "noise_vif": [float(v) for v in vif]}
    cfg = model.config
    if cfg.noise_model == "whitened":
        rank = min(cfg.noise_rank, max(model.n_electrodes - 1, 0))
        noise = fit_noise_model(m["residuals"], cfg.noise_order, rank)
        model.set_noise(noise)
        out["noise"] = {"model": "whitened", "order": noise.order, "rank": noise.rank,
                        "innov_std": [float(v) for v in noise.innov_std],
                        "val_nll_per_frame": float(noise.nll(
                            *_padded_residuals(m["residuals"])).sum()
                            / max(1, m["n_frames"] * model.n_electrodes))}
    return out


def _padded_residuals(residuals: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T_max, C) float64 residuals right-padded with zeros, and their (B, T_max) mask."""
    n = max(r.shape[0] for r in residuals)
    r = torch.zeros((len(residuals), n, residuals[0].shape[1]), dtype=torch.float64)
    mask = torch.zeros((len(residuals), n), dtype=torch.bool)
    for i, x in enumerate(residuals):
        r[i, :x.shape[0]] = torch.from_numpy(np.asarray(x, np.float64))
        mask[i, :x.shape[0]] = True
    return r, mask


def train_likelihood(trials: Sequence[Mapping[str, Any]], cfg: LikelihoodConfig | None = None,
                     progress: bool = True, whisper: nn.Module | None = None,
                     device: str | torch.device = "cpu") -> tuple[Likelihood, dict[str, Any]]:
    """Fit A(mel) -> neural for one subject; pick the best epoch on val; estimate sigma on val.

    Parameters
    ----------
    trials : sequence of dict
        ``neural`` (T, C) float32 z-scored high gamma at 100 Hz, ``mel`` (80, T) ssip mel aligned
        frame for frame, ``split`` ("train" | "val" | "test"), ``subject``, ``trial_id``. Test
        trials are ignored. Needs >= 1 train and >= 1 val trial, all of one subject.
    cfg : LikelihoodConfig, optional
    progress : bool
        Show a tqdm bar over epochs.
    whisper : transformers Whisper model, optional
        Already loaded ``cfg.whisper_model`` to reuse (kind "whisper").
    device : str or torch.device
        Where the model trains.

    Returns
    -------
    model : Likelihood
        Best-epoch weights, eval mode, ``sigma`` = RMS val residual per electrode
        (floored at ``cfg.sigma_min``).
    stats : dict
        ``val_mse``, ``val_r_mean``, ``val_r`` (list, per electrode), ``sigma`` (list),
        ``best_epoch`` (1-based), ``epochs``, ``samples_seen`` (windows), ``samples_per_s``
        (train windows per second of the training loop), ``cached_features`` (bool),
        ``feature_cache_s`` (0 unless cached), ``train_s``,
        ``history`` (per epoch: train_mse, val_mse, val_r_mean), ``subject``, ``n_electrodes``.
    """
    from tqdm.auto import tqdm

    cfg = cfg or LikelihoodConfig()
    n_el, subject = _check_trials(trials)
    train = [t for t in trials if t["split"] == "train"]
    val = [t for t in trials if t["split"] == "val"]
    if not train or not val:
        raise ValueError(f"train_likelihood (subject {subject!r}): {len(train)} train and "
                         f"{len(val)} val trials; both splits are needed (val picks the epoch "
                         f"and estimates the noise sigma)")
    mels = [np.asarray(t["mel"], np.float32) for t in train]
    neurals = [np.asarray(t["neural"], np.float32) for t in train]
    lengths = np.array([m.shape[1] for m in mels], dtype=np.float64)
    windows_per_epoch = max(1, math.ceil(lengths.sum() / cfg.window_frames))
    steps_per_epoch = max(1, math.ceil(windows_per_epoch / cfg.batch_size))
    epochs = (cfg.epochs if cfg.total_samples == 0
              else max(1, math.ceil(cfg.total_samples / (steps_per_epoch * cfg.batch_size))))
    rng = np.random.default_rng(cfg.seed)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = build_likelihood(cfg, n_el, whisper=whisper)
        if isinstance(model, ConvLikelihood):
            set_mel_normaliser(model, *mel_normaliser(mels))
        model.to(device)
        cached = cfg.cache_features and model.backbone_frozen
        cache_s = 0.0
        if cached:
            t0 = time.perf_counter()
            model.eval()
            feats = _cached_features(model, mels, cfg.batch_size)
            val_feats = _cached_features(model, [np.asarray(t["mel"], np.float32) for t in val],
                                         cfg.batch_size)
            ys = [torch.from_numpy(y).to(device) for y in neurals]
            cache_s = time.perf_counter() - t0
        val_y = [np.asarray(t["neural"], np.float32) for t in val]

        def validate(noise_lags: int = 0) -> dict[str, Any]:
            # The noise's long-run factor is needed once, for sigma: not on every epoch.
            if cached:
                return _metrics(_predict_cached(model, val_feats, cfg.batch_size), val_y,
                                noise_lags)
            return evaluate_likelihood(model, val, cfg.batch_size, noise_lags)

        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        history: list[dict[str, float]] = []
        best_score, best_state, best_epoch = -math.inf, None, 0
        train_s, seen = 0.0, 0
        bar = tqdm(range(1, epochs + 1), desc=f"likelihood {subject or ''}".strip(),
                   disable=not progress)
        for epoch in bar:
            model.train()
            t1 = time.perf_counter()
            losses = []
            for _ in range(steps_per_epoch):
                which, starts, ns = _window_starts(lengths.astype(np.int64), rng,
                                                   cfg.batch_size, cfg.window_frames)
                if cached:
                    x, lens, y, lmask = (v.to(device) for v in _feature_batch(
                        feats, ys, which, starts, ns, cfg.past, cfg.lookahead))
                    pred = model.head(x, lens)
                else:
                    mel, y, lmask = (v.to(device) for v in _mel_batch(
                        mels, neurals, which, starts, ns))
                    pred = model(mel, lmask)
                loss = window_mse(pred, y, lmask, where=f"train_likelihood (subject "
                                  f"{subject!r}), epoch {epoch}", lr=cfg.lr)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(loss.item())
                seen += len(which)
            train_s += time.perf_counter() - t1
            model.eval()
            m = validate()
            history.append({"epoch": epoch, "train_mse": float(np.mean(losses)),
                            "val_mse": m["mse"], "val_r_mean": m["r_mean"]})
            bar.set_postfix(val_mse=f"{m['mse']:.4f}", val_r=f"{m['r_mean']:.3f}")
            log.debug("likelihood epoch %d: %s", epoch, history[-1])
            score = -m["mse"] if cfg.select_on == "mse" else m["r_mean"]
            if score > best_score or best_state is None:
                best_score, best_epoch = score, epoch
                best_state = copy.deepcopy(model.trained_state())

    model.load_state_dict(best_state, strict=False)
    model.eval()
    stats = {
        "subject": subject,
        "n_electrodes": n_el,
        **set_noise_sigma(model, validate(cfg.noise_lags), cfg.sigma_min),
        "best_epoch": best_epoch,
        "epochs": epochs,
        "samples_seen": seen,
        "samples_per_s": seen / max(train_s, 1e-9),
        "train_s": train_s,
        "cached_features": cached,
        "feature_cache_s": cache_s,
        "history": history,
    }
    return model, stats


# ---------------------------------------------------------------------------------------------
# Checkpoints.


def _frozen_fingerprint(model: Likelihood) -> str | None:
    """SHA-256 of the frozen pretrained weights a checkpoint leaves out (None if there are none)."""
    keys = model.frozen_keys()
    if not keys:
        return None
    state = model.state_dict()
    h = hashlib.sha256()
    for k in sorted(keys):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def save_likelihood(directory: str, model: Likelihood, subject: str | None = None,
                    stats: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Save a trained likelihood as a checkpoint of kind "likelihood".

    The frozen pretrained Whisper weights are not stored (they are rebuilt from
    ``config.whisper_model`` on load); their SHA-256 is, so a changed backbone is refused.

    Parameters
    ----------
    directory : str
        Local path or ``s3://`` URI.
    model : Likelihood
    subject : str, optional
        Recorded in the manifest.
    stats : mapping, optional
        Training statistics (e.g. from :func:`train_likelihood`), stored under ``extra``.

    Returns
    -------
    dict
        The manifest as written.
    """
    from ssip.models.checkpoint import save_checkpoint

    manifest = {
        "kind": KIND,
        "config": dataclasses.asdict(model.config),
        "subject": subject,
        "n_electrodes": model.n_electrodes,
        "model_class": type(model).__name__,
        "extra": {"frozen_sha256": _frozen_fingerprint(model),
                  "stats": {k: v for k, v in (stats or {}).items() if k != "history"}},
    }
    return save_checkpoint(directory, model.trained_state(), manifest)


def load_likelihood(directory: str, whisper: nn.Module | None = None,
                    device: str | torch.device = "cpu") -> tuple[Likelihood, dict[str, Any]]:
    """Load a likelihood saved by :func:`save_likelihood`, in eval mode.

    Parameters
    ----------
    directory : str
    whisper : transformers Whisper model, optional
        Already loaded ``config.whisper_model`` to reuse.
    device : str or torch.device

    Returns
    -------
    model : Likelihood
    manifest : dict
        With ``subject``, ``n_electrodes``, ``config``, ``mel_version``, ``extra``.
    """
    from ssip.models.checkpoint import CheckpointError, load_checkpoint

    state, manifest = load_checkpoint(directory, KIND)
    where = f"{directory}: manifest"
    try:
        cfg = from_dict(LikelihoodConfig, manifest["config"])
        n_el = int(manifest["n_electrodes"])
    except (KeyError, TypeError, ConfigError) as e:
        raise CheckpointError(f"{where} fields 'config'/'n_electrodes' are unusable ({e}); "
                              f"re-save the likelihood with this version of ssip") from e
    model = build_likelihood(cfg, n_el, whisper=whisper)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = sorted(set(missing) - set(model.frozen_keys()))
    if missing or unexpected:
        raise CheckpointError(f"{directory}: weights do not fit a {type(model).__name__} of "
                              f"{n_el} electrodes (missing {missing}, unexpected {unexpected}); "
                              f"the checkpoint and its manifest 'config' disagree")
    stored = (manifest.get("extra") or {}).get("frozen_sha256")
    found = _frozen_fingerprint(model)
    if stored != found:
        raise CheckpointError(f"{where} field 'extra.frozen_sha256' is {stored!r} but the Whisper "
                              f"weights loaded from {cfg.whisper_model!r} hash to {found!r}; the "
                              f"backbone changed since training: retrain the likelihood")
    return model.to(device).eval(), manifest
