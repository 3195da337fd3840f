"""`ssip evaluate`: metrics per trial against the ingest dataset, summary, report files."""

from __future__ import annotations

import math

import numpy as np
import pytest
import soundfile as sf

from ssip import metrics as M
from ssip import storage
from ssip.data.schema import decoded_table
from ssip.evaluate.report import EvaluateConfig, evaluate, read_decoded, summarize


@pytest.fixture(scope="module")
def ingest_root(tmp_path_factory):
    """Five 1.2 s trials of real speech (pocketsphinx librivox) with noise as 'neural'."""
    from tests.conftest import make_speech_ingest

    return make_speech_ingest(tmp_path_factory.mktemp("ingest"), n_trials=5, step_s=1.3,
                              duration_s=1.2)


def test_truth_scores_perfectly_and_noise_does_not(ingest_root, tmp_path):
    from ssip.data.dataset import load_trials

    refs = load_trials(str(ingest_root))
    rng = np.random.default_rng(1)
    rows = []
    for r in refs:
        rows.append({"subject": r["subject"], "trial_id": r["trial_id"], "method": "truth", "mel": r["mel"]})
        noise = r["mel"].mean() + r["mel"].std() * rng.standard_normal(r["mel"].shape).astype(np.float32)
        rows.append({"subject": r["subject"], "trial_id": r["trial_id"], "method": "noise", "mel": noise})
    dec = tmp_path / "decoded.parquet"
    storage.write_parquet(str(dec), decoded_table(rows))
    back = read_decoded(str(dec))
    np.testing.assert_array_equal(back[0]["mel"], rows[0]["mel"])

    out = tmp_path / "report"
    summary = evaluate(str(dec), str(ingest_root), str(out), EvaluateConfig(asr_model="none"))
    by = {(s["subject"], s["method"]): s for s in summary}
    truth, noise = by[("s1", "truth")], by[("s1", "noise")]
    assert truth["n_trials"] == len(refs) == 5
    assert truth["mel_pcc"] == pytest.approx(1.0, abs=1e-6)
    assert truth["mcd"] == pytest.approx(0.0, abs=1e-6)
    assert abs(noise["mel_pcc"]) < 0.1
    assert truth["stoi"] > 0.8 > 0.5 > noise["stoi"]
    # The pooled row equals the per-subject row when there is one subject.
    assert by[("*", "truth")]["mel_pcc"] == truth["mel_pcc"]
    report = (out / "report.md").read_text()
    assert "| s1 | truth |" in report and "figures/" in report and "wavs/" in report
    assert (out / "metrics.parquet").exists() and len(list((out / "figures").glob("*.png"))) == 3
    assert len(list((out / "wavs").rglob("*.wav"))) == 10


def test_summarize_means_and_nan_handling():
    rows = [{"subject": "a", "trial_id": "t1", "method": "m", "mel_pcc": 0.2, "stoi": math.nan},
            {"subject": "a", "trial_id": "t2", "method": "m", "mel_pcc": 0.4, "stoi": 0.5},
            {"subject": "b", "trial_id": "t1", "method": "m", "mel_pcc": 0.9, "stoi": 0.7}]
    s = {(x["subject"], x["method"]): x for x in summarize(rows)}
    assert s[("a", "m")]["mel_pcc"] == pytest.approx(0.3)
    assert s[("a", "m")]["stoi"] == pytest.approx(0.5)
    assert s[("*", "m")]["mel_pcc"] == pytest.approx(0.5)
    assert s[("*", "m")]["n_trials"] == 2  # distinct trial ids t1, t2
    # Single draws are summarised apart from the posterior mean (draw -1).
    drawn = [{"subject": "a", "trial_id": "t1", "method": "dps", "draw": k, "mel_pcc": v}
             for k, v in ((0, 0.1), (1, 0.3), (-1, 0.6))]
    s = {(x["subject"], x["method"]): x for x in summarize(drawn)}
    assert s[("a", "dps")]["mel_pcc"] == pytest.approx(0.6)
    assert s[("a", "dps (draw)")]["mel_pcc"] == pytest.approx(0.2)


