"""Argument helpers shared by the commands: --config/--set/--dry-run, Ray connection, --preset."""

from __future__ import annotations

from ssip.config import config_hash, describe, resolve, to_yaml


def add_config_args(p) -> None:
    p.add_argument("--config", help="YAML config file (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, repeatable (e.g. --set n_subjects=2)")
    p.add_argument("--dry-run", action="store_true", help="resolve and print the config, then stop")
    p.add_argument("--help-config", action="store_true", help="list every config field and stop")


def add_ray_args(p) -> None:
    p.add_argument("--address", default=None,
                   help="Ray cluster address (default: $RAY_ADDRESS, else an embedded local Ray)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs for the embedded local Ray")


def resolve_and_print(cls, args):
    """Resolve the config of ``cls`` from args, print it; None when the command should stop."""
    if getattr(args, "help_config", False):
        for key, default, help_ in describe(cls):
            print(f"{key:28s} {default:>14s}  {help_}")
        return None
    cfg = resolve(cls, args.config, args.overrides)
    print(f"# {cls.__name__} (hash {config_hash(cfg)})")
    print(to_yaml(cfg), end="")
    return None if args.dry_run else cfg


def preset_overrides(args) -> dict[str, dict]:
    """Per-subject DecodeConfig overrides of --preset (empty without one); printed."""
    if not args.preset:
        return {}
    from ssip.presets import load_preset, presets_root

    if not args.likelihood_root and not args.presets:
        raise ValueError("--preset needs --presets DIR or --likelihood-root (presets live in "
                         "LIKELIHOOD_ROOT/presets by default)")
    per_subject = load_preset(presets_root(args.likelihood_root, args.presets), args.preset,
                              prior=args.prior, likelihood_root=args.likelihood_root)
    for subject, o in sorted(per_subject.items()):
        print(f"# preset {args.preset}, {subject}: "
              f"{ {k: v for k, v in o.items() if v is not None} }")
    return per_subject
