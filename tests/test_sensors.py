"""Sensor readers of the real on-disk layouts (THEIA Sentinel-2 L2A, Landsat 8), indices, multi-sensor
date axes and external features, on products written by tests/generate_products.py."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from rasterio.windows import Window

from sitsflow.config import load_config
from sitsflow.errors import BadInputError, ConfigError
from sitsflow.features import FeaturePipeline, to_ordinal

from generate_products import write_products, write_theia_config

SOI = '''
def get_soi_s2(self):
    """
    compute the Soil Composition Index
    """
    dates = self.get_interpolated_dates()
    coef = (self.get_interpolated_Sentinel2_B11() -
            self.get_interpolated_Sentinel2_B8()) / (
                self.get_interpolated_Sentinel2_B11() +
                self.get_interpolated_Sentinel2_B8() + 1.E-6)
    labels = [f"Sentinel2_soi_{date}" for date in dates["Sentinel2"]]
    return coef, labels


def flagged_b8(self, below=0.2):
    """B8, or -10000 where it is below ``below`` (a user's no-data flag)."""
    import numpy as np

    dates = self.get_interpolated_dates()
    b8 = self.get_interpolated_Sentinel2_B8()
    return np.where(b8 < below, -10000.0, b8), [f"Sentinel2_fb8_{d}" for d in dates["Sentinel2"]]


def bad_label(self):
    dates = self.get_interpolated_dates()
    return self.get_interpolated_Sentinel2_B4(), [f"soi{d}" for d in dates["Sentinel2"]]


def bad_shape(self):
    dates = self.get_interpolated_dates()
    return self.get_interpolated_Sentinel2_B4()[:, :, :2], [f"Sentinel2_x_{d}" for d in dates["Sentinel2"]]


def raw_soi(self, eps=1e-6):
    dates = self.get_raw_dates()
    b11, b8 = self.get_raw_Sentinel2_B11(), self.get_raw_Sentinel2_B8()
    return (b11 - b8) / (b11 + b8 + eps), [f"Sentinel2_soi_{d}" for d in dates["Sentinel2"]]
'''


@pytest.fixture(scope="module")
def products(tmp_path_factory):
    root = tmp_path_factory.mktemp("theia")
    info = write_products(root, width=36, height=24, nb_dates=6, polygons_per_class=2)
    (root / "feat.py").write_text(SOI)
    return root, info


def _pipe(root, *overrides, **kw) -> FeaturePipeline:
    cfg = load_config(str(write_theia_config(root, data=str(root), **kw)), list(overrides))
    return FeaturePipeline(cfg, "T31TCJ")


def _read_dn(path, row, col, factor=1):
    with rasterio.open(path) as src:
        return int(src.read(1)[row // factor, col // factor])


def test_theia_s2_products_are_found_dated_and_named(products):
    root, info = products
    pipe = _pipe(root)
    assert pipe.sensor == "s2_theia" and pipe.sensor_keys == ["s2_theia"]
    assert pipe.raw_dates == info["dates"]  # the same-day S2A/S2B pair is listed twice
    assert len(pipe.unique_dates) == len(info["dates"]) - 1
    assert pipe.grid.width == 36 and pipe.grid.height == 24 and pipe.grid.resolution == 10.0
    assert pipe.components == ["b2", "b3", "b4", "b5", "b6", "b7", "b8", "b8a", "b11", "b12",
                               "ndvi", "ndwi", "brightness"]
    first, last = to_ordinal(20180101), to_ordinal(20180731)
    assert len(pipe.dates) == len(range(first, last + 1, 15)) and pipe.dates[0] == 20180101
    assert pipe.feature_names[:2] == ["sentinel2_b2_20180101", "sentinel2_b3_20180101"]
    assert pipe.feature_names[13] == "sentinel2_b2_20180116"  # date-major


def test_raw_values_scaling_20m_nearest_resampling_and_masks(products):
    root, info = products
    pipe = _pipe(root)
    sensor = pipe.sensors[0]
    values, valid = sensor.read(Window(3, 5, 10, 7), pipe.grid)
    assert values.shape == (7, 10, len(info["dates"]), 10) and valid.shape == (7, 10, len(info["dates"]))
    folder = info["folders"][0]
    name = folder.name
    for (r, c) in [(0, 0), (1, 1), (4, 7), (6, 9)]:
        row, col = r + 5, c + 3
        clm = _read_dn(folder / "MASKS" / f"{name}_CLM_R1.tif", row, col)
        sat = _read_dn(folder / "MASKS" / f"{name}_SAT_R1.tif", row, col)
        assert valid[r, c, 0] == (clm == 0 and sat == 0)
        if valid[r, c, 0]:
            b2 = _read_dn(folder / f"{name}_FRE_B2.tif", row, col)
            b11 = _read_dn(folder / f"{name}_FRE_B11.tif", row, col, factor=2)  # the 20 m pixel holding it
            assert values[r, c, 0, 0] == pytest.approx(b2 / 10000, abs=1e-6)
            assert values[r, c, 0, 8] == pytest.approx(b11 / 10000, abs=1e-6)
    # edges (EDG + nodata -10000) of the last acquisition are invalid
    edge_values, edge_valid = sensor.read(Window(0, 0, 6, 24), pipe.grid)
    assert not edge_valid[:, :, -1].any()


def test_features_do_not_depend_on_the_window_cut(products):
    root, _ = products
    pipe = _pipe(root)
    whole = pipe.features(Window(0, 0, 36, 24))
    part = pipe.features(Window(7, 3, 13, 9))  # odd offsets: 20 m pixels cut in half
    for i in range(part.rows.size):
        j = np.nonzero((whole.rows == part.rows[i]) & (whole.cols == part.cols[i]))[0][0]
        np.testing.assert_array_equal(part.values[i], whole.values[j])
    assert np.isfinite(whole.values).all() and whole.values[..., :10].max() < 0.55  # clouds (0.6) masked


def test_indices_are_computed_and_can_be_switched_off(products):
    root, _ = products
    pipe = _pipe(root)
    block = pipe.features(Window(0, 0, 36, 24))
    comps = pipe.components
    b4, b8, b11 = (block.values[..., comps.index(b)] for b in ("b4", "b8", "b11"))
    np.testing.assert_allclose(block.values[..., comps.index("ndvi")], (b8 - b4) / (b8 + b4), rtol=1e-5)
    np.testing.assert_allclose(block.values[..., comps.index("ndwi")], (b8 - b11) / (b8 + b11), rtol=1e-5)
    np.testing.assert_allclose(block.values[..., comps.index("brightness")],
                               np.sqrt((block.values[..., :10] ** 2).sum(-1)), rtol=1e-5)
    off = _pipe(root, "arg_train.features=[]", "Sentinel_2.keep_bands=['B8', 'B4']")
    assert off.components == ["b4", "b8"]
    np.testing.assert_array_equal(off.features(Window(0, 0, 36, 24)).values,
                                  block.values[..., [comps.index("b4"), comps.index("b8")]])


def test_start_and_end_dates_restrict_the_acquisitions(products):
    root, info = products
    pipe = _pipe(root, "Sentinel_2.start_date=20180201", "Sentinel_2.end_date=20180420")
    assert pipe.raw_dates == [d for d in info["dates"] if 20180201 <= d <= 20180420]
    assert pipe.dates[0] == 20180201 and pipe.dates[-1] <= 20180420
    with pytest.raises(BadInputError, match="between start_date"):
        _pipe(root, "Sentinel_2.start_date=20190101", "Sentinel_2.end_date=20190201")


def test_raw_dates_mode_and_landsat_combination(products):
    root, info = products
    pipe = _pipe(root, "arg_train.features_from_raw_dates=True", landsat=True)
    assert pipe.sensor_keys == ["s2_theia", "l8"]
    assert pipe.dates == sorted(set(info["dates"]) | set(info["l8_dates"]))
    assert pipe.components[13] == "landsat8_b1" and pipe.feature_names[13] == f"landsat8_b1_{pipe.dates[0]}"
    block = pipe.features(Window(0, 0, 36, 24))
    s2_only = [k for k, d in enumerate(pipe.dates) if d not in info["l8_dates"]]
    assert np.isnan(block.values[:, s2_only, 13:]).all()  # Landsat 8 did not acquire those days
    l8_day = pipe.dates.index(info["l8_dates"][0])
    assert np.isfinite(block.values[:, l8_day, 13]).mean() > 0.5
    gap = _pipe(root, landsat=True)
    gblock = gap.features(Window(0, 0, 36, 24))
    assert np.isfinite(gblock.values).all()  # gap-filled: both sensors on the union grid


def test_external_feature_example_works_through_the_config(products):
    root, _ = products
    extra = "external_features:\n{\n  module : 'feat.py'\n  functions : 'get_soi_s2'\n  concat_mode : True\n}"
    pipe = _pipe(root, extra=extra)
    assert pipe.components[-1] == "soi" and pipe.feature_names[13] == "sentinel2_soi_20180101"
    block = pipe.features(Window(0, 0, 36, 24))
    comps = pipe.components
    b8, b11 = block.values[..., comps.index("b8")], block.values[..., comps.index("b11")]
    np.testing.assert_allclose(block.values[..., -1], (b11 - b8) / (b11 + b8 + 1e-6), rtol=1e-5)
    only = _pipe(root, extra=extra.replace("True", "False"))
    assert only.components == ["soi"]
    raw = _pipe(root, "arg_train.features_from_raw_dates=True",
                extra=extra.replace("'get_soi_s2'", "[['raw_soi', {'eps': 0.5}]]"))
    assert raw.components[-1] == "soi"


def test_external_feature_no_data_value_is_missing(products):
    root, _ = products
    extra = "external_features:\n{\n  module : 'feat.py'\n  functions : 'flagged_b8'\n}"
    plain = _pipe(root, extra=extra)
    block = plain.features(Window(0, 0, 36, 24))
    b8, flagged = block.values[..., plain.components.index("b8")], block.values[..., -1]
    low = b8 < 0.2
    assert low.any() and (~low).any()
    np.testing.assert_array_equal(flagged[low], -10000.0)  # without the key, the flag is a number
    pipe = _pipe(root, extra=extra.replace("}", "  no_data_value : -10000\n}"))
    values = pipe.features(Window(0, 0, 36, 24)).values
    assert np.isnan(values[..., -1][low]).all()
    np.testing.assert_array_equal(values[..., -1][~low], flagged[~low])
    np.testing.assert_array_equal(values[..., :-1], block.values[..., :-1])  # nothing else changes
    assert pipe.description() != plain.description()  # so the samples are redone
    assert plain.description() == _pipe(root, extra=extra.replace("}", "  no_data_value : None\n}")).description()


@pytest.mark.parametrize("function, message", [
    ("bad_label", "'bad_label': label 'soi20180101' does not follow Sensor_Index_YYYYMMDD"),
    ("bad_shape", "'bad_shape' returned values shaped"),
    ("raw_soi", "'raw_soi' calls get_raw_dates"),
    ("missing", "has no function 'missing'"),
])
def test_external_feature_errors_name_the_function(products, function, message):
    root, _ = products
    extra = f"external_features:\n{{\n  module : 'feat.py'\n  functions : '{function}'\n}}"
    with pytest.raises((BadInputError, ConfigError), match=message):
        _pipe(root, extra=extra)


def test_sensor_configuration_errors(products, tmp_path):
    root, _ = products
    cfg_path = write_theia_config(root, data=str(root), name="c2.cfg")
    with pytest.raises(ConfigError, match="Sentinel_2.keep_bands"):
        load_config(str(cfg_path), ["Sentinel_2.keep_bands=['B9']"])
    with pytest.raises(ConfigError, match="set chain.l8_path"):
        load_config(str(cfg_path), ["Landsat8.temporal_resolution=16"])
    with pytest.raises(ConfigError, match="arg_train.features"):
        load_config(str(cfg_path), ["arg_train.features=['EVI']"])
    cfg = load_config(str(cfg_path), [f"chain.s2_path={tmp_path}"])
    with pytest.raises(BadInputError, match="no Sentinel_2 product of tile 'T31TCJ'"):
        FeaturePipeline(cfg, "T31TCJ")
    assert load_config(str(cfg_path), [f"chain.l8_path={root}/l8"]).Landsat8.temporal_resolution == 16


def test_two_sensors_sample_train_and_classify(products, tmp_path):
    """Sentinel-2 + Landsat 8 on one date axis: the database names both sensors, the network gets
    statistics under both keys, and the pipeline classifies with the same features."""
    import netCDF4

    from sitsflow import inference, layout, merging, sampling, selection, training
    from sitsflow.planning import plan_inference, plan_selection, plan_training

    root, _ = products
    cfg = load_config(str(write_theia_config(root, data=str(root), landsat=True, epochs=2)),
                      [f"chain.output_path={tmp_path / 'out'}", "python_data_managing.number_of_chunks=2"])
    sampling.run(cfg)
    with netCDF4.Dataset(layout.samples_learn(cfg.chain.output_path, 1, 0)) as ds:
        assert ds.sensors.split() == ["s2_theia", "l8"]
    for t in plan_training(cfg):
        training.run(cfg, t["region"], t["seed"], t["hyp"])
    for t in plan_selection(cfg):
        selection.run(cfg, t["region"], t["seed"])
    net, desc = inference.load_selected(cfg, 1, 0)
    assert set(net.stats_dict()) == {"s2_theia", "l8"}
    for t in plan_inference(cfg):
        inference.run(cfg, t["tile"], t["chunk"], t["seed"])
    assert merging.run(cfg)["skipped"] is False


def test_the_nodata_probe_of_products(products):
    root, _ = products
    pipe = _pipe(root)
    sensor = pipe.sensors[0]
    assert sensor.surely_empty(Window(-20, -20, 10, 10), pipe.grid)  # off the tile
    assert not sensor.surely_empty(Window(0, 0, 5, 24), pipe.grid)  # the last date misses it, not the others
    whole = pipe.features(Window(0, 0, 36, 24))
    probed = pipe.features(Window(0, 0, 36, 24), probe=True)
    for name in ("values", "rows", "cols", "clear_dates"):
        np.testing.assert_array_equal(getattr(probed, name), getattr(whole, name))


def test_product_files_are_opened_once_per_thread(products):
    from sitsflow.process import open_files_budget
    from sitsflow.sensors.products import _OpenFiles

    root, info = products
    sensor = _pipe(root).sensors[0]
    uris = [p.bands[b] for p in sensor.products for b in sensor.bands][:5]
    files = _OpenFiles(limit=3)
    first = files.get(uris[0])
    assert files.get(uris[0]) is first  # kept open
    for uri in uris[1:4]:
        files.get(uri)
    assert first.closed and len(files.datasets) == 3  # the least recently used went beyond the limit
    assert not files.get(uris[0]).closed  # and is opened again when needed
    assert 16 <= open_files_budget() <= 4096
    import threading

    seen = {}
    worker = threading.Thread(target=lambda: seen.setdefault("other", sensor._dataset(uris[0])))
    worker.start()
    worker.join()
    assert sensor._dataset(uris[0]) is sensor._dataset(uris[0]) and seen["other"] is not sensor._dataset(uris[0])
