"""Sampling stage: polygon-wise splits, the NetCDF database, manifests and reruns."""

from __future__ import annotations

import csv
import json
from types import SimpleNamespace

import netCDF4
import numpy as np
import pytest

from sitsflow import layout, sampling
from sitsflow.config import load_config
from sitsflow.errors import BadInputError
from sitsflow.planning import chunk_windows
from sitsflow.sampling import split_polygons
from sitsflow.samples import load_samples

from synthetic import write_config, write_scene


def test_split_is_polygon_wise_seeded_and_follows_the_ratio():
    classes = {i: 1 for i in range(10)} | {i: 2 for i in range(10, 13)} | {20: 3}
    regions = {p: 1 for p in classes}
    a = split_polygons(classes, regions, 0.7, seed=0)
    assert a == split_polygons(classes, regions, 0.7, seed=0)
    assert a != split_polygons(classes, regions, 0.7, seed=1)
    learn1 = [p for p in range(10) if a[p] == "learn"]
    assert len(learn1) == 7  # round(10 * 0.7)
    assert sum(a[p] == "learn" for p in range(10, 13)) == 2  # round(3 * 0.7)
    assert a[20] == "both"  # a single polygon goes to both sets
    # max(1, round(n * ratio)): at least one learning polygon
    b = split_polygons({1: 5, 2: 5}, {1: 1, 2: 1}, 0.1, seed=3)
    assert sorted(b.values()) == ["learn", "test"]


def test_split_is_done_per_region():
    classes = {p: 1 for p in range(8)}
    regions = {p: 1 if p < 4 else 2 for p in range(8)}
    s = split_polygons(classes, regions, 0.5, seed=0)
    assert sum(s[p] == "learn" for p in range(4)) == 2
    assert sum(s[p] == "learn" for p in range(4, 8)) == 2


def test_chunk_windows_split_number_and_user_fixed():
    cfg = SimpleNamespace(python_data_managing=SimpleNamespace(chunk_size_mode="split_number", number_of_chunks=4,
                                                               chunk_size_x=0, chunk_size_y=0))
    wins = chunk_windows(cfg, 100, 101)
    assert [(w.row_off, w.height) for w in wins] == [(0, 25), (25, 25), (50, 25), (75, 26)]
    assert all(w.width == 100 and w.col_off == 0 for w in wins)
    cfg.python_data_managing.number_of_chunks = 5
    assert len(chunk_windows(cfg, 10, 3)) == 3  # empty strips are dropped
    cfg.python_data_managing = SimpleNamespace(chunk_size_mode="user_fixed", number_of_chunks=1, chunk_size_x=40, chunk_size_y=30)
    wins = chunk_windows(cfg, 100, 50)
    assert len(wins) == 6
    assert (wins[2].col_off, wins[2].width, wins[3].row_off, wins[3].height) == (80, 20, 30, 20)
    covered = np.zeros((50, 100), int)
    for w in wins:
        covered[int(w.row_off):int(w.row_off + w.height), int(w.col_off):int(w.col_off + w.width)] += 1
    assert (covered == 1).all()


@pytest.fixture()
def sampled(tmp_path):
    info = write_scene(tmp_path)
    cfg = load_config(str(write_config(tmp_path, runs=2)))
    summary = sampling.run(cfg)
    return tmp_path, info, cfg, summary


def test_database_layout_split_and_statistics(sampled):
    folder, info, cfg, summary = sampled
    out = cfg.chain.output_path
    assert summary["regions"] == [1] and summary["seeds"] == [0, 1]
    learn = load_samples(layout.samples_learn(out, 1, 0))
    test = load_samples(layout.samples_test(out, 1, 0))
    # every labelled pixel with a clear date is sampled, in one set (no single-polygon class here)
    labelled = info["label_map"] > 0
    assert len(learn) + len(test) == int(labelled.sum())
    assert not set(learn.polygon_ids) & set(test.polygon_ids)
    assert set(learn.labels) == {1, 2, 3} and set(test.labels) == {1, 2, 3}
    # labels and coordinates agree with the scene
    assert (info["label_map"][learn.row, learn.col] == learn.labels).all()
    with netCDF4.Dataset(str(layout.samples_learn(out, 1, 0))) as ds:
        names = [str(n) for n in ds["feature_name"][:]]
        assert names[0] == f"synth_red_{learn.dates[0]}" and names[1] == f"synth_nir_{learn.dates[0]}"
        assert ds["features"].chunking()[0] <= 1024
        np.testing.assert_allclose(ds["stats_mean"][:], np.nanmean(learn.load_all().reshape(len(learn), -1), 0), rtol=1e-5)
        np.testing.assert_allclose(ds["stats_var"][:], np.nanvar(learn.load_all().reshape(len(learn), -1), 0), rtol=1e-4)
        assert json.loads(ds.classes) == [1, 2, 3]
    # the split table records every polygon; the unlabelled polygon (code 0) is excluded
    rows = list(csv.DictReader(open(layout.split_table(out, 0))))
    assert len(rows) == 12 and {r["set"] for r in rows} == {"learn", "test"}
    assert summary["polygons"]["T1"]["without_class"] == 1
    # another seed, another split
    learn1 = load_samples(layout.samples_learn(out, 1, 1))
    assert set(learn1.polygon_ids) != set(learn.polygon_ids)


