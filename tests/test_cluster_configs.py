"""cluster/: the cluster-launcher YAML against the schema inside the ray package, the KubeRay
manifests' kinds, versions and required fields (every entrypoint exists in jobs/ and passes its
own --dry-run; the RayService's import path builds), token auth everywhere, no secrets, and a
Grafana dashboard whose queries name only metrics ssip exports (and every one of them)."""

from __future__ import annotations

import importlib
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from ssip.distributed.metrics import METRICS

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "cluster"
KUBERAY = sorted((CLUSTER / "kuberay").glob("*.yaml"))
SECRET_PATTERNS = [r"AKIA[0-9A-Z]{16}", r"aws_secret_access_key", r"BEGIN [A-Z ]*PRIVATE KEY",
                   r"RAY_AUTH_TOKEN\s*[:=]\s*['\"]?\w"]


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_cluster_launcher_yaml_validates_against_rays_schema():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    cfg = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    jsonschema.validate(cfg, schema)
    # The schema is strict enough to catch a typo'd key.
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**cfg, "max_worker": 8}, schema)
    types = cfg["available_node_types"]
    gpu = [t for t in types.values() if t["resources"].get("GPU", 0) > 0]
    assert types[cfg["head_node_type"]]["resources"].get("GPU", 0) == 0 and gpu
    assert all(t["min_workers"] == 0 and t["max_workers"] <= cfg["max_workers"] for t in gpu)
    assert all("IamInstanceProfile" in t["node_config"] for t in types.values())
    starts = " ".join(cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"])
    assert starts.count("RAY_AUTH_MODE=token") == 2 and "--dashboard-host=127.0.0.1" in starts


@pytest.mark.parametrize("path", [CLUSTER / "aws-gpu.yaml", *KUBERAY], ids=lambda p: p.name)
def test_no_secrets_in_cluster_files(path):
    text = path.read_text()
    for pattern in SECRET_PATTERNS:
        assert not re.search(pattern, text), f"{path.name} matches {pattern}"


def _cluster_spec_ok(spec: dict, where: str) -> None:
    assert spec["rayVersion"] == ray.__version__, where
    assert spec["authOptions"]["mode"] == "token", f"{where}: token auth must be on"
    head = spec["headGroupSpec"]
    assert head["template"]["spec"]["containers"][0]["image"], where
    assert head["rayStartParams"]["metrics-export-port"] == "8080", where
    for g in spec["workerGroupSpecs"]:
        assert g["groupName"] and 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], where
        assert g["template"]["spec"]["containers"][0]["image"], where


def test_kuberay_manifests_have_their_kinds_versions_and_fields():
    kinds: dict[str, list[str]] = {}
    for path in KUBERAY:
        for doc in _docs(path):
            where = path.name
            assert doc["apiVersion"] == "ray.io/v1", where
            assert doc["metadata"]["name"], where
            kinds.setdefault(doc["kind"], []).append(doc["metadata"]["name"])
            spec = doc["spec"]
            if doc["kind"] == "RayCluster":
                _cluster_spec_ok(spec, where)
            elif doc["kind"] == "RayJob":
                assert spec["entrypoint"].startswith("python jobs/"), where
                # Runs on the token-auth RayCluster of raycluster.yaml.
                assert spec["clusterSelector"] == {"ray.io/cluster": "ssip"}, where
            elif doc["kind"] == "RayService":
                _cluster_spec_ok(spec["rayClusterConfig"], where)
                serve_cfg = yaml.safe_load(spec["serveConfigV2"])
                assert serve_cfg["applications"][0]["import_path"]
            else:
                pytest.fail(f"{where}: unexpected kind {doc['kind']}")
    assert kinds["RayCluster"] == ["ssip"] and len(kinds["RayService"]) == 1
    jobs = {Path(shlex.split(d["spec"]["entrypoint"])[1]).stem for p in KUBERAY
            for d in _docs(p) if d["kind"] == "RayJob"}
    assert jobs == {"train_prior", "train_likelihood", "decode_corpus", "sweep_guidance"}


def test_every_rayjob_entrypoint_exists_and_passes_its_dry_run():
    for path in KUBERAY:
        for doc in _docs(path):
            if doc["kind"] != "RayJob":
                continue
            argv = shlex.split(doc["spec"]["entrypoint"])
            assert argv[0] == "python" and (REPO / argv[1]).is_file(), f"{path.name}: {argv[1]}"
            # The job's own argument parsing and config resolution, without touching its data.
            proc = subprocess.run([sys.executable, *argv[1:], "--dry-run"], cwd=REPO,
                                  capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0, f"{path.name}: {proc.stderr[-3000:]}"
            assert "# " in proc.stdout and "Config" in proc.stdout, path.name


def test_rayservice_import_path_builds_the_decoder_application(tmp_path):
    doc = _docs(CLUSTER / "kuberay" / "rayservice-decoder.yaml")[0]
    app_cfg = yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"][0]
    module, name = app_cfg["import_path"].split(":")
    builder = getattr(importlib.import_module(module), name)
    assert callable(builder)
    args = app_cfg["args"]
    assert {"prior", "likelihood_root"} <= set(args)
    # The deployment it names is the one the builder makes.
    assert [d["name"] for d in app_cfg["deployments"]] == ["OnlineDecoder"]
    from ssip.config import from_dict
    from ssip.decode import DecodeConfig
    from ssip.distributed.serve import ServeConfig

    from_dict(DecodeConfig, args["decode"])
    serve = from_dict(ServeConfig, args["serve"])
    assert serve.max_ongoing_requests >= serve.max_batch_size
    # The worker group that runs the replicas holds the API token from a Secret, not a literal.
    workers = doc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]
    env = {e["name"]: e for e in workers["containers"][0]["env"]}
    assert "secretKeyRef" in env[serve.token_env]["valueFrom"]


def test_grafana_dashboard_queries_every_ssip_metric_and_nothing_else():
    dash = json.loads((CLUSTER / "grafana" / "ssip-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert exprs and all(p["datasource"]["type"] == "prometheus" for p in dash["panels"]
                         if p["type"] != "row")
    used = set()
    for e in exprs:
        for m in re.findall(r"ray_(ssip_[a-z_]+)", e):
            base = re.sub(r"_(total|bucket|sum|count)$", "", m)
            assert base in METRICS, f"{e}: {base} is not an ssip metric"
            kind = METRICS[base].kind
            assert m == base or (kind, m[len(base):]) in {
                ("counter", "_total"), ("histogram", "_bucket"), ("histogram", "_sum"),
                ("histogram", "_count")}, e
            used.add(base)
            # Labels a query groups by are labels the metric has.
            for by in re.findall(r"by \(([^)]*)\)", e):
                for label in (x.strip() for x in by.split(",")):
                    assert label == "le" or label in METRICS[base].labels, (e, label)
    assert used == set(METRICS)
