"""Likelihood training on Ray: one subject's trials streamed by Ray Data into Ray Train workers.

The likelihood's one training loop, :func:`ssip.models.likelihood.train.fit_likelihood` (the
single-process :func:`ssip.models.likelihood.train_likelihood` runs it too), on a
:class:`~ssip.distributed.engine.DeepSpeedEngine`; what this module adds is where the windows
come from and the TorchTrainer wiring (run checkpoints, reports, metrics).

Data (:func:`trial_window_dataset`)
    ``ray.data.read_parquet`` of the subject's TRAIN shards of an ingest root (local or s3://;
    columns trial_id, n_frames, mel, neural), then a ``map_batches`` that cuts random windows on
    the fly: trial i gives k_i ~ Poisson(windows_per_epoch * T_i / sum T) windows (windows fall
    on trials in proportion to their length, as in the single-process loop), each drawn from a
    generator seeded by (seed, pass, hash of trial_id). A window carries its receptive field: the
    ``past`` frames before it and the ``lookahead`` frames after it (clipped at the trial's ends),
    so the temporal head predicts the window's frames exactly as it would inside the whole trial
    (exact for the conv likelihood, whose features are per frame). Rows: ``mel`` (80, L),
    ``neural`` (L, C), ``real`` (L,) true on real frames, ``loss`` (L,) true on the window's own
    frames, with L = past + window_frames + lookahead (right-padded).

Training (:func:`likelihood_worker_loop`)
    Every worker builds the same model (seeded; the conv likelihood's mel normaliser is computed
    on the driver from the train mels and passed in), wraps it in a DeepSpeed engine
    (:mod:`ssip.distributed.engine`: ZeRO stage, precision, torch AdamW over the trainable
    parameters only), reads its share of the windows (``get_dataset_shard("train")``) in
    batches of ``batch_size // workers`` and runs the one loop. Each worker divides its squared error by the GLOBAL
    count of loss frames x electrodes / workers (one scalar all-reduce per step), so the
    averaged gradient is the gradient of the MSE over the global batch: a step equals a
    single-process step on the global batch. An epoch is as many global steps as the
    single-process loop takes; after each, rank 0 scores the model on the subject's val trials
    and keeps the best epoch's weights (``select_on``), and every ``checkpoint_every_samples``
    (0: every epoch) all ranks save a run checkpoint (DeepSpeed state, the best epoch's weights,
    RNG, epoch, history, configs, and ``model/``: the best epoch as an inference checkpoint with
    its noise sigma). At the end rank 0 loads the best epoch, sets sigma from the val residual's
    long-run variance (:func:`ssip.models.likelihood.set_noise_sigma`) and saves with
    :func:`ssip.models.likelihood.save_likelihood`, loadable by ``ssip decode``.

Several subjects train as parallel jobs: one ``ray job submit -- python
jobs/train_likelihood.py INGEST OUT/<subject> --subject <subject> --workers N`` per subject
(docs/distributed.md, "Training on Ray Train + DeepSpeed"); the cluster schedules them side by side.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ssip import storage
from ssip.config import ConfigError, from_dict
from ssip.data.dataset import MANIFEST, load_trials, trial_files
from ssip.data.schema import read_table, tensor_rows, tensor_values
from ssip.distributed.engine import (
    DeepSpeedEngine,
    RayTrainConfig,
    TrainMetrics,
    build_engine,
    checkpoint_interval,
    endless_batches,
    fresh_run_name,
    kill_hook,
    load_run_checkpoint,
    rank_seed,
    run_folder,
    run_trainer,
    save_run_checkpoint,
    stable_key,
)
from ssip.distributed.runtime import init_ray, read_shards
from ssip.mel import N_MELS
from ssip.models.checkpoint import read_manifest
from ssip.models.likelihood import (
    ConvLikelihood,
    LikelihoodConfig,
    build_likelihood,
    evaluate_likelihood,
    mel_normaliser,
    save_likelihood,
    set_mel_normaliser,
    set_noise_sigma,
)
from ssip.models.likelihood.train import BestEpoch, epochs_of, fit_likelihood
from ssip.models.training import TrainHooks

log = logging.getLogger(__name__)

#: Columns the window map reads from a trial shard.
WINDOW_COLUMNS = ["trial_id", "n_frames", "mel", "neural"]


@dataclass
class SubjectIndex:
    """What the driver knows about one subject's training data (small columns, train mels)."""

    uris: list[str]
    n_frames: int
    n_trials: int
    n_val: int
    n_electrodes: int
    mel_mean: list[float]
    mel_std: list[float]
    info: dict[str, Any]


