"""Scoring decoded trials against the ingest dataset, and the report (Markdown + PNG + WAV).

Input: a decoded table (parquet; columns subject, trial_id, method, mel (80, T) tensor: see
:func:`ssip.data.schema.decoded_table`) and the ingest root it was decoded from (reference mel,
audio and transcript per trial). Output, under ``out``: ``metrics.parquet`` (one row per
subject x trial x method), ``summary.csv``, ``report.md``, ``figures/*.png`` and
``wavs/<method>/<subject>/<trial>.wav``.

The metric functions are pure (:mod:`ssip.metrics`); this module does the I/O.
"""

from __future__ import annotations

import logging
import math
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ssip import metrics as M
from ssip import storage
from ssip.config import check_option, field
from ssip.data.dataset import load_trials
from ssip.data.schema import shape_column, tensor_values
from ssip.mel import MEL_FLOOR

log = logging.getLogger(__name__)


@dataclass
class EvaluateConfig:
    """How decoded trials are scored."""

    vocoder: str = field("griffinlim", help="griffinlim | hifigan: mel -> audio for STOI and ASR")
    asr_model: str = field("tiny.en", help="Whisper for ASR WER/CER (tiny.en | base | none)")
    asr_languages: dict[str, str] = field(
        default_factory=dict, help="subject -> Whisper language code for subjects who do not "
        "speak English (e.g. {sim05: fr}); their ASR uses the multilingual base model")
    chance_shifts: int = field(10, help="circular shifts for the mel-PCC chance level")
    figures_per_subject: int = field(3, help="trials per subject drawn as true vs decoded PNG")
    write_wavs: bool = field(True, help="write the vocoded audio of every decoded trial")

    def __post_init__(self) -> None:
        check_option("vocoder", self.vocoder, ["griffinlim", "hifigan"])
        check_option("asr_model", self.asr_model, ["tiny.en", "base", "none"])


def read_decoded(uri: str) -> list[dict]:
    """Rows of a decoded table: subject, trial_id, method, mel (80, T) [, draw]."""
    fs, path = storage.filesystem(uri)
    table = pq.read_table(path, filesystem=fs)
    missing = {"subject", "trial_id", "method", "mel"} - set(table.column_names)
    if missing:
        raise ValueError(f"{uri}: decoded table lacks column(s) {sorted(missing)}")
    mels = tensor_values(table, "mel")  # mel + mel_shape, or an older table's extension column
    rest = table.drop([c for c in ("mel", shape_column("mel")) if c in table.column_names]
                      ).to_pylist()
    for r, m in zip(rest, mels, strict=True):
        r["mel"] = np.asarray(m, dtype=np.float32)
    return rest


