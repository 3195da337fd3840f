"""Speech ingest: every layout read from a fixture written in that layout, mel parity with a
direct reference, one quarantine row per class of bad file, resume, the card's numbers, S3 on a
moto server and the CLI; Ray runs on the session's 2-CPU head on 127.0.0.1.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from math import gcd
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from scipy.signal import resample_poly

from ssip import storage
from ssip.config import ConfigError, resolve
from ssip.data import schema
from ssip.data.speech import decode_g722
from ssip.data.speech_corpus import (
    SpeechIngestConfig,
    detect_layout,
    list_speech_files,
    load_speech,
    plan_groups,
    process_group,
    resolve_source,
)
from ssip.mel import MEL_VERSION, log_mel, normalize_loudness

FFMPEG = shutil.which("ffmpeg")
needs_ffmpeg = pytest.mark.skipif(FFMPEG is None, reason="ffmpeg (Debian package) is not installed")


# --- Fixture audio ------------------------------------------------------------------------------


def voiced(duration_s: float, rate: int, f0: float = 140.0, seed: int = 0, amp: float = 0.3) -> np.ndarray:
    """Voiced-like audio: a few harmonics of a gliding f0 under a smooth on/off envelope."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(round(duration_s * rate))) / rate
    f = f0 * (1 + 0.1 * np.sin(2 * np.pi * 1.5 * t))
    phase = 2 * np.pi * np.cumsum(f) / rate
    x = sum(rng.uniform(0.3, 1.0) / k * np.sin(k * phase) for k in range(1, 8))
    env = np.sin(np.pi * t / t[-1]) ** 2
    x = x * env
    return (amp * x / np.abs(x).max()).astype(np.float32)


def ffmpeg_encode(audio: np.ndarray, rate: int, out: Path, *args: str) -> Path:
    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
    subprocess.run([FFMPEG, "-nostdin", "-hide_banner", "-loglevel", "error", "-y", "-f", "s16le",
                    "-ar", str(rate), "-ac", "1", "-i", "-", *args, str(out)],
                   input=pcm, check=True, capture_output=True)
    return out