def test_rerun_skips_and_changed_inputs_redo(sampled):
    folder, info, cfg, _ = sampled
    again = sampling.run(cfg)
    assert again["skipped"] is True
    cfg2 = load_config(str(folder / "config.cfg"), ["arg_train.ratio=0.75"])
    redo = sampling.run(cfg2)
    assert redo["skipped"] is False
    learn = load_samples(layout.samples_learn(cfg.chain.output_path, 1, 0))
    # round(4 * 0.75) = 3 learning polygons per class now
    assert len(set(learn.polygon_ids)) == 9


def test_non_integer_class_is_a_clear_error(tmp_path):
    import pyogrio
    import shapely

    write_scene(tmp_path)
    pyogrio.raw.write(str(tmp_path / "polygons.geojson"), geometry=shapely.to_wkb(np.array([shapely.box(300000, 4999800, 300100, 4999900)], dtype=object)),
                      field_data=[np.array(["forest"], dtype=object)], fields=["code"], crs="EPSG:32631",
                      driver="GeoJSON", geometry_type="Polygon")
    cfg = load_config(str(write_config(tmp_path)))
    with pytest.raises(BadInputError, match="must be integers"):
        sampling.run(cfg)


def test_missing_class_field_names_the_fields(tmp_path):
    write_scene(tmp_path)
    cfg = load_config(str(write_config(tmp_path)), ["chain.data_field=klass"])
    with pytest.raises(BadInputError, match="no field 'klass'"):
        sampling.run(cfg)


# --- THEIA Sentinel-2 products (tests/generate_products.py) -----------------------------------
import tracemalloc  # noqa: E402
from pathlib import Path  # noqa: E402

import pyogrio  # noqa: E402
import rasterio  # noqa: E402
import shapely  # noqa: E402
from rasterio.transform import from_origin  # noqa: E402
from rasterio.windows import Window  # noqa: E402

from sitsflow.features import FeaturePipeline  # noqa: E402
from sitsflow.samples import ArrayReader, compute_stats  # noqa: E402

from generate_products import upload, write_products, write_theia_config  # noqa: E402


def _check_theia_database(cfg, info) -> dict:
    out = cfg.chain.output_path
    pipe = FeaturePipeline(cfg, "T31TCJ")
    learn = load_samples(layout.samples_learn(out, 1, 0))
    test = load_samples(layout.samples_test(out, 1, 0))
    assert learn.dates == pipe.dates and learn.component_names == pipe.components
    assert learn.sensor == "s2_theia" and learn.classes == [1, 2, 3]
    with storage_local(layout.samples_learn(out, 1, 0)) as path, netCDF4.Dataset(path) as ds:
        names = [str(n) for n in ds["feature_name"][:]]
        assert names == pipe.feature_names and names[0] == "sentinel2_b2_20180101"
        assert ds.sensors == "s2_theia"
        for key, values in compute_stats(ArrayReader(learn.load_all()), chunk=len(learn)).items():
            np.testing.assert_allclose(ds[f"stats_{key}"][:], values, rtol=1e-5)
        assert ds["features"].chunking()[0] == min(1024, len(learn))
    # polygon-wise split: no polygon in both sets (each class has 4 polygons)
    assert not set(learn.polygon_ids.tolist()) & set(test.polygon_ids.tolist())
    # 12 rectangles + the repaired bow-tie (class 3, 5 polygons: round(2.5) = 2 learn)
    assert len(np.unique(learn.polygon_ids)) + len(np.unique(test.polygon_ids)) == 13
    assert len(np.unique(learn.polygon_ids)) == 6
    # labels agree with the generated map, pixel coordinates included (the bow-tie is off the map)
    on_map = info["label_map"][learn.row, learn.col] > 0
    assert on_map.sum() == len(learn) - 1
    np.testing.assert_array_equal(info["label_map"][learn.row, learn.col][on_map], learn.labels[on_map])
    assert np.isfinite(learn.load_all()).all()
    return {"learn": learn, "test": test}


