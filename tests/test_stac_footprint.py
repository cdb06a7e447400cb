"""``stac.tiles``: items matched to a tile by their footprint (no grid code) and read on the
footprint's grid. Landsat-like scenes in two UTM zones (EPSG:32631 and EPSG:32632) cover one
footprint (tests/stac_catalog.py :func:`write_footprint_catalog`): values warped close to the
scenes', masks holding only QA_PIXEL codes, partial coverage missing, the STAC API searched with
the footprint, bad input, and a run to the final map."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import rasterio.warp
from rasterio.windows import Window

from sitsflow import layout, storage
from sitsflow.config import load_config
from sitsflow.errors import BadInputError, ConfigError
from sitsflow.features import FeaturePipeline
from sitsflow.sensors.stac import StacSensor
from stac_catalog import (
    FP_BBOX,
    FP_HEIGHT,
    FP_RES,
    FP_TILE,
    FP_WIDTH,
    LANDSAT,
    QA_CLEAR,
    QA_CLOUD,
    fp_classes,
    fp_reflectance,
    fp_stac_block,
    write_config,
    write_footprint_catalog,
)

FULL = Window(0, 0, FP_WIDTH, FP_HEIGHT)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fp")
    return folder, write_footprint_catalog(folder)


def _cfg(folder: Path, block: str, *overrides: str, name: str = "fp.cfg", epochs: int = 3):
    text = write_config(folder, "", stac=block, name=name, epochs=epochs).read_text()
    text = text.replace("T31TCJ", FP_TILE).replace("polygons.geojson", "fp_polygons.geojson")
    (folder / name).write_text(text)
    return load_config(str(folder / name), list(overrides))


def _centres():
    """x (EPSG:32631) and longitude of the tile grid's pixel centres."""
    cols, rows = np.meshgrid(np.arange(FP_WIDTH) + 0.5, np.arange(FP_HEIGHT) + 0.5)
    x = FP_BBOX[0] + cols * FP_RES
    y = FP_BBOX[3] - rows * FP_RES
    lon, _ = rasterio.warp.transform("EPSG:32631", "EPSG:4326", x.ravel(), y.ravel())
    return x, np.reshape(lon, x.shape), rows.astype(int)


def _covered(info: dict, scene: str, margin: float) -> np.ndarray:
    """Tile pixels whose centre lies ``margin`` pixels inside the scene's extent (outside: < 0)."""
    crs, left, bottom, right, top = info["extents"][scene]
    x, _, rows = _centres()
    y = FP_BBOX[3] - (rows + 0.5) * FP_RES
    xs, ys = rasterio.warp.transform("EPSG:32631", crs, x.ravel(), y.ravel())
    xs, ys, m = np.reshape(xs, x.shape), np.reshape(ys, x.shape), margin * FP_RES
    return (xs > left + m) & (xs < right - m) & (ys > bottom + m) & (ys < top - m)


def test_scenes_of_two_utm_zones_are_read_on_the_footprint_grid(scenes):
    folder, info = scenes
    cfg = _cfg(folder, fp_stac_block(info["catalog"]))
    pipe = FeaturePipeline(cfg, FP_TILE)
    sensor = pipe.sensors[0]
    # the far scene is left out; the others grouped by day, in datetime order (west first)
    assert sensor.settings["items"] == [["LC09_w1", "LC09_e1"], ["LC09_e2"], ["LC09_w3", "LC09_e3"]]
    grid = pipe.grid
    assert (grid.width, grid.height, grid.crs.to_string()) == (FP_WIDTH, FP_HEIGHT, "EPSG:32631")
    assert tuple(grid.transform)[:6] == (FP_RES, 0.0, FP_BBOX[0], 0.0, -FP_RES, FP_BBOX[3])
    values, valid = sensor.read(FULL, grid)
    x, lon, rows = _centres()
    stripe = (x - FP_BBOX[0]) % 360
    clean = (stripe > 3 * FP_RES) & (stripe < 360 - 3 * FP_RES)  # away from the class edges
    west, east = _covered(info, "w1", 3), _covered(info, "e1", 2)  # well inside each scene
    for t, day in enumerate(("d1", "d2", "d3")):
        if day == "d2":  # only the eastern scene: off its footprint, pixels are missing
            assert not valid[:, :, t][~_covered(info, "e2", -1)].any()
            assert valid[:, :, t][east].all()
        else:
            cloud = ~valid[:, :, t]
            assert 0 < cloud.sum() < 150 and not cloud[east].any()  # the western scene's cloud block only
        for b in range(len(LANDSAT.assets)):
            # pixels of the western scene come from it (first of the day), the others from the eastern
            from_west = west & (day != "d2")
            from_east = east & ~_covered(info, "w1", -2) if day != "d2" else east
            want = np.where(from_west, fp_reflectance(day, b, x, lon, False), fp_reflectance(day, b, x, lon, True))
            check = valid[:, :, t] & clean & (from_west | from_east)
            err = np.abs(values[:, :, t, b] - want)[check]
            assert check.sum() > 1000 and err.max() < 0.01, (day, b, err.max())