def subject_index(ingest: str, subject: str, cfg: LikelihoodConfig) -> SubjectIndex:
    """The subject's train shards, frame count, electrode count and (conv) mel normaliser.

    Raises
    ------
    ValueError
        No train or no val trial of ``subject`` under ``ingest`` (the message lists the subjects
        the manifest has), or the shards disagree on the electrode count.
    """
    import pyarrow.parquet as pq

    uris = trial_files(ingest, split="train", subject=subject)
    val = trial_files(ingest, split="val", subject=subject)
    if not uris or not val:
        known = sorted({r["subject"] for r in
                        storage.read_json(storage.join(ingest, MANIFEST))["recordings"]})
        raise ValueError(f"likelihood on Ray: subject {subject!r} has {len(uris)} train and "
                         f"{len(val)} val shard(s) under {ingest} (subjects there: {known}); "
                         f"both splits are needed (val picks the epoch and the noise sigma)")
    lengths, electrodes, mels = [], set(), []
    for uri in uris:
        fs, path = storage.filesystem(uri)
        columns = ["n_frames", "n_electrodes"] + (["mel"] if cfg.kind == "conv" else [])
        table = read_table(path, filesystem=fs, columns=columns)
        lengths.extend(table.column("n_frames").to_pylist())
        electrodes.update(table.column("n_electrodes").to_pylist())
        if cfg.kind == "conv":
            mels.extend(np.asarray(m, np.float32) for m in tensor_values(table, "mel"))
    if len(electrodes) != 1:
        raise ValueError(f"likelihood on Ray: subject {subject!r}'s train shards {uris} hold "
                         f"{sorted(electrodes)} electrodes; one count per subject is needed "
                         f"(re-ingest with the same channels)")
    val_rows = 0
    for uri in val:
        fs, path = storage.filesystem(uri)
        val_rows += pq.read_metadata(path, filesystem=fs).num_rows
    mean, std = mel_normaliser(mels) if mels else (np.zeros(80), np.ones(80))
    n = int(sum(lengths))
    data_hash = hashlib.sha256(json.dumps([uris, val, n, len(lengths)]).encode()).hexdigest()[:12]
    info = {"kind": "trials", "root": ingest, "subject": subject, "n_train_trials": len(lengths),
            "n_val_trials": val_rows, "n_frames": n, "data_hash": data_hash}
    return SubjectIndex(uris=uris, n_frames=n, n_trials=len(lengths), n_val=val_rows,
                        n_electrodes=int(next(iter(electrodes))), mel_mean=mean.tolist(),
                        mel_std=std.tolist(), info=info)


# ---------------------------------------------------------------------------------------------
# Ray Data: windows with their receptive field, cut on the fly.


