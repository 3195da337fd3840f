"""The prior's config: preset, windows, schedule, EMA and training length."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ssip.config import ConfigError, check_option, check_range, field
from ssip.models.prior.model import PRESETS, downsampling_factor

log = logging.getLogger(__name__)


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
