"""`ssip evaluate-prior PRIOR_DIR [PRIOR_DIR ...] --heldout SRC`: how good is each mel prior?

One row per checkpoint: the held-out EDM denoising loss per quartile of the training sigma
distribution (q1 = lowest noise) and their mean, and the Fréchet distance between Whisper-encoder
embeddings of unconditional prior samples and of held-out speech, beside the same distance
between two halves of the held-out speech (the floor a perfect prior would score at this N) and
between Gaussian noise shaped like speech (its per-bin mean and std) and held-out speech (a
control: what a prior that learned nothing but the long-term spectrum would score).
See :mod:`ssip.evaluate.prior_quality`.
"""

from __future__ import annotations

import argparse
import sys

# Kept here (not imported from ssip.evaluate.prior_quality) so `ssip --help` does not import torch.
DEFAULT_N_SAMPLES = 128
DEFAULT_STEPS = 18


def register(sub) -> None:
    p = sub.add_parser("evaluate-prior",
                       help="score mel prior checkpoints: held-out loss per sigma, Whisper Fréchet "
                            "distance to real speech")
    p.add_argument("priors", nargs="+", metavar="PRIOR_DIR", help="prior checkpoint folder(s)")
    p.add_argument("--heldout", required=True, metavar="SRC",
                   help="held-out speech: an ingest root (manifest.json) or a speech-corpus root "
                        "(card.json); local or s3://")
    p.add_argument("--split", default="test", choices=("test", "val"),
                   help="split of an ingest root to use (default test)")
    p.add_argument("--n-samples", type=int, default=DEFAULT_N_SAMPLES,
                   help=f"prior samples, and real windows per held-out half (default "
                        f"{DEFAULT_N_SAMPLES}: about 2 min of CPU sampling for the tiny preset)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                   help=f"EDM Heun steps per sample (default {DEFAULT_STEPS})")
    p.add_argument("--seed", type=int, default=0, help="fixes samples, windows and noise (default 0)")
    p.add_argument("--window-frames", type=int, default=None,
                   help="sample and embedding window in frames (default: each prior's training window)")
    p.add_argument("--whisper", default="base",
                   help="embedding model: base (default), tiny.en, or a Hugging Face Whisper directory")
    p.add_argument("--layer", type=int, default=None,
                   help="encoder layer to mean-pool (default: the final, layer-normed output)")
    p.add_argument("--n-loss-windows", type=int, default=64,
                   help="held-out windows scored by the denoising loss (default 64)")
    p.add_argument("--batch-size", type=int, default=32, help="windows per forward (default 32)")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the results as JSON")
    p.set_defaults(func=_evaluate_prior)


def _check(args: argparse.Namespace) -> None:
    for name in ("n_samples", "steps", "n_loss_windows", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    if args.n_samples < 2:
        raise ValueError(f"--n-samples={args.n_samples}: a covariance needs at least 2 samples")


def format_table(results: list[dict]) -> str:
    """One row per checkpoint: window, loss per sigma quartile, mean loss, Fréchet distance, its
    floor (real vs real), the noise-shaped control (real vs noise), frechet / floor, seconds."""
    head = (f"{'prior':<32s} {'win':>4s} {'loss q1':>8s} {'q2':>7s} {'q3':>7s} {'q4':>7s} "
            f"{'mean':>7s} {'frechet':>8s} {'floor':>7s} {'noise':>7s} {'ratio':>6s} {'s':>5s}")
    lines = [head]
    for r in results:
        q = r["loss_per_bucket"]
        floor = r["frechet_floor"]
        ratio = r["frechet"] / floor if floor > 0 else float("inf")
        noise = r["frechet_control"] if r.get("frechet_control") is not None else float("nan")
        name = r["prior"] if len(r["prior"]) <= 32 else "..." + r["prior"][-29:]
        lines.append(f"{name:<32s} {r['window_frames']:>4d} {q['q1']:>8.4f} {q['q2']:>7.4f} "
                     f"{q['q3']:>7.4f} {q['q4']:>7.4f} {r['loss_mean']:>7.4f} {r['frechet']:>8.3f} "
                     f"{floor:>7.3f} {noise:>7.3f} {ratio:>6.2f} {r['seconds']:>5.0f}")
    return "\n".join(lines)


def _evaluate_prior(args: argparse.Namespace) -> int:
    from ssip import storage
    from ssip.evaluate.prior_quality import (
        evaluate_prior,
        heldout_reference,
        load_heldout_mels,
        noise_shaped_mels,
        window_encoder,
    )
    from ssip.models.checkpoint import read_manifest

    _check(args)
    for d in args.priors:
        if not storage.exists(storage.join(d, "manifest.json")):
            raise FileNotFoundError(f"{d}: no manifest.json; is this a prior checkpoint folder "
                                    "(`ssip train prior INGEST OUT`)?")
    mels, what = load_heldout_mels(args.heldout, split=args.split)
    print(f"held-out speech: {what}")
    encoder = window_encoder(args.whisper, args.layer)
    references: dict[int, dict] = {}  # one set of held-out embeddings per window length
    results = []
    for d in args.priors:
        window = args.window_frames or int(read_manifest(d).get("config", {}).get("window_frames", 128))
        if window not in references:
            print(f"embedding {args.n_samples} held-out windows of {window} frames per half with "
                  f"whisper-{args.whisper}", file=sys.stderr, flush=True)
            references[window] = heldout_reference(
                mels, n=args.n_samples, window_frames=window, seed=args.seed,
                whisper_model=args.whisper, layer=args.layer, batch_size=args.batch_size,
                control_mels=noise_shaped_mels(mels, seed=args.seed), encoder=encoder)
        results.append(evaluate_prior(
            d, mels, n_samples=args.n_samples, seed=args.seed, num_steps=args.steps,
            window_frames=window, whisper_model=args.whisper, layer=args.layer,
            n_loss_windows=args.n_loss_windows, batch_size=args.batch_size,
            reference=references[window], encoder=encoder))
    if len(references) > 1:
        print(f"note: the priors' windows differ ({sorted(references)} frames); Fréchet distances "
              "are comparable only between rows of the same window")
    print(f"embedding: {results[0]['embedding']}; N = {args.n_samples} on each side, "
          f"{args.steps} Heun steps; loss q1..q4 = quartiles of the training sigma (low to high); "
          "frechet = prior samples vs held-out speech, floor = held-out half vs half, noise = "
          "Gaussian noise with speech's per-bin mean and std vs held-out speech")
    print(format_table(results))
    if args.json:
        storage.write_json(args.json, {"heldout": what, "results": results})
        print(f"results: {args.json}")
    return 0
