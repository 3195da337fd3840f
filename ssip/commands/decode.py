"""`ssip decode INGEST --prior DIR --likelihood-root DIR [--baselines-root DIR]`: decoded table.

Decodes every trial of ``--split`` (default test) of every subject in one process with
:func:`ssip.decode.decode_trials` and writes a parquet table (subject, trial_id, method, mel
(80, T), draw) that ``ssip evaluate`` scores. Per subject it reads the likelihood at
``LIKELIHOOD_ROOT/<subject>`` and the baselines at ``BASELINES_ROOT/<subject>/<kind>`` (as
``ssip train likelihood|baseline`` write them when OUT is given so).
"""

from __future__ import annotations

from ssip.commands._common import add_config_args, resolve_and_print


def register(sub) -> None:
    p = sub.add_parser("decode", help="decode trials (DPS, controls, baselines) into a table")
    p.add_argument("ingest", help="ingest root (local or s3://)")
    p.add_argument("--prior", required=True, help="prior checkpoint folder (ssip train prior)")
    p.add_argument("--likelihood-root", default=None,
                   help="folder holding one likelihood checkpoint per subject: ROOT/<subject>")
    p.add_argument("--baselines-root", default=None,
                   help="folder holding baselines as ROOT/<subject>/<linear|nn>")
    p.add_argument("--split", default="test", choices=("train", "val", "test"),
                   help="which trials to decode")
    p.add_argument("--subject", action="append", default=None,
                   help="decode only this subject (repeatable; default: all)")
    p.add_argument("--max-trials", type=int, default=0,
                   help="decode at most this many trials per subject, in trial order (0 = all)")
    p.add_argument("--out", required=True, help="decoded table to write (.parquet, local or s3://)")
    add_config_args(p)
    p.set_defaults(func=_decode)


def decoded_rows_table(rows: list[dict]):
    """The decoded table of :func:`ssip.evaluate.report.decoded_table` plus an int32 ``draw``
    and a float ``spread`` (posterior std of the mean rows, null elsewhere)."""
    import pyarrow as pa

    from ssip.evaluate.report import decoded_table

    return decoded_table(rows).append_column(
        "draw", pa.array([int(r.get("draw", -1)) for r in rows], pa.int32())).append_column(
        "spread", pa.array([r.get("spread") for r in rows], pa.float32()))


def _decode(args) -> int:
    from collections import defaultdict

    from ssip import storage
    from ssip.data.dataset import load_trials
    from ssip.decode import BASELINE_METHODS, DecodeConfig, decode_trials
    from ssip.models.baselines import load_baseline
    from ssip.models.likelihood import load_likelihood
    from ssip.models.prior import load_prior

    cfg = resolve_and_print(DecodeConfig, args)
    if cfg is None:
        return 0
    guided = [m for m in cfg.methods if m in ("dps", "dps-shuffled")]
    wanted = [m for m in cfg.methods if m in BASELINE_METHODS]
    if guided and not args.likelihood_root:
        raise ValueError(f"methods {guided} need --likelihood-root (or --set "
                         f"methods=[prior,...] without them)")
    if wanted and not args.baselines_root:
        raise ValueError(f"methods {wanted} need --baselines-root (or drop them: --set "
                         f"methods=[dps,prior,dps-shuffled])")
    columns = ["schema_version", "subject", "trial_id", "split", "neural"]
    by_subject: dict[str, list[dict]] = defaultdict(list)
    for t in load_trials(args.ingest, split=args.split, columns=columns):
        if args.subject is None or t["subject"] in args.subject:
            by_subject[t["subject"]].append(t)
    if args.max_trials < 0:
        raise ValueError(f"--max-trials {args.max_trials} must be >= 0")
    if args.max_trials:
        by_subject = defaultdict(list, {s: ts[:args.max_trials] for s, ts in by_subject.items()})
    if not by_subject:
        raise ValueError(f"no {args.split}-split trials under {args.ingest}"
                         + (f" for subject(s) {args.subject}" if args.subject else ""))
    prior, _ = load_prior(args.prior)
    rows: list[dict] = []
    for subject, trials in sorted(by_subject.items()):
        likelihood = None
        if guided:
            likelihood, manifest = load_likelihood(storage.join(args.likelihood_root, subject))
            if manifest.get("subject") not in (None, subject):
                raise ValueError(f"{storage.join(args.likelihood_root, subject)}: likelihood of "
                                 f"subject {manifest.get('subject')!r}, not {subject!r}")
        baselines = {m: load_baseline(storage.join(args.baselines_root, subject, m))
                     for m in wanted}
        rows.extend(decode_trials(trials, prior, likelihood, cfg, baselines=baselines, progress=True))
        print(f"decoded {len(trials)} trial(s) of {subject}", flush=True)
    storage.write_parquet(args.out, decoded_rows_table(rows))
    print(f"decoded table: {len(rows)} row(s) -> {args.out}")
    return 0
