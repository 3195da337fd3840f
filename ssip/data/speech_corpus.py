"""Speech corpora -> ssip mel shards: layouts, decoding, checks, per-group processing, loading.

This is the Ray-free half of ``ssip speech ingest`` (the Ray Data glue is
:mod:`ssip.distributed.speech_ingest`). A corpus is listed as :class:`SpeechFile` records, the
records are cut into deterministic groups (:func:`plan_groups`), and each group is decoded,
checked and turned into rows of :data:`ssip.data.schema.SPEECH_COLUMNS` by
:func:`process_group`, then written whole by :func:`write_group`.

Layouts (``layout=auto`` picks one, see :func:`detect_layout`):

- ``folder``: every audio file under a folder or s3:// prefix, recursively; speaker = parent
  folder name, transcript ''.
- ``librispeech``: ``<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac`` with
  ``<speaker>-<chapter>.trans.txt`` ("UTTID TRANSCRIPT"); en, CC-BY-4.0.
- ``ljspeech``: ``metadata.csv`` (``id|transcript|normalized transcript``) + ``wavs/<id>.wav``;
  one speaker ``ljspeech``, en, public domain. The normalised transcript is kept when present.
- ``commonvoice``: ``<tsv>.tsv`` (client_id, path, sentence, ..., locale) + ``clips/<path>``;
  speaker = client_id, language = locale, CC0-1.0.
- ``manifest``: a ``.jsonl`` or ``.csv`` with columns path (relative to the manifest's folder,
  absolute, or s3://), transcript, speaker and optional utt_id, language, license, source.

Decoding: .wav/.flac/.ogg with soundfile, raw telephony codecs with ffmpeg (``.g722`` as
``-f g722`` at 16 kHz, ``.gsm`` as ``-f gsm -ar 8000``), anything else with ffmpeg's probe. Audio
is down-mixed to mono and resampled to 16 kHz with ``scipy.signal.resample_poly``.

Checks, in this order, each giving a quarantine row of its ``reason_class`` that names the file:
``manifest`` (the listing is wrong: no path, a missing file, a duplicate utt_id), ``unreadable``
(the decoder's own message, or NaN/Inf samples), ``too_short`` / ``too_long`` (duration outside
[min_duration_s, max_duration_s]; long files are quarantined, not split, so that a row is always
one whole file with its whole transcript), ``silent`` (RMS of the decoded audio below
``silence_rms`` before any normalisation) and ``clipped`` (more than ``clip_fraction`` of the
samples at ``|x| >= clip_level``). A bad file never stops the others.

Groups and resume: files are sorted by utt_id and chunked by ``files_per_group``. A group's name
is ``<source>-<index:05d>-<key8>`` where the key hashes the resolved config and the group's
records, so a re-run skips every group whose members and settings are unchanged, and a changed
group is written under a new name (the card written last never points at a half-rewritten
file). Appending files that sort last changes only the last group.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import posixpath
import re
import shutil
import subprocess
import time
from dataclasses import dataclass

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from scipy.signal import resample_poly

from ssip import mel as melmod
from ssip import storage
from ssip.config import check_option, check_range, config_hash, field
from ssip.data import schema

log = logging.getLogger(__name__)

CARD = "card.json"
LAYOUTS = ("auto", "folder", "librispeech", "ljspeech", "commonvoice", "manifest")
REASON_CLASSES = ("unreadable", "silent", "clipped", "too_short", "too_long", "manifest")

#: Read with soundfile (libsndfile).
SOUNDFILE_EXTENSIONS = frozenset({".wav", ".flac", ".ogg"})
#: Headerless telephony codecs ffmpeg cannot probe: the input options that name them.
RAW_CODECS: dict[str, tuple[str, ...]] = {
    ".g722": ("-f", "g722"),  # G.722 ADPCM, 16 kHz
    ".gsm": ("-f", "gsm", "-ar", "8000"),  # GSM 06.10, 8 kHz
}
#: Containers ffmpeg probes by itself.
FFMPEG_EXTENSIONS = frozenset({".mp3", ".m4a", ".mp4", ".aac", ".opus", ".webm", ".wma",
                               ".aif", ".aiff", ".amr", ".sph", ".mka"})
#: Files the folder-like layouts pick up; a manifest may name any extension (ffmpeg probes it).
AUDIO_EXTENSIONS = SOUNDFILE_EXTENSIONS | frozenset(RAW_CODECS) | FFMPEG_EXTENSIONS

#: (language, licence) a layout gives rows that carry none, when the config sets none either.
LAYOUT_DEFAULTS = {
    "librispeech": ("en", "CC-BY-4.0"),
    "ljspeech": ("en", "public-domain"),
    "commonvoice": ("", "CC0-1.0"),
}
LJSPEECH_SPEAKER = "ljspeech"
FFMPEG_TIMEOUT_S = 300


@dataclass
class SpeechIngestConfig:
    """How a speech corpus becomes mel shards. Saved (with its hash) in the corpus card."""

    layout: str = field("auto", help="auto | folder | librispeech | ljspeech | commonvoice | manifest")
    source: str = field("", help="corpus name, prefix of utt_id and speaker; '' = the input folder's "
                        "name (a manifest file: its folder's name)")
    language: str = field("", help="BCP-47 tag for rows that carry none ('' = the layout's default: "
                          "en for librispeech/ljspeech, else unknown)")
    license: str = field("", help="licence for rows that carry none ('' = the layout's default: "
                         "CC-BY-4.0 librispeech, public-domain ljspeech, CC0-1.0 commonvoice)")
    speaker: str = field("", help="one speaker for every row of a folder/manifest corpus that names "
                         "none ('' = the parent folder's name)")
    commonvoice_tsv: str = field("validated", help="commonvoice: which <name>.tsv lists the clips")
    files_per_group: int = field(200, help="files per Ray task and per shard (files sorted by utt_id, "
                                 "then chunked)")
    min_duration_s: float = field(0.3, help="shorter files are quarantined 'too_short', s")
    max_duration_s: float = field(30.0, help="longer files are quarantined 'too_long' (not split), s")
    silence_rms: float = field(1e-4, help="files whose RMS before normalisation is below this "
                               "(full scale 1; 1e-4 = -80 dBFS) are quarantined 'silent'")
    clip_level: float = field(0.999, help="|sample| at or above this counts as clipped")
    clip_fraction: float = field(1e-3, help="files with more than this share of clipped samples are "
                                 "quarantined 'clipped'")

    def __post_init__(self) -> None:
        check_option("layout", self.layout, LAYOUTS)
        check_range("files_per_group", self.files_per_group, 1, None)
        check_range("min_duration_s", self.min_duration_s, 0.0, None)
        check_range("max_duration_s", self.max_duration_s, self.min_duration_s, None)
        check_range("silence_rms", self.silence_rms, 0.0, 1.0)
        check_range("clip_level", self.clip_level, 0.0, 1.0)
        check_range("clip_fraction", self.clip_fraction, 0.0, 1.0)
        if "/" in self.commonvoice_tsv:
            raise ValueError(f"commonvoice_tsv={self.commonvoice_tsv!r}: give the file name without "
                             "a folder, e.g. 'validated'")


@dataclass
class SpeechFile:
    """One utterance as listed by a layout reader, before any audio is read.

    Attributes
    ----------
    utt_id : str
        Unique id, ``'<source>/<path relative to the corpus root, without extension>'`` unless a
        manifest gives one.
    path : str
        Audio file: absolute local path or s3:// URI ('' when a manifest row lacks one).
    source, speaker, language, transcript, license : str
        Row metadata; ``speaker`` is not yet prefixed by the source.
    listed_in : str
        ``'<file>:<line>'`` of the manifest/metadata row that named the file ('' for a file
        found by listing a folder): a missing file is then the listing's fault.
    problem : str
        Why the listing row itself is unusable ('' when fine); quarantined as ``manifest``.
    """

    utt_id: str
    path: str
    source: str
    speaker: str
    language: str = ""
    transcript: str = ""
    license: str = ""
    listed_in: str = ""
    problem: str = ""


@dataclass
class SpeechGroup:
    """A deterministic chunk of the sorted file list: one Ray task, one shard."""

    name: str
    key: str
    files: list[SpeechFile]


class AudioDecodeError(Exception):
    """The decoder could not read a file; the message is the decoder's, prefixed by the file."""


