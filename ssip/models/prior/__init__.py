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

from ssip.models.prior.checkpoint import (
    SHIPPED,
    SHIPPED_DIR,
    UTTERANCES_NAME,
    corpus_utterances,
    initial_prior,
    load_prior,
    prior_location,
    save_prior,
)
from ssip.models.prior.config import PriorConfig
from ssip.models.prior.model import (
    PRESETS,
    EDMPrior,
    MelUNet,
    count_parameters,
    downsampling_factor,
    edm_loss,
    edm_loss_weight,
    edm_preconditioning,
    sample_sigma,
    sigma_quartile_edges,
)
from ssip.models.prior.train import (
    EMA,
    denoising_loss,
    ema_beta,
    estimate_data_stats,
    fit_prior,
    learning_rate,
    prior_loss,
    random_windows,
    source_probabilities,
    train_prior,
    window_batches,
)

__all__ = [
    "EMA", "PRESETS", "SHIPPED", "SHIPPED_DIR", "UTTERANCES_NAME", "EDMPrior", "MelUNet",
    "PriorConfig", "corpus_utterances", "count_parameters", "denoising_loss",
    "downsampling_factor", "edm_loss", "edm_loss_weight", "edm_preconditioning", "ema_beta",
    "estimate_data_stats", "fit_prior", "initial_prior", "learning_rate", "load_prior",
    "prior_location", "prior_loss", "random_windows", "sample_sigma", "save_prior",
    "sigma_quartile_edges", "source_probabilities", "train_prior", "window_batches",
]
