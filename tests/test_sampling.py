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
from sitsflow.sampling.database import read_samples

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
    learn, meta = read_samples(layout.samples_learn(out, 1, 0))
    test, _ = read_samples(layout.samples_test(out, 1, 0))
    # every labelled pixel with a clear date is sampled, in one set (no single-polygon class here)
    labelled = info["label_map"] > 0
    assert len(learn) + len(test) == int(labelled.sum())
    assert not set(learn.polygon_id) & set(test.polygon_id)
    assert set(learn.label) == {1, 2, 3} and set(test.label) == {1, 2, 3}
    # labels and coordinates agree with the scene
    assert (info["label_map"][learn.row, learn.col] == learn.label).all()
    with netCDF4.Dataset(str(layout.samples_learn(out, 1, 0))) as ds:
        names = [str(n) for n in ds["feature_name"][:]]
        assert names[0] == f"synth_red_{meta['dates'][0]}" and names[1] == f"synth_nir_{meta['dates'][0]}"
        assert ds["features"].chunking()[0] <= 1024
        np.testing.assert_allclose(ds["stats_mean"][:], np.nanmean(learn.features.reshape(len(learn), -1), 0), rtol=1e-5)
        np.testing.assert_allclose(ds["stats_var"][:], np.nanvar(learn.features.reshape(len(learn), -1), 0), rtol=1e-4)
        assert json.loads(ds.classes) == [1, 2, 3]
    # the split table records every polygon; the unlabelled polygon (code 0) is excluded
    rows = list(csv.DictReader(open(layout.split_table(out, 0))))
    assert len(rows) == 12 and {r["set"] for r in rows} == {"learn", "test"}
    assert summary["polygons"]["T1"]["without_class"] == 1
    # another seed, another split
    learn1, _ = read_samples(layout.samples_learn(out, 1, 1))
    assert set(learn1.polygon_id) != set(learn.polygon_id)


def test_rerun_skips_and_changed_inputs_redo(sampled):
    folder, info, cfg, _ = sampled
    again = sampling.run(cfg)
    assert again["skipped"] is True
    cfg2 = load_config(str(folder / "config.cfg"), ["arg_train.ratio=0.75"])
    redo = sampling.run(cfg2)
    assert redo["skipped"] is False
    learn, _ = read_samples(layout.samples_learn(cfg.chain.output_path, 1, 0))
    # round(4 * 0.75) = 3 learning polygons per class now
    assert len(set(learn.polygon_id)) == 9


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
