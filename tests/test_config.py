"""Tests of sitsflow.config: parsing, defaults, every constraint, overrides, paths, round trip."""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from sitsflow.config import (
    SECTION_MODELS,
    DeepLearningParameters,
    HyperparametersSolver,
    SitsflowConfig,
    TrainingOptions,
    load_config,
)
from sitsflow.config.schema import resolve_path
from sitsflow.config.syntax import format_key, format_value
from sitsflow.errors import EXIT_BAD_INPUT, ConfigError, InputNotFoundError

BASE: dict[str, Any] = {
    "chain": {
        "output_path": "out",
        "list_tile": "T31TCJ",
        "ground_truth": "gt.gpkg",
        "data_field": "code",
    },
    "dated_raster": {"path": "ndvi_{tile}.tif", "bands": ["ndvi"]},
    "arg_train": {"deep_learning_parameters": {"dl_name": "LTAEClassifier"}},
}
EXTERNAL = {"module": "feat.py", "functions": ["get_soi"]}


def render(config: dict[str, Any], depth: int = 0) -> str:
    """Write a dict as cfg text (top-level dicts and deep_learning_parameters are sections)."""
    pad = "  " * depth
    lines = []
    for key, value in config.items():
        if isinstance(value, dict) and (depth == 0 or key == "deep_learning_parameters"):
            lines.append(f"{pad}{format_key(key)} : {{")
            lines.append(render(value, depth + 1))
            lines.append(f"{pad}}}")
        else:
            lines.append(f"{pad}{format_key(key)} : {format_value(value)}")
    return "\n".join(lines)


def with_values(changes: dict[str, Any], base: dict[str, Any] | None = None) -> dict[str, Any]:
    """A copy of ``base`` (BASE) with dotted keys set (``_DELETE`` removes a key)."""
    config = copy.deepcopy(BASE if base is None else base)
    for dotted, value in changes.items():
        node = config
        parts = dotted.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        if value is _DELETE:
            node.pop(parts[-1], None)
        else:
            node[parts[-1]] = value
    return config


_DELETE = object()


def write(tmp_path: Path, config: dict[str, Any] | str, name: str = "config.cfg") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config if isinstance(config, str) else render(config) + "\n", encoding="utf-8")
    return path


def line_of(path: Path, key: str) -> int:
    """1-based line of the first line where ``key :`` appears."""
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if re.search(rf"(^|[{{\s,\"]){re.escape(key)}\"?\s*:", line):
            return number
    raise AssertionError(f"{key} not in {path}")


def load_error(
    tmp_path: Path, config: dict[str, Any] | str, overrides: tuple[str, ...] = ()
) -> str:
    path = write(tmp_path, config)
    with pytest.raises(ConfigError) as info:
        load_config(str(path), overrides)
    return str(info.value)


# --- a valid configuration and its defaults ----------------------------------------------------
def test_minimal_config_loads_with_every_default(tmp_path: Path) -> None:
    path = write(tmp_path, BASE)
    cfg = load_config(str(path))
    assert cfg.source == str(path)
    assert cfg.chain.model_dump() == {
        "output_path": str(tmp_path / "out"),
        "list_tile": "T31TCJ",
        "ground_truth": str(tmp_path / "gt.gpkg"),
        "data_field": "code",
        "region_path": None,
        "region_field": "region",
        "nomenclature_path": None,
        "color_table": None,
        "s2_path": None,
        "s2_l3a_path": None,
        "s2_s2c_path": None,
        "l8_path": None,
        "user_feat_path": None,
        "spatial_resolution": None,
        "proj": None,
    }
    assert cfg.dated_raster.model_dump() == {
        "name": "generic",
        "path": str(tmp_path / "ndvi_{tile}.tif"),
        "bands": ("ndvi",),
        "dates": "descriptions",
        "scale": 1.0,
        "nodata": None,
        "mask_path": None,
        "start_date": None,
        "end_date": None,
        "temporal_resolution": 10,
    }
    assert cfg.dated_raster.dates_kind == "descriptions"
    train = cfg.arg_train.model_dump()
    dl = train.pop("deep_learning_parameters")
    assert train.pop("training_options") == {  # sitsflow's, outside iota2's keys: all off
        "label_smoothing": 0.0, "weight_decay": 0.0, "lr_schedule": "constant", "warmup_epochs": 0.0,
        "date_dropout": 0.0, "time_shift": 0, "gaussian_noise": 0.0, "gradient_clip": 0.0, "balanced_sampling": False,
    }
    assert train == {"runs": 1, "ratio": 0.5, "random_seed": 0, "features_from_raw_dates": False,
                     "features": ("NDVI", "NDWI", "Brightness"), "split_ground_truth": True,
                     "sample_selection": {"sampler": "random", "strategy": "all"}}
    assert dl == {
        "dl_name": "LTAEClassifier",
        "dl_parameters": {},
        "model_selection_criterion": "loss",
        "epochs": 100,
        "weighted_labels": False,
        "num_workers": 1,
        "hyperparameters_solver": {"batch_size": (1000,), "learning_rate": (0.00001,)},
        "dl_module": None,
        "restart_from_checkpoint": True,
        "dataloader_mode": "stream",
        "enable_early_stop": False,
        "epoch_to_trigger": 5,
        "early_stop_patience": 10,
        "early_stop_tol": 0.01,
        "early_stop_metric": "val_loss",
        "additional_statistics_percentage": None,
        "adaptive_lr": {},
    }
    assert cfg.arg_classification.model_dump() == {  # iota2's defaults
        "enable_probability_map": False,
        "generate_final_probability_map": False,
        "merge_final_classifications": False,
        "merge_final_classifications_method": "majorityvoting",
        "merge_final_classifications_undecidedlabel": 255,
        "merge_final_classifications_ratio": 0.1,
        "fusionofclassification_all_samples_validation": False,
        "keep_runs_results": True,
    }
    assert cfg.python_data_managing.model_dump() == {
        "chunk_size_mode": "split_number",
        "number_of_chunks": 50,
        "chunk_size_x": 50,
        "chunk_size_y": 50,
    }
    assert cfg.external_features is None
    assert cfg.dl is cfg.arg_train.deep_learning_parameters
    assert cfg.chain.tiles == ("T31TCJ",)
    assert cfg.dl.hyperparameter_pairs() == [(1000, 0.00001)]
    # every default is visible in the serialised form
    text = cfg.to_cfg()
    for name, model in SECTION_MODELS.items():
        if getattr(cfg, name) not in (None, ()):  # optional sections absent from the file stay absent
            assert f"{name} : {{" in text
            for key in model.model_fields:
                assert re.search(rf"^\s*{key} : ", text, re.M), key
    for key in DeepLearningParameters.model_fields:
        assert re.search(rf"^\s*{key} : ", text, re.M), key


def test_deep_learning_parameters_are_the_seventeen_of_the_reference() -> None:
    assert list(DeepLearningParameters.model_fields) == [
        "dl_name",
        "dl_parameters",
        "model_selection_criterion",
        "epochs",
        "weighted_labels",
        "num_workers",
        "hyperparameters_solver",
        "dl_module",
        "restart_from_checkpoint",
        "dataloader_mode",
        "enable_early_stop",
        "epoch_to_trigger",
        "early_stop_patience",
        "early_stop_tol",
        "early_stop_metric",
        "additional_statistics_percentage",
        "adaptive_lr",
    ]


