"""Corpus layouts -> :class:`SpeechFile` records (folder, LibriSpeech, LJSpeech, Common Voice,
manifest)."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import os
import posixpath
import re

import pyarrow.fs as pafs

from ssip import storage
from ssip.data.speech_corpus.config import (
    AUDIO_EXTENSIONS,
    LAYOUT_DEFAULTS,
    LJSPEECH_SPEAKER,
    SpeechFile,
    SpeechIngestConfig,
    file_ext,
)

log = logging.getLogger(__name__)

# --- Listing ------------------------------------------------------------------------------------


def _strip_ext(rel: str) -> str:
    return posixpath.splitext(rel)[0]


def list_dir(root: str, recursive: bool) -> list[tuple[str, bool]]:
    """(relative posix path, is_dir) of the entries under ``root`` (local or s3://), sorted."""
    fs, base = storage.filesystem(root)
    info = fs.get_file_info(base)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"speech corpus {root} does not exist")
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=recursive))
    out = []
    for i in infos:
        rel = posixpath.relpath(i.path.replace(os.sep, "/"), base.replace(os.sep, "/"))
        out.append((rel, i.type == pafs.FileType.Directory))
    return sorted(out)


def _is_file(uri: str) -> bool:
    fs, path = storage.filesystem(uri)
    return fs.get_file_info(path).type == pafs.FileType.File


def _read_text(uri: str) -> str:
    try:
        return storage.read_bytes(uri).decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{uri} is not UTF-8 text: {e}") from e


def _parent(uri: str) -> str:
    if storage.is_s3(uri):
        return uri.rstrip("/").rsplit("/", 1)[0]
    return os.path.dirname(os.path.abspath(uri))


def _basename(uri: str) -> str:
    uri = str(uri).rstrip("/")
    return uri.rsplit("/", 1)[-1] if storage.is_s3(uri) else os.path.basename(os.path.abspath(uri))


def _root_uri(src: str) -> str:
    return str(src).rstrip("/") if storage.is_s3(src) else os.path.abspath(src)


def detect_layout(src: str) -> str:
    """Which layout ``src`` is in.

    A ``.jsonl``/``.csv`` file, or a folder with a top-level ``manifest.jsonl``/``manifest.csv``,
    is a manifest; ``metadata.csv`` + ``wavs/`` is ljspeech; ``clips/`` + a ``.tsv`` is
    commonvoice; any ``<a>/<b>/<a>-<b>.trans.txt`` is librispeech; anything else is a folder.
    """
    root = _root_uri(src)
    if _is_file(root):
        if file_ext(root) in (".jsonl", ".csv"):
            return "manifest"
        raise ValueError(f"speech source {src} is a file but not a .jsonl/.csv manifest; give a "
                         "folder or a manifest")
    top = dict(list_dir(root, recursive=False))
    if top.get("manifest.jsonl") is False or top.get("manifest.csv") is False:
        return "manifest"
    if top.get("metadata.csv") is False and top.get("wavs") is True:
        return "ljspeech"
    if top.get("clips") is True and any(n.endswith(".tsv") and not d for n, d in top.items()):
        return "commonvoice"
    if any(_LIBRI_TRANS.search(rel) for rel, d in list_dir(root, recursive=True) if not d):
        return "librispeech"
    return "folder"


_LIBRI_TRANS = re.compile(r"(?:^|/)([^/]+)/([^/]+)/\1-\2\.trans\.txt$")


def resolve_source(src: str, cfg: SpeechIngestConfig) -> SpeechIngestConfig:
    """``cfg`` with ``layout`` detected and ``source`` defaulted (the folder's name)."""
    layout = detect_layout(src) if cfg.layout == "auto" else cfg.layout
    source = cfg.source
    if not source:
        root = _root_uri(src)
        source = _basename(_parent(root)) if layout == "manifest" and file_ext(root) in (".jsonl", ".csv") \
            else _basename(root)
    return dataclasses.replace(cfg, layout=layout, source=source)


