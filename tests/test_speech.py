"""Readers of the real speech shipped in Debian packages (asterisk prompts, pocketsphinx tests)."""

from __future__ import annotations

import gzip
import os

import numpy as np
import pytest
import soundfile as sf

from ssip.data import speech


def test_clean_transcript_removes_annotations():
    assert speech.clean_transcript("[ascending tones]") == ""
    assert speech.clean_transcript("(10 seconds of silence)") == ""
    assert speech.clean_transcript("at [@]") == "at"
    assert speech.clean_transcript('IAX (note: does not say "2")') == "IAX"
    assert speech.clean_transcript("Thank  you.\t") == "Thank you."


def test_transcript_parser(tmp_path):
    path = tmp_path / "sounds.txt.gz"
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.write("; a comment: with a colon\n\nbeep: [a beep]\n"
                 "dictate/both_help: press * to toggle: pause\n")
    texts = speech.read_asterisk_transcripts(path)
    # Only the first colon separates name and text; comment and blank lines are skipped.
    assert texts == {"beep": "[a beep]", "dictate/both_help": "press * to toggle: pause"}
    bad = tmp_path / "bad.txt"
    bad.write_text("no colon here\n")
    with pytest.raises(ValueError, match=r"bad.txt:1"):
        speech.read_asterisk_transcripts(bad)


def test_asterisk_prompt_list():
    prompts = speech.asterisk_prompts()
    ids = [p[0] for p in prompts]
    # 568 .g722 files; 5 tones/beeps/monkeys and 10 silence files carry no words.
    assert len(prompts) == 553
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert not any(n in ids for n in ("asterisk-en/beep", "asterisk-en/ascending-2tone",
                                      "asterisk-en/tt-monkeys", "asterisk-en/silence/1"))
    texts = dict((p[0], p[2]) for p in prompts)
    assert texts["asterisk-en/at-tone-time-exactly"].startswith("At the sound of the tone")
    assert texts["asterisk-en/dictate/both_help"].startswith("press * to toggle pause")
    assert texts["asterisk-en/letters/at"] == "at"


def test_read_asterisk_first_prompts():
    utts = speech.read_asterisk(limit=6)
    assert [u.utt_id for u in utts] == [p[0] for p in speech.asterisk_prompts()[:6]]
    by_id = {u.utt_id: u for u in utts}
    u = by_id["asterisk-en/agent-loginok"]
    assert u.transcript == "Agent logged in."
    assert (u.speaker, u.source, u.license) == ("asterisk:allison", "asterisk-en", "CC-BY-SA-3.0")
    assert u.speaker == speech.DEBIAN_VOICES["asterisk-en"].speaker
    for u in utts:
        name = u.utt_id.removeprefix("asterisk-en/")
        size = os.path.getsize(speech.ASTERISK_SOUNDS_DIR / f"{name}.g722")
        # G.722 at 64 kbit/s codes 16 kHz audio in 4 bits per sample: 2 samples per byte.
        assert len(u.audio) == 2 * size, u.utt_id
        assert u.audio.dtype == np.float32 and np.abs(u.audio).max() <= 1.0
        assert np.sqrt(np.mean(u.audio**2)) > 0.01, f"{u.utt_id} is silent"


def test_decode_errors_name_the_file(tmp_path, monkeypatch):
    junk = tmp_path / "missing.g722"
    with pytest.raises(RuntimeError, match=r"missing\.g722"):
        speech.decode_g722(junk)
    monkeypatch.setattr(speech.shutil, "which", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"ffmpeg is needed to decode .*missing\.g722"):
        speech.decode_g722(junk)


@pytest.mark.slow
def test_read_asterisk_all():
    utts = speech.read_asterisk()
    assert len(utts) == 553
    # 24.27 min of speech at 16 kHz (2 samples per G.722 byte, so exact up to rounding).
    assert speech.total_duration(utts) / 60 == pytest.approx(24.2728, abs=1e-3)
    assert min(np.sqrt(np.mean(u.audio**2)) for u in utts) > 1e-3


