"""`ssip decode INGEST --prior DIR --likelihood-root DIR [--baselines-root DIR]`: decoded table.

Decodes every trial of ``--split`` (default test) of every subject in one process with
:func:`ssip.decode.decode_trials` and writes a parquet table (subject, trial_id, method, mel
(80, T), draw) that ``ssip evaluate`` scores. Per subject it reads the likelihood at
``LIKELIHOOD_ROOT/<subject>`` and the baselines at ``BASELINES_ROOT/<subject>/<kind>`` (as
``ssip train likelihood|baseline`` write them when OUT is given so).

The trials decoded are the config's ``selection`` (split, subjects, max_trials); ``--split``,
``--subject`` and ``--max-trials`` are shortcuts that set it (a flag given overrides the config
and ``--set``). The resolved config, with its hash, is saved beside the table as
``OUT.config.yaml`` (usable as ``--config``).
"""

from __future__ import annotations

import argparse

from ssip.commands._common import (
    add_config_args,
    add_ray_args,
    preset_overrides,
    resolve_and_print,
)


def register(sub) -> None:
    p = sub.add_parser("decode", help="decode trials (DPS, controls, baselines) into a table")
    p.add_argument("ingest", help="ingest root (local or s3://)")
    p.add_argument("--prior", default="shipped", help="'shipped' (default: the prior that "
                   "ships with ssip) or a prior checkpoint folder (ssip train prior)")
    p.add_argument("--likelihood-root", default=None,
                   help="folder holding one likelihood checkpoint per subject: ROOT/<subject>")
    p.add_argument("--baselines-root", default=None,
                   help="folder holding baselines as ROOT/<subject>/<linear|nn>")
    p.add_argument("--split", default=None, choices=("train", "val", "test"),
                   help="which trials to decode: sets selection.split (default test)")
    p.add_argument("--subject", action="append", default=None,
                   help="decode only this subject (repeatable; default: all): sets "
                        "selection.subjects")
    p.add_argument("--max-trials", type=int, default=None,
                   help="decode at most this many trials per subject, in trial order (0 = all): "
                        "sets selection.max_trials")
    p.add_argument("--out", required=True, help="decoded table to write (.parquet, local or s3://)")
    p.add_argument("--actors", type=int, default=0, metavar="N",
                   help="0 (default): decode in this process; N >= 1: on Ray, N decode actors "
                        "(Ray Data actor pool; resumable, exactly once per trial)")
    p.add_argument("--cpus-per-actor", type=float, default=None,
                   help="CPUs reserved per decode actor (default 0.5)")
    p.add_argument("--gpu", action="store_true", help="one GPU per decode actor")
    p.add_argument("--work", default=None, help="run folder of the Ray decode: units, quarantine, "
                   "summary.json (default OUT.d)")
    p.add_argument("--preset", default=None, metavar="NAME",
                   help="decode each subject with its guidance setting from preset NAME "
                        "(saved by `ssip sweep`)")
    p.add_argument("--presets", default=None, metavar="DIR",
                   help="preset folder (default LIKELIHOOD_ROOT/presets)")
    p.add_argument("--report", default=None, metavar="DIR",
                   help="then score the table with `ssip evaluate` into DIR (default config)")
    # Test hook (kill a driver part way): decode actors sleep this long after each unit.
    p.add_argument("--debug-unit-delay", type=float, default=0.0, help=argparse.SUPPRESS)
    add_ray_args(p)
    add_config_args(p)
    p.set_defaults(func=_decode)


