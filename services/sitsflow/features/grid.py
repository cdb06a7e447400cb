"""The tile grid: all that planning needs (sensor headers only; no pixel read, no user code).

Without ``chain.proj`` and ``chain.spatial_resolution``, a tile is sampled and classified on the
grid of its finest sensor (coarser sensors are read onto it by nearest neighbour, see
:mod:`sitsflow.sensors.base`), and every sensor of a tile must share its CRS.

With either key, the tile grid is the **target grid** (:attr:`Grid.resampled`):

* its CRS is ``chain.proj`` (default: the finest sensor's CRS);
* its pixel size is ``chain.spatial_resolution`` (default: the finest sensor's pixel size when the
  target CRS has the same units, else the size GDAL suggests for the finest sensor's grid
  reprojected, ``calculate_default_transform``);
* it covers the finest sensor's footprint (its bounds transformed into the target CRS, edges
  densified), by whole pixels;
* alignment: in the finest sensor's own CRS the grid starts at that sensor's upper-left corner
  (asking for the inputs' own pixel size gives exactly the inputs' grid, read without resampling;
  a coarser size nests whole input pixels); in another CRS its corners are multiples of the pixel
  size (as ``gdalwarp -tap``), so maps of neighbouring tiles align in a mosaic.

Every raster not on the target grid by an integer factor in its CRS is then warped onto it when
read (:func:`sitsflow.sensors.base.warped_read`), so sensors in different projections combine.
"""

from __future__ import annotations

import math

import rasterio
from rasterio.crs import CRS

from sitsflow.errors import BadInputError, ConfigError
from sitsflow.sensors import Sensor, build_sensors, configured_sensors
from sitsflow.sensors.base import Grid


def target_crs(proj: str | None) -> CRS | None:
    """The CRS of ``chain.proj`` (None when unset); bad input names the key."""
    if proj is None:
        return None
    try:
        crs = CRS.from_user_input(proj)
    except rasterio.errors.CRSError as exc:
        raise ConfigError(
            f"chain.proj {proj!r} is not a CRS: {exc}; expected an EPSG code such as 'EPSG:2154', a PROJ string or WKT"
        ) from None
    if not crs.is_projected and not crs.is_geographic:
        raise ConfigError(f"chain.proj {proj!r} is not a horizontal CRS; expected e.g. 'EPSG:2154'")
    return crs


def finest_grid(
    sensors: list[Sensor],
    tile: str,
    proj: str | None = None,
    resolution: tuple[float, float] | None = None,
) -> Grid:
    """The tile grid of some sensors: the finest sensor's native grid (every sensor must share its
    CRS), or the target grid of ``proj`` / ``resolution`` (``chain.proj``,
    ``chain.spatial_resolution``) laid over the finest sensor's footprint (see the module docstring)."""
    if not sensors:
        raise ConfigError("no sensor is configured (chain.s2_path, chain.l8_path ... or dated_raster)")
    grids = [s.native_grid() for s in sensors]
    crs = target_crs(proj)
    # the static user rasters (userFeat) are read onto the dated sensors' grid, never set it
    dated = [i for i, s in enumerate(sensors) if not s.static] or list(range(len(sensors)))
    finest = min(dated, key=lambda i: _pixel_size(grids[i], crs))
    grid = grids[finest]
    if crs is None:
        for s, g in zip(sensors, grids):
            if g.crs != grid.crs:
                raise BadInputError(
                    f"tile {tile!r}: {s.section} is in {g.crs} but {sensors[finest].section} in "
                    f"{grid.crs}; the sensors of a tile must share one CRS, or set chain.proj (e.g. "
                    f"'{grid.crs.to_string()}'): every input is then reprojected onto that CRS"
                )
        if resolution is None:
            return grid
    return target_grid(grid, crs if crs is not None else grid.crs, resolution, tile)


