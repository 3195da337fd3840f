"""The mel prior: an EDM-preconditioned UNet denoiser over log-mel windows, its loss and training.

Karras, Aittala, Aila & Laine, "Elucidating the Design Space of Diffusion-Based Generative Models"
(NeurIPS 2022), Table 1 and Eq. 7-8: the denoiser is

    D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma))

with c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd / sqrt(sigma^2 + sd^2),
c_in = 1 / sqrt(sigma^2 + sd^2), c_noise = ln(sigma) / 4, where sd = sigma_data. Training draws
ln(sigma) ~ N(P_mean = -1.2, P_std = 1.2) and weights the squared error by
lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2, which makes the loss about 1 at every sigma for a
network that outputs zero.

ssip mels are not zero-mean (silence sits at ``MEL_FLOOR`` = -0.8 and the spectral tilt makes low
bins louder), so the prior stores the per-mel-bin data mean ``mu`` (80,) and ``sigma_data`` (the
std of training mels about ``mu``, one scalar) as buffers, and applies EDM to ``x - mu``:

    D(x; sigma) = mu + c_skip (x - mu) + c_out F(c_in (x - mu), c_noise).

Samplers see an ordinary EDM denoiser of mel-space x (they start from sigma_max * noise; the
offset mu is negligible there), so nothing outside this module needs to know about ``mu``.

The network is a compact 2-D UNet over (B, 1, 80, T) (mel bins x frames) in the style of
Dhariwal & Nichol's ADM / EDM's ``DhariwalUNet``: residual blocks with GroupNorm and SiLU whose
normalisation is modulated by the noise embedding, stride-2 convolutions down, nearest-neighbour
+ convolution up, and one self-attention block at the lowest resolution. Both 80 and the window
length T must be multiples of the total downsampling factor 2 ** (levels - 1) (8 for the presets),
so T = 64, 128, 256 ... are valid.

Training length and EMA half-life are counted in samples seen (edm/edm2); the loss is returned per
element and the loop reduces it; the loop logs the loss per quarter of the training sigma
distribution, so weak noise levels stay visible.
"""

from __future__ import annotations

import copy
import math
import statistics
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ssip.config import ConfigError, check_option, check_range, field
from ssip.mel import MEL_FLOOR, MEL_VERSION, N_MELS
from ssip.sampling import edm

#: UNet presets (80 mel bins). Both downsample by 8 in total, so windows are multiples of 8 frames.
PRESETS: dict[str, dict[str, Any]] = {
    # 2.67 M params, 5.5 GFLOP per training sample at window 128. CPU training speed at window
    # 128, batch 16: about 13 samples/s on 2 idle cores; 4-6 samples/s with 1 thread (and 1-1.5
    # with 2) while other jobs share the 2-core dev machine.
    "tiny": {
        "channels": 32,
        "channel_mult": (1, 2, 4),
        "num_blocks": 1,
        "emb_channels": 128,
        "attention_heads": 4,
        "dropout": 0.0,
        "groups": 8,
        "patch": 2,
    },
    # 21.0 M params; full-resolution first level, for a GPU.
    "base": {
        "channels": 64,
        "channel_mult": (1, 2, 3, 4),
        "num_blocks": 2,
        "emb_channels": 256,
        "attention_heads": 8,
        "dropout": 0.1,
        "groups": 16,
        "patch": 1,
    },
}


def downsampling_factor(channel_mult: Sequence[int], patch: int = 1) -> int:
    """Total down-sampling of a UNet with these levels and input patches: patch * 2 ** (levels - 1)."""
    return patch * 2 ** (len(channel_mult) - 1)


# ---------------------------------------------------------------------------------------------
# EDM preconditioning and loss (pure tensor math).


