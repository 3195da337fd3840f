"""DeepSpeed inside Ray Train workers: engine, run checkpoints, resume, metrics.

The one place where ssip touches DeepSpeed and Ray Train's checkpoint API; the models' train
loops (:mod:`ssip.distributed.train_prior`) call these helpers and stay free of both.

Engine (:func:`build_engine`)
    ``deepspeed.initialize`` with a torch AdamW (a DeepSpeed-config optimizer would JIT-build
    fused_adam, about 50 s, and does not run on CPU), ZeRO stage from :class:`RayTrainConfig`,
    fp32 on CPU (gloo, the process group Ray Train already made) and bf16 on GPU (NCCL) with
    ``precision: auto``. Gradient clipping is DeepSpeed's (``gradient_clipping``): the global norm
    over all ranks, as ``clip_grad_norm_`` gives in one process. On CPU DeepSpeed JIT-builds a
    shared-memory comm op on first use (about 20 s); it is cached under ``TORCH_EXTENSIONS_DIR``
    (default ``~/.cache/ssip/torch_extensions``).

Run checkpoints (:func:`save_run_checkpoint`, :func:`load_run_checkpoint`)
    Every ``checkpoint_every_samples`` each rank writes into a fresh local folder and passes it to
    ``ray.train.report``, which merges the ranks' folders into one checkpoint under
    ``storage_path/name`` (local or s3://) and keeps the newest ``keep_checkpoints``:

    - ``deepspeed/``: ``engine.save_checkpoint`` of every rank (module, optimizer partitions);
    - ``<name>.safetensors``: the model's own extra state (rank 0): the prior's EMA weights
      (``ema``), the likelihood's best epoch (``best``);
    - ``rng-rank{r}.safetensors``: the state of rank r's noise generator;
    - ``state.json``: samples seen, steps, world size, the resolved configs, the loss history;
    - ``model/``: the inference weights (EMA) as safetensors plus a manifest (model kind, config
      hash, mel-definition version, data hash), loadable like any ssip checkpoint.

    A re-run with the same ``name`` and ``storage_path`` (or a restart after a worker died,
    ``FailureConfig(max_failures)``) gets the newest registered checkpoint from
    ``ray.train.get_checkpoint()`` and continues from its sample count. The data stream is not
    replayed: windows are random, and a resumed run draws fresh ones (Ray Data re-executes the
    dataset with a new pass index). A checkpoint reported just before a crash may not be
    registered, so a resume can repeat up to one interval.

    DeepSpeed's files are torch pickles; they are only ever read back by the run that wrote them
    (the user's own storage). What leaves a run for inference is safetensors plus a manifest
    (:func:`ssip.models.checkpoint.save_checkpoint`).

Metrics (:class:`TrainMetrics`)
    ``ray.util.metrics`` (scraped by Prometheus from each node's metrics export port), labels
    ``model`` and ``run``: ``ssip_train_samples`` (counter), ``ssip_train_loss`` (gauge, label
    ``bucket``: all, q1..q4 of the training sigma), ``ssip_train_samples_per_second``,
    ``ssip_train_data_wait_seconds`` (counter: time the trainer waited on the input pipeline) and
    ``ssip_train_data_wait_fraction`` (gauge). Rank 0 also writes every log row to
    ``storage_path/name/metrics.jsonl``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ssip import storage
from ssip.config import ConfigError, check_option, check_range, field
from ssip.distributed.metrics import make as make_metric

log = logging.getLogger(__name__)

DEEPSPEED_TAG = "deepspeed"
STATE_NAME = "state.json"
METRICS_NAME = "metrics.jsonl"
MODEL_DIR = "model"


@dataclass
class RayTrainConfig:
    """How a model trains on Ray Train (workers, DeepSpeed, checkpoints); not the model's config."""

    workers: int = field(2, help="Ray Train workers (data-parallel ranks)")
    cpus_per_worker: float = field(0.5, help="CPUs reserved per worker; leave CPUs free for the Ray "
                                   "Data read tasks (on 2 CPUs: 2 workers x 0.5)")
    use_gpu: bool = field(False, help="one GPU per worker (NCCL); CPU workers use gloo")
    zero_stage: int = field(1, help="DeepSpeed ZeRO stage: 0 (plain data parallel), 1 (optimizer "
                            "state partitioned), 2 (+ gradients)")
    precision: str = field("auto", help="auto (bf16 on GPU, fp32 on CPU), fp32 or bf16")
    checkpoint_every_samples: int = field(0, help="register a run checkpoint this often (samples "
                                          "seen by all workers); 0: at every log interval")
    keep_checkpoints: int = field(2, help="run checkpoints kept in storage (newest)")
    max_failures: int = field(2, help="restarts of the worker group after a worker dies")
    storage_path: str | None = field(None, help="where run checkpoints live: a local folder or "
                                     "s3:// (shared storage on a cluster); default ~/ray_results")
    name: str | None = field(None, help="run name; re-running with the same name and storage "
                             "resumes from the newest checkpoint (default: a fresh name)")
    shuffle_buffer: int = field(1024, help="windows in each worker's local shuffle buffer")
    windows_per_epoch: int = field(0, help="windows per pass over the corpus; 0: about one "
                                   "coverage of the corpus")

    def __post_init__(self) -> None:
        check_range("workers", self.workers, 1, None)
        check_range("cpus_per_worker", self.cpus_per_worker, 0.0, None)
        check_option("zero_stage", self.zero_stage, (0, 1, 2))
        check_option("precision", self.precision, ("auto", "fp32", "bf16"))
        check_range("checkpoint_every_samples", self.checkpoint_every_samples, 0, None)
        check_range("keep_checkpoints", self.keep_checkpoints, 1, None)
        check_range("max_failures", self.max_failures, 0, None)
        check_range("shuffle_buffer", self.shuffle_buffer, 1, None)
        check_range("windows_per_epoch", self.windows_per_epoch, 0, None)
        if self.precision == "bf16" and not self.use_gpu:
            raise ConfigError("precision=bf16 needs use_gpu=true: DeepSpeed's bf16 path on CPU is "
                              "not supported here; use fp32 (or auto)")

    def resolved_precision(self) -> str:
        if self.precision == "auto":
            return "bf16" if self.use_gpu else "fp32"
        return self.precision


