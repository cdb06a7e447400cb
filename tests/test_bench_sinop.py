"""bench/sinop.py on a generated cube (the real one is GPL-2 data outside the project): the uint16
words holding negative int16 values are read back as negatives, the stacked raster is date-major,
and the inference stage's feature pipeline hands the network index units under the names the
Mato Grosso table's model was trained on."""

from __future__ import annotations

import datetime as dt
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin
from rasterio.windows import Window

from sitsflow.config import load_config
from sitsflow.errors import BadInputError
from sitsflow.features import FeaturePipeline

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        spec = importlib.util.spec_from_file_location("bench_sinop", ROOT / "bench" / "sinop.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "bench"))
    return module


def _cube(folder: Path, sinop, width=4, height=3) -> tuple[np.ndarray, list[str]]:
    """NDVI / EVI uint16 rasters like the sits cube (23 dates from 2013-09-14, dates in the band
    descriptions); returns the int16 values (band, date, row, col) and the dates."""
    dates = [
        dt.datetime.strptime(str(d), "%Y%m%d").date().isoformat() for d in sinop.mod13q1_dates(dt.date(2013, 9, 14))
    ]
    rng = np.random.default_rng(0)
    values = rng.integers(-2000, 10500, size=(2, 23, height, width)).astype(np.int16)
    values[0, 0, 0, 0] = -6  # stored as 65530
    profile = {
        "driver": "GTiff",
        "dtype": "uint16",
        "count": 23,
        "width": width,
        "height": height,
        "crs": "EPSG:3857",
        "transform": from_origin(-6073587.958, -1278725.64, 231.656, 231.656),
    }
    for b, band in enumerate(sinop.CUBE_BANDS):
        with rasterio.open(folder / sinop.CUBE_FILE.format(band=band), "w", **profile) as dst:
            dst.write(values[b].view(np.uint16))
            for t, d in enumerate(dates):
                dst.set_band_description(t + 1, d)
    return values, dates


def test_stacked_cube_reaches_the_network_in_index_units_under_the_tables_names(tmp_path):
    sinop = _bench()
    values, dates = _cube(tmp_path, sinop)
    cube, profile, read_dates = sinop.read_cube(tmp_path)
    assert cube.dtype == np.int16 and cube[0, 0, 0, 0] == -6 and read_dates == dates
    np.testing.assert_array_equal(cube, values)

    stack = tmp_path / "stack.tif"
    sinop.write_stack(stack, cube, profile, dates)
    points = [{"id": "1", "longitude": "-55.6", "latitude": "-11.7", "label": "Forest"}]
    sinop.write_points(tmp_path / "points.geojson", points, {"Forest": 3})
    dl = {"dl_name": "TempCNN", "hyperparameters_solver": {"batch_size": [64], "learning_rate": [0.001]}}
    sinop.write_config(tmp_path / "sinop.cfg", stack, tmp_path / "points.geojson", dl)
    pipe = FeaturePipeline(load_config(str(tmp_path / "sinop.cfg")), sinop.TILE)

    compact = [d.replace("-", "") for d in dates]
    assert pipe.feature_names == [f"modis_{b}_{d}" for d in compact for b in ("ndvi", "evi")]
    block = pipe.features(Window(0, 0, 4, 3))
    assert block.values.shape == (12, 23, 2)
    expected = values.astype(np.float32) * np.float32(sinop.CUBE_SCALE)  # (band, date, row, col)
    got = np.empty_like(expected)
    got[:, :, block.rows, block.cols] = block.values.transpose(2, 1, 0)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert got[0, 0, 0, 0] == pytest.approx(-0.0006)


def test_a_missing_cube_names_the_file(tmp_path):
    sinop = _bench()
    with pytest.raises(BadInputError, match="sits_sinop_mod13q1_NDVI_23dates.tif does not exist"):
        sinop.read_cube(tmp_path)
