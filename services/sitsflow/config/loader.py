"""``load_config``: read, parse, apply overrides, check, resolve paths, build the frozen models."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from pydantic_core import PydanticCustomError

from sitsflow.config.models import SitsflowConfig
from sitsflow.config.report import Origins, validate
from sitsflow.config.schema import normalise_s3
from sitsflow.config.syntax import Location, parse_text, parse_value
from sitsflow.errors import ConfigError, InputNotFoundError
from sitsflow.log import get_logger

log = get_logger(__name__)


def _read(source: str) -> tuple[str, str, str]:
    """Read the configuration text. Returns ``(text, where_it_was_read, its_folder)``."""
    if source.startswith("s3://"):
        try:
            uri = normalise_s3(source)
        except PydanticCustomError as problem:
            raise ConfigError(
                f"configuration URI {source!r}: expected {problem.context['expected']}"  # type: ignore[index]
            ) from None
        from sitsflow import storage  # only S3 sources need the storage layer

        text = storage.read_text(uri)
        return text, uri, uri.rsplit("/", 1)[0]
    if "://" in source:
        raise ConfigError(f"configuration {source!r}: expected a local path or an s3://bucket/key URI")
    path = os.path.abspath(os.path.expanduser(source))
    if not os.path.exists(path):
        raise InputNotFoundError(f"configuration file not found: {source} ({path})")
    if os.path.isdir(path):
        raise ConfigError(f"configuration {source!r} is a folder, expected a .cfg file")
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except UnicodeDecodeError as exc:
        raise ConfigError(f"configuration {source!r} is not UTF-8 text: {exc}") from None
    return text, path, os.path.dirname(path)


def parse_override(item: str) -> tuple[Location, Any]:
    """Split ``section.key=value`` (any depth of keys) and parse the value.

    The value is read with the configuration syntax (``[1, 2]``, ``{"a": 1}``, ``True``, ``0.5``,
    ``'text'``); text that does not parse is kept as a string.
    """
    usage = "expected section.key=value (e.g. arg_train.deep_learning_parameters.epochs=3)"
    if not isinstance(item, str) or "=" not in item:
        raise ConfigError(f"override {item!r} (from --set): {usage}")
    key, _, text = item.partition("=")
    parts = tuple(p.strip() for p in key.strip().split("."))
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"override {item!r} (from --set): the key {key.strip()!r} names no section; {usage}")
    return parts, parse_value(text)


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str], origins: Origins) -> None:
    """Set each override in ``raw`` (in order; a later one wins) and record its origin."""
    for item in overrides:
        parts, value = parse_override(item)
        node = raw
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = {}
                node[part] = child
                origins.set_by_override(parts[: depth + 1])
            elif not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                raise ConfigError(
                    f"override {item!r} (from --set): {where} is not a section (it holds "
                    f"{child!r}), so it has no key {parts[depth + 1]!r}"
                )
            node = child
        node[parts[-1]] = value
        origins.set_by_override(parts)


def load_config(source: str, overrides: Sequence[str] = ()) -> SitsflowConfig:
    """Read, check and resolve a sitsflow (iota2 syntax) configuration.

    ``source`` is a local path or an ``s3://bucket/key`` URI. ``overrides`` are
    ``section.key=value`` strings (``--set``), applied in order after the file is read.
    Relative paths are resolved against the configuration's folder (against the current directory
    for paths given in overrides).

    Raises :class:`ConfigError` (every problem, one per line, with key path, value, what is allowed
    and file:line) or :class:`InputNotFoundError` (missing file) before any work is done.
    """
    if isinstance(overrides, str):
        overrides = [overrides]
    text, where, folder = _read(str(source))
    label = str(source)
    raw, lines = parse_text(text, label, rootdir=None if where.startswith("s3://") else folder)
    origins = Origins(label=label, base=folder, lines=lines)
    apply_overrides(raw, list(overrides), origins)
    config, errors = validate(raw, origins, where)
    if config is None:
        if len(errors) == 1:
            raise ConfigError(errors[0])
        raise ConfigError(f"{len(errors)} problems in the configuration {label}:\n" + "\n".join(errors))
    log.debug("configuration read from %s with %d override(s)", where, len(overrides))
    return config
