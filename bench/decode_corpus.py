"""Benchmark: whole-corpus decoding on Ray Data with 1 and 2 decode actors.

Decodes the same trials (``--root`` runs: an ingest root with its prior and likelihoods, e.g.
``runs/demo``; default: a synthetic 2-subject corpus built in ``--work`` with a tiny prior and
conv likelihoods, the shapes of the default corpus) three ways in one process: in this process
(``ssip decode``, the reference), and on an embedded Ray of 2 CPUs with 1 actor (1 CPU) and with
2 actors (0.5 CPU each, one torch thread each). Each Ray run is timed after a warm-up run (Ray
start, actor start-up, model loading) into a fresh output folder. It prints trials/s, posterior
draws/s and the ratio 2 actors / 1 actor, and checks that the three tables hold the same bytes.
It prints, never asserts: the numbers depend on the machine and on what else runs on it.

Run: ``.venv/bin/python bench/decode_corpus.py [--root runs/demo] [--trials 8] [--draws 4]``.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
# Ray token auth stays on (as ssip/__init__ sets it): Ray reads this when it is imported.
os.environ.setdefault("RAY_AUTH_MODE", "token")

import argparse  # noqa: E402
import logging  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def synthetic_run(work: Path, trials_per_subject: int) -> dict[str, str]:
    """2 subjects (64 and 48 electrodes), 1.0-2.0 s test trials, tiny prior, conv likelihoods."""
    import torch

    from ssip.models.likelihood import LikelihoodConfig, save_likelihood, train_likelihood
    from ssip.models.prior import EDMPrior, PriorConfig, save_prior
    from tests.conftest import write_trials_ingest

    rng = np.random.default_rng(0)
    trials = []
    for s, n_el in (("sim01", 64), ("sim02", 48)):
        w = rng.standard_normal((80, n_el)).astype(np.float32) / 9
        for split, n in (("train", 12), ("val", 4), ("test", trials_per_subject)):
            for i in range(n):
                t = int(rng.integers(100, 200))
                mel = (rng.standard_normal((80, t)).cumsum(1) * 0.05 - 0.2).astype(np.float32)
                y = mel.T @ w + 0.5 * rng.standard_normal((t, n_el))
                trials.append({"subject": s, "split": split, "mel": mel,
                               "neural": y.astype(np.float32),
                               "trial_id": f"rec1/{split}{i:04d}"})
    ingest = write_trials_ingest(work / "ingest", trials)
    torch.manual_seed(0)
    save_prior(str(work / "prior"), EDMPrior("tiny", sigma_data=0.5,
                                             data_mean=np.full(80, -0.2)), PriorConfig())
    cfg = LikelihoodConfig(kind="conv", epochs=1)
    for s in ("sim01", "sim02"):
        model, stats = train_likelihood([t for t in trials if t["subject"] == s
                                         and t["split"] != "test"], cfg, progress=False)
        save_likelihood(str(work / "likelihood" / s), model, subject=s, stats=stats)
    return {"ingest": ingest, "prior": str(work / "prior"), "likelihood": str(work / "likelihood")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default=None, help="a pipeline root (ingest/, prior/, likelihood/); "
                   "default: a synthetic corpus in --work")
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--trials", type=int, default=8, help="test trials per subject")
    p.add_argument("--draws", type=int, default=4, help="posterior draws per trial")
    p.add_argument("--steps", type=int, default=25, help="EDM steps")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import torch

    from ssip.cli import main as ssip_main
    from ssip.decode import DecodeConfig, DecodeSelection, DecodeSpeed
    from ssip.distributed.decode_corpus import BulkDecodeConfig, decode_corpus
    from ssip.storage import read_parquet

    torch.set_num_threads(1)
    work = Path(args.work or tempfile.mkdtemp(prefix="ssip-bench-decode-"))
    if args.root:
        r = Path(args.root)
        run = {"ingest": str(r / "ingest"), "prior": str(r / "prior"),
               "likelihood": str(r / "likelihood")}
    else:
        run = synthetic_run(work, args.trials)
    cfg = DecodeConfig(methods=["dps"], n_draws=args.draws, num_steps=args.steps,
                       speed=DecodeSpeed(batch_size=4),
                       selection=DecodeSelection(max_trials=args.trials))
    sets = ["--set=methods=[dps]", f"--set=n_draws={args.draws}", f"--set=num_steps={args.steps}",
            "--set=speed.batch_size=4", f"--max-trials={args.trials}"]

    t0 = time.perf_counter()
    ref = str(work / "inprocess.parquet")
    assert ssip_main(["decode", run["ingest"], "--prior", run["prior"], "--likelihood-root",
                      run["likelihood"], "--out", ref, *sets]) == 0
    rows = [{"how": "in process", "actors": 0, "seconds": time.perf_counter() - t0}]
    n_trials = len(set(zip(*(read_parquet(ref).column(c).to_pylist()
                             for c in ("subject", "trial_id")), strict=True)))

    import ray

    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False)
    tables = {}
    try:
        for actors in (1, 2):
            bulk = BulkDecodeConfig(actors=actors, cpus_per_actor=1.0 if actors == 1 else 0.5)
            kw = dict(prior=run["prior"], likelihood_root=run["likelihood"], baselines_root=None,
                      cfg=cfg, bulk=bulk, max_trials=args.trials, progress=False)
            warm = work / f"warm{actors}"
            decode_corpus(run["ingest"], str(warm / "d.parquet"), **kw)
            out = work / f"bulk{actors}"
            shutil.rmtree(out, ignore_errors=True)
            t0 = time.perf_counter()
            summary = decode_corpus(run["ingest"], str(out / "d.parquet"), **kw)
            rows.append({"how": f"Ray Data, {actors} actor(s)", "actors": actors,
                         "seconds": time.perf_counter() - t0,
                         "per_trial": summary["seconds_per_trial"]})
            tables[actors] = read_parquet(str(out / "d.parquet"))
    finally:
        ray.shutdown()

    def keyed(table) -> dict:
        cols = [table.column(c).to_pylist() for c in ("subject", "trial_id", "method", "draw")]
        from ssip.data.schema import tensor_values

        mels = (np.ascontiguousarray(m, np.float32).tobytes()
                for m in tensor_values(table, "mel"))
        return dict(zip(zip(*cols, strict=True), mels, strict=True))

    reference = keyed(read_parquet(ref))
    same = all(keyed(t) == reference for t in tables.values())
    print(f"\nwhole-corpus DPS decode: {n_trials} trials, {args.draws} draws, {args.steps} EDM "
          f"steps, {os.cpu_count()} CPU cores\n")
    print(f"{'how':24s} {'wall s':>8s} {'trials/s':>9s} {'draws/s':>8s}")
    for r in rows:
        print(f"{r['how']:24s} {r['seconds']:8.1f} {n_trials / r['seconds']:9.3f} "
              f"{n_trials * args.draws / r['seconds']:8.2f}")
    print(f"\nratio 2 actors / 1 actor (trials/s): {rows[1]['seconds'] / rows[2]['seconds']:.2f}; "
          f"1 actor / in process: {rows[0]['seconds'] / rows[1]['seconds']:.2f}")
    print(f"tables byte-identical to the in-process decode: {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
