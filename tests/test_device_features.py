"""Features computed where the network runs: observations read as the files hold them (integers),
converted, masked and gap-filled by the device batch by batch, give the features the reading side
computes (``RawFeatures``, ``SITSFLOW_DEVICE_FEATURES``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio.windows import Window

from sitsflow import features, inference, nn
from sitsflow.config import load_config
from sitsflow.errors import BadInputError
from sitsflow.features import FeaturePipeline, RawFeatures

from synthetic import write_config, write_scene

NODATA = -10000


def _int16_scene(folder: Path, dtype: str = "int16") -> dict:
    """The synthetic scene, its series rewritten as reflectances x 10000 with a nodata corner and
    one invalid band: int16 (nodata -10000), uint16 (nodata 0, values from 1) or float32 (NaN)."""
    info = write_scene(folder, nb_dates=12, width=40, height=24, polygons_per_class=2)
    with rasterio.open(info["series"]) as src:
        data, profile = src.read(), src.profile
        descriptions = src.descriptions
    nodata = {"int16": NODATA, "uint16": 0, "float32": float("nan")}[dtype]
    values = np.round(data * 10000).astype(np.float64)
    if dtype == "uint16":
        values = np.clip(values, 1, None)
    values[:, :5, :7] = nodata  # outside the swath
    values[3, 10:12, 20:25] = nodata  # one band of one date: that acquisition is invalid there
    with rasterio.open(info["series"], "w", **(profile | {"dtype": dtype, "nodata": nodata})) as dst:
        dst.write(values.astype(dtype))
        for i, d in enumerate(descriptions):
            dst.set_band_description(i + 1, d)
    return info


def _pipeline(folder: Path, *overrides: str, nodata: str | None = "-10000") -> FeaturePipeline:
    extra = "scale : 0.0001" + (f"\n  nodata : {nodata}" if nodata is not None else "")
    cfg = load_config(str(write_config(folder, sensor_extra=extra)), list(overrides))
    return FeaturePipeline(cfg, "T1")


def _network(pipe: FeaturePipeline, name: str = "LTAEClassifier") -> torch.nn.Module:
    """A network of random weights (seeded) for the pipeline's features, 3 classes."""
    nb_dates, nb_comp = pipe.computer.shape
    size = nb_dates * nb_comp
    torch.manual_seed(0)
    return nn.build_network(
        name,
        {},
        nb_dates=nb_dates,
        nb_components=nb_comp,
        nb_classes=3,
        dates=pipe.dates,
        stats={pipe.sensor: {"mean": torch.full((size,), 0.1), "var": torch.full((size,), 0.01)}},
        sensor=pipe.sensor,
    )


@pytest.fixture()
def scene(tmp_path: Path) -> Path:
    _int16_scene(tmp_path)
    return tmp_path


@pytest.mark.parametrize("overrides", [(), ("arg_train.features_from_raw_dates=True",)])
def test_native_observations_give_the_features_read_on_the_cpu(scene: Path, overrides) -> None:
    pipe = _pipeline(scene, *overrides)
    assert pipe.native
    window = Window(0, 0, 40, 24)
    select = np.ones((24, 40), bool)
    select[7, 3:30] = False
    block = pipe.features(window, select)
    raw = pipe.features(window, select, native=True)
    assert raw.raw is not None and raw.values.shape[0] == 0
    assert raw.raw.values[0].dtype == np.int16  # the files' integers, not float32
    assert raw.raw.shape == block.values.shape
    np.testing.assert_array_equal(raw.rows, block.rows)
    np.testing.assert_array_equal(raw.cols, block.cols)
    np.testing.assert_array_equal(raw.clear_dates, block.clear_dates)
    got = raw.raw.features().numpy()
    np.testing.assert_array_equal(np.isnan(got), np.isnan(block.values))
    np.testing.assert_array_equal(got, block.values)  # same arithmetic, bit for bit
    # a pixel of the invalid band: gap-filled over that acquisition, never its nodata value
    assert np.nanmin(got) > -0.5
    if not overrides:
        assert np.isfinite(got).all()


