"""Fast DPS: ssip's production decoder against a naive reference, same trials, same draws.

Both decode the same held-out (test) trials of one subject of the default corpus, K posterior
draws each, with the same prior, the same Whisper likelihood and the same seeds:

- (a) naive: the published recipe built from ssip's own parts (DecodeConfig switches):
  ``sampler=ancestral num_steps=1000`` (the paper's DDPM sampler; guided by the calibrated
  likelihood's score, the same rule as (b)), one trial and one draw per sampler call, the
  Whisper input padded to 3000 frames (padding keys masked, so the result is unchanged) and
  run through all encoder layers, fp32, no compilation. Its TIME is measured on
  ``--naive-steps`` respaced steps of every trial and draw and scaled to 1000 steps (the cost
  of a step does not depend on the respacing); its QUALITY comes from complete 1000-step runs
  of the same sampler through the production implementation (batched, trial-length Whisper),
  which tests/test_decode_speed.py shows equal to the naive one to float rounding, and which
  this script also checks on the timed steps (``naive == exact-equivalent``, max difference).
- (b) production: ``DecodeConfig`` defaults (EDM Heun, ``--steps`` steps, all draws of a batch
  in one call, trial-length Whisper up to the tapped layer, bf16 autocast on CUDA).

Then one row per speed switch, each (b) with that one switch changed, so its effect on speed
and quality shows on its own. Printed per row: trials/s, wall seconds per second of decoded
speech, peak memory above the start of the row (RSS on CPU, allocated on CUDA), FLOPs per DPS
step per draw (torch.utils.flop_counter; the step = denoiser forward + likelihood forward +
backward through both, plus the Heun evaluation for EDM) and achieved FLOP/s (also as a share
of the card's bf16 peak on a GPU), and the posterior mean's mel PCC and STOI (Griffin-Lim) over
the trials. ``--profile`` adds a torch.profiler table of one production decode.

Prerequisite: a pipeline root with an ingest and a prior of the default corpus (``make demo`` or
bench/quality.py / bench/prior.py) and a Whisper likelihood of the subject (trained here when
``--likelihood`` does not exist: ``ssip train likelihood ... --set kind=whisper``).

Run: ``.venv/bin/python bench/dps_speed.py --pipeline runs/prior-bench/multi --subject sim05``
(about 35 min on 2 CPU cores, most of it the complete 1000-step runs for (a)'s quality;
resumable: results are cached per row in ``--out``).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

#: Dense bf16 peak of known cards, FLOP/s (vendor datasheets), for the share-of-peak column.
BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}

NAIVE = dict(sampler="ancestral", num_steps=1000, batch_size=1, draws_per_call=1,
             whisper_window="30s", whisper_layers="all", precision="fp32", compile=False)


def with_flat(cfg, over: dict):
    """``cfg`` with flat overrides: the speed switches (``batch_size``, ``precision``, ...) go to
    its ``speed`` section, the rest replace top-level fields."""
    from ssip.decode import MOVED_TO_SPEED, with_overrides

    return with_overrides(cfg, {k: v for k, v in over.items() if k not in MOVED_TO_SPEED},
                          **{k: v for k, v in over.items() if k in MOVED_TO_SPEED})


def flat_fields(cfg) -> dict:
    """The config's fields with the speed section's at the top level (the cache keys' and the
    memory probe's form, as before the speed section existed)."""
    d = dataclasses.asdict(cfg)
    return {**{k: v for k, v in d.items() if k != "speed"}, **d["speed"]}


def rows_to_run(args) -> list[tuple[str, dict]]:
    """(label, flat DecodeConfig overrides of production) per row (see :func:`with_flat`); the
    naive row is handled apart."""
    rows = [
        ("(b) production", {}),
        ("(b) but Whisper padded to 30 s", {"whisper_window": "30s"}),
        ("(b) but all encoder layers", {"whisper_layers": "all"}),
        ("(b) but 1 trial, 1 draw per call", {"batch_size": 1, "draws_per_call": 1}),
        ("(b) but 1000-step ancestral", {"sampler": "ancestral", "num_steps": 1000}),
        (f"(b) with {args.few_steps} EDM steps", {"num_steps": args.few_steps}),
        (f"(b) guided at sigma <= {args.guide_sigma_max:g} only",
         {"guide_sigma_max": args.guide_sigma_max}),
        (f"(b) with length buckets of {args.bucket} frames", {"pad_multiple": args.bucket}),
        ("(b) with gradient checkpointing", {"grad_checkpoint": True}),
    ]
    if args.cuda or args.bf16:
        rows.append(("(b) with bf16 autocast" if not args.cuda else "(b) but fp32",
                     {"precision": "fp32" if args.cuda else "bf16"}))
    if args.compile:
        rows.append((f"(b) with torch.compile ({args.compile_mode})",
                     {"compile": True, "compile_mode": args.compile_mode}))
    return rows


class PeakMemory:
    """Peak memory above the level at entry: CUDA allocated, or process RSS sampled at 20 Hz."""

    def __init__(self, cuda: bool):
        self.cuda, self.peak = cuda, 0

    def __enter__(self):
        import psutil
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        self.proc, self.base, self.stop = psutil.Process(), psutil.Process().memory_info().rss, False

        def sample():
            while not self.stop:
                self.peak = max(self.peak, self.proc.memory_info().rss - self.base)
                time.sleep(0.05)

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.stop = True
            self.thread.join()
            self.peak = max(self.peak, self.proc.memory_info().rss - self.base)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pipeline", default="runs/demo",
                   help="pipeline root holding ingest/ and prior/ (default corpus)")
    p.add_argument("--subject", default="sim05")
    p.add_argument("--likelihood", default=None,
                   help="Whisper likelihood folder (default OUT/likelihood; trained if missing)")
    p.add_argument("--out", default="runs/dps-speed", help="results cache and likelihood")
    p.add_argument("--trials", type=int, default=4, help="first N test trials of the subject")
    p.add_argument("--draws", type=int, default=4, help="posterior draws per trial (K)")
    p.add_argument("--steps", type=int, default=25, help="production EDM steps")
    p.add_argument("--few-steps", type=int, default=12, help="the fewer-steps row")
    p.add_argument("--guide-sigma-max", type=float, default=10.0, help="the guided-subset row")
    p.add_argument("--bucket", type=int, default=200, help="the length-bucket row (frames)")
    p.add_argument("--naive-steps", type=int, default=10,
                   help="respaced ancestral steps timed for (a), scaled to 1000")
    p.add_argument("--bf16", action="store_true", help="add a bf16 row on CPU")
    p.add_argument("--compile", action="store_true", help="add a torch.compile row")
    p.add_argument("--compile-mode", default="default")
    p.add_argument("--profile", action="store_true", help="torch.profiler of one production decode")
    p.add_argument("--retime", action="store_true",
                   help="time the cached rows again, once each (not the 1000-step one unless "
                        "--retime-ancestral), keeping their FLOPs and quality")
    p.add_argument("--retime-ancestral", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    args = p.parse_args(argv)
    args.cuda = args.device.startswith("cuda")
    probe = os.environ.get("SSIP_BENCH_MEMORY_PROBE")

    import numpy as np
    import torch

    from ssip.data.dataset import load_trials
    from ssip.decode import DecodeConfig, decode_trials
    from ssip.evaluate.report import EvaluateConfig, score_trials
    from ssip.models.likelihood import load_likelihood
    from ssip.models.prior import load_prior
    from ssip.models.vocoder import get_vocoder

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lik_dir = Path(args.likelihood or out / "likelihood")
    ingest = str(Path(args.pipeline) / "ingest")
    if not (lik_dir / "manifest.json").exists():
        print(f"training a Whisper likelihood for {args.subject} -> {lik_dir}", flush=True)
        subprocess.run([sys.executable, "-m", "ssip.cli", "train", "likelihood", ingest,
                        str(lik_dir), "--subject", args.subject, "--set", "kind=whisper"],
                       check=True)
    prior, _ = load_prior(str(Path(args.pipeline) / "prior"))
    likelihood, lik_manifest = load_likelihood(str(lik_dir), device=args.device)
    if lik_manifest["config"]["kind"] != "whisper":
        raise SystemExit(f"{lik_dir}: a {lik_manifest['config']['kind']!r} likelihood; this "
                         f"benchmark needs kind=whisper")
    prior = prior.to(args.device)
    trials = load_trials(ingest, split="test", subject=args.subject)[: args.trials]
    if not trials:
        raise SystemExit(f"{ingest}: no test trials of subject {args.subject!r}")
    refs = {(t["subject"], t["trial_id"]): t for t in trials}
    speech_s = sum(t["neural"].shape[0] for t in trials) / 100.0
    vocoder = get_vocoder(EvaluateConfig().vocoder)
    threads = torch.get_num_threads()
    machine = (torch.cuda.get_device_name() if args.cuda else
               f"CPU, {os.cpu_count()} cores, {threads} torch threads")
    print(f"{machine}; subject {args.subject}: {len(trials)} test trials "
          f"({speech_s:.1f} s of speech, lengths {[t['neural'].shape[0] for t in trials]}), "
          f"K = {args.draws} draws; likelihood Whisper {lik_manifest['config']['whisper_model']} "
          f"tapped at layer {lik_manifest['config']['layer']}", flush=True)

    base = dict(methods=["dps"], n_draws=args.draws, num_steps=args.steps)
    cache_path = out / "results.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    ident = {"pipeline": str(Path(args.pipeline).resolve()), "likelihood": str(lik_dir.resolve()),
             "subject": args.subject, "trials": [t["trial_id"] for t in trials],
             "device": args.device, "machine": machine}

    defaults = flat_fields(DecodeConfig())

    def key(cfg: DecodeConfig, what: str) -> str:
        # Only the fields off their defaults: a new DecodeConfig field keeps old results valid.
        changed = {k: v for k, v in flat_fields(cfg).items() if v != defaults.get(k)}
        blob = json.dumps({**ident, "cfg": changed, "what": what}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def decode(cfg: DecodeConfig, subset=None):
        return decode_trials(subset or trials, prior, likelihood, cfg)

    def quality(rows) -> dict:
        means = [r for r in rows if r["draw"] == -1]
        scored, _ = score_trials(means, refs, EvaluateConfig(), vocoder, None)
        return {"mel_pcc": float(np.nanmean([r["mel_pcc"] for r in scored])),
                "stoi": float(np.nanmean([r.get("stoi", math.nan) for r in scored]))}

    def step_flops(cfg: DecodeConfig) -> tuple[float, float]:
        """(FLOPs of a 2-step decode, FLOPs of one more step), counted at 2 and 3 steps."""
        from torch.utils.flop_counter import FlopCounterMode

        counts = []
        for s in (2, 3):
            with FlopCounterMode(display=False) as fc:
                decode(with_flat(cfg, {"num_steps": s, "compile": False}))
            counts.append(float(fc.get_total_flops()))
        return counts[0], counts[1] - counts[0]

    def flops(cfg: DecodeConfig) -> tuple[float, float]:
        """(FLOPs of the decode at cfg.num_steps, mean FLOPs per step per draw)."""
        f2, guided = step_flops(dataclasses.replace(cfg, guide_sigma_max=None))
        total = f2 + (cfg.num_steps - 2) * guided
        if cfg.guide_sigma_max is not None:  # unguided steps cost a forward pass only
            _, unguided = step_flops(dataclasses.replace(cfg, guide_sigma_max=0.0))
            n_off = cfg.num_steps - sum(cfg.guide_steps())
            total -= n_off * (guided - unguided)
        return total, total / (cfg.num_steps * len(trials) * cfg.n_draws)

    if probe:  # a child process measuring one row's peak memory (see memory_peak)
        cfg = with_flat(DecodeConfig(), json.loads(probe))
        with PeakMemory(args.cuda) as mem:
            decode(cfg)
        print(f"PEAK {mem.peak}")
        return 0

    def memory_peak(cfg: DecodeConfig) -> float:
        """Peak memory of a 2-step decode of the row (a step's memory does not grow with the
        step count), in a fresh process: on CPU with glibc's mmap threshold fixed, so freed
        tensors go back to the OS and the RSS peak is the row's own. Timing runs never use
        that setting (it makes every allocation a system call)."""
        if args.cuda:
            with PeakMemory(True) as mem:
                decode(dataclasses.replace(cfg, num_steps=2))
            return mem.peak
        over = {k: v for k, v in flat_fields(dataclasses.replace(cfg, num_steps=2)).items()
                if v != defaults.get(k)}
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072",
               "SSIP_BENCH_MEMORY_PROBE": json.dumps(over)}
        out = subprocess.run([sys.executable, *sys.argv], env=env, capture_output=True,
                             text=True, check=True).stdout
        return float(next(x for x in out.splitlines() if x.startswith("PEAK ")).split()[1])

    def timed(cfg: DecodeConfig):
        if cfg.speed.compile:  # compile outside the timed run: one warm-up decode
            decode(cfg)
        t0 = time.perf_counter()
        rows = decode(cfg)
        if args.cuda:
            torch.cuda.synchronize()
        return rows, time.perf_counter() - t0, memory_peak(cfg)

    def run_row(label: str, cfg: DecodeConfig, scale: float = 1.0, quality_from=None) -> dict:
        k = key(cfg, "row")
        if k not in cache:
            rows, wall, peak = timed(cfg)
            total, per_step = flops(cfg)
            res = {"label": label, "wall_s": wall * scale, "peak_mb": peak / 2**20,
                   "flops_total": total * scale, "flops_per_step_draw": per_step,
                   "timed_share": 1.0 / scale}
            res.update(quality(rows) if quality_from is None else {})
            cache[k] = res
            cache_path.write_text(json.dumps(cache, indent=1))
            print(f"  done: {label} ({wall:.0f} s measured)", flush=True)
        elif args.retime and not cache[k].get("retimed"):
            # Time the row again (e.g. on a quiet machine); FLOPs and quality stay.
            _, wall, peak = timed(cfg)
            cache[k].update(wall_s=wall * scale, peak_mb=peak / 2**20, retimed=True)
            cache_path.write_text(json.dumps(cache, indent=1))
            print(f"  retimed: {label} ({wall:.0f} s measured)", flush=True)
        res = dict(cache[k], label=label)
        if quality_from is not None:
            res.update({m: quality_from[m] for m in ("mel_pcc", "stoi")})
        return res

    results = {}
    prod = DecodeConfig(**base)
    for label, over in rows_to_run(args):
        cfg_row = with_flat(prod, over)
        keep = args.retime
        if cfg_row.num_steps == 1000 and not args.retime_ancestral:
            args.retime = False  # an hour on 2 cores: re-timed only when asked
        results[label] = run_row(label, cfg_row)
        args.retime = keep
    exact_a = results["(b) but 1000-step ancestral"]
    naive_cfg = with_flat(DecodeConfig(), {**base, **NAIVE, "num_steps": args.naive_steps})
    naive = run_row(f"(a) naive ({args.naive_steps} of 1000 steps timed, x{1000 // args.naive_steps})",
                    naive_cfg, scale=1000 / args.naive_steps, quality_from=exact_a)
    # The naive path and its exact equivalent agree on the timed steps.
    eq_key = key(naive_cfg, "equal")
    if eq_key not in cache:
        a_rows = decode(naive_cfg)
        b_rows = decode(with_flat(naive_cfg, dict(batch_size=8, draws_per_call=None,
                                                  whisper_window="trial", whisper_layers="tap")))
        cache[eq_key] = max(float(np.abs(x["mel"] - y["mel"]).max())
                            for x, y in zip(a_rows, b_rows, strict=True))
        cache_path.write_text(json.dumps(cache, indent=1))
    table = [naive, *results.values()]

    peak = next((v for k, v in BF16_PEAK.items() if args.cuda and k in machine), None)
    head = (f"{'row':44s} {'trials/s':>9s} {'s/s speech':>10s} {'peak MB':>8s} "
            f"{'GFLOP/step':>10s} {'GFLOP/s':>8s}" + (f" {'% bf16 pk':>9s}" if peak else "")
            + f" {'mel PCC':>8s} {'STOI':>6s}")
    print("\n" + head)
    for r in table:
        fps = r["flops_total"] / r["wall_s"]
        line = (f"{r['label'][:44]:44s} {len(trials) / r['wall_s']:9.4f} "
                f"{r['wall_s'] / speech_s:10.1f} {r['peak_mb']:8.0f} "
                f"{r['flops_per_step_draw'] / 1e9:10.2f} {fps / 1e9:8.1f}")
        if peak:
            line += f" {100 * fps / peak:9.2f}"
        print(line + f" {r['mel_pcc']:8.3f} {r['stoi']:6.3f}")
    b = results["(b) production"]
    print(f"\nspeed ratio (b)/(a): {naive['wall_s'] / b['wall_s']:.0f}x trials/s; "
          f"posterior-mean mel PCC (b) {b['mel_pcc']:.3f} vs (a) {naive['mel_pcc']:.3f}, "
          f"STOI {b['stoi']:.3f} vs {naive['stoi']:.3f}")
    print(f"(a) timed on {args.naive_steps} of its 1000 steps and scaled; its quality is from "
          f"complete 1000-step runs of the exact-equivalent path (naive vs equivalent on the "
          f"timed steps: max |diff| {cache[eq_key]:.2e})")
    if args.cuda:
        print(f"trials/s per GPU (b): {len(trials) / b['wall_s']:.3f}")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.cuda else [])
        with profile(activities=acts) as prof:
            decode(dataclasses.replace(prod, num_steps=3), trials[:1])
        sort = "cuda_time_total" if args.cuda else "cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=15))
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
