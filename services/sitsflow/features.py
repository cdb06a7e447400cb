"""The feature pipeline, written once and used by both sampling and inference.

For one tile, :class:`FeaturePipeline` reads a window of the sensor's raster (local or object
storage, windowed reads only), masks invalid observations (the sensor's mask, nodata, non-finite
values), merges acquisitions that fall on the same day, and then either

* gap-fills every pixel onto the sensor's regular date grid (iota2's default: linear interpolation
  in time over masked observations, the nearest valid observation outside the observed range), or
* with ``arg_train.features_from_raw_dates`` keeps the raw (de-duplicated) dates, masked values
  becoming NaN (the networks' ``nans_imputation`` handles them).

Features are shaped ``(pixels, nb_dates, nb_components)`` and named ``sensor_band_YYYYMMDD``,
date-major (all components of date 1, then date 2 ...), as iota2 names them.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import rasterio
from rasterio.windows import Window

from sitsflow import storage
from sitsflow.errors import BadInputError, ConfigError
from sitsflow.log import get_logger

log = get_logger(__name__)


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


@dataclass(frozen=True)
class Grid:
    """The pixel grid of a tile: size, georeferencing and CRS of the sensor's raster."""

    width: int
    height: int
    transform: rasterio.Affine
    crs: rasterio.crs.CRS

    def profile(self) -> dict:
        """A rasterio profile fragment for rasters on this grid."""
        return {"width": self.width, "height": self.height, "transform": self.transform, "crs": self.crs}


@dataclass
class FeatureBlock:
    """Features of the selected pixels of one window.

    Attributes:
        values: float32 (nb_pixels, nb_dates, nb_components), NaN where a raw-date value is masked.
        rows, cols: int32 (nb_pixels,) pixel coordinates in the tile grid (row-major order).
        clear_dates: int16 (window height, window width), number of clear (valid) acquisitions
            per pixel of the whole window (0 = no valid date: such pixels are never returned).
    """

    values: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    clear_dates: np.ndarray