def deepspeed_config(cfg: RayTrainConfig, local_batch: int, grad_clip: float) -> dict[str, Any]:
    """The DeepSpeed config dict of one worker (no optimizer section: a torch one is passed)."""
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": int(local_batch),
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": int(cfg.zero_stage)},
        "gradient_clipping": float(grad_clip),
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if cfg.resolved_precision() == "bf16":
        # Autocast, not DeepSpeed's "bf16" section: that one casts the module to bf16 and expects
        # bf16 inputs, while the EDM loss needs fp32 noise levels; autocast keeps fp32 weights and
        # runs the matmuls and convolutions in bf16.
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    return ds


def build_engine(model, optimizer, cfg: RayTrainConfig, *, local_batch: int, grad_clip: float):
    """``deepspeed.initialize`` of ``model`` with the torch ``optimizer``; returns the engine.

    Must run inside a Ray Train worker (torch.distributed already initialised by Ray Train).
    """
    os.environ.setdefault("TORCH_EXTENSIONS_DIR",
                          os.path.expanduser("~/.cache/ssip/torch_extensions"))
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer,
        config=deepspeed_config(cfg, local_batch, grad_clip),
        dist_init_required=False)
    return engine


class DeepSpeedEngine:
    """A DeepSpeed engine behind ssip's :class:`~ssip.models.training.Engine` interface, for the
    models' one training loop: forward through DeepSpeed, ``step`` = ``backward`` (gradients
    averaged over the ranks) + ``step`` (clipped globally), ``all_reduce`` over the workers."""

    def __init__(self, engine, *, rank: int, world_size: int):
        self.engine = engine
        self.module = engine.module
        self.rank = rank
        self.world_size = world_size

    def __call__(self, *args, **kwargs):
        return self.engine(*args, **kwargs)

    def train(self, mode: bool = True):
        self.engine.train(mode)
        return self

    def step(self, loss) -> None:
        self.engine.backward(loss)
        self.engine.step()

    def set_lr(self, lr: float) -> None:
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr

    def all_reduce(self, t, op: str = "sum"):
        return all_reduce(t, op)


def checkpoint_interval(cfg: RayTrainConfig, log_every_samples: int) -> int:
    return cfg.checkpoint_every_samples or log_every_samples


# ---------------------------------------------------------------------------------------------
# Run checkpoints.


