"""``sitsflow run`` end to end on generated THEIA Sentinel-2 products, local and on S3: the sample
database, the trained model and a final map whose accuracy on the test polygons is high."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from sitsflow import layout, storage
from sitsflow.config import load_config
from sitsflow.samples import load_samples

from generate_products import upload, write_products, write_theia_config

pytestmark = [pytest.mark.e2e, pytest.mark.slow]  # whole pipelines: tens of seconds each


def _run(cfg_uri: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "sitsflow", "run", cfg_uri, "--workers", "2", "--no-progress"],
        capture_output=True, text=True, timeout=300, env=dict(os.environ),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _check(cfg_uri: str) -> None:
    cfg = load_config(cfg_uri)
    out = cfg.chain.output_path
    learn = load_samples(layout.samples_learn(out, 1, 0))
    assert learn.sensor == "s2_theia" and learn.component_names[-3:] == ["ndvi", "ndwi", "brightness"]
    assert storage.exists(layout.final_classif(out, 0))
    results = json.loads(storage.read_text(layout.final_results_json(out)))
    oa = results["seeds"][0]["overall_accuracy"]
    assert oa >= 0.9, results


def test_sitsflow_run_on_local_theia_products(tmp_path):
    write_products(tmp_path, width=48, height=36, nb_dates=6, polygons_per_class=6, landsat=False)
    cfg = write_theia_config(tmp_path, data=str(tmp_path), epochs=15)
    _run(str(cfg))
    _check(str(cfg))


@pytest.mark.s3
def test_sitsflow_run_on_theia_products_in_s3(tmp_path, s3_bucket):
    write_products(tmp_path, width=48, height=36, nb_dates=6, polygons_per_class=6, landsat=False)
    data = upload(tmp_path, s3_bucket)
    cfg = write_theia_config(tmp_path, data=data, output=f"{s3_bucket}/out", epochs=15, name="s3.cfg")
    uri = f"{s3_bucket}/config/s3.cfg"
    storage.write_text(uri, cfg.read_text())
    _run(uri)
    _check(uri)
