"""The STAC catalog of a run's final products, written by merging under ``final/stac/``.

``catalog.json`` (root) holds one collection, ``collection.json``, which holds one item per final
product (``items/<product>.json``: the classification map of each seed, with its colour-indexed
rendering and quick-look as extra assets, the confidence and probability maps of each seed, and
``PixelsValidity``). Items carry the projection extension (CRS code, shape, transform, native bbox;
``bbox``/``geometry`` are the raster footprint in WGS84), the raster extension (nodata, data type,
scale of the scaled products) and, for classification maps, the classification extension: each
class's code, name and colour from the run's nomenclature and colour table, with its pixel count.
The collection links to the validation report (``RESULTS.json``, ``RESULTS.txt``).

Every href is relative (the catalog is self-contained), so the same files work on local disk and
on ``s3://``; pystac builds the objects and the relative links, :mod:`sitsflow.storage` writes them
as part of merging's set of final products.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Callable, Sequence
from typing import Any

import pystac
import rasterio
import rasterio.warp
import shapely
from pystac.extensions.classification import Classification, ClassificationExtension
from pystac.extensions.projection import ProjectionExtension
from pystac.extensions.raster import DataType, RasterBand, RasterExtension, Sampling
from pystac.utils import make_relative_href

from sitsflow import layout, storage

COLLECTION_ID = "sitsflow-final-products"
CATALOG_ID = "sitsflow"
FOOTPRINT_POINTS = 21
"""Points per raster edge when the footprint is reprojected to WGS84 (edges curve in lon/lat)."""

NODATA_CLASS = 0
"""The class code of unclassified pixels in the classification maps (their nodata)."""


class Product:
    """One final product to describe: its URI, the local file to read its grid from, and its metadata."""

    def __init__(
        self,
        uri: str,
        local: str,
        *,
        title: str,
        kind: str,
        seed: int | None = None,
        scale: float | None = None,
        extra_assets: Sequence[tuple[str, str, str, str, list[str]]] = (),
        undecided: int | None = None,
    ) -> None:
        self.uri, self.local, self.title, self.kind, self.seed, self.scale = uri, local, title, kind, seed, scale
        self.extra_assets = list(extra_assets)  # (key, uri, media type, title, roles)
        self.undecided = undecided  # the fused map's label of tied votes (a class of its own)


def _class_name(name: str, code: int) -> str:
    """The machine-readable class name the classification extension asks for (letters, digits, - and _)."""
    return re.sub(r"[^0-9A-Za-z_-]+", "_", name).strip("_") or f"class_{code}"


def _classes(names: dict[int, str], colors: dict, codes: list[int], pixels: dict[int, int] | None) -> list:
    total = sum(pixels.values()) if pixels else 0
    out = [Classification.create(value=NODATA_CLASS, name="no_data", title="no data", nodata=True)]
    for code in codes:
        title = names.get(code) or f"class {code}"
        rgb = colors.get(code)
        out.append(
            Classification.create(
                value=code,
                name=_class_name(title, code),
                title=title,
                color_hint="".join(f"{int(v):02X}" for v in rgb[:3]) if rgb else None,
                count=None if pixels is None else int(pixels.get(code, 0)),
                percentage=None if not total or pixels is None else 100.0 * pixels.get(code, 0) / total,
            )
        )
    return out


def _interval(dates: list) -> tuple[dt.datetime, dt.datetime] | None:
    """First and last date of the models' date axes (``YYYYMMDD`` integers), None if they are not all
    dates (a dated raster without dates numbers them 1..n): the items then carry their creation time."""
    parsed = []
    for d in dates:
        try:
            parsed.append(dt.datetime.strptime(str(int(d)), "%Y%m%d").replace(tzinfo=dt.UTC))
        except (TypeError, ValueError):
            return None
    return (min(parsed), max(parsed)) if parsed else None


def _grid(path: str) -> dict[str, Any]:
    with storage.rasterio_env(), rasterio.open(path) as src:
        crs, bounds = src.crs, src.bounds
        footprint = shapely.segmentize(
            shapely.box(*bounds), max(bounds.right - bounds.left, bounds.top - bounds.bottom) / (FOOTPRINT_POINTS - 1)
        )
        geometry = rasterio.warp.transform_geom(crs, "EPSG:4326", shapely.geometry.mapping(footprint))
        bbox = list(rasterio.warp.transform_bounds(crs, "EPSG:4326", *bounds, densify_pts=FOOTPRINT_POINTS))
        return {
            "crs": crs,
            "epsg": crs.to_epsg(),
            "shape": [src.height, src.width],
            "transform": list(src.transform)[:6],
            "proj_bbox": list(bounds),
            "geometry": json.loads(json.dumps(geometry)),  # plain lists (JSON), not tuples
            "bbox": bbox,
            "dtypes": list(src.dtypes),
            "nodata": src.nodata,
            "resolution": abs(src.transform.a),
        }


def _item(
    product: Product,
    interval: tuple[dt.datetime, dt.datetime] | None,
    classes: Callable[[int | None], list] | None,
    produced: dt.datetime,
) -> pystac.Item:
    grid = _grid(product.local)
    start, end = interval if interval else (None, None)
    properties: dict[str, Any] = {"title": product.title, "sitsflow:product": product.kind}
    if product.seed is not None:
        properties["sitsflow:seed"] = product.seed
    item = pystac.Item(
        id=layout.product_id(product.uri),
        geometry=grid["geometry"],
        bbox=grid["bbox"],
        datetime=None if interval else produced,
        start_datetime=start,
        end_datetime=end,
        properties=properties,
    )
    item.common_metadata.created = produced
    proj = ProjectionExtension.ext(item, add_if_missing=True)
    if grid["epsg"] is not None:
        proj.apply(epsg=grid["epsg"], shape=grid["shape"], transform=grid["transform"], bbox=grid["proj_bbox"])
    else:
        proj.apply(wkt2=grid["crs"].to_wkt(), shape=grid["shape"], transform=grid["transform"], bbox=grid["proj_bbox"])

    asset = pystac.Asset(href=product.uri, media_type=pystac.MediaType.COG, title=product.title, roles=["data"])
    item.add_asset("data", asset)
    bands = [
        RasterBand.create(
            nodata=grid["nodata"],
            data_type=DataType(dtype),
            sampling=Sampling.AREA,
            spatial_resolution=grid["resolution"],
            scale=product.scale,
        )
        for dtype in grid["dtypes"]
    ]
    RasterExtension.ext(asset, add_if_missing=True).apply(bands)
    for key, uri, media_type, title, roles in product.extra_assets:
        item.add_asset(key, pystac.Asset(href=uri, media_type=media_type, title=title, roles=roles))
    if classes is not None:
        for key in ("data", "visual"):
            if key in item.assets:
                described = classes(product.seed)
                if product.undecided is not None:
                    described.append(
                        Classification.create(value=product.undecided, name="undecided", title="undecided (tied votes)")
                    )
                ClassificationExtension.ext(item.assets[key], add_if_missing=True).apply(classes=described)
    return item


def write_catalog(
    out: str,
    outputs: storage.OutputSet,
    products: list[Product],
    *,
    names: dict[int, str],
    colors: dict,
    codes: list[int],
    pixels: dict[int, dict[int, int]],
    dates: list,
) -> None:
    """Describe ``products`` (already written to their local temporary files) in a STAC catalog
    whose files are added to ``outputs``, the set of final products being published.

    Args:
        out: the run's output path (``chain.output_path``).
        outputs: merging's set of final products; each catalog file joins it.
        products: the final rasters, classification maps first (``kind == "classification"``).
        names, colors, codes: the classes' names, colours and codes of the maps.
        pixels: per seed, the pixel count of each class in its classification map.
        dates: the models' date axes (``YYYYMMDD``): the items' time interval.
    """
    produced = dt.datetime.now(dt.UTC).replace(microsecond=0)
    interval = _interval(dates)

    def classes(seed: int | None) -> list:
        return _classes(names, colors, codes, pixels.get(seed) if seed is not None else None)

    items = [_item(p, interval, classes if p.kind == "classification" else None, produced) for p in products]
    west, south = min(i.bbox[0] for i in items if i.bbox), min(i.bbox[1] for i in items if i.bbox)
    east, north = max(i.bbox[2] for i in items if i.bbox), max(i.bbox[3] for i in items if i.bbox)
    extent = pystac.Extent(
        pystac.SpatialExtent([[west, south, east, north]]),
        pystac.TemporalExtent([list(interval) if interval else [produced, produced]]),
    )
    catalog = pystac.Catalog(
        id=CATALOG_ID,
        description=f"sitsflow run {out}: final products",
        catalog_type=pystac.CatalogType.SELF_CONTAINED,
    )
    collection = pystac.Collection(
        id=COLLECTION_ID,
        description=(
            "Land-cover maps made by sitsflow (iota2's deep-learning workflow): the classification, "
            "confidence and probability maps of each seed and the number of clear acquisitions per pixel; "
            "their accuracy on the test polygons is in RESULTS.json / RESULTS.txt."
        ),
        extent=extent,
        title=f"sitsflow final products of {out}",
        license="other",
        catalog_type=pystac.CatalogType.SELF_CONTAINED,
    )
    catalog.add_child(collection)
    collection.add_items(items)

    catalog.set_self_href(layout.final_stac_catalog(out))
    collection.set_self_href(layout.final_stac_collection(out))
    for item in items:
        item.set_self_href(layout.final_stac_item(out, item.id))
        item.make_asset_hrefs_relative()
    collection_uri = layout.final_stac_collection(out)
    for uri, media_type, title in (
        (layout.final_results_json(out), pystac.MediaType.JSON, "Validation report on the test polygons (JSON)"),
        (layout.final_results(out), pystac.MediaType.TEXT, "Validation report on the test polygons"),
    ):
        collection.add_link(
            pystac.Link("related", make_relative_href(uri, collection_uri), media_type=media_type, title=title)
        )

    for obj in [catalog, collection, *items]:
        href = obj.get_self_href()
        assert href is not None  # set above
        with open(outputs.path(href), "w", encoding="utf-8") as f:
            json.dump(obj.to_dict(include_self_link=False, transform_hrefs=True), f, indent=2)