def save_run_checkpoint(engine, *, rank: int, generator, state: dict[str, Any],
                        metrics: dict[str, Any], tensors: dict[str, dict] | None = None,
                        export=None) -> None:
    """Every rank: write its part of a run checkpoint and report it with ``metrics``.

    ``state`` (rank 0's is kept): JSON-serialisable run state, at least ``samples_seen``,
    ``steps`` and ``world_size``. ``tensors`` (rank 0): named state dicts kept beside the
    DeepSpeed state, each as ``<name>.safetensors`` (the prior's EMA, the likelihood's best
    epoch). ``export(folder, state)`` (rank 0) writes the inference weights (safetensors +
    manifest) into ``folder`` (the checkpoint's ``model/``).
    """
    import ray.train
    from ray.train import Checkpoint
    from safetensors.torch import save_file

    folder = tempfile.mkdtemp(prefix=f"ssip-ckpt-r{rank}-")
    try:
        engine.save_checkpoint(folder, tag=DEEPSPEED_TAG, save_latest=False)
        save_file({"state": generator.get_state()},
                  os.path.join(folder, f"rng-rank{rank}.safetensors"))
        if rank == 0:
            for name, sd in (tensors or {}).items():
                save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()},
                          os.path.join(folder, f"{name}.safetensors"))
            with open(os.path.join(folder, STATE_NAME), "w") as f:
                json.dump(state, f, indent=1, default=str)
            if export is not None:
                export(os.path.join(folder, MODEL_DIR), state)
        else:
            # DeepSpeed writes its helper scripts from every rank; one copy (rank 0's) is enough.
            for name in ("zero_to_fp32.py", "zero_to_torch.py"):
                p = os.path.join(folder, name)
                if os.path.exists(p):
                    os.remove(p)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def load_run_checkpoint(engine, *, rank: int, world_size: int, generator,
                        tensors: tuple[str, ...] = ()
                        ) -> tuple[dict[str, Any], dict[str, dict]] | None:
    """Restore the newest registered run checkpoint into ``engine`` and ``generator``.

    Returns None when the run starts fresh, else (state, {name: state dict}) with the
    ``tensors`` that :func:`save_run_checkpoint` kept (read on every rank).

    Raises
    ------
    ConfigError
        The checkpoint was written by another number of workers (ZeRO partitions the optimizer
        state by rank).
    """
    import ray.train
    from safetensors.torch import load_file

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        with open(os.path.join(folder, STATE_NAME)) as f:
            state = json.load(f)
        if int(state.get("world_size", world_size)) != world_size:
            raise ConfigError(
                f"run checkpoint {checkpoint.path}: written by {state['world_size']} workers, "
                f"resumed with {world_size}; resume with workers={state['world_size']} or start "
                f"a new run name")
        path, _ = engine.load_checkpoint(folder, tag=DEEPSPEED_TAG, load_module_strict=True)
        if path is None:
            raise FileNotFoundError(f"run checkpoint {checkpoint.path}: no DeepSpeed state under "
                                    f"{DEEPSPEED_TAG}/")
        loaded = {name: load_file(os.path.join(folder, f"{name}.safetensors")) for name in tensors}
        generator.set_state(load_file(os.path.join(folder, f"rng-rank{rank}.safetensors"))["state"])
    log.info("resumed from %s at %s samples", checkpoint.path, state.get("samples_seen"))
    return state, loaded


def stable_key(key: str) -> list[int]:
    """Seed words of a string key (an utterance or trial id), the same in every process (Python's
    ``hash()`` is salted per process)."""
    return np.frombuffer(hashlib.blake2b(key.encode(), digest_size=8).digest(), np.uint32).tolist()


def rank_seed(seed: int, rank: int) -> int:
    """Seed of the noise/dropout generator of worker ``rank`` (different on every worker)."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


def endless_batches(shard, local_batch: int, shuffle_buffer: int, seed: int, *,
                    what: str = "training") -> Iterator[dict]:
    """Endless local batches (dicts of tensors) from a Ray Data shard
    (``ray.train.get_dataset_shard``), one pass after another: every pass re-executes the
    dataset (new random windows), mixed in a local shuffle buffer reseeded per pass."""
    epoch = 0
    while True:
        n = 0
        for batch in shard.iter_torch_batches(batch_size=local_batch, drop_last=True,
                                              local_shuffle_buffer_size=shuffle_buffer,
                                              local_shuffle_seed=seed + epoch):
            n += 1
            yield batch
        if n == 0:
            raise ValueError(f"{what}: pass {epoch} over the data gave no full batch of "
                             f"{local_batch} windows on this worker; raise windows_per_epoch")
        epoch += 1


def all_reduce(t, op: str = "sum"):
    """In-place all-reduce of tensor ``t`` over the workers (sum or min); a no-op in one process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MIN if op == "min" else dist.ReduceOp.SUM)
    return t


def kill_hook(spec: dict[str, Any] | None, rank: int):
    """Test hook: SIGKILL this worker once, the first time it passes ``after_samples``
    (``spec = {"rank", "after_samples", "marker"}``, optional ``"delay_s"``, default 3: the
    time given first to Ray Train's controller to register the last reported checkpoint, so that
    the test knows which one the restart finds; the marker file makes it happen once).
    Returns ``after_step(samples_seen)`` for rank ``spec["rank"]``, None for the others."""
    if not spec or int(spec["rank"]) != rank:
        return None

    def after_step(samples_seen: int) -> None:
        import signal

        if samples_seen >= int(spec["after_samples"]) and not os.path.exists(spec["marker"]):
            time.sleep(float(spec.get("delay_s", 3.0)))
            with open(spec["marker"], "w") as f:
                f.write(f"killed rank {rank} at {samples_seen} samples\n")
            os.kill(os.getpid(), signal.SIGKILL)

    return after_step


