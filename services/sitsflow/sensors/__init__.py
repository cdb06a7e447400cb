"""Sensor readers: one per product type, all yielding windows of the tile grid.

| section | chain key | statistics key | feature prefix | external-feature name |
|---|---|---|---|---|
| ``Sentinel_2`` | ``s2_path`` | ``s2_theia`` | ``sentinel2`` | ``Sentinel2`` |
| ``Sentinel_2_L3A`` | ``s2_l3a_path`` | ``s2_l3a`` | ``sentinel2l3a`` | ``Sentinel2L3A`` |
| ``Sentinel_2_S2C`` | ``s2_s2c_path`` | ``s2_s2c`` | ``sentinel2s2c`` | ``Sentinel2S2C`` |
| ``Landsat8`` | ``l8_path`` | ``l8`` | ``landsat8`` | ``Landsat8`` |
| ``dated_raster`` | ``dated_raster.path`` | ``name`` | ``name`` | ``name`` |
| ``stac`` (one or several) | ``stac.catalog`` | ``name`` | ``name`` | ``name`` |
| ``userFeat`` (static) | ``user_feat_path`` | ``userfeat`` | ``userfeat`` | ``userFeatures`` |

See docs/sensors.md.
"""

from __future__ import annotations

from sitsflow.sensors.base import Grid, Sensor
from sitsflow.sensors.catalogue import CHAIN_KEYS, OPTICAL_SENSORS
from sitsflow.sensors.dated_raster import DatedRasterSensor
from sitsflow.sensors.products import LAYOUTS, ProductSensor
from sitsflow.sensors.stac import StacSensor
from sitsflow.sensors.user_features import UserFeatSensor

SENSOR_ORDER: tuple[str, ...] = (*OPTICAL_SENSORS, "stac", "dated_raster", "userFeat")
"""The order sensors are stacked in (components of one date: Sentinel-2 first, the static user
rasters last)."""


def configured_sensors(cfg) -> list[str]:
    """The sections of the sensors a configuration uses, in :data:`SENSOR_ORDER` (``stac``
    once, however many sources it lists)."""
    out = []
    for section in SENSOR_ORDER:
        if section in ("dated_raster", "stac"):
            if getattr(cfg, section, None):
                out.append(section)
        elif section == "userFeat":
            if cfg.chain.user_feat_path is not None:
                out.append(section)
        elif getattr(cfg.chain, CHAIN_KEYS[section], None):
            out.append(section)
    return out


def build_sensors(cfg, tile: str) -> list[Sensor]:
    """The readers of every configured sensor for ``tile`` (one per STAC source, in the order
    they are listed)."""
    sensors: list[Sensor] = []
    for section in configured_sensors(cfg):
        if section == "dated_raster":
            sensors.append(DatedRasterSensor.build(cfg, tile))
        elif section == "stac":
            sensors += [StacSensor.build(cfg, tile, i) for i in range(len(cfg.stac))]
        elif section == "userFeat":
            sensors.append(UserFeatSensor.build(cfg, tile))
        else:
            sensors.append(ProductSensor.build(cfg, section, tile))
    return sensors


__all__ = [
    "Grid",
    "Sensor",
    "DatedRasterSensor",
    "ProductSensor",
    "StacSensor",
    "UserFeatSensor",
    "LAYOUTS",
    "CHAIN_KEYS",
    "SENSOR_ORDER",
    "configured_sensors",
    "build_sensors",
]
