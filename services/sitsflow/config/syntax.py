"""iota2's ``.cfg`` syntax: parsing with the PyPI ``config`` package (0.5.1) and writing it back.

The format is ``section : { key : value }`` with ``#`` comments, quoted strings, ``[lists]``,
``{dicts}``, numbers, ``True``/``False``/``None`` and ``${section.key}`` references.
Backtick strings are limited to environment variables (`` `$NAME` `` or `` `$NAME|default` ``)
and ISO dates: the package would otherwise import Python objects named in them.
"""

from __future__ import annotations

import datetime
import io
import json
import math
import os
import re
from collections.abc import Mapping
from typing import Any

from config import Config
from config import ConfigError as _PackageConfigError
from config.parser import MappingBody, Parser
from config.tokens import RecognizerError

from sitsflow.errors import ConfigError

Location = tuple[str, ...]

_ENV_VALUE = re.compile(r"\$(\w+)(\|(.*))?$")
_ISO_DATE = re.compile(
    r"\d{4}-\d{2}-\d{2}([ T]\d{2}:\d{2}:\d{2}(\.\d{1,6})?(Z|[+-]\d{2}:?\d{2}(:\d{2})?)?)?$"
)


class _Text(str):
    """A converted backtick string (a distinct object, as the ``config`` package requires)."""


def _safe_convert_string(text: str, _config: Any) -> Any:
    """Convert a backtick string: environment variables and ISO dates only.

    Anything else is left unconverted, which the package reports as an error
    ("Unable to convert string").
    """
    match = _ENV_VALUE.match(text)
    if match:
        name, _, default = match.groups()
        value = os.environ.get(name, default)
        if value is None:
            raise _PackageConfigError(
                f"environment variable {name} (in `{text}`) is not set; "
                f"give a default with `${name}|default`"
            )
        return _Text(value)
    if _ISO_DATE.match(text):
        return _Text(text)
    return text


class _SafeConfig(Config):  # type: ignore[misc]
    """``config.Config`` whose backtick strings cannot import Python objects."""

    _string_converter = staticmethod(_safe_convert_string)


def _plain(value: Any) -> Any:
    """Turn the package's output into plain values (str, int, float, bool, None, list, dict)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, str):
        return str(value)
    if isinstance(value, datetime.datetime | datetime.date):
        return value.isoformat()
    return value


def _collect_lines(
    node: MappingBody, prefix: Location, out: dict[Location, int], label: str
) -> None:
    """Record the line of every key of a parsed mapping, nested mappings included.

    Raises :class:`ConfigError` for a key given twice in the same mapping.
    """
    for key_token, value in node:
        path = (*prefix, str(key_token.value))
        line = int(key_token.start[0])
        if path in out:
            raise ConfigError(
                f"duplicate key {'.'.join(path)!r} ({label}:{line}); it is first given at line "
                f"{out[path]}: keep only one"
            )
        out[path] = line
        if isinstance(value, MappingBody):
            _collect_lines(value, path, out, label)


def _syntax_error(label: str, text: str, exc: BaseException) -> ConfigError:
    location = getattr(exc, "location", None)
    message = str(exc.args[0]) if exc.args else str(exc)
    if location:
        message = re.sub(r"(?: at| when looking for value:)? \(\d+, \d+\)$", "", message)
        line, col = int(location[0]), int(location[1])
        lines = text.splitlines()
        shown = lines[line - 1].rstrip() if 0 < line <= len(lines) else ""
        detail = f"\n    {shown}\n    {' ' * max(col - 1, 0)}^" if shown else ""
        return ConfigError(
            f"syntax error in {label}:{line} (line {line}, column {col}): {message}{detail}"
        )
    return ConfigError(f"syntax error in {label}: {message}")


def parse_text(
    text: str, label: str, rootdir: str | None = None
) -> tuple[Any, dict[Location, int]]:
    """Parse configuration text.

    Returns ``(values, lines)``: the evaluated configuration as plain Python values, and the
    line (1-based) where each key path appears. Raises :class:`ConfigError` naming ``label`` and
    the line and column of a syntax error.
    """
    try:
        tree = Parser(io.StringIO(text)).container()
    except RecognizerError as exc:
        raise _syntax_error(label, text, exc) from None
    lines: dict[Location, int] = {}
    if isinstance(tree, MappingBody):
        _collect_lines(tree, (), lines, label)
    else:
        raise ConfigError(
            f"{label}: the configuration must be a mapping of sections "
            "(section : { key : value }), not a list"
        )
    try:
        kwargs: dict[str, Any] = {"rootdir": rootdir or os.getcwd(), "path": label}
        values = _SafeConfig(io.StringIO(text), **kwargs).as_dict()
    except RecognizerError as exc:
        raise _syntax_error(label, text, exc) from None
    except (_PackageConfigError, ArithmeticError, TypeError, ValueError, KeyError, OSError) as exc:
        message = str(exc.args[0]) if exc.args else type(exc).__name__
        if message.startswith("Unable to convert string"):
            message += " (a `backtick` string may only hold `$ENVIRONMENT_VARIABLE` or an ISO date)"
        raise ConfigError(f"cannot evaluate the configuration {label}: {message}") from None
    return _plain(values), lines


def parse_value(text: str) -> Any:
    """Parse one value written in the configuration syntax (``[1, 2]``, ``True``, ``'a'``, ``0.5``).

    Text that does not parse as exactly one value is returned unchanged, as a string.
    """
    stripped = text.strip()
    if not stripped:
        return text
    try:
        values = _SafeConfig(io.StringIO(f"value : {stripped}\n")).as_dict()
    except Exception:  # anything the package raises means "not a value": keep the text
        return text
    if list(values) != ["value"]:
        return text
    return _plain(values["value"])


# --- writing ---------------------------------------------------------------------------------
_BARE_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*$")
_RESERVED_WORDS = {"True", "False", "None", "true", "false", "null", "and", "or", "not", "is", "in"}


def format_key(key: str) -> str:
    """A mapping key: bare when it is an identifier, quoted otherwise."""
    if _BARE_KEY.match(key) and key not in _RESERVED_WORDS:
        return key
    return format_value(key)


def format_value(value: Any) -> str:
    """Write a plain value (str, int, float, bool, None, list/tuple, dict) in the cfg syntax."""
    if value is None:
        return "None"
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"cannot write the non-finite number {value!r} in a configuration")
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        if not value:
            return "{}"
        items = ", ".join(f"{format_value(str(k))} : {format_value(v)}" for k, v in value.items())
        return "{" + items + "}"
    raise TypeError(f"cannot write a {type(value).__name__} in a configuration: {value!r}")
