"""Validation of the raw configuration dict: every key, type and value, every error at once.

Each message names the full key path, the value given and what is allowed, and where the key is:
``file:line`` for the configuration file, ``from --set`` for an override.
"""

from __future__ import annotations

import contextlib
import datetime
import difflib
import itertools
import math
import os
import posixpath
import re
import string
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from sitsflow.config.models import (
    BUILTIN_NETWORKS,
    ArgClassificationSection,
    ArgTrainSection,
    ChainSection,
    DatedRasterSection,
    DeepLearningParameters,
    ExternalFeaturesSection,
    OpticalSensorSection,
    PythonDataManagingSection,
)
from sitsflow.config.syntax import Location
from sitsflow.config.resources import IOTA2_STEP_HINTS, ResourcesSection, parse_block

_MISSING = object()


class Invalid(Exception):
    """A value is wrong: ``expected`` says what is allowed, or ``detail`` is the whole message."""

    def __init__(self, expected: str | None = None, *, detail: str | None = None) -> None:
        super().__init__(expected or detail or "")
        self.expected = expected
        self.detail = detail


class Reported(Exception):
    """A checker reported its own (nested) errors; the key has no valid value."""


def _dotted(path: Location) -> str:
    return ".".join(path)


def _type_name(value: Any) -> str:
    return type(value).__name__


def _shown(value: Any, limit: int = 100) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class Origins:
    """Where each key came from: a file line, or an override (``--set``)."""

    label: str
    """The configuration's name in messages (the source as the user gave it)."""
    base: str
    """Folder (local or ``s3://bucket/prefix``) relative paths in the file are resolved against."""
    lines: dict[Location, int] = field(default_factory=dict)
    """Line of each key path in the file."""
    overridden: set[Location] = field(default_factory=set)
    """Key paths set by overrides (everything under them too)."""

    def set_by_override(self, path: Location) -> None:
        """Record that ``path`` (and everything under it) now comes from an override."""
        for known in [p for p in self.lines if p[: len(path)] == path]:
            del self.lines[known]
        self.overridden = {p for p in self.overridden if p[: len(path)] != path}
        self.overridden.add(path)

    def from_override(self, path: Location) -> bool:
        """Whether the value at ``path`` was given by an override."""
        return any(path[:n] in self.overridden for n in range(len(path), 0, -1))

    def where(self, path: Location) -> str:
        """``"file:line"``, ``"from --set"``, or the file alone when no line is known."""
        for n in range(len(path), 0, -1):
            prefix = path[:n]
            if prefix in self.overridden:
                return "from --set"
            if prefix in self.lines:
                return f"{self.label}:{self.lines[prefix]}"
        return self.label


@dataclass
class Ctx:
    """The key being checked and the error collector."""

    path: Location
    origins: Origins
    errors: list[str]

    def child(self, *names: str) -> Ctx:
        """The context of a key under this one."""
        return Ctx((*self.path, *names), self.origins, self.errors)

    @property
    def name(self) -> str:
        """Full dotted key path."""
        return _dotted(self.path)

    @property
    def where(self) -> str:
        """Where the key is (``file:line`` or ``from --set``)."""
        return self.origins.where(self.path)

    def invalid(self, value: Any, problem: Invalid) -> None:
        """Report a wrong value."""
        if problem.detail is not None:
            self.errors.append(f"{self.name}: {problem.detail} ({self.where})")
        else:
            self.errors.append(
                f"{self.name}: expected {problem.expected}, got {_shown(value)} "
                f"({_type_name(value)}) ({self.where})"
            )

    def error(self, message: str) -> None:
        """Report a message about this key (``where`` is appended)."""
        self.errors.append(f"{self.name}: {message} ({self.where})")

    def resolve(self, value: str) -> str:
        """An absolute local path or ``s3://`` URI for ``value``.

        Relative paths are resolved against the configuration's folder, or against the current
        directory when the value came from an override.
        """
        base = os.getcwd() if self.origins.from_override(self.path) else self.origins.base
        return resolve_path(value, base)


Checker = Callable[[Any, Ctx], Any]

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_S3_URI = re.compile(r"^s3://([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(/.*)?$")


def is_s3(uri: str) -> bool:
    """Whether ``uri`` is an ``s3://`` URI."""
    return uri.startswith("s3://")


def normalise_s3(uri: str) -> str:
    """``s3://bucket/key`` with the key normalised (no ``.``/``..``/double or trailing slashes)."""
    match = _S3_URI.match(uri)
    if not match:
        raise Invalid("an s3://bucket/key URI with a valid bucket name")
    bucket, key = match.group(1), (match.group(2) or "").lstrip("/")
    if not key:
        return f"s3://{bucket}"
    key = posixpath.normpath(key)
    if key == ".":
        return f"s3://{bucket}"
    if key.startswith(".."):
        raise Invalid("a path that stays inside the bucket")
    return f"s3://{bucket}/{key}"


