"""What every sensor reader provides, and windowed reads of a raster onto the tile grid.

A sensor reader knows, for one tile, its acquisitions (dates, in chronological order; same-day
acquisitions are kept and merged later by the feature pipeline), its bands, and how to read one
window of the tile grid: raw values (scaled reflectances) and a validity flag per acquisition.

Rasters coarser than the tile grid (Sentinel-2's 20 m bands on the 10 m grid, Landsat 8's 30 m
pixels on a Sentinel-2 grid) are resampled by **nearest neighbour**: a tile pixel takes the value
of the coarse pixel that contains its centre. Nearest neighbour is exact and independent of how
the tile is cut into windows (a windowed bilinear read depends on the window's edges), so
sampling and inference compute bit-identical features for a pixel whatever their windows.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from dataclasses import dataclass, field

import numpy as np
import rasterio
from rasterio.windows import Window

from sitsflow.errors import BadInputError

# spectral index -> the roles of the bands it needs
INDEX_ROLES: dict[str, tuple[str, ...]] = {
    "ndvi": ("red", "nir"),
    "ndwi": ("nir", "swir"),
    "brightness": (),
}


@dataclass(frozen=True)
class Grid:
    """The pixel grid of a tile: size, georeferencing and CRS."""

    width: int
    height: int
    transform: rasterio.Affine
    crs: rasterio.crs.CRS

    def profile(self) -> dict:
        """A rasterio profile fragment for rasters on this grid."""
        return {"width": self.width, "height": self.height, "transform": self.transform, "crs": self.crs}

    @property
    def resolution(self) -> float:
        return float(abs(self.transform.a))


@dataclass
class Sensor(ABC):
    """One sensor of one tile.

    Attributes:
        key: statistics key (``s2_theia``, ``s2_l3a``, ``s2_s2c``, ``l8`` or dated_raster.name).
        prefix: the sensor part of feature names, lower case (``sentinel2``, ``landsat8`` ...).
        ext_name: the sensor name of external-feature accessors and labels (``Sentinel2`` ...).
        section: the configuration section describing it.
        bands: every band read, in stacking order (names as in the configuration, e.g. ``B8A``).
        keep: the bands fed to the network (a subset of ``bands``, same order).
        roles: band of each index role (``red``, ``nir``, ``swir``); {} when indices do not apply.
        indices: spectral indices computed per date (lower case), after the bands.
        raw_dates: YYYYMMDD of the acquisitions used (within start/end dates), chronological.
        start_date, end_date, temporal_resolution: the regular date grid settings.
    """

    key: str
    prefix: str
    ext_name: str
    section: str
    bands: list[str]
    keep: list[str]
    roles: dict[str, str]
    indices: list[str]
    raw_dates: list[int]
    start_date: int | None
    end_date: int | None
    temporal_resolution: int
    tile: str
    settings: dict = field(default_factory=dict)
    #: rows of the source rasters' internal blocks: reads are cut in multiples of it, so every
    #: compressed block is decoded once
    block_rows: int = 1

    @abstractmethod
    def native_grid(self) -> Grid:
        """The sensor's finest grid for this tile (the tile grid when it is the finest sensor)."""

    @abstractmethod
    def read(self, window: Window, grid: Grid) -> tuple[np.ndarray, np.ndarray]:
        """Read one window of the tile grid.

        Returns:
            values: float32 (h, w, nb_raw, nb_bands), scaled (reflectances), NaN-free where valid.
            valid: bool (h, w, nb_raw): False under clouds, saturation, edges, nodata, off-footprint.
        """

    @abstractmethod
    def input_files(self) -> list[str]:
        """Every file read (for fingerprints)."""

    def description(self) -> dict:
        """What identifies this sensor's features."""
        return {
            "key": self.key,
            "prefix": self.prefix,
            "bands": list(self.bands),
            "keep": list(self.keep),
            "indices": list(self.indices),
            "raw_dates": list(self.raw_dates),
            "start_date": self.start_date,
            "end_date": self.end_date,
            "temporal_resolution": self.temporal_resolution,
            "settings": self.settings,
        }


