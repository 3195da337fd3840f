"""Benchmark: distributed prior training (Ray Data -> Ray Train + DeepSpeed) with 1 and 2 workers.

Trains the tiny prior on a speech corpus root (default: the Debian asterisk English prompts,
ingested once into ``--work``) with an embedded Ray of 2 CPUs, once with 1 worker (1 CPU) and once
with 2 (0.5 CPU each, so the Ray Data read and window tasks keep a share of the cores), each
for ``--samples`` windows after a warm-up run (DeepSpeed's JIT-built comm op and the imports
are not timed). It prints, per worker count: training samples/s (global: all workers),
seconds rank 0 waited on the input pipeline and that wait as a share of the loop time (the
number that says whether Ray Data keeps up), and the ratio 2-worker / 1-worker. It prints,
never asserts: the numbers depend on the machine and on what else runs on it.

Run: ``.venv/bin/python bench/train.py [--speech ROOT] [--samples 512] [--zero-stage 1]``.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
# Ray token auth stays on (as ssip/__init__ sets it): Ray reads this when it is imported.
os.environ.setdefault("RAY_AUTH_MODE", "token")

import argparse  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))


def speech_root(work: Path, n_files: int) -> str:
    """The asterisk English prompts as a speech corpus (ingested once, then reused)."""
    from speech_ingest import write_manifest

    from ssip.data.speech_corpus import SpeechIngestConfig
    from ssip.distributed.runtime import init_ray
    from ssip.distributed.speech_ingest import run_speech_ingest

    out = work / "speech"
    if not (out / "card.json").exists():
        work.mkdir(parents=True, exist_ok=True)
        manifest = write_manifest(work, n_files)
        embedded = init_ray(None, 2)
        try:
            run_speech_ingest(str(manifest), str(out),
                              SpeechIngestConfig(layout="manifest", source="asterisk-en"))
        finally:
            if embedded:
                import ray

                ray.shutdown()
    return str(out)


def run(root: str, workers: int, samples: int, zero_stage: int, out: Path) -> dict:
    import ray

    from ssip.distributed.engine import RayTrainConfig
    from ssip.distributed.train_prior import train_prior_on_ray
    from ssip.models.prior import PriorConfig

    cfg = PriorConfig(batch_size=16, total_samples=samples, warmup_samples=0,
                      log_every_samples=max(samples // 4, 16))
    ray_cfg = RayTrainConfig(workers=workers, cpus_per_worker=1.0 if workers == 1 else 0.5,
                             zero_stage=zero_stage, storage_path=str(out / "runs"),
                             checkpoint_every_samples=samples)
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False)
    try:
        # Warm-up: worker start, imports, DeepSpeed's comm op, the first Ray Data pass.
        train_prior_on_ray(root, str(out / f"warm{workers}"),
                           PriorConfig(batch_size=16, total_samples=32, warmup_samples=0,
                                       log_every_samples=32), ray_cfg, progress=False)
        t0 = time.perf_counter()
        res = train_prior_on_ray(root, str(out / f"prior{workers}"), cfg, ray_cfg, progress=False)
        wall = time.perf_counter() - t0
    finally:
        ray.shutdown()
    m = res["metrics"]
    from ssip.models.checkpoint import read_manifest

    stats = read_manifest(str(out / f"prior{workers}"))["extra"]["train_stats"]
    loop_s = stats["seconds"]
    return {"workers": workers, "samples": m["samples"], "samples_per_s": m["samples_per_s"],
            "data_wait_s": m["data_wait_s"], "wait_share": m["data_wait_s"] / max(loop_s, 1e-9),
            "loop_s": loop_s, "wall_s": wall}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--speech", default=None, help="speech corpus root (default: asterisk-en "
                   "prompts ingested into --work)")
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--files", type=int, default=120, help="prompts to ingest for the default root")
    p.add_argument("--samples", type=int, default=512, help="windows trained per timed run")
    p.add_argument("--zero-stage", type=int, default=1, choices=(0, 1, 2))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    work = Path(args.work or tempfile.mkdtemp(prefix="ssip-bench-train-"))
    root = args.speech or speech_root(work, args.files)
    rows = [run(root, w, args.samples, args.zero_stage, work / f"w{w}") for w in (1, 2)]
    print(f"\nprior training on Ray Train + DeepSpeed ZeRO-{args.zero_stage} (tiny preset, window "
          f"128, global batch 16, {args.samples} windows, {os.cpu_count()} CPU cores)\n")
    print(f"{'workers':>7s} {'samples/s':>10s} {'loop s':>8s} {'data wait s':>12s} "
          f"{'wait share':>10s} {'wall s':>8s}")
    for r in rows:
        print(f"{r['workers']:7d} {r['samples_per_s']:10.2f} {r['loop_s']:8.1f} "
              f"{r['data_wait_s']:12.2f} {r['wait_share']:10.1%} {r['wall_s']:8.1f}")
    print(f"\nratio 2 workers / 1 worker (samples/s): "
          f"{rows[1]['samples_per_s'] / rows[0]['samples_per_s']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
