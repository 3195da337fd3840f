"""No leakage: the prior never trains on the audio of a trial that is evaluated.

Two checks, because ids alone can lie (real datasets often have no utterance ids, and a corpus
may hold the same recording under another name):

1. ids: an evaluated trial's ``utt_id`` is a corpus utterance id, or is the text source of a
   synthetic one (``flite/<voice>/<utt_id>``: the same words in another voice are not the
   trial's audio, but ssip's default corpus keeps them out as well).
2. content: the trial's speech segment has the same length (within ``frame_tolerance`` frames)
   as a corpus utterance and their mels correlate above ``min_correlation`` on the interior
   frames. Correlation, not difference, so a loudness change is still caught; ssip mels of the
   same audio correlate above 0.99, different prompts of the same voice and length far below.

:func:`find_leaks` is pure; :func:`check_leakage` reads an ingest root and a speech root.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from ssip.data.dataset import load_trials
from ssip.data.speech import DEBIAN_VOICES, recording_twins
from ssip.data.speech_corpus import load_speech

#: Splits whose trials are evaluated or used to choose settings: never in the prior's corpus.
HELD_OUT_SPLITS = ("val", "test")


def _interior_corr(a: np.ndarray, b: np.ndarray, edge: int = 2) -> float:
    n = min(a.shape[1], b.shape[1])
    if n <= 2 * edge + 2:
        return float("nan")
    x = a[:, edge:n - edge].ravel().astype(np.float64)
    y = b[:, edge:n - edge].ravel().astype(np.float64)
    x -= x.mean()
    y -= y.mean()
    den = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / den) if den > 0 else float("nan")


def speech_segment(trial: dict) -> np.ndarray:
    """The mel frames of a trial's speech (its window holds silence around it), (80, n)."""
    mel = np.asarray(trial["mel"], np.float32)
    rate = float(trial.get("frame_rate", 100.0) or 100.0)
    a = max(0, int(round((trial["speech_onset_s"] - trial["onset_s"]) * rate)))
    n = max(1, int(round(trial["speech_duration_s"] * rate)))
    return mel[:, a:a + n]


def find_leaks(evaluated: Sequence[dict], corpus: Iterable[dict], *, frame_tolerance: int = 3,
               min_correlation: float = 0.97) -> list[dict]:
    """Evaluated utterances found in a speech corpus.

    Parameters
    ----------
    evaluated : sequence of dict
        ``trial_id``, ``utt_id`` (may be ``""``) and ``segment`` (80, n) mel of the speech.
    corpus : iterable of dict
        ``utt_id`` and ``mel`` (80, T) of every corpus utterance.

    Returns
    -------
    list of dict
        One per leak: ``trial_id``, ``utt_id``, ``corpus_utt_id``, ``how`` (``id``,
        ``synthetic-text`` or ``content``) and ``correlation`` (content matches).
    """
    ev_ids = {part: e["trial_id"] for e in evaluated for part in utterance_ids(e.get("utt_id", ""))}
    by_len: dict[int, list[dict]] = {}
    for e in evaluated:
        by_len.setdefault(int(e["segment"].shape[1]), []).append(e)
    leaks = []
    for row in corpus:
        uid = row["utt_id"]
        if uid in ev_ids:
            leaks.append({"trial_id": ev_ids[uid], "utt_id": uid, "corpus_utt_id": uid,
                          "how": "id", "correlation": float("nan")})
        else:
            parts = uid.split("/", 2)
            if len(parts) == 3 and parts[2] in ev_ids:
                leaks.append({"trial_id": ev_ids[parts[2]], "utt_id": parts[2],
                              "corpus_utt_id": uid, "how": "synthetic-text",
                              "correlation": float("nan")})
        mel = np.asarray(row["mel"], np.float32)
        t = mel.shape[1]
        for n in range(t - frame_tolerance, t + frame_tolerance + 1):
            for e in by_len.get(n, ()):
                r = _interior_corr(e["segment"], mel)
                if r >= min_correlation:
                    leaks.append({"trial_id": e["trial_id"], "utt_id": e.get("utt_id", ""),
                                  "corpus_utt_id": uid, "how": "content", "correlation": r})
    return leaks


def evaluated_utterances(ingest_root: str, splits: Sequence[str] = HELD_OUT_SPLITS) -> set[str]:
    """Utterance ids of every trial in ``splits`` of an ingest root (the ones to keep out)."""
    ids: set[str] = set()
    for split in splits:
        for t in load_trials(ingest_root, split=split, columns=["schema_version", "utt_id"]):
            ids.update(utterance_ids(t["utt_id"]))
    return ids


#: Joins the utterance ids of a phrase trial (several prompts spoken as one trial).
PHRASE_JOIN = "+"


def utterance_ids(utt_id: str) -> list[str]:
    """The utterances a trial speaks: its id, or each prompt of a phrase (``a+b+c``)."""
    return [u for u in (utt_id or "").split(PHRASE_JOIN) if u]


