"""The building blocks of the configuration schema: field types, rules between keys, and the text
saying what a field allows.

A constraint is declared once, on a field's type (``Annotated[int, Field(ge=1)]``, ``Literal``,
:class:`ListOf`, :class:`PathOf`, ...). :func:`describe` turns that type into the "what is allowed"
text that both the error messages (:mod:`sitsflow.config.report`) and the reference page
(:mod:`sitsflow.config.docs`) print. Validators report problems with three error types:

* ``invalid`` (:func:`invalid`): the value is not what the field allows; the message says
  ``expected <describe(field)>[; why], got <value>``;
* ``expected`` (:func:`expected`): the same with a text of its own instead of the field's;
* ``detail`` (:func:`detail`): a whole sentence about the key.
"""

from __future__ import annotations

import datetime
import difflib
import itertools
import math
import os
import posixpath
import re
import string
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal, Union
from urllib.parse import urlsplit

import annotated_types
from pydantic import (
    BaseModel,
    ConfigDict,
    GetCoreSchemaHandler,
    PlainSerializer,
    PlainValidator,
    TypeAdapter,
    ValidationError,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError, core_schema
from typing_extensions import is_typeddict

_TEMPLATES = {"invalid": "{why}", "expected": "{expected}", "detail": "{detail}"}


def invalid(why: str = "") -> PydanticCustomError:
    """The value is not what its field allows (``why``: an optional precision)."""
    return PydanticCustomError("invalid", _TEMPLATES["invalid"], {"why": why})


def expected(text: str) -> PydanticCustomError:
    """The value is not ``text`` (said instead of the field's own description)."""
    return PydanticCustomError("expected", _TEMPLATES["expected"], {"expected": text})


def detail(text: str) -> PydanticCustomError:
    """A whole message about the key."""
    return PydanticCustomError("detail", _TEMPLATES["detail"], {"detail": text})


def shown(value: Any, limit: int = 100) -> str:
    """``repr(value)``, cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def suggest(word: str, allowed: Iterable[str]) -> str | None:
    """The closest allowed word (difflib), case-insensitively, or None."""
    lowered = {o.lower(): o for o in allowed}
    if word.lower() in lowered:
        return lowered[word.lower()]
    close = difflib.get_close_matches(word.lower(), list(lowered), n=1, cutoff=0.6)
    if close:
        return lowered[close[0]]
    if len(word) >= 3:
        containing = [o for low, o in lowered.items() if word.lower() in low]
        if len(containing) == 1:
            return containing[0]
    return None


# --- what a field allows ---------------------------------------------------------------------
@dataclass(frozen=True)
class Expect:
    """Metadata of a field type: the text saying what the field allows, when its type does not
    say it well by itself (paths, patterns, lists)."""

    text: str


def _parts(tp: Any) -> tuple[Any, list[Any]]:
    """A type without its ``Annotated`` layers, and their metadata (FieldInfo objects expanded)."""
    metadata: list[Any] = []
    while typing.get_origin(tp) is Annotated:
        tp, *extra = typing.get_args(tp)
        metadata[:0] = extra
    flat: list[Any] = []
    for item in metadata:
        flat.extend(item.metadata if isinstance(item, FieldInfo) else [item])
    return tp, flat


def markers(tp: Any) -> list[Any]:
    """The metadata of a field type, that of ``X`` in ``X | None`` included."""
    base, metadata = _parts(tp)
    arm = optional_arm(base)
    return metadata + (_parts(arm)[1] if arm is not None else [])


def core(tp: Any) -> Any:
    """A field type without its metadata and its ``None`` arm (``int`` for ``Annotated[int, ...] | None``)."""
    base, _ = _parts(tp)
    return _parts(optional_arm(base) or base)[0]


def field_type(info: FieldInfo) -> Any:
    """A pydantic field's type with its constraints, as one ``Annotated`` type."""
    return Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation


def optional_arm(tp: Any) -> Any | None:
    """``X`` for ``X | None``, else None."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        arms = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(arms) == 1 and len(typing.get_args(tp)) == 2:
            return arms[0]
    return None


def describe(tp: Any, name: str = "value") -> str:
    """What a value of type ``tp`` (a field named ``name``) may be, in words."""
    base, metadata = _parts(tp)
    for marker in reversed(metadata):
        if isinstance(marker, ListOf):
            return marker.describe(typing.get_args(base)[0])
        if isinstance(marker, Expect | Text | PathOf | JsonDict | SectionList):
            return marker.text
    arm = optional_arm(base)
    if arm is not None:
        return "None or " + describe(arm, name)
    if base is bool:
        return "True or False (a boolean, not 0/1 or a string)"
    if typing.get_origin(base) is Literal:
        return "one of " + ", ".join(repr(v) for v in typing.get_args(base))
    if base in (int, float):
        what = "an integer" if base is int else "a number"
        bounds = [
            (op, f"{getattr(m, attr):g}")
            for m in metadata
            for op, attr in ((">=", "ge"), (">", "gt"), ("<=", "le"), ("<", "lt"))
            if isinstance(m, getattr(annotated_types, attr.capitalize()))
        ]
        low = next((b for b in bounds if b[0][0] == ">"), None)
        high = next((b for b in bounds if b[0][0] == "<"), None)
        if low and high:
            return f"{what} {low[1]} {low[0].replace('>', '<')} {name} {high[0]} {high[1]}"
        return " ".join([what, *(low or high or ())])
    if isinstance(base, type) and issubclass(base, Section):
        return "a section { key : value }"
    if is_typeddict(base) or (isinstance(base, type) and issubclass(base, BaseModel)):
        return f"a dict with keys among {', '.join(fields_of(base))}"
    if base is dict or typing.get_origin(base) is dict:
        return "a dict"
    if base is str:
        return "a string"
    return getattr(base, "__name__", str(base))


def fields_of(owner: Any) -> dict[str, Any]:
    """The fields of a model or TypedDict: name -> type (with its metadata)."""
    if isinstance(owner, type) and issubclass(owner, BaseModel):
        return {name: field_type(info) for name, info in owner.model_fields.items()}
    if is_typeddict(owner):
        return typing.get_type_hints(owner, include_extras=True)
    return {}


def field_doc(owner: Any, name: str) -> str:
    """The docstring of a field of a model or TypedDict, on one line, without reST markup."""
    if isinstance(owner, type) and issubclass(owner, BaseModel):
        text = owner.model_fields[name].description or ""
    else:
        text = TypeAdapter(owner).json_schema()["properties"][name].get("description", "")
    return " ".join(text.split())


# --- iota2 keys that are not implemented -----------------------------------------------------
_NONE_TEXTS = ("", "none")


@dataclass(frozen=True)
class Iota2Default:
    """An iota2 key sitsflow does not implement, whose iota2 default is what sitsflow does.

    ``default``: iota2's default value; ``meaning``: what the key does in iota2; ``otherwise``:
    why another value is refused (what it would change in the maps, what to use instead);
    ``switch``: for a dict default, the key that turns the iota2 feature on: written at its default,
    the dict's other keys are moot (iota2 reads them only when the feature is on) and any are accepted.
    """

    default: Any
    meaning: str
    otherwise: str
    switch: str | None = None

    def accepts(self, value: Any) -> bool:
        """Whether ``value`` is iota2's default as a user writes it: the same number, boolean or
        list; a dict of some of the default's keys, each at its default (or its ``switch`` at its
        default, whatever the others); strings compared without
        case or surrounding blanks; None also written ``"None"`` or ``""`` (iota2's files write
        both)."""
        default = self.default
        if default is None:
            return value is None or (isinstance(value, str) and value.strip().lower() in _NONE_TEXTS)
        if isinstance(default, bool) or isinstance(value, bool):
            return isinstance(value, bool) and isinstance(default, bool) and value == default
        if isinstance(default, int | float):
            return isinstance(value, int | float) and float(value) == float(default)
        if isinstance(default, str):
            return isinstance(value, str) and value.strip().lower() == default.lower()
        if isinstance(default, list | tuple):
            return (
                isinstance(value, list | tuple)
                and len(value) == len(default)
                and all(Iota2Default(d, "", "").accepts(v) for d, v in zip(default, value, strict=True))
            )
        if isinstance(default, dict):  # a key left out takes its default
            if self.switch is not None and isinstance(value, dict) and self.switch in value:
                return Iota2Default(default[self.switch], "", "").accepts(value[self.switch])
            return (
                isinstance(value, dict)
                and set(value) <= set(default)
                and all(Iota2Default(default[k], "", "").accepts(v) for k, v in value.items())
            )
        return bool(value == default)


# --- base classes ----------------------------------------------------------------------------
Rule = tuple[tuple[str, ...], Callable[[Any], Iterable[tuple[tuple[Any, ...], Any, PydanticCustomError]]]]
"""A rule between keys: the keys it reads, and a check of the model yielding (loc, value, error)."""


def _rebuilt(error: Any) -> Any:
    """An ``errors()`` item as the line error it was made from."""
    kind = error["type"]
    ctx = error.get("ctx")
    if kind in _TEMPLATES:
        kind = PydanticCustomError(kind, _TEMPLATES[kind], ctx)
    line = {"type": kind, "loc": error["loc"], "input": error["input"]}
    if ctx is not None and not isinstance(kind, PydanticCustomError):
        line["ctx"] = ctx
    return line


class Inline(BaseModel):
    """A dict of fixed keys written inline (``{"batch_size": [8]}``): immutable, no unknown key."""

    model_config = ConfigDict(
        frozen=True, extra="forbid", strict=True, allow_inf_nan=False, use_attribute_docstrings=True
    )
    __iota2__: ClassVar[dict[str, str]] = {}
    """iota2 keys sitsflow does not support yet -> what to use instead ("" when nothing)."""
    __refused__: ClassVar[dict[str, str]] = {}
    """Keys that cannot be set -> why."""
    __ignored__: ClassVar[dict[str, str]] = {}
    """iota2 keys without effect here (they steer iota2's own scheduler or files, or have no
    effect on sitsflow's maps) -> what replaces them or why: accepted, left out of the
    configuration, and named in one warning."""
    __iota2_defaults__: ClassVar[dict[str, Iota2Default]] = {}
    """iota2 keys sitsflow does not implement -> iota2's default and meaning: at that default
    (what sitsflow does) the key is accepted, left out and named in the warning of
    ``__ignored__``; another value would make another map, so it is refused (exit 2)."""
    __rules__: ClassVar[tuple[Rule, ...]] = ()
    """Rules between the keys, checked once the keys they read are valid (every error at once)."""

    @model_validator(mode="wrap")
    @classmethod
    def _with_rules(cls, data: Any, handler: Callable[[Any], Any]) -> Any:
        if not cls.__rules__:
            return handler(data)
        try:
            model = handler(data)
        except ValidationError as exc:
            errors = [_rebuilt(e) for e in exc.errors()]
            if isinstance(data, dict):
                bad = {e["loc"][0] for e in errors if e["loc"]}
                try:  # the keys valid by themselves, the others left to their defaults
                    partial = handler({k: v for k, v in data.items() if k not in bad})
                except ValidationError:
                    partial = None
                if partial is not None:
                    errors += cls._broken(partial, bad)
            raise ValidationError.from_exception_data(cls.__name__, errors) from None
        errors = cls._broken(model, set())
        if errors:
            raise ValidationError.from_exception_data(cls.__name__, errors)
        return model

    @classmethod
    def _broken(cls, model: Any, skip: set[Any]) -> list[Any]:
        return [
            {"type": error, "loc": loc, "input": value}
            for keys, rule in cls.__rules__
            if not skip.intersection(keys)
            for loc, value, error in rule(model)
        ]


class Section(Inline):
    """A section (``name : { key : value ... }``)."""


# --- field types: markers used in Annotated[...] ---------------------------------------------
class Checked:
    """Base of the markers that add checks to the type they annotate: ``before`` runs on the raw
    value, ``after`` on the value the type accepted."""

    def before(self, value: Any) -> Any:
        return value

    def after(self, value: Any) -> Any:
        return value

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> Any:
        inner = core_schema.no_info_after_validator_function(self.after, handler(source))
        return core_schema.no_info_before_validator_function(self.before, inner)


@dataclass(frozen=True)
class ListOf(Checked):
    """``Annotated[tuple[X, ...], ListOf(...)]``: a list (a tuple once checked) of unique items.

    ``one_ok``: one value stands for a one-element list. A problem with an item is reported for the
    whole list, with ``text`` (by default: what the item type allows).
    """

    noun: str = "value"
    text: str | None = None
    one_ok: bool = True
    empty_ok: bool = False

    def before(self, value: Any) -> Any:
        if isinstance(value, list):
            return tuple(value)
        if self.one_ok and not isinstance(value, tuple | dict) and value is not None:
            return (value,)
        return value

    def after(self, value: tuple[Any, ...]) -> tuple[Any, ...]:
        if not value and not self.empty_ok:
            raise invalid()
        if len(set(value)) != len(value):
            raise invalid(f"a {self.noun} is listed twice")
        return value

    def describe(self, item: Any) -> str:
        """What the list allows."""
        if self.text is not None:
            return self.text
        return (
            f"a {'' if self.empty_ok else 'non-empty '}list of unique {self.noun}s"
            f"{f' (or one {self.noun})' if self.one_ok else ''}, each {describe(item)}"
        )


@dataclass(frozen=True)
class SectionList(Checked):
    """``Annotated[tuple[S, ...], SectionList()]`` of a :class:`Section` ``S``: one section
    (``name : { ... }``) or a list of them (``name : [ { ... }, { ... } ]``), held as a tuple.
    A problem inside an item is reported at its index (``name[1].key``)."""

    text: str = "a section { key : value } or a list of sections [ { ... }, { ... } ]"

    def before(self, value: Any) -> Any:
        if isinstance(value, dict):
            return (value,)
        if isinstance(value, list) and value:
            return tuple(value)
        return value


def section_model(tp: Any) -> Any:
    """The section model a field type holds: ``S`` for ``S``, ``S | None`` and a
    :class:`SectionList` of ``S``."""
    base = core(tp)
    if any(isinstance(m, SectionList) for m in markers(tp)):
        return typing.get_args(base)[0]
    return base


def is_section_list(tp: Any) -> bool:
    """Whether a field type is a :class:`SectionList`."""
    return any(isinstance(m, SectionList) for m in markers(tp))


@dataclass(frozen=True)
class Text(Checked):
    """``Annotated[str, Text(...)]``: a non-blank string (matching ``pattern`` in full)."""

    text: str = "a non-empty string"
    pattern: str | None = None

    def after(self, value: str) -> str:
        if not value.strip() or (self.pattern and not re.fullmatch(self.pattern, value)):
            raise invalid()
        return value


@dataclass(frozen=True)
class PathOf(Checked):
    """``Annotated[str, PathOf(...)]``: a local path or ``s3://`` URI of ``text`` ("the path of
    a .py file"), checked here and resolved to an absolute one by
    :func:`sitsflow.config.report.validate`.

    ``pattern``: may hold ``{tile}`` (and no other placeholder); ``suffixes``: allowed endings;
    ``unless``: values of the field that are not paths; ``http``: an input that may also be an
    ``http(s)://`` URL (read-only: never for an output).
    """

    text: str
    pattern: bool = False
    suffixes: tuple[str, ...] = ()
    unless: tuple[str, ...] = ()
    http: bool = False

    def after(self, value: Any) -> Any:
        if not isinstance(value, str) or value in self.unless:
            return value
        if not value.strip() or (self.suffixes and not value.lower().endswith(self.suffixes)):
            raise invalid()
        if self.pattern:
            check_placeholders(value)
        elif "{tile}" in value:
            raise invalid("{tile} is not replaced in this key")
        scheme = _SCHEME.match(value)
        if self.http and scheme and scheme.group(1).lower() in ("http", "https"):
            if not urlsplit(value).hostname:
                raise expected("an http(s)://host/path URL")
            return value
        if scheme and scheme.group(1) != "s3":
            allowed = "a local path, an s3:// URI or an http(s):// URL" if self.http else "a local path or an s3:// URI"
            raise expected(f"{allowed} (other URI schemes are not supported)")
        if scheme:
            normalise_s3(value)
        return value


@dataclass(frozen=True)
class JsonDict(Checked):
    """``Annotated[dict[str, Any], JsonDict(...)]``: a dict of plain values (``where`` names it
    in messages)."""

    text: str
    where: str

    def after(self, value: dict[str, Any]) -> dict[str, Any]:
        checked: dict[str, Any] = json_value(value, self.where)
        return checked


@dataclass(frozen=True)
class PathsIn:
    """Marker of a dict-valued field that holds paths: ``resolve(value, fn)`` gives the value with
    each of its paths passed through ``fn`` (resolved as a :class:`PathOf` field's value is)."""

    resolve: Callable[[Any, Callable[[str], str]], Any]


def check_placeholders(value: str) -> None:
    """Raise ``invalid`` unless ``{tile}`` is the only placeholder of ``value``."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(value) if f is not None]
    except ValueError as exc:
        raise invalid(f"unbalanced braces: {exc}") from None
    bad = [f for f in fields if f != "tile"]
    if bad:
        raise invalid(f"unknown placeholder {{{bad[0]}}} (only {{tile}} is replaced)")


_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_S3_URI = re.compile(r"^s3://([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(/.*)?$")


def normalise_s3(uri: str) -> str:
    """``s3://bucket/key`` with the key normalised (no ``.``/``..``/double or trailing slashes).

    Raises ``expected`` (a PydanticCustomError saying what is expected).
    """
    match = _S3_URI.match(uri)
    if not match:
        raise expected("an s3://bucket/key URI with a valid bucket name")
    bucket, key = match.group(1), (match.group(2) or "").lstrip("/")
    key = posixpath.normpath(key) if key else "."
    if key == ".":
        return f"s3://{bucket}"
    if key.startswith(".."):
        raise expected("a path that stays inside the bucket")
    return f"s3://{bucket}/{key}"


def resolve_path(value: str, base: str) -> str:
    """Resolve ``value`` against ``base`` (a local folder or an ``s3://`` prefix).

    Absolute local paths and ``s3://`` URIs are kept (normalised), http(s) URLs as they are;
    ``~`` is expanded.
    """
    scheme = _SCHEME.match(value)
    if scheme and scheme.group(1).lower() in ("http", "https"):
        return value
    if scheme:
        return normalise_s3(value)
    value = os.path.expanduser(value)
    if os.path.isabs(value):
        return os.path.normpath(value)
    if base.startswith("s3://"):
        return normalise_s3(f"{base.rstrip('/')}/{value}")
    return os.path.normpath(os.path.join(base, value))


AS_IS = PlainSerializer(lambda value: value, return_type=Any)
"""Serialise a value by what it is (for types whose validator chooses among several shapes)."""


# --- dates -----------------------------------------------------------------------------------
DATE_FORMS = "YYYYMMDD, YYYY-MM-DD or an ISO datetime"


def parse_date(value: Any) -> int:
    """A date as a YYYYMMDD int from "YYYYMMDD", "YYYY-MM-DD", an ISO datetime or a YYYYMMDD int.

    Raises ``expected`` (a PydanticCustomError).
    """
    try:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ValueError(value)
        raw = str(value).strip()
        if re.fullmatch(r"\d{8}", raw):
            day = datetime.datetime.strptime(raw, "%Y%m%d").date()
        elif re.fullmatch(r"\d{4}-\d{2}-\d{2}", raw):
            day = datetime.date.fromisoformat(raw)
        else:
            iso = raw[:-1] + "+00:00" if raw.endswith("Z") else raw
            day = datetime.datetime.fromisoformat(iso).date()
    except ValueError:
        raise expected(f"a date ({DATE_FORMS})") from None
    return day.year * 10000 + day.month * 100 + day.day


Date = Annotated[int, PlainValidator(parse_date), Expect(f"a date ({DATE_FORMS})")]
"""A date, given as YYYYMMDD, YYYY-MM-DD or an ISO datetime, held as a YYYYMMDD integer."""

_DATE_LIST = TypeAdapter(tuple[Date, ...])
_DATES_TEXT = f"'descriptions', a list of dates ({DATE_FORMS}) or the path of a .json or .txt file of dates"
_DATES_FILE = TypeAdapter(Annotated[str, PathOf(_DATES_TEXT, suffixes=(".json", ".txt"))])


def _dates(value: Any) -> str | tuple[int, ...]:
    if value == "descriptions":
        return "descriptions"
    if isinstance(value, str) and value.strip().lower().endswith((".json", ".txt")):
        return str(_DATES_FILE.validate_python(value.strip()))
    if not isinstance(value, list | tuple) or not value:
        raise invalid()
    out = _DATE_LIST.validate_python(tuple(value))  # a bad item is reported at its index
    if any(b <= a for a, b in itertools.pairwise(out)):
        raise detail(f"dates must be unique and in increasing order, got {list(out)}")
    return out


Dates = Annotated[
    Literal["descriptions"] | tuple[int, ...] | str,
    PlainValidator(_dates),
    AS_IS,
    PathOf(_DATES_TEXT, unless=("descriptions",)),
]
"""``"descriptions"``, a list of increasing dates, or the path of a ``.json``/``.txt`` of dates."""


# --- plain JSON values -----------------------------------------------------------------------
def json_value(value: Any, where: str) -> Any:
    """Check that ``value`` is made of str, int, float, bool, None, lists and str-keyed dicts."""
    if value is None or isinstance(value, str | bool | int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise detail(f"finite numbers only in {where}")
        return value
    if isinstance(value, list | tuple):
        return [json_value(v, where) for v in value]
    if isinstance(value, dict):
        return {str(k): json_value(v, where) for k, v in value.items()}
    raise detail(f"unsupported value {shown(value)} ({type(value).__name__}) in {where}")