def cut_trial_windows(batch: dict[str, np.ndarray], *, window: int, past: int, lookahead: int,
                      windows_per_epoch: int, per_frame: float, epoch_seed: int,
                      n_electrodes: int, pass_index: int | None = None
                      ) -> dict[str, np.ndarray]:
    """Ray Data map (numpy batches): trials -> Poisson-many random windows each.

    Parameters
    ----------
    batch : dict of ndarray
        Columns trial_id, n_frames, mel (80, T_i) and neural (T_i, C), one tensor per row
        (as flat rows + ``mel_shape`` / ``neural_shape``, see :func:`read_shards`, or as
        an object array of ndarrays).
    window, past, lookahead : int
        Window frames, and the frames of context before and after it the head reaches.
    windows_per_epoch : int
        Expected windows of one pass over all the subject's train trials.
    per_frame : float
        1 / (train frames of the subject): a trial of T frames expects
        ``windows_per_epoch * per_frame * T`` windows.
    epoch_seed : int
    n_electrodes : int
        C (for the shape of an empty result).
    pass_index : int, optional
        Default: Ray Data's execution index of the dataset (every pass draws new windows).

    Returns
    -------
    dict with ``mel`` (n, 80, L), ``neural`` (n, L, C) float32, ``real`` and ``loss`` (n, L)
    bool, L = past + window + lookahead.
    """
    if pass_index is None:
        from ray.data import DataContext

        pass_index = int(getattr(DataContext.get_current(), "_execution_idx", 0))
    span = past + window + lookahead
    mels, neurals, reals, losses = [], [], [], []
    pos = np.arange(span)
    for tid, n, mel, y in zip(batch["trial_id"], batch["n_frames"], tensor_rows(batch, "mel"),
                              tensor_rows(batch, "neural"), strict=True):
        t = int(n)
        rng = np.random.default_rng([epoch_seed, pass_index, *stable_key(str(tid))])
        k = int(rng.poisson(windows_per_epoch * per_frame * t))
        mel = np.asarray(mel, np.float32)
        y = np.asarray(y, np.float32)
        if mel.shape[1] != t or y.shape[0] != t:
            raise ValueError(f"trial {tid}: n_frames {t} but mel {mel.shape} / neural "
                             f"{y.shape}; re-run `ssip ingest`")
        for _ in range(k):
            s = int(rng.integers(0, max(t - window, 0) + 1))
            m = min(window, t)
            lo, hi = max(0, s - past), min(t, s + m + lookahead)
            x = np.zeros((mel.shape[0], span), np.float32)
            x[:, : hi - lo] = mel[:, lo:hi]
            z = np.zeros((span, y.shape[1]), np.float32)
            z[: hi - lo] = y[lo:hi]
            mels.append(x)
            neurals.append(z)
            reals.append(pos < hi - lo)
            losses.append((pos >= s - lo) & (pos < s - lo + m))
    if not mels:
        return {"mel": np.zeros((0, N_MELS, span), np.float32),
                "neural": np.zeros((0, span, n_electrodes), np.float32),
                "real": np.zeros((0, span), bool), "loss": np.zeros((0, span), bool)}
    return {"mel": np.stack(mels), "neural": np.stack(neurals), "real": np.stack(reals),
            "loss": np.stack(losses)}


def trial_window_dataset(index: SubjectIndex, cfg: LikelihoodConfig, *, windows_per_epoch: int):
    """Random training windows of one subject's train trials as a Ray Dataset (see
    :func:`cut_trial_windows`)."""
    from ray.data import FileShuffleConfig

    ds = read_shards(index.uris, WINDOW_COLUMNS, shuffle=FileShuffleConfig(seed=cfg.seed))
    return ds.map_batches(cut_trial_windows, batch_format="numpy", fn_kwargs={
        "window": cfg.window_frames, "past": cfg.past, "lookahead": cfg.lookahead,
        "windows_per_epoch": int(windows_per_epoch), "per_frame": 1.0 / index.n_frames,
        "epoch_seed": int(cfg.seed), "n_electrodes": index.n_electrodes})


# ---------------------------------------------------------------------------------------------
# Ray Train: the per-worker loop.