# --- Listing ------------------------------------------------------------------------------------


def _ext(path: str) -> str:
    return posixpath.splitext(path)[1].lower()


def _strip_ext(rel: str) -> str:
    return posixpath.splitext(rel)[0]


def _list_dir(root: str, recursive: bool) -> list[tuple[str, bool]]:
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
        if _ext(root) in (".jsonl", ".csv"):
            return "manifest"
        raise ValueError(f"speech source {src} is a file but not a .jsonl/.csv manifest; give a "
                         "folder or a manifest")
    top = dict(_list_dir(root, recursive=False))
    if top.get("manifest.jsonl") is False or top.get("manifest.csv") is False:
        return "manifest"
    if top.get("metadata.csv") is False and top.get("wavs") is True:
        return "ljspeech"
    if top.get("clips") is True and any(n.endswith(".tsv") and not d for n, d in top.items()):
        return "commonvoice"
    if any(_LIBRI_TRANS.search(rel) for rel, d in _list_dir(root, recursive=True) if not d):
        return "librispeech"
    return "folder"


_LIBRI_TRANS = re.compile(r"(?:^|/)([^/]+)/([^/]+)/\1-\2\.trans\.txt$")


def resolve_source(src: str, cfg: SpeechIngestConfig) -> SpeechIngestConfig:
    """``cfg`` with ``layout`` detected and ``source`` defaulted (the folder's name)."""
    layout = detect_layout(src) if cfg.layout == "auto" else cfg.layout
    source = cfg.source
    if not source:
        root = _root_uri(src)
        source = _basename(_parent(root)) if layout == "manifest" and _ext(root) in (".jsonl", ".csv") \
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
    for rel, is_dir in _list_dir(root, recursive=True):
        if is_dir:
            continue
        if _ext(rel) not in AUDIO_EXTENSIONS:
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
    entries = [rel for rel, d in _list_dir(root, recursive=True) if not d]
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
        if _ext(rel) not in AUDIO_EXTENSIONS:
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
        have = sorted(n for n, d in _list_dir(root, recursive=False) if n.endswith(".tsv") and not d)
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
    if _ext(uri) == ".csv":
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