def _decode(args) -> int:
    from collections import defaultdict

    from ssip import storage
    from ssip.data.dataset import load_trials
    from ssip.data.schema import decoded_rows_table
    from ssip.decode import DecodeConfig, decode_trials
    from ssip.models.baselines import load_baseline
    from ssip.models.likelihood import load_likelihood
    from ssip.models.prior import load_prior

    if args.actors < 0:
        raise ValueError(f"ssip decode: --actors={args.actors} must be >= 0")
    bulk = None
    if args.actors:
        from ssip.config import config_hash, resolve, to_yaml
        from ssip.distributed.decode_corpus import BulkDecodeConfig

        overrides = [f"actors={args.actors}", f"use_gpu={str(args.gpu).lower()}"]
        if args.cpus_per_actor is not None:
            overrides.append(f"cpus_per_actor={args.cpus_per_actor}")
        bulk = resolve(BulkDecodeConfig, None, overrides)
        print(f"# BulkDecodeConfig (hash {config_hash(bulk)})")
        print(to_yaml(bulk), end="")
    # The selection flags are shortcuts for config fields: applied after --config and --set.
    args.overrides = [*args.overrides, *selection_overrides(args)]
    cfg = resolve_and_print(DecodeConfig, args)
    if cfg is None:
        return 0
    sel = cfg.selection
    guided = [m for m in cfg.methods if m in ("dps", "dps-shuffled")]
    wanted = cfg.needs_baselines()  # the baseline methods, and nn for evidence [nn]
    if cfg.needs_likelihood() and not args.likelihood_root:
        raise ValueError(f"methods {guided} need --likelihood-root (or --set "
                         f"methods=[prior,...] without them)")
    if wanted and not args.baselines_root:
        raise ValueError(f"methods/evidence {wanted} need --baselines-root (or drop them: --set "
                         f"methods=[dps,prior,dps-shuffled])")
    per_subject = preset_overrides(args)
    if bulk is not None:
        return _decode_on_ray(args, cfg, bulk, per_subject)
    columns = ["schema_version", "subject", "trial_id", "split", "neural"]
    by_subject: dict[str, list[dict]] = defaultdict(list)
    for t in load_trials(args.ingest, split=sel.split, columns=columns):
        if not sel.subjects or t["subject"] in sel.subjects:
            by_subject[t["subject"]].append(t)
    if sel.max_trials:
        by_subject = defaultdict(list, {s: ts[:sel.max_trials] for s, ts in by_subject.items()})
    if not by_subject:
        raise ValueError(f"no {sel.split}-split trials under {args.ingest}"
                         + (f" for subject(s) {sel.subjects}" if sel.subjects else ""))
    prior, _ = load_prior(args.prior)
    rows: list[dict] = []
    for subject, trials in sorted(by_subject.items()):
        likelihood = None
        if cfg.needs_likelihood():
            likelihood, manifest = load_likelihood(storage.join(args.likelihood_root, subject))
            if manifest.get("subject") not in (None, subject):
                raise ValueError(f"{storage.join(args.likelihood_root, subject)}: likelihood of "
                                 f"subject {manifest.get('subject')!r}, not {subject!r}")
        baselines = {m: load_baseline(storage.join(args.baselines_root, subject, m))
                     for m in wanted}
        rows.extend(decode_trials(trials, prior, likelihood, subject_config(cfg, per_subject,
                                                                            subject),
                                  baselines=baselines, progress=True))
        print(f"decoded {len(trials)} trial(s) of {subject}", flush=True)
    storage.write_parquet(args.out, decoded_rows_table(rows))
    print(f"decoded table: {len(rows)} row(s) -> {args.out}")
    save_config(args.out, cfg, per_subject)
    _report(args)
    return 0


def selection_overrides(args) -> list[str]:
    """``--set``-style overrides of the selection flags given (none when a flag is absent)."""
    import json

    out = []
    if args.split is not None:
        out.append(f"selection.split={args.split}")
    if args.subject is not None:
        out.append(f"selection.subjects={json.dumps(list(args.subject))}")
    if args.max_trials is not None:
        out.append(f"selection.max_trials={args.max_trials}")
    return out


def config_uri(out: str) -> str:
    """Where a decode saves its resolved config: beside the table, ``OUT.config.yaml``."""
    return f"{out}.config.yaml"


def save_config(out: str, cfg, per_subject: dict[str, dict]) -> None:
    """Save the resolved DecodeConfig (selection included) and its hash beside the table."""
    from ssip import storage
    from ssip.config import config_hash, to_yaml

    head = f"# DecodeConfig (hash {config_hash(cfg)}) of the decoded table {out}\n"
    for subject, o in sorted(per_subject.items()):
        head += f"# preset override, {subject}: { {k: v for k, v in o.items() if v is not None} }\n"
    storage.write_bytes(config_uri(out), (head + to_yaml(cfg)).encode())


def _report(args) -> None:
    if args.report:
        from ssip.evaluate.report import EvaluateConfig, evaluate

        evaluate(args.out, args.ingest, args.report, EvaluateConfig())
        print(f"report: {args.report}/report.md")


def subject_config(cfg, per_subject: dict[str, dict], subject: str):
    """``cfg`` with ``subject``'s preset overrides (unchanged for a subject the preset lacks)."""
    import logging

    from ssip.decode import with_overrides

    if subject not in per_subject:
        if per_subject:
            logging.getLogger(__name__).warning(
                "the preset has no setting for subject %s: it decodes with the base config",
                subject)
        return cfg
    return with_overrides(cfg, per_subject[subject])


def _decode_on_ray(args, cfg, bulk, per_subject) -> int:
    from ssip.distributed.decode_corpus import decode_corpus

    summary = decode_corpus(args.ingest, args.out, prior=args.prior,
                            likelihood_root=args.likelihood_root,
                            baselines_root=args.baselines_root, cfg=cfg, bulk=bulk,
                            split=cfg.selection.split, subjects=cfg.selection.subjects or None,
                            max_trials=cfg.selection.max_trials,
                            subject_overrides=per_subject,
                            work=args.work, address=args.address, num_cpus=args.num_cpus,
                            debug={"unit_delay_s": args.debug_unit_delay}
                            if args.debug_unit_delay else None)
    spt = summary["seconds_per_trial"]
    print(f"decode run {summary['run']}: {summary['n_decoded']} of {summary['n_trials']} "
          f"trial(s) decoded, {summary['n_quarantined']} quarantined, "
          f"{summary['n_units_this_attempt']} of {summary['n_units']} unit(s) this attempt"
          + (f", {spt:.1f} s per trial" if spt else "") + f" -> {args.out}")
    for q in summary["quarantine"]:
        print(f"  quarantined: {q['subject'] or q['source_file']} {q['trial_id']}: {q['reason']}")
    save_config(args.out, cfg, per_subject)
    _report(args)
    return 0
