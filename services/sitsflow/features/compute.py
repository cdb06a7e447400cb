"""The feature computation, pure (no reading): raw observations of some pixels -> features.

Same-day acquisitions merged, then gap filling onto the date axis (or raw dates kept, masked
values NaN), then per date and sensor the kept bands, the spectral indices and the external
features (see :mod:`sitsflow.features`).
"""

from __future__ import annotations

import numpy as np

from sitsflow.features.dates import DateAxis
from sitsflow.sensors import Sensor
from sitsflow.sensors.external import ExternalFeatures


class FeatureComputer:
    """Computes the features of one tile's sensors on a date axis.

    Args:
        sensors: the sensors, in stacking order.
        axis: their date axis.
        components: per sensor, the names of its components (bands, indices, external features).
        external: the user's external features, if any.
    """

    def __init__(
        self, sensors: list[Sensor], axis: DateAxis, components: list[list[str]], external: ExternalFeatures | None
    ) -> None:
        self.sensors = sensors
        self.axis = axis
        self._components = components
        self.external = external

    def compute(self, raw, valid) -> np.ndarray:
        """Turn raw observations of some pixels into features.

        Args:
            raw: per sensor float32 (P, nb_raw_s, nb_bands_s) (a list; an array for one sensor).
            valid: per sensor bool (P, nb_raw_s).

        Returns:
            float32 (P, nb_dates, nb_components).
        """
        if isinstance(raw, np.ndarray):
            raw, valid = [raw], [valid]
        series = [self._series(k, r, v) for k, (r, v) in enumerate(zip(raw, valid))]
        external = {}
        if self.external is not None:
            external = self.external.compute(
                {s.ext_name: x for s, x in zip(self.sensors, series)},
                {s.ext_name: list(s.bands) for s in self.sensors},
                self.axis.dates,
            )
        if (
            len(self.sensors) == 1
            and not external
            and self._components[0] == [b.lower() for b in self.sensors[0].bands]
        ):
            # the features are the sensor's bands as read: no re-stacking copy
            return np.ascontiguousarray(series[0], dtype=np.float32)
        parts = []
        for s, x, comps in zip(self.sensors, series, self._components):
            for c in comps:
                bands = [b.lower() for b in s.bands]
                if c in s.indices and s.roles and c not in external.get(s.ext_name, {}):
                    parts.append(_index(c, x, s))
                elif c in external.get(s.ext_name, {}):
                    parts.append(external[s.ext_name][c])
                else:
                    parts.append(x[:, :, bands.index(c)])
        return np.ascontiguousarray(np.stack(parts, axis=-1), dtype=np.float32)

    def _series(self, k: int, raw: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """One sensor's series on the date axis: float32 (P, nb_dates, nb_bands_s); a static
        sensor's one "acquisition" repeated on every date."""
        if self.sensors[k].static:
            return np.repeat(raw[:, :1].astype(np.float32, copy=False), len(self.axis.dates), axis=1)
        st = self.axis.times[k]
        raw, valid = _merge_same_day(raw, valid, st.day_group, len(st.unique_dates))
        if self.axis.raw_dates_mode:
            out = np.full((raw.shape[0], len(self.axis.dates), raw.shape[2]), np.nan, np.float32)
            masked = raw.copy()
            masked[~valid] = np.nan
            out[:, st.positions] = masked
            return out
        return _gapfill(raw, valid, st.unique_ordinals, self.axis.target_ordinals)


def _ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(a - b) / (a + b), 0 where the sum is 0 (NaN stays NaN)."""
    den = a + b
    with np.errstate(all="ignore"):
        return np.where(den != 0, (a - b) / np.where(den != 0, den, 1), 0).astype(np.float32)


def _index(name: str, x: np.ndarray, s: Sensor) -> np.ndarray:
    """A spectral index per date from a sensor's series x (P, nb_dates, nb_bands): (P, nb_dates).

    NDVI = (NIR - red) / (NIR + red); NDWI = (NIR - SWIR) / (NIR + SWIR) (Gao's water index, SWIR at
    1.6 µm); Brightness = sqrt(sum over every band of the sensor of reflectance²).
    """
    band = {role: x[:, :, s.bands.index(b)] for role, b in s.roles.items()}
    if name == "ndvi":
        return _ratio(band["nir"], band["red"])
    if name == "ndwi":
        return _ratio(band["nir"], band["swir"])
    if name == "brightness":
        return np.sqrt(np.sum(x.astype(np.float32) ** 2, axis=-1)).astype(np.float32)
    raise ValueError(name)


def _merge_same_day(
    raw: np.ndarray, valid: np.ndarray, day_group: np.ndarray, nb_days: int
) -> tuple[np.ndarray, np.ndarray]:
    """Average the valid acquisitions that fall on the same day.

    Args:
        raw: float32 (P, nb_raw, nb_bands); valid: bool (P, nb_raw).

    Returns:
        (P, nb_days, nb_bands) float32 and (P, nb_days) bool.
    """
    if nb_days == raw.shape[1]:
        return raw, valid
    sums = np.zeros((raw.shape[0], nb_days, raw.shape[2]), np.float32)
    counts = np.zeros((raw.shape[0], nb_days), np.float32)
    # numpy's stubs type ufunc.at's indices without the tuple form numpy documents and accepts
    np.add.at(sums, (slice(None), day_group), np.where(valid[..., None], raw, 0.0))  # type: ignore[arg-type]
    np.add.at(counts, (slice(None), day_group), valid.astype(np.float32))  # type: ignore[arg-type]
    return sums / np.maximum(counts, 1.0)[..., None], counts > 0


def _gapfill(raw: np.ndarray, valid: np.ndarray, t_obs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Linear interpolation in time onto ``targets`` (nearest valid value outside the observed
    range); pixels with no valid observation at all get NaN.

    Args:
        raw: float32 (P, nb_obs, nb_bands); valid: bool (P, nb_obs); t_obs: (nb_obs,) ordinals;
        targets: (nb_dates,) ordinals.

    Returns:
        float32 (P, nb_dates, nb_bands).
    """
    nb_pix, nb_obs, _ = raw.shape
    full = valid.all(axis=1)
    if full.any():
        # pixels clear at every observation share one interpolation: gather once per target
        left = np.clip(np.searchsorted(t_obs, targets, side="right") - 1, 0, nb_obs - 1)
        right = np.clip(np.searchsorted(t_obs, targets, side="left"), 0, nb_obs - 1)
        span = t_obs[right] - t_obs[left]
        w = np.clip(np.where(span > 0, (targets - t_obs[left]) / np.where(span > 0, span, 1.0), 0.0), 0.0, 1.0)
        if full.all():
            return _interpolate(raw, left, right, w)
        out = np.empty((nb_pix, len(targets), raw.shape[2]), np.float32)
        out[full] = _interpolate(raw[full], left, right, w)
        rest = ~full
        out[rest] = _gapfill(raw[rest], valid[rest], t_obs, targets)
        return out
    idx = np.arange(nb_obs)
    prev_valid = np.maximum.accumulate(np.where(valid, idx, -1), axis=1)  # (P, obs)
    next_valid = np.flip(np.minimum.accumulate(np.flip(np.where(valid, idx, nb_obs), axis=1), axis=1), axis=1)
    out = np.empty((nb_pix, len(targets), raw.shape[2]), np.float32)
    rows = np.arange(nb_pix)
    none = ~valid.any(axis=1)
    first_valid = np.where(none, 0, next_valid[:, 0])
    last_valid = np.where(none, 0, prev_valid[:, -1])
    for k, t in enumerate(targets):
        right_pos = int(np.searchsorted(t_obs, t, side="left"))  # first obs >= t
        left_pos = int(np.searchsorted(t_obs, t, side="right")) - 1  # last obs <= t
        left = prev_valid[:, left_pos] if left_pos >= 0 else np.full(nb_pix, -1)
        right = next_valid[:, right_pos] if right_pos < nb_obs else np.full(nb_pix, nb_obs)
        left = np.where(left < 0, first_valid, left)
        right = np.where(right >= nb_obs, last_valid, right)
        t_left = t_obs[left]
        t_right = t_obs[right]
        span = t_right - t_left
        w_right = np.where(span > 0, (t - t_left) / np.where(span > 0, span, 1.0), 0.0)
        w_right = np.clip(w_right, 0.0, 1.0).astype(np.float32)[:, None]
        out[:, k] = raw[rows, left] * (1.0 - w_right) + raw[rows, right] * w_right
    if none.any():
        out[none] = np.nan
    return out


def _interpolate(raw: np.ndarray, left: np.ndarray, right: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``raw[:, left] * (1 - w) + raw[:, right] * w`` for (P, nb_obs, nb_bands) -> (P, nb_dates, nb_bands)."""
    if np.array_equal(left, right) or not w.any():
        if left.size == raw.shape[1] and np.array_equal(left, np.arange(left.size)):
            return raw  # the grid is the acquisitions: nothing to interpolate
        return np.take(raw, left, axis=1)
    w = w.astype(np.float32)[None, :, None]
    return np.take(raw, left, axis=1) * (1.0 - w) + np.take(raw, right, axis=1) * w
