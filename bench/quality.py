"""Decoding quality: DPS against the baselines and controls, per subject, on held-out trials.

Runs (or resumes) ``ssip pipeline ROOT --config CONFIG`` (default: the embedded default corpus,
configs/pipeline-quality.yaml) and prints, per subject and pooled, the mean over test trials of
mel PCC, STOI and ASR WER for

- ``dps``: the DPS posterior mean (the estimate to score with PCC/STOI, docs/method.md, Decoding),
- ``dps (draw)``: single posterior draws,
- ``linear`` (Verwoert et al.), ``nn`` (the regression net): the direct decoders to beat,
- ``prior``: unconditional samples (no neural data),
- ``dps-shuffled``: DPS driven by another trial's neural data (should sit near chance),

then the margin of DPS over the best baseline per subject (a ratio-free difference: PCC and STOI
are already on a common scale). Everything it needs is under ROOT (re-running only prints).

Run: ``.venv/bin/python bench/quality.py [--root runs/quality] [--config configs/pipeline-quality.yaml]``
(about an hour on 2 CPU cores for the default config, most of it DPS).
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ORDER = ("dps", "dps (draw)", "linear", "nn", "prior", "dps-shuffled")
METRICS = ("mel_pcc", "mel_pcc_chance", "stoi", "wer")


def read_summary(root: str) -> list[dict]:
    path = Path(root) / "report" / "summary.csv"
    with open(path) as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k in METRICS:
            r[k] = float(r[k]) if r.get(k) not in (None, "") else math.nan
    return rows


def heldout_voice_subjects(root: str) -> dict[str, str]:
    """Subjects whose voice the prior never heard: subject -> voice (from the corpus card and
    the prior's leakage record; empty when either is missing)."""
    import json

    corpus, prior = Path(root) / "corpus" / "corpus.json", Path(root) / "prior" / "manifest.json"
    if not (corpus.exists() and prior.exists()):
        return {}
    data = json.loads(prior.read_text()).get("extra", {}).get("data", {})
    held = set((data.get("leakage") or {}).get("heldout_speakers") or [])
    if data.get("kind") != "speech":
        return {}
    return {s["subject"]: ",".join(s.get("voice", [])) for s in json.loads(corpus.read_text())["subjects"]
            if set(s.get("voice", [])) & held}


def table(rows: list[dict], heldout: dict[str, str] | None = None) -> str:
    by = {(r["subject"], r["method"]): r for r in rows}
    subjects = sorted({r["subject"] for r in rows}, key=lambda s: (s == "*", s))
    lines = [f"{'subject':8s} {'method':13s} {'n':>3s} " + " ".join(f"{m:>14s}" for m in METRICS)]
    for s in subjects:
        if heldout and s in heldout:
            lines.append(f"{s}: voice {heldout[s]} is held out of the prior's corpus "
                         f"(cross-speaker generalisation)")
        for m in ORDER:
            r = by.get((s, m))
            if r is None:
                continue
            cells = " ".join(f"{r[k]:14.3f}" for k in METRICS)
            lines.append(f"{s:8s} {m:13s} {int(r['n_trials']):3d} {cells}")
        lines.append("")
    return "\n".join(lines)


def margins(rows: list[dict]) -> str:
    by = {(r["subject"], r["method"]): r for r in rows}
    subjects = sorted({r["subject"] for r in rows}, key=lambda s: (s == "*", s))
    out = ["DPS posterior mean minus the best direct decoder (positive = DPS wins):"]
    for s in subjects:
        dps = by.get((s, "dps"))
        bases = [by[(s, m)] for m in ("linear", "nn") if (s, m) in by]
        if dps is None or not bases:
            continue
        cells = []
        for k, better in (("mel_pcc", max), ("stoi", max), ("wer", min)):
            best = better(b[k] for b in bases)
            diff = dps[k] - best
            cells.append(f"{k} {diff:+.3f}")
        out.append(f"  {s:6s} " + "  ".join(cells))
    return "\n".join(out)


def read_metrics(root: str) -> list[dict]:
    """Per-trial rows of ROOT/report/metrics.parquet (subject, trial_id, method, draw, metrics)."""
    import pyarrow.parquet as pq

    return pq.read_table(Path(root) / "report" / "metrics.parquet").to_pylist()


def paired_difference(rows: list[dict], metric: str = "mel_pcc", method: str = "dps",
                      against: str = "nn", draws: bool = False, seed: int = 0) -> dict:
    """Per subject and pooled ('*'): mean over trials of metric(method) - metric(against), paired
    by trial, with a 95 % bootstrap interval (scipy.stats.bootstrap, BCa, trials resampled).

    ``draws``: score ``method``'s single draws (each trial's mean over its draws) instead of its
    posterior mean (draw -1). Trials missing either score are left out.
    """
    import numpy as np
    from scipy.stats import bootstrap

    def value(r):
        v = r.get(metric)
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)

    per: dict[tuple[str, str], dict[str, list[float]]] = {}
    for r in rows:
        v = value(r)
        if v is None:
            continue
        key = (r["subject"], r["trial_id"])
        if r["method"] == method and ((r["draw"] >= 0) if draws else (r["draw"] < 0)):
            per.setdefault(key, {}).setdefault("a", []).append(v)
        elif r["method"] == against and r["draw"] < 0:
            per.setdefault(key, {}).setdefault("b", []).append(v)
    diffs: dict[str, list[float]] = {}
    for (subject, _), d in sorted(per.items()):
        if "a" in d and "b" in d:
            x = float(np.mean(d["a"])) - float(np.mean(d["b"]))
            diffs.setdefault(subject, []).append(x)
            diffs.setdefault("*", []).append(x)
    out = {}
    for subject, xs in diffs.items():
        x = np.asarray(xs)
        if len(x) >= 3 and np.ptp(x) > 0:
            ci = bootstrap((x,), np.mean, confidence_level=0.95, n_resamples=4000,
                           method="BCa", random_state=seed).confidence_interval
            lo, hi = float(ci.low), float(ci.high)
        else:
            lo = hi = math.nan
        out[subject] = {"n": len(x), "mean": float(x.mean()), "low": lo, "high": hi}
    return out