def storage_local(uri):
    from sitsflow import storage

    return storage.local_path(uri)


def test_theia_sampling_database_names_dates_split_and_statistics(tmp_path):
    info = write_products(tmp_path, width=36, height=24, nb_dates=6, polygons_per_class=4, landsat=False)
    cfg = load_config(str(write_theia_config(tmp_path, data=str(tmp_path))))
    summary = sampling.run(cfg)
    report = summary["polygons"]["T31TCJ"]
    assert report["without_class"] == 1 and report["outside_tile"] == 1 and report["repaired"] == 1
    _check_theia_database(cfg, info)
    assert sampling.run(cfg)["skipped"] is True


@pytest.mark.s3
def test_theia_sampling_reads_products_in_place_on_s3(tmp_path, s3_bucket):
    info = write_products(tmp_path, width=36, height=24, nb_dates=6, polygons_per_class=4, landsat=False)
    data = upload(tmp_path, s3_bucket)
    cfg = load_config(str(write_theia_config(tmp_path, data=data, output=f"{s3_bucket}/out", name="s3.cfg")))
    sampling.run(cfg)
    remote = _check_theia_database(cfg, info)
    cfg_local = load_config(str(write_theia_config(tmp_path, data=str(tmp_path))))
    sampling.run(cfg_local)
    local = load_samples(layout.samples_learn(cfg_local.chain.output_path, 1, 0))
    np.testing.assert_array_equal(remote["learn"].load_all(), local.load_all())


def _large_tile(folder: Path, size: int, nb_dates: int) -> None:
    """A size x size dated raster (constant blocks, written block by block) and 12 small polygons."""
    transform = from_origin(500000.0, 5000000.0, 10.0, 10.0)
    profile = {"driver": "GTiff", "dtype": "int16", "count": nb_dates, "width": size, "height": size,
               "crs": "EPSG:32631", "transform": transform, "tiled": True, "blockxsize": 512,
               "blockysize": 512, "compress": "deflate"}
    block = np.full((nb_dates, 512, 512), 1000, np.int16)
    with rasterio.open(folder / "big.tif", "w", **profile) as dst:
        for r in range(0, size, 512):
            for c in range(0, size, 512):
                h, w = min(512, size - r), min(512, size - c)
                dst.write(block[:, :h, :w], window=Window(c, r, w, h))
        for t in range(nb_dates):
            dst.set_band_description(t + 1, f"2020-01-{1 + 3 * t:02d}")
    rng = np.random.default_rng(0)
    geoms, codes = [], []
    for k in range(12):
        r, c = rng.integers(0, size - 20, 2)
        x0, y0 = transform @ (c, r)
        geoms.append(shapely.box(x0, y0 - 150, x0 + 150, y0))
        codes.append(1 + k % 2)
    pyogrio.raw.write(str(folder / "sparse.geojson"), geometry=shapely.to_wkb(np.array(geoms, dtype=object)),
                      field_data=[np.array(codes, np.int64)], fields=["code"], crs="EPSG:32631",
                      driver="GeoJSON", geometry_type="Polygon")


def test_sampling_memory_does_not_grow_with_the_tile(tmp_path):
    """A 4096 x 4096 px tile of 8 dates (512 MiB as float32) with sparse polygons: the peak of
    Python/numpy allocations while extracting stays under 48 MiB (BLOCK windows, labelled windows only;
    the feature computation's torch intermediates, one part's worth, are not traced)."""
    size, nb_dates = 4096, 8
    _large_tile(tmp_path, size, nb_dates)
    cfg_path = tmp_path / "big.cfg"
    cfg_path.write_text(write_config(tmp_path).read_text()
                        .replace("'{tile}/series.tif'", "'big.tif'").replace("mask_path : '{tile}/clouds.tif'", "")
                        .replace("'polygons.geojson'", "'sparse.geojson'").replace("['red', 'nir']", "['ndvi']"))
    cfg = load_config(str(cfg_path))
    tracemalloc.start()
    try:
        arrays, meta = sampling.extract(cfg)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    full = size * size * nb_dates * 4
    assert arrays["features"].shape[0] == 12 * 15 * 15
    assert peak < 48 * 2**20 < full / 10, peak


