"""Speech ingest on Ray Data: one task per file group, many groups in parallel.

The corpus is listed and cut into deterministic groups on the driver
(:func:`ssip.data.speech_corpus.plan_speech_ingest`); each group that an earlier run has not
finished becomes one Ray task that decodes, checks and mels its files and writes its own shard
and quarantine file (:func:`ssip.data.speech_corpus.run_group`). Tasks return only a small
summary; the driver writes the corpus card last, so a reader never sees a half-finished run,
and then removes shard files that the new card no longer lists.

:func:`run_default_speech` builds ssip's default corpus (:mod:`ssip.data.default_speech`) and
ingests it so, checking it against an ingest root for leakage (:mod:`ssip.data.leakage`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

from ssip import storage
from ssip.config import from_dict
from ssip.data.default_speech import DefaultSpeechConfig, build_default_speech
from ssip.data.leakage import HELD_OUT_SPLITS, check_leakage, evaluated_utterances
from ssip.data.speech_corpus import (
    CARD,
    SpeechFile,
    SpeechGroup,
    SpeechIngestConfig,
    build_card,
    plan_speech_ingest,
    remove_stale,
    run_group,
)
from ssip.distributed.runtime import init_ray

log = logging.getLogger(__name__)


def ingest_group(item: dict) -> dict:
    """Ray Data map function: process and write the group named by ``item``.

    Returns ``{"group": name, "summary": json}``; the summary travels as JSON text because its
    per-speaker tables have different keys in every group (Arrow would need one struct type).
    """
    cfg = from_dict(SpeechIngestConfig, item["config"])
    group = SpeechGroup(item["group"], item["key"], [SpeechFile(**f) for f in item["files"]])
    summary = run_group(item["out"], group, cfg)
    return {"group": group.name, "summary": json.dumps(summary)}


def run_speech_ingest(src: str, out: str, cfg: SpeechIngestConfig, *, address: str | None = None,
                      num_cpus: int | None = None) -> dict:
    """Ingest the speech corpus at ``src`` into mel shards under ``out`` (local path or s3://).

    Parameters
    ----------
    src : str
        Corpus folder, s3:// prefix or manifest file (see :mod:`ssip.data.speech_corpus`).
    out : str
        Output root: ``card.json``, ``shards/``, ``quarantine/``.
    cfg : SpeechIngestConfig
    address : str or None
        Ray cluster to join (default: $RAY_ADDRESS, else an embedded local Ray).
    num_cpus : int or None
        CPUs of the embedded Ray (ignored when joining a cluster).

    Returns
    -------
    dict
        The corpus card (also written to ``out/card.json``).
    """
    t0 = time.time()
    plan = plan_speech_ingest(src, out, cfg)
    cfg = plan["config"]
    todo: list[SpeechGroup] = plan["todo"]
    n_groups = len(plan["groups"])
    log.info("speech ingest %s (layout %s, source %s): %d file(s) in %d group(s), %d already done, "
             "into %s", src, cfg.layout, cfg.source, plan["n_files"], n_groups, len(plan["done"]), out)
    summaries: dict[str, dict] = dict(plan["done"])
    if todo:
        import ray

        embedded = init_ray(address, num_cpus)
        cfg_dict = dataclasses.asdict(cfg)
        items = [{"out": str(out), "group": g.name, "key": g.key, "config": cfg_dict,
                  "files": [dataclasses.asdict(f) for f in g.files]} for g in todo]
        try:
            ds = ray.data.from_items(items, override_num_blocks=len(items))
            for row in ds.map(ingest_group, num_cpus=1).iter_rows():
                s = json.loads(row["summary"])
                summaries[s["group"]] = s
                log.info("group %s done: %d utterance(s), %d quarantined (%d/%d groups)",
                         s["group"], s["n_rows"], s["n_quarantined"], len(summaries), n_groups)
        finally:
            if embedded:
                ray.shutdown()
    ordered = [summaries[g.name] for g in plan["groups"]]
    card = build_card(src, cfg, ordered, time.time() - t0, n_skipped=len(plan["done"]))
    storage.write_json(storage.join(out, CARD), card)
    remove_stale(out, card)
    log.info("speech ingest done in %.1f s: %.3f h, %d utterance(s), %d speaker(s), %d quarantined",
             card["seconds"], card["hours"], card["n_utterances"], card["n_speakers"],
             card["n_quarantined"])
    return card


def run_default_speech(out: str, cfg: DefaultSpeechConfig, *, exclude_from: str | None = None,
                       address: str | None = None, num_cpus: int | None = None) -> dict:
    """Build the default corpus under ``out`` and ingest it there (``ssip speech default``).

    ``out/build/`` holds the manifest and the synthesised audio, ``out/`` the shards and
    ``card.json`` (from :func:`run_speech_ingest`). With ``exclude_from`` (an ingest root), the
    utterances of its val and test trials are left out and ``out/leakage.json`` records the check
    of ids and mel content (:mod:`ssip.data.leakage`); a leak raises.

    Returns
    -------
    dict
        The corpus card, with ``default_speech`` (the build summary) and ``leakage`` added.
    """
    if storage.is_s3(out):
        raise ValueError(f"ssip speech default: {out} must be a local folder (it holds the "
                         "synthesised audio the ingest reads); copy the shards to S3 afterwards")
    exclude = evaluated_utterances(exclude_from) if exclude_from else set()
    info = build_default_speech(Path(out) / "build", cfg, exclude)
    card = run_speech_ingest(str(Path(out) / "build" / "manifest.jsonl"), out, cfg.ingest,
                             address=address, num_cpus=num_cpus)
    card["default_speech"] = info
    if exclude_from:
        report = check_leakage(exclude_from, out)
        summary = {k: report[k] for k in ("n_evaluated", "n_without_id", "n_corpus", "splits", "ok")}
        summary.update(ingest_root=exclude_from, n_leaks=len(report["leaks"]),
                       leaks=report["leaks"][:20], heldout_speakers=info["heldout_speakers"])
        storage.write_json(storage.join(out, "leakage.json"), summary)
        card["leakage"] = summary
        if not report["ok"]:
            raise RuntimeError(f"ssip speech default: {len(report['leaks'])} evaluated trial(s) of "
                               f"{exclude_from} are in the prior corpus {out}, e.g. "
                               f"{report['leaks'][:3]}; see {out}/leakage.json")
    else:
        card["leakage"] = {"ok": None, "splits": list(HELD_OUT_SPLITS),
                           "note": "no ingest root given: nothing was excluded or checked"}
    return card
