"""Typed configs: dataclasses loaded from YAML with dotted overrides, validated and hashed.

Every config class is a (possibly nested) dataclass whose fields carry a docstring-like
``metadata={"help": ...}`` and whose ``__post_init__`` checks values. Entry points resolve a config
with :func:`resolve`, print it with :func:`to_yaml`, save it beside the run, and put
:func:`config_hash` in the run id.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import yaml

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")


class ConfigError(ValueError):
    """A config value, key or file is wrong; the message names it."""


def check_option(name: str, value: Any, allowed: typing.Iterable[Any]) -> None:
    """Raise ConfigError naming ``name``, the value received and the values allowed."""
    allowed = list(allowed)
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not allowed; choose one of {allowed}")


def check_range(name: str, value: float, lo: float | None = None, hi: float | None = None) -> None:
    """Raise ConfigError unless lo <= value <= hi (either bound may be None)."""
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ConfigError(f"{name}={value!r} is out of range [{lo}, {hi}]")


def field(default: Any = dataclasses.MISSING, *, help: str, default_factory: Any = dataclasses.MISSING):
    """A dataclass field with its documentation attached (shown by ``ssip ... --help-config``)."""
    kw: dict[str, Any] = {"metadata": {"help": help}}
    if default is not dataclasses.MISSING:
        kw["default"] = default
    if default_factory is not dataclasses.MISSING:
        kw["default_factory"] = default_factory
    return dataclasses.field(**kw)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config dataclass."""
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def config_hash(cfg: Any, length: int = 10) -> str:
    """Stable short hash of a config's values (sorted JSON), used in run ids and manifests."""
    blob = json.dumps(to_dict(cfg), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {value!r} fits none of {args}: {errors}")
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (arg, *_) = typing.get_args(tp) or (Any,)
        items = [_coerce(arg, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        return str(value)
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build ``cls`` from a nested dict; unknown keys are an error that names them."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    # A class may list keys that moved into a section (MOVED_KEYS: old -> new dotted key).
    moved = getattr(cls, "MOVED_KEYS", {})
    for key in unknown:
        if key in moved:
            loc = f"{where}." if where else ""
            section, _, leaf = moved[key].rpartition(".")
            raise ConfigError(
                f"{loc}{key} moved to {loc}{moved[key]}: write it in the {section!r} section "
                f"(YAML `{section}: {{{leaf}: ...}}`, or --set {loc}{moved[key]}=...)"
            )
    if unknown:
        raise ConfigError(
            f"{where or cls.__name__}: unknown key(s) {unknown}; known keys are {sorted(names)}"
        )
    kwargs = {k: _coerce(hints[k], v, f"{where + '.' if where else ''}{k}") for k, v in data.items()}
    return cls(**kwargs)


def _parse_scalar(text: str) -> Any:
    # YAML gives 1 -> int, 1e-3 -> float, true -> bool, [1, 2] -> list, null -> None.
    return yaml.safe_load(text)


def apply_overrides(data: dict[str, Any], overrides: typing.Sequence[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides to a nested dict (a copy)."""
    out = json.loads(json.dumps(data, default=str))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p!r} is not a section")
        node[parts[-1]] = _parse_scalar(raw)
    return out


def resolve(cls: type[T], path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> T:
    """Defaults of ``cls`` <- YAML file (optional) <- dotted overrides, validated."""
    data = to_dict(cls())
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file {p} does not exist")
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p}: top level must be a mapping")
        data = _merge(data, loaded, cls)
    data = apply_overrides(data, overrides)
    return from_dict(cls, data)


def _merge(base: dict[str, Any], new: dict[str, Any], cls: type | None = None) -> dict[str, Any]:
    """``new`` over ``base``: config sections (nested dataclasses) merge key by key; every other
    value, a dict-valued field included (``source_weights: {}``), replaces the default whole."""
    hints = typing.get_type_hints(cls) if cls is not None and dataclasses.is_dataclass(cls) else {}
    out = dict(base)
    for k, v in new.items():
        tp = hints.get(k)
        if isinstance(v, dict) and isinstance(out.get(k), dict) and isinstance(tp, type) \
                and dataclasses.is_dataclass(tp):
            out[k] = _merge(out[k], v, tp)
        else:
            out[k] = v
    return out


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every field, for --help-config."""
    rows = []
    inst = cls()
    for f in dataclasses.fields(cls):
        val = getattr(inst, f.name)
        if dataclasses.is_dataclass(val):
            rows.extend(describe(type(val), f"{prefix}{f.name}."))
        else:
            rows.append((f"{prefix}{f.name}", repr(val), f.metadata.get("help", "")))
    return rows
