"""Prior checkpoints (safetensors + manifest of kind "prior") and the prior shipped with ssip."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ssip.config import ConfigError
from ssip.mel import MEL_VERSION, N_MELS
from ssip.models.prior.config import PriorConfig
from ssip.models.prior.model import PRESETS, EDMPrior, count_parameters
from ssip.models.prior.train import EMA

log = logging.getLogger(__name__)


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
SHIPPED_DIR = Path(__file__).resolve().parents[2] / "assets" / "prior"


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
