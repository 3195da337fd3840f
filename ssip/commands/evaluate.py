"""`ssip evaluate DECODED INGEST OUT`: per-trial metrics parquet and a report."""

from __future__ import annotations

from ssip.commands._common import add_config_args, resolve_and_print


def register(sub) -> None:
    p = sub.add_parser("evaluate", help="score decoded mels against the ingest dataset, write a report")
    p.add_argument("decoded", help="decoded table (parquet: subject, trial_id, method, mel)")
    p.add_argument("ingest", help="ingest root the trials were decoded from (local or s3://)")
    p.add_argument("out", help="report folder")
    add_config_args(p)
    p.set_defaults(func=_evaluate)


def _evaluate(args) -> int:
    from ssip.evaluate.report import EvaluateConfig, evaluate

    cfg = resolve_and_print(EvaluateConfig, args)
    if cfg is None:
        return 0
    evaluate(args.decoded, args.ingest, args.out, cfg)
    print(f"report: {args.out}/report.md")
    return 0
