"""The sensor catalogue: what sitsflow knows of each optical sensor, used by the configuration
schema (sections, chain keys, allowed bands, default date grids) and by the readers (band order,
index roles, statistics keys, feature names).

The on-disk layout of each product type (file names, masks, scale) is in
:mod:`sitsflow.sensors.products`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class OpticalSensor:
    """One optical sensor of iota2 read from its products."""

    section: str
    """Its configuration section (``Sentinel_2``)."""
    chain_key: str
    """The ``chain`` key of the folder of its products (``s2_path``)."""
    key: str
    """iota2's statistics key (``s2_theia``): ``self._stats`` of the networks."""
    prefix: str
    """Feature-name prefix (``sentinel2_b2_20180101``)."""
    ext_name: str
    """Sensor name the user's external-feature functions see (``Sentinel2``)."""
    bands: tuple[str, ...]
    """Its bands, in stacking order."""
    roles: dict[str, str]
    """The band of each role the spectral indices use (``red``, ``nir``, ``swir``)."""
    temporal_resolution: int
    """iota2's default interval in days of the gap-filling date grid."""


_S2_BANDS = ("B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B11", "B12")
_S2_ROLES = {"red": "B4", "nir": "B8", "swir": "B11"}

OPTICAL_SENSORS: dict[str, OpticalSensor] = {
    sensor.section: sensor
    for sensor in (
        OpticalSensor("Sentinel_2", "s2_path", "s2_theia", "sentinel2", "Sentinel2",
                      _S2_BANDS, _S2_ROLES, 10),
        OpticalSensor("Sentinel_2_L3A", "s2_l3a_path", "s2_l3a", "sentinel2l3a", "Sentinel2L3A",
                      _S2_BANDS, _S2_ROLES, 10),
        OpticalSensor("Sentinel_2_S2C", "s2_s2c_path", "s2_s2c", "sentinel2s2c", "Sentinel2S2C",
                      ("B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12"),
                      {"red": "B04", "nir": "B08", "swir": "B11"}, 10),
        OpticalSensor("Landsat8", "l8_path", "l8", "landsat8", "Landsat8",
                      ("B1", "B2", "B3", "B4", "B5", "B6", "B7"),
                      {"red": "B4", "nir": "B5", "swir": "B6"}, 16),
    )
}  # fmt: skip
"""The optical sensors, by configuration section, in stacking order."""

CHAIN_KEYS: dict[str, str] = {s.section: s.chain_key for s in OPTICAL_SENSORS.values()}
"""Configuration section -> the ``chain`` key of its products folder."""

SPECTRAL_INDICES: tuple[str, ...] = ("NDVI", "NDWI", "Brightness")
"""The spectral indices ``arg_train.features`` may name (any case), in iota2's spelling."""

INDEX_ROLES: dict[str, tuple[str, ...]] = {"ndvi": ("red", "nir"), "ndwi": ("nir", "swir"), "brightness": ()}
"""Spectral index (lower case) -> the band roles it needs (Brightness uses every band)."""
