"""`ssip pipeline ROOT`: corpus -> ingest -> train -> decode -> evaluate, resumable.

Runs the same commands a user would type one by one (it prints each), with every stage's config
taken from one nested YAML (see configs/pipeline-*.yaml and ``--help-config``). Finished stages
are skipped on a re-run unless their config or an upstream output changed, or ``--force STAGE``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ssip.commands import main as ssip_main
from ssip.commands._common import add_config_args, resolve_and_print


def register(sub) -> None:
    from ssip.pipeline import STAGES

    p = sub.add_parser("pipeline", help="run every stage from corpus to report (resumable)")
    p.add_argument("root", help="run folder (local or s3://): corpus/, ingest/, prior/, ... report/")
    p.add_argument("--force", action="append", default=[], choices=STAGES,
                   help="re-run this stage (and everything after it) even if finished; repeatable")
    add_config_args(p)
    p.set_defaults(func=_pipeline)


def run(cfg, root: str, *, force: Sequence[str] = (),
        main: Callable[[list[str]], int] | None = None, echo=print) -> dict:
    """:func:`ssip.pipeline.run` with each stage run by the ``ssip`` command line (or ``main``)."""
    from ssip.pipeline import run as run_pipeline

    return run_pipeline(cfg, root, main=main or ssip_main, force=force, echo=echo)


def _pipeline(args) -> int:
    from ssip.pipeline import PipelineConfig

    cfg = resolve_and_print(PipelineConfig, args)
    if cfg is None:
        return 0
    run(cfg, args.root, force=args.force)
    return 0