def resolve_path(value: str, base: str) -> str:
    """Resolve ``value`` against ``base`` (a local folder or an ``s3://`` prefix).

    Absolute local paths and ``s3://`` URIs are kept (normalised); ``~`` is expanded.
    """
    scheme = _SCHEME.match(value)
    if scheme:
        if scheme.group(1) != "s3":
            raise Invalid("a local path or an s3:// URI (other URI schemes are not supported)")
        return normalise_s3(value)
    value = os.path.expanduser(value)
    if os.path.isabs(value):
        return os.path.normpath(value)
    if is_s3(base):
        return normalise_s3(f"{base.rstrip('/')}/{value}")
    return os.path.normpath(os.path.join(base, value))


# --- basic checkers --------------------------------------------------------------------------
def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def integer(minimum: int | None = None, text: str | None = None) -> Checker:
    """An int (not a bool, not a float) >= ``minimum``."""
    expected = text or ("an integer" + (f" >= {minimum}" if minimum is not None else ""))

    def check(value: Any, ctx: Ctx) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise Invalid(expected)
        if minimum is not None and value < minimum:
            raise Invalid(expected)
        return int(value)

    return check


def number(
    *,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
    text: str,
) -> Checker:
    """A finite int or float (not a bool) within the bounds, returned as a float."""

    def check(value: Any, ctx: Ctx) -> float:
        if not _is_number(value) or not math.isfinite(value):
            raise Invalid(text)
        v = float(value)
        if (gt is not None and not v > gt) or (ge is not None and not v >= ge):
            raise Invalid(text)
        if (lt is not None and not v < lt) or (le is not None and not v <= le):
            raise Invalid(text)
        return v

    return check


def boolean(value: Any, ctx: Ctx) -> bool:
    """A real boolean: True or False (not 0/1, not a string)."""
    if not isinstance(value, bool):
        raise Invalid("True or False (a boolean, not 0/1 or a string)")
    return value


def choice(options: Iterable[str], aliases: dict[str, str] | None = None) -> Checker:
    """One of ``options`` (``aliases`` map other accepted spellings to an option)."""
    allowed = tuple(options)
    aliases = aliases or {}

    def check(value: Any, ctx: Ctx) -> str:
        if isinstance(value, str):
            if value in allowed:
                return value
            if value in aliases:
                return aliases[value]
        expected = "one of " + ", ".join(repr(o) for o in allowed)
        if isinstance(value, str):
            close = suggest(value, allowed)
            if close:
                expected += f" (did you mean {close!r}?)"
        raise Invalid(expected)

    return check


def text(pattern: str | None = None, description: str = "a non-empty string") -> Checker:
    """A non-empty string, matching ``pattern`` (full match) when given."""
    regex = re.compile(pattern) if pattern else None

    def check(value: Any, ctx: Ctx) -> str:
        if not isinstance(value, str) or not value.strip():
            raise Invalid(description)
        if regex is not None and not regex.fullmatch(value):
            raise Invalid(description)
        return value

    return check


def optional(checker: Checker) -> Checker:
    """None, or what ``checker`` accepts."""

    def check(value: Any, ctx: Ctx) -> Any:
        if value is None:
            return None
        return checker(value, ctx)

    return check


def path(
    *,
    pattern: bool = False,
    suffixes: tuple[str, ...] = (),
    description: str | None = None,
) -> Checker:
    """A path or ``s3://`` URI, resolved to an absolute one.

    ``pattern``: may contain ``{tile}`` (and no other placeholder). ``suffixes``: allowed endings.
    """
    expected = description or (
        "a path or s3:// URI"
        + (" (may contain {tile})" if pattern else "")
        + (f" ending in {' or '.join(suffixes)}" if suffixes else "")
    )

    def check(value: Any, ctx: Ctx) -> str:
        if not isinstance(value, str) or not value.strip():
            raise Invalid(expected)
        if suffixes and not value.lower().endswith(suffixes):
            raise Invalid(expected)
        if pattern:
            check_placeholders(value, expected)
        elif "{tile}" in value:
            raise Invalid(f"{expected}; {{tile}} is not replaced in this key")
        return ctx.resolve(value)

    return check


