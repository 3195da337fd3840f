"""Ingest: simulated corpus -> NWB / Flinker HDF5 -> features, trials, splits -> parquet.

Round trips recover the simulated high-gamma envelope; each class of bad input gives its named
error or quarantine row while good trials survive; Ray (a real `ray start` head on 127.0.0.1)
and S3 (a moto server on 127.0.0.1) paths write the same tables.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest

from ssip import storage
from ssip.data.ingest import IngestConfig, process_recording
from ssip.data.readers import RecordingError, read_flinker, read_nwb

# The numbers the round-trip tests hold the pipeline to (measured: see docs/results.md, Ingest round trip).
# At snr_db=10 both paths measured 0.83; the default corpus (-6 dB) gives 0.2-0.3 per electrode.
MIN_ENVELOPE_R_NWB = 0.75
MIN_ENVELOPE_R_FLINKER = 0.75


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    from ssip.data.simulate import CorpusConfig, build_corpus

    out = tmp_path_factory.mktemp("corpus")
    # A high SNR so that the round trip measures the pipeline, not the simulated noise floor.
    cfg = CorpusConfig(n_subjects=2, electrodes_min=32, electrodes_max=36, max_utterances=24, seed=3,
                       extra_voices=[],
                       snr_db=10.0)
    build_corpus(cfg, out, progress=False)
    return out


def _nwb(corpus: Path, subject: str = "sim01") -> Path:
    return next(corpus.glob(f"bids/sub-{subject}/ieeg/*_ieeg.nwb"))


def _truth(corpus: Path, subject: str):
    gt = np.load(corpus / "ground_truth" / f"sub-{subject}.npz")
    return {k: gt[k] for k in gt.files}


def _envelope_r(res, truth, frame_rate=100.0, shift=0) -> float:
    """Mean over responsive good electrodes of corr(recovered feature, true envelope)."""
    env = truth["envelope"]  # (frames, channels)
    names = [str(n) for n in truth["channel_names"]]
    responsive = ~truth["unresponsive"].astype(bool) & ~truth["bad"].astype(bool)
    kept = res.metadata["channels"]
    rs = []
    for c_out, name in enumerate(kept):
        c = names.index(name)
        if not responsive[c]:
            continue
        x = np.concatenate([r["neural"][:, c_out] for r in res.rows])
        y = np.concatenate([env[int(round(r["onset_s"] * frame_rate)) + shift:][: r["n_frames"], c] for r in res.rows])
        rs.append(np.corrcoef(x, y)[0, 1])
    assert len(rs) > 10
    return float(np.mean(rs))


def test_nwb_round_trip_recovers_envelope(corpus):
    rec = read_nwb(_nwb(corpus))
    res = process_recording(rec, IngestConfig())
    assert res.rows and {r["split"] for r in res.rows} == {"train", "val", "test"}
    # Splits are contiguous blocks in recording order.
    order = [r["split"] for r in sorted(res.rows, key=lambda r: r["trial_index"])]
    assert order == sorted(order, key=["train", "val", "test"].index)
    for r in res.rows:
        assert r["neural"].shape == (r["n_frames"], r["n_electrodes"])
        assert r["mel"].shape == (80, r["n_frames"])
        assert r["audio"].shape == (r["n_frames"] * 160,)
    # Bad channels from channels.tsv are dropped.
    assert not set(rec.bad_channels) & set(res.metadata["channels"])
    # z-scored with train statistics.
    train = np.concatenate([r["neural"] for r in res.rows if r["split"] == "train"])
    np.testing.assert_allclose(train.mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(train.std(0), 1, atol=1e-3)
    r = _envelope_r(res, _truth(corpus, rec.subject))
    print(f"NWB round trip: mean envelope correlation {r:.3f}")
    assert r > MIN_ENVELOPE_R_NWB
    # Frames are aligned: the truth shifted by 5 frames (50 ms) either way fits worse.
    truth = _truth(corpus, rec.subject)
    assert r > _envelope_r(res, truth, shift=5) + 0.02 and r > _envelope_r(res, truth, shift=-5) + 0.02


def test_flinker_round_trip(corpus):
    path = next((corpus / "flinker").glob("*.h5"))
    rec = read_flinker(path)
    assert rec.sfreq == 125.0 and not rec.is_raw
    res = process_recording(rec, IngestConfig())
    assert res.quarantine == []
    # The test split is exactly the file's last TestNum_cum[0] rows (the simulator writes the
    # last 10 trials of each task there), validation the last 10 % of the others in time order.
    with h5py.File(path) as f:
        n_test = int(f["TestNum_cum"][0])
        n_rows = len(f["label_alldataset"])
    split = {r["trial_index"]: r["split"] for r in res.rows}
    assert sorted(i for i, s in split.items() if s == "test") == list(range(n_rows - n_test, n_rows))
    train_rows = sorted(range(n_rows - n_test), key=lambda i: rec.trials[i].onset_s)
    n_val = round(0.1 * len(train_rows))
    assert sorted(i for i, s in split.items() if s == "val") == sorted(train_rows[len(train_rows) - n_val:])
    truth = _truth(corpus, rec.subject)
    good = [str(n) for n, b in zip(truth["channel_names"], truth["bad"], strict=True) if not b]
    res.metadata["channels"] = good  # Flinker files hold the good electrodes in order
    r = _envelope_r(res, truth)
    print(f"Flinker round trip: mean envelope correlation {r:.3f}")
    assert r > MIN_ENVELOPE_R_FLINKER


# ---------------------------------------------------------------- bad input, one class at a time


@pytest.fixture(scope="module")
def good_rec(corpus):
    return read_nwb(_nwb(corpus))


def _reasons(res, level):
    return [(q["trial_id"] or q["field"], q["field"], q["reason"]) for q in res.quarantine if q["level"] == level]


def test_nan_samples_quarantine_only_their_trial(good_rec):
    sig = good_rec.signal.copy()
    tr = good_rec.trials[3]
    s = int((tr.onset_s + tr.duration_s / 2) * good_rec.sfreq)
    sig[s: s + 20, 5] = np.nan
    sig[s + 30, 7] = np.inf
    res = process_recording(dataclasses.replace(good_rec, signal=sig), IngestConfig())
    bad = _reasons(res, "trial")
    assert [b[0] for b in bad] == [f"{good_rec.recording}/0003"] and bad[0][1] == "neural"
    assert len(res.rows) == len(good_rec.trials) - 1


def test_flat_and_exploding_channels_are_dropped(good_rec):
    sig = good_rec.signal.copy()
    good = [i for i, n in enumerate(good_rec.channel_names) if n not in good_rec.bad_channels]
    sig[:, good[0]] = 0.0
    sig[:, good[1]] *= 1000.0
    res = process_recording(dataclasses.replace(good_rec, signal=sig), IngestConfig())
    ch = {b[1]: b[2] for b in _reasons(res, "channel")}
    assert ch[good_rec.channel_names[good[0]]].startswith("flat channel")
    assert ch[good_rec.channel_names[good[1]]].startswith("exploding channel")
    assert len(res.rows) == len(good_rec.trials)
    assert res.rows[0]["n_electrodes"] == len(good) - 2


def test_empty_overlapping_and_outside_trials(good_rec):
    trials = list(good_rec.trials)
    trials[1] = dataclasses.replace(trials[1], duration_s=0.0)
    trials[4] = dataclasses.replace(trials[4], onset_s=trials[3].onset_s + 0.1)
    trials.append(dataclasses.replace(trials[-1], onset_s=good_rec.duration_s + 5))
    res = process_recording(dataclasses.replace(good_rec, trials=trials), IngestConfig())
    bad = {b[0]: (b[1], b[2]) for b in _reasons(res, "trial")}
    rid = good_rec.recording
    assert bad[f"{rid}/0001"][1].startswith("empty trial")
    assert "overlaps trial" in bad[f"{rid}/0004"][1]
    assert "outside the recording" in bad[f"{rid}/{len(trials) - 1:04d}"][1]
    assert len(res.rows) == len(trials) - 3


def test_wrong_rate_and_length_mismatch_fail_the_file(good_rec):
    with pytest.raises(RecordingError, match=r"field 'sfreq'.*too low"):
        process_recording(dataclasses.replace(good_rec, sfreq=250.0), IngestConfig())
    with pytest.raises(RecordingError, match=r"field 'audio'.*audio ends at"):
        process_recording(dataclasses.replace(good_rec, audio=good_rec.audio[: len(good_rec.audio) // 2]),
                          IngestConfig())


def test_unreadable_and_missing_fields(corpus, tmp_path):
    src = _nwb(corpus)
    trunc = tmp_path / src.name
    trunc.write_bytes(src.read_bytes()[:4096])
    shutil.copy(src.with_name(src.name.replace("_ieeg.nwb", "_events.tsv")), tmp_path)
    with pytest.raises(RecordingError, match=r"field 'file'.*unreadable"):
        read_nwb(trunc)
    h5 = next((corpus / "flinker").glob("*.h5"))
    broken = tmp_path / h5.name
    shutil.copy(h5, broken)
    with h5py.File(broken, "a") as f:
        del f["label_alldataset"]
    with pytest.raises(RecordingError, match=r"field 'label_alldataset'.*missing"):
        read_flinker(broken)
    no_events = tmp_path / "noev" / src.name
    no_events.parent.mkdir()
    shutil.copy(src, no_events)
    with pytest.raises(RecordingError, match=r"events.tsv.*missing"):
        read_nwb(no_events, trials_from="events")
    # Without events.tsv the trials come from the Stimulus acquisition: the same trials.
    from_stimulus = read_nwb(no_events)
    assert from_stimulus.metadata["trials_source"] == "acquisition/Stimulus"
    assert [t.transcript for t in from_stimulus.trials] == [t.transcript for t in read_nwb(src).trials]


# ---------------------------------------------------------------- Ray Data and S3


def _read_trials(root: str) -> list[dict]:
    from ssip.data.dataset import trial_files

    rows = []
    for uri in trial_files(root):
        fs, path = storage.filesystem(uri)
        t = pq.read_table(path, filesystem=fs)
        rows.extend(t.select(["trial_id", "split", "subject"]).to_pylist())
    return rows


@pytest.mark.ray
def test_ray_ingest_with_a_bad_file_and_rerun(corpus, tmp_path, ray_cluster):
    from ssip.data.dataset import quarantine_files
    from ssip.distributed.ingest import run_ingest

    src = tmp_path / "src"
    shutil.copytree(corpus / "bids", src)
    bad = next(src.glob("sub-sim02/ieeg/*_ieeg.nwb"))
    bad.write_bytes(bad.read_bytes()[:10000])  # truncated file: must not stop sim01
    out = tmp_path / "out"
    m = run_ingest(str(src), str(out), IngestConfig(), address=ray_cluster)
    status = {Path(r["path"]).name.split("_")[0]: r["status"] for r in m["recordings"]}
    assert status == {"sub-sim01": "ok", "sub-sim02": "failed"}
    rows = _read_trials(str(out))
    assert len(rows) == m["n_trials"] > 0 and {r["subject"] for r in rows} == {"sim01"}
    q = [row for f in quarantine_files(str(out)) for row in storage.read_parquet(f).to_pylist()]
    assert any(r["level"] == "file" and r["field"] == "file" and "sim02" in r["source_file"] for r in q)
    # Re-running over the same output gives the same trials, no duplicates.
    m2 = run_ingest(str(src), str(out), IngestConfig(), address=ray_cluster)
    rows2 = _read_trials(str(out))
    assert sorted(r["trial_id"] for r in rows2) == sorted(r["trial_id"] for r in rows)
    assert m2["n_trials"] == m["n_trials"]
    assert json.loads((out / "manifest.json").read_text())["schema_version"] == "ssip-trials-v2"
    # Ray Data reads the shards back as per-row tensors (flat data + shape columns).
    from ssip.data.dataset import trial_files
    from ssip.data.schema import tensor_rows
    from ssip.distributed.runtime import read_shards

    batch = read_shards(trial_files(str(out), split="train"), ["neural", "mel"]).take_batch(2)
    neural, mel = tensor_rows(batch, "neural"), tensor_rows(batch, "mel")
    assert neural[0].ndim == 2 and mel[0].shape[0] == 80 and mel[0].dtype == np.float32


@pytest.mark.ray
def test_ingest_exit_status_says_what_landed(corpus, tmp_path, ray_cluster, capsys):
    """0: every file ingested (quarantined trials do not change it); 3: some files failed and
    others landed; 4: nothing landed. The last line says which."""
    from ssip.cli import main

    src = tmp_path / "src"
    shutil.copytree(corpus / "bids" / "sub-sim01", src / "sub-sim01")
    events = next(src.glob("sub-sim01/ieeg/*_events.tsv"))
    lines = events.read_text().splitlines()
    words = [i for i, ln in enumerate(lines) if "\tword\t" in ln]
    cols = lines[words[0]].split("\t")
    cols[0] = "99999.0"  # one trial past the end: quarantined, the file still lands
    lines[words[0]] = "\t".join(cols)
    events.write_text("\n".join(lines) + "\n")
    ray = ["--address", ray_cluster]
    assert main(["ingest", str(src), str(tmp_path / "o1"), *ray]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].endswith("all files ingested (exit 0)")
    shutil.copytree(corpus / "bids" / "sub-sim02", src / "sub-sim02")
    bad = next(src.glob("sub-sim02/ieeg/*_ieeg.nwb"))
    bad.write_bytes(bad.read_bytes()[:10000])
    assert main(["ingest", str(src), str(tmp_path / "o2"), *ray]) == 3
    out = capsys.readouterr().out
    assert "FAILED" in out and "sub-sim02" in out and "SOME FILES FAILED (1 of 2) (exit 3)" in out
    shutil.rmtree(src / "sub-sim01")
    assert main(["ingest", str(src), str(tmp_path / "o3"), *ray]) == 4
    assert capsys.readouterr().out.strip().splitlines()[-1].endswith("NOTHING LANDED (exit 4)")


@pytest.mark.ray
def test_s3_ingest_on_moto(corpus, tmp_path, ray_cluster, moto_s3):
    import boto3

    from ssip.distributed.ingest import run_ingest

    boto3.client("s3", endpoint_url=moto_s3, region_name="us-east-1").create_bucket(Bucket="ssip-test")
    src = tmp_path / "src"
    shutil.copytree(corpus / "bids" / "sub-sim01", src / "sub-sim01")
    local = tmp_path / "local"
    m_local = run_ingest(str(src), str(local), IngestConfig(), address=ray_cluster)
    m_s3 = run_ingest(str(src), "s3://ssip-test/ingest", IngestConfig(), address=ray_cluster)
    assert m_s3["n_trials"] == m_local["n_trials"] > 0
    a = sorted(_read_trials("s3://ssip-test/ingest"), key=lambda r: r["trial_id"])
    b = sorted(_read_trials(str(local)), key=lambda r: r["trial_id"])
    assert a == b


@pytest.mark.ray
def test_embedded_ray_is_shut_down_after_ingest(corpus, tmp_path, monkeypatch):
    """Without a cluster address, ingest starts an embedded Ray on 127.0.0.1 and stops it when
    done, so a long process (``ssip pipeline`` training after ingest) holds no Ray processes."""
    import ray

    from ssip.distributed.ingest import run_ingest

    if ray.is_initialized():
        ray.shutdown()  # a connection to the session's test cluster; later tests reconnect
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    m = run_ingest(str(corpus / "bids"), str(tmp_path / "out"), IngestConfig(), num_cpus=1)
    assert m["n_trials"] > 0 and all(r["status"] == "ok" for r in m["recordings"])
    assert not ray.is_initialized()
