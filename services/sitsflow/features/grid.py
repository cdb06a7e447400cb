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
