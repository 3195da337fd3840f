"""Prior training on Ray: speech shards streamed by Ray Data into Ray Train workers (DDP, gloo).

The same code trains on a few hours on one machine and on thousands of hours on a cluster: no
step holds the corpus in memory, and the driver reads only small columns.

Data (:func:`window_dataset`)
    ``ray.data.read_parquet`` of every shard that the corpus cards list (columns utt_id, source,
    n_frames, mel), then a ``map_batches`` that cuts random windows on the fly: utterance i gives
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
    estimated on the driver and passed in the loop config), wraps it in DDP
    (``ray.train.torch.prepare_model``), reads its share of the windows
    (``get_dataset_shard("train")``: Ray Train splits the stream into equal shares) in batches of
    ``batch_size // num_workers``, and steps with :func:`ssip.models.prior.train_step` (DDP
    averages the gradients, so a step equals a single-process step on the global batch). Noise
    and sigma come from a generator seeded by (seed, rank). Samples are counted globally (local
    batch x workers); learning rate, EMA and the stop at ``total_samples`` use that count, as in
    :func:`ssip.models.prior.train_prior`. Metrics (loss per sigma quartile, all-reduced over
    workers) go to ``ray.train.report`` every ``log_every_samples``. Rank 0 saves the EMA
    weights with :func:`ssip.models.prior.save_prior`, so ``out`` must be storage that rank 0
    can write and the caller can read (a local path on one machine, s3:// on a cluster).

Periodic checkpoints, resume and DeepSpeed are not here yet: see the ``# Checkpoint hook``
comment in :func:`run_worker`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import sys
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ssip import storage
from ssip.config import ConfigError, from_dict
from ssip.models.prior import (
    EMA,
    EDMPrior,
    PriorConfig,
    ema_beta,
    estimate_data_stats,
    learning_rate,
    random_windows,
    save_prior,
    sigma_quartile_edges,
    source_probabilities,
    train_step,
)

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
    from ssip.data import schema
    from ssip.data.speech_corpus import CARD, read_card

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
        if card.get("schema_version") != schema.SPEECH_SCHEMA_VERSION:
            raise ValueError(f"{storage.join(root, CARD)}: schema {card.get('schema_version')!r} is "
                             f"not {schema.SPEECH_SCHEMA_VERSION!r}; re-run `ssip speech ingest`")
        shards = card.get("shards") or []
        if not shards:
            raise ValueError(f"{storage.join(root, CARD)} lists no shards: the corpus has no "
                             f"utterances")
        uris.extend(storage.join(root, s["path"]) for s in shards)
    return uris


def _read_columns(uri: str, columns: list[str]):
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(uri)
    try:
        return pq.read_table(path, filesystem=fs, columns=columns)
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
    info: dict[str, Any] = {"kind": "speech", "root": ",".join(roots), "n_utterances": len(lengths),
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
    from ssip.data.dataset import _tensor_values

    mels: list[np.ndarray] = []
    frames = 0
    for i in np.random.default_rng(seed).permutation(len(uris)):
        table = _read_columns(uris[i], ["mel"])
        mels.extend(np.asarray(m, np.float32) for m in _tensor_values(table.column("mel")))
        frames = sum(m.shape[1] for m in mels)
        if frames >= max_frames:
            break
    mean, sigma_data = estimate_data_stats(mels)
    return mean, sigma_data, frames


# ---------------------------------------------------------------------------------------------
# Ray Data: windows cut on the fly.


def _utt_key(utt_id: str) -> list[int]:
    # Stable across processes (Python's hash() is salted per process).
    return np.frombuffer(hashlib.blake2b(utt_id.encode(), digest_size=8).digest(), np.uint32).tolist()


def cut_windows(batch: dict[str, np.ndarray], *, window: int, windows_per_epoch: int, epoch_seed: int,
                per_frame: dict[str, float], pass_index: int | None = None) -> dict[str, np.ndarray]:
    """Ray Data map (numpy batches): utterances -> Poisson-many random windows each.

    Parameters
    ----------
    batch : dict of ndarray
        Columns utt_id, source, n_frames and mel (object array of (80, T_i) float32).
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
    for utt, src, n, mel in zip(batch["utt_id"], batch["source"], batch["n_frames"], batch["mel"],
                                strict=True):
        rng = np.random.default_rng([epoch_seed, pass_index, *_utt_key(str(utt))])
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
    import ray
    from ray.data import FileShuffleConfig

    if windows_per_epoch < 1:
        raise ValueError(f"windows_per_epoch={windows_per_epoch} must be >= 1")
    index = index or corpus_index(roots, cfg)
    kinds = {storage.is_s3(u) for u in index.uris}
    if len(kinds) > 1:
        raise ValueError(f"speech shards {index.uris[:3]}...: mixed local and s3:// shards; put all "
                         f"corpora on one kind of storage")
    fs, _ = storage.filesystem(index.uris[0])
    paths = [storage.filesystem(u)[1] for u in index.uris]
    ds = ray.data.read_parquet(paths, filesystem=fs, columns=WINDOW_COLUMNS,
                               shuffle=FileShuffleConfig(seed=epoch_seed))
    return ds.map_batches(cut_windows, batch_format="numpy", fn_kwargs={
        "window": cfg.window_frames, "windows_per_epoch": int(windows_per_epoch),
        "epoch_seed": int(epoch_seed), "per_frame": index.per_frame})


