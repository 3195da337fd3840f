"""The forward models A(mel) -> neural: a temporal head on a frozen Whisper encoder or on the mel."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ssip.config import ConfigError
from ssip.mel import N_MELS
from ssip.models.likelihood.config import NOISE_PREFIX, LikelihoodConfig
from ssip.sampling.whitening import TENSOR_NAMES as NOISE_TENSORS
from ssip.sampling.whitening import NoiseModel

log = logging.getLogger(__name__)


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

    def features(self, mel: torch.Tensor, lengths: torch.Tensor,
                 **backbone_kw: Any) -> torch.Tensor:
        """Backbone features at 100 Hz: mel (B, 80, T), lengths (B,) -> (B, T, F)."""
        raise NotImplementedError

    def forward(self, mel: torch.Tensor, frame_mask: torch.Tensor | None = None,
                **backbone_kw: Any) -> torch.Tensor:
        """Predicted neural features A(mel).

        Parameters
        ----------
        mel : Tensor, shape (B, 80, T)
            ssip log-mel at 100 frames/s (any float dtype; cast to the model's).
        frame_mask : bool Tensor, shape (B, T), optional
            True on real frames; items are right-padded (see :func:`frame_lengths`).
        **backbone_kw
            Passed to :meth:`features` (the Whisper encoder's benchmark-only naive switches,
            set by :func:`ssip.decode.whisper_switches`); none on the production path.

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
        return self.head(self.features(mel, lengths, **backbone_kw), lengths)

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

    def features(self, mel: torch.Tensor, lengths: torch.Tensor,
                 **backbone_kw: Any) -> torch.Tensor:
        if backbone_kw:
            raise ValueError(f"ConvLikelihood has no backbone switches; got {sorted(backbone_kw)}")
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

    def features(self, mel: torch.Tensor, lengths: torch.Tensor,
                 **encoder_kw: Any) -> torch.Tensor:
        """Tapped hidden state upsampled to 100 Hz: (B, 80, T) -> (B, T, d_model).

        Each item runs as it would alone on its first ``length`` frames (the masked forward of
        :class:`~ssip.models.whisper.WhisperEncoderWindow`: odd lengths padded by one mel-floor
        frame, the mel past the length zeroed, the keys of padded 50 Hz positions masked). A mel
        longer than Whisper's 30 s is encoded in overlapping 30 s windows
        (:data:`LONG_CONTEXT` frames of context on each inner side), each window's centre kept.
        ``encoder_kw`` goes to the encoder's forward: the benchmark-only naive switches
        ``pad_to`` / ``rest_layers`` (:func:`ssip.decode.whisper_switches`); none in production.
        """
        t = mel.shape[2]
        w = self.encoder.max_frames
        if t <= w:
            return self._window_features(mel, lengths, encoder_kw)
        core = w - 2 * LONG_CONTEXT
        parts = []
        for c0 in range(0, t, core):
            a, b = max(0, c0 - LONG_CONTEXT), min(t, c0 + core + LONG_CONTEXT)
            feats = self._window_features(mel[:, :, a:b], (lengths - a).clamp(0, b - a),
                                          encoder_kw)
            parts.append(feats[:, c0 - a: min(t, c0 + core) - a])
        return torch.cat(parts, dim=1)

    def _window_features(self, mel: torch.Tensor, lengths: torch.Tensor,
                         encoder_kw: dict[str, Any]) -> torch.Tensor:
        x = self.encoder(mel, lengths, **encoder_kw)  # (B, T2, d) at 50 Hz
        # Nearest 50 -> 100 Hz (frame t -> position t // 2; position j is centred on frame 2j):
        # pointwise in time, so it never mixes padding into real frames; the head smooths.
        return x.repeat_interleave(2, dim=1)[:, :mel.shape[2]]  # (B, T, d)


def build_likelihood(config: LikelihoodConfig, n_electrodes: int,
                     whisper: nn.Module | None = None) -> Likelihood:
    """An untrained :class:`WhisperLikelihood` or :class:`ConvLikelihood` for ``config.kind``."""
    if config.kind == "conv":
        return ConvLikelihood(n_electrodes, config)
    return WhisperLikelihood(n_electrodes, config, whisper=whisper)



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