@pytest.mark.parametrize("dtype", ["uint16", "float32"])
@pytest.mark.parametrize("overrides", [(), ("arg_train.features_from_raw_dates=True",)])
def test_other_data_types_give_the_same_features(tmp_path: Path, dtype: str, overrides) -> None:
    """uint16 (nodata 0) and float32 files (nodata NaN: the invalid values are NaN as read)."""
    _int16_scene(tmp_path, dtype)
    pipe = _pipeline(tmp_path, *overrides, nodata="0" if dtype == "uint16" else None)
    window = Window(0, 0, 40, 24)
    block = pipe.features(window)
    raw = pipe.features(window, native=True)
    assert raw.raw is not None and raw.raw.values[0].dtype == np.dtype(dtype)
    np.testing.assert_array_equal(raw.clear_dates, block.clear_dates)
    assert (raw.clear_dates < 12).any()  # nodata made some acquisitions invalid
    np.testing.assert_array_equal(raw.raw.features().numpy(), block.values)


def test_native_observations_in_parts_come_back_in_row_major_order(scene: Path, monkeypatch) -> None:
    pipe = _pipeline(scene)
    window = Window(0, 0, 40, 24)
    whole = pipe.features(window)
    # a read budget of a few pixels: the window is read in many parts, tiles included
    monkeypatch.setattr(features.reader, "READ_BUDGET_BYTES", 12 * 24 * 4 * 8)
    assert len(pipe.read_windows(window)) > 2
    raw = pipe.features(window, native=True)
    assert raw.raw is not None
    np.testing.assert_array_equal(raw.rows, whole.rows)
    np.testing.assert_array_equal(raw.cols, whole.cols)
    np.testing.assert_array_equal(raw.raw.features().numpy(), whole.values)


def test_a_window_without_data_has_no_observations(scene: Path) -> None:
    pipe = _pipeline(scene)
    block = pipe.features(Window(0, 0, 7, 5), native=True)
    assert block.raw is None and block.values.shape == (0, *pipe.computer.shape)
    assert not block.clear_dates.any()


def test_raw_features_pick_pixels_like_features(scene: Path) -> None:
    pipe = _pipeline(scene)
    block = pipe.features(Window(0, 0, 40, 24))
    raw = pipe.features(Window(0, 0, 40, 24), native=True).raw
    assert isinstance(raw, RawFeatures)
    sel = np.arange(len(raw)) % 3 == 0
    np.testing.assert_array_equal(raw[sel].features().numpy(), block.values[sel])
    np.testing.assert_array_equal(raw.features(5, 17).numpy(), block.values[5:17])


def test_the_predictor_classifies_observations_as_read_like_their_features(scene: Path) -> None:
    pipe = _pipeline(scene)
    block = pipe.features(Window(0, 0, 40, 24))
    raw = pipe.features(Window(0, 0, 40, 24), native=True).raw
    assert raw is not None
    net = _network(pipe)
    predictor = nn.Predictor(net, device="cpu", batch_size=64)  # several batches
    codes = [11, 22, 33]
    expected = predictor.classify(block.values, codes, probabilities=True)
    got = predictor.classify(raw, codes, probabilities=True)
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)
    assert predictor.seconds["features_s"] > 0  # the features were computed batch by batch
    np.testing.assert_array_equal(predictor.proba(raw), predictor.proba(block.values))


def test_a_sensor_without_native_values_keeps_the_features_read(scene: Path, monkeypatch) -> None:
    from sitsflow.sensors.dated_raster import DatedRasterSensor

    monkeypatch.setattr(DatedRasterSensor, "native_conversion", lambda self, grid: None)
    pipe = _pipeline(scene)
    assert not pipe.native
    block = pipe.features(Window(0, 0, 40, 24), native=True)
    assert block.raw is None and block.values.shape[0] > 0


def test_device_features_setting(monkeypatch) -> None:
    monkeypatch.delenv("SITSFLOW_DEVICE_FEATURES", raising=False)
    assert inference.device_features()
    monkeypatch.setenv("SITSFLOW_DEVICE_FEATURES", "0")
    assert not inference.device_features()
    monkeypatch.setenv("SITSFLOW_DEVICE_FEATURES", "auto")
    with pytest.raises(BadInputError, match=r"SITSFLOW_DEVICE_FEATURES must be 1 .* or 0 .*, got 'auto'"):
        inference.device_features()


