"""The ``stac`` sensor: items of a static STAC catalog or of a STAC API, read in place.

A static catalog (``catalog.json`` or ``collection.json``, local, ``s3://`` or an http(s) URL) is
read by pystac through :mod:`sitsflow.storage` (:class:`StorageStacIO`); a STAC API is searched
by pystac-client (:func:`search_api`). The items of a tile are those whose tile properties
(``stac.tile_property``) name the tile; they are filtered by collection, acquisition day and
``eo:cloud_cover``, and grouped by acquisition day (UTC date of the item's datetime).

Reading a window of the tile grid reads, for each item of each day, the window of each band
asset and of the mask asset (windowed reads through :func:`read_on_grid`, under the storage
contract of :func:`storage.raster_call`; local, ``s3://`` or http(s) COGs, through GDAL's
``/vsis3/`` and ``/vsicurl/``; ``stac.asset_keys`` says whose asset names the items use).
Several items of one day are **mosaicked: the first clear pixel wins**, items in order of
datetime, then id. A pixel is clear when it lies on the asset's footprint, no band is the
profile's nodata, its mask value (when the profile or ``stac.mask_asset`` names a mask) is among
the clear values (when any is given) and has none of the invalid bits set.

With ``stac.tiles``, the items of a tile are instead those whose geometry (EPSG:4326, else their
``bbox``) intersects the tile's footprint with a positive area (the footprint's bbox reprojected
with densified edges; a STAC API is searched with it as ``intersects``), and the tile grid is the
footprint's (:func:`footprint_grid`): a target grid, so every asset not on it by an integer factor
(another UTM zone, pixel size or origin) is warped onto it when read, bands by cubic convolution,
masks by nearest neighbour; pixels no item covers are off every footprint, hence missing.

Otherwise the tile grid is the finest band asset's grid of the tile's first item (the items of a
tile share one grid, e.g. an MGRS tile); coarser assets (Sentinel-2's 20 m bands and SCL) are read with
nearest neighbour, as every sensor's. On a target grid (``chain.proj`` /
``chain.spatial_resolution``), assets not on it are warped when read: band assets by cubic
convolution (the profile's nodata left out), the mask asset by nearest neighbour.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import re
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import pystac
import rasterio
from rasterio.windows import Window

from sitsflow import storage
from sitsflow.errors import BadInputError, InputNotFoundError
from sitsflow.log import get_logger
from sitsflow.process import open_files_budget
from sitsflow.sensors import signing
from sitsflow.sensors.base import (
    MASKS,
    VALUES,
    Grid,
    ReadBuffers,
    Sensor,
    grid_of,
    new_array,
    per_acquisition,
    read_on_grid,
)
from sitsflow.sensors.catalogue import INDEX_ROLES, STAC_PROFILES, StacProfile
from sitsflow.sensors.products import _OpenFiles

log = get_logger(__name__)


class StorageStacIO(pystac.StacIO):
    """pystac reads (and writes) STAC JSON through :mod:`sitsflow.storage`: local paths, ``s3://``
    URIs and (reading) http(s) URLs, with the storage module's retries and error mapping."""

    def read_text(self, source, *args, **kwargs) -> str:
        return storage.read_text(str(source))

    def write_text(self, dest, txt, *args, **kwargs) -> None:
        storage.write_text(str(dest), txt)


@dataclass(frozen=True)
class StacItem:
    """One item kept for a tile."""

    id: str
    date: int
    order: str
    assets: dict[str, str]  # profile band or mask key -> absolute href (local path, s3:// or http(s) URL)
    dn_offset: float


def tile_code(text: str) -> str:
    """A tile name or a tile property value, comparable: upper case, without a grid prefix
    (``MGRS-31TCJ``) or the leading ``T`` of an MGRS tile name (``T31TCJ``)."""
    code = str(text).strip().upper()
    code = code.rsplit("-", 1)[-1] if re.fullmatch(r"[A-Z0-9]+-[A-Z0-9]+", code) else code
    return code[1:] if re.fullmatch(r"T\d.*", code) else code


