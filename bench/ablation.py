"""Decoder ablation on VALIDATION trials: each lever of issue 22 alone and together, vs nn.

Reads a finished ``ssip pipeline`` run (ROOT/ingest, prior, likelihood/<subject>,
baselines/<subject>/{linear,nn}; bench/quality.py makes one) and decodes the first ``--trials``
validation trials of every subject under each variant below, in this process, with the same
prior, likelihoods, baselines and seeds. Per variant it prints the mean mel PCC of the posterior
mean, the paired difference against ``nn`` per subject and pooled with a 95 % BCa bootstrap
interval (trials resampled; bench/quality.py's ``paired_difference``), and the wall-clock
seconds per trial, so that samplers are compared at their measured cost.

Variants are DecodeConfig overrides; ``noise: whitened`` refits each subject's likelihood noise
as the whitened model (AR per electrode + low-rank cross-electrode factors,
``ssip.sampling.whitening``) on that subject's validation residuals, the trained network
unchanged (what ``likelihood.noise_model: whitened`` does at training time).

Settings are chosen here, on validation trials only; bench/quality.py then scores the test split
untouched, on both simulated brains. Results are cached per variant under ROOT/ablation/ (a
re-run prints; ``--force`` re-decodes).

Run: ``.venv/bin/python bench/ablation.py --root runs/quality [--trials 4] [--variants a,b]``
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

BOTH = {"evidence": ["encoding", "nn"], "evidence_weights": [0.5, 0.5]}
#: name -> (DecodeConfig overrides, likelihood noise model)
VARIANTS: dict[str, tuple[dict, str]] = {
    "dps": ({}, "diagonal"),
    "dps-w2": ({"weight": 2.0}, "diagonal"),
    "dps-whitened": ({}, "whitened"),
    "dps-nn": ({"evidence": ["nn"]}, "diagonal"),
    "dps-both": (BOTH, "diagonal"),
    "dps-both-whitened": (BOTH, "whitened"),
    "dps-both-82": ({"evidence": ["encoding", "nn"], "evidence_weights": [0.8, 0.2]}, "diagonal"),
    # the nn's mel as a CALIBRATED measurement z = a x + b + e per bin (fitted on the subject's
    # other val trials): a regression output is shrunk toward the mean, not x plus noise
    "dps-both-82-cal": ({"evidence": ["encoding", "nn"], "evidence_weights": [0.8, 0.2]},
                        "diagonal+nn-cal"),
    "dps-both-cal": (BOTH, "diagonal+nn-cal"),
    "dps-nn-cal": ({"evidence": ["nn"]}, "diagonal+nn-cal"),
    "daps": ({"sampler": "daps"}, "diagonal"),
    # about DPS's wall-clock per trial: 8 Langevin steps per level instead of 20
    "daps-8": ({"sampler": "daps", "daps_langevin_steps": 8}, "diagonal"),
    "daps-whitened": ({"sampler": "daps"}, "whitened"),
    "daps-nn": ({"sampler": "daps", "evidence": ["nn"]}, "diagonal"),
    "daps-both": ({"sampler": "daps", **BOTH}, "diagonal"),
    "daps-both-whitened": ({"sampler": "daps", **BOTH}, "whitened"),
}


def whitened(likelihood, val_trials):
    """A copy of ``likelihood`` whose noise is the whitened model fitted on ``val_trials``'
    residuals (the network's weights unchanged)."""
    from ssip.models.likelihood import build_likelihood, evaluate_likelihood, set_noise_sigma

    cfg = dataclasses.replace(likelihood.config, noise_model="whitened")
    model = build_likelihood(cfg, likelihood.n_electrodes)
    missing, unexpected = model.load_state_dict(likelihood.state_dict(), strict=False)
    if unexpected or any(not k.startswith("noise_") for k in missing):
        raise RuntimeError(f"whitened copy: missing {missing}, unexpected {unexpected}")
    model.eval()
    m = evaluate_likelihood(model, val_trials, cfg.batch_size, cfg.noise_lags)
    set_noise_sigma(model, m, cfg.sigma_min)
    return model


class CalibratedNN:
    """The nn decoder seen as a linear measurement of the mel, z = a x + b + e per bin: predicts
    (z - b) / a with noise std sd(e) / a, so that the Gaussian pseudo-measurement residual is
    (z - a x - b) / sd(e). a, b, sd(e) are fitted on ``fit_trials`` (val trials not scored)."""

    def __init__(self, nn, fit_trials):
        import numpy as np

        z = np.concatenate([np.asarray(nn.predict(np.asarray(t["neural"], np.float32)))
                            for t in fit_trials], axis=1)
        x = np.concatenate([np.asarray(t["mel"]) for t in fit_trials], axis=1)
        xc, zc = x - x.mean(1, keepdims=True), z - z.mean(1, keepdims=True)
        self.a = np.maximum((xc * zc).sum(1) / np.maximum((xc * xc).sum(1), 1e-9), 0.05)
        self.b = z.mean(1) - self.a * x.mean(1)
        sd = np.sqrt(np.mean((z - self.a[:, None] * x - self.b[:, None]) ** 2, axis=1))
        self.nn, self.noise_std = nn, sd / self.a

    def predict(self, neural):
        z = self.nn.predict(neural)
        return ((z - self.b[:, None]) / self.a[:, None]).astype("float32")


def load_run(root: str, n_trials: int, split: str, only: list[str] | None = None):
    from ssip import storage
    from ssip.data.dataset import load_trials
    from ssip.models.baselines import load_baseline
    from ssip.models.likelihood import load_likelihood
    from ssip.models.prior import load_prior

    ingest = storage.join(root, "ingest")
    trials: dict[str, list[dict]] = {}
    for t in load_trials(ingest, split=split):
        trials.setdefault(t["subject"], []).append(t)
    val: dict[str, list[dict]] = {}
    for t in load_trials(ingest, split="val"):
        val.setdefault(t["subject"], []).append(t)
    prior, _ = load_prior(storage.join(root, "prior"))
    subjects = {}
    for s, ts in sorted(trials.items()):
        if only and s not in only:
            continue
        lik, _ = load_likelihood(storage.join(root, "likelihood", s))
        base = {k: load_baseline(storage.join(root, "baselines", s, k)) for k in ("linear", "nn")}
        subjects[s] = {"trials": ts[:n_trials], "val": val[s], "likelihood": lik,
                       "baselines": base}
    return prior, subjects


def score(rows: list[dict], refs: dict[tuple[str, str], object]) -> list[dict]:
    from ssip.metrics import mel_pcc

    return [{"subject": r["subject"], "trial_id": r["trial_id"], "method": r["method"],
             "draw": r["draw"], "mel_pcc": mel_pcc(r["mel"], refs[(r["subject"], r["trial_id"])])}
            for r in rows]


def run_variant(name: str, subject: str, overrides: dict, noise: str, prior, d: dict, base_cfg,
                refs) -> dict:
    """One variant on one subject's trials: scored rows and the decode's wall-clock seconds."""
    from ssip.config import from_dict
    from ssip.decode import DecodeConfig, decode_trials

    cfg = from_dict(DecodeConfig, {**dataclasses.asdict(base_cfg), **copy.deepcopy(overrides),
                                   "methods": ["dps"]})
    lik = d["likelihood"]
    if noise == "whitened" and "encoding" in cfg.evidence:
        lik = d.setdefault("whitened", whitened(lik, d["val"]))
    baselines = d["baselines"]
    if noise.endswith("+nn-cal"):
        scored = {t["trial_id"] for t in d["trials"]}
        fit = [t for t in d["val"] if t["trial_id"] not in scored]
        baselines = {**baselines, "nn": CalibratedNN(baselines["nn"], fit)}
    t0 = time.perf_counter()
    rows = decode_trials(d["trials"], prior, lik, cfg, baselines=baselines)
    seconds = time.perf_counter() - t0
    print(f"  {name}: {subject} done ({seconds:.0f} s)", flush=True)
    for r in rows:
        r["method"] = name
    return {"rows": score(rows, refs), "seconds": seconds, "n_trials": len(d["trials"]),
            "config": {"overrides": overrides, "noise": noise}}


def _split_legacy(out_dir: Path) -> None:
    """Results cached by an earlier version (one file per variant and subject SET) -> one file
    per variant and subject."""
    for old in out_dir.glob("*/*.json"):
        if old.parent.name in VARIANTS or old.parent.name == "baselines":
            continue
        data = json.loads(old.read_text())
        name = old.stem
        by: dict[str, list] = {}
        for r in data["rows"]:
            by.setdefault(r["subject"], []).append(r)
        for subject, rows in by.items():
            f = out_dir / name / f"{subject}.json"
            if f.exists():
                continue
            n = len({r["trial_id"] for r in rows})
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(json.dumps({"rows": rows, "n_trials": n, "config": data.get("config"),
                                     "seconds": data.get("seconds_per_trial", math.nan) * n}))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", required=True, help="finished pipeline run folder")
    p.add_argument("--trials", type=int, default=4, help="val trials per subject (the first)")
    p.add_argument("--split", default="val", choices=("val", "test"),
                   help="val to choose (default); test only for the final, untouched report")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names of "
                   f"{list(VARIANTS)}")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="base DecodeConfig override for every variant (e.g. n_draws=16)")
    p.add_argument("--subjects", default="", help="comma-separated subjects (default: all)")
    p.add_argument("--force", action="store_true", help="re-decode cached variants")
    args = p.parse_args(argv)

    import numpy as np
    from quality import paired_difference

    from ssip.config import resolve
    from ssip.decode import DecodeConfig

    base_cfg = resolve(DecodeConfig, None, ["n_draws=16", "num_steps=25", *args.overrides])
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    only = [x for x in args.subjects.split(",") if x]
    out_dir = Path(args.root) / "ablation" / f"{args.split}-{args.trials}-{base_cfg.n_draws}draws"
    out_dir.mkdir(parents=True, exist_ok=True)
    _split_legacy(out_dir)
    prior, subjects = load_run(args.root, args.trials, args.split, only)
    refs = {(t["subject"], t["trial_id"]): np.asarray(t["mel"])
            for d in subjects.values() for t in d["trials"]}

    def cached(name: str, subject: str, make) -> dict:
        f = out_dir / name / f"{subject}.json"
        if f.exists() and not (args.force and name != "baselines"):
            return json.loads(f.read_text())
        out = make()
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps(out))
        return out

    from ssip.decode import baseline_rows

    results: dict[str, dict] = {}
    for name in ["baselines", *names]:
        parts = []
        for s, d in subjects.items():
            if name == "baselines":
                parts.append(cached(name, s, lambda d=d: {"rows": score(
                    [r for k in ("linear", "nn") for r in baseline_rows(
                        d["trials"], d["baselines"][k], k)], refs), "seconds": math.nan,
                    "n_trials": len(d["trials"])}))
            else:
                overrides, noise = VARIANTS[name]
                parts.append(cached(name, s, lambda n=name, s=s, d=d, o=overrides, z=noise:
                                    run_variant(n, s, o, z, prior, d, base_cfg, refs)))
        results[name] = {"rows": [r for x in parts for r in x["rows"]],
                         "seconds_per_trial": sum(x["seconds"] for x in parts)
                         / max(1, sum(x["n_trials"] for x in parts))}

    base_rows = results["baselines"]["rows"]
    print(f"\n{args.split} trials: first {args.trials} per subject, {len(refs)} in all; "
          f"{base_cfg.n_draws} draws, {base_cfg.num_steps} steps; mel PCC of the posterior mean")
    for k in ("linear", "nn"):
        v = [r["mel_pcc"] for r in base_rows if r["method"] == k and not math.isnan(r["mel_pcc"])]
        print(f"{k:20s} {np.mean(v):.3f}")
    print(f"{'variant':20s} {'PCC':>6s} {'draw':>6s} {'s/trial':>8s}  mean - nn [95 % BCa] "
          f"pooled | per subject")
    for name in names:
        rows = results[name]["rows"]
        mean = [r["mel_pcc"] for r in rows if r["draw"] < 0 and not math.isnan(r["mel_pcc"])]
        draw = [r["mel_pcc"] for r in rows if r["draw"] >= 0 and not math.isnan(r["mel_pcc"])]
        diff = paired_difference(rows + base_rows, method=name, against="nn")
        pooled = diff.get("*", {})
        per = " ".join(f"{s}:{d['mean']:+.3f}" for s, d in sorted(diff.items()) if s != "*")
        print(f"{name:20s} {np.mean(mean):6.3f} {np.mean(draw):6.3f} "
              f"{results[name]['seconds_per_trial']:8.1f}  {pooled.get('mean', math.nan):+.3f} "
              f"[{pooled.get('low', math.nan):+.3f}, {pooled.get('high', math.nan):+.3f}] | {per}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
