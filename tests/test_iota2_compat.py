"""iota2 user networks run unchanged: their imports of ``torch_nn_bank``, their constructors, and
a network file written for iota2 through ``sitsflow run``."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch

from sitsflow import layout, nn
from sitsflow.nn import iota2_compat
from sitsflow.nn.registry import load_user_module

from synthetic import write_config, write_scene

#: A network file as an iota2 user writes it (the reference's statistics example, completed).
IOTA2_NETWORK = '''
import torch
import torch.nn as nn
import torch.nn.functional as F
from iota2.learning.pytorch.torch_nn_bank import Iota2NeuralNetwork


class MyNet(Iota2NeuralNetwork):
    def __init__(self, nb_features, nb_class, doy_sensors_dic=None, default_mean=0.0, default_std=1.0,
                 hidden=16):
        super(MyNet, self).__init__(doy_sensors_dic, default_mean, default_std)
        self.sensor_name = list(doy_sensors_dic)[0]
        self.hidden1 = nn.Linear(nb_features, hidden)
        self.bnhidden2 = nn.BatchNorm1d(hidden)
        self.hidden2 = nn.Linear(hidden, hidden)
        self.bnout = nn.BatchNorm1d(hidden)
        self.output = nn.Linear(hidden, nb_class)

    def _forward(self, x):
        mean = self._stats[self.sensor_name]["mean"]
        x = self.nans_imputation(x, mean, self.default_mean)
        std = torch.sqrt(self._stats[self.sensor_name]["var"])
        x = self.standardize(x, mean, std, self.default_mean, self.default_std)
        x = x.reshape(x.shape[0], -1)
        x = F.relu(self.bnhidden2(self.hidden1(x)))
        x = F.relu(self.bnout(self.hidden2(x)))
        return self.output(x)
'''

SHORT_IMPORT = '''
import torch
from torch_nn_bank import Iota2NeuralNetwork, MLPClassifier


class Net(Iota2NeuralNetwork):
    def __init__(self, nb_class, **kwargs):
        super().__init__(**kwargs)
        self.lin = torch.nn.Linear(self.nb_components, nb_class)

    def _forward(self, x):
        return self.lin(self.normalize_input(x).mean(dim=1))
'''

DATES = [20200101, 20200111, 20200131]


def build(source: str, name: str, params: dict | None = None) -> nn.Iota2NeuralNetwork:
    stats = {"s2_theia": {"mean": torch.zeros(6), "var": torch.ones(6)}}
    return nn.build_network(name, params or {}, module_source=source, module_uri=f"/nets/{name}.py", nb_dates=3,
                            nb_components=2, nb_classes=4, dates=DATES, stats=stats, sensor="s2_theia")


def test_an_iota2_network_file_imports_the_bank_and_gets_iota2s_arguments():
    net = build(IOTA2_NETWORK, "MyNet", {"hidden": 8, "default_mean": 0.5})
    assert net.hidden1.in_features == 6 and net.output.out_features == 4 and net.hidden1.out_features == 8
    assert net.doy_sensors_dic == {"s2_theia": [0.0, 10.0, 30.0]} and net.default_mean == 0.5
    assert set(net._stats["s2_theia"]) == {"mean", "var"}
    x = torch.randn(5, 3, 2)
    x[0, 1, 1] = float("nan")
    net.eval()
    assert net(x).shape == (5, 4) and torch.isfinite(net(x)).all()
    assert isinstance(net, nn.Iota2NeuralNetwork)
    # iota2's arguments are supplied, never dl_parameters
    with pytest.raises(Exception, match="nb_class.*supplied by sitsflow"):
        build(IOTA2_NETWORK, "MyNet", {"nb_class": 3})
    params = nn.network_parameters(load_user_module(IOTA2_NETWORK, "/nets/MyNet.py").MyNet)
    assert list(params) == ["default_mean", "default_std", "hidden"]


def test_the_short_import_and_kwargs_forwarding():
    net = build(SHORT_IMPORT, "Net")
    assert net.lin.out_features == 4 and net.nb_dates == 3 and net.sensor == "s2_theia"
    assert net.doy_sensors_dic == {"s2_theia": [0.0, 10.0, 30.0]}
    module = load_user_module(SHORT_IMPORT, "/nets/Net.py")
    assert module.MLPClassifier is nn.MLPClassifier  # the built-ins are in the bank too
    assert set(nn.network_parameters(module.Net)) == {"default_mean", "default_std"}


def test_the_aliases_exist_only_while_a_module_loads():
    load_user_module(IOTA2_NETWORK + "\n# another text\n", "/nets/x.py")
    for name in ("iota2", "iota2.learning.pytorch.torch_nn_bank", "torch_nn_bank"):
        assert name not in sys.modules
        with pytest.raises(ModuleNotFoundError):
            importlib.import_module(name)
    # sitsflow's own base class still takes the documented keyword arguments
    stats = {"s": {"mean": torch.zeros(2), "var": torch.ones(2)}}
    with iota2_compat.building({}):
        with pytest.raises(TypeError, match="needs nb_dates"):
            iota2_compat.Iota2NeuralNetwork()
    base = iota2_compat.Iota2NeuralNetwork(nb_dates=1, nb_components=2, nb_classes=2, dates=[20200101],
                                           stats=stats, sensor="s")
    assert base.doy_sensors_dic == {"s": [0.0]}


@pytest.mark.e2e
def test_a_network_file_written_for_iota2_trains_and_classifies_through_sitsflow_run(tmp_path):
    from sitsflow import cli

    write_scene(tmp_path, width=24, height=12, nb_dates=5)
    (tmp_path / "iota2_net.py").write_text(IOTA2_NETWORK)
    path = write_config(tmp_path, dl_name="MyNet", epochs=2, chunks=1, dl_extra=(
        "    dl_module : 'iota2_net.py'\n    dl_parameters : {'hidden': 8}\n"
        "    hyperparameters_solver : {'batch_size' : [32], 'learning_rate' : [0.01]}\n"))
    text = path.read_text().replace(
        '    hyperparameters_solver : {"batch_size" : [64], "learning_rate" : [0.01, 0.001]}\n', "")
    path.write_text(text)
    code = cli.main(["run", str(path), "--no-progress"])
    assert code == 0
    out = tmp_path / "output"
    description = json.loads(json.dumps(nn.load_model(
        (out / "model" / "model_1_seed_0.txt").read_bytes(), module_source=IOTA2_NETWORK,
        module_uri=str(tmp_path / "iota2_net.py"))[1]))
    assert description["network"] == "MyNet" and description["dl_parameters"] == {"hidden": 8}
    with rasterio.open(layout.final_classif(str(out), 0)) as src:
        labels = src.read(1)
    assert set(np.unique(labels)) - {0} and set(np.unique(labels)) <= {0, 1, 2, 3}


# ---------------------------------------------------------------------------- resource blocks
IOTA2_RESOURCES = """
training : {
              name:"training"
              nb_cpu:10
              ram:"92gb"
              walltime:"12:00:00"
              nb_gpu:1 # number of GPUs to use
              queue:"qgpgpu" # queue containing GPUs
            }
