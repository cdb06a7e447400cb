"""``arg_train.sample_selection``: iota2's per-class sample selection, as its users write it.

iota2 hands this dict to OTB's ``SampleSelection`` application, which picks, in the learning
polygons of each model (region) and seed, how many pixels of each class are kept (the strategy)
and which ones (the sampler)::

    sample_selection : {"sampler" : "random", "strategy" : "percent", "strategy.percent.p" : 0.1}

Keys (OTB's names, OTB's defaults where a key is left out):

* ``sampler``: ``"periodic"`` (default) or ``"random"``;
* ``strategy``: ``"smallest"`` (default), ``"all"``, ``"percent"`` (``strategy.percent.p``,
  default 0.5), ``"constant"`` (``strategy.constant.nb``, required), ``"total"``
  (``strategy.total.v``, default 1000) or ``"byclass"`` (``strategy.byclass.in``, required: a
  text file of ``class count`` lines);
* ``per_model``: iota2's list of ``{"target_model" : R, ...}`` dicts, each a full selection for
  region ``R``, the rest of the regions taking the top-level one.

A key of a strategy other than the one chosen is refused (it would have no effect). The checked
value is a plain dict with the defaults filled in; :mod:`sitsflow.sampling.strategies` applies it.
Absent, the key is iota2's default ``{"sampler": "random", "strategy": "all"}``: every pixel.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sitsflow.config.schema import PathOf, detail, shown

SAMPLERS: tuple[str, ...] = ("periodic", "random")
"""OTB's samplers: every k-th pixel, or pixels drawn at random (seeded)."""

STRATEGIES: dict[str, dict[str, Any]] = {
    "all": {},
    "smallest": {},
    "percent": {"strategy.percent.p": 0.5},
    "constant": {"strategy.constant.nb": None},
    "total": {"strategy.total.v": 1000},
    "byclass": {"strategy.byclass.in": None},
}
"""Each strategy and the keys it reads, with OTB's default (None: required)."""

PARAMETER_TEXT: dict[str, str] = {
    "strategy.percent.p": "a number 0 < p <= 1 (the fraction of each class's pixels kept)",
    "strategy.constant.nb": "an integer >= 1 (the pixels kept per class)",
    "strategy.total.v": "an integer >= 1 (the pixels kept in all, shared in proportion to the classes)",
    "strategy.byclass.in": "the path (or s3:// URI) of a text file of 'class count' lines",
}
"""What each strategy key allows."""

DEFAULT: dict[str, Any] = {"sampler": "random", "strategy": "all"}
"""iota2's default: every pixel of the learning polygons."""

SELECTION_TEXT = (
    'iota2\'s sample selection dict, e.g. {"sampler" : "random", "strategy" : "percent", '
    '"strategy.percent.p" : 0.1}: sampler one of ' + ", ".join(repr(s) for s in SAMPLERS) + "; strategy one of "
    "" + ", ".join(repr(s) for s in STRATEGIES) + " (with strategy.percent.p, strategy.constant.nb, "
    "strategy.total.v or strategy.byclass.in); optional per_model [{target_model : R, ...}]"
)
"""What ``sample_selection`` allows (docs and messages)."""

_BYCLASS_PATH = PathOf(PARAMETER_TEXT["strategy.byclass.in"])


