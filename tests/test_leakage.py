"""No-leakage check: ids, synthetic texts and content (mel correlation) of evaluated trials."""

from __future__ import annotations

import numpy as np

from ssip.data.leakage import find_leaks, speech_segment
from ssip.data.simulate import prompt_mel
from ssip.data.speech import read_asterisk


def _corpus():
    utts = read_asterisk(limit=12)
    return utts, [{"utt_id": u.utt_id, "mel": prompt_mel(u)} for u in utts]


def test_content_match_survives_renaming_and_gain():
    utts, corpus = _corpus()
    u = utts[5]
    # The evaluated trial: same audio 6 dB quieter, no id (as in real datasets).
    quiet = type(u)(utt_id="", audio=u.audio * 0.5, transcript="", speaker="", source="")
    seg = prompt_mel(quiet)
    leaks = find_leaks([{"trial_id": "t1", "utt_id": "", "segment": seg}], corpus)
    assert [(x["corpus_utt_id"], x["how"]) for x in leaks] == [(u.utt_id, "content")]
    assert leaks[0]["correlation"] > 0.99
    # Two frames cut off the end still match; other prompts never do.
    leaks = find_leaks([{"trial_id": "t1", "utt_id": "", "segment": seg[:, :-2]}], corpus)
    assert [x["corpus_utt_id"] for x in leaks] == [u.utt_id]
    others = [c for c in corpus if c["utt_id"] != u.utt_id]
    assert find_leaks([{"trial_id": "t1", "utt_id": "", "segment": seg}], others) == []


def test_id_and_synthetic_text_leaks():
    ev = [{"trial_id": "t9", "utt_id": "asterisk-en/elsewhere", "segment": np.zeros((80, 7))}]
    rows = [{"utt_id": "asterisk-en/elsewhere", "mel": np.ones((80, 50))},
            {"utt_id": "flite/rms/asterisk-en/elsewhere", "mel": np.ones((80, 60))},
            {"utt_id": "flite/rms/asterisk-en/other", "mel": np.ones((80, 60))}]
    leaks = find_leaks(ev, rows)
    assert [(x["corpus_utt_id"], x["how"]) for x in leaks] == [
        ("asterisk-en/elsewhere", "id"), ("flite/rms/asterisk-en/elsewhere", "synthetic-text")]


def test_every_prompt_of_a_phrase_trial_is_held_out():
    """A phrase trial (the simulator's phrase_fraction) speaks several prompts: utt_id a+b+c.
    Each of them is an evaluated utterance and a leak when the corpus holds it."""
    from ssip.data.leakage import PHRASE_JOIN, utterance_ids

    phrase = PHRASE_JOIN.join(["asterisk-en/a", "asterisk-en/b", "asterisk-en/c"])
    assert utterance_ids(phrase) == ["asterisk-en/a", "asterisk-en/b", "asterisk-en/c"]
    assert utterance_ids("") == [] and utterance_ids("asterisk-en/a") == ["asterisk-en/a"]
    ev = [{"trial_id": "t3", "utt_id": phrase, "segment": np.zeros((80, 7))}]
    rows = [{"utt_id": "asterisk-en/b", "mel": np.ones((80, 50))},
            {"utt_id": "flite/rms/asterisk-en/c", "mel": np.ones((80, 60))},
            {"utt_id": "asterisk-en/d", "mel": np.ones((80, 60))}]
    leaks = find_leaks(ev, rows)
    assert [(x["trial_id"], x["corpus_utt_id"], x["how"]) for x in leaks] == [
        ("t3", "asterisk-en/b", "id"), ("t3", "flite/rms/asterisk-en/c", "synthetic-text")]


def test_speech_segment_cuts_the_speech_out_of_the_window():
    mel = np.arange(80 * 300, dtype=np.float32).reshape(80, 300)
    t = {"mel": mel, "onset_s": 10.0, "speech_onset_s": 10.5, "speech_duration_s": 1.2,
         "frame_rate": 100.0}
    assert np.array_equal(speech_segment(t), mel[:, 50:170])
