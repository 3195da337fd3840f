"""Online decoding on Ray Serve: one trial per request, JSON over HTTP, batched across requests.

``POST {prefix}decode`` takes one trial of one subject and answers its DPS posterior mean (and,
when asked, the K posterior draws) with a WAV of it; ``GET {prefix}health`` says the service is
up and which subjects it decodes. Requests are validated before they reach the model (known
subject, 2-D frames x electrodes matching the subject's likelihood, a float dtype, finite
values, at most ``max_frames`` frames and ``max_body_mb``), and a bad one gets a 4xx whose
``error`` says what is wrong; a failure inside the decoder gets a 500 and the replica keeps
serving. With a token configured (the environment variable ``token_env`` on the replicas, e.g.
from a Kubernetes secret), a request without ``Authorization: Bearer <token>`` gets 401. The
proxy binds 127.0.0.1 unless ``host`` says otherwise.

The decode path is the bulk decoder's: :func:`ssip.decode.decode_trials` with the same prior,
the subject's likelihood from ``LIKELIHOOD_ROOT/<subject>``, the same DecodeConfig (and the
subject's preset overrides), draws seeded by (seed, "<subject>/<trial_id>", k); a trial sent
with its trial id decodes to the bulk decoder's mel for it. Valid requests queue into
``@serve.batch`` (``max_batch_size``, ``batch_wait_timeout_s``; ``max_ongoing_requests`` must be
at least the batch size, docs/method.md, The stack and its traps), are grouped by subject and draw count, and each
group is one ``decode_trials`` call, run in a worker thread so the replica keeps accepting
requests while it samples.

Request (JSON)::

    {"subject": "sim01", "neural": [[...C floats...], ...T rows...],   # or, compactly:
     "neural_b64": "<base64 of little-endian T*C floats>", "shape": [T, C], "dtype": "float32",
     "trial_id": "rec/0007",          # optional: seeds the draws (default "online")
     "draws": 4,                      # optional: posterior draws (default the config's n_draws)
     "return_samples": false,         # optional: also return every draw
     "wav": true}                     # optional: a 16 kHz WAV of the posterior mean

Response: ``subject``, ``trial_id``, ``frames``, ``draws``, ``mel`` (80 x T, log-mel),
``spread`` (mean posterior std), ``samples`` (K x 80 x T, when asked), ``wav_b64`` and
``sample_rate``, ``decode_seconds`` and ``batch`` (requests decoded together).

Metrics (:mod:`ssip.distributed.metrics`, exported by every node as ``ray_<name>``):
``ssip_serve_requests`` (counter; labels ``subject``, ``code``), ``ssip_serve_request_seconds``
(histogram; ``subject``), ``ssip_serve_batch_size`` (histogram; ``app``). Log lines name the
subject and trial.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import hmac
import io
import json
import logging
import math
import os
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np

from ssip import storage
from ssip.config import ConfigError, check_range, field, from_dict, resolve
from ssip.decode import DecodeConfig, decode_trials, with_overrides
from ssip.distributed.metrics import make as make_metric
from ssip.distributed.runtime import init_ray
from ssip.models.likelihood import load_likelihood
from ssip.models.prior import load_prior, prior_location
from ssip.models.vocoder import get_vocoder
from ssip.presets import load_preset, presets_root

log = logging.getLogger(__name__)

DTYPES = {"float32": np.float32, "float64": np.float64}
SAMPLE_RATE = 16000


@dataclass
class ServeConfig:
    """How the online decoder is deployed and what requests it accepts."""

    host: str = field("127.0.0.1", help="address the HTTP proxy binds (0.0.0.0 only behind a "
                                        "firewall or ingress)")
    port: int = field(8000, help="HTTP port of the proxy")
    route_prefix: str = field("/", help="URL prefix of the routes (decode, health)")
    app_name: str = field("ssip-decoder", help="Serve application name")
    num_replicas: int = field(1, help="decoder replicas (each holds the prior and likelihoods)")
    cpus_per_replica: float = field(1.0, help="CPUs reserved per replica")
    gpus_per_replica: float = field(0.0, help="GPUs per replica (1 on a GPU node)")
    threads: int = field(0, help="torch threads per replica (0 = cpus_per_replica rounded up)")
    batching: bool = field(True, help="batch concurrent requests into one sampler call "
                                      "(@serve.batch); false decodes each request alone")
    max_batch_size: int = field(8, help="most requests per batch")
    batch_wait_timeout_s: float = field(0.05, help="how long a batch waits to fill")
    max_ongoing_requests: int = field(32, help="requests a replica holds at once (>= "
                                               "max_batch_size, or batches never fill)")
    max_frames: int = field(3000, help="longest trial accepted, frames at 100 Hz (30 s)")
    max_body_mb: float = field(32.0, help="largest request body accepted, MB (413 above)")
    max_draws: int = field(32, help="most posterior draws a request may ask for")
    vocoder: str = field("griffinlim", help="mel -> WAV for the response: griffinlim | hifigan")
    token_env: str = field("SSIP_SERVE_TOKEN", help="environment variable that holds the API "
                                                    "token on the replicas; when it is set, "
                                                    "requests need 'Authorization: Bearer "
                                                    "<token>' (401 otherwise)")

    def __post_init__(self) -> None:
        check_range("port", self.port, 1, 65535)
        check_range("num_replicas", self.num_replicas, 1, None)
        check_range("cpus_per_replica", self.cpus_per_replica, 0.0, None)
        check_range("gpus_per_replica", self.gpus_per_replica, 0.0, None)
        check_range("threads", self.threads, 0, None)
        check_range("max_batch_size", self.max_batch_size, 1, None)
        check_range("batch_wait_timeout_s", self.batch_wait_timeout_s, 0.0, None)
        check_range("max_frames", self.max_frames, 1, None)
        check_range("max_body_mb", self.max_body_mb, 1e-3, None)
        check_range("max_draws", self.max_draws, 1, None)
        if self.max_ongoing_requests < self.max_batch_size:
            raise ConfigError(f"max_ongoing_requests={self.max_ongoing_requests} is below "
                              f"max_batch_size={self.max_batch_size}: a replica would never "
                              f"hold a full batch (set it to at least the batch size)")
        if not self.route_prefix.startswith("/"):
            raise ConfigError(f"route_prefix={self.route_prefix!r} must start with '/'")


class RequestError(Exception):
    """A request the service refuses: HTTP ``status`` and a message that says why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class DecodeRequest:
    subject: str
    trial_id: str
    neural: np.ndarray  # (T, C) float32
    draws: int
    return_samples: bool
    wav: bool