def test_asr_on_truth_transcribes_real_speech(tmp_path):
    """The ASR column: the true mel of a real clip, vocoded, is transcribed near its transcript."""
    from ssip import mel
    from ssip.evaluate.report import score_trials
    from ssip.models.vocoder import get_vocoder
    from ssip.models.whisper import load_whisper, transcribe
    from tests.conftest import POCKETSPHINX

    lines = (POCKETSPHINX / "librivox" / "transcription").read_text().splitlines()
    text = lines[0].rsplit("(", 1)[0].replace("<s>", "").replace("</s>", "").strip()
    clip, _ = sf.read(sorted((POCKETSPHINX / "librivox").glob("*.wav"))[0], dtype="float32")
    audio = mel.normalize_loudness(clip)
    m = mel.log_mel(audio).numpy()
    model, tok, spec = load_whisper("tiny.en")
    rows, _ = score_trials([{"subject": "s", "trial_id": "t", "method": "truth", "mel": m}],
                           {("s", "t"): {"mel": m, "audio": audio[: m.shape[1] * 160], "transcript": text}},
                           EvaluateConfig(), get_vocoder("griffinlim"),
                           lambda a, lang=None: transcribe(model, tok, a, spec))
    assert rows[0]["wer"] < 0.35, (rows[0]["asr"], text)
    assert rows[0]["wer"] == M.wer(text, rows[0]["asr"])


def test_diverged_sample_is_scored_missing_with_reason(ingest_root):
    """A mel far above speech overflows the vocoder: that row gets NaN audio metrics and a
    reason, the other rows are scored as usual, and ASR runs only on finite audio."""
    from ssip.data.dataset import load_trials
    from ssip.evaluate.report import score_trials
    from ssip.models.vocoder import get_vocoder

    r = load_trials(str(ingest_root))[0]
    refs = {(r["subject"], r["trial_id"]): r}
    decoded = [{"subject": r["subject"], "trial_id": r["trial_id"], "method": "truth", "mel": r["mel"]},
               {"subject": r["subject"], "trial_id": r["trial_id"], "method": "diverged",
                "mel": np.full_like(r["mel"], 30.0)}]
    heard = []
    rows, audio = score_trials(decoded, refs, EvaluateConfig(), get_vocoder("griffinlim"),
                               lambda a, lang=None: heard.extend(a) or ["x"] * len(a))
    truth, bad = rows
    assert truth["stoi"] > 0.8 and truth["reason"] == ""
    assert math.isnan(bad["stoi"]) and math.isnan(bad["wer"])
    assert "not finite" in bad["reason"] and "30" in bad["reason"]
    assert len(heard) == 1 and len(audio) == 1


def test_each_draw_is_vocoded_and_heard_on_its_own(ingest_root, tmp_path):
    """Draws of one trial are distinct audio: each gets its own ASR text and WAV file."""
    from ssip.data.dataset import load_trials
    from ssip.evaluate.report import score_trials

    r = load_trials(str(ingest_root))[0]
    rows_in = [{"subject": r["subject"], "trial_id": r["trial_id"], "method": "dps", "draw": k,
                "mel": r["mel"] + 0.1 * k} for k in (0, 1, -1)]
    from ssip.models.vocoder import get_vocoder

    rows, audio = score_trials(rows_in, {(r["subject"], r["trial_id"]): r},
                               EvaluateConfig(), get_vocoder("griffinlim"),
                               lambda a, lang=None: [f"text {float(np.abs(x).mean()):.6f}" for x in a])
    assert len(audio) == 3
    assert len({row["asr"] for row in rows}) == 3
    dec = tmp_path / "d.parquet"
    from ssip.data.schema import decoded_rows_table

    storage.write_parquet(str(dec), decoded_rows_table(rows_in))
    evaluate(str(dec), str(ingest_root), str(tmp_path / "rep"), EvaluateConfig(asr_model="none"))
    wavs = sorted(p.name for p in (tmp_path / "rep" / "wavs").rglob("*.wav"))
    tid = r["trial_id"].split("/")[-1]
    assert wavs == sorted([f"{tid}.wav", f"{tid}-draw0.wav", f"{tid}-draw1.wav"])


def test_asr_language_per_subject(ingest_root):
    """A subject listed in asr_languages is heard in its language, the others in English."""
    from ssip.data.dataset import load_trials
    from ssip.evaluate.report import score_trials
    from ssip.models.vocoder import get_vocoder

    trials = load_trials(str(ingest_root))
    picks = [trials[0], {**trials[1], "subject": "other"}]  # two subjects
    subjects = sorted(p["subject"] for p in picks)
    refs = {(r["subject"], r["trial_id"]): r for r in picks}
    decoded = [{"subject": r["subject"], "trial_id": r["trial_id"], "method": "truth",
                "mel": r["mel"]} for r in picks]
    calls = []
    rows, _ = score_trials(decoded, refs, EvaluateConfig(asr_languages={subjects[1]: "fr"}),
                           get_vocoder("griffinlim"),
                           lambda a, lang=None: calls.append((len(a), lang)) or [str(lang)] * len(a))
    assert sorted(calls, key=str) == sorted([(1, None), (1, "fr")], key=str)
    assert {r["subject"]: r["asr"] for r in rows} == {subjects[0]: "None", subjects[1]: "fr"}
