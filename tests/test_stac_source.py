"""The ``stac`` sensor on a generated static catalog of Sentinel-2 L2A COGs (tests/stac_catalog.py),
local, on the S3 server and over http: items matched to the tile, filtered by date range and cloud cover,
grouped by day and mosaicked (first clear pixel wins), scaled with the processing-baseline
offset, masked by SCL (20 m, nearest) and gap-filled; a Landsat C2 L2 item for the QA_PIXEL bits;
the configuration keys' effects; bad input; and a run from sampling to the final map."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pystac
import pytest
import rasterio
from rasterio.transform import from_origin
from rasterio.windows import Window

from sitsflow import layout, storage
from sitsflow.config import load_config
from sitsflow.errors import BadInputError, ConfigError, TransientError
from sitsflow.features import FeaturePipeline
from sitsflow.sensors.stac import StacSensor, tile_code
from stac_catalog import BANDS, HEIGHT, WIDTH, reflectance, upload, write_catalog, write_config

TILE = "T31TCJ"
FULL = Window(0, 0, WIDTH, HEIGHT)


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stac")
    info = write_catalog(folder)
    return folder, info


def _cfg(folder: Path, info: dict, *overrides: str, catalog: str | None = None, **kw):
    path = write_config(folder, catalog or info["catalog"], **kw)
    return load_config(str(path), list(overrides))


def _pipe(folder, info, *overrides, **kw) -> FeaturePipeline:
    return FeaturePipeline(_cfg(folder, info, *overrides, **kw), TILE)


def _expected(info: dict) -> tuple[np.ndarray, np.ndarray]:
    """Values and validity of the three kept days, written out from the generator's rules."""
    labels = info["labels"]
    values = np.zeros((HEIGHT, WIDTH, 3, len(BANDS)), np.float64)
    valid = np.zeros((HEIGHT, WIDTH, 3), bool)
    rows, cols = np.mgrid[0:HEIGHT, 0:WIDTH]
    for t, (day, names) in enumerate([("d1", ["d1"]), ("d2", ["d2a", "d2b"]), ("d4", ["d4"])]):
        for name in names:
            scl = info["truth"][name]["scl"][rows // 2, cols // 2]
            clear = np.isin(scl, (2, 4, 5, 6, 7, 11)) & ~valid[:, :, t]
            if name == "d2a":
                clear &= cols < WIDTH // 2  # nodata on its right half
            for b in range(len(BANDS)):
                refl = reflectance(day, b, labels) + (0.01 if name == "d2b" else 0.0)
                values[:, :, t, b][clear] = np.round(refl * 10000)[clear] / 10000
            valid[:, :, t] |= clear
    return values, valid


def test_items_are_matched_filtered_and_grouped_by_day(catalog):
    folder, info = catalog
    pipe = _pipe(folder, info)
    sensor = pipe.sensors[0]
    assert isinstance(sensor, StacSensor) and pipe.sensor_keys == ["sentinel2l2a"]
    # d3 (eo:cloud_cover 90 > 50) and d5 (after end_date) are left out; d2's two items make one day
    assert pipe.raw_dates == [20230301, 20230311, 20230321]
    assert sensor.settings["items"] == [["S2_d1_31TCJ"], ["S2_d2a_31TCJ", "S2_d2b_31TCJ"], ["S2_d4_31TCJ"]]
    assert sensor.settings["dn_offsets"] == [[-1000.0], [0.0, -1000.0], [0.0]]
    assert pipe.grid.width == WIDTH and pipe.grid.height == HEIGHT and pipe.grid.resolution == 10.0
    assert pipe.feature_names[:2] == ["sentinel2l2a_b02_20230301", "sentinel2l2a_b03_20230301"]
    assert pipe.components == [b.lower() for b in BANDS] + ["ndvi", "ndwi", "brightness"]
    no_ceiling = _pipe(folder, info, "stac.max_cloud_cover=None")
    assert no_ceiling.raw_dates == [20230301, 20230311, 20230316, 20230321]
    no_end = _pipe(folder, info, "stac.end_date=None", "stac.start_date='2023-03-05'")
    assert no_end.raw_dates == [20230311, 20230321, 20230420]
    by_grid_code = _pipe(folder, info, "stac.tile_property=['grid:code']")
    assert by_grid_code.raw_dates == pipe.raw_dates
    named = _pipe(folder, info, "stac.name='s2'", "stac.temporal_resolution=5")
    assert named.sensor_keys == ["s2"] and named.feature_names[0] == "s2_b02_20230301"
    assert named.dates == [20230301, 20230306, 20230311, 20230316, 20230321, 20230326, 20230331]
    assert len(pipe.dates) == 4  # the profile's 10 days


def test_tile_codes():
    assert tile_code("T31TCJ") == tile_code("31tcj") == tile_code("MGRS-31TCJ") == "31TCJ"
    assert tile_code("198030") == "198030" and tile_code("TILE") == "TILE"


def test_values_are_scaled_offset_masked_and_mosaicked(catalog):
    folder, info = catalog
    pipe = _pipe(folder, info)
    values, valid = pipe.sensors[0].read(FULL, pipe.grid)
    want_values, want_valid = _expected(info)
    np.testing.assert_array_equal(valid, want_valid)
    np.testing.assert_allclose(values[valid], want_values[valid], atol=1e-6)
    assert (values[~valid] == 0).all()
    b02, b11 = BANDS.index("B02"), BANDS.index("B11")
    labels = info["labels"]
    # the mosaic: d2a (earlier) where it is clear, d2b (+0.01) under d2a's cloud and right of its nodata
    assert values[10, 1, 1, b02] == pytest.approx(round(reflectance("d2", b02, labels)[10, 1] * 1e4) / 1e4)
    assert values[14, 5, 1, b02] == pytest.approx(round((reflectance("d2", b02, labels)[14, 5] + 0.01) * 1e4) / 1e4)
    assert values[10, 25, 1, b02] == pytest.approx(round((reflectance("d2", b02, labels)[10, 25] + 0.01) * 1e4) / 1e4)
    assert not valid[0:4, :, 1].any() and valid[4:, :, 1].all()  # cloudy in both items of d2
    assert not valid[20:24, 28:36, 0].any()  # d1's cloud shadow (SCL 3, 20 m)
    # baseline 04.00: the files hold DN + 1000, the values are the reflectance
    assert values[10, 1, 0, b11] == pytest.approx(round(reflectance("d1", b11, labels)[10, 1] * 1e4) / 1e4)
    # a window cut through 20 m pixels reads the same values
    part_values, part_valid = pipe.sensors[0].read(Window(3, 5, 13, 9), pipe.grid)
    np.testing.assert_array_equal(part_valid, valid[5:14, 3:16])
    np.testing.assert_array_equal(part_values, values[5:14, 3:16])


def test_features_do_not_depend_on_how_the_band_files_are_cut(catalog, monkeypatch):
    """Read block tile by block tile (8 x 16 px tiles here), in strips of a few pixels, the features
    and the clear-date counts are those of the whole window read at once."""
    from sitsflow import features as features_module

    folder, info = catalog
    pipe = _pipe(folder, info)
    whole = pipe.features(FULL)
    assert pipe.sensors[0].band_files and pipe.sensors[0].block_rows > 1  # the COGs' blocks
    pipe.sensors[0].block_rows, pipe.sensors[0].block_cols = 8, 16
    monkeypatch.setattr(features_module.reader, "READ_BUDGET_BYTES", 1)
    parts = pipe.read_windows(FULL)
    assert len(parts) > 30 and all(int(p.width) <= 16 for p in parts)
    cut = pipe.features(FULL)
    np.testing.assert_array_equal(cut.values, whole.values)
    np.testing.assert_array_equal(cut.rows, whole.rows)
    np.testing.assert_array_equal(cut.cols, whole.cols)
    np.testing.assert_array_equal(cut.clear_dates, whole.clear_dates)


def test_clouds_are_gap_filled_and_indices_computed(catalog):
    folder, info = catalog
    pipe = _pipe(folder, info)
    block = pipe.features(FULL)
    comps, dates = pipe.components, pipe.dates
    values, valid = pipe.sensors[0].read(FULL, pipe.grid)
    i = int(np.nonzero((block.rows == 1) & (block.cols == 1))[0][0])  # cloudy on d2 (20230311)
    assert not valid[1, 1, 1]
    b02 = comps.index("b02")
    assert block.values[i, dates.index(20230311), b02] == pytest.approx(
        (values[1, 1, 0, 0] + values[1, 1, 2, 0]) / 2, abs=1e-6
    )
    assert np.isfinite(block.values).all()
    b04, b08 = (block.values[..., comps.index(b)] for b in ("b04", "b08"))
    np.testing.assert_allclose(block.values[..., comps.index("ndvi")], (b08 - b04) / (b08 + b04), rtol=1e-5)


def test_assets_and_mask_keys(catalog):
    folder, info = catalog
    full = _pipe(folder, info)
    values, valid = full.sensors[0].read(FULL, full.grid)
    two = _pipe(folder, info, "stac.assets=['B08', 'B04']", "arg_train.features=[]")
    assert two.components == ["b04", "b08"]  # in the profile's order
    v2, ok2 = two.sensors[0].read(FULL, two.grid)
    np.testing.assert_array_equal(ok2, valid)
    np.testing.assert_array_equal(v2, values[..., [BANDS.index("B04"), BANDS.index("B08")]])
    with pytest.raises(BadInputError, match=r"stac.assets: .*need the assets \['B08', 'B04', 'B11'\]"):
        _pipe(folder, info, "stac.assets=['B02']")
    # every SCL value clear: d1's shadow and d2's clouds are read (d2a's clouds win the mosaic)
    anything = _pipe(folder, info, "stac.mask_clear_values=[]")
    _, ok = anything.sensors[0].read(FULL, anything.grid)
    assert ok[20:24, 28:36, 0].all() and ok[0:4, 0:20, 1].all()
    # SCL as bits: bit 3 set (8, 9: clouds) is invalid, 3 (shadow: bits 0 and 1) is not
    bits = _pipe(folder, info, "stac.mask_clear_values=[]", "stac.mask_invalid_bits=[3]")
    _, ok = bits.sensors[0].read(FULL, bits.grid)
    assert ok[20:24, 28:36, 0].all() and not ok[0:4, :, 1].any()
    np.testing.assert_array_equal(ok[4:, :, 1], valid[4:, :, 1])


def test_bad_input_names_the_key_tile_and_item(catalog, tmp_path):
    folder, info = catalog
    with pytest.raises(ConfigError, match=r"stac\.profile.*sentinel-2-l2a"):
        _cfg(folder, info, "stac.profile='sentinel-3'")
    with pytest.raises(ConfigError, match=r"stac\.assets.*'B99'"):
        _cfg(folder, info, "stac.assets=['B02', 'B99']")
    with pytest.raises(BadInputError, match=r"no item of tile 'T32ULU'.*s2:mgrs_tile") as err:
        FeaturePipeline(_cfg(folder, info), "T32ULU")
    assert err.value.exit_code == 2
    with pytest.raises(BadInputError, match=r"no item of tile 'T31TCJ'.*0 of the collections"):
        _pipe(folder, info, "stac.collections=['landsat-c2-l2']")
    assert _pipe(folder, info, "stac.collections=['sentinel-2-l2a']").raw_dates == [20230301, 20230311, 20230321]
    with pytest.raises(BadInputError, match=r"0 whose other:prop names the tile"):
        _pipe(folder, info, "stac.tile_property=['other:prop']")
    # an item without one of the band assets
    broken = tmp_path / "broken"
    write_catalog(broken)
    item_json = next((broken / "stac").rglob("S2_d2b_31TCJ.json"))
    doc = json.loads(item_json.read_text())
    del doc["assets"]["B05"]
    item_json.write_text(json.dumps(doc))
    with pytest.raises(BadInputError, match=r"stac.assets: item 'S2_d2b_31TCJ' .* has no asset 'B05'"):
        _pipe(broken, info, catalog=str(broken / "stac" / "catalog.json"))
    # an item in another CRS than the tile grid (without chain.proj): exit 2 naming the asset
    other = tmp_path / "B02_utm30.tif"
    with rasterio.open(broken / "items" / "d4" / "B02.tif") as src:
        profile, data = src.profile, src.read(1)
    with rasterio.open(other, "w", **(profile | {"crs": "EPSG:32630"})) as dst:
        dst.write(data, 1)
    doc["assets"]["B05"] = {"href": str(broken / "items" / "d2b" / "B05.tif")}
    item_json.write_text(json.dumps(doc))
    d4 = next((broken / "stac").rglob("S2_d4_31TCJ.json"))
    doc = json.loads(d4.read_text())
    doc["assets"]["B02"]["href"] = str(other)
    d4.write_text(json.dumps(doc))
    pipe = _pipe(broken, info, catalog=str(broken / "stac" / "catalog.json"))
    with pytest.raises(BadInputError, match=r"'S2_d4_31TCJ' \(20230321\), asset 'B02'.*every raster of a tile must share"):
        pipe.sensors[0].read(FULL, pipe.grid)
    # with chain.proj it is warped: labelled UTM 30, it lies far off the tile, so that day is empty
    warped = _pipe(broken, info, "chain.proj='EPSG:32631'", catalog=str(broken / "stac" / "catalog.json"))
    assert warped.grid.transform == pipe.grid.transform and warped.grid.resampled
    values, valid = warped.sensors[0].read(FULL, warped.grid)
    day = warped.raw_dates.index(20230321)
    assert not valid[:, :, day].any() and valid[:, :, :day].any()
    missing = tmp_path / "nowhere" / "catalog.json"
    with pytest.raises(BadInputError, match=r"stac.catalog: .*nowhere/catalog.json"):
        _pipe(folder, info, catalog=str(missing))
    # the command line: exit 2 naming the tile
    cfg = write_config(folder, info["catalog"], name="bad.cfg").read_text().replace("T31TCJ", "T32ULU")
    (tmp_path / "bad.cfg").write_text(cfg.replace("polygons.geojson", str(folder / "polygons.geojson")))
    proc = subprocess.run([sys.executable, "-m", "sitsflow", "prepare", "--config", str(tmp_path / "bad.cfg")],
                          capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert proc.returncode == 2 and "no item of tile 'T32ULU'" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.s3
def test_the_catalog_and_cogs_are_read_in_place_on_s3(catalog, s3_bucket):
    folder, info = catalog
    uri = upload(folder, s3_bucket)
    local = _pipe(folder, info)
    remote = _pipe(folder, info, catalog=uri)
    sensor = remote.sensors[0]
    assert all(f.startswith(f"{s3_bucket}/data/") for f in sensor.input_files())
    assert remote.raw_dates == local.raw_dates and remote.grid == local.grid
    window = Window(7, 3, 20, 15)
    for a, b in zip(sensor.read(window, remote.grid), local.sensors[0].read(window, local.grid)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.s3
def test_the_catalog_and_cogs_are_read_over_http(catalog, s3_server, s3_bucket, tmp_path):
    """The S3 server's public objects are plain http URLs: the catalog read by GET, the COGs
    through GDAL's /vsicurl/, with the values of the local (and s3://) catalog."""
    folder, info = catalog
    url = upload(folder, s3_bucket, public=s3_server)
    assert url.startswith("http://127.0.0.1:")
    local = _pipe(folder, info)
    remote = _pipe(folder, info, catalog=url)
    sensor = remote.sensors[0]
    files = sensor.input_files()
    assert files[0] == url and all(f.startswith(url.rsplit("/stac/", 1)[0] + "/items/") for f in files[1:])
    assert storage.rasterio_path(files[1]) == f"/vsicurl/{files[1]}"
    assert remote.raw_dates == local.raw_dates and remote.grid == local.grid
    window = Window(7, 3, 20, 15)
    expected = local.sensors[0].read(window, local.grid)
    for a, b in zip(sensor.read(window, remote.grid), expected):
        np.testing.assert_array_equal(a, b)
    # a local catalog whose asset hrefs are absolute http URLs (as Earth Search's items)
    absolute = tmp_path / "absolute"
    write_catalog(absolute, href_base=url.rsplit("/stac/", 1)[0])
    pipe = _pipe(absolute, info, catalog=str(absolute / "stac" / "catalog.json"))
    files = pipe.sensors[0].input_files()
    assert files[0] == str(absolute / "stac" / "catalog.json") and all(f.startswith("http://") for f in files[1:])
    for a, b in zip(pipe.sensors[0].read(window, pipe.grid), expected):
        np.testing.assert_array_equal(a, b)
    # an asset that is not there: exit 2 naming the URL, the item and the band
    item_json = next((absolute / "stac").rglob("S2_d4_31TCJ.json"))
    doc = json.loads(item_json.read_text())
    doc["assets"]["B03"]["href"] = gone = doc["assets"]["B03"]["href"].replace("B03.tif", "gone.tif")
    item_json.write_text(json.dumps(doc))
    pipe = _pipe(absolute, info, catalog=str(absolute / "stac" / "catalog.json"))
    with pytest.raises(BadInputError, match=r"no such file or object") as err:
        pipe.sensors[0].read(window, pipe.grid)
    assert gone in str(err.value) and "'S2_d4_31TCJ' (20230321), asset 'B03'" in str(err.value)
    assert err.value.exit_code == 2


def test_earth_search_asset_keys(catalog, tmp_path):
    """A catalog keyed as Earth Search (blue ... swir22, scl, the tile only in grid:code) read
    with stac.asset_keys='earth-search': the profile's band names, the same values."""
    folder, info = catalog
    es = tmp_path / "es"
    write_catalog(es, keys="earth-search")
    cat = str(es / "stac" / "catalog.json")
    with pytest.raises(BadInputError, match=r"no item of tile 'T31TCJ'.*s2:mgrs_tile"):
        _pipe(es, info, catalog=cat)
    with pytest.raises(BadInputError, match=r"has no asset 'B02' \(its assets: \['blue', 'green'"):
        _pipe(es, info, "stac.tile_property=['grid:code']", catalog=cat)
    pipe = _pipe(es, info, "stac.asset_keys='earth-search'", catalog=cat)
    local = _pipe(folder, info)
    assert pipe.components == local.components and pipe.sensors[0].mask_asset == "scl"
    assert pipe.sensors[0].groups[0][0].assets["B08"].endswith("/B08.tif")  # Earth Search's 'nir'
    for a, b in zip(pipe.sensors[0].read(FULL, pipe.grid), local.sensors[0].read(FULL, local.grid)):
        np.testing.assert_array_equal(a, b)
    two = _pipe(
        es, info, "stac.asset_keys='earth-search'", "stac.assets=['B08', 'B04']", "arg_train.features=[]", catalog=cat
    )
    assert two.components == ["b04", "b08"]
    with pytest.raises(ConfigError, match=r"stac\.asset_keys.*known with the asset keys of \['planetary-computer'\]"):
        _cfg(folder, info, "stac.profile='landsat-c2-l2'", "stac.asset_keys='earth-search'")
    with pytest.raises(ConfigError, match=r"stac\.catalog: expected a local path, an s3:// URI or an http\(s\):// URL"):
        _cfg(folder, info, catalog="ftp://example.com/catalog.json")


def test_landsat_profile_scale_offset_and_qa_pixel_bits(tmp_path):
    """One Landsat C2 L2 item at 30 m: SR = DN * 2.75e-5 - 0.2; QA_PIXEL bits 0-4 set are invalid
    (bit 6 clear and bit 7 water are not)."""
    bands = ("blue", "green", "red", "nir08", "swir16", "swir22")
    transform = from_origin(500000, 4000000, 30, 30)
    dn = {b: np.full((4, 5), 10000 + 1000 * i, np.uint16) for i, b in enumerate(bands)}
    qa = np.full((4, 5), 1 << 6, np.uint16)  # clear
    qa[0, 0] |= 1 << 3  # cloud
    qa[0, 1] |= 1 << 4  # cloud shadow
    qa[0, 2] = 1  # fill
    qa[1, 0] |= 1 << 7  # water: clear
    dn["red"][3, 4] = 0  # nodata
    item = pystac.Item("LC09_L2SP_198030_20230305", None, None, dt.datetime(2023, 3, 5, 10, tzinfo=dt.UTC),
                       {"landsat:wrs_path": "198", "landsat:wrs_row": "030", "eo:cloud_cover": 12.0},
                       collection="landsat-c2-l2")
    for name, data in {**dn, "qa_pixel": qa}.items():
        path = tmp_path / f"{name}.tif"
        with rasterio.open(path, "w", driver="GTiff", dtype="uint16", count=1, width=5, height=4,
                           crs="EPSG:32631", transform=transform) as dst:
            dst.write(data, 1)
        item.add_asset(name, pystac.Asset(str(path)))
    cat = pystac.Catalog("landsat", "one item")
    cat.add_item(item)
    cat.normalize_hrefs(str(tmp_path / "stac"))
    cat.save(pystac.CatalogType.SELF_CONTAINED)
    text = write_config(tmp_path, str(tmp_path / "stac" / "catalog.json")).read_text()
    text = text.replace("T31TCJ", "198030").replace("sentinel-2-l2a", "landsat-c2-l2")
    (tmp_path / "l.cfg").write_text(text)
    cfg = load_config(str(tmp_path / "l.cfg"))
    sensor = StacSensor.build(cfg, "198030")
    grid = sensor.native_grid()
    values, valid = sensor.read(Window(0, 0, 5, 4), grid)
    assert sensor.key == "landsatc2l2" and sensor.bands == list(bands) and sensor.temporal_resolution == 16
    assert sensor.roles == {"red": "red", "nir": "nir08", "swir": "swir16"}
    want = np.ones((4, 5), bool)
    want[0, 0:3] = False
    want[3, 4] = False
    np.testing.assert_array_equal(valid[:, :, 0], want)
    np.testing.assert_allclose(values[1, 0, 0], [(10000 + 1000 * i) * 2.75e-5 - 0.2 for i in range(6)], rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", pytest.param("s3", marks=pytest.mark.s3)])
def test_sampling_to_final_map_from_the_catalog(catalog, tmp_path, request, where):
    from test_stages import _pipeline

    folder, info = catalog
    uri = info["catalog"] if where == "local" else upload(folder, request.getfixturevalue("s3_bucket"))
    cfg = _cfg(folder, info, f"chain.output_path='{tmp_path / 'out'}'", epochs=30, catalog=uri)
    assert all(f.startswith(uri.rsplit("/", 2)[0]) for f in FeaturePipeline(cfg, TILE).input_files())
    _pipeline(cfg)
    out = cfg.chain.output_path
    with rasterio.open(layout.final_classif(out, 0)) as src:
        assert (src.width, src.height, src.transform) == (WIDTH, HEIGHT, from_origin(300000, 5000000, 10, 10))
        classif = src.read(1)
    labels = info["labels"]
    assert (classif[6:26] == labels[6:26]).mean() > 0.9
    report = json.loads(storage.read_text(layout.final_results_json(out)))
    assert report["seeds"][0]["overall_accuracy"] > 0.9


def _s1_catalog(folder: Path) -> str:
    """Two Sentinel-1 RTC items of tile 31TCJ (grid:code): 2023-03-02 ascending, 2023-03-05
    descending; VV = 0.1 * (col + 1), VH = VV / 5, nodata -32768 at (0, 0), 0 at (1, 1)."""
    transform = from_origin(300000, 5000000, 10, 10)
    cat = pystac.Catalog("s1", "two RTC items")
    for day, orbit in ((2, "ascending"), (5, "descending")):
        item = pystac.Item(f"S1_{day}", None, None, dt.datetime(2023, 3, day, 6, tzinfo=dt.UTC),
                           {"grid:code": "MGRS-31TCJ", "sat:orbit_state": orbit}, collection="sentinel-1-rtc")
        vv = np.broadcast_to(0.1 * (np.arange(6, dtype=np.float32) + 1) * day, (4, 6)).copy()
        vv[0, 0], vv[1, 1] = -32768, 0
        for name, data in (("vv", vv), ("vh", np.where(vv > 0, vv / 5, vv))):
            path = folder / f"{name}_{day}.tif"
            with rasterio.open(path, "w", driver="GTiff", dtype="float32", count=1, width=6, height=4,
                               crs="EPSG:32631", transform=transform, nodata=-32768) as dst:
                dst.write(data, 1)
            item.add_asset(name, pystac.Asset(str(path)))
        cat.add_item(item)
    cat.normalize_hrefs(str(folder / "stac"))
    cat.save(pystac.CatalogType.SELF_CONTAINED)
    text = write_config(folder, str(folder / "stac" / "catalog.json"), name="s1.cfg").read_text()
    (folder / "s1.cfg").write_text(text.replace("sentinel-2-l2a", "sentinel-1-rtc").replace("max_cloud_cover : 50", ""))
    return str(folder / "s1.cfg")


def test_sentinel1_rtc_profile_linear_db_and_orbits(tmp_path):
    cfg = _s1_catalog(tmp_path)
    linear = StacSensor.build(load_config(cfg), TILE)
    assert linear.bands == ["vv", "vh"] and linear.indices == [] and linear.roles == {}
    assert linear.raw_dates == [20230302, 20230305] and linear.temporal_resolution == 12
    grid = linear.native_grid()
    values, valid = linear.read(Window(0, 0, 6, 4), grid)
    assert not valid[0, 0].any() and valid[1, 1].all() and valid.sum() == 2 * 23
    np.testing.assert_allclose(values[2, 3, 1], [0.4 * 5, 0.4 * 5 / 5], rtol=1e-6)
    db = StacSensor.build(load_config(cfg, ["stac.db=True"]), TILE)
    dvalues, dvalid = db.read(Window(0, 0, 6, 4), grid)
    assert not dvalid[1, 1].any() and dvalid.sum() == 2 * 22  # 0 has no decibel value
    np.testing.assert_allclose(dvalues[dvalid], 10 * np.log10(values[dvalid]), rtol=1e-5)
    pipe = FeaturePipeline(load_config(cfg, ["stac.orbit_state='descending'"]), TILE)
    assert pipe.raw_dates == [20230305] and pipe.components == ["vv", "vh"]
    assert pipe.feature_names[:2] == ["sentinel1rtc_vv_20230305", "sentinel1rtc_vh_20230305"]
    with pytest.raises(ConfigError, match=r"stac\.db.*backscatter profile"):
        _cfg(tmp_path, {"catalog": str(tmp_path / "stac" / "catalog.json")}, "stac.db=True")
    with pytest.raises(ConfigError, match=r"stac\.mask_clear_values.*no mask asset"):
        load_config(cfg, ["stac.mask_clear_values=[1]"])


class FakeStacApi:
    """A FAKE STAC API on 127.0.0.1 (no real server is installable here): a landing page and
    POST /search over a fixed list of item dicts, honouring collections, datetime, ``intersects``
    and the Query extension's ``in`` / ``lte``, in pages of ``limit`` items (``next`` links); the first
    ``fail`` searches answer HTTP 503. It records the search bodies."""

    CONFORMS = ["https://api.stacspec.org/v1.0.0/core", "https://api.stacspec.org/v1.0.0/item-search",
                "https://api.stacspec.org/v1.0.0/item-search#query"]

    def __init__(self, items: list[dict], fail: int = 0, limit: int = 2) -> None:
        import http.server
        import threading

        self.items, self.fail, self.limit, self.searches = items, fail, limit, []
        api = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status: int, doc: dict) -> None:
                body = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                self._send(200, {"type": "Catalog", "id": "fake", "description": "a fake STAC API",
                                 "stac_version": "1.0.0", "conformsTo": api.CONFORMS,
                                 "links": [{"rel": "self", "href": api.url}, {"rel": "root", "href": api.url},
                                           {"rel": "search", "href": f"{api.url}/search", "method": "POST",
                                            "type": "application/geo+json"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                api.searches.append(body)
                if api.fail:
                    api.fail -= 1
                    return self._send(503, {"code": "Unavailable", "description": "try later"})
                found = [i for i in api.items if api.matches(i, body)]
                start = int(body.get("token", 0))
                links = []
                if start + api.limit < len(found):
                    links.append({"rel": "next", "href": f"{api.url}/search", "method": "POST",
                                  "body": {**body, "token": start + api.limit}, "merge": False})
                self._send(200, {"type": "FeatureCollection", "features": found[start:start + api.limit],
                                 "links": links})

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @staticmethod
    def matches(item: dict, body: dict) -> bool:
        props = item["properties"]
        if body.get("collections") and item.get("collection") not in body["collections"]:
            return False
        start, _, end = body.get("datetime", "../..").partition("/")
        if (start != ".." and props["datetime"] < start) or (end != ".." and props["datetime"] > end):
            return False
        if body.get("intersects"):
            import shapely.geometry

            area = shapely.geometry.shape(body["intersects"])
            if not item.get("geometry") or not area.intersects(shapely.geometry.shape(item["geometry"])):
                return False
        for name, ops in (body.get("query") or {}).items():
            value = props.get(name)
            if "in" in ops and value not in ops["in"]:
                return False
            if "lte" in ops and (value is None or value > ops["lte"]):
                return False
        return True

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _api_items(info: dict) -> list[dict]:
    cat = pystac.Catalog.from_file(info["catalog"])
    cat.make_all_asset_hrefs_absolute()
    out = []
    for item in cat.get_items(recursive=True):
        doc = item.to_dict(include_self_link=False, transform_hrefs=False)
        doc["links"] = []
        out.append(doc)
    return out


def test_a_stac_api_is_searched_for_the_tile(catalog, tmp_path, monkeypatch):
    folder, info = catalog
    api = FakeStacApi(_api_items(info), fail=1)
    monkeypatch.setenv("SITSFLOW_STORAGE_BACKOFF", "0")
    try:
        text = write_config(folder, "", name="api.cfg").read_text().replace("catalog : ''", f"api : '{api.url}'")
        (folder / "api.cfg").write_text(text)
        cfg = load_config(str(folder / "api.cfg"), ["stac.collections=['sentinel-2-l2a']"])
        pipe = FeaturePipeline(cfg, TILE)
        local = _pipe(folder, info)
        # the first search failed (503) and was retried; the tile, dates, collections and cloud
        # cover went to the API, the results came in pages of 2
        searches = [s for s in api.searches if "token" not in s]
        assert len(searches) >= 2 and len(api.searches) > len(searches)
        query = searches[-1]["query"]
        assert query["s2:mgrs_tile"] == {"in": ["31TCJ", "MGRS-31TCJ", "T31TCJ"]}
        assert query["eo:cloud_cover"] == {"lte": 50.0}
        assert searches[-1]["collections"] == ["sentinel-2-l2a"] and searches[-1]["datetime"].endswith("/2023-04-01T23:59:59Z")
        assert pipe.raw_dates == local.raw_dates and pipe.sensors[0].settings["items"] == local.sensors[0].settings["items"]
        for a, b in zip(pipe.sensors[0].read(FULL, pipe.grid), local.sensors[0].read(FULL, local.grid)):
            np.testing.assert_array_equal(a, b)
        with pytest.raises(BadInputError, match=r"no item of tile 'T32ULU' in http://127"):
            FeaturePipeline(cfg, "T32ULU")
        with pytest.raises(ConfigError, match=r"stac\.catalog: give one of catalog .* and api"):
            load_config(str(folder / "api.cfg"), [f"stac.catalog='{info['catalog']}'"])
    finally:
        api.close()
    # an API that stays unreachable: exit 75 after the storage retries
    monkeypatch.setenv("SITSFLOW_STORAGE_RETRIES", "2")
    with pytest.raises(TransientError, match=r"search http://127.0.0.1:\d+: failed after 2 attempt") as err:
        FeaturePipeline(cfg, TILE)
    assert err.value.exit_code == 75


@pytest.mark.filterwarnings("ignore::pystac_client.warnings.NoConformsTo")  # the case under test
def test_a_stac_api_that_is_a_static_catalog_exits_2(catalog, tmp_path):
    """pystac-client raises its conformance 'warnings' for a URL that is no searchable API: bad
    input naming stac.api, not a crash (review finding)."""
    import functools
    import http.server
    import threading

    folder, info = catalog
    root = Path(info["catalog"]).parent
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{Path(info['catalog']).name}"
        text = write_config(folder, "", name="static_api.cfg").read_text().replace("catalog : ''", f"api : '{url}'")
        (folder / "static_api.cfg").write_text(text)
        cfg = load_config(str(folder / "static_api.cfg"))
        with pytest.raises(BadInputError, match=r"stac\.api: http://127.* is not a STAC API with item search"):
            FeaturePipeline(cfg, TILE)
    finally:
        server.shutdown()
        server.server_close()


def test_the_stac_sensor_combines_with_a_dated_raster(catalog, tmp_path):
    folder, info = catalog
    path = tmp_path / "ndvi.tif"
    with rasterio.open(path, "w", driver="GTiff", dtype="float32", count=2, width=WIDTH // 2, height=HEIGHT // 2,
                       crs="EPSG:32631", transform=from_origin(300000, 5000000, 20, 20)) as dst:
        dst.write(np.stack([np.full((HEIGHT // 2, WIDTH // 2), v, np.float32) for v in (0.3, 0.5)]))
        dst.descriptions = ("2023-03-04", "2023-03-24")
    extra = f"dated_raster:\n{{\n  name : 'own'\n  path : '{path}'\n  bands : ['ndvi']\n}}\n"
    cfg = load_config(str(write_config(folder, info["catalog"], extra=extra, name="two.cfg")))
    pipe = FeaturePipeline(cfg, TILE)
    assert pipe.sensor_keys == ["sentinel2l2a", "own"] and pipe.grid.resolution == 10.0
    assert pipe.components[0] == "sentinel2l2a_b02" and pipe.components[-1] == "own_ndvi"
    block = pipe.features(FULL)
    own = block.values[..., pipe.components.index("own_ndvi")]
    np.testing.assert_allclose(own[:, pipe.dates.index(20230311)], 0.3 + 0.2 * 7 / 20, rtol=1e-5)


@pytest.mark.parametrize(
    "prop, value, allowed",
    [("s2:processing_baseline", "four", "a number like '04.00'"), ("eo:cloud_cover", "cloudy", "a number")],
)
def test_a_malformed_item_property_is_bad_input_naming_the_item(catalog, tmp_path, prop, value, allowed):
    folder, info = catalog
    broken = tmp_path / "broken"
    write_catalog(broken)
    item_json = next((broken / "stac").rglob("S2_d2b_31TCJ.json"))
    doc = json.loads(item_json.read_text())
    doc["properties"][prop] = value
    item_json.write_text(json.dumps(doc))
    with pytest.raises(BadInputError, match=rf"stac.catalog: item 'S2_d2b_31TCJ' .*{prop} {value!r}.*{allowed}") as err:
        _pipe(broken, info, catalog=str(broken / "stac" / "catalog.json"))
    assert err.value.exit_code == 2


@pytest.mark.s3
def test_remote_band_files_read_tile_by_tile_on_acquisition_threads(catalog, s3_bucket, monkeypatch):
    """COGs on S3 whose block rows do not fit in GDAL's cache are read block tile by block tile, each
    acquisition on its own thread: the features and clear-date counts of the whole window read
    locally at once."""
    from sitsflow import features as features_module
    from sitsflow.sensors import base

    folder, info = catalog
    whole = _pipe(folder, info).features(FULL)
    remote = _pipe(folder, info, catalog=upload(folder, s3_bucket))
    sensor = remote.sensors[0]
    assert sensor.remote and sensor.sample_bytes == 2
    sensor.block_rows, sensor.block_cols = 8, 16
    monkeypatch.setattr(features_module.reader, "READ_BUDGET_BYTES", 1)
    monkeypatch.setattr(storage, "gdal_cache_allowed", lambda: 0)  # no block row fits
    monkeypatch.setattr(storage, "gdal_cache_at_least", lambda nbytes: 0)
    threads: set[str] = set()
    read = base.per_acquisition

    def spy(count, fn, spread):
        assert spread
        return read(count, lambda t: (threads.add(threading.current_thread().name), fn(t)), spread)

    monkeypatch.setattr("sitsflow.sensors.stac.per_acquisition", spy)
    parts = remote.read_windows(FULL)
    assert remote.reader.tile_by_tile and all(int(p.width) <= 16 for p in parts)
    cut = remote.features(FULL)
    np.testing.assert_array_equal(cut.values, whole.values)
    np.testing.assert_array_equal(cut.clear_dates, whole.clear_dates)
    assert len(threads) == len(remote.raw_dates) and all(n.startswith("sitsflow-acq") for n in threads)