def parse_request(body: bytes, subjects: dict[str, int], cfg: ServeConfig,
                  default_draws: int) -> DecodeRequest:
    """Validate one decode request body; raise :class:`RequestError` (4xx) naming the problem.

    ``subjects`` maps each subject the service decodes to its electrode count.
    """
    if len(body) > cfg.max_body_mb * 2**20:
        raise RequestError(413, f"request body of {len(body) / 2**20:.1f} MB exceeds "
                                f"max_body_mb={cfg.max_body_mb:g}")
    try:
        req = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(400, f"request body is not JSON: {e}") from None
    if not isinstance(req, dict):
        raise RequestError(400, "request body must be a JSON object")
    subject = req.get("subject")
    if not isinstance(subject, str) or not subject:
        raise RequestError(422, "field 'subject' (a string) is missing")
    if subject not in subjects:
        raise RequestError(404, f"subject {subject!r} is not served; known subjects: "
                                f"{sorted(subjects)}")
    trial_id = req.get("trial_id", "online")
    if not isinstance(trial_id, str) or not trial_id:
        raise RequestError(422, "field 'trial_id' must be a non-empty string")
    where = f"subject {subject!r} trial {trial_id!r}"
    dtype = req.get("dtype", "float32")
    if dtype not in DTYPES:
        raise RequestError(422, f"{where}: field 'dtype' is {dtype!r}; use one of {sorted(DTYPES)}")
    neural = _neural_array(req, dtype, where)
    n_el = subjects[subject]
    if neural.ndim != 2:
        raise RequestError(422, f"{where}: field 'neural' has shape {list(neural.shape)}; expected "
                                f"[frames, electrodes] = [T, {n_el}]")
    t, c = neural.shape
    if c != n_el:
        raise RequestError(422, f"{where}: neural has {c} electrodes; subject {subject!r} has "
                                f"{n_el} (shape must be [frames, {n_el}])")
    if not 1 <= t <= cfg.max_frames:
        raise RequestError(422, f"{where}: neural has {t} frames; accepted: 1 to "
                                f"max_frames={cfg.max_frames} (100 Hz)")
    bad = ~np.isfinite(neural)
    if bad.any():
        f, e = np.argwhere(bad)[0]
        raise RequestError(422, f"{where}: neural holds {int(bad.sum())} non-finite value(s), "
                                f"the first at frame {f}, electrode {e}")
    draws = req.get("draws", default_draws)
    if isinstance(draws, bool) or not isinstance(draws, int) or not 1 <= draws <= cfg.max_draws:
        raise RequestError(422, f"{where}: field 'draws' is {draws!r}; use an integer in 1.."
                                f"{cfg.max_draws}")
    flags = {}
    for name, default in (("return_samples", False), ("wav", True)):
        v = req.get(name, default)
        if not isinstance(v, bool):
            raise RequestError(422, f"{where}: field {name!r} must be true or false")
        flags[name] = v
    return DecodeRequest(subject, trial_id, neural.astype(np.float32), draws, **flags)


