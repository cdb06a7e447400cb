"""Every built-in network through the pipeline: `sitsflow run` on the Slovenia example, and the
stage functions on generated multi-band series of 7, 23 and 68 dates."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio

from sitsflow import inference, layout, merging, sampling, selection, training
from sitsflow.config import load_config
from sitsflow.nn import NETWORKS
from sitsflow.planning import plan_inference, plan_selection, plan_training

from synthetic import write_config, write_scene

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "slovenia" / "config.cfg"
SMALL = {  # small widths keep the CPU test fast; every other parameter keeps its default
    "LTAEClassifier": "{'d_model': 64, 'n_head': 4, 'd_k': 8, 'mlp': [64, 32], 'decoder': [32, 16]}",
    "ANN": "{}",
    "MLPClassifier": "{}",
    "SimpleSelfAttentionClassifier": "{'d_model': 32, 'n_head': 2, 'n_layers': 1, 'dim_feedforward': 64}",
    "TempCNN": "{'filters': 16, 'dense': 32}",
    "InceptionTime": "{'filters': 8, 'bottleneck': 8, 'kernel_sizes': [19, 9, 5], 'depth': 3}",
}

pytestmark = [pytest.mark.e2e, pytest.mark.slow]  # whole pipelines: tens of seconds each


# TempCNN and InceptionTime took over 20 s each here (3-4 min on a loaded 2-core machine): slow
SLOW = ("TempCNN", "InceptionTime")


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n
                                  for n in sorted(NETWORKS)])
def test_each_network_runs_through_sitsflow_run_on_slovenia(name, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "sitsflow", "run", str(EXAMPLE), "--no-progress", "--workers", "2",
         "--set", f"chain.output_path={out}",
         "--set", f"arg_train.deep_learning_parameters.dl_name='{name}'",
         "--set", f"arg_train.deep_learning_parameters.dl_parameters={SMALL[name]}",
         "--set", "arg_train.deep_learning_parameters.epochs=2",
         "--set", "python_data_managing.number_of_chunks=2"],
        capture_output=True, text=True, cwd=ROOT, env=dict(os.environ), timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "final" / "RESULTS.json").read_text())["seeds"][0]
    assert 0.0 < report["overall_accuracy"] <= 1.0
    model = json.loads(proc.stdout)["tasks"]
    assert model["train"] == 2
    with rasterio.open(out / "final" / "Classif_Seed_0.tif") as src:
        assert set(np.unique(src.read(1))) <= {1, 2, 3, 4, 8}


@pytest.mark.parametrize("nb_dates", [7, 23, 68])
@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_each_network_on_multiband_series_of_any_length(name, nb_dates, tmp_path):
    write_scene(tmp_path, width=24, height=12, nb_dates=nb_dates, polygons_per_class=2, duplicate_date=False)
    cfg = load_config(str(write_config(tmp_path, dl_name=name, epochs=1, chunks=1)), [
        "arg_train.features_from_raw_dates=True",
        f"arg_train.deep_learning_parameters.dl_parameters={SMALL[name]}",
        "arg_train.deep_learning_parameters.hyperparameters_solver={'batch_size': [32], 'learning_rate': [0.01]}",
    ])
    sampling.run(cfg)
    for t in plan_training(cfg):
        training.run(cfg, t["region"], t["seed"], t["hyp"])
    for t in plan_selection(cfg):
        selection.run(cfg, t["region"], t["seed"])
    net, desc = inference.load_selected(cfg, 1, 0)
    assert net.nb_dates == nb_dates and net.nb_components == 2
    for t in plan_inference(cfg):
        inference.run(cfg, t["tile"], t["chunk"], t["seed"])
    merging.run(cfg)
    with rasterio.open(layout.final_classif(cfg.chain.output_path, 0)) as src:
        assert set(np.unique(src.read(1))) <= {0, 1, 2, 3}
