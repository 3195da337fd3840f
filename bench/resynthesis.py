"""Resynthesis quality of ssip's vocoders on real speech, and the HiFi-GAN bridge refit.

For each clip: ground-truth ssip mel of the loudness-normalised audio -> Griffin-Lim and HiFi-GAN
audio; STOI and ESTOI against the original (normalised) audio; and, when ``ssip.models.whisper``
is available, ASR WER of the original audio and of both resyntheses (Whisper tiny.en, greedy).

Corpus: a fixed subset of the asterisk prompts (one female speaker) that the bridge was NOT
fitted on (odd positions in id order, every ``--stride``-th of them; 60 by default), plus the 12
pocketsphinx utterances (other speakers).

    python bench/resynthesis.py --threads 1        # table (about 25 min on a shared 2-core box)
    python bench/resynthesis.py --n-asterisk 20    # quicker
    python bench/resynthesis.py --refit-bridge     # refit ssip/assets/hifigan_bridge.json

The bridge is fitted on the asterisk prompts at EVEN positions (about 277, all of them by
default), so the evaluation subset is held out from it.

Measured (70 clips, 164 s: 58 held-out asterisk prompts (2 over 30 s left out) + 12
pocketsphinx; Whisper tiny.en greedy; closed-set chance 1/70 = 0.014; RTF on 1 thread):

    audio        STOI  ESTOI  STOI ast  STOI ps   WER    CER  closed-set   RTF
    original    1.000  1.000     1.000    1.000  0.083  0.047     0.964      -
    griffinlim  0.989  0.978     0.993    0.970  0.080  0.045     0.964   0.33
    hifigan     0.946  0.902     0.950    0.931  0.086  0.047     0.964   2.12
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ssip.data.speech import Utterance, asterisk_prompts, decode_g722, read_pocketsphinx
from ssip.mel import SAMPLE_RATE, log_mel, normalize_loudness
from ssip.metrics import cer, closed_set_identification, stoi, wer
from ssip.models.vocoder import (
    GriffinLimVocoder,
    HifiGanVocoder,
    bridge_errors,
    default_bridge_path,
    fit_hifigan_bridge,
)

log = logging.getLogger("bench.resynthesis")
MAX_SECONDS = 30.0


def asterisk_subset(parity: int, n: int | None) -> list[Utterance]:
    """Asterisk prompts at even (0) or odd (1) positions in id order, ``n`` of them spread evenly."""
    prompts = asterisk_prompts()[parity::2]
    if n is not None and n < len(prompts):
        idx = np.linspace(0, len(prompts) - 1, n).round().astype(int)
        prompts = [prompts[i] for i in idx]
    return [
        Utterance(utt_id=uid, audio=decode_g722(path), transcript=text, speaker="asterisk-en",
                  source="asterisk-en")
        for uid, path, text in prompts
    ]


def refit_bridge(n_fit: int | None, out: Path) -> None:
    t0 = time.perf_counter()
    fit_utts = asterisk_subset(0, n_fit)
    params = fit_hifigan_bridge([u.audio for u in fit_utts])
    params["fit_corpus"] = (
        f"asterisk-core-sounds-en-g722, {len(fit_utts)} prompts at even positions in id order"
    )
    held = read_pocketsphinx()
    err = bridge_errors(params, [u.audio for u in held])
    params["heldout_rms_error"] = [round(float(v), 5) for v in err]
    params["heldout_corpus"] = f"pocketsphinx-testdata, {len(held)} utterances"
    out.write_text(json.dumps(params, indent=1) + "\n")
    print(f"bridge fitted on {len(fit_utts)} clips in {time.perf_counter() - t0:.0f} s -> {out}")
    print(f"sigma_ms={params['sigma_ms']}  (overall RMS per sigma: {params['sigma_rms']})")
    print(f"slope: median {np.median(params['slope']):.3f} (analytic 2 ln 10 = 4.605); "
          f"offset: median {np.median(params['offset']):.3f}")
    print(f"per-band RMS error, fit set: median {np.median(params['rms_error']):.3f}, "
          f"max {np.max(params['rms_error']):.3f} nats; held-out pocketsphinx: median "
          f"{np.median(err):.3f}, max {np.max(err):.3f} nats")


def whisper_available() -> bool:
    """True when another part of ssip has provided ``load_whisper`` and ``transcribe``."""
    if importlib.util.find_spec("ssip.models.whisper") is None:
        return False
    import ssip.models.whisper as whisper

    return hasattr(whisper, "load_whisper") and hasattr(whisper, "transcribe")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-asterisk", type=int, default=60, help="held-out asterisk prompts")
    parser.add_argument("--no-pocketsphinx", action="store_true")
    parser.add_argument("--no-asr", action="store_true", help="skip the Whisper WER column")
    parser.add_argument("--asr-model", default="tiny.en")
    parser.add_argument("--refit-bridge", action="store_true",
                        help="refit the HiFi-GAN bridge and write it, then exit")
    parser.add_argument("--n-fit", type=int, default=None,
                        help="asterisk prompts for the bridge fit (default: all at even positions)")
    parser.add_argument("--bridge-out", type=Path, default=default_bridge_path())
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (1 is faster on a shared, loaded machine)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if args.refit_bridge:
        refit_bridge(args.n_fit, args.bridge_out)
        return 0

    utts = asterisk_subset(1, args.n_asterisk)
    if not args.no_pocketsphinx:
        utts += read_pocketsphinx()
    # Whisper hears at most 30 s at once; the few longer prompts are left out of every column.
    long = [u.utt_id for u in utts if u.duration > MAX_SECONDS]
    utts = [u for u in utts if u.duration <= MAX_SECONDS]
    if long:
        print(f"left out (longer than {MAX_SECONDS:.0f} s): {long}")
    refs = [normalize_loudness(u.audio) for u in utts]
    total_s = sum(len(r) for r in refs) / SAMPLE_RATE
    print(f"{len(utts)} clips, {total_s:.0f} s of speech "
          f"({sum(u.source == 'asterisk-en' for u in utts)} asterisk held-out, "
          f"{sum(u.source == 'pocketsphinx' for u in utts)} pocketsphinx)")

    vocoders = {"griffinlim": GriffinLimVocoder(), "hifigan": HifiGanVocoder()}
    renders: dict[str, list[np.ndarray]] = {"original": refs}
    seconds: dict[str, float] = {}
    for name, vocoder in vocoders.items():
        t0 = time.perf_counter()
        out = []
        for r in refs:
            mel = log_mel(torch.from_numpy(r))  # (80, T)
            audio = vocoder(mel)[0].numpy()
            out.append(audio)
        seconds[name] = time.perf_counter() - t0
        renders[name] = out

    rows: dict[str, dict[str, float]] = {}
    for name in ("original", *vocoders):
        s, e = [], []
        for ref, audio in zip(refs, renders[name]):
            n = len(audio)
            s.append(stoi(ref[:n], audio, extended=False))
            e.append(stoi(ref[:n], audio, extended=True))
        s_arr, e_arr = np.array(s), np.array(e)
        rows[name] = {"stoi": float(np.nanmean(s_arr)), "estoi": float(np.nanmean(e_arr)),
                      "n_nan": int(np.isnan(s_arr).sum())}
        for src in ("asterisk-en", "pocketsphinx"):
            sel = np.array([u.source == src for u in utts])
            if sel.any():
                rows[name][f"stoi_{src}"] = float(np.nanmean(s_arr[sel]))

    print(f"{'audio':<12}{'STOI':>7}{'ESTOI':>7}{'STOI ast':>10}{'STOI ps':>9}{'RTF':>7}")
    for name, row in rows.items():
        rtf = seconds.get(name, float("nan")) / total_s
        print(f"{name:<12}{row['stoi']:>7.3f}{row['estoi']:>7.3f}"
              f"{row.get('stoi_asterisk-en', float('nan')):>10.3f}"
              f"{row.get('stoi_pocketsphinx', float('nan')):>9.3f}{rtf:>7.2f}")
    n_nan = {k: v["n_nan"] for k, v in rows.items() if v["n_nan"]}
    if n_nan:
        print(f"clips with too little speech for STOI (NaN, left out): {n_nan}")
    print(f"RTF = vocoder seconds per second of audio on {torch.get_num_threads()} torch threads")

    if args.no_asr:
        return 0
    if not whisper_available():
        print("ssip.models.whisper (load_whisper, transcribe) is not available: no WER column")
        return 0
    from ssip.models.whisper import load_whisper, transcribe

    model, tokenizer, spec = load_whisper(args.asr_model)
    truth = [u.transcript for u in utts]
    print(f"\nASR: Whisper {args.asr_model}, greedy; closed set = nearest of the "
          f"{len(set(truth))} distinct transcripts (chance "
          f"{closed_set_identification(truth, truth)[1]:.3f})")
    print(f"{'audio':<12}{'WER':>7}{'CER':>7}{'closed-set':>12}")
    for name in rows:
        hyps = transcribe(model, tokenizer, renders[name], spec, inputs="audio")
        hits, _ = closed_set_identification(hyps, truth)
        print(f"{name:<12}{wer(truth, hyps):>7.3f}{cer(truth, hyps):>7.3f}{hits.mean():>12.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
