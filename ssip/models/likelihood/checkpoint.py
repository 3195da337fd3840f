"""Likelihood checkpoints: safetensors + manifest of kind "likelihood"."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ssip.config import ConfigError, from_dict
from ssip.models.likelihood.config import KIND, LikelihoodConfig
from ssip.models.likelihood.model import Likelihood, build_likelihood

log = logging.getLogger(__name__)


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