def target_grid(native: Grid, crs: CRS, resolution: tuple[float, float] | None, tile: str) -> Grid:
    """The grid of pixel size ``resolution`` (default: see the module docstring) in ``crs`` that
    covers ``native``'s footprint, aligned by the module docstring's rule."""
    from rasterio.transform import array_bounds
    from rasterio.warp import calculate_default_transform, transform_bounds

    t = native.transform
    if t.b or t.d:
        raise BadInputError(f"tile {tile!r}: the finest sensor's raster is rotated; it cannot anchor a target grid")
    left, bottom, right, top = array_bounds(native.height, native.width, t)
    same = crs == native.crs
    if resolution is None:
        if same or _units(crs) == _units(native.crs):
            resolution = (abs(t.a), abs(t.e))
        else:
            suggested, _, _ = calculate_default_transform(
                native.crs, crs, native.width, native.height, left, bottom, right, top
            )
            resolution = (abs(suggested.a), abs(suggested.e))
    rx, ry = (float(r) for r in resolution)
    if not (rx > 0 and ry > 0 and math.isfinite(rx) and math.isfinite(ry)):
        raise ConfigError(f"chain.spatial_resolution {list(resolution)} must be positive")
    if same:
        x0, y1 = left, top  # anchored at the inputs' corner
        width = math.ceil((right - left) / rx - 1e-6)
        height = math.ceil((top - bottom) / ry - 1e-6)
    else:
        try:
            left, bottom, right, top = transform_bounds(native.crs, crs, left, bottom, right, top, densify_pts=21)
        except Exception as exc:  # noqa: BLE001 (PROJ's failures have no common type)
            raise ConfigError(
                f"chain.proj {crs.to_string()!r}: the inputs of tile {tile!r} ({native.crs}) cannot be "
                f"reprojected onto it: {exc}"
            ) from None
        if not all(math.isfinite(v) for v in (left, bottom, right, top)) or right <= left or top <= bottom:
            raise ConfigError(
                f"chain.proj {crs.to_string()!r}: the footprint of tile {tile!r} has no extent in that CRS "
                "(outside its area of use?)"
            )
        x0, y1 = math.floor(left / rx) * rx, math.ceil(top / ry) * ry  # corners on multiples of the pixel
        width = math.ceil((right - x0) / rx - 1e-6)
        height = math.ceil((y1 - bottom) / ry - 1e-6)
    width, height = max(width, 1), max(height, 1)
    if width * height > 2**34:
        raise ConfigError(
            f"chain.spatial_resolution {[rx, ry]} gives tile {tile!r} a grid of {width} x {height} pixels in "
            f"{crs.to_string()}; is the pixel size in the CRS's units ({_units(crs)})?"
        )
    return Grid(width, height, rasterio.Affine(rx, 0.0, x0, 0.0, -ry, y1), crs, resampled=True)


def _pixel_size(grid: Grid, crs: CRS | None) -> float:
    """``grid``'s pixel size, measured in ``crs`` when it is another CRS (sensors in several CRSs
    are compared in the target CRS: degrees and metres do not compare). That measure is GDAL's
    estimate for the reprojected grid: 1 % is added to it, so that a sensor already in ``crs``
    wins a tie (10 m in the target CRS against 10 m elsewhere, estimated 9.97 m)."""
    if crs is None or grid.crs == crs:
        return grid.resolution
    from rasterio.transform import array_bounds
    from rasterio.warp import calculate_default_transform

    try:
        t, _, _ = calculate_default_transform(
            grid.crs, crs, grid.width, grid.height, *array_bounds(grid.height, grid.width, grid.transform)
        )
    except Exception:  # noqa: BLE001 (PROJ's failures have no common type; target_grid reports them)
        return grid.resolution
    return float(abs(t.a)) * 1.01


def _units(crs: CRS) -> str:
    """The units of ``crs``'s axes (``metre``, ``degree`` ...)."""
    return "degree" if crs.is_geographic else str(crs.linear_units).lower()


def tile_grid(cfg, tile: str) -> Grid:
    """The grid ``tile`` is sampled and classified on (what the planning step needs)."""
    return finest_grid(build_sensors(cfg, tile), tile, cfg.chain.proj, cfg.chain.spatial_resolution)


def check_tile_grids(cfg) -> None:
    """Fail early when a configured tile has no input for a sensor, or no grid (cheap: no pixel is
    read): every tile's grid, the target grid of ``chain.proj`` / ``chain.spatial_resolution``
    when they are set."""
    if not configured_sensors(cfg):
        raise ConfigError("no sensor is configured (chain.s2_path, chain.l8_path ... or dated_raster)")
    target_crs(cfg.chain.proj)
    for tile in cfg.chain.tiles:
        try:
            tile_grid(cfg, tile)
        except ConfigError:
            raise
        except BadInputError as exc:
            raise ConfigError(str(exc)) from None
