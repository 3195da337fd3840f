"""`ssip pipeline`: the stage plan, resuming, and the whole chain on the tiny config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ssip import storage
from ssip.config import resolve
from ssip.pipeline import PipelineConfig, plan, run

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


class FakeSsip:
    """Stands in for ssip.cli.main in the resume tests: records argv and writes each stage's
    finished-marker (the ingest manifest lists two subjects)."""

    def __init__(self):
        self.calls: list[list[str]] = []

    def __call__(self, argv: list[str]) -> int:
        self.calls.append(argv)
        cmd = argv[0] if argv[0] not in ("corpus", "train", "speech") else argv[1]
        if argv[:2] == ["prior", "check"]:
            storage.write_json(argv[argv.index("--out") + 1], {})
        elif cmd == "default":
            storage.write_json(storage.join(argv[2], "card.json"), {})
        elif cmd == "build":
            storage.write_json(storage.join(argv[2], "corpus.json"), {})
        elif cmd == "ingest":
            storage.write_json(storage.join(argv[2], "manifest.json"), {"recordings": [
                {"subject": "s2", "status": "ok"}, {"subject": "s1", "status": "ok"},
                {"subject": "", "status": "failed", "error": "x.nwb: unreadable"}]})
        elif cmd in ("prior", "likelihood", "baseline"):
            storage.write_json(storage.join(argv[3], "manifest.json"), {})
        elif cmd == "sweep":
            storage.write_json(storage.join(argv[argv.index("--presets") + 1],
                                            argv[argv.index("--name") + 1] + ".json"), {})
        elif cmd == "decode":
            storage.write_bytes(argv[argv.index("--out") + 1], b"x")
        elif cmd == "evaluate":
            storage.write_bytes(storage.join(argv[3], "report.md"), b"x")
        return 0

    def names(self) -> list[str]:
        return [" ".join(a[:2]) if a[0] in ("corpus", "train", "speech", "prior") else a[0]
                for a in self.calls]


def test_plan_lists_the_commands_a_user_would_type(tmp_path):
    cfg = PipelineConfig(prior_data="default")
    steps = plan(cfg, str(tmp_path), ["s1", "s2"])
    assert [s.name for s in steps] == [
        "corpus", "ingest", "speech", "prior", "likelihood s1", "baseline linear s1", "baseline nn s1",
        "likelihood s2", "baseline linear s2", "baseline nn s2", "calibrate", "decode", "evaluate"]
    decode = steps[-2].argv
    assert decode[:2] == ["decode", str(tmp_path / "ingest")]
    assert decode[decode.index("--baselines-root") + 1] == str(tmp_path / "baselines")
    assert [decode[i + 1] for i, a in enumerate(decode) if a == "--subject"] == ["s1", "s2"]
    # Calibration by default: every subject's guidance swept on its val trials, the test split
    # decoded with the winners, the report told which.
    sweep = steps[-3].argv
    assert sweep[:2] == ["sweep", str(tmp_path / "ingest")]
    assert [sweep[i + 1] for i, a in enumerate(sweep) if a == "--subject"] == ["s1", "s2"]
    assert sweep[sweep.index("--decode-config") + 1] == decode[decode.index("--config") + 1]
    assert decode[decode.index("--preset") + 1] == sweep[sweep.index("--name") + 1] == "calibrated"
    assert decode[decode.index("--presets") + 1] == sweep[sweep.index("--presets") + 1]
    assert steps[-1].argv[steps[-1].argv.index("--preset-file") + 1] == str(
        tmp_path / "presets" / "calibrated.json")
    from ssip.presets import SweepConfig
    assert resolve(SweepConfig, sweep[sweep.index("--config") + 1]) == SweepConfig(
        **{**cfg.sweep.__dict__, "storage_path": str(tmp_path / "tune")})  # Tune's runs in ROOT
    cfg.calibrate = False
    steps = plan(cfg, str(tmp_path), ["s1"])
    assert "calibrate" not in [s.name for s in steps] and "--preset" not in steps[-2].argv
    assert "--preset-file" not in steps[-1].argv
    cfg.calibrate = True
    # The prior trains on the default speech corpus, built after ingest with its val/test
    # utterances kept out, with the default corpus's source weights.
    speech = steps[2].argv
    assert speech[:3] == ["speech", "default", str(tmp_path / "speech")]
    assert speech[speech.index("--exclude-from") + 1] == str(tmp_path / "ingest")
    assert steps[3].argv[:3] == ["train", "prior", str(tmp_path / "speech")]
    assert steps[-1].argv[steps[-1].argv.index("--prior") + 1] == str(tmp_path / "prior")
    # Each stage's config is written where --config points, and reads back equal.
    prior_cfg = steps[3].argv[steps[3].argv.index("--config") + 1]
    from ssip.data.default_speech import DEFAULT_WEIGHTS
    from ssip.models.prior import PriorConfig
    assert resolve(PriorConfig, prior_cfg).source_weights == DEFAULT_WEIGHTS
    cfg.prior.source_weights = {"asterisk-en": 1.0}
    steps = plan(cfg, str(tmp_path), ["s1", "s2"])
    assert resolve(PriorConfig, steps[3].argv[steps[3].argv.index("--config") + 1]) == cfg.prior
    # The train-split trials instead: no speech stage.
    cfg.prior_data = "trials"
    steps = plan(cfg, str(tmp_path), ["s1"])
    assert [s.name for s in steps][:3] == ["corpus", "ingest", "prior"]
    assert steps[2].argv[:3] == ["train", "prior", str(tmp_path / "ingest")]
    # Speech corpora of one's own, pooled.
    cfg.prior_data, cfg.prior_corpora = "corpora", ["s3://b/librispeech", "/data/cv-fr"]
    steps = plan(cfg, str(tmp_path), ["s1"])
    assert steps[2].argv[:5] == ["train", "prior", "s3://b/librispeech", "/data/cv-fr",
                                 str(tmp_path / "prior")]
    with pytest.raises(ValueError, match="prior_corpora"):
        PipelineConfig(prior_data="default", prior_corpora=["/x"])
    cfg.prior_data, cfg.prior_corpora = "default", []
    cfg.prior_workers = 2  # the prior on Ray Train
    steps = plan(cfg, str(tmp_path), ["s1"])
    argv = steps[3].argv
    assert argv[argv.index("--workers") + 1] == "2"
    cfg.prior_workers = 0
    # The likelihoods on Ray Train (a run per subject named by its step key, resumable) and the
    # decode on a Ray Data actor pool (same bytes, so the same key: no re-run).
    keys = {s.name: s.key for s in plan(cfg, str(tmp_path), ["s1"])}
    cfg.likelihood_workers, cfg.decode_actors = 2, 3
    steps = {s.name: s for s in plan(cfg, str(tmp_path), ["s1"])}
    lik = steps["likelihood s1"].argv
    assert lik[lik.index("--workers") + 1] == "2"
    assert lik[lik.index("--name") + 1] == f"likelihood-s1-{steps['likelihood s1'].key}"
    assert lik[lik.index("--storage-path") + 1] == str(tmp_path / "train-runs")
    assert steps["likelihood s1"].key != keys["likelihood s1"]
    dec = steps["decode"].argv
    assert dec[dec.index("--actors") + 1] == "3"
    cfg.likelihood_workers = 0
    assert {s.name: s.key for s in plan(cfg, str(tmp_path), ["s1"])}["decode"] == keys["decode"]
    cfg.decode_actors = 0
    # No baselines asked for: no baseline steps and no --baselines-root.
    cfg.decode.methods = ["dps", "prior"]
    steps = plan(cfg, str(tmp_path), ["s1"])
    assert [s.name for s in steps][-4:] == ["likelihood s1", "calibrate", "decode", "evaluate"]
    assert "--baselines-root" not in steps[-2].argv + steps[-3].argv
    # A recording folder replaces the simulated corpus.
    cfg.source = "/data/bids"
    assert plan(cfg, str(tmp_path))[0].argv[:2] == ["ingest", "/data/bids"]


def test_the_shipped_prior_is_the_default_and_checked_not_trained(tmp_path, monkeypatch):
    """By default no prior is trained: stage prior checks the shipped prior's corpus against the
    val/test trials (`ssip prior check`), decode and evaluate read 'shipped', and a new shipped
    prior (other weights) re-runs what reads it."""
    from ssip.models.prior import SHIPPED

    cfg = PipelineConfig()
    steps = plan(cfg, str(tmp_path), ["s1"])
    assert [s.name for s in steps] == ["corpus", "ingest", "prior", "likelihood s1",
                                       "baseline linear s1", "baseline nn s1", "calibrate",
                                       "decode", "evaluate"]
    assert steps[2].argv == ["prior", "check", str(tmp_path / "ingest"), "--prior", SHIPPED,
                             "--subject", "s1", "--out", str(tmp_path / "prior-check.json")]
    for step in steps[-3:]:
        assert step.argv[step.argv.index("--prior") + 1] == SHIPPED
    fake = FakeSsip()
    root = str(tmp_path / "run")
    run(cfg, root, main=fake, echo=lambda *a, **k: None)
    assert fake.names()[:3] == ["corpus build", "ingest", "prior check"]
    assert "train prior" not in fake.names() and "speech default" not in fake.names()
    fake.calls.clear()
    monkeypatch.setattr("ssip.pipeline.shipped_key", lambda: "other-weights")
    run(cfg, root, main=fake, echo=lambda *a, **k: None)
    assert fake.names() == ["prior check", "sweep", "decode", "evaluate"]


def test_nn_evidence_trains_the_nn_baseline_even_when_it_is_not_a_method(tmp_path):
    cfg = resolve(PipelineConfig, None, ["decode.methods=[dps]", "decode.sampler=daps",
                                         "decode.evidence=[encoding, nn]",
                                         "decode.evidence_weights=[0.5, 0.5]"])
    steps = plan(cfg, str(tmp_path), ["s1"])
    assert [s.name for s in steps][-5:] == ["likelihood s1", "baseline nn s1", "calibrate",
                                            "decode", "evaluate"]
    assert "--baselines-root" in steps[-2].argv and "--baselines-root" in steps[-3].argv


def test_resume_skips_finished_stages_and_reruns_what_changed(tmp_path):
    root = str(tmp_path / "run")
    cfg = PipelineConfig(prior_data="default")
    fake = FakeSsip()
    run(cfg, root, main=fake, echo=lambda *a, **k: None)
    assert fake.names() == ["corpus build", "ingest", "speech default", "train prior",
                            "train likelihood", "train baseline", "train baseline",
                            "train likelihood", "train baseline", "train baseline", "sweep",
                            "decode", "evaluate"]
    # Subjects come from the ingest manifest (sorted, failed files left out).
    assert [a[a.index("--subject") + 1] for a in fake.calls if a[1:2] == ["likelihood"]] == ["s1", "s2"]
    state = json.loads((tmp_path / "run" / "pipeline.json").read_text())
    assert len(state["done"]) == 13

    fake.calls.clear()
    run(cfg, root, main=fake, echo=lambda *a, **k: None)
    assert fake.calls == []  # everything finished with the same configs

    cfg.decode.n_draws = 3  # only decode and what follows it (the sweep sets its own draws)
    run(cfg, root, main=fake, echo=lambda *a, **k: None)
    assert fake.names() == ["decode", "evaluate"]

    fake.calls.clear()
    cfg.sweep.values = [1.0, 8.0]  # a new calibration, then decode
    run(cfg, root, main=fake, echo=lambda *a, **k: None)
    assert fake.names() == ["sweep", "decode", "evaluate"]

    fake.calls.clear()
    cfg.prior.total_samples = 1000  # the prior and what reads it, not the per-subject models
    run(cfg, root, main=fake, echo=lambda *a, **k: None)
    assert fake.names() == ["train prior", "sweep", "decode", "evaluate"]

    fake.calls.clear()
    run(cfg, root, force=["prior"], main=fake, echo=lambda *a, **k: None)  # same key, new output
    assert fake.names() == ["train prior", "sweep", "decode", "evaluate"]

    fake.calls.clear()
    cfg.likelihood.epochs = 7  # both subjects' likelihoods, then decode
    run(cfg, root, main=fake, echo=lambda *a, **k: None)
    assert fake.names() == ["train likelihood", "train likelihood", "sweep", "decode", "evaluate"]

    fake.calls.clear()
    (tmp_path / "run" / "report" / "report.md").unlink()  # a lost output is made again
    run(cfg, root, main=fake, echo=lambda *a, **k: None)
    assert fake.names() == ["evaluate"]

    fake.calls.clear()
    run(cfg, root, force=["ingest"], main=fake, echo=lambda *a, **k: None)
    assert fake.names()[:3] == ["ingest", "speech default", "train prior"]
    assert len(fake.calls) == 12

    fake.calls.clear()
    cfg.speech.synth_per_voice = 5  # a new prior corpus: the speech stage, the prior, decode
    run(cfg, root, main=fake, echo=lambda *a, **k: None)
    assert fake.names() == ["speech default", "train prior", "sweep", "decode", "evaluate"]


def test_failures_name_the_stage(tmp_path):
    with pytest.raises(RuntimeError, match=r"stage 'prior' exited with 3: ssip train prior"):
        run(PipelineConfig(prior_data="default"), str(tmp_path), echo=lambda *a, **k: None,
            main=lambda argv: 3 if argv[:2] == ["train", "prior"] else FakeSsip()(argv))
    with pytest.raises(ValueError, match="force"):
        run(PipelineConfig(), str(tmp_path), force=["vocode"], main=FakeSsip())
    cfg = PipelineConfig(subjects=["s9"])
    with pytest.raises(ValueError, match=r"subjects=\['s9'\]"):
        run(cfg, str(tmp_path / "b"), main=FakeSsip(), echo=lambda *a, **k: None)


def test_ingest_that_landed_nothing_stops_the_pipeline_with_the_reasons(tmp_path):
    """Ingest's exit 3 (some files failed) goes on with the others; exit 4 (nothing landed) stops
    the pipeline there, naming each file's reason."""
    fake, echoed = FakeSsip(), []

    def some_failed(argv):
        return fake(argv) or (3 if argv[0] == "ingest" else 0)

    run(PipelineConfig(), str(tmp_path / "a"), main=some_failed, echo=lambda *a, **k: echoed.append(a[0]))
    assert "decode" in fake.names() and any("x.nwb: unreadable" in e for e in echoed)

    def nothing(argv):
        if argv[0] == "ingest":
            storage.write_json(storage.join(argv[2], "manifest.json"), {"recordings": [
                {"subject": "", "status": "failed", "error": "a.h5 (subject a, field 'TestNum_cum'): bad"},
                {"subject": "", "status": "failed", "error": "b.h5 (subject b, field 'file'): unreadable"}]})
            return 4
        return fake(argv)

    fake.calls.clear()
    with pytest.raises(RuntimeError, match=r"(?s)'ingest' landed no trial \(2 file\(s\) failed\).*"
                                           r"field 'TestNum_cum'.*field 'file'"):
        run(PipelineConfig(), str(tmp_path / "b"), main=nothing, echo=lambda *a, **k: None)
    assert "prior check" not in fake.names()


