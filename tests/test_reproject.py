"""chain.proj / chain.spatial_resolution: the tile grid is the target grid and every input is
warped onto it when read (cubic for reflectances, nearest for masks), windowed."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.transform import array_bounds, from_origin
from rasterio.warp import reproject, transform_bounds
from rasterio.windows import Window

from sitsflow.config import load_config
from sitsflow.errors import BadInputError
from sitsflow.features import FeaturePipeline, tile_grid
from sitsflow.sensors.base import MASKS, VALUES, Grid, read_on_grid

from synthetic import write_config, write_scene


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reproject")
    info = write_scene(folder, width=60, height=48, nb_dates=6)
    return folder, info


def _grid(folder, *sets: str) -> Grid:
    return tile_grid(load_config(str(write_config(folder)), list(sets)), "T1")


# ------------------------------------------------------------------------------------ the grid
def test_without_the_keys_the_grid_is_the_inputs_grid(scene):
    folder, info = scene
    grid = _grid(folder)
    with rasterio.open(info["series"]) as src:
        assert (grid.width, grid.height, grid.transform, grid.crs) == (src.width, src.height, src.transform, src.crs)
    assert not grid.resampled


def test_a_coarser_pixel_in_the_inputs_crs_is_anchored_at_their_corner(scene):
    folder, info = scene
    grid = _grid(folder, "chain.spatial_resolution=20")
    with rasterio.open(info["series"]) as src:
        assert grid.crs == src.crs
        assert grid.transform == from_origin(src.transform.c, src.transform.f, 20, 20)
        assert (grid.width, grid.height) == (30, 24)
    same = _grid(folder, "chain.spatial_resolution=[10, 10]")
    assert (same.width, same.height, same.transform) == (60, 48, from_origin(300000, 5000000, 10, 10))
    assert _grid(folder, "chain.spatial_resolution=[20, 30]").transform == from_origin(300000, 5000000, 20, 30)


def test_another_crs_covers_the_footprint_with_corners_on_multiples_of_the_pixel(scene):
    folder, info = scene
    grid = _grid(folder, "chain.proj='EPSG:3035'", "chain.spatial_resolution=20")
    assert grid.crs == CRS.from_epsg(3035) and grid.resampled
    t = grid.transform
    assert (t.a, t.e) == (20, -20) and t.c % 20 == 0 and t.f % 20 == 0
    with rasterio.open(info["series"]) as src:
        need = transform_bounds(src.crs, grid.crs, *src.bounds, densify_pts=21)
    left, bottom, right, top = array_bounds(grid.height, grid.width, t)
    assert left <= need[0] and bottom <= need[1] and right >= need[2] and top >= need[3]
    assert right - need[2] < 20 and need[0] - left < 20  # no spare column
    # the pixel size defaults to the inputs' (same units) ...
    assert _grid(folder, "chain.proj='EPSG:3035'").transform.a == 10
    # ... or to GDAL's suggestion (degrees)
    geo = _grid(folder, "chain.proj='EPSG:4326'")
    assert geo.crs == CRS.from_epsg(4326) and 1e-5 < geo.transform.a < 1e-3


def test_the_finest_sensor_is_found_in_the_target_crs():
    """0.001 degree (~100 m) pixels are coarser than 20 m ones, though 0.001 < 20."""
    from types import SimpleNamespace

    from sitsflow.features.grid import finest_grid

    def sensor(crs, transform, size):
        grid = Grid(size, size, transform, CRS.from_user_input(crs))
        return SimpleNamespace(section=crs, native_grid=lambda: grid, static=False)

    coarse = sensor("EPSG:4326", from_origin(2.0, 45.0, 0.001, 0.001), 20)
    fine = sensor("EPSG:32631", from_origin(500000, 4983000, 20, 20), 100)
    grid = finest_grid([coarse, fine], "T", proj="EPSG:3035")
    assert grid.transform.a == 20 and grid.crs == CRS.from_epsg(3035)
    with pytest.raises(BadInputError, match="share one CRS, or set chain.proj"):
        finest_grid([coarse, fine], "T")


def test_sensors_in_two_crss_need_chain_proj(scene, tmp_path):
    """A Sentinel-2 product in EPSG:32631 and a dated raster in EPSG:3035 combine onto chain.proj's grid."""
    from generate_products import ORIGIN, write_products, write_theia_config

    info = write_products(tmp_path / "data", width=36, height=24, nb_dates=3, landsat=False)
    scene_info = write_scene(tmp_path / "dr", width=36, height=24, nb_dates=4, origin=ORIGIN, tile="T31TCJ",
                             polygons_per_class=1, cloud_fraction=0.0)
    # the dated raster, reprojected to EPSG:3035 at 10 m (nearest: its values stay the scene's)
    for name in ("series", "mask"):
        with rasterio.open(scene_info[name]) as src:
            dst_t, w, h = rasterio.warp.calculate_default_transform(
                src.crs, "EPSG:3035", src.width, src.height, *src.bounds, resolution=10)
            out = np.zeros((src.count, h, w), src.dtypes[0])
            reproject(src.read(), out, src_transform=src.transform, src_crs=src.crs, dst_transform=dst_t,
                      dst_crs="EPSG:3035", resampling=Resampling.nearest,
                      dst_nodata=np.nan if name == "series" else 1)
            profile = src.profile | {"crs": "EPSG:3035", "transform": dst_t, "width": w, "height": h}
            descriptions = src.descriptions
        with rasterio.open(scene_info[name], "w", **profile) as dst:
            dst.write(out)
            for i, d in enumerate(descriptions, 1):
                if d:
                    dst.set_band_description(i, d)
    extra = f"""
dated_raster:
{{
  name : 'synth'
  path : '{tmp_path}/dr/{{tile}}/series.tif'
  bands : ['red', 'nir']
  mask_path : '{tmp_path}/dr/{{tile}}/clouds.tif'
  temporal_resolution : 8
}}
"""
    path = write_theia_config(tmp_path, data=str(tmp_path / "data"), extra=extra)
    with pytest.raises(BadInputError, match="share one CRS, or set chain.proj"):
        FeaturePipeline(load_config(str(path)), "T31TCJ")
    pipe = FeaturePipeline(load_config(str(path), ["chain.proj='EPSG:32631'"]), "T31TCJ")
    s2, dr = pipe.sensors
    assert pipe.grid.crs == CRS.from_epsg(32631) and pipe.grid.transform.a == 10
    assert (pipe.grid.width, pipe.grid.height) == (36, 24)  # Sentinel-2's own grid: read as is
    window = Window(0, 0, pipe.grid.width, pipe.grid.height)
    values, valid = dr.read(window, pipe.grid)
    clear = ~scene_info["clouds"].astype(bool)  # (dates, h, w)
    labels = np.pad(scene_info["label_map"], 2, mode="edge")
    inner = np.zeros(clear.shape[1:], bool)
    inner[2:-2, 2:-2] = True  # the reprojected raster's edges are partly off the footprint
    for dr_, dc in ((-2, 0), (2, 0), (0, -2), (0, 2)):  # and away from class edges (cubic blends them)
        inner &= labels[2 + dr_:labels.shape[0] - 2 + dr_, 2 + dc:labels.shape[1] - 2 + dc] == scene_info["label_map"]
    for t in range(values.shape[2]):
        both = valid[:, :, t] & clear[t] & inner
        assert both.sum() > 0.5 * (clear[t] & inner).sum()
        err = np.abs(values[:, :, t, :] - scene_info["data"][t].transpose(1, 2, 0))[both]
        assert np.median(err) < 0.03, np.median(err)  # twice resampled, the scene's values back
    s2_values, s2_valid = s2.read(window, pipe.grid)
    assert s2_valid.mean() > 0.5 and np.isfinite(s2_values).all()
    block = pipe.features(window)
    assert block.values.shape[0] > 0.9 * 36 * 24 and np.isfinite(block.values).mean() > 0.9
    assert {c.split("_")[0] for c in pipe.components} == {s2.prefix, dr.prefix}