def intervals(rows: list[dict]) -> str:
    """The issue's yardsticks: DPS mean - nn on mel PCC, and DPS draws - nn on closed-set
    identification, per subject with 95 % bootstrap intervals."""
    lines = ["paired differences over test trials, mean [95 % bootstrap interval]:"]
    for label, kw in (("mel_pcc: dps mean - nn", {"metric": "mel_pcc"}),
                      ("identified: dps draws - nn", {"metric": "identified", "draws": True})):
        res = paired_difference(rows, **kw)
        if not res:
            continue
        lines.append(f"  {label}")
        for s in sorted(res, key=lambda s: (s == "*", s)):
            r = res[s]
            lines.append(f"    {s:6s} n={r['n']:3d}  {r['mean']:+.3f} [{r['low']:+.3f}, {r['high']:+.3f}]")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default="runs/quality", help="pipeline run folder")
    p.add_argument("--config", default=str(ROOT / "configs" / "pipeline-quality.yaml"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override the pipeline config (dotted), e.g. --set decode.xi=0.3")
    p.add_argument("--report-only", action="store_true", help="only print the table of ROOT")
    args = p.parse_args(argv)
    if not args.report_only:
        from ssip.commands.pipeline import run
        from ssip.config import resolve
        from ssip.pipeline import PipelineConfig

        run(resolve(PipelineConfig, args.config, args.overrides), args.root)
    rows = read_summary(args.root)
    print(f"\nquality of {args.root} (means over test trials; wer lower is better)\n")
    print(table(rows, heldout_voice_subjects(args.root)))
    print(margins(rows))
    metrics = Path(args.root) / "report" / "metrics.parquet"
    if metrics.exists():
        print(intervals(read_metrics(args.root)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
