"""Online decoding on Ray Serve over real HTTP on 127.0.0.1: valid requests decode as the bulk
decoder does (same trial, same seed), each bad request class gets its 4xx and a clear message, a
missing or wrong token gets 401, a failure inside the decoder a 500 with the service still up,
and 16 concurrent requests are all answered (batched)."""

from __future__ import annotations

import base64
import io
import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import soundfile as sf

from ssip.decode import DecodeConfig, DecodeSpeed, decode_trials
from ssip.distributed.serve import RequestError, ServeConfig, parse_request
from tests.conftest import _free_port
from tests.test_decode_corpus import _rows, models  # noqa: F401 (the module fixture)

pytestmark = pytest.mark.ray

TOKEN = "tok-" + "7" * 24
AUTH = {"Authorization": f"Bearer {TOKEN}"}
DECODE = DecodeConfig(methods=["dps"], n_draws=2, num_steps=6, speed=DecodeSpeed(batch_size=2))
SET = ["--set", "methods=[dps]", "--set", "n_draws=2", "--set", "num_steps=6",
       "--set", "speed.batch_size=2"]


@pytest.fixture(scope="module")
def service(models, ray_connected, tmp_path_factory):  # noqa: F811
    """The online decoder over the test corpus's checkpoints, plus a subject whose checkpoint is
    corrupt (its weights fail to load on its first request)."""
    from ray import serve

    from ssip.distributed.serve import build_app, start

    lik = tmp_path_factory.mktemp("serve") / "likelihood"
    shutil.copytree(models["likelihood"], lik)
    shutil.copytree(lik / "sub-01", lik / "sub-bad")
    (lik / "sub-bad" / "model.safetensors").write_bytes(b"not a safetensors file")
    cfg = ServeConfig(port=_free_port(), max_frames=200, max_body_mb=1.0, max_batch_size=8,
                      batch_wait_timeout_s=0.5, max_ongoing_requests=32, cpus_per_replica=0.5)
    app = build_app(prior=models["prior"], likelihood_root=str(lik), decode=DECODE, serve=cfg,
                    runtime_env={"env_vars": {cfg.token_env: TOKEN}})
    url = start(app, cfg)
    assert url.startswith("http://127.0.0.1:")
    deadline = time.monotonic() + 180
    while True:
        try:
            if requests.get(f"{url}/health", headers=AUTH, timeout=10).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        if time.monotonic() > deadline:
            pytest.fail("the online decoder never answered /health")
        time.sleep(1)
    yield url
    serve.shutdown()


def _test_trials(models, subject="sub-01"):  # noqa: F811
    return [t for t in models["trials"] if t["subject"] == subject and t["split"] == "test"]


def _post(url, body, headers=AUTH, raw=False):
    data = body if raw else json.dumps(body)
    return requests.post(f"{url}/decode", data=data, headers=headers, timeout=300)


def test_health_lists_the_subjects(service):
    r = requests.get(f"{service}/health", headers=AUTH, timeout=30)
    assert r.status_code == 200
    assert r.json()["subjects"] == {"sub-01": 6, "sub-02": 5, "sub-bad": 6}


def test_valid_requests_decode_as_the_bulk_decoder(service, models, ray_connected,  # noqa: F811
                                                   tmp_path):
    from ssip.cli import main

    bulk = str(tmp_path / "bulk.parquet")
    assert main(["decode", models["ingest"], "--prior", models["prior"], "--likelihood-root",
                 models["likelihood"], "--out", bulk, "--subject", "sub-01", "--actors", "1",
                 "--address", ray_connected, *SET]) == 0
    rows = _rows(bulk)
    for i, t in enumerate(_test_trials(models)):
        body = {"subject": "sub-01", "trial_id": t["trial_id"], "return_samples": i == 0}
        if i % 2:  # the compact form: base64 float32
            body.update(neural_b64=base64.b64encode(t["neural"].astype("<f4").tobytes()).decode(),
                        shape=list(t["neural"].shape), dtype="float32")
        else:
            body["neural"] = t["neural"].tolist()
        r = _post(service, body)
        assert r.status_code == 200, r.text
        got = r.json()
        n = t["neural"].shape[0]
        assert (got["subject"], got["trial_id"], got["frames"], got["draws"]) == (
            "sub-01", t["trial_id"], n, 2)
        ref = np.frombuffer(rows[("sub-01", t["trial_id"], "dps", -1)], np.float32).reshape(80, n)
        np.testing.assert_allclose(np.array(got["mel"], np.float32), ref, atol=1e-5, rtol=0)
        if i == 0:
            for k in range(2):
                draw = np.frombuffer(rows[("sub-01", t["trial_id"], "dps", k)],
                                     np.float32).reshape(80, n)
                np.testing.assert_allclose(np.array(got["samples"][k], np.float32), draw,
                                           atol=1e-5, rtol=0)
        else:
            assert "samples" not in got
        audio, sr = sf.read(io.BytesIO(base64.b64decode(got["wav_b64"])))
        assert sr == got["sample_rate"] == 16000 and abs(len(audio) - n * 160) <= 160
        assert 0 < np.abs(audio).max() <= 1