resources : {
    samplesSelection : { name:"samplesSelection", nb_cpu:2, ram:"40gb", walltime:"01:00:00" }
    samplesExtraction : {
        name:"samplesExtraction"
        nb_cpu:8
        ram:"20gb"
        walltime:"02:00:00"
    }
    mosaic : { nb_cpu:3 }
}
"""


def test_iota2_resource_blocks_are_accepted_as_written(tmp_path):
    from sitsflow.config import load_config
    from sitsflow.errors import ConfigError

    write_scene(tmp_path, width=24, height=12, nb_dates=5)
    path = write_config(tmp_path, extra=IOTA2_RESOURCES)
    cfg = load_config(str(path))
    train = cfg.resources.train
    assert (train.name, train.nb_cpu, train.ram, train.walltime, train.nb_gpu, train.queue) == (
        "training", 10, "92Gi", 43200, 1, "qgpgpu")
    # two iota2 steps of sitsflow's sample stage: the largest request of each key
    sample = cfg.resources.sample
    assert (sample.name, sample.nb_cpu, sample.ram, sample.walltime) == ("samplesSelection", 8, "40Gi", 7200)
    assert cfg.resources.merge.nb_cpu == 3
    with pytest.raises(ConfigError, match="given twice, at the top level and in resources"):
        load_config(str(path), ["resources.training={nb_cpu : 1}"])


# ---------------------------------------------------------------------------- chain.spatial_resolution, proj
def _prepare(path: Path, *sets: str) -> tuple[int, str]:
    import contextlib
    import io
    import logging

    from sitsflow import cli

    logs = io.StringIO()
    handler = logging.StreamHandler(logs)
    logging.getLogger("sitsflow").addHandler(handler)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            code = cli.main(["prepare", "--config", str(path), *[a for s in sets for a in ("--set", s)]])
    finally:
        logging.getLogger("sitsflow").removeHandler(handler)
    return code, logs.getvalue()


def test_spatial_resolution_and_proj_are_accepted_bad_ones_exit_2_before_work(tmp_path):
    write_scene(tmp_path, width=24, height=12, nb_dates=5)
    with rasterio.open(tmp_path / "T1" / "series.tif") as src:
        res, crs = src.res, src.crs.to_string()
    path = write_config(tmp_path, output=str(tmp_path / "out"))
    for sets in ((f"chain.spatial_resolution={res[0]}", f"chain.proj='{crs}'"),
                 (f"chain.spatial_resolution=[{res[0]}, {res[1]}]",),
                 (f"chain.spatial_resolution={res[0] * 2}",),
                 ("chain.proj='EPSG:4326'",),
                 ("chain.proj='EPSG:3035'", "chain.spatial_resolution=20")):
        code, text = _prepare(path, *sets)
        assert code == 0, text
    for setting, culprit in (("chain.proj='not a crs'", "chain.proj 'not a crs' is not a CRS"),
                             ("chain.spatial_resolution=0.0001", "is the pixel size in the CRS's units (metre)?"),
                             ("chain.spatial_resolution=[1, 2, 3]", "chain.spatial_resolution: expected None or a pixel size")):
        out = tmp_path / "bad"
        code, text = _prepare(path, f"chain.output_path={out}", setting)
        assert code == 2 and culprit in text, text[-2000:]
        assert not out.exists() or not any(out.rglob("*.*"))