# ------------------------------------------------------------------------------------ reading
def _raster(path, data, crs="EPSG:32631", transform=from_origin(300000, 5000000, 10, 10), nodata=None):
    profile = {"driver": "GTiff", "dtype": str(data.dtype), "count": data.shape[0], "width": data.shape[2],
               "height": data.shape[1], "crs": crs, "transform": transform, "nodata": nodata}
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path


def _target(path, res=15.0, crs="EPSG:3035", pad=3) -> Grid:
    with rasterio.open(path) as src:
        b = transform_bounds(src.crs, crs, *src.bounds)
    x0, y1 = np.floor(b[0] / res) * res - pad * res, np.ceil(b[3] / res) * res + pad * res
    w, h = int(np.ceil((b[2] - x0) / res)) + pad, int(np.ceil((y1 - b[1]) / res)) + pad
    return Grid(w, h, from_origin(x0, y1, res, res), CRS.from_user_input(crs), resampled=True)


def test_masks_are_resampled_by_nearest_neighbour_values_by_cubic_convolution(tmp_path):
    rng = np.random.default_rng(0)
    codes = np.array([0, 1, 2, 4, 8, 100], np.uint8)
    mask = codes[rng.integers(0, len(codes), (1, 40, 50))]
    path = _raster(tmp_path / "mask.tif", mask)
    grid = _target(path)
    window = Window(0, 0, grid.width, grid.height)
    with rasterio.open(path) as src:
        nearest, inside = read_on_grid(src, window, grid, [1], "mask", fill=255, resampling=MASKS)
        cubic, _ = read_on_grid(src, window, grid, [1], "mask", fill=255, resampling=VALUES)
    assert 0.3 < inside.mean() < 0.95  # the grid overhangs the footprint
    assert set(np.unique(nearest[0][inside]).tolist()) == set(codes.tolist())
    assert (nearest[0][~inside] == 255).all()
    # the test can fail: interpolating the same mask does invent values
    assert set(np.unique(cubic[0][inside]).tolist()) - set(codes.tolist())


