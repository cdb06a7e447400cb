"""A small static STAC catalog of Sentinel-2 L2A COGs (Planetary Computer's asset keys) for the
``stac`` sensor's tests: tile 31TCJ on a 10 m grid (20 m bands and SCL at 20 m), three classes in
vertical stripes with distinct seasonal reflectances, clouds in SCL, and items chosen to exercise
every filter:

* ``d1`` 2023-03-01, one item, processing baseline 04.00 (DN offset -1000 in the files);
* ``d2`` 2023-03-11, two items: ``a`` (earlier, baseline 03.01: no offset) is nodata on its
  right half and cloudy (SCL 9) on a block, ``b`` (later, baseline 04.00) is whole: the mosaic
  takes ``a`` where it is clear, ``b`` elsewhere; rows 0..3 are cloudy in both;
* ``d3`` 2023-03-16, eo:cloud_cover 90 (left out by ``max_cloud_cover``);
* ``d4`` 2023-03-21, one item (Earth Search style: ``earthsearch:boa_offset_applied``, no offset);
* ``d5`` 2023-04-20, after the tests' end_date;
* one item of another tile (31TCK) on 2023-03-01.

:func:`write_s1_catalog` writes Sentinel-1 RTC items (VV, VH) of the same tile and grid, ascending
and descending passes on days of their own; :func:`stac_sources` writes a ``stac`` list of
several sources for :func:`write_config`.

``write_catalog(keys="earth-search")`` names the assets and the tile as Earth Search does
(``blue`` ... ``scl``, ``grid:code`` only); ``href_base`` makes the asset hrefs absolute URLs
under it (e.g. the http URL of the folder :func:`upload` copied to a public bucket).
"""

from __future__ import annotations

import datetime as dt
import math
from pathlib import Path

import numpy as np
import pyogrio
import pystac
import rasterio
import rasterio.warp
import shapely
from rasterio.transform import from_origin

from sitsflow import storage
from sitsflow.sensors.catalogue import STAC_PROFILES

CRS = "EPSG:32631"
ORIGIN = (300000.0, 5000000.0)
WIDTH, HEIGHT = 40, 28  # 10 m pixels (20 m assets: 20 x 14)
BANDS = STAC_PROFILES["sentinel-2-l2a"].assets
COARSE = {"B05", "B06", "B07", "B8A", "B11", "B12", "SCL"}
CLASSES = (1, 2, 3)
DAYS = {"d1": dt.date(2023, 3, 1), "d2": dt.date(2023, 3, 11), "d3": dt.date(2023, 3, 16),
        "d4": dt.date(2023, 3, 21), "d5": dt.date(2023, 4, 20)}


