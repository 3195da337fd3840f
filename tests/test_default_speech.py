"""The default multi-speaker prior corpus: sources, held-out voice, exclusions, synthesis."""

from __future__ import annotations

import json
import wave
from types import SimpleNamespace

import pytest

from ssip.config import ConfigError
from ssip.data.default_speech import DefaultSpeechConfig, build_default_speech
from ssip.data.speech import DEBIAN_VOICES, voice_prompts


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("default_speech")
    en = [uid for uid, _, _ in voice_prompts("asterisk-en")]
    exclude = {en[0], en[2], "pocketsphinx/cards-001"}
    cfg = DefaultSpeechConfig(max_per_voice=4, synth_per_voice=3,
                              flite_voices=["slt", "rms"],
                              espeak_voices={"en-us+m3": "asterisk-en", "fr-fr+f3": "asterisk-fr"})
    info = build_default_speech(out, cfg, exclude=exclude)
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    return SimpleNamespace(out=out, info=info, rows=rows, exclude=exclude)


def test_sources_and_held_out_voice(built):
    out, info, rows = built.out, built.info, built.rows
    by_source = {}
    for r in rows:
        by_source.setdefault(r["source"], []).append(r)
    # Every Debian voice but the held-out one (June, asterisk-fr): 4 prompts each, English less
    # its 2 excluded; 12 pocketsphinx clips less 1; 3 per synthetic voice.
    expected = {v: 4 for v in DEBIAN_VOICES if v != "asterisk-fr"}
    expected.update({"asterisk-en": 2, "pocketsphinx": 11, "flite": 6, "espeak": 6})
    assert {s: len(v) for s, v in by_source.items()} == expected
    assert info["per_source"] == expected
    assert "asterisk:june" not in {r["speaker"] for r in rows}
    assert {r["language"] for r in rows if r["source"] == "espeak"} == {"en-US", "fr-FR"}
    assert info["heldout_speakers"] == ["asterisk:june"]
    assert len({r["utt_id"] for r in rows}) == len(rows)
    for r in rows:
        assert set(r) == {"path", "utt_id", "transcript", "speaker", "language", "license", "source"}
        path = out / r["path"] if not r["path"].startswith("/") else r["path"]
        assert open(path, "rb").read(4)


def test_exclusions_reach_synthetic_texts(built):
    rows, exclude = built.rows, built.exclude
    ids = {r["utt_id"] for r in rows}
    assert not ids & exclude
    texts_of = {r["utt_id"].split("/", 2)[2] for r in rows if r["source"] in ("flite", "espeak")}
    assert not texts_of & exclude
    en = dict((uid, t) for uid, _, t in voice_prompts("asterisk-en"))
    for r in rows:
        if r["source"] == "flite":
            assert r["transcript"] == en[r["utt_id"].split("/", 2)[2]]


def test_synthesised_audio_is_speech_length(built):
    out, rows = built.out, built.rows
    for r in rows:
        if r["source"] not in ("flite", "espeak"):
            continue
        with wave.open(str(out / r["path"])) as w:
            seconds = w.getnframes() / w.getframerate()
        # About 0.1-0.25 s per character for synthetic speech at default rates.
        assert 0.03 * len(r["transcript"]) < seconds < 0.3 * len(r["transcript"]) + 1.0, r


def test_config_errors():
    with pytest.raises(ConfigError, match="'asterisk-de' is unknown"):
        DefaultSpeechConfig(heldout_voices=["asterisk-de"])


def test_espeak_languages_are_the_voices_own():
    from ssip.data.default_speech import espeak_language

    assert [espeak_language(v) for v in ("fr-fr+f3", "it+m2", "en-gb-x-rp+f2", "es-419+m1")] == [
        "fr-FR", "it", "en-GB-x-rp", "es-419"]


def test_twin_recordings_of_excluded_prompts_stay_out(tmp_path):
    # asterisk-en ships "Seconds" twice (queue-seconds and seconds: one recording, two encodings;
    # mels correlate 0.998): excluding the evaluated one must exclude its twin.
    from ssip.data.speech import recording_twins

    assert recording_twins(["asterisk-en"], {"asterisk-en/queue-seconds"}) == {
        "asterisk-en/seconds": "asterisk-en/queue-seconds"}
    # Another speaker saying the same words is not the same recording.
    assert set(recording_twins(["asterisk-en", "asterisk-es"], {"asterisk-en/queue-seconds"})) \
        == {"asterisk-en/seconds"}
    cfg = DefaultSpeechConfig(voices=["asterisk-en"], pocketsphinx=False, flite_voices=[],
                              espeak_voices={}, synth_per_voice=0)
    info = build_default_speech(tmp_path, cfg, exclude={"asterisk-en/queue-seconds"})
    ids = {json.loads(line)["utt_id"] for line in (tmp_path / "manifest.jsonl").read_text().splitlines()}
    assert "asterisk-en/seconds" not in ids and "asterisk-en/queue-seconds" not in ids
    assert info["n_excluded_as_same_recording"] == 1
    assert len(ids) == 553 - 2
