"""`ssip vocode MEL_FILE OUT.wav`: render an ssip mel to 16 kHz audio."""

from __future__ import annotations

import argparse
from pathlib import Path

# Kept here (not imported from ssip.models.vocoder) so `ssip --help` does not import torch.
VOCODERS = ("griffinlim", "hifigan")


def read_mel(path: Path):
    """An ssip mel (80, T) float32 from .npy or from .safetensors (tensor "mel")."""
    import numpy as np

    if not path.is_file():
        raise FileNotFoundError(f"mel file {path} does not exist")
    if path.suffix == ".npy":
        mel = np.load(path, allow_pickle=False)
    elif path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        tensors = load_file(str(path))
        if "mel" not in tensors:
            raise KeyError(f"{path} has no tensor 'mel' (it has {sorted(tensors)})")
        mel = tensors["mel"]
    else:
        raise ValueError(f"{path}: mel files are .npy or .safetensors, not {path.suffix!r}")
    mel = np.asarray(mel, dtype=np.float32)
    if mel.ndim == 3 and mel.shape[0] == 1:
        mel = mel[0]
    if mel.ndim != 2 or mel.shape[0] != 80:
        raise ValueError(f"{path}: mel has shape {mel.shape}; expected (80, T) in ssip's mel space")
    return mel


def _vocode(args: argparse.Namespace) -> int:
    import numpy as np
    import soundfile as sf

    from ssip.mel import SAMPLE_RATE
    from ssip.models.vocoder import get_vocoder

    mel = read_mel(Path(args.mel_file))
    kwargs = {"device": args.device} if args.vocoder == "hifigan" else {}
    audio = get_vocoder(args.vocoder, **kwargs)(mel)[0].numpy()  # (T * 160,)
    peak = float(np.max(np.abs(audio), initial=0.0))
    if peak > 1.0:  # Griffin-Lim has no output bound; keep the file from clipping
        audio = audio / peak
    out = Path(args.out_wav)
    out.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(out), audio, SAMPLE_RATE, subtype="PCM_16")
    print(f"{out}: {len(audio) / SAMPLE_RATE:.2f} s at {SAMPLE_RATE} Hz ({args.vocoder})")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "vocode", help="render an ssip mel (.npy (80, T) or .safetensors 'mel') to a 16 kHz wav"
    )
    parser.add_argument("mel_file", metavar="MEL_FILE", help=".npy (80, T) or .safetensors")
    parser.add_argument("out_wav", metavar="OUT.wav", help="16-bit 16 kHz wav to write")
    parser.add_argument("--vocoder", choices=VOCODERS, default="hifigan",
                        help="hifigan (HiFi-GAN V1 universal via the fitted bridge, default) or "
                        "griffinlim")
    parser.add_argument("--device", default="cpu", help="torch device for HiFi-GAN")
    parser.set_defaults(func=_vocode)
