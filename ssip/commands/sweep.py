"""`ssip sweep INGEST --prior DIR --likelihood-root DIR --subject S --name NAME`: tune guidance.

Runs a Ray Tune grid over the guidance value (SweepConfig.rule: the Gaussian score's weight by
default) and step count for each ``--subject`` on its validation trials (ASHA stops bad settings
after a chunk of trials), and saves the winner as preset NAME (``--presets DIR``, default
LIKELIHOOD_ROOT/presets) that ``ssip decode --preset NAME`` uses. The base decode settings come
from ``--decode-config``/``--decode-set`` (DecodeConfig); the sweep's from ``--config``/``--set``.
"""

from __future__ import annotations

from ssip.commands._common import add_config_args, add_ray_args, resolve_and_print


def register(sub) -> None:
    p = sub.add_parser("sweep", help="tune the DPS guidance per subject on Ray Tune; save a preset")
    p.add_argument("ingest", help="ingest root (local or s3://)")
    p.add_argument("--prior", default="shipped", help="'shipped' (default: the prior that "
                   "ships with ssip) or a prior checkpoint folder (ssip train prior)")
    p.add_argument("--likelihood-root", required=True,
                   help="folder holding one likelihood checkpoint per subject: ROOT/<subject>")
    p.add_argument("--subject", action="append", required=True,
                   help="subject to sweep (repeatable: one Tune run each)")
    p.add_argument("--baselines-root", default=None,
                   help="folder holding baselines as ROOT/<subject>/<linear|nn> (needed when the "
                        "decode config uses the nn decoder as evidence)")
    p.add_argument("--name", required=True, help="preset name to save the winners under")
    p.add_argument("--presets", default=None,
                   help="preset folder (local or s3://; default LIKELIHOOD_ROOT/presets)")
    p.add_argument("--decode-config", default=None, metavar="YAML",
                   help="base DecodeConfig (the default setting the sweep compares against)")
    p.add_argument("--decode-set", dest="decode_overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="override a base DecodeConfig field, repeatable")
    add_ray_args(p)
    add_config_args(p)
    p.set_defaults(func=_sweep)


def _sweep(args) -> int:
    from ssip.config import config_hash, resolve, to_yaml
    from ssip.decode import DecodeConfig
    from ssip.presets import SweepConfig, presets_root

    base = resolve(DecodeConfig, args.decode_config, args.decode_overrides)
    print(f"# DecodeConfig, base (hash {config_hash(base)})")
    print(to_yaml(base), end="")
    cfg = resolve_and_print(SweepConfig, args)
    if cfg is None:
        return 0
    from ssip.distributed.sweep import run_sweep

    for subject in args.subject:
        e = run_sweep(args.ingest, subject, prior=args.prior,
                      likelihood_root=args.likelihood_root, base=base, cfg=cfg, name=args.name,
                      presets=args.presets, address=args.address, num_cpus=args.num_cpus,
                      baselines_root=args.baselines_root)
        won = {k: v for k, v in e["overrides"].items() if v is not None}
        was = {k: v for k, v in e["default"]["overrides"].items() if v is not None}
        print(f"sweep {args.name} {subject}: best {won} mel PCC {e['score']:.4f} vs default "
              f"{was} {e['default']['score']:.4f} on {len(e['trials'])} val trial(s); "
              f"{e['n_settings']} settings, {e['stopped_early']} stopped early by ASHA")
    print(f"preset {args.name}: {presets_root(args.likelihood_root, args.presets)}/"
          f"{args.name}.json (ssip decode --preset {args.name})")
    return 0