def score_trials(decoded: list[dict], references: dict[tuple[str, str], dict], cfg: EvaluateConfig,
                 vocoder=None, asr=None
                 ) -> tuple[list[dict], dict[tuple[str, str, int], np.ndarray]]:
    """Per-trial metrics; returns (rows, vocoded audio by (method, subject/trial_id, draw)).

    ``asr`` is a callable (list[ndarray audio], language or None) -> list[str], or None to
    skip ASR; a subject's language comes from ``cfg.asr_languages``.
    """
    rows: list[dict] = []
    audio_out: dict[tuple[str, str, int], np.ndarray] = {}
    for d in decoded:
        key = (d["subject"], d["trial_id"])
        if key not in references:
            raise KeyError(f"decoded trial subject={key[0]} trial={key[1]} is not in the ingest dataset")
        ref = references[key]
        mel_d, mel_r = d["mel"], ref["mel"]
        if mel_d.shape != mel_r.shape:
            raise ValueError(f"subject={key[0]} trial={key[1]} method={d['method']}: decoded mel "
                             f"{mel_d.shape} but reference {mel_r.shape}")
        pcc, pcc_why = M.mel_pcc_with_reason(mel_d, mel_r)
        chance = M.chance_level(M.mel_pcc, mel_d, mel_r, n_shifts=cfg.chance_shifts) \
            if mel_d.shape[1] >= 20 else (math.nan, math.nan)
        row = {"subject": key[0], "trial_id": key[1], "method": d["method"], "draw": d.get("draw", -1),
               "split": ref.get("split", ""), "transcript": ref.get("transcript", ""),
               "mel_pcc": pcc, "mel_pcc_flat": M.mel_pcc_flat(mel_d, mel_r),
               "mel_pcc_chance": chance[0], "mcd": M.mcd(mel_d, mel_r), "reason": pcc_why or "",
               "spread": math.nan if d.get("spread") is None else float(d["spread"])}
        if vocoder is not None:
            wav = vocoder(mel_d).numpy()[0]
            if np.isfinite(wav).all():
                audio_out[(d["method"], f"{key[0]}/{key[1]}", int(d.get("draw", -1)))] = wav
                s, why = M.stoi_with_reason(ref["audio"], wav)
                row["stoi"] = s
                row["estoi"] = M.estoi(ref["audio"], wav) if why is None else math.nan
            else:
                # A diverged sample (mel far above any speech) overflows the vocoder: score the
                # trial's audio metrics as missing, with the reason, instead of failing the run.
                row["stoi"] = row["estoi"] = math.nan
                why = (f"vocoded audio is not finite: decoded mel spans [{mel_d.min():.3g}, "
                       f"{mel_d.max():.3g}] (speech mels lie in about [{MEL_FLOOR}, 2])")
            row["reason"] = "; ".join(x for x in (row["reason"], why or "") if x)
        rows.append(row)
    if asr is not None and audio_out:
        keys = [(r["method"], f"{r['subject']}/{r['trial_id']}", int(r["draw"])) for r in rows]
        heard = [k for k in keys if k in audio_out]
        texts: dict[tuple[str, str, int], str] = {}
        for lang in sorted({cfg.asr_languages.get(k[1].split("/", 1)[0]) for k in heard},
                           key=str):
            part = [k for k in heard if cfg.asr_languages.get(k[1].split("/", 1)[0]) == lang]
            texts.update(zip(part, asr([audio_out[k] for k in part], lang), strict=True))
        for r, k in zip(rows, keys, strict=True):
            t = texts.get(k)
            r["asr"] = t if t is not None else ""
            if r["transcript"] and t is not None:
                r["wer"], r["cer"] = M.wer(r["transcript"], t), M.cer(r["transcript"], t)
            else:
                r["wer"] = r["cer"] = math.nan
        # Closed-set identification within each (subject, method), among the evaluated trials.
        groups = defaultdict(list)
        for i, r in enumerate(rows):
            groups[(r["subject"], r["method"], r["draw"])].append(i)
        for idx in groups.values():
            cands = {M.normalize_text(rows[i]["transcript"]) for i in idx}
            if len(cands) < 2:
                continue
            hits, id_chance = M.closed_set_identification([rows[i]["asr"] for i in idx],
                                                          [rows[i]["transcript"] for i in idx])
            for i, h in zip(idx, hits, strict=True):
                rows[i]["identified"], rows[i]["identified_chance"] = float(h), id_chance
    return rows, audio_out


METRIC_COLUMNS = ("mel_pcc", "mel_pcc_flat", "mel_pcc_chance", "mcd", "stoi", "estoi", "wer", "cer",
                  "identified", "identified_chance", "spread")


def method_label(row: dict) -> str:
    """Summary label: single posterior draws (draw >= 0) apart from the posterior mean / point
    estimate (draw -1 or absent), since a sharp draw and a mean score differently on PCC."""
    return f"{row['method']} (draw)" if row.get("draw", -1) >= 0 else row["method"]


def summarize(rows: list[dict]) -> list[dict]:
    """Mean of each metric per (subject, method), plus a pooled row per method (subject '*').

    Sampled methods appear twice: "dps" is the posterior mean, "dps (draw)" the single draws.
    """
    groups = defaultdict(list)
    for r in rows:
        groups[(r["subject"], method_label(r))].append(r)
        groups[("*", method_label(r))].append(r)
    out = []
    for (subject, method), rs in sorted(groups.items()):
        s = {"subject": subject, "method": method, "n_trials": len({r["trial_id"] for r in rs})}
        for c in METRIC_COLUMNS:
            vals = [r[c] for r in rs if c in r and r[c] is not None and not math.isnan(r[c])]
            s[c] = float(np.mean(vals)) if vals else math.nan
        out.append(s)
    return out