def likelihood_worker_loop(config: dict[str, Any]) -> None:
    """Ray Train ``train_loop_per_worker``; everything comes from ``config``.

    Keys: ``likelihood`` (LikelihoodConfig as a dict), ``ray`` (RayTrainConfig), ``run``,
    ``ingest``, ``subject``, ``n_electrodes``, ``mel_mean``/``mel_std`` (conv normaliser),
    ``steps_per_epoch``, ``epochs``, ``local_batch_size``, ``out``, ``data`` (saved with the
    model), ``progress``, ``debug_batches`` (optional: per rank, a list of batch dicts used
    instead of the dataset shard, for the step-equivalence test) and ``debug_kill``.
    """
    import ray.train
    import torch
    from ray.experimental.tqdm_ray import tqdm

    cfg = from_dict(LikelihoodConfig, config["likelihood"])
    ray_cfg = from_dict(RayTrainConfig, config["ray"])
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if ray_cfg.use_gpu else torch.device("cpu")
    subject, n_el = config["subject"], int(config["n_electrodes"])
    torch.manual_seed(cfg.seed)  # the same initial weights on every worker
    model = build_likelihood(cfg, n_el)
    if isinstance(model, ConvLikelihood):
        set_mel_normaliser(model, config["mel_mean"], config["mel_std"])
    model.to(device)
    torch.manual_seed(rank_seed(cfg.seed, rank))  # dropout: its own stream on every worker
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    ds = build_engine(model, optimizer, ray_cfg, local_batch=config["local_batch_size"],
                      grad_clip=0.0)
    engine = DeepSpeedEngine(ds, rank=rank, world_size=world_size)
    engine.set_lr(cfg.lr)
    generator = torch.default_generator
    val = (load_trials(config["ingest"], subject=subject, split="val",
                       columns=["schema_version", "subject", "trial_id", "mel", "neural"])
           if rank == 0 and config.get("ingest") else [])

    best = BestEpoch()
    restored = load_run_checkpoint(ds, rank=rank, world_size=world_size, generator=generator,
                                   tensors=("best",))
    resume = None
    if restored is not None:
        resume, tensors = restored
        best = BestEpoch(int(resume["best_epoch"]), float(resume["best_score"]), tensors["best"])
    steps = int((resume or {}).get("steps", 0))
    debug = config.get("debug_batches")
    if debug is not None:
        batches: Iterable = [{k: torch.as_tensor(np.asarray(v)) for k, v in b.items()}
                             for b in debug[rank]][steps:]
    else:
        batches = endless_batches(ray.train.get_dataset_shard("train"), config["local_batch_size"],
                                  ray_cfg.shuffle_buffer, rank_seed(cfg.seed, rank),
                                  what=f"likelihood training ({subject})")
    metrics = TrainMetrics("likelihood", config["run"], run_folder(ray_cfg, config["run"]), rank,
                           subject=subject)
    if resume:
        metrics.resume_at(int(resume["samples_seen"]), float(resume["data_wait_s"]))
    epochs = int(config["epochs"])

    def validate(noise_lags: int) -> dict[str, Any]:
        return evaluate_likelihood(model, val, cfg.batch_size, noise_lags)

    def export(folder: str, state: dict[str, Any]) -> None:
        # The best epoch so far as an inference checkpoint, with its noise sigma.
        net = copy.deepcopy(model)
        net.load_state_dict(best.state, strict=False)
        net.eval()
        numbers = set_noise_sigma(net, evaluate_likelihood(net, val, cfg.batch_size,
                                                           cfg.noise_lags), cfg.sigma_min)
        save_likelihood(folder, net, subject=subject,
                        stats={**numbers, "best_epoch": best.epoch, "epochs": epochs,
                               "samples_seen": state["samples_seen"], "data": config["data"]})

    def checkpoint(state: dict[str, Any], report: dict[str, Any]) -> None:
        state = {**state, "ray": dataclasses.asdict(ray_cfg), "run": config["run"]}
        save_run_checkpoint(ds, rank=rank, generator=generator, state=state, metrics=report,
                            tensors={"best": best.state} if rank == 0 else None,
                            export=export if rank == 0 and val else None)

    hooks = TrainHooks(report=ray.train.report, checkpoint=checkpoint, metrics=metrics,
                       after_step=kill_hook(config.get("debug_kill"), rank),
                       checkpoint_every=checkpoint_interval(ray_cfg, 0), progress_bar=tqdm)
    stats = fit_likelihood(engine, model, batches, cfg, epochs=epochs,
                           steps_per_epoch=int(config["steps_per_epoch"]),
                           validate=validate if val else None, subject=subject, best=best,
                           resume=resume, hooks=hooks, progress=config.get("progress", True))
    if rank == 0:
        stats.update(cached_features=False,
                     data={**config.get("data", {}), "workers": world_size,
                           "zero_stage": ray_cfg.zero_stage,
                           "precision": ray_cfg.resolved_precision(), "run": config["run"]})
        save_likelihood(config["out"], model, subject=subject, stats=stats)
    # Every rank reports once more after the save: the run ends only when the model is written.
    ray.train.report({"epoch": stats["epochs"], "samples": stats["samples_seen"],
                      "steps": stats["steps"], "saved": True})


