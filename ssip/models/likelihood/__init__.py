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

from ssip.models.likelihood.checkpoint import load_likelihood, save_likelihood
from ssip.models.likelihood.config import KIND, NOISE_PREFIX, SPLITS, LikelihoodConfig
from ssip.models.likelihood.model import (
    LONG_CONTEXT,
    ConvLikelihood,
    Likelihood,
    TemporalHead,
    WhisperLikelihood,
    build_likelihood,
    frame_lengths,
    mel_normaliser,
    set_mel_normaliser,
)
from ssip.models.likelihood.noise import (
    evaluate_likelihood,
    pearson_per_electrode,
    predict_trials,
    set_noise_sigma,
    variance_inflation,
)
from ssip.models.likelihood.residual import make_residual
from ssip.models.likelihood.train import train_likelihood, window_mse

__all__ = [
    "KIND", "LONG_CONTEXT", "NOISE_PREFIX", "SPLITS", "ConvLikelihood", "Likelihood",
    "LikelihoodConfig", "TemporalHead", "WhisperLikelihood", "build_likelihood",
    "evaluate_likelihood", "frame_lengths", "load_likelihood", "make_residual", "mel_normaliser",
    "pearson_per_electrode", "predict_trials", "save_likelihood", "set_mel_normaliser",
    "set_noise_sigma", "train_likelihood", "variance_inflation", "window_mse",
]