def list_speech_files(src: str, cfg: SpeechIngestConfig) -> list[SpeechFile]:
    """Every utterance of the corpus at ``src`` (local or s3://), sorted by utt_id.

    ``cfg`` is resolved with :func:`resolve_source` first when its layout is ``auto`` or its
    source empty. No audio is read; a file a listing names but that is missing is found later,
    when :func:`process_file` reads it (one existence check per file would be slow on S3).
    """
    if cfg.layout == "auto" or not cfg.source:
        cfg = resolve_source(src, cfg)
    root = _root_uri(src)
    reader = {"folder": _list_folder, "librispeech": _list_librispeech, "ljspeech": _list_ljspeech,
              "commonvoice": _list_commonvoice, "manifest": _list_manifest}[cfg.layout]
    files = reader(root, cfg)
    return sorted(files, key=lambda f: f.utt_id)


def _defaults(cfg: SpeechIngestConfig) -> tuple[str, str]:
    lang, lic = LAYOUT_DEFAULTS.get(cfg.layout, ("", ""))
    return cfg.language or lang, cfg.license or lic


def _list_folder(root: str, cfg: SpeechIngestConfig) -> list[SpeechFile]:
    language, license_ = _defaults(cfg)
    root_name = _basename(root)
    files, skipped = [], 0
    for rel, is_dir in list_dir(root, recursive=True):
        if is_dir:
            continue
        if file_ext(rel) not in AUDIO_EXTENSIONS:
            skipped += 1
            continue
        parent = posixpath.basename(posixpath.dirname(rel)) or root_name
        files.append(SpeechFile(utt_id=f"{cfg.source}/{_strip_ext(rel)}", path=storage.join(root, rel),
                                source=cfg.source, speaker=cfg.speaker or parent,
                                language=language, license=license_))
    if skipped:
        log.info("%s: %d non-audio file(s) ignored (audio: %s)", root, skipped,
                 " ".join(sorted(AUDIO_EXTENSIONS)))
    return files


def _list_librispeech(root: str, cfg: SpeechIngestConfig) -> list[SpeechFile]:
    language, license_ = _defaults(cfg)
    entries = [rel for rel, d in list_dir(root, recursive=True) if not d]
    transcripts: dict[str, tuple[str, str]] = {}  # utt name -> (text, "file:line")
    for rel in entries:
        if not _LIBRI_TRANS.search(rel):
            continue
        uri = storage.join(root, rel)
        for lineno, line in enumerate(_read_text(uri).splitlines(), 1):
            if line.strip():
                name, _, text = line.strip().partition(" ")
                transcripts[name] = (text.strip(), f"{uri}:{lineno}")
    files = []
    for rel in entries:
        if file_ext(rel) not in AUDIO_EXTENSIONS:
            continue
        parts = rel.split("/")
        stem = _strip_ext(parts[-1])
        text, listed = transcripts.get(stem, ("", ""))
        if not listed:
            log.warning("librispeech %s: no transcript line for %s in its .trans.txt", root, rel)
        speaker = cfg.speaker or (parts[-3] if len(parts) >= 3 else stem.split("-")[0])
        files.append(SpeechFile(utt_id=f"{cfg.source}/{_strip_ext(rel)}", path=storage.join(root, rel),
                                source=cfg.source, speaker=speaker, language=language,
                                transcript=text, license=license_, listed_in=listed))
    return files


def _list_ljspeech(root: str, cfg: SpeechIngestConfig) -> list[SpeechFile]:
    language, license_ = _defaults(cfg)
    meta = storage.join(root, "metadata.csv")
    files = []
    # Plain split, not the csv module: LJSpeech transcripts contain unbalanced quotes.
    for lineno, line in enumerate(_read_text(meta).splitlines(), 1):
        if not line.strip():
            continue
        cols = line.split("|")
        listed = f"{meta}:{lineno}"
        uid = cols[0].strip()
        rel = f"wavs/{uid}.wav"
        text = (cols[2] if len(cols) > 2 and cols[2].strip() else cols[1] if len(cols) > 1 else "").strip()
        problem = "" if uid else f"{listed}: empty id column"
        files.append(SpeechFile(utt_id=f"{cfg.source}/{_strip_ext(rel)}" if uid else f"{cfg.source}/line-{lineno}",
                                path=storage.join(root, rel) if uid else "", source=cfg.source,
                                speaker=cfg.speaker or LJSPEECH_SPEAKER, language=language,
                                transcript=text, license=license_, listed_in=listed, problem=problem))
    return files