def reference_mel(audio: np.ndarray, rate: int) -> np.ndarray:
    """The mel as written independently of ssip.data.speech_corpus: resample, normalise, log-mel."""
    if rate != 16000:
        g = gcd(16000, rate)
        audio = resample_poly(audio.astype(np.float64), 16000 // g, rate // g).astype(np.float32)
    return log_mel(torch.from_numpy(normalize_loudness(audio))).numpy()


def by_id(rows):
    return {r["utt_id"]: r for r in rows}


def make_folder(root: Path) -> Path:
    """spk_a: 16 kHz wav + 22.05 kHz flac; spk_b: ogg; a notes.txt that is not audio."""
    (root / "spk_a").mkdir(parents=True)
    (root / "spk_b" / "deep").mkdir(parents=True)
    sf.write(root / "spk_a" / "one.wav", voiced(0.8, 16000, 120, 1), 16000)
    sf.write(root / "spk_a" / "two.flac", voiced(1.0, 22050, 150, 2), 22050)
    sf.write(root / "spk_b" / "deep" / "three.ogg", voiced(1.2, 16000, 200, 3), 16000)
    (root / "notes.txt").write_text("not audio")
    return root


# --- Layouts (no Ray) ---------------------------------------------------------------------------


def test_folder_layout_ids_speakers_and_mel_parity(tmp_path):
    src = make_folder(tmp_path / "mycorpus")
    assert detect_layout(str(src)) == "folder"
    cfg = resolve_source(str(src), SpeechIngestConfig(language="de", license="CC-BY-4.0"))
    assert (cfg.layout, cfg.source) == ("folder", "mycorpus")
    files = list_speech_files(str(src), cfg)
    assert [f.utt_id for f in files] == ["mycorpus/spk_a/one", "mycorpus/spk_a/two",
                                         "mycorpus/spk_b/deep/three"]
    rows, quarantine = process_group(files, cfg)
    assert quarantine == []
    rows = by_id(rows)
    assert rows["mycorpus/spk_a/one"]["speaker"] == "mycorpus:spk_a"
    assert rows["mycorpus/spk_b/deep/three"]["speaker"] == "mycorpus:deep"
    assert {r["language"] for r in rows.values()} == {"de"}
    assert {r["license"] for r in rows.values()} == {"CC-BY-4.0"}
    assert {r["transcript"] for r in rows.values()} == {""}
    for rel, rate in [("spk_a/one.wav", 16000), ("spk_a/two.flac", 22050), ("spk_b/deep/three.ogg", 16000)]:
        row = rows[f"mycorpus/{Path(rel).with_suffix('').as_posix()}"]
        audio, sr = sf.read(src / rel, dtype="float32")
        ref = reference_mel(audio, sr)
        assert row["source_rate"] == rate == sr
        assert row["mel"].dtype == np.float32 and row["mel"].shape == ref.shape == (80, row["n_frames"])
        np.testing.assert_allclose(row["mel"], ref, atol=1e-5)
        assert row["mel_version"] == MEL_VERSION
        assert row["source_file"] == str(src / rel)
    # 22.05 kHz -> 16 kHz: 1.0 s stays 1.0 s (16000 samples, 100 frames).
    two = rows["mycorpus/spk_a/two"]
    assert two["duration_s"] == pytest.approx(1.0, abs=1e-4) and two["n_frames"] == 100
    # The rows build a valid shard.
    assert schema.speech_table(list(rows.values())).num_rows == 3


def test_librispeech_layout(tmp_path):
    src = tmp_path / "dev-clean"
    texts = {("19", "198", "0000"): "NORTHANGER ABBEY", ("19", "198", "0001"): "THIS LITTLE WORK",
             ("26", "495", "0000"): "CHAPTER ONE"}
    for (spk, ch, utt), _ in texts.items():
        d = src / spk / ch
        d.mkdir(parents=True, exist_ok=True)
        sf.write(d / f"{spk}-{ch}-{utt}.flac", voiced(0.6, 16000, 100 + int(utt), int(spk)), 16000)
    for spk, ch in {(s, c) for s, c, _ in texts}:
        lines = [f"{s}-{c}-{u} {t}" for (s, c, u), t in sorted(texts.items()) if (s, c) == (spk, ch)]
        (src / spk / ch / f"{spk}-{ch}.trans.txt").write_text("\n".join(lines) + "\n")
    assert detect_layout(str(src)) == "librispeech"
    cfg = resolve_source(str(src), SpeechIngestConfig(source="libri"))
    files = list_speech_files(str(src), cfg)
    assert [f.utt_id for f in files] == ["libri/19/198/19-198-0000", "libri/19/198/19-198-0001",
                                         "libri/26/495/26-495-0000"]
    rows, quarantine = process_group(files, cfg)
    assert quarantine == []
    rows = by_id(rows)
    assert rows["libri/19/198/19-198-0001"]["transcript"] == "THIS LITTLE WORK"
    assert rows["libri/26/495/26-495-0000"]["transcript"] == "CHAPTER ONE"
    assert rows["libri/26/495/26-495-0000"]["speaker"] == "libri:26"
    assert {(r["language"], r["license"]) for r in rows.values()} == {("en", "CC-BY-4.0")}


def test_ljspeech_layout_resamples_22k(tmp_path):
    src = tmp_path / "LJSpeech-1.1"
    (src / "wavs").mkdir(parents=True)
    durations = {"LJ001-0001": 1.5, "LJ001-0002": 0.7}
    for i, (uid, d) in enumerate(durations.items()):
        sf.write(src / "wavs" / f"{uid}.wav", voiced(d, 22050, 180, i), 22050, subtype="PCM_16")
    (src / "metadata.csv").write_text(
        'LJ001-0001|Printing, in the only sense "with which|Printing, in the only sense "with which\n'
        "LJ001-0002|in being comparatively modern, 1.|in being comparatively modern, one.\n")
    assert detect_layout(str(src)) == "ljspeech"
    cfg = resolve_source(str(src), SpeechIngestConfig())
    rows, quarantine = process_group(list_speech_files(str(src), cfg), cfg)
    assert quarantine == []
    rows = by_id(rows)
    r2 = rows["LJSpeech-1.1/wavs/LJ001-0002"]
    assert r2["transcript"] == "in being comparatively modern, one."  # the normalised column
    assert rows["LJSpeech-1.1/wavs/LJ001-0001"]["transcript"] == 'Printing, in the only sense "with which'
    assert {(r["speaker"], r["language"], r["license"]) for r in rows.values()} == {
        ("LJSpeech-1.1:ljspeech", "en", "public-domain")}
    for uid, d in durations.items():
        r = rows[f"LJSpeech-1.1/wavs/{uid}"]
        assert r["source_rate"] == 22050
        assert r["duration_s"] == pytest.approx(d, abs=1e-4)
        assert r["n_frames"] == int(round(d * 16000)) // 160


@needs_ffmpeg
def test_commonvoice_layout_mp3_and_missing_clip(tmp_path):
    src = tmp_path / "cv-corpus-fr"
    (src / "clips").mkdir(parents=True)
    for name, seed in [("common_voice_fr_1.mp3", 1), ("common_voice_fr_2.mp3", 2)]:
        ffmpeg_encode(voiced(1.0, 48000, 160, seed), 48000, src / "clips" / name, "-c:a", "libmp3lame")
    header = ["client_id", "path", "sentence", "up_votes", "down_votes", "age", "gender", "locale"]
    rows = [["abc123", "common_voice_fr_1.mp3", 'Il a dit "bonjour".', "2", "0", "", "", "fr"],
            ["def456", "common_voice_fr_2.mp3", "Deuxième phrase.", "2", "0", "", "", "fr"],
            ["def456", "common_voice_fr_3.mp3", "Absente.", "2", "0", "", "", "fr"]]
    (src / "validated.tsv").write_text("\n".join("\t".join(r) for r in [header, *rows]) + "\n")
    (src / "train.tsv").write_text("\t".join(header) + "\n")
    assert detect_layout(str(src)) == "commonvoice"
    cfg = resolve_source(str(src), SpeechIngestConfig(source="cv"))
    out, quarantine = process_group(list_speech_files(str(src), cfg), cfg)
    out = by_id(out)
    assert set(out) == {"cv/clips/common_voice_fr_1", "cv/clips/common_voice_fr_2"}
    r1 = out["cv/clips/common_voice_fr_1"]
    assert (r1["speaker"], r1["language"], r1["license"], r1["source_rate"]) == ("cv:abc123", "fr", "CC0-1.0", 48000)
    assert r1["transcript"] == 'Il a dit "bonjour".'
    assert out["cv/clips/common_voice_fr_2"]["transcript"] == "Deuxième phrase."
    assert r1["duration_s"] == pytest.approx(1.0, abs=0.1)  # mp3 adds encoder padding
    [q] = quarantine
    assert q["reason_class"] == "manifest" and "common_voice_fr_3.mp3" in q["reason"]
    assert "validated.tsv:4" in q["reason"]
    with pytest.raises(FileNotFoundError, match="commonvoice_tsv"):
        list_speech_files(str(src), resolve_source(str(src), SpeechIngestConfig(commonvoice_tsv="other")))


@needs_ffmpeg
@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_manifest_layout_mixed_formats(tmp_path, kind):
    root = tmp_path / "prompts"
    (root / "audio").mkdir(parents=True)
    ffmpeg_encode(voiced(0.9, 16000, 210, 1), 16000, root / "audio" / "hello.g722", "-f", "g722")
    ffmpeg_encode(voiced(0.9, 8000, 110, 2), 8000, root / "audio" / "bye.gsm", "-ar", "8000", "-f", "gsm")
    outside = tmp_path / "elsewhere" / "synth.wav"
    outside.parent.mkdir()
    sf.write(outside, voiced(0.7, 16000, 170, 3), 16000)
    entries = [
        {"path": "audio/hello.g722", "transcript": "hello", "speaker": "allison",
         "utt_id": "asterisk-en/hello", "source": "asterisk-en", "license": "CC-BY-SA-3.0"},
        {"path": "audio/bye.gsm", "transcript": "good bye", "speaker": "allison", "language": "en-US"},
        {"path": str(outside), "transcript": "synthetic", "speaker": "espeak", "language": "fr",
         "source": "espeak"},
        {"path": "audio/missing.wav", "transcript": "gone", "speaker": "x"},
        {"path": "", "transcript": "no path", "speaker": "x", "utt_id": "p/nopath"},
    ]
    manifest = root / f"manifest.{kind}"
    if kind == "jsonl":
        manifest.write_text("\n".join(json.dumps(e) for e in entries) + "\n")
    else:
        cols = ["path", "transcript", "speaker", "utt_id", "language", "license", "source"]
        with manifest.open("w", newline="") as fh:
            w = csv.DictWriter(fh, cols)
            w.writeheader()
            w.writerows(entries)
    assert detect_layout(str(manifest)) == "manifest"
    assert detect_layout(str(root)) == "manifest"
    cfg = resolve_source(str(manifest), SpeechIngestConfig(language="en", license="CC-BY-4.0"))
    assert cfg.source == "prompts"
    files = list_speech_files(str(manifest), cfg)
    rows, quarantine = process_group(files, cfg)
    rows = by_id(rows)
    assert set(rows) == {"asterisk-en/hello", "prompts/audio/bye", "espeak/" + str(outside.with_suffix("")).lstrip("/")}
    hello, bye = rows["asterisk-en/hello"], rows["prompts/audio/bye"]
    assert (hello["speaker"], hello["source"], hello["license"], hello["language"], hello["source_rate"]) == (
        "asterisk-en:allison", "asterisk-en", "CC-BY-SA-3.0", "en", 16000)
    np.testing.assert_allclose(hello["mel"], reference_mel(decode_g722(root / "audio" / "hello.g722"), 16000),
                               atol=1e-5)
    assert (bye["speaker"], bye["language"], bye["license"], bye["transcript"], bye["source_rate"]) == (
        "prompts:allison", "en-US", "CC-BY-4.0", "good bye", 8000)
    assert bye["duration_s"] == pytest.approx(0.9, abs=0.03)
    synth = rows["espeak/" + str(outside.with_suffix("")).lstrip("/")]
    assert (synth["speaker"], synth["language"]) == ("espeak:espeak", "fr")
    q = {r["utt_id"]: r for r in quarantine}
    assert set(q) == {"prompts/audio/missing", "p/nopath"}
    assert {r["reason_class"] for r in q.values()} == {"manifest"}
    assert "missing.wav" in q["prompts/audio/missing"]["reason"]
    assert f"{manifest}:" in q["p/nopath"]["reason"] and "no 'path'" in q["p/nopath"]["reason"]


def test_duplicate_ids_and_stable_groups(tmp_path):
    from ssip.data.speech_corpus import SpeechFile

    cfg = SpeechIngestConfig(source="s", files_per_group=2, layout="folder")
    files = [SpeechFile(f"s/{n}", f"/x/{n}.wav", "s", "a") for n in "dcba"]
    groups = plan_groups(files, cfg)
    assert [g.name.rsplit("-", 1)[0] for g in groups] == ["s-00000", "s-00001"]
    assert [[f.utt_id for f in g.files] for g in groups] == [["s/a", "s/b"], ["s/c", "s/d"]]
    # Same input in another order -> same names; a file that sorts last changes only the last group.
    assert [g.name for g in plan_groups(files[::-1], cfg)] == [g.name for g in groups]
    more = plan_groups([*files, SpeechFile("s/e", "/x/e.wav", "s", "a")], cfg)
    assert [g.name for g in more[:2]] == [g.name for g in groups] and len(more) == 3
    # One inserted in the middle renames the groups from there on, never the earlier ones.
    mid = plan_groups([*files, SpeechFile("s/bb", "/x/bb.wav", "s", "a")], cfg)
    assert mid[0].name == groups[0].name and mid[1].name != groups[1].name
    # Another setting -> other keys, so nothing made under the old settings is reused.
    assert plan_groups(files, SpeechIngestConfig(source="s", files_per_group=2, layout="folder",
                                                 min_duration_s=0.5))[0].key != groups[0].key
    dup = plan_groups([*files, SpeechFile("s/a", "/y/a.wav", "s", "a")], cfg)
    flagged = [f for g in dup for f in g.files if f.problem]
    assert [f.path for f in flagged] == ["/y/a.wav"] and "duplicate utt_id" in flagged[0].problem


def make_bad_files(root: Path) -> dict[str, str]:
    """One file per audio quarantine class; returns utt name -> expected class."""
    rng = np.random.default_rng(7)
    root.mkdir(parents=True, exist_ok=True)
    (root / "corrupt.wav").write_bytes(rng.bytes(4000))
    sf.write(root / "zeros.wav", np.zeros(16000, np.float32), 16000)
    t = np.arange(16000) / 16000
    sf.write(root / "square.flac", np.sign(np.sin(2 * np.pi * 200 * t)).astype(np.float32), 16000)
    sf.write(root / "short.wav", voiced(0.1, 16000, 150, 4), 16000)
    sf.write(root / "long.wav", voiced(2.5, 16000, 150, 5), 16000)
    return {"corrupt": "unreadable", "zeros": "silent", "square": "clipped", "short": "too_short",
            "long": "too_long"}


def test_each_quarantine_class_and_good_files_survive(tmp_path):
    src = make_folder(tmp_path / "c")
    expected = make_bad_files(src / "bad")
    cfg = resolve_source(str(src), SpeechIngestConfig(max_duration_s=2.0))
    rows, quarantine = process_group(list_speech_files(str(src), cfg), cfg)
    assert sorted(by_id(rows)) == ["c/spk_a/one", "c/spk_a/two", "c/spk_b/deep/three"]
    got = {q["utt_id"].rsplit("/", 1)[1]: q for q in quarantine}
    assert {k: q["reason_class"] for k, q in got.items()} == expected
    for name, q in got.items():
        assert name in q["source_file"] and q["source_file"] in q["reason"], q
    assert "soundfile" in got["corrupt"]["reason"]  # the decoder's own message
    assert "dBFS" in got["zeros"]["reason"]
    assert schema.speech_quarantine_table(quarantine).num_rows == 5


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="layout='kaldi'"):
        SpeechIngestConfig(layout="kaldi")
    with pytest.raises(ConfigError, match="files_per_group"):
        resolve(SpeechIngestConfig, None, ["files_per_group=0"])
    with pytest.raises(ConfigError, match="max_duration_s"):
        SpeechIngestConfig(min_duration_s=5.0, max_duration_s=1.0)