def test_every_field_is_documented_in_its_docstring_and_in_the_reference_page() -> None:
    page = (Path(__file__).resolve().parents[1] / "docs" / "configuration.md").read_text(
        encoding="utf-8"
    )
    models = [*SECTION_MODELS.values(), DeepLearningParameters, HyperparametersSolver, TrainingOptions]
    for model in models:
        for key, info in model.model_fields.items():
            assert info.description and len(info.description) > 10, (model.__name__, key)
            assert f"`{key}`" in page, key


def test_configuration_reference_is_generated_from_the_models() -> None:
    """docs/configuration.md's reference part is the models' (SITSFLOW_REGENERATE=1 rewrites it)."""
    from sitsflow.config import docs

    page = docs.PAGE.read_text(encoding="utf-8")
    if os.environ.get("SITSFLOW_REGENERATE") == "1":
        docs.main([])
    assert page == docs.render(page), (
        "docs/configuration.md is stale: run `python -m sitsflow.config.docs` "
        "(or SITSFLOW_REGENERATE=1 pytest tests/test_config.py)"
    )
    assert "`hyperparameters_solver` | `{\"batch_size\" : [1000]" in page  # a generated cell
    assert "a number 0 < ratio < 1" in page  # the text the error messages print


def test_full_config_with_every_section(tmp_path: Path) -> None:
    (tmp_path / "dates.txt").write_text("20180101\n20180111\n")
    config = with_values(
        {
            "chain.list_tile": "T31TCJ  T31TDJ",
            "chain.region_path": "regions.shp",
            "chain.region_field": "zone",
            "chain.nomenclature_path": "nomenclature.txt",
            "chain.color_table": "colors.txt",
            "dated_raster.name": "sentinel2",
            "dated_raster.bands": ["b2", "b3", "b4", "b8"],
            "dated_raster.dates": "dates.txt",
            "dated_raster.scale": 2,
            "dated_raster.nodata": -10000,
            "dated_raster.mask_path": "masks/{tile}.tif",
            "dated_raster.start_date": "2018-01-01",
            "dated_raster.end_date": "2018-12-31T10:00:00",
            "dated_raster.temporal_resolution": 5,
            "arg_train.runs": 3,
            "arg_train.ratio": 0.7,
            "arg_train.random_seed": 4,
            "arg_train.features_from_raw_dates": True,
            "arg_train.deep_learning_parameters": {
                "dl_name": "ANN",
                "dl_parameters": {"hidden": [64, 32], "dropout": 0.1},
                "model_selection_criterion": "kappa",
                "epochs": 7,
                "weighted_labels": True,
                "num_workers": 0,
                "hyperparameters_solver": {"batch_size": [32, 64], "learning_rate": [0.1, 1]},
                "restart_from_checkpoint": False,
                "dataloader_mode": "full",
                "enable_early_stop": True,
                "epoch_to_trigger": 2,
                "early_stop_patience": 3,
                "early_stop_tol": 0,
                "early_stop_metric": "valid_loss",
                "additional_statistics_percentage": 1,
                "adaptive_lr": {
                    "patience": 2,
                    "factor": 0.5,
                    "threshold_mode": "abs",
                    "verbose": True,
                },
            },
            "arg_classification.enable_probability_map": True,
            "arg_classification.generate_final_probability_map": True,
            "python_data_managing.chunk_size_mode": "user_fixed",
            "python_data_managing.chunk_size_x": 100,
            "python_data_managing.chunk_size_y": 20,
            "external_features.module": "feat.py",
            "external_features.functions": [["get_soi", {"eps": 1e-6}], "get_ndwi"],
            "external_features.concat_mode": False,
        }
    )
    cfg = load_config(str(write(tmp_path, config)))
    assert cfg.chain.tiles == ("T31TCJ", "T31TDJ")
    assert cfg.chain.list_tile == "T31TCJ T31TDJ"
    assert cfg.chain.region_field == "zone"
    assert cfg.dated_raster.dates == str(tmp_path / "dates.txt")
    assert cfg.dated_raster.dates_kind == "file"
    assert cfg.dated_raster.scale == 2.0 and isinstance(cfg.dated_raster.scale, float)
    assert cfg.dated_raster.nodata == -10000.0
    assert (cfg.dated_raster.start_date, cfg.dated_raster.end_date) == (20180101, 20181231)
    dl = cfg.dl
    assert dl.early_stop_metric == "val_loss"
    assert dl.early_stop_tol == 0.0
    assert dl.additional_statistics_percentage == 1.0
    assert dl.hyperparameters_solver.learning_rate == (0.1, 1.0)
    assert dl.hyperparameter_pairs() == [(32, 0.1), (32, 1.0), (64, 0.1), (64, 1.0)]
    assert dl.adaptive_lr == {
        "patience": 2,
        "factor": 0.5,
        "threshold_mode": "abs",
        "verbose": True,
    }
    assert dl.dl_parameters == {"hidden": [64, 32], "dropout": 0.1}
    assert cfg.external_features is not None
    assert cfg.external_features.module == str(tmp_path / "feat.py")
    assert cfg.external_features.functions == (("get_soi", {"eps": 1e-6}), ("get_ndwi", {}))
    assert cfg.external_features.concat_mode is False
    for name in [*SECTION_MODELS, "arg_train.deep_learning_parameters"]:
        assert json.loads(json.dumps(cfg.section_dict(name))) == cfg.section_dict(name)
    assert cfg.section_dict("arg_train.deep_learning_parameters")["hyperparameters_solver"] == {
        "batch_size": [32, 64],
        "learning_rate": [0.1, 1.0],
    }


def test_section_dict_of_absent_external_features_and_unknown_name(tmp_path: Path) -> None:
    cfg = load_config(str(write(tmp_path, BASE)))
    assert cfg.section_dict("external_features") == {}
    with pytest.raises(KeyError):
        cfg.section_dict("nope")


def test_iota2_style_file_with_comments_and_unquoted_dict_keys(tmp_path: Path) -> None:
    text = """# iota2 style
chain : {
    output_path : '/abs/out'   # where outputs go
    list_tile : "T31TCJ T31TDJ"
    ground_truth : "/abs/gt.shp"
    data_field : "code"
}
dated_raster : { path : "/abs/{tile}.tif", bands : "ndvi", dates : ["20180101", "2018-01-11"] }
arg_train : {
    ratio : 0.7
    deep_learning_parameters : {
        dl_name : "MLPClassifier"
        hyperparameters_solver : {"batch_size" : [1000],
                            "learning_rate" : [0.1, 0.00001]}
        adaptive_lr : {patience: 10,
                       factor: 0.1,
                       threshold: 1e-4,
                       threshold_mode: 'rel',
                       cooldown: 0,
                       min_lr: 0,
                       eps: 1e-8,
                       verbose: False}
    }
}
"""
    cfg = load_config(str(write(tmp_path, text)))
    assert cfg.dated_raster.dates == (20180101, 20180111)
    assert cfg.dated_raster.bands == ("ndvi",)
    assert cfg.dl.adaptive_lr["threshold"] == 1e-4
    assert cfg.dl.adaptive_lr["min_lr"] == 0.0
    assert cfg.dl.hyperparameter_pairs() == [(1000, 0.1), (1000, 0.00001)]
    assert cfg.chain.output_path == "/abs/out"


