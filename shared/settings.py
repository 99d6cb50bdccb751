"""Settings: dataclasses from defaults, a TOML file, FEDQ_* variables and flags, in that order."""

from __future__ import annotations

import dataclasses
import logging
import re
import sys
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from shared.errors import ConfigError, FieldError

if sys.version_info >= (3, 11):
    from tomllib import TOMLDecodeError
    from tomllib import load as toml_load
else:  # pragma: no cover - Python 3.10
    from tomli import TOMLDecodeError
    from tomli import load as toml_load

__all__ = ["TOMLDecodeError", "from_dict", "load_settings", "masked", "to_dict", "toml_load"]

T = TypeVar("T")
logger = logging.getLogger(__name__)


def _check_value(name: str, value: Any, annotation: Any) -> Any:
    """Check one value against a simple annotation and return it normalised."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        (inner,) = [opt for opt in options if opt is not type(None)]
        return _check_value(name, value, inner)
    if origin is tuple:
        item = typing.get_args(annotation)[0]
        if not isinstance(value, (list, tuple)) or not all(type(v) is item for v in value):
            kind = "integers" if item is int else "strings"
            raise FieldError(f"{name} must be a list of {kind}")
        return tuple(value)
    if annotation is float:
        if type(value) not in (int, float):
            raise FieldError(f"{name} must be a number")
        return float(value)
    if annotation is int:
        if type(value) is not int:
            raise FieldError(f"{name} must be an integer")
        return value
    if annotation in (str, bool):
        if type(value) is not annotation:
            raise FieldError(f"{name} must be a {annotation.__name__}")
        return value
    if dataclasses.is_dataclass(annotation):
        return from_dict(annotation, value, prefix=f"{name}.")  # type: ignore[arg-type]
    raise FieldError(f"{name}: unsupported annotation {annotation}")


def from_dict(cls: type[T], data: Any, prefix: str = "") -> T:
    """Build a spec dataclass from a plain map, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise FieldError(f"{prefix.rstrip('.') or cls.__name__} must be a map")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - known)
    if unknown:
        raise FieldError(f"unknown keys {[prefix + k for k in unknown]}")
    values = {key: _check_value(prefix + key, value, hints[key]) for key, value in data.items()}
    try:
        return cls(**values)
    except ConfigError as e:
        raise FieldError(str(e)) from e


def to_dict(spec: Any) -> dict[str, Any]:
    """Return a spec dataclass as a plain map (tuples as lists) for msgpack, JSON or TOML."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(spec):
        value = getattr(spec, f.name)
        if dataclasses.is_dataclass(value):
            value = to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def _from_env(name: str, raw: str, annotation: Any) -> Any:
    """Parse one environment variable by the field's annotation."""
    if typing.get_origin(annotation) is tuple and typing.get_args(annotation)[0] is str:
        # A list of names: comma-separated ("a.b,c").
        return [item.strip() for item in raw.split(",") if item.strip()]
    options = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    kind = options[0]
    try:
        if kind is bool:
            if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(raw)
            return raw.lower() in ("1", "true", "yes")
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
    except ValueError as e:
        raise ConfigError(f"environment variable {name}={raw!r} is not a {kind.__name__}") from e
    return raw


def load_settings(
    cls: type[T],
    path: str | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> T:
    """Build settings from defaults < TOML file < FEDQ_<FIELD> variables < non-None overrides."""
    data: dict[str, Any] = {}
    if path:
        try:
            with open(path, "rb") as fh:
                data.update(toml_load(fh))
        except (OSError, TOMLDecodeError) as e:
            raise ConfigError(f"cannot read settings file {path}: {e}") from e
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        key = f"FEDQ_{f.name.upper()}"
        if environ and key in environ:
            data[f.name] = _from_env(key, environ[key], hints[f.name])
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return from_dict(cls, data)
    except FieldError as e:
        raise ConfigError(f"invalid settings: {e}") from e


_SECRET = re.compile(r"(//[^:/@]+:)([^@]+)(@)")


def masked(settings: Any) -> dict[str, Any]:
    """Return settings as a map with passwords in URLs masked, for logging at start-up."""
    return {
        k: _SECRET.sub(r"\1***\3", v) if isinstance(v, str) else v
        for k, v in to_dict(settings).items()
    }
