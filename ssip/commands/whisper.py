"""`ssip whisper convert|transcribe`: shipped Whisper weights and greedy ASR."""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_MODEL = "tiny.en"
# Kept here (not imported from ssip.models.whisper) so `ssip --help` does not import torch.
SHIPPED = ("tiny.en", "base")


def _read_audio_16k(path: Path):
    import numpy as np
    import soundfile as sf
    from scipy.signal import resample_poly

    from ssip.mel import SAMPLE_RATE

    if not path.is_file():
        raise FileNotFoundError(f"audio file {path} does not exist")
    audio, rate = sf.read(str(path), dtype="float32", always_2d=True)  # (n_samples, channels)
    audio = audio.mean(axis=1)
    if rate != SAMPLE_RATE:
        g = np.gcd(int(rate), SAMPLE_RATE)
        audio = resample_poly(audio, SAMPLE_RATE // g, int(rate) // g).astype(np.float32)
    return audio


def _convert(args: argparse.Namespace) -> int:
    from ssip.models.whisper import convert_whisper

    print(convert_whisper(args.model, cache_dir=args.cache_dir))
    return 0


def _transcribe(args: argparse.Namespace) -> int:
    from ssip.models.whisper import load_whisper, transcribe

    clips = [_read_audio_16k(Path(f)) for f in args.files]
    model, tokenizer, spec = load_whisper(args.model, cache_dir=args.cache_dir)
    texts = transcribe(model, tokenizer, clips, spec, batch_size=args.batch_size)
    for f, text in zip(args.files, texts):
        print(f"{f}\t{text}" if len(args.files) > 1 else text)
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "whisper", help="pretrained Whisper from shipped weights: convert, transcribe"
    )
    sub = parser.add_subparsers(dest="whisper_command", required=True)

    def common(p: argparse.ArgumentParser, shipped_only: bool) -> None:
        if shipped_only:
            p.add_argument(
                "--model",
                default=DEFAULT_MODEL,
                choices=SHIPPED,
                help=f"shipped weights to convert (default {DEFAULT_MODEL})",
            )
        else:
            p.add_argument(
                "--model",
                default=DEFAULT_MODEL,
                help="tiny.en or base (shipped weights), or a local Hugging Face Whisper "
                f"directory (default {DEFAULT_MODEL})",
            )
        p.add_argument(
            "--cache-dir",
            default=None,
            help="ssip cache root (default $SSIP_CACHE or ~/.cache/ssip)",
        )

    p = sub.add_parser("convert", help="convert shipped weights once; print the cache directory")
    common(p, shipped_only=True)
    p.set_defaults(func=_convert)

    p = sub.add_parser("transcribe", help="greedy English ASR of audio files (<= 30 s each)")
    p.add_argument("files", nargs="+", metavar="FILE.wav", help="audio files (any rate; mono-ised)")
    common(p, shipped_only=False)
    p.add_argument("--batch-size", type=int, default=8, help="clips per batch (default 8)")
    p.set_defaults(func=_transcribe)