# --- constraints ---------------------------------------------------------------------------
DL = "arg_train.deep_learning_parameters"
BAD_VALUES: list[tuple[str, Any, str]] = [
    ("chain.output_path", 3, "chain.output_path: expected"),
    ("chain.output_path", "gs://bucket/out", "chain.output_path: expected"),
    ("chain.list_tile", "T31TCJ T31/TDJ", "chain.list_tile: expected"),
    ("chain.list_tile", 31, "chain.list_tile: expected"),
    ("chain.list_tile", "", "chain.list_tile: expected"),
    ("chain.list_tile", "T1 T2 T1", "chain.list_tile: tile 'T1' is listed twice"),
    ("chain.ground_truth", None, "chain.ground_truth: expected"),
    ("chain.ground_truth", "gt_{tile}.shp", "{tile} is not replaced in this key"),
    ("chain.data_field", "", "chain.data_field: expected"),
    ("chain.data_field", 5, "chain.data_field: expected"),
    ("chain.region_path", 3, "chain.region_path: expected"),
    ("chain.region_field", "", "chain.region_field: expected"),
    ("chain.nomenclature_path", True, "chain.nomenclature_path: expected"),
    ("chain.color_table", 1, "chain.color_table: expected"),
    ("dated_raster.name", "Sentinel2", "dated_raster.name: expected"),
    ("dated_raster.name", "s2_theia", "dated_raster.name: expected"),
    ("dated_raster.path", None, "dated_raster.path: expected"),
    ("dated_raster.path", "x_{date}.tif", "unknown placeholder {date}"),
    ("dated_raster.path", "x_{tile.tif", "dated_raster.path: expected"),
    ("dated_raster.bands", [], "dated_raster.bands: expected"),
    ("dated_raster.bands", ["NDVI"], "dated_raster.bands: expected"),
    ("dated_raster.bands", ["ndvi", "ndvi"], "a band is listed twice"),
    ("dated_raster.bands", 3, "dated_raster.bands: expected"),
    ("dated_raster.dates", "foo", "dated_raster.dates: expected"),
    ("dated_raster.dates", [], "dated_raster.dates: expected"),
    ("dated_raster.dates", 3, "dated_raster.dates: expected"),
    ("dated_raster.dates", ["2018-13-01"], "dated_raster.dates[0]: expected a date"),
    ("dated_raster.dates", [20180111, 20180101], "increasing order"),
    ("dated_raster.dates", ["20180101", "2018-01-01"], "unique and in increasing order"),
    ("dated_raster.scale", 0, "dated_raster.scale: expected a number > 0"),
    ("dated_raster.scale", -1.5, "dated_raster.scale: expected a number > 0"),
    ("dated_raster.scale", "1", "dated_raster.scale: expected a number > 0"),
    ("dated_raster.scale", True, "dated_raster.scale: expected a number > 0"),
    ("dated_raster.nodata", "nan", "dated_raster.nodata: expected"),
    ("dated_raster.nodata", True, "dated_raster.nodata: expected"),
    ("dated_raster.mask_path", 3, "dated_raster.mask_path: expected"),
    ("dated_raster.mask_path", "m_{x}.tif", "unknown placeholder {x}"),
    ("dated_raster.start_date", "2018/01/01", "dated_raster.start_date: expected a date"),
    ("dated_raster.start_date", 2018, "dated_raster.start_date: expected a date"),
    ("dated_raster.end_date", "x", "dated_raster.end_date: expected a date"),
    ("dated_raster.temporal_resolution", 0, "dated_raster.temporal_resolution: expected"),
    ("dated_raster.temporal_resolution", 1.5, "dated_raster.temporal_resolution: expected"),
    ("dated_raster.temporal_resolution", True, "dated_raster.temporal_resolution: expected"),
    ("arg_train.runs", 0, "arg_train.runs: expected an integer >= 1, got 0 (int)"),
    ("arg_train.runs", True, "arg_train.runs: expected an integer >= 1, got True (bool)"),
    ("arg_train.runs", 1.0, "arg_train.runs: expected an integer >= 1, got 1.0 (float)"),
    ("arg_train.ratio", 0, "arg_train.ratio: expected a number 0 < ratio < 1, got 0 (int)"),
    ("arg_train.ratio", 1, "arg_train.ratio: expected a number 0 < ratio < 1"),
    ("arg_train.ratio", "abc", "arg_train.ratio: expected a number 0 < ratio < 1, got 'abc' (str)"),
    ("arg_train.ratio", True, "arg_train.ratio: expected a number 0 < ratio < 1"),
    ("arg_train.random_seed", -1, "arg_train.random_seed: expected an integer >= 0"),
    ("arg_train.random_seed", "0", "arg_train.random_seed: expected an integer >= 0"),
    (
        "arg_train.features_from_raw_dates",
        1,
        "arg_train.features_from_raw_dates: expected True or False",
    ),
    (
        "arg_train.features_from_raw_dates",
        "True",
        "arg_train.features_from_raw_dates: expected True or False",
    ),
    ("arg_train.deep_learning_parameters", 3, f"{DL}: expected a section"),
    (f"{DL}.dl_name", "LTAE", "did you mean 'LTAEClassifier'?"),
    (f"{DL}.dl_name", "ltaeclassifier", f"{DL}.dl_name: expected one of 'LTAEClassifier'"),
    (f"{DL}.dl_name", 3, f"{DL}.dl_name: expected"),
    (f"{DL}.dl_parameters", [1], f"{DL}.dl_parameters: expected a dict"),
    (
        f"{DL}.model_selection_criterion",
        "f1",
        f"{DL}.model_selection_criterion: expected one of 'loss', 'fscore', 'oa', 'kappa'",
    ),
    (f"{DL}.epochs", 0, f"{DL}.epochs: expected an integer >= 1"),
    (f"{DL}.epochs", 2.5, f"{DL}.epochs: expected an integer >= 1"),
    (f"{DL}.weighted_labels", 0, f"{DL}.weighted_labels: expected True or False"),
    (f"{DL}.num_workers", -1, f"{DL}.num_workers: expected an integer >= 0"),
    (f"{DL}.hyperparameters_solver", [1], f"{DL}.hyperparameters_solver: expected a dict"),
    (
        f"{DL}.hyperparameters_solver",
        {"batch_size": [0]},
        f"{DL}.hyperparameters_solver.batch_size: expected",
    ),
    (
        f"{DL}.hyperparameters_solver",
        {"batch_size": []},
        f"{DL}.hyperparameters_solver.batch_size: expected",
    ),
    (
        f"{DL}.hyperparameters_solver",
        {"batch_size": [1.5]},
        f"{DL}.hyperparameters_solver.batch_size: expected",
    ),
    (f"{DL}.hyperparameters_solver", {"batch_size": [8, 8]}, "a value is listed twice"),
    (
        f"{DL}.hyperparameters_solver",
        {"learning_rate": [0]},
        f"{DL}.hyperparameters_solver.learning_rate: expected",
    ),
    (
        f"{DL}.hyperparameters_solver",
        {"learning_rate": ["a"]},
        f"{DL}.hyperparameters_solver.learning_rate: expected",
    ),
    (
        f"{DL}.hyperparameters_solver",
        {"batch_sizes": [8]},
        f"unknown key '{DL}.hyperparameters_solver.batch_sizes'",
    ),
    (f"{DL}.dl_module", 3, f"{DL}.dl_module: expected"),
    (f"{DL}.dl_module", "net.txt", f"{DL}.dl_module: expected None or the path of a .py file"),
    (
        f"{DL}.restart_from_checkpoint",
        "yes",
        f"{DL}.restart_from_checkpoint: expected True or False",
    ),
    (f"{DL}.dataloader_mode", "memory", f"{DL}.dataloader_mode: expected one of 'stream', 'full'"),
    (f"{DL}.enable_early_stop", 1, f"{DL}.enable_early_stop: expected True or False"),
    (f"{DL}.epoch_to_trigger", 0, f"{DL}.epoch_to_trigger: expected an integer >= 1"),
    (f"{DL}.early_stop_patience", 0, f"{DL}.early_stop_patience: expected an integer >= 1"),
    (f"{DL}.early_stop_tol", -0.1, f"{DL}.early_stop_tol: expected a number >= 0"),
    (
        f"{DL}.early_stop_metric",
        "loss",
        f"{DL}.early_stop_metric: expected one of 'train_loss', 'val_loss'",
    ),
    (
        f"{DL}.additional_statistics_percentage",
        0,
        f"{DL}.additional_statistics_percentage: expected",
    ),
    (
        f"{DL}.additional_statistics_percentage",
        1.5,
        f"{DL}.additional_statistics_percentage: expected",
    ),
    (f"{DL}.adaptive_lr", [1], f"{DL}.adaptive_lr: expected a dict"),
    (f"{DL}.adaptive_lr", {"patience": -1}, f"{DL}.adaptive_lr.patience: expected an integer >= 0"),
    (
        f"{DL}.adaptive_lr",
        {"factor": 1},
        f"{DL}.adaptive_lr.factor: expected a number 0 < factor < 1",
    ),
    (f"{DL}.adaptive_lr", {"threshold": -1}, f"{DL}.adaptive_lr.threshold: expected a number >= 0"),
    (
        f"{DL}.adaptive_lr",
        {"threshold_mode": "x"},
        f"{DL}.adaptive_lr.threshold_mode: expected one of 'rel', 'abs'",
    ),
    (
        f"{DL}.adaptive_lr",
        {"cooldown": 1.5},
        f"{DL}.adaptive_lr.cooldown: expected an integer >= 0",
    ),
    (f"{DL}.adaptive_lr", {"min_lr": -1}, f"{DL}.adaptive_lr.min_lr: expected a number >= 0"),
    (f"{DL}.adaptive_lr", {"eps": -1}, f"{DL}.adaptive_lr.eps: expected a number >= 0"),
    (f"{DL}.adaptive_lr", {"verbose": 0}, f"{DL}.adaptive_lr.verbose: expected True or False"),
    (f"{DL}.adaptive_lr", {"patiance": 3}, f"unknown key '{DL}.adaptive_lr.patiance'"),
    (
        "arg_classification.enable_probability_map",
        0,
        "arg_classification.enable_probability_map: expected True or False",
    ),
    (
        "arg_classification.generate_final_probability_map",
        "True",
        "arg_classification.generate_final_probability_map: expected True or False",
    ),
    (
        "python_data_managing.chunk_size_mode",
        "fixed",
        "python_data_managing.chunk_size_mode: expected one of 'split_number', 'user_fixed'",
    ),
    (
        "python_data_managing.number_of_chunks",
        0,
        "python_data_managing.number_of_chunks: expected an integer >= 1",
    ),
    (
        "python_data_managing.chunk_size_x",
        0,
        "python_data_managing.chunk_size_x: expected an integer >= 1",
    ),
    (
        "python_data_managing.chunk_size_y",
        -1,
        "python_data_managing.chunk_size_y: expected an integer >= 1",
    ),
    (
        "external_features.module",
        "feat.txt",
        "external_features.module: expected the path of a .py file",
    ),
    ("external_features.module", 3, "external_features.module: expected"),
    ("external_features.functions", [], "external_features.functions: expected"),
    ("external_features.functions", 3, "external_features.functions: expected"),
    ("external_features.functions", [[1, {}]], "external_features.functions: expected"),
    ("external_features.functions", ["not-a-name"], "is not a Python function name"),
    ("external_features.concat_mode", 1, "external_features.concat_mode: expected True or False"),
]


