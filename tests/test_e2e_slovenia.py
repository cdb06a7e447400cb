"""End to end: `sitsflow run` on the real Slovenia example, on local disk and on the S3 server.

The example ships in examples/slovenia (real Sentinel-2 NDVI, 68 dates with clouds and a cloud
mask, 88 real polygons, MIT licence). Epochs are lowered here to keep the suite fast; everything
else is the example's own configuration (two hyperparameter pairs, four chunks).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import boto3
import numpy as np
import pytest
import rasterio

from sitsflow import layout, storage

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "slovenia" / "config.cfg"
FAST = ["--set", "arg_train.deep_learning_parameters.epochs=4"]

pytestmark = [pytest.mark.e2e, pytest.mark.slow]  # whole pipelines: tens of seconds each


def sitsflow(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sitsflow", *args],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, **(env or {})}, timeout=600,
    )


def test_run_local_end_to_end_then_rerun_does_nothing(tmp_path):
    out = tmp_path / "run"
    proc = sitsflow("run", str(EXAMPLE), "--set", f"chain.output_path={out}", *FAST, "--workers", "2", "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["tasks"]["train"] == 2 and summary["tasks"]["infer"] == 4
    assert summary["stage_tasks_done"] == 1 + 2 + 1 + 4 + 1 and summary["stage_tasks_skipped"] == 0
    # the output tree iota2 users know
    for rel in ("learningSamples/Samples_region_1_seed0_learn.nc", "learningSamples/Samples_region_1_seed0_test.nc",
                "model/model_1_seed_0_hyp_0.txt", "model/model_1_seed_0_hyp_1.txt", "model/model_1_seed_0.txt",
                "model/model_1_seed_0_hyp_0_loss.png", "model/model_1_seed_0_hyp_0_confusion_metrics.png",
                "classif/Classif_slovenia_model_1_seed_0_SUBREGION_3.tif", "classif/Classif_slovenia_model_1_seed_0.tif",
                "final/Classif_Seed_0.tif", "final/Confidence_Seed_0.tif", "final/RESULTS.txt", "final/PixelsValidity.tif",
                "config/resolved.cfg"):
        assert (out / rel).exists(), rel
    # same grid and CRS as the input
    with rasterio.open(ROOT / "examples/slovenia/data/ndvi_68dates.tif") as src:
        grid = (src.crs, src.transform, src.width, src.height)
    with rasterio.open(out / "final/Classif_Seed_0.tif") as src:
        assert (src.crs, src.transform, src.width, src.height) == grid
        classes = set(np.unique(src.read(1)).tolist())
    assert classes <= {1, 2, 3, 4, 8}
    with rasterio.open(out / "final/Confidence_Seed_0.tif") as src:
        conf = src.read(1)
        assert conf.dtype == np.uint8 and 20 <= conf.max() <= 100
    # the report measures on the held-out polygons: compare with the split table and the map
    report = json.loads((out / "final/RESULTS.json").read_text())["seeds"][0]
    text = (out / "final/RESULTS.txt").read_text()
    assert "Overall accuracy" in text and "Kappa" in text and "F-score" in text and "forest" in text
    from sitsflow.samples import load_samples

    test = load_samples(str(out / "learningSamples/Samples_region_1_seed0_test.nc"))
    learn = load_samples(str(out / "learningSamples/Samples_region_1_seed0_learn.nc"))
    single = {int(p) for p in set(test.polygon_ids) & set(learn.polygon_ids)}
    assert report["samples"] == len(test)
    with rasterio.open(out / "final/Classif_Seed_0.tif") as src:
        pred = src.read(1)[test.row, test.col]
    assert report["overall_accuracy"] == pytest.approx(float((pred == test.labels).mean()))
    # only single-polygon classes may share polygons between learning and test
    for pid in single:
        assert (test.labels[test.polygon_ids == pid][0] == learn.labels).sum() == (learn.polygon_ids == pid).sum()
    assert report["overall_accuracy"] > 0.6

    # a second identical run does no work, however its fan-outs are sharded: one shard per stage
    # here, each reading its stored plan and skipping every task whose manifest says it is done
    again = sitsflow("run", str(EXAMPLE), "--set", f"chain.output_path={out}", *FAST, "--workers", "2", "--no-progress",
                     "--max-shards", "1")
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads(again.stdout)
    assert summary["tasks"]["train"] == summary["tasks"]["infer"] == 1
    assert summary["stage_tasks_done"] == 0 and summary["stage_tasks_skipped"] == 9


def test_misspelt_key_exits_2_before_writing_anything(tmp_path):
    bad = tmp_path / "bad.cfg"
    text = EXAMPLE.read_text().replace("epochs : 20", "epoch : 20")
    assert text != EXAMPLE.read_text()
    bad.write_text(text.replace("'data/", f"'{EXAMPLE.parent}/data/").replace("'nomenclature", f"'{EXAMPLE.parent}/nomenclature").replace("'colors", f"'{EXAMPLE.parent}/colors"))
    out = tmp_path / "out"
    proc = sitsflow("run", str(bad), "--set", f"chain.output_path={out}", "--no-progress")
    assert proc.returncode == 2
    assert "arg_train.deep_learning_parameters.epoch" in proc.stderr and "epochs" in proc.stderr
    assert not out.exists()
    # the same for a single stage command, and for a bad --set
    proc = sitsflow("sample", "--config", str(EXAMPLE), "--set", f"chain.output_path={out}", "--set", "arg_train.ratoi=0.5")
    assert proc.returncode == 2 and "ratio" in proc.stderr
    assert not out.exists()


@pytest.mark.s3
def test_run_on_s3_leaves_the_output_tree_in_the_bucket(s3_bucket):
    out = f"{s3_bucket}/run"
    proc = sitsflow("run", str(EXAMPLE), "--set", f"chain.output_path={out}", *FAST, "--workers", "2", "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    bucket = s3_bucket.removeprefix("s3://")
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="run/")["Contents"]}
    for rel in ("learningSamples/Samples_region_1_seed0_learn.nc", "model/model_1_seed_0.txt",
                "classif/Classif_slovenia_model_1_seed_0.tif", "final/Classif_Seed_0.tif",
                "final/Confidence_Seed_0.tif", "final/RESULTS.txt", "config/resolved.cfg"):
        assert f"run/{rel}" in keys, rel
    assert not any(".tmp-" in k for k in keys)
    body = s3.get_object(Bucket=bucket, Key="run/final/RESULTS.txt")["Body"].read().decode()
    assert "Overall accuracy" in body
    again = sitsflow("run", str(EXAMPLE), "--set", f"chain.output_path={out}", *FAST, "--workers", "2", "--no-progress")
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout)["stage_tasks_done"] == 0
    # each stage also runs on its own, as a container would, reading the resolved config from S3
    proc = sitsflow("plan", "inference", "--config", layout.resolved_config(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["items"] == 4 and storage.exists(f"{out}/plans/inference.json")
