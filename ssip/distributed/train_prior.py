"""Prior training on Ray: speech shards streamed by Ray Data into Ray Train workers (DDP, gloo).

The same code trains on a few hours on one machine and on thousands of hours on a cluster: no
step holds the corpus in memory, and the driver reads only small columns.

Data (:func:`window_dataset`)
    ``ray.data.read_parquet`` of every shard that the corpus cards list (columns utt_id, source,
    n_frames, mel; through :func:`~ssip.distributed.runtime.read_shards`, any schema version),
    then a ``map_batches`` that cuts random windows on the fly: utterance i gives
    k_i ~ Poisson(windows_per_epoch * p_i) windows, where p_i comes from
    :func:`ssip.models.prior.source_probabilities` (source weights shared within a source by
    length, computed on the driver from (source, n_frames) only; the map gets the resulting
    probability per frame of each source, a dict with one entry per source). Each utterance
    draws from its own generator seeded by (epoch_seed, pass, hash of utt_id), so a window does
    not depend on which block or task the utterance landed in. "Pass" is Ray Data's execution
    index of the dataset: iterating the same dataset again is a new epoch with new windows, and
    epoch k of a given ``epoch_seed`` is reproducible.

Epochs
    One dataset, ``windows_per_epoch`` windows per pass (default: about one window per
    ``window_frames`` of audio, i.e. one coverage of the corpus, at least 4 batches), iterated
    pass after pass by every worker until ``total_samples`` windows have been seen. A short epoch
    keeps every shard's windows spread over the whole run (a single pass of ``total_samples``
    windows would feed the shards one after the other, each for a long stretch of steps).

Shuffling
    Streaming, not ``random_shuffle``: the shard files are read in a new seeded order every pass
    (``FileShuffleConfig(seed=epoch_seed)``, reseeded per execution) and each worker mixes
    windows in a local shuffle buffer (``iter_torch_batches(local_shuffle_buffer_size=...)``).
    ``random_shuffle`` is an all-to-all that materialises a whole epoch of windows
    (41 KB each at 128 frames: 41 GB per million) in the object store before the first batch;
    the buffer costs ``shuffle_buffer`` windows per worker and starts at once.

Training (:func:`prior_worker_loop`)
    Every worker builds the same :class:`~ssip.models.prior.EDMPrior` (data mean and sigma_data
    estimated on the driver and passed in the loop config) and wraps it in a DeepSpeed engine
    (:mod:`ssip.distributed.engine`: ZeRO stage and precision from
    :class:`~ssip.distributed.engine.RayTrainConfig`, a torch AdamW, gloo on CPU, NCCL on GPU),
    reads its share of the windows (``get_dataset_shard("train")``: Ray Train splits the stream
    into equal shares) in batches of ``batch_size // workers``, and runs the prior's one training
    loop, :func:`ssip.models.prior.fit_prior`, on a
    :class:`~ssip.distributed.engine.DeepSpeedEngine` (DeepSpeed averages the gradients and clips
    their global norm, so a step equals a single-process step on the global batch). Noise and
    sigma come from a generator seeded by (seed, rank). Samples are counted globally (local batch
    x workers); learning rate, EMA and the stop at ``total_samples`` use that count. Every
    ``log_every_samples`` the loss per sigma quartile (all-reduced), samples/s and the time spent waiting on data go to Ray's metrics and the run's
    ``metrics.jsonl``; every ``checkpoint_every_samples`` all ranks save a run checkpoint (DeepSpeed
    state, EMA, RNG, samples seen, configs, inference weights), from which a re-run with the same
    run name, or Ray Train after a worker died, resumes. At the end rank 0 saves the EMA weights
    with :func:`ssip.models.prior.save_prior` to ``out`` (storage that rank 0 can write and the
    caller can read: a local path on one machine, s3:// on a cluster).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ssip import storage
from ssip.config import ConfigError, from_dict
from ssip.data import schema
from ssip.data.speech_corpus import CARD, read_card
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
from ssip.models.checkpoint import read_manifest
from ssip.models.prior import (
    EMA,
    PriorConfig,
    estimate_data_stats,
    fit_prior,
    initial_prior,
    random_windows,
    save_prior,
    source_probabilities,
)
from ssip.models.training import TrainHooks

log = logging.getLogger(__name__)

#: Columns the window map reads from a speech shard.
WINDOW_COLUMNS = ["utt_id", "source", "n_frames", "mel"]


# ---------------------------------------------------------------------------------------------
# The corpus, seen from the driver (small columns only).


@dataclass
class CorpusIndex:
    """What the driver knows about the speech corpora to train on.

    Attributes
    ----------
    uris : list of str
        Shard files (local paths or s3:// URIs), in card order.
    per_frame : dict of str to float
        Probability that a window is drawn from one given frame of an utterance of that source
        (p_i / n_frames_i, the same for every utterance of a source).
    n_frames : int
        Mel frames of the whole corpus.
    info : dict
        Description of the data saved with the checkpoint.
    """

    uris: list[str]
    per_frame: dict[str, float]
    n_frames: int
    info: dict[str, Any]


def _as_roots(roots: str | Sequence[str]) -> list[str]:
    roots = [roots] if isinstance(roots, str) else list(roots)
    if not roots:
        raise ValueError("distributed prior training: no speech corpus root given")
    return [str(r) for r in roots]


def shard_uris(roots: str | Sequence[str]) -> list[str]:
    """URIs of every shard listed by the ``card.json`` of each speech corpus root.

    Raises
    ------
    FileNotFoundError
        A root has no card.json (an unfinished speech ingest, or an ingest root of trials).
    ValueError
        A card has another schema version or lists no shard.
    """
    uris: list[str] = []
    for root in _as_roots(roots):
        card = read_card(root)
        if card is None:
            hint = ""
            if storage.exists(storage.join(root, "manifest.json")):
                hint = (" It holds manifest.json: an ingest root of trials, which only the "
                        "single-process path reads (--workers 0).")
            raise FileNotFoundError(f"{storage.join(root, CARD)} does not exist: distributed prior "
                                    f"training reads speech corpus roots (from `ssip speech "
                                    f"ingest`).{hint}")
        schema.check_version(storage.join(root, CARD), card.get("schema_version"),
                             schema.SPEECH_SCHEMA_VERSIONS, "ssip speech ingest")
        shards = card.get("shards") or []
        if not shards:
            raise ValueError(f"{storage.join(root, CARD)} lists no shards: the corpus has no "
                             f"utterances")
        uris.extend(storage.join(root, s["path"]) for s in shards)
    return uris


def _read_columns(uri: str, columns: list[str]):
    fs, path = storage.filesystem(uri)
    try:
        return schema.read_table(path, filesystem=fs, columns=columns)
    except (OSError, KeyError) as e:
        raise OSError(f"speech shard {uri}: cannot read columns {columns}: {e}") from e


def corpus_index(roots: str | Sequence[str], cfg: PriorConfig) -> CorpusIndex:
    """Read (source, speaker, n_frames) of every utterance and turn the source weights into a
    probability per frame of each source (:func:`ssip.models.prior.source_probabilities`)."""
    roots = _as_roots(roots)
    uris = shard_uris(roots)
    sources: list[str] = []
    speakers: set[str] = set()
    lengths: list[int] = []
    for uri in uris:
        table = _read_columns(uri, ["source", "speaker", "n_frames"])
        sources.extend(table.column("source").to_pylist())
        speakers.update(table.column("speaker").to_pylist())
        lengths.extend(table.column("n_frames").to_pylist())
    if not lengths:
        raise ValueError(f"speech corpora {roots}: their shards hold no utterances")
    n = np.asarray(lengths, np.float64)
    if np.any(n <= 0):
        raise ValueError(f"speech corpora {roots}: {int(np.sum(n <= 0))} utterance(s) with "
                         f"n_frames <= 0; re-run `ssip speech ingest`")
    p = source_probabilities(n, sources, cfg.source_weights or None)
    src = np.asarray(sources)
    per_frame = {s: float(p[src == s].sum() / n[src == s].sum()) for s in sorted(set(sources))}
    data_hash = hashlib.sha256(json.dumps([uris, int(n.sum()), len(lengths),
                                           sorted(set(sources))]).encode()).hexdigest()[:12]
    info: dict[str, Any] = {"kind": "speech", "root": ",".join(roots), "n_utterances": len(lengths),
                            "data_hash": data_hash,
                            "n_speakers": len(speakers), "n_shards": len(uris),
                            "n_frames": int(n.sum()),
                            "per_source": {s: sources.count(s) for s in sorted(set(sources))}}
    leaks = [storage.join(r, "leakage.json") for r in roots]
    if all(storage.exists(u) for u in leaks):  # written by `ssip speech default --exclude-from`
        parts = [storage.read_json(u) for u in leaks]
        info["leakage"] = {**parts[0], "ok": all(x.get("ok") for x in parts),
                           "n_leaks": sum(x.get("n_leaks", 0) for x in parts)}
    return CorpusIndex(uris=uris, per_frame=per_frame, n_frames=int(n.sum()), info=info)


def data_stats(uris: Sequence[str], *, max_frames: int = 500_000, seed: int = 0
               ) -> tuple[np.ndarray, float, int]:
    """Per-mel-bin mean (80,) and sigma_data of the mels of whole shards, read in a seeded order
    until ``max_frames`` frames (about 83 min of audio by default) have been read.

    On a corpus smaller than ``max_frames`` this is :func:`ssip.models.prior.estimate_data_stats`
    of every mel, the numbers the single-process path uses. Returns (mean, sigma_data, frames).
    """
    mels: list[np.ndarray] = []
    frames = 0
    for i in np.random.default_rng(seed).permutation(len(uris)):
        table = _read_columns(uris[i], ["mel"])
        mels.extend(np.asarray(m, np.float32) for m in schema.tensor_values(table, "mel"))
        frames = sum(m.shape[1] for m in mels)
        if frames >= max_frames:
            break
    mean, sigma_data = estimate_data_stats(mels)
    return mean, sigma_data, frames


# ---------------------------------------------------------------------------------------------
# Ray Data: windows cut on the fly.


def cut_windows(batch: dict[str, np.ndarray], *, window: int, windows_per_epoch: int, epoch_seed: int,
                per_frame: dict[str, float], pass_index: int | None = None) -> dict[str, np.ndarray]:
    """Ray Data map (numpy batches): utterances -> Poisson-many random windows each.

    Parameters
    ----------
    batch : dict of ndarray
        Columns utt_id, source, n_frames and mel ((80, T_i) float32 per row: flat rows +
        ``mel_shape`` as :func:`~ssip.distributed.runtime.read_shards` gives them, or an object
        array of ndarrays).
    window : int
        Window length in frames.
    windows_per_epoch : int
        Expected windows of one pass over the whole corpus.
    epoch_seed : int
    per_frame : dict of str to float
        :attr:`CorpusIndex.per_frame`; a source missing from it gives no windows.
    pass_index : int, optional
        Which pass over the dataset this is; default: Ray Data's execution index of the dataset
        (0 on the first iteration, 1 on the second ...), so every pass draws new windows.

    Returns
    -------
    dict with ``x``: ndarray (n, 80, window) float32
    """
    if pass_index is None:
        from ray.data import DataContext

        # The counter that Ray's own per-execution reseeding (FileShuffleConfig) uses.
        pass_index = int(getattr(DataContext.get_current(), "_execution_idx", 0))
    out = []
    n_mels = None
    for utt, src, n, mel in zip(batch["utt_id"], batch["source"], batch["n_frames"],
                                schema.tensor_rows(batch, "mel"), strict=True):
        rng = np.random.default_rng([epoch_seed, pass_index, *stable_key(str(utt))])
        k = int(rng.poisson(windows_per_epoch * per_frame.get(str(src), 0.0) * int(n)))
        mel = np.asarray(mel, np.float32)  # (80, T)
        n_mels = mel.shape[0]
        if k:
            out.append(random_windows([mel], window, k, rng))  # (k, 80, window)
    if not out:
        return {"x": np.zeros((0, n_mels or 80, window), np.float32)}
    return {"x": np.concatenate(out)}


def window_dataset(roots: str | Sequence[str], cfg: PriorConfig, *, windows_per_epoch: int,
                   epoch_seed: int, index: CorpusIndex | None = None):
    """Random training windows of the speech corpora at ``roots`` as a Ray Dataset.

    Parameters
    ----------
    roots : str or sequence of str
        Speech corpus roots (``card.json``), local or s3://; all on one kind of storage.
    cfg : PriorConfig
        ``window_frames`` and ``source_weights`` are used.
    windows_per_epoch : int
        Expected number of windows of one pass (each utterance gives Poisson-many, so the count
        varies by a few sqrt(windows_per_epoch)).
    epoch_seed : int
        Seed of the windows and of the file order; pass k of the dataset is reproducible.
    index : CorpusIndex, optional
        From :func:`corpus_index` (read from the cards when None).

    Returns
    -------
    ray.data.Dataset
        Rows ``{"x": (80, window_frames) float32}``, in file order (not shuffled: the trainer
        shuffles in a local buffer, see the module docstring).
    """
    from ray.data import FileShuffleConfig

    if windows_per_epoch < 1:
        raise ValueError(f"windows_per_epoch={windows_per_epoch} must be >= 1")
    index = index or corpus_index(roots, cfg)
    kinds = {storage.is_s3(u) for u in index.uris}
    if len(kinds) > 1:
        raise ValueError(f"speech shards {index.uris[:3]}...: mixed local and s3:// shards; put all "
                         f"corpora on one kind of storage")
    ds = read_shards(index.uris, WINDOW_COLUMNS, shuffle=FileShuffleConfig(seed=epoch_seed))
    return ds.map_batches(cut_windows, batch_format="numpy", fn_kwargs={
        "window": cfg.window_frames, "windows_per_epoch": int(windows_per_epoch),
        "epoch_seed": int(epoch_seed), "per_frame": index.per_frame})


# ---------------------------------------------------------------------------------------------
# Ray Train: the per-worker loop.


def prior_worker_loop(config: dict[str, Any]) -> None:
    """Ray Train ``train_loop_per_worker``: everything it needs comes from ``config``.

    Keys: ``prior`` (PriorConfig as a dict), ``ray`` (RayTrainConfig as a dict), ``run`` (run
    name), ``data_mean`` (80 floats), ``sigma_data``, ``local_batch_size``, ``out``, ``data``
    (info saved with the model), ``unet`` (EDMPrior overrides, optional), ``progress``,
    ``debug_batches`` (optional: per rank, a list of arrays (B, 80, T) used instead of the
    dataset shard; for tests that compare a distributed step with a single-process one) and
    ``debug_kill`` (optional, see :func:`ssip.distributed.engine.kill_hook`).
    """
    import ray.train
    import torch

    cfg = from_dict(PriorConfig, config["prior"])
    ray_cfg = from_dict(RayTrainConfig, config["ray"])
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if ray_cfg.use_gpu else torch.device("cpu")
    torch.manual_seed(cfg.seed)  # the same initial weights on every worker
    net = initial_prior(cfg, config["sigma_data"], config["data_mean"],
                        config.get("unet", {})).to(device)
    ema = EMA(net)
    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.lr, betas=(0.9, 0.99),
                                  weight_decay=cfg.weight_decay)
    ds = build_engine(net, optimizer, ray_cfg, local_batch=config["local_batch_size"],
                      grad_clip=cfg.grad_clip)
    generator = torch.Generator(device=device).manual_seed(rank_seed(cfg.seed, rank))
    restored = load_run_checkpoint(ds, rank=rank, world_size=world_size, generator=generator,
                                   tensors=("ema",))
    resume = None
    if restored is not None:
        resume, tensors = restored
        ema.model.load_state_dict(tensors["ema"])
    debug = config.get("debug_batches")
    if debug is not None:
        batches: Iterable = [torch.as_tensor(np.asarray(b, np.float32)) for b in debug[rank]]
        if resume:  # the same stream, without the batches already trained on
            batches = list(batches)[int(resume["steps"]):]
    else:
        batches = (b["x"] for b in endless_batches(
            ray.train.get_dataset_shard("train"), config["local_batch_size"],
            ray_cfg.shuffle_buffer, rank_seed(cfg.seed, rank), what="prior training"))
    metrics = TrainMetrics("prior", config["run"], run_folder(ray_cfg, config["run"]), rank)
    if resume:
        metrics.resume_at(int(resume["samples_seen"]), float(resume.get("data_wait_s", 0.0)))

    def export(folder: str, state: dict[str, Any]) -> None:
        # Inference weights in every checkpoint: the EMA as safetensors + manifest.
        stats = {"samples_seen": state["samples_seen"], "steps": state["steps"],
                 "seconds": state["seconds"], "data": {**config.get("data", {}),
                                                       "workers": world_size}}
        save_prior(folder, net, cfg, ema=ema, stats=stats)

    def checkpoint(state: dict[str, Any], row: dict[str, Any]) -> None:
        state = {**state, "ray": dataclasses.asdict(ray_cfg), "run": config["run"]}
        save_run_checkpoint(ds, rank=rank, generator=generator, state=state, metrics=row,
                            tensors={"ema": ema.model.state_dict()}, export=export)

    from ray.experimental.tqdm_ray import tqdm

    hooks = TrainHooks(report=ray.train.report, checkpoint=checkpoint, metrics=metrics,
                       after_step=kill_hook(config.get("debug_kill"), rank),
                       checkpoint_every=checkpoint_interval(ray_cfg, cfg.log_every_samples),
                       progress_bar=tqdm)
    stats = fit_prior(DeepSpeedEngine(ds, rank=rank, world_size=world_size), net, batches, cfg,
                      generator=generator, ema=ema, resume=resume, hooks=hooks,
                      progress=config.get("progress", True))
    if rank == 0:
        stats["data"] = {**config.get("data", {}), "workers": world_size,
                         "zero_stage": ray_cfg.zero_stage,
                         "precision": ray_cfg.resolved_precision(), "run": config["run"]}
        stats["workers"] = world_size
        save_prior(config["out"], net, cfg, ema=ema, stats=stats)
    # Every rank reports once more after the save, so the run ends only when the model is written.
    ray.train.report({"samples": stats["samples_seen"], "steps": stats["steps"], "loss": stats["loss"],
                      "samples_per_s": stats["samples_per_s"], "saved": True})


def run_prior_trainer(loop_config: dict[str, Any], datasets: dict, ray_cfg=None):
    """Run :func:`prior_worker_loop` on ``ray_cfg.workers`` workers (TorchTrainer + DeepSpeed).

    ``loop_config["run"]`` names the run (resumed when ``storage_path/run`` holds checkpoints).
    Returns the ``ray.train.Result``.
    """
    return run_trainer(prior_worker_loop, loop_config, datasets, ray_cfg, model="prior")


def default_windows_per_epoch(n_frames: int, cfg: PriorConfig) -> int:
    """About one window per ``window_frames`` of audio (one coverage of the corpus), at least 4
    global batches, at most ``total_samples`` (unless that is under 4 batches)."""
    coverage = math.ceil(n_frames / cfg.window_frames)
    return max(4 * cfg.batch_size, min(coverage, cfg.total_samples))


def train_prior_on_ray(roots: str | Sequence[str], out: str, cfg: PriorConfig, ray_cfg=None, *,
                       address: str | None = None, num_cpus: int | None = None,
                       max_stats_frames: int = 500_000, unet: dict[str, Any] | None = None,
                       progress: bool = True, debug_kill: dict[str, Any] | None = None
                       ) -> dict[str, Any]:
    """Train the mel prior on speech corpora with Ray Data + Ray Train + DeepSpeed, save it.

    Parameters
    ----------
    roots : str or sequence of str
        Speech corpus roots (``card.json``), pooled and weighted by ``cfg.source_weights``.
    out : str
        Inference checkpoint folder (safetensors + manifest), written by rank 0 at the end (must
        be reachable from the workers' nodes: a local path on one machine, s3:// on a cluster).
    cfg : PriorConfig
        ``batch_size`` is the global batch; it must be a multiple of ``ray_cfg.workers``.
    ray_cfg : RayTrainConfig, optional
        Workers, DeepSpeed, run storage and name (the same name resumes), failure restarts.
    address, num_cpus
        Ray cluster to join (default $RAY_ADDRESS) or CPUs of an embedded local Ray.
    max_stats_frames : int
        Frames read on the driver to estimate the data mean and sigma_data.
    unet : dict, optional
        :class:`~ssip.models.prior.EDMPrior` overrides (e.g. ``{"channels": 8}`` in tests).
    debug_kill : dict, optional
        Test hook: SIGKILL one worker once (see :func:`ssip.distributed.engine.kill_hook`).

    Returns
    -------
    dict
        ``out``, ``workers``, ``windows_per_epoch``, ``run`` (name), ``run_folder``, ``data``
        (saved in the checkpoint too), ``metrics`` (samples, steps, loss,
        loss_by_sigma_quartile, samples_per_s, data_wait_s, resumed_from of the saved model).
    """
    ray_cfg = ray_cfg or RayTrainConfig()
    if cfg.batch_size % ray_cfg.workers:
        raise ConfigError(f"batch_size={cfg.batch_size} must be a multiple of workers="
                          f"{ray_cfg.workers} (each worker takes batch_size / workers windows)")
    roots = [storage.absolute(r) for r in _as_roots(roots)]  # workers' cwd is not ours
    out = storage.absolute(out)
    index = corpus_index(roots, cfg)
    mean, sigma_data, stats_frames = data_stats(index.uris, max_frames=max_stats_frames, seed=cfg.seed)
    wpe = ray_cfg.windows_per_epoch or default_windows_per_epoch(index.n_frames, cfg)
    data = {**index.info, "windows_per_epoch": wpe, "stats_frames": stats_frames}
    name = ray_cfg.name or fresh_run_name("prior")
    log.info("prior on Ray: %d utterance(s) in %d shard(s), %d worker(s), ZeRO %d, %s, %d windows "
             "per epoch, sigma_data %.3f, run %s", index.info["n_utterances"], len(index.uris),
             ray_cfg.workers, ray_cfg.zero_stage, ray_cfg.resolved_precision(), wpe, sigma_data,
             run_folder(ray_cfg, name))
    loop_config = {"prior": dataclasses.asdict(cfg), "data_mean": mean.tolist(),
                   "sigma_data": sigma_data, "local_batch_size": cfg.batch_size // ray_cfg.workers,
                   "out": str(out), "data": data, "unet": dict(unet or {}), "progress": progress,
                   "run": name, "debug_kill": debug_kill}
    embedded = init_ray(address, num_cpus)
    try:
        ds = window_dataset(roots, cfg, windows_per_epoch=wpe, epoch_seed=cfg.seed, index=index)
        run_prior_trainer(loop_config, {"train": ds}, ray_cfg)
    finally:
        if embedded:
            import ray

            ray.shutdown()
    # Ray Train V2 keeps metrics only with checkpoints: the numbers come from the saved manifest.
    stats = read_manifest(str(out)).get("extra", {}).get("train_stats", {})
    metrics = {k: stats.get(k) for k in ("samples_seen", "steps", "loss", "samples_per_s",
                                         "loss_by_sigma_quartile", "data_wait_s", "resumed_from")}
    metrics["samples"] = metrics.pop("samples_seen")
    return {"out": str(out), "workers": ray_cfg.workers, "windows_per_epoch": wpe, "run": name,
            "run_folder": run_folder(ray_cfg, name), "data": {**data, "workers": ray_cfg.workers},
            "metrics": metrics}
