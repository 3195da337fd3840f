"""The whole decoder pipeline as one resumable run: corpus -> ingest -> speech -> train -> decode -> evaluate.

:class:`PipelineConfig` nests the config of every stage. :func:`plan` turns it into the exact
``ssip`` command lines a user could run one by one (each stage's config is written to
``ROOT/configs/<stage>.yaml`` and passed with ``--config``), and :func:`run` executes them in
order through the command line's ``main`` (:func:`ssip.commands.main`, which ``ssip pipeline``
passes in: :func:`ssip.commands.pipeline.run`), so the pipeline and the single commands share one
code path.

A stage is skipped when its output exists AND ``ROOT/pipeline.json`` records that it finished
with the same config hash and the same upstream outputs; change a config (or force a stage) and
that stage and the stages that read its outputs run again (a new prior re-runs decode and
evaluate, not the per-subject likelihoods and baselines). Layout of ROOT::

    corpus/ ingest/ prior-check.json likelihood/<subject>/ baselines/<subject>/<kind>/
    presets/calibrated.json decoded.parquet report/report.md configs/<stage>.yaml pipeline.json

With ``prior_data: shipped`` (the default) no prior is trained: stage ``prior`` checks that no
val/test utterance of the subjects is in the shipped prior's corpus (``ssip prior check``) and
decoding uses it; ``default``, ``trials`` or ``corpora`` train one (stages ``speech`` and
``prior``: ROOT/speech/, ROOT/prior/).

With ``calibrate: true`` (the default) each subject's guidance setting is chosen on its
validation trials by ``ssip sweep`` (Ray Tune) before ``ssip decode --preset calibrated``
decodes the test split.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ssip import storage
from ssip.config import ConfigError, check_option, check_range, config_hash, field, to_yaml
from ssip.data.default_speech import DEFAULT_WEIGHTS, DefaultSpeechConfig
from ssip.data.ingest import EXIT_NOTHING_LANDED, EXIT_SOME_FAILED, IngestConfig
from ssip.data.simulate import CorpusConfig
from ssip.decode import DecodeConfig, DecodeSelection
from ssip.evaluate.report import EvaluateConfig
from ssip.models.baselines import LinearDecoderConfig, NNDecoderConfig
from ssip.models.likelihood import LikelihoodConfig
from ssip.models.prior import SHIPPED, SHIPPED_DIR, PriorConfig
from ssip.presets import SweepConfig

STAGES = ("corpus", "ingest", "speech", "prior", "likelihood", "baselines", "calibrate", "decode",
          "evaluate")
#: Name of the preset the calibrate stage writes under ROOT/presets/ (and decode reads).
CALIBRATION_PRESET = "calibrated"


@dataclass
class PipelineConfig:
    """Every stage of ``ssip pipeline`` (each section is that command's own config)."""

    corpus: CorpusConfig = field(default_factory=CorpusConfig,
                                 help="simulated corpus (`ssip corpus build`)")
    source: str | None = field(None, help="recordings to ingest instead of building the "
                                          "simulated corpus (BIDS tree, Flinker .h5 folder)")
    ingest: IngestConfig = field(default_factory=IngestConfig, help="`ssip ingest`")
    prior_data: str = field("shipped", help="the prior: shipped (the one that ships with ssip: "
                            "no prior is trained; stage prior checks that no val/test trial's "
                            "utterance is in its corpus), or train one on default (the embedded "
                            "multi-speaker corpus, `ssip speech default`), trials (the train-split "
                            "trials' speech) or corpora (prior_corpora)")
    prior_corpora: list[str] = field(default_factory=list, help="speech corpus roots from `ssip "
                                     "speech ingest` (local or s3://), pooled, for prior_data: "
                                     "corpora")
    speech: DefaultSpeechConfig = field(default_factory=DefaultSpeechConfig,
                                        help="`ssip speech default` (prior_data: default)")
    prior: PriorConfig = field(default_factory=PriorConfig, help="`ssip train prior`")
    prior_workers: int = field(0, help="Ray Train workers for the prior (0 = one process; N "
                               "streams speech shards into N DDP workers, prior_data default or "
                               "corpora)")
    likelihood: LikelihoodConfig = field(default_factory=LikelihoodConfig,
                                         help="`ssip train likelihood`, once per subject")
    linear: LinearDecoderConfig = field(default_factory=LinearDecoderConfig,
                                        help="`ssip train baseline --kind linear`")
    nn: NNDecoderConfig = field(default_factory=NNDecoderConfig,
                                help="`ssip train baseline --kind nn`")
    likelihood_workers: int = field(0, help="Ray Train workers per subject's likelihood (0 = "
                                    "one process; N: `ssip train likelihood --workers N`)")
    calibrate: bool = field(True, help="before decoding, pick each subject's guidance setting "
                            "on its validation trials (`ssip sweep`, section sweep) and decode "
                            "with it; the report states the setting and its validation score")
    sweep: SweepConfig = field(default_factory=lambda: SweepConfig(values=[0.5, 1.0, 2.0, 4.0],
                                                                   trials=6, n_draws=4),
                               help="`ssip sweep`: the per-subject calibration (calibrate: true)")
    decode: DecodeConfig = field(default_factory=DecodeConfig, help="`ssip decode`")
    decode_actors: int = field(0, help="decode on Ray with this many actors (0 = one process; "
                               "the table is byte-identical either way)")
    decode_split: str = field("test", help="split to decode and score (train | val | test)")
    max_decode_trials: int = field(0, help="decode at most this many trials per subject "
                                           "(0 = all): a quick look at a long run")
    subjects: list[str] = field(default_factory=list, help="subjects to train and decode "
                                                           "(empty = every subject ingested)")
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig, help="`ssip evaluate`")

    def __post_init__(self) -> None:
        check_option("decode_split", self.decode_split, ("train", "val", "test"))
        check_option("prior_data", self.prior_data, ("shipped", "default", "trials", "corpora"))
        check_range("prior_workers", self.prior_workers, 0, None)
        check_range("likelihood_workers", self.likelihood_workers, 0, None)
        check_range("decode_actors", self.decode_actors, 0, None)
        if (self.prior_data == "corpora") != bool(self.prior_corpora):
            raise ConfigError("prior_corpora lists the speech roots for prior_data: corpora (and "
                              f"only then); got prior_data={self.prior_data!r}, "
                              f"prior_corpora={self.prior_corpora!r}")
        check_range("max_decode_trials", self.max_decode_trials, 0, None)
        if self.decode.selection != DecodeSelection():
            raise ConfigError(f"decode.selection={self.decode.selection}: the pipeline picks the "
                              "trials it decodes with decode_split, max_decode_trials and "
                              "subjects; set those instead")


