"""The tile grid: all that planning needs (sensor headers only; no pixel read, no user code)."""

from __future__ import annotations

from sitsflow.errors import BadInputError, ConfigError
from sitsflow.sensors import Sensor, build_sensors, configured_sensors
from sitsflow.sensors.base import Grid


def finest_grid(sensors: list[Sensor], tile: str) -> Grid:
    """The tile grid of some sensors: the finest sensor's native grid; every sensor must share its CRS."""
    if not sensors:
        raise ConfigError("no sensor is configured (chain.s2_path, chain.l8_path ... or dated_raster)")
    grids = [s.native_grid() for s in sensors]
    finest = min(range(len(grids)), key=lambda i: grids[i].resolution)
    grid = grids[finest]
    for s, g in zip(sensors, grids):
        if g.crs != grid.crs:
            raise BadInputError(
                f"tile {tile!r}: {s.section} is in {g.crs} but {sensors[finest].section} in "
                f"{grid.crs}; the sensors of a tile must share one CRS"
            )
    return grid


def tile_grid(cfg, tile: str) -> Grid:
    """The grid ``tile`` is sampled and classified on (what the planning step needs)."""
    return finest_grid(build_sensors(cfg, tile), tile)


def check_target_grid(cfg, tile: str, grid: Grid) -> None:
    """Refuse ``chain.spatial_resolution`` / ``chain.proj`` when they are not the inputs' grid
    (sitsflow does not resample: the maps would not be on the grid asked)."""
    import rasterio.crs

    wanted = cfg.chain.spatial_resolution
    if wanted is not None:
        have = (float(abs(grid.transform.a)), float(abs(grid.transform.e)))
        if any(abs(w - h) > 1e-6 * max(h, 1.0) for w, h in zip(wanted, have, strict=True)):
            raise ConfigError(
                f"chain.spatial_resolution is {list(wanted)} but the inputs of tile {tile!r} are on a grid of "
                f"{have[0]:g} x {have[1]:g} (the finest sensor's): sitsflow does not resample yet, so the maps "
                f"would not be at the size asked; remove the key or set it to {have[0]:g}"
            )
    if cfg.chain.proj is not None:
        try:
            crs = rasterio.crs.CRS.from_user_input(cfg.chain.proj)
        except rasterio.errors.CRSError as exc:
            raise ConfigError(f"chain.proj {cfg.chain.proj!r} is not a CRS: {exc}") from None
        if crs != grid.crs:
            raise ConfigError(
                f"chain.proj is {cfg.chain.proj!r} but the inputs of tile {tile!r} are in {grid.crs}: sitsflow does "
                "not reproject yet, so the maps would not be in the projection asked; remove the key or set it "
                f"to {grid.crs.to_string()!r}"
            )


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
