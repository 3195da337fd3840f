"""Speech ingest's groups: checks, rows, quarantine, writing and resuming, the card, reading back."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import re
import time

import numpy as np
import pyarrow.parquet as pq

from ssip import mel as melmod
from ssip import storage
from ssip.config import config_hash
from ssip.data import schema
from ssip.data.speech_corpus.audio import decode_audio, mel_of, resample_to_16k
from ssip.data.speech_corpus.config import (
    AUDIO_EXTENSIONS,
    CARD,
    REASON_CLASSES,
    AudioDecodeError,
    SpeechFile,
    SpeechGroup,
    SpeechIngestConfig,
)
from ssip.data.speech_corpus.layouts import list_dir, list_speech_files, resolve_source

log = logging.getLogger(__name__)

# --- Groups -------------------------------------------------------------------------------------


def safe_name(text: str) -> str:
    """``text`` reduced to a file-name-safe token (letters, digits, '.', '_', '-')."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "speech"


def plan_groups(files: list[SpeechFile], cfg: SpeechIngestConfig) -> list[SpeechGroup]:
    """Sort by utt_id, mark duplicates, and chunk into groups of ``files_per_group``.

    A repeated utt_id keeps its first record (in path order) and turns the others into
    ``manifest`` problems, so ids stay unique across shards. The group key hashes the config and
    every field of its records: unchanged groups keep their names across runs.
    """
    files = sorted(files, key=lambda f: (f.utt_id, f.path))
    seen: dict[str, str] = {}
    out_files = []
    for f in files:
        if f.utt_id in seen and not f.problem:
            f = dataclasses.replace(f, problem=f"duplicate utt_id {f.utt_id!r} (also {seen[f.utt_id]}); "
                                    "give unique utt_ids")
        seen.setdefault(f.utt_id, f.path or f.listed_in)
        out_files.append(f)
    chash = config_hash(cfg)
    prefix = safe_name(cfg.source)
    groups = []
    for i in range(0, len(out_files), cfg.files_per_group):
        chunk = out_files[i:i + cfg.files_per_group]
        blob = json.dumps([chash, [dataclasses.astuple(f) for f in chunk]]).encode()
        key = hashlib.sha256(blob).hexdigest()[:16]
        groups.append(SpeechGroup(f"{prefix}-{i // cfg.files_per_group:05d}-{key[:8]}", key, chunk))
    return groups


# --- Checks and rows ----------------------------------------------------------------------------


def check_audio(audio: np.ndarray, rate: int, cfg: SpeechIngestConfig) -> tuple[str, str] | None:
    """(reason_class, reason) when decoded audio must be quarantined, else None.

    ``audio`` is the decoded signal at its own ``rate``, before resampling or normalisation.
    """
    if not np.isfinite(audio).all():
        return "unreadable", f"{int((~np.isfinite(audio)).sum())} NaN/Inf sample(s)"
    dur = len(audio) / rate
    if dur < cfg.min_duration_s:
        return "too_short", f"{dur:.3f} s < min_duration_s={cfg.min_duration_s}"
    if dur > cfg.max_duration_s:
        return "too_long", f"{dur:.2f} s > max_duration_s={cfg.max_duration_s} (long files are not split)"
    rms = float(np.sqrt(np.mean(np.square(audio, dtype=np.float64))))
    if rms < cfg.silence_rms:
        dbfs = 20 * math.log10(rms) if rms > 0 else -math.inf
        return "silent", f"RMS {rms:.3g} ({dbfs:.1f} dBFS) < silence_rms={cfg.silence_rms}"
    clipped = float(np.mean(np.abs(audio) >= cfg.clip_level))
    if clipped > cfg.clip_fraction:
        return "clipped", (f"{clipped:.2%} of samples at |x| >= {cfg.clip_level} "
                           f"> clip_fraction={cfg.clip_fraction:.2%}")
    return None


def _quarantine(f: SpeechFile, reason_class: str, reason: str) -> dict:
    where = f.path or f.listed_in
    log.warning("quarantine %s %s (%s): %s", reason_class, f.utt_id, where, reason)
    return {"source": f.source, "source_file": f.path or f.listed_in, "utt_id": f.utt_id,
            "reason_class": reason_class, "reason": reason if where in reason else f"{where}: {reason}"}


