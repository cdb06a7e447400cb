"""The STAC catalog merging writes under ``final/stac/``: pystac loads it, every object validates
against the STAC schemas (offline), the extensions describe the rasters as they are, the class
names and colours are the run's, a final map loads back through its asset href (locally and on
S3), and a rerun that drops a product drops its item."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pystac
import pytest
import rasterio
import rasterio.warp
import shapely
from pystac.errors import STACValidationError
from pystac.extensions.classification import ClassificationExtension
from pystac.extensions.projection import ProjectionExtension
from pystac.extensions.raster import RasterExtension
from pystac.validation import JsonSchemaSTACValidator, validate_dict

from sitsflow import layout, manifest, merging, storage
from sitsflow.config import load_config
from sitsflow.merging import stac
from sitsflow.nn.predict import PROBABILITY_SCALE
from sitsflow.reference import read_color_table, read_nomenclature
from synthetic import write_config, write_scene
from test_stages import _pipeline

NOMENCLATURE = "Winter wheat:1\nMaize / corn:2\nForest:3\n"
COLORS = "1 255 211 0\n2 0 128 255\n3 34 139 34\n"


class OfflineValidator(JsonSchemaSTACValidator):
    """pystac's JSON-schema validator restricted to the schemas pystac ships (STAC core of the
    version it writes, GeoJSON): a schema it would fetch from the network fails the test instead."""

    def _get_schema(self, schema_uri: str) -> dict:
        if schema_uri not in self.schema_cache:
            raise AssertionError(f"schema {schema_uri} is not available offline")
        return super()._get_schema(schema_uri)


class StorageIO(pystac.StacIO):
    """pystac reads through sitsflow.storage (local paths and s3:// alike)."""

    def read_text(self, source, *args, **kwargs) -> str:
        return storage.read_text(str(source))

    def write_text(self, dest, txt, *args, **kwargs) -> None:
        raise AssertionError("the tests only read catalogs")


def _validate(uri: str, validator: JsonSchemaSTACValidator) -> dict:
    """Validate the STAC JSON file ``uri`` as written (core schema); return it."""
    doc = json.loads(storage.read_text(uri))
    assert validate_dict(doc, extensions=[], href=uri, validator=validator)  # the core schema was checked
    return doc


def _config(folder: Path, output: str, *, epochs: int = 2, proba: bool = True):
    (folder / "nomenclature.txt").write_text(NOMENCLATURE)
    (folder / "colors.txt").write_text(COLORS)
    sets = [
        f"chain.output_path='{output}'",
        f"chain.nomenclature_path='{folder / 'nomenclature.txt'}'",
        f"chain.color_table='{folder / 'colors.txt'}'",
        "arg_classification.enable_probability_map=True",
    ]
    if proba:
        sets.append("arg_classification.generate_final_probability_map=True")
    return load_config(str(write_config(folder, epochs=epochs, chunks=1)), sets)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A small run, merged: (config, scene folder)."""
    folder = tmp_path_factory.mktemp("stac")
    write_scene(folder, width=30, height=20)
    cfg = _config(folder, str(folder / "out"))
    _pipeline(cfg)
    return cfg, folder


def _catalog_items(out: str, stac_io: pystac.StacIO | None = None) -> tuple[pystac.Collection, dict]:
    catalog = pystac.read_file(layout.final_stac_catalog(out), stac_io=stac_io)
    assert isinstance(catalog, pystac.Catalog)
    collection = catalog.get_child(stac.COLLECTION_ID)
    assert isinstance(collection, pystac.Collection)
    return collection, {item.id: item for item in collection.get_items()}


def test_catalog_validates_and_describes_the_final_products(run):
    cfg, folder = run
    out = cfg.chain.output_path
    validator = OfflineValidator()
    collection, items = _catalog_items(out)
    products = {
        layout.final_classif(out, 0): "classification",
        layout.final_confidence(out, 0): "confidence",
        layout.final_probamap(out, 0): "probability",
        layout.final_validity(out): "validity",
    }
    assert set(items) == {layout.product_id(uri) for uri in products}

    # every object, as written, is valid STAC; a broken item is not
    for uri in [layout.final_stac_catalog(out), layout.final_stac_collection(out)]:
        _validate(uri, validator)
    for item_id in items:
        _validate(layout.final_stac_item(out, item_id), validator)
    broken = json.loads(storage.read_text(layout.final_stac_item(out, "Classif_Seed_0")))
    broken["bbox"] = broken["bbox"][:3]
    with pytest.raises(STACValidationError, match="Classif_Seed_0"):
        validate_dict(broken, extensions=[], validator=validator)
    del broken["geometry"]
    with pytest.raises(STACValidationError):
        validate_dict(broken, extensions=[], validator=validator)

    names, colors = read_nomenclature(cfg.chain.nomenclature_path), read_color_table(cfg.chain.color_table)
    for uri, kind in products.items():
        item = items[layout.product_id(uri)]
        asset = item.assets["data"]
        assert not os.path.isabs(asset.href) and asset.href.startswith("../")  # relative: works wherever the tree is
        assert asset.get_absolute_href() == os.path.abspath(uri)
        assert item.properties["sitsflow:product"] == kind
        with rasterio.open(asset.get_absolute_href()) as src:
            # projection: the raster's own grid; bbox and footprint in WGS84 around its centre
            proj = ProjectionExtension.ext(item)
            assert proj.code == f"EPSG:{src.crs.to_epsg()}"
            assert proj.shape == [src.height, src.width]
            assert proj.transform == pytest.approx(list(src.transform)[:6])
            assert proj.bbox == pytest.approx(list(src.bounds))
            centre = rasterio.warp.transform(
                src.crs,
                "EPSG:4326",
                [src.xy(src.height / 2, src.width / 2)[0]],
                [src.xy(src.height / 2, src.width / 2)[1]],
            )
            lon, lat = centre[0][0], centre[1][0]
            west, south, east, north = item.bbox
            assert west < lon < east and south < lat < north
            assert shapely.geometry.shape(item.geometry).contains(shapely.Point(lon, lat))
            # raster: one band object per band, data type and nodata of the file
            bands = RasterExtension.ext(asset).bands
            assert bands is not None and len(bands) == src.count
            assert [str(b.data_type) for b in bands] == list(src.dtypes)
            assert all(b.nodata == src.nodata for b in bands)
        # the time span of the series the models were trained on
        assert item.properties["start_datetime"].startswith("2020-") and item.datetime is None

    # the scaled products say how to read them
    scales = {
        layout.final_confidence(out, 0): 1 / merging.CONFIDENCE_SCALE,
        layout.final_probamap(out, 0): 1 / PROBABILITY_SCALE,
        layout.final_validity(out): None,
    }
    for uri, scale in scales.items():
        assert {b.scale for b in RasterExtension.ext(items[layout.product_id(uri)].assets["data"]).bands} == {scale}

    # classification: the run's nomenclature and colour table, the map's class counts
    classif = items[layout.product_id(layout.final_classif(out, 0))]
    with rasterio.open(layout.final_classif(out, 0)) as src:
        values, counts = np.unique(src.read(1), return_counts=True)
    pixels = {int(v): int(n) for v, n in zip(values, counts) if v}
    for key in ("data", "visual"):
        classes = ClassificationExtension.ext(classif.assets[key]).classes
        assert classes is not None
        by_value = {c.value: c for c in classes}
        assert by_value[0].nodata is True
        assert {v: c.title for v, c in by_value.items() if v} == names
        assert by_value[1].name == "Winter_wheat" and by_value[2].name == "Maize_corn"
        assert {v: c.color_hint for v, c in by_value.items() if v} == {
            c: "".join(f"{v:02X}" for v in rgb) for c, rgb in colors.items()
        }
        assert {v: c.count for v, c in by_value.items() if v and c.count} == pixels
    assert classif.assets["visual"].get_absolute_href() == os.path.abspath(layout.final_classif_color(out, 0))
    assert classif.assets["overview"].get_absolute_href() == os.path.abspath(layout.final_quicklook(out, 0))
    assert all(os.path.isfile(a.get_absolute_href()) for i in items.values() for a in i.assets.values())

    # a final map loads back through the catalog
    with rasterio.open(classif.assets["data"].get_absolute_href()) as src:
        via_catalog = src.read(1)
    with rasterio.open(layout.final_classif(out, 0)) as src:
        np.testing.assert_array_equal(via_catalog, src.read(1))

    # the validation report is linked from the collection
    related = {link.title: link for link in collection.get_links("related")}
    assert {link.href for link in related.values()} == {"../RESULTS.json", "../RESULTS.txt"}
    report = [link for link in related.values() if link.media_type == pystac.MediaType.JSON][0]
    assert json.loads(storage.read_text(report.get_absolute_href()))["seeds"]
    assert collection.extent.spatial.bboxes[0] == pytest.approx(items["Classif_Seed_0"].bbox)

    # the catalog is part of the outputs the manifest lists
    listed = set(manifest.read_manifest(out, merging.STAGE, layout.ALL)["outputs"])
    assert {layout.final_stac_catalog(out), layout.final_stac_collection(out)} <= listed
    assert {layout.final_stac_item(out, i) for i in items} <= listed


def test_rerun_without_a_product_drops_its_item(run, tmp_path):
    cfg, folder = run
    out = str(tmp_path / "out")
    _pipeline(_config(folder, out, epochs=1))
    assert storage.exists(layout.final_stac_item(out, layout.product_id(layout.final_probamap(out, 0))))
    # the same chunks merged without the final probability map: its item goes with it
    cfg2 = _config(folder, out, epochs=1, proba=False)
    assert merging.run(cfg2)["skipped"] is False
    _, items = _catalog_items(out)
    assert layout.product_id(layout.final_probamap(out, 0)) not in items
    assert not storage.exists(layout.final_stac_item(out, layout.product_id(layout.final_probamap(out, 0))))
    assert merging.run(cfg2)["skipped"] is True


@pytest.mark.s3
def test_catalog_on_s3_loads_a_map_back(run, s3_bucket):
    _, folder = run
    out = f"{s3_bucket}/run"
    cfg = _config(folder, out, epochs=1, proba=False)
    _pipeline(cfg)
    validator = OfflineValidator()
    for uri in [layout.final_stac_catalog(out), layout.final_stac_collection(out)]:
        _validate(uri, validator)
    collection, items = _catalog_items(out, StorageIO())
    for item_id in items:
        _validate(layout.final_stac_item(out, item_id), validator)
    asset = items[layout.product_id(layout.final_classif(out, 0))].assets["data"]
    assert asset.href == "../../" + layout.final_classif(out, 0).rsplit("/", 1)[-1]
    assert asset.get_absolute_href() == layout.final_classif(out, 0)
    with storage.rasterio_env():
        with rasterio.open(storage.rasterio_path(asset.get_absolute_href())) as src:
            via_catalog = src.read(1)
    with storage.local_path(layout.final_classif(out, 0)) as local, rasterio.open(local) as src:
        np.testing.assert_array_equal(via_catalog, src.read(1))


def test_items_span_the_models_dates_or_carry_their_creation_time():
    first, last = stac._interval([20200402, 20200105, 20200213])
    assert (first.isoformat(), last.isoformat()) == ("2020-01-05T00:00:00+00:00", "2020-04-02T00:00:00+00:00")
    assert stac._interval([1, 2, 3]) is None  # a dated raster without dates numbers them
    assert stac._interval([]) is None
