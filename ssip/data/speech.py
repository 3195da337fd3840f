"""Readers for the real speech that ships in Debian packages: asterisk prompts and pocketsphinx tests.

Two sources, both read-only, both 16 kHz mono (see DESIGN.md section 5):

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
import re
import shutil
import subprocess
import wave
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ssip.mel import SAMPLE_RATE

#: Debian package locations (documented defaults; override for other systems).
ASTERISK_SOUNDS_DIR = Path("/usr/share/asterisk/sounds/en_US_f_Allison")
ASTERISK_TRANSCRIPTS = Path("/usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz")
POCKETSPHINX_ROOT = Path("/usr/share/pocketsphinx/test/data")

ASTERISK_SPEAKER = "asterisk-en-allison"
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
        Speaker label, e.g. ``"asterisk-en-allison"``.
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
    with opener(path, "rt", encoding="utf-8") as fh:
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
) -> list[tuple[str, Path, str]]:
    """The speech prompts of the asterisk sounds, without decoding any audio.

    A prompt is kept when it has both a ``.g722`` file and a transcript line, and its transcript
    still has words once sound annotations in ``[...]`` or ``(...)`` are removed. That rule drops
    the tones and beeps (``beep: [this is a simple beep tone]``), ``tt-monkeys`` and the
    ``silence/N`` files (``(10 seconds of silence)``), and keeps prompts whose names merely
    mention a tone (``at-tone-time-exactly`` is speech). 553 of 568 files remain.

    Returns
    -------
    list of (utt_id, path, transcript), sorted by utt_id.
    """
    root = Path(sounds_dir)
    if not root.is_dir():
        raise FileNotFoundError(
            f"asterisk sounds directory {root} not found; install the Debian package "
            "asterisk-core-sounds-en-g722 or pass sounds_dir=<folder with the .g722 files>"
        )
    texts = read_asterisk_transcripts(transcripts)
    prompts = []
    for path in root.rglob("*.g722"):
        name = path.relative_to(root).with_suffix("").as_posix()
        text = clean_transcript(texts.get(name, ""))
        if text:
            prompts.append((f"asterisk-en/{name}", path, text))
    if not prompts:
        raise FileNotFoundError(f"no .g722 prompt in {root} has a transcript in {transcripts}")
    return sorted(prompts)


def decode_g722(path: str | Path) -> np.ndarray:
    """Decode a raw G.722 file to float32 16 kHz mono with ffmpeg (no shell).

    Returns
    -------
    ndarray, shape (n_samples,), float32
    """
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise FileNotFoundError(
            f"ffmpeg is needed to decode {path}; install the Debian package ffmpeg"
        )
    cmd = [ffmpeg, "-nostdin", "-hide_banner", "-loglevel", "error", "-f", "g722", "-i",
           str(path), "-f", "f32le", "-ac", "1", "-ar", str(SAMPLE_RATE), "-"]
    proc = subprocess.run(cmd, capture_output=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(
            f"ffmpeg failed to decode {path} (exit {proc.returncode}): "
            f"{proc.stderr.decode(errors='replace').strip()}"
        )
    audio = np.frombuffer(proc.stdout, dtype="<f4").astype(np.float32)
    if audio.size == 0:
        raise RuntimeError(f"ffmpeg decoded no samples from {path}; is it a G.722 file?")
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
    source : {"asterisk", "pocketsphinx"}
    limit : int or None
        First ``limit`` utterances in id order.
    """
    if source == "asterisk":
        return read_asterisk(limit=limit)
    if source == "pocketsphinx":
        utts = read_pocketsphinx()
        return utts if limit is None else utts[:limit]
    raise ValueError(f"speech source {source!r} is unknown; choose 'asterisk' or 'pocketsphinx'")


def total_duration(utterances: Iterable[Utterance]) -> float:
    """Sum of utterance lengths in seconds."""
    return float(sum(u.duration for u in utterances))
