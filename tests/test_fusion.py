"""iota2's merge of the final classifications (``arg_classification.merge_final_classifications``):
the runs' maps fused by majority vote into ``final/Classifications_fusion.tif``, validated on
polygons held out of every run, ``RESULTS.txt`` becoming the fused map's report."""

from __future__ import annotations

import csv
import json
import os
from collections import Counter

import numpy as np
import pytest
import rasterio
from rio_cogeo.cogeo import cog_validate

from sitsflow import inference, layout, merging, sampling, selection, training
from sitsflow.accuracy import evaluate
from sitsflow.config import load_config
from sitsflow.planning import plan_inference, plan_selection, plan_training
from sitsflow.samples import load_samples

from synthetic import write_config, write_scene

MERGE = ["arg_classification.merge_final_classifications=True", "arg_classification.merge_final_classifications_ratio=0.25"]


def _pipeline(cfg) -> dict:
    sampling.run(cfg)
    for t in plan_training(cfg):
        training.run(cfg, t["region"], t["seed"], t["hyp"])
    for t in plan_selection(cfg):
        selection.run(cfg, t["region"], t["seed"])
    for t in plan_inference(cfg):
        inference.run(cfg, t["tile"], t["chunk"], t["seed"])
    return merging.run(cfg)


def _vote(codes: list[int], undecided: int) -> int:
    """OTB's majority voting of one pixel, written plainly."""
    counts = Counter(c for c in codes if c != 0)
    if not counts:
        return 0
    best = max(counts.values())
    winners = [c for c, n in counts.items() if n == best]
    return winners[0] if len(winners) == 1 else undecided


def test_majority_vote_ties_give_the_undecided_label_and_no_vote_gives_0():
    labels = np.array([[1, 1, 2, 0, 0, 3], [1, 2, 2, 0, 4, 4], [2, 3, 0, 0, 0, 5]], np.uint16)
    got = merging.majority_vote(labels, 255)
    assert got.tolist() == [1, 255, 2, 0, 4, 255]
    assert got.tolist() == [_vote(list(col), 255) for col in labels.T]


@pytest.fixture(scope="module")
def fused(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fusion")
    write_scene(folder, width=48, height=32, cloud_fraction=0.3)
    path = write_config(folder, runs=3, epochs=2, chunks=1)
    cfg = load_config(str(path), MERGE)
    return cfg, _pipeline(cfg)


def test_the_fused_map_is_the_majority_vote_of_the_runs_maps(fused):
    cfg, summary = fused
    out, undecided = cfg.chain.output_path, cfg.arg_classification.merge_final_classifications_undecidedlabel
    runs = [rasterio.open(layout.final_classif(out, s)).read(1) for s in range(3)]
    with rasterio.open(layout.final_fusion(out)) as src:
        fusion = src.read(1)
        assert (src.width, src.height) == runs[0].shape[::-1] and src.nodata == 0
    assert cog_validate(layout.final_fusion(out))[0] and cog_validate(layout.final_fusion_color(out))[0]
    expected = np.array([[_vote([int(r[i, j]) for r in runs], undecided) for j in range(fusion.shape[1])]
                         for i in range(fusion.shape[0])])
    np.testing.assert_array_equal(fusion, expected)
    with rasterio.open(layout.final_fusion_color(out)) as src:
        np.testing.assert_array_equal(src.read(1), fusion)
    report = json.loads(open(layout.final_results_json(out)).read())["fusion"]
    assert summary["fusion"]["kappa"] == round(report["kappa"], 4)
    # its STAC item: the classes with the undecided label, the colour-indexed rendering
    item = json.loads(open(layout.final_stac_item(out, "Classifications_fusion")).read())
    classes = {c["value"]: c["name"] for c in item["assets"]["data"]["classification:classes"]}
    assert classes[undecided] == "undecided" and {1, 2, 3} <= set(classes)
    assert item["assets"]["visual"]["href"].endswith("Classifications_fusion_ColorIndexed.tif")


def test_held_out_polygons_are_in_no_run_and_validate_the_fused_map(fused):
    cfg, _ = fused
    out, undecided = cfg.chain.output_path, cfg.arg_classification.merge_final_classifications_undecidedlabel
    tables = [list(csv.DictReader(open(layout.split_table(out, s)))) for s in range(3)]
    held = {int(r["polygon_id"]) for r in tables[0] if r["set"] == "fusion"}
    assert len(held) == 3  # round(4 x 0.25) = 1 polygon of each of the 3 classes
    assert all({int(r["polygon_id"]) for r in t if r["set"] == "fusion"} == held for t in tables)
    for seed in range(3):
        for kind in (layout.samples_learn, layout.samples_test):
            assert not held & set(load_samples(kind(out, 1, seed), empty_ok=True).polygon_ids.tolist())
    samples = load_samples(layout.samples_fusion(out, 1))
    assert set(samples.polygon_ids.tolist()) == held
    # the report is the fused map's, measured on those pixels read from the fused map itself
    with rasterio.open(layout.final_fusion(out)) as src:
        preds = src.read(1)[samples.row, samples.col]
    decided = preds != undecided
    report = json.loads(open(layout.final_results_json(out)).read())["fusion"]
    expected = evaluate(samples.labels[decided], preds[decided], {})
    assert report["confusion_matrix"] == expected["confusion_matrix"]
    assert report["overall_accuracy"] == pytest.approx(expected["overall_accuracy"])
    assert report["undecided_samples"] == int((~decided).sum())
    text = open(layout.final_results(out)).read()
    assert "Fusion of the 3 runs by majority vote" in text and "held out of every run" in text
    # keep_runs_results (iota2's default True): the runs' report is kept as RESULTS_seeds
    seeds = json.loads(open(layout.final_results_seeds_json(out)).read())
    assert len(seeds["seeds"]) == 3 and "over 3 seeds" in open(layout.final_results_seeds(out)).read()


def test_keep_runs_results_false_drops_the_runs_report_and_all_samples_validation_holds_none_out(
    fused, tmp_path
):
    cfg, _ = fused
    other = load_config(cfg.source, [*MERGE, f"chain.output_path={tmp_path / 'all'}",
                                     "arg_classification.keep_runs_results=False",
                                     "arg_classification.fusionofclassification_all_samples_validation=True"])
    _pipeline(other)
    out = other.chain.output_path
    assert not any(r["set"] == "fusion" for r in csv.DictReader(open(layout.split_table(out, 0))))
    # without the merge, the runs' databases are the same: nothing was held out
    plain = load_config(cfg.source, [f"chain.output_path={tmp_path / 'plain'}"])
    sampling.run(plain)
    assert open(layout.split_table(out, 1)).read() == open(layout.split_table(plain.chain.output_path, 1)).read()
    report = json.loads(open(layout.final_results_json(out)).read())
    assert "union of the runs' test samples" in report["heading"]
    assert not os.path.exists(layout.final_results_seeds(out))
    assert os.path.exists(layout.final_fusion(out))