def grid_of(src) -> Grid:
    """The grid of an open rasterio dataset."""
    return Grid(src.width, src.height, src.transform, src.crs)


def _placement(src, grid: Grid, what: str) -> tuple[int, int, int, int]:
    """How ``src`` lies on ``grid``: (factor_x, factor_y, col offset, row offset) in grid pixels."""
    if src.crs != grid.crs:
        raise BadInputError(f"{what} is in {src.crs}, the tile grid in {grid.crs}: every raster of a tile must share one CRS")
    t, g = src.transform, grid.transform
    if t.b or t.d or g.b or g.d:
        raise BadInputError(f"{what}: rotated rasters are not supported")
    fx, fy = t.a / g.a, t.e / g.e
    rx, ry = round(fx), round(fy)
    if rx < 1 or ry < 1 or abs(fx - rx) > 1e-6 or abs(fy - ry) > 1e-6:
        raise BadInputError(
            f"{what} has {abs(t.a)} x {abs(t.e)} pixels; the tile grid's are {abs(g.a)} x {abs(g.e)}: "
            "a raster's pixel size must be an integer multiple of the tile grid's"
        )
    ox, oy = (t.c - g.c) / g.a, (t.f - g.f) / g.e
    if abs(ox - round(ox)) > 1e-3 or abs(oy - round(oy)) > 1e-3:
        raise BadInputError(f"{what} is not aligned on the tile grid (offset {ox:.3f}, {oy:.3f} pixels)")
    return rx, ry, round(ox), round(oy)


def read_on_grid(src, window: Window, grid: Grid, indexes: list[int], what: str,
                 fill: float = np.nan, dtype: str = "float32") -> tuple[np.ndarray, np.ndarray]:
    """Read bands of ``src`` for a window of ``grid`` (nearest neighbour when ``src`` is coarser).

    Only the source pixels under the window are read (a windowed read, /vsis3/ included).

    Returns:
        data: ``dtype`` (float32 by default) (len(indexes), h, w), ``fill`` off the raster's
            footprint (0 for an integer ``dtype``, where ``inside`` tells).
        inside: bool (h, w), False off the raster's footprint.
    """
    fx, fy, ox, oy = _placement(src, grid, what)
    h, w = int(window.height), int(window.width)
    rows = np.arange(int(window.row_off), int(window.row_off) + h) - oy
    cols = np.arange(int(window.col_off), int(window.col_off) + w) - ox
    src_rows = np.floor_divide(rows, fy)
    src_cols = np.floor_divide(cols, fx)
    in_r = (src_rows >= 0) & (src_rows < src.height)
    in_c = (src_cols >= 0) & (src_cols < src.width)
    inside = in_r[:, None] & in_c[None, :]
    out = np.full((len(indexes), h, w), fill if np.issubdtype(np.dtype(dtype), np.floating) else 0, dtype)
    if not in_r.any() or not in_c.any():
        return out, inside
    r0, r1 = int(src_rows[in_r].min()), int(src_rows[in_r].max()) + 1
    c0, c1 = int(src_cols[in_c].min()), int(src_cols[in_c].max()) + 1
    rr = np.nonzero(in_r)[0]
    cc = np.nonzero(in_c)[0]
    if fx == 1 and fy == 1 and rr.size == h and cc.size == w:
        # same grid, window wholly inside: the read is the answer (no copy)
        return src.read(indexes, window=Window(c0, r0, c1 - c0, r1 - r0), out_dtype=dtype), inside
    data = src.read(indexes, window=Window(c0, r0, c1 - c0, r1 - r0), out_dtype=dtype)
    # nearest neighbour onto the grid: one take per axis (much cheaper than a 2-D fancy index)
    data = np.take(data, src_rows[rr] - r0, axis=1)
    data = np.take(data, src_cols[cc] - c0, axis=2)
    out[:, rr[0] : rr[-1] + 1, cc[0] : cc[-1] + 1] = data
    return out, inside