def test_the_stage_writes_the_same_maps_with_the_device_computing_the_features(
    scene: Path, tmp_path: Path, monkeypatch
) -> None:
    import shutil

    from sitsflow import layout, sampling, selection, training
    from sitsflow.planning import plan_inference, plan_selection, plan_training

    out = tmp_path / "out"
    extra = "scale : 0.0001\n  nodata : -10000"
    cfg = load_config(
        str(write_config(scene, sensor_extra=extra, epochs=2, chunks=2)),
        [f"chain.output_path={out}", "arg_classification.enable_probability_map=True"],
    )
    sampling.run(cfg)
    for t in plan_training(cfg):
        training.run(cfg, t["region"], t["seed"], t["hyp"])
    for t in plan_selection(cfg):
        selection.run(cfg, t["region"], t["seed"])
    maps = {}
    for setting in ("0", "1"):
        monkeypatch.setenv("SITSFLOW_DEVICE_FEATURES", setting)
        shutil.rmtree(out / "manifests" / "inference", ignore_errors=True)
        for t in plan_inference(cfg):
            summary = inference.run(cfg, t["tile"], t["chunk"], t["seed"])
            assert summary["skipped"] is False and summary["classified"] > 0
            # the predictor computed features only when the device was given the observations
            assert (summary["timings"]["features_s"] > 0) == (setting == "1")
            for kind in ("chunk_classif", "chunk_confidence", "chunk_probamap"):
                with rasterio.open(getattr(layout, kind)(str(out), "T1", 1, 0, t["chunk"])) as src:
                    maps[setting, kind, t["chunk"]] = src.read()
    assert len(maps) == 12
    for (_, kind, chunk), data in maps.items():
        np.testing.assert_array_equal(data, maps["0", kind, chunk], err_msg=f"{kind} of chunk {chunk}")


@pytest.fixture(scope="module")
def products(tmp_path_factory) -> Path:
    from generate_products import write_products

    root = tmp_path_factory.mktemp("theia")
    write_products(root, width=36, height=24, nb_dates=6, polygons_per_class=2, landsat=True)
    return root


def _products_pipeline(root: Path, *overrides: str) -> FeaturePipeline:
    from generate_products import write_theia_config

    cfg = load_config(str(write_theia_config(root, data=str(root), landsat=True)), list(overrides))
    return FeaturePipeline(cfg, "T31TCJ")


@pytest.mark.parametrize("overrides", [(), ("arg_train.features_from_raw_dates=True",)])
def test_products_native_digital_numbers_give_the_features_read_on_the_cpu(products: Path, overrides) -> None:
    """THEIA Sentinel-2 and Landsat 8 (20 m and 30 m bands on the 10 m grid, masks, edges, a
    same-day pair, NDVI/NDWI/Brightness), with a digital-number offset on some acquisitions."""
    pipe = _products_pipeline(products, *overrides)
    assert pipe.native and len(pipe.sensors) == 2 and "ndvi" in pipe.sensors[0].indices
    import dataclasses

    s2 = pipe.sensors[0]
    # as Sen2Cor's processing baseline 04.00 (both reads apply it)
    s2.products = [dataclasses.replace(p, offset=-1000.0) if k % 2 else p for k, p in enumerate(s2.products)]
    pipe.computer.conversions = [s.native_conversion(pipe.grid) for s in pipe.sensors]  # type: ignore[misc]
    assert pipe.computer.conversions[0][0][1] == -1000.0
    window = Window(5, 3, 30, 21)
    block = pipe.features(window)
    raw = pipe.features(window, native=True)
    assert raw.raw is not None and [v.dtype for v in raw.raw.values] == [np.int16, np.int16]
    np.testing.assert_array_equal(raw.rows, block.rows)
    np.testing.assert_array_equal(raw.clear_dates, block.clear_dates)
    np.testing.assert_array_equal(raw.raw.features().numpy(), block.values)


def test_products_on_a_target_grid_keep_the_features_read(products: Path) -> None:
    """Reprojected or resampled, the files' values are interpolated as floats: no native values."""
    pipe = _products_pipeline(products, "chain.spatial_resolution=[20, 20]")
    assert not pipe.native and pipe.sensors[0].native_conversion(pipe.grid) is None
    assert pipe.features(Window(0, 0, 18, 12), native=True).raw is None


