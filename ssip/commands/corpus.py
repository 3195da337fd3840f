"""`ssip corpus build`: the embedded default corpus (real speech, simulated neural responses)."""

from __future__ import annotations

from ssip.commands._common import add_config_args, resolve_and_print


def register(sub) -> None:
    p = sub.add_parser("corpus", help="build the embedded simulated corpus")
    s = p.add_subparsers(dest="corpus_command", required=True)
    b = s.add_parser("build", help="simulate subjects speaking real recorded prompts")
    b.add_argument("out", help="output folder (BIDS NWB, Flinker HDF5, ground truth)")
    add_config_args(b)
    b.set_defaults(func=_build)


def _build(args) -> int:
    from ssip.data.simulate import CorpusConfig, build_corpus

    cfg = resolve_and_print(CorpusConfig, args)
    if cfg is None:
        return 0
    card = build_corpus(cfg, args.out)
    print(f"corpus written to {args.out}: {len(card['subjects'])} subject(s)")
    return 0
