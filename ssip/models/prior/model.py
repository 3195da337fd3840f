"""The prior's network and EDM math: presets, preconditioning, the denoising loss, the UNet."""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ssip.config import ConfigError, check_option, check_range
from ssip.mel import N_MELS
from ssip.sampling import edm

log = logging.getLogger(__name__)


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