@pytest.mark.parametrize(
    ("key", "value", "fragment"), BAD_VALUES, ids=[f"{k}={v!r}" for k, v, _ in BAD_VALUES]
)
def test_every_constraint_rejects_a_bad_value_with_key_path_and_line(
    tmp_path: Path, key: str, value: Any, fragment: str
) -> None:
    base = (
        with_values({"external_features": dict(EXTERNAL)}) if key.startswith("external") else BASE
    )
    path = write(tmp_path, with_values({key: value}, base))
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message  # exactly one problem
    last = key.split(".")[-1]
    if isinstance(value, dict) and value:
        last = next(iter(value))
    assert f"config.cfg:{line_of(path, last)}" in message
    assert info.value.exit_code == EXIT_BAD_INPUT


def test_wrong_type_message_has_the_documented_form(tmp_path: Path) -> None:
    config = with_values({"arg_train.ratio": "abc"})
    path = write(tmp_path, config)
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    line = line_of(path, "ratio")
    assert str(info.value) == (
        f"arg_train.ratio: expected a number 0 < ratio < 1, got 'abc' (str) ({path}:{line})"
    )


def test_ints_are_accepted_for_float_fields_and_booleans_must_be_booleans(tmp_path: Path) -> None:
    cfg = load_config(
        str(write(tmp_path, with_values({"dated_raster.scale": 3, f"{DL}.early_stop_tol": 1})))
    )
    assert cfg.dated_raster.scale == 3.0 and isinstance(cfg.dated_raster.scale, float)
    assert cfg.dl.early_stop_tol == 1.0 and isinstance(cfg.dl.early_stop_tol, float)
    message = load_error(tmp_path, with_values({f"{DL}.weighted_labels": "False"}))
    assert "got 'False' (str)" in message


def test_misspelt_key_suggests_the_right_one_with_its_line(tmp_path: Path) -> None:
    config = with_values({f"{DL}.epoch": 3})
    path = write(tmp_path, config)
    message = load_error(tmp_path, config)
    line = line_of(path, "epoch")
    assert message.startswith(
        f"unknown key '{DL}.epoch' ({path}:{line}); did you mean 'epochs'? Allowed keys: dl_name,"
    )
    assert "adaptive_lr" in message


def test_unknown_key_without_close_match_lists_allowed_keys(tmp_path: Path) -> None:
    message = load_error(tmp_path, with_values({"chain.zzz_qqq": 1}))
    assert "unknown key 'chain.zzz_qqq'" in message
    assert "did you mean" not in message
    assert "Allowed keys: output_path, list_tile" in message


def test_unknown_section_suggests_the_right_one(tmp_path: Path) -> None:
    config = with_values({"arg_clasification": {"enable_probability_map": True}})
    path = write(tmp_path, config)
    message = load_error(tmp_path, config)
    assert (
        f"unknown section 'arg_clasification' ({path}:{line_of(path, 'arg_clasification')})"
        in message
    )
    assert "did you mean 'arg_classification'?" in message


@pytest.mark.parametrize(
    ("key", "hint"),
    [
        ("chain.grasslands", ""),
        ("arg_train.learning_samples_extension", ""),
    ],
)
def test_iota2_keys_not_supported_yet(tmp_path: Path, key: str, hint: str) -> None:
    """Keys without an iota2 default sitsflow reproduces (tests/test_iota2_keys.py has the others)."""
    message = load_error(tmp_path, with_values({key: "x"}))
    assert f"{key} is an iota2 parameter that sitsflow does not support yet" in message
    assert hint in message


