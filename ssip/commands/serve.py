"""`ssip serve --prior DIR --likelihood-root DIR`: the online decoder on Ray Serve (HTTP + JSON).

Deploys :mod:`ssip.distributed.serve` on the Ray cluster at --address / $RAY_ADDRESS (else an
embedded local Ray) and serves until interrupted: ``POST http://HOST:PORT/decode`` with one
trial, ``GET /health``. The decode settings are a DecodeConfig (``--config`` / ``--set``, as for
``ssip decode``; ``--preset`` applies a sweep's per-subject guidance), the deployment's a
ServeConfig (``--serve-config`` / ``--serve-set``: host, port, batching, limits, replicas).
Set the API token in the environment variable named by ``token_env`` (SSIP_SERVE_TOKEN) on the
nodes that run the replicas to require it.
"""

from __future__ import annotations

from ssip.commands._common import (
    add_config_args,
    add_ray_args,
    preset_overrides,
    resolve_and_print,
)


def register(sub) -> None:
    p = sub.add_parser("serve", help="online decoding over HTTP on Ray Serve")
    p.add_argument("--prior", default="shipped", help="'shipped' (default: the prior that "
                   "ships with ssip) or a prior checkpoint folder (ssip train prior)")
    p.add_argument("--likelihood-root", required=True,
                   help="folder holding one likelihood checkpoint per subject: ROOT/<subject>")
    p.add_argument("--preset", default=None, metavar="NAME",
                   help="each subject's guidance setting from sweep preset NAME")
    p.add_argument("--presets", default=None, metavar="DIR",
                   help="preset folder (default LIKELIHOOD_ROOT/presets)")
    p.add_argument("--serve-config", default=None, metavar="YAML",
                   help="ServeConfig YAML (host, port, batching, limits, replicas)")
    p.add_argument("--serve-set", action="append", default=[], metavar="KEY=VALUE",
                   help="ServeConfig override, repeatable (e.g. --serve-set port=8001)")
    add_ray_args(p)
    add_config_args(p)
    p.set_defaults(func=_serve)


def _serve(args) -> int:
    import time

    from ssip.config import config_hash, resolve, to_yaml
    from ssip.decode import DecodeConfig
    from ssip.distributed.serve import ServeConfig, build_app, served_subjects, start, stop

    serve_cfg = resolve(ServeConfig, args.serve_config, args.serve_set)
    print(f"# ServeConfig (hash {config_hash(serve_cfg)})")
    print(to_yaml(serve_cfg), end="")
    cfg = resolve_and_print(DecodeConfig, args)
    if cfg is None:
        return 0
    subjects = served_subjects(args.likelihood_root)
    overrides = preset_overrides(args)
    app = build_app(prior=args.prior, likelihood_root=args.likelihood_root, decode=cfg,
                    serve=serve_cfg, subject_overrides=overrides)
    url = start(app, serve_cfg, address=args.address, num_cpus=args.num_cpus)
    print(f"serving {len(subjects)} subject(s) {sorted(subjects)} at {url}/decode "
          f"(health: {url}/health); Ctrl-C stops", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        stop(serve_cfg)
        print("stopped")
    return 0
