"""Every key of iota2's configuration reference loads: a full iota2 configuration is accepted with
one warning; a key sitsflow does not implement is accepted at iota2's default and refused (exit 2,
naming the key, its line, its value and why) at another value; ``use_gapfilling`` is
``features_from_raw_dates`` negated."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rasterio.windows import Window
from sitsflow.config import SECTION_MODELS, DeepLearningParameters, SitsflowConfig, load_config
from sitsflow.config.syntax import format_value
from sitsflow.errors import EXIT_BAD_INPUT, ConfigError
from sitsflow.features import FeaturePipeline
from synthetic import write_config, write_scene

FULL = Path(__file__).parent / "data" / "iota2" / "full_iota2.cfg"

MINIMAL = """chain : {
    output_path : "out"
    list_tile : "T31TCJ"
    ground_truth : "gt.gpkg"
    data_field : "code"
}
dated_raster : { path : "ndvi_{tile}.tif", bands : ["ndvi"] }
arg_train : {
    runs : 2
    deep_learning_parameters : { dl_name : "LTAEClassifier" }
}
"""


def _with(text: str, section: str, key: str, value: Any) -> str:
    """``text`` with ``section.key : value`` added (the section is appended when absent)."""
    line = f"    {key} : {format_value(value)}"
    if re.search(rf"^{section} : {{$", text, re.M):
        return re.sub(rf"^{section} : {{$", f"{section} : {{\n{line}", text, count=1, flags=re.M)
    return text + f"{section} : {{\n{line}\n}}\n"


def _load(tmp_path: Path, text: str) -> SitsflowConfig:
    path = tmp_path / "config.cfg"
    path.write_text(text)
    return load_config(str(path))


def _error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, text)
    assert info.value.exit_code == EXIT_BAD_INPUT
    return str(info.value)


_ALIKE = {
    # sections of the same model as one the file shows: Sentinel_2's, Landsat8_old's
    "Sentinel_2_L3A",
    "Sentinel_2_S2C",
    "Landsat8",
    "Landsat8_usgs",
    "Landsat8_usgs_optical",
    "Landsat8_usgs_thermal",
    "Landsat8_usgs_infrared",
    "Landsat7_usgs",
}
"""Sections the full file leaves out (besides ``cropMix``, iota2's older spelling of ``crop_mix``)."""


def _iota2_keys() -> list[str]:
    """Every key path the schema accepts without implementing it (at any value or at iota2's default)."""
    owners: list[tuple[str, Any]] = [("", SitsflowConfig), *((f"{n}.", m) for n, m in SECTION_MODELS.items())]
    return [
        prefix + key
        for prefix, owner in owners
        for key in [*getattr(owner, "__ignored__", {}), *getattr(owner, "__iota2_defaults__", {})]
    ]


def test_a_full_iota2_configuration_loads_with_one_warning_naming_each_key_without_effect(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("WARNING", logger="sitsflow")
    cfg = load_config(str(FULL))
    warnings = [r.getMessage() for r in caplog.records if "accepted and ignored" in r.getMessage()]
    assert len(warnings) == 1
    text = FULL.read_text()
    # iota2's userFeat section, at its defaults, with chain.user_feat_path None: read by neither
    line = next(n for n, t in enumerate(text.splitlines(), 1) if t.startswith("userFeat :"))
    assert f"userFeat ({FULL}:{line}; iota2 reads it only with chain.user_feat_path" in warnings[0]
    assert cfg.userFeat is None
    named = _iota2_keys()
    for path in named:
        section, _, key = path.rpartition(".")
        if (section or key) in _ALIKE or key == "cropMix":
            continue
        line = next(n for n, t in enumerate(text.splitlines(), 1) if re.match(rf"\s*{re.escape(key)} :", t))
        assert f"{path}" in warnings[0] and f"full_iota2.cfg:{line}" in warnings[0], path
    # the file holds every key of sitsflow's iota2 sections too (not sitsflow's own: dated_raster,
    # training_options, resources, stac)
    written = set(re.findall(r"^\s*(\w+) :", text, re.M)) | set(re.findall(r"[{,]\s*(\w+) :", text))
    models = [m for n, m in SECTION_MODELS.items() if n not in ("dated_raster", "resources", "stac")]
    for model in [*models, DeepLearningParameters]:
        assert set(model.model_fields) - {"training_options"} <= written, model.__name__
    # the keys that are implemented kept their values; the ignored ones are not in the configuration
    assert cfg.chain.s2_path is not None and cfg.Sentinel_2 is not None
    assert cfg.Sentinel_2.start_date is None and cfg.Sentinel_2.end_date is None  # iota2's "" is "not set"
    assert cfg.arg_train.features_from_raw_dates is False and cfg.sensors_data_interpolation.use_gapfilling is True
    assert cfg.arg_classification.merge_final_classifications is False
    assert cfg.arg_classification.merge_final_classifications_undecidedlabel == 255
    assert "classif_mode" not in cfg.to_cfg() and "first_step" not in cfg.to_cfg()
    assert cfg.external_features is not None and cfg.external_features.no_data_value == -10000
    assert cfg.resources.train is not None  # iota2's resource block, as written


@pytest.mark.parametrize(
    ("section", "key", "value", "fragment"),
    [
        ("chain", "s1_path", "s1.cfg", "this sensor is not supported"),
        ("chain", "l8_usgs_path", "l8", "dated_raster"),
        ("chain", "cloud_threshold", 2, "sitsflow samples every labelled pixel"),
        ("chain", "minimum_required_dates", 5, "does not check a number of dates"),
        ("arg_train", "sample_augmentation", {"activate": True, "strategy": "replicate"}, "does not augment"),
        ("arg_train", "crop_mix", True, "reference polygons only"),
        ("arg_train", "validity_threshold", 3, "every labelled pixel"),
        ("arg_classification", "classif_mode", "fusion", "regions split into sub-models"),
        ("arg_classification", "enable_boundary_fusion", True, "its own model"),
        ("python_data_managing", "data_mode_access", "both", "never both"),
        ("python_data_managing", "fill_missing_dates", True, "does not add dates"),
        ("sensors_data_interpolation", "auto_date", False, "start_date and end_date"),
        ("builders", "builders_class_name", ["i2_obia"], "i2_classification"),
    ],
)
def test_a_non_default_value_of_a_key_sitsflow_does_not_implement_exits_2_with_the_reason(
    tmp_path: Path, section: str, key: str, value: Any, fragment: str
) -> None:
    text = _with(MINIMAL, section, key, value)
    message = _error(tmp_path, text)
    path = section if section == "builders" else f"{section}.{key}"  # builders: the section is the key
    line = next(n for n, t in enumerate(text.splitlines(), 1) if re.match(rf"\s*{path.rpartition('.')[2]} :", t))
    assert f"{path} = " in message and f"config.cfg:{line}" in message, message
    assert "sitsflow accepts only iota2's default" in message and fragment in message, message


def test_every_default_of_the_table_is_accepted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Each key of every ``__iota2_defaults__`` table loads at its own default (the table cannot
    hold a default its own check refuses)."""
    caplog.set_level("WARNING", logger="sitsflow")
    base = _load(tmp_path, MINIMAL)
    for name, model in [("", SitsflowConfig), *SECTION_MODELS.items()]:
        for key, known in getattr(model, "__iota2_defaults__", {}).items():
            if name in ("chain", "arg_train"):
                text = _with(MINIMAL, name, key, known.default)
            elif name == "":
                text = MINIMAL + f"{key} : {format_value(known.default)}\n"
            elif name in ("Sentinel_2", "Sentinel_2_L3A", "Sentinel_2_S2C", "Landsat8", "external_features"):
                continue  # these sections need their data (the full configuration shows them)
            else:
                text = _with(MINIMAL, name, key, known.default)
            assert _load(tmp_path, text) == base, (name, key)


def test_a_dict_default_accepts_some_of_its_keys_at_their_defaults(tmp_path: Path) -> None:
    base = _load(tmp_path, MINIMAL)
    assert _load(tmp_path, MINIMAL + 'builders : { builders_class_name : ["i2_classification"] }\n') == base
    assert _load(tmp_path, MINIMAL + "builders : {}\n") == base
    message = _error(tmp_path, MINIMAL + 'builders : { builders_paths : "/my/builders" }\n')
    assert "builders = {'builders_paths': '/my/builders'}" in message


def test_a_key_with_no_iota2_default_sitsflow_reproduces_stays_an_error(tmp_path: Path) -> None:
    message = _error(tmp_path, MINIMAL + 'coregistration : { VHRPath : "vhr.tif" }\n')
    assert "section 'coregistration'" in message and "does not support yet" in message


def test_a_key_with_no_iota2_default_is_accepted_without_a_value(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Written without a value (None, "", or a section of such values) it asks for nothing: one
    warning names it; with a value it stays the error above."""
    caplog.set_level("WARNING", logger="sitsflow")
    text = _with(_with(MINIMAL, "chain", "grasslands", None), "arg_train", "learning_samples_extension", "")
    text += 'coregistration : { VHRPath : None, dateVHR : "" }\nsar : { }\n'
    cfg = _load(tmp_path, text)
    assert cfg.arg_train.runs == 2
    (warning,) = [r.getMessage() for r in caplog.records if "accepted and ignored" in r.getMessage()]
    for path in ("chain.grasslands", "arg_train.learning_samples_extension", "coregistration", "sar"):
        assert f"{path} = " in warning, path
    assert "config.cfg:" in warning and "given no value" in warning
    message = _error(tmp_path, _with(MINIMAL, "chain", "grasslands", "grass.shp"))
    assert "chain.grasslands" in message and "does not support yet" in message


def test_use_gapfilling_false_is_features_from_raw_dates(tmp_path: Path) -> None:
    raw = _load(tmp_path, _with(MINIMAL, "sensors_data_interpolation", "use_gapfilling", False))
    assert raw.arg_train.features_from_raw_dates is True
    assert raw.sensors_data_interpolation.use_gapfilling is False
    # the same configuration as sitsflow's spelling, written back and read again
    same = _load(tmp_path, _with(MINIMAL, "arg_train", "features_from_raw_dates", True))
    assert same == raw and same.sensors_data_interpolation.use_gapfilling is False
    again = tmp_path / "resolved.cfg"
    again.write_text(raw.to_cfg())
    assert load_config(str(again)) == raw
    # its effect: the features are the raw acquisitions (masked values NaN), not the gap-filled grid
    scene = tmp_path / "scene"
    info = write_scene(scene)
    gapfilled = FeaturePipeline(load_config(str(write_config(scene))), "T1")
    raw_series = FeaturePipeline(
        load_config(str(write_config(scene, extra="sensors_data_interpolation : { use_gapfilling : False }"))), "T1"
    )
    assert raw_series.dates == sorted(set(info["dates"])) != gapfilled.dates
    window = Window(0, 0, 24, 12)
    assert np.isnan(raw_series.features(window).values).any()
    assert np.isfinite(gapfilled.features(window).values).all()
    # both spellings given and contradicting each other
    both = _with(
        _with(MINIMAL, "sensors_data_interpolation", "use_gapfilling", False),
        "arg_train",
        "features_from_raw_dates",
        False,
    )
    assert "contradict each other" in _error(tmp_path, both)


def test_merge_final_classifications_needs_several_runs_and_majority_voting(tmp_path: Path) -> None:
    one_run = _with(MINIMAL.replace("runs : 2", "runs : 1"), "arg_classification", "merge_final_classifications", True)
    assert "fuses the maps of several runs: set arg_train.runs to 2 or more" in _error(tmp_path, one_run)
    ds = _with(
        _with(MINIMAL, "arg_classification", "merge_final_classifications", True),
        "arg_classification",
        "merge_final_classifications_method",
        "dempstershafer",
    )
    message = _error(tmp_path, ds)
    assert "arg_classification.merge_final_classifications_method: 'dempstershafer' is not implemented" in message
    assert "use 'majorityvoting'" in message
    ok = _load(tmp_path, _with(MINIMAL, "arg_classification", "merge_final_classifications", True))
    assert ok.arg_classification.merge_final_classifications is True


def test_augmentation_switched_off_accepts_its_other_settings(tmp_path: Path) -> None:
    """iota2 reads sample_augmentation's other keys only with activate True: written with activate
    False they ask for no augmentation (the same maps), so the file loads; activate True stays refused."""
    base = _load(tmp_path, MINIMAL)
    off = {"activate": False, "strategy": "jitter", "target_models": ["all"]}
    assert _load(tmp_path, _with(MINIMAL, "arg_train", "sample_augmentation", off)) == base
    message = _error(tmp_path, _with(MINIMAL, "arg_train", "sample_augmentation", off | {"activate": True}))
    assert "arg_train.sample_augmentation = " in message and "does not augment" in message
    message = _error(tmp_path, _with(MINIMAL, "arg_train", "sample_augmentation", {"strategy": "jitter"}))
    assert "arg_train.sample_augmentation = " in message
