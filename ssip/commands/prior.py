"""`ssip prior sample OUT [--prior DIR] -n N`: listen to and look at what a mel prior generates;
`ssip prior check INGEST [--prior DIR]`: is any evaluated trial's audio in the prior's corpus?

Writes N unconditional samples of the prior (the EDM Heun sampler, sample i seeded by (seed, i)
alone) as ``OUT/sample_XX.npy`` (the (80, T) ssip mel), ``OUT/sample_XX.wav`` (16 kHz, vocoded)
and one figure of them all, ``OUT/samples.png``. A prior that learned speech shows harmonics and
formant tracks there; one that did not shows blotches.
"""

from __future__ import annotations

import argparse

# Kept here (not imported from ssip.evaluate.prior_quality) so `ssip --help` does not import torch.
DEFAULT_STEPS = 18
#: `ssip prior check`: an evaluated (val/test) trial's utterance is in the prior's corpus.
EXIT_LEAKS = 5


def register(sub) -> None:
    p = sub.add_parser("prior", help="mel prior tools: unconditional samples, leakage check")
    psub = p.add_subparsers(dest="prior_command", required=True)
    s = psub.add_parser("sample", help="unconditional samples as .npy mels, WAVs and a figure")
    s.add_argument("out", help="folder to write the samples to")
    s.add_argument("--prior", default="shipped", help="'shipped' (default: the prior that ships "
                   "with ssip) or a prior checkpoint folder (ssip train prior)")
    s.add_argument("-n", "--n-samples", type=int, default=8, help="samples (default 8)")
    s.add_argument("--frames", type=int, default=None,
                   help="frames (10 ms) per sample, rounded up to the UNet's factor (default: the "
                        "prior's training window)")
    s.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                   help=f"EDM Heun steps (default {DEFAULT_STEPS})")
    s.add_argument("--seed", type=int, default=0, help="sample i is seeded by (seed, i)")
    s.add_argument("--vocoder", default="griffinlim", choices=("griffinlim", "hifigan", "none"),
                   help="mel -> audio for the WAVs ('none': no WAVs)")
    s.set_defaults(func=_sample)

    c = psub.add_parser("check", help=f"is the audio of any val/test trial of INGEST in the "
                        f"prior's training corpus? exit 0 no, {EXIT_LEAKS} yes (listed)")
    c.add_argument("ingest", help="ingest root whose val/test trials are evaluated")
    c.add_argument("--prior", default="shipped", help="'shipped' (default) or a prior folder")
    c.add_argument("--subject", action="append", default=None,
                   help="check only this subject's trials (repeatable; default: all)")
    c.add_argument("--out", default=None, metavar="JSON", help="also write the check as JSON")
    c.set_defaults(func=_check)


def _check(args: argparse.Namespace) -> int:
    from ssip import storage
    from ssip.data.leakage import leakage_statement
    from ssip.evaluate.report import prior_leakage

    extra = prior_leakage(args.prior, args.ingest, content=True, subjects=args.subject)
    leak = extra["data"].get("leakage")
    print(leakage_statement(extra, args.ingest, "val/test"))
    if args.out:
        storage.write_json(args.out, {"prior": args.prior, "ingest": args.ingest,
                                      "data": extra["data"]})
    if not leak or leak.get("ingest_root") != args.ingest:
        if extra["data"].get("kind") == "trials" and extra["data"].get("root") == args.ingest:
            return 0  # its own train split: disjoint from val/test by construction
        print(f"ssip prior check: {args.prior} cannot be checked against {args.ingest} (its "
              "corpus is neither listed nor reachable)")
        return 2
    for x in leak["leaks"]:
        print(f"  LEAK {x['trial_id']} ({x['utt_id']}) = corpus {x['corpus_utt_id']} ({x['how']})")
    return 0 if leak["ok"] else EXIT_LEAKS


def _sample(args: argparse.Namespace) -> int:
    from pathlib import Path

    import numpy as np

    from ssip.evaluate.prior_quality import sample_prior
    from ssip.evaluate.report import figure
    from ssip.mel import SAMPLE_RATE
    from ssip.models.prior import load_prior

    if args.n_samples < 1 or args.steps < 1:
        raise ValueError(f"ssip prior sample: -n {args.n_samples} and --steps {args.steps} must "
                         f"be >= 1")
    model, manifest = load_prior(args.prior)
    factor = int(getattr(model, "factor", 8))
    frames = args.frames or int(manifest.get("config", {}).get("window_frames", 128))
    frames = -(-max(frames, 1) // factor) * factor
    mels = sample_prior(model, args.n_samples, frames, num_steps=args.steps, seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    vocoder = None
    if args.vocoder != "none":
        from ssip.models.vocoder import get_vocoder

        vocoder = get_vocoder(args.vocoder)
    for i, mel in enumerate(mels):
        np.save(out / f"sample_{i:02d}.npy", mel, allow_pickle=False)
        if vocoder is not None:
            import soundfile as sf

            audio = vocoder(mel)[0].numpy()
            peak = float(np.max(np.abs(audio), initial=0.0))
            sf.write(str(out / f"sample_{i:02d}.wav"), audio / max(peak, 1.0), SAMPLE_RATE,
                     subtype="PCM_16")
    figure(str(out / "samples.png"), {f"sample {i}": m for i, m in enumerate(mels)},
           f"{args.n_samples} unconditional samples of {args.prior} ({args.steps} steps, "
           f"seed {args.seed})")
    print(f"{args.n_samples} samples of {frames} frames -> {out}/sample_XX.npy"
          f"{', .wav' if vocoder is not None else ''} and samples.png")
    return 0
