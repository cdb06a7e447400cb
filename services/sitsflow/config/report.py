"""Validation of a parsed configuration against the schema, and pydantic's errors in sitsflow's
words: every problem at once, one line each, naming the key path, where the key is (``file:line``
or ``from --set``), the value given and what is allowed (with the closest key or choice when one
is close).

This is the one place that words errors: the schema (:mod:`sitsflow.config.models`) only says
what a field allows (:func:`sitsflow.config.schema.describe`).
"""

from __future__ import annotations

import functools
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticCustomError

from sitsflow.config.models import SECTION_MODELS, SitsflowConfig
from sitsflow.config.schema import (
    ListOf,
    PathOf,
    PathsIn,
    core,
    describe,
    field_doc,
    field_type,
    fields_of,
    is_section_list,
    markers,
    resolve_path,
    section_model,
    shown,
    suggest,
)
from sitsflow.config.syntax import KeyPath, Location
from sitsflow.log import get_logger

log = get_logger(__name__)

Loc = tuple[str | int, ...]


@dataclass
class Origins:
    """Where each key came from: a file line, or an override (``--set``)."""

    label: str
    """The configuration's name in messages (the source as the user gave it)."""
    base: str
    """Folder (local or ``s3://bucket/prefix``) relative paths in the file are resolved against."""
    lines: dict[KeyPath, int] = field(default_factory=dict)
    """Line of each key path in the file."""
    overridden: set[Location] = field(default_factory=set)
    """Key paths set by overrides (everything under them too)."""

    def set_by_override(self, path: Location) -> None:
        """Record that ``path`` (and everything under it) now comes from an override."""
        for known in [p for p in self.lines if p[: len(path)] == path]:
            del self.lines[known]
        self.overridden = {p for p in self.overridden if p[: len(path)] != path}
        self.overridden.add(path)

    def from_override(self, path: Loc) -> bool:
        """Whether the value at ``path`` was given by an override."""
        return any(path[:n] in self.overridden for n in range(len(path), 0, -1))

    def where(self, path: Loc) -> str:
        """``"file:line"``, ``"from --set"``, or the file alone when no line is known."""
        for n in range(len(path), 0, -1):
            prefix = path[:n]
            if prefix in self.overridden:
                return "from --set"
            if prefix in self.lines:
                return f"{self.label}:{self.lines[prefix]}"
        return self.label


def validate(raw: Any, origins: Origins, source: str) -> tuple[SitsflowConfig | None, list[str]]:
    """The configuration of a parsed file (paths resolved), or every problem in it."""
    if not isinstance(raw, dict):
        return None, [f"{origins.label}: the configuration must be a mapping of sections"]
    raw, errors = _iota2_keys(raw, origins)
    if "source" in raw:
        errors.append(_unknown_key(SitsflowConfig, ("source",), origins))
    try:
        config = SitsflowConfig.model_validate({**raw, "source": source})
    except ValidationError as exc:
        return None, errors + [message(error, raw, origins) for error in exc.errors()]
    config = _resolved(config, (), origins, errors)
    return (None if errors else config), errors


def _no_value(value: Any) -> bool:
    """None as iota2's files write it (None, "None", ""), or a section/list holding only such values."""
    if isinstance(value, dict):
        return all(_no_value(v) for v in value.values())
    if isinstance(value, list | tuple):
        return all(_no_value(v) for v in value)
    return value is None or (isinstance(value, str) and value.strip().lower() in ("", "none"))