def test_tiny_pipeline_end_to_end(tmp_path, ray_cluster, monkeypatch):
    """corpus -> ingest (on the test's Ray cluster) -> prior, likelihoods, baselines -> decode
    -> evaluate, for real, at smoke-test size: every method of every subject reaches the report."""
    from ssip.cli import main

    monkeypatch.setenv("RAY_ADDRESS", ray_cluster)

    root = tmp_path / "tiny"
    assert main(["pipeline", str(root), "--config", str(CONFIGS / "pipeline-tiny.yaml")]) == 0
    import csv

    with open(root / "report" / "summary.csv") as f:
        summary = {(r["subject"], r["method"]): r for r in csv.DictReader(f)}
    cfg = resolve(PipelineConfig, CONFIGS / "pipeline-tiny.yaml")
    for subject in ("sim01", "sim02", "*"):
        for method in cfg.decode.methods:
            assert (subject, method) in summary, (subject, method)
    # The regression baseline is fitted on real (if few) trials: it must find the speech.
    assert float(summary[("*", "linear")]["mel_pcc"]) > 0.2
    from ssip.evaluate.report import read_decoded

    rows = read_decoded(str(root / "decoded.parquet"))
    n_test = len({(r["subject"], r["trial_id"]) for r in rows})
    per_trial = 3 * (cfg.decode.n_draws + 1) + 2  # 3 sampled methods (draws + mean), 2 baselines
    assert len(rows) == n_test * per_trial
    # The prior corpus holds none of the val/test trials' clips, checked by id and content,
    # and the report says so.
    leak = json.loads((root / "speech" / "leakage.json").read_text())
    assert leak["ok"] and leak["n_leaks"] == 0 and leak["n_evaluated"] > 0
    from ssip.data.leakage import evaluated_utterances
    from ssip.data.speech_corpus import load_speech

    held = evaluated_utterances(str(root / "ingest"))
    ids = {r["utt_id"] for r in load_speech(str(root / "speech"), columns=["utt_id"])}
    assert held and all(i.startswith("pocketsphinx/") for i in held)
    assert not held & ids and any(i.startswith("pocketsphinx/") for i in ids)
    report = (root / "report" / "report.md").read_text()
    assert "no evaluated trial's audio is in it" in report
    # Each subject was decoded with the guidance its val trials chose, and the report says so.
    preset = json.loads((root / "presets" / "calibrated.json").read_text())
    assert sorted(preset["subjects"]) == ["sim01", "sim02"]
    from ssip.data.dataset import load_trials
    val = {(t["subject"], t["trial_id"]) for t in load_trials(str(root / "ingest"), split="val",
                                                               columns=["subject", "trial_id"])}
    for s, e in preset["subjects"].items():
        assert e["overrides"]["weight"] in (1.0, 2.0) and e["n_settings"] == 2
        assert e["trials"] and all((s, t) in val for t in e["trials"])
        assert f"{s}: weight={e['overrides']['weight']}, num_steps=4 (val mel PCC " in report
    assert "**Calibration**" in report
    # The check can fail: one test trial's speech slipped in under another name is found by
    # its mel content.
    import shutil

    from ssip.data import schema
    from ssip.data.dataset import load_trials
    from ssip.data.leakage import check_leakage, speech_segment

    leaky = tmp_path / "leaky"
    shutil.copytree(root / "speech", leaky)
    trial = load_trials(str(root / "ingest"), split="test")[0]
    seg = speech_segment(trial)
    row = {"utt_id": "other/renamed", "source": "other", "speaker": "other:x", "language": "en",
           "transcript": "", "license": "", "source_file": "x.wav", "source_rate": 16000,
           "duration_s": seg.shape[1] / 100, "n_frames": seg.shape[1], "mel": seg + 0.1,
           "mel_version": "x"}
    storage.write_parquet(str(leaky / "shards" / "leak.parquet"), schema.speech_table([row]))
    card = json.loads((leaky / "card.json").read_text())
    card["shards"].append({**card["shards"][0], "path": "shards/leak.parquet", "rows": 1})
    (leaky / "card.json").write_text(json.dumps(card))
    found = check_leakage(str(root / "ingest"), str(leaky))
    assert not found["ok"]
    assert [(x["trial_id"], x["corpus_utt_id"], x["how"]) for x in found["leaks"]] == [
        (trial["trial_id"], "other/renamed", "content")]
    # A second run finds everything finished.
    calls = []
    run(cfg, str(root), main=lambda argv: calls.append(argv) or 0, echo=lambda *a, **k: None)
    assert calls == []


def test_job_entry_point_dry_run(tmp_path):
    """jobs/pipeline.py (for `ray job submit`) resolves and prints the config, runs nothing."""
    import subprocess
    import sys

    job = Path(__file__).resolve().parent.parent / "jobs" / "pipeline.py"
    out = subprocess.run([sys.executable, str(job), str(tmp_path / "r"), "--config",
                          str(CONFIGS / "pipeline-tiny.yaml"), "--set", "decode.n_draws=3",
                          "--dry-run"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "# PipelineConfig" in out.stdout and "n_draws: 3" in out.stdout
    assert not (tmp_path / "r").exists()
