"""Ship a trained prior: copy its weights into ``ssip/assets/prior/`` with a manifest that names
its data, the list of its corpus's utterance ids (the leakage check's input: the corpus itself is
not in the repository) and a model card with the held-out evaluation.

Run, after the prior's run has finished (``ssip train prior ... --name shipped-natural-tiny``) and
``ssip evaluate-prior`` has scored it on the held-out voices (``--json``)::

    .venv/bin/python bench/ship_prior.py RUN_OUT SPEECH_ROOT --speech-config speech.yaml \\
        --prior-config prior.yaml --eval evaluate-prior.json [--seconds S]

RUN_OUT is the prior folder the run wrote (model.safetensors + manifest.json, EMA weights),
SPEECH_ROOT the speech corpus it trained on (card.json), the YAML files the configs that made
them; ``--eval`` rows are printed into the card as they are (the shipped prior and the
references it is compared with). The weights are copied byte for byte (their sha256 stays the
manifest's ``weights_sha256``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _table(rows: list[dict]) -> str:
    out = ["| prior | windows seen | loss q1 | q2 | q3 | q4 | mean | Fréchet | floor | ratio |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        q = r["loss_per_bucket"]
        ratio = r["frechet"] / r["frechet_floor"] if r["frechet_floor"] > 0 else float("nan")
        out.append(f"| {r.get('label', r['prior'])} | {r.get('samples_seen', '')} | {q['q1']:.4f} | "
                   f"{q['q2']:.4f} | {q['q3']:.4f} | {q['q4']:.4f} | {r['loss_mean']:.4f} | "
                   f"{r['frechet']:.2f} | {r['frechet_floor']:.2f} | {ratio:.2f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    from ssip.data.speech_corpus import load_speech
    from ssip.models.checkpoint import read_manifest
    from ssip.models.prior import SHIPPED_DIR, UTTERANCES_NAME

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="the run's prior folder (manifest.json, model.safetensors)")
    p.add_argument("speech", help="the speech corpus root it trained on (card.json)")
    p.add_argument("--speech-config", required=True, help="the `ssip speech default` YAML")
    p.add_argument("--prior-config", required=True, help="the `ssip train prior` YAML")
    p.add_argument("--eval", default=None, help="`ssip evaluate-prior --json` output")
    p.add_argument("--seconds", type=float, default=None,
                   help="wall-clock seconds of training (default: the manifest's)")
    p.add_argument("--verdict", default=None, help="a paragraph under the table: what it shows")
    p.add_argument("--samples", default=None, metavar="PNG",
                   help="`ssip prior sample` figure of the prior, copied beside the card")
    p.add_argument("--out", default=str(SHIPPED_DIR))
    args = p.parse_args(argv)

    manifest = read_manifest(args.model)
    card = json.loads((Path(args.speech) / "card.json").read_text())
    default = json.loads((Path(args.speech) / "build" / "default_speech.json").read_text())
    ids = sorted(r["utt_id"] for r in load_speech(args.speech, columns=["utt_id"]))
    extra = manifest["extra"]
    seconds = args.seconds or float(extra.get("train_stats", {}).get("seconds", 0.0))
    # The card counts a speaker once per source (Allison records English and Spanish).
    n_speakers = len({k.split(":", 1)[1] for k in card["speakers"]})
    extra["data"] = {
        "kind": "shipped", "n_utterances": len(ids), "n_speakers": n_speakers,
        "hours": round(card["hours"], 3), "sources": card["sources"], "licenses": card["licenses"],
        "languages": card["languages"], "speakers": card["speakers"],
        "heldout_voices": default["heldout_voices"], "heldout_speakers": default["heldout_speakers"],
        "utterances": UTTERANCES_NAME, "train_seconds": round(seconds),
        "windows_per_epoch": extra.get("data", {}).get("windows_per_epoch"),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(args.model) / "model.safetensors", out / "model.safetensors")
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    (out / UTTERANCES_NAME).write_text("\n".join(ids) + "\n")
    for name, src in (("speech.yaml", args.speech_config), ("prior.yaml", args.prior_config)):
        shutil.copyfile(src, out / name)

    if args.samples:
        shutil.copyfile(args.samples, out / "samples.png")
    rows = json.loads(Path(args.eval).read_text())["results"] if args.eval else []
    heldout = json.loads(Path(args.eval).read_text()).get("heldout", "") if args.eval else ""
    stats = extra.get("train_stats", {})
    weights = yaml.safe_load(Path(args.prior_config).read_text()).get("source_weights", {})
    src_rows = "\n".join(
        f"| {s} | {v['utterances']} | {v['hours'] * 60:.1f} | "
        f"{', '.join(k.split(':', 1)[1] for k in card['speakers'] if k.startswith(s + ':'))} | "
        f"{weights.get(s, '')} |"
        for s, v in sorted(card["sources"].items()))
    lic_rows = "\n".join(f"| {k} | {v['utterances']} | {v['hours'] * 60:.1f} |"
                         for k, v in sorted(card["licenses"].items()))
    cfg = manifest["config"]
    text = f"""# The prior that ships with ssip

