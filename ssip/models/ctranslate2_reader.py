"""Read a CTranslate2 ``model.bin`` (binary format version 6) into numpy arrays.

Hand-written because no library reads this format without running CTranslate2 itself: the
``ctranslate2`` package can load and run a model but exposes no weights, and its converters only
go *to* this format. The layout (little-endian) is:

    uint32 version (6); string spec name; uint32 spec revision; uint32 variable count;
    per variable: string name, uint8 rank, uint32 x rank shape, uint8 dtype id, uint32 byte count,
    raw bytes; then uint32 alias count and (alias, target) string pairs.

A string is a uint16 length (counting a trailing NUL) followed by that many bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: The only binary version this reader was checked against (CTranslate2 >= 3 writes it).
SUPPORTED_VERSION = 6

# CTranslate2 DataType ids; bfloat16 (5) has no numpy dtype and is widened to float32 below.
_DTYPES: dict[int, np.dtype] = {
    0: np.dtype("<f4"),
    1: np.dtype("i1"),
    2: np.dtype("<i2"),
    3: np.dtype("<i4"),
    4: np.dtype("<f2"),
    5: np.dtype("<u2"),
}
_BFLOAT16 = 5


class Ct2FormatError(ValueError):
    """A model.bin is truncated, of an unknown version, or otherwise not what this reader reads."""


@dataclass
class Ct2Model:
    """The contents of one CTranslate2 model.bin.

    Attributes
    ----------
    spec_name : str
        The model spec class that wrote the file, e.g. "WhisperSpec".
    spec_revision : int
        Revision of that spec.
    variables : dict of str to ndarray
        Every variable by name, in the stored dtype (bfloat16 widened to float32). Scalars are 0-d.
        Arrays are read-only views into the file's bytes.
    aliases : dict of str to str
        Alias name -> the variable name it shares (e.g. a tied output projection).
    """

    spec_name: str
    spec_revision: int
    variables: dict[str, np.ndarray]
    aliases: dict[str, str]

    def get(self, name: str) -> np.ndarray:
        """Variable ``name``, following an alias; KeyError names the missing variable."""
        target = self.aliases.get(name, name)
        if target not in self.variables:
            raise KeyError(f"CTranslate2 model ({self.spec_name}) has no variable {name!r}")
        return self.variables[target]


class _Cursor:
    def __init__(self, data: memoryview, source: str):
        self.data = data
        self.pos = 0
        self.source = source

    def take(self, n: int, what: str) -> memoryview:
        if self.pos + n > len(self.data):
            raise Ct2FormatError(
                f"{self.source}: truncated while reading {what} at byte {self.pos} "
                f"(needs {n} bytes, {len(self.data) - self.pos} left); the file is incomplete, "
                "reinstall the package that ships it"
            )
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str, what: str) -> tuple:
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt), what))

    def string(self, what: str) -> str:
        (n,) = self.unpack("H", f"length of {what}")
        raw = bytes(self.take(n, what))
        return raw[:-1].decode("utf-8") if raw.endswith(b"\0") else raw.decode("utf-8")


def parse_ct2_model(data: bytes | memoryview, source: str = "<bytes>") -> Ct2Model:
    """Parse the bytes of a CTranslate2 model.bin.

    Parameters
    ----------
    data : bytes
        The whole file (all parts concatenated for a split file).
    source : str
        Name used in error messages (the file path).
    """
    cur = _Cursor(memoryview(data), source)
    (version,) = cur.unpack("I", "binary version")
    if version != SUPPORTED_VERSION:
        raise Ct2FormatError(
            f"{source}: CTranslate2 binary version {version} is not supported (only "
            f"{SUPPORTED_VERSION}); re-convert the model with CTranslate2 >= 3"
        )
    spec_name = cur.string("spec name")
    (revision,) = cur.unpack("I", "spec revision")
    (count,) = cur.unpack("I", "variable count")
    variables: dict[str, np.ndarray] = {}
    for _ in range(count):
        name = cur.string("variable name")
        (rank,) = cur.unpack("B", f"rank of {name}")
        shape = cur.unpack("I" * rank, f"shape of {name}") if rank else ()
        (dtype_id,) = cur.unpack("B", f"dtype of {name}")
        (nbytes,) = cur.unpack("I", f"byte count of {name}")
        if dtype_id not in _DTYPES:
            raise Ct2FormatError(f"{source}: variable {name!r} has unknown dtype id {dtype_id}")
        dtype = _DTYPES[dtype_id]
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if nbytes != expected:
            raise Ct2FormatError(
                f"{source}: variable {name!r} of shape {shape} and dtype {dtype} should take "
                f"{expected} bytes, the file says {nbytes}"
            )
        arr = np.frombuffer(cur.take(nbytes, f"data of {name}"), dtype=dtype).reshape(shape)
        if dtype_id == _BFLOAT16:
            # bfloat16 is the top half of a float32: widening is exact.
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        if name in variables:
            raise Ct2FormatError(f"{source}: variable {name!r} is stored twice")
        variables[name] = arr
    (n_alias,) = cur.unpack("I", "alias count")
    aliases = {}
    for _ in range(n_alias):
        alias = cur.string("alias name")
        aliases[alias] = cur.string(f"target of alias {alias}")
    if cur.pos != len(cur.data):
        raise Ct2FormatError(
            f"{source}: {len(cur.data) - cur.pos} unexpected bytes after the aliases; "
            "is this a model.bin, or were split parts joined in the wrong order?"
        )
    for alias, target in aliases.items():
        if target not in variables:
            raise Ct2FormatError(f"{source}: alias {alias!r} points to missing {target!r}")
    return Ct2Model(spec_name, revision, variables, aliases)


def read_ct2_model(paths: str | Path | Sequence[str | Path]) -> Ct2Model:
    """Read a CTranslate2 model.bin, or the parts of a split one in order.

    Parameters
    ----------
    paths : path or sequence of paths
        model.bin, or [model.bin.part1, model.bin.part2, ...] to be concatenated.
    """
    if isinstance(paths, str | Path):
        paths = [paths]
    paths = [Path(p) for p in paths]
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"CTranslate2 model file {p} does not exist")
    data = paths[0].read_bytes() if len(paths) == 1 else b"".join(p.read_bytes() for p in paths)
    return parse_ct2_model(data, source=" + ".join(str(p) for p in paths))
