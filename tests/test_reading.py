"""How windows are read: pixel-major reads, reused buffers, sub-windows on block boundaries, the
cheap nodata probe, and the inference stage's read-ahead. Each speed device must leave the
features and the maps exactly as they were."""

from __future__ import annotations

import importlib.util
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin
from rasterio.windows import Window

from sitsflow import features as features_module
from sitsflow import inference, layout, nn, process
from sitsflow.config import load_config
from sitsflow.errors import BadInputError, TransientError
from sitsflow.features import FeaturePipeline, ReadBuffers
from sitsflow.process import tune_for_inference
from sitsflow.sensors.base import read_on_grid

ROOT = Path(__file__).resolve().parents[1]
NODATA = -10000


def _bench():
    spec = importlib.util.spec_from_file_location("bench_inference", ROOT / "bench" / "inference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_stack(path: Path, *, width=70, height=52, nb_dates=6, nb_bands=3, block=16, dtype="int16", seed=0):
    """A pixel-interleaved tiled stack: a nodata triangle (outside the swath, every band of every
    date), scattered nodata bands (their date is invalid) and, for floats, NaNs."""
    rng = np.random.default_rng(seed)
    data = rng.integers(100, 5000, (nb_dates * nb_bands, height, width)).astype(dtype)
    yy, xx = np.mgrid[0:height, 0:width]
    data[:, yy > xx * 0.6 + 20] = NODATA  # lower-left triangle: no data at all
    holes = rng.random((nb_dates * nb_bands, height, width)) < 0.05
    data[holes] = NODATA
    if np.dtype(dtype).kind == "f":
        data[rng.random(data.shape) < 0.02] = np.nan
    profile = {"driver": "GTiff", "dtype": dtype, "count": data.shape[0], "width": width, "height": height,
               "crs": "EPSG:32631", "transform": from_origin(300000, 5000000, 10, 10), "nodata": NODATA,
               "tiled": True, "blockxsize": block, "blockysize": block, "interleave": "pixel", "compress": "deflate"}
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        for t in range(nb_dates):
            for b in range(nb_bands):
                dst.set_band_description(t * nb_bands + b + 1, f"2021-{t + 1:02d}-05")
    return data


def stack_config(folder: Path, raster: Path, nb_bands: int = 3) -> Path:
    """The benchmark's configuration (scale 0.0001, nodata -10000) for ``raster``."""
    return _bench().write_config(folder, raster, nb_bands, folder / "out")


@pytest.fixture()
def stack(tmp_path):
    raster = tmp_path / "stack.tif"
    data = write_stack(raster)
    cfg = load_config(str(stack_config(tmp_path, raster)))
    return cfg, data


def test_read_buffers_hand_out_the_same_memory_per_key():
    buffers = ReadBuffers()
    a = buffers.get("x", (4, 5), np.float32)
    b = buffers.get("x", (2, 3), np.int16)  # smaller: the same memory
    assert np.shares_memory(a, b) and b.shape == (2, 3) and b.dtype == np.int16
    c = buffers.get("x", (10, 10), np.float64)  # larger: new memory, kept from now on
    assert not np.shares_memory(a, c) and np.shares_memory(c, buffers.get("x", (10,), np.float64))
    assert not np.shares_memory(c, buffers.get("y", (10,), np.float64))
    assert buffers.nbytes >= 800


@pytest.mark.parametrize("window", [Window(5, 7, 33, 21), Window(-10, 40, 30, 20), Window(100, 0, 5, 5)])
def test_pixel_major_reads_equal_band_sequential_ones(tmp_path, window):
    raster = tmp_path / "s.tif"
    write_stack(raster, width=60, height=50)
    coarse = tmp_path / "coarse.tif"  # 20 m pixels on the 10 m grid: nearest neighbour
    write_stack(coarse, width=30, height=25, seed=1)
    with rasterio.open(coarse, "r+") as dst:
        dst.transform = from_origin(300000, 5000000, 20, 20)
    with rasterio.open(raster) as src:
        grid = features_module.Grid(src.width, src.height, src.transform, src.crs)
    for path in (raster, coarse):
        with rasterio.open(path) as src:
            bands, inside = read_on_grid(src, window, grid, [1, 5, 7], "s", dtype="int16")
            pixels, inside2 = read_on_grid(src, window, grid, [1, 5, 7], "s", dtype="int16", pixel_major=True)
            out = np.full((int(window.height), int(window.width), 3), 7, np.int16)
            into, _ = read_on_grid(src, window, grid, [1, 5, 7], "s", dtype="int16", pixel_major=True, out=out)
            with pytest.raises(ValueError, match="expected"):
                read_on_grid(src, window, grid, [1, 5, 7], "s", dtype="float32", pixel_major=True, out=out)
        np.testing.assert_array_equal(pixels, bands.transpose(1, 2, 0))
        np.testing.assert_array_equal(into, pixels)
        assert into is out and np.array_equal(inside, inside2)


def test_read_windows_tile_the_window_on_block_boundaries(stack, monkeypatch):
    cfg, _ = stack
    pipe = FeaturePipeline(cfg, "T0")
    window = Window(3, 5, 61, 44)  # odd offsets: the first parts stop at the next block boundary
    strips = pipe.read_windows(window)
    monkeypatch.setattr(features_module.reader, "READ_BUDGET_BYTES", 1)
    tiles = pipe.read_windows(window)
    assert all(int(p.width) == 61 for p in strips)
    assert len(tiles) > len(strips) and any(int(p.width) < 61 for p in tiles)
    for parts in (strips, tiles):
        cover = np.zeros((44, 61), int)
        for p in parts:
            r, c = int(p.row_off) - 5, int(p.col_off) - 3
            cover[r : r + int(p.height), c : c + int(p.width)] += 1
            # every cut is on a block boundary (16 px) or the window's edge
            assert int(p.row_off) in (5,) or int(p.row_off) % 16 == 0
            assert int(p.col_off) in (3,) or int(p.col_off) % 16 == 0
        assert (cover == 1).all()
    # at least READ_MIN_BLOCKS blocks side by side, so that GDAL decodes them in parallel
    assert all(int(p.width) >= min(61, 16 * features_module.reader.READ_MIN_BLOCKS) or int(p.col_off) + int(p.width) == 64
               or int(p.col_off) == 3 for p in tiles)


def test_single_band_files_are_read_block_tile_by_block_tile_within_the_budget(monkeypatch):
    """Local sensors of single-band files (products, STAC): each part inside one source block tile,
    tiles in row-major order, the tile's strips top to bottom, each within the budget; the window
    covered once. (A read across blocks of such a file would decode them all again for every strip.)"""
    from types import SimpleNamespace

    def sensor(band_files: bool, where: str = "/data/"):
        return SimpleNamespace(raw_dates=[1] * 4, bands=["a", "b", "c"], block_rows=16, block_cols=16,
                               band_files=band_files, input_files=lambda: [where + "b.tif"], sample_bytes=2, block_samples=1,
                               remote=where.startswith("s3://"))

    window = Window(3, 5, 61, 44)
    per_pixel = 4 * (3 + 1) * 4 * 2  # the reader's estimate: dates x (bands + mask) x float32 x 2
    monkeypatch.setattr(features_module.reader, "READ_BUDGET_BYTES", 40 * per_pixel)  # 40 px per part
    parts = features_module.WindowReader([sensor(True)], None).read_windows(window)
    cover = np.zeros((44, 61), int)
    tiles = []
    for p in parts:
        r, c, h, w = int(p.row_off), int(p.col_off), int(p.height), int(p.width)
        assert r // 16 == (r + h - 1) // 16 and c // 16 == (c + w - 1) // 16  # inside one block tile
        assert h * w <= 40 or h == 1
        cover[r - 5 : r - 5 + h, c - 3 : c - 3 + w] += 1
        tiles.append((r // 16, c // 16))
    assert (cover == 1).all()
    assert tiles == sorted(tiles)  # block tile after block tile
    assert len(set(tiles)) == len(range(5 // 16, 48 // 16 + 1)) * len(range(3 // 16, 63 // 16 + 1))
    # the same reader on an interleaved raster keeps its parts of at least two blocks side by side
    interleaved = features_module.WindowReader([sensor(False)], None).read_windows(window)
    assert any(int(p.width) > 16 for p in interleaved)
    # single-band files on object storage keep the strips across blocks (one request per block row)
    # when GDAL's block cache holds a block row of every file (see test_band_file_reads.py)
    remote = features_module.WindowReader([sensor(True, "s3://bucket/")], None)
    assert not remote.tile_by_tile
    monkeypatch.setattr(features_module.reader, "READ_BUDGET_BYTES", 130 * per_pixel)  # 2 rows of 61 px
    strips = remote.read_windows(window)  # whole-width strips of the budget's rows, blocks ignored
    assert not remote.tile_by_tile
    assert all(int(p.width) == 61 and int(p.height) <= 2 for p in strips)
    assert sum(int(p.height) for p in strips) == 44


def test_features_do_not_depend_on_parts_buffers_or_probing(stack, monkeypatch):
    cfg, data = stack
    pipe = FeaturePipeline(cfg, "T0")
    window = Window(0, 0, 70, 52)
    whole = pipe.features(window)
    # the values are the scaled inputs of the dates where no band is nodata
    raw = data.reshape(6, 3, 52, 70)
    valid = ~(raw == NODATA).any(axis=1)
    assert np.array_equal(whole.clear_dates, valid.sum(axis=0))
    assert whole.rows.size == int((valid.sum(axis=0) > 0).sum())
    assert np.all(np.diff(whole.rows.astype(np.int64) * 70 + whole.cols) > 0)  # row-major
    monkeypatch.setattr(features_module.reader, "READ_BUDGET_BYTES", 1)
    assert len(pipe.read_windows(window)) > 4
    for kwargs in ({}, {"probe": True}):
        tiled = pipe.features(window, **kwargs)
        for name in ("values", "rows", "cols", "clear_dates"):
            np.testing.assert_array_equal(getattr(tiled, name), getattr(whole, name))
    buffers = ReadBuffers()
    for part in pipe.read_windows(window):
        one = pipe.features(part, buffers=buffers, probe=True)
        sel = (whole.rows >= part.row_off) & (whole.rows < part.row_off + part.height) & \
              (whole.cols >= part.col_off) & (whole.cols < part.col_off + part.width)
        np.testing.assert_array_equal(one.values, whole.values[sel])


def test_the_probe_sees_nodata_areas_and_nothing_else(tmp_path):
    for dtype in ("int16", "float32"):
        raster = tmp_path / f"{dtype}.tif"
        write_stack(raster, dtype=dtype)
        pipe = FeaturePipeline(load_config(str(stack_config(tmp_path, raster))), "T0")
        sensor = pipe.sensors[0]
        assert sensor.surely_empty(Window(0, 40, 16, 12), pipe.grid)  # inside the triangle
        assert sensor.surely_empty(Window(-50, -50, 10, 10), pipe.grid)  # off the raster
        assert not sensor.surely_empty(Window(0, 32, 48, 20), pipe.grid)  # data in its second block
        assert not sensor.surely_empty(Window(40, 0, 16, 16), pipe.grid)
        empty = pipe.features(Window(0, 40, 16, 12), probe=True)
        assert empty.rows.size == 0 and not empty.clear_dates.any()
    # integers without a nodata value: never surely empty (and not worth a look)
    raster = tmp_path / "int16.tif"
    cfg = load_config(str(stack_config(tmp_path, raster)), ["dated_raster.nodata=None"])
    pipe = FeaturePipeline(cfg, "T0")
    assert not pipe.sensors[0].surely_empty(Window(0, 40, 16, 12), pipe.grid)


def test_inference_maps_do_not_depend_on_read_ahead_parts_or_probing(tmp_path, monkeypatch):
    bench = _bench()
    raster = tmp_path / "chunk.tif"
    bench.make_chunk(raster, 96, 5, 3, 0.4, "DEFLATE", block=16)  # the top 40 % is nodata
    cfg = load_config(str(bench.write_config(tmp_path, raster, 3, tmp_path / "out")),
                      ["arg_classification.enable_probability_map=True"])
    bench.install_model(cfg, "MLPClassifier", nb_classes=4)

    def classify(readers: int, budget: int) -> dict:
        monkeypatch.setenv("SITSFLOW_READERS", str(readers))
        monkeypatch.setattr(features_module.reader, "READ_BUDGET_BYTES", budget)
        shutil.rmtree(tmp_path / "out" / "manifests" / "inference", ignore_errors=True)
        summary = inference.run(cfg, "T0", 0, 0)
        out = cfg.chain.output_path
        maps = {}
        for kind in ("chunk_classif", "chunk_confidence", "chunk_probamap"):
            with rasterio.open(getattr(layout, kind)(out, "T0", 1, 0, 0)) as src:
                maps[kind] = src.read()
        with rasterio.open(layout.chunk_validity(out, "T0", 0)) as src:
            maps["validity"] = src.read()
        return summary, maps

    summary, reference = classify(1, 1 << 40)  # one read, no read-ahead
    assert summary["classified"] == 96 * 96 - int(96 * 0.4) * 96
    assert (reference["chunk_classif"][0, : int(96 * 0.4)] == 0).all()
    assert (reference["validity"][0, int(96 * 0.4) :] == 5).all()
    for readers in (0, 1, 2, 3):
        again, maps = classify(readers, 1)  # 16 x 32 px parts, read ahead (or not), nodata parts probed
        assert again["classified"] == summary["classified"]
        for kind, array in reference.items():
            np.testing.assert_array_equal(maps[kind], array, err_msg=f"{kind} with {readers} readers")


def test_bench_inference_runs_and_reports_both_ratios(tmp_path, capsys):
    bench = _bench()
    assert bench.main(["--size", "64", "--dates", "4", "--bands", "3", "--repeat", "1",
                       "--workdir", str(tmp_path), "--compress", "DEFLATE"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["network_alone_px_s"] > 0 and result["stage_full_px_s"] > 0
    assert 0 < result["stage_over_network"] and 0 < result["nodata90_cost_over_full"]


def test_inference_process_settings(monkeypatch):
    assert tune_for_inference() is True  # glibc: freed memory is kept for reuse
    monkeypatch.delenv("SITSFLOW_READERS", raising=False)
    assert inference.reader_threads() == inference.READERS  # remote inputs: read ahead of the network
    assert inference.reader_threads(remote=False) == 0  # local inputs on the CPU: no reading thread
    assert inference.reader_threads(gpu=True) == process.usable_cpus()  # a GPU network: every core reads
    assert inference.reader_threads(gpu=True, remote=False) == process.usable_cpus()
    monkeypatch.setenv("SITSFLOW_READERS", "3")
    assert inference.reader_threads(remote=False) == 3
    assert inference.reader_threads(gpu=True) == 3
    monkeypatch.setenv("SITSFLOW_READERS", "0")
    assert inference.reader_threads(gpu=True) == 0
    for bad in ("two", "-1", "1.5"):
        monkeypatch.setenv("SITSFLOW_READERS", bad)
        with pytest.raises(BadInputError, match="SITSFLOW_READERS must be 0"):
            inference.reader_threads()


def _eight_part_chunk(tmp_path, monkeypatch):
    """A 64 x 64 px chunk (3 dates x 2 bands, 16-px blocks) with a 3-class MLP, read in eight
    16 x 32 px parts (the read budget made tiny)."""
    bench = _bench()
    raster = tmp_path / "chunk.tif"
    bench.make_chunk(raster, 64, 3, 2, 0.0, "DEFLATE", block=16)
    cfg = load_config(str(bench.write_config(tmp_path, raster, 2, tmp_path / "out")))
    bench.install_model(cfg, "MLPClassifier", nb_classes=3)
    monkeypatch.setattr(features_module.reader, "READ_BUDGET_BYTES", 1)
    return cfg


def test_inference_reads_in_reading_threads_only_when_asked_or_remote(tmp_path, monkeypatch):
    """Local inputs on the CPU: every part is read by the classifying thread, after the previous
    part is classified; ``SITSFLOW_READERS`` > 0 or remote inputs: by reading threads."""
    cfg = _eight_part_chunk(tmp_path, monkeypatch)
    events: list[tuple[str, str]] = []
    features, classify = features_module.FeaturePipeline.features, nn.Predictor.classify

    def reading(self, *args, **kwargs):
        events.append(("read", threading.current_thread().name))
        return features(self, *args, **kwargs)

    def classifying(self, *args, **kwargs):
        events.append(("classify", threading.current_thread().name))
        return classify(self, *args, **kwargs)

    monkeypatch.setattr(features_module.FeaturePipeline, "features", reading)
    monkeypatch.setattr(nn.Predictor, "classify", classifying)

    def run(readers: str | None, remote: bool = False) -> list[tuple[str, str]]:
        events.clear()
        if readers is None:
            monkeypatch.delenv("SITSFLOW_READERS", raising=False)
        else:
            monkeypatch.setenv("SITSFLOW_READERS", readers)
        monkeypatch.setattr(features_module.reader.storage, "is_remote", lambda uri: remote)
        shutil.rmtree(tmp_path / "out" / "manifests" / "inference", ignore_errors=True)
        inference.run(cfg, "T0", 0, 0)
        return list(events)

    main = threading.current_thread().name
    parts = 8  # 64 x 64 px in 16 x 32 px parts
    assert run(None) == [("read", main), ("classify", main)] * parts  # read, classify, read ...
    assert run("0", remote=True) == [("read", main), ("classify", main)] * parts
    for readers, remote in (("2", False), (None, True)):
        seen = run(readers, remote)
        assert [n for kind, n in seen if kind == "classify"] == [main] * parts
        reading_threads = [n for kind, n in seen if kind == "read"]
        assert len(reading_threads) == parts and all(n.startswith("sitsflow-read") for n in reading_threads)


def test_inference_holds_one_set_of_buffers_without_reading_threads(tmp_path, monkeypatch):
    """Without reading threads part k + 1 is read after part k is classified: one set of buffers
    serves every part (docs/deploy.md); with N reading threads, N + 1 sets go round."""
    cfg = _eight_part_chunk(tmp_path, monkeypatch)
    made: list[ReadBuffers] = []

    class Counted(ReadBuffers):
        def __init__(self) -> None:
            super().__init__()
            made.append(self)

    monkeypatch.setattr(inference, "ReadBuffers", Counted)

    def used(readers: str) -> int:
        made.clear()
        monkeypatch.setenv("SITSFLOW_READERS", readers)
        shutil.rmtree(tmp_path / "out" / "manifests" / "inference", ignore_errors=True)
        inference.run(cfg, "T0", 0, 0)
        return sum(b.nbytes > 0 for b in made)

    assert used("0") == 1
    assert used("2") == 3


@pytest.mark.parametrize("readers", ["0", "1", "3"])
@pytest.mark.parametrize("error", [TransientError, BadInputError])
def test_a_failed_read_stops_inference_with_its_error_and_no_thread_left(tmp_path, monkeypatch, readers, error):
    """A read that fails (part 3 of 8) reaches the CLI as raised (exit 75 or 2), whether the
    classifying thread or a reading thread read it; nothing is published, no reading thread stays."""
    cfg = _eight_part_chunk(tmp_path, monkeypatch)
    monkeypatch.setenv("SITSFLOW_READERS", readers)
    features = features_module.FeaturePipeline.features
    calls = []

    def failing(self, window, *args, **kwargs):
        calls.append(window)
        if len(calls) == 3:
            raise error("read failed")
        return features(self, window, *args, **kwargs)

    monkeypatch.setattr(features_module.FeaturePipeline, "features", failing)
    with pytest.raises(error, match="read failed"):
        inference.run(cfg, "T0", 0, 0)
    assert not [t for t in threading.enumerate() if t.name.startswith(("sitsflow-read", "sitsflow-write"))]
    assert not list((tmp_path / "out").rglob("*.tif"))
    assert not (tmp_path / "out" / "manifests" / "inference").exists() or not list(
        (tmp_path / "out" / "manifests" / "inference").rglob("*")
    )


def test_inference_with_regions_gives_each_region_its_pixels_in_every_reading_mode(tmp_path, monkeypatch):
    """chain.region_path: each region's model classifies its pixels only (the parts' pixels are
    gathered into the reused buffers), whatever the reading mode; each map equals the chunk's map
    without regions on its region and 0 elsewhere, nodata parts probed included."""
    import pyogrio
    import shapely

    from sitsflow import manifest

    bench = _bench()
    raster = tmp_path / "chunk.tif"
    bench.make_chunk(raster, 64, 3, 2, 0.25, "DEFLATE", block=16)  # the top quarter is nodata
    cfg_path = bench.write_config(tmp_path, raster, 2, tmp_path / "out")
    base = load_config(str(cfg_path))
    bench.install_model(base, "MLPClassifier", nb_classes=3)
    out = base.chain.output_path
    shutil.copy(layout.model_selected(out, 1, 0), layout.model_selected(out, 2, 0))
    manifest.write_manifest(out, "sampling", "all", "bench", [], {"regions": [1, 2], "summary": {}})
    monkeypatch.setattr(features_module.reader, "READ_BUDGET_BYTES", 1)  # 16 x 32 px parts
    # region 1: columns 0-20 (a part's width is 32: parts half in it), region 2: columns 40-63,
    # none in between; two rows of region 2 are cut out of the top
    x0, y0 = 300000, 5000000
    boxes = [shapely.box(x0, y0 - 640, x0 + 210, y0), shapely.box(x0 + 400, y0 - 640, x0 + 640, y0 - 20)]
    pyogrio.raw.write(str(tmp_path / "regions.geojson"), geometry=shapely.to_wkb(np.array(boxes, dtype=object)),
                      field_data=[np.array([1, 2], np.int64)], fields=["region"], crs="EPSG:32631",
                      driver="GeoJSON", geometry_type="Polygon")
    cfg = load_config(str(cfg_path), [f"chain.region_path='{tmp_path / 'regions.geojson'}'"])
    region_map = np.zeros((64, 64), int)
    region_map[:, :21] = 1
    region_map[2:, 40:] = 2

    def maps(config, readers: str) -> dict:
        monkeypatch.setenv("SITSFLOW_READERS", readers)
        shutil.rmtree(tmp_path / "out" / "manifests" / "inference", ignore_errors=True)
        inference.run(config, "T0", 0, 0)
        found = {}
        for region in (1, 2):
            for kind in ("chunk_classif", "chunk_confidence"):
                path = getattr(layout, kind)(out, "T0", region, 0, 0)
                if Path(path).exists():
                    with rasterio.open(path) as src:
                        found[region, kind] = src.read(1)
                    Path(path).unlink()
        return found

    reference = maps(base, "0")  # no regions: region 1's model everywhere
    for readers in ("0", "1", "3"):
        found = maps(cfg, readers)
        for region in (1, 2):
            for kind in ("chunk_classif", "chunk_confidence"):
                expected = np.where(region_map == region, reference[1, kind], 0)
                np.testing.assert_array_equal(found[region, kind], expected, err_msg=f"{region} {kind} {readers}")
        assert (found[1, "chunk_classif"][16:, :21] > 0).all() and (found[2, "chunk_classif"][16:, 40:] > 0).all()


def _profile(w=40, h=30, count=1, dtype="uint16"):
    return {"driver": "GTiff", "dtype": dtype, "count": count, "width": w, "height": h, "crs": "EPSG:32631",
            "transform": from_origin(300000, 5000000, 10, 10), "compress": "deflate"}


def test_chunk_writer_writes_parts_and_publishes_all_or_nothing(tmp_path):
    from sitsflow.inference.writer import ChunkWriter

    a, b = str(tmp_path / "a.tif"), str(tmp_path / "b.tif")
    data = np.arange(3 * 30 * 40, dtype=np.uint16).reshape(3, 30, 40)
    with ChunkWriter() as writer:
        writer.add(a, _profile(), {"K": "v"})
        writer.add(b, _profile(count=3), {}, ["x", "y", "z"])
        for r in range(0, 30, 7):  # parts of 7 rows, the last one shorter
            window = Window(0, r, 40, min(7, 30 - r))
            writer.write(a, data[0, r : r + 7], window)
            writer.write(b, data[:, r : r + 7], window)
        assert not Path(a).exists()  # published on exit only
    assert writer.uris == [a, b]
    with rasterio.open(a) as src:
        np.testing.assert_array_equal(src.read(1), data[0])
        assert src.tags()["K"] == "v"
    with rasterio.open(b) as src:
        np.testing.assert_array_equal(src.read(), data)
        assert src.descriptions == ("x", "y", "z")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tif", "b.tif"]

    c, d = str(tmp_path / "c.tif"), str(tmp_path / "d.tif")
    with pytest.raises(RuntimeError, match="network failed"):  # an error in the loop
        with ChunkWriter() as writer:
            writer.add(c, _profile(), {})
            writer.write(c, data[0], Window(0, 0, 40, 30))
            raise RuntimeError("network failed")
    with pytest.raises(ValueError, match="window"):  # a part of the wrong size: GDAL would resample it
        with ChunkWriter() as writer:
            writer.add(c, _profile(), {})
            writer.write(c, data[0, :5], Window(0, 0, 40, 30))
    with pytest.raises(KeyError):  # an error in the writer thread
        with ChunkWriter() as writer:
            writer.add(c, _profile(), {})
            writer.add(d, _profile(), {})
            writer.write(c, data[0], Window(0, 0, 40, 30))
            writer.write(str(tmp_path / "never-added.tif"), data[0], Window(0, 0, 40, 30))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tif", "b.tif"]  # nothing else, no temp file


def test_parts_reach_the_file_as_whole_rows_of_its_blocks():
    """Parts cut on the sources' blocks need not line up with the output's: each output block row
    is written once, whole, so no compressed block is re-encoded and appended again."""
    from sitsflow.inference.writer import _BlockRows

    class Recorder:
        count, height, width, block_shapes = 2, 70, 45, [(16, 16)]

        def __init__(self):
            self.writes, self.image = [], np.zeros((2, 70, 45), np.int32)

        def write(self, array, window):
            self.writes.append((int(window.row_off), int(window.col_off), int(window.height), int(window.width)))
            self.image[:, window.row_off : window.row_off + window.height, window.col_off : window.col_off + window.width] = array

    dst, rows = Recorder(), None
    rows = _BlockRows(dst)
    truth = np.arange(2 * 70 * 45, dtype=np.int32).reshape(2, 70, 45) + 1
    for r0, r1 in [(0, 11), (11, 27), (27, 43), (43, 59), (59, 70)]:  # rows cut at 11 + 16k, as a chunk at row 5 would be
        for c0, c1 in [(0, 21), (21, 45)]:
            rows.write(truth[:, r0:r1, c0:c1], Window(c0, r0, c1 - c0, r1 - r0))
    rows.flush()
    assert dst.writes == [(0, 0, 16, 45), (16, 0, 16, 45), (32, 0, 16, 45), (48, 0, 16, 45), (64, 0, 6, 45)]
    np.testing.assert_array_equal(dst.image, truth)
    rows = _BlockRows(dst)
    rows.write(truth[:, 0:5, 0:45], Window(0, 0, 45, 5))
    rows.flush()  # a block row no part completed is written with zeros where nothing came
    assert dst.writes[-1] == (0, 0, 16, 45) and not dst.image[:, 5:16].any()


def test_usable_cpus_follow_the_cgroup_quota(tmp_path, monkeypatch) -> None:
    cpu_max = tmp_path / "cpu.max"
    monkeypatch.setattr(process, "CGROUP_CPU_MAX", str(cpu_max))
    monkeypatch.setattr(process.os, "sched_getaffinity", lambda _pid: set(range(16)))
    assert process.usable_cpus() == 16  # no cgroup file
    cpu_max.write_text("max 100000\n")
    assert process.usable_cpus() == 16
    cpu_max.write_text("400000 100000\n")  # a pod limited to 4 CPUs
    assert process.usable_cpus() == 4
    cpu_max.write_text("50000 100000\n")  # half a CPU
    assert process.usable_cpus() == 1