def dn_offset(profile: StacProfile, properties: dict, item: str = "the item") -> float:
    """The digital-number offset of an item: the profile's ``baseline_offset`` for Sentinel-2
    items of processing baseline >= 04.00 (``s2:processing_baseline``), unless the provider
    applied it already (Earth Search's ``earthsearch:boa_offset_applied``); 0 otherwise.
    ``item`` names the item in messages."""
    if not profile.baseline_offset or properties.get("earthsearch:boa_offset_applied") is True:
        return 0.0
    baseline = properties.get("s2:processing_baseline")
    try:
        return profile.baseline_offset if baseline is not None and float(baseline) >= 4.0 else 0.0
    except (TypeError, ValueError):
        raise BadInputError(f"{item}: s2:processing_baseline {baseline!r} is not a number like '04.00'") from None


def _cloud_cover(properties: dict, item: str) -> float | None:
    """The item's ``eo:cloud_cover`` (None when absent); bad input naming ``item`` when it is no number."""
    cloud = properties.get("eo:cloud_cover")
    if cloud is None:
        return None
    try:
        return float(cloud)
    except (TypeError, ValueError):
        raise BadInputError(f"{item}: eo:cloud_cover {cloud!r} is not a number (a percentage, 0-100)") from None


def _item_tile(item: pystac.Item, names: tuple[str, ...]) -> str | None:
    values = [item.properties.get(n) for n in names]
    if any(v is None for v in values):
        return None
    return tile_code("".join(str(v) for v in values))


def _item_date(item: pystac.Item, where: str = "stac") -> dt.datetime:
    when = item.datetime or item.common_metadata.start_datetime
    if when is None:
        raise BadInputError(f"{where}.catalog: item {item.id!r} has no datetime")
    return when if when.tzinfo is None else when.astimezone(dt.UTC)


def _href(item: pystac.Item, key: str, catalog: str, where: str = "stac") -> str:
    """The absolute href of the asset ``key`` of ``item``: a local path, an ``s3://`` URI or an
    http(s) URL (read through GDAL's ``/vsicurl/``); other schemes are refused."""
    asset = item.assets.get(key)
    if asset is None:
        raise BadInputError(
            f"{where}.assets: item {item.id!r} of {catalog} has no asset {key!r} (its assets: {sorted(item.assets)})"
        )
    href = asset.get_absolute_href() or asset.href
    if href.startswith("file://"):
        href = href[len("file://") :]
    if "://" in href and not storage.is_remote(href):
        raise BadInputError(
            f"{where}.catalog: asset {key!r} of item {item.id!r} is at {href}: only local paths, s3:// URIs "
            "and http(s) URLs are read"
        )
    return href


def read_catalog(uri: str, where: str = "stac") -> list[pystac.Item]:
    """Every item of the static catalog or collection ``uri`` (children walked); ``where`` names
    the source in messages (``stac``, ``stac[1]``)."""
    try:
        root = pystac.read_file(uri, stac_io=StorageStacIO())
        if not isinstance(root, pystac.Catalog):
            raise BadInputError(
                f"{where}.catalog: {uri} is a STAC {type(root).__name__}; give the catalog.json or collection.json"
            )
        return list(root.get_items(recursive=True))
    except InputNotFoundError as exc:
        raise BadInputError(f"{where}.catalog: {exc} (reading the catalog {uri} and its links)") from None
    except BadInputError:
        raise
    except (pystac.STACError, pystac.errors.STACTypeError, KeyError, ValueError) as exc:
        raise BadInputError(f"{where}.catalog: {uri} (or a catalog it links) is not valid STAC: {exc}") from None


def tile_spellings(tile: str) -> list[str]:
    """The values a tile property may hold for ``tile`` (what :func:`tile_code` equates)."""
    code = tile_code(tile)
    out = [code, f"T{code}", f"MGRS-{code}"] if re.fullmatch(r"\d.*", code) else [code]
    return sorted({*out, tile})


def _http_transient(exc: Exception) -> bool:
    """Connection trouble, timeouts, HTTP 429 and 5xx of a STAC API."""
    import requests
    from pystac_client.exceptions import APIError

    if isinstance(exc, requests.ConnectionError | requests.Timeout):
        return True
    if isinstance(exc, APIError):
        status = getattr(exc, "status_code", None)
        return status is None or status == 429 or status >= 500
    return False


