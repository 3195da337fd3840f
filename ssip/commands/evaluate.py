"""`ssip evaluate DECODED INGEST OUT`: per-trial metrics parquet and a report."""

from __future__ import annotations

from ssip.commands._common import add_config_args, resolve_and_print


def register(sub) -> None:
    p = sub.add_parser("evaluate", help="score decoded mels against the ingest dataset, write a report")
    p.add_argument("decoded", help="decoded table (parquet: subject, trial_id, method, mel)")
    p.add_argument("ingest", help="ingest root the trials were decoded from (local or s3://)")
    p.add_argument("out", help="report folder")
    p.add_argument("--prior", default=None, help="the prior that decoded ('shipped' or a "
                   "checkpoint folder): the report states its training data and the leakage check")
    p.add_argument("--preset-file", default=None, metavar="JSON",
                   help="the preset (ssip sweep) whose per-subject settings decoded the table: "
                        "the report states them and their validation scores")
    add_config_args(p)
    p.set_defaults(func=_evaluate)


def _evaluate(args) -> int:
    from ssip.evaluate.report import EvaluateConfig, evaluate

    cfg = resolve_and_print(EvaluateConfig, args)
    if cfg is None:
        return 0
    note = ""
    if args.prior:
        import pyarrow.parquet as pq

        from ssip import storage
        from ssip.data.leakage import leakage_statement
        from ssip.evaluate.report import prior_leakage

        fs, path = storage.filesystem(args.decoded)
        subjects = sorted(set(pq.read_table(path, filesystem=fs, columns=["subject"])
                              .column("subject").to_pylist()))
        note = leakage_statement(prior_leakage(args.prior, args.ingest, subjects=subjects),
                                 args.ingest, "decoded")
    calibration = None
    if args.preset_file:
        from ssip import storage

        calibration = storage.read_json(args.preset_file)
    evaluate(args.decoded, args.ingest, args.out, cfg, leakage_note=note, calibration=calibration)
    print(f"report: {args.out}/report.md")
    return 0