@dataclass
class Step:
    """One command of the pipeline: its stage, argv (without ``ssip``) and finished-marker."""

    stage: str
    name: str
    argv: list[str]
    marker: str
    key: str  # hash of everything the step's output depends on
    deps: tuple[str, ...] = ()  # names of the steps whose outputs it reads


def _baseline_kinds(cfg: PipelineConfig) -> list[str]:
    """Baselines to train: the baseline methods, and nn when it is DPS evidence."""
    return cfg.decode.needs_baselines()


def _write_config(root: str, stage: str, section) -> str:
    path = storage.join(root, "configs", f"{stage}.yaml")
    storage.write_bytes(path, to_yaml(section).encode())
    return path


def ingested_subjects(ingest_root: str) -> list[str]:
    """Subjects listed by an ingest manifest (recordings that produced trials)."""
    manifest = storage.read_json(storage.join(ingest_root, "manifest.json"))
    return sorted({r["subject"] for r in manifest.get("recordings", [])
                   if r.get("subject") and r.get("status", "ok") == "ok"})


def plan(cfg: PipelineConfig, root: str, subjects: Sequence[str] | None = None) -> list[Step]:
    """The pipeline's commands in order. Subject steps are listed only when ``subjects`` is
    given (they are known once ingest has run); stage configs are written under ROOT/configs."""
    j = lambda *p: storage.join(root, *p)  # noqa: E731

    def h(obj) -> str:
        if not isinstance(obj, dict):
            return config_hash(obj)
        return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:10]

    steps: list[Step] = []
    if cfg.source is None:
        steps.append(Step("corpus", "corpus", ["corpus", "build", j("corpus"), "--config",
                                                _write_config(root, "corpus", cfg.corpus)],
                          j("corpus", "corpus.json"), h(cfg.corpus)))
    source = cfg.source or j("corpus")
    up = steps[-1].key if steps else source
    steps.append(Step("ingest", "ingest", ["ingest", source, j("ingest"), "--config",
                                           _write_config(root, "ingest", cfg.ingest)],
                      j("ingest", "manifest.json"), h({"up": up, "cfg": h(cfg.ingest)}),
                      ("corpus",) if cfg.source is None else ()))
    ingest_key = steps[-1].key
    ingest = j("ingest")
    prior = j("prior")
    if cfg.prior_data == "shipped":
        if subjects is None:
            return steps
        # Once the subjects are known: no val/test utterance of theirs is in its corpus.
        steps.append(Step("prior", "prior", ["prior", "check", ingest, "--prior", SHIPPED,
                                             *[a for s in subjects for a in ("--subject", s)],
                                             "--out", j("prior-check.json")],
                          j("prior-check.json"),
                          h({"up": ingest_key, "prior": shipped_key(), "s": list(subjects)}),
                          ("ingest",)))
        return _subject_steps(cfg, root, subjects, steps, SHIPPED, ingest, ingest_key, j, h)
    if cfg.prior_data == "default":
        # After ingest: the val/test trials' utterances are kept out of the prior's corpus.
        steps.append(Step("speech", "speech", ["speech", "default", j("speech"), "--exclude-from",
                                               ingest, "--config",
                                               _write_config(root, "speech", cfg.speech)],
                          j("speech", "card.json"), h({"up": ingest_key, "cfg": h(cfg.speech)}),
                          ("ingest",)))
        data, data_key, data_dep = j("speech"), steps[-1].key, "speech"
    elif cfg.prior_data == "trials":
        data, data_key, data_dep = [ingest], ingest_key, "ingest"
    else:
        data, data_key, data_dep = list(cfg.prior_corpora), list(cfg.prior_corpora), "ingest"
    if isinstance(data, str):
        data = [data]
    prior_cfg = cfg.prior
    if cfg.prior_data == "default" and not prior_cfg.source_weights:
        prior_cfg = dataclasses.replace(prior_cfg, source_weights=dict(DEFAULT_WEIGHTS))
    workers = ["--workers", str(cfg.prior_workers)] if cfg.prior_workers else []
    steps.append(Step("prior", "prior", ["train", "prior", *data, j("prior"), *workers, "--config",
                                         _write_config(root, "prior", prior_cfg)],
                      j("prior", "manifest.json"),
                      h({"up": data_key, "cfg": h(prior_cfg), **({"workers": cfg.prior_workers}
                                                                if cfg.prior_workers else {})}),
                      (data_dep,)))
    return _subject_steps(cfg, root, subjects, steps, prior, ingest, ingest_key, j, h)