def _list_commonvoice(root: str, cfg: SpeechIngestConfig) -> list[SpeechFile]:
    language, license_ = _defaults(cfg)
    tsv = storage.join(root, f"{cfg.commonvoice_tsv}.tsv")
    if not storage.exists(tsv):
        have = sorted(n for n, d in list_dir(root, recursive=False) if n.endswith(".tsv") and not d)
        raise FileNotFoundError(f"commonvoice: {tsv} does not exist; set commonvoice_tsv to one of "
                                f"{[h[:-4] for h in have]}")
    reader = csv.DictReader(io.StringIO(_read_text(tsv)), delimiter="\t", quoting=csv.QUOTE_NONE)
    missing = {"client_id", "path", "sentence"} - set(reader.fieldnames or [])
    if missing:
        raise ValueError(f"commonvoice: {tsv} lacks column(s) {sorted(missing)}; "
                         f"it has {reader.fieldnames}")
    files = []
    for lineno, row in enumerate(reader, 2):
        listed = f"{tsv}:{lineno}"
        clip = (row.get("path") or "").strip()
        rel = f"clips/{clip}"
        files.append(SpeechFile(
            utt_id=f"{cfg.source}/{_strip_ext(rel)}" if clip else f"{cfg.source}/line-{lineno}",
            path=storage.join(root, rel) if clip else "", source=cfg.source,
            speaker=cfg.speaker or (row.get("client_id") or "").strip(),
            language=(row.get("locale") or "").strip() or language,
            transcript=(row.get("sentence") or "").strip(), license=license_, listed_in=listed,
            problem="" if clip else f"{listed}: empty path column"))
    return files


def _manifest_rows(uri: str) -> list[tuple[int, dict | None, str]]:
    """(line, row or None, problem) of a .jsonl or .csv manifest."""
    text = _read_text(uri)
    if file_ext(uri) == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        if "path" not in (reader.fieldnames or []):
            raise ValueError(f"manifest {uri} has no 'path' column; it has {reader.fieldnames}")
        return [(n, {k: v for k, v in row.items() if k is not None}, "")
                for n, row in enumerate(reader, 2)]
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            out.append((n, None, f"{uri}:{n}: not a JSON object ({e.msg})"))
            continue
        if not isinstance(row, dict):
            out.append((n, None, f"{uri}:{n}: not a JSON object"))
        else:
            out.append((n, row, ""))
    return out


def _list_manifest(root: str, cfg: SpeechIngestConfig) -> list[SpeechFile]:
    if _is_file(root):
        uri = root
    else:
        candidates = [storage.join(root, n) for n in ("manifest.jsonl", "manifest.csv")]
        found = [c for c in candidates if _is_file(c)]
        if not found:
            raise FileNotFoundError(f"layout=manifest: {root} is a folder without manifest.jsonl or "
                                    "manifest.csv; give the manifest file itself")
        uri = found[0]
    base = _parent(uri)
    language, license_ = _defaults(cfg)

    def get(row: dict | None, key: str, default: str = "") -> str:
        value = (row or {}).get(key)
        return default if value is None or str(value).strip() == "" else str(value).strip()

    files = []
    for lineno, row, problem in _manifest_rows(uri):
        listed = f"{uri}:{lineno}"
        source = get(row, "source", cfg.source)
        path = get(row, "path")
        if path.startswith("s3://") or os.path.isabs(path):
            full, rel = path, path.split("://", 1)[-1].lstrip("/")
        else:
            full, rel = (storage.join(base, path) if path else ""), path
        if not problem and not path:
            problem = f"{listed}: row has no 'path'"
        utt_id = get(row, "utt_id") or (f"{source}/{_strip_ext(rel)}" if rel else f"{source}/line-{lineno}")
        parent = posixpath.basename(posixpath.dirname(full.replace(os.sep, "/"))) if full else ""
        files.append(SpeechFile(utt_id=utt_id, path=full, source=source,
                                speaker=get(row, "speaker", cfg.speaker or parent),
                                language=get(row, "language", language),
                                transcript=get(row, "transcript"),
                                license=get(row, "license", license_), listed_in=listed,
                                problem=problem))
    return files