# ---------------------------------------------------------------------------------------------
# Ray Train: the per-worker loop.


def rank_seed(seed: int, rank: int) -> int:
    """Seed of the noise/sigma generator of worker ``rank`` (different on every worker)."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


def _epoch_batches(shard, local_batch: int, shuffle_buffer: int, seed: int) -> Iterator:
    """Endless local batches (B, 80, W) from a dataset shard, one pass (epoch) after another."""
    epoch = 0
    while True:
        n = 0
        for batch in shard.iter_torch_batches(batch_size=local_batch, drop_last=True,
                                              local_shuffle_buffer_size=shuffle_buffer,
                                              local_shuffle_seed=seed + epoch):
            n += 1
            yield batch["x"]
        if n == 0:
            raise ValueError(f"prior training: epoch {epoch} gave no full batch of {local_batch} "
                             f"windows on this worker; raise windows_per_epoch")
        epoch += 1


def _all_reduce(t, op: str = "sum"):
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MIN if op == "min" else dist.ReduceOp.SUM)
    return t


def run_worker(model, batches: Iterable, cfg: PriorConfig, *, rank: int, world_size: int,
               report=None, progress: bool = True) -> dict[str, Any]:
    """Train ``model`` (DDP-wrapped or plain) on local batches until ``cfg.total_samples`` windows
    have been seen by all workers together.

    Parameters
    ----------
    model : torch.nn.Module
        The prior, wrapped in DDP when ``world_size > 1``.
    batches : iterable of Tensor (B, 80, T) or (B, 1, 80, T)
        This worker's batches; every worker must use the same B. The run stops when any worker
        runs out.
    cfg : PriorConfig
    rank, world_size : int
    report : callable, optional
        ``report(metrics: dict)``, called on every worker every ``log_every_samples`` and at the
        end (``ray.train.report`` is collective).

    Returns
    -------
    dict
        As :func:`ssip.models.prior.train_prior`: ``samples_seen`` (global), ``steps``,
        ``seconds``, ``samples_per_s``, ``loss``, ``loss_by_sigma_quartile``,
        ``sigma_quartile_edges``, ``history``, ``lr``, ``ema``.
    """
    import torch

    net = model.module if hasattr(model, "module") else model
    device = next(net.parameters()).device
    generator = torch.Generator(device=device).manual_seed(rank_seed(cfg.seed, rank))
    ema = EMA(net)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99),
                                  weight_decay=cfg.weight_decay)
    edges = torch.tensor(sigma_quartile_edges(cfg.p_mean, cfg.p_std))
    buckets = torch.zeros(2, 4, dtype=torch.float64)  # (sum of loss, count) per sigma quartile
    history: list[dict[str, Any]] = []
    samples_seen, steps, next_log, lr = 0, 0, cfg.log_every_samples, 0.0
    start = time.perf_counter()
    it = iter(batches)

    def log() -> None:
        total = _all_reduce(buckets.clone())  # global loss over all workers' samples
        by_q = (total[0] / total[1].clamp_min(1)).tolist()
        row = {"samples": samples_seen, "steps": steps,
               "loss": float(total[0].sum() / total[1].sum().clamp_min(1)),
               "loss_by_sigma_quartile": by_q, "lr": lr, "seconds": time.perf_counter() - start}
        history.append(row)
        if progress and rank == 0:
            q = " ".join(f"{v:.3f}" for v in by_q)
            print(f"[prior x{world_size}] {samples_seen:>9d} samples  loss {row['loss']:.4f}  by "
                  f"sigma quartile [{q}]  lr {lr:.2e}  {samples_seen / row['seconds']:.1f} "
                  f"samples/s", file=sys.stderr, flush=True)
        # Checkpoint hook: periodic checkpoints + resume (the distributed-training issue) go
        # here: every rank saves its part and passes the checkpoint to report().
        if report is not None:
            report({k: row[k] for k in ("samples", "steps", "loss", "lr", "seconds")}
                   | {f"loss_q{i + 1}": v for i, v in enumerate(by_q)})
        buckets.zero_()

    while samples_seen < cfg.total_samples:
        x0 = next(it, None)
        # Stop together: a worker without a batch would leave the others waiting in all-reduce.
        if int(_all_reduce(torch.tensor([0 if x0 is None else 1]), "min")) == 0:
            if rank == 0:
                log.warning("prior training: a worker ran out of batches at %d of %d samples",
                            samples_seen, cfg.total_samples)
            break
        x0 = torch.as_tensor(x0, dtype=torch.float32)
        x0 = (x0[:, None] if x0.ndim == 3 else x0).to(device)  # (B, 1, 80, T)
        lr = learning_rate(samples_seen, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        per_sample, sigma = train_step(model, optimizer, x0, generator, cfg)
        global_batch = x0.shape[0] * world_size
        samples_seen += global_batch
        steps += 1
        ema.update(net, ema_beta(global_batch, cfg.ema_halflife_samples, samples_seen,
                                 cfg.ema_rampup_ratio or None))
        bucket = torch.bucketize(sigma.cpu(), edges)  # 0..3, low to high sigma
        buckets[0].index_add_(0, bucket, per_sample.cpu().double())
        buckets[1].index_add_(0, bucket, torch.ones_like(per_sample.cpu(), dtype=torch.float64))
        if samples_seen >= next_log:
            log()
            next_log += cfg.log_every_samples
    if int(_all_reduce(buckets[1].sum().reshape(1).clone())) > 0:
        log()
    seconds = time.perf_counter() - start
    last = history[-1] if history else {"loss": float("nan"), "loss_by_sigma_quartile": [float("nan")] * 4}
    return {"samples_seen": samples_seen, "steps": steps, "seconds": seconds,
            "samples_per_s": samples_seen / max(seconds, 1e-9), "loss": last["loss"],
            "loss_by_sigma_quartile": last["loss_by_sigma_quartile"],
            "sigma_quartile_edges": edges.tolist(), "history": history, "lr": lr, "ema": ema}


def prior_worker_loop(config: dict[str, Any]) -> None:
    """Ray Train ``train_loop_per_worker``: everything it needs comes from ``config``.

    Keys: ``prior`` (PriorConfig as a dict), ``data_mean`` (80 floats), ``sigma_data``,
    ``local_batch_size``, ``shuffle_buffer``, ``out``, ``data`` (info saved with the model),
    ``unet`` (EDMPrior overrides, optional), ``progress``, and ``debug_batches`` (optional: per
    rank, a list of arrays (B, 80, T) used instead of the dataset shard; for tests that compare a
    distributed step with a single-process one).
    """
    import ray.train
    import torch
    from ray.train.torch import prepare_model

    cfg = from_dict(PriorConfig, config["prior"])
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.seed)  # the same initial weights on every worker (DDP also broadcasts)
    net = EDMPrior(cfg.preset, sigma_data=config["sigma_data"], data_mean=config["data_mean"],
                   **config.get("unet", {}))
    model = prepare_model(net, parallel_strategy="ddp")
    debug = config.get("debug_batches")
    if debug is not None:
        batches: Iterable = [torch.as_tensor(np.asarray(b, np.float32)) for b in debug[rank]]
    else:
        batches = _epoch_batches(ray.train.get_dataset_shard("train"), config["local_batch_size"],
                                 config["shuffle_buffer"], rank_seed(cfg.seed, rank))
    stats = run_worker(model, batches, cfg, rank=rank, world_size=world_size,
                       report=ray.train.report, progress=config.get("progress", True))
    if rank == 0:
        stats["data"] = {**config.get("data", {}), "workers": world_size}
        stats["workers"] = world_size
        save_prior(config["out"], net, cfg, ema=stats["ema"], stats=stats)
    # Every rank reports once more after the save, so the run ends only when the model is written.
    ray.train.report({"samples": stats["samples_seen"], "steps": stats["steps"], "loss": stats["loss"],
                      "samples_per_s": stats["samples_per_s"], "saved": True})


def run_prior_trainer(loop_config: dict[str, Any], datasets: dict, *, num_workers: int,
                      cpus_per_worker: float = 0.5, storage_path: str | None = None,
                      name: str | None = None):
    """Run :func:`prior_worker_loop` on ``num_workers`` CPU workers (TorchTrainer, gloo).

    Returns the ``ray.train.Result`` (in Ray Train V2 its ``metrics`` are None unless a
    checkpoint was reported; the trained model's numbers are in the saved manifest).
    """
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    # A fresh run name: Ray Train V2 resumes a run given the same storage_path and name, which is
    # the resume hook the distributed-training issue will use.
    name = name or f"ssip-prior-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    trainer = TorchTrainer(
        prior_worker_loop,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=False,
                                     resources_per_worker={"CPU": cpus_per_worker}),
        run_config=RunConfig(name=name, storage_path=storage_path),
        datasets=datasets,
    )
    return trainer.fit()


def default_windows_per_epoch(n_frames: int, cfg: PriorConfig) -> int:
    """About one window per ``window_frames`` of audio (one coverage of the corpus), at least 4
    global batches, at most ``total_samples`` (unless that is under 4 batches)."""
    coverage = math.ceil(n_frames / cfg.window_frames)
    return max(4 * cfg.batch_size, min(coverage, cfg.total_samples))


def train_prior_on_ray(roots: str | Sequence[str], out: str, cfg: PriorConfig, *, num_workers: int = 2,
                       cpus_per_worker: float = 0.5, address: str | None = None,
                       num_cpus: int | None = None, storage_path: str | None = None,
                       windows_per_epoch: int | None = None, shuffle_buffer: int = 1024,
                       max_stats_frames: int = 500_000, unet: dict[str, Any] | None = None,
                       progress: bool = True) -> dict[str, Any]:
    """Train the mel prior on speech corpora with Ray Data + Ray Train, save it to ``out``.

    Parameters
    ----------
    roots : str or sequence of str
        Speech corpus roots (``card.json``), pooled and weighted by ``cfg.source_weights``.
    out : str
        Checkpoint folder, written by rank 0 (must be reachable from the workers' nodes).
    cfg : PriorConfig
        ``batch_size`` is the global batch; it must be a multiple of ``num_workers``.
    num_workers : int
        Ray Train workers (DDP ranks).
    cpus_per_worker : float
        CPUs reserved per worker; keep at least one CPU of the cluster free for the Ray Data read
        tasks (on 2 CPUs: 2 workers x 0.5).
    address, num_cpus
        Ray cluster to join (default $RAY_ADDRESS) or CPUs of an embedded local Ray.
    storage_path : str, optional
        Ray Train run storage (default ~/ray_results; shared storage such as s3:// on a cluster).
    windows_per_epoch : int, optional
        Windows per pass over the corpus (default :func:`default_windows_per_epoch`).
    shuffle_buffer : int
        Windows in each worker's local shuffle buffer.
    max_stats_frames : int
        Frames read on the driver to estimate the data mean and sigma_data.
    unet : dict, optional
        :class:`~ssip.models.prior.EDMPrior` overrides (e.g. ``{"channels": 8}`` in tests).

    Returns
    -------
    dict
        ``out``, ``workers``, ``windows_per_epoch``, ``data`` (saved in the checkpoint too),
        ``metrics`` (samples, steps, loss, loss_by_sigma_quartile, samples_per_s of the saved
        model; ``run``: the Ray Train run folder).
    """
    from ssip.distributed.runtime import init_ray

    if num_workers < 1:
        raise ValueError(f"num_workers={num_workers} must be >= 1")
    if cfg.batch_size % num_workers:
        raise ConfigError(f"batch_size={cfg.batch_size} must be a multiple of num_workers="
                          f"{num_workers} (each worker takes batch_size / num_workers windows)")
    roots = _as_roots(roots)
    index = corpus_index(roots, cfg)
    mean, sigma_data, stats_frames = data_stats(index.uris, max_frames=max_stats_frames, seed=cfg.seed)
    wpe = windows_per_epoch or default_windows_per_epoch(index.n_frames, cfg)
    data = {**index.info, "windows_per_epoch": wpe, "stats_frames": stats_frames}
    log.info("prior on Ray: %d utterance(s) in %d shard(s), %d worker(s), %d windows per epoch, "
             "sigma_data %.3f", index.info["n_utterances"], len(index.uris), num_workers, wpe, sigma_data)
    loop_config = {"prior": dataclasses.asdict(cfg), "data_mean": mean.tolist(),
                   "sigma_data": sigma_data, "local_batch_size": cfg.batch_size // num_workers,
                   "shuffle_buffer": shuffle_buffer, "out": str(out), "data": data,
                   "unet": dict(unet or {}), "progress": progress}
    embedded = init_ray(address, num_cpus)
    try:
        ds = window_dataset(roots, cfg, windows_per_epoch=wpe, epoch_seed=cfg.seed, index=index)
        result = run_prior_trainer(loop_config, {"train": ds}, num_workers=num_workers,
                                   cpus_per_worker=cpus_per_worker, storage_path=storage_path)
    finally:
        if embedded:
            import ray

            ray.shutdown()
    # Ray Train V2 keeps metrics only with checkpoints: the numbers come from the saved manifest.
    from ssip.models.checkpoint import read_manifest

    stats = read_manifest(str(out)).get("extra", {}).get("train_stats", {})
    metrics = {"samples": stats.get("samples_seen"), "steps": stats.get("steps"),
               "loss": stats.get("loss"), "samples_per_s": stats.get("samples_per_s"),
               "loss_by_sigma_quartile": stats.get("loss_by_sigma_quartile"),
               "run": getattr(result, "path", None)}
    return {"out": str(out), "workers": num_workers, "windows_per_epoch": wpe,
            "data": {**data, "workers": num_workers}, "metrics": metrics}