class FeaturePipeline:
    """Feature computation of the ``dated_raster`` sensor for one tile.

    Args:
        cfg: the validated configuration.
        tile: the tile name (substituted for ``{tile}`` in the sensor's path patterns).
    """

    def __init__(self, cfg, tile: str) -> None:
        self.cfg = cfg
        self.tile = tile
        self.sensor_cfg = cfg.dated_raster
        self.sensor = self.sensor_cfg.name
        self.path = self.sensor_cfg.path.replace("{tile}", tile)
        self.mask_path = (
            self.sensor_cfg.mask_path.replace("{tile}", tile) if self.sensor_cfg.mask_path else None
        )
        self.raw_dates_mode = bool(cfg.arg_train.features_from_raw_dates)
        self.bands = list(self.sensor_cfg.bands)
        self._open_metadata()

    # --- metadata ----------------------------------------------------------------------------
    def _open_metadata(self) -> None:
        if not storage.exists(self.path):
            raise BadInputError(f"dated_raster.path: the raster {self.path} of tile {self.tile!r} does not exist")
        with storage.rasterio_env(), rasterio.open(storage.rasterio_path(self.path)) as src:
            self.grid = Grid(src.width, src.height, src.transform, src.crs)
            count = src.count
            descriptions = list(src.descriptions)
            self.raster_dtype = src.dtypes[0]
        nb_bands = len(self.bands)
        if count % nb_bands:
            raise BadInputError(
                f"dated_raster: {self.path} has {count} bands, not a multiple of the "
                f"{nb_bands} declared bands {self.bands} (bands are stacked date-major)"
            )
        nb_raw = count // nb_bands
        all_dates = self._declared_dates(descriptions, nb_bands, nb_raw)
        start = self.sensor_cfg.start_date
        end = self.sensor_cfg.end_date
        keep = [i for i, d in enumerate(all_dates) if (start is None or d >= start) and (end is None or d <= end)]
        if not keep:
            raise BadInputError(
                f"dated_raster: no acquisition of {self.path} lies between start_date {start} and end_date {end}"
            )
        self.raw_indices = np.array(keep)  # indices of the kept acquisitions in the file
        self.raw_dates = [all_dates[i] for i in keep]
        # merge acquisitions of the same day: group index of every kept acquisition
        unique = sorted(set(self.raw_dates))
        self.unique_dates = unique
        self.day_group = np.array([unique.index(d) for d in self.raw_dates])
        if len(unique) < len(self.raw_dates):
            log.info("tile %s: %d acquisitions on %d distinct days (same-day acquisitions are merged)",
                     self.tile, len(self.raw_dates), len(unique))
        self.unique_ordinals = np.array([to_ordinal(d) for d in unique], dtype=np.float64)
        if self.raw_dates_mode:
            self.dates = list(unique)
        else:
            first = to_ordinal(start) if start is not None else int(self.unique_ordinals[0])
            last = to_ordinal(end) if end is not None else int(self.unique_ordinals[-1])
            step = int(self.sensor_cfg.temporal_resolution)
            self.dates = [from_ordinal(o) for o in range(first, last + 1, step)]
        self.target_ordinals = np.array([to_ordinal(d) for d in self.dates], dtype=np.float64)
        if self.mask_path is not None:
            if not storage.exists(self.mask_path):
                raise BadInputError(f"dated_raster.mask_path: the mask {self.mask_path} of tile {self.tile!r} does not exist")
            with storage.rasterio_env(), rasterio.open(storage.rasterio_path(self.mask_path)) as msk:
                if (msk.width, msk.height) != (self.grid.width, self.grid.height) or msk.count != nb_raw:
                    raise BadInputError(
                        f"dated_raster.mask_path: {self.mask_path} is {msk.width}x{msk.height} with {msk.count} "
                        f"bands; expected {self.grid.width}x{self.grid.height} with one band per date ({nb_raw})"
                    )

    def _declared_dates(self, descriptions: list, nb_bands: int, nb_raw: int) -> list[int]:
        spec = self.sensor_cfg.dates
        if isinstance(spec, str) and spec == "descriptions":
            texts = [descriptions[i * nb_bands] for i in range(nb_raw)]
            if any(not t for t in texts):
                raise BadInputError(
                    f"dated_raster.dates: {self.path} has no date in its band descriptions; "
                    "declare the dates in the configuration (a list or a .json/.txt file)"
                )
            where = f"band description of {self.path}"
        elif isinstance(spec, str):
            text = storage.read_text(spec)
            texts = json.loads(text) if spec.endswith(".json") else [t for t in text.split() if t.strip()]
            where = f"dated_raster.dates file {spec}"
        else:
            texts = list(spec)
            where = "dated_raster.dates"
        dates = [t if isinstance(t, int) else parse_date(t, where) for t in texts]
        if len(dates) != nb_raw:
            raise BadInputError(
                f"{where}: {len(dates)} dates declared but {self.path} holds {nb_raw} acquisitions "
                f"({nb_raw * nb_bands} bands / {nb_bands} bands per date)"
            )
        if any(b < a for a, b in zip(dates, dates[1:])):
            raise BadInputError(f"{where}: dates must be in chronological order")
        return dates

    @property
    def components(self) -> list[str]:
        """Names of the components per date (the bands)."""
        return list(self.bands)

    @cached_property
    def feature_names(self) -> list[str]:
        """``sensor_component_YYYYMMDD``, date-major."""
        return [f"{self.sensor}_{c}_{d}" for d in self.dates for c in self.components]

    def description(self) -> dict:
        """What identifies the features (for fingerprints and model descriptions)."""
        return {
            "sensor": self.sensor,
            "dates": self.dates,
            "components": self.components,
            "raw_dates_mode": self.raw_dates_mode,
        }

    # --- reading -----------------------------------------------------------------------------
    def read_raw(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        """Read one window's kept acquisitions.

        Returns:
            values: float32 (h, w, nb_raw_kept, nb_bands), scaled.
            valid: bool (h, w, nb_raw_kept).
        """
        nb_bands = len(self.bands)
        indexes = [int(i) * nb_bands + b + 1 for i in self.raw_indices for b in range(nb_bands)]
        with storage.rasterio_env():
            with rasterio.open(storage.rasterio_path(self.path)) as src:
                data = src.read(indexes, window=window, out_dtype=np.float32)
            h, w = data.shape[1:]
            data = data.reshape(len(self.raw_indices), nb_bands, h, w).transpose(2, 3, 0, 1)
            valid = np.isfinite(data).all(axis=-1)
            if self.sensor_cfg.nodata is not None:
                valid &= ~(data == np.float32(self.sensor_cfg.nodata)).any(axis=-1)
            if self.mask_path is not None:
                with rasterio.open(storage.rasterio_path(self.mask_path)) as msk:
                    mask = msk.read([int(i) + 1 for i in self.raw_indices], window=window)
                valid &= mask.transpose(1, 2, 0) == 0
        if self.sensor_cfg.scale != 1.0:
            data *= np.float32(self.sensor_cfg.scale)
        return np.ascontiguousarray(data), valid

    def compute(self, raw: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """Turn raw observations of some pixels into features.

        Args:
            raw: float32 (P, nb_raw_kept, nb_bands).
            valid: bool (P, nb_raw_kept), with at least one True per pixel.

        Returns:
            float32 (P, nb_dates, nb_components).
        """
        raw, valid = self._merge_same_day(raw, valid)
        if self.raw_dates_mode:
            out = raw.copy()
            out[~valid] = np.nan
            return out
        return self._gapfill(raw, valid)

    def _merge_same_day(self, raw: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Average the valid acquisitions that fall on the same day."""
        nb_days = len(self.unique_dates)
        if nb_days == raw.shape[1]:
            return raw, valid
        weights = valid.astype(np.float32)
        sums = np.zeros((raw.shape[0], nb_days, raw.shape[2]), np.float32)
        counts = np.zeros((raw.shape[0], nb_days), np.float32)
        np.add.at(sums, (slice(None), self.day_group), np.where(valid[..., None], raw, 0.0))
        np.add.at(counts, (slice(None), self.day_group), weights)
        merged_valid = counts > 0
        merged = sums / np.maximum(counts, 1.0)[..., None]
        return merged, merged_valid

    def _gapfill(self, raw: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """Linear interpolation in time onto the regular grid (nearest valid value outside)."""
        nb_pix, nb_obs, _ = raw.shape
        t_obs = self.unique_ordinals
        idx = np.arange(nb_obs)
        prev_valid = np.maximum.accumulate(np.where(valid, idx, -1), axis=1)  # (P, obs)
        next_valid = np.flip(
            np.minimum.accumulate(np.flip(np.where(valid, idx, nb_obs), axis=1), axis=1), axis=1
        )
        out = np.empty((nb_pix, len(self.target_ordinals), raw.shape[2]), np.float32)
        rows = np.arange(nb_pix)
        first_valid = next_valid[:, 0]
        last_valid = prev_valid[:, -1]
        for k, t in enumerate(self.target_ordinals):
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
        return out

    def features(self, window: Window, select: np.ndarray | None = None) -> FeatureBlock:
        """Features of the pixels of ``window`` that are selected and have a clear date.

        Args:
            window: the window to read, in tile pixel coordinates.
            select: optional bool (h, w): only these pixels are computed (labelled pixels when
                sampling, a region's pixels when classifying).
        """
        raw, valid = self.read_raw(window)
        clear = valid.sum(axis=-1).astype(np.int16)
        keep = clear > 0
        if select is not None:
            keep &= select
        r, c = np.nonzero(keep)
        values = (
            self.compute(raw[r, c], valid[r, c])
            if r.size
            else np.empty((0, len(self.dates), len(self.components)), np.float32)
        )
        return FeatureBlock(
            values=values,
            rows=(r + int(window.row_off)).astype(np.int32),
            cols=(c + int(window.col_off)).astype(np.int32),
            clear_dates=clear,
        )


def check_tile_grids(cfg) -> None:
    """Fail early when a configured tile has no raster."""
    for tile in cfg.chain.tiles:
        path = cfg.dated_raster.path.replace("{tile}", tile)
        if not storage.exists(path):
            raise ConfigError(f"dated_raster.path: no raster for tile {tile!r} at {path}")
