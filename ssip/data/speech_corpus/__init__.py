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

from ssip.data.speech_corpus.audio import decode_audio, mel_of, resample_to_16k
from ssip.data.speech_corpus.config import (
    AUDIO_EXTENSIONS,
    CARD,
    LAYOUTS,
    REASON_CLASSES,
    AudioDecodeError,
    SpeechFile,
    SpeechGroup,
    SpeechIngestConfig,
)
from ssip.data.speech_corpus.ingest import (
    build_card,
    check_audio,
    finished_summary,
    load_speech,
    plan_groups,
    plan_speech_ingest,
    process_file,
    process_group,
    read_card,
    remove_stale,
    run_group,
    safe_name,
    summarize_group,
    write_group,
)
from ssip.data.speech_corpus.layouts import detect_layout, list_speech_files, resolve_source

__all__ = [
    "AUDIO_EXTENSIONS", "CARD", "LAYOUTS", "REASON_CLASSES", "AudioDecodeError", "SpeechFile",
    "SpeechGroup", "SpeechIngestConfig", "build_card", "check_audio", "decode_audio",
    "detect_layout", "finished_summary", "list_speech_files", "load_speech", "mel_of",
    "plan_groups", "plan_speech_ingest", "process_file", "process_group", "read_card",
    "remove_stale", "resample_to_16k", "resolve_source", "run_group", "safe_name",
    "summarize_group", "write_group",
]
