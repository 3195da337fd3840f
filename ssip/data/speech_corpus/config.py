"""Speech ingest: its config, the record types and the audio extensions it knows."""

from __future__ import annotations

import logging
import posixpath
from dataclasses import dataclass

from ssip.config import check_option, check_range, field

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


def file_ext(path: str) -> str:
    return posixpath.splitext(path)[1].lower()