BAD = [
    # (body, raw, status, words the error must contain)
    (b"{not json", True, 400, "not JSON"),
    (b"[1, 2]", True, 400, "JSON object"),
    ({"neural": [[0.0] * 6] * 10}, False, 422, "'subject'"),
    ({"subject": "sub-99", "neural": [[0.0] * 6] * 10}, False, 404, "sub-99"),
    ({"subject": "sub-01"}, False, 422, "'neural'"),
    ({"subject": "sub-01", "neural": [[0.0] * 5] * 10}, False, 422, "5 electrodes"),
    ({"subject": "sub-01", "neural": [0.0] * 10}, False, 422, "[frames, electrodes]"),
    ({"subject": "sub-01", "neural": [["a"] * 6] * 10}, False, 422, "numbers"),
    ({"subject": "sub-01", "neural": [[0.0] * 6] * 10, "dtype": "int8"}, False, 422, "dtype"),
    ({"subject": "sub-01", "neural_b64": base64.b64encode(
        np.r_[np.zeros(59), np.nan].astype("<f4").tobytes()).decode(), "shape": [10, 6]},
     False, 422, "non-finite value(s), the first at frame 9, electrode 5"),
    ({"subject": "sub-01", "neural_b64": "AAAA", "shape": [10, 6]}, False, 422, "bytes"),
    ({"subject": "sub-01", "neural": [[0.0] * 6] * 250}, False, 422, "max_frames=200"),
    ({"subject": "sub-01", "neural": [[0.0] * 6] * 10, "draws": 0}, False, 422, "'draws'"),
    ({"subject": "sub-01", "neural": [[0.0] * 6] * 10, "wav": "yes"}, False, 422, "'wav'"),
    (b'{"subject": "sub-01", "pad": "' + b"x" * (1 << 20) + b'"}', True, 413, "max_body_mb"),
]


@pytest.mark.parametrize("body,raw,status,words", BAD,
                         ids=[f"{b[2]}-{i}" for i, b in enumerate(BAD)])
def test_bad_requests_get_their_4xx_with_a_clear_message(service, body, raw, status, words):
    r = _post(service, body, raw=raw)
    assert r.status_code == status, r.text
    assert words in r.json()["error"], r.json()["error"]


def test_routes_methods_and_token(service):
    assert requests.get(f"{service}/nope", headers=AUTH, timeout=30).status_code == 404
    assert requests.get(f"{service}/decode", headers=AUTH, timeout=30).status_code == 405
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        r = requests.get(f"{service}/health", headers=headers, timeout=30)
        assert r.status_code == 401 and "token" in r.json()["error"]
        r = _post(service, {"subject": "sub-01", "neural": [[0.0] * 6] * 10}, headers=headers)
        assert r.status_code == 401


def test_internal_failure_is_a_500_and_the_service_keeps_serving(service, models):  # noqa: F811
    t = _test_trials(models)[0]
    r = _post(service, {"subject": "sub-bad", "neural": t["neural"].tolist(), "wav": False})
    assert r.status_code == 500 and "internal error" in r.json()["error"]
    assert "sub-bad" in r.json()["error"] or "safetensors" in r.json()["error"].lower()
    r = _post(service, {"subject": "sub-01", "neural": t["neural"].tolist(), "wav": False})
    assert r.status_code == 200


def test_16_concurrent_requests_are_all_answered_in_batches(service, models):  # noqa: F811
    from ssip.models.likelihood import load_likelihood
    from ssip.models.prior import load_prior

    base = _test_trials(models)[0]
    trials = [{"subject": "sub-01", "trial_id": f"c{i:02d}", "neural": base["neural"]}
              for i in range(16)]

    def one(t):
        return _post(service, {"subject": "sub-01", "trial_id": t["trial_id"],
                               "neural": t["neural"].tolist(), "wav": False})

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(one, trials))
    assert [a.status_code for a in answers] == [200] * 16
    assert max(a.json()["batch"] for a in answers) > 1  # requests shared sampler calls
    # Each equals its own decode: draws are seeded by trial id, whatever the batch.
    prior, _ = load_prior(models["prior"])
    lik, _ = load_likelihood(f"{models['likelihood']}/sub-01")
    ref = decode_trials(trials, prior, lik, DECODE)
    means = [r["mel"] for r in ref if r["draw"] == -1]
    for a, m in zip(answers, means, strict=True):
        np.testing.assert_allclose(np.array(a.json()["mel"], np.float32), m, atol=1e-5)
    assert np.abs(means[0] - means[1]).mean() > 1e-3  # different trial ids, different draws


def test_parse_request_without_a_server():
    cfg = ServeConfig(max_frames=50)
    req = parse_request(json.dumps({"subject": "s", "neural": [[1, 2]] * 3, "draws": 3}).encode(),
                        {"s": 2}, cfg, default_draws=4)
    assert req.neural.dtype == np.float32 and req.neural.shape == (3, 2) and req.draws == 3
    assert (req.trial_id, req.return_samples, req.wav) == ("online", False, True)
    with pytest.raises(RequestError, match="true or false") as e:
        parse_request(b'{"subject": "s", "neural": [[1, 2]], "return_samples": 1}', {"s": 2},
                      cfg, 4)
    assert e.value.status == 422
    with pytest.raises(Exception, match="max_ongoing_requests=4 is below max_batch_size=8"):
        ServeConfig(max_batch_size=8, max_ongoing_requests=4)


def test_serve_command_prints_its_configs_on_dry_run(capsys):
    from ssip.cli import main

    assert main(["serve", "--prior", "p", "--likelihood-root", "l", "--serve-set", "port=8123",
                 "--set", "n_draws=3", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "# ServeConfig" in out and "port: 8123" in out and "host: 127.0.0.1" in out
    assert "# DecodeConfig" in out and "n_draws: 3" in out
