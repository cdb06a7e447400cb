"""The feature pipeline, written once and used by both sampling and inference.

For one tile, :class:`FeaturePipeline` reads windows of every configured sensor (THEIA
Sentinel-2 L2A / L3A, Sen2Cor, Landsat 8, the generic ``dated_raster``; local or object storage,
windowed reads only; see :mod:`sitsflow.sensors`), masks invalid observations (clouds,
saturation, edges, nodata, off-footprint), merges acquisitions that fall on the same day, and then

* gap-fills every pixel onto the regular date grid (iota2's default: linear interpolation in
  time over masked observations, the nearest valid observation outside the observed range), or
* with ``arg_train.features_from_raw_dates`` keeps the raw (de-duplicated) dates, masked values
  becoming NaN (the networks' ``nans_imputation`` handles them).

Then, per date and sensor: the kept bands, the spectral indices (``arg_train.features``: NDVI,
NDWI, Brightness, for the optical sensors) and the external features (``external_features``).

Several sensors share one date axis so the networks still get (batch, nb_dates, nb_components):
gap-filled, every sensor is interpolated onto the union of the sensors' regular grids; with raw
dates, the axis is the union of the acquisition dates and a sensor is NaN on the dates it did not
acquire. The components of one date are the sensors' components, sensor after sensor.

Features are shaped ``(pixels, nb_dates, nb_components)`` and named ``sensor_band_YYYYMMDD``,
lower case, date-major (all components of date 1, then date 2 ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
from rasterio.windows import Window

from sitsflow.errors import BadInputError, ConfigError
from sitsflow.log import get_logger
from sitsflow.sensors import Sensor, build_sensors, configured_sensors
from sitsflow.sensors.base import Grid, ReadBuffers
from sitsflow.sensors.catalogue import INDEX_ROLES
from sitsflow.sensors.dates import from_ordinal, parse_date, to_ordinal
from sitsflow.sensors.external import ExternalFeatures

log = get_logger(__name__)

__all__ = ["FeatureBlock", "FeaturePipeline", "Grid", "ReadBuffers", "check_tile_grids", "from_ordinal", "parse_date",
           "to_ordinal", "READ_BUDGET_BYTES"]

READ_BUDGET_BYTES = 64 * 1024 * 1024
"""Raw data read at once by :meth:`FeaturePipeline.features`: larger windows are read in parts."""

READ_MIN_BLOCKS = 2
"""Source blocks side by side in one read, at least (see :meth:`FeaturePipeline.read_windows`)."""


@dataclass
class FeatureBlock:
    """Features of the selected pixels of one window.

    Attributes:
        values: float32 (nb_pixels, nb_dates, nb_components), NaN where a raw-date value is masked.
        rows, cols: int32 (nb_pixels,) pixel coordinates in the tile grid (row-major order).
        clear_dates: int16 (window height, window width), number of clear (valid) acquisitions
            per pixel of the whole window, all sensors together (0 = no valid date: such pixels
            are never returned).
    """

    values: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    clear_dates: np.ndarray


@dataclass
class _SensorTime:
    """Per-sensor bookkeeping of dates."""

    unique_dates: list[int]
    day_group: np.ndarray  # (nb_raw,) index of each acquisition's day in unique_dates
    unique_ordinals: np.ndarray  # (nb_days,) float64
    positions: np.ndarray  # raw mode: index of each unique day in the pipeline's dates


class FeaturePipeline:
    """Feature computation of every configured sensor for one tile.

    Args:
        cfg: the validated configuration.
        tile: the tile name.

    Attributes:
        grid: the tile grid (the finest sensor's grid).
        dates: YYYYMMDD of the date axis.
        sensors: the sensor readers, in stacking order.
        sensor: the statistics key of the first sensor (the database's ``sensor`` attribute).
    """

    def __init__(self, cfg, tile: str) -> None:
        self.cfg = cfg
        self.tile = tile
        self.raw_dates_mode = bool(cfg.arg_train.features_from_raw_dates)
        self.sensors: list[Sensor] = build_sensors(cfg, tile)
        if not self.sensors:
            raise ConfigError("no sensor is configured (chain.s2_path, chain.l8_path ... or dated_raster)")
        grids = [s.native_grid() for s in self.sensors]
        finest = min(range(len(grids)), key=lambda i: grids[i].resolution)
        self.grid: Grid = grids[finest]
        for s, g in zip(self.sensors, grids):
            if g.crs != self.grid.crs:
                raise BadInputError(
                    f"tile {tile!r}: {s.section} is in {g.crs} but {self.sensors[finest].section} in "
                    f"{self.grid.crs}; the sensors of a tile must share one CRS"
                )
        self.sensor = self.sensors[0].key
        self._times = [self._sensor_time(s) for s in self.sensors]
        self.dates: list[int] = self._date_axis()
        self.target_ordinals = np.array([to_ordinal(d) for d in self.dates], np.float64)
        for st in self._times:
            st.positions = np.searchsorted(self.dates, st.unique_dates)
        self.external = (
            ExternalFeatures(cfg.external_features, self.raw_dates_mode) if cfg.external_features is not None else None
        )
        external = (
            self.external.probe({s.ext_name: list(s.bands) for s in self.sensors}, self.dates)
            if self.external is not None else {}
        )
        self._components: list[list[str]] = []
        for s in self.sensors:
            comps = [b.lower() for b in s.keep] + (list(s.indices) if s.roles else [])
            ext = external.get(s.ext_name, [])
            if self.external is not None and not self.external.concat_mode:
                comps = []
            clash = sorted(set(comps) & set(ext))
            if clash:
                raise BadInputError(
                    f"external_features: index {clash[0]!r} of {s.ext_name} clashes with a band or index"
                )
            self._components.append(comps + ext)
        if not any(self._components):
            raise BadInputError("the configuration yields no feature (no band kept and no index)")
        for s in self.sensors:
            missing = [r for i in s.indices for r in INDEX_ROLES[i] if s.roles and r not in s.roles]
            if missing:
                raise BadInputError(f"{s.section}: no band for {missing}")

    # --- dates -------------------------------------------------------------------------------
    def _sensor_time(self, s: Sensor) -> _SensorTime:
        unique = sorted(set(s.raw_dates))
        if len(unique) < len(s.raw_dates):
            log.info("tile %s: %s has %d acquisitions on %d distinct days (same-day acquisitions are merged)",
                     self.tile, s.section, len(s.raw_dates), len(unique))
        lookup = {d: i for i, d in enumerate(unique)}
        return _SensorTime(unique, np.array([lookup[d] for d in s.raw_dates]),
                           np.array([to_ordinal(d) for d in unique], np.float64), np.zeros(0, np.int64))

    def _date_axis(self) -> list[int]:
        if self.raw_dates_mode:
            return sorted({d for st in self._times for d in st.unique_dates})
        dates: set[int] = set()
        for s, st in zip(self.sensors, self._times):
            first = to_ordinal(s.start_date) if s.start_date is not None else int(st.unique_ordinals[0])
            last = to_ordinal(s.end_date) if s.end_date is not None else int(st.unique_ordinals[-1])
            dates.update(from_ordinal(o) for o in range(first, last + 1, int(s.temporal_resolution)))
        return sorted(dates)

    @property
    def raw_dates(self) -> list[int]:
        """The first sensor's acquisition dates used (chronological, repeated days included)."""
        return list(self.sensors[0].raw_dates)

    @property
    def unique_dates(self) -> list[int]:
        """The first sensor's distinct acquisition days."""
        return list(self._times[0].unique_dates)

    # --- names -------------------------------------------------------------------------------
    @property
    def components(self) -> list[str]:
        """Names of the components of one date: bands, indices, external features (lower case);
        ``{prefix}_{component}`` when several sensors are combined."""
        if len(self.sensors) == 1:
            return list(self._components[0])
        return [f"{s.prefix}_{c}" for s, comps in zip(self.sensors, self._components) for c in comps]

    @cached_property
    def feature_names(self) -> list[str]:
        """``sensor_component_YYYYMMDD``, lower case, date-major."""
        names = [
            f"{s.prefix}_{c}_{d}" for d in self.dates for s, comps in zip(self.sensors, self._components) for c in comps
        ]
        return [n.lower() for n in names]

    @property
    def sensor_keys(self) -> list[str]:
        """The statistics keys of the sensors, in stacking order."""
        return [s.key for s in self.sensors]

    def description(self) -> dict:
        """What identifies the features (for fingerprints and model descriptions)."""
        return {
            "sensor": self.sensor,
            "sensors": [s.description() for s in self.sensors],
            "dates": self.dates,
            "components": self.components,
            "raw_dates_mode": self.raw_dates_mode,
            "external": self.external.description() if self.external is not None else None,
        }

    def input_files(self) -> list[str]:
        """Every file the pipeline reads for this tile (for fingerprints)."""
        files = [f for s in self.sensors for f in s.input_files()]
        if self.external is not None:
            files.append(self.external.section.module)
        return files

    # --- computing ---------------------------------------------------------------------------
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
                {s.ext_name: list(s.bands) for s in self.sensors}, self.dates,
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
        """One sensor's series on the date axis: float32 (P, nb_dates, nb_bands_s)."""
        st = self._times[k]
        raw, valid = _merge_same_day(raw, valid, st.day_group, len(st.unique_dates))
        if self.raw_dates_mode:
            out = np.full((raw.shape[0], len(self.dates), raw.shape[2]), np.nan, np.float32)
            masked = raw.copy()
            masked[~valid] = np.nan
            out[:, st.positions] = masked
            return out
        return _gapfill(raw, valid, st.unique_ordinals, self.target_ordinals)

    def read_windows(self, window: Window) -> list[Window]:
        """The sub-windows ``window`` is read in, row-major.

        Each holds about :data:`READ_BUDGET_BYTES` of raw data, and is cut on the sources' internal
        blocks (whole blocks; boundaries at multiples of the block size in the tile grid) so that
        no compressed block is decoded twice: whole-width strips when a block row fits the budget,
        else tiles one block row high and at least :data:`READ_MIN_BLOCKS` blocks wide (GDAL
        decodes the blocks of one read in parallel, straight into the array, without its block
        cache).
        """
        h, w = int(window.height), int(window.width)
        per_pixel = sum(len(s.raw_dates) * (len(s.bands) + 1) for s in self.sensors) * 4 * 2
        budget_px = max(1, READ_BUDGET_BYTES // max(1, per_pixel))
        block_rows = max(max((s.block_rows for s in self.sensors), default=1), 1)
        block_cols = max(max((s.block_cols for s in self.sensors), default=1), 1)
        r0, c0 = int(window.row_off), int(window.col_off)
        rows = budget_px // max(1, w)
        cols = max(block_cols * READ_MIN_BLOCKS, budget_px // block_rows // block_cols * block_cols)
        if rows >= block_rows or cols >= w:
            step = max(block_rows, rows // block_rows * block_rows)
            return [Window(c0, a, w, b - a) for a, b in _cuts(r0, h, step)]
        return [Window(a, r, b - a, e - r) for r, e in _cuts(r0, h, block_rows) for a, b in _cuts(c0, w, cols)]

    def features(self, window: Window, select: np.ndarray | None = None, *, count_clear: bool = True,
                 buffers: ReadBuffers | None = None, probe: bool = False) -> FeatureBlock:
        """Features of the pixels of ``window`` that are selected and have a clear date.

        The window is read in the sub-windows of :meth:`read_windows`, so that about
        :data:`READ_BUDGET_BYTES` of raw data is in memory at once, whatever the window's size.

        Args:
            window: the window to read, in tile pixel coordinates.
            select: optional bool (h, w): only these pixels are computed (labelled pixels when
                sampling, a region's pixels when classifying).
            count_clear: when False, sub-windows without any selected pixel are not read at all
                (their ``clear_dates`` stay 0); sampling uses this.
            buffers: reusable arrays for a window read at once (one sub-window; see
                :class:`~sitsflow.sensors.base.ReadBuffers`): the block's ``values`` may then live
                in them, valid until the next read with the same buffers.
            probe: first look cheaply whether a sub-window has any valid observation at all
                (:meth:`~sitsflow.sensors.base.Sensor.surely_empty`), and skip it when not. Worth
                it inside nodata areas (outside the swath), where it saves most of the read; a
                waste where there are data. Inference probes after a sub-window without any.
        """
        h, w = int(window.height), int(window.width)
        clear = np.zeros((h, w), np.int16)
        values, rows, cols = [], [], []
        parts = self.read_windows(window)
        if len(parts) > 1:
            buffers = None  # the parts' values are kept until they are concatenated
        for part in parts:
            pr, pc = int(part.row_off - window.row_off), int(part.col_off - window.col_off)
            ph, pw = int(part.height), int(part.width)
            sel = select[pr : pr + ph, pc : pc + pw] if select is not None else None
            if not count_clear and sel is not None and not sel.any():
                continue
            if probe and all(s.surely_empty(part, self.grid) for s in self.sensors):
                continue  # clear_dates stay 0
            reads = [s.read(part, self.grid, buffers) for s in self.sensors]
            part_clear = sum(np.count_nonzero(v, axis=-1) for _, v in reads).astype(np.int16)
            clear[pr : pr + ph, pc : pc + pw] = part_clear
            keep = part_clear > 0
            if sel is not None:
                keep &= sel
            r, c = np.nonzero(keep)
            if not r.size:
                continue
            if r.size == keep.size:  # every pixel of the part: a reshape, not a gather
                picked = [(x.reshape(r.size, *x.shape[2:]), v.reshape(r.size, *v.shape[2:])) for x, v in reads]
            else:
                flat = r * pw + c
                picked = [(_take(x.reshape(ph * pw, *x.shape[2:]), flat, buffers, f"picked:{k}"),
                           v.reshape(ph * pw, *v.shape[2:])[flat]) for k, (x, v) in enumerate(reads)]
            values.append(self.compute([x for x, _ in picked], [v for _, v in picked]))
            rows.append(r + int(part.row_off))
            cols.append(c + int(part.col_off))
        if len(values) == 1:
            out, rr, cc = values[0], rows[0], cols[0]
        elif values:
            out = np.concatenate(values)
            rr, cc = np.concatenate(rows), np.concatenate(cols)
            if int(parts[0].width) < w:
                order = np.lexsort((cc, rr))  # tiles -> the window's row-major order
                out, rr, cc = out[order], rr[order], cc[order]
        else:
            out = np.empty((0, len(self.dates), len(self.components)), np.float32)
            rr = cc = np.empty(0, np.int64)
        return FeatureBlock(values=out, rows=rr.astype(np.int32), cols=cc.astype(np.int32), clear_dates=clear)


def _cuts(start: int, length: int, step: int) -> list[tuple[int, int]]:
    """[start, start + length) cut at the multiples of ``step``."""
    points = [start, *range((start // step + 1) * step, start + length, step), start + length]
    return list(zip(points[:-1], points[1:]))


def _take(x: np.ndarray, index: np.ndarray, buffers: ReadBuffers | None, key: str) -> np.ndarray:
    """``x[index]`` (rows of a 2-D or more array), into reused memory when there are buffers."""
    if buffers is None:
        return x[index]
    return np.take(x, index, axis=0, out=buffers.get(key, (index.size, *x.shape[1:]), x.dtype))


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


def check_tile_grids(cfg) -> None:
    """Fail early when a configured tile has no input for a sensor (cheap: no pixel is read)."""
    if not configured_sensors(cfg):
        raise ConfigError("no sensor is configured (chain.s2_path, chain.l8_path ... or dated_raster)")
    for tile in cfg.chain.tiles:
        try:
            build_sensors(cfg, tile)
        except ConfigError:
            raise
        except BadInputError as exc:
            raise ConfigError(str(exc)) from None


