"""Whole-corpus decoding on Ray Data: every trial of every subject, in an actor pool, resumable.

Plan (driver, small columns only)
    The split's trial shards of the ingest manifest are opened for (subject, trial_id,
    n_frames); a shard that cannot be read is quarantined whole (``quarantine/_shards.parquet``)
    and the others go on. Each subject's trials (in trial order, ``max_trials`` of them) are cut
    into fixed *units*: trials of one padded length (the prior UNet's multiple),
    ``speed.batch_size`` at a time, exactly the batches :func:`ssip.decode.decode_trials` makes. A unit's key hashes
    the run key (decode config + checkpoints) and its trial ids, so a unit is the same set of
    trials, decoded in the same sampler call, in every run of the same config: a trial decodes
    to the same bytes whatever actor or attempt ran it (noise is seeded by (seed, subject/trial,
    draw) in any case; the fixed batch makes the floating-point work identical too).

Decode (Ray Data)
    ``read_parquet`` of the readable shards (subject, trial_id, n_frames, neural) -> a map that
    tags every trial with its unit and drops the trials of finished units -> ``groupby("unit")``
    -> ``map_groups`` in an actor pool of :class:`DecodeActor` (``actors`` actors, fractional
    CPUs each, one GPU each with ``use_gpu``). An actor loads the prior once and each subject's
    likelihood (``LIKELIHOOD_ROOT/<subject>``) and baselines on first use, validates the unit's
    trials (electrode count against the likelihood, finite values, frames), quarantines the bad
    ones with their reason, decodes the rest, and writes the unit: its quarantine rows first,
    then ``units/<subject>/<key>.parquet`` (decoded rows; written whole, temp + rename on disk,
    one PUT on S3). A unit file that exists is done: a re-run skips it, so every trial is decoded
    exactly once in effect, and a crash (an actor, the driver) leaves only whole units behind.

Finish (driver)
    Every planned unit's rows are gathered into the decoded table (``out``: the table that
    ``ssip evaluate`` scores, also keyed by ``run``), then ``summary.json`` is written last: the
    run key, configs, counts (trials planned / decoded / quarantined, per subject), seconds per
    trial, samples per second, and the quarantine reasons.

Metrics (:mod:`ssip.distributed.metrics`): every actor exports ``ssip_decode_trials`` (counter,
label ``status``: decoded | quarantined), ``ssip_decode_seconds_per_trial`` and
``ssip_decode_samples_per_second`` (gauges), labels ``run`` and ``subject``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ssip import storage
from ssip.config import check_range, field, from_dict
from ssip.data.dataset import trial_files
from ssip.data.schema import (
    current_layout,
    decoded_rows_table,
    read_table,
    tensor_rows,
    tensor_values,
)
from ssip.decode import DecodeConfig, decode_trials, padded_length, with_overrides
from ssip.distributed.metrics import make as make_metric
from ssip.distributed.runtime import init_ray, read_shards
from ssip.models.baselines import load_baseline
from ssip.models.likelihood import load_likelihood
from ssip.models.prior import load_prior, prior_location
from ssip.sampling import NonFiniteSampleError

log = logging.getLogger(__name__)

UNITS = "units"
SUMMARY = "summary.json"
SHARD_QUARANTINE = "quarantine/_shards.parquet"
READ_COLUMNS = ["subject", "trial_id", "n_frames", "neural"]


@dataclass
class BulkDecodeConfig:
    """How a corpus is decoded on Ray (where, not what: the sampler is DecodeConfig's)."""

    actors: int = field(2, help="decode actors (each holds the prior and the likelihoods it "
                                "needs)")
    cpus_per_actor: float = field(0.5, help="CPUs reserved per actor (fractional on small "
                                  "machines, so that Ray Data's read tasks keep a share)")
    use_gpu: bool = field(False, help="one GPU per actor")
    threads_per_actor: int = field(1, help="torch intra-op threads per CPU actor")

    def __post_init__(self) -> None:
        check_range("actors", self.actors, 1, None)
        check_range("cpus_per_actor", self.cpus_per_actor, 0.0, None)
        check_range("threads_per_actor", self.threads_per_actor, 1, None)


def unit_key(run_key: str, subject: str, trial_ids: list[str]) -> str:
    h = hashlib.sha256(json.dumps([run_key, subject, trial_ids]).encode()).hexdigest()
    return h[:16]


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def unit_uri(work: str, subject: str, key: str) -> str:
    return storage.join(work, UNITS, _safe(subject), f"{key}.parquet")


def quarantine_uri(work: str, subject: str, key: str) -> str:
    return storage.join(work, "quarantine", _safe(subject), f"{key}.parquet")


def _quarantine_table(rows: list[dict]):
    cols = ("subject", "trial_id", "source_file", "field", "reason")
    return pa.table({c: pa.array([str(r.get(c, "")) for r in rows], pa.string()) for c in cols})


# ---------------------------------------------------------------------------------------------
# Plan.


def plan_units(trials: list[dict], factor: int, batch_size: int, run_key: str
               ) -> list[dict[str, Any]]:
    """Fixed units of one subject's trials: ``{"subject", "key", "trial_ids", "t_pad"}``.

    ``trials`` (subject, trial_id, n_frames), in the subject's trial order. Trials of one padded
    length, ``batch_size`` at a time, in the order :func:`ssip.decode.decode_trials` batches
    them.
    """
    groups: dict[tuple[str, int], list[str]] = defaultdict(list)
    for t in trials:
        groups[(str(t["subject"]), padded_length(int(t["n_frames"]), factor))].append(
            str(t["trial_id"]))
    units = []
    for (subject, t_pad), ids in sorted(groups.items()):
        for s in range(0, len(ids), batch_size):
            chunk = ids[s:s + batch_size]
            units.append({"subject": subject, "key": unit_key(run_key, subject, chunk),
                          "trial_ids": chunk, "t_pad": t_pad})
    return units


def read_trial_index(files: list[str]) -> tuple[list[dict], list[str], list[dict]]:
    """(subject, trial_id, n_frames, file) of every trial of the readable shards, the readable
    shard URIs, and a quarantine row for every shard that cannot be read (or lacks a column)."""
    rows, good, bad = [], [], []
    for uri in files:
        try:
            fs, path = storage.filesystem(uri)
            table = pq.read_table(path, filesystem=fs, columns=["subject", "trial_id", "n_frames"])
            pq.read_schema(path, filesystem=fs).field("neural")  # the column decoding needs
        except Exception as e:
            log.error("decode: input shard %s cannot be read: %s", uri, e)
            bad.append({"subject": "", "trial_id": "", "source_file": uri, "field": "file",
                        "reason": f"unreadable shard: {type(e).__name__}: {e}"[:500]})
            continue
        good.append(uri)
        for s, t, n in zip(*(table.column(c).to_pylist() for c in ("subject", "trial_id",
                                                                     "n_frames")), strict=True):
            rows.append({"subject": s, "trial_id": t, "n_frames": int(n), "file": uri})
    return rows, good, bad


# ---------------------------------------------------------------------------------------------
# Ray Data side.


def tag_units(batch: dict[str, np.ndarray], *, unit_of: dict[str, str]) -> dict[str, np.ndarray]:
    """Map: add each trial's unit key; drop trials whose unit is done (or not planned)."""
    keys = [unit_of.get(f"{s}/{t}") for s, t in zip(batch["subject"], batch["trial_id"],
                                                     strict=True)]
    keep = np.array([k is not None for k in keys], bool)
    out = {k: v[keep] for k, v in batch.items()}
    out["unit"] = np.array([k for k in keys if k is not None], dtype=object)
    return out


class DecodeActor:
    """One decode actor: the prior loaded once, likelihoods and baselines per subject on first
    use; ``__call__`` decodes one unit (a group of the ``unit`` column) and writes it."""

    def __init__(self, *, prior: str, likelihood_root: str | None, baselines_root: str | None,
                 decode: dict[str, Any], work: str, run_key: str, units: dict[str, dict],
                 partners: dict[str, str], shards: dict[str, list[str]], bulk: dict[str, Any],
                 debug: dict[str, Any] | None = None,
                 subject_overrides: dict[str, dict] | None = None):
        import torch

        self.bulk = from_dict(BulkDecodeConfig, bulk)
        if not self.bulk.use_gpu:
            torch.set_num_threads(self.bulk.threads_per_actor)
        self.device = torch.device("cuda" if self.bulk.use_gpu else "cpu")
        self.cfg = from_dict(DecodeConfig, decode)
        self.overrides = subject_overrides or {}
        self.prior, _ = load_prior(prior)
        self.prior.to(self.device)
        self.likelihood_root, self.baselines_root = likelihood_root, baselines_root
        self.work, self.run_key, self.units = work, run_key, units
        self.partners, self.shards = partners, shards
        self.models: dict[str, tuple[Any, dict, str | None]] = {}
        self.split_neural: dict[str, dict[str, np.ndarray]] = {}
        self.debug, self.done = debug or {}, 0
        self._metrics = None

    def _metric(self):
        if self._metrics is None:
            self._metrics = tuple(make_metric(n) for n in ("ssip_decode_trials",
                                                    "ssip_decode_seconds_per_trial",
                                                    "ssip_decode_samples_per_second"))
        return self._metrics

    def _models(self, subject: str):
        """(likelihood or None, baselines, error) of a subject, loaded once."""
        if subject in self.models:
            return self.models[subject]
        likelihood, baselines, error = None, {}, None
        try:
            if self.cfg.needs_likelihood():
                where = storage.join(self.likelihood_root, subject)
                likelihood, manifest = load_likelihood(where, device=self.device)
                if manifest.get("subject") not in (None, subject):
                    raise ValueError(f"{where}: likelihood of subject {manifest.get('subject')!r}")
            for m in self.cfg.needs_baselines():  # baseline methods, and nn for evidence [nn]
                baselines[m] = load_baseline(storage.join(self.baselines_root, subject, m))
        except Exception as e:
            error = f"checkpoint of subject {subject!r} unusable: {type(e).__name__}: {e}"[:500]
            log.error("decode: %s", error)
        self.models[subject] = (likelihood, baselines, error)
        return self.models[subject]

    def _partner_neural(self, subject: str, trial_id: str) -> np.ndarray:
        """The neural data of the trial whose data drives ``trial_id``'s shuffled control."""
        if subject not in self.split_neural:
            found: dict[str, np.ndarray] = {}
            for uri in self.shards.get(subject, []):  # the readable shards only
                fs, path = storage.filesystem(uri)
                table = read_table(path, filesystem=fs, columns=["trial_id", "neural"])
                found.update(zip(table.column("trial_id").to_pylist(),
                                 (np.asarray(x, np.float32)
                                  for x in tensor_values(table, "neural")), strict=True))
            self.split_neural[subject] = found
        x = self.split_neural[subject][self.partners[f"{subject}/{trial_id}"]]
        # A control only needs another trial's data: a partner that holds NaN/Inf (itself
        # quarantined) lends its finite values, zero (the z-scored mean) elsewhere.
        return np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0) if x.ndim == 2 else x

    def __call__(self, group: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        key = str(group["unit"][0])
        unit = self.units[key]
        subject = unit["subject"]
        order = {t: i for i, t in enumerate(unit["trial_ids"])}
        rows = sorted(zip(group["trial_id"], tensor_rows(group, "neural"), group["n_frames"],
                          strict=True),
                      key=lambda r: order.get(str(r[0]), len(order)))
        likelihood, baselines, error = self._models(subject)
        quarantine, trials = [], []
        n_el = likelihood.n_electrodes if likelihood is not None else None
        for tid, neural, n in rows:
            reason = error or _trial_problem(neural, int(n), n_el)
            if reason:
                quarantine.append({"subject": subject, "trial_id": str(tid), "field": "neural"
                                   if not error else "checkpoint", "reason": reason})
            else:
                trials.append({"subject": subject, "trial_id": str(tid),
                               "neural": np.asarray(neural, np.float32)})
        missing = sorted(set(unit["trial_ids"]) - {str(r[0]) for r in rows})
        quarantine += [{"subject": subject, "trial_id": t, "field": "row",
                        "reason": "trial listed by the plan but not read from its shard"}
                       for t in missing]
        decoded: list[dict] = []
        if trials:
            shuffled = None
            if "dps-shuffled" in self.cfg.methods:
                shuffled = [self._partner_neural(subject, t["trial_id"]) for t in trials]
            cfg = with_overrides(self.cfg, self.overrides.get(subject, {}),
                                 batch_size=max(len(trials), 1))
            try:
                decoded = decode_trials(trials, self.prior, likelihood, cfg, baselines=baselines,
                                        shuffled_neural=shuffled)
            except (NonFiniteSampleError, FloatingPointError, ValueError) as e:
                # What the same inputs would do again (a diverged sample, a shape the model
                # refuses): quarantined. Anything else (out of memory, a lost node) propagates
                # and Ray retries the unit.
                reason = f"decoding failed: {type(e).__name__}: {e}"[:500]
                quarantine += [{"subject": subject, "trial_id": t["trial_id"],
                                "field": "decode", "reason": reason} for t in trials]
                trials, decoded = [], []
        if quarantine:
            storage.write_parquet(quarantine_uri(self.work, subject, key),
                                  _quarantine_table(quarantine))
        if decoded:
            table = decoded_rows_table(decoded)
            table = table.append_column("run", pa.array([self.run_key] * table.num_rows,
                                                        pa.string()))
        else:
            table = _empty_table()
        storage.write_parquet(unit_uri(self.work, subject, key), table)  # last: the unit is done
        seconds = time.perf_counter() - t0
        draws = sum(1 for r in decoded if r["draw"] >= 0)
        trials_c, per_trial, rate = self._metric()
        tags = {"run": self.run_key, "subject": subject}
        if trials:
            trials_c.inc(len(trials), tags={**tags, "status": "decoded"})
            per_trial.set(seconds / len(trials), tags=tags)
            rate.set(draws / max(seconds, 1e-9), tags=tags)
        if quarantine:
            trials_c.inc(len(quarantine), tags={**tags, "status": "quarantined"})
        self.done += 1
        self._maybe_die()
        n = len(rows) + len(missing)
        return {"unit": np.array([key], object), "subject": np.array([subject], object),
                "n_trials": np.array([n]), "n_decoded": np.array([len(trials)]),
                "n_quarantined": np.array([len(quarantine)]), "seconds": np.array([seconds]),
                "draws": np.array([draws])}

    def _maybe_die(self) -> None:
        spec = self.debug
        if spec.get("unit_delay_s"):
            time.sleep(float(spec["unit_delay_s"]))
        if spec.get("kill_after_units") and self.done >= int(spec["kill_after_units"]) \
                and not os.path.exists(spec["marker"]):
            import signal

            with open(spec["marker"], "w") as f:
                f.write(f"decode actor killed after {self.done} unit(s)\n")
            os.kill(os.getpid(), signal.SIGKILL)


def _trial_problem(neural, n_frames: int, n_electrodes: int | None) -> str | None:
    x = np.asarray(neural)
    if x.ndim != 2:
        return f"neural has shape {x.shape}, expected (frames, electrodes)"
    if x.shape[0] != n_frames:
        return f"neural has {x.shape[0]} frames, n_frames says {n_frames}"
    if n_electrodes is not None and x.shape[1] != n_electrodes:
        return f"neural has {x.shape[1]} electrodes, the subject's likelihood {n_electrodes}"
    bad = ~np.isfinite(x)
    if bad.any():
        frames = np.flatnonzero(bad.any(axis=1))
        return (f"neural holds {int(bad.sum())} NaN/Inf value(s) in {len(frames)} frame(s) "
                f"(first at frame {int(frames[0])})")
    return None


def _empty_table():
    """A decoded table with no rows, with the columns (and types) of a unit's table."""
    probe = decoded_rows_table([{"subject": "", "trial_id": "", "method": "dps", "draw": 0,
                                 "mel": np.zeros((80, 1), np.float32)}])
    probe = probe.append_column("run", pa.array([""], pa.string()))
    return probe.slice(0, 0)


# ---------------------------------------------------------------------------------------------
# The driver.


def decode_corpus(ingest: str, out: str, *, prior: str, likelihood_root: str | None,
                  baselines_root: str | None, cfg, bulk: BulkDecodeConfig | None = None,
                  split: str = "test", subjects: list[str] | None = None, max_trials: int = 0,
                  work: str | None = None, subject_overrides: dict[str, dict] | None = None,
                  address: str | None = None,
                  num_cpus: int | None = None, progress: bool = True,
                  debug: dict[str, Any] | None = None) -> dict[str, Any]:
    """Decode every ``split`` trial of every subject of ``ingest`` on Ray; write ``out``.

    Parameters
    ----------
    ingest : str
        Ingest root (local or s3://).
    out : str
        The decoded table to write (parquet: run, subject, trial_id, method, draw, mel, spread).
    prior, likelihood_root, baselines_root : str
        Checkpoints: the prior, ``LIKELIHOOD_ROOT/<subject>``, ``BASELINES_ROOT/<subject>/<kind>``.
    cfg : DecodeConfig
    bulk : BulkDecodeConfig, optional
    split, subjects, max_trials
        Which trials (``max_trials`` per subject, in trial order; 0 = all).
    work : str, optional
        Run folder of units, quarantine and summary (default ``out`` + ``.d``).
    subject_overrides : dict, optional
        Per subject, DecodeConfig overrides (a preset of ``ssip sweep``).
    debug : dict, optional
        Test hooks: ``{"kill_after_units": n, "marker": path}`` SIGKILLs one actor once after
        it wrote n units; ``{"unit_delay_s": s}`` makes every actor sleep after each unit.

    Returns
    -------
    dict
        The summary (also ``WORK/summary.json``).
    """
    bulk = bulk or BulkDecodeConfig()
    # Actors may run in another working directory (another node): local paths made absolute.
    prior = prior_location(prior)  # "shipped": the package's folder, on every worker too
    ingest, out, prior = (storage.absolute(x) for x in (ingest, out, prior))
    likelihood_root, baselines_root = (storage.absolute(x) for x in (likelihood_root,
                                                                     baselines_root))
    work = storage.absolute(work) if work else f"{out}.d"
    t_start = time.perf_counter()
    # The trials' padding multiple (the UNet's factor, or cfg.pad_multiple's buckets).
    factor = cfg.pad_factor(int(getattr(load_prior(prior)[0], "factor", 8)))
    # The run key: what was decoded with what. The same key re-run resumes; another key is
    # another run (its units have other names).
    subject_overrides = dict(subject_overrides or {})
    run_key = hashlib.sha256(json.dumps(
        {"decode": dataclasses.asdict(cfg), "split": split, "prior": _checkpoint_id(prior),
         **({"per_subject": subject_overrides} if subject_overrides else {}),
         "likelihood_root": likelihood_root, "baselines_root": baselines_root},
        sort_keys=True, default=str).encode()).hexdigest()[:12]
    files = trial_files(ingest, split=split)
    index, good, bad_shards = read_trial_index(files)
    by_subject: dict[str, list[dict]] = defaultdict(list)
    for t in sorted(index, key=lambda r: (r["subject"], r["trial_id"])):
        if subjects is None or t["subject"] in subjects:
            by_subject[t["subject"]].append(t)
    if max_trials:
        by_subject = defaultdict(list, {s: ts[:max_trials] for s, ts in by_subject.items()})
    if not by_subject and not bad_shards:
        raise ValueError(f"no {split}-split trials under {ingest}"
                         + (f" for subject(s) {subjects}" if subjects else ""))
    units, partners = [], {}
    for subject, trials in sorted(by_subject.items()):
        units += plan_units(trials, factor, cfg.speed.batch_size, run_key)
        ids = [t["trial_id"] for t in trials]
        for i, tid in enumerate(ids):  # the shuffled control: the next trial, cyclically
            partners[f"{subject}/{tid}"] = ids[(i + 1) % len(ids)]
    if "dps-shuffled" in cfg.methods:
        lonely = [s for s, ts in by_subject.items() if len(ts) < 2]
        if lonely:
            raise ValueError(f"'dps-shuffled' needs >= 2 trials per subject; {lonely} have 1")
    pending = [u for u in units if not storage.exists(unit_uri(work, u["subject"], u["key"]))]
    log.info("decode run %s: %d subject(s), %d trial(s) in %d unit(s), %d to do, %d unreadable "
             "shard(s), %d actor(s)", run_key, len(by_subject), sum(map(len, by_subject.values())),
             len(units), len(pending), len(bad_shards), bulk.actors)
    if bad_shards:
        storage.write_parquet(storage.join(work, SHARD_QUARANTINE), _quarantine_table(bad_shards))
    results: list[dict] = []
    if pending:
        results = _run_actors(index, good, pending, partners, work, run_key, prior,
                              likelihood_root, baselines_root, cfg, bulk, address, num_cpus,
                              progress, debug, subject_overrides)

    # Gather: every planned unit (this run and earlier attempts), in plan order.
    tables, quarantine = [], list(bad_shards)
    for u in units:
        uri = unit_uri(work, u["subject"], u["key"])
        if not storage.exists(uri):
            raise RuntimeError(f"decode run {run_key}: unit {u['key']} of {u['subject']} "
                               f"(trials {u['trial_ids']}) was not written; re-run to resume")
        tables.append(current_layout(storage.read_parquet(uri)))  # units of a v1 run too
        q = quarantine_uri(work, u["subject"], u["key"])
        if storage.exists(q):
            quarantine += storage.read_parquet(q).to_pylist()
    table = pa.concat_tables(tables) if tables else _empty_table()
    storage.write_parquet(out, table)
    counts: dict[str, dict[str, int]] = {}
    decoded_keys = set(zip(table.column("subject").to_pylist(),
                           table.column("trial_id").to_pylist(), strict=True)) if tables else set()
    for subject, trials in by_subject.items():
        q = [r for r in quarantine if r["subject"] == subject]
        counts[subject] = {"planned": len(trials), "quarantined": len(q),
                           "decoded": sum(1 for t in trials
                                          if (subject, t["trial_id"]) in decoded_keys)}
    seconds = sum(r["seconds"] for r in results)
    n_new = sum(r["n_decoded"] for r in results)
    summary = {
        "run": run_key, "ingest": ingest, "split": split, "out": out, "work": work,
        "prior": prior, "likelihood_root": likelihood_root, "baselines_root": baselines_root,
        "decode": dataclasses.asdict(cfg), "bulk": dataclasses.asdict(bulk),
        "subject_overrides": subject_overrides,
        "n_units": len(units), "n_units_this_attempt": len(pending),
        "n_trials": sum(c["planned"] for c in counts.values()),
        "n_decoded": sum(c["decoded"] for c in counts.values()),
        "n_quarantined": len(quarantine), "per_subject": counts,
        "quarantine": quarantine,
        "seconds_per_trial": seconds / n_new if n_new else None,
        "samples_per_second": (sum(r["draws"] for r in results) / seconds) if seconds else None,
        "wall_s": time.perf_counter() - t_start, "rows": table.num_rows,
    }
    storage.write_json(storage.join(work, SUMMARY), summary)  # last
    return summary


def _checkpoint_id(directory: str) -> str:
    """What identifies a checkpoint's weights: its manifest's bytes (it holds the weights' hash)."""
    uri = storage.join(directory, "manifest.json")
    return hashlib.sha256(storage.read_bytes(uri)).hexdigest()[:16]


def _run_actors(index, good, pending, partners, work, run_key, prior, likelihood_root,
                baselines_root, cfg, bulk, address, num_cpus, progress, debug,
                subject_overrides):
    import ray
    from ray.data import ActorPoolStrategy

    embedded = init_ray(address, num_cpus)
    try:
        unit_of = {f"{u['subject']}/{t}": u["key"] for u in pending for t in u["trial_ids"]}
        ds = read_shards(good, READ_COLUMNS)
        ds = ds.map_batches(tag_units, batch_format="numpy", fn_kwargs={"unit_of": unit_of})
        units = {u["key"]: u for u in pending}
        shards: dict[str, list[str]] = defaultdict(list)
        for t in index:
            if t["file"] not in shards[t["subject"]]:
                shards[t["subject"]].append(t["file"])
        ctor = {"prior": prior, "likelihood_root": likelihood_root,
                "baselines_root": baselines_root, "decode": dataclasses.asdict(cfg),
                "work": work, "run_key": run_key, "units": units, "partners": partners,
                "shards": shards, "bulk": dataclasses.asdict(bulk),
                "debug": debug, "subject_overrides": subject_overrides}
        # One shuffle partition per unit (Ray's default is 200; a small run would pay for all).
        ds = ds.groupby("unit", num_partitions=max(1, min(len(pending), 200))).map_groups(
            DecodeActor, batch_format="numpy", fn_constructor_kwargs=ctor,
            compute=ActorPoolStrategy(size=bulk.actors),
            num_cpus=bulk.cpus_per_actor, num_gpus=1 if bulk.use_gpu else None,
            max_restarts=-1, max_task_retries=-1)
        results = []
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=sum(len(u["trial_ids"]) for u in pending), desc=f"decode {run_key}",
                       unit="trial")
        for row in ds.iter_rows():
            results.append({k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()})
            if bar is not None:
                bar.update(int(row["n_trials"]))
        if bar is not None:
            bar.close()
        return results
    finally:
        if embedded:
            ray.shutdown()


