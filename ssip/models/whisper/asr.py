"""Batched greedy Whisper ASR on 16 kHz audio or on ssip mels."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from ssip.mel import HOP_LENGTH, MEL_FLOOR, N_MELS, SAMPLE_RATE, log_mel, normalize_loudness
from ssip.models.whisper.convert import N_FRAMES, WhisperSpec


def pad_mel(mel: torch.Tensor, n_frames: int = N_FRAMES) -> torch.Tensor:
    """Pad (..., 80, T) with the ssip mel floor to ``n_frames``, as Whisper pads with silence."""
    t = mel.shape[-1]
    if t > n_frames:
        raise ValueError(f"mel of {t} frames is longer than Whisper's {n_frames}-frame window")
    return nn.functional.pad(mel, (0, n_frames - t), value=MEL_FLOOR)


def mels_for_asr(audio: Sequence[np.ndarray] | np.ndarray) -> torch.Tensor:
    """ssip mels of loudness-normalised 16 kHz clips, padded to 3000 frames: (B, 80, 3000)."""
    if isinstance(audio, np.ndarray | torch.Tensor) and np.ndim(audio) == 1:
        audio = [audio]
    out = []
    for i, clip in enumerate(audio):
        clip = np.asarray(clip, dtype=np.float32)
        if clip.ndim != 1:
            raise ValueError(f"audio clip {i} has shape {clip.shape}; pass mono 1-D 16 kHz clips")
        if len(clip) > N_FRAMES * HOP_LENGTH:
            raise ValueError(
                f"audio clip {i} lasts {len(clip) / SAMPLE_RATE:.1f} s; transcribe takes clips of "
                f"at most {N_FRAMES * HOP_LENGTH / SAMPLE_RATE:.0f} s (split it first)"
            )
        out.append(pad_mel(log_mel(torch.from_numpy(normalize_loudness(clip)))))
    return torch.stack(out)


@torch.no_grad()
def greedy_decode(
    model,
    spec: WhisperSpec,
    mels: torch.Tensor,
    max_new_tokens: int = 224,
) -> list[list[int]]:
    """Greedy decoding with a KV cache; token ids of each transcript (no prompt, no EOT).

    Parameters
    ----------
    mels : Tensor, shape (B, 80, 3000)
        Whisper-length log-mels.
    max_new_tokens : int
        Cap on generated tokens (Whisper's default sample length is 224).
    """
    p = next(model.parameters())
    enc = model.model.encoder(mels.to(device=p.device, dtype=p.dtype)).last_hidden_state
    batch = mels.shape[0]
    limit = model.config.max_target_positions - len(spec.prompt)
    max_new_tokens = min(max_new_tokens, limit)
    vocab = model.config.vocab_size
    # Everything from EOT on is special (SOT, languages, tasks, timestamps): a transcript holds
    # text tokens and ends with EOT, so mask all specials except EOT, plus the non-speech tokens.
    mask = torch.zeros(vocab, dtype=torch.bool, device=p.device)
    mask[spec.eot + 1 :] = True
    mask[list(spec.suppress)] = True
    mask_begin = mask.clone()
    mask_begin[list(spec.suppress_begin)] = True

    tokens = torch.tensor([spec.prompt] * batch, device=p.device)  # (B, P)
    done = torch.zeros(batch, dtype=torch.bool, device=p.device)
    out: list[list[int]] = [[] for _ in range(batch)]
    cache = None
    step_input = tokens
    for step in range(max_new_tokens):
        dec = model.model.decoder(
            input_ids=step_input, encoder_hidden_states=enc, cache=cache, use_cache=True
        )
        cache = dec.cache
        logits = model.proj_out(dec.last_hidden_state[:, -1]).float()  # (B, V)
        logits.masked_fill_(mask_begin if step == 0 else mask, -float("inf"))
        nxt = logits.argmax(-1)  # (B,)
        nxt = torch.where(done, torch.full_like(nxt, spec.eot), nxt)
        for b in torch.nonzero(~done & (nxt != spec.eot)).flatten().tolist():
            out[b].append(int(nxt[b]))
        done |= nxt == spec.eot
        if bool(done.all()):
            break
        step_input = nxt[:, None]
    return out


def transcribe(
    model,
    tokenizer,
    audio_or_mels,
    spec: WhisperSpec,
    *,
    inputs: str = "audio",
    batch_size: int = 8,
    max_new_tokens: int = 224,
    language: str | None = None,
) -> list[str]:
    """Greedy transcription of clips of at most 30 s (English unless ``language`` is given).

    Parameters
    ----------
    model, tokenizer, spec
        From :func:`load_whisper`.
    audio_or_mels
        ``inputs="audio"``: a 1-D 16 kHz waveform or a list of them (any loudness; normalised
        here). ``inputs="mel"``: ssip mels, a (80, T) or (B, 80, T) tensor/array or a list of
        (80, T_i), T_i <= 3000; padded with the mel floor to 3000 frames.
    batch_size : int
        Clips per encoder/decoder batch; results do not depend on it beyond float rounding.
    language : str or None
        Whisper language code (``"fr"``, ``"it"``, ...) for a multilingual model: its token
        replaces ``<|en|>`` in the prompt. None keeps the spec's English prompt.

    Returns
    -------
    list of str
        One stripped transcript per clip.
    """
    if language is not None and language != "en":
        if not spec.multilingual:
            raise ValueError(f"transcribe: language={language!r} needs a multilingual Whisper "
                             f"(e.g. 'base'); {spec.name!r} is English-only")
        token = tokenizer.token_to_id(f"<|{language}|>")
        if token is None:
            raise ValueError(f"transcribe: Whisper has no language token <|{language}|>")
        spec = dataclasses.replace(spec, prompt=(spec.prompt[0], token, *spec.prompt[2:]))
    if inputs == "audio":
        mels = list(mels_for_asr(audio_or_mels))
    elif inputs == "mel":
        items = audio_or_mels
        if isinstance(items, np.ndarray | torch.Tensor):
            items = torch.as_tensor(items)
            items = [items] if items.ndim == 2 else list(items)
        mels = []
        for i, m in enumerate(items):
            m = torch.as_tensor(m, dtype=torch.float32)
            if m.ndim != 2 or m.shape[0] != N_MELS:
                raise ValueError(f"mel {i} has shape {tuple(m.shape)}; expected ({N_MELS}, T)")
            mels.append(pad_mel(m))
    else:
        raise ValueError(f"transcribe: inputs={inputs!r} must be 'audio' or 'mel'")
    texts: list[str] = []
    for start in range(0, len(mels), batch_size):
        batch = torch.stack(mels[start : start + batch_size])
        for ids in greedy_decode(model, spec, batch, max_new_tokens=max_new_tokens):
            texts.append(tokenizer.decode(ids, skip_special_tokens=True).strip())
    return texts
