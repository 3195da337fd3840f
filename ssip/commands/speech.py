"""`ssip speech ingest SRC OUT`: speech corpora -> mel parquet shards (local or s3://) on Ray."""

from __future__ import annotations

from ssip.commands._common import add_config_args, add_ray_args, resolve_and_print


def register(sub) -> None:
    p = sub.add_parser("speech", help="speech corpora for the prior")
    s = p.add_subparsers(dest="speech_command", required=True)
    i = s.add_parser("ingest", help="read a speech corpus, write mel shards and a corpus card")
    i.add_argument("source", help="corpus folder, s3:// prefix or manifest (.jsonl/.csv); layouts: "
                   "folder, librispeech, ljspeech, commonvoice, manifest (--set layout=...)")
    i.add_argument("out", help="output root: local folder or s3://bucket/prefix")
    add_config_args(i)
    add_ray_args(i)
    i.set_defaults(func=_ingest)
    d = s.add_parser("default", help="build the embedded multi-speaker, multilingual prior corpus "
                     "from Debian speech and flite/espeak-ng voices, then ingest it")
    d.add_argument("out", help="output folder (local): build/ (manifest, synthesised audio), "
                   "shards, card.json, leakage.json")
    d.add_argument("--exclude-from", default=None, metavar="INGEST",
                   help="ingest root whose val/test trials' utterances are kept out of the corpus "
                        "and checked for (ids and mel content); a leak fails the command")
    add_config_args(d)
    add_ray_args(d)
    d.set_defaults(func=_default)


def _ingest(args) -> int:
    from ssip.data.speech_corpus import SpeechIngestConfig

    cfg = resolve_and_print(SpeechIngestConfig, args)
    if cfg is None:
        if args.dry_run:
            _print_plan(args)
        return 0
    from ssip.distributed.speech_ingest import run_speech_ingest

    card = run_speech_ingest(args.source, args.out, cfg, address=args.address, num_cpus=args.num_cpus)
    q = ", ".join(f"{n} {c}" for c, n in card["quarantine"].items() if n) or "none"
    langs = ", ".join(f"{k or '?'} {v['hours']:.3f} h" for k, v in card["languages"].items())
    print(f"ingested {card['hours']:.3f} h of speech ({card['n_utterances']} utterance(s), "
          f"{card['n_speakers']} speaker(s); {langs}) from {args.source} "
          f"[{card['layout']}, source {card['source']}] into {args.out} in {card['seconds']} s; "
          f"{len(card['shards'])} shard(s), {card['n_groups_skipped']} of {card['n_groups']} "
          f"group(s) already done; quarantined {card['n_quarantined']} file(s): {q}")
    return 0


def _default(args) -> int:
    from ssip.data.default_speech import DefaultSpeechConfig
    from ssip.distributed.speech_ingest import run_default_speech

    cfg = resolve_and_print(DefaultSpeechConfig, args)
    if cfg is None:
        return 0
    card = run_default_speech(args.out, cfg, exclude_from=args.exclude_from,
                              address=args.address, num_cpus=args.num_cpus)
    per = ", ".join(f"{k} {v}" for k, v in card["default_speech"]["per_source"].items())
    leak = card["leakage"]
    verdict = ("not checked (no --exclude-from)" if leak.get("ok") is None else
               f"{leak['n_leaks']} leak(s) among {leak['n_evaluated']} val/test trials")
    print(f"default speech corpus: {card['hours']:.2f} h, {card['n_utterances']} utterance(s), "
          f"{card['n_speakers']} speaker(s), {len(card['languages'])} language(s) in {args.out} "
          f"({per}); held out: {', '.join(card['default_speech']['heldout_speakers']) or 'none'}; "
          f"leakage: {verdict}; quarantined {card['n_quarantined']} file(s)")
    return 0


def _print_plan(args) -> None:
    from ssip.config import resolve
    from ssip.data.speech_corpus import SpeechIngestConfig, plan_speech_ingest

    plan = plan_speech_ingest(args.source, args.out, resolve(SpeechIngestConfig, args.config, args.overrides))
    cfg = plan["config"]
    print(f"dry run: {args.source} is layout {cfg.layout}, source {cfg.source}: {plan['n_files']} "
          f"file(s) in {len(plan['groups'])} group(s), {len(plan['done'])} already done in "
          f"{args.out}, {len(plan['todo'])} to ingest; nothing written")
