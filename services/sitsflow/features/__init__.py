"""The feature pipeline, written once and used by both sampling and inference.

For one tile, :class:`FeaturePipeline` reads windows of every configured sensor (THEIA
Sentinel-2 L2A / L3A, Sen2Cor, Landsat 8, the generic ``dated_raster``, STAC items; local or
object storage, windowed reads only; see :mod:`sitsflow.sensors`), masks invalid observations (clouds,
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

The pieces, each usable alone: :mod:`~sitsflow.features.grid` (the tile grid: all that planning
needs, headers only, no user code), :mod:`~sitsflow.features.dates` (the date axis),
:mod:`~sitsflow.features.reader` (the windowed reader) and :mod:`~sitsflow.features.compute` (the
pure feature computation). :class:`FeaturePipeline` puts them together for one tile.
"""

from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np
from rasterio.windows import Window

from sitsflow.errors import BadInputError
from sitsflow.features.dates import DateAxis
from sitsflow.features.grid import check_tile_grids, finest_grid, target_crs, tile_grid
from sitsflow.features.reader import READ_BUDGET_BYTES, FeatureBlock, WindowReader
from sitsflow.sensors import Sensor, build_sensors
from sitsflow.sensors.base import Grid, ReadBuffers
from sitsflow.sensors.catalogue import INDEX_ROLES
from sitsflow.sensors.dates import from_ordinal, parse_date, to_ordinal
from sitsflow.sensors.external import ExternalFeatures

if TYPE_CHECKING:
    from sitsflow.features.compute import FeatureComputer, RawFeatures


def __getattr__(name: str) -> Any:
    """The feature computation (torch) is imported when first asked for: planning reads the tile
    grid (headers only) without torch."""
    if name in ("FeatureComputer", "RawFeatures"):
        from sitsflow.features import compute

        return getattr(compute, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DateAxis",
    "FeatureBlock",
    "FeatureComputer",
    "FeaturePipeline",
    "RawFeatures",
    "Grid",
    "ReadBuffers",
    "WindowReader",
    "check_tile_grids",
    "from_ordinal",
    "parse_date",
    "target_crs",
    "tile_grid",
    "to_ordinal",
    "READ_BUDGET_BYTES",
]


class FeaturePipeline:
    """Feature computation of every configured sensor for one tile.

    Args:
        cfg: the validated configuration.
        tile: the tile name.

    Attributes:
        grid: the tile grid (the finest sensor's grid, or the target grid of ``chain.proj`` /
            ``chain.spatial_resolution``: see :mod:`~sitsflow.features.grid`).
        dates: YYYYMMDD of the date axis.
        sensors: the sensor readers, in stacking order.
        sensor: the statistics key of the first sensor (the database's ``sensor`` attribute).
        axis, computer, reader: the date axis, the feature computation and the windowed reader.
    """

    def __init__(self, cfg, tile: str) -> None:
        self.cfg = cfg
        self.tile = tile
        self.raw_dates_mode = bool(cfg.arg_train.features_from_raw_dates)
        self.sensors: list[Sensor] = build_sensors(cfg, tile)
        self.grid: Grid = finest_grid(self.sensors, tile, cfg.chain.proj, cfg.chain.spatial_resolution)
        self.sensor = self.sensors[0].key
        self.axis = DateAxis(self.sensors, self.raw_dates_mode, tile)
        self.dates: list[int] = self.axis.dates
        self.external = (
            ExternalFeatures(cfg.external_features, self.raw_dates_mode) if cfg.external_features is not None else None
        )
        external = (
            self.external.probe({s.ext_name: list(s.bands) for s in self.sensors}, self.dates)
            if self.external is not None
            else {}
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
        from sitsflow.features.compute import FeatureComputer

        conversions = [s.native_conversion(self.grid) for s in self.sensors]
        self.computer = FeatureComputer(
            self.sensors,
            self.axis,
            self._components,
            self.external,
            None if any(c is None for c in conversions) else [c for c in conversions if c is not None],
        )
        self.reader = WindowReader(self.sensors, self.grid)

    # --- dates -------------------------------------------------------------------------------
    @property
    def raw_dates(self) -> list[int]:
        """The first sensor's acquisition dates used (chronological, repeated days included)."""
        return list(self.sensors[0].raw_dates)

    @property
    def unique_dates(self) -> list[int]:
        """The first sensor's distinct acquisition days."""
        return list(self.axis.times[0].unique_dates)

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

    # --- computing and reading ---------------------------------------------------------------
    @property
    def native(self) -> bool:
        """Every sensor reads native values (:meth:`~sitsflow.sensors.base.Sensor.read_native`):
        their conversion can be left to the network's device (no longer once a sensor found it
        cannot: :class:`~sitsflow.sensors.base.NativeUnavailable`)."""
        return self.computer.conversions is not None and all(
            s.native_conversion(self.grid) is not None for s in self.sensors
        )

    def compute(self, raw, valid) -> np.ndarray:
        """See :meth:`FeatureComputer.compute`."""
        return self.computer.compute(raw, valid)

    def read_windows(self, window: Window) -> list[Window]:
        """See :meth:`WindowReader.read_windows`."""
        return self.reader.read_windows(window)

    def features(
        self,
        window: Window,
        select: np.ndarray | None = None,
        *,
        count_clear: bool = True,
        buffers: ReadBuffers | None = None,
        probe: bool = False,
        native: bool = False,
    ) -> FeatureBlock:
        """Features of the pixels of ``window`` that are selected and have a clear date (see
        :meth:`WindowReader.features`); with ``native`` and :attr:`native`, their observations as
        read instead (``raw``: :class:`~sitsflow.features.compute.RawFeatures`), the features being
        computed where they are used."""
        return self.reader.features(
            window,
            self.compute,
            self.computer.shape,
            select,
            count_clear=count_clear,
            buffers=buffers,
            probe=probe,
            native=self.computer if native and self.native else None,
        )