An EDM mel prior (Karras et al. 2022; `ssip.models.prior`, preset `{extra['preset']}`: a 2-D UNet
of {extra['params']:,} parameters, {cfg['window_frames']}-frame windows of the ssip log-mel,
sigma_data {extra['sigma_data']:.4f}), trained once on natural recorded speech and used by
`ssip decode`, `ssip pipeline` and `make demo` unless told otherwise (`--prior DIR`,
`prior_data: default`). Fine-tune it on your own speech with `ssip train prior DATA OUT --init
shipped`. Weights: `model.safetensors` ({manifest['dtypes'][next(iter(manifest['dtypes']))]},
the EMA of the training weights, half-life {cfg['ema_halflife_samples']:,} windows), sha256
`{manifest['weights_sha256']}` (also in `manifest.json`; a test checks it).

## Data

{len(ids):,} utterances, {card['hours']:.2f} h, {n_speakers} speakers: every natural
recorded voice Debian's packages and pocketsphinx ship on these machines, no formant or diphone
synthesis (espeak-ng, flite). `{UTTERANCES_NAME}` lists every utterance id; `ssip prior check
INGEST` compares them (and their twin recordings) with an ingest root's val/test trials.

| source | utterances | minutes | speaker(s) | share of training windows |
|---|---|---|---|---|
{src_rows}

| licence | utterances | minutes |
|---|---|---|
{lic_rows}

Held out entirely (never heard, for evaluation): {', '.join(default['heldout_voices'])}
({', '.join(default['heldout_speakers'])}). In ssip's default corpus these are June (a woman,
French) and Carlo (a man, Italian); `make demo` decodes the subjects who speak in their voices.
The GSM prompt voices are 8 kHz (nothing above 4 kHz), hence their small shares.

## Training

{stats.get('samples_seen', 0):,} windows seen ({stats.get('steps', 0):,} steps of
{cfg['batch_size']}; the run was planned for {cfg['total_samples']:,} and stopped at its last
checkpoint), AdamW at lr {cfg['lr']} after {cfg['warmup_samples']:,} warm-up windows,
EDM noise ln sigma ~ N({cfg['p_mean']}, {cfg['p_std']}^2), on Ray Train with one CPU worker on
a 2-core machine shared with other work: {seconds / 3600:.1f} h of wall-clock (at most 2
CPU-hours per hour). Configs: `speech.yaml` (the corpus, `ssip speech default`) and `prior.yaml`
(`ssip train prior`). Architecture: the `tiny` preset, so a DPS draw costs what it cost with
the priors each run trained before; a wider UNet was not compared on these machines.

## Held-out evaluation

`ssip evaluate-prior` on {heldout or 'the held-out voices'}: denoising loss per quartile of the
training sigma (q1 = least noise; the same noise draws for every prior) and the Fréchet distance
between Whisper-base encoder embeddings of unconditional samples and of held-out speech windows,
beside the floor (held-out half against half at the same N: what a perfect prior would score).

{_table(rows) if rows else '(not evaluated)'}

{args.verdict or ''}

{"![unconditional samples](samples.png)" + chr(10) + chr(10) + "Unconditional samples "
 "(`ssip prior sample OUT -n 4`, 18 Heun steps, seed 0): harmonics, formant movements and "
 "silences." if args.samples else ""}

## Reproduce

    ssip speech default SPEECH --config ssip/assets/prior/speech.yaml
    ssip train prior SPEECH OUT --workers 1 --cpus-per-worker 1 --name shipped-natural-tiny \\
        --storage-path RUNS --config ssip/assets/prior/prior.yaml   # resumes by --name
    ssip speech default HELDOUT --set voices=[asterisk-fr,asterisk-it] --set heldout_voices=[] \\
        --set pocketsphinx=false --set flite_voices=[] --set espeak_voices={{}} --set synth_per_voice=0
    ssip evaluate-prior OUT --heldout HELDOUT --json eval.json
    python bench/ship_prior.py OUT SPEECH --speech-config ssip/assets/prior/speech.yaml \
        --prior-config ssip/assets/prior/prior.yaml --eval eval.json

(OUT: the run's prior folder, or `RUNS/shipped-natural-tiny/checkpoint_*/model` of a run
stopped before its end, as this one was.)
"""
    (out / "MODEL_CARD.md").write_text(text)
    print(f"shipped prior -> {out}: {len(ids)} utterance ids, weights sha256 "
          f"{manifest['weights_sha256'][:16]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