def _speaker(f: SpeechFile) -> str:
    return f.speaker if f.speaker.startswith(f"{f.source}:") else f"{f.source}:{f.speaker}"


def process_file(f: SpeechFile, cfg: SpeechIngestConfig) -> tuple[dict | None, dict | None]:
    """(row for :func:`ssip.data.schema.speech_table`, None) or (None, quarantine row)."""
    if f.problem:
        return None, _quarantine(f, "manifest", f.problem)
    try:
        audio, rate = decode_audio(f.path)
    except FileNotFoundError as e:
        if f.listed_in:
            return None, _quarantine(f, "manifest", f"{f.path} is listed in {f.listed_in} but does "
                                     "not exist")
        return None, _quarantine(f, "unreadable", str(e))
    except AudioDecodeError as e:
        return None, _quarantine(f, "unreadable", str(e))
    bad = check_audio(audio, rate, cfg)
    if bad is not None:
        return None, _quarantine(f, *bad)
    audio16 = resample_to_16k(audio, rate)
    mel = mel_of(audio16)  # (80, T)
    return {
        "utt_id": f.utt_id, "source": f.source, "speaker": _speaker(f), "language": f.language,
        "transcript": f.transcript, "license": f.license, "source_file": f.path,
        "source_rate": rate, "duration_s": len(audio16) / melmod.SAMPLE_RATE,
        "n_frames": mel.shape[1], "mel": mel, "mel_version": melmod.MEL_VERSION,
    }, None


def process_group(files: list[SpeechFile | dict], cfg: SpeechIngestConfig) -> tuple[list[dict], list[dict]]:
    """Decode, check and mel every file of a group.

    Parameters
    ----------
    files : list of SpeechFile (or their ``dataclasses.asdict`` dicts)
    cfg : SpeechIngestConfig

    Returns
    -------
    rows : list of dict
        One per kept file, keys of :data:`ssip.data.schema.SPEECH_COLUMNS` (mel float32 (80, T)).
    quarantine : list of dict
        One per rejected file, keys of :data:`ssip.data.schema.SPEECH_QUARANTINE_COLUMNS`.
    """
    rows, quarantine = [], []
    for f in files:
        f = f if isinstance(f, SpeechFile) else SpeechFile(**f)
        row, q = process_file(f, cfg)
        if row is not None:
            rows.append(row)
        if q is not None:
            quarantine.append(q)
    return rows, quarantine


# --- Writing, resuming, the card ----------------------------------------------------------------

_META_KEY = b"ssip_speech_group"


def summarize_group(group: str, key: str, rows: list[dict], quarantine: list[dict]) -> dict:
    """Per-group counts the card adds up (hours by source/speaker/language/licence, quarantine)."""
    breakdown: dict[str, dict[str, list]] = {k: {} for k in ("sources", "speakers", "languages", "licenses")}
    for r in rows:
        for kind, col in (("sources", "source"), ("speakers", "speaker"), ("languages", "language"),
                          ("licenses", "license")):
            acc = breakdown[kind].setdefault(r[col], [0.0, 0])
            acc[0] += float(r["duration_s"])
            acc[1] += 1
    by_class: dict[str, int] = {}
    for q in quarantine:
        by_class[q["reason_class"]] = by_class.get(q["reason_class"], 0) + 1
    return {"group": group, "key": key, "status": "done",
            "shard": f"shards/{group}.parquet" if rows else None,
            "quarantine": f"quarantine/{group}.parquet" if quarantine else None,
            "n_rows": len(rows), "n_quarantined": len(quarantine),
            "seconds_audio": float(sum(r["duration_s"] for r in rows)),
            "breakdown": breakdown, "quarantine_by_class": by_class}


def write_group(out: str, group: SpeechGroup, rows: list[dict], quarantine: list[dict],
                seconds: float = 0.0) -> dict:
    """Write a group's shard and quarantine file whole; returns its summary.

    The summary is also stored in each file's parquet metadata, so that a run that stopped
    before writing the card can still skip the groups it finished. The quarantine file goes
    first and the shard (the group's last file) second.
    """
    summary = summarize_group(group.name, group.key, rows, quarantine)
    summary["seconds"] = round(float(seconds), 3)
    meta = {_META_KEY: json.dumps(summary).encode()}
    if quarantine:
        t = schema.speech_quarantine_table(quarantine)
        storage.write_parquet(storage.join(out, summary["quarantine"]),
                              t.replace_schema_metadata({**(t.schema.metadata or {}), **meta}))
    if rows:
        t = schema.speech_table(rows)
        storage.write_parquet(storage.join(out, summary["shard"]),
                              t.replace_schema_metadata({**(t.schema.metadata or {}), **meta}))
    return summary