def test_masks_hold_only_source_codes(scenes):
    folder, info = scenes
    sensor = StacSensor.build(_cfg(folder, fp_stac_block(info["catalog"])), FP_TILE)
    grid = sensor.native_grid()
    west, east = sensor.groups[0]
    mask, inside = sensor._read_asset(west, "qa_pixel", FULL, grid, "int64", mask=True)
    assert set(np.unique(mask[0][inside])) == {QA_CLEAR, QA_CLOUD}
    assert inside[_covered(info, "w1", 1)].all() and not inside[~_covered(info, "w1", -1)].any()
    mask, inside = sensor._read_asset(east, "qa_pixel", FULL, grid, "int64", mask=True)
    assert set(np.unique(mask[0][inside])) == {QA_CLEAR}
    assert inside[_covered(info, "e1", 1)].all() and not inside[~_covered(info, "e1", -1)].any()


def test_footprint_with_a_tile_property_and_bad_input(scenes, tmp_path):
    folder, info = scenes
    # a tile property, when set, is matched as well: none of these scenes has it
    cfg = _cfg(folder, fp_stac_block(info["catalog"], tile_property=["landsat:wrs_path"]))
    with pytest.raises(
        BadInputError,
        match=r"stac: no item of tile 'T31TGL' .*\(6 items; 5 whose geometry "
        r"intersects the footprint \(stac.tiles\), 0 whose landsat:wrs_path names the tile",
    ):
        StacSensor.build(cfg, FP_TILE)
    # a footprint nothing covers: the count of each filter, naming stac.tiles
    far = fp_stac_block(info["catalog"]).replace("735300.0, 4986300.0, 737700.0", "335300.0, 4986300.0, 337700.0")
    with pytest.raises(
        BadInputError,
        match=r"no item of tile 'T31TGL' .*6 items; 0 whose geometry intersects .*"
        r"stac.tiles sets the footprint",
    ):
        StacSensor.build(_cfg(folder, far), FP_TILE)
    # a tile of chain.list_tile without a footprint
    cfg = _cfg(folder, fp_stac_block(info["catalog"]))
    with pytest.raises(BadInputError, match=r"stac.tiles has no footprint for tile 'T32ULU' .*\['T31TGL'\]"):
        StacSensor.build(cfg, "T32ULU")
    with pytest.raises(ConfigError, match=r"stac.tiles has no footprint for tile 'T32ULU'"):
        from sitsflow.features.grid import check_tile_grids

        check_tile_grids(_cfg(folder, fp_stac_block(info["catalog"]), "chain.list_tile='T31TGL T32ULU'"))
    bad = {
        "bbox": (
            "[735300.0, 4986300.0, 737700.0, 4988100.0]",
            "[737700, 4986300, 735300, 4988100]",
            r"stac\.tiles.*T31TGL\.bbox .*minx < maxx",
        ),
        "crs": ('"EPSG:32631"', '"EPSG:99999"', r"stac\.tiles.*T31TGL\.crs 'EPSG:99999' is not a horizontal CRS"),
        "resolution": ('"resolution" : 30.0', '"resolution" : -30', r"stac\.tiles.*T31TGL\.resolution -30"),
    }
    for old, new, message in bad.values():
        block = fp_stac_block(info["catalog"]).replace(old, new)
        assert block != fp_stac_block(info["catalog"])
        with pytest.raises(ConfigError, match=message):
            _cfg(folder, block, name="bad.cfg")


def test_a_stac_api_is_searched_with_the_footprint(scenes):
    from test_stac_source import FakeStacApi, _api_items

    folder, info = scenes
    api = FakeStacApi(_api_items(info))
    try:
        block = fp_stac_block(info["catalog"]).replace(f'catalog : "{info["catalog"]}"', f'api : "{api.url}"')
        pipe = FeaturePipeline(_cfg(folder, block, name="api.cfg"), FP_TILE)
        search = [s for s in api.searches if "token" not in s][-1]
        assert search["intersects"]["type"] == "Polygon" and "query" not in search
        lon, lat = np.array(search["intersects"]["coordinates"][0]).T
        xs, ys = rasterio.warp.transform("EPSG:4326", "EPSG:32631", lon, lat)  # the footprint, edges densified
        np.testing.assert_allclose([min(xs), min(ys), max(xs), max(ys)], FP_BBOX, atol=0.01)
        assert len(lon) > 100
        # the API answered the 5 scenes over the footprint (not the far one), the items kept as from the catalog
        assert sum(api.matches(item, search) for item in api.items) == 5
        local = FeaturePipeline(_cfg(folder, fp_stac_block(info["catalog"])), FP_TILE)
        assert pipe.sensors[0].settings["items"] == local.sensors[0].settings["items"]
    finally:
        api.close()


