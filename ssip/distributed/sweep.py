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
from typing import Any

import numpy as np

from ssip import storage
from ssip.config import from_dict
from ssip.data.dataset import load_trials
from ssip.decode import MEAN_DRAW, DecodeConfig, decode_trials
from ssip.distributed.runtime import init_ray
from ssip.metrics import mel_pcc
from ssip.models.baselines import load_baseline
from ssip.models.likelihood import load_likelihood
from ssip.models.prior import load_prior, prior_location
from ssip.presets import SweepConfig, checkpoint_ref, grid, presets_root, save_preset_entry

__all__ = ["SweepConfig", "load_sweep_inputs", "run_sweep", "score_chunks"]

log = logging.getLogger(__name__)


def score_chunks(trials: list[dict], prior, likelihood, decode_cfg, chunk: int,
                 baselines: dict[str, Any] | None = None):
    """Decode ``trials`` in chunks with DPS; yield (trials scored, running mean mel PCC) after
    each chunk. Trials whose PCC is undefined (too few speech frames) are left out.
    ``baselines``: the subject's fitted nn when it is DPS evidence."""
    cfg = dataclasses.replace(decode_cfg, methods=["dps"])
    scores: list[float] = []
    for s in range(0, len(trials), chunk):
        part = trials[s:s + chunk]
        for r in decode_trials(part, prior, likelihood, cfg, baselines=baselines):
            if r["draw"] == MEAN_DRAW:
                ref = next(t["mel"] for t in part if t["trial_id"] == r["trial_id"])
                v = mel_pcc(r["mel"], np.asarray(ref, np.float32))
                if math.isfinite(v):
                    scores.append(v)
        yield s + len(part), (float(np.mean(scores)) if scores else math.nan)


def load_sweep_inputs(ingest: str, subject: str, prior: str, likelihood_root: str, n: int,
                      base: DecodeConfig | None = None, baselines_root: str | None = None):
    """(val trials (first n), prior, likelihood, baselines) of one subject; ``baselines`` holds
    the fitted nn when ``base`` uses it as evidence (read from BASELINES_ROOT/<subject>/nn)."""
    trials = load_trials(ingest, subject=subject, split="val",
                         columns=["schema_version", "subject", "trial_id", "neural", "mel"])[:n]
    if not trials:
        raise ValueError(f"sweep: subject {subject!r} has no val trials under {ingest}; the "
                         f"sweep scores settings on the validation split")
    model, _ = load_prior(prior)
    likelihood = None
    if base is None or base.needs_likelihood():
        likelihood, _ = load_likelihood(storage.join(likelihood_root, subject))
    wanted = [k for k in (base.needs_baselines() if base is not None else []) if k == "nn"]
    if wanted and not baselines_root:
        raise ValueError(f"sweep ({subject}): evidence {base.evidence} needs the subject's nn "
                         f"decoder; pass --baselines-root")
    baselines = {k: load_baseline(storage.join(baselines_root, subject, k)) for k in wanted}
    return trials, model, likelihood, baselines


def _trainable(config: dict[str, Any], *, ingest: str, subject: str, prior: str,
               likelihood_root: str, baselines_root: str | None, base: dict[str, Any],
               sweep: dict[str, Any]) -> None:
    """The Tune function trainable: one setting of one subject, reported chunk by chunk."""
    import torch
    from ray import tune

    torch.set_num_threads(1)
    sc = from_dict(SweepConfig, sweep)
    cfg = from_dict(DecodeConfig, {**base, **config["setting"]})
    trials, model, likelihood, baselines = load_sweep_inputs(
        ingest, subject, prior, likelihood_root, sc.trials, cfg, baselines_root)
    t0 = time.perf_counter()
    for n, score in score_chunks(trials, model, likelihood, cfg, sc.chunk, baselines):
        tune.report({"score": score if math.isfinite(score) else -1.0, "trials_scored": n,
                     "seconds": time.perf_counter() - t0})


def run_sweep(ingest: str, subject: str, *, prior: str, likelihood_root: str, base, cfg:
              SweepConfig, name: str, presets: str | None = None, address: str | None = None,
              num_cpus: int | None = None, baselines_root: str | None = None) -> dict[str, Any]:
    """Sweep one subject's guidance on Ray Tune; save and return its preset entry."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    prior = prior_location(prior)  # "shipped": the package's folder
    ingest, prior, likelihood_root = (storage.absolute(x) for x in (ingest, prior,
                                                                     likelihood_root))
    baselines_root = storage.absolute(baselines_root) if baselines_root else None
    presets = storage.absolute(presets)
    base = dataclasses.replace(base, n_draws=cfg.n_draws, seed=cfg.seed, methods=["dps"])
    settings = grid(cfg, base)
    # Fail here, not in every trial: the subject's val trials and checkpoints must load.
    trials, prior_model, likelihood, baselines = load_sweep_inputs(
        ingest, subject, prior, likelihood_root, cfg.trials, base, baselines_root)
    n_chunks = math.ceil(len(trials) / cfg.chunk)
    scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=n_chunks,
                               grace_period=min(cfg.grace_chunks, n_chunks),
                               reduction_factor=cfg.reduction_factor)
                 if cfg.scheduler == "asha" else FIFOScheduler())
    where = storage.absolute(cfg.storage_path or os.path.expanduser("~/ray_results"))
    fs, path = storage.filesystem(where)
    run_name = f"sweep-{name}-{subject}"
    embedded = init_ray(address, num_cpus)
    t0 = time.time()
    try:
        trainable = tune.with_parameters(
            _trainable, ingest=ingest, subject=subject, prior=prior,
            likelihood_root=likelihood_root, baselines_root=baselines_root,
            base=dataclasses.asdict(base),
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
    # A tie keeps the base setting: a sweep changes the setting only for a better score.
    best = max(complete, key=lambda r: (r["score"], r["setting"] == settings[0]))
    default = next(r for r in rows if r["setting"] == settings[0])
    if default["trials_scored"] < len(trials):  # stopped early by ASHA: finish it here
        dcfg = from_dict(DecodeConfig, {**dataclasses.asdict(base), **settings[0]})
        *_, (n, score) = score_chunks(trials, prior_model, likelihood, dcfg, cfg.chunk,
                                      baselines)
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
