"""iota2's userFeat sensor: user rasters of chain.user_feat_path as static features."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from rasterio.windows import Window

from sitsflow.config import load_config
from sitsflow.errors import BadInputError, ConfigError
from sitsflow.features import FeaturePipeline
from synthetic import write_config, write_scene


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    folder = tmp_path_factory.mktemp("userfeat")
    info = write_scene(folder, width=40, height=32, nb_dates=5, polygons_per_class=1)
    with rasterio.open(info["series"]) as src:
        profile = {
            "driver": "GTiff",
            "crs": src.crs,
            "transform": src.transform,
            "width": src.width,
            "height": src.height,
        }
    rows, cols = np.mgrid[0:32, 0:40]
    alt = (rows * 100 + cols).astype(np.float32)
    # the aspect raster: 2 bands at twice the pixel size (read by nearest neighbour)
    t = profile["transform"]
    asp = np.stack(
        [np.arange(16 * 20, dtype=np.int16).reshape(16, 20), -np.arange(16 * 20, dtype=np.int16).reshape(16, 20)]
    )
    _write(folder / "uf" / "T1" / "T1_ALT.tif", alt[None], profile)
    _write(
        folder / "uf" / "T1" / "T1_ASP_20m.tif",
        asp,
        {**profile, "transform": rasterio.Affine(t.a * 2, 0, t.c, 0, t.e * 2, t.f), "width": 20, "height": 16},
    )
    (folder / "uf" / "T1" / "T1_ALT.tif.aux.xml").write_text("<PAMDataset/>")  # a side file, never a raster
    write_config(folder)
    return folder, {"ALT": alt, "ASP": asp}


def _write(path, data, profile):
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", count=data.shape[0], dtype=data.dtype, **profile) as dst:
        dst.write(data)


def _pipe(folder, *sets, path="uf"):
    where = path if path.startswith("s3://") else str(folder / path)
    cfg = load_config(str(folder / "config.cfg"), [f"chain.user_feat_path='{where}'", *sets])
    return FeaturePipeline(cfg, "T1")


def test_the_rasters_bands_are_features_of_every_date(scene):
    folder, truth = scene
    pipe = _pipe(folder, "userFeat.patterns='ALT,ASP'")
    plain = FeaturePipeline(load_config(str(folder / "config.cfg")), "T1")
    assert pipe.dates == plain.dates  # static: the dated sensor's axis, unchanged
    assert pipe.components == [
        "synth_red",
        "synth_nir",
        "userfeat_alt_band_0",
        "userfeat_asp_band_0",
        "userfeat_asp_band_1",
    ]
    d0 = pipe.dates[0]
    assert f"userfeat_asp_band_1_{d0}" in pipe.feature_names
    assert pipe.sensor_keys == ["synth", "userfeat"]  # the networks' _stats get a userfeat key
    block = pipe.features(Window(0, 0, 40, 32))
    ref = plain.features(Window(0, 0, 40, 32))
    # the same pixels (user rasters never make a pixel clear), the dated features unchanged
    assert np.array_equal(block.rows, ref.rows) and np.array_equal(block.cols, ref.cols)
    assert np.array_equal(block.clear_dates, ref.clear_dates)
    np.testing.assert_array_equal(block.values[:, :, :2], ref.values)
    r, c = block.rows, block.cols
    for d in range(len(pipe.dates)):
        np.testing.assert_array_equal(block.values[:, d, 2], truth["ALT"][r, c])
        np.testing.assert_array_equal(block.values[:, d, 3], truth["ASP"][0][r // 2, c // 2])
        np.testing.assert_array_equal(block.values[:, d, 4], truth["ASP"][1][r // 2, c // 2])


def test_raw_dates_mode_repeats_them_too(scene):
    folder, truth = scene
    pipe = _pipe(folder, "userFeat.patterns='ALT'", "arg_train.features_from_raw_dates=True")
    block = pipe.features(Window(3, 5, 10, 7))
    expected = truth["ALT"][block.rows, block.cols]
    assert np.array_equal(block.values[:, :, 2], np.repeat(expected[:, None], len(pipe.dates), axis=1))


def test_the_defaults_are_iota2s_and_a_missing_raster_names_tile_folder_and_pattern(scene):
    folder, _ = scene
    with pytest.raises(BadInputError) as err:
        _pipe(folder)  # iota2's default patterns ALT,ASP,SLP: no SLP raster
    text = str(err.value)
    assert "'SLP'" in text and "'T1'" in text and str(folder / "uf" / "T1") in text


def test_a_pattern_matching_two_rasters_is_refused(scene):
    folder, _ = scene
    with pytest.raises(BadInputError, match="'T1_A' matches 2 rasters of tile 'T1'"):
        _pipe(folder, "userFeat.patterns='T1_A'")


def test_arbo_reaches_into_sub_folders(tmp_path, scene):
    folder, truth = scene
    import shutil

    shutil.copytree(folder, tmp_path / "s", ignore=shutil.ignore_patterns("output"))
    deep = tmp_path / "s" / "uf2" / "T1" / "dem"
    deep.mkdir(parents=True)
    shutil.copy(tmp_path / "s" / "uf" / "T1" / "T1_ALT.tif", deep / "T1_ALT.tif")
    with pytest.raises(BadInputError, match="no raster of pattern"):
        _pipe(tmp_path / "s", "userFeat.patterns='T1_ALT'", path="uf2")  # iota2's "/*": the tile folder only
    pipe = _pipe(tmp_path / "s", "userFeat.patterns='ALT'", "userFeat.arbo='/*/*'", path="uf2")
    block = pipe.features(Window(0, 0, 40, 32))
    np.testing.assert_array_equal(block.values[:, 0, 2], truth["ALT"][block.rows, block.cols])


def test_rasters_on_s3_give_the_same_features(scene, s3_bucket):
    folder, _ = scene
    from generate_products import upload

    remote = upload(folder / "uf", s3_bucket, prefix="uf")
    local = _pipe(folder, "userFeat.patterns='ALT,ASP'").features(Window(0, 0, 40, 32))
    s3 = _pipe(folder, "userFeat.patterns='ALT,ASP'", path=remote).features(Window(0, 0, 40, 32))
    assert np.array_equal(local.values, s3.values, equal_nan=True)


def test_user_rasters_alone_are_no_sensor_and_patterns_are_checked(scene):
    folder, _ = scene
    path = folder / "alone.cfg"
    text = (folder / "config.cfg").read_text()
    start = text.index("dated_raster:")
    path.write_text(text[:start] + text[text.index("arg_train:") :])
    with pytest.raises(ConfigError, match="user_feat_path only adds static features"):
        load_config(str(path), ["chain.user_feat_path='uf'"])
    with pytest.raises(ConfigError, match="userFeat.patterns"):
        load_config(str(folder / "config.cfg"), ["chain.user_feat_path='uf'", "userFeat.patterns='A*,B'"])


@pytest.mark.e2e
@pytest.mark.slow
def test_sitsflow_run_maps_with_user_features(tmp_path):
    """A whole run with a user raster: the map is made, and the model's statistics hold a userfeat key."""
    import torch

    from sitsflow import cli, layout

    info = write_scene(tmp_path, width=40, height=32, nb_dates=6, polygons_per_class=1)
    with rasterio.open(info["series"]) as src:
        profile = {"driver": "GTiff", "crs": src.crs, "transform": src.transform, "width": 40, "height": 32}
    _write(tmp_path / "uf" / "T1" / "DEM.tif", info["label_map"][None].astype(np.float32) * 10, profile)
    path = write_config(tmp_path, epochs=5, chunks=1)
    path.write_text(
        path.read_text().replace("  data_field : 'code'\n", "  data_field : 'code'\n  user_feat_path : 'uf'\n", 1)
        + "userFeat : { arbo : '/*', patterns : 'DEM' }\n"
    )
    assert cli.main(["run", str(path), "--no-progress"]) == 0
    out = str(tmp_path / "output")
    with rasterio.open(layout.final_classif(out, 0)) as src:
        labels = src.read(1)
    core = info["label_map"] > 0
    assert (labels[core] == info["label_map"][core]).mean() > 0.8
    models = sorted((tmp_path / "output").rglob("model_*_seed_0.txt"))
    assert models
    payload = torch.load(models[0], map_location="cpu", weights_only=True)
    assert set(payload["stats"]) == {"synth", "userfeat"}
    assert "userfeat_dem_band_0_" in payload["description"]


