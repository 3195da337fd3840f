"""The embedded default speech corpus of the prior: many voices and languages, from Debian only.

Nothing is downloaded: every source is a Debian package that scripts/system_deps.sh installs or
unpacks (docs/method.md, Assets that ship in packages), or speech synthesised here with flite and espeak-ng.

Sources (``DEFAULT_WEIGHTS``: each one's share of the prior's training windows, what ``ssip
pipeline`` gives ``prior.source_weights`` when the prior trains on this corpus and none are set)

=================== ========= ================================ ====== ======================
source              language  voice                            rate   weight (default)
=================== ========= ================================ ====== ======================
asterisk-en         en-US     Allison (female)                 16 kHz 0.24
asterisk-es         es-MX     Allison (the same woman)         16 kHz 0.18
asterisk-it         it-IT     Carlo (male)                     16 kHz 0.18
asterisk-ru         ru-RU     IvrvoiceRU (female)              16 kHz 0.18
asterisk-fr         fr-CA     June (female)                    16 kHz HELD OUT (below)
prompt-it-menardi   it-IT     Menardi prompts (female)         8 kHz  0.02
prompt-es-co        es-CO     Colombian Spanish prompts        8 kHz  0.02
prompt-fr-armelle   fr-FR     Armelle (female)                 8 kHz  0.02
pocketsphinx        en        pocketsphinx test speakers       16 kHz 0.05
flite               en        kal16, awb, rms, slt (synthetic) 16 kHz 0.06
espeak              5 langs.  espeak-ng voices (formant synth) 22 kHz 0.05
=================== ========= ================================ ====== ======================

The 8 kHz GSM prompts carry nothing above 4 kHz; they get small weights so that the prior does
not learn band-limited speech as the norm, and they are there for their voices. Natural 16 kHz
speech carries most of the weight and the synthetic voices little: at an equal budget of 6,000
windows, a prior trained on the natural 16 kHz voices alone reached a lower held-out loss and
Fréchet distance (0.339 / 97.7 on Allison's held-out speech) than one with flite at 0.20 and
espeak at 0.10 (0.351 / 98.9); bench/prior.py measures these weights.

No leakage
----------
``heldout_voices`` (default ``asterisk-fr``: June) are left out entirely, so a simulated subject
speaking with that voice measures cross-speaker generalisation. ``exclude`` (the ids of every
utterance spoken in a val or test trial, :func:`ssip.data.leakage.evaluated_utterances`) removes
those recordings, and the synthetic sources never speak their texts either.

The builder writes ``manifest.jsonl`` (the ``manifest`` layout of ``ssip speech ingest``) and the
synthesised and pocketsphinx audio as WAV beside it; ``ssip speech ingest`` turns it into shards
(``ssip speech default`` does both: :func:`ssip.distributed.speech_ingest.run_default_speech`).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ssip.config import ConfigError, check_range, field, to_dict
from ssip.data.speech import DEBIAN_VOICES, read_pocketsphinx, recording_twins, voice_prompts
from ssip.data.speech_corpus import SpeechIngestConfig

DEFAULT_WEIGHTS = {
    "asterisk-en": 0.24, "asterisk-es": 0.18, "asterisk-it": 0.18, "asterisk-ru": 0.18,
    "prompt-it-menardi": 0.02, "prompt-es-co": 0.02, "prompt-fr-armelle": 0.02,
    "pocketsphinx": 0.05, "flite": 0.06, "espeak": 0.05,
}
#: espeak-ng voice -> the asterisk voice whose transcripts give its texts (same language).
DEFAULT_ESPEAK = {
    "en-us+m3": "asterisk-en", "en-gb-x-rp+f2": "asterisk-en", "es-419+m1": "asterisk-es",
    "fr-fr+f3": "asterisk-fr", "it+m2": "asterisk-it", "ru+f1": "asterisk-ru",
}
FLITE_LICENSE = "flite voices: BSD-style (CMU / Edinburgh)"
ESPEAK_LICENSE = "espeak-ng output (engine GPL-3.0-or-later)"
POCKETSPHINX_LICENSE = "BSD-2-Clause"


@dataclass
class DefaultSpeechConfig:
    """What the default prior corpus holds (``ssip speech default``)."""

    voices: list[str] = field(default_factory=lambda: list(DEBIAN_VOICES),
                              help="Debian voices to include (ssip.data.speech.DEBIAN_VOICES)")
    heldout_voices: list[str] = field(default_factory=lambda: ["asterisk-fr"],
                                      help="voices never in the prior (cross-speaker test)")
    pocketsphinx: bool = field(True, help="include the pocketsphinx test utterances")
    flite_voices: list[str] = field(default_factory=lambda: ["kal16", "awb", "rms", "slt"],
                                    help="flite voices speaking English prompt texts")
    espeak_voices: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_ESPEAK),
                                          help="espeak-ng voice -> voice whose texts it speaks")
    synth_per_voice: int = field(60, help="utterances synthesised per flite / espeak voice")
    max_per_voice: int | None = field(None, help="first N prompts of each Debian voice "
                                                 "(None = all; for tests)")
    seed: int = field(0, help="seed of the synthesis text draws")
    ingest: SpeechIngestConfig = field(
        default_factory=lambda: SpeechIngestConfig(layout="manifest", source="ssip-default",
                                                   max_duration_s=120.0),
        help="how `ssip speech ingest` reads the manifest the builder writes")

    def __post_init__(self) -> None:
        for name in [*self.voices, *self.heldout_voices, *self.espeak_voices.values()]:
            if name not in DEBIAN_VOICES:
                raise ConfigError(f"speech voice {name!r} is unknown; choose from "
                                  f"{sorted(DEBIAN_VOICES)}")
        check_range("synth_per_voice", self.synth_per_voice, 0, 100_000)
        if self.max_per_voice is not None:
            check_range("max_per_voice", self.max_per_voice, 1, None)


def _write_wav(path: Path, audio: np.ndarray, rate: int = 16000) -> None:
    pcm = np.clip(np.round(audio * 32767.0), -32768, 32767).astype("<i2")
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())


def _synth(cmd: list[str], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(cmd, capture_output=True, check=False, timeout=120)
    if proc.returncode != 0 or not out.exists() or out.stat().st_size <= 44:
        raise RuntimeError(f"{cmd[0]} failed to write {out} (exit {proc.returncode}): "
                           f"{proc.stderr.decode(errors='replace').strip()[:300]}")


def espeak_language(voice: str) -> str:
    """BCP-47 tag of an espeak-ng voice name: ``"fr-fr+f3"`` -> ``"fr-FR"``, ``"it+m2"`` -> ``"it"``,
    ``"en-gb-x-rp+f2"`` -> ``"en-GB-x-rp"``, ``"es-419+m1"`` -> ``"es-419"``."""
    parts = voice.split("+", 1)[0].split("-")
    return "-".join([parts[0].lower()] + [p.upper() if len(p) == 2 and i == 0 else p
                                          for i, p in enumerate(parts[1:])])


def _texts(voice: str, exclude: set[str]) -> list[tuple[str, str]]:
    # (utt_id, text) of a voice's prompts, never an excluded one.
    return [(uid, text) for uid, _, text in voice_prompts(voice) if uid not in exclude and text]


def build_default_speech(out_dir: str | Path, cfg: DefaultSpeechConfig,
                         exclude: set[str] | frozenset[str] = frozenset()) -> dict:
    """Write the default corpus manifest (and its synthesised audio) under ``out_dir``.

    Parameters
    ----------
    out_dir : path
        Local folder; gets ``manifest.jsonl``, ``synth/``, ``pocketsphinx/`` and
        ``default_speech.json`` (config, per-source counts, sampling weights, exclusions).
    cfg : DefaultSpeechConfig
    exclude : set of str
        Utterance ids that must not enter the corpus (the evaluated trials' utterances); no
        synthetic voice speaks their texts either, and no twin recording of them
        (:func:`ssip.data.speech.recording_twins`) enters.

    Returns
    -------
    dict
        The contents of ``default_speech.json``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    twins = recording_twins(sorted({*cfg.voices, *cfg.espeak_voices.values()}), set(exclude))
    exclude = set(exclude) | set(twins)
    heldout = set(cfg.heldout_voices)
    # A held-out voice's speaker is absent everywhere (Allison speaks both English and Spanish).
    heldout_speakers = {DEBIAN_VOICES[h].speaker for h in heldout}
    rows: list[dict] = []
    skipped_excluded = 0
    for name in cfg.voices:
        v = DEBIAN_VOICES[name]
        if name in heldout or v.speaker in heldout_speakers:
            continue
        prompts = voice_prompts(v)
        if cfg.max_per_voice is not None:
            prompts = prompts[: cfg.max_per_voice]
        for uid, path, text in prompts:
            if uid in exclude:
                skipped_excluded += 1
                continue
            rows.append({"path": str(path), "utt_id": uid, "transcript": text,
                         "speaker": v.speaker, "language": v.language, "license": v.license,
                         "source": v.source})
    if cfg.pocketsphinx:
        for u in read_pocketsphinx():
            if u.utt_id in exclude:
                skipped_excluded += 1
                continue
            rel = Path("pocketsphinx") / f"{u.utt_id.split('/', 1)[1]}.wav"
            _write_wav(out / rel, u.audio)
            rows.append({"path": str(rel), "utt_id": u.utt_id, "transcript": u.transcript,
                         "speaker": f"pocketsphinx:{u.speaker}", "language": "en",
                         "license": POCKETSPHINX_LICENSE, "source": "pocketsphinx"})
    rng = np.random.default_rng(cfg.seed)
    if cfg.synth_per_voice and cfg.flite_voices:
        flite = shutil.which("flite")
        if flite is None:
            raise FileNotFoundError("flite is needed for the synthetic voices; install the Debian "
                                    "package flite or set flite_voices: []")
        pool = _texts("asterisk-en", exclude)
        for voice in cfg.flite_voices:
            for i in rng.permutation(len(pool))[: cfg.synth_per_voice]:
                uid, text = pool[i]
                rel = Path("synth") / "flite" / voice / f"{uid.replace('/', '__')}.wav"
                if not (out / rel).exists():
                    _synth([flite, "-voice", voice, "-t", text, "-o", str(out / rel)], out / rel)
                rows.append({"path": str(rel), "utt_id": f"flite/{voice}/{uid}",
                             "transcript": text, "speaker": f"flite:{voice}", "language": "en",
                             "license": FLITE_LICENSE, "source": "flite"})
    if cfg.synth_per_voice and cfg.espeak_voices:
        espeak = shutil.which("espeak-ng")
        if espeak is None:
            raise FileNotFoundError("espeak-ng is needed for the synthetic voices; install the "
                                    "Debian package espeak-ng or set espeak_voices: {}")
        for voice, text_voice in cfg.espeak_voices.items():
            pool = _texts(text_voice, exclude)
            lang = espeak_language(voice)
            for i in rng.permutation(len(pool))[: cfg.synth_per_voice]:
                uid, text = pool[i]
                rel = Path("synth") / "espeak" / voice / f"{uid.replace('/', '__')}.wav"
                if not (out / rel).exists():
                    _synth([espeak, "-v", voice, "-w", str(out / rel), text], out / rel)
                rows.append({"path": str(rel), "utt_id": f"espeak/{voice}/{uid}",
                             "transcript": text, "speaker": f"espeak:{voice}", "language": lang,
                             "license": ESPEAK_LICENSE, "source": "espeak"})
    ids = [r["utt_id"] for r in rows]
    if len(set(ids)) != len(ids):
        raise RuntimeError("default speech corpus: duplicate utterance ids")
    with open(out / "manifest.jsonl", "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["source"]] = counts.get(r["source"], 0) + 1
    info = {
        "config": to_dict(cfg),
        "n_utterances": len(rows),
        "per_source": counts,
        "recommended_weights": {k: w for k, w in DEFAULT_WEIGHTS.items() if k in counts},
        "heldout_voices": sorted(heldout),
        "heldout_speakers": sorted(heldout_speakers),
        "n_excluded_utterances": len(exclude),
        "n_excluded_as_same_recording": len(twins),
        "n_recordings_skipped_as_excluded": skipped_excluded,
    }
    (out / "default_speech.json").write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n")
    return info
