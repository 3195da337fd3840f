"""Readers for the real speech that ships in Debian packages: asterisk prompts and pocketsphinx tests.

Two sources, both read-only, both 16 kHz mono (see docs/method.md, Assets that ship in packages):

- ``asterisk-en``: the English core sounds of Asterisk (package asterisk-core-sounds-en-g722),
  one female speaker (Allison Smith), CC-BY-SA-3.0. Audio is G.722 decoded with ffmpeg;
  transcripts come from asterisk-core-sounds-en's ``core-sounds-en.txt.gz`` ("name: text").
- ``pocketsphinx``: the test data of pocketsphinx (package pocketsphinx-testdata), about 40 s of
  speech from several speakers with transcripts, BSD-2.

Every reader returns :class:`Utterance` objects sorted by ``utt_id`` so that two reads give the
same order, which the simulated corpus relies on to deal prompts to subjects.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import subprocess
import wave
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ssip.mel import SAMPLE_RATE

#: Debian package locations (documented defaults; override for other systems).
ASTERISK_ROOT = Path("/usr/share/asterisk/sounds")
ASTERISK_SOUNDS_DIR = ASTERISK_ROOT / "en_US_f_Allison"
ASTERISK_TRANSCRIPTS = Path("/usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz")
POCKETSPHINX_ROOT = Path("/usr/share/pocketsphinx/test/data")


def debian_unpack_root() -> Path:
    """Where scripts/system_deps.sh unpacks the voice packages that conflict with the core sounds.

    ``$SSIP_DEBIAN_SPEECH``, else ``$XDG_CACHE_HOME/ssip/debian-speech`` (``~/.cache/...``).
    """
    env = os.environ.get("SSIP_DEBIAN_SPEECH")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ssip" / "debian-speech"


@dataclass(frozen=True)
class DebianVoice:
    """One speaker's prompt set in a Debian package (docs/method.md, Assets that ship in packages).

    ``sounds_dir`` is absolute, or relative to :func:`debian_unpack_root` for the packages that
    system_deps.sh unpacks instead of installing. ``transcripts`` is None for packages that ship
    none (their prompts are still speech: the prior needs no words).
    """

    source: str
    speaker: str
    language: str
    license: str
    package: str
    sounds_dir: str
    ext: str  # "g722" (16 kHz) or "gsm" (8 kHz)
    transcripts: str | None = None
    note: str = ""

    def directory(self) -> Path:
        d = Path(self.sounds_dir)
        return d if d.is_absolute() else debian_unpack_root() / d

    @property
    def sample_rate(self) -> int:
        return 8000 if self.ext == "gsm" else SAMPLE_RATE


_DOC = "/usr/share/doc"
#: Every Debian speech voice ssip knows, by source name. The core sounds (16 kHz G.722 with
#: transcripts) are Digium's asterisk-core-sounds 1.6.1; the asterisk-prompt-* voices are older
#: 8 kHz GSM prompt sets without transcripts.
DEBIAN_VOICES: dict[str, DebianVoice] = {v.source: v for v in [
    DebianVoice("asterisk-en", "asterisk:allison", "en-US", "CC-BY-SA-3.0",
                "asterisk-core-sounds-en-g722", str(ASTERISK_ROOT / "en_US_f_Allison"), "g722",
                f"{_DOC}/asterisk-core-sounds-en/core-sounds-en.txt.gz", "Allison Smith"),
    DebianVoice("asterisk-es", "asterisk:allison", "es-MX", "CC-BY-SA-3.0",
                "asterisk-core-sounds-es-g722", str(ASTERISK_ROOT / "es_MX_f_Allison"), "g722",
                f"{_DOC}/asterisk-core-sounds-es/core-sounds-es.txt.gz",
                "Allison Smith, the English voice, speaking Spanish"),
    DebianVoice("asterisk-fr", "asterisk:june", "fr-CA", "CC-BY-SA-3.0",
                "asterisk-core-sounds-fr-g722", str(ASTERISK_ROOT / "fr_CA_f_June"), "g722",
                f"{_DOC}/asterisk-core-sounds-fr/core-sounds-fr.txt.gz", "June Wallack"),
    DebianVoice("asterisk-it", "asterisk:carlo", "it-IT", "CC-BY-SA-3.0",
                "asterisk-core-sounds-it-g722", str(ASTERISK_ROOT / "it_IT_m_Carlo"), "g722",
                f"{_DOC}/asterisk-core-sounds-it/core-sounds-it.txt.gz", "Carlo, male"),
    DebianVoice("asterisk-ru", "asterisk:ivrvoiceru", "ru-RU", "CC-BY-SA-3.0",
                "asterisk-core-sounds-ru-g722", str(ASTERISK_ROOT / "ru_RU_f_IvrvoiceRU"), "g722",
                f"{_DOC}/asterisk-core-sounds-ru/core-sounds-ru.txt.gz", "IvrvoiceRU, female"),
    DebianVoice("prompt-it-menardi", "asterisk-prompt:menardi", "it-IT", "CC-BY-SA-3.0",
                "asterisk-prompt-it-menardi", str(ASTERISK_ROOT / "it_IT_f_Menardi"), "gsm",
                None, "Menardi prompts, female, 8 kHz GSM"),
    DebianVoice("prompt-es-co", "asterisk-prompt:es-co", "es-CO", "GPL-2.0-or-later",
                "asterisk-prompt-es-co", "asterisk-prompt-es-co/usr/share/asterisk/sounds", "gsm",
                None, "Colombian Spanish, 8 kHz GSM"),
    DebianVoice("prompt-fr-armelle", "asterisk-prompt:armelle", "fr-FR",
                "BSD-style (Michel Gutierrez 2006, see the package's copyright)",
                "asterisk-prompt-fr-armelle", "asterisk-prompt-fr-armelle/usr/share/asterisk/sounds",
                "gsm", None, "Armelle Desjardins, 8 kHz GSM"),
]}

ASTERISK_SPEAKER = "asterisk:allison"  # as DEBIAN_VOICES["asterisk-en"]
ASTERISK_LICENSE = "CC-BY-SA-3.0"
POCKETSPHINX_LICENSE = "BSD-2-Clause"

# "[ascending tones]", "(10 seconds of silence)", "at [@]", "(note: does not say "2")":
# brackets describe a sound rather than transcribe a word.
_ANNOTATION = re.compile(r"\[[^\]]*\]|\([^)]*\)")


@dataclass
class Utterance:
    """One recorded prompt with its transcript.

    Attributes
    ----------
    utt_id : str
        Stable id, ``"<source>/<name>"``, e.g. ``"asterisk-en/agent-loginok"``.
    audio : ndarray, shape (n_samples,), float32
        16 kHz mono audio as recorded (not loudness-normalised), full scale +-1.
    transcript : str
        What is said, annotations removed.
    speaker : str
        Speaker label, e.g. ``"asterisk:allison"``.
    source : str
        ``"asterisk-en"`` or ``"pocketsphinx"``.
    language : str
        BCP-47 language tag.
    license : str
        SPDX-style licence of the recording.
    """

    utt_id: str
    audio: np.ndarray
    transcript: str
    speaker: str
    source: str
    language: str = "en"
    license: str = ""

    @property
    def duration(self) -> float:
        """Length in seconds."""
        return len(self.audio) / SAMPLE_RATE


def clean_transcript(text: str) -> str:
    """Remove bracketed/parenthesised sound annotations and collapse whitespace.

    >>> clean_transcript("Please leave your message after the tone. (simple tone sound plays)")
    'Please leave your message after the tone.'
    """
    return " ".join(_ANNOTATION.sub(" ", text).split())


def read_asterisk_transcripts(transcripts: str | Path = ASTERISK_TRANSCRIPTS) -> dict[str, str]:
    """Parse ``core-sounds-en.txt(.gz)``: ``name: text`` lines, ``;`` starts a comment line.

    Returns
    -------
    dict
        Prompt name (may contain a subfolder, e.g. ``"dictate/both_help"``) -> raw text.
    """
    path = Path(transcripts)
    if not path.exists():
        raise FileNotFoundError(
            f"asterisk transcripts {path} not found; install the Debian package "
            "asterisk-core-sounds-en or pass transcripts=<path to core-sounds-en.txt.gz>"
        )
    opener = gzip.open if path.suffix == ".gz" else open
    out: dict[str, str] = {}
    with opener(path, "rt", encoding="utf-8-sig") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if not line or line.startswith(";"):
                continue
            name, sep, text = line.partition(":")
            if not sep:
                raise ValueError(f"{path}:{lineno}: expected 'name: text', got {line!r}")
            out[name.strip()] = text.strip()
    return out


def asterisk_prompts(
    sounds_dir: str | Path = ASTERISK_SOUNDS_DIR,
    transcripts: str | Path = ASTERISK_TRANSCRIPTS,
    *,
    source: str = "asterisk-en",
    ext: str = "g722",
) -> list[tuple[str, Path, str]]:
    """The speech prompts of the asterisk sounds, without decoding any audio.

    A prompt is kept when it has both a ``.<ext>`` file and a transcript line, and its transcript
    still has words once sound annotations in ``[...]`` or ``(...)`` are removed. That rule drops
    the tones and beeps (``beep: [this is a simple beep tone]``), ``tt-monkeys`` and the
    ``silence/N`` files (``(10 seconds of silence)``), and keeps prompts whose names merely
    mention a tone (``at-tone-time-exactly`` is speech). 553 of 568 English files remain.

    Returns
    -------
    list of (utt_id, path, transcript), sorted by utt_id; ``utt_id = "<source>/<name>"``.
    """
    root = Path(sounds_dir)
    if not root.is_dir():
        raise FileNotFoundError(
            f"asterisk sounds directory {root} not found; install the Debian package "
            "asterisk-core-sounds-en-g722 (scripts/system_deps.sh installs every voice) or pass "
            "sounds_dir=<folder with the prompt files>"
        )
    texts = read_asterisk_transcripts(transcripts)
    prompts = []
    for path in root.rglob(f"*.{ext}"):
        name = path.relative_to(root).with_suffix("").as_posix()
        text = clean_transcript(texts.get(name, ""))
        if text:
            prompts.append((f"{source}/{name}", path, text))
    if not prompts:
        raise FileNotFoundError(f"no .{ext} prompt in {root} has a transcript in {transcripts}")
    return sorted(prompts)


def _non_speech_names() -> set[str]:
    # Prompt names that are tones, beeps or silence in every language: their English transcript
    # is only a sound annotation ("beep: [this is a simple beep tone]").
    names = {"beep", "beeperr", "tt-monkeys"}
    if ASTERISK_TRANSCRIPTS.exists():
        names |= {n for n, t in read_asterisk_transcripts(ASTERISK_TRANSCRIPTS).items()
                  if not clean_transcript(t)}
    return names


def voice_prompts(voice: str | DebianVoice) -> list[tuple[str, Path, str]]:
    """The speech prompts of one Debian voice (:data:`DEBIAN_VOICES`), without decoding audio.

    Voices with transcripts follow :func:`asterisk_prompts`, less the names that are tones in
    the English set (a translation may describe the tone in words). Voices without (the 8 kHz
    asterisk-prompt-* sets) keep every ``.gsm`` file except ``silence/*`` and the names that are
    tones in the English set; their transcript is ``""``.

    Returns
    -------
    list of (utt_id, path, transcript), sorted by utt_id.
    """
    v = DEBIAN_VOICES[voice] if isinstance(voice, str) else voice
    root = v.directory()
    if not root.is_dir():
        raise FileNotFoundError(
            f"speech voice {v.source}: folder {root} not found; run scripts/system_deps.sh "
            f"(it installs or unpacks the Debian package {v.package})"
        )
    skip = _non_speech_names()
    if v.transcripts is not None:
        # Some translations describe the tone in words ("beep: un suono beep").
        return [p for p in asterisk_prompts(root, v.transcripts, source=v.source, ext=v.ext)
                if p[0].split("/", 1)[1] not in skip]
    prompts = []
    for path in root.rglob(f"*.{v.ext}"):
        name = path.relative_to(root).with_suffix("").as_posix()
        if name.startswith("silence/") or name in skip:
            continue
        prompts.append((f"{v.source}/{name}", path, ""))
    if not prompts:
        raise FileNotFoundError(f"speech voice {v.source}: no .{v.ext} file under {root}")
    return sorted(prompts)


def decode_g722(path: str | Path) -> np.ndarray:
    """Decode a raw G.722 file to float32 16 kHz mono with ffmpeg (no shell).

    Returns
    -------
    ndarray, shape (n_samples,), float32
    """
    return decode_raw_codec(path, "g722")


def decode_raw_codec(path: str | Path, codec: str) -> np.ndarray:
    """Decode a headerless telephony file (``g722`` or ``gsm``) to float32 16 kHz mono.

    ffmpeg cannot probe these raw formats, so the demuxer is named (``-f gsm -ar 8000`` for GSM,
    an 8 kHz codec; ffmpeg's resampler brings both to 16 kHz).
    """
    fmt = {"g722": ["-f", "g722"], "gsm": ["-f", "gsm", "-ar", "8000"]}.get(codec)
    if fmt is None:
        raise ValueError(f"{path}: raw codec {codec!r} is not g722 or gsm")
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise FileNotFoundError(
            f"ffmpeg is needed to decode {path}; install the Debian package ffmpeg"
        )
    cmd = [ffmpeg, "-nostdin", "-hide_banner", "-loglevel", "error", *fmt, "-i",
           str(path), "-f", "f32le", "-ac", "1", "-ar", str(SAMPLE_RATE), "-"]
    proc = subprocess.run(cmd, capture_output=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(
            f"ffmpeg failed to decode {path} (exit {proc.returncode}): "
            f"{proc.stderr.decode(errors='replace').strip()}"
        )
    audio = np.frombuffer(proc.stdout, dtype="<f4").astype(np.float32)
    if audio.size == 0:
        raise RuntimeError(f"ffmpeg decoded no samples from {path}; is it a {codec} file?")
    return audio


def read_asterisk(
    sounds_dir: str | Path = ASTERISK_SOUNDS_DIR,
    transcripts: str | Path = ASTERISK_TRANSCRIPTS,
    limit: int | None = None,
    max_workers: int = 4,
) -> list[Utterance]:
    """Read the asterisk English prompts (one speaker, about 24 min) as utterances.

    Parameters
    ----------
    sounds_dir : path
        Folder with the ``.g722`` files (subfolders included).
    transcripts : path
        ``core-sounds-en.txt.gz``.
    limit : int or None
        Keep only the first ``limit`` prompts in id order (for tests); None keeps all.
    max_workers : int
        ffmpeg processes run at once; decoding is process-bound, so a few threads suffice.

    Returns
    -------
    list of Utterance, sorted by utt_id (see :func:`asterisk_prompts` for which are kept).
    """
    prompts = asterisk_prompts(sounds_dir, transcripts)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit={limit} must be >= 1 or None")
        prompts = prompts[:limit]
    with ThreadPoolExecutor(max_workers=max(1, max_workers)) as pool:
        audios = list(pool.map(decode_g722, [p for _, p, _ in prompts]))
    return [
        Utterance(utt_id=uid, audio=audio, transcript=text, speaker=ASTERISK_SPEAKER,
                  source="asterisk-en", license=ASTERISK_LICENSE)
        for (uid, _, text), audio in zip(prompts, audios, strict=True)
    ]


def read_voice(voice: str, limit: int | None = None, max_workers: int = 4,
               only: Iterable[str] | None = None) -> list[Utterance]:
    """Read a Debian voice (:data:`DEBIAN_VOICES`) as utterances, sorted by ``utt_id``.

    ``only`` (utterance ids) decodes just those prompts.
    """
    v = DEBIAN_VOICES[voice]
    prompts = voice_prompts(v)
    if only is not None:
        wanted = set(only)
        prompts = [p for p in prompts if p[0] in wanted]
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit={limit} must be >= 1 or None")
        prompts = prompts[:limit]
    with ThreadPoolExecutor(max_workers=max(1, max_workers)) as pool:
        audios = list(pool.map(lambda p: decode_raw_codec(p, v.ext), [p for _, p, _ in prompts]))
    return [
        Utterance(utt_id=uid, audio=audio, transcript=text, speaker=v.speaker, source=v.source,
                  language=v.language, license=v.license)
        for (uid, _, text), audio in zip(prompts, audios, strict=True)
    ]


def _read_sphinx_transcription(path: Path) -> dict[str, str]:
    # Sphinx format: "<s> words </s> (fileid)", one utterance a line.
    out = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        m = re.fullmatch(r"\s*(.*?)\s*\(([^()]+)\)\s*", line)
        if m is None:
            raise ValueError(f"{path}:{lineno}: expected '<s> words </s> (fileid)', got {line!r}")
        words = m.group(1).replace("<s>", " ").replace("</s>", " ")
        out[m.group(2).strip()] = " ".join(words.split())
    return out


def _read_wav(path: Path) -> np.ndarray:
    with wave.open(str(path), "rb") as w:
        if (w.getnchannels(), w.getsampwidth(), w.getframerate()) != (1, 2, SAMPLE_RATE):
            raise ValueError(
                f"{path}: expected 16-bit mono {SAMPLE_RATE} Hz PCM, got {w.getnchannels()} ch, "
                f"{8 * w.getsampwidth()} bit, {w.getframerate()} Hz"
            )
        pcm = w.readframes(w.getnframes())
    return np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0


def _read_raw(path: Path) -> np.ndarray:
    # Sphinx .raw files are headerless 16-bit little-endian 16 kHz mono (checked: Whisper
    # tiny.en transcribes them correctly read this way).
    data = path.read_bytes()
    if len(data) % 2:
        raise ValueError(f"{path}: odd byte count {len(data)}, not 16-bit PCM")
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0


# Raw files whose transcript is not in a transcription file but is fixed by the test data itself:
# goforward.raw is the utterance of goforward.gram's "public <move> = go forward ten meters"
# (pocketsphinx's own FSG test expects that hypothesis); TIDIGITS names files by their digits
# (dhd.2934z = "2 9 3 4 z(ero)", as the .match files spell the man.ah.2934za utterance).
# numbers.raw and something.raw ship without a transcript and are left out.
_POCKETSPHINX_EXTRA = {
    "goforward.raw": ("goforward", "go forward ten meters", "pocketsphinx-goforward"),
    "tidigits/dhd.2934z.raw": (
        "tidigits-dhd.2934z", "two nine three four zero", "pocketsphinx-tidigits-dhd"),
}


def read_pocketsphinx(root: str | Path = POCKETSPHINX_ROOT) -> list[Utterance]:
    """Read the pocketsphinx test utterances that have transcripts (12 files, about 40 s).

    ``cards/*.wav`` (cards.transcription), ``librivox/*.wav`` (librivox/transcription, a LibriVox
    reading of *Sense and Sensibility*), plus ``goforward.raw`` and ``tidigits/dhd.2934z.raw``
    whose transcripts the test data fixes otherwise (see ``_POCKETSPHINX_EXTRA``). WAV files are
    16-bit mono 16 kHz PCM; ``.raw`` files are the same without a header.

    Returns
    -------
    list of Utterance, sorted by utt_id, e.g. ``"pocketsphinx/cards-001"``.
    """
    base = Path(root)
    if not base.is_dir():
        raise FileNotFoundError(
            f"pocketsphinx test data {base} not found; install the Debian package "
            "pocketsphinx-testdata or pass root=<.../pocketsphinx/test/data>"
        )
    utts = []
    for folder, trans_name, speaker in [
        ("cards", "cards.transcription", "pocketsphinx-cards"),
        ("librivox", "transcription", "pocketsphinx-librivox-austen"),
    ]:
        trans_path = base / folder / trans_name
        if not trans_path.exists():
            raise FileNotFoundError(f"pocketsphinx transcript file {trans_path} is missing")
        for fileid, text in _read_sphinx_transcription(trans_path).items():
            wav = base / folder / f"{fileid}.wav"
            if not wav.exists():
                raise FileNotFoundError(f"{trans_path} lists {fileid} but {wav} is missing")
            utts.append(Utterance(utt_id=f"pocketsphinx/{folder}-{fileid}", audio=_read_wav(wav),
                                  transcript=text, speaker=speaker, source="pocketsphinx",
                                  license=POCKETSPHINX_LICENSE))
    for rel, (name, text, speaker) in _POCKETSPHINX_EXTRA.items():
        path = base / rel
        if not path.exists():
            raise FileNotFoundError(f"pocketsphinx test file {path} is missing")
        utts.append(Utterance(utt_id=f"pocketsphinx/{name}", audio=_read_raw(path),
                              transcript=text, speaker=speaker, source="pocketsphinx",
                              license=POCKETSPHINX_LICENSE))
    return sorted(utts, key=lambda u: u.utt_id)


def read_source(source: str, limit: int | None = None) -> list[Utterance]:
    """Utterances of a named source at its default Debian location.

    Parameters
    ----------
    source : str
        ``"asterisk"`` (the English prompts, as ``"asterisk-en"``), a key of
        :data:`DEBIAN_VOICES` with transcripts (``"asterisk-fr"``, ...), or ``"pocketsphinx"``.
    limit : int or None
        First ``limit`` utterances in id order.
    """
    if source == "asterisk":
        return read_asterisk(limit=limit)
    if source == "pocketsphinx":
        utts = read_pocketsphinx()
        return utts if limit is None else utts[:limit]
    if source in DEBIAN_VOICES and DEBIAN_VOICES[source].transcripts is not None:
        return read_voice(source, limit=limit)
    raise ValueError(f"speech source {source!r} is unknown; choose one of {SPEECH_SOURCES}")


#: Sources :func:`read_source` reads (each utterance with its transcript).
def _said(text: str) -> str:
    return " ".join(text.lower().split())


def recording_twins(voices: Sequence[str], ids: set[str]) -> dict[str, str]:
    """Prompts of ``voices`` that repeat one of ``ids`` under another name (the same speaker
    saying the same transcript), each mapped to the id it repeats.

    Debian's voices ship some recordings twice (asterisk-en ``queue-seconds`` and ``seconds``: one
    recording in two encodings, so neither the id nor the bytes match; their mels correlate
    0.998): keeping an evaluated prompt out of a prior by id alone would let its twin in.
    Matching on the transcript also catches a few different takes of the same words: the safe
    side. Prompts without a transcript are never twins.
    """
    said: dict[tuple[str, str], str] = {}
    prompts: list[tuple[str, str, str]] = []
    for name in voices:
        speaker = DEBIAN_VOICES[name].speaker
        for uid, _, text in voice_prompts(name):
            key = (speaker, _said(text or ""))
            prompts.append((uid, *key))
            if uid in ids and key[1]:
                said.setdefault(key, uid)
    return {uid: said[(speaker, text)] for uid, speaker, text in prompts
            if text and (speaker, text) in said and uid not in ids}


SPEECH_SOURCES = ["asterisk", "pocketsphinx"] + [k for k, v in DEBIAN_VOICES.items()
                                                if v.transcripts is not None]


def total_duration(utterances: Iterable[Utterance]) -> float:
    """Sum of utterance lengths in seconds."""
    return float(sum(u.duration for u in utterances))