def test_configs_file_matches_defaults():
    path = Path(__file__).resolve().parents[1] / "configs" / "speech-ingest.yaml"
    assert resolve(SpeechIngestConfig, path) == SpeechIngestConfig()


# --- Ray end to end -----------------------------------------------------------------------------


def _mtimes(out: Path) -> dict[str, float]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in out.rglob("*.parquet")}


@pytest.mark.ray
def test_ray_ingest_card_resume_and_new_file(tmp_path, ray_cluster):
    from ssip.distributed.speech_ingest import run_speech_ingest

    src = make_folder(tmp_path / "corpus")
    make_bad_files(src / "bad")
    out = tmp_path / "out"
    cfg = SpeechIngestConfig(files_per_group=3, max_duration_s=2.0, language="en")
    card = run_speech_ingest(str(src), str(out), cfg, address=ray_cluster)

    # The card's numbers are the fixture's: 3 good files of 0.8 + 1.0 + 1.2 s, 2 speakers.
    assert card["schema_version"] == schema.SPEECH_SCHEMA_VERSION and card["mel_version"] == MEL_VERSION
    assert (card["layout"], card["source"], card["n_utterances"], card["n_speakers"]) == ("folder", "corpus", 3, 2)
    assert card["hours"] == pytest.approx(3.0 / 3600, rel=1e-4)
    assert card["languages"] == {"en": {"hours": pytest.approx(3.0 / 3600, rel=1e-4), "utterances": 3}}
    assert card["speakers"]["corpus:spk_a"]["utterances"] == 2
    assert card["speakers"]["corpus:deep"]["hours"] == pytest.approx(1.2 / 3600, rel=1e-4)
    assert card["quarantine"] == {"unreadable": 1, "silent": 1, "clipped": 1, "too_short": 1,
                                  "too_long": 1, "manifest": 0}
    assert card["n_groups"] == 3 and card["n_groups_skipped"] == 0  # 8 files, 3 per group
    assert sum(s["rows"] for s in card["shards"]) == 3
    assert json.loads((out / "card.json").read_text())["n_utterances"] == 3
    for rel in [s["path"] for s in card["shards"]] + card["quarantine_files"]:
        assert (out / rel).exists()

    rows = load_speech(str(out))
    assert [r["utt_id"] for r in rows] == ["corpus/spk_a/one", "corpus/spk_a/two", "corpus/spk_b/deep/three"]
    audio, rate = sf.read(src / "spk_a" / "two.flac", dtype="float32")
    np.testing.assert_allclose(rows[1]["mel"], reference_mel(audio, rate), atol=1e-5)
    assert rows[1]["mel"].dtype == np.float32 and rows[1]["mel"].shape == (80, 100)
    assert set(load_speech(str(out), columns=["utt_id", "speaker"])[0]) == {"utt_id", "speaker"}

    # A re-run skips every group: nothing is rewritten.
    before = _mtimes(out)
    card2 = run_speech_ingest(str(src), str(out), cfg, address=ray_cluster)
    assert card2["n_groups_skipped"] == 3 and _mtimes(out) == before
    assert card2["n_utterances"] == 3 and card2["quarantine"] == card["quarantine"]

    # A new file that sorts last: only the last group is redone, the new file lands.
    sf.write(src / "zz_new.wav", voiced(0.5, 16000, 130, 9), 16000)
    card3 = run_speech_ingest(str(src), str(out), cfg, address=ray_cluster)
    assert card3["n_groups_skipped"] == 2 and card3["n_utterances"] == 4
    assert "corpus/zz_new" in {r["utt_id"] for r in load_speech(str(out), columns=["utt_id"])}
    after = _mtimes(out)
    kept = {k: v for k, v in before.items() if k in after}
    assert len(kept) >= 2 and all(after[k] == v for k, v in kept.items())
    listed = {s["path"] for s in card3["shards"]} | set(card3["quarantine_files"])
    assert set(after) == listed  # the replaced group's old files are gone

    # A run that stopped before its card: finished groups are found from their own files.
    (out / "card.json").unlink()
    card4 = run_speech_ingest(str(src), str(out), cfg, address=ray_cluster)
    assert card4["n_groups_skipped"] == 3 and card4["n_utterances"] == 4