def check_placeholders(value: str, expected: str) -> None:
    """Raise :class:`Invalid` unless ``{tile}`` is the only placeholder of ``value``."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(value) if f is not None]
    except ValueError as exc:
        raise Invalid(f"{expected}; unbalanced braces: {exc}") from None
    bad = [f for f in fields if f != "tile"]
    if bad:
        raise Invalid(f"{expected}; unknown placeholder {{{bad[0]}}} (only {{tile}} is replaced)")


def suggest(word: str, allowed: Iterable[str]) -> str | None:
    """The closest allowed word (difflib), case-insensitively, or None."""
    options = list(allowed)
    lowered = {o.lower(): o for o in options}
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


def json_value(value: Any, where: str = "value") -> Any:
    """Check that ``value`` is made of str, int, float, bool, None, lists and str-keyed dicts."""
    if value is None or isinstance(value, str | bool | int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise Invalid(f"finite numbers only in {where}")
        return value
    if isinstance(value, list | tuple):
        return [json_value(v, where) for v in value]
    if isinstance(value, dict):
        return {str(k): json_value(v, where) for k, v in value.items()}
    raise Invalid(detail=f"unsupported value {_shown(value)} ({_type_name(value)}) in {where}")


# --- dates -----------------------------------------------------------------------------------
_DATE_FORMS = "YYYYMMDD, YYYY-MM-DD or an ISO datetime"


def parse_date(value: Any) -> int:
    """A date as a YYYYMMDD int from "YYYYMMDD", "YYYY-MM-DD", an ISO datetime or a YYYYMMDD int."""
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, int):
        value = str(value)
    if not isinstance(value, str):
        raise ValueError(value)
    raw = value.strip()
    if re.fullmatch(r"\d{8}", raw):
        day = datetime.datetime.strptime(raw, "%Y%m%d").date()
    elif re.fullmatch(r"\d{4}-\d{2}-\d{2}", raw):
        day = datetime.date.fromisoformat(raw)
    else:
        iso = raw[:-1] + "+00:00" if raw.endswith("Z") else raw
        day = datetime.datetime.fromisoformat(iso).date()
    return day.year * 10000 + day.month * 100 + day.day


def date(value: Any, ctx: Ctx) -> int:
    """One date, normalised to a YYYYMMDD int."""
    try:
        return parse_date(value)
    except ValueError:
        raise Invalid(f"a date ({_DATE_FORMS})") from None


def dates(value: Any, ctx: Ctx) -> str | tuple[int, ...]:
    """``"descriptions"``, a list of increasing dates, or a ``.json``/``.txt`` file of dates."""
    expected = (
        f"'descriptions', a list of dates ({_DATE_FORMS}) or the path of a .json or .txt file "
        "of dates"
    )
    if value == "descriptions":
        return "descriptions"
    if isinstance(value, str):
        if value.strip().lower().endswith((".json", ".txt")):
            return str(path(suffixes=(".json", ".txt"), description=expected)(value.strip(), ctx))
        raise Invalid(expected)
    if not isinstance(value, list) or not value:
        raise Invalid(expected)
    out: list[int] = []
    bad = False
    for i, item in enumerate(value):
        try:
            out.append(parse_date(item))
        except ValueError:
            ctx.errors.append(
                f"{ctx.name}[{i}]: expected a date ({_DATE_FORMS}), got {_shown(item)} "
                f"({_type_name(item)}) ({ctx.where})"
            )
            bad = True
    if bad:
        raise Reported()
    if any(b <= a for a, b in itertools.pairwise(out)):
        raise Invalid(detail=f"dates must be unique and in increasing order, got {out}")
    return tuple(out)


# --- section machinery -----------------------------------------------------------------------
@dataclass(frozen=True)
class SectionSpec:
    """How to check one section: the model gives keys and defaults, ``checks`` the values."""

    model: type[BaseModel]
    checks: dict[str, Checker]
    unsupported: dict[str, str] = field(default_factory=dict)
    """iota2 keys sitsflow does not support yet -> what to use instead ("" when nothing)."""


def _meaning(model: type[BaseModel], key: str) -> str:
    description = (model.model_fields[key].description or "").replace("``", "")
    return " ".join(description.split())


def check_section(raw: Any, ctx: Ctx, spec: SectionSpec) -> dict[str, Any]:
    """Check a section's keys and values; returns the valid values (defaults left to the model).

    Raises :class:`Reported` when any error was reported.
    """
    if not isinstance(raw, dict):
        ctx.invalid(raw, Invalid("a section { key : value }"))
        raise Reported()
    fields = spec.model.model_fields
    before = len(ctx.errors)
    for key in raw:
        if key in fields:
            continue
        kctx = ctx.child(key)
        if key in spec.unsupported:
            hint = spec.unsupported[key]
            kctx.errors.append(
                f"{kctx.name} is an iota2 parameter that sitsflow does not support yet "
                f"({kctx.where})" + (f"; {hint}" if hint else "")
            )
            continue
        close = suggest(key, fields)
        kctx.errors.append(
            f"unknown key {kctx.name!r} ({kctx.where}); "
            + (f"did you mean {close!r}? " if close else "")
            + f"Allowed keys: {', '.join(fields)}"
        )
    out: dict[str, Any] = {}
    for key, info in fields.items():
        kctx = ctx.child(key)
        if key in raw:
            try:
                out[key] = spec.checks[key](raw[key], kctx)
            except Invalid as problem:
                kctx.invalid(raw[key], problem)
            except Reported:
                pass
        elif info.is_required():
            meaning = _meaning(spec.model, key)
            ctx.errors.append(
                f"{kctx.name}: missing required key {key!r} in section {ctx.name!r} ({ctx.where})"
                + (f": {meaning}" if meaning else "")
            )
    if len(ctx.errors) > before:
        raise Reported()
    return out


# --- chain -----------------------------------------------------------------------------------
_TILE = re.compile(r"[A-Za-z0-9_-]+")


def list_tile(value: Any, ctx: Ctx) -> str:
    """Space-separated tile names (a list of names is accepted too), unique, [A-Za-z0-9_-]+."""
    expected = (
        "tile names separated by spaces, each made of letters, digits, '_' or '-' "
        "(e.g. 'T31TCJ T31TDJ')"
    )
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        names = [n for v in value for n in v.split()]
    elif isinstance(value, str):
        names = value.split()
    else:
        raise Invalid(expected)
    if not names or not all(_TILE.fullmatch(n) for n in names):
        raise Invalid(expected)
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise Invalid(detail=f"tile {duplicates[0]!r} is listed twice in {_shown(value)}")
    return " ".join(names)


_SENSOR_HINT = "describe the images with a dated_raster section instead"
_GRID_HINT = "sitsflow works in the grid (projection and resolution) of the dated rasters"
_CHAIN_UNSUPPORTED = {
    **{
        key: _SENSOR_HINT
        for key in (
            "s2_output_path s2_l3a_output_path "
            "s2_s2c_output_path l8_path_old l8_usgs_path l8_usgs_optical_path "
            "l8_usgs_thermal_path l8_usgs_infrared_path l7_usgs_path l5_path_old s1_path "
            "user_feat_path"
        ).split()
    },
    "spatial_resolution": _GRID_HINT,
    "proj": _GRID_HINT,
    "first_step": "sitsflow runs every stage; a rerun skips the tasks already done",
    "last_step": "sitsflow runs every stage; a rerun skips the tasks already done",
    "logger_level": "set the SITSFLOW_LOG_LEVEL environment variable instead",
    "check_inputs": "sitsflow always checks the configuration before any work",
    "remove_output_path": "",
    "cloud_threshold": "",
    "minimum_required_dates": "",
    "enable_autocontext": "",
    "srtm_path": "",
    "worldclim_path": "",
    "grasslands": "",
}

CHAIN = SectionSpec(
    ChainSection,
    {
        "output_path": path(description="a local folder or an s3:// URI"),
        "list_tile": list_tile,
        "ground_truth": path(description="the path of a vector file (or s3:// URI)"),
        "data_field": text(description="a non-empty field name"),
        "region_path": optional(path(description="None or the path of a vector file")),
        "region_field": text(description="a non-empty field name"),
        "nomenclature_path": optional(path(description="None or the path of a text file")),
        "color_table": optional(path(description="None or the path of a text file")),
        **{
            key: optional(path(description="None or a folder (local or s3:// URI)"))
            for key in ("s2_path", "s2_l3a_path", "s2_s2c_path", "l8_path")
        },
    },
    _CHAIN_UNSUPPORTED,
)


# --- dated_raster ----------------------------------------------------------------------------
def bands(value: Any, ctx: Ctx) -> tuple[str, ...]:
    """A non-empty list of unique lower-case band names (a single string is one band)."""
    expected = "a non-empty list of unique lower-case band names made of [a-z0-9] (e.g. ['ndvi'])"
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise Invalid(expected)
    if not all(isinstance(b, str) and re.fullmatch(r"[a-z0-9]+", b) for b in items):
        raise Invalid(expected)
    if len(set(items)) != len(items):
        raise Invalid(expected + "; a band is listed twice")
    return tuple(items)


DATED_RASTER = SectionSpec(
    DatedRasterSection,
    {
        "name": text(
            r"[a-z][a-z0-9]*", "a lower-case name matching [a-z][a-z0-9]* (e.g. 'sentinel2')"
        ),
        "path": path(
            pattern=True, description="a path or s3:// URI of a raster (may contain {tile})"
        ),
        "bands": bands,
        "dates": dates,
        "scale": number(gt=0, text="a number > 0"),
        "nodata": optional(number(text="None or a number")),
        "mask_path": optional(
            path(
                pattern=True,
                description="None or a path or s3:// URI of a mask raster (may contain {tile})",
            )
        ),
        "start_date": optional(date),
        "end_date": optional(date),
        "temporal_resolution": integer(1, "an integer number of days >= 1"),
    },
)


# --- iota2 sensor sections (Sentinel_2, Sentinel_2_L3A, Sentinel_2_S2C, Landsat8) ----------------
SENSOR_SECTIONS: dict[str, tuple[str, tuple[str, ...], int]] = {
    "Sentinel_2": ("s2_path", ("B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B11", "B12"), 10),
    "Sentinel_2_L3A": (
        "s2_l3a_path", ("B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B11", "B12"), 10
    ),
    "Sentinel_2_S2C": (
        "s2_s2c_path", ("B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12"), 10
    ),
    "Landsat8": ("l8_path", ("B1", "B2", "B3", "B4", "B5", "B6", "B7"), 16),
}
"""section -> (its chain path key, its bands in stacking order, its default temporal_resolution)."""


def keep_bands(allowed: tuple[str, ...]) -> Checker:
    """A non-empty list of unique band names of the sensor, put in the sensor's band order."""

    def check(value: Any, ctx: Ctx) -> tuple[str, ...]:
        expected = f"a non-empty list of unique bands among {list(allowed)}"
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not items or not all(isinstance(b, str) for b in items):
            raise Invalid(expected)
        canon = {b.upper(): b for b in allowed}
        unknown = [b for b in items if b.upper() not in canon]
        if unknown:
            raise Invalid(expected + f"; unknown band {unknown[0]!r}")
        names = [canon[b.upper()] for b in items]
        if len(set(names)) != len(names):
            raise Invalid(expected + "; a band is listed twice")
        return tuple(b for b in allowed if b in names)

    return check