def _neural_array(req: dict, dtype: str, where: str) -> np.ndarray:
    if "neural_b64" in req:
        shape = req.get("shape")
        if (not isinstance(shape, list) or not all(isinstance(n, int) and n >= 0 for n in shape)):
            raise RequestError(422, f"{where}: 'neural_b64' needs field 'shape' = [frames, "
                                    f"electrodes]")
        try:
            raw = base64.b64decode(req["neural_b64"], validate=True)
        except (binascii.Error, TypeError, ValueError) as e:
            raise RequestError(422, f"{where}: field 'neural_b64' is not base64: {e}") from None
        item = np.dtype(DTYPES[dtype]).newbyteorder("<")
        if len(raw) != math.prod(shape) * item.itemsize:
            raise RequestError(422, f"{where}: 'neural_b64' holds {len(raw)} bytes; shape {shape}"
                                    f" of {dtype} needs {math.prod(shape) * item.itemsize}")
        return np.frombuffer(raw, dtype=item).reshape(shape)
    if "neural" not in req:
        raise RequestError(422, f"{where}: field 'neural' (frames x electrodes) is missing")
    try:
        # Lists of numbers only: strings, booleans or ragged rows are refused, not coerced.
        arr = np.array(req["neural"], dtype=object)
        if arr.dtype == object and arr.size and not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in arr.flat):
            raise ValueError("its values must all be numbers")
        return arr.astype(DTYPES[dtype])
    except (ValueError, TypeError) as e:
        raise RequestError(422, f"{where}: field 'neural' must be a list of rows of numbers "
                                f"(frames x electrodes): {e}") from None


def wav_bytes(audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> bytes:
    """16-bit PCM WAV of a float waveform in [-1, 1]."""
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.clip(np.asarray(audio, np.float32), -1.0, 1.0), sample_rate, format="WAV",
             subtype="PCM_16")
    return buf.getvalue()


