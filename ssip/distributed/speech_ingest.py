"""Speech ingest on Ray Data: one task per file group, many groups in parallel.

The corpus is listed and cut into deterministic groups on the driver
(:func:`ssip.data.speech_corpus.plan_speech_ingest`); each group that an earlier run has not
finished becomes one Ray task that decodes, checks and mels its files and writes its own shard
and quarantine file (:func:`ssip.data.speech_corpus.run_group`). Tasks return only a small
summary; the driver writes the corpus card last, so a reader never sees a half-finished run,
and then removes shard files that the new card no longer lists.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time

from ssip import storage
from ssip.config import from_dict
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

        from ssip.distributed.runtime import init_ray

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
