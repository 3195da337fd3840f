"""Decode presets: per subject, the DecodeConfig overrides a guidance sweep found best.

``PRESETS/<name>.json`` (default PRESETS = LIKELIHOOD_ROOT/presets) holds per subject the
winning overrides, their score, the default's, the trials scored and the checkpoints used (path
+ manifest hash). ``ssip sweep`` (:mod:`ssip.distributed.sweep`) writes entries;
``ssip decode --preset NAME`` and ``ssip serve --preset NAME`` read them with
:func:`load_preset`, which warns when a checkpoint changed since the sweep.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

from ssip import storage

log = logging.getLogger(__name__)

PRESETS_DIR = "presets"


def checkpoint_ref(directory: str) -> dict[str, str]:
    """What a preset records of a checkpoint: its path and the sha256 of its manifest."""
    manifest = storage.read_bytes(storage.join(directory, "manifest.json"))
    return {"path": directory, "manifest_sha256": hashlib.sha256(manifest).hexdigest()}


def presets_root(likelihood_root: str, presets: str | None) -> str:
    return presets or storage.join(likelihood_root, PRESETS_DIR)


def preset_uri(root: str, name: str) -> str:
    if not name or any(c in name for c in "/\\") or name.startswith("."):
        raise ValueError(f"preset name {name!r}: use letters, digits, '-', '_' or '.'")
    return storage.join(root, f"{name}.json")


def save_preset_entry(root: str, name: str, subject: str, entry: dict[str, Any]) -> None:
    uri = preset_uri(root, name)
    preset = storage.read_json(uri) if storage.exists(uri) else {"name": name, "subjects": {}}
    preset["subjects"][subject] = entry
    storage.write_json(uri, preset)


def load_preset(root: str, name: str, *, prior: str | None = None,
                likelihood_root: str | None = None) -> dict[str, dict[str, Any]]:
    """Per subject, the DecodeConfig overrides of preset ``name``.

    Warns (log) when a checkpoint the sweep used has changed since. Raises FileNotFoundError
    naming the presets found when there is no such preset.
    """
    uri = preset_uri(root, name)
    if not storage.exists(uri):
        raise FileNotFoundError(f"no preset {name!r} at {uri}; run `ssip sweep ... --name "
                                f"{name}` first (or pass --presets DIR)")
    preset = storage.read_json(uri)
    out = {}
    for subject, entry in preset["subjects"].items():
        used = entry.get("checkpoints", {})
        now = {}
        if prior:
            now["prior"] = checkpoint_ref(prior)
        if likelihood_root and storage.exists(storage.join(likelihood_root, subject,
                                                           "manifest.json")):
            now["likelihood"] = checkpoint_ref(storage.join(likelihood_root, subject))
        for kind, ref in now.items():
            if used.get(kind, {}).get("manifest_sha256") not in (None, ref["manifest_sha256"]):
                log.warning("preset %s, subject %s: the %s checkpoint changed since the sweep "
                            "(%s); its setting may no longer be the best", name, subject, kind,
                            ref["path"])
        out[subject] = dict(entry["overrides"])
    return out