def footprint_for(tiles: dict[str, dict[str, Any]], tile: str, where: str) -> dict[str, Any]:
    """The footprint of ``tile`` in ``stac.tiles`` (its name as given, or as :func:`tile_code`
    equates it); a tile without one is bad input naming ``{where}.tiles``."""
    if tile in tiles:
        return tiles[tile]
    for name, spec in tiles.items():
        if tile_code(name) == tile_code(tile):
            return spec
    raise BadInputError(
        f"{where}.tiles has no footprint for tile {tile!r} (chain.list_tile); its tiles: {sorted(tiles)}: "
        "give each tile of the run its bbox, crs and resolution"
    )


def footprint_grid(spec: dict[str, Any]) -> Grid:
    """The grid of a footprint: its CRS, its pixel size, corners snapped outward to multiples of
    the pixel size (as ``gdalwarp -tap``, so neighbouring tiles' maps align); a target grid."""
    from rasterio.crs import CRS

    minx, miny, maxx, maxy = spec["bbox"]
    rx, ry = spec["resolution"]
    x0, y1 = math.floor(minx / rx + 1e-9) * rx, math.ceil(maxy / ry - 1e-9) * ry
    width = max(math.ceil((maxx - x0) / rx - 1e-9), 1)
    height = max(math.ceil((y1 - miny) / ry - 1e-9), 1)
    transform = rasterio.Affine(rx, 0.0, x0, 0.0, -ry, y1)
    return Grid(width, height, transform, CRS.from_user_input(spec["crs"]), resampled=True)


def footprint_lonlat(spec: dict[str, Any], where: str, tile: str):
    """The footprint as a shapely polygon in EPSG:4326 (edges densified before reprojection)."""
    import shapely
    from rasterio.crs import CRS
    from rasterio.warp import transform as warp

    minx, miny, maxx, maxy = spec["bbox"]
    ring = shapely.segmentize(shapely.box(minx, miny, maxx, maxy), max(maxx - minx, maxy - miny) / 32)
    xs, ys = zip(*ring.exterior.coords)
    try:
        lon, lat = warp(CRS.from_user_input(spec["crs"]), CRS.from_epsg(4326), list(xs), list(ys))
    except Exception as exc:  # noqa: BLE001 (PROJ's failures have no common type)
        raise BadInputError(f"{where}.tiles: the footprint of tile {tile!r} cannot be reprojected: {exc}") from None
    polygon = shapely.Polygon(zip(lon, lat))
    if not all(math.isfinite(v) for v in (*lon, *lat)) or not polygon.is_valid or polygon.area <= 0:
        raise BadInputError(
            f"{where}.tiles: the bbox {list(spec['bbox'])} of tile {tile!r} has no extent in EPSG:4326 "
            f"(outside the area of use of {spec['crs']}?)"
        )
    return polygon


