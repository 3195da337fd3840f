"""Decode presets: per subject, the DecodeConfig overrides a guidance sweep found best.

:class:`SweepConfig` says what a sweep tries (:func:`grid`); ``ssip pipeline`` runs one per
subject before decoding (``calibrate: true``).

``PRESETS/<name>.json`` (default PRESETS = LIKELIHOOD_ROOT/presets) holds per subject the
winning overrides, their score, the default's, the trials scored and the checkpoints used (path
+ manifest hash). ``ssip sweep`` (:mod:`ssip.distributed.sweep`) writes entries;
``ssip decode --preset NAME`` and ``ssip serve --preset NAME`` read them with
:func:`load_preset`, which warns when a checkpoint changed since the sweep.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from typing import Any

from ssip import storage
from ssip.config import ConfigError, check_option, check_range, field

log = logging.getLogger(__name__)

PRESETS_DIR = "presets"


@dataclass
class SweepConfig:
    """What a guidance sweep tries, on which trials, and how Tune schedules it."""

    rule: str = field("weight", help="guidance rule swept: 'weight' (Gaussian score), 'xi' "
                                     "(normalised step) or 'zeta' (constant step)")
    values: list[float] = field(default_factory=lambda: [0.25, 0.5, 1.0, 2.0, 4.0],
                                help="values of the rule to try (the base config's own value "
                                     "is added when missing)")
    num_steps: list[int] = field(default_factory=list,
                                 help="EDM step counts to try (empty: the base config's)")
    trials: int = field(8, help="val trials scored per setting (the first, in trial order)")
    chunk: int = field(2, help="trials decoded between two reports to Tune (an ASHA rung)")
    n_draws: int = field(4, help="posterior draws per trial (the mean is scored)")
    scheduler: str = field("asha", help="'asha' (stop bad settings early) or 'fifo' (run all)")
    grace_chunks: int = field(1, help="ASHA: chunks every setting gets before it can be stopped")
    reduction_factor: float = field(2.0, help="ASHA: keep 1 / reduction_factor at each rung")
    cpus_per_trial: float = field(0.5, help="CPUs reserved per Tune trial")
    gpus_per_trial: float = field(0.0, help="GPUs per Tune trial")
    max_concurrent: int = field(0, help="Tune trials at once (0: as resources allow)")
    storage_path: str | None = field(None, help="Tune's results: local folder or s3:// "
                                     "(default ~/ray_results)")
    seed: int = field(0, help="seed of the draws (the decode config's seed is replaced)")

    def __post_init__(self) -> None:
        check_option("rule", self.rule, ("weight", "xi", "zeta"))
        check_option("scheduler", self.scheduler, ("asha", "fifo"))
        if not self.values:
            raise ConfigError("values is empty: give the guidance values to try")
        for v in self.values:
            if not (math.isfinite(v) and v >= 0):
                raise ConfigError(f"values: {v!r} must be finite and >= 0")
        for n in self.num_steps:
            check_range("num_steps[]", n, 1, None)
        check_range("trials", self.trials, 1, None)
        check_range("chunk", self.chunk, 1, None)
        check_range("n_draws", self.n_draws, 1, None)
        check_range("grace_chunks", self.grace_chunks, 1, None)
        check_range("reduction_factor", self.reduction_factor, 1.01, None)
        check_range("cpus_per_trial", self.cpus_per_trial, 0.0, None)
        check_range("gpus_per_trial", self.gpus_per_trial, 0.0, None)
        check_range("max_concurrent", self.max_concurrent, 0, None)


def setting_overrides(rule: str, value: float, num_steps: int) -> dict[str, Any]:
    """DecodeConfig overrides of one setting (the other rules set to None)."""
    return {"weight": None, "xi": None, "zeta": None, rule: float(value),
            "num_steps": int(num_steps)}


def grid(cfg: SweepConfig, base) -> list[dict[str, Any]]:
    """Every setting of the sweep (the base config's own first), as DecodeConfig overrides."""
    base_value = getattr(base, cfg.rule)
    if base_value is None:
        raise ConfigError(f"the base decode config uses another guidance rule than "
                          f"rule={cfg.rule!r} (weight={base.weight}, xi={base.xi}, "
                          f"zeta={base.zeta}); sweep that rule or set it in the decode config")
    values = [base_value] + [v for v in cfg.values if not math.isclose(v, base_value)]
    steps = [base.num_steps] + [n for n in cfg.num_steps if n != base.num_steps]
    return [setting_overrides(cfg.rule, v, n) for n in steps for v in values]


def checkpoint_ref(directory: str) -> dict[str, str]:
    """What a preset records of a checkpoint: its path and the sha256 of its manifest
    (``"shipped"``: the prior that ships with ssip)."""
    from ssip.models.prior import prior_location

    manifest = storage.read_bytes(storage.join(prior_location(directory), "manifest.json"))
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