def test_a_warped_read_does_not_depend_on_the_window(tmp_path):
    rng = np.random.default_rng(1)
    data = (rng.normal(1000, 300, (4, 70, 90))).astype(np.int16)
    path = _raster(tmp_path / "series.tif", data)
    grid = _target(path, res=20.0)
    with rasterio.open(path) as src:
        whole, inside = read_on_grid(src, Window(0, 0, grid.width, grid.height), grid, [1, 2, 3, 4], "s",
                                     resampling=VALUES, dtype="int16", pixel_major=True)
        pieces = np.empty_like(whole)
        for r in range(0, grid.height, 13):
            for c in range(0, grid.width, 17):
                win = Window(c, r, min(17, grid.width - c), min(13, grid.height - r))
                part, _ = read_on_grid(src, win, grid, [1, 2, 3, 4], "s", resampling=VALUES, dtype="int16",
                                       pixel_major=True)
                pieces[r:r + int(win.height), c:c + int(win.width)] = part
    assert inside.any() and np.array_equal(whole, pieces)


def test_a_warped_read_wider_than_a_block_with_nodata_equals_small_reads(tmp_path):
    """GDAL warps a read wider than one block of the VRT in other chunks and, with a nodata value,
    gives other values there (99 % of the pixels differed before the reads went block by block):
    inference's wide parts must see what sampling's small windows see."""
    rng = np.random.default_rng(0)
    data = (rng.random((2, 900, 900)) * 1000).astype("float32")
    data[0, 100:200, 100:300] = -9999
    path = tmp_path / "wide.tif"
    with rasterio.open(path, "w", driver="GTiff", width=900, height=900, count=2, dtype="float32", tiled=True,
                       crs="EPSG:32631", transform=from_origin(500000, 5000000, 10, 10)) as dst:
        dst.write(data)
    west, south, east, north = transform_bounds("EPSG:32631", "EPSG:3035", 500000, 4991000, 509000, 5000000)
    size = (int((east - west) // 7), int((north - south) // 7))
    grid = Grid(*size, from_origin(west, north, 7, 7), CRS.from_epsg(3035), resampled=True)
    with rasterio.open(path) as src:
        wide, _ = read_on_grid(src, Window(0, 0, 1024, 256), grid, [1, 2], "s", resampling=VALUES, nodata=-9999)
        tiles = np.empty_like(wide)
        for r in range(0, 256, 128):
            for c in range(0, 1024, 128):
                tiles[:, r:r + 128, c:c + 128], _ = read_on_grid(src, Window(c, r, 128, 128), grid, [1, 2], "s",
                                                                 resampling=VALUES, nodata=-9999)
    assert (wide == -9999).any() and np.array_equal(wide, tiles, equal_nan=True)


def test_nodata_stays_out_of_the_interpolation_band_by_band(tmp_path):
    """One date nodata over half the raster, the next valid everywhere: interpolation never mixes
    the nodata value in (the next date is not spoiled, the first is nodata or a reflectance)."""
    data = np.full((2, 60, 60), 1000, np.int16)
    data[0, :, :30] = -10000
    data[1] += np.arange(60, dtype=np.int16)[None, :] * 10
    path = _raster(tmp_path / "series.tif", data)
    grid = _target(path)
    with rasterio.open(path) as src:
        out, inside = read_on_grid(src, Window(0, 0, grid.width, grid.height), grid, [1, 2], "s",
                                   resampling=VALUES, nodata=-10000)
    first, second = out[0][inside], out[1][inside]
    assert ((first == -10000) | (np.abs(first - 1000) < 1)).all() and (first == -10000).any()
    assert (first == 1000).any()
    assert second.min() >= 1000 - 60 and second.max() <= 1590 + 60  # cubic overshoot at most
    assert np.isnan(out[:, ~inside]).all()  # off the footprint: the fill value
    # without nodata the same read blends -10000 in (the test can fail)
    with rasterio.open(path) as src:
        blended, _ = read_on_grid(src, Window(0, 0, grid.width, grid.height), grid, [1, 2], "s",
                                  resampling=VALUES)
    assert ((blended[0][inside] > -9000) & (blended[0][inside] < 900)).any()


def test_without_a_target_grid_a_raster_off_the_grid_is_refused(tmp_path):
    path = _raster(tmp_path / "r.tif", np.zeros((1, 10, 10), np.int16), crs="EPSG:3035")
    grid = Grid(10, 10, from_origin(300000, 5000000, 10, 10), CRS.from_epsg(32631))
    with rasterio.open(path) as src, pytest.raises(BadInputError, match="set chain.proj"):
        read_on_grid(src, Window(0, 0, 10, 10), grid, [1], "r.tif")


def test_warped_reads_from_s3_equal_local_ones(tmp_path, s3_bucket):
    """THEIA products on S3 (/vsis3/), read onto EPSG:3035 at 20 m: the same values as from disk."""
    from generate_products import upload, write_products, write_theia_config

    write_products(tmp_path / "data", width=24, height=18, nb_dates=2, landsat=False)
    remote = upload(tmp_path / "data", s3_bucket)
    sets = ["chain.proj='EPSG:3035'", "chain.spatial_resolution=20"]
    blocks = []
    for data in (str(tmp_path / "data"), remote):
        cfg = load_config(str(write_theia_config(tmp_path, data=data, name=f"c{len(blocks)}.cfg")), sets)
        pipe = FeaturePipeline(cfg, "T31TCJ")
        assert pipe.grid.crs == CRS.from_epsg(3035) and pipe.grid.resampled
        blocks.append(pipe.sensors[0].read(Window(0, 0, pipe.grid.width, pipe.grid.height), pipe.grid))
    (local, local_valid), (s3, s3_valid) = blocks
    assert local_valid.any() and not local_valid.all()  # the grid's corners are off the footprint
    assert np.array_equal(local_valid, s3_valid) and np.array_equal(local, s3)


# ------------------------------------------------------------------------------------ end to end
@pytest.mark.e2e
@pytest.mark.slow
def test_sitsflow_run_maps_on_the_grid_asked(tmp_path):
    """Inputs in EPSG:32631 at 10 m, maps asked in EPSG:3035 at 20 m: every product and its STAC item
    is on that grid, and the map follows the scene's known class stripes."""
    import json

    from sitsflow import cli, layout

    info = write_scene(tmp_path, width=60, height=48, nb_dates=8, polygons_per_class=1, cloud_fraction=0.1)
    path = write_config(tmp_path, epochs=20, chunks=2)
    path.write_text(path.read_text().replace(
        "  data_field : 'code'\n", "  data_field : 'code'\n  proj : 'EPSG:3035'\n  spatial_resolution : 20\n", 1))
    assert cli.main(["run", str(path), "--no-progress"]) == 0
    out = str(tmp_path / "output")
    grid = _grid(tmp_path, "chain.proj='EPSG:3035'", "chain.spatial_resolution=20")
    for uri in (layout.final_classif(out, 0), layout.final_confidence(out, 0), layout.final_validity(out)):
        with rasterio.open(uri) as src:
            assert src.crs == CRS.from_epsg(3035) and src.res == (20.0, 20.0)
            assert src.transform == grid.transform and (src.width, src.height) == (grid.width, grid.height)
        item = json.loads(open(layout.final_stac_item(out, layout.product_id(uri))).read())
        assert item["properties"]["proj:code"] == "EPSG:3035"
        assert item["properties"]["proj:transform"][:6] == pytest.approx(list(grid.transform)[:6])
    with rasterio.open(layout.final_classif(out, 0)) as src:
        labels = src.read(1)
    # the scene's labels (10 m, EPSG:32631) on the grid asked, nearest; compared away from class edges
    truth = np.zeros((grid.height, grid.width), np.int32)
    with rasterio.open(info["series"]) as src:
        reproject(info["label_map"], truth, src_transform=src.transform, src_crs=src.crs,
                  dst_transform=grid.transform, dst_crs=grid.crs, resampling=Resampling.nearest, dst_nodata=0)
    pad = np.pad(truth, 1)
    uniform = np.ones_like(truth, bool)
    for dr_, dc in ((-1, 0), (1, 0), (0, -1), (0, 1), (-1, -1), (1, 1), (-1, 1), (1, -1)):
        uniform &= pad[1 + dr_:pad.shape[0] - 1 + dr_, 1 + dc:pad.shape[1] - 1 + dc] == truth
    core = uniform & (truth > 0)
    assert core.sum() > 100
    assert (labels[core] == truth[core]).mean() > 0.9, (labels[core] == truth[core]).mean()
    off = np.ones_like(truth, bool)
    with rasterio.open(info["series"]) as src:
        footprint = np.zeros_like(truth, np.uint8)
        reproject(np.ones((src.height, src.width), np.uint8), footprint, src_transform=src.transform,
                  src_crs=src.crs, dst_transform=grid.transform, dst_crs=grid.crs, dst_nodata=0)
    off &= footprint == 0
    assert off.any() and (labels[off] == 0).all()  # the grid's corners off the inputs: no class