def run_group(out: str, group: SpeechGroup, cfg: SpeechIngestConfig) -> dict:
    """Process and write one group (what one Ray task does); returns its summary."""
    t0 = time.time()
    rows, quarantine = process_group(group.files, cfg)
    return write_group(out, group, rows, quarantine, time.time() - t0)


def _files_of(summary: dict) -> list[str]:
    return [p for p in (summary.get("quarantine"), summary.get("shard")) if p]


def finished_summary(out: str, group: SpeechGroup, card: dict | None) -> dict | None:
    """The summary of ``group`` if an earlier run finished it (its files exist), else None.

    Looks in the earlier card first, then in the metadata of the group's own files (a run that
    stopped before its card).
    """
    prev = {g["group"]: g for g in (card or {}).get("groups", [])}.get(group.name)
    if prev is not None and prev.get("status") == "done" and prev.get("key") == group.key:
        if all(storage.exists(storage.join(out, p)) for p in _files_of(prev)):
            return prev
        return None
    for rel in (f"shards/{group.name}.parquet", f"quarantine/{group.name}.parquet"):
        uri = storage.join(out, rel)
        if not storage.exists(uri):
            continue
        fs, path = storage.filesystem(uri)
        try:
            meta = pq.read_schema(path, filesystem=fs).metadata or {}
        except OSError as e:
            log.warning("%s: unreadable (%s); its group is redone", uri, e)
            return None
        if _META_KEY in meta:
            summary = json.loads(meta[_META_KEY])
            if summary.get("key") == group.key and all(
                    storage.exists(storage.join(out, p)) for p in _files_of(summary)):
                return summary
    return None


def read_card(root: str) -> dict | None:
    """The corpus card at ``root``, or None when there is none yet."""
    uri = storage.join(root, CARD)
    return storage.read_json(uri) if storage.exists(uri) else None


def plan_speech_ingest(src: str, out: str, cfg: SpeechIngestConfig) -> dict:
    """List, group and check what a run would do, without decoding anything.

    Returns
    -------
    dict with ``config`` (resolved), ``groups`` (all), ``todo`` (groups to run), ``done``
    (summaries of groups already finished), ``previous`` (the earlier card or None).
    """
    cfg = resolve_source(src, cfg)
    previous = read_card(out)
    if previous is not None and previous.get("source") != cfg.source:
        raise ValueError(f"{out} already holds the corpus {previous.get('source')!r}, not "
                         f"{cfg.source!r}; give another output root or set source="
                         f"{previous.get('source')}")
    files = list_speech_files(src, cfg)
    if not files:
        raise FileNotFoundError(f"no audio found in {src} (layout {cfg.layout}; audio extensions: "
                                f"{' '.join(sorted(AUDIO_EXTENSIONS))})")
    groups = plan_groups(files, cfg)
    done, todo = {}, []
    for g in groups:
        s = finished_summary(out, g, previous)
        if s is None:
            todo.append(g)
        else:
            done[g.name] = s
    return {"config": cfg, "groups": groups, "todo": todo, "done": done, "previous": previous,
            "n_files": len(files)}


