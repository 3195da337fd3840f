"""Guidance sweeps on Ray Tune: per subject, on the validation split; the winner saved as a preset.

A sweep tries every (guidance value, step count) of a grid for one subject: the value is the
DecodeConfig rule's (``weight`` of the Gaussian score by default, or ``xi`` / ``zeta``), and the
base decode config's own setting is always in the grid, so the sweep reports the default's score
beside the winner's. Each Tune trial decodes the subject's first ``trials`` val trials in chunks
of ``chunk`` (DPS only, ``n_draws`` draws, seeds as in any decode) and reports after every chunk
the running mean of the posterior mean's mel PCC, so that ASHA stops the bad settings after
``grace_chunks`` chunks. The winner is the best score among the settings that scored every
trial; when ASHA stopped the default early, its full score is computed with the same code (the
seeds make it the number the trial would have reached).

The preset (:mod:`ssip.presets`), ``PRESETS/<name>.json`` (default PRESETS =
LIKELIHOOD_ROOT/presets), holds per subject the winning DecodeConfig overrides, its score, the
default's, the trials scored, the checkpoints used (path + manifest hash) and where Tune kept its
results; sweeping another subject under the same name adds it. ``ssip decode --preset NAME``
decodes each subject with its own overrides (and warns when its checkpoints changed since the
sweep).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from ssip import storage
from ssip.config import ConfigError, check_option, check_range, field, from_dict
from ssip.data.dataset import load_trials
from ssip.decode import MEAN_DRAW, DecodeConfig, decode_trials
from ssip.distributed.runtime import init_ray
from ssip.evaluate.metrics import mel_pcc
from ssip.models.likelihood import load_likelihood
from ssip.models.prior import load_prior
from ssip.presets import checkpoint_ref, presets_root, save_preset_entry

log = logging.getLogger(__name__)


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


def score_chunks(trials: list[dict], prior, likelihood, decode_cfg, chunk: int):
    """Decode ``trials`` in chunks with DPS; yield (trials scored, running mean mel PCC) after
    each chunk. Trials whose PCC is undefined (too few speech frames) are left out."""
    cfg = dataclasses.replace(decode_cfg, methods=["dps"])
    scores: list[float] = []
    for s in range(0, len(trials), chunk):
        part = trials[s:s + chunk]
        for r in decode_trials(part, prior, likelihood, cfg):
            if r["draw"] == MEAN_DRAW:
                ref = next(t["mel"] for t in part if t["trial_id"] == r["trial_id"])
                v = mel_pcc(r["mel"], np.asarray(ref, np.float32))
                if math.isfinite(v):
                    scores.append(v)
        yield s + len(part), (float(np.mean(scores)) if scores else math.nan)


def load_sweep_inputs(ingest: str, subject: str, prior: str, likelihood_root: str, n: int):
    """(val trials (first n), prior, likelihood) of one subject."""
    trials = load_trials(ingest, subject=subject, split="val",
                         columns=["schema_version", "subject", "trial_id", "neural", "mel"])[:n]
    if not trials:
        raise ValueError(f"sweep: subject {subject!r} has no val trials under {ingest}; the "
                         f"sweep scores settings on the validation split")
    model, _ = load_prior(prior)
    likelihood, _ = load_likelihood(storage.join(likelihood_root, subject))
    return trials, model, likelihood


def _trainable(config: dict[str, Any], *, ingest: str, subject: str, prior: str,
               likelihood_root: str, base: dict[str, Any], sweep: dict[str, Any]) -> None:
    """The Tune function trainable: one setting of one subject, reported chunk by chunk."""
    import torch
    from ray import tune

    torch.set_num_threads(1)
    sc = from_dict(SweepConfig, sweep)
    cfg = from_dict(DecodeConfig, {**base, **config["setting"]})
    trials, model, likelihood = load_sweep_inputs(ingest, subject, prior, likelihood_root,
                                                  sc.trials)
    t0 = time.perf_counter()
    for n, score in score_chunks(trials, model, likelihood, cfg, sc.chunk):
        tune.report({"score": score if math.isfinite(score) else -1.0, "trials_scored": n,
                     "seconds": time.perf_counter() - t0})


def run_sweep(ingest: str, subject: str, *, prior: str, likelihood_root: str, base, cfg:
              SweepConfig, name: str, presets: str | None = None, address: str | None = None,
              num_cpus: int | None = None) -> dict[str, Any]:
    """Sweep one subject's guidance on Ray Tune; save and return its preset entry."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    ingest, prior, likelihood_root = (storage.absolute(x) for x in (ingest, prior,
                                                                     likelihood_root))
    presets = storage.absolute(presets)
    base = dataclasses.replace(base, n_draws=cfg.n_draws, seed=cfg.seed, methods=["dps"])
    settings = grid(cfg, base)
    # Fail here, not in every trial: the subject's val trials and checkpoints must load.
    trials, prior_model, likelihood = load_sweep_inputs(ingest, subject, prior, likelihood_root,
                                                        cfg.trials)
    n_chunks = math.ceil(len(trials) / cfg.chunk)
    scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=n_chunks,
                               grace_period=min(cfg.grace_chunks, n_chunks),
                               reduction_factor=cfg.reduction_factor)
                 if cfg.scheduler == "asha" else FIFOScheduler())
    where = cfg.storage_path or os.path.expanduser("~/ray_results")
    fs, path = storage.filesystem(where)
    run_name = f"sweep-{name}-{subject}"
    embedded = init_ray(address, num_cpus)
    t0 = time.time()
    try:
        trainable = tune.with_parameters(
            _trainable, ingest=ingest, subject=subject, prior=prior,
            likelihood_root=likelihood_root, base=dataclasses.asdict(base),
            sweep=dataclasses.asdict(cfg))
        resources = {"cpu": cfg.cpus_per_trial, "gpu": cfg.gpus_per_trial}
        tuner = tune.Tuner(
            tune.with_resources(trainable, resources),
            param_space={"setting": tune.grid_search(settings)},
            tune_config=tune.TuneConfig(metric="score", mode="max", scheduler=scheduler,
                                        max_concurrent_trials=cfg.max_concurrent or None),
            run_config=tune.RunConfig(
                # Tune wants an absolute local path (or the S3 bucket/key with its filesystem).
                name=run_name, storage_path=path,
                storage_filesystem=fs if storage.is_s3(where) else None, verbose=1))
        grid_results = tuner.fit()
    finally:
        if embedded:
            ray.shutdown()
    rows = []
    for r in grid_results:
        if r.error is not None:
            raise RuntimeError(f"sweep {name} ({subject}): setting {r.config.get('setting')} "
                               f"failed: {r.error}")
        m = r.metrics or {}
        rows.append({"setting": r.config["setting"], "score": float(m.get("score", math.nan)),
                     "trials_scored": int(m.get("trials_scored", 0))})
    complete = [r for r in rows if r["trials_scored"] == len(trials)]
    if not complete:
        raise RuntimeError(f"sweep {name} ({subject}): no setting scored all {len(trials)} "
                           f"trials")
    best = max(complete, key=lambda r: r["score"])
    default = next(r for r in rows if r["setting"] == settings[0])
    if default["trials_scored"] < len(trials):  # stopped early by ASHA: finish it here
        dcfg = from_dict(DecodeConfig, {**dataclasses.asdict(base), **settings[0]})
        *_, (n, score) = score_chunks(trials, prior_model, likelihood, dcfg, cfg.chunk)
        default = {"setting": settings[0], "score": score, "trials_scored": n,
                   "completed_after_sweep": True}
    entry = {
        "overrides": best["setting"], "score": best["score"],
        "default": {"overrides": default["setting"], "score": default["score"],
                    "completed_after_sweep": bool(default.get("completed_after_sweep"))},
        "metric": "mel PCC of the posterior mean (val, speech frames)",
        "trials": [t["trial_id"] for t in trials], "n_draws": cfg.n_draws, "seed": cfg.seed,
        "checkpoints": {"prior": checkpoint_ref(prior),
                        "likelihood": checkpoint_ref(storage.join(likelihood_root, subject))},
        "settings": rows, "n_settings": len(rows),
        "stopped_early": sum(r["trials_scored"] < len(trials) for r in rows),
        "tune": {"storage": where, "name": run_name}, "seconds": round(time.time() - t0, 1),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    save_preset_entry(presets_root(likelihood_root, presets), name, subject, entry)
    return entry
