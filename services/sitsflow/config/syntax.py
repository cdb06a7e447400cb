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
from config.parser import ListBody, MappingBody, Parser, ParserError
from config.tokens import EOF, NEWLINE, RecognizerError, Tokenizer

from sitsflow.errors import ConfigError

Location = tuple[str, ...]
KeyPath = tuple[str | int, ...]
"""A key path in a parsed file: keys, and the index of an item of a list of sections."""

_ENV_VALUE = re.compile(r"\$(\w+)(\|(.*))?$")
_ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}([ T]\d{2}:\d{2}:\d{2}(\.\d{1,6})?(Z|[+-]\d{2}:?\d{2}(:\d{2})?)?)?$")


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
                f"environment variable {name} (in `{text}`) is not set; give a default with `${name}|default`"
            )
        return _Text(value)
    if _ISO_DATE.match(text):
        return _Text(text)
    return text


class _SafeConfig(Config):
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


def _dotted(path: KeyPath) -> str:
    """``stac[1].profile`` for ``("stac", 1, "profile")``."""
    return "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else p) for i, p in enumerate(path))


def _collect_lines(node: MappingBody, prefix: KeyPath, out: dict[KeyPath, int], label: str) -> None:
    """Record the line of every key of a parsed mapping, nested mappings included.

    Raises :class:`ConfigError` for a key (or a section) given twice in the same mapping, with the
    line and column of the second one.
    """
    for key_token, value in node:
        path = (*prefix, str(key_token.value))
        line, col = int(key_token.start[0]), int(key_token.start[1])
        if path in out:
            what = "section" if len(path) == 1 else "key"
            raise ConfigError(
                f"duplicate {what} {_dotted(path)!r} in {label}:{line} (line {line}, column {col}); it is "
                f"first given at line {out[path]}: keep only one"
            )
        out[path] = line
        if isinstance(value, MappingBody):
            _collect_lines(value, path, out, label)
        elif isinstance(value, ListBody):  # a list of sections: their keys at (..., index, key)
            for i, item in enumerate(value):
                if isinstance(item, MappingBody):
                    _collect_lines(item, (*path, i), out, label)


_PAIRS = {"{": "}", "[": "]", "(": ")"}
_CLOSERS = {v: k for k, v in _PAIRS.items()}


def _bracket_culprit(text: str) -> tuple[int, int, str] | None:
    """Find the bracket that most likely breaks an unbalanced text: ``(line, column, explanation)``.

    The parser notices a missing or extra bracket only where the text stops making sense, often
    at the end of the file. This scan pairs every bracket (strings and comments are skipped by the
    package's own tokenizer) and, when they do not balance, points at the first pair whose layout
    betrays the slip: a block opened at the end of a line and closed in the middle of another (an
    extra closer), a value opened in a line and closed by a closer indented less than that line (a
    missing closer), a closer indented unlike the line of its opener. Failing those: the first
    opener closed by a bracket of another kind, the first closer with nothing to close, or the
    innermost opener never closed. None when the brackets balance.
    """
    tokens = []
    tokenizer = Tokenizer(io.StringIO(text))
    try:
        while True:
            token = tokenizer.get_token()
            if token.kind == EOF:
                break
            if token.kind != NEWLINE:
                tokens.append(token)
    except RecognizerError:
        return None
    lines = text.splitlines()

    def indent(line: int) -> int:
        body = lines[line - 1] if 0 < line <= len(lines) else ""
        return len(body) - len(body.lstrip())

    def first_on_line(i: int) -> bool:
        return i == 0 or tokens[i - 1].end[0] != tokens[i].start[0]

    def last_on_line(i: int) -> bool:
        return i == len(tokens) - 1 or tokens[i + 1].start[0] != tokens[i].end[0]

    def at(i: int) -> str:
        return f"line {tokens[i].start[0]}, column {tokens[i].start[1]}"

    stack: list[int] = []
    layout: list[tuple[int, str]] = []  # (index of the culprit token, explanation)
    wrong_kind: list[tuple[int, str]] = []
    stray: list[tuple[int, str]] = []
    for i, token in enumerate(tokens):
        kind = token.kind
        if kind in _PAIRS:
            stack.append(i)
            continue
        if kind not in _CLOSERS:
            continue
        if not stack:
            stray.append((i, f"this '{kind}' closes nothing (an extra '{kind}'?)"))
            continue
        o = stack.pop()
        opener = tokens[o].kind
        if _PAIRS[opener] != kind:
            if stack and _PAIRS[tokens[stack[-1]].kind] == kind:  # the opener was left open
                wrong_kind.append((o, f"this '{opener}' is never closed: the '{kind}' at {at(i)} comes first"))
                stack.pop()
            else:  # the closer is extra
                stack.append(o)
                wrong_kind.append((i, f"this '{kind}' closes nothing: the '{opener}' at {at(o)} is open"))
            continue
        opener_line, closer_line = tokens[o].start[0], token.start[0]
        if opener_line == closer_line:
            continue
        if last_on_line(o) and not first_on_line(i):
            layout.append((i, f"this '{kind}' closes the block '{opener}' opened at {at(o)}: an extra '{kind}'?"))
        elif not last_on_line(o) and first_on_line(i) and indent(closer_line) < indent(opener_line):
            why = f"this '{opener}' seems never closed: the '{kind}' at {at(i)}, indented less, closes it"
            layout.append((o, why))
        elif last_on_line(o) and first_on_line(i) and indent(closer_line) != indent(opener_line):
            why = (
                f"this '{kind}' closes the '{opener}' opened at {at(o)}, a line indented differently: a "
                "bracket missing or extra before it?"
            )
            layout.append((i, why))
    unclosed = [(o, f"this '{tokens[o].kind}' is never closed") for o in stack[-1:]]
    if not (wrong_kind or stray or unclosed):
        return None
    for found in (layout, wrong_kind, stray, unclosed):
        if found:
            i, why = min(found, key=lambda item: tuple(tokens[item[0]].start))
            return int(tokens[i].start[0]), int(tokens[i].start[1]), why
    return None  # pragma: no cover - one of the lists is not empty