# --- arg_train.sample_selection and split_ground_truth ----------------------------------------
from sitsflow.sampling import strategies  # noqa: E402


def test_strategies_give_otb_counts_per_class():
    counts = {1: 100, 2: 30, 3: 7}
    rule = {"sampler": "periodic"}
    assert strategies.required(rule | {"strategy": "all"}, counts) == counts
    assert strategies.required(rule | {"strategy": "smallest"}, counts) == {1: 7, 2: 7, 3: 7}
    # floor(0.5 + p * n)
    assert strategies.required(rule | {"strategy": "percent", "strategy.percent.p": 0.25}, counts) == {1: 25, 2: 8, 3: 2}
    assert strategies.required(rule | {"strategy": "constant", "strategy.constant.nb": 20}, counts) == {1: 20, 2: 20, 3: 7}
    # total: v shared in proportion to the classes, floor(0.5 + v * n / N); never more than N
    assert strategies.required(rule | {"strategy": "total", "strategy.total.v": 55}, counts) == {1: 40, 2: 12, 3: 3}
    assert strategies.required(rule | {"strategy": "total", "strategy.total.v": 10**6}, counts) == counts
    # byclass: the file's count, capped; a class absent from the file keeps nothing
    rule_b = rule | {"strategy": "byclass", "strategy.byclass.in": "x"}
    assert strategies.required(rule_b, counts, {1: 5, 2: 50}) == {1: 5, 2: 30, 3: 0}


def test_samplers_periodic_evenly_spaced_random_seeded():
    rng = np.random.default_rng(0)
    assert strategies.pick(10, 5, "periodic", rng).tolist() == [0, 2, 4, 6, 8]
    assert strategies.pick(10, 3, "periodic", rng).tolist() == [0, 3, 6]
    assert strategies.pick(4, 9, "random", rng).tolist() == [0, 1, 2, 3]
    a = strategies.pick(1000, 10, "random", np.random.default_rng([3, 1]))
    assert a.tolist() == strategies.pick(1000, 10, "random", np.random.default_rng([3, 1])).tolist()
    assert a.tolist() != strategies.pick(1000, 10, "random", np.random.default_rng([4, 1])).tolist()
    assert len(set(a.tolist())) == 10


def test_byclass_file_lines(tmp_path):
    path = tmp_path / "counts.csv"
    path.write_text("# class count\n1 3\n2,10\n\n3;0\n")
    assert strategies.read_byclass(str(path)) == {1: 3, 2: 10, 3: 0}
    path.write_text("1 3\n2 many\n")
    with pytest.raises(BadInputError, match=r"counts.csv:2: expected 'class count'"):
        strategies.read_byclass(str(path))
    path.write_text("1 3\n1 4\n")
    with pytest.raises(BadInputError, match="class 1 is listed twice"):
        strategies.read_byclass(str(path))


def _selected(folder, tmp_path, name: str, *overrides: str, runs: int = 1):
    """Sampling of the scene in ``folder`` with ``overrides``, into ``tmp_path/name``."""
    path = write_config(folder, runs=runs)
    cfg = load_config(str(path), [f"chain.output_path={tmp_path / name}", *overrides])
    summary = sampling.run(cfg)
    out = cfg.chain.output_path
    learn = {s: load_samples(layout.samples_learn(out, 1, s)) for s in range(runs)}
    test = {s: load_samples(layout.samples_test(out, 1, s)) for s in range(runs)}
    return cfg, summary, learn, test


def _pixels(samples) -> set[tuple[int, int]]:
    return set(zip(samples.row.tolist(), samples.col.tolist()))


def _class_counts(samples) -> dict[int, int]:
    codes, counts = np.unique(samples.labels, return_counts=True)
    return dict(zip(codes.tolist(), counts.tolist()))


@pytest.fixture()
def scene(tmp_path):
    folder = tmp_path / "scene"
    write_scene(folder)
    return folder