def _item_geometry(item: pystac.Item):
    """The item's geometry (EPSG:4326) as a shapely geometry, else its bbox; None without either."""
    import shapely
    from shapely.geometry import shape

    try:
        if item.geometry:
            return shape(item.geometry)
        if item.bbox and len(item.bbox) >= 4:
            b = item.bbox
            return shapely.box(b[0], b[1], b[len(b) // 2], b[len(b) // 2 + 1])
    except (ValueError, TypeError, AttributeError, shapely.errors.GEOSException):
        return None
    return None


def _covers(footprint, item: pystac.Item) -> bool:
    """Whether ``item``'s geometry overlaps ``footprint`` with a positive area."""
    geom = _item_geometry(item)
    if geom is None:
        return False
    if not geom.is_valid:
        geom = geom.buffer(0)
    return bool(footprint.intersection(geom).area > 0)


def search_api(
    url: str, opts, names: tuple[str, ...], tile: str, where: str = "stac", footprint=None
) -> list[pystac.Item]:
    """The items a STAC API returns for ``tile``: searched by collections, dates, cloud cover,
    ``footprint`` (a polygon in EPSG:4326, sent as ``intersects``) and (one tile property) the
    tile's spellings; retried as storage operations (exit 75 when the
    API stays unreachable), a refused search is exit 2 naming ``stac.api``."""
    import shapely.geometry
    from pystac_client import Client
    from pystac_client.errors import ClientTypeError
    from pystac_client.exceptions import APIError, ParametersError
    from pystac_client.warnings import PystacClientWarning

    def day(date: int | None, time: str) -> str:
        return ".." if date is None else f"{str(date)[:4]}-{str(date)[4:6]}-{str(date)[6:]}T{time}Z"

    query: dict = {}
    if len(names) == 1:
        query[names[0]] = {"in": tile_spellings(tile)}
    if opts.max_cloud_cover is not None:
        query["eo:cloud_cover"] = {"lte": opts.max_cloud_cover}

    def search() -> list[pystac.Item]:
        client = Client.open(url)
        found = client.search(
            collections=list(opts.collections) if opts.collections else None,
            datetime=f"{day(opts.start_date, '00:00:00')}/{day(opts.end_date, '23:59:59')}",
            query=query or None,
            intersects=None if footprint is None else shapely.geometry.mapping(footprint),
        )
        return list(found.items())

    try:
        return storage.retry_call("search", url, search, _http_transient)
    except APIError as exc:
        raise BadInputError(f"{where}.api: the STAC API {url} refused the search for tile {tile!r}: {exc}") from None
    except (
        PystacClientWarning,
        ClientTypeError,
        ParametersError,
        NotImplementedError,
        ValueError,
        pystac.STACError,
    ) as exc:
        # pystac-client raises its conformance warnings; a JSON error is a ValueError
        raise BadInputError(
            f"{where}.api: {url} is not a STAC API with item search ({type(exc).__name__}: {exc}); "
            "a static catalog goes in stac.catalog"
        ) from None


class StacSensor(Sensor):
    """A sensor read from the items of a STAC catalog (one date per acquisition day)."""

    band_files = True

    profile: StacProfile
    groups: list[list[StacItem]]  # per acquisition day, the items in mosaic order
    mask_asset: str | None
    catalog: str | None  # the static catalog read (None: items found by a STAC API)
    db: bool
    clear_values: np.ndarray | None
    invalid_bits: int
    footprint: dict[str, Any] | None  # the tile's stac.tiles entry (None: items matched by their property)
    _open_files: threading.local

    @classmethod
    def build(cls, cfg, tile: str, index: int = 0) -> StacSensor:
        """The reader of the STAC source ``cfg.stac[index]`` for ``tile``."""
        opts = cfg.stac[index]
        where = "stac" if len(cfg.stac) == 1 else f"stac[{index}]"
        profile = STAC_PROFILES[opts.profile]
        provider = profile.keys(opts.asset_keys)
        footprint = footprint_for(opts.tiles, tile, where) if opts.tiles is not None else None
        # with footprints, a tile property is matched only when given
        names = tuple(opts.tile_property or (() if footprint is not None else provider.tile_property))
        area = footprint_lonlat(footprint, where, tile) if footprint is not None else None
        bands = [a for a in profile.assets if opts.assets is None or a in opts.assets]
        mask_asset = opts.mask_asset or (provider.key(profile.mask_asset) if profile.mask_asset else None)
        source = opts.catalog or opts.api
        items = (
            read_catalog(opts.catalog, where) if opts.catalog else search_api(opts.api, opts, names, tile, where, area)
        )
        wanted = tile_code(tile)
        found: dict[str, int] = {"footprint": 0, "tile": 0, "collection": 0, "orbit": 0, "dates": 0, "clouds": 0}
        kept: list[StacItem] = []
        start, end = opts.start_date, opts.end_date
        for item in items:
            if area is not None and not _covers(area, item):
                continue
            found["footprint"] += 1
            if names and _item_tile(item, names) != wanted:
                continue
            found["tile"] += 1
            if opts.collections is not None and item.collection_id not in opts.collections:
                continue
            found["collection"] += 1
            if opts.orbit_state is not None and str(item.properties.get("sat:orbit_state")).lower() != opts.orbit_state:
                continue
            found["orbit"] += 1
            when = _item_date(item, where)
            date = int(when.strftime("%Y%m%d"))
            if (start is not None and date < start) or (end is not None and date > end):
                continue
            found["dates"] += 1
            culprit = f"{where}.{'catalog' if opts.catalog else 'api'}: item {item.id!r} of {source}"
            cloud = _cloud_cover(item.properties, culprit) if opts.max_cloud_cover is not None else None
            if opts.max_cloud_cover is not None and cloud is not None and cloud > opts.max_cloud_cover:
                continue
            found["clouds"] += 1
            hrefs = {band: _href(item, provider.key(band), source, where) for band in bands}
            if mask_asset:
                hrefs[mask_asset] = _href(item, mask_asset, source, where)
            if opts.sign is not None:
                signing.register(dict.fromkeys(hrefs.values(), item.collection_id), opts.sign_url, where)
            kept.append(
                StacItem(item.id, date, when.isoformat() + item.id, hrefs, dn_offset(profile, item.properties, culprit))
            )
        if not kept:
            prop = " + ".join(names)
            spatial = f"{found['footprint']} whose geometry intersects the footprint ({where}.tiles), " if area else ""
            named = f"{found['tile']} whose {prop} names the tile, " if names else ""
            hint = f"{where}.tiles sets the footprint" if area else f"{where}.tile_property sets the property matched"
            raise BadInputError(
                f"{where}: no item of tile {tile!r} in {source} ({len(items)} items; {spatial}{named}"
                f"{found['collection']} of the collections, {found['orbit']} of the orbit "
                f"direction, {found['dates']} between "
                f"start_date {start} and end_date {end}, {found['clouds']} with eo:cloud_cover <= "
                f"{opts.max_cloud_cover}); {hint}"
            )
        kept.sort(key=lambda i: i.order)
        groups: dict[int, list[StacItem]] = {}
        for kept_item in kept:
            groups.setdefault(kept_item.date, []).append(kept_item)
        # spectral indices need the profile's roles: none for backscatter (as for dated_raster)
        indices = [i.lower() for i in cfg.arg_train.features] if profile.roles else []
        roles = {r: b for r, b in profile.roles.items() if b in bands}
        missing = sorted({r for i in indices for r in INDEX_ROLES[i] if r not in roles})
        if missing:
            need = [profile.roles[r] for r in missing]
            raise BadInputError(
                f"{where}.assets: the spectral indices {indices} (arg_train.features) need the assets {need}; "
                "add them or set arg_train.features to []"
            )
        key = opts.sensor_key
        sensor = cls(
            key=key,
            prefix=key,
            ext_name=key,
            section=where,
            bands=bands,
            keep=bands,
            roles=roles,
            indices=indices,
            raw_dates=sorted(groups),
            start_date=start,
            end_date=end,
            temporal_resolution=int(opts.temporal_resolution or profile.temporal_resolution),
            tile=tile,
            settings={
                "catalog": source,
                "profile": profile.name,
                "asset_keys": opts.asset_keys,
                "mask_asset": mask_asset,
                "items": [[i.id for i in g] for g in groups.values()],
                "dn_offsets": [[i.dn_offset for i in g] for g in groups.values()],
                "mask_clear_values": opts.mask_clear_values,
                "mask_invalid_bits": opts.mask_invalid_bits,
                "orbit_state": opts.orbit_state,
                "db": opts.db,
                "footprint": footprint,
            },
        )
        sensor.profile = profile
        sensor.groups = [groups[d] for d in sorted(groups)]
        sensor.mask_asset = mask_asset
        sensor.catalog = opts.catalog
        sensor.db = bool(opts.db)
        sensor.footprint = footprint
        clear = profile.mask_clear_values if opts.mask_clear_values is None else opts.mask_clear_values
        sensor.clear_values = np.array(clear, np.int64) if clear else None
        bits = profile.mask_invalid_bits if opts.mask_invalid_bits is None else opts.mask_invalid_bits
        sensor.invalid_bits = sum(1 << b for b in bits)
        sensor._open_files = threading.local()
        log.info(
            "tile %s: stac %s, %d items on %d days kept (%d items from %s)",
            tile,
            profile.name,
            len(kept),
            len(groups),
            len(items),
            source,
        )
        return sensor

    def native_grid(self) -> Grid:
        if self.footprint is not None:
            return footprint_grid(self.footprint)
        item = self.groups[0][0]

        def grids():
            out = []
            with storage.rasterio_env():
                for band in self.bands:
                    with rasterio.open(storage.rasterio_path(item.assets[band])) as src:
                        out.append((grid_of(src), src.block_shapes[0], np.dtype(src.dtypes[0]).itemsize))
            return out

        found = storage.raster_call(
            "open", [item.assets[b] for b in self.bands], grids, culprit=f"stac item {item.id!r}, band assets"
        )
        # the finest band's grid, and its internal blocks as the sensor's block shape
        grid, (self.block_rows, self.block_cols), self.sample_bytes = min(found, key=lambda f: f[0].resolution)
        return grid

    def input_files(self) -> list[str]:
        catalog = [self.catalog] if self.catalog else []  # an API's answers are no file
        return [*catalog, *(u for g in self.groups for i in g for u in i.assets.values())]

    def _read_asset(self, item: StacItem, key: str, window: Window, grid: Grid, dtype: str, *, mask: bool = False):
        """Read asset ``key`` of ``item`` for ``window``: a band (warped onto a target grid by cubic
        convolution, the profile's nodata left out) or the ``mask`` (nearest neighbour)."""
        uri = item.assets[key]
        if self.footprint is not None and not grid.resampled:
            # items matched by footprint lie on any grid: warped onto the tile grid when not on it
            grid = dataclasses.replace(grid, resampled=True)
        how = {"resampling": MASKS} if mask else {"resampling": VALUES, "nodata": self.profile.nodata}

        def dataset():
            files = getattr(self._open_files, "files", None)
            if files is None:
                files = self._open_files.files = _OpenFiles(open_files_budget())
            return files.get(uri)

        def forget() -> None:
            files = getattr(self._open_files, "files", None)
            if files is not None:
                files.forget(uri)

        what = f"stac item {item.id!r} ({item.date}), asset {key!r}"
        return storage.raster_call(
            "read",
            uri,
            lambda: read_on_grid(dataset(), window, grid, [1], f"{what} {uri}", fill=0, dtype=dtype, **how),
            culprit=what,
            on_retry=forget,
        )

    def read(self, window: Window, grid: Grid, buffers: ReadBuffers | None = None) -> tuple[np.ndarray, np.ndarray]:
        h, w = int(window.height), int(window.width)
        nb_raw, nb_bands = len(self.groups), len(self.bands)
        # one buffer per source: the sources' reads of a window are all alive until they are combined
        values = new_array(buffers, f"stac:{self.key}:values", (h, w, nb_raw, nb_bands), np.float32)
        valid = new_array(buffers, f"stac:{self.key}:valid", (h, w, nb_raw), bool)
        values[...] = 0.0
        valid[...] = False
        p = self.profile
        nodata = np.float32(p.nodata)

        def acquisition(t: int) -> None:
            dns = np.empty((nb_bands, h, w), np.float32)
            with storage.rasterio_env():
                for item in self.groups[t]:
                    todo = ~valid[:, :, t]
                    if not todo.any():
                        break  # the day is complete: later items are not read
                    ok = todo
                    if self.mask_asset is not None:
                        mask, inside = self._read_asset(item, self.mask_asset, window, grid, "int64", mask=True)
                        ok = ok & inside
                        if self.clear_values is not None:
                            ok &= np.isin(mask[0], self.clear_values)
                        if self.invalid_bits:
                            ok &= (mask[0] & self.invalid_bits) == 0
                        if not ok.any():
                            continue
                    for b, band in enumerate(self.bands):
                        data, inside = self._read_asset(item, band, window, grid, "float32")
                        dns[b] = data[0]
                        ok &= inside & (data[0] != nodata) & np.isfinite(data[0])
                    scaled = (dns[:, ok] + np.float32(item.dn_offset)) * np.float32(p.scale) + np.float32(p.offset)
                    if self.db:
                        positive = (scaled > 0).all(axis=0)
                        if not positive.all():
                            rows, cols = np.nonzero(ok)
                            ok[rows[~positive], cols[~positive]] = False
                            scaled = scaled[:, positive]
                        scaled = np.float32(10) * np.log10(scaled)
                    values[:, :, t, :][ok] = scaled.T
                    valid[:, :, t] |= ok

        # remote files: each acquisition on its own thread (see per_acquisition)
        per_acquisition(nb_raw, acquisition, self.remote)
        return values, valid