def test_sample_selection_as_iota2_users_write_it(tmp_path: Path) -> None:
    (tmp_path / "counts.csv").write_text("1 10\n")
    rule = {"sampler": "random", "strategy": "percent", "strategy.percent.p": 0.1}
    cfg = load_config(str(write(tmp_path, with_values({"arg_train.sample_selection": rule}))))
    assert cfg.arg_train.sample_selection == rule
    assert cfg.arg_train.split_ground_truth is True
    default = load_config(str(write(tmp_path, with_values({}), "plain.cfg")))
    assert default.arg_train.sample_selection == {"sampler": "random", "strategy": "all"}  # iota2's default
    # OTB's defaults fill what is left out; per_model entries are checked as the top level
    given = {"strategy": "byclass", "strategy.byclass.in": "counts.csv",
             "per_model": [{"target_model": "2", "strategy": "total"}]}
    cfg = load_config(str(write(tmp_path, with_values({"arg_train.sample_selection": given}))))
    assert cfg.arg_train.sample_selection == {
        "sampler": "periodic", "strategy": "byclass", "strategy.byclass.in": str(tmp_path / "counts.csv"),
        "per_model": [{"target_model": 2, "sampler": "periodic", "strategy": "total", "strategy.total.v": 1000}],
    }
    # the resolved configuration reads back equal (dotted keys quoted, the path absolute)
    again = write(tmp_path, cfg.to_cfg(), "sub/resolved.cfg")
    assert load_config(str(again)) == cfg
    cfg = load_config(str(write(tmp_path, with_values({"arg_train.split_ground_truth": False}))))
    assert cfg.arg_train.split_ground_truth is False


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ({"sampler": "randum", "strategy": "all"}, "sampler: expected one of 'periodic', 'random', got 'randum'"),
        ({"strategy": "percentage"}, "strategy: expected one of 'all', 'smallest', 'percent', 'constant', 'total', "
                                     "'byclass', got 'percentage'"),
        ({"strategy": "percent", "strategy.percent.p": 10}, "strategy.percent.p: expected a number 0 < p <= 1"),
        ({"strategy": "percent", "strategy.percent.p": 0}, "strategy.percent.p: expected a number 0 < p <= 1"),
        ({"strategy": "constant"}, "strategy 'constant' needs strategy.constant.nb: an integer >= 1"),
        ({"strategy": "constant", "strategy.constant.nb": 2.5}, "strategy.constant.nb: expected an integer >= 1"),
        ({"strategy": "total", "strategy.total.v": 0}, "strategy.total.v: expected an integer >= 1"),
        ({"strategy": "byclass"}, "strategy 'byclass' needs strategy.byclass.in"),
        ({"strategy": "all", "strategy.percent.p": 0.5}, "strategy.percent.p is only read with strategy 'percent', "
                                                          "not 'all'"),
        ({"strategy": "all", "ram": 256}, "unknown key 'ram'; allowed keys: sampler, strategy, per_model,"),
        ({"per_model": {"target_model": 1}}, "per_model: expected a non-empty list"),
        ({"per_model": [{"strategy": "all"}]}, "per_model[0]: target_model: expected a region number"),
        ({"per_model": [{"target_model": 1, "strategy": "smalest"}]}, "per_model[0]: strategy: expected one of"),
        ("all", "expected iota2's sample selection dict"),
    ],
)
def test_bad_sample_selection_names_the_key_and_the_allowed_values(tmp_path: Path, value: Any, fragment: str) -> None:
    path = write(tmp_path, with_values({"arg_train.sample_selection": value}))
    message = load_error(tmp_path, with_values({"arg_train.sample_selection": value}))
    assert message.startswith("arg_train.sample_selection: "), message
    assert fragment in message, message
    assert f"config.cfg:{line_of(path, 'sample_selection')}" in message


def test_split_ground_truth_must_be_a_boolean(tmp_path: Path) -> None:
    message = load_error(tmp_path, with_values({"arg_train.split_ground_truth": "False"}))
    assert "arg_train.split_ground_truth: expected True or False" in message