def check_leakage(ingest_root: str, speech_root: str, splits: Sequence[str] = HELD_OUT_SPLITS,
                  **kw) -> dict:
    """Compare the held-out trials of an ingest root with a speech corpus (ids and content).

    Returns
    -------
    dict
        ``n_evaluated``, ``n_without_id`` (checked by content only), ``n_corpus``, ``leaks``
        (see :func:`find_leaks`) and ``ok``.
    """
    evaluated = []
    for split in splits:
        for t in load_trials(ingest_root, split=split,
                             columns=["schema_version", "trial_id", "utt_id", "mel", "onset_s",
                                      "speech_onset_s", "speech_duration_s", "frame_rate"]):
            evaluated.append({"trial_id": t["trial_id"], "utt_id": t["utt_id"],
                              "segment": speech_segment(t)})
    corpus = load_speech(speech_root, columns=["utt_id", "mel"])
    leaks = find_leaks(evaluated, corpus, **kw)
    return {"n_evaluated": len(evaluated),
            "n_without_id": sum(1 for e in evaluated if not e["utt_id"]),
            "n_corpus": len(corpus), "splits": list(splits), "leaks": leaks, "ok": not leaks}


def check_id_leakage(ingest_root: str, corpus_ids: set[str],
                     splits: Sequence[str] = HELD_OUT_SPLITS,
                     subjects: Sequence[str] | None = None) -> dict:
    """Compare the held-out trials of an ingest root (of ``subjects``, default all) with a corpus
    known only by its utterance ids (the shipped prior's: its audio is not in the repository),
    by id and by twin recording (:func:`ssip.data.speech.recording_twins`). Same keys as
    :func:`check_leakage`, plus ``subjects``."""
    trials = [t for split in splits for subject in (subjects or [None]) for t in load_trials(
        ingest_root, split=split, subject=subject,
        columns=["schema_version", "trial_id", "utt_id"])]
    ev_ids = {u: t["trial_id"] for t in trials for u in utterance_ids(t["utt_id"])}
    voices = sorted({u.split("/", 1)[0] for u in ev_ids} & set(DEBIAN_VOICES))
    twins = recording_twins(voices, set(ev_ids))
    leaks = []
    for uid in sorted(corpus_ids):
        parts = uid.split("/", 2)
        if uid in ev_ids:
            hit, how = uid, "id"
        elif uid in twins:
            hit, how = twins[uid], "same-recording"
        elif len(parts) == 3 and parts[2] in ev_ids:
            hit, how = parts[2], "synthetic-text"
        else:
            continue
        leaks.append({"trial_id": ev_ids[hit], "utt_id": hit, "corpus_utt_id": uid, "how": how,
                      "correlation": float("nan")})
    return {"n_evaluated": len(trials), "n_without_id": sum(1 for t in trials if not t["utt_id"]),
            "n_corpus": len(corpus_ids), "splits": list(splits), "leaks": leaks,
            "n_leaks": len(leaks), "ok": not leaks, "ingest_root": ingest_root,
            "subjects": list(subjects or []),
            "compared": "utterance id and twin recordings (not content)"}


def leakage_statement(prior_extra: dict, ingest_root: str, split: str) -> str:
    """One sentence for a report: what the prior trained on and whether evaluated audio was in it.

    ``prior_extra`` is the ``extra`` of a prior checkpoint's manifest (its ``data`` entry is
    written by ``ssip train prior``).
    """
    data = prior_extra.get("data") or {}
    if data.get("kind") == "trials":
        same = data.get("root") == ingest_root
        return (f"the prior trained on the train-split trials of {data.get('root')}"
                + (f"; the evaluated {split} split is disjoint from them (each utterance is one "
                   f"trial's)." if same else f", not on {ingest_root}: check it holds none of "
                                                 f"the evaluated trials' audio."))
    if data.get("kind") in ("speech", "shipped"):
        head = (f"the prior trained on the speech corpus {data.get('root')} "
                f"({data.get('n_utterances')} utterances, {data.get('n_speakers')} speakers)")
        if data.get("kind") == "shipped":
            head = (f"the prior is the one shipped with ssip ({data.get('n_utterances')} "
                    f"utterances of natural recorded speech, {data.get('n_speakers')} speakers)")
        leak = data.get("leakage")
        if not leak:
            return head + "; it was not checked against the evaluated trials (no leakage.json)."
        verdict = "no evaluated trial's audio is in it" if leak.get("ok") else \
            f"{leak.get('n_leaks')} LEAK(S) of evaluated trials"
        where = "" if leak.get("ingest_root") == ingest_root else \
            f" (checked against {leak.get('ingest_root')}, not {ingest_root})"
        held = ", ".join(leak.get("heldout_speakers") or []) or "none"
        how = leak.get("compared", "utterance id and mel content")
        return (f"{head}; {verdict}: {leak.get('n_evaluated')} {'/'.join(leak.get('splits', []))} "
                f"trials compared by {how}{where}; voices held out of the prior entirely: "
                f"{held}.")
    return "the prior's checkpoint does not record its training data (trained before ssip 0.2?)."