def _sensor_spec(bands_allowed: tuple[str, ...]) -> SectionSpec:
    return SectionSpec(
        OpticalSensorSection,
        {
            "start_date": optional(date),
            "end_date": optional(date),
            "keep_bands": optional(keep_bands(bands_allowed)),
            "temporal_resolution": integer(1, "an integer number of days >= 1"),
        },
        {
            "additional_features": "use the external_features section",
            "write_reproject_resampled_input_dates_stack": "",
            "patterns": "",
            "arbo": "",
        },
    )


_INDICES = ("NDVI", "NDWI", "Brightness")


def spectral_indices(value: Any, ctx: Ctx) -> tuple[str, ...]:
    """A list of unique names among NDVI, NDWI, Brightness (any case); [] turns them off."""
    expected = 'a list of unique names among "NDVI", "NDWI", "Brightness" ([] for none)'
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
        raise Invalid(expected)
    canon = {n.lower(): n for n in _INDICES}
    if any(v.lower() not in canon for v in items):
        raise Invalid(expected)
    names = [canon[v.lower()] for v in items]
    if len(set(names)) != len(names):
        raise Invalid(expected + "; a name is listed twice")
    return tuple(names)


# --- arg_train.deep_learning_parameters --------------------------------------------------------
def dl_parameters(value: Any, ctx: Ctx) -> dict[str, Any]:
    """A dict of constructor arguments (plain values only)."""
    if not isinstance(value, dict):
        raise Invalid("a dict of constructor arguments, e.g. {'d_model': 64}")
    checked: dict[str, Any] = json_value(value, "dl_parameters")
    return checked


