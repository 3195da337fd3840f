"""`ssip ingest SOURCE OUT`: recordings -> validated parquet shards (local or s3://) on Ray."""

from __future__ import annotations

from ssip.commands._common import add_config_args, add_ray_args, resolve_and_print


def register(sub) -> None:
    p = sub.add_parser("ingest", help="read recordings, extract features, write parquet shards")
    p.add_argument("source", help="a recording file or a folder (BIDS NWB tree, Flinker .h5 files)")
    p.add_argument("out", help="output root: local folder or s3://bucket/prefix")
    add_config_args(p)
    add_ray_args(p)
    p.set_defaults(func=_ingest)


def _ingest(args) -> int:
    from ssip.data.ingest import IngestConfig
    from ssip.distributed.ingest import run_ingest

    cfg = resolve_and_print(IngestConfig, args)
    if cfg is None:
        return 0
    m = run_ingest(args.source, args.out, cfg, address=args.address, num_cpus=args.num_cpus)
    failed = [r for r in m["recordings"] if r["status"] != "ok"]
    print(f"ingested {m['n_trials']} trial(s) from {len(m['recordings'])} recording(s) into {args.out} "
          f"in {m['seconds']} s; {m['n_quarantined']} quarantine row(s), {len(failed)} failed file(s)")
    for r in failed:
        print(f"  FAILED {r['error']}")
    return 0
