"""Online decoding throughput and latency: requests/s and p50/p99 at 1, 4 and 16 concurrent clients,
with and without @serve.batch, over real HTTP on 127.0.0.1.

One replica of the online decoder (ssip.distributed.serve) on an embedded Ray, with a pipeline
root's prior and likelihoods (default: the embedded default corpus, as `make demo` or
bench/quality.py leave them); every request is one test trial of ``--subject`` cut to
``--frames`` frames, each with its own trial id (so its own draws). Each concurrency level
sends ``max(--requests, 2 x clients)`` requests after one warm-up request; latency is the
client's wall time per request. Then the ratio of batched to unbatched requests/s at each level.

Run: ``.venv/bin/python bench/serve.py --pipeline runs/prior-bench/multi`` (about 5 min on 2 CPU
cores at the default --steps 10 --draws 2).
"""

from __future__ import annotations

import os

# Ray token auth stays on (as ssip/__init__ sets it): Ray reads this when it is imported.
os.environ.setdefault("RAY_AUTH_MODE", "token")

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pipeline", default="runs/demo", help="pipeline root (ingest, prior, likelihood)")
    p.add_argument("--likelihood-root", default=None, help="default PIPELINE/likelihood")
    p.add_argument("--subject", default="sim05")
    p.add_argument("--frames", type=int, default=150, help="frames per request (100 Hz)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--draws", type=int, default=2)
    p.add_argument("--requests", type=int, default=8, help="requests per level (at least 2 x clients)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--cpus", type=int, default=2, help="CPUs of the embedded Ray and the replica")
    args = p.parse_args(argv)

    import numpy as np
    import requests
    from ray import serve

    from ssip.data.dataset import load_trials
    from ssip.decode import DecodeConfig
    from ssip.distributed.serve import ServeConfig, build_app, start

    root = Path(args.pipeline)
    lik_root = args.likelihood_root or str(root / "likelihood")
    trial = load_trials(str(root / "ingest"), split="test", subject=args.subject)[0]
    neural = trial["neural"][: args.frames].tolist()
    decode = DecodeConfig(methods=["dps"], n_draws=args.draws, num_steps=args.steps)
    print(f"subject {args.subject}: requests of {len(neural)} frames, K={args.draws} draws, "
          f"{args.steps} EDM steps; one replica with {args.cpus} CPUs", flush=True)

    results: dict[str, dict[int, dict]] = {}
    for batching in (True, False):
        cfg = ServeConfig(port=_free_port(), batching=batching, max_batch_size=args.max_batch_size,
                          max_ongoing_requests=max(64, args.max_batch_size),
                          cpus_per_replica=args.cpus, batch_wait_timeout_s=0.05)
        url = start(build_app(prior=str(root / "prior"), likelihood_root=lik_root, decode=decode,
                              serve=cfg), cfg, num_cpus=args.cpus)
        for _ in range(300):
            try:
                if requests.get(f"{url}/health", timeout=10).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(1)
        counter = iter(range(10**9))

        def one(_, url=url, counter=counter):
            body = json.dumps({"subject": args.subject, "trial_id": f"bench/{next(counter)}",
                               "neural": neural, "wav": False})
            t0 = time.perf_counter()
            r = requests.post(f"{url}/decode", data=body, timeout=600)
            r.raise_for_status()
            return time.perf_counter() - t0, r.json()["batch"]

        one(0)  # warm-up: the subject's likelihood loads on its first request
        label = "batched" if batching else "unbatched"
        results[label] = {}
        for c in args.clients:
            n = max(args.requests, 2 * c)
            t0 = time.perf_counter()
            with ThreadPoolExecutor(c) as pool:
                out = list(pool.map(one, range(n)))
            wall = time.perf_counter() - t0
            lat = np.array([o[0] for o in out])
            results[label][c] = {"rps": n / wall, "p50": float(np.percentile(lat, 50)),
                                 "p99": float(np.percentile(lat, 99)),
                                 "batch": float(np.mean([o[1] for o in out])), "n": n}
            r = results[label][c]
            print(f"  {label:9s} {c:2d} clients: {r['rps']:.2f} req/s, p50 {r['p50']:.2f} s, "
                  f"p99 {r['p99']:.2f} s, mean batch {r['batch']:.1f} ({n} requests)", flush=True)
        serve.shutdown()

    print(f"\n{'clients':>7s} {'batched req/s':>13s} {'p50':>6s} {'p99':>6s} {'unbatched req/s':>15s} "
          f"{'p50':>6s} {'p99':>6s} {'ratio':>6s}")
    for c in args.clients:
        b, u = results["batched"][c], results["unbatched"][c]
        print(f"{c:7d} {b['rps']:13.2f} {b['p50']:6.2f} {b['p99']:6.2f} {u['rps']:15.2f} "
              f"{u['p50']:6.2f} {u['p99']:6.2f} {b['rps'] / u['rps']:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