def _int_list(minimum: int, item_text: str) -> Callable[[Any, Ctx], tuple[int, ...]]:
    def check(value: Any, ctx: Ctx) -> tuple[int, ...]:
        items = value if isinstance(value, list) else [value]
        if not items or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in items
        ):
            raise Invalid(f"a non-empty list of {item_text} (or one value)")
        if len(set(items)) != len(items):
            raise Invalid(f"a list of unique {item_text}; a value is listed twice")
        return tuple(int(v) for v in items)

    return check


def _positive_float_list(value: Any, ctx: Ctx) -> tuple[float, ...]:
    items = value if isinstance(value, list) else [value]
    if not items or not all(_is_number(v) and math.isfinite(v) and v > 0 for v in items):
        raise Invalid("a non-empty list of numbers > 0 (or one number)")
    out = tuple(float(v) for v in items)
    if len(set(out)) != len(out):
        raise Invalid("a list of unique numbers > 0; a value is listed twice")
    return out


_SOLVER_CHECKS: dict[str, Checker] = {
    "batch_size": _int_list(1, "integers >= 1"),
    "learning_rate": _positive_float_list,
}


def hyperparameters_solver(value: Any, ctx: Ctx) -> dict[str, tuple[Any, ...]]:
    """{"batch_size": [...], "learning_rate": [...]}; a missing key takes its default list."""
    if not isinstance(value, dict):
        raise Invalid('a dict {"batch_size": [1000], "learning_rate": [0.00001]}')
    before = len(ctx.errors)
    out: dict[str, tuple[Any, ...]] = {}
    for key, item in value.items():
        kctx = ctx.child(key)
        if key not in _SOLVER_CHECKS:
            close = suggest(key, _SOLVER_CHECKS)
            kctx.errors.append(
                f"unknown key {kctx.name!r} ({kctx.where}); "
                + (f"did you mean {close!r}? " if close else "")
                + "Allowed keys: batch_size, learning_rate"
            )
            continue
        try:
            out[key] = _SOLVER_CHECKS[key](item, kctx)
        except Invalid as problem:
            kctx.invalid(item, problem)
    if len(ctx.errors) > before:
        raise Reported()
    return out


