"""``arg_train.sample_selection`` applied: which L+V pixels of each class a (region, seed) keeps.

The rule (checked by :mod:`sitsflow.config.selection`) is OTB's ``SampleSelection``, which iota2
runs on its learning polygons. Per class of the region, with ``n`` L+V pixels, the strategy gives
the number ``m`` kept (OTB's rounding):

* ``all``: ``n``; ``smallest``: the smallest ``n`` among the region's classes;
* ``percent``: ``floor(0.5 + p * n)``; ``constant``: ``nb``;
* ``total``: ``floor(0.5 + v * n / N)`` with ``N`` the region's L+V pixels (``v`` at most ``N``);
* ``byclass``: the count of the class in the file (a class not in the file: 0, with a warning);

never more than ``n``. The sampler picks which ``m``: the class's pixels are put in a fixed order
(polygon id, tile, row, column), so that the choice does not depend on how the tiles were read;
``periodic`` keeps the pixels at positions ``floor(k * n / m)`` (every ``n/m``-th pixel, evenly
along the polygons), ``random`` draws ``m`` of them without replacement with
``numpy.random.default_rng([seed, region])`` (``seed`` = ``random_seed + run``), the classes in
increasing code order. The same configuration and seed always keep the same pixels.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from sitsflow import storage
from sitsflow.config import selection
from sitsflow.errors import BadInputError
from sitsflow.log import get_logger

log = get_logger(__name__)

_LINE = re.compile(r"^\s*([^\s,;]+)\s*[\s,;]\s*([^\s,;]+)\s*$")


def read_byclass(uri: str) -> dict[int, int]:
    """A ``strategy.byclass.in`` file: one ``class count`` line per class (separated by spaces,
    a comma or a semicolon; ``#`` starts a comment line)."""
    counts: dict[int, int] = {}
    for number, line in enumerate(storage.read_text(uri).splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = _LINE.match(line)
        try:
            if match is None:
                raise ValueError
            code, count = int(match.group(1)), int(match.group(2))
            if count < 0:
                raise ValueError
        except ValueError:
            raise BadInputError(
                f"arg_train.sample_selection strategy.byclass.in {uri}:{number}: expected 'class count' "
                f"(an integer class code and a number of pixels >= 0), got {line.strip()!r}"
            ) from None
        if code in counts:
            raise BadInputError(
                f"arg_train.sample_selection strategy.byclass.in {uri}:{number}: class {code} is listed twice"
            )
        counts[code] = count
    return counts


def required(rule: dict[str, Any], counts: dict[int, int], byclass: dict[int, int] | None = None) -> dict[int, int]:
    """The number of pixels kept per class, given each class's L+V pixel count (``counts``)."""
    strategy = rule["strategy"]
    if strategy == "all":
        wanted = dict(counts)
    elif strategy == "smallest":
        wanted = dict.fromkeys(counts, min(counts.values(), default=0))
    elif strategy == "percent":
        wanted = {c: int(np.floor(0.5 + rule["strategy.percent.p"] * n)) for c, n in counts.items()}
    elif strategy == "constant":
        wanted = dict.fromkeys(counts, rule["strategy.constant.nb"])
    elif strategy == "total":
        total = sum(counts.values())
        v = min(rule["strategy.total.v"], total)
        wanted = {c: int(np.floor(0.5 + v * n / total)) for c, n in counts.items()}
    elif strategy == "byclass":
        table = byclass or {}
        wanted = {c: table.get(c, 0) for c in counts}
    else:  # the configuration's check lets no other through
        raise ValueError(f"unknown sample selection strategy {strategy!r}")
    return {c: min(m, counts[c]) for c, m in wanted.items()}


def pick(n: int, m: int, sampler: str, rng: np.random.Generator) -> np.ndarray:
    """Positions (sorted) of the ``m`` of ``n`` ordered pixels a sampler keeps."""
    if m >= n:
        return np.arange(n)
    if sampler == "periodic":
        return (np.arange(m) * n) // m
    return np.sort(rng.choice(n, size=m, replace=False))


def select(
    arrays: dict[str, np.ndarray],
    learn: np.ndarray,
    region: int,
    seed: int,
    rule: dict[str, Any],
    byclass: dict[int, int] | None = None,
) -> tuple[np.ndarray, dict[int, tuple[int, int]]]:
    """The L+V pixels of one (region, seed) the rule keeps.

    Args:
        arrays: the extracted samples (``label``, ``polygon_id``, ``tile``, ``row``, ``col``).
        learn: mask of the region's L+V pixels.
        rule: the region's rule (:func:`sitsflow.config.selection.for_region`).
        byclass: the counts of its ``strategy.byclass.in`` file, when that is the strategy.

    Returns:
        (mask of the kept pixels, {class: (kept, L+V pixels)}).
    """
    index = np.flatnonzero(learn)
    labels = arrays["label"][index]
    classes, sizes = np.unique(labels, return_counts=True)
    counts = {int(c): int(n) for c, n in zip(classes, sizes)}
    wanted = required(rule, counts, byclass)
    if rule["strategy"] == "byclass":
        missing = sorted(c for c in counts if c not in (byclass or {}))
        if missing:
            log.warning(
                "region %s seed %s: classes %s are not in strategy.byclass.in: none of their pixels is "
                "kept for learning (OTB's rule)",
                region,
                seed,
                missing,
            )
    rng = np.random.default_rng([seed, region])
    keep = np.zeros(learn.shape, bool)
    for code in sorted(counts):
        members = index[labels == code]
        order = np.lexsort(
            (arrays["col"][members], arrays["row"][members], arrays["tile"][members], arrays["polygon_id"][members])
        )
        chosen = members[order][pick(len(members), wanted[code], rule["sampler"], rng)]
        keep[chosen] = True
    if index.size and not keep.any():
        raise BadInputError(
            f"arg_train.sample_selection {rule} keeps no L+V pixel of region {region} (seed {seed}): "
            "nothing would be left to learn from"
        )
    return keep, {c: (wanted[c], counts[c]) for c in sorted(counts)}


def byclass_tables(sample_selection: dict[str, Any]) -> dict[str, dict[int, int]]:
    """The ``strategy.byclass.in`` files of a selection, read (path -> counts)."""
    return {uri: read_byclass(uri) for uri in selection.paths(sample_selection)}
