"""Checkpoints: bit-identical round trip, manifest contents, and each refusal with its message."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch

import ssip
from ssip.config import config_hash, field
from ssip.mel import MEL_VERSION
from ssip.models.checkpoint import (
    MANIFEST_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    load_checkpoint,
    read_manifest,
    save_checkpoint,
)


@dataclass
class _Cfg:
    width: int = field(8, help="test width")
    name: str = field("x", help="test name")


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(3, 5, generator=g),
        "b": torch.randn(5, generator=g, dtype=torch.float64),
        "half": torch.randn(4, 2, generator=g).to(torch.bfloat16),
        "idx": torch.arange(7, dtype=torch.int64),
        "view": torch.randn(6, 6, generator=g).t(),  # non-contiguous
    }


def test_round_trip_is_bit_identical(tmp_path):
    state = _state()
    numpy_arr = np.linspace(0, 1, 11)  # float64 numpy weights of a baseline
    written = save_checkpoint(
        str(tmp_path), {**state, "np": numpy_arr},
        {"kind": "prior", "config": _Cfg(), "extra": {"note": "t"}},
    )
    loaded, manifest = load_checkpoint(str(tmp_path), "prior")
    assert set(loaded) == {*state, "np"}
    for k, v in state.items():
        assert loaded[k].dtype == v.dtype
        assert torch.equal(loaded[k], v), k
        # Bit-identical, not just equal (NaN-free here, so view the raw bytes).
        assert loaded[k].contiguous().view(torch.uint8).numpy().tobytes() == \
            v.contiguous().view(torch.uint8).numpy().tobytes()
    assert loaded["np"].dtype == torch.float64
    np.testing.assert_array_equal(loaded["np"].numpy(), numpy_arr)
    assert manifest == written == read_manifest(str(tmp_path))
    assert manifest["kind"] == "prior"
    assert manifest["mel_version"] == MEL_VERSION
    assert manifest["ssip_version"] == ssip.__version__
    assert manifest["config"] == {"width": 8, "name": "x"}
    # Same hash as the config module gives the dataclass.
    assert manifest["config_hash"] == config_hash(_Cfg())
    assert manifest["shapes"]["w"] == [3, 5] and manifest["shapes"]["view"] == [6, 6]
    assert manifest["extra"] == {"note": "t"}
    assert manifest["created"].endswith("+00:00")
    # Nothing left behind by the write-then-rename.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([WEIGHTS_NAME, MANIFEST_NAME])


def test_refuses_wrong_kind(tmp_path):
    save_checkpoint(str(tmp_path), _state(), {"kind": "likelihood"})
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(str(tmp_path), "prior")
    msg = str(e.value)
    assert MANIFEST_NAME in msg and "'kind'" in msg and "'likelihood'" in msg and "'prior'" in msg
    # A list of allowed kinds accepts it.
    load_checkpoint(str(tmp_path), ["prior", "likelihood"])


def test_refuses_wrong_mel_version(tmp_path):
    save_checkpoint(str(tmp_path), _state(), {"kind": "prior", "mel_version": "whisper-logmel-v0"})
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(str(tmp_path), "prior")
    msg = str(e.value)
    assert MANIFEST_NAME in msg and "'mel_version'" in msg
    assert "'whisper-logmel-v0'" in msg and repr(MEL_VERSION) in msg
    # Explicitly skipping the check loads it.
    state, _ = load_checkpoint(str(tmp_path), "prior", expect_mel_version=None)
    assert torch.equal(state["w"], _state()["w"])


def test_refuses_wrong_shape_and_missing_tensor(tmp_path):
    save_checkpoint(str(tmp_path), _state(), {"kind": "baseline-nn"})
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(str(tmp_path), "baseline-nn", expect_shapes={"w": (3, 6)})
    msg = str(e.value)
    assert WEIGHTS_NAME in msg and "'w'" in msg and "[3, 6]" in msg and "[3, 5]" in msg
    with pytest.raises(CheckpointError, match=r"'missing'.*not in the checkpoint"):
        load_checkpoint(str(tmp_path), "baseline-nn", expect_shapes={"missing": (1,)})
    load_checkpoint(str(tmp_path), "baseline-nn", expect_shapes={"w": (3, 5), "idx": [7]})


def test_refuses_incomplete_or_tampered(tmp_path):
    with pytest.raises(CheckpointError, match="no manifest"):
        load_checkpoint(str(tmp_path), "prior")
    save_checkpoint(str(tmp_path), _state(), {"kind": "prior"})
    # Weights replaced after the manifest was written (e.g. an interrupted re-save).
    other = tmp_path / "other"
    save_checkpoint(str(other), {"w": torch.zeros(3, 5)}, {"kind": "prior"})
    (tmp_path / WEIGHTS_NAME).write_bytes((other / WEIGHTS_NAME).read_bytes())
    with pytest.raises(CheckpointError, match="weights_sha256"):
        load_checkpoint(str(tmp_path), "prior")


def test_manifest_requires_kind_and_is_json(tmp_path):
    with pytest.raises(CheckpointError, match="'kind' is required"):
        save_checkpoint(str(tmp_path), _state(), {"config": {}})
    save_checkpoint(str(tmp_path), _state(), {"kind": "prior", "config": {"a": 1}})
    text = (tmp_path / MANIFEST_NAME).read_text()
    assert json.loads(text)["config"] == {"a": 1}
    # No pickle: the weights file starts with the safetensors header length + JSON header.
    raw = (tmp_path / WEIGHTS_NAME).read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_len])
    assert header["__metadata__"]["kind"] == "prior"
    assert header["w"]["shape"] == [3, 5]


def test_round_trip_on_s3(moto_s3):
    import boto3

    boto3.client("s3", endpoint_url=moto_s3, region_name="us-east-1").create_bucket(Bucket="ssip-ckpt")
    uri = "s3://ssip-ckpt/runs/prior-1"
    save_checkpoint(uri, _state(), {"kind": "prior"})
    loaded, manifest = load_checkpoint(uri, "prior", expect_shapes={"w": (3, 5)})
    for k, v in _state().items():
        assert torch.equal(loaded[k], v), k
    assert manifest["kind"] == "prior"