_ADAPTIVE_LR_CHECKS: dict[str, Checker] = {
    "patience": integer(0),
    "factor": number(gt=0, lt=1, text="a number 0 < factor < 1"),
    "threshold": number(ge=0, text="a number >= 0"),
    "threshold_mode": choice(("rel", "abs")),
    "cooldown": integer(0),
    "min_lr": number(ge=0, text="a number >= 0"),
    "eps": number(ge=0, text="a number >= 0"),
    "verbose": boolean,
}
_ADAPTIVE_LR_FORCED = (
    "cannot be set: mode is forced to 'min' (the validation loss is monitored) "
    "and the optimizer is the training optimizer"
)


def adaptive_lr(value: Any, ctx: Ctx) -> dict[str, Any]:
    """Keyword arguments of ReduceLROnPlateau; ``mode`` and ``optimizer`` are refused."""
    if not isinstance(value, dict):
        raise Invalid(
            "a dict of ReduceLROnPlateau arguments, e.g. {patience: 10, factor: 0.1}, or {}"
        )
    before = len(ctx.errors)
    out: dict[str, Any] = {}
    for key, item in value.items():
        kctx = ctx.child(key)
        if key in ("mode", "optimizer"):
            kctx.error(_ADAPTIVE_LR_FORCED)
            continue
        if key not in _ADAPTIVE_LR_CHECKS:
            close = suggest(key, _ADAPTIVE_LR_CHECKS)
            kctx.errors.append(
                f"unknown key {kctx.name!r} ({kctx.where}); "
                + (f"did you mean {close!r}? " if close else "")
                + f"Allowed keys: {', '.join(_ADAPTIVE_LR_CHECKS)}"
            )
            continue
        try:
            out[key] = _ADAPTIVE_LR_CHECKS[key](item, kctx)
        except Invalid as problem:
            kctx.invalid(item, problem)
    if len(ctx.errors) > before:
        raise Reported()
    return out


_DL = SectionSpec(
    DeepLearningParameters,
    {
        # dl_name is checked against dl_module after the section (see check_deep_learning)
        "dl_name": text(description="the class name of a network (e.g. 'LTAEClassifier')"),
        "dl_parameters": dl_parameters,
        "model_selection_criterion": choice(("loss", "fscore", "oa", "kappa")),
        "epochs": integer(1),
        "weighted_labels": boolean,
        "num_workers": integer(0),
        "hyperparameters_solver": hyperparameters_solver,
        "dl_module": optional(
            path(suffixes=(".py",), description="None or the path of a .py file")
        ),
        "restart_from_checkpoint": boolean,
        "dataloader_mode": choice(("stream", "full")),
        "enable_early_stop": boolean,
        "epoch_to_trigger": integer(1),
        "early_stop_patience": integer(1),
        "early_stop_tol": number(ge=0, text="a number >= 0"),
        "early_stop_metric": choice(
            ("train_loss", "val_loss", "fscore", "oa", "kappa"), {"valid_loss": "val_loss"}
        ),
        "additional_statistics_percentage": optional(
            number(gt=0, le=1, text="None or a number 0 < p <= 1")
        ),
        "adaptive_lr": adaptive_lr,
    },
)


def deep_learning_parameters(value: Any, ctx: Ctx) -> dict[str, Any]:
    """The deep-learning section, with ``dl_name`` checked against ``dl_module``."""
    before = len(ctx.errors)
    try:
        out = check_section(value, ctx, _DL)
    except Reported:
        out = None
    if (
        isinstance(value, dict)
        and isinstance(value.get("dl_name"), str)
        and value["dl_name"].strip()
    ):
        name = value["dl_name"]
        nctx = ctx.child("dl_name")
        if value.get("dl_module") is None:
            if name not in BUILTIN_NETWORKS:
                close = suggest(name, BUILTIN_NETWORKS)
                nctx.invalid(
                    name,
                    Invalid(
                        "one of "
                        + ", ".join(repr(n) for n in BUILTIN_NETWORKS)
                        + (f" (did you mean {close!r}?)" if close else "")
                        + ", or a class of the module given by dl_module"
                    ),
                )
        elif not name.isidentifier():
            nctx.invalid(
                name, Invalid("the class name (a Python identifier) of a network in dl_module")
            )
    if out is None or len(ctx.errors) > before:
        raise Reported()
    out["hyperparameters_solver"] = out.get("hyperparameters_solver", {})
    return out


# --- arg_train, arg_classification, python_data_managing, external_features ------------------
_ARG_TRAIN_UNSUPPORTED = {
    key: ""
    for key in (
        "classifier otb_classifier_options sample_selection split_ground_truth "
        "sample_augmentation sample_management features crop_mix cropMix "
        "prev_features output_prev_features annual_crop a_crop_label_replacement "
        "samples_classif_mix annual_classes_extraction_source validity_threshold "
        "mode_outside_regionsplit learning_samples_extension enable_autocontext "
        "autocontext_iterations force_standard_labels sampling_validation "
        "dempster_shafer_sm"
    ).split()
}
_ARG_TRAIN_UNSUPPORTED["classifier"] = (
    "sitsflow trains deep-learning models only: set arg_train.deep_learning_parameters.dl_name"
)
_ARG_TRAIN_UNSUPPORTED["otb_classifier_options"] = _ARG_TRAIN_UNSUPPORTED["classifier"]
del _ARG_TRAIN_UNSUPPORTED["features"]

