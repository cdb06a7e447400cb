"""Dates as YYYYMMDD integers: conversions and parsing."""

from __future__ import annotations

import datetime as dt
import re

from sitsflow.errors import BadInputError


def to_ordinal(date: int) -> int:
    """Return the proleptic Gregorian ordinal of a YYYYMMDD integer."""
    return dt.date(date // 10000, date // 100 % 100, date % 100).toordinal()


def from_ordinal(ordinal: int) -> int:
    """Return the YYYYMMDD integer of a proleptic Gregorian ordinal."""
    d = dt.date.fromordinal(int(ordinal))
    return d.year * 10000 + d.month * 100 + d.day


_DATE_RE = re.compile(r"(\d{4})-?(\d{2})-?(\d{2})")


def parse_date(text: str, where: str) -> int:
    """Parse ``YYYYMMDD``, ``YYYY-MM-DD`` or an ISO datetime into a YYYYMMDD integer."""
    match = _DATE_RE.match(str(text).strip())
    if not match:
        raise BadInputError(f"{where}: cannot read a date from {text!r} (expected YYYY-MM-DD or YYYYMMDD)")
    value = int("".join(match.groups()))
    try:
        to_ordinal(value)
    except ValueError as exc:
        raise BadInputError(f"{where}: invalid date {text!r}: {exc}") from None
    return value