def _show(text: str, line: int, col: int) -> str:
    """The line of the text and a caret under the column (empty when there is no such line)."""
    lines = text.splitlines()
    shown = lines[line - 1].rstrip() if 0 < line <= len(lines) else ""
    return f"\n    {shown}\n    {' ' * max(col - 1, 0)}^" if shown else ""


_LEFTOVER = "after the last section"
#: Parser messages of a bracket found missing or extra only later than where the slip is.
_LATE_NOTICES = (
    "Expected '}'",
    "Expected ']'",
    "Expected ')'",
    "unexpected '}' " + _LEFTOVER,
    "unexpected ']' " + _LEFTOVER,
    "unexpected ')' " + _LEFTOVER,
)


def _syntax_error(label: str, text: str, exc: BaseException) -> ConfigError:
    """A ConfigError at the culprit's line and column (a misplaced bracket when one is found)."""
    location = getattr(exc, "location", None)
    message = str(exc.args[0]) if exc.args else str(exc)
    if not location:
        return ConfigError(f"syntax error in {label}: {message}")
    message = re.sub(r"(?: at| when looking for value:)? \(\d+, \d+\)$", "", message)
    line, col = int(location[0]), int(location[1])
    # a missing or extra bracket is noticed later than where it is: look for it
    culprit = _bracket_culprit(text) if message.startswith(_LATE_NOTICES) else None
    if culprit is not None and culprit[:2] != (line, col):
        c_line, c_col, why = culprit
        return ConfigError(
            f"syntax error in {label}:{c_line} (line {c_line}, column {c_col}): {why} (the parser stopped at "
            f"line {line}, column {col}: {message}){_show(text, c_line, c_col)}"
        )
    if culprit is not None:
        message = f"{message}: {culprit[2]}"
    return ConfigError(f"syntax error in {label}:{line} (line {line}, column {col}): {message}{_show(text, line, col)}")


def _parse_tree(text: str) -> Any:
    """The package's parse tree of the whole text; a ParserError for anything left after it."""
    parser = Parser(io.StringIO(text))
    tree = parser.container()
    if not parser.at_end:  # the package's parser stops silently at a closing bracket
        token = parser.token
        error = ParserError(f"unexpected {token.text!r} {_LEFTOVER}")
        error.location = token.start
        raise error
    return tree


def parse_text(text: str, label: str, rootdir: str | None = None) -> tuple[Any, dict[KeyPath, int]]:
    """Parse configuration text.

    Returns ``(values, lines)``: the evaluated configuration as plain Python values, and the
    line (1-based) where each key path appears. Raises :class:`ConfigError` naming ``label`` and
    the line and column of a syntax error.
    """
    try:
        tree = _parse_tree(text)
    except RecognizerError as exc:
        raise _syntax_error(label, text, exc) from None
    lines: dict[KeyPath, int] = {}
    if isinstance(tree, MappingBody):
        _collect_lines(tree, (), lines, label)
    else:
        raise ConfigError(
            f"{label}: the configuration must be a mapping of sections (section : {{ key : value }}), not a list"
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
        _parse_tree(f"value : {stripped}\n")  # refuses trailing text the package would drop
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
