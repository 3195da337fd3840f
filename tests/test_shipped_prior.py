"""The prior that ships with ssip: its weights are the ones its manifest names, it denoises a clip
of a voice it never heard to the stored loss, and `ssip prior check` finds evaluated trials whose
utterances it trained on (by id and by twin recording)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from ssip.cli import main as ssip_main
from ssip.data.leakage import check_id_leakage
from ssip.models.prior import (
    SHIPPED,
    SHIPPED_DIR,
    corpus_utterances,
    count_parameters,
    denoising_loss,
    load_prior,
)
from tests.conftest import write_trials_ingest

#: sha256 of ssip/assets/prior/model.safetensors (bench/ship_prior.py printed it; MODEL_CARD.md).
SHIPPED_SHA256 = "5905d58a4fa29f713fb3c52ee78c138170a1342dae556b129ca46fdd0f0eab46"
#: Held-out denoising loss of the shipped prior on June's first long prompt (see the test below),
#: at these noise levels, computed once when the weights were shipped.
SIGMAS = [0.05, 0.2, 0.8, 3.0]
STORED_LOSS = [0.56147, 0.22112, 0.18509, 0.41085]


def test_shipped_weights_are_the_ones_the_manifest_names():
    manifest = json.loads((SHIPPED_DIR / "manifest.json").read_text())
    digest = hashlib.sha256((SHIPPED_DIR / "model.safetensors").read_bytes()).hexdigest()
    assert digest == manifest["weights_sha256"] == SHIPPED_SHA256
    model, loaded = load_prior(SHIPPED)
    assert loaded["weights_sha256"] == digest
    assert count_parameters(model) == manifest["extra"]["params"]
    data = manifest["extra"]["data"]
    ids = corpus_utterances(SHIPPED)
    assert ids is not None and len(ids) == data["n_utterances"]
    # The held-out voices (June, Carlo) are nowhere in its corpus; no synthetic voice is.
    assert data["heldout_voices"] == ["asterisk-fr", "asterisk-it"]
    assert not [u for u in ids if u.split("/", 1)[0] in ("asterisk-fr", "asterisk-it", "flite",
                                                        "espeak")]
    assert (SHIPPED_DIR / "MODEL_CARD.md").read_text().count(digest) == 1


def _june_window(frames: int = 128) -> torch.Tensor:
    from ssip.data.speech import read_voice
    from ssip.mel import log_mel, normalize_loudness

    for u in read_voice("asterisk-fr", limit=40):
        mel = log_mel(normalize_loudness(u.audio))
        if mel.shape[-1] >= frames:
            return mel[..., :frames].reshape(1, 80, frames).float()
    raise AssertionError("no June prompt of 128 frames among the first 40")


def test_shipped_prior_denoises_a_voice_it_never_heard_to_the_stored_loss():
    model, _ = load_prior(SHIPPED)
    loss = denoising_loss(model, _june_window(), SIGMAS, seed=0)
    np.testing.assert_allclose(loss, STORED_LOSS, rtol=2e-3)
    # A prior that learned speech denoises far below the loss of outputting the noisy input's
    # mean (about 1 at every sigma under EDM's weighting).
    assert max(loss) < 0.8


def _trials(utt_ids: dict[str, str]) -> list[dict]:
    rng = np.random.default_rng(0)
    return [{"mel": rng.standard_normal((80, 16)).astype(np.float32),
             "neural": rng.standard_normal((16, 4)).astype(np.float32), "split": split,
             "utt_id": uid} for uid, split in utt_ids.items()]


def test_prior_check_finds_evaluated_utterances_in_the_shipped_corpus(tmp_path, capsys):
    ids = corpus_utterances(SHIPPED)
    assert "asterisk-en/queue-seconds" in ids and "asterisk-en/seconds" in ids
    leaky = write_trials_ingest(tmp_path / "leaky", _trials({
        "asterisk-en/queue-seconds": "test", "asterisk-fr/vm-goodbye": "val",
        "asterisk-en/vm-goodbye": "train"}))  # a train trial may be in the prior's corpus
    assert ssip_main(["prior", "check", leaky, "--out", str(tmp_path / "check.json")]) == 5
    out = capsys.readouterr().out
    assert "LEAK rec1/test0000 (asterisk-en/queue-seconds)" in out
    check = json.loads((tmp_path / "check.json").read_text())["data"]["leakage"]
    assert {(x["corpus_utt_id"], x["how"]) for x in check["leaks"]} == {
        ("asterisk-en/queue-seconds", "id"), ("asterisk-en/seconds", "same-recording")}
    assert check["n_evaluated"] == 2

    # Only the subjects asked about: another subject's leak is not theirs.
    two = write_trials_ingest(tmp_path / "two", [
        *_trials({"asterisk-en/queue-seconds": "test"}),
        *[{**t, "subject": "S2"} for t in _trials({"asterisk-fr/vm-goodbye": "test"})]])
    assert ssip_main(["prior", "check", two, "--subject", "S2"]) == 0
    assert ssip_main(["prior", "check", two, "--subject", "S1"]) == 5
    capsys.readouterr()

    clean = write_trials_ingest(tmp_path / "clean", _trials({
        "asterisk-fr/vm-goodbye": "test", "asterisk-it/vm-goodbye": "val"}))
    assert ssip_main(["prior", "check", clean]) == 0
    assert "no evaluated trial's audio is in it" in capsys.readouterr().out


def test_twin_recordings_count_as_leaks_without_the_id(tmp_path):
    # The corpus holds only the twin ("seconds") of the evaluated prompt ("queue-seconds").
    root = write_trials_ingest(tmp_path, _trials({"asterisk-en/queue-seconds": "test"}))
    leak = check_id_leakage(root, {"asterisk-en/seconds", "asterisk-es/seconds"})
    assert [(x["corpus_utt_id"], x["how"], x["utt_id"]) for x in leak["leaks"]] == [
        ("asterisk-en/seconds", "same-recording", "asterisk-en/queue-seconds")]
    assert not leak["ok"]


def test_init_shipped_starts_training_from_the_shipped_weights(tmp_path):
    """`ssip train prior --init shipped` fine-tunes: with a zero learning rate the saved (EMA)
    weights are the shipped ones, and the shipped data mean and sigma_data are kept, not the
    new data's; a preset other than the shipped one is refused."""
    from ssip.config import ConfigError
    from tests.conftest import make_speech_ingest

    root = str(make_speech_ingest(tmp_path / "ingest", n_trials=4, step_s=0.75, duration_s=0.6))
    out = tmp_path / "tuned"
    assert ssip_main(["train", "prior", root, str(out), "--init", SHIPPED,
                      "--set", "total_samples=2", "--set", "batch_size=2",
                      "--set", "window_frames=32", "--set", "lr=0", "--set", "warmup_samples=0",
                      "--set", "log_every_samples=2"]) == 0
    shipped, _ = load_prior(SHIPPED)
    tuned, manifest = load_prior(str(out))
    assert manifest["config"]["init"] == SHIPPED
    for (name, a), b in zip(shipped.state_dict().items(), tuned.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=name)
    with pytest.raises(ConfigError, match="init='shipped' is a 'tiny' prior"):
        ssip_main(["train", "prior", root, str(tmp_path / "x"), "--init", SHIPPED,
                   "--set", "preset=base", "--set", "total_samples=2"])
