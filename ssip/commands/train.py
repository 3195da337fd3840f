"""`ssip train prior|likelihood|baseline INGEST OUT`: fit one model on an ingest dataset, save it.

- ``prior``: the EDM mel prior on the mels of the TRAIN split of every subject (never on val or
  test trials: a prior that has heard the evaluated utterances flatters DPS), or on speech
  corpora. ``--workers N`` (N >= 1, speech corpora only) streams the shards with Ray Data into N
  Ray Train workers (:mod:`ssip.distributed.train_prior`); 0 trains in this process.
- ``likelihood --subject S``: the forward model of one subject (train split fits, val picks the
  epoch and the noise sigma). ``--workers N`` streams the subject's train trials with Ray Data
  into N Ray Train workers (:mod:`ssip.distributed.train_likelihood`).
- ``baseline --subject S --kind linear|nn``: a direct regression decoder of one subject (train
  split; the NN early-stops on val).

OUT is a checkpoint folder (local or s3://). ``ssip decode`` expects likelihoods at
``LIKELIHOOD_ROOT/<subject>`` and baselines at ``BASELINES_ROOT/<subject>/<kind>``.
"""

from __future__ import annotations

from ssip.commands._common import add_config_args, add_ray_args, resolve_and_print


def register(sub) -> None:
    p = sub.add_parser("train", help="train the prior, a subject's likelihood or a baseline")
    kinds = p.add_subparsers(dest="model", required=True)

    q = kinds.add_parser("prior", help="EDM mel prior on a speech corpus (or on the train-split "
                                       "mels of all subjects of an ingest root)")
    q.add_argument("ingest", metavar="DATA", nargs="+", help="speech corpus root(s) (card.json, "
                   "from `ssip speech ingest`; several are pooled, their sources weighted by "
                   "source_weights) or one ingest root (manifest.json); local or s3://")
    q.add_argument("out", help="checkpoint folder to write")
    q.add_argument("--init", default=None, metavar="PRIOR",
                   help="fine-tune: start from 'shipped' (the prior that ships with ssip) or a "
                        "prior folder (the config field init)")
    _add_ray_train_args(q, "stream the speech shards with Ray Data into N Ray Train workers "
                           "(DeepSpeed; speech corpus roots only)")
    add_ray_args(q)
    add_config_args(q)
    q.set_defaults(func=_train_prior)

    q = kinds.add_parser("likelihood", help="forward model mel -> neural of one subject")
    q.add_argument("ingest", help="ingest root (local or s3://)")
    q.add_argument("out", help="checkpoint folder to write (ssip decode reads ROOT/<subject>)")
    q.add_argument("--subject", required=True, help="subject label in the ingest dataset")
    _add_ray_train_args(q, "stream the subject's train trials with Ray Data into N Ray Train "
                           "workers (DeepSpeed)")
    add_ray_args(q)
    add_config_args(q)
    q.set_defaults(func=_train_likelihood)

    q = kinds.add_parser("baseline", help="direct regression decoder neural -> mel of one subject")
    q.add_argument("ingest", help="ingest root (local or s3://)")
    q.add_argument("out", help="checkpoint folder to write (ssip decode reads ROOT/<subject>/<kind>)")
    q.add_argument("--subject", required=True, help="subject label in the ingest dataset")
    q.add_argument("--kind", required=True, choices=("linear", "nn"), help="which baseline")
    add_config_args(q)
    q.set_defaults(func=_train_baseline)