ARG_TRAIN = SectionSpec(
    ArgTrainSection,
    {
        "runs": integer(1),
        "ratio": number(gt=0, lt=1, text="a number 0 < ratio < 1"),
        "random_seed": integer(0),
        "features_from_raw_dates": boolean,
        "features": spectral_indices,
        "deep_learning_parameters": deep_learning_parameters,
    },
    _ARG_TRAIN_UNSUPPORTED,
)

ARG_CLASSIFICATION = SectionSpec(
    ArgClassificationSection,
    {"enable_probability_map": boolean, "generate_final_probability_map": boolean},
    {
        key: ""
        for key in (
            "classif_mode fusion_options no_label_management dempstershafer_mob "
            "merge_final_classifications merge_final_classifications_method "
            "merge_final_classifications_ratio merge_final_classifications_undecidedlabel "
            "fusionofclassification_all_samples_validation keep_runs_results "
            "enable_boundary_fusion"
        ).split()
    },
)

PYTHON_DATA_MANAGING = SectionSpec(
    PythonDataManagingSection,
    {
        "chunk_size_mode": choice(("split_number", "user_fixed")),
        "number_of_chunks": integer(1),
        "chunk_size_x": integer(1),
        "chunk_size_y": integer(1),
    },
    {
        "padding_size_x": "",
        "padding_size_y": "",
        "data_mode_access": "",
        "fill_missing_dates": "",
    },
)


def functions(value: Any, ctx: Ctx) -> tuple[tuple[str, dict[str, Any]], ...]:
    """Function names (a list, or one space-separated string); an entry may be [name, {kwargs}]."""
    expected = (
        "a non-empty list of function names (or one space-separated string); an entry may be "
        "[name, {keyword: value}]"
    )
    if isinstance(value, str):
        entries: list[Any] = value.split()
    elif isinstance(value, list):
        entries = value
    else:
        raise Invalid(expected)
    if not entries:
        raise Invalid(expected)
    out: list[tuple[str, dict[str, Any]]] = []
    for entry in entries:
        if isinstance(entry, str):
            name, kwargs = entry, {}
        elif (
            isinstance(entry, list)
            and len(entry) == 2
            and isinstance(entry[0], str)
            and isinstance(entry[1], dict)
        ):
            name, kwargs = entry[0], json_value(entry[1], "functions")
        else:
            raise Invalid(expected + f"; bad entry {_shown(entry)}")
        if not name.isidentifier():
            raise Invalid(expected + f"; {name!r} is not a Python function name")
        out.append((name, kwargs))
    return tuple(out)


EXTERNAL_FEATURES = SectionSpec(
    ExternalFeaturesSection,
    {
        "module": path(suffixes=(".py",), description="the path of a .py file"),
        "functions": functions,
        "concat_mode": boolean,
    },
    {"no_data_value": "", "exogeneous_data": "", "output_name": ""},
)


def resource_block(stage: str) -> Checker:
    """An iota2 resource block of ``stage`` (``sitsflow.config.resources.parse_block``)."""

    def check(value: Any, ctx: Ctx) -> dict[str, Any] | None:
        try:
            return parse_block(value, stage)
        except ValueError as exc:
            for line in str(exc).splitlines():
                ctx.errors.append(f"{ctx.name}.{line} ({ctx.where})")
            raise Reported() from None

    return check


RESOURCES = SectionSpec(
    ResourcesSection,
    {stage: resource_block(stage) for stage in ResourcesSection.model_fields},
    IOTA2_STEP_HINTS,
)

# --- top level -------------------------------------------------------------------------------
SECTIONS: dict[str, SectionSpec] = {
    "chain": CHAIN,
    "dated_raster": DATED_RASTER,
    **{name: _sensor_spec(spec[1]) for name, spec in SENSOR_SECTIONS.items()},
    "arg_train": ARG_TRAIN,
    "arg_classification": ARG_CLASSIFICATION,
    "python_data_managing": PYTHON_DATA_MANAGING,
    "external_features": EXTERNAL_FEATURES,
    "resources": RESOURCES,
}
REQUIRED_SECTIONS = ("chain", "arg_train")

