"""The configuration schema: frozen pydantic models, one per section.

The models are the schema: each field's type says what it allows (types, ranges, choices, see
:mod:`sitsflow.config.schema`), its default is iota2's, its docstring is iota2's documentation of
the key, and the rules between keys are the ``__rules__`` of their section. The loader
(:func:`sitsflow.config.load_config`) validates a parsed file against :class:`SitsflowConfig` and
:mod:`sitsflow.config.report` turns pydantic's errors into sitsflow's messages; the reference page
``docs/configuration.md`` is generated from these models (``python -m sitsflow.config.docs``).

The models hold normalised values only: absolute paths or ``s3://`` URIs, dates as ``YYYYMMDD``
integers, tuples instead of lists. Assigning an attribute raises.
"""

from __future__ import annotations

import itertools
import math
import re
import typing
from collections.abc import Iterator
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BeforeValidator, ConfigDict, Field, PlainValidator, field_validator, model_validator, with_config
from typing_extensions import TypedDict

from sitsflow.config import selection
from sitsflow.config.resources import IOTA2_STEPS, ResourcesSection
from sitsflow.config.schema import (
    AS_IS,
    Date,
    Dates,
    Expect,
    Inline,
    Iota2Default,
    JsonDict,
    ListOf,
    PathOf,
    PathsIn,
    Rule,
    Section,
    SectionList,
    Text,
    detail,
    expected,
    field_type,
    invalid,
    json_value,
    section_model,
    shown,
    suggest,
)
from sitsflow.config.syntax import format_key, format_value
from sitsflow.sensors.catalogue import (
    ASSET_KEY_CONVENTIONS,
    OPTICAL_SENSORS,
    PC_TOKEN_URL,
    SPECTRAL_INDICES,
    STAC_PROFILES,
)

BUILTIN_NETWORKS: tuple[str, ...] = (
    "LTAEClassifier",
    "ANN",
    "MLPClassifier",
    "SimpleSelfAttentionClassifier",
    "TempCNN",
    "InceptionTime",
)
"""The built-in networks ``dl_name`` may name without ``dl_module``: the four of iota2's
``torch_nn_bank.py``, then sitsflow's TempCNN and InceptionTime (docs/networks.md)."""

Criterion = Literal["loss", "fscore", "oa", "kappa"]
"""The values of ``model_selection_criterion``."""
EarlyStopMetric = Literal["train_loss", "val_loss", "fscore", "oa", "kappa"]
"""The values of ``early_stop_metric``."""
METRIC_ALIASES = {"valid_loss": "val_loss"}
"""iota2's other spellings of early-stop metrics."""

PositiveInt = Annotated[int, Field(ge=1)]
Count = Annotated[int, Field(ge=0)]
FieldName = Annotated[str, Text("a non-empty field name")]


def _date_order(section: Any) -> Iterator[tuple[tuple[str, ...], Any, Any]]:
    start, end = section.start_date, section.end_date
    if start is not None and end is not None and start > end:
        yield (
            ("end_date",),
            end,
            detail(f"end_date {end} is before start_date {start}; start_date <= end_date is required"),
        )


_DATE_ORDER: Rule = (("start_date", "end_date"), _date_order)


# --- chain -----------------------------------------------------------------------------------
_TILE = re.compile(r"[A-Za-z0-9_-]+")


def _tiles(value: Any) -> str:
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        names = [n for v in value for n in v.split()]
    elif isinstance(value, str):
        names = value.split()
    else:
        raise invalid()
    if not names or not all(_TILE.fullmatch(n) for n in names):
        raise invalid()
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise detail(f"tile {duplicates[0]!r} is listed twice in {shown(value)}")
    return " ".join(names)


TileList = Annotated[
    str,
    PlainValidator(_tiles),
    Expect("tile names separated by spaces, each made of letters, digits, '_' or '-' (e.g. 'T31TCJ T31TDJ')"),
]
Folder = Annotated[str, PathOf("a folder (local or s3:// URI)")]
TextFile = Annotated[str, PathOf("the path of a text file")]
PyFile = Annotated[str, PathOf("the path of a .py file", suffixes=(".py",))]
_SENSOR_HINT = "describe the images with a dated_raster section instead"
_RERUN_HINT = "sitsflow runs every stage; a rerun skips the tasks already done"
_UNSUPPORTED_SENSORS = {
    # iota2 chain key -> (its sensor section, the product)
    "l8_path_old": ("Landsat8_old", "Landsat 8 products in the old THEIA format"),
    "l8_usgs_path": ("Landsat8_usgs", "Landsat 8 USGS products"),
    "l8_usgs_optical_path": ("Landsat8_usgs_optical", "Landsat 8 USGS optical products"),
    "l8_usgs_thermal_path": ("Landsat8_usgs_thermal", "Landsat 8 USGS thermal products"),
    "l8_usgs_infrared_path": ("Landsat8_usgs_infrared", "Landsat 8 USGS infrared products"),
    "l7_usgs_path": ("Landsat7_usgs", "Landsat 7 USGS products"),
    "l5_path_old": ("Landsat5_old", "Landsat 5 products in the old THEIA format"),
    "s1_path": ("Sentinel_1", "the Sentinel-1 configuration file (SAR)"),
}
"""The iota2 sensors sitsflow does not read: the chain key giving their data, their section."""


_RESOLUTION_TEXT = "a pixel size > 0 (in the CRS's units), or a list [x, y] of two"