def test_sample_selection_keeps_part_of_each_class_of_the_learning_set_only(scene, tmp_path):
    _, plain, learn0, test0 = _selected(scene, tmp_path, "plain", runs=2)
    rule = '{"sampler" : "random", "strategy" : "percent", "strategy.percent.p" : 0.1}'
    cfg, summary, learn, test = _selected(scene, tmp_path, "percent", f"arg_train.sample_selection={rule}", runs=2)
    for seed in (0, 1):
        full, kept = _class_counts(learn0[seed]), _class_counts(learn[seed])
        assert kept == {c: int(np.floor(0.5 + 0.1 * n)) for c, n in full.items()}
        assert _pixels(learn[seed]) < _pixels(learn0[seed])  # a subset of the same L+V pixels
        # the test set keeps every pixel
        assert _pixels(test[seed]) == _pixels(test0[seed]) and len(test[seed]) == len(test0[seed])
        key = f"region_1_seed_{seed}"
        assert summary["samples"][key]["learn"] == sum(kept.values())
        assert summary["samples"][key]["selected"] == {str(c): {"kept": kept[c], "of": n} for c, n in full.items()}
        assert "selected" not in plain["samples"][key]  # without the key, the summary is as before
    assert _pixels(learn[0]) != _pixels(learn[1])  # each seed draws its own
    # deterministic: the same configuration keeps the same pixels
    _, _, again, _ = _selected(scene, tmp_path, "again", f"arg_train.sample_selection={rule}", runs=2)
    assert _pixels(again[0]) == _pixels(learn[0]) and _pixels(again[1]) == _pixels(learn[1])
    # and another random_seed other ones
    _, _, other, _ = _selected(scene, tmp_path, "other", f"arg_train.sample_selection={rule}", "arg_train.random_seed=5")
    assert _pixels(other[0]) != _pixels(learn[0])