_UNSUPPORTED_SECTIONS = {
    **{
        name: "it is an iota2 sensor section; describe the images with a dated_raster section"
        for name in (
            "Landsat8_old Landsat5_old "
            "Landsat8_usgs Landsat8_usgs_optical Landsat8_usgs_thermal "
            "Landsat8_usgs_infrared Landsat7_usgs Sentinel_1 userFeat"
        ).split()
    },
    "sensors_data_interpolation": (
        "gap-filling is set by dated_raster.temporal_resolution and "
        "arg_train.features_from_raw_dates"
    ),
    "task_retry_limits": (
        "retries are set on the workflow (Argo retryStrategy), not in the configuration"
    ),
    "scikit_models_parameters": "sitsflow trains deep-learning models only",
    "obia": "",
    "coregistration": "",
    "slurm": "",
    "builders": "sitsflow runs the deep-learning workflow only",
    "multi_run_fusion": "",
    "sar": "",
}


def check_config(raw: Any, origins: Origins) -> tuple[dict[str, Any], list[str]]:
    """Check the whole raw configuration.

    Returns ``(values, errors)``: per-section dicts of valid values, and one message per problem.
    """
    errors: list[str] = []
    root = Ctx((), origins, errors)
    values: dict[str, Any] = {}
    if not isinstance(raw, dict):
        errors.append(f"{origins.label}: the configuration must be a mapping of sections")
        return values, errors
    for name, section in raw.items():
        if name in SECTIONS:
            with contextlib.suppress(Reported):
                values[name] = check_section(section, root.child(name), SECTIONS[name])
            continue
        sctx = root.child(name)
        if name in _UNSUPPORTED_SECTIONS:
            hint = _UNSUPPORTED_SECTIONS[name]
            errors.append(
                f"section {name!r} ({sctx.where}) is an iota2 parameter that sitsflow does not "
                "support yet" + (f"; {hint}" if hint else "")
            )
            continue
        close = suggest(name, SECTIONS)
        errors.append(
            f"unknown section {name!r} ({sctx.where}); "
            + (f"did you mean {close!r}? " if close else "")
            + f"Allowed sections: {', '.join(SECTIONS)}"
        )
    for name in REQUIRED_SECTIONS:
        if name in raw:
            continue
        meaning = {
            "chain": "output_path, list_tile, ground_truth and data_field",
            "arg_train": "with its deep_learning_parameters section (dl_name at least)",
        }[name]
        errors.append(f"{name}: missing required section {name!r} ({origins.label}): {meaning}")
    _sensor_cross_checks(values, root, given=set(raw))
    _cross_checks(values, root)
    return values, errors


def _cross_checks(values: dict[str, Any], root: Ctx) -> None:
    """Constraints between keys (only between keys that are valid by themselves)."""
    classification = values.get("arg_classification", {})
    if classification.get("generate_final_probability_map") and not classification.get(
        "enable_probability_map", False
    ):
        root.child("arg_classification", "generate_final_probability_map").error(
            "True requires arg_classification.enable_probability_map : True "
            "(the final probability map is merged from the per-chunk probability maps)"
        )
    raster = values.get("dated_raster", {})
    start, end = raster.get("start_date"), raster.get("end_date")
    if start is not None and end is not None and start > end:
        root.child("dated_raster", "end_date").error(
            f"end_date {end} is before start_date {start}; start_date <= end_date is required"
        )
    tiles = values.get("chain", {}).get("list_tile", "").split()
    if len(tiles) > 1:
        for key in ("path", "mask_path"):
            pattern = raster.get(key)
            if pattern is not None and "{tile}" not in pattern:
                root.child("dated_raster", key).error(
                    f"{len(tiles)} tiles are listed in chain.list_tile but {pattern!r} has no "
                    "{tile} placeholder: every tile would read the same file"
                )


def _sensor_cross_checks(values: dict[str, Any], root: Ctx, given: set[str]) -> None:
    """At least one sensor; an iota2 sensor section needs its chain path (and gets defaults).

    ``given``: the sections present in the file (valid or not), so that an invalid dated_raster
    section is not also reported as missing.
    """
    chain = values.get("chain")
    if chain is None:
        return
    used = ["dated_raster"] if "dated_raster" in given else []
    for name, (key, _, default_resolution) in SENSOR_SECTIONS.items():
        if chain.get(key) is None:
            if name in values:
                root.child(name).error(
                    f"the {name} section describes a sensor whose products are not given: "
                    f"set chain.{key} (the folder of its products) or remove the section"
                )
            continue
        section = values.setdefault(name, {})
        section.setdefault("temporal_resolution", default_resolution)
        start, end = section.get("start_date"), section.get("end_date")
        if start is not None and end is not None and start > end:
            root.child(name, "end_date").error(
                f"end_date {end} is before start_date {start}; start_date <= end_date is required"
            )
        used.append(name)
    if not used:
        root.errors.append(
            f"no sensor: set chain.s2_path, chain.s2_l3a_path, chain.s2_s2c_path or chain.l8_path "
            f"(with optional Sentinel_2 / Sentinel_2_L3A / Sentinel_2_S2C / Landsat8 sections), "
            f"or add a dated_raster section ({root.origins.label})"
        )