def _resolution(value: Any) -> tuple[float, float]:
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = [value, value]
    if (
        not isinstance(value, list | tuple)
        or len(value) != 2
        or not all(isinstance(v, int | float) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        raise invalid()
    return (float(value[0]), float(value[1]))


class ChainSection(Section):
    """The ``chain`` section: where the inputs are and where the outputs go.

    At least one sensor is required: one of the four product folders (``s2_path``,
    ``s2_l3a_path``, ``s2_s2c_path``, ``l8_path``), a ``dated_raster`` or a ``stac`` section
    (else "no sensor: ..."). Several sensors can be combined (docs/sensors.md).
    """

    __ignored__ = {
        "first_step": _RERUN_HINT,
        "last_step": _RERUN_HINT,
        "logger_level": "the SITSFLOW_LOG_LEVEL environment variable",
        "check_inputs": "sitsflow always checks the configuration and the network before any work",
        "remove_output_path": "outputs are rewritten under the same names; a rerun redoes only what changed",
        **dict.fromkeys(
            ("s2_output_path", "s2_l3a_output_path", "s2_s2c_output_path"),
            "where iota2 writes its intermediate sensor stacks; sitsflow computes the features on the fly "
            "and writes none",
        ),
    }

    __iota2_defaults__ = {
        **{
            key: Iota2Default(
                None,
                f"the folder of {what}, which enables iota2's {section} sensor",
                f"this sensor is not supported, its images would be left out of the features; {_SENSOR_HINT}",
            )
            for key, (section, what) in _UNSUPPORTED_SENSORS.items()
        },
        "cloud_threshold": Iota2Default(
            0,
            "a reference pixel is sampled only where it has more clear acquisitions than this number",
            "sitsflow samples every labelled pixel, as iota2 does with 0",
        ),
        "minimum_required_dates": Iota2Default(
            2,
            "iota2 stops when a sensor has fewer acquisitions on a tile",
            "sitsflow does not check a number of dates (a tile needs one acquisition)",
        ),
        "enable_autocontext": Iota2Default(
            False,
            "iota2's auto-context (iterated classifications with superpixel features), scikit-learn models only",
            "sitsflow classifies each pixel once, as iota2 does without auto-context",
        ),
        **{
            key: Iota2Default(
                None,
                f"{what} read by iota2's feature extraction for some sensors",
                "sitsflow reads no such auxiliary raster",
            )
            for key, what in (("srtm_path", "a DEM folder (SRTM)"), ("worldclim_path", "WorldClim climate rasters"))
        },
    }
    __iota2__ = {"grasslands": ""}

    output_path: Annotated[str, PathOf("a local folder or an s3:// URI")]
    """Root of every output (local folder or ``s3://bucket/prefix``), iota2's output tree."""
    list_tile: TileList
    """The tiles to process, iota2 style: names separated by spaces (``"T31TCJ T31TDJ"``)."""
    ground_truth: Annotated[str, PathOf("the path of a vector file (or s3:// URI)")]
    """Reference polygons (a vector file readable by OGR) with the class code in ``data_field``."""
    data_field: FieldName
    """Name of the integer attribute of ``ground_truth`` that holds the class codes."""
    region_path: Annotated[str, PathOf("the path of a vector file")] | None = None
    """Optional vector file of eco-climatic regions: one model is trained per region."""
    region_field: FieldName = "region"
    """Attribute of ``region_path`` (and of the samples) holding the region number."""
    nomenclature_path: TextFile | None = None
    """Optional text file ``name:code`` per line, naming the classes in reports."""
    color_table: TextFile | None = None
    """Optional text file ``code R G B`` per line, for the colour-indexed final map."""
    s2_path: Folder | None = None
    """Folder of Sentinel-2 THEIA L2A products, one sub-folder per tile (``{s2_path}/T31TCJ/``)
    holding one folder per acquisition (``SENTINEL2A_YYYYMMDD-..._L2A_T31TCJ_...``); enables the
    ``Sentinel_2`` sensor."""
    s2_l3a_path: Folder | None = None
    """Folder of Sentinel-2 THEIA L3A monthly syntheses, one sub-folder per tile; enables
    ``Sentinel_2_L3A``."""
    s2_s2c_path: Folder | None = None
    """Folder of Sentinel-2 Sen2Cor L2A products (``.SAFE`` folders), one sub-folder per tile;
    enables ``Sentinel_2_S2C``."""
    l8_path: Folder | None = None
    """Folder of Landsat 8 THEIA L2A products, one sub-folder per tile; enables ``Landsat8``."""
    user_feat_path: Folder | None = None
    """Folder of user rasters (iota2's ``userFeat`` sensor), one sub-folder per tile
    (``{user_feat_path}/T31TCJ/``) holding one raster per pattern of the ``userFeat`` section
    (e.g. a DEM, a slope): every band of each raster is added to the features of every date, after
    the dated sensors (docs/sensors.md). Needs a dated sensor."""
    spatial_resolution: (
        Annotated[tuple[float, float], PlainValidator(_resolution), AS_IS, Expect(_RESOLUTION_TEXT)] | None
    ) = None
    """iota2's output pixel size (a number, or [x, y]), in the units of ``proj`` (or of the
    inputs' CRS). Unset (with ``proj`` unset too), each tile is worked on the grid of its finest
    sensor. Set, each tile is worked on a target grid of this pixel size covering the finest
    sensor's footprint: in the inputs' CRS it starts at their upper-left corner, in another CRS its
    corners are multiples of the pixel size (``gdalwarp -tap``). Every input not on that grid by
    an integer factor is resampled when read, windowed, through GDAL's warper: cubic convolution
    for reflectances (iota2's ``Superimpose`` default), nearest neighbour for masks. Samples,
    maps and STAC items are then on that grid."""
    proj: Annotated[str, Text("a CRS such as 'EPSG:2154'")] | None = None
    """iota2's output projection (``"EPSG:2154"``; any CRS GDAL reads: EPSG code, PROJ string,
    WKT). Set, each tile is worked on a target grid in this CRS (see ``spatial_resolution``; the
    pixel size defaults to the finest sensor's, or to GDAL's suggestion when the units differ):
    every input is reprojected onto it when read, so sensors in different projections combine
    (without it, they must share one CRS). Ground truth and regions are reprojected to it."""

    @property
    def tiles(self) -> tuple[str, ...]:
        """The tile names of ``list_tile``, in the order given."""
        return tuple(self.list_tile.split())


# --- sensors ---------------------------------------------------------------------------------
class DatedRasterSection(Section):
    """The ``dated_raster`` section: the generic dated-raster sensor.

    One raster per tile (``path``, where ``{tile}`` is replaced by the tile name) stacks
    ``len(dates) * len(bands)`` bands, date-major: all bands of the first date, then the next date.
    It serves any product the dedicated readers do not (e.g. the Slovenia NDVI example). No
    spectral index is computed for it.
    """

    __rules__ = (_DATE_ORDER,)

    name: Annotated[str, Text("a lower-case name matching [a-z][a-z0-9]* (e.g. 'sentinel2')", r"[a-z][a-z0-9]*")] = (
        "generic"
    )
    """Sensor key used in feature names (``{name}_{band}_{YYYYMMDD}``) and statistics."""
    path: Annotated[str, PathOf("a path or s3:// URI of a raster (may contain {tile})", pattern=True)]
    """Path pattern of the raster of each tile; ``{tile}`` is replaced by the tile name (it is
    needed when several tiles are listed)."""
    bands: Annotated[
        tuple[Annotated[str, Field(pattern=r"^[a-z0-9]+$")], ...],
        ListOf(
            "band",
            "a non-empty list of unique lower-case band names made of [a-z0-9] (e.g. ['ndvi'])",
        ),
    ]
    """Band (component) names in the order they are stacked for each date, e.g. ``["ndvi"]``; a
    single string is one band."""
    dates: Dates = "descriptions"
    """Acquisition dates: ``"descriptions"`` (read from the raster's band descriptions), a list of
    dates (one per date-layer, increasing; normalised to YYYYMMDD integers), or the path of a
    ``.json`` (list of strings) or ``.txt`` (one date per line) file."""
    scale: Annotated[float, Field(gt=0)] = 1.0
    """Raw values are multiplied by ``scale`` (e.g. 0.0001 for reflectances stored as int16)."""
    nodata: float | None = None
    """Raw value meaning "no data" (such pixels are invalid at that date); None: none."""
    mask_path: (
        Annotated[str, PathOf("a path or s3:// URI of a mask raster (may contain {tile})", pattern=True)] | None
    ) = None
    """Optional path pattern (with ``{tile}``) of a validity mask raster: one band per date,
    nonzero = invalid (cloud, shadow, saturation, edge)."""
    start_date: Date | None = None
    """First date of the gap-filling grid and of the dates used; None: the first date."""
    end_date: Date | None = None
    """Last date (``>= start_date``) of the gap-filling grid and of the dates used; None: the last
    date."""
    temporal_resolution: PositiveInt = 10
    """Interval in days of the regular date grid the series are gap-filled onto."""

    @property
    def dates_kind(self) -> Literal["descriptions", "list", "file"]:
        """How the dates are given: "descriptions", "list" (``dates`` is a tuple) or "file"."""
        if isinstance(self.dates, tuple):
            return "list"
        return "descriptions" if self.dates == "descriptions" else "file"


_TILES_TEXT = (
    "a mapping of tile names to footprints, e.g. {T31TCJ: {bbox: [300000, 4790220, 409800, 4900020], "
    "crs: 'EPSG:32631', resolution: 10}} (resolution: a pixel size or [x, y], in the CRS's units)"
)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def stac_tiles(value: Any) -> dict[str, dict[str, Any]]:
    """``stac.tiles``: per tile, its footprint ``bbox`` (minx, miny, maxx, maxy in ``crs``), its
    ``crs`` (checked by PROJ) and its pixel size ``resolution`` ((x, y))."""
    if not isinstance(value, dict) or not value:
        raise invalid()
    out: dict[str, dict[str, Any]] = {}
    for tile, spec in value.items():
        if not isinstance(tile, str) or not tile.strip():
            raise invalid(f"the tile name {shown(tile)} is not a non-empty string")
        if not isinstance(spec, dict):
            raise invalid(f"{tile}: {shown(spec)} is not a mapping with bbox, crs and resolution")
        unknown = sorted(set(spec) - {"bbox", "crs", "resolution"})
        missing = [k for k in ("bbox", "crs", "resolution") if k not in spec]
        if unknown or missing:
            what = f"unknown key {unknown[0]!r}" if unknown else f"no {missing[0]!r}"
            raise invalid(f"{tile}: {what}; a footprint has the keys bbox, crs and resolution")
        bbox = spec["bbox"]
        if not isinstance(bbox, list | tuple) or len(bbox) != 4 or not all(_number(v) for v in bbox):
            raise invalid(f"{tile}.bbox {shown(bbox)} is not four numbers [minx, miny, maxx, maxy]")
        if not (bbox[0] < bbox[2] and bbox[1] < bbox[3]):
            raise invalid(f"{tile}.bbox {list(bbox)}: minx < maxx and miny < maxy are required")
        crs = spec["crs"]
        if not isinstance(crs, str) or not _is_crs(crs):
            raise invalid(f"{tile}.crs {shown(crs)} is not a horizontal CRS such as 'EPSG:32631'")
        res = spec["resolution"]
        pair = list(res) if isinstance(res, list | tuple) else [res, res]
        if len(pair) != 2 or not all(_number(v) and v > 0 for v in pair):
            raise invalid(f"{tile}.resolution {shown(res)} is not a positive pixel size or [x, y] of them")
        cells = (bbox[2] - bbox[0]) / pair[0] * (bbox[3] - bbox[1]) / pair[1]
        if cells > 2**34:
            raise invalid(f"{tile}: bbox {list(bbox)} at resolution {pair} is {cells:.3g} pixels; units of {crs}?")
        out[tile] = {"bbox": tuple(float(v) for v in bbox), "crs": crs, "resolution": tuple(float(v) for v in pair)}
    return out


def _is_crs(text: str) -> bool:
    from rasterio.crs import CRS
    from rasterio.errors import CRSError

    try:
        crs = CRS.from_user_input(text)
    except CRSError:
        return False
    return bool(crs.is_projected or crs.is_geographic)


def _stac_source(section: Any) -> Iterator[tuple[tuple[str, ...], Any, Any]]:
    if (section.catalog is None) == (section.api is None):
        yield (
            ("catalog",),
            section.catalog,
            detail("give one of catalog (a static catalog) and api (a STAC API URL)"),
        )


def _stac_profile_defaults(section: Any) -> Iterator[tuple[tuple[str, ...], Any, Any]]:
    profile = STAC_PROFILES[section.profile]
    if section.assets is not None:
        unknown = [a for a in section.assets if a not in profile.assets]
        if unknown:
            yield (
                ("assets",),
                list(section.assets),
                detail(
                    f"asset {unknown[0]!r} is not a band of profile {section.profile!r}; "
                    f"its bands are {list(profile.assets)}"
                ),
            )
    if section.asset_keys != ASSET_KEY_CONVENTIONS[0] and section.asset_keys not in profile.providers:
        known = [ASSET_KEY_CONVENTIONS[0], *profile.providers]
        yield (
            ("asset_keys",),
            section.asset_keys,
            detail(f"profile {section.profile!r} is known with the asset keys of {known} only"),
        )
    if section.db and not profile.backscatter:
        yield (("db",), True, detail(f"True needs a backscatter profile; {section.profile!r} is not one"))
    if profile.mask_asset is None and section.mask_asset is None:
        for key in ("mask_clear_values", "mask_invalid_bits"):
            if getattr(section, key) is not None:
                yield (
                    (key,),
                    list(getattr(section, key)),
                    detail(f"profile {section.profile!r} has no mask asset: set stac.mask_asset too"),
                )


class StacSection(Section):
    """The ``stac`` section: a sensor read from a static STAC catalog of Cloud-Optimized GeoTIFFs.

    ``stac`` is one section or a list of sections (``stac : [ { ... }, { ... } ]``), each a
    sensor of its own: Sentinel-1 + Sentinel-2, or Sentinel-1's ascending and descending passes
    kept apart (``orbit_state``). Each source's ``name`` (or its profile's key) names its
    features and its statistics and must be unique; the sources share the run's date axis as
    several sensors do (docs/sensors.md). An error in the second source is reported at
    ``stac[1].key``; ``--set stac.key=value`` reaches a single section only.

    The items of a tile are those whose ``tile_property`` matches the tile name, or, with
    ``tiles``, those whose geometry intersects the tile's footprint (read on the footprint's grid,
    every asset warped onto it); they are grouped
    by acquisition day (several items of one day are mosaicked: the first clear pixel wins, items
    in order of datetime then id), and their assets are read in place (windowed reads, local or
    ``s3://``), never downloaded whole (docs/sensors.md).
    """

    __rules__ = (
        _DATE_ORDER,
        (("catalog", "api"), _stac_source),
        (
            ("profile", "asset_keys", "assets", "db", "mask_asset", "mask_clear_values", "mask_invalid_bits"),
            _stac_profile_defaults,
        ),
    )

    catalog: (
        Annotated[
            str,
            PathOf("a local path, s3:// URI or http(s):// URL of a STAC catalog.json or collection.json", http=True),
        ]
        | None
    ) = None
    """The static STAC catalog (or collection) whose items are read; its child catalogs and
    collections are walked. One of ``catalog`` and ``api`` is required. Asset hrefs may be local
    paths, ``s3://`` URIs or http(s) URLs (read in place through GDAL's ``/vsicurl/``)."""
    api: Annotated[str, Text("the http(s):// URL of a STAC API", r"https?://\S+")] | None = None
    """The landing page of a STAC API searched for the items (pystac-client, POST ``/search``):
    by ``collections``, the dates, ``max_cloud_cover`` and, when ``tile_property`` is one property,
    the tile (Query extension, ``in`` the tile's spellings); the rest is filtered here as for a
    catalog."""
    profile: Literal[tuple(STAC_PROFILES)]  # type: ignore[valid-type]
    """The product: its band asset keys, scale and offset, mask asset and clear values
    (``sentinel-2-l2a``: Planetary Computer's asset keys ``B02`` ... ``B12`` and ``SCL``;
    ``landsat-c2-l2``: ``blue`` ... ``swir22`` and ``qa_pixel``; ``sentinel-1-rtc``: ``vv``,
    ``vh``, no mask; docs/sensors.md)."""
    asset_keys: Literal[ASSET_KEY_CONVENTIONS] = "planetary-computer"  # type: ignore[valid-type]
    """Whose asset keys the items use: ``planetary-computer`` (the profile's own) or
    ``earth-search`` (Element 84's Earth Search: ``sentinel-2-l2a`` bands ``blue`` ... ``swir22``,
    mask ``scl``, tile in ``grid:code``). ``assets`` and feature names keep the profile's band names
    either way; ``mask_asset`` and ``tile_property`` name the items' own keys."""
    name: (
        Annotated[str, Text("a lower-case name matching [a-z][a-z0-9]* (e.g. 'sentinel2l2a')", r"[a-z][a-z0-9]*")]
        | None
    ) = None
    """Sensor key used in feature names (``{name}_{band}_{YYYYMMDD}``) and statistics; None: the
    profile's (``sentinel2l2a``, ``landsatc2l2``, ``sentinel1rtc``)."""
    collections: (
        Annotated[tuple[str, ...], ListOf("collection", "a non-empty list of unique collection ids")] | None
    ) = None
    """Only the items of these collections (their ``collection`` field); None: every item."""
    assets: (
        Annotated[tuple[str, ...], ListOf("asset", "a non-empty list of unique band asset keys of the profile")] | None
    ) = None
    """The band assets read and fed to the network (put in the profile's order, named as the
    profile names them whatever ``asset_keys``); None: every band of the profile. Spectral indices
    need the assets of their bands."""
    max_cloud_cover: Annotated[float, Field(ge=0, le=100)] | None = None
    """Items whose ``eo:cloud_cover`` (percent) is above this are left out; items without the
    property are kept. None: no item is left out."""
    mask_asset: Annotated[str, Text("an asset key")] | None = None
    """The asset giving per-pixel quality (the items' key); None: the profile's (``SCL``, with
    ``earth-search`` keys ``scl``; ``qa_pixel``; none for ``sentinel-1-rtc``)."""
    mask_clear_values: (
        Annotated[tuple[int, ...], ListOf("value", "a list of unique integers", empty_ok=True)] | None
    ) = None
    """Mask values of a clear observation; None: the profile's (Sentinel-2 SCL: 2, 4, 5, 6, 7,
    11); []: any value."""
    mask_invalid_bits: (
        Annotated[
            tuple[Annotated[int, Field(ge=0, le=31)], ...],
            ListOf("bit", "a list of unique bit numbers 0..31", empty_ok=True),
        ]
        | None
    ) = None
    """Bits of the mask value that make an observation invalid when set; None: the profile's
    (Landsat QA_PIXEL: 0 fill, 1 dilated cloud, 2 cirrus, 3 cloud, 4 cloud shadow); []: none."""
    tile_property: Annotated[tuple[str, ...], ListOf("property", "a non-empty list of item property names")] | None = (
        None
    )
    """The item properties whose values, joined, name the item's tile; None: the profile's
    (``s2:mgrs_tile``, with ``earth-search`` keys ``grid:code``; ``landsat:wrs_path`` +
    ``landsat:wrs_row``; ``grid:code`` for ``sentinel-1-rtc``). Compared without case, a
    ``MGRS-`` style prefix (``grid:code``) or the leading ``T`` of a tile name (``T31TCJ`` matches
    ``31TCJ`` and ``MGRS-31TCJ``). With ``tiles``, None: no property is matched (the footprint
    alone)."""
    tiles: Annotated[dict[str, dict[str, Any]], PlainValidator(stac_tiles), AS_IS, Expect(_TILES_TEXT)] | None = None
    """Per tile of ``chain.list_tile``, its footprint: ``bbox`` (minx, miny, maxx, maxy in ``crs``),
    ``crs`` and ``resolution`` (pixel size, or [x, y], in the CRS's units), for catalogs without a
    grid code (Landsat scenes, a UTM grid of one's own, mosaics). The tile's items are those whose
    geometry intersects the footprint (an API is searched with it as ``intersects``), and the
    tile grid is the footprint's, its corners snapped to multiples of the pixel size; every asset
    not on it (another UTM zone, pixel size or origin) is warped onto it when read, bands by cubic
    convolution, masks by nearest neighbour; pixels no item covers are missing. ``tile_property``,
    when set, is matched as well; None: items are matched by ``tile_property`` alone and read on
    their own grid."""
    sign: Literal["planetary-computer"] | None = None
    """``planetary-computer``: every http(s) asset href is signed with Planetary Computer's SAS
    token of its item's collection (fetched from ``sign_url``, cached for the process, fetched
    again when it expires within 5 minutes), appended as a query string when the asset is
    requested or opened; hrefs stay unsigned in fingerprints, descriptions and messages. None:
    hrefs are read as they are (docs/sensors.md)."""
    sign_url: Annotated[str, Text("the http(s):// URL of a token endpoint", r"https?://\S+")] = PC_TOKEN_URL
    """The token endpoint of ``sign``: ``GET {sign_url}/{collection}`` answers JSON
    ``{"token": ..., "msft:expiry": ...}`` (Planetary Computer's, public)."""
    orbit_state: Literal["ascending", "descending"] | None = None
    """Only the items of this orbit direction (``sat:orbit_state``), e.g. to keep Sentinel-1's
    ascending and descending passes apart; None: every item."""
    db: bool = False
    """Backscatter profiles (``sentinel-1-rtc``): convert the linear values to decibels
    (``10 log10``; values <= 0 are then invalid). False: linear."""
    start_date: Date | None = None
    """First acquisition day used and first date of the gap-filling grid; None: the first item's."""
    end_date: Date | None = None
    """Last acquisition day used (``>= start_date``); None: the last item's."""
    temporal_resolution: PositiveInt | None = None
    """Interval in days of the gap-filling date grid; None: the profile's (10 Sentinel-2, 16
    Landsat, 12 Sentinel-1)."""

    @property
    def sensor_key(self) -> str:
        """The sensor key of this source: ``name``, else the profile's key."""
        return self.name or STAC_PROFILES[self.profile].key


StacSources = Annotated[tuple[StacSection, ...], SectionList()]
"""The ``stac`` key: one :class:`StacSection` or a list of them, held as a tuple."""


def _patterns(value: Any) -> str:
    if not isinstance(value, str):
        raise invalid()
    names = [p.strip() for p in value.split(",")]
    if not all(names) or any(any(c in p for c in "/*?[]") for p in names):
        raise invalid()
    duplicates = sorted({p for p in names if names.count(p) > 1})
    if duplicates:
        raise detail(f"pattern {duplicates[0]!r} is listed twice in {shown(value)}")
    return ",".join(names)


class UserFeatSection(Section):
    """iota2's ``userFeat`` section: which user rasters of ``chain.user_feat_path`` are features.

    Read only with ``chain.user_feat_path`` (as in iota2). For each tile and each pattern, the one
    file ``{user_feat_path}/{tile}/{arbo}{pattern}*`` (a glob: ``*`` and ``?`` do not cross a
    ``/``; ``.aux.xml`` and ``.ovr`` side files are left out) is read; none or several matches exit
    2 naming the tile, the folder and the pattern.
    """

    arbo: Annotated[str, Text("a glob of the path from the tile folder to the rasters, e.g. '/*'")] = "/*"
    """The path from a tile's folder to its rasters, as a glob put before each pattern: ``/*``
    (iota2's default) finds ``{tile}/...{pattern}...`` files right in the tile folder, ``/*/*`` one
    sub-folder deeper."""
    patterns: Annotated[
        str,
        PlainValidator(_patterns),
        Expect("names separated by commas, without '/', '*', '?', '[' or ']' (e.g. 'ALT,ASP,SLP')"),
    ] = "ALT,ASP,SLP"
    """Comma-separated names (iota2's default ``ALT,ASP,SLP``); each matches one raster per tile,
    whose bands are features named ``userfeat_{pattern}_band_{n}_{YYYYMMDD}`` (n from 0, lower case)."""

    @property
    def pattern_list(self) -> list[str]:
        """The patterns, in the order given."""
        return self.patterns.split(",")


class OpticalSensorSection(Section):
    """An iota2 sensor section (``Sentinel_2``, ``Sentinel_2_L3A``, ``Sentinel_2_S2C``,
    ``Landsat8``): which dates and bands of the products under the sensor's ``chain`` path are
    used. A section needs its ``chain`` path; a path without its section uses the defaults."""

    sensor: ClassVar[str]
    """The section's entry of :data:`sitsflow.sensors.catalogue.OPTICAL_SENSORS`."""
    __iota2__ = {
        "patterns": "a key of iota2's userFeat section",
        "arbo": "a key of iota2's userFeat section",
    }
    __ignored__ = {
        "write_reproject_resampled_input_dates_stack": (
            "whether iota2 writes the reprojected input stacks to disk; sitsflow computes the features on the fly"
        ),
    }
    __iota2_defaults__ = {
        "additional_features": Iota2Default(
            "",
            "OTB BandMath expressions computed per date and added to the sensor's features",
            "sitsflow does not evaluate BandMath expressions: use the external_features section",
        ),
    }
    __rules__ = (_DATE_ORDER,)

    start_date: Date | None = None
    """First date of the acquisitions used and of the gap-filling grid; None (or iota2's ""): the
    first acquisition."""
    end_date: Date | None = None
    """Last date (``>= start_date``) of the acquisitions used and of the gap-filling grid; None (or
    iota2's ""): the last acquisition."""
    keep_bands: Annotated[tuple[str, ...], ListOf("band", "a non-empty list of unique bands of the sensor")] | None = (
        None
    )
    """Bands fed to the network (any case), put in the sensor's order (e.g. ``["B2", "B3", "B4",
    "B8"]``); None: every band of the sensor. Spectral indices are computed from all bands either
    way."""
    temporal_resolution: PositiveInt = 10
    """Interval in days of the regular date grid the series are gap-filled onto (iota2's default:
    16 for Landsat 8, 10 for the others)."""

    @model_validator(mode="before")
    @classmethod
    def _sensor_default(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        # iota2 writes an unset date as "" (its default): the first or last acquisition
        data = {k: None if k in ("start_date", "end_date") and v == "" else v for k, v in data.items()}
        if "temporal_resolution" not in data:
            return {**data, "temporal_resolution": OPTICAL_SENSORS[cls.sensor].temporal_resolution}
        return data

    @field_validator("keep_bands")
    @classmethod
    def _bands_of_the_sensor(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is None:
            return None
        bands = OPTICAL_SENSORS[cls.sensor].bands
        text = f"a non-empty list of unique bands among {list(bands)}"
        canon = {b.upper(): b for b in bands}
        unknown = [b for b in value if b.upper() not in canon]
        if unknown:
            raise expected(f"{text}; unknown band {unknown[0]!r}")
        names = {canon[b.upper()] for b in value}
        if len(names) != len(value):
            raise expected(f"{text}; a band is listed twice")
        return tuple(b for b in bands if b in names)


class Sentinel2Section(OpticalSensorSection):
    """The ``Sentinel_2`` section (THEIA L2A products under ``chain.s2_path``)."""

    sensor = "Sentinel_2"


class Sentinel2L3ASection(OpticalSensorSection):
    """The ``Sentinel_2_L3A`` section (THEIA L3A syntheses under ``chain.s2_l3a_path``)."""

    sensor = "Sentinel_2_L3A"


class Sentinel2S2CSection(OpticalSensorSection):
    """The ``Sentinel_2_S2C`` section (Sen2Cor L2A products under ``chain.s2_s2c_path``)."""

    sensor = "Sentinel_2_S2C"


class Landsat8Section(OpticalSensorSection):
    """The ``Landsat8`` section (THEIA L2A products under ``chain.l8_path``)."""

    sensor = "Landsat8"


# --- arg_train -------------------------------------------------------------------------------
class HyperparametersSolver(Inline):
    """iota2's ``hyperparameters_solver``: the lists of batch sizes and learning rates to try; a
    missing key takes its default list."""

    batch_size: Annotated[tuple[PositiveInt, ...], ListOf()] = (1000,)
    """Batch sizes to try."""
    learning_rate: Annotated[tuple[Annotated[float, Field(gt=0)], ...], ListOf()] = (0.00001,)
    """Learning rates to try."""


@with_config(ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, use_attribute_docstrings=True))
class AdaptiveLR(TypedDict, total=False):
    """Keyword arguments of PyTorch's ``ReduceLROnPlateau``."""

    patience: Count
    """Number of epochs with no improvement after which the learning rate is reduced."""
    factor: Annotated[float, Field(gt=0, lt=1)]
    """Factor by which the learning rate is reduced: new_lr = lr * factor."""
    threshold: Annotated[float, Field(ge=0)]
    """Threshold for measuring the new optimum, to only focus on significant changes."""
    threshold_mode: Literal["rel", "abs"]
    """'rel': dynamic_threshold = best * (1 - threshold); 'abs': best - threshold."""
    cooldown: Count
    """Number of epochs to wait before resuming normal operation after the rate was reduced."""
    min_lr: Annotated[float, Field(ge=0)]
    """A lower bound on the learning rate."""
    eps: Annotated[float, Field(ge=0)]
    """Minimal decay applied to the learning rate: a smaller update is ignored."""
    verbose: bool
    """Accepted for iota2 compatibility; the learning rates are in the training history."""


_FORCED = (
    "cannot be set: mode is forced to 'min' (the validation loss is monitored) "
    "and the optimizer is the training optimizer"
)
AdaptiveLR.__refused__ = {"mode": _FORCED, "optimizer": _FORCED}  # type: ignore[attr-defined]


def _network(dl: DeepLearningParameters) -> Iterator[tuple[tuple[str, ...], Any, Any]]:
    name = dl.dl_name
    if dl.dl_module is None and name not in BUILTIN_NETWORKS:
        close = suggest(name, BUILTIN_NETWORKS)
        yield (
            ("dl_name",),
            name,
            expected(
                "one of "
                + ", ".join(repr(n) for n in BUILTIN_NETWORKS)
                + (f" (did you mean {close!r}?)" if close else "")
                + ", or a class of the module given by dl_module"
            ),
        )
    elif dl.dl_module is not None and not name.isidentifier():
        yield ("dl_name",), name, expected("the class name (a Python identifier) of a network in dl_module")


class DeepLearningParameters(Section):
    """``arg_train.deep_learning_parameters``: the 17 parameters of iota2's deep-learning mode,
    with its defaults and meanings."""

    __rules__ = ((("dl_name", "dl_module"), _network),)

    dl_name: Annotated[str, Text("the class name of a network (e.g. 'LTAEClassifier')")]
    """Available neural network's architecture (class name), currently 'LTAEClassifier', 'ANN',
    'MLPClassifier' or 'SimpleSelfAttentionClassifier' (iota2's), 'TempCNN' or 'InceptionTime'
    (sitsflow's, see docs/networks.md); with ``dl_module``, any class name (a Python identifier)
    of that module."""
    dl_parameters: Annotated[
        dict[str, Any], JsonDict("a dict of constructor arguments, e.g. {'d_model': 64}", "dl_parameters")
    ] = Field(default_factory=dict)
    """Set of key/value to create the neural network instance (constructor parameters; see
    docs/networks.md)."""
    model_selection_criterion: Criterion = "loss"
    """Select the model which maximizes one of these metrics computed on the validation set during
    the training process: "loss", "fscore", "oa", "kappa" (for "loss": the lowest loss). It decides
    both the epoch each candidate keeps and the winner among the hyperparameter pairs."""
    epochs: PositiveInt = 100
    """Number of epochs for the learning stage."""
    weighted_labels: bool = False
    """Apply weights to samples according to the proportion of each class in the computation of the
    loss function (weight of a class = 1 / its proportion in the learning + validation database)."""
    num_workers: Count = 1
    """How many sub-processes to use for data loading. 0 means that the data will be loaded in the
    main process."""
    hyperparameters_solver: HyperparametersSolver = Field(default_factory=HyperparametersSolver)
    """Key/value of hyperparameters to use to build models: one model per
    (batch_size, learning_rate) pair of the product of the two lists."""
    dl_module: PyFile | None = None
    """Path to a user python module containing custom neural networks (classes derived from
    Iota2NeuralNetwork); iota2's imports of it (``from iota2.learning.pytorch.torch_nn_bank import
    Iota2NeuralNetwork``, ``from torch_nn_bank import ...``) work unchanged (docs/networks.md)."""
    restart_from_checkpoint: bool = True
    """If existing, restart learning from the checkpoint (saved after each epoch). It is continued
    across more epochs and other num_workers, dataloader_mode or early-stop settings; another
    network, dl_parameters, sample database, batch size, learning rate, weighted_labels or
    adaptive_lr (or other code) restarts from epoch 1, the log saying why (docs/training.md)."""
    dataloader_mode: Literal["stream", "full"] = "stream"
    """During the learning stage, load the full data-set into memory ('full') or by batch
    ('stream')."""
    enable_early_stop: bool = False
    """Flag to enable early stop during learning phase."""
    epoch_to_trigger: PositiveInt = 5
    """Epoch number after which the monitoring of the metric trend starts."""
    early_stop_patience: PositiveInt = 10
    """Number of epochs without improvement after which training will be stopped."""
    early_stop_tol: Annotated[float, Field(ge=0)] = 0.01
    """Minimum change in the monitored quantity to qualify as an improvement. If the metric is
    'train_loss' or 'val_loss' the tolerance is in dB: dB = log10(loss_{N-1} / loss_N), with N the
    current epoch (the previous epoch, not the best so far); for scores: value_N - value_{N-1}.
    This "dB" is the reference's (no factor 10); the loss plots use 10 log10(loss), on which a
    tolerance t is a drop of 10 t between two epochs."""
    early_stop_metric: Annotated[
        EarlyStopMetric, BeforeValidator(lambda v: METRIC_ALIASES.get(v, v) if isinstance(v, str) else v)
    ] = "val_loss"
    """Metric to monitor for early stopping (iota2's 'valid_loss' is read as 'val_loss')."""
    additional_statistics_percentage: Annotated[float, Field(gt=0, le=1)] | None = None
    """Percentage ]0;1] of samples to use from the incoming database to compute quantiles
    (quantile_0.1, quantile_0.5, quantile_0.95); None: no quantiles."""
    adaptive_lr: AdaptiveLR = Field(default_factory=lambda: AdaptiveLR())
    """Allow the use of adaptive learning rate across epochs: keyword arguments of PyTorch's
    ReduceLROnPlateau, which monitors the validation loss (mode 'min') with the training
    optimizer. {}: disabled."""

    def hyperparameter_pairs(self) -> list[tuple[int, float]]:
        """The (batch_size, learning_rate) pairs to train, in hyperparameter-number order.

        ``itertools.product(batch_size, learning_rate)``: the batch size varies slowest, so the
        index of a pair in this list is the ``hyp`` number of its model
        (``model_{region}_seed_{seed}_hyp_{hyp}.txt``). With ``batch_size: [1000]`` and
        ``learning_rate: [0.1, 0.00001]``, hyp 0 is (1000, 0.1) and hyp 1 is (1000, 0.00001).
        """
        solver = self.hyperparameters_solver
        return list(itertools.product(solver.batch_size, solver.learning_rate))


class TrainingOptions(Section):
    """``arg_train.training_options``: sitsflow's training options for rare classes and small data,
    outside iota2's deep-learning parameters (whose keys and defaults are unchanged).

    The defaults change nothing: a configuration without this section trains as iota2 does. Each
    option is described in docs/training.md; every value set here is part of the training
    fingerprint, so changing one retrains."""

    label_smoothing: Annotated[float, Field(ge=0, lt=1)] = 0.0
    """Label smoothing epsilon of the training loss (as PyTorch's ``cross_entropy(label_smoothing)``:
    the target is (1 - epsilon) on the true class plus epsilon / nb_classes on every class; with
    ``weighted_labels`` each sample's whole loss is weighted by its class's weight). The
    validation loss stays the plain cross-entropy."""
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    """Decoupled weight decay (the optimizer becomes AdamW with this decay; 0: iota2's Adam)."""
    lr_schedule: Literal["constant", "cosine", "one_cycle"] = "constant"
    """Learning rate per step, the candidate's learning rate being the peak: 'constant' (iota2's,
    after the warm-up if any); 'cosine': linear warm-up from 0 over ``warmup_epochs``, then cosine
    decay to 0 at the last step of ``epochs``; 'one_cycle': Smith's one-cycle as PyTorch's
    OneCycleLR (cosine rise from lr / 25 to lr over ``warmup_epochs``, cosine fall to
    lr / 250000; momentum not cycled). Not with ``adaptive_lr``."""
    warmup_epochs: Annotated[float, Field(ge=0)] = 0.0
    """Length of the warm-up, in epochs (fractions allowed); below ``epochs``; 'one_cycle' needs
    more than 0."""
    date_dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    """Augmentation: probability that a date of a training series is marked missing (all its
    components NaN; the network imputes it as any missing value)."""
    time_shift: Annotated[int, Field(ge=0)] = 0
    """Augmentation: each training series is shifted by a whole number of dates drawn uniformly in
    [-time_shift, time_shift]; the dates shifted in are missing."""
    gaussian_noise: Annotated[float, Field(ge=0)] = 0.0
    """Augmentation: Gaussian noise added to every training value, its standard deviation this
    factor times the feature's standard deviation in the training statistics."""
    gradient_clip: Annotated[float, Field(ge=0)] = 0.0
    """Largest L2 norm of the gradient of all parameters together: a larger one is scaled down
    to it before each optimizer step (PyTorch's ``clip_grad_norm_``); 0: no clipping."""
    balanced_sampling: bool = False
    """Class-balanced sampling: every class is drawn equally often ('full' mode: each epoch draws
    as many samples as the learning set holds, with replacement, with probability 1 / count of
    its class; 'stream' mode: each batch is redrawn from itself with those weights). Not with
    ``weighted_labels``."""


def _training_options(section: ArgTrainSection) -> Iterator[tuple[tuple[str, ...], Any, Any]]:
    """The training options against iota2's deep-learning parameters."""
    dl, opts = section.deep_learning_parameters, section.training_options
    if opts.lr_schedule != "constant" or opts.warmup_epochs > 0:
        if dl.adaptive_lr:
            yield (
                ("training_options", "lr_schedule"),
                opts.lr_schedule,
                detail(
                    "a learning-rate schedule or warm-up cannot be combined with "
                    "deep_learning_parameters.adaptive_lr (both set the learning rate): remove one"
                ),
            )
    if opts.warmup_epochs >= dl.epochs:
        yield (
            ("training_options", "warmup_epochs"),
            opts.warmup_epochs,
            expected(f"fewer epochs than deep_learning_parameters.epochs = {dl.epochs}"),
        )
    if opts.lr_schedule == "one_cycle" and opts.warmup_epochs <= 0:
        yield (
            ("training_options", "warmup_epochs"),
            opts.warmup_epochs,
            expected("a number > 0 with lr_schedule 'one_cycle' (the rising phase, e.g. 0.3 x epochs)"),
        )
    if opts.balanced_sampling and dl.weighted_labels:
        yield (
            ("training_options", "balanced_sampling"),
            True,
            detail(
                "balanced_sampling and deep_learning_parameters.weighted_labels both correct for the "
                "class proportions; together they over-correct: set one of them"
            ),
        )


def _index_name(value: Any) -> Any:
    canon = {name.lower(): name for name in SPECTRAL_INDICES}
    return canon.get(value.lower(), value) if isinstance(value, str) else value


class ArgTrainSection(Section):
    """The ``arg_train`` section: sample split and training."""

    __rules__ = ((("deep_learning_parameters", "training_options"), _training_options),)

    __iota2__ = {"learning_samples_extension": ""}
    __ignored__ = {
        **dict.fromkeys(
            ("classifier", "otb_classifier_options"),
            "deep_learning_parameters.dl_name selects the deep-learning workflow, as in iota2, which does not use it",
        ),
        **dict.fromkeys(
            "prev_features output_prev_features annual_crop a_crop_label_replacement samples_classif_mix "
            "annual_classes_extraction_source".split(),
            "iota2 reads it only with crop_mix : True, which sitsflow refuses",
        ),
        "autocontext_iterations": "iota2 reads it only with enable_autocontext : True, which sitsflow refuses",
        "force_standard_labels": (
            "it names the features of iota2's sample databases (value_0, value_1, ...); sitsflow names them "
            "{sensor}_{band}_{date}, which the maps do not depend on"
        ),
        "mode_outside_regionsplit": (
            "iota2 reads it only with arg_classification.classif_mode : 'fusion' (iota2's documentation of "
            "mode_outside_RegionSplit), which sitsflow refuses"
        ),
    }
    __iota2_defaults__ = {
        "sample_augmentation": Iota2Default(
            {"activate": False},
            "synthetic samples added to the learning databases (replication, jitter, SMOTE)",
            "sitsflow does not augment the sample databases (arg_train.training_options has augmentations "
            "applied during training); with activate : False the other keys are accepted (iota2 ignores them)",
            switch="activate",
        ),
        "sample_management": Iota2Default(
            None,
            "a CSV file copying samples of a class from one region's database to another's",
            "sitsflow's databases hold the samples of their region only",
        ),
        **{
            key: Iota2Default(
                False,
                "crop mix: samples of annual crops taken from a previous classification",
                "sitsflow samples the reference polygons only",
            )
            for key in ("crop_mix", "cropMix")
        },
        "validity_threshold": Iota2Default(
            1,
            "a reference pixel is sampled only where it has at least this many clear acquisitions",
            "sitsflow samples every labelled pixel",
        ),
        "enable_autocontext": Iota2Default(
            False,
            "iota2's auto-context (iterated classifications with superpixel features), scikit-learn models only",
            "sitsflow classifies each pixel once, as iota2 does without auto-context",
        ),
        "sampling_validation": Iota2Default(
            False,
            "iota2 also samples the validation polygons to compute a sample-based validation",
            "sitsflow validates the final maps on the test polygons' pixels",
        ),
        "dempster_shafer_sm": Iota2Default(
            False,
            "Dempster-Shafer fusion of SAR and optical classifications",
            "sitsflow does not read SAR data",
        ),
    }

    runs: PositiveInt = 1
    """Number of random learning/test splits (seeds); each gives a full classification."""
    ratio: Annotated[float, Field(gt=0, lt=1)] = 0.5
    """Fraction of the reference polygons of each (region, class) used for learning + validation
    (L+V); the rest is the test set. Inside training, 80 % of L+V trains and 20 % validates,
    polygon-wise."""
    random_seed: Count = 0
    """Seed of the first split; run ``r`` uses ``random_seed + r``."""
    split_ground_truth: bool = True
    """True: the polygons are split into L+V and the test set by ``ratio``; False: every polygon
    is used for both (L+V and test set hold all of them, ``ratio`` is not used), as in iota2: the
    accuracy is then measured on the polygons the model learnt from, and is optimistic."""
    sample_selection: Annotated[
        dict[str, Any],
        PlainValidator(selection.check),
        AS_IS,
        PathsIn(selection.resolve_paths),
        Expect(selection.SELECTION_TEXT),
    ] = Field(default_factory=lambda: dict(selection.DEFAULT))
    """iota2's per-class sample selection (OTB's SampleSelection) in the L+V pixels of each
    (region, seed): the ``strategy`` sets how many pixels of each class are kept ('all', 'percent'
    with ``strategy.percent.p``, 'constant' with ``strategy.constant.nb`` per class, 'total' with
    ``strategy.total.v`` shared in proportion to the classes, 'smallest': as many as the smallest
    class, 'byclass' with a ``strategy.byclass.in`` file of ``class count`` lines), the
    ``sampler`` which ones ('periodic': evenly spaced along the polygons, 'random': drawn with the
    run's seed); ``per_model`` gives a region its own rule. OTB's defaults for a key left out
    (sampler 'periodic', strategy 'smallest'). The 20 % validation part inside training comes
    from the selected pixels; the test set keeps every pixel (docs/configuration.md)."""
    features_from_raw_dates: bool = False
    """Feed the networks the raw acquisition dates instead of the gap-filled regular date grid."""
    features: Annotated[
        tuple[Annotated[Literal[SPECTRAL_INDICES], BeforeValidator(_index_name)], ...],  # type: ignore[valid-type]
        ListOf("name", empty_ok=True),
    ] = SPECTRAL_INDICES
    """Spectral indices computed per date for the optical sensors (Sentinel-2, Landsat 8) after
    their bands (any case); [] turns them off. Not applied to dated_raster."""
    deep_learning_parameters: DeepLearningParameters
    """The deep-learning parameters (a section)."""
    training_options: TrainingOptions = Field(default_factory=TrainingOptions)
    """sitsflow's training options for rare classes and small data (a section, not iota2's)."""


# --- classification --------------------------------------------------------------------------
def _final_probability(section: ArgClassificationSection) -> Iterator[tuple[tuple[str, ...], Any, Any]]:
    if section.generate_final_probability_map and not section.enable_probability_map:
        yield (
            ("generate_final_probability_map",),
            True,
            detail(
                "True requires arg_classification.enable_probability_map : True "
                "(the final probability map is merged from the per-chunk probability maps)"
            ),
        )


def _merge_method(section: ArgClassificationSection) -> Iterator[tuple[tuple[str, ...], Any, Any]]:
    if section.merge_final_classifications_method == "dempstershafer":
        yield (
            ("merge_final_classifications_method",),
            "dempstershafer",
            detail(
                "'dempstershafer' is not implemented (OTB's Dempster-Shafer fusion weighs each run by a mass of "
                "belief from its confusion matrix, which sitsflow does not reproduce): use 'majorityvoting'"
            ),
        )


_FUSION_ONLY = "iota2 reads it only with classif_mode : 'fusion', which sitsflow refuses"


class ArgClassificationSection(Section):
    """The ``arg_classification`` section."""

    __ignored__ = {
        "fusion_options": _FUSION_ONLY,
        "no_label_management": _FUSION_ONLY,
        "dempstershafer_mob": "iota2 reads it only with merge_final_classifications_method : 'dempstershafer', "
        "which sitsflow refuses",
    }
    __iota2_defaults__ = {
        "classif_mode": Iota2Default(
            "separate",
            "'separate': each region's model classifies its region; 'fusion': a region larger than "
            "chain.mode_outside_regionsplit gets several models, trained on random parts of it, whose maps "
            "are fused (fusion_options, no_label_management)",
            "sitsflow trains one model per region and classifies the region with it, iota2's 'separate'; "
            "'fusion' would need regions split into sub-models, which sitsflow does not do",
        ),
        "enable_boundary_fusion": Iota2Default(
            False,
            "the maps of neighbouring regions are blended near the regions' boundaries",
            "sitsflow classifies each region's pixels with its own model only, as iota2 does by default",
        ),
    }
    __rules__ = (
        (("enable_probability_map", "generate_final_probability_map"), _final_probability),
        (("merge_final_classifications_method",), _merge_method),
    )

    enable_probability_map: bool = False
    """Write a probability raster per chunk and tile (one band per class)."""
    generate_final_probability_map: bool = False
    """Merge the probability rasters into ``final/ProbabilityMap_seed_{s}.tif`` (0-1000); requires
    ``enable_probability_map``."""
    merge_final_classifications: bool = False
    """With ``arg_train.runs`` > 1, also fuse the runs' maps into ``final/Classifications_fusion.tif``
    (majority vote per pixel) and validate it: iota2's merge of the final classifications."""
    merge_final_classifications_method: Literal["majorityvoting", "dempstershafer"] = "majorityvoting"
    """Fusion method: 'majorityvoting' (the label most runs give; a tie gives the undecided label).
    iota2's 'dempstershafer' is refused (not implemented)."""
    merge_final_classifications_undecidedlabel: Annotated[int, Field(ge=1, le=65535)] = 255
    """Label of the fused pixels whose vote is tied; these pixels are left out of the fused map's
    confusion matrix, as iota2 does."""
    merge_final_classifications_ratio: Annotated[float, Field(gt=0, lt=1)] = 0.1
    """Fraction of the reference polygons of each (region, class) held out of every run's learning
    and test sets, on which the fused map is validated (none with
    ``fusionofclassification_all_samples_validation``)."""
    fusionofclassification_all_samples_validation: bool = False
    """True: no polygon is held out; the fused map is validated on the union of the runs' test
    sets (which holds polygons some runs learnt from, so it is optimistic), as in iota2."""
    keep_runs_results: bool = True
    """With the merge, ``final/RESULTS.txt`` is the fused map's report; True keeps the runs' report
    as ``final/RESULTS_seeds.txt`` (and ``.json``), False drops it. The runs' maps are kept either
    way, as in iota2."""


class SensorsDataInterpolationSection(Section):
    """The ``sensors_data_interpolation`` section: iota2's switch between gap-filled and raw series.

    ``use_gapfilling`` is ``arg_train.features_from_raw_dates`` negated: either key sets both (they
    must agree when both are given)."""

    __ignored__ = {
        "write_outputs": "whether iota2 writes the gap-filled stacks to disk; sitsflow computes them on the fly",
        "workingDirectory": "iota2's scratch folder; sitsflow's pods use their own",
    }
    __iota2_defaults__ = {
        "auto_date": Iota2Default(
            True,
            "True: the date grid of each sensor spans the acquisitions of all the tiles; False: it spans the "
            "sensor section's start_date to end_date",
            "sitsflow's grid spans the section's start_date and end_date when given, else the tile's own "
            "acquisitions (tiles whose grids then differ are refused at sampling: set start_date and end_date)",
        ),
    }

    use_gapfilling: bool = True
    """True: the series are gap-filled onto each sensor's regular date grid (linear interpolation of
    the masked acquisitions); False: the raw acquisition dates are used, as
    ``arg_train.features_from_raw_dates : True``."""


class PythonDataManagingSection(Section):
    """The ``python_data_managing`` section: how tiles are cut into chunks for inference."""

    __iota2_defaults__ = {
        "data_mode_access": Iota2Default(
            "gapfilled",
            "which series the external_features functions can read: 'gapfilled', 'raw' or 'both'",
            "sitsflow's functions read the gap-filled series (get_interpolated_*), or the raw ones (get_raw_*) "
            "with arg_train.features_from_raw_dates : True, never both",
        ),
        "fill_missing_dates": Iota2Default(
            False,
            "with raw data access, the dates missing from a tile are added as no-data so that every tile has "
            "the same dates",
            "sitsflow does not add dates to the raw series of a tile",
        ),
    }
    __ignored__ = dict.fromkeys(
        ("padding_size_x", "padding_size_y"),
        "the networks are pixel-wise (no neighbour is read), so a chunk's padding changes nothing in the maps",
    )

    chunk_size_mode: Literal["split_number", "user_fixed"] = "split_number"
    """'split_number': ``number_of_chunks`` full-width horizontal strips; 'user_fixed': a grid of
    ``chunk_size_x`` x ``chunk_size_y`` pixel blocks."""
    number_of_chunks: PositiveInt = 50
    """Number of strips per tile in 'split_number' mode."""
    chunk_size_x: PositiveInt = 50
    """Block width in pixels in 'user_fixed' mode."""
    chunk_size_y: PositiveInt = 50
    """Block height in pixels in 'user_fixed' mode."""


_FUNCTIONS_TEXT = (
    "a non-empty list of function names (or one space-separated string); an entry may be [name, {keyword: value}]"
)


def _functions(value: Any) -> tuple[tuple[str, dict[str, Any]], ...]:
    entries = value.split() if isinstance(value, str) else value
    if not isinstance(entries, list) or not entries:
        raise invalid()
    out: list[tuple[str, dict[str, Any]]] = []
    for entry in entries:
        if isinstance(entry, str):
            name, kwargs = entry, {}
        elif (
            isinstance(entry, list | tuple)
            and len(entry) == 2
            and isinstance(entry[0], str)
            and isinstance(entry[1], dict)
        ):
            name, kwargs = entry[0], json_value(entry[1], "functions")
        else:
            raise invalid(f"bad entry {shown(entry)}")
        if not name.isidentifier():
            raise invalid(f"{name!r} is not a Python function name")
        out.append((name, kwargs))
    return tuple(out)


class ExternalFeaturesSection(Section):
    """The optional ``external_features`` section: user functions adding per-date features."""

    __ignored__ = {
        "output_name": "the name of the file iota2 writes its features to; sitsflow computes them on the fly",
    }
    __iota2_defaults__ = {
        "exogeneous_data": Iota2Default(
            None,
            "a raster (may contain $TILE) iota2 reprojects onto each tile and passes to the functions",
            "sitsflow does not pass exogenous rasters to the functions",
        ),
    }

    module: PyFile
    """Path of the user's Python module (.py) defining the functions."""
    functions: Annotated[
        tuple[tuple[str, dict[str, Any]], ...], PlainValidator(_functions), AS_IS, Expect(_FUNCTIONS_TEXT)
    ]
    """The functions to call, in order, each stored as (name, keyword arguments)."""
    concat_mode: bool = True
    """True: the new features are appended to the sensor's bands; False: they replace them."""
    no_data_value: float | None = None
    """iota2's no-data value of the external features: a value a function returns where its
    feature is not defined. Such values are missing (NaN, as a masked acquisition), which the
    networks impute, instead of entering the statistics and the networks as numbers; None: no
    value is special."""


def _write_section(lines: list[str], name: str, values: dict[str, Any], depth: int) -> None:
    pad = "    " * depth
    lines.append(f"{pad}{format_key(name)} : {{")
    for key, value in values.items():
        if isinstance(value, dict) and key in _NESTED_SECTIONS:
            _write_section(lines, key, value, depth + 1)
        else:
            lines.append(f"{pad}    {format_key(key)} : {format_value(value)}")
    lines.append(f"{pad}}}")


def _write_section_list(lines: list[str], name: str, sections: list[dict[str, Any]]) -> None:
    """``name : [ { ... }, { ... } ]``, one key a line."""
    lines.append(f"{format_key(name)} : [")
    for i, values in enumerate(sections):
        lines.append("    {")
        lines += [f"        {format_key(key)} : {format_value(value)}" for key, value in values.items()]
        lines.append("    }" + ("," if i < len(sections) - 1 else ""))
    lines.append("]")


_NESTED_SECTIONS = {"deep_learning_parameters", "training_options"}
"""Sub-sections written as sections (``name : { ... }``) by ``to_cfg``; other dicts are inline."""


_OPTICAL_SECTIONS = tuple(OPTICAL_SENSORS)


def _sensors(cfg: SitsflowConfig) -> Iterator[tuple[tuple[str, ...], Any, Any]]:
    """An iota2 sensor section needs its chain path; at least one sensor is needed."""
    for name, sensor in OPTICAL_SENSORS.items():
        if getattr(cfg, name) is not None and getattr(cfg.chain, sensor.chain_key) is None:
            yield (
                (name,),
                None,
                detail(
                    f"the {name} section describes a sensor whose products are not given: "
                    f"set chain.{sensor.chain_key} (the folder of its products) or remove the section"
                ),
            )
    if cfg.dated_raster is None and not cfg.stac and all(getattr(cfg, n) is None for n in _OPTICAL_SECTIONS):
        keys = ", ".join(f"chain.{s.chain_key}" for s in OPTICAL_SENSORS.values())
        yield (
            (),
            None,
            detail(
                f"no sensor: set {keys} (with optional {' / '.join(_OPTICAL_SECTIONS)} sections), "
                "or add a dated_raster or stac section (chain.user_feat_path only adds static features "
                "to a dated sensor)"
            ),
        )


def _stac_names(cfg: SitsflowConfig) -> Iterator[tuple[tuple[Any, ...], Any, Any]]:
    """The STAC sources' sensor keys are unique (they name the features and statistics)."""
    first: dict[str, int] = {}
    for i, source in enumerate(cfg.stac):
        key = source.sensor_key
        if key in first:
            given = "name" if source.name else "profile"
            yield (
                ("stac", i, given),
                getattr(source, given),
                detail(
                    f"the sensor name {key!r} of stac[{i}] is already that of stac[{first[key]}]: each STAC "
                    "source names its features and statistics, give each a distinct stac name"
                ),
            )
        else:
            first[key] = i


def _merge_runs(cfg: SitsflowConfig) -> Iterator[tuple[tuple[str, ...], Any, Any]]:
    """The merge of the final classifications fuses several runs."""
    if cfg.arg_classification.merge_final_classifications and cfg.arg_train.runs < 2:
        yield (
            ("arg_classification", "merge_final_classifications"),
            True,
            detail("True fuses the maps of several runs: set arg_train.runs to 2 or more, or remove the key"),
        )


def _gapfilling(data: dict[str, Any]) -> dict[str, Any]:
    """``sensors_data_interpolation.use_gapfilling`` and ``arg_train.features_from_raw_dates`` set
    each other (one is the other negated); both given and in disagreement is an error."""
    section, train = data.get("sensors_data_interpolation"), data.get("arg_train")
    if not isinstance(train, dict):
        return data
    gapfilling = section.get("use_gapfilling") if isinstance(section, dict) else None
    raw = train.get("features_from_raw_dates")
    if isinstance(gapfilling, bool) and isinstance(raw, bool) and gapfilling == raw:
        raise detail(
            f"sensors_data_interpolation.use_gapfilling : {gapfilling} and arg_train.features_from_raw_dates : "
            f"{raw} contradict each other (one is the other negated): remove one"
        )
    if isinstance(gapfilling, bool) and raw is None:
        train = {**train, "features_from_raw_dates": not gapfilling}
    elif isinstance(raw, bool) and gapfilling is None:
        section = {**(section if isinstance(section, dict) else {}), "use_gapfilling": not raw}
    else:
        return data
    return {**data, "arg_train": train, "sensors_data_interpolation": section}


def _tile_placeholder(cfg: SitsflowConfig) -> Iterator[tuple[tuple[str, ...], Any, Any]]:
    """Several tiles cannot read the same raster."""
    tiles = cfg.chain.tiles
    raster = cfg.dated_raster
    if len(tiles) > 1 and raster is not None:
        for key in ("path", "mask_path"):
            pattern = getattr(raster, key)
            if pattern is not None and "{tile}" not in pattern:
                yield (
                    ("dated_raster", key),
                    pattern,
                    detail(
                        f"{len(tiles)} tiles are listed in chain.list_tile but {pattern!r} has no "
                        "{tile} placeholder: every tile would read the same file"
                    ),
                )


class SitsflowConfig(Section):
    """The whole validated configuration.

    Two configurations are equal when all their settings are equal, wherever they were read from
    (``source`` is not compared).
    """

    __iota2__ = dict.fromkeys(("coregistration", "multi_run_fusion", "sar"), "")
    __ignored__ = {
        **{
            section: f"iota2 reads it only with chain.{key}, which sitsflow refuses ({_SENSOR_HINT})"
            for key, (section, _) in _UNSUPPORTED_SENSORS.items()
        },
        "task_retry_limits": "retries are Argo's: the WorkflowTemplate's retryStrategy (docs/deploy.md)",
        "slurm": "iota2's scheduler settings; sitsflow's steps are Argo's pods (resources, docs/deploy.md)",
        "scikit_models_parameters": "iota2 reads it only with a scikit-learn classifier; sitsflow trains "
        "deep-learning models (deep_learning_parameters)",
        "obia": "iota2 reads it only with the i2_obia builder, which sitsflow refuses",
    }
    __iota2_defaults__ = {
        "builders": Iota2Default(
            {"builders_class_name": ["i2_classification"], "builders_paths": None},
            "the workflows iota2 runs: i2_classification (pixel classification), i2_obia, i2_vectorization, "
            "i2_features_map, ...",
            "sitsflow runs the deep-learning pixel classification, iota2's i2_classification, only",
        ),
    }
    __rules__ = (
        (("chain", "dated_raster", "stac", *_OPTICAL_SECTIONS), _sensors),
        (("chain", "dated_raster"), _tile_placeholder),
        (("stac",), _stac_names),
        (("arg_train", "arg_classification"), _merge_runs),
    )

    source: str
    """Where the configuration was read (absolute local path or ``s3://`` URI)."""
    chain: ChainSection
    """The ``chain`` section."""
    dated_raster: DatedRasterSection | None = None
    """The ``dated_raster`` section (the generic dated-raster sensor), None when absent."""
    stac: StacSources = ()
    """The ``stac`` sources (sensors read from STAC catalogs), one per section given; empty when
    absent."""
    Sentinel_2: Sentinel2Section | None = None
    """The ``Sentinel_2`` section (THEIA L2A); defaults apply when ``chain.s2_path`` is set
    without it; None when the sensor is not used."""
    Sentinel_2_L3A: Sentinel2L3ASection | None = None
    """The ``Sentinel_2_L3A`` section (THEIA L3A syntheses), as ``Sentinel_2``."""
    Sentinel_2_S2C: Sentinel2S2CSection | None = None
    """The ``Sentinel_2_S2C`` section (Sen2Cor L2A), as ``Sentinel_2``."""
    Landsat8: Landsat8Section | None = None
    """The ``Landsat8`` section (THEIA L2A), as ``Sentinel_2``."""
    userFeat: UserFeatSection | None = None
    """The ``userFeat`` section (user rasters as features); its defaults apply when
    ``chain.user_feat_path`` is set without it."""
    arg_train: ArgTrainSection
    """The ``arg_train`` section, ``deep_learning_parameters`` included."""
    arg_classification: ArgClassificationSection = Field(default_factory=ArgClassificationSection)
    """The ``arg_classification`` section."""
    python_data_managing: PythonDataManagingSection = Field(default_factory=PythonDataManagingSection)
    """The ``python_data_managing`` section."""
    sensors_data_interpolation: SensorsDataInterpolationSection = Field(default_factory=SensorsDataInterpolationSection)
    """The ``sensors_data_interpolation`` section."""
    external_features: ExternalFeaturesSection | None = None
    """The ``external_features`` section, None when absent."""
    resources: ResourcesSection = Field(default_factory=ResourcesSection)
    """iota2's per-step resource blocks (``sitsflow.config.resources``): the pods' requests."""

    @model_validator(mode="before")
    @classmethod
    def _sensor_sections(cls, data: Any) -> Any:
        """A sensor whose chain path is set gets its section (with its defaults) when absent."""
        chain = data.get("chain") if isinstance(data, dict) else None
        if not isinstance(chain, dict):
            return data
        absent = [
            name
            for name, sensor in OPTICAL_SENSORS.items()
            if chain.get(sensor.chain_key) is not None and data.get(name) is None
        ]
        if chain.get("user_feat_path") not in (None, "", "None") and data.get("userFeat") is None:
            absent.append("userFeat")
        return {**data, **dict.fromkeys(absent, {})} if absent else data

    @model_validator(mode="before")
    @classmethod
    def _use_gapfilling(cls, data: Any) -> Any:
        """iota2's ``use_gapfilling`` and sitsflow's ``features_from_raw_dates`` agree."""
        return _gapfilling(data) if isinstance(data, dict) else data

    @model_validator(mode="before")
    @classmethod
    def _iota2_resource_blocks(cls, data: Any) -> Any:
        """iota2's resource blocks at the top level (``training : {...}``) go to ``resources``."""
        if not isinstance(data, dict) or not any(k in IOTA2_STEPS for k in data):
            return data
        resources = data.get("resources", {})
        if not isinstance(resources, dict):
            return data
        steps = {k: v for k, v in data.items() if k in IOTA2_STEPS}
        twice = sorted(set(steps) & set(resources))
        if twice:
            raise detail(f"the iota2 resource block {twice[0]} is given twice, at the top level and in resources")
        rest = {k: v for k, v in data.items() if k not in IOTA2_STEPS}
        return {**rest, "resources": {**resources, **steps}}

    @property
    def dl(self) -> DeepLearningParameters:
        """Shortcut for ``arg_train.deep_learning_parameters``."""
        return self.arg_train.deep_learning_parameters

    def section_dict(self, name: str) -> Any:
        """A JSON-able dict of one section (``"chain"``, ``"arg_train"``, ...), for fingerprints.

        ``"arg_train.deep_learning_parameters"`` (or ``"deep_learning_parameters"``) gives the
        deep-learning parameters alone. An absent ``external_features`` section gives ``{}``; a
        list of sections (``stac``) gives a list of dicts.
        """
        if name in ("deep_learning_parameters", "arg_train.deep_learning_parameters"):
            return self.dl.model_dump(mode="json")
        if name not in SECTION_MODELS:
            raise KeyError(f"no configuration section {name!r}; sections: {', '.join(SECTION_MODELS)}")
        section = getattr(self, name)
        if isinstance(section, tuple):
            return [s.model_dump(mode="json") for s in section]
        return {} if section is None else section.model_dump(mode="json")

    def to_cfg(self) -> str:
        """The full resolved configuration (defaults included) in iota2's cfg syntax.

        :func:`sitsflow.config.load_config` of this text gives an equal configuration.
        """
        lines = [f"# sitsflow resolved configuration, read from {self.source}"]
        for name in SECTION_MODELS:
            section = getattr(self, name)
            if section is None or section == ():
                continue
            if isinstance(section, tuple) and len(section) == 1:  # one section of a list: as a section
                _write_section(lines, name, section[0].model_dump(mode="json"), 0)
            elif isinstance(section, tuple):
                _write_section_list(lines, name, [s.model_dump(mode="json") for s in section])
            else:
                _write_section(lines, name, section.model_dump(mode="json"), 0)
        return "\n".join(lines) + "\n"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SitsflowConfig):
            return NotImplemented
        return all(getattr(self, n) == getattr(other, n) for n in SECTION_MODELS)

    def __hash__(self) -> int:
        return hash(self.to_cfg().split("\n", 1)[1])


SECTION_MODELS: dict[str, type[Inline]] = {
    name: typing.cast(type[Inline], section_model(field_type(info)))
    for name, info in SitsflowConfig.model_fields.items()
    if name != "source"
}
"""Top-level sections and their models (that of one item of a list of sections), in the order
they are written."""