def shipped_key() -> str:
    """What identifies the shipped prior in step keys: its weights' hash (a new one re-decodes)."""
    return str(storage.read_json(storage.join(str(SHIPPED_DIR), "manifest.json"))
               .get("weights_sha256", ""))[:16]


def _subject_steps(cfg: PipelineConfig, root: str, subjects: Sequence[str] | None,
                   steps: list[Step], prior: str, ingest: str, ingest_key: str,
                   j: Callable[..., str], h: Callable[[object], str]) -> list[Step]:
    """The per-subject steps (likelihoods, baselines), calibration, decode and evaluate."""
    if subjects is None:
        return steps
    lik_cfg = _write_config(root, "likelihood", cfg.likelihood)
    kinds = _baseline_kinds(cfg)
    base_cfg = {k: _write_config(root, f"baseline-{k}", getattr(cfg, k)) for k in kinds}
    fitted, fitted_names = [steps[-1].key], ["prior"]
    for s in subjects:
        key = h({"up": ingest_key, "cfg": h(cfg.likelihood), "s": s,
                 **({"workers": cfg.likelihood_workers} if cfg.likelihood_workers else {})})
        # On Ray: the run is named by the step's key, so a re-run resumes only the same work.
        on_ray = (["--workers", str(cfg.likelihood_workers), "--name", f"likelihood-{s}-{key}",
                   "--storage-path", j("train-runs")] if cfg.likelihood_workers else [])
        steps.append(Step("likelihood", f"likelihood {s}",
                          ["train", "likelihood", ingest, j("likelihood", s), "--subject", s,
                           "--config", lik_cfg, *on_ray],
                          j("likelihood", s, "manifest.json"), key, ("ingest",)))
        fitted.append(steps[-1].key)
        fitted_names.append(steps[-1].name)
        for k in kinds:
            steps.append(Step("baselines", f"baseline {k} {s}",
                              ["train", "baseline", ingest, j("baselines", s, k), "--subject", s,
                               "--kind", k, "--config", base_cfg[k]],
                              j("baselines", s, k, "manifest.json"),
                              h({"up": ingest_key, "cfg": h(getattr(cfg, k)), "s": s}),
                              ("ingest",)))
            fitted.append(steps[-1].key)
            fitted_names.append(steps[-1].name)
    decode_cfg = _write_config(root, "decode", cfg.decode)
    models = ["--prior", prior, "--likelihood-root", j("likelihood"),
              *(["--baselines-root", j("baselines")] if kinds else [])]
    by_subject = [a for s in subjects for a in ("--subject", s)]
    preset = []
    if cfg.calibrate and any(m in ("dps", "dps-shuffled") for m in cfg.decode.methods):
        # On the val trials, before the test split is decoded; the cluster is RAY_ADDRESS's or
        # an embedded one (as for every Ray stage of the pipeline).
        steps.append(Step("calibrate", "calibrate",
                          ["sweep", ingest, *models, *by_subject, "--name", CALIBRATION_PRESET,
                           "--presets", j("presets"), "--decode-config", decode_cfg,
                           "--config", _write_config(root, "sweep", dataclasses.replace(
                               cfg.sweep, storage_path=cfg.sweep.storage_path or j("tune")))],
                          j("presets", f"{CALIBRATION_PRESET}.json"),
                          h({"up": fitted, "cfg": h(cfg.sweep), "s": list(subjects),
                             # what the sweep replaces or does not use leaves it unchanged
                             "decode": h({k: v for k, v in dataclasses.asdict(cfg.decode).items()
                                          if k not in ("methods", "n_draws", "control_draws",
                                                       "seed", "selection")})}),
                          tuple(fitted_names)))
        fitted, fitted_names = [*fitted, steps[-1].key], [*fitted_names, "calibrate"]
        preset = ["--preset", CALIBRATION_PRESET, "--presets", j("presets")]
    argv = ["decode", ingest, *models, "--split", cfg.decode_split, "--out", j("decoded.parquet"),
            "--config", decode_cfg, *preset, *by_subject]
    if cfg.max_decode_trials:
        argv += ["--max-trials", str(cfg.max_decode_trials)]
    if cfg.decode_actors:  # not in the key: the table is the same bytes either way
        argv += ["--actors", str(cfg.decode_actors)]
    steps.append(Step("decode", "decode", argv, j("decoded.parquet"),
                      h({"up": fitted, "cfg": h(cfg.decode), "split": cfg.decode_split,
                         "n": cfg.max_decode_trials, "s": list(subjects)}),
                      tuple(fitted_names)))
    steps.append(Step("evaluate", "evaluate",
                      ["evaluate", j("decoded.parquet"), ingest, j("report"), "--prior", prior,
                       *(["--preset-file", j("presets", f"{CALIBRATION_PRESET}.json")]
                         if preset else []),
                       "--config", _write_config(root, "evaluate", cfg.evaluate)],
                      j("report", "report.md"), h({"up": steps[-1].key, "cfg": h(cfg.evaluate)}),
                      ("decode",)))
    return steps


