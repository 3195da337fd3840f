"""Prometheus sees ssip's metrics: a Ray head on 127.0.0.1 with a metrics export port, a tiny
bulk decode on it, then the node's Prometheus endpoint scraped over HTTP holds the decode metrics
with the run and subject labels and the values the decode's summary states."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import _stop_ray_head, start_ray_head
from tests.test_decode_corpus import LENGTHS, models  # noqa: F401 (the module fixture)

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def metrics_head(tmp_path_factory, moto_s3):
    head = start_ray_head(tmp_path_factory.mktemp("raymetrics"))
    try:
        yield head
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        _stop_ray_head(head["temp_dir"], head["port"])


def _scrape(port: int) -> dict[str, list]:
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append(s)
    return out


def test_bulk_decode_metrics_reach_the_prometheus_endpoint(metrics_head, models,  # noqa: F811
                                                           tmp_path):
    import ray

    from ssip.cli import main

    if ray.is_initialized():  # another module's connection: this test drives its own head
        ray.shutdown()
    old = os.environ.get("RAY_ADDRESS")
    out = str(tmp_path / "decoded.parquet")
    try:
        assert main(["decode", models["ingest"], "--prior", models["prior"], "--likelihood-root",
                     models["likelihood"], "--out", out, "--actors", "1", "--address",
                     metrics_head["address"], "--set", "methods=[dps]", "--set", "n_draws=2",
                     "--set", "num_steps=4", "--set", "speed.batch_size=2"]) == 0
        summary = json.loads(Path(out + ".d", "summary.json").read_text())
        want = {s: len(v) for s, v in LENGTHS.items()}
        # The metrics agent exports what the workers reported on its next interval: poll.
        deadline, found = time.monotonic() + 120, {}
        while time.monotonic() < deadline:
            samples = _scrape(metrics_head["metrics_port"])
            found = {s.labels["subject"]: s.value
                     for s in samples.get("ray_ssip_decode_trials_total", [])
                     if s.labels.get("run") == summary["run"] and s.labels["status"] == "decoded"}
            if found == want:
                break
            time.sleep(2)
        assert found == want, f"decoded-trial counters {found}, expected {want}"
        per_trial = {s.labels["subject"]: s.value
                     for s in samples["ray_ssip_decode_seconds_per_trial"]
                     if s.labels.get("run") == summary["run"]}
        assert set(per_trial) == set(want)
        assert all(0 < v < 600 for v in per_trial.values())
        rates = [s.value for s in samples["ray_ssip_decode_samples_per_second"]
                 if s.labels.get("run") == summary["run"]]
        assert rates and all(r > 0 for r in rates)
        # Nothing was quarantined, so no quarantined series for this run.
        assert not [s for s in samples["ray_ssip_decode_trials_total"]
                    if s.labels.get("run") == summary["run"] and s.labels["status"] != "decoded"]
    finally:
        ray.shutdown()
        if old is None:
            os.environ.pop("RAY_ADDRESS", None)
        else:
            os.environ["RAY_ADDRESS"] = old
