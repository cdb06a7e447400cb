"""The date axis of a tile's features: per sensor, its distinct acquisition days, and the axis
every sensor is put on (the union of the sensors' regular grids when gap-filling, of their
acquisition days with raw dates)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sitsflow.log import get_logger
from sitsflow.sensors import Sensor
from sitsflow.sensors.dates import from_ordinal, to_ordinal

log = get_logger(__name__)


@dataclass
class SensorTime:
    """One sensor's days."""

    unique_dates: list[int]
    day_group: np.ndarray  # (nb_raw,) index of each acquisition's day in unique_dates
    unique_ordinals: np.ndarray  # (nb_days,) float64
    positions: np.ndarray  # raw mode: index of each unique day in the axis' dates


class DateAxis:
    """The date axis of some sensors of one tile.

    Attributes:
        dates: YYYYMMDD of the axis.
        target_ordinals: float64 day ordinals of ``dates``.
        times: per sensor, its :class:`SensorTime`.
    """

    def __init__(self, sensors: list[Sensor], raw_dates_mode: bool, tile: str = "") -> None:
        self.raw_dates_mode = raw_dates_mode
        self.times = [self._sensor_time(s, tile) for s in sensors]
        self.dates: list[int] = self._axis(sensors)
        self.target_ordinals = np.array([to_ordinal(d) for d in self.dates], np.float64)
        for st in self.times:
            st.positions = np.searchsorted(self.dates, st.unique_dates)

    @staticmethod
    def _sensor_time(s: Sensor, tile: str) -> SensorTime:
        unique = sorted(set(s.raw_dates))
        if len(unique) < len(s.raw_dates):
            log.info(
                "tile %s: %s has %d acquisitions on %d distinct days (same-day acquisitions are merged)",
                tile,
                s.section,
                len(s.raw_dates),
                len(unique),
            )
        lookup = {d: i for i, d in enumerate(unique)}
        return SensorTime(
            unique,
            np.array([lookup[d] for d in s.raw_dates]),
            np.array([to_ordinal(d) for d in unique], np.float64),
            np.zeros(0, np.int64),
        )

    def _axis(self, sensors: list[Sensor]) -> list[int]:
        if self.raw_dates_mode:
            return sorted({d for st in self.times for d in st.unique_dates})
        dates: set[int] = set()
        for s, st in zip(sensors, self.times):
            if s.static:  # no date: repeated on the others' axis
                continue
            first = to_ordinal(s.start_date) if s.start_date is not None else int(st.unique_ordinals[0])
            last = to_ordinal(s.end_date) if s.end_date is not None else int(st.unique_ordinals[-1])
            dates.update(from_ordinal(o) for o in range(first, last + 1, int(s.temporal_resolution)))
        return sorted(dates)
