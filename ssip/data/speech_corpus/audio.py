"""Audio decoding (soundfile, ffmpeg for telephony codecs and other containers), resampling to
16 kHz and the mel of a clip."""

from __future__ import annotations

import io
import logging
import math
import os
import re
import shutil
import subprocess

import numpy as np
from scipy.signal import resample_poly

from ssip import mel as melmod
from ssip import storage
from ssip.data.speech_corpus.config import (
    FFMPEG_TIMEOUT_S,
    RAW_CODECS,
    SOUNDFILE_EXTENSIONS,
    AudioDecodeError,
    file_ext,
)

log = logging.getLogger(__name__)

# --- Decoding -----------------------------------------------------------------------------------


def read_bytes(uri: str) -> bytes:
    try:
        return storage.read_bytes(uri)
    except OSError as e:
        if not storage.exists(uri):
            raise FileNotFoundError(f"{uri} does not exist") from e
        raise AudioDecodeError(f"{uri}: cannot read: {e}") from e


def _ffmpeg(uri: str, input_opts: tuple[str, ...]) -> tuple[np.ndarray, int]:
    exe = shutil.which("ffmpeg")
    if exe is None:
        raise AudioDecodeError(f"{uri}: ffmpeg is needed for {file_ext(uri) or 'this'} files; install "
                               "the Debian package ffmpeg")
    if storage.is_s3(uri):
        source, stdin = "pipe:0", read_bytes(uri)
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
    ext = file_ext(uri)
    if ext in SOUNDFILE_EXTENSIONS:
        import soundfile as sf

        data = read_bytes(uri)
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