def test_load_speech_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"card\.json"):
        load_speech(str(tmp_path))
    storage.write_json(str(tmp_path / "card.json"), {"schema_version": "ssip-speech-v0", "shards": []})
    with pytest.raises(ValueError, match="ssip-speech-v0"):
        load_speech(str(tmp_path))


@needs_ffmpeg
@pytest.mark.ray
def test_s3_round_trip(tmp_path, moto_s3, ray_cluster):
    import boto3

    from ssip.distributed.speech_ingest import run_speech_ingest

    src = make_folder(tmp_path / "s3corpus")
    # From S3, ffmpeg reads the bytes on stdin.
    ffmpeg_encode(voiced(0.9, 16000, 210, 1), 16000, src / "spk_b" / "four.g722", "-f", "g722")
    (src / "bad").mkdir()
    (src / "bad" / "corrupt.flac").write_bytes(b"\x00not audio" * 100)
    s3 = boto3.client("s3", endpoint_url=moto_s3, region_name="us-east-1")
    s3.create_bucket(Bucket="speech-in")
    s3.create_bucket(Bucket="speech-out")
    for p in src.rglob("*"):
        if p.is_file():
            s3.upload_file(str(p), "speech-in", f"corpora/s3corpus/{p.relative_to(src).as_posix()}")
    card = run_speech_ingest("s3://speech-in/corpora/s3corpus", "s3://speech-out/mels",
                             SpeechIngestConfig(files_per_group=2), address=ray_cluster)
    assert card["source"] == "s3corpus" and card["n_utterances"] == 4
    assert card["quarantine"]["unreadable"] == 1
    assert storage.exists("s3://speech-out/mels/card.json")
    rows = load_speech("s3://speech-out/mels")
    local, _ = process_group(list_speech_files(str(src), resolve_source(str(src), SpeechIngestConfig())),
                             resolve_source(str(src), SpeechIngestConfig()))
    local = by_id(local)
    assert [r["utt_id"] for r in rows] == sorted(local)
    for r in rows:
        assert r["source_file"].startswith("s3://speech-in/corpora/s3corpus/")
        np.testing.assert_allclose(r["mel"], local[r["utt_id"]]["mel"], atol=1e-6)
        assert r["speaker"] == local[r["utt_id"]]["speaker"]


@pytest.mark.ray
def test_cli_dry_run_then_ingest(tmp_path, ray_cluster, capsys):
    from ssip.cli import main

    src = make_folder(tmp_path / "clicorpus")
    out = tmp_path / "cliout"
    assert main(["speech", "ingest", str(src), str(out), "--set", "files_per_group=2", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "files_per_group: 2" in text and "layout folder" in text and "3 file(s) in 2 group(s)" in text
    assert not out.exists()
    assert main(["speech", "ingest", str(src), str(out), "--set", "files_per_group=2",
                 "--address", ray_cluster]) == 0
    text = capsys.readouterr().out
    assert "3 utterance(s), 2 speaker(s)" in text and str(out) in text and "quarantined 0" in text
    assert (out / "card.json").exists()


def test_jobs_entry_point_dry_run(tmp_path):
    src = make_folder(tmp_path / "jobcorpus")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, str(root / "jobs" / "speech_ingest.py"), str(src),
                           str(tmp_path / "o"), "--dry-run"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "layout folder" in proc.stdout