def test_iota2_scheduler_keys_are_accepted_with_one_warning(tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    config = with_values({"chain.first_step": "init", "chain.last_step": "validation", "chain.check_inputs": False,
                          "chain.remove_output_path": True, "chain.logger_level": "DEBUG",
                          "task_retry_limits": {"allowed_retry": 0, "maximum_ram": 180.0},
                          "arg_train.classifier": "sharkrf", "python_data_managing.padding_size_x": 10,
                          "python_data_managing.padding_size_y": 10})
    path = write(tmp_path, config)
    caplog.set_level("WARNING", logger="sitsflow")
    cfg = load_config(str(path))
    assert cfg == load_config(str(write(tmp_path, with_values({}), "plain.cfg")))  # nothing of them is kept
    warnings = [r.getMessage() for r in caplog.records if "accepted and ignored" in r.getMessage()]
    assert len(warnings) == 1
    for fragment in (f"chain.first_step ({path}:{line_of(path, 'first_step')}; sitsflow runs every stage",
                     "chain.last_step (", "chain.check_inputs (", "chain.remove_output_path (",
                     "chain.logger_level (", "SITSFLOW_LOG_LEVEL", "task_retry_limits (", "retryStrategy",
                     "arg_train.classifier (", "selects the deep-learning workflow",
                     "python_data_managing.padding_size_x (", "python_data_managing.padding_size_y (", "pixel-wise"):
        assert fragment in warnings[0], fragment


def test_iota2_sensor_section_without_products_names_the_chain_key(tmp_path: Path) -> None:
    config = with_values({"Sentinel_2": {"keep_bands": ["B2"]}, "dated_raster": _DELETE})
    message = load_error(tmp_path, config)
    assert "Sentinel_2" in message and "chain.s2_path" in message


@pytest.mark.parametrize(
    ("key", "fragment"),
    [
        (
            "chain.data_field",
            "chain.data_field: missing required key 'data_field' in section 'chain'",
        ),
        ("chain.output_path", "chain.output_path: missing required key"),
        ("chain.list_tile", "chain.list_tile: missing required key"),
        ("chain.ground_truth", "chain.ground_truth: missing required key"),
        (
            "dated_raster.path",
            "dated_raster.path: missing required key 'path' in section 'dated_raster'",
        ),
        ("dated_raster.bands", "dated_raster.bands: missing required key"),
        (f"{DL}.dl_name", f"{DL}.dl_name: missing required key 'dl_name' in section '{DL}'"),
        ("arg_train.deep_learning_parameters", f"{DL}: missing required key"),
        ("dated_raster", "no sensor: set chain.s2_path"),
        ("chain", "chain: missing required section 'chain'"),
        ("arg_train", "arg_train: missing required section 'arg_train'"),
    ],
)
def test_missing_required_keys_and_sections(tmp_path: Path, key: str, fragment: str) -> None:
    assert fragment in load_error(tmp_path, with_values({key: _DELETE}))


def test_missing_key_names_the_section_line(tmp_path: Path) -> None:
    config = with_values({"chain.data_field": _DELETE})
    path = write(tmp_path, config)
    assert f"({path}:{line_of(path, 'chain')})" in load_error(tmp_path, config)


def test_external_features_requires_module_and_functions(tmp_path: Path) -> None:
    message = load_error(tmp_path, with_values({"external_features": {"concat_mode": True}}))
    assert "external_features.module: missing required key" in message
    assert "external_features.functions: missing required key" in message


def test_several_errors_are_reported_together_one_per_line(tmp_path: Path) -> None:
    config = with_values(
        {"arg_train.ratio": 2, f"{DL}.epochs": -1, "chain.list_tile": "", f"{DL}.epoch": 3}
    )
    message = load_error(tmp_path, config)
    lines = message.splitlines()
    assert lines[0].startswith("4 problems in the configuration")
    assert len(lines) == 5
    for fragment in ("arg_train.ratio:", f"{DL}.epochs:", "chain.list_tile:", f"'{DL}.epoch'"):
        assert sum(fragment in line for line in lines[1:]) == 1, fragment


def test_adaptive_lr_mode_and_optimizer_are_rejected(tmp_path: Path) -> None:
    config = with_values({f"{DL}.adaptive_lr": {"mode": "max", "optimizer": "SGD", "patience": 2}})
    message = load_error(tmp_path, config)
    for key in ("mode", "optimizer"):
        assert (
            f"{DL}.adaptive_lr.{key}: cannot be set: mode is forced to 'min' (the validation "
            "loss is monitored) and the optimizer is the training optimizer" in message
        )


def test_generate_final_probability_map_requires_enable(tmp_path: Path) -> None:
    config = with_values({"arg_classification": {"generate_final_probability_map": True}})
    message = load_error(tmp_path, config)
    assert "arg_classification.generate_final_probability_map: True requires" in message
    assert "enable_probability_map" in message
    both = with_values(
        {
            "arg_classification": {
                "generate_final_probability_map": True,
                "enable_probability_map": True,
            }
        }
    )
    cfg = load_config(str(write(tmp_path, both)))
    assert cfg.arg_classification.generate_final_probability_map is True


def test_start_date_must_not_follow_end_date(tmp_path: Path) -> None:
    config = with_values(
        {"dated_raster.start_date": "20180301", "dated_raster.end_date": "2018-02-01"}
    )
    message = load_error(tmp_path, config)
    assert "dated_raster.end_date: end_date 20180201 is before start_date 20180301" in message
    same = with_values({"dated_raster.start_date": "20180301", "dated_raster.end_date": 20180301})
    cfg = load_config(str(write(tmp_path, same)))
    assert cfg.dated_raster.start_date == cfg.dated_raster.end_date == 20180301


def test_several_tiles_need_the_tile_placeholder(tmp_path: Path) -> None:
    config = with_values({"chain.list_tile": "T1 T2", "dated_raster.path": "/data/ndvi.tif"})
    assert "dated_raster.path: 2 tiles are listed" in load_error(tmp_path, config)
    config = with_values({"chain.list_tile": "T1 T2", "dated_raster.mask_path": "/data/mask.tif"})
    assert "dated_raster.mask_path: 2 tiles are listed" in load_error(tmp_path, config)
    single = with_values({"dated_raster.path": "/data/ndvi.tif"})
    assert load_config(str(write(tmp_path, single))).dated_raster.path == "/data/ndvi.tif"


def test_dl_module_allows_custom_network_names(tmp_path: Path) -> None:
    config = with_values({f"{DL}.dl_name": "MyNet", f"{DL}.dl_module": "nets/my.py"})
    cfg = load_config(str(write(tmp_path, config)))
    assert cfg.dl.dl_name == "MyNet"
    assert cfg.dl.dl_module == str(tmp_path / "nets" / "my.py")
    bad = with_values({f"{DL}.dl_name": "My Net", f"{DL}.dl_module": "nets/my.py"})
    assert f"{DL}.dl_name: expected the class name (a Python identifier)" in load_error(
        tmp_path, bad
    )
    assert "did you mean" not in load_error(tmp_path, with_values({f"{DL}.dl_name": "MyNet"}))


def test_hyperparameters_solver_scalars_and_missing_keys(tmp_path: Path) -> None:
    config = with_values({f"{DL}.hyperparameters_solver": {"batch_size": 256}})
    cfg = load_config(str(write(tmp_path, config)))
    assert cfg.dl.hyperparameters_solver.batch_size == (256,)
    assert cfg.dl.hyperparameters_solver.learning_rate == (0.00001,)
    config = with_values({f"{DL}.hyperparameters_solver": {"learning_rate": 0.01}})
    cfg = load_config(str(write(tmp_path, config)))
    assert cfg.dl.hyperparameter_pairs() == [(1000, 0.01)]
    config = with_values(
        {f"{DL}.hyperparameters_solver": {"batch_size": [8, 16], "learning_rate": [0.1, 0.2, 0.3]}}
    )
    pairs = load_config(str(write(tmp_path, config))).dl.hyperparameter_pairs()
    assert pairs == [(8, 0.1), (8, 0.2), (8, 0.3), (16, 0.1), (16, 0.2), (16, 0.3)]


def test_dates_forms_are_normalised(tmp_path: Path) -> None:
    dates = ["20180101", "2018-01-11", "2018-01-21T10:30:00", "2018-01-31T23:00:00Z", 20180210]
    cfg = load_config(str(write(tmp_path, with_values({"dated_raster.dates": dates}))))
    assert cfg.dated_raster.dates == (20180101, 20180111, 20180121, 20180131, 20180210)
    assert cfg.dated_raster.dates_kind == "list"
    cfg = load_config(str(write(tmp_path, with_values({"dated_raster.dates": "sub/dates.json"}))))
    assert cfg.dated_raster.dates == str(tmp_path / "sub" / "dates.json")
    text = render(BASE) + "\ndated_raster2 : 1\n"
    assert "unknown section 'dated_raster2'" in load_error(tmp_path, text)


def test_backtick_dates_and_environment_variables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SITSFLOW_TEST_FIELD", "classe")
    text = render(with_values({"chain.data_field": _DELETE, "dated_raster.start_date": _DELETE}))
    text = text.replace(
        "chain : {",
        "chain : {\n  data_field : `$SITSFLOW_TEST_FIELD`\n"
        "  region_field : `$SITSFLOW_UNSET_X|zone`",
    ).replace("dated_raster : {", "dated_raster : {\n  start_date : `2018-03-01`")
    cfg = load_config(str(write(tmp_path, text)))
    assert cfg.chain.data_field == "classe"
    assert cfg.chain.region_field == "zone"
    assert cfg.dated_raster.start_date == 20180301
    imported = text.replace("`$SITSFLOW_TEST_FIELD`", "`os:getcwd`")
    assert "backtick" in load_error(tmp_path, imported)
    unset = text.replace("`$SITSFLOW_TEST_FIELD`", "`$SITSFLOW_UNSET_Y`")
    assert "environment variable SITSFLOW_UNSET_Y" in load_error(tmp_path, unset)


# --- syntax, files ---------------------------------------------------------------------------
def test_syntax_error_gives_file_line_and_column(tmp_path: Path) -> None:
    text = render(BASE).replace('data_field : "code"', 'data_field : "code" "x" 3')
    path = write(tmp_path, text)
    line = line_of(path, "data_field")
    message = load_error(tmp_path, text)
    assert message.startswith(f"syntax error in {path}:{line} (line {line}, column ")
    assert 'data_field : "code" "x" 3' in message


def test_unterminated_string_and_duplicate_key(tmp_path: Path) -> None:
    text = render(BASE) + '\nextra : "abc\n'
    path = write(tmp_path, text)
    message = load_error(tmp_path, text)
    assert f"{path}:{line_of(path, 'extra')}" in message and "Unterminated quoted string" in message
    text = render(BASE).replace('data_field : "code"', 'data_field : "code"\n  data_field : "x"')
    path = write(tmp_path, text)
    message = load_error(tmp_path, text)
    assert "duplicate key 'chain.data_field'" in message


def test_missing_file_is_input_not_found(tmp_path: Path) -> None:
    with pytest.raises(InputNotFoundError) as info:
        load_config(str(tmp_path / "nope.cfg"))
    assert "nope.cfg" in str(info.value)
    assert info.value.exit_code == EXIT_BAD_INPUT
    with pytest.raises(ConfigError):
        load_config(str(tmp_path))
    with pytest.raises(ConfigError):
        load_config("gs://bucket/config.cfg")


# --- overrides -------------------------------------------------------------------------------
def test_overrides_scalar_nested_list_dict(tmp_path: Path) -> None:
    path = write(tmp_path, BASE)
    cfg = load_config(
        str(path),
        [
            "arg_train.runs=2",
            f"{DL}.epochs=3",
            f"{DL}.adaptive_lr.patience=4",
            "dated_raster.bands=['b4', 'b8']",
            f'{DL}.dl_parameters={{"d_model": 64, "n_head": 4}}',
            f"{DL}.hyperparameters_solver.learning_rate=[0.1, 0.01]",
            "arg_train.ratio=0.8",
            f"{DL}.enable_early_stop=True",
            "chain.list_tile=T31TCJ T31TDJ",
            "dated_raster.path=/data/{tile}.tif",
            "chain.data_field='1234'",
        ],
    )
    assert cfg.arg_train.runs == 2
    assert cfg.dl.epochs == 3
    assert cfg.dl.adaptive_lr == {"patience": 4}
    assert cfg.dated_raster.bands == ("b4", "b8")
    assert cfg.dl.dl_parameters == {"d_model": 64, "n_head": 4}
    assert cfg.dl.hyperparameter_pairs() == [(1000, 0.1), (1000, 0.01)]
    assert cfg.arg_train.ratio == 0.8
    assert cfg.dl.enable_early_stop is True
    assert cfg.chain.tiles == ("T31TCJ", "T31TDJ")
    assert cfg.dated_raster.path == "/data/{tile}.tif"
    assert cfg.chain.data_field == "1234"


def test_later_override_wins_and_can_create_a_section(tmp_path: Path) -> None:
    path = write(tmp_path, BASE)
    cfg = load_config(
        str(path),
        [f"{DL}.epochs=3", f"{DL}.epochs=5", "arg_classification.enable_probability_map=True"],
    )
    assert cfg.dl.epochs == 5
    assert cfg.arg_classification.enable_probability_map is True


def test_override_errors_are_marked_from_set(tmp_path: Path) -> None:
    path = write(tmp_path, BASE)
    with pytest.raises(ConfigError) as info:
        load_config(str(path), [f"{DL}.epoch=3"])
    assert str(info.value).startswith(
        f"unknown key '{DL}.epoch' (from --set); did you mean 'epochs'?"
    )
    with pytest.raises(ConfigError) as info:
        load_config(str(path), ["arg_train.ratio=abc"])
    assert (
        str(info.value)
        == "arg_train.ratio: expected a number 0 < ratio < 1, got 'abc' (str) (from --set)"
    )
    with pytest.raises(ConfigError) as info:
        load_config(str(path), ["chian.output_path=x"])
    assert "unknown section 'chian' (from --set); did you mean 'chain'?" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_config(str(path), ["external_features.concat_mode=False"])
    assert (
        "external_features.module: missing required key 'module' in section "
        "'external_features' (from --set)" in str(info.value)
    )


@pytest.mark.parametrize(
    "item", ["epochs3", "epochs=3", "=3", "arg_train.=3", ".runs=2", "arg_train..runs=2"]
)
def test_malformed_overrides(tmp_path: Path, item: str) -> None:
    path = write(tmp_path, BASE)
    with pytest.raises(ConfigError) as info:
        load_config(str(path), [item])
    assert "(from --set)" in str(info.value)
    assert "section.key=value" in str(info.value)


def test_override_below_a_plain_value_is_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, BASE)
    with pytest.raises(ConfigError) as info:
        load_config(str(path), ["chain.data_field.x=2"])
    assert "chain.data_field is not a section" in str(info.value)


