"""`ssip ingest SOURCE OUT` / `ssip ingest --bids ROOT OUT`: recordings -> validated parquet
shards (local or s3://) on Ray.

Exit status: 0 every file ingested (quarantined trials or channels do not change it), 3 some
files failed and others landed, 4 nothing landed; the last line says which.
"""

from __future__ import annotations

import json

from ssip.commands._common import add_config_args, add_ray_args, resolve_and_print

#: --subject/--session/--task/--run -> the BidsConfig list each one fills.
_ENTITIES = {"subject": "subjects", "session": "sessions", "task": "tasks", "run": "runs"}


def register(sub) -> None:
    p = sub.add_parser("ingest", help="read recordings, extract features, write parquet shards",
                       description="Read every recording under SOURCE (NWB/iBIDS, Flinker .h5) or, "
                                   "with --bids ROOT, every recording of a BIDS-iEEG dataset "
                                   "(BrainVision, EDF/BDF, EEGLAB, through MNE-BIDS); write "
                                   "validated trial shards and quarantine rows to OUT.")
    p.add_argument("paths", nargs="*", metavar="PATH",
                   help="SOURCE (a recording file or folder) and OUT (local folder or "
                        "s3://bucket/prefix); with --bids only OUT")
    p.add_argument("--bids", metavar="ROOT", default=None,
                   help="a BIDS-iEEG dataset root (sets format=bids; see --help-config bids.*)")
    for entity, key in _ENTITIES.items():
        p.add_argument(f"--{entity}", dest=key, action="append", default=[], metavar="LABEL",
                       help=f"with --bids: only this {entity} (repeatable; = --set bids.{key}=[...])")
    add_config_args(p)
    add_ray_args(p)
    p.set_defaults(func=_ingest)


def _ingest(args) -> int:
    from ssip.data.ingest import IngestConfig, ingest_status
    from ssip.distributed.ingest import run_ingest

    if args.help_config:
        resolve_and_print(IngestConfig, args)
        return 0
    if args.bids is not None:
        if len(args.paths) != 1:
            raise SystemExit("ssip ingest --bids ROOT OUT: give OUT only (the source is ROOT)")
        source, out = args.bids, args.paths[0]
        args.overrides = ["format=bids", *args.overrides]
        for key in _ENTITIES.values():
            if getattr(args, key):
                # Quoted: a label such as 01 must stay a string, not become the number 1.
                labels = ", ".join(json.dumps(v) for v in getattr(args, key))
                args.overrides.append(f"bids.{key}=[{labels}]")
    else:
        if any(getattr(args, key) for key in _ENTITIES.values()):
            raise SystemExit("--subject/--session/--task/--run select BIDS entities: use them "
                             "with --bids ROOT")
        if len(args.paths) != 2 and not args.help_config:
            raise SystemExit("ssip ingest SOURCE OUT (or ssip ingest --bids ROOT OUT)")
        source, out = ([*args.paths, "", ""])[:2]
    cfg = resolve_and_print(IngestConfig, args)
    if cfg is None:
        return 0
    m = run_ingest(source, out, cfg, address=args.address, num_cpus=args.num_cpus)
    code, verdict = ingest_status(m)
    failed = [r for r in m["recordings"] if r["status"] != "ok"]
    for r in failed:
        print(f"  FAILED {r['error']}")
    print(f"ingested {m['n_trials']} trial(s) from {len(m['recordings'])} recording(s) into {out} "
          f"in {m['seconds']} s; {m['n_quarantined']} quarantine row(s), {len(failed)} failed "
          f"file(s): {verdict} (exit {code})")
    return code