def test_a_product_file_of_another_data_type_is_read_converted(products: Path, tmp_path: Path, caplog) -> None:
    """An int32 file among int16 ones cannot go to the device as int16: that window is read again
    with the features computed by the reader (a warning naming the file), and so are the next."""
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(products, root)
    pipe = _products_pipeline(root)
    product = pipe.sensors[0].products[2]
    path = Path(product.bands["B8"])
    with rasterio.open(path) as src:
        data, profile = src.read(), src.profile
    with rasterio.open(path, "w", **(profile | {"dtype": "int32"})) as dst:
        dst.write(data.astype(np.int32))
    assert pipe.native
    block = pipe.features(Window(0, 0, 36, 24), native=True)
    assert block.raw is None
    expected = _products_pipeline(root).features(Window(0, 0, 36, 24))
    np.testing.assert_array_equal(block.values, expected.values)
    assert str(path) in caplog.text and "int32" in caplog.text and "the reading threads compute" in caplog.text
    assert not pipe.native  # the sensor reads converted values from now on
    assert pipe.features(Window(0, 0, 18, 12), native=True).raw is None


SOI = """
def get_soi_s2(self):
    dates = self.get_interpolated_dates()
    coef = (self.get_interpolated_Sentinel2_B11() - self.get_interpolated_Sentinel2_B8()) / (
        self.get_interpolated_Sentinel2_B11() + self.get_interpolated_Sentinel2_B8() + 1.E-6)
    return coef, [f"Sentinel2_soi_{date}" for date in dates["Sentinel2"]]
"""


def test_external_features_of_native_observations(products: Path) -> None:
    """The user's numpy functions get the same gap-filled series from either side."""
    from generate_products import write_theia_config

    (products / "feat.py").write_text(SOI)
    extra = "external_features:\n{\n  module : 'feat.py'\n  functions : 'get_soi_s2'\n  concat_mode : True\n}"
    cfg = load_config(str(write_theia_config(products, data=str(products), extra=extra, name="ext.cfg")), [])
    pipe = FeaturePipeline(cfg, "T31TCJ")
    assert pipe.native and "soi" in pipe.components
    block = pipe.features(Window(0, 0, 36, 24))
    raw = pipe.features(Window(0, 0, 36, 24), native=True).raw
    assert raw is not None
    np.testing.assert_array_equal(raw.features().numpy(), block.values)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (bench/gpu.sh runs it)")
@pytest.mark.parametrize("dtype", ["int16", "uint16"])
def test_cuda_computes_the_features_of_observations_as_read(tmp_path: Path, dtype: str) -> None:
    """On a GPU: pinned buffers in the files' data type, copies on the side stream, the features
    computed on the device (its sums may add in another order: last-bit differences)."""
    _int16_scene(tmp_path, dtype)
    pipe = _pipeline(tmp_path, nodata="0" if dtype == "uint16" else "-10000")
    block = pipe.features(Window(0, 0, 40, 24))
    raw = pipe.features(Window(0, 0, 40, 24), native=True).raw
    assert raw is not None
    on_device = raw.compute([torch.from_numpy(a).cuda() for a in raw.arrays(0, len(raw))])
    np.testing.assert_allclose(on_device.cpu().numpy(), block.values, rtol=1e-6, atol=1e-7)
    net = _network(pipe)
    predictor = nn.Predictor(net, device="cuda", batch_size=64, precision="fp32", compile=False)
    expected = predictor.proba(block.values)
    got = predictor.proba(raw)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert predictor.seconds["features_s"] > 0 and predictor.seconds["copy_s"] > 0


def test_features_the_device_cannot_compute_are_computed_by_the_host(scene: Path, monkeypatch, caplog) -> None:
    pipe = _pipeline(scene)
    block = pipe.features(Window(0, 0, 40, 24))
    raw = pipe.features(Window(0, 0, 40, 24), native=True).raw
    assert raw is not None
    net = _network(pipe, "MLPClassifier")
    predictor = nn.Predictor(net, device="cpu", batch_size=64)
    expected = predictor.proba(block.values)
    calls = []
    compute = RawFeatures.compute

    def fails_once(self, arrays):
        calls.append(len(arrays[0]))
        if len(calls) == 1:
            raise RuntimeError("\"mul_cuda\" not implemented for 'UInt16'")
        return compute(self, arrays)

    monkeypatch.setattr(RawFeatures, "compute", fails_once)
    np.testing.assert_array_equal(predictor.proba(raw), expected)
    assert predictor._host_features and "the host computes them" in caplog.text