def test_override_of_a_whole_section_replaces_it(tmp_path: Path) -> None:
    path = write(tmp_path, BASE)
    cfg = load_config(str(path), [f'{DL}={{"dl_name": "ANN", "epochs": 2}}'])
    assert (cfg.dl.dl_name, cfg.dl.epochs) == ("ANN", 2)
    with pytest.raises(ConfigError) as info:
        load_config(str(path), [f'{DL}={{"epochs": 2}}'])
    assert f"{DL}.dl_name: missing required key 'dl_name' in section '{DL}' (from --set)" in str(
        info.value
    )


# --- paths -----------------------------------------------------------------------------------
def test_relative_paths_are_resolved_against_the_config_folder(tmp_path: Path) -> None:
    config = with_values(
        {
            "chain.output_path": "../out",
            "chain.ground_truth": "./ref/gt.gpkg",
            "chain.region_path": "/abs/regions.shp",
            "chain.nomenclature_path": "s3://bucket/a/../nomenclature.txt",
            "chain.color_table": "~/colors.txt",
            "dated_raster.path": "rasters/{tile}/ndvi.tif",
            "dated_raster.mask_path": "masks/{tile}.tif",
            f"{DL}.dl_module": "nets/my.py",
            f"{DL}.dl_name": "MyNet",
        }
    )
    path = write(tmp_path, config, "sub/config.cfg")
    cfg = load_config(str(path))
    sub = tmp_path / "sub"
    assert cfg.chain.output_path == str(tmp_path / "out")
    assert cfg.chain.ground_truth == str(sub / "ref" / "gt.gpkg")
    assert cfg.chain.region_path == "/abs/regions.shp"
    assert cfg.chain.nomenclature_path == "s3://bucket/nomenclature.txt"
    assert cfg.chain.color_table == os.path.join(os.path.expanduser("~"), "colors.txt")
    assert cfg.dated_raster.path == str(sub / "rasters" / "{tile}" / "ndvi.tif")
    assert cfg.dated_raster.mask_path == str(sub / "masks" / "{tile}.tif")
    assert cfg.dl.dl_module == str(sub / "nets" / "my.py")


def test_relative_config_source_and_override_paths_use_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path, BASE, "cfgs/config.cfg")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(tmp_path)
    cfg = load_config("cfgs/config.cfg")
    assert cfg.source == str(tmp_path / "cfgs" / "config.cfg")
    assert cfg.chain.output_path == str(tmp_path / "cfgs" / "out")
    monkeypatch.chdir(elsewhere)
    cfg = load_config(
        str(tmp_path / "cfgs" / "config.cfg"),
        ["chain.output_path=results", "chain.ground_truth=gt/ref.shp"],
    )
    assert cfg.chain.output_path == str(elsewhere / "results")
    assert cfg.chain.ground_truth == str(elsewhere / "gt" / "ref.shp")
    assert cfg.dated_raster.path == str(tmp_path / "cfgs" / "ndvi_{tile}.tif")


def test_s3_relative_path_resolution() -> None:
    assert resolve_path("data/x.tif", "s3://bucket/cfgs") == "s3://bucket/cfgs/data/x.tif"
    assert resolve_path("../x.tif", "s3://bucket/cfgs") == "s3://bucket/x.tif"
    assert resolve_path("/local/x.tif", "s3://bucket/cfgs") == "/local/x.tif"
    assert resolve_path("s3://other/k//y/", "/tmp") == "s3://other/k/y"
    with pytest.raises(Exception, match="inside the bucket"):
        resolve_path("../../x.tif", "s3://bucket/cfgs")