def test_periodic_constant_takes_evenly_spaced_pixels_along_the_polygons(scene, tmp_path):
    _, _, learn0, _ = _selected(scene, tmp_path, "plain")
    rule = '{"sampler" : "periodic", "strategy" : "constant", "strategy.constant.nb" : 10}'
    _, _, learn, _ = _selected(scene, tmp_path, "constant", f"arg_train.sample_selection={rule}")
    assert _class_counts(learn[0]) == {1: 10, 2: 10, 3: 10}
    full = learn0[0]
    for code in (1, 2, 3):
        mine = full.labels == code
        order = np.lexsort((full.col[mine], full.row[mine], full.polygon_ids[mine]))
        ordered = list(zip(full.row[mine][order].tolist(), full.col[mine][order].tolist()))
        n = len(ordered)
        expected = {ordered[(k * n) // 10] for k in range(10)}
        got = {p for p, c in zip(zip(learn[0].row.tolist(), learn[0].col.tolist()), learn[0].labels) if c == code}
        assert got == expected
        assert len({int(p) for p in learn[0].polygon_ids[learn[0].labels == code]}) == 2  # spread over both


def test_smallest_total_byclass_and_per_model(scene, tmp_path):
    _, _, learn0, _ = _selected(scene, tmp_path, "plain")
    full = _class_counts(learn0[0])
    smallest = '{"sampler" : "random", "strategy" : "smallest"}'
    _, _, learn, _ = _selected(scene, tmp_path, "smallest", f"arg_train.sample_selection={smallest}")
    assert _class_counts(learn[0]) == dict.fromkeys(full, min(full.values()))
    total = '{"strategy" : "total", "strategy.total.v" : 30}'
    _, _, learn, _ = _selected(scene, tmp_path, "total", f"arg_train.sample_selection={total}")
    n = sum(full.values())
    assert _class_counts(learn[0]) == {c: int(np.floor(0.5 + 30 * k / n)) for c, k in full.items()}
    (scene / "counts.txt").write_text("1 4\n2 7\n")
    counts = scene / "counts.txt"
    byclass = f'{{"strategy" : "byclass", "strategy.byclass.in" : "{counts}"}}'
    _, _, learn, _ = _selected(scene, tmp_path, "byclass", f"arg_train.sample_selection={byclass}")
    assert _class_counts(learn[0]) == {1: 4, 2: 7}  # class 3 is not in the file: none kept
    counts.write_text("1 0\n")
    with pytest.raises(BadInputError, match="keeps no L[+]V pixel of region 1"):
        _selected(scene, tmp_path, "byclass_none", f"arg_train.sample_selection={byclass}")
    # per_model: region 1 (the only one) takes its own rule instead of the top-level one
    per_model = ('{"sampler" : "random", "strategy" : "all", "per_model" : [{"target_model" : 1, '
                 '"sampler" : "periodic", "strategy" : "constant", "strategy.constant.nb" : 3}]}')
    _, _, learn, _ = _selected(scene, tmp_path, "per_model", f"arg_train.sample_selection={per_model}")
    assert _class_counts(learn[0]) == {1: 3, 2: 3, 3: 3}
    per_other = per_model.replace('"target_model" : 1', '"target_model" : 2')
    _, _, learn, _ = _selected(scene, tmp_path, "per_other", f"arg_train.sample_selection={per_other}")
    assert _class_counts(learn[0]) == full


def test_default_selection_and_split_leave_the_databases_and_fingerprint_unchanged(scene, tmp_path):
    cfg0, _, learn0, test0 = _selected(scene, tmp_path, "plain")
    explicit = '{"sampler" : "random", "strategy" : "all"}'
    cfg, summary, learn, test = _selected(
        scene, tmp_path, "explicit", f"arg_train.sample_selection={explicit}", "arg_train.split_ground_truth=True"
    )
    assert sampling.fingerprint(cfg) == sampling.fingerprint(cfg0)
    assert _pixels(learn[0]) == _pixels(learn0[0]) and _pixels(test[0]) == _pixels(test0[0])
    np.testing.assert_array_equal(learn[0].load_all(), learn0[0].load_all())


def test_split_ground_truth_false_uses_every_polygon_for_learning_and_test(scene, tmp_path):
    _, _, learn0, test0 = _selected(scene, tmp_path, "plain")
    cfg, _, learn, test = _selected(scene, tmp_path, "nosplit", "arg_train.split_ground_truth=False")
    every = _pixels(learn0[0]) | _pixels(test0[0])
    assert _pixels(learn[0]) == every and _pixels(test[0]) == every
    assert set(learn[0].polygon_ids) == set(test[0].polygon_ids)
    rows = list(csv.DictReader(open(layout.split_table(cfg.chain.output_path, 0))))
    assert {r["set"] for r in rows} == {"both"}
    # the ratio is not used then
    _, _, learn_r, _ = _selected(scene, tmp_path, "nosplit_ratio", "arg_train.split_ground_truth=False",
                                 "arg_train.ratio=0.9")
    assert _pixels(learn_r[0]) == every
    # selection still applies to the L+V set only
    rule = '{"sampler" : "random", "strategy" : "constant", "strategy.constant.nb" : 5}'
    _, _, learn_s, test_s = _selected(scene, tmp_path, "nosplit_sel", "arg_train.split_ground_truth=False",
                                      f"arg_train.sample_selection={rule}")
    assert _class_counts(learn_s[0]) == {1: 5, 2: 5, 3: 5} and _pixels(test_s[0]) == every


def test_the_fingerprint_follows_a_byclass_file_and_a_target_grid(scene, tmp_path):
    """A rerun must not keep databases sampled with another byclass file or on another grid (the
    byclass files had slipped under the fusion hold-out's condition; chain.proj/spatial_resolution
    were in no fingerprint: review findings)."""
    counts = scene / "counts.txt"
    counts.write_text("1 4\n2 7\n")
    byclass = f'{{"strategy" : "byclass", "strategy.byclass.in" : "{counts}"}}'
    path = write_config(scene)
    cfg = load_config(str(path), [f"chain.output_path={tmp_path}", f"arg_train.sample_selection={byclass}"])
    before = sampling.fingerprint(cfg)
    counts.write_text("1 5\n2 7\n")
    assert sampling.fingerprint(cfg) != before
    plain = load_config(str(path), [f"chain.output_path={tmp_path}"])
    resolution = abs(FeaturePipeline(plain, plain.chain.tiles[0]).grid.transform.a)
    coarser = load_config(str(path), [f"chain.output_path={tmp_path}", f"chain.spatial_resolution={2 * resolution}"])
    same = load_config(str(path), [f"chain.output_path={tmp_path}", f"chain.spatial_resolution={resolution}"])
    assert sampling.fingerprint(coarser) != sampling.fingerprint(same)