def run_likelihood_trainer(loop_config: dict[str, Any], datasets: dict, ray_cfg=None):
    """Run :func:`likelihood_worker_loop` on ``ray_cfg.workers`` workers; the Result."""
    return run_trainer(likelihood_worker_loop, loop_config, datasets, ray_cfg,
                       model="likelihood")


def train_likelihood_on_ray(ingest: str, subject: str, out: str, cfg: LikelihoodConfig,
                            ray_cfg=None, *, address: str | None = None,
                            num_cpus: int | None = None, progress: bool = True,
                            debug_kill: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train one subject's likelihood with Ray Data + Ray Train + DeepSpeed and save it.

    Parameters
    ----------
    ingest : str
        Ingest root (manifest.json), local or s3://.
    subject : str
    out : str
        Inference checkpoint folder, written by rank 0 (a local path on one machine, s3:// on a
        cluster).
    cfg : LikelihoodConfig
        ``batch_size`` is the global batch; it must be a multiple of ``ray_cfg.workers``.
    ray_cfg : RayTrainConfig, optional
    address, num_cpus
        Ray cluster to join (default $RAY_ADDRESS) or CPUs of an embedded local Ray.
    debug_kill : dict, optional
        Test hook: SIGKILL one worker once (:func:`ssip.distributed.engine.kill_hook`).

    Returns
    -------
    dict
        ``out``, ``workers``, ``run``, ``run_folder``, ``data``, ``stats`` (the saved model's
        training statistics: val_mse, val_r_mean, best_epoch, epochs, samples_seen,
        samples_per_s, data_wait_s, resumed_from, ...).
    """
    ray_cfg = ray_cfg or RayTrainConfig()
    ingest, out = storage.absolute(ingest), storage.absolute(out)  # workers' cwd is not ours
    if cfg.batch_size % ray_cfg.workers:
        raise ConfigError(f"batch_size={cfg.batch_size} must be a multiple of workers="
                          f"{ray_cfg.workers} (each worker takes batch_size / workers windows)")
    index = subject_index(ingest, subject, cfg)
    steps_per_epoch, epochs = epochs_of(index.n_frames, cfg)
    wpe = ray_cfg.windows_per_epoch or steps_per_epoch * cfg.batch_size
    name = ray_cfg.name or fresh_run_name(f"likelihood-{subject}")
    data = {**index.info, "windows_per_epoch": wpe}
    log.info("likelihood %s on Ray: %d train trial(s), %d frames, %d electrodes, %d worker(s), "
             "ZeRO %d, %s, %d epochs of %d steps, run %s", subject, index.n_trials,
             index.n_frames, index.n_electrodes, ray_cfg.workers, ray_cfg.zero_stage,
             ray_cfg.resolved_precision(), epochs, steps_per_epoch, run_folder(ray_cfg, name))
    loop_config = {"likelihood": dataclasses.asdict(cfg), "ingest": ingest, "subject": subject,
                   "n_electrodes": index.n_electrodes, "mel_mean": index.mel_mean,
                   "mel_std": index.mel_std, "steps_per_epoch": steps_per_epoch,
                   "epochs": epochs, "local_batch_size": cfg.batch_size // ray_cfg.workers,
                   "out": str(out), "data": data, "progress": progress, "run": name,
                   "debug_kill": debug_kill}
    embedded = init_ray(address, num_cpus)
    try:
        ds = trial_window_dataset(index, cfg, windows_per_epoch=wpe)
        run_likelihood_trainer(loop_config, {"train": ds}, ray_cfg)
    finally:
        if embedded:
            import ray

            ray.shutdown()
    stats = read_manifest(str(out)).get("extra", {}).get("stats", {})
    return {"out": str(out), "workers": ray_cfg.workers, "run": name,
            "run_folder": run_folder(ray_cfg, name), "data": {**data, "workers": ray_cfg.workers},
            "stats": stats}