def test_the_section_survives_the_resolved_configuration(scene, tmp_path):
    folder, _ = scene
    cfg = load_config(
        str(folder / "config.cfg"),
        [f"chain.user_feat_path='{folder / 'uf'}'", "userFeat.patterns='ALT, ASP'", "userFeat.arbo='/*/*'"],
    )
    assert cfg.userFeat.pattern_list == ["ALT", "ASP"]
    again = tmp_path / "resolved.cfg"
    again.write_text(cfg.to_cfg())
    assert load_config(str(again)) == cfg
    # set without its section: iota2's defaults
    assert load_config(str(folder / "config.cfg"), ["chain.user_feat_path='uf'"]).userFeat.patterns == "ALT,ASP,SLP"


def test_glob_classes_keep_their_ranges_as_python_glob_does():
    """``DEM_[0-9]*`` is a range, as in iota2's glob (review finding: the class was escaped into
    the literal set {0, -, 9})."""
    import fnmatch

    from sitsflow.sensors.user_features import _glob_regex

    names = ["DEM_5.tif", "DEM_-.tif", "DEM_x.tif", "DEM_^.tif", "DEM_\\.tif", "ALT.tif"]
    for pattern in ("DEM_[0-9]*", "DEM_[!0-9]*", "DEM_[^x]*", "DEM_[\\]*", "DEM_?.tif", "*"):
        for name in names:
            assert bool(_glob_regex(pattern).fullmatch(name)) == fnmatch.fnmatchcase(name, pattern), (pattern, name)


def test_glob_classes_read_a_leading_bracket_as_glob_does_and_a_bad_class_is_bad_input(tmp_path):
    """``[]]`` and ``[!]]`` hold ``]``, an unclosed ``[`` is a character, as in Python's glob
    (they raised re.error: exit 1); a class no glob can read (``[z-a]``) is exit 2 naming
    userFeat.patterns."""
    import fnmatch

    from sitsflow.sensors.user_features import _glob_regex, find_rasters

    names = ["DEM_].tif", "DEM_a.tif", "DEM_[.tif", "DEM_[]", "DEM_&.tif", "DEM_b.tif"]
    for pattern in ("DEM_[]]*", "DEM_[!]]*", "DEM_[*", "DEM_[]", "DEM_[a&&b]*", "DEM_[]-a]*"):
        for name in names:
            assert bool(_glob_regex(pattern).fullmatch(name)) == fnmatch.fnmatchcase(name, pattern), (pattern, name)
    (tmp_path / "T1").mkdir()
    (tmp_path / "T1" / "DEM_a.tif").write_bytes(b"")
    assert find_rasters(str(tmp_path), "T1", "/", ["DEM_[]a]"]) == [str(tmp_path / "T1" / "DEM_a.tif")]
    with pytest.raises(BadInputError, match=r"userFeat.patterns: pattern 'DEM_\[z-a\]' is no valid glob"):
        find_rasters(str(tmp_path), "T1", "/", ["DEM_[z-a]"])