def label_map() -> np.ndarray:
    """Class of each 10 m pixel: vertical stripes of 4 columns (the 20 m pixels are never split)."""
    cols = np.arange(WIDTH)
    return np.broadcast_to(np.array(CLASSES)[(cols // 4) % 3], (HEIGHT, WIDTH)).copy()


def reflectance(day: str, band: int, classes: np.ndarray) -> np.ndarray:
    """The true reflectance of the pixels of ``classes`` on ``day`` for band number ``band``."""
    t = list(DAYS).index(day)
    return (0.05 + 0.02 * band + 0.08 * classes * ((t + classes) % 3 + 1) / 3).astype(np.float64)


def _write_cog(path: Path, data: np.ndarray, res: float, nodata: float | None) -> None:
    profile = {"driver": "COG", "dtype": data.dtype.name, "count": 1, "width": data.shape[1],
               "height": data.shape[0], "crs": CRS, "transform": from_origin(*ORIGIN, res, res),
               "nodata": nodata}
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data, 1)


def _coarse(a: np.ndarray) -> np.ndarray:
    return a[::2, ::2]


def write_catalog(folder: Path, keys: str = "planetary-computer", href_base: str | None = None) -> dict:
    """Write the COGs, items, collection and ``catalog.json`` under ``folder``; return what the
    tests need to compute the expected values. ``keys``: whose asset keys and tile property the
    items use; ``href_base``: the asset hrefs are ``{href_base}/items/<item>/<band>.tif``."""
    provider = STAC_PROFILES["sentinel-2-l2a"].keys(keys)
    folder = Path(folder).resolve()
    labels = label_map()
    truth: dict[str, dict] = {}
    catalog = pystac.Catalog("s2-test", "a tiny Sentinel-2 L2A catalog")
    collection = pystac.Collection("sentinel-2-l2a", "Sentinel-2 L2A COGs",
                                   pystac.Extent(pystac.SpatialExtent([[-180, -90, 180, 90]]),
                                                 pystac.TemporalExtent([[None, None]])))
    catalog.add_child(collection)
    left, top = ORIGIN
    footprint = rasterio.warp.transform_geom(
        CRS, "EPSG:4326", shapely.geometry.mapping(shapely.box(left, top - HEIGHT * 10, left + WIDTH * 10, top)))
    specs = [  # name, day, hour, tile, baseline, properties
        ("d1", "d1", 10, "31TCJ", "04.00", {"eo:cloud_cover": 5.0}),
        ("d2a", "d2", 10, "31TCJ", "03.01", {"eo:cloud_cover": 30.0}),
        ("d2b", "d2", 11, "31TCJ", "04.00", {"eo:cloud_cover": 20.0}),
        ("d3", "d3", 10, "31TCJ", "04.00", {"eo:cloud_cover": 90.0}),
        ("d4", "d4", 10, "31TCJ", "05.00", {"eo:cloud_cover": 10.0, "earthsearch:boa_offset_applied": True}),
        ("d5", "d5", 10, "31TCJ", "04.00", {"eo:cloud_cover": 0.0}),
        ("other", "d1", 10, "31TCK", "04.00", {"eo:cloud_cover": 0.0}),
    ]

    def href(path: Path) -> str:
        return f"{href_base}/{path.relative_to(folder).as_posix()}" if href_base else str(path)

    for name, day, hour, tile, baseline, props in specs:
        offset = 1000 if baseline >= "04.00" and not props.get("earthsearch:boa_offset_applied") else 0
        item_dir = folder / "items" / name
        item_dir.mkdir(parents=True, exist_ok=True)
        scl = np.full((HEIGHT // 2, WIDTH // 2), 4, np.uint8)  # vegetation: clear
        nodata = np.zeros((HEIGHT, WIDTH), bool)
        if name == "d2a":
            nodata[:, WIDTH // 2:] = True
            scl[6:10, 2:6] = 9  # cloud high probability
        if day == "d2":
            scl[0:2, :] = 8  # rows 0..3 (10 m) cloudy in both items
        if name == "d1":
            scl[10:12, 14:18] = 3  # cloud shadow
        when = dt.datetime(DAYS[day].year, DAYS[day].month, DAYS[day].day, hour, tzinfo=dt.UTC)
        item = pystac.Item(f"S2_{name}_{tile}", footprint, list(shapely.bounds(shapely.geometry.shape(footprint))),
                           when, {**({} if keys == "earth-search" else {"s2:mgrs_tile": tile}),
                                  "grid:code": f"MGRS-{tile}", "s2:processing_baseline": baseline, **props},
                           collection="sentinel-2-l2a")
        values = {}
        for b, band in enumerate(BANDS):
            refl = reflectance(day, b, labels)
            if name == "d2b":
                refl = refl + 0.01  # tells the items of d2 apart
            dn = np.round(refl * 10000).astype(np.uint16) + offset
            dn[nodata] = 0
            if band in COARSE:
                dn, res = _coarse(dn), 20.0
            else:
                res = 10.0
            _write_cog(item_dir / f"{band}.tif", dn, res, 0)
            item.add_asset(provider.key(band), pystac.Asset(href(item_dir / f"{band}.tif"),
                                                            media_type=pystac.MediaType.COG, roles=["data"]))
            values[band] = dn
        _write_cog(item_dir / "SCL.tif", scl, 20.0, 0)
        item.add_asset(provider.key("SCL"), pystac.Asset(href(item_dir / "SCL.tif"), media_type=pystac.MediaType.COG))
        collection.add_item(item)
        truth[name] = {"dn": values, "scl": scl, "offset": offset}
    catalog.normalize_hrefs(str(folder / "stac"))
    catalog.make_all_asset_hrefs_relative()
    catalog.save(pystac.CatalogType.SELF_CONTAINED)
    _write_polygons(folder, labels)
    return {"catalog": str(folder / "stac" / "catalog.json"), "truth": truth, "labels": labels}


def _write_polygons(folder: Path, labels: np.ndarray) -> None:
    """Reference polygons: one rectangle per stripe of 4 columns, inside rows 6..25."""
    transform = from_origin(*ORIGIN, 10, 10)
    rows = []
    for c0 in range(0, WIDTH, 4):
        x0, y0 = transform @ (c0, 6)
        x1, y1 = transform @ (c0 + 4, 26)
        rows.append((shapely.box(x0, y1, x1, y0), int(labels[0, c0])))
    pyogrio.raw.write(str(folder / "polygons.geojson"),
                      geometry=shapely.to_wkb(np.array([g for g, _ in rows], dtype=object)),
                      field_data=[np.array([c for _, c in rows], np.int64)], fields=["code"], crs=CRS,
                      driver="GeoJSON", geometry_type="Polygon")


S1_DAYS = {"ascending": (dt.date(2023, 3, 2), dt.date(2023, 3, 14), dt.date(2023, 3, 26)),
           "descending": (dt.date(2023, 3, 5), dt.date(2023, 3, 17), dt.date(2023, 3, 29))}
"""The acquisition days of the Sentinel-1 items, per orbit direction (none shared)."""
S1_NODATA = -32768.0


def backscatter(orbit: str, t: int, pol: str, classes: np.ndarray) -> np.ndarray:
    """The linear backscatter of the pixels of ``classes`` at the ``t``-th pass of ``orbit``."""
    vv = 0.02 + 0.04 * classes * (1 + 0.3 * ((t + classes) % 3)) + (0.01 if orbit == "descending" else 0.0)
    return (vv if pol == "vv" else vv / (2 + classes)).astype(np.float32)


def write_s1_catalog(folder: Path) -> dict:
    """Sentinel-1 RTC COGs (float32, 10 m, the tile grid of :func:`write_catalog`) and a static
    catalog of them under ``folder/s1``: three ascending and three descending passes of tile
    31TCJ (``grid:code``, ``sat:orbit_state``), VV and VH by class (:func:`backscatter`), nodata
    at pixel (0, 0) of every pass; reference polygons as :func:`write_catalog`'s."""
    folder = Path(folder).resolve()
    labels = label_map()
    catalog = pystac.Catalog("s1-test", "a tiny Sentinel-1 RTC catalog")
    for orbit, days in S1_DAYS.items():
        for t, day in enumerate(days):
            name = f"S1_{orbit[:3]}{t}_31TCJ"
            item_dir = folder / "s1" / "items" / name
            item_dir.mkdir(parents=True, exist_ok=True)
            item = pystac.Item(name, None, None, dt.datetime(day.year, day.month, day.day, 6, tzinfo=dt.UTC),
                               {"grid:code": "MGRS-31TCJ", "sat:orbit_state": orbit}, collection="sentinel-1-rtc")
            for pol in ("vv", "vh"):
                data = backscatter(orbit, t, pol, labels)
                data[0, 0] = S1_NODATA
                _write_cog(item_dir / f"{pol}.tif", data, 10.0, S1_NODATA)
                item.add_asset(pol, pystac.Asset(str(item_dir / f"{pol}.tif"), media_type=pystac.MediaType.COG))
            catalog.add_item(item)
    catalog.normalize_hrefs(str(folder / "s1" / "stac"))
    catalog.make_all_asset_hrefs_relative()
    catalog.save(pystac.CatalogType.SELF_CONTAINED)
    _write_polygons(folder, labels)
    return {"catalog": str(folder / "s1" / "stac" / "catalog.json"), "labels": labels}


def stac_sources(*sources: dict) -> str:
    """A ``stac`` list of sections (``stac : [ { ... }, ... ]``), each dict a source's keys."""
    from sitsflow.config.syntax import format_key, format_value

    items = ["  {\n" + "".join(f"    {format_key(k)} : {format_value(v)}\n" for k, v in s.items()) + "  }"
             for s in sources]
    return "stac : [\n" + ",\n".join(items) + "\n]\n"


def upload(folder: Path, bucket: str, public: str | None = None) -> str:
    """Copy the catalog, items and COGs under ``{bucket}/data``; return the catalog's URI. With
    ``public`` (the S3 server's endpoint), every object is made public and the catalog's http URL
    is returned."""
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file():
            uri = f"{bucket}/data/{path.relative_to(folder).as_posix()}"
            storage.write_bytes(uri, path.read_bytes())
            if public:
                publish(public, uri)
    uri = f"{bucket}/data/stac/catalog.json"
    return f"{public}/{uri.removeprefix('s3://')}" if public else uri


def publish(s3_server: str, uri: str) -> str:
    """Make the object ``uri`` of the S3 server ``s3_server`` public (ACL ``public-read``: anyone
    may GET and HEAD it, as a public bucket of COGs); return its http URL."""
    import boto3

    bucket, key = uri.removeprefix("s3://").split("/", 1)
    client = boto3.session.Session().client("s3", endpoint_url=s3_server, region_name="us-east-1",
                                            aws_access_key_id="testing", aws_secret_access_key="testing")
    client.put_object_acl(Bucket=bucket, Key=key, ACL="public-read")
    return f"{s3_server}/{bucket}/{key}"


def write_config(folder: Path, catalog: str, *, output: str = "output", stac_extra: str = "", extra: str = "",
                 epochs: int = 3, name: str = "stac.cfg", stac: str | None = None) -> Path:
    """A configuration reading ``catalog`` with the sentinel-2-l2a profile (``stac``: the
    ``stac`` key written instead, e.g. by :func:`stac_sources`)."""
    block = stac or f"""stac:
{{
  catalog : '{catalog}'
  profile : 'sentinel-2-l2a'
  end_date : '2023-04-01'
  max_cloud_cover : 50
  {stac_extra}
}}"""
    text = f"""
chain:
{{
  output_path : '{output}'
  list_tile : 'T31TCJ'
  ground_truth : 'polygons.geojson'
  data_field : 'code'
}}
{block}
arg_train:
{{
  runs : 1
  ratio : 0.5
  random_seed : 0
  deep_learning_parameters:
  {{
    dl_name : 'MLPClassifier'
    epochs : {epochs}
    num_workers : 0
    dataloader_mode : 'full'
    hyperparameters_solver : {{"batch_size" : [32], "learning_rate" : [0.01]}}
  }}
}}
python_data_managing:
{{
  chunk_size_mode : 'split_number'
  number_of_chunks : 2
}}
{extra}
"""
    path = Path(folder) / name
    path.write_text(text)
    return path


# --- footprints: Landsat-like scenes in two UTM zones over one tile footprint (stac.tiles) ---------
FP_TILE = "T31TGL"
FP_CRS = "EPSG:32631"
FP_BBOX = (735300.0, 4986300.0, 737700.0, 4988100.0)  # straddles 6°E, the border of zones 31 and 32
FP_RES = 30.0
FP_WIDTH, FP_HEIGHT = 80, 60
FP_DAYS = {"d1": dt.date(2023, 3, 5), "d2": dt.date(2023, 3, 21), "d3": dt.date(2023, 4, 6)}
LANDSAT = STAC_PROFILES["landsat-c2-l2"]
QA_CLEAR, QA_CLOUD = 1 << 6, (1 << 6) | (1 << 3)
WEST_EDGE = 737000.0  # the western scene (EPSG:32631) ends here (x of EPSG:32631)
EAST_EDGE = 736300.0  # the eastern scenes (EPSG:32632) start here (x of EPSG:32631)


def fp_classes(x: np.ndarray) -> np.ndarray:
    """Class at x (EPSG:32631): stripes of 360 m (12 tile pixels) from the footprint's west edge."""
    return (np.floor((x - FP_BBOX[0]) / 360) % 3 + 1).astype(np.int64)


def fp_reflectance(day: str, band: int, x: np.ndarray, lon: np.ndarray, east: bool) -> np.ndarray:
    """The surface reflectance at x (EPSG:32631) and longitude ``lon``: a class signal, a smooth
    gradient in longitude, and +0.02 in the eastern scenes (tells the scenes of a day apart)."""
    classes = fp_classes(x)
    t = list(FP_DAYS).index(day)
    return 0.05 + 0.02 * band + 0.08 * classes * ((t + classes) % 3 + 1) / 3 + 0.5 * (lon - 5.98) + 0.02 * east


def write_footprint_catalog(folder: Path) -> dict:
    """Landsat C2 L2 scenes (no tile property) over the footprint :data:`FP_BBOX`: on ``d1`` and
    ``d3`` a western scene in EPSG:32631 (30 m, origin 7 m off the tile grid, up to
    :data:`WEST_EDGE`, clouds QA_PIXEL bit 3 on a block) and an eastern one in EPSG:32632 (from
    :data:`EAST_EDGE`): together they cover the footprint; on ``d2`` only an eastern scene
    (partial coverage); and a scene 100 km away (not intersecting). Reference polygons in
    EPSG:32631, inside the stripes of :func:`fp_classes`."""
    folder = Path(folder).resolve()
    catalog = pystac.Catalog("landsat-fp", "Landsat scenes in two UTM zones")
    minx, miny, maxx, maxy = FP_BBOX
    scenes = [  # name, day, minute, crs, bounds in EPSG:32631 (before reprojection), east
        ("w1", "d1", 0, "EPSG:32631", (minx - 193, miny - 293, WEST_EDGE, maxy + 307), False),
        ("e1", "d1", 5, "EPSG:32632", (EAST_EDGE, miny - 400, maxx + 400, maxy + 400), True),
        ("e2", "d2", 0, "EPSG:32632", (EAST_EDGE, miny - 400, maxx + 400, maxy + 400), True),
        ("w3", "d3", 0, "EPSG:32631", (minx - 193, miny - 293, WEST_EDGE, maxy + 307), False),
        ("e3", "d3", 5, "EPSG:32632", (EAST_EDGE, miny - 400, maxx + 400, maxy + 400), True),
        ("far", "d1", 0, "EPSG:32632", (maxx + 100000, miny, maxx + 103000, maxy), True),
    ]
    extents: dict[str, tuple] = {}
    for name, day, minute, crs, bounds, east in scenes:
        left, bottom, right, top = rasterio.warp.transform_bounds(FP_CRS, crs, *bounds, densify_pts=21)
        left, top = math.floor(left) + 0.5, math.ceil(top) + 0.5  # a grid of its own
        width, height = math.ceil((right - left) / FP_RES), math.ceil((top - bottom) / FP_RES)
        transform = from_origin(left, top, FP_RES, FP_RES)
        cols, rows = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
        xs, ys = transform @ (cols.ravel(), rows.ravel())
        x31, _ = rasterio.warp.transform(crs, FP_CRS, xs, ys)
        lon, lat = rasterio.warp.transform(crs, "EPSG:4326", xs, ys)
        x31, lon = np.reshape(x31, cols.shape), np.reshape(lon, cols.shape)
        when = dt.datetime(*FP_DAYS[day].timetuple()[:3], 10, minute, tzinfo=dt.UTC)
        geometry = rasterio.warp.transform_geom(
            crs, "EPSG:4326",
            shapely.geometry.mapping(shapely.box(left, top - height * FP_RES, left + width * FP_RES, top)))
        extents[name] = (crs, left, top - height * FP_RES, left + width * FP_RES, top)
        item = pystac.Item(f"LC09_{name}", geometry, list(shapely.bounds(shapely.geometry.shape(geometry))), when,
                           {"eo:cloud_cover": 10.0, "proj:epsg": int(crs.split(":")[1])}, collection="landsat-c2-l2")
        item_dir = folder / "landsat" / "items" / name
        item_dir.mkdir(parents=True, exist_ok=True)
        qa = np.full(cols.shape, QA_CLEAR, np.uint16)
        if not east:
            qa[20:30, 10:20] = QA_CLOUD
        layers = {band: np.round((fp_reflectance(day, b, x31, lon, east) + 0.2) / 2.75e-5).astype(np.uint16)
                  for b, band in enumerate(LANDSAT.assets)}
        for key, data in {**layers, "qa_pixel": qa}.items():
            with rasterio.open(item_dir / f"{key}.tif", "w", driver="COG", dtype="uint16", count=1, width=width,
                               height=height, crs=crs, transform=transform, nodata=0) as dst:
                dst.write(data, 1)
            item.add_asset(key, pystac.Asset(str(item_dir / f"{key}.tif"), media_type=pystac.MediaType.COG))
        catalog.add_item(item)
    catalog.normalize_hrefs(str(folder / "landsat" / "stac"))
    catalog.make_all_asset_hrefs_relative()
    catalog.save(pystac.CatalogType.SELF_CONTAINED)
    polygons = []
    for k in range(int((maxx - minx) // 360)):
        x0 = minx + 360 * k + 60
        polygons.append((shapely.box(x0, miny + 150, x0 + 240, maxy - 150), int(fp_classes(np.array(x0))[()])))
    pyogrio.raw.write(str(folder / "fp_polygons.geojson"),
                      geometry=shapely.to_wkb(np.array([g for g, _ in polygons], dtype=object)),
                      field_data=[np.array([c for _, c in polygons], np.int64)], fields=["code"], crs=FP_CRS,
                      driver="GeoJSON", geometry_type="Polygon")
    return {"catalog": str(folder / "landsat" / "stac" / "catalog.json"),
            "polygons": str(folder / "fp_polygons.geojson"), "extents": extents}


def fp_stac_block(catalog: str, **extra) -> str:
    """The ``stac`` section of the footprint catalog: landsat-c2-l2, ``tiles`` of :data:`FP_TILE`."""
    from sitsflow.config.syntax import format_key, format_value

    keys = {"catalog": catalog, "profile": "landsat-c2-l2",
            "tiles": {FP_TILE: {"bbox": list(FP_BBOX), "crs": FP_CRS, "resolution": FP_RES}}, **extra}
    return "stac:\n{\n" + "".join(f"  {format_key(k)} : {format_value(v)}\n" for k, v in keys.items()) + "}\n"
