"""Prior quality: one speaker's English prompts versus the default multi-speaker corpus, same budget.

Both arms run ``ssip pipeline ROOT/<arm>`` on ONE simulated corpus (``ROOT/corpus``, the default
corpus config: sim01-sim04 speak Allison's English prompts, sim05 speaks June's French prompts, a
voice neither prior ever hears; ``--heldout-voice`` below) with the same prior budget, likelihood
and decoder settings (configs/pipeline-quality.yaml plus the overrides below); only the prior's
speech differs:

- ``single``: Allison's English prompts alone (less every val/test trial's prompt), what the
  prior heard before the multi-speaker corpus existed;
- ``multi``: the default corpus (ssip.data.default_speech: 5 Debian voices in 4 languages, 3 GSM
  prompt sets, pocketsphinx, flite and espeak-ng voices; June held out), default source weights.

Printed per arm: the held-out denoising loss per noise-level bucket and the Whisper-Fréchet
distance of unconditional samples (``ssip evaluate-prior``) against the held-out speech of each
voice (the test-split trials' speech: Allison's of sim01-sim04 and June's of sim05), beside the
real-versus-real floor; then DPS against the regression baselines on sim05 (the held-out voice;
``--subjects sim01 sim05`` adds the prompts' own voice), as bench/quality.py prints them.

``--heldout-voice VOICE`` (a DEBIAN_VOICES source; default ``asterisk-fr``, June) makes another
voice sim05's: the corpus is built with ``extra_voices=[VOICE]`` (when ROOT/corpus is new), both
priors' corpora hold it out (``speech.heldout_voices``; ``multi`` then hears June) and Whisper
transcribes sim05 in its language (``evaluate.asr_languages``); e.g. ``asterisk-it``, Carlo, the
only natural male voice, against the female Allison of ``single``.

Run: ``.venv/bin/python bench/prior.py [--root runs/prior-bench] [--samples 6000]
[--heldout-voice asterisk-fr]`` (about 1.2 h on 2 CPU cores; resumable: a re-run skips what is
done and prints).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

ARMS = {
    "single": ["speech.voices=[asterisk-en]", "speech.pocketsphinx=false",
               "speech.flite_voices=[]", "speech.espeak_voices={}"],
    "multi": [],
}


def heldout_by_voice(ingest: str, heldout: str) -> dict[str, list]:
    """Test-split speech segments (mel frames of the speech only) grouped by the corpus voice;
    ``heldout`` names sim05's (e.g. ``june``)."""
    from ssip.data.dataset import load_trials
    from ssip.data.leakage import speech_segment

    sim05 = f"{heldout} (sim05, held out)"
    out: dict[str, list] = {"allison (sim01-04)": [], sim05: []}
    for t in load_trials(ingest, split="test", columns=[
            "schema_version", "subject", "trial_id", "mel", "onset_s", "speech_onset_s",
            "speech_duration_s", "frame_rate"]):
        key = sim05 if t["subject"] == "sim05" else "allison (sim01-04)"
        out[key].append(speech_segment(t))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default="runs/prior-bench")
    p.add_argument("--corpus", default=None,
                   help="the simulated corpus (default ROOT/corpus; another root's corpus lets a "
                        "second budget reuse its ingest, likelihoods and baselines)")
    p.add_argument("--config", default=str(ROOT / "configs" / "pipeline-quality.yaml"))
    p.add_argument("--samples", type=int, default=6000, help="prior budget (windows seen), both arms")
    p.add_argument("--draws", type=int, default=8, help="DPS posterior draws per trial")
    p.add_argument("--n-eval", type=int, default=64, help="prior samples per Fréchet distance")
    p.add_argument("--heldout-voice", default="asterisk-fr",
                   help="sim05's voice, held out of both priors (a DEBIAN_VOICES source)")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--subjects", nargs="+", default=["sim05"],
                   help="subjects to decode (sim05: the held-out voice; add sim01 for the "
                        "prompts' own voice)")
    args = p.parse_args(argv)

    from quality import margins, table

    from ssip.cli import main as ssip_main
    from ssip.commands.pipeline import run
    from ssip.config import resolve
    from ssip.data.speech import DEBIAN_VOICES
    from ssip.evaluate.prior_quality import evaluate_prior
    from ssip.pipeline import PipelineConfig

    root = Path(args.root)
    corpus = Path(args.corpus) if args.corpus else root / "corpus"
    held = DEBIAN_VOICES[args.heldout_voice]
    if not (corpus / "corpus.json").exists():
        assert ssip_main(["corpus", "build", str(corpus),
                          "--set", f"extra_voices=[{held.source}]"]) == 0
    results = {}
    for arm in args.arms:
        overrides = [f"source={corpus}", f"subjects=[{', '.join(args.subjects)}]",
                     f"prior.total_samples={args.samples}", f"decode.n_draws={args.draws}",
                     "decode.methods=[dps, linear, nn]",
                     f"speech.heldout_voices=[{held.source}]",
                     f"evaluate.asr_languages={{sim05: {held.language.split('-')[0]}}}",
                     *ARMS[arm]]
        run(resolve(PipelineConfig, args.config, overrides), str(root / arm))
        cache = root / arm / "prior_quality.json"
        if cache.exists():
            results[arm] = json.loads(cache.read_text())
            continue
        res = {}
        for voice, mels in heldout_by_voice(str(root / arm / "ingest"),
                                            held.speaker.split(":")[1]).items():
            r = evaluate_prior(str(root / arm / "prior"), mels, n_samples=args.n_eval, seed=0)
            res[voice] = {k: r[k] for k in ("loss_per_bucket", "loss_mean", "frechet",
                                            "frechet_floor", "n")}
        manifest = json.loads((root / arm / "prior" / "manifest.json").read_text())
        res["data"] = {k: v for k, v in manifest["extra"]["data"].items() if k != "leakage"}
        cache.write_text(json.dumps(res, indent=2) + "\n")
        results[arm] = res

    print(f"\nprior quality, same budget ({args.samples} windows), {args.n_eval} samples per "
          f"distance; lower is better\n")
    for arm, res in results.items():
        d = res["data"]
        print(f"{arm}: {d.get('n_utterances')} utterances, {d.get('n_speakers')} speakers, "
              f"sources {d.get('per_source')}")
        for voice, r in res.items():
            if voice == "data":
                continue
            buckets = " ".join(f"{k} {v:.4f}" for k, v in r["loss_per_bucket"].items())
            print(f"  held-out {voice:24s} loss {r['loss_mean']:.4f} [{buckets}]  "
                  f"Frechet {r['frechet']:.2f} (real-vs-real floor {r['frechet_floor']:.2f})")
    from quality import read_summary

    for arm in results:
        rows = read_summary(str(root / arm))
        print(f"\nDPS with the {arm} prior (means over test trials)\n")
        print(table(rows, {"sim05": held.speaker}))
        print(margins(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