def test_config_read_from_s3_resolves_against_its_s3_folder(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from sitsflow import storage

    text = render(with_values({"chain.output_path": "../runs/a"}))
    read: list[str] = []

    def fake_read_text(uri: str) -> str:
        read.append(uri)
        return text

    monkeypatch.setattr(storage, "read_text", fake_read_text)
    cfg = load_config("s3://bucket/project/cfgs/config.cfg")
    assert read == ["s3://bucket/project/cfgs/config.cfg"]
    assert cfg.source == "s3://bucket/project/cfgs/config.cfg"
    assert cfg.chain.output_path == "s3://bucket/project/runs/a"
    assert cfg.chain.ground_truth == "s3://bucket/project/cfgs/gt.gpkg"
    assert cfg.dated_raster.path == "s3://bucket/project/cfgs/ndvi_{tile}.tif"


@pytest.mark.s3
def test_config_read_from_a_real_s3_server(s3_bucket: str) -> None:
    from sitsflow import storage

    uri = f"{s3_bucket}/cfgs/config.cfg"
    storage.write_text(uri, render(BASE))
    cfg = load_config(uri, [f"{DL}.epochs=2"])
    assert cfg.chain.output_path == f"{s3_bucket}/cfgs/out"
    assert cfg.dl.epochs == 2
    with pytest.raises(InputNotFoundError):
        load_config(f"{s3_bucket}/cfgs/missing.cfg")


# --- serialisation and immutability ----------------------------------------------------------
def test_to_cfg_round_trip(tmp_path: Path) -> None:
    config = with_values(
        {
            "chain.data_field": 'co"de\\ é\ttab',
            "chain.list_tile": "T31TCJ T31TDJ",
            "dated_raster.dates": ["20180101", "20180111"],
            "dated_raster.nodata": -10000,
            "dated_raster.scale": 0.0001,
            "dated_raster.bands": ["b2", "ndvi"],
            f"{DL}.dl_parameters": {
                "nested": {"a": [1, 2.5, None, True]},
                "name": "x y",
                "True": 1,
            },
            f"{DL}.adaptive_lr": {"factor": 0.5, "min_lr": 0, "eps": 1e-8},
            f"{DL}.hyperparameters_solver": {"batch_size": [8, 16], "learning_rate": [1e-3, 0.1]},
            f"{DL}.additional_statistics_percentage": 0.25,
            "external_features": {"module": "feat.py", "functions": "f1 f2", "concat_mode": False},
            "external_features.functions": [["f1", {"k": "v"}], "f2"],
        }
    )
    cfg = load_config(str(write(tmp_path, config, "a/config.cfg")))
    text = cfg.to_cfg()
    other = write(tmp_path, text, "b/c/resolved.cfg")
    again = load_config(str(other))
    assert again == cfg
    assert hash(again) == hash(cfg)
    assert again.source != cfg.source
    assert again.to_cfg().split("\n", 1)[1] == text.split("\n", 1)[1]
    for name in SECTION_MODELS:
        assert again.section_dict(name) == cfg.section_dict(name)
    changed = load_config(str(other), [f"{DL}.epochs=7"])
    assert changed != cfg


def test_to_cfg_round_trip_of_defaults(tmp_path: Path) -> None:
    cfg = load_config(str(write(tmp_path, BASE)))
    again = load_config(str(write(tmp_path, cfg.to_cfg(), "resolved.cfg")))
    assert again == cfg
    assert again.external_features is None


def test_configuration_is_immutable(tmp_path: Path) -> None:
    cfg = load_config(str(write(tmp_path, BASE)))
    with pytest.raises(ValidationError):
        cfg.dl.epochs = 3  # type: ignore[misc]
    with pytest.raises(ValidationError):
        cfg.chain = cfg.chain  # type: ignore[misc]
    with pytest.raises(ValidationError):
        cfg.source = "x"  # type: ignore[misc]
    with pytest.raises(ValidationError):
        cfg.dl.hyperparameters_solver.batch_size = (1,)  # type: ignore[misc]
    with pytest.raises(AttributeError):
        cfg.dated_raster.bands.append("x")  # type: ignore[attr-defined]
    assert isinstance(cfg, SitsflowConfig)


def test_keys_inside_multi_line_dicts_get_their_own_line(tmp_path: Path) -> None:
    text = render(with_values({DL: _DELETE})).rstrip().removesuffix("}")
    text += """  deep_learning_parameters : {
    dl_name : "ANN"
    adaptive_lr : {patience: 10,
                   factor: 0.1,
                   treshold: 1e-4,
                   mode: 'min'}
  }
}
"""
    path = write(tmp_path, text)
    message = load_error(tmp_path, text)
    assert (
        f"unknown key '{DL}.adaptive_lr.treshold' ({path}:{line_of(path, 'treshold')}); "
        "did you mean 'threshold'?" in message
    )
    assert f"{DL}.adaptive_lr.mode: cannot be set" in message
    assert f"({path}:{line_of(path, 'mode')})" in message


# --- the models are the schema ---------------------------------------------------------------
def test_rules_between_keys_are_reported_with_the_other_errors(tmp_path: Path) -> None:
    """A rule runs on the keys valid by themselves: every error at once, not one round each."""
    config = with_values(
        {
            "dated_raster.scale": -1,
            "dated_raster.start_date": 20190101,
            "dated_raster.end_date": 20180101,
            f"{DL}.dl_name": "LTAE",
            f"{DL}.epochs": 0,
        }
    )
    lines = load_error(tmp_path, config).splitlines()
    assert lines[0].startswith("4 problems")
    assert any("dated_raster.end_date: end_date 20180101 is before" in line for line in lines)
    assert any(f"{DL}.dl_name: expected one of" in line for line in lines)
    # a rule reading an invalid key is not run (its error would only echo the first one)
    config = with_values({f"{DL}.dl_name": "MyNet", f"{DL}.dl_module": "net.txt"})
    message = load_error(tmp_path, config)
    assert "dl_module: expected None or the path of a .py file" in message
    assert "\n" not in message


def test_models_validate_python_values_too() -> None:
    """Building a model in Python checks it as the loader does (the same schema)."""
    with pytest.raises(ValidationError):
        DeepLearningParameters(dl_name="LTAEClassifier", epochs=0)
    with pytest.raises(ValidationError):
        DeepLearningParameters(dl_name="NoSuchNet")
    with pytest.raises(ValidationError):
        DeepLearningParameters(dl_name="ANN", adaptive_lr={"mode": "max"})
    dl = DeepLearningParameters(dl_name="ANN", hyperparameters_solver={"batch_size": [8, 16]})
    assert dl.hyperparameter_pairs() == [(8, 0.00001), (16, 0.00001)]


def test_non_finite_numbers_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path, BASE)
    with pytest.raises(ConfigError, match=r"dated_raster.scale: expected a number > 0, got inf"):
        load_config(str(path), ["dated_raster.scale=1e999"])


def test_sensor_facts_come_from_the_catalogue(tmp_path: Path) -> None:
    from sitsflow.config.models import ChainSection
    from sitsflow.sensors.catalogue import OPTICAL_SENSORS

    for section, sensor in OPTICAL_SENSORS.items():
        assert sensor.chain_key in ChainSection.model_fields
        assert section in SECTION_MODELS
    gt = tmp_path / "l8"
    cfg = load_config(
        str(write(tmp_path, with_values({"dated_raster": _DELETE, "chain.l8_path": str(gt)}))),
        ["Landsat8.keep_bands=['b5', 'B4']"],
    )
    assert cfg.Landsat8 is not None and cfg.Landsat8.temporal_resolution == 16  # iota2's default
    assert cfg.Landsat8.keep_bands == ("B4", "B5")  # the sensor's spelling and order
    message = load_error(tmp_path, with_values({"Landsat8": {"keep_bands": ["B8"]}, "chain.l8_path": "x"}))
    assert "Landsat8.keep_bands: expected a non-empty list of unique bands among ['B1'" in message
    assert "unknown band 'B8'" in message