def build_card(src: str, cfg: SpeechIngestConfig, summaries: list[dict], seconds: float,
               n_skipped: int = 0) -> dict:
    """The corpus card of a finished run from every group's summary."""
    agg: dict[str, dict[str, list]] = {k: {} for k in ("sources", "speakers", "languages", "licenses")}
    quarantine = dict.fromkeys(REASON_CLASSES, 0)
    for s in summaries:
        for kind, table in s["breakdown"].items():
            for name, (sec, n) in table.items():
                acc = agg[kind].setdefault(name, [0.0, 0])
                acc[0] += sec
                acc[1] += n
        for cls, n in s["quarantine_by_class"].items():
            quarantine[cls] = quarantine.get(cls, 0) + n

    def table(kind: str) -> dict:
        return {k: {"hours": round(v[0] / 3600, 9), "utterances": v[1]}
                for k, v in sorted(agg[kind].items())}

    total_s = sum(s["seconds_audio"] for s in summaries)
    return {
        "schema_version": schema.SPEECH_SCHEMA_VERSION,
        "mel_version": melmod.MEL_VERSION,
        "source": cfg.source,
        "layout": cfg.layout,
        "input": str(src),
        "config": dataclasses.asdict(cfg),
        "config_hash": config_hash(cfg),
        "hours": round(total_s / 3600, 9),
        "n_utterances": sum(s["n_rows"] for s in summaries),
        "n_speakers": len(agg["speakers"]),
        "languages": table("languages"),
        "sources": table("sources"),
        "speakers": table("speakers"),
        "licenses": table("licenses"),
        "quarantine": quarantine,
        "n_quarantined": sum(quarantine.values()),
        "shards": [{"path": s["shard"], "rows": s["n_rows"], "group": s["group"]}
                   for s in summaries if s["shard"]],
        "quarantine_files": [s["quarantine"] for s in summaries if s["quarantine"]],
        "groups": summaries,
        "n_groups": len(summaries),
        "n_groups_skipped": n_skipped,
        "seconds": round(float(seconds), 2),
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def remove_stale(out: str, card: dict) -> list[str]:
    """Delete shard/quarantine parquet files under ``out`` that ``card`` does not list.

    Called after the card is written: files of groups whose membership or settings changed, and
    leftovers of an interrupted run. Returns the relative paths removed.
    """
    keep = {p for s in card["groups"] for p in _files_of(s)}
    removed = []
    for sub in ("shards", "quarantine"):
        base = storage.join(out, sub)
        if not storage.exists(base):
            continue
        for rel, is_dir in list_dir(base, recursive=False):
            path = f"{sub}/{rel}"
            if not is_dir and rel.endswith(".parquet") and path not in keep:
                storage.delete(storage.join(out, path))
                removed.append(path)
    if removed:
        log.info("removed %d file(s) no longer in the card of %s", len(removed), out)
    return removed


# --- Reading back -------------------------------------------------------------------------------


def load_speech(root: str, columns: list[str] | None = None) -> list[dict]:
    """Rows of the speech corpus at ``root`` (local or s3://), from the shards its card lists.

    Parameters
    ----------
    root : str
        Output root of ``ssip speech ingest``.
    columns : list of str or None
        Columns to read (None: all of :data:`ssip.data.schema.SPEECH_COLUMNS`).

    Returns
    -------
    list of dict, sorted by utt_id; ``mel`` is a float32 ndarray of shape (80, T).

    Raises
    ------
    FileNotFoundError
        No card.json (the ingest never finished).
    ValueError
        The card or a shard has an unknown schema version, or a column is unknown.
    """
    card = read_card(root)
    if card is None:
        raise FileNotFoundError(f"{storage.join(root, CARD)} does not exist: run `ssip speech ingest "
                                f"SRC {root}` (the card is written last, when the ingest finishes)")
    schema.check_version(storage.join(root, CARD), card.get("schema_version"),
                         schema.SPEECH_SCHEMA_VERSIONS, "ssip speech ingest")
    if columns is not None:
        unknown = sorted(set(columns) - set(schema.SPEECH_COLUMNS))
        if unknown:
            raise ValueError(f"load_speech: unknown column(s) {unknown}; known: {list(schema.SPEECH_COLUMNS)}")
    read_cols = None if columns is None else list(dict.fromkeys(["schema_version", *columns]))
    rows: list[dict] = []
    for shard in card["shards"]:
        uri = storage.join(root, shard["path"])
        fs, path = storage.filesystem(uri)
        table = schema.read_table(path, filesystem=fs, columns=read_cols)
        for version in sorted(set(table.column("schema_version").to_pylist())):
            schema.check_version(uri, version, schema.SPEECH_SCHEMA_VERSIONS, "ssip speech ingest")
        data = {}
        for name in table.column_names:
            if (columns is not None and name not in columns) \
                    or schema.is_shape_column(name, table.column_names):
                continue
            if schema.SPEECH_COLUMNS[name][0] == "tensor":
                data[name] = [np.asarray(a, np.float32) for a in schema.tensor_values(table, name)]
            else:
                data[name] = table.column(name).to_pylist()
        rows.extend(dict(zip(data, vals, strict=True)) for vals in zip(*data.values(), strict=True))
    if rows and "utt_id" in rows[0]:
        rows.sort(key=lambda r: r["utt_id"])
    return rows