def _iota2_keys(raw: dict[str, Any], origins: Origins) -> tuple[dict[str, Any], list[str]]:
    """``raw`` without the iota2 keys that have no effect here, and the errors of those refused.

    A key of ``__ignored__`` (top level or section) is left out; a key of ``__iota2_defaults__``
    is left out when its value is iota2's default (what sitsflow does), and refused otherwise
    (the map would not be the one asked); a key of ``__iota2__`` (not implemented, iota2's default
    unknown here) is left out when written without a value (None, "", or a section of such values)
    and refused otherwise, by the error of an unsupported key. The keys left out are named in one warning, with what
    replaces them or why.
    """
    found: list[str] = []
    errors: list[str] = []

    def sort(owner: Any, values: dict[str, Any], prefix: KeyPath) -> dict[str, Any]:
        ignored = getattr(owner, "__ignored__", {})
        defaults = getattr(owner, "__iota2_defaults__", {})
        unsupported = getattr(owner, "__iota2__", {})
        kept = {}
        for key, value in values.items():
            loc = (*prefix, key)
            path, where = _dotted(loc), origins.where(loc)
            if key in ignored:
                found.append(f"{path} ({where}; {ignored[key]})")
            elif key in unsupported and _no_value(value):
                # an iota2 key sitsflow does not implement, written without a value: it asks for nothing
                found.append(
                    f"{path} = {shown(value)} ({where}; an iota2 key sitsflow does not implement, given no value)"
                )
            elif key in defaults:
                known = defaults[key]
                if known.accepts(value):
                    found.append(f"{path} = {shown(value)} ({where}; iota2's default: {known.otherwise})")
                else:
                    errors.append(
                        f"{path} = {shown(value)} ({where}): sitsflow accepts only iota2's default "
                        f"{shown(known.default)} for this iota2 key ({known.meaning}): {known.otherwise}"
                    )
            else:
                kept[key] = value
        return kept

    out = sort(SitsflowConfig, raw, ())
    for name, model in SECTION_MODELS.items():
        section = out.get(name)
        if isinstance(section, dict):
            out[name] = sort(model, section, (name,))
        elif isinstance(section, list):  # a list of sections
            out[name] = [sort(model, s, (name, i)) if isinstance(s, dict) else s for i, s in enumerate(section)]
    chain = out.get("chain")
    user_feat_path = chain.get("user_feat_path") if isinstance(chain, dict) else None
    if "userFeat" in out and (user_feat_path is None or str(user_feat_path).strip().lower() in ("", "none")):
        # iota2's default configurations carry the section whether its sensor is used or not
        del out["userFeat"]
        found.append(f"userFeat ({origins.where(('userFeat',))}; iota2 reads it only with chain.user_feat_path, unset)")
    if found:
        log.warning("iota2 keys accepted and ignored (no effect here): %s", "; ".join(found))
    return out, errors


# --- one message per pydantic error ----------------------------------------------------------
def _model(tp: Any) -> Any:
    """The model or TypedDict a field type holds (``X | None`` included), else None."""
    base = core(tp)
    if isinstance(base, type) and issubclass(base, BaseModel):
        return base
    return base if fields_of(base) else None


def _dotted(loc: Loc) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def _at(raw: Any, loc: Loc) -> Any:
    for part in loc:
        if isinstance(raw, dict):
            raw = raw.get(part)
        elif isinstance(raw, list | tuple) and isinstance(part, int) and part < len(raw):
            raw = raw[part]
        else:
            return None
    return raw


def _unknown_key(owner: Any, loc: Loc, origins: Origins) -> str:
    key, path, where = str(loc[-1]), _dotted(loc), origins.where(loc)
    if owner is SitsflowConfig:
        if key in owner.__iota2__:
            hint = owner.__iota2__[key]
            return f"section {key!r} ({where}) is an iota2 parameter that sitsflow does not support yet" + (
                f"; {hint}" if hint else ""
            )
        close = suggest(key, SECTION_MODELS)
        return (
            f"unknown section {key!r} ({where}); "
            + (f"did you mean {close!r}? " if close else "")
            + f"Allowed sections: {', '.join(SECTION_MODELS)}"
        )
    refused = getattr(owner, "__refused__", {})
    if key in refused:
        return f"{path}: {refused[key]} ({where})"
    iota2 = getattr(owner, "__iota2__", {})
    if key in iota2:
        hint = iota2[key]
        return f"{path} is an iota2 parameter that sitsflow does not support yet ({where})" + (
            f"; {hint}" if hint else ""
        )
    allowed = fields_of(owner)
    close = suggest(key, allowed)
    return (
        f"unknown key {path!r} ({where}); "
        + (f"did you mean {close!r}? " if close else "")
        + f"Allowed keys: {', '.join(allowed)}"
    )


def _required(model: Any, prefix: str = "") -> list[str]:
    """The required keys of a section, sub-sections' included (``a.b``)."""
    out: list[str] = []
    for name, info in model.model_fields.items():
        if info.is_required():
            sub = _model(info.annotation)
            out += _required(sub, f"{prefix}{name}.") if sub is not None else [prefix + name]
    return out


def _one_section(loc: Loc, raw: Any) -> Loc:
    """``loc`` without the index of a list of sections given as one section (``stac.profile``,
    not ``stac[0].profile``, when ``stac`` holds one section)."""
    if len(loc) > 1 and loc[1] == 0 and loc[0] in SECTION_MODELS:
        if is_section_list(field_type(SitsflowConfig.model_fields[str(loc[0])])):
            given = _at(raw, loc[:1])
            if isinstance(given, dict) or (isinstance(given, list) and len(given) == 1):
                return (loc[0], *loc[2:])
    return loc