def served_subjects(likelihood_root: str) -> dict[str, int]:
    """Subjects with a likelihood checkpoint under the root, and their electrode counts (from the
    manifests; the weights load on a subject's first request)."""
    fs, path = storage.filesystem(likelihood_root)
    out = {}
    for info in fs.get_file_info(_selector(path)):
        if info.type.name != "Directory":
            continue
        name = info.path.rstrip("/").rsplit("/", 1)[-1]
        try:
            with fs.open_input_stream(f"{info.path}/manifest.json") as f:
                manifest = json.loads(f.read())
            out[name] = int(manifest["n_electrodes"])
        except (FileNotFoundError, OSError, KeyError, ValueError, TypeError):
            continue  # not a likelihood (e.g. the presets folder)
    if not out:
        raise FileNotFoundError(f"{likelihood_root}: no likelihood checkpoints "
                                f"(ROOT/<subject>/manifest.json); train them with `ssip train "
                                f"likelihood`")
    return out


def _selector(path: str):
    import pyarrow.fs as pafs

    return pafs.FileSelector(path, recursive=False)


class OnlineDecoder:
    """The Serve deployment: the prior loaded once, each subject's likelihood on first use."""

    def __init__(self, *, prior: str, likelihood_root: str, decode: dict[str, Any],
                 serve: dict[str, Any], subject_overrides: dict[str, dict] | None = None):
        import torch

        self.cfg = from_dict(ServeConfig, serve)
        self.decode_cfg = dataclasses.replace(from_dict(DecodeConfig, decode), methods=["dps"])
        self.overrides = subject_overrides or {}
        self.device = torch.device("cuda" if self.cfg.gpus_per_replica > 0 else "cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(self.cfg.threads or max(1, math.ceil(self.cfg.cpus_per_replica)))
        self.prior, _ = load_prior(prior)
        self.prior.to(self.device)
        self.likelihood_root = likelihood_root
        self.subjects = served_subjects(likelihood_root)
        self.likelihoods: dict[str, Any] = {}
        self.vocoder = get_vocoder(self.cfg.vocoder)
        self.token = os.environ.get(self.cfg.token_env) or None
        self.prefix = self.cfg.route_prefix.rstrip("/")
        self._metrics = None
        if self.cfg.batching:
            self.decode_batch.set_max_batch_size(self.cfg.max_batch_size)
            self.decode_batch.set_batch_wait_timeout_s(self.cfg.batch_wait_timeout_s)
        log.info("online decoder: %d subject(s) %s, token auth %s", len(self.subjects),
                 sorted(self.subjects), "on" if self.token else "off")

    # -- HTTP -----------------------------------------------------------------------------------

    async def __call__(self, request):
        from starlette.responses import JSONResponse

        t0 = time.perf_counter()
        subject = "-"
        try:
            self._authorize(request)
            path = request.url.path[len(self.prefix):] if self.prefix else request.url.path
            if path.rstrip("/") == "/health":
                return JSONResponse({"status": "ok", "subjects": self.subjects,
                                     "batching": self.cfg.batching,
                                     "decode": {"n_draws": self.decode_cfg.n_draws,
                                                "num_steps": self.decode_cfg.num_steps}})
            if path.rstrip("/") != "/decode":
                raise RequestError(404, f"no route {request.url.path}; routes: "
                                        f"{self.prefix}/decode (POST), {self.prefix}/health")
            if request.method != "POST":
                raise RequestError(405, f"{request.url.path} takes POST")
            declared = request.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > self.cfg.max_body_mb * 2**20:
                raise RequestError(413, f"request body of {int(declared) / 2**20:.1f} MB exceeds "
                                        f"max_body_mb={self.cfg.max_body_mb:g}")
            req = parse_request(await request.body(), self.subjects, self.cfg,
                                self.decode_cfg.n_draws)
            subject = req.subject
            result = await (self.decode_batch(req) if self.cfg.batching
                            else asyncio.to_thread(self._decode_group, [req]))
            if isinstance(result, list):
                result = result[0]
            if isinstance(result, Exception):
                raise result
            code, body = 200, result
        except RequestError as e:
            code, body = e.status, {"error": str(e)}
            log.info("request refused (%d): %s", code, e)
        except Exception as e:  # the service keeps serving; the client learns it was ours
            code, body = 500, {"error": f"internal error while decoding: {type(e).__name__}: "
                                        f"{e}"[:1000]}
            log.exception("decode failed (subject %s)", subject)
        self._record(subject, code, time.perf_counter() - t0)
        return JSONResponse(body, status_code=code)

    def _authorize(self, request) -> None:
        if self.token is None:
            return
        got = request.headers.get("authorization", "")
        if not hmac.compare_digest(got.encode(), f"Bearer {self.token}".encode()):
            raise RequestError(401, "missing or wrong API token: send 'Authorization: Bearer "
                                    "<token>'")

    # -- decoding -------------------------------------------------------------------------------

    async def _decode_batch_impl(self, reqs: list[DecodeRequest]) -> list[Any]:
        self._metric_set()[2].observe(len(reqs), tags={"app": self.cfg.app_name})
        return await asyncio.to_thread(self._decode_group, reqs)

    def _likelihood(self, subject: str):
        if subject not in self.likelihoods:
            where = storage.join(self.likelihood_root, subject)
            model, manifest = load_likelihood(where, device=self.device)
            if manifest.get("subject") not in (None, subject):
                raise ValueError(f"{where}: likelihood of subject {manifest.get('subject')!r}")
            self.likelihoods[subject] = model
        return self.likelihoods[subject]

    def _decode_group(self, reqs: list[DecodeRequest]) -> list[Any]:
        """Decode requests (any subjects): one decode_trials call per (subject, draws) group.
        Returns per request its response dict or the exception that failed its group."""
        out: list[Any] = [None] * len(reqs)
        groups: dict[tuple[str, int], list[int]] = defaultdict(list)
        for i, r in enumerate(reqs):
            groups[(r.subject, r.draws)].append(i)
        for (subject, draws), idx in groups.items():
            t0 = time.perf_counter()
            try:
                cfg = with_overrides(self.decode_cfg, {**self.overrides.get(subject, {}),
                                                       "n_draws": draws},
                                     batch_size=len(idx))
                trials = [{"subject": subject, "trial_id": reqs[i].trial_id,
                           "neural": reqs[i].neural} for i in idx]
                rows = decode_trials(trials, self.prior, self._likelihood(subject), cfg)
            except Exception as e:
                log.exception("decoding subject %s trials %s failed", subject,
                              [reqs[i].trial_id for i in idx])
                for i in idx:
                    out[i] = e
                continue
            seconds = time.perf_counter() - t0
            per_trial = draws + 1  # K draws then the mean, per trial (decode_trials' order)
            for j, i in enumerate(idx):
                mine = rows[j * per_trial:(j + 1) * per_trial]
                out[i] = self._response(reqs[i], mine, seconds, len(reqs))
                log.info("decoded subject %s trial %s: %d frames, %d draws, %.2f s (batch of %d)",
                         subject, reqs[i].trial_id, reqs[i].neural.shape[0], draws, seconds,
                         len(reqs))
        return out

    def _response(self, req: DecodeRequest, rows: list[dict], seconds: float, batch: int
                  ) -> dict[str, Any]:
        mean = rows[-1]
        spread = mean.get("spread", math.nan)
        body = {"subject": req.subject, "trial_id": req.trial_id,
                "frames": int(mean["mel"].shape[1]), "draws": req.draws,
                "mel": mean["mel"].tolist(),
                "spread": float(spread) if math.isfinite(spread) else None,
                "decode_seconds": seconds, "batch": batch}
        if req.return_samples:
            body["samples"] = [r["mel"].tolist() for r in rows[:-1]]
        if req.wav:
            audio = self.vocoder(mean["mel"]).numpy()[0]
            body["wav_b64"] = base64.b64encode(wav_bytes(audio)).decode()
            body["sample_rate"] = SAMPLE_RATE
        return body

    # -- metrics --------------------------------------------------------------------------------

    def _metric_set(self):
        if self._metrics is None:
            self._metrics = tuple(make_metric(n) for n in ("ssip_serve_requests",
                                                    "ssip_serve_request_seconds",
                                                    "ssip_serve_batch_size"))
        return self._metrics

    def _record(self, subject: str, code: int, seconds: float) -> None:
        requests, latency, _ = self._metric_set()
        requests.inc(1, tags={"subject": subject, "code": str(code)})
        if code == 200:
            latency.observe(seconds, tags={"subject": subject})


def _with_batching(cls):
    """The deployment class with its @serve.batch method (Serve imported lazily)."""
    from ray import serve

    class BatchedOnlineDecoder(cls):
        @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
        async def decode_batch(self, reqs: list[DecodeRequest]) -> list[Any]:
            return await self._decode_batch_impl(reqs)

    BatchedOnlineDecoder.__name__ = "OnlineDecoder"
    BatchedOnlineDecoder.__qualname__ = "OnlineDecoder"
    return BatchedOnlineDecoder


def build_app(*, prior: str, likelihood_root: str, decode, serve: ServeConfig,
              subject_overrides: dict[str, dict] | None = None,
              runtime_env: dict[str, Any] | None = None):
    """The bound Serve application (``serve.run`` it, or return it from an app builder)."""
    from ray import serve as ray_serve

    prior = prior_location(prior)  # "shipped": the package's folder
    prior, likelihood_root = storage.absolute(prior), storage.absolute(likelihood_root)
    options: dict[str, Any] = {"num_cpus": serve.cpus_per_replica,
                               "num_gpus": serve.gpus_per_replica}
    if runtime_env:
        options["runtime_env"] = runtime_env
    deployment = ray_serve.deployment(
        _with_batching(OnlineDecoder), name="OnlineDecoder", num_replicas=serve.num_replicas,
        max_ongoing_requests=serve.max_ongoing_requests, ray_actor_options=options)
    return deployment.bind(prior=prior, likelihood_root=likelihood_root,
                           decode=dataclasses.asdict(decode), serve=dataclasses.asdict(serve),
                           subject_overrides=subject_overrides or {})


def app_builder(args: dict[str, Any]):
    """Application builder for ``serve run`` / a RayService's serveConfigV2 ``import_path``
    (``ssip.distributed.serve:app_builder``) with ``args``: ``prior``, ``likelihood_root``,
    optional ``decode`` and ``serve`` (dicts of DecodeConfig / ServeConfig fields, or YAML
    paths), ``preset`` (a sweep preset name) and ``presets`` (its folder)."""
    def load(cls, value):
        if value is None or isinstance(value, str):
            return resolve(cls, value)
        return from_dict(cls, dict(value))

    for key in ("prior", "likelihood_root"):
        if not args.get(key):
            raise ConfigError(f"app_builder: args.{key} is required")
    overrides = {}
    if args.get("preset"):
        overrides = load_preset(presets_root(args["likelihood_root"], args.get("presets")),
                                args["preset"], prior=args["prior"],
                                likelihood_root=args["likelihood_root"])
    return build_app(prior=args["prior"], likelihood_root=args["likelihood_root"],
                     decode=load(DecodeConfig, args.get("decode")),
                     serve=load(ServeConfig, args.get("serve")), subject_overrides=overrides)


def start(app, cfg: ServeConfig, *, address: str | None = None, num_cpus: int | None = None
          ) -> str:
    """Start Serve's proxy on ``cfg.host:cfg.port`` and deploy ``app``; returns its base URL."""
    from ray import serve

    init_ray(address, num_cpus)
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(app, name=cfg.app_name, route_prefix=cfg.route_prefix, blocking=False)
    return f"http://{cfg.host}:{cfg.port}{cfg.route_prefix.rstrip('/')}"


def stop(cfg: ServeConfig) -> None:
    """Delete the application ``cfg.app_name`` that :func:`start` deployed."""
    from ray import serve

    serve.delete(cfg.app_name)
