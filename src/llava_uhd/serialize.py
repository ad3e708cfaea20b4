"""Typed config dataclasses <-> plain dicts and YAML, for presets and training configs. No torch here.

A config is a tree of frozen dataclasses whose leaves are scalars, tuples or mappings. :func:`to_plain`
turns one into dicts and lists (fields in declaration order, tuples as lists), which is what the saved
YAML files hold; :func:`from_plain` reads it back and names the offending key on every error: an unknown
field, a null where the field allows none, a string where a number goes. Value checks (ranges, Literal
choices) live in each dataclass's ``__post_init__``, so a config built in Python is checked exactly like
one read from YAML.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar, get_args, get_type_hints

import yaml

from llava_uhd.errors import ConfigError

T = TypeVar("T")


def to_plain(obj: Any) -> Any:
    """Dataclasses -> dicts (fields in declaration order), tuples and lists -> lists, mappings -> dicts."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple | list):
        return [to_plain(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj


def from_plain(cls: type[T], data: Any, where: str) -> T:
    """Build the dataclass ``cls`` from a plain mapping, reading dataclass-typed fields recursively.

    ``where`` names the mapping in error messages (``preset``, ``train config``); a nested section extends
    it (``preset.slicing``). A section given as null takes that section's defaults, like ``{}``. Lists
    become tuples; numbers are checked against the field's type (see :func:`_coerce`).
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known, key=str)  # key: a YAML key may be null or a number
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; known: {sorted(known)}")
    hints = get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        hint = hints[key]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            kwargs[key] = from_plain(hint, {} if value is None else value, f"{where}.{key}")
        else:
            kwargs[key] = _coerce(value, hint, f"{where}.{key}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError, ArithmeticError) as exc:  # a missing field; a value a check trips on
        raise ConfigError(f"{where}: {exc}") from None


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check a YAML value against a field's type; YAML reads ``1e-3`` as a string, so floats are parsed."""
    if value is None:
        if type(None) not in get_args(hint) and hint is not Any:
            raise ConfigError(f"{where} must not be null")
        return None
    if isinstance(value, list):
        return tuple(value)
    allowed = set(get_args(hint)) or {hint}
    if float in allowed and isinstance(value, str | int) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{where} must be a number, got {value!r}") from None
    if int in allowed and not isinstance(value, int | bool):
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    if bool in allowed and not isinstance(value, bool):
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    return value


def dump_yaml(obj: Any) -> str:
    """``obj`` as YAML: :func:`to_plain`, keys in field order (the form saved beside runs and models)."""
    return yaml.safe_dump(to_plain(obj), sort_keys=False)


def load_yaml_mapping(text: str, what: str) -> dict[str, Any]:
    """Parse YAML that must hold a mapping; ``what`` starts the error message (e.g. ``a preset YAML``)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} is not valid YAML: {_yaml_problem(exc)}") from None
    if not isinstance(data, Mapping):
        raise ConfigError(f"{what} must be a mapping, got {type(data).__name__}")
    return dict(data)


def load_yaml_file(path: Path, what: str) -> dict[str, Any]:
    """Read a YAML file that must hold a mapping; every error is one line that starts with the path.

    Raises:
        ConfigError: the file is missing, unreadable, not UTF-8 text, not YAML or not a mapping.
    """
    if not path.is_file():
        raise ConfigError(f"{path}: no such {what} file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    return load_yaml_mapping(text, f"{path}: a {what}")


def _yaml_problem(error: yaml.YAMLError) -> str:
    """PyYAML's multi-line report (context, problem, a quoted snippet with a caret) in one line."""
    problem = getattr(error, "problem", None)
    if problem is None:  # a ReaderError (a character YAML refuses) or a bare YAMLError
        return " ".join(str(error).split("\n", 1)[0].split())
    context = getattr(error, "context", None)
    mark = getattr(error, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{context + ': ' if context else ''}{problem}{where}"