def _rule(value: Any, where: str, per_model: bool) -> dict[str, Any]:
    """One selection dict checked, defaults filled in (``where`` prefixes the messages)."""
    if not isinstance(value, dict):
        raise detail(f"{where}expected {SELECTION_TEXT}, got {shown(value)} ({type(value).__name__})")
    top = ("sampler", "strategy", *(("target_model",) if per_model else ("per_model",)))
    allowed = [*top, *(k for keys in STRATEGIES.values() for k in keys)]
    for key in value:
        if key not in allowed:
            raise detail(f"{where}unknown key {key!r}; allowed keys: {', '.join(allowed)}")
    sampler = value.get("sampler", "periodic")
    if sampler not in SAMPLERS:
        raise detail(f"{where}sampler: expected one of {', '.join(map(repr, SAMPLERS))}, got {shown(sampler)}")
    strategy = value.get("strategy", "smallest")
    if strategy not in STRATEGIES:
        raise detail(f"{where}strategy: expected one of {', '.join(map(repr, STRATEGIES))}, got {shown(strategy)}")
    out: dict[str, Any] = {"sampler": sampler, "strategy": strategy}
    for key in value:
        if key.startswith("strategy.") and key not in STRATEGIES[strategy]:
            raise detail(f"{where}{key} is only read with strategy {key.split('.')[1]!r}, not {strategy!r}")
    for key, default in STRATEGIES[strategy].items():
        given = value.get(key, default)
        if given is None:
            raise detail(f"{where}strategy {strategy!r} needs {key}: {PARAMETER_TEXT[key]}")
        out[key] = _parameter(key, given, where)
    return out


def _parameter(key: str, value: Any, where: str) -> Any:
    bad = detail(f"{where}{key}: expected {PARAMETER_TEXT[key]}, got {shown(value)} ({type(value).__name__})")
    if key == "strategy.percent.p":
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
            raise bad
        return float(value)
    if key == "strategy.byclass.in":
        if not isinstance(value, str):
            raise bad
        try:
            return _BYCLASS_PATH.after(value)
        except Exception:  # the marker's own wording is for a whole field: say it for this key
            raise bad from None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise bad
    return value


def check(value: Any) -> dict[str, Any]:
    """``sample_selection`` checked and normalised (pydantic validator: raises ``detail``)."""
    out = _rule(value, "", per_model=False)
    models = value.get("per_model") if isinstance(value, dict) else None
    if models is None:
        return out
    if not isinstance(models, list) or not models:
        raise detail(f"per_model: expected a non-empty list of {{target_model : R, ...}} dicts, got {shown(models)}")
    entries: list[dict[str, Any]] = []
    for index, entry in enumerate(models):
        where = f"per_model[{index}]: "
        rule = _rule(entry, where, per_model=True)
        target = entry.get("target_model")
        if isinstance(target, str) and target.isdigit():  # iota2 writes model numbers as text too
            target = int(target)
        if isinstance(target, bool) or not isinstance(target, int) or target < 1:
            raise detail(f"{where}target_model: expected a region number (an integer >= 1), got {shown(target)}")
        if any(e["target_model"] == target for e in entries):
            raise detail(f"{where}target_model {target} is given twice")
        entries.append({"target_model": target, **rule})
    return {**out, "per_model": entries}


def for_region(selection: dict[str, Any], region: int) -> dict[str, Any]:
    """The selection rule of one region (its ``per_model`` entry, else the top-level one)."""
    for entry in selection.get("per_model", ()):
        if entry["target_model"] == region:
            return {k: v for k, v in entry.items() if k != "target_model"}
    return {k: v for k, v in selection.items() if k != "per_model"}


def resolve_paths(selection: dict[str, Any], resolve: Callable[[str], str]) -> dict[str, Any]:
    """``selection`` with its ``strategy.byclass.in`` paths passed through ``resolve``."""
    key = "strategy.byclass.in"

    def one(rule: dict[str, Any]) -> dict[str, Any]:
        return {**rule, key: resolve(rule[key])} if key in rule else rule

    out = one(selection)
    if "per_model" in out:
        out["per_model"] = [one(e) for e in out["per_model"]]
    return out


def paths(selection: dict[str, Any]) -> list[str]:
    """Every file a selection reads (the ``strategy.byclass.in`` files)."""
    rules = [selection, *selection.get("per_model", ())]
    return [r["strategy.byclass.in"] for r in rules if "strategy.byclass.in" in r]


def is_default(selection: dict[str, Any]) -> bool:
    """Whether ``selection`` keeps every pixel everywhere (iota2's default or any 'all')."""
    return all(r["strategy"] == "all" for r in (selection, *selection.get("per_model", ())))
