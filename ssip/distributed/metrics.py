"""Every metric ssip exports, in one place: name, kind, labels, meaning (``ray.util.metrics``).

Each Ray node's metrics agent serves them to Prometheus at the node's metrics export port
(``ray start --metrics-export-port=8080``) as ``ray_<name>``; a counter also as
``ray_<name>_total``. Ray adds its own labels (``SessionName``, ``NodeAddress``, ``WorkerId``, ...).
cluster/grafana/ssip-dashboard.json plots them; docs/distributed.md "Observability" lists them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: str  # counter | gauge | histogram
    labels: tuple[str, ...]
    description: str
    boundaries: tuple[float, ...] = ()


_SPECS = [
    # Training (ssip.distributed.engine.TrainMetrics; rank 0 of a Ray Train run).
    MetricSpec("ssip_train_samples", "counter", ("model", "subject", "run"),
               "training samples (windows) seen by all workers"),
    MetricSpec("ssip_train_loss", "gauge", ("model", "subject", "run", "bucket"),
               "training loss over the last log interval; bucket = all or the quartile q1..q4 "
               "of the training noise level"),
    MetricSpec("ssip_train_samples_per_second", "gauge", ("model", "subject", "run"),
               "training throughput, all workers"),
    MetricSpec("ssip_train_data_wait_seconds", "counter", ("model", "subject", "run"),
               "seconds rank 0 waited on the input pipeline"),
    MetricSpec("ssip_train_data_wait_fraction", "gauge", ("model", "subject", "run"),
               "share of the last interval rank 0 spent waiting on data"),
    # Whole-corpus decoding (ssip.distributed.decode_corpus.DecodeActor).
    MetricSpec("ssip_decode_trials", "counter", ("run", "subject", "status"),
               "trials finished by the bulk decoder; status = decoded | quarantined"),
    MetricSpec("ssip_decode_seconds_per_trial", "gauge", ("run", "subject"),
               "decode seconds per trial of the last unit"),
    MetricSpec("ssip_decode_samples_per_second", "gauge", ("run", "subject"),
               "posterior draws per second of the last unit"),
    # Online decoding (ssip.distributed.serve.OnlineDecoder).
    MetricSpec("ssip_serve_requests", "counter", ("subject", "code"),
               "online decode requests answered, by HTTP status code"),
    MetricSpec("ssip_serve_request_seconds", "histogram", ("subject",),
               "seconds from request to response of answered (200) decode requests",
               (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)),
    MetricSpec("ssip_serve_batch_size", "histogram", ("app",),
               "requests decoded together in one batch", (1, 2, 4, 8, 16, 32, 64)),
]

#: name -> MetricSpec, every metric ssip exports.
METRICS: dict[str, MetricSpec] = {s.name: s for s in _SPECS}


def make(name: str):
    """The ``ray.util.metrics`` object of metric ``name`` (create it once per process/actor)."""
    from ray.util.metrics import Counter, Gauge, Histogram

    s = METRICS[name]
    if s.kind == "counter":
        return Counter(s.name, s.description, tag_keys=s.labels)
    if s.kind == "gauge":
        return Gauge(s.name, s.description, tag_keys=s.labels)
    return Histogram(s.name, s.description, boundaries=list(s.boundaries), tag_keys=s.labels)
