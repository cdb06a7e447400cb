"""Inference and merging through the library functions, on a generated scene: chunking is exact,
stale chunks are refused, outputs are valid COGs on the input grid, the report is a real measure."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio
from rio_cogeo.cogeo import cog_validate

from sitsflow import inference, layout, merging, sampling, selection, training
from sitsflow.config import load_config
from sitsflow.errors import BadInputError
from sitsflow.accuracy import evaluate
from sitsflow.merging.report import summarize
from sitsflow.planning import plan_inference, plan_selection, plan_training

from synthetic import write_config, write_scene


def test_report_scores_on_a_known_confusion():
    labels = np.array([1] * 8 + [2] * 2)
    preds = np.array([1] * 6 + [2] * 2 + [2] * 2)
    r = evaluate(labels, preds, {1: "a", 2: "b"})
    assert r["confusion_matrix"] == [[6, 2], [0, 2]]
    assert r["overall_accuracy"] == pytest.approx(0.8)
    # kappa = (0.8 - pe) / (1 - pe), pe = (8*6 + 2*4) / 100 = 0.56
    assert r["kappa"] == pytest.approx((0.8 - 0.56) / 0.44)
    assert r["per_class"]["1"]["precision"] == 1.0 and r["per_class"]["1"]["recall"] == 0.75
    assert r["per_class"]["2"]["fscore"] == pytest.approx(2 * 0.5 * 1.0 / 1.5)
    s = summarize([r, evaluate(labels, labels, {})])
    assert s["overall_accuracy"]["mean"] == pytest.approx(0.9)
    assert s["overall_accuracy"]["ci95"] == pytest.approx(12.706 * np.std([0.8, 1.0], ddof=1) / np.sqrt(2))


def _pipeline(cfg) -> None:
    sampling.run(cfg)
    for t in plan_training(cfg):
        training.run(cfg, t["region"], t["seed"], t["hyp"])
    for t in plan_selection(cfg):
        selection.run(cfg, t["region"], t["seed"])
    for t in plan_inference(cfg):
        inference.run(cfg, t["tile"], t["chunk"], t["seed"])
    merging.run(cfg)


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scene")
    info = write_scene(folder, width=60, height=40)
    return folder, info


def test_chunks_merge_to_the_single_chunk_map(scene, tmp_path):
    folder, info = scene
    path = write_config(folder, epochs=4)
    one = load_config(str(path), [f"chain.output_path={tmp_path / 'one'}", "python_data_managing.number_of_chunks=1",
                                  "arg_classification.enable_probability_map=True"])
    many = load_config(str(path), [f"chain.output_path={tmp_path / 'many'}", "python_data_managing.chunk_size_mode='user_fixed'",
                                   "python_data_managing.chunk_size_x=16", "python_data_managing.chunk_size_y=9",
                                   "arg_classification.enable_probability_map=True"])
    _pipeline(one)
    assert len(plan_inference(many)) == 4 * 5
    _pipeline(many)
    for kind in ("final_classif", "final_confidence"):
        a = rasterio.open(getattr(layout, kind)(one.chain.output_path, 0)).read()
        b = rasterio.open(getattr(layout, kind)(many.chain.output_path, 0)).read()
        np.testing.assert_array_equal(a, b)
    a = rasterio.open(layout.tile_probamap(one.chain.output_path, "T1", 1, 0)).read()
    b = rasterio.open(layout.tile_probamap(many.chain.output_path, "T1", 1, 0)).read()
    np.testing.assert_array_equal(a, b)


def test_outputs_are_cogs_on_the_input_grid_and_accurate(scene, tmp_path):
    folder, info = scene
    cfg = load_config(str(write_config(folder, epochs=25)), [f"chain.output_path={tmp_path / 'run'}",
                                                              "arg_classification.enable_probability_map=True",
                                                              "arg_classification.generate_final_probability_map=True"])
    _pipeline(cfg)
    out = cfg.chain.output_path
    with rasterio.open(info["series"]) as src:
        grid = (src.crs, src.transform, src.width, src.height)
    for uri in (layout.final_classif(out, 0), layout.final_classif_color(out, 0), layout.final_confidence(out, 0),
                layout.final_probamap(out, 0), layout.final_validity(out)):
        valid, errors, _ = cog_validate(uri)
        assert valid, (uri, errors)
        with rasterio.open(uri) as src:
            assert (src.crs, src.transform, src.width, src.height) == grid
    with rasterio.open(layout.final_probamap(out, 0)) as src:
        proba = src.read()
        assert src.count == 3 and proba.max() <= 1000
    with rasterio.open(layout.final_validity(out)) as src:
        np.testing.assert_array_equal(src.read(1), (info["clouds"] == 0).sum(axis=0))
    with rasterio.open(layout.final_classif_color(out, 0)) as src:
        assert src.colormap(1)[1][:3] != (0, 0, 0)
    report = json.loads(open(layout.final_results_json(out)).read())
    assert report["seeds"][0]["overall_accuracy"] > 0.9  # the classes are separable
    text = open(layout.final_results(out)).read()
    assert "Kappa" in text and "F-score, macro" in text and "Area-weighted estimates" in text
    # the area-weighted estimates take the final map's class areas as strata weights
    seed0 = report["seeds"][0]
    with rasterio.open(layout.final_classif(out, 0)) as src:
        codes, counts = np.unique(src.read(1), return_counts=True)
    mapped = {str(c): int(n) for c, n in zip(codes, counts) if c != 0}
    aw = seed0["area_weighted"]
    assert {c: e["map_area"] for c, e in aw["per_class"].items() if e["map_area"]} == mapped
    assert sum(e["area"]["estimate"] for e in aw["per_class"].values()) == pytest.approx(sum(mapped.values()))
    assert 0.9 < aw["overall_accuracy"]["estimate"] <= 1 and aw["overall_accuracy"]["se"] >= 0
    assert 0 < seed0["fscore_macro"] <= 1 and 0 < seed0["fscore_weighted"] <= 1
    lo, hi = seed0["per_class"]["1"]["producers_accuracy_ci95"]
    assert lo <= seed0["per_class"]["1"]["recall"] <= hi


def test_rerun_after_retraining_never_merges_stale_chunks(scene, tmp_path):
    folder, _ = scene
    path = write_config(folder, epochs=2)
    cfg = load_config(str(path), [f"chain.output_path={tmp_path / 'r'}"])
    _pipeline(cfg)
    assert merging.run(cfg)["skipped"] is True
    # retrain with other settings: new selected model, chunks are now stale
    cfg2 = load_config(str(path), [f"chain.output_path={tmp_path / 'r'}", "arg_train.deep_learning_parameters.epochs=3"])
    for t in plan_training(cfg2):
        training.run(cfg2, t["region"], t["seed"], t["hyp"])
    for t in plan_selection(cfg2):
        selection.run(cfg2, t["region"], t["seed"])
    with pytest.raises(BadInputError, match="stale chunk 0"):
        merging.run(cfg2)
    # rerunning inference redoes the chunks, then merging works again
    for t in plan_inference(cfg2):
        assert inference.run(cfg2, t["tile"], t["chunk"], t["seed"])["skipped"] is False
    assert merging.run(cfg2)["skipped"] is False


def test_two_tiles_mosaic_and_two_seeds_report(tmp_path):
    """Final products are the mosaic of the tiles; RESULTS gives the mean and 95 % interval over seeds."""
    width = 36
    write_scene(tmp_path, width=width, height=24, tile="T1")
    write_scene(tmp_path, width=width, height=24, tile="T2", origin=(300000.0 + width * 10, 5000000.0),
                polygons_name="t2.geojson")
    cfg = load_config(str(write_config(tmp_path, runs=2, epochs=3, chunks=2)), ["chain.list_tile='T1 T2'"])
    assert len(plan_inference(cfg)) == 2 * 2 * 2  # tiles x chunks x seeds
    _pipeline(cfg)
    out = cfg.chain.output_path
    for seed in (0, 1):
        with rasterio.open(layout.final_classif(out, seed)) as src:
            assert (src.width, src.height) == (2 * width, 24)
            data = src.read(1)
            assert (data[:, width:] > 0).mean() > 0.9  # the second tile is classified too
        assert cog_validate(layout.final_classif(out, seed))[0]
    report = json.loads(open(layout.final_results_json(out)).read())
    assert len(report["seeds"]) == 2 and "summary" in report
    text = open(layout.final_results(out)).read()
    assert "over 2 seeds: mean ± 95 % interval" in text


def test_final_products_are_written_in_strips_identical_to_a_whole_mosaic(tmp_path, monkeypatch):
    from rasterio.merge import merge as rio_merge
    from rasterio.transform import from_origin

    rng = np.random.default_rng(0)
    paths = []
    for k, (x0, y0) in enumerate([(300000, 5000000), (300200, 4999800)]):  # overlapping, offset tiles
        data = rng.random((2, 45, 37)).astype(np.float32)
        data[:, :5] = 0  # nodata rows: the next source shows through
        path = tmp_path / f"t{k}.tif"
        with rasterio.open(path, "w", driver="GTiff", dtype="float32", count=2, width=37, height=45,
                           crs="EPSG:32631", transform=from_origin(x0, y0, 10, 10)) as dst:
            dst.write(data)
        paths.append(str(path))
    merging._to_cog(paths, str(tmp_path / "whole.tif"), dtype="uint16", nodata=None, scale=1000.0)
    monkeypatch.setattr(merging, "MOSAIC_BUDGET_BYTES", 1)
    monkeypatch.setattr(merging, "MOSAIC_ROW_ALIGN", 8)  # 8-row strips
    merging._to_cog(paths, str(tmp_path / "strips.tif"), dtype="uint16", nodata=None, scale=1000.0)
    with rasterio.open(tmp_path / "whole.tif") as a, rasterio.open(tmp_path / "strips.tif") as b:
        assert (a.width, a.height) == (37 + 20, 45 + 20) and a.transform == b.transform
        whole, strips = a.read(), b.read()
    np.testing.assert_array_equal(strips, whole)
    sources = [rasterio.open(p) for p in paths]
    reference, _ = rio_merge(sources, nodata=0)
    np.testing.assert_array_equal(whole, np.rint(reference.astype(np.float64) * 1000).astype(np.uint16))
    for s in sources:
        s.close()
    assert cog_validate(str(tmp_path / "strips.tif"))[0]
