"""Checkpoints: weights in safetensors plus a JSON manifest that says what they are.

A checkpoint is a directory (local path or ``s3://`` URI) holding

- ``model.safetensors``: the tensors (torch state dict, or numpy arrays of a baseline);
- ``manifest.json``: written LAST, so a directory without it is an unfinished write. Keys:
  ``kind`` ("prior" | "likelihood" | "baseline-linear" | "baseline-nn" | ...), ``config`` (a plain
  dict), ``config_hash`` (same hash as :func:`ssip.config.config_hash`), ``mel_version``
  (:data:`ssip.mel.MEL_VERSION`), ``mel_spec``, ``shapes`` (name -> list of ints), ``dtypes``,
  ``weights_sha256``, ``created`` (ISO 8601 UTC), ``ssip_version``, ``format``, ``extra``.

Each file is written to a temporary name and renamed into place (one PUT on S3; see
:mod:`ssip.storage`). The manifest records the SHA-256 of the weights, so a directory whose
weights were overwritten by a later, interrupted save is refused instead of silently mixed.
No pickle anywhere: ``safetensors`` stores raw tensors only.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

import ssip
from ssip import storage
from ssip.mel import MEL_VERSION, MelSpec

WEIGHTS_NAME = "model.safetensors"
MANIFEST_NAME = "manifest.json"
#: Version of the checkpoint layout itself (bump when manifest keys change meaning).
CHECKPOINT_FORMAT = 1
#: Kinds this code base writes; others are allowed but must be asked for explicitly.
KINDS = ("prior", "likelihood", "baseline-linear", "baseline-nn")


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or not what the caller expected; the message says which
    file, which field, what was expected and what was found."""


def _config_dict(config: Any) -> dict[str, Any]:
    if config is None:
        return {}
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    if isinstance(config, Mapping):
        # Round-trip through JSON so the manifest holds exactly what will be read back.
        return json.loads(json.dumps(dict(config), default=str))
    raise TypeError(f"manifest 'config' must be a dataclass or a mapping, got {type(config)!r}")


