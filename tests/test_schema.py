"""The parquet schema's tensor columns: plain Arrow (readable without Ray), and v1 still read."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ssip import storage
from ssip.data import schema


def _trial_rows(n: int = 3, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        t, c = 5 + 3 * i, 4
        rows.append({
            "subject": "S1", "recording": "rec1", "trial_id": f"rec1/{i:04d}", "trial_index": i,
            "split": "train", "task": "t", "transcript": "w", "utt_id": "", "onset_s": 0.0,
            "speech_onset_s": 0.0, "speech_duration_s": t / 100, "n_frames": t,
            "n_electrodes": c, "frame_rate": 100.0,
            "neural": rng.standard_normal((t, c)).astype(np.float32),
            "mel": rng.standard_normal((80, t)).astype(np.float32),
            "audio": rng.standard_normal(t * 160).astype(np.float32),
            "mel_version": "m", "source_format": "nwb", "source_file": "mem://rec1"})
    return rows


def _v1_table(columns: dict, version: str, rows: list[dict]) -> pa.Table:
    """A table as schema v1 wrote it (the tensor columns Ray's extension, one column each)."""
    cols = {}
    for name, (tp, _) in columns.items():
        if name == "schema_version":
            cols[name] = pa.array([version] * len(rows), pa.string())
        elif tp == "tensor":
            cols[name] = schema.tensor_column_v1([r[name] for r in rows])
        else:
            cols[name] = pa.array([r[name] for r in rows], type=tp)
    return pa.table(cols)


def _write_root(root, table: pa.Table) -> str:
    rel = "trials/S1/rec1-train.parquet"
    storage.write_parquet(storage.join(str(root), rel), table)
    storage.write_json(storage.join(str(root), "manifest.json"), {"recordings": [
        {"path": "mem://rec1", "subject": "S1", "recording": "rec1", "status": "ok",
         "files": [rel]}]})
    return str(root)


def test_a_shard_reads_with_plain_pyarrow_and_numpy_without_ray(tmp_path):
    """What docs/data.md tells users: pyarrow + numpy (and pandas) give the arrays written,
    with no Ray imported and no ssip."""
    rows = _trial_rows()
    shard = tmp_path / "shard.parquet"
    storage.write_parquet(str(shard), schema.trials_table(rows))
    expected = tmp_path / "expected.npz"
    np.savez(expected, **{f"{name}{i}": r[name] for i, r in enumerate(rows)
                          for name in ("neural", "mel", "audio")})
    script = textwrap.dedent(f"""
        import sys
        import numpy as np
        import pyarrow.parquet as pq

        expected = np.load({str(expected)!r})
        table = pq.read_table({str(shard)!r})
        assert table.column("schema_version")[0].as_py() == "ssip-trials-v2"
        df = table.to_pandas()
        for name in ("neural", "mel", "audio"):
            data, shapes = table.column(name), table.column(name + "_shape")
            for i in range(table.num_rows):
                want = expected[f"{{name}}{{i}}"]
                x = np.asarray(data[i].values).reshape(shapes[i].as_py())
                y = np.asarray(df[name][i]).reshape(df[name + "_shape"][i])
                for got in (x, y):
                    assert got.dtype == want.dtype == np.float32, (name, got.dtype)
                    assert got.shape == want.shape, (name, got.shape, want.shape)
                    assert np.array_equal(got, want), name
        assert "ray" not in sys.modules and "ssip" not in sys.modules, "imported Ray or ssip"
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_the_columns_are_plain_arrow_types():
    table = schema.trials_table(_trial_rows(2))
    for name in ("neural", "mel", "audio"):
        assert table.schema.field(name).type == pa.large_list(pa.float32())
        assert table.schema.field(schema.shape_column(name)).type == pa.list_(pa.int32())
        assert not isinstance(table.schema.field(name).type, pa.BaseExtensionType)
    assert table.column("mel_shape").to_pylist() == [[80, 5], [80, 8]]
    speech = schema.speech_table([{
        "utt_id": "a/1", "source": "a", "speaker": "a:1", "language": "en", "transcript": "",
        "license": "", "source_file": "x.wav", "source_rate": 16000, "duration_s": 0.02,
        "n_frames": 2, "mel": np.ones((80, 2), np.float32), "mel_version": "m"}])
    assert speech.column("schema_version")[0].as_py() == schema.SPEECH_SCHEMA_VERSION == "ssip-speech-v2"
    assert speech.column("mel_shape").to_pylist() == [[80, 2]]
    decoded = schema.decoded_rows_table([{"subject": "S1", "trial_id": "t", "method": "dps",
                                          "mel": np.ones((80, 3), np.float32)}])
    assert decoded.column_names[:5] == ["subject", "trial_id", "method", "mel", "mel_shape"]


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_tensor_values_reads_both_layouts(tmp_path, version):
    rows = _trial_rows()
    table = (schema.trials_table(rows) if version == "v2"
             else _v1_table(schema.TRIAL_COLUMNS, "ssip-trials-v1", rows))
    path = tmp_path / "s.parquet"
    pq.write_table(table, path)
    back = pq.read_table(path)
    for name in ("neural", "mel", "audio"):
        for sl, want in ((back, [r[name] for r in rows]),  # and a slice (offsets)
                         (back.slice(1, 2), [r[name] for r in rows[1:3]])):
            got = schema.tensor_values(sl, name)
            assert len(got) == len(want)
            for g, w in zip(got, want, strict=True):
                assert g.dtype == np.float32 and g.shape == w.shape and np.array_equal(g, w)
        # current_layout: v1 -> v2 columns, v2 unchanged
        cur = schema.current_layout(back)
        assert cur.schema.field(name).type == pa.large_list(pa.float32())
        got = schema.tensor_values(cur, name)
        assert all(np.array_equal(g, r[name]) for g, r in zip(got, rows, strict=True))
    # read_table brings the shape column of a projected tensor column (only where there is one)
    part = schema.read_table(str(path), columns=["trial_id", "mel"])
    assert part.column_names == (["trial_id", "mel", "mel_shape"] if version == "v2"
                                 else ["trial_id", "mel"])
    assert all(np.array_equal(g, r["mel"])
               for g, r in zip(schema.tensor_values(part, "mel"), rows, strict=True))
    if version == "v2":  # flat data without its shapes: refused, naming the field
        with pytest.raises(ValueError, match=r"field 'mel'.*'mel_shape'"):
            schema.tensor_values(back.drop(["mel_shape"]), "mel")


def test_v1_bytes_are_rays_and_v1_roots_still_load(tmp_path):
    """A v1 ingest root (written exactly as before: Ray's extension) loads to the same arrays."""
    from ssip.data.dataset import load_trials

    rows = _trial_rows()
    v1 = _v1_table(schema.TRIAL_COLUMNS, "ssip-trials-v1", rows)
    field = v1.schema.field("mel")
    assert field.type.extension_name == schema.TENSOR_EXTENSION
    assert field.type.storage_type == pa.struct([("data", pa.large_list(pa.float32())),
                                                 ("shape", pa.list_(pa.int64()))])
    for table, sub in ((v1, "v1"), (schema.trials_table(rows), "v2")):
        got = load_trials(_write_root(tmp_path / sub, table))
        assert [g["trial_id"] for g in got] == [r["trial_id"] for r in rows]
        for g, r in zip(got, rows, strict=True):
            assert "mel_shape" not in g
            for name in ("neural", "mel", "audio"):
                assert g[name].dtype == np.float32 and np.array_equal(g[name], r[name])
        part = load_trials(str(tmp_path / sub), columns=["schema_version", "trial_id", "mel"])
        assert sorted(part[0]) == ["mel", "schema_version", "trial_id"]
        assert np.array_equal(part[0]["mel"], rows[0]["mel"])


def test_an_unknown_schema_version_names_the_file_and_field(tmp_path):
    from ssip.data.dataset import load_trials

    root = _write_root(tmp_path, _v1_table(schema.TRIAL_COLUMNS, "ssip-trials-v9", _trial_rows(1)))
    with pytest.raises(ValueError, match=r"rec1-train\.parquet: field 'schema_version' is "
                                         r"'ssip-trials-v9'.*ssip-trials-v1.*ssip-trials-v2"):
        load_trials(root)


def test_v1_speech_roots_and_decoded_tables_still_read(tmp_path):
    from ssip.data.speech_corpus import load_speech
    from ssip.evaluate.report import read_decoded

    rng = np.random.default_rng(1)
    mels = [rng.standard_normal((80, t)).astype(np.float32) for t in (3, 6)]
    rows = [{"utt_id": f"a/{i}", "source": "a", "speaker": "a:1", "language": "en",
             "transcript": "", "license": "", "source_file": f"{i}.wav", "source_rate": 16000,
             "duration_s": m.shape[1] / 100, "n_frames": m.shape[1], "mel": m,
             "mel_version": "m"} for i, m in enumerate(mels)]
    storage.write_parquet(str(tmp_path / "shards" / "a.parquet"),
                          _v1_table(schema.SPEECH_COLUMNS, "ssip-speech-v1", rows))
    storage.write_json(str(tmp_path / "card.json"), {"schema_version": "ssip-speech-v1",
                                                     "shards": [{"path": "shards/a.parquet"}]})
    for columns in (None, ["utt_id", "mel"]):
        got = load_speech(str(tmp_path), columns=columns)
        assert [g["utt_id"] for g in got] == ["a/0", "a/1"]
        assert all(np.array_equal(g["mel"], m) and "mel_shape" not in g
                   for g, m in zip(got, mels, strict=True))
    # A decoded table of schema v1 (no schema_version column: its mel was Ray's extension).
    dec = [{"subject": "S1", "trial_id": f"t{i}", "method": "dps", "mel": m}
           for i, m in enumerate(mels)]
    old = pa.table({"subject": pa.array(["S1", "S1"]), "trial_id": pa.array(["t0", "t1"]),
                    "method": pa.array(["dps", "dps"]), "mel": schema.tensor_column_v1(mels)})
    for name, table in (("old", old), ("new", schema.decoded_table(dec))):
        storage.write_parquet(str(tmp_path / f"{name}.parquet"), table)
        got = read_decoded(str(tmp_path / f"{name}.parquet"))
        assert sorted(got[0]) == ["mel", "method", "subject", "trial_id"]
        assert all(np.array_equal(g["mel"], m) for g, m in zip(got, mels, strict=True))


def test_tensor_rows_of_numpy_batches():
    mels = [np.arange(6, dtype=np.float32).reshape(2, 3), np.ones((2, 1), np.float32)]
    flat = {"mel": np.array([*(m.ravel() for m in mels), None], object)[:2],
            "mel_shape": np.array([*(np.array(m.shape, np.int32) for m in mels), None],
                                  object)[:2]}
    for batch in (flat, {"mel": np.array([*mels, None], object)[:2]}):
        got = schema.tensor_rows(batch, "mel")
        assert all(np.array_equal(g, m) and g.shape == m.shape
                   for g, m in zip(got, mels, strict=True))


@pytest.mark.ray
def test_ray_reads_v1_v2_and_mixed_shards_as_the_same_tensors(tmp_path, ray_connected):
    """read_shards: v2 shards, v1 shards (converted on the fly) and a mix of both give each
    trial's tensors through tensor_rows, in a map and after a groupby (blocks cross processes)."""
    from ssip.distributed.runtime import read_shards

    rows = _trial_rows(4)
    want = {r["trial_id"]: r for r in rows}
    storage.write_parquet(str(tmp_path / "v1.parquet"),
                          _v1_table(schema.TRIAL_COLUMNS, "ssip-trials-v1", rows[:2]))
    storage.write_parquet(str(tmp_path / "v2.parquet"), schema.trials_table(rows[2:]))

    def check(batch):
        ok = [np.array_equal(m, want[t]["mel"]) and np.array_equal(y, want[t]["neural"])
              and m.dtype == np.float32
              for t, m, y in zip(batch["trial_id"], schema.tensor_rows(batch, "mel"),
                                 schema.tensor_rows(batch, "neural"), strict=True)]
        return {"trial_id": batch["trial_id"], "ok": np.array(ok)}

    for files, n in ((["v2"], 2), (["v1"], 2), (["v1", "v2"], 4)):
        ds = read_shards([str(tmp_path / f"{f}.parquet") for f in files],
                         ["trial_id", "n_frames", "mel", "neural"])
        out = ds.map_batches(check, batch_format="numpy").take_all()
        assert len(out) == n and all(r["ok"] for r in out), (files, out)
        grouped = ds.groupby("n_frames").map_groups(check, batch_format="numpy").take_all()
        assert sorted(r["trial_id"] for r in grouped) == sorted(r["trial_id"] for r in out)
        assert all(r["ok"] for r in grouped), (files, grouped)