def fresh_run_name(model: str) -> str:
    return f"ssip-{model}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def run_trainer(loop, loop_config: dict[str, Any], datasets: dict,
                cfg: RayTrainConfig | None = None, *, model: str):
    """Run ``loop(config)`` on ``cfg.workers`` Ray Train workers (TorchTrainer; gloo on CPU,
    NCCL on GPU), checkpoints under ``storage_path/run``, restarts after a worker dies.

    ``loop_config`` gets ``ray`` (the config as a dict) and ``run`` (its own ``run``, else
    ``cfg.name``, else a fresh name for ``model``). Returns the ``ray.train.Result``.
    """
    import dataclasses

    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg = cfg or RayTrainConfig()
    cfg = dataclasses.replace(cfg, storage_path=run_storage(cfg))  # absolute for the workers
    loop_config = {**loop_config, "ray": dataclasses.asdict(cfg),
                   "run": loop_config.get("run") or cfg.name or fresh_run_name(model)}
    where = run_storage(cfg)
    fs, path = storage.filesystem(where)
    s3 = storage.is_s3(where)
    trainer = TorchTrainer(
        loop,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=RunConfig(
            name=loop_config["run"],
            storage_path=path,  # absolute locally (Ray refuses a relative path); bucket/key on S3
            storage_filesystem=fs if s3 else None,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints)),
        datasets=datasets,
    )
    return trainer.fit()


def run_storage(cfg: RayTrainConfig) -> str:
    """Where runs live: the s3:// URI, or the ABSOLUTE local folder (workers may run elsewhere)."""
    where = cfg.storage_path or os.path.expanduser("~/ray_results")
    return where if storage.is_s3(where) else os.path.abspath(where)


def run_folder(cfg: RayTrainConfig, name: str) -> str:
    return storage.join(run_storage(cfg), name)


# ---------------------------------------------------------------------------------------------
# Metrics.


class TrainMetrics:
    """Training metrics to Ray (``ray.util.metrics``) and, on rank 0, to ``metrics.jsonl``."""

    def __init__(self, model: str, run: str, folder: str | None, rank: int,
                 subject: str = "-"):
        self.tags = {"model": model, "subject": subject, "run": run}
        self.samples = make_metric("ssip_train_samples")
        self.loss = make_metric("ssip_train_loss")
        self.rate = make_metric("ssip_train_samples_per_second")
        self.wait = make_metric("ssip_train_data_wait_seconds")
        self.wait_fraction = make_metric("ssip_train_data_wait_fraction")
        self.path = storage.join(folder, METRICS_NAME) if folder and rank == 0 else None
        self.rows: list[dict[str, Any]] = []
        if self.path and storage.exists(self.path):  # a resumed run appends to its history
            text = storage.read_bytes(self.path).decode()
            self.rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        self.rank = rank
        self._last = (time.perf_counter(), 0, 0.0)

    def log(self, row: dict[str, Any], *, samples_seen: int, data_wait_s: float) -> dict[str, Any]:
        """Record one interval (rank 0 exports; every rank may call). Returns the row with
        ``samples_per_s`` and ``data_wait_fraction`` of the interval added."""
        now = time.perf_counter()
        t0, s0, w0 = self._last
        dt = max(now - t0, 1e-9)
        row = {**row, "samples_per_s": (samples_seen - s0) / dt,
               "data_wait_s": data_wait_s, "data_wait_fraction": (data_wait_s - w0) / dt,
               "time": time.time()}
        self._last = (now, samples_seen, data_wait_s)
        if self.rank != 0:
            return row
        if samples_seen > s0:  # Counter.inc refuses 0
            self.samples.inc(samples_seen - s0, tags=self.tags)
        if data_wait_s > w0:
            self.wait.inc(data_wait_s - w0, tags=self.tags)
        self.rate.set(row["samples_per_s"], tags=self.tags)
        self.wait_fraction.set(row["data_wait_fraction"], tags=self.tags)
        self.loss.set(row["loss"], tags={**self.tags, "bucket": "all"})
        for i, v in enumerate(row.get("loss_by_sigma_quartile", [])):
            self.loss.set(v, tags={**self.tags, "bucket": f"q{i + 1}"})
        if self.path:
            self.rows.append(row)
            storage.write_bytes(self.path, "".join(json.dumps(r, default=str) + "\n"
                                                   for r in self.rows).encode())
        return row

    def resume_at(self, samples_seen: int, data_wait_s: float = 0.0) -> None:
        self._last = (time.perf_counter(), samples_seen, data_wait_s)
        self.rows = [r for r in self.rows if r.get("samples", 0) <= samples_seen]