@pytest.mark.slow
def test_footprint_run_to_the_final_map(scenes, tmp_path):
    from test_stages import _pipeline

    folder, info = scenes
    cfg = _cfg(folder, fp_stac_block(info["catalog"]), f"chain.output_path='{tmp_path / 'out'}'", epochs=30)
    _pipeline(cfg)
    out = cfg.chain.output_path
    with rasterio.open(layout.final_classif(out, 0)) as src:
        assert (src.width, src.height, src.crs.to_string()) == (FP_WIDTH, FP_HEIGHT, "EPSG:32631")
        classif = src.read(1)
    x, _, rows = _centres()
    inner = (rows > 5) & (rows < FP_HEIGHT - 5) & ((x - FP_BBOX[0]) % 360 > 60) & ((x - FP_BBOX[0]) % 360 < 300)
    assert (classif[inner] == fp_classes(x)[inner]).mean() > 0.9
    report = json.loads(storage.read_text(layout.final_results_json(out)))
    assert report["seeds"][0]["overall_accuracy"] > 0.9


def test_footprint_grid_snapping_pixel_sizes_and_tile_spellings(scenes):
    from sitsflow.sensors.stac import footprint_for, footprint_grid

    folder, info = scenes
    # corners snapped outward to multiples of the pixel size; [x, y] pixel sizes
    grid = footprint_grid(
        {"bbox": (735310.0, 4986290.0, 737701.0, 4988100.0), "crs": "EPSG:32631", "resolution": (30.0, 60.0)}
    )
    assert (grid.width, grid.height, grid.resampled) == (81, 31, True)
    assert tuple(grid.transform)[:6] == (30.0, 0.0, 735300.0, 0.0, -60.0, 4988100.0)
    # a footprint named 31TGL serves tile T31TGL (the spellings tile_property equates)
    assert footprint_for({"31TGL": {"bbox": FP_BBOX}}, FP_TILE, "stac")["bbox"] == FP_BBOX
    block = fp_stac_block(info["catalog"]).replace('"T31TGL" :', '"31TGL" :').replace("30.0}", "[30, 60]}")
    sensor = StacSensor.build(_cfg(folder, block, name="spell.cfg"), FP_TILE)
    assert (sensor.native_grid().width, sensor.native_grid().height) == (FP_WIDTH, FP_HEIGHT // 2)


def test_a_finer_sensor_sets_the_grid_and_the_footprint_items_are_warped_onto_it(scenes, tmp_path):
    """A 10 m dated raster over the footprint (EPSG:32631, not warped) sets the tile grid: the
    footprint's items (30 m, both UTM zones, off that grid) are warped onto it all the same."""
    folder, info = scenes
    path = tmp_path / "own.tif"
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        dtype="float32",
        count=1,
        width=FP_WIDTH * 3,
        height=FP_HEIGHT * 3,
        crs="EPSG:32631",
        transform=rasterio.transform.from_origin(FP_BBOX[0], FP_BBOX[3], 10, 10),
    ) as dst:
        dst.write(np.full((1, FP_HEIGHT * 3, FP_WIDTH * 3), 0.5, np.float32))
        dst.descriptions = ("2023-03-10",)
    extra = f"dated_raster:\n{{\n  name : 'own'\n  path : '{path}'\n  bands : ['b']\n}}\n"
    text = write_config(folder, "", stac=fp_stac_block(info["catalog"]), extra=extra, name="fine.cfg").read_text()
    (folder / "fine.cfg").write_text(text.replace("T31TCJ", FP_TILE).replace("polygons.geojson", "fp_polygons.geojson"))
    pipe = FeaturePipeline(load_config(str(folder / "fine.cfg")), FP_TILE)
    assert pipe.grid.resolution == 10.0 and not pipe.grid.resampled
    values, valid = pipe.sensors[0].read(Window(0, 0, FP_WIDTH * 3, FP_HEIGHT * 3), pipe.grid)
    coarse, coarse_valid = pipe.sensors[0].read(FULL, pipe.sensors[0].native_grid())
    # the 10 m read agrees with the 30 m one at the 30 m pixels' centres (away from class edges)
    x, _, _ = _centres()
    stripe = (x - FP_BBOX[0]) % 360
    clean = (stripe > 3 * FP_RES) & (stripe < 360 - 3 * FP_RES) & coarse_valid[:, :, 0] & valid[1::3, 1::3, 0]
    assert clean.sum() > 1000
    np.testing.assert_allclose(values[1::3, 1::3, 0][clean], coarse[:, :, 0][clean], atol=0.01)