def message(error: Any, raw: Any, origins: Origins) -> str:
    """One pydantic error (an item of ``ValidationError.errors()``) as a sitsflow message."""
    loc: Loc = tuple(error["loc"])
    kind, ctx = error["type"], error.get("ctx") or {}
    # the deepest field named by loc: its owner (model or TypedDict), name and type
    owner, name, tp, depth = None, None, SitsflowConfig, 0
    for part in loc:
        if isinstance(part, int) and is_section_list(tp):  # an item of a list of sections
            tp, depth = section_model(tp), depth + 1
            continue
        model = _model(tp)
        if model is None or not isinstance(part, str) or part not in fields_of(model):
            break
        owner, name, tp, depth = model, part, fields_of(model)[part], depth + 1
    if kind == "extra_forbidden":
        return _unknown_key(_model(tp), _one_section(loc, raw), origins)
    if kind == "missing":
        loc = _one_section(loc, raw)
        section = loc[:-1]
        if owner is SitsflowConfig:
            needs = ", ".join(_required(_model(tp)))
            return f"{name}: missing required section {name!r} ({origins.label}): it needs {needs}"
        meaning = field_doc(owner, str(name)).replace("``", "")
        return (
            f"{_dotted(loc)}: missing required key {name!r} in section {_dotted(section)!r} "
            f"({origins.where(section)})" + (f": {meaning}" if meaning else "")
        )
    value = error["input"]
    if depth < len(loc) and any(isinstance(m, ListOf) for m in markers(tp)):
        loc, value = loc[:depth], _at(raw, loc[:depth])  # an item of a list: the list is wrong
    loc = _one_section(loc, raw)
    path, where = _dotted(loc), origins.where(loc)
    if kind == "detail":
        return f"{path}: {ctx['detail']} ({where})" if path else f"{ctx['detail']} ({where})"
    if kind == "expected":
        allowed = ctx["expected"]
    else:
        allowed = describe(tp, str(name))
        if kind == "invalid" and ctx.get("why"):
            allowed += f"; {ctx['why']}"
        base = core(tp)
        if typing.get_origin(base) is Literal and isinstance(value, str):
            close = suggest(value, [str(v) for v in typing.get_args(base)])
            if close:
                allowed += f" (did you mean {close!r}?)"
    return f"{path}: expected {allowed}, got {shown(value)} ({type(value).__name__}) ({where})"


# --- paths -----------------------------------------------------------------------------------
def _is_path(tp: Any) -> PathOf | None:
    return next((m for m in markers(tp) if isinstance(m, PathOf)), None)


def _resolve_against(path: str, base: str) -> str:
    return resolve_path(path, base)


def _paths_in(tp: Any) -> PathsIn | None:
    return next((m for m in markers(tp) if isinstance(m, PathsIn)), None)


def _resolved(model: Any, loc: Loc, origins: Origins, errors: list[str]) -> Any:
    """``model`` with every relative path resolved: against the configuration's folder, or the
    current directory for a path given by an override."""
    updates: dict[str, Any] = {}
    for name, info in type(model).model_fields.items():
        value, here = getattr(model, name), (*loc, name)
        if isinstance(value, BaseModel):
            new = _resolved(value, here, origins, errors)
        elif isinstance(value, tuple) and value and all(isinstance(v, BaseModel) for v in value):
            one = len(value) == 1  # one section: its keys are named without an index
            items = tuple(_resolved(v, here if one else (*here, i), origins, errors) for i, v in enumerate(value))
            new = value if all(a is b for a, b in zip(items, value, strict=True)) else items
        elif isinstance(value, str) and (mark := _is_path(field_type(info))):
            if value in mark.unless:
                continue
            base = os.getcwd() if origins.from_override(here) else origins.base
            try:
                new = resolve_path(value, base)
            except PydanticCustomError as exc:
                error = {"type": exc.type, "loc": here, "input": value, "ctx": exc.context}
                errors.append(message(error, {}, origins))
                continue
        elif isinstance(value, dict) and (inner := _paths_in(field_type(info))):
            base = os.getcwd() if origins.from_override(here) else origins.base
            try:
                new = inner.resolve(value, functools.partial(_resolve_against, base=base))
            except PydanticCustomError as exc:
                error = {"type": exc.type, "loc": here, "input": value, "ctx": exc.context}
                errors.append(message(error, {}, origins))
                continue
        else:
            continue
        if new is not value:
            updates[name] = new
    return model.model_copy(update=updates) if updates else model