def _load_state(root: str) -> dict:
    path = storage.join(root, "pipeline.json")
    return storage.read_json(path) if storage.exists(path) else {}


def run(cfg: PipelineConfig, root: str, *, main: Callable[[list[str]], int],
        force: Sequence[str] = (), echo=print) -> dict:
    """Run (or resume) the pipeline under ``root``; returns the finished-state dict.

    Parameters
    ----------
    force : sequence of str
        Stages (of :data:`STAGES`) to re-run even when finished; later stages follow.
    main : callable
        Runs one command's argv and returns its exit status (:func:`ssip.commands.main`).
    """
    for s in force:
        check_option("force[]", s, STAGES)
    state = _load_state(root)
    ran: set[str] = set()  # steps run in this call: what reads their outputs runs again
    start = time.perf_counter()

    def execute(steps: list[Step]) -> None:
        for step in steps:
            if step.name in state.get("done", {}) and not ran.intersection(step.deps) \
                    and step.stage not in force and state["done"][step.name] == step.key \
                    and storage.exists(step.marker):
                echo(f"[pipeline] {step.name}: done (skip; --force {step.stage} to redo)")
                continue
            ran.add(step.name)
            echo(f"[pipeline] {step.name}: $ ssip {' '.join(step.argv)}", flush=True)
            t0 = time.perf_counter()
            code = main(list(step.argv))
            if step.stage == "ingest" and code in (EXIT_SOME_FAILED, EXIT_NOTHING_LANDED):
                failed = [r for r in storage.read_json(step.marker)["recordings"]
                          if r["status"] != "ok"]
                reasons = "\n".join(f"  {r['error']}" for r in failed)
                if code == EXIT_NOTHING_LANDED:
                    raise RuntimeError(f"pipeline stage 'ingest' landed no trial "
                                       f"({len(failed)} file(s) failed):\n{reasons}")
                echo(f"[pipeline] ingest: {len(failed)} file(s) failed, going on with the "
                     f"others:\n{reasons}", flush=True)
            elif code:
                raise RuntimeError(f"pipeline stage {step.name!r} exited with {code}: "
                                   f"ssip {' '.join(step.argv)}")
            state.setdefault("done", {})[step.name] = step.key
            state.setdefault("seconds", {})[step.name] = round(time.perf_counter() - t0, 1)
            storage.write_json(storage.join(root, "pipeline.json"), state)
            echo(f"[pipeline] {step.name}: finished in {time.perf_counter() - t0:.0f} s "
                 f"({(time.perf_counter() - start) / 60:.1f} min so far)", flush=True)

    head = plan(cfg, root)
    execute(head)
    subjects = list(cfg.subjects) or ingested_subjects(storage.join(root, "ingest"))
    if not subjects:
        raise ConfigError(f"{root}/ingest: the manifest lists no subject with trials")
    missing = sorted(set(cfg.subjects) - set(ingested_subjects(storage.join(root, "ingest"))))
    if missing:
        raise ConfigError(f"subjects={missing} are not in {root}/ingest/manifest.json")
    execute(plan(cfg, root, subjects)[len(head):])
    report = storage.join(root, "report", "report.md")
    echo(f"[pipeline] all stages done in {(time.perf_counter() - start) / 60:.1f} min; "
         f"report: {report}", flush=True)
    return state
