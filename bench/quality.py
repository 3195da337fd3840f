"""Decoding quality: DPS against the baselines and controls, per subject, on held-out trials.

Runs (or resumes) ``ssip pipeline ROOT --config CONFIG`` (default: the embedded default corpus,
configs/pipeline-quality.yaml) and prints, per subject and pooled, the mean over test trials of
mel PCC, STOI and ASR WER for

- ``dps``: the DPS posterior mean (the estimate to score with PCC/STOI, DESIGN.md section 4),
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default="runs/quality", help="pipeline run folder")
    p.add_argument("--config", default=str(ROOT / "configs" / "pipeline-quality.yaml"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override the pipeline config (dotted), e.g. --set decode.xi=0.3")
    p.add_argument("--report-only", action="store_true", help="only print the table of ROOT")
    args = p.parse_args(argv)
    if not args.report_only:
        from ssip.config import resolve
        from ssip.pipeline import PipelineConfig, run

        run(resolve(PipelineConfig, args.config, args.overrides), args.root)
    rows = read_summary(args.root)
    print(f"\nquality of {args.root} (means over test trials; wer lower is better)\n")
    print(table(rows, heldout_voice_subjects(args.root)))
    print(margins(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
