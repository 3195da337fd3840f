"""The likelihood's config: the forward model, its training and its noise model."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ssip.config import ConfigError, check_option, check_range, field

log = logging.getLogger(__name__)


KIND = "likelihood"
#: State-dict prefix of the whitened noise model's buffers (noise_model: whitened).
NOISE_PREFIX = "noise_"
SPLITS = ("train", "val", "test")

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