def edm_preconditioning(
    sigma: torch.Tensor, sigma_data: float | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """EDM's c_skip, c_out, c_in, c_noise (Karras et al. 2022, Table 1, "Ours").

    Parameters
    ----------
    sigma : Tensor, any shape
        Noise standard deviation (mel units), > 0.
    sigma_data : float or Tensor
        Standard deviation of the (mean-removed) data.

    Returns
    -------
    c_skip, c_out, c_in, c_noise : Tensor, each the shape of ``sigma``
    """
    # One copy of the formulas: ssip.sampling.edm (the samplers use the same ones).
    return edm.c_skip(sigma, sigma_data), edm.c_out(sigma, sigma_data), edm.c_in(sigma, sigma_data), \
        edm.c_noise(sigma)


def edm_loss_weight(sigma: torch.Tensor, sigma_data: float | torch.Tensor) -> torch.Tensor:
    """lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 (Karras et al. 2022, Table 1)."""
    return edm.loss_weight(sigma, sigma_data)


def sample_sigma(
    n: int,
    generator: torch.Generator,
    p_mean: float = -1.2,
    p_std: float = 1.2,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Training noise levels: ln(sigma) ~ N(p_mean, p_std^2); shape (n,), float32."""
    z = torch.randn(n, generator=generator, device=device)
    return (z * p_std + p_mean).exp()


def sigma_quartile_edges(p_mean: float = -1.2, p_std: float = 1.2) -> list[float]:
    """The 25/50/75 % quantiles of the training sigma distribution (edges of the logged buckets)."""
    nd = statistics.NormalDist(p_mean, p_std)
    return [math.exp(nd.inv_cdf(q)) for q in (0.25, 0.5, 0.75)]


def edm_loss(
    model: nn.Module,
    x0: torch.Tensor,
    generator: torch.Generator,
    sigma: torch.Tensor | None = None,
    p_mean: float = -1.2,
    p_std: float = 1.2,
) -> torch.Tensor:
    """EDM denoising loss per element: lambda(sigma) * (D(x0 + sigma n; sigma) - x0)^2.

    Parameters
    ----------
    model : EDMPrior
        Callable ``model(x, sigma) -> D(x; sigma)`` with a ``sigma_data`` attribute.
    x0 : Tensor, shape (B, 1, 80, T)
        Clean mel windows.
    generator : torch.Generator
        Source of the noise n (and of sigma when not given), on x0's device.
    sigma : Tensor, shape (B,), optional
        Noise levels; drawn from the training distribution (``p_mean``, ``p_std``) when None.

    Returns
    -------
    Tensor, shape (B, 1, 80, T)
        Unreduced weighted squared error; the training loop reduces it.
    """
    if sigma is None:
        sigma = sample_sigma(x0.shape[0], generator, p_mean, p_std, device=x0.device)
    s = sigma.reshape(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    n = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    denoised = model(x0 + s * n, sigma)
    # DDP / DeepSpeed wrap the prior and do not forward attributes: read sigma_data from .module.
    sigma_data = model.module.sigma_data if hasattr(model, "module") else model.sigma_data
    weight = edm_loss_weight(s, sigma_data)
    return weight * (denoised - x0) ** 2


# ---------------------------------------------------------------------------------------------
# The network.


class FourierFeatures(nn.Module):
    """Random Fourier features of a scalar (edm2's MPFourier): sqrt(2) cos(2 pi (f c + phi)).

    The frequencies f ~ N(0, 1) suit c_noise = ln(sigma) / 4, which spans about [-1.6, 1.1] over
    sigma in [0.002, 80]. Frequencies and phases are buffers (saved with the weights).
    """

    def __init__(self, num_channels: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("freqs", 2 * math.pi * torch.randn(num_channels, generator=g))
        self.register_buffer("phases", 2 * math.pi * torch.rand(num_channels, generator=g))

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        # (B,) -> (B, num_channels)
        return math.sqrt(2) * torch.cos(c.float()[:, None] * self.freqs + self.phases)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the second norm modulated by the noise embedding (scale, shift)."""

    def __init__(self, in_ch: int, out_ch: int, emb_ch: int, dropout: float, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(min(groups, in_ch), in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.affine = nn.Linear(emb_ch, 2 * out_ch)
        self.norm2 = nn.GroupNorm(min(groups, out_ch), out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        # Zero-initialised last conv: every block starts as the identity (stable early training).
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, out, H, W)
        scale, shift = self.affine(emb)[:, :, None, None].chunk(2, dim=1)
        h = F.silu(torch.addcmul(shift, self.norm2(h), scale + 1))
        h = self.conv2(self.dropout(h))
        # sqrt(1/2) keeps the variance of the residual sum near that of its inputs (EDM).
        return (self.skip(x) + h) * math.sqrt(0.5)


class AttentionBlock(nn.Module):
    """Multi-head self-attention over all (mel, frame) positions of a feature map."""

    def __init__(self, ch: int, heads: int, groups: int):
        super().__init__()
        if ch % heads:
            raise ConfigError(f"attention_heads={heads} must divide the channel count {ch}")
        self.heads = heads
        self.norm = nn.GroupNorm(min(groups, ch), ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        # (B, heads, HW, c/heads) for scaled_dot_product_attention.
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return (x + self.proj(out)) * math.sqrt(0.5)


class MelUNet(nn.Module):
    """F(c_in x, c_noise): (B, 1, 80, T) -> (B, 1, 80, T).

    Parameters
    ----------
    channels : int
        Channels at full resolution; level l has ``channels * channel_mult[l]``.
    channel_mult : sequence of int
        One entry per resolution level; the input is downsampled by 2 between levels, so 80 and
        T must be multiples of ``2 ** (len(channel_mult) - 1)``.
    num_blocks : int
        Residual blocks per level in the encoder (the decoder has one more, for the skip).
    emb_channels : int
        Width of the noise embedding MLP.
    attention_heads : int
        Heads of the self-attention block at the lowest resolution (0: no attention).
    dropout : float
    groups : int
        GroupNorm groups (capped by the channel count).
    patch : int
        Side of the square patches the input is folded into before the first level
        (``pixel_unshuffle``) and unfolded from at the output. A 2-D UNet at full 80 x T resolution
        costs most of its compute in the first level; patch 2 cuts that about four-fold, which is
        what makes the ``tiny`` preset train on a CPU.
    in_channels : int
    """

    def __init__(
        self,
        channels: int = 32,
        channel_mult: Sequence[int] = (1, 2, 4),
        num_blocks: int = 1,
        emb_channels: int = 128,
        attention_heads: int = 4,
        dropout: float = 0.0,
        groups: int = 8,
        patch: int = 2,
        in_channels: int = 1,
    ):
        super().__init__()
        self.patch = patch
        self.factor = downsampling_factor(channel_mult, patch)
        self.noise_features = FourierFeatures(emb_channels)
        self.emb = nn.Sequential(
            nn.Linear(emb_channels, emb_channels), nn.SiLU(), nn.Linear(emb_channels, emb_channels), nn.SiLU()
        )
        self.conv_in = nn.Conv2d(in_channels * patch**2, channels, 3, padding=1)
        self.down = nn.ModuleList()
        skip_ch = [channels]
        ch = channels
        for level, mult in enumerate(channel_mult):
            for _ in range(num_blocks):
                self.down.append(ResBlock(ch, channels * mult, emb_channels, dropout, groups))
                ch = channels * mult
                skip_ch.append(ch)
            if level < len(channel_mult) - 1:
                self.down.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                skip_ch.append(ch)
        self.mid1 = ResBlock(ch, ch, emb_channels, dropout, groups)
        self.mid_attn = AttentionBlock(ch, attention_heads, groups) if attention_heads else nn.Identity()
        self.mid2 = ResBlock(ch, ch, emb_channels, dropout, groups)
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(num_blocks + 1):
                self.up.append(ResBlock(ch + skip_ch.pop(), channels * mult, emb_channels, dropout, groups))
                ch = channels * mult
            if level > 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                             nn.Conv2d(ch, ch, 3, padding=1)))
        self.norm_out = nn.GroupNorm(min(groups, ch), ch)
        self.conv_out = nn.Conv2d(ch, in_channels * patch**2, 3, padding=1)
        # Zero output at initialisation: D(x; sigma) = c_skip x, whose weighted loss is about 1.
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] % self.factor or x.shape[-1] % self.factor:
            raise ValueError(
                f"MelUNet input {tuple(x.shape)}: mel bins and frames must be multiples of "
                f"{self.factor} (the UNet's total downsampling); use window_frames = k * {self.factor}"
            )
        emb = self.emb(self.noise_features(c_noise))  # (B, E)
        h = self.conv_in(F.pixel_unshuffle(x, self.patch))  # (B, C, 80/p, T/p)
        skips = [h]
        for block in self.down:
            h = block(h, emb) if isinstance(block, ResBlock) else block(h)
            skips.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)  # (B, C_low, 80/f, T/f)
        for block in self.up:
            if isinstance(block, ResBlock):
                h = block(torch.cat([h, skips.pop()], dim=1), emb)
            else:
                h = block(h)
        return F.pixel_shuffle(self.conv_out(F.silu(self.norm_out(h))), self.patch)


class EDMPrior(nn.Module):
    """EDM denoiser D(x; sigma) over ssip mel windows (see the module docstring).

    Parameters
    ----------
    preset : str
        Key of :data:`PRESETS`.
    sigma_data : float
        Std of training mels about ``data_mean`` (from :func:`estimate_data_stats`).
    data_mean : array-like, shape (80,), optional
        Per-mel-bin mean of the training mels; zeros when None.
    **unet_overrides
        Replace preset entries (e.g. ``channels=16`` for a test-sized model).

    Notes
    -----
    ``forward(x, sigma)`` accepts x of shape (B, 1, 80, T) or (B, 80, T) and returns the same
    shape; sigma is a float or a tensor of shape (B,) (or broadcastable to it).
    """

    def __init__(
        self,
        preset: str = "tiny",
        *,
        sigma_data: float = 0.5,
        data_mean: Sequence[float] | np.ndarray | torch.Tensor | None = None,
        n_mels: int = N_MELS,
        **unet_overrides: Any,
    ):
        super().__init__()
        check_option("preset", preset, PRESETS)
        unknown = sorted(set(unet_overrides) - set(PRESETS[preset]))
        if unknown:
            raise ConfigError(f"EDMPrior: unknown UNet option(s) {unknown}; known: {sorted(PRESETS[preset])}")
        self.preset = preset
        self.unet_kwargs = {**PRESETS[preset], **unet_overrides}
        self.unet_kwargs["channel_mult"] = tuple(self.unet_kwargs["channel_mult"])
        self.factor = downsampling_factor(self.unet_kwargs["channel_mult"], self.unet_kwargs["patch"])
        if n_mels % self.factor:
            raise ConfigError(f"n_mels={n_mels} is not a multiple of the UNet downsampling {self.factor}")
        self.net = MelUNet(**self.unet_kwargs)
        check_range("sigma_data", float(sigma_data), 1e-6, None)
        mean = torch.zeros(n_mels) if data_mean is None else torch.as_tensor(data_mean, dtype=torch.float32)
        if mean.shape != (n_mels,):
            raise ValueError(f"data_mean must have shape ({n_mels},), got {tuple(mean.shape)}")
        self.register_buffer("sigma_data", torch.tensor(float(sigma_data)))
        self.register_buffer("data_mean", mean.clone())

    def forward(self, x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        squeeze = x.ndim == 3
        if squeeze:
            x = x[:, None]  # (B, 80, T) -> (B, 1, 80, T)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1)
        sigma = sigma.expand(x.shape[0]) if sigma.numel() == 1 else sigma
        # D = mu + c_skip (x - mu) + c_out F(c_in (x - mu), c_noise), coefficients in float32.
        mu = self.data_mean.view(1, 1, -1, 1)
        d_x = edm.precondition(self.net, x, sigma, self.sigma_data, mean=mu)
        return d_x[:, 0] if squeeze else d_x


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# Data helpers (numpy in, numpy out).


def estimate_data_stats(mels: Sequence[np.ndarray]) -> tuple[np.ndarray, float]:
    """Per-mel-bin mean (80,) and sigma_data (std of all frames about that mean) of training mels.

    Parameters
    ----------
    mels : sequence of ndarray, each (80, T_i)
    """
    if not mels:
        raise ValueError("estimate_data_stats: no mels given")
    cat = np.concatenate([np.asarray(m, dtype=np.float64) for m in mels], axis=1)  # (80, sum T)
    mean = cat.mean(axis=1)
    sigma_data = float(np.sqrt(((cat - mean[:, None]) ** 2).mean()))
    return mean.astype(np.float32), sigma_data


def source_probabilities(lengths: Sequence[int], sources: Sequence[str],
                         weights: dict[str, float] | None) -> np.ndarray:
    """Probability of drawing each mel: ``weights[source]`` shared within a source by length.

    With no weights every frame of the corpus is equally likely (probability proportional to
    length). With weights, source ``s`` gets ``weights[s] / sum of the weights of the sources
    present`` of the windows; a source present but missing from ``weights`` gets none.

    Returns
    -------
    ndarray, shape (len(lengths),), float64, sums to 1.
    """
    lengths = np.asarray(lengths, dtype=np.float64)
    if not weights:
        return lengths / lengths.sum()
    if len(sources) != len(lengths):
        raise ValueError(f"source_probabilities: {len(sources)} sources for {len(lengths)} mels")
    src = np.asarray(sources)
    present = sorted(set(sources))
    total = sum(float(weights.get(s, 0.0)) for s in present)
    if total <= 0:
        raise ValueError(f"source weights {weights} give no weight to any source present "
                         f"({present}); name at least one of them")
    p = np.zeros_like(lengths)
    for s in present:
        mask = src == s
        p[mask] = float(weights.get(s, 0.0)) / total * lengths[mask] / lengths[mask].sum()
    return p


def random_windows(
    mels: Sequence[np.ndarray], window: int, n: int, rng: np.random.Generator,
    p: np.ndarray | None = None,
) -> np.ndarray:
    """Cut ``n`` random windows of ``window`` frames from a list of mels.

    A mel is chosen with probability ``p`` (default: proportional to its length, so every frame
    of the corpus is about equally likely; see :func:`source_probabilities`), then a start frame
    uniformly. A mel shorter than ``window`` is placed
    at a random offset inside the window and the rest is filled with ``MEL_FLOOR`` (silence).

    Parameters
    ----------
    mels : sequence of ndarray, each (80, T_i)
    window : int
        Window length in frames (10 ms each).
    n : int
    rng : numpy.random.Generator

    Returns
    -------
    ndarray, shape (n, 80, window), float32
    """
    if not mels:
        raise ValueError("random_windows: no mels given")
    lengths = np.array([m.shape[1] for m in mels], dtype=np.float64)
    if np.any(lengths <= 0):
        raise ValueError(f"random_windows: mel(s) {np.flatnonzero(lengths <= 0).tolist()} have no frames")
    n_mels = mels[0].shape[0]
    out = np.full((n, n_mels, window), MEL_FLOOR, dtype=np.float32)
    which = rng.choice(len(mels), size=n, p=lengths / lengths.sum() if p is None else p)
    for i, k in enumerate(which):
        m = mels[k]
        t = m.shape[1]
        if t >= window:
            start = int(rng.integers(0, t - window + 1))
            out[i] = m[:, start : start + window]
        else:
            offset = int(rng.integers(0, window - t + 1))
            out[i, :, offset : offset + t] = m
    return out


def window_batches(
    mels: Sequence[np.ndarray], window: int, batch_size: int, rng: np.random.Generator,
    n_batches: int | None = None, p: np.ndarray | None = None,
) -> Iterator[torch.Tensor]:
    """Endless (or ``n_batches``) batches of random windows, as tensors (B, 1, 80, window)."""
    i = 0
    while n_batches is None or i < n_batches:
        yield torch.from_numpy(random_windows(mels, window, batch_size, rng, p))[:, None]
        i += 1


# ---------------------------------------------------------------------------------------------
# Config, EMA, training.


@dataclass
class PriorConfig:
    """Training configuration of the mel prior (lengths counted in samples = mel windows)."""

    preset: str = field("tiny", help=f"UNet size, one of {list(PRESETS)}")
    window_frames: int = field(128, help="training window length in mel frames (10 ms each); a "
                               "multiple of the UNet downsampling factor (8 for the presets)")
    batch_size: int = field(16, help="windows per optimizer step")
    lr: float = field(2e-4, help="AdamW peak learning rate")
    weight_decay: float = field(0.0, help="AdamW decoupled weight decay")
    warmup_samples: int = field(10_000, help="linear learning-rate warm-up length, in samples seen")
    ema_halflife_samples: int = field(10_000, help="EMA half-life in samples seen (edm2 style)")
    ema_rampup_ratio: float = field(0.05, help="cap the EMA half-life at this fraction of the "
                                    "samples seen so far (EDM); 0 disables the ramp-up")
    total_samples: int = field(200_000, help="training length in samples (windows) seen")
    p_mean: float = field(-1.2, help="mean of ln(sigma) of the training noise (EDM P_mean)")
    p_std: float = field(1.2, help="std of ln(sigma) of the training noise (EDM P_std)")
    grad_clip: float = field(1.0, help="clip the gradient norm to this; 0 disables")
    log_every_samples: int = field(10_000, help="log the loss (per sigma quartile) this often")
    seed: int = field(0, help="seed of the noise/sigma generator and of window sampling")
    source_weights: dict[str, float] = field(
        default_factory=dict, help="share of training windows per speech source (a speech "
        "corpus's 'source' column); empty = every frame equally likely")
    init: str = field("", help="start from these weights instead of random ones (fine-tuning): "
                      "'shipped' (the prior that ships with ssip) or a prior checkpoint folder; "
                      "the network keeps that prior's data mean and sigma_data; '' = from scratch")

    def __post_init__(self) -> None:
        check_option("preset", self.preset, PRESETS)
        for k, w in self.source_weights.items():
            if not (isinstance(w, int | float) and w >= 0):
                raise ConfigError(f"source_weights[{k!r}]={w!r} must be a number >= 0")
        factor = downsampling_factor(PRESETS[self.preset]["channel_mult"], PRESETS[self.preset]["patch"])
        check_range("window_frames", self.window_frames, factor, None)
        if self.window_frames % factor:
            raise ConfigError(
                f"window_frames={self.window_frames} must be a multiple of {factor} (the total "
                f"downsampling of preset {self.preset!r})"
            )
        check_range("batch_size", self.batch_size, 1, None)
        check_range("lr", self.lr, 0.0, 1.0)
        check_range("weight_decay", self.weight_decay, 0.0, None)
        check_range("warmup_samples", self.warmup_samples, 0, None)
        check_range("ema_halflife_samples", self.ema_halflife_samples, 1, None)
        check_range("ema_rampup_ratio", self.ema_rampup_ratio, 0.0, None)
        check_range("total_samples", self.total_samples, 1, None)
        check_range("p_std", self.p_std, 1e-6, None)
        check_range("grad_clip", self.grad_clip, 0.0, None)
        check_range("log_every_samples", self.log_every_samples, 1, None)


def ema_beta(batch_size: int, halflife_samples: float, samples_seen: int | None = None,
             rampup_ratio: float | None = None) -> float:
    """Per-step EMA decay so that a weight's influence halves every ``halflife_samples`` samples.

    beta = 0.5 ** (batch_size / halflife), with the half-life capped at
    ``rampup_ratio * samples_seen`` when both are given (EDM's ramp-up, so early weights fade fast).
    """
    h = float(halflife_samples)
    if rampup_ratio and samples_seen is not None:
        h = min(h, rampup_ratio * samples_seen)
    return 0.5 ** (batch_size / max(h, 1e-8))


class EMA:
    """Exponential moving average of a model's weights (buffers are copied, not averaged)."""

    def __init__(self, model: nn.Module):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, beta: float) -> None:
        for p_ema, p in zip(self.model.parameters(), model.parameters(), strict=True):
            p_ema.lerp_(p.detach(), 1.0 - beta)
        for b_ema, b in zip(self.model.buffers(), model.buffers(), strict=True):
            b_ema.copy_(b)


def learning_rate(samples_seen: int, cfg: PriorConfig) -> float:
    """Linear warm-up over ``warmup_samples``, then constant (EDM)."""
    if cfg.warmup_samples <= 0:
        return cfg.lr
    return cfg.lr * min(1.0, samples_seen / cfg.warmup_samples)


def prior_loss(
    model: nn.Module, x0: torch.Tensor, generator: torch.Generator, cfg: PriorConfig,
    lr: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The training loss of one batch: sigma ~ lognormal(p_mean, p_std), EDM-weighted denoising.

    Returns the scalar loss (in the graph), the per-sample losses (B,) (detached) and the sigmas
    (B,). Raises FloatingPointError, naming the sigma range, when the loss is not finite.
    """
    model.train()
    sigma = sample_sigma(x0.shape[0], generator, cfg.p_mean, cfg.p_std, device=x0.device)
    per_element = edm_loss(model, x0, generator, sigma=sigma)  # (B, 1, 80, T)
    per_sample = per_element.float().mean(dim=tuple(range(1, per_element.ndim)))  # (B,)
    loss = per_sample.mean()
    if not torch.isfinite(loss):
        raise FloatingPointError(
            f"prior training: loss is {loss.item()} at sigma in [{sigma.min().item():.3g}, "
            f"{sigma.max().item():.3g}]; lower lr{f' (now {lr:.3g})' if lr is not None else ''} "
            f"or check the mels for NaN/inf"
        )
    return loss, per_sample.detach(), sigma


def train_step(
    model: EDMPrior,
    optimizer: torch.optim.Optimizer,
    x0: torch.Tensor,
    generator: torch.Generator,
    cfg: PriorConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on a batch of clean mel windows.

    Parameters
    ----------
    x0 : Tensor, shape (B, 1, 80, T)

    Returns
    -------
    loss : Tensor, shape (B,)
        Per-sample mean of the per-element EDM loss (detached).
    sigma : Tensor, shape (B,)
    """
    loss, per_sample, sigma = prior_loss(model, x0, generator, cfg,
                                         lr=optimizer.param_groups[0]["lr"])
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    return per_sample.detach(), sigma


def _as_batch(batch: Any, device: torch.device) -> torch.Tensor:
    x = torch.as_tensor(batch, dtype=torch.float32)
    if x.ndim == 3:
        x = x[:, None]  # (B, 80, T) -> (B, 1, 80, T)
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"prior batch must be (B, 80, T) or (B, 1, 80, T), got {tuple(x.shape)}")
    return x.to(device)


def train_prior(
    model: EDMPrior,
    batches: Iterable[Any],
    cfg: PriorConfig,
    progress: bool = True,
    *,
    ema: EMA | None = None,
) -> dict[str, Any]:
    """Train the prior on an iterable of mel batches until ``cfg.total_samples`` have been seen.

    Parameters
    ----------
    model : EDMPrior
        Trained in place (its ``sigma_data`` and ``data_mean`` should already be set).
    batches : iterable of Tensor or ndarray, each (B, 80, T) or (B, 1, 80, T)
        E.g. :func:`window_batches`; stops early if it runs out.
    cfg : PriorConfig
    progress : bool
        Print one line per ``cfg.log_every_samples`` to stderr.
    ema : EMA, optional
        Continue an existing EMA (resume); a new one is made from ``model`` when None.

    Returns
    -------
    dict
        ``samples_seen``, ``steps``, ``seconds``, ``samples_per_s``, ``loss`` (mean over the last
        log interval), ``loss_by_sigma_quartile`` (same interval, 4 values from low to high sigma),
        ``sigma_quartile_edges``, ``history`` (one dict per log interval), ``lr``, and ``ema``
        (the :class:`EMA` whose ``.model`` is the network to sample with).
    """
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    ema = ema if ema is not None else EMA(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99),
                                  weight_decay=cfg.weight_decay)
    edges = torch.tensor(sigma_quartile_edges(cfg.p_mean, cfg.p_std))
    bucket_sum = torch.zeros(4, dtype=torch.float64)
    bucket_n = torch.zeros(4, dtype=torch.float64)
    history: list[dict[str, Any]] = []
    samples_seen, steps, next_log = 0, 0, cfg.log_every_samples
    start = time.perf_counter()
    lr = 0.0

    def log() -> None:
        by_q = (bucket_sum / bucket_n.clamp_min(1)).tolist()
        row = {"samples": samples_seen, "loss": float(bucket_sum.sum() / bucket_n.sum().clamp_min(1)),
               "loss_by_sigma_quartile": by_q, "lr": lr,
               "seconds": time.perf_counter() - start}
        history.append(row)
        if progress:
            q = " ".join(f"{v:.3f}" for v in by_q)
            print(f"[prior] {samples_seen:>9d} samples  loss {row['loss']:.4f}  by sigma quartile "
                  f"[{q}]  lr {lr:.2e}  {samples_seen / row['seconds']:.1f} samples/s",
                  file=sys.stderr, flush=True)
        bucket_sum.zero_()
        bucket_n.zero_()

    for batch in batches:
        if samples_seen >= cfg.total_samples:
            break
        x0 = _as_batch(batch, device)
        lr = learning_rate(samples_seen, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        per_sample, sigma = train_step(model, optimizer, x0, generator, cfg)
        samples_seen += x0.shape[0]
        steps += 1
        ema.update(model, ema_beta(x0.shape[0], cfg.ema_halflife_samples, samples_seen,
                                   cfg.ema_rampup_ratio or None))
        bucket = torch.bucketize(sigma.cpu(), edges)  # 0..3, low to high sigma
        bucket_sum.index_add_(0, bucket, per_sample.cpu().double())
        bucket_n.index_add_(0, bucket, torch.ones_like(per_sample.cpu(), dtype=torch.float64))
        if samples_seen >= next_log:
            log()
            next_log += cfg.log_every_samples
    if bucket_n.sum() > 0:
        log()
    seconds = time.perf_counter() - start
    last = history[-1] if history else {"loss": float("nan"), "loss_by_sigma_quartile": [float("nan")] * 4}
    return {
        "samples_seen": samples_seen,
        "steps": steps,
        "seconds": seconds,
        "samples_per_s": samples_seen / max(seconds, 1e-9),
        "loss": last["loss"],
        "loss_by_sigma_quartile": last["loss_by_sigma_quartile"],
        "sigma_quartile_edges": edges.tolist(),
        "history": history,
        "lr": lr,
        "ema": ema,
    }


@torch.no_grad()
def denoising_loss(model: EDMPrior, x0: torch.Tensor, sigmas: Sequence[float], seed: int = 0) -> list[float]:
    """Mean EDM loss of ``model`` on clean windows ``x0`` (B, 1, 80, T) at each fixed sigma
    (same noise for every model given the same seed): a held-out score of a prior."""
    model.eval()
    out = []
    for i, s in enumerate(sigmas):
        g = torch.Generator(device=x0.device).manual_seed(seed + i)
        sigma = torch.full((x0.shape[0],), float(s), device=x0.device)
        out.append(float(edm_loss(model, x0, g, sigma=sigma).mean()))
    return out


# ---------------------------------------------------------------------------------------------
# Checkpoints.


def save_prior(directory: str, model: EDMPrior, cfg: PriorConfig, *, ema: EMA | None = None,
               stats: dict[str, Any] | None = None) -> dict[str, Any]:
    """Save the prior (the EMA weights when ``ema`` is given: those are the ones to sample with)."""
    from ssip.models.checkpoint import save_checkpoint

    net = ema.model if ema is not None else model
    numbers = {k: v for k, v in (stats or {}).items()
               if k in ("samples_seen", "steps", "seconds", "samples_per_s", "loss",
                        "loss_by_sigma_quartile", "data_wait_s", "resumed_from")}
    extra = {
        "preset": model.preset,
        "unet": {k: list(v) if isinstance(v, tuple) else v for k, v in model.unet_kwargs.items()},
        "n_mels": int(model.data_mean.shape[0]),
        "sigma_data": float(model.sigma_data),
        "weights": "ema" if ema is not None else "raw",
        "params": count_parameters(model),
        "train_stats": numbers,
        "data": (stats or {}).get("data", {}),
    }
    state = {k: v for k, v in net.state_dict().items()}
    return save_checkpoint(directory, state, {"kind": "prior", "config": cfg, "extra": extra})


#: The name that stands for the prior shipped with ssip wherever a prior folder is asked for.
SHIPPED = "shipped"
#: Where the shipped prior lives: weights, manifest, model card and its corpus's utterance ids.
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "assets" / "prior"


#: File of a shipped prior's folder listing its training corpus's utterance ids, one per line.
UTTERANCES_NAME = "utterances.txt"


def prior_location(directory: str) -> str:
    """The folder of a prior: ``"shipped"`` is :data:`SHIPPED_DIR`, anything else is itself."""
    return str(SHIPPED_DIR) if directory == SHIPPED else directory


def corpus_utterances(directory: str) -> set[str] | None:
    """Utterance ids a prior trained on when its folder lists them (:data:`UTTERANCES_NAME`: the
    shipped prior, whose corpus is not in the repository); None otherwise."""
    from ssip import storage

    path = storage.join(prior_location(directory), UTTERANCES_NAME)
    if not storage.exists(path):
        return None
    return {line.strip() for line in storage.read_bytes(path).decode().splitlines() if line.strip()}


def initial_prior(cfg: PriorConfig, sigma_data: float, data_mean: Any,
                  unet: dict[str, Any] | None = None) -> EDMPrior:
    """The network training starts from: a fresh one with the data's statistics, or the weights
    of ``cfg.init`` (fine-tuning), which keep the statistics that prior was trained with."""
    if not cfg.init:
        return EDMPrior(cfg.preset, sigma_data=sigma_data, data_mean=data_mean, **(unet or {}))
    model, manifest = load_prior(cfg.init)
    if model.preset != cfg.preset or (unet and any(model.unet_kwargs.get(k) != v
                                                   for k, v in unet.items())):
        raise ConfigError(f"init={cfg.init!r} is a {model.preset!r} prior "
                          f"({manifest.get('extra', {}).get('unet')}); set preset: "
                          f"{model.preset} to fine-tune it")
    return model


def load_prior(directory: str) -> tuple[EDMPrior, dict[str, Any]]:
    """Load a prior saved by :func:`save_prior` (``"shipped"``: the prior that ships with ssip);
    refuses another kind, mel version or size."""
    from ssip.models.checkpoint import CheckpointError, load_checkpoint, read_manifest

    directory = prior_location(directory)
    manifest = read_manifest(directory)
    if manifest.get("kind") != "prior" or manifest.get("mel_version") != MEL_VERSION:
        load_checkpoint(directory, "prior")  # raises the standard refusal naming the field
    extra = manifest.get("extra", {})
    if manifest.get("kind") == "prior" and ("preset" not in extra or "unet" not in extra):
        raise CheckpointError(f"{directory}/manifest.json: field 'extra' lacks 'preset'/'unet'; "
                              f"it was not written by ssip.models.prior.save_prior")
    unet = dict(extra.get("unet", {}))
    preset = extra.get("preset", "tiny")
    model = EDMPrior(preset if preset in PRESETS else "tiny", n_mels=int(extra.get("n_mels", N_MELS)), **unet)
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    state, manifest = load_checkpoint(directory, "prior", expect_shapes=shapes)
    model.load_state_dict(state)
    return model, manifest