def _add_ray_train_args(q, what: str) -> None:
    q.add_argument("--workers", type=int, default=0, metavar="N",
                   help=f"0 (default): train in this process; N >= 1: {what}; batch_size must be "
                        f"a multiple of N")
    q.add_argument("--cpus-per-worker", type=float, default=None,
                   help="CPUs reserved per Ray Train worker (leave CPUs free for the Ray Data "
                        "read tasks; default 0.5)")
    q.add_argument("--storage-path", default=None,
                   help="run checkpoints: local folder or s3:// (default ~/ray_results; shared "
                        "storage on a cluster)")
    q.add_argument("--name", default=None,
                   help="run name; re-running with the same name and storage path resumes")
    q.add_argument("--ray-config", default=None, metavar="YAML",
                   help="Ray Train settings (RayTrainConfig: DeepSpeed ZeRO stage, precision, "
                        "checkpoint interval, failures; see configs/train-ray-*.yaml)")
    q.add_argument("--ray-set", dest="ray_overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="override a RayTrainConfig field, repeatable")


def _subject_trials(ingest: str, subject: str) -> list[dict]:
    from ssip.data.dataset import load_trials

    trials = load_trials(ingest, subject=subject)
    if not trials:
        raise ValueError(f"ssip train: no trials of subject {subject!r} under {ingest}; check "
                         f"--subject against the ingest manifest")
    return trials


def prior_training_mels(data: str | list[str]) -> tuple[list, list[str], dict]:
    """Training mels of the prior, their sources, and a description of the data.

    ``data`` is one or more speech corpus roots (``card.json``, from ``ssip speech ingest``:
    every utterance, pooled) or one ingest root (``manifest.json``: the train-split trials of
    every subject).
    """
    import numpy as np

    from ssip import storage
    from ssip.data.dataset import load_trials

    if not isinstance(data, str):
        if len(data) == 1:
            return prior_training_mels(data[0])
        parts = [prior_training_mels(d) for d in data]
        if any(info["kind"] != "speech" for _, _, info in parts):
            raise ValueError(f"ssip train prior: several DATA roots must all be speech corpora "
                             f"(card.json); got {list(data)}")
        mels = [m for ms, _, _ in parts for m in ms]
        sources = [s for _, ss, _ in parts for s in ss]
        info = {"kind": "speech", "root": ",".join(data), "n_utterances": len(mels),
                "n_speakers": sum(i["n_speakers"] for _, _, i in parts),
                "per_source": {s: sources.count(s) for s in sorted(set(sources))}}
        leaks = [i["leakage"] for _, _, i in parts if "leakage" in i]
        if len(leaks) == len(parts):
            info["leakage"] = {**leaks[0], "ok": all(x.get("ok") for x in leaks),
                               "n_leaks": sum(x.get("n_leaks", 0) for x in leaks)}
        return mels, sources, info
    if storage.exists(storage.join(data, "card.json")):
        from ssip.data.speech_corpus import load_speech

        rows = load_speech(data, columns=["utt_id", "source", "speaker", "mel"])
        if not rows:
            raise ValueError(f"ssip train prior: the speech corpus {data} has no utterances")
        sources = [r["source"] for r in rows]
        info = {"kind": "speech", "root": data, "n_utterances": len(rows),
                "n_speakers": len({r["speaker"] for r in rows}),
                "per_source": {s: sources.count(s) for s in sorted(set(sources))}}
        leakage = storage.join(data, "leakage.json")
        if storage.exists(leakage):  # written by `ssip speech default --exclude-from INGEST`
            info["leakage"] = storage.read_json(leakage)
        return [np.asarray(r["mel"], np.float32) for r in rows], sources, info
    trials = load_trials(data, split="train", columns=["schema_version", "subject", "trial_id", "mel"])
    if not trials:
        raise ValueError(f"ssip train prior: no train-split trials under {data} (and no speech "
                         f"corpus card.json there)")
    info = {"kind": "trials", "root": data, "n_utterances": len(trials), "split": "train"}
    return [np.asarray(t["mel"], np.float32) for t in trials], ["trials"] * len(trials), info


def _train_prior(args) -> int:
    import numpy as np

    from ssip.models.prior import (
        PriorConfig,
        estimate_data_stats,
        initial_prior,
        save_prior,
        source_probabilities,
        train_prior,
        window_batches,
    )

    if args.workers < 0:
        raise ValueError(f"ssip train prior: --workers={args.workers} must be >= 0")
    ray_cfg = _ray_train_config(args) if args.workers >= 1 else None
    if args.init is not None:
        args.overrides = [*args.overrides, f"init={args.init}"]
    cfg = resolve_and_print(PriorConfig, args)
    if cfg is None:
        return 0
    if ray_cfg is not None:
        return _train_prior_on_ray(args, cfg, ray_cfg)
    mels, sources, info = prior_training_mels(args.ingest)
    p = source_probabilities([m.shape[1] for m in mels], sources, cfg.source_weights or None)
    mean, sigma_data = estimate_data_stats(mels)
    model = initial_prior(cfg, sigma_data, mean)
    rng = np.random.default_rng(cfg.seed)
    stats = train_prior(model, window_batches(mels, cfg.window_frames, cfg.batch_size, rng, p=p), cfg)
    stats["data"] = info
    save_prior(args.out, model, cfg, ema=stats["ema"], stats=stats)
    print(f"prior: {stats['samples_seen']} windows from {len(mels)} {info['kind']} mel(s), loss "
          f"{stats['loss']:.4f}, {stats['samples_per_s']:.1f} samples/s -> {args.out}")
    return 0


def _ray_train_config(args):
    """RayTrainConfig from --ray-config/--ray-set, then the shortcut flags; printed."""
    from ssip.config import config_hash, resolve, to_yaml
    from ssip.distributed.engine import RayTrainConfig

    overrides = [*args.ray_overrides, f"workers={args.workers}"]
    for flag, key in (("cpus_per_worker", "cpus_per_worker"), ("storage_path", "storage_path"),
                      ("name", "name")):
        if getattr(args, flag) is not None:
            overrides.append(f"{key}={getattr(args, flag)}")
    ray_cfg = resolve(RayTrainConfig, args.ray_config, overrides)
    print(f"# RayTrainConfig (hash {config_hash(ray_cfg)})")
    print(to_yaml(ray_cfg), end="")
    return ray_cfg


def _train_prior_on_ray(args, cfg, ray_cfg) -> int:
    from ssip.distributed.train_prior import train_prior_on_ray

    res = train_prior_on_ray(args.ingest, args.out, cfg, ray_cfg, address=args.address,
                             num_cpus=args.num_cpus)
    m, data = res["metrics"], res["data"]
    resumed = f" (resumed at {m['resumed_from']})" if m.get("resumed_from") else ""
    print(f"prior: {m.get('samples')} windows from {data['n_utterances']} speech utterance(s) on "
          f"{res['workers']} Ray Train worker(s){resumed}, loss {m.get('loss') or float('nan'):.4f}, "
          f"{m.get('samples_per_s') or float('nan'):.1f} samples/s, data wait "
          f"{m.get('data_wait_s') or 0.0:.1f} s -> {args.out} (run {res['run_folder']})")
    return 0


def _train_likelihood(args) -> int:
    from ssip.models.likelihood import LikelihoodConfig, save_likelihood, train_likelihood

    if args.workers < 0:
        raise ValueError(f"ssip train likelihood: --workers={args.workers} must be >= 0")
    ray_cfg = _ray_train_config(args) if args.workers >= 1 else None
    cfg = resolve_and_print(LikelihoodConfig, args)
    if cfg is None:
        return 0
    if ray_cfg is not None:
        from ssip.distributed.train_likelihood import train_likelihood_on_ray

        res = train_likelihood_on_ray(args.ingest, args.subject, args.out, cfg, ray_cfg,
                                      address=args.address, num_cpus=args.num_cpus)
        stats = res["stats"]
        resumed = (f" (resumed at {stats['resumed_from']} windows)"
                   if stats.get("resumed_from") else "")
        print(f"likelihood {args.subject}: val mse {stats['val_mse']:.4f}, val r "
              f"{stats['val_r_mean']:.3f} (best epoch {stats['best_epoch']} of "
              f"{stats['epochs']}) on {res['workers']} Ray Train worker(s){resumed}, "
              f"{stats['samples_per_s']:.1f} windows/s, data wait {stats['data_wait_s']:.1f} s "
              f"-> {args.out} (run {res['run_folder']})")
        return 0
    trials = _subject_trials(args.ingest, args.subject)
    model, stats = train_likelihood(trials, cfg)
    save_likelihood(args.out, model, subject=args.subject, stats=stats)
    print(f"likelihood {args.subject}: val mse {stats['val_mse']:.4f}, val r "
          f"{stats['val_r_mean']:.3f} (best epoch {stats['best_epoch']}) -> {args.out}")
    return 0


def _train_baseline(args) -> int:
    import numpy as np

    from ssip.models.baselines import (
        LinearDecoder,
        LinearDecoderConfig,
        NNDecoder,
        NNDecoderConfig,
        save_baseline,
    )

    cls = LinearDecoderConfig if args.kind == "linear" else NNDecoderConfig
    cfg = resolve_and_print(cls, args)
    if cfg is None:
        return 0
    trials = _subject_trials(args.ingest, args.subject)
    split = {s: [t for t in trials if t["split"] == s] for s in ("train", "val")}
    if not split["train"]:
        raise ValueError(f"ssip train baseline: subject {args.subject!r} has no train trials")

    def arrays(ts, key):
        return [np.asarray(t[key], np.float32) for t in ts]

    if args.kind == "linear":
        decoder = LinearDecoder(cfg).fit(arrays(split["train"], "neural"),
                                         arrays(split["train"], "mel"))
    else:
        val = split["val"]
        decoder = NNDecoder(cfg).fit(arrays(split["train"], "neural"),
                                     arrays(split["train"], "mel"),
                                     arrays(val, "neural") if val else None,
                                     arrays(val, "mel") if val else None)
    save_baseline(args.out, decoder, extra={"subject": args.subject,
                                            "n_train_trials": len(split["train"])})
    print(f"baseline {args.kind} {args.subject}: fitted on {len(split['train'])} train trial(s) "
          f"-> {args.out}")
    return 0
