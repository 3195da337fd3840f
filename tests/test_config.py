"""Typed configs: YAML + dotted overrides, validation messages, hashing, every preset loads."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from ssip.config import ConfigError, config_hash, field, resolve, to_dict


@dataclass
class Inner:
    steps: int = field(10, help="steps")


@dataclass
class Outer:
    name: str = field("a", help="name")
    rate: float = field(1.0, help="rate")
    inner: Inner = field(default_factory=Inner, help="inner")

    def __post_init__(self):
        if self.rate <= 0:
            raise ConfigError(f"rate={self.rate} must be > 0")


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: b\ninner:\n  steps: 20\n")
    cfg = resolve(Outer, p, ["rate=2.5", "inner.steps=30"])
    assert (cfg.name, cfg.rate, cfg.inner.steps) == ("b", 2.5, 30)


def test_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="unknown key"):
        resolve(Outer, None, ["nme=x"])
    with pytest.raises(ConfigError, match=r"inner.steps: expected an integer"):
        resolve(Outer, None, ["inner.steps=abc"])
    with pytest.raises(ConfigError, match=r"rate=-1.0 must be > 0"):
        resolve(Outer, None, ["rate=-1"])
    with pytest.raises(ConfigError, match="does not exist"):
        resolve(Outer, tmp_path / "missing.yaml")


def test_hash_changes_with_values():
    a, b = Outer(), Outer(rate=2.0)
    assert config_hash(a) == config_hash(Outer()) != config_hash(b)
    assert to_dict(a)["inner"] == {"steps": 10}


def test_every_config_file_loads():
    from ssip.data.ingest import IngestConfig
    from ssip.data.simulate import CorpusConfig
    from ssip.data.speech_corpus import SpeechIngestConfig
    from ssip.decode import DecodeConfig
    from ssip.distributed.engine import RayTrainConfig
    from ssip.evaluate.report import EvaluateConfig
    from ssip.models.likelihood import LikelihoodConfig
    from ssip.models.prior import PriorConfig
    from ssip.pipeline import PipelineConfig

    classes = {"corpus": CorpusConfig, "ingest": IngestConfig, "prior": PriorConfig,
               "likelihood": LikelihoodConfig, "decode": DecodeConfig, "evaluate": EvaluateConfig,
               "pipeline": PipelineConfig, "speech": SpeechIngestConfig, "train": RayTrainConfig}
    files = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
    assert files
    for f in files:
        kind = f.stem.split("-")[0]
        assert kind in classes, f"{f.name}: name it <kind>-<variant>.yaml with kind in {sorted(classes)}"
        resolve(classes[kind], f)


def test_yaml_dict_field_replaces_its_default(tmp_path):
    """A dict-valued field (source_weights, espeak_voices) is a value, not a section: the YAML's
    mapping replaces the default whole, so {} empties it; sections still merge key by key."""
    from ssip.data.default_speech import DefaultSpeechConfig
    from ssip.pipeline import PipelineConfig

    f = tmp_path / "p.yaml"
    f.write_text("speech:\n  espeak_voices: {}\n  synth_per_voice: 3\n"
                 "evaluate:\n  asr_languages: {sim05: fr}\n")
    cfg = resolve(PipelineConfig, f)
    assert cfg.speech.espeak_voices == {} and cfg.speech.synth_per_voice == 3
    assert cfg.speech.flite_voices == DefaultSpeechConfig().flite_voices  # untouched default
    assert cfg.evaluate.asr_languages == {"sim05": "fr"}
    g = tmp_path / "s.yaml"
    g.write_text("espeak_voices: {it+m2: asterisk-it}\n")
    assert resolve(DefaultSpeechConfig, g).espeak_voices == {"it+m2": "asterisk-it"}


def test_decode_speed_section_and_moved_keys(tmp_path):
    # The speed switches live in DecodeConfig.speed (YAML section or dotted override); a config,
    # override or preset that still gives one at the top level is an error naming its new key.
    from ssip.decode import DecodeConfig, DecodeSpeed, with_overrides
    from ssip.pipeline import PipelineConfig

    path = tmp_path / "d.yaml"
    path.write_text("num_steps: 7\nspeed: {batch_size: 4}\n")
    cfg = resolve(DecodeConfig, path, ["speed.precision=fp32"])
    assert (cfg.num_steps, cfg.speed.batch_size, cfg.speed.precision) == (7, 4, "fp32")
    assert cfg.speed.compile is False  # the section merges key by key
    path.write_text("batch_size: 4\n")
    with pytest.raises(ConfigError, match=r"batch_size moved to speed\.batch_size"):
        resolve(DecodeConfig, path)
    with pytest.raises(ConfigError, match=r"^precision moved to speed\.precision"):
        resolve(DecodeConfig, None, ["precision=bf16"])
    with pytest.raises(ConfigError, match=r"decode\.compile moved to decode\.speed\.compile"):
        resolve(PipelineConfig, None, ["decode.compile=true"])
    with pytest.raises(ConfigError, match=r"decode\.batch_size moved to decode\.speed\.batch_size"):
        with_overrides(DecodeConfig(), {"batch_size": 2})  # a preset's overrides
    assert with_overrides(DecodeConfig(), {"weight": 2.0}, batch_size=3).speed == DecodeSpeed(
        batch_size=3)
    with pytest.raises(ConfigError, match=r"speed\.batch_size=0"):
        DecodeSpeed(batch_size=0)
    with pytest.raises(ConfigError, match=r"selection\.max_trials=-1"):
        resolve(DecodeConfig, None, ["selection.max_trials=-1"])
    # The pipeline picks the decoded trials with its own fields.
    with pytest.raises(ConfigError, match="decode_split"):
        resolve(PipelineConfig, None, ["decode.selection.split=val"])