def test_read_pocketsphinx():
    utts = speech.read_pocketsphinx()
    again = speech.read_pocketsphinx()
    ids = [u.utt_id for u in utts]
    assert len(utts) == 12
    assert ids == sorted(ids) == [u.utt_id for u in again]
    assert all(np.array_equal(a.audio, b.audio) for a, b in zip(utts, again))
    by_id = {u.utt_id: u for u in utts}
    assert by_id["pocketsphinx/cards-001"].transcript == "ten of clubs"
    assert by_id["pocketsphinx/goforward"].transcript == "go forward ten meters"
    assert by_id["pocketsphinx/librivox-sense_and_sensibility_01_austen_64kb-0880"].transcript == (
        "he was not an ill disposed young man")
    for u in utts:
        assert u.audio.dtype == np.float32 and u.source == "pocketsphinx"
        assert np.sqrt(np.mean(u.audio**2)) > 0.005, f"{u.utt_id} is silent"
    # WAV files read the same through libsndfile; .raw files are 2 bytes per sample.
    ref, sr = sf.read(speech.POCKETSPHINX_ROOT / "cards" / "001.wav", dtype="float32")
    assert sr == 16000 and np.array_equal(ref, by_id["pocketsphinx/cards-001"].audio)
    raw_size = os.path.getsize(speech.POCKETSPHINX_ROOT / "goforward.raw")
    assert len(by_id["pocketsphinx/goforward"].audio) == raw_size // 2
    assert speech.total_duration(utts) == pytest.approx(39.5666, abs=1e-3)


def test_read_source_rejects_unknown():
    with pytest.raises(ValueError, match="'librispeech' is unknown"):
        speech.read_source("librispeech")
    assert len(speech.read_source("pocketsphinx", limit=3)) == 3


# Prompt counts of every Debian voice as packaged (asterisk-core-sounds 1.6.1, the prompt
# packages of Debian 12), after dropping tones, beeps and silence.
VOICE_COUNTS = {"asterisk-en": 553, "asterisk-es": 477, "asterisk-fr": 509, "asterisk-it": 580,
                "asterisk-ru": 556, "prompt-it-menardi": 540, "prompt-es-co": 285,
                "prompt-fr-armelle": 327}


def test_every_debian_voice_is_there_and_speech():
    assert set(speech.DEBIAN_VOICES) == set(VOICE_COUNTS)
    for name, v in speech.DEBIAN_VOICES.items():
        prompts = speech.voice_prompts(name)
        assert len(prompts) == VOICE_COUNTS[name], name
        assert all(uid.startswith(f"{name}/") for uid, _, _ in prompts)
        names = {uid.split("/", 1)[1] for uid, _, _ in prompts}
        assert not names & {"beep", "tt-monkeys"} and not any(n.startswith("silence/") for n in names)
        assert all(bool(text) == (v.transcripts is not None) for _, _, text in prompts)
    # The BOM at the top of the Italian transcripts is not part of a name.
    it = {uid: text for uid, _, text in speech.voice_prompts("asterisk-it")}
    assert it["asterisk-it/activated"] == "Attivato."
    assert not any("\ufeff" in uid for uid in it)


@pytest.mark.parametrize("name", ["asterisk-fr", "prompt-es-co"])
def test_read_voice_decodes_g722_and_gsm(name):
    v = speech.DEBIAN_VOICES[name]
    utts = speech.read_voice(name, limit=2)
    assert [u.utt_id for u in utts] == [p[0] for p in speech.voice_prompts(name)[:2]]
    for u, (_, path, _) in zip(utts, speech.voice_prompts(name)[:2], strict=True):
        assert u.speaker == v.speaker and u.language == v.language and u.license == v.license
        size = os.path.getsize(path)
        # G.722: 1 byte = 2 samples at 16 kHz; GSM 06.10: 33-byte frames of 160 samples at 8 kHz.
        seconds = size * 2 / 16000 if v.ext == "g722" else size / 33 * 0.02
        assert u.duration == pytest.approx(seconds, abs=0.03)
        assert 0.01 < float(np.sqrt(np.mean(u.audio ** 2))) < 0.5
    assert speech.read_source(name if v.transcripts else "asterisk-fr", limit=1)


def test_gsm_voice_carries_nothing_above_4khz():
    audio = np.concatenate([u.audio for u in speech.read_voice("prompt-fr-armelle", limit=3)])
    spec = np.abs(np.fft.rfft(audio)) ** 2
    freqs = np.fft.rfftfreq(len(audio), 1 / 16000)
    assert spec[freqs > 4200].sum() / spec.sum() < 1e-3