def _markdown_table(summary: list[dict]) -> str:
    cols = ["subject", "method", "n_trials"] + [c for c in METRIC_COLUMNS
                                                if any(not math.isnan(s[c]) for s in summary)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for s in summary:
        cells = [f"{s[c]:.3f}" if isinstance(s[c], float) else str(s[c]) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _figure(path: str, ref: np.ndarray, decoded: dict[str, np.ndarray], title: str) -> None:
    figure(path, {"truth": ref, **decoded}, title, scale=ref)


def figure(path: str, mels: dict[str, np.ndarray], title: str,
           scale: np.ndarray | None = None) -> None:
    """One PNG of mels (80, T) stacked, labelled by the dict's keys, on one colour scale (that
    of ``scale``, default all mels')."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref = scale if scale is not None else np.concatenate([np.ravel(m) for m in mels.values()])
    fig, axes = plt.subplots(len(mels), 1, figsize=(8, 1.8 * len(mels)), sharex=True,
                             squeeze=False)
    for ax, (name, m) in zip(axes[:, 0], mels.items(), strict=True):
        ax.imshow(m, origin="lower", aspect="auto", vmin=ref.min(), vmax=ref.max(), cmap="magma")
        ax.set_ylabel(name, fontsize=8)
    axes[-1, 0].set_xlabel("frame (10 ms)")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def prior_leakage(prior: str, ingest_root: str, *, content: bool = False,
                  subjects: Sequence[str] | None = None) -> dict:
    """The ``extra`` of a prior's manifest (its training data) with ``data.leakage``, the check
    against the val/test trials of ``ingest_root``, filled in where it is done now: by utterance
    id for a prior that lists its corpus's ids (the shipped prior: its audio is not in the
    repository); with ``content``, by id and mel content for a prior whose speech corpus is
    reachable. Otherwise the check recorded when the corpus was built stays (``ssip speech
    default --exclude-from``). ``subjects`` limits the id check to theirs (default all).
    ``data.leakage.ok`` False means a leak."""
    from ssip.data.leakage import check_id_leakage, check_leakage
    from ssip.models.checkpoint import read_manifest
    from ssip.models.prior import corpus_utterances, prior_location

    extra = dict(read_manifest(prior_location(prior)).get("extra", {}))
    data = dict(extra.get("data") or {})
    ids = corpus_utterances(prior)
    if ids is not None:
        data["leakage"] = {**check_id_leakage(ingest_root, ids, subjects=subjects),
                           "heldout_speakers": data.get("heldout_speakers", [])}
    elif content and data.get("kind") == "speech" and data.get("root") \
            and storage.exists(storage.join(str(data["root"]), "card.json")):
        leak = check_leakage(ingest_root, str(data["root"]))
        data["leakage"] = {**leak, "n_leaks": len(leak["leaks"]), "ingest_root": ingest_root,
                           "heldout_speakers": (data.get("leakage") or {}).get("heldout_speakers", [])}
    extra["data"] = data
    return extra


def calibration_statement(preset: dict) -> str:
    """The report's sentence on a per-subject calibration (a preset of ``ssip sweep``)."""
    def setting(overrides: dict) -> str:  # the guidance rule first, then the rest by name
        order = ["weight", "xi", "zeta", *sorted(set(overrides) - {"weight", "xi", "zeta"})]
        return ", ".join(f"{k}={overrides[k]}" for k in order
                         if overrides.get(k) is not None)

    parts = []
    for subject, e in sorted(preset.get("subjects", {}).items()):
        parts.append(f"{subject}: {setting(e['overrides'])} (val mel PCC {e['score']:.3f} on "
                     f"{len(e['trials'])} trial(s), {e['n_draws']} draws; the base setting "
                     f"{setting(e['default']['overrides'])}: {e['default']['score']:.3f})")
    return (f"**Calibration** (preset {preset.get('name', '?')!r}: each subject's guidance chosen "
            f"on its validation trials by `ssip sweep` before the test split was decoded): "
            + "; ".join(parts) + ".")


def evaluate(decoded_uri: str, ingest_root: str, out: str, cfg: EvaluateConfig,
             leakage_note: str = "", calibration: dict | None = None) -> list[dict]:
    """Score a decoded table against its ingest dataset and write the report; returns the summary.

    ``calibration``: a preset (``ssip sweep``'s JSON) whose per-subject settings decoded the
    table; the report states each subject's setting and its validation score.
    """
    import soundfile as sf

    decoded = read_decoded(decoded_uri)
    subjects = sorted({d["subject"] for d in decoded})
    references = {}
    for s in subjects:
        for r in load_trials(ingest_root, subject=s):
            references[(r["subject"], r["trial_id"])] = r
    vocoder = None
    if cfg.vocoder:
        from ssip.models.vocoder import get_vocoder

        vocoder = get_vocoder(cfg.vocoder)
    asr = None
    if cfg.asr_model != "none":
        from ssip.models.whisper import load_whisper, transcribe

        models = {None: load_whisper(cfg.asr_model)}

        def asr(audios, language=None):
            if language not in models:
                models[language] = load_whisper("base")
            model, tok, spec = models[language]
            return transcribe(model, tok, audios, spec, language=language)

    log.info("scoring %d decoded trial(s) of %d subject(s)", len(decoded), len(subjects))
    rows, audio = score_trials(decoded, references, cfg, vocoder, asr)
    os.makedirs(out, exist_ok=True)
    cols = sorted({k for r in rows for k in r})
    pq.write_table(pa.table({c: [r.get(c) for r in rows] for c in cols}), os.path.join(out, "metrics.parquet"))
    summary = summarize(rows)
    with open(os.path.join(out, "summary.csv"), "w") as f:
        keys = list(summary[0])
        f.write(",".join(keys) + "\n")
        for s in summary:
            f.write(",".join(str(s[k]) for k in keys) + "\n")
    wav_links = []
    if cfg.write_wavs:
        for (method, key, draw), wav in sorted(audio.items()):
            # Single posterior draws beside the mean: <trial>-draw<k>.wav; the report links the
            # posterior means and baselines (draw -1) only.
            name = key.replace(":", "_") + ("" if draw < 0 else f"-draw{draw}")
            rel = os.path.join("wavs", method, name + ".wav")
            os.makedirs(os.path.dirname(os.path.join(out, rel)), exist_ok=True)
            sf.write(os.path.join(out, rel), wav, 16000)
            if draw < 0:
                wav_links.append((method, key, rel))
    fig_links = []
    os.makedirs(os.path.join(out, "figures"), exist_ok=True)
    by_trial: defaultdict[tuple[str, str], dict[str, np.ndarray]] = defaultdict(dict)
    for d in decoded:
        if d.get("draw", -1) in (-1, 0):
            by_trial[(d["subject"], d["trial_id"])].setdefault(d["method"], d["mel"])
    for s in subjects:
        keys = sorted(k for k in by_trial if k[0] == s)[: cfg.figures_per_subject]
        for k in keys:
            rel = os.path.join("figures", f"{k[0]}_{k[1].replace('/', '_')}.png")
            _figure(os.path.join(out, rel), references[k]["mel"], by_trial[k],
                    f"subject {k[0]} trial {k[1]}: {references[k].get('transcript', '')}")
            fig_links.append((k, rel))
    lines = ["# ssip evaluation", "",
             f"Decoded: `{decoded_uri}`; reference: `{ingest_root}`; vocoder {cfg.vocoder}; "
             f"ASR {cfg.asr_model}"
             + "".join(f"; {s}: base, language {lang}" for s, lang in sorted(cfg.asr_languages.items()))
             + ".", ""]
    if leakage_note:
        lines += [f"**Leakage:** {leakage_note}", ""]
    if calibration:
        lines += [calibration_statement(calibration), ""]
    lines += ["## Summary (mean per trial; subject * pools all subjects)", "", _markdown_table(summary), "",
              "mel_pcc: mean over bins of Pearson r on speech frames; mel_pcc_chance: the same for "
              "the decoded mel circularly shifted; identified: closed-set identification rate "
              "among the evaluated trials' transcripts (chance: identified_chance); spread: "
              "posterior std over draws, mean over elements (posterior-mean rows of sampled "
              "methods).", "",
              "## Figures", ""]
    lines += [f"![{k[0]} {k[1]}]({rel})" for k, rel in fig_links]
    if wav_links:
        lines += ["", "## Audio", ""]
        lines += [f"- {method} {key}: [{os.path.basename(rel)}]({rel})" for method, key, rel in wav_links]
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    log.info("report written to %s", os.path.join(out, "report.md"))
    return summary
