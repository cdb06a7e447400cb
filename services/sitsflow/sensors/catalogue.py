"""The sensor catalogue: what sitsflow knows of each optical sensor, used by the configuration
schema (sections, chain keys, allowed bands, default date grids) and by the readers (band order,
index roles, statistics keys, feature names).

The on-disk layout of each product type (file names, masks, scale) is in
:mod:`sitsflow.sensors.products`.
"""

from __future__ import annotations

from dataclasses import dataclass, field


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


ASSET_KEY_CONVENTIONS: tuple[str, ...] = ("planetary-computer", "earth-search")
"""How a STAC provider names a product's assets (``stac.asset_keys``): Microsoft Planetary
Computer's names are the profiles' own; Element 84's Earth Search names some differently."""


@dataclass(frozen=True)
class AssetKeys:
    """A provider's names for the assets of a profile and its tile property."""

    assets: dict[str, str]
    """The profile's asset key (a band or the mask) -> the provider's asset key (same when absent)."""
    tile_property: tuple[str, ...]
    """The provider's item properties whose values, joined, give the item's tile code."""

    def key(self, asset: str) -> str:
        """The provider's key of the profile's ``asset``."""
        return self.assets.get(asset, asset)


@dataclass(frozen=True)
class StacProfile:
    """A product read from a STAC catalog (``stac.profile``): its asset keys, how digital numbers
    become physical values, and its mask. A reflectance is ``(DN + dn_offset) * scale + offset``,
    where ``dn_offset`` is ``baseline_offset`` for the items :func:`sitsflow.sensors.stac.dn_offset`
    says need it (Sentinel-2 processing baseline >= 04.00 not yet corrected), else 0."""

    name: str
    """The profile name (``sentinel-2-l2a``): the collection name of Planetary Computer."""
    key: str
    """Default ``stac.name``: statistics key and feature-name prefix."""
    assets: tuple[str, ...]
    """The band asset keys, in stacking order."""
    roles: dict[str, str]
    """The asset of each role the spectral indices use (``red``, ``nir``, ``swir``)."""
    scale: float
    """Multiplies the digital numbers."""
    offset: float
    """Added after scaling (Landsat C2 L2: -0.2)."""
    nodata: float
    """Digital number of the band assets meaning no data."""
    mask_asset: str | None
    """The asset holding the per-pixel quality; None: no mask (nodata alone)."""
    mask_clear_values: tuple[int, ...]
    """Mask values of a clear observation (empty: any value)."""
    mask_invalid_bits: tuple[int, ...]
    """Bits of the mask value that make an observation invalid when set (empty: none)."""
    tile_property: tuple[str, ...]
    """Item properties whose values, joined, give the item's tile code."""
    temporal_resolution: int
    """Default interval in days of the gap-filling date grid."""
    baseline_offset: float = 0.0
    """Digital-number offset of the items whose processing baseline requires it."""
    backscatter: bool = False
    """SAR backscatter (``stac.db`` may convert it to decibels); no spectral index applies."""
    providers: dict[str, AssetKeys] = field(default_factory=dict)
    """The :data:`ASSET_KEY_CONVENTIONS` other than Planetary Computer's this profile is known in."""

    def keys(self, convention: str) -> AssetKeys:
        """The asset keys and tile property of ``convention`` (``planetary-computer``: the profile's
        own); KeyError for a convention the profile is not known in."""
        if convention == ASSET_KEY_CONVENTIONS[0]:
            return AssetKeys({}, self.tile_property)
        return self.providers[convention]


SCL_CLEAR: tuple[int, ...] = (2, 4, 5, 6, 7, 11)
"""Sen2Cor scene classes of a clear observation: 2 dark area, 4 vegetation, 5 bare soil, 6 water,
7 unclassified, 11 snow (0 no data, 1 saturated/defective, 3 cloud shadow, 8/9 cloud, 10 thin
cirrus are not)."""


STAC_PROFILES: dict[str, StacProfile] = {
    profile.name: profile
    for profile in (
        # Planetary Computer's asset keys; Earth Search (v1 sentinel-2-l2a and sentinel-2-c1-l2a)
        # names them blue, green, red ..., its items name their tile in grid:code (MGRS-31TCJ)
        # and it applies the baseline offset itself (earthsearch:boa_offset_applied)
        StacProfile("sentinel-2-l2a", "sentinel2l2a", OPTICAL_SENSORS["Sentinel_2_S2C"].bands,
                    OPTICAL_SENSORS["Sentinel_2_S2C"].roles, 1e-4, 0.0, 0.0, "SCL",
                    SCL_CLEAR, (), ("s2:mgrs_tile",), 10, baseline_offset=-1000.0,
                    providers={"earth-search": AssetKeys(
                        {"B02": "blue", "B03": "green", "B04": "red", "B05": "rededge1", "B06": "rededge2",
                         "B07": "rededge3", "B08": "nir", "B8A": "nir08", "B11": "swir16", "B12": "swir22",
                         "SCL": "scl"},
                        ("grid:code",))}),
        # Planetary Computer's landsat-c2-l2 asset keys; QA_PIXEL bits 0 fill, 1 dilated cloud,
        # 2 cirrus, 3 cloud, 4 cloud shadow
        StacProfile("landsat-c2-l2", "landsatc2l2",
                    ("blue", "green", "red", "nir08", "swir16", "swir22"),
                    {"red": "red", "nir": "nir08", "swir": "swir16"}, 2.75e-5, -0.2, 0.0, "qa_pixel",
                    (), (0, 1, 2, 3, 4), ("landsat:wrs_path", "landsat:wrs_row"), 16),
        # radiometrically terrain-corrected backscatter (gamma0, linear power), float32 with
        # nodata -32768, as Planetary Computer's sentinel-1-rtc; no tile property of its own
        StacProfile("sentinel-1-rtc", "sentinel1rtc", ("vv", "vh"), {}, 1.0, 0.0, -32768.0, None,
                    (), (), ("grid:code",), 12, backscatter=True),
    )
}  # fmt: skip
"""The products ``stac.profile`` may name."""


#: Planetary Computer's SAS token endpoint (``GET {PC_TOKEN_URL}/{collection}``), ``stac.sign_url``'s default
PC_TOKEN_URL = "https://planetarycomputer.microsoft.com/api/sas/v1/token"