def _hash_config(config: dict[str, Any], length: int = 10) -> str:
    # Same recipe as ssip.config.config_hash (sorted JSON, sha256), so a dataclass config and its
    # dict give the same hash.
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def _as_tensor(name: str, value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        t = value.detach()
    elif isinstance(value, np.ndarray | np.generic):
        t = torch.from_numpy(np.ascontiguousarray(value))
    else:
        raise TypeError(f"model_state[{name!r}] must be a torch.Tensor or numpy array, got {type(value)!r}")
    # safetensors refuses shared or non-contiguous storage: give each tensor its own copy.
    return t.cpu().contiguous().clone()


def save_checkpoint(
    directory: str, model_state: Mapping[str, Any], manifest: Mapping[str, Any]
) -> dict[str, Any]:
    """Write ``model.safetensors`` then ``manifest.json`` into ``directory``.

    Parameters
    ----------
    directory : str
        Local path or ``s3://`` URI; created if missing. Files already there are replaced.
    model_state : mapping of str to Tensor or ndarray
        The weights (e.g. ``module.state_dict()``); numpy arrays are stored as tensors of the
        same dtype.
    manifest : mapping
        Must contain ``kind`` (str). May contain ``config`` (dataclass or dict) and ``extra``
        (JSON-serialisable dict). Other keys are kept as given; ``config_hash``, ``mel_version``,
        ``shapes``, ``created`` and ``ssip_version`` are filled in unless given.

    Returns
    -------
    dict
        The manifest as written.
    """
    if "kind" not in manifest or not isinstance(manifest["kind"], str) or not manifest["kind"]:
        raise CheckpointError(
            f"save_checkpoint({directory}): manifest field 'kind' is required (one of {KINDS} "
            f"or another non-empty string), got {manifest.get('kind')!r}"
        )
    tensors = {str(k): _as_tensor(str(k), v) for k, v in model_state.items()}
    if not tensors:
        raise CheckpointError(f"save_checkpoint({directory}): model_state is empty")
    config = _config_dict(manifest.get("config"))
    out: dict[str, Any] = dict(manifest)
    out["config"] = config
    out.setdefault("config_hash", _hash_config(config))
    out.setdefault("mel_version", MEL_VERSION)
    out.setdefault("mel_spec", dataclasses.asdict(MelSpec()))
    out["shapes"] = {k: list(t.shape) for k, t in tensors.items()}
    out["dtypes"] = {k: str(t.dtype).removeprefix("torch.") for k, t in tensors.items()}
    out.setdefault("created", datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"))
    out.setdefault("ssip_version", ssip.__version__)
    out["format"] = CHECKPOINT_FORMAT
    out["extra"] = json.loads(json.dumps(out.get("extra") or {}, default=str))
    blob = st_save(tensors, metadata={"kind": out["kind"], "mel_version": str(out["mel_version"])})
    out["weights_sha256"] = hashlib.sha256(blob).hexdigest()
    storage.write_bytes(storage.join(directory, WEIGHTS_NAME), blob)
    # Manifest last: its presence means the weights it describes are complete.
    storage.write_json(storage.join(directory, MANIFEST_NAME), out)
    return out


def read_manifest(directory: str) -> dict[str, Any]:
    """The manifest of a checkpoint directory, without loading weights."""
    path = storage.join(directory, MANIFEST_NAME)
    if not storage.exists(path):
        raise CheckpointError(
            f"{path}: no manifest; this is not a checkpoint directory, or its save did not finish "
            f"(the manifest is written last). Re-run the save or point at another checkpoint."
        )
    try:
        manifest = storage.read_json(path)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: manifest is not valid JSON ({e}); re-save the checkpoint") from e
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{path}: manifest must be a JSON object, found {type(manifest).__name__}")
    return manifest


def load_checkpoint(
    directory: str,
    expect_kind: str | Sequence[str],
    expect_mel_version: str | None = MEL_VERSION,
    expect_shapes: Mapping[str, Sequence[int]] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a checkpoint, refusing it unless it is what the caller expects.

    Parameters
    ----------
    directory : str
        Local path or ``s3://`` URI written by :func:`save_checkpoint`.
    expect_kind : str or sequence of str
        Allowed value(s) of the manifest's ``kind``.
    expect_mel_version : str or None
        Required ``mel_version`` (default: this code's :data:`ssip.mel.MEL_VERSION`); None skips
        the check (only for tools that convert old checkpoints).
    expect_shapes : mapping of str to sequence of int, optional
        Tensors that must exist with exactly these shapes.

    Returns
    -------
    state : dict of str to Tensor
        The stored tensors, bit-identical to what was saved (CPU).
    manifest : dict

    Raises
    ------
    CheckpointError
        Naming the file, the field, the expected and the found value.
    """
    manifest = read_manifest(directory)
    mpath = storage.join(directory, MANIFEST_NAME)
    kinds = [expect_kind] if isinstance(expect_kind, str) else list(expect_kind)
    found_kind = manifest.get("kind")
    if found_kind not in kinds:
        raise CheckpointError(
            f"{mpath}: field 'kind' is {found_kind!r} but {' or '.join(map(repr, kinds))} was "
            f"expected; load this checkpoint with the matching loader or point at a {kinds[0]} "
            f"checkpoint"
        )
    found_mel = manifest.get("mel_version")
    if expect_mel_version is not None and found_mel != expect_mel_version:
        raise CheckpointError(
            f"{mpath}: field 'mel_version' is {found_mel!r} but {expect_mel_version!r} was "
            f"expected; the model was trained on a different mel definition, so retrain it on "
            f"mels from this code (ssip.mel)"
        )
    wpath = storage.join(directory, WEIGHTS_NAME)
    if not storage.exists(wpath):
        raise CheckpointError(f"{wpath}: weights file missing (the manifest names it); re-save")
    blob = storage.read_bytes(wpath)
    digest = hashlib.sha256(blob).hexdigest()
    if manifest.get("weights_sha256") not in (None, digest):
        raise CheckpointError(
            f"{wpath}: field 'weights_sha256' of {mpath} is {manifest['weights_sha256']!r} but "
            f"the file hashes to {digest!r}; the weights were replaced or truncated after the "
            f"manifest was written. Re-save the checkpoint."
        )
    state = dict(st_load(blob))
    stored_shapes = manifest.get("shapes", {})
    for name, t in state.items():
        if name in stored_shapes and list(stored_shapes[name]) != list(t.shape):
            raise CheckpointError(
                f"{wpath}: tensor {name!r} has shape {list(t.shape)} but field 'shapes' of "
                f"{mpath} says {stored_shapes[name]}; the files do not belong together"
            )
    for name, shape in (expect_shapes or {}).items():
        if name not in state:
            raise CheckpointError(
                f"{wpath}: field 'shapes': tensor {name!r} was expected with shape {list(shape)} "
                f"but is not in the checkpoint (it holds {sorted(state)[:8]}...)"
            )
        if list(state[name].shape) != list(shape):
            raise CheckpointError(
                f"{wpath}: field 'shapes': tensor {name!r} was expected with shape {list(shape)} "
                f"but has {list(state[name].shape)}; the checkpoint was built for another model "
                f"size (check its manifest 'config')"
            )
    return state, manifest