# --- Decoding -----------------------------------------------------------------------------------


def _read_bytes(uri: str) -> bytes:
    try:
        return storage.read_bytes(uri)
    except OSError as e:
        if not storage.exists(uri):
            raise FileNotFoundError(f"{uri} does not exist") from e
        raise AudioDecodeError(f"{uri}: cannot read: {e}") from e


def _ffmpeg(uri: str, input_opts: tuple[str, ...]) -> tuple[np.ndarray, int]:
    exe = shutil.which("ffmpeg")
    if exe is None:
        raise AudioDecodeError(f"{uri}: ffmpeg is needed for {_ext(uri) or 'this'} files; install "
                               "the Debian package ffmpeg")
    if storage.is_s3(uri):
        source, stdin = "pipe:0", _read_bytes(uri)
    else:
        if not os.path.isfile(uri):
            raise FileNotFoundError(f"{uri} does not exist")
        source, stdin = f"file:{uri}", None
    # PCM float WAV on stdout keeps the file's own rate (read back from the header).
    cmd = [exe, "-nostdin", "-hide_banner", "-loglevel", "error", *input_opts, "-i", source,
           "-vn", "-ac", "1", "-c:a", "pcm_f32le", "-f", "wav", "pipe:1"]
    try:
        proc = subprocess.run(cmd, input=stdin, capture_output=True, check=False,
                              timeout=FFMPEG_TIMEOUT_S, stdin=None if stdin is not None else subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        raise AudioDecodeError(f"{uri}: ffmpeg did not finish in {FFMPEG_TIMEOUT_S} s") from e
    if proc.returncode != 0:
        msg = proc.stderr.decode(errors="replace").strip().splitlines()
        raise AudioDecodeError(f"{uri}: ffmpeg exit {proc.returncode}: {' | '.join(msg[-3:]) or 'no message'}")
    import soundfile as sf

    try:
        audio, rate = sf.read(io.BytesIO(proc.stdout), dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises LibsndfileError / RuntimeError on a bad stream
        raise AudioDecodeError(f"{uri}: ffmpeg output unreadable: {e}") from e
    return audio.mean(axis=1), int(rate)


def decode_audio(uri: str) -> tuple[np.ndarray, int]:
    """Decode one audio file (local path or s3://) to mono float32 at its own rate.

    Returns
    -------
    audio : ndarray, shape (n_samples,), float32, full scale +-1
    rate : int, Hz

    Raises
    ------
    FileNotFoundError
        The file does not exist.
    AudioDecodeError
        The decoder failed; the message is the decoder's, prefixed by the file.
    """
    ext = _ext(uri)
    if ext in SOUNDFILE_EXTENSIONS:
        import soundfile as sf

        data = _read_bytes(uri)
        try:
            audio, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
        except Exception as e:  # libsndfile's errors are RuntimeError/TypeError subclasses
            msg = re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "the file", str(e))
            raise AudioDecodeError(f"{uri}: soundfile: {msg}") from e
        audio, rate = audio.mean(axis=1).astype(np.float32), int(rate)
    else:
        audio, rate = _ffmpeg(uri, RAW_CODECS.get(ext, ()))
    if audio.size == 0:
        raise AudioDecodeError(f"{uri}: decoded no samples")
    return audio, rate


def resample_to_16k(audio: np.ndarray, rate: int) -> np.ndarray:
    """Polyphase resampling to 16 kHz (up/down reduced by their gcd); float32 out."""
    rate = int(rate)
    if rate == melmod.SAMPLE_RATE:
        return np.asarray(audio, np.float32)
    g = math.gcd(melmod.SAMPLE_RATE, rate)
    return resample_poly(np.asarray(audio, np.float64), melmod.SAMPLE_RATE // g, rate // g).astype(np.float32)


def mel_of(audio16: np.ndarray) -> np.ndarray:
    """ssip log-mel of loudness-normalised 16 kHz audio, float32 (80, T)."""
    import torch

    with torch.no_grad():
        m = melmod.log_mel(torch.from_numpy(melmod.normalize_loudness(audio16)))
    return m.numpy().astype(np.float32)


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
        for rel, is_dir in _list_dir(base, recursive=False):
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
