"""The shared feature pipeline: dates, masking, same-day merge, gap filling, raw-dates mode."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from rasterio.windows import Window

from sitsflow.config import load_config
from sitsflow.errors import BadInputError
from sitsflow.features import FeaturePipeline, from_ordinal, to_ordinal
from sitsflow.features.compute import _merge_same_day

from synthetic import write_config, write_scene


@pytest.fixture()
def scene(tmp_path):
    info = write_scene(tmp_path, nb_dates=12, width=24, height=12, polygons_per_class=2)
    return tmp_path, info


def _pipeline(folder, **kw):
    cfg = load_config(str(write_config(folder, **kw)))
    return FeaturePipeline(cfg, "T1")


def test_dates_and_feature_names(scene):
    folder, info = scene
    pipe = _pipeline(folder)
    assert pipe.raw_dates == info["dates"]
    assert len(pipe.unique_dates) == len(info["dates"]) - 1  # the duplicated day is merged
    # regular 8-day grid from the first to the last acquisition
    first, last = to_ordinal(info["dates"][0]), to_ordinal(info["dates"][-1])
    assert pipe.dates == [from_ordinal(o) for o in range(first, last + 1, 8)]
    assert pipe.feature_names[:3] == [f"synth_red_{pipe.dates[0]}", f"synth_nir_{pipe.dates[0]}", f"synth_red_{pipe.dates[1]}"]
    assert len(pipe.feature_names) == 2 * len(pipe.dates)


def test_start_end_dates_restrict_the_series(scene):
    folder, info = scene
    d = info["dates"]
    pipe = _pipeline(folder, sensor_extra=f"start_date : '{d[4]}'\n  end_date : '{d[9]}'")
    assert pipe.raw_dates == d[4:10]
    assert pipe.dates[0] == d[4] and pipe.dates[-1] <= d[9]


def test_gapfill_interpolates_linearly_over_masked_dates(scene):
    folder, info = scene
    pipe = _pipeline(folder)
    nb_raw = len(pipe.raw_dates)
    t = np.array([to_ordinal(x) for x in pipe.raw_dates], np.float64)
    raw = np.stack([t, 2 * t], axis=-1)[None].astype(np.float32)  # value = day ordinal: linear in time
    valid = np.ones((1, nb_raw), bool)
    valid[0, 5:8] = False  # a cloudy stretch
    out = pipe.compute(raw, valid)
    expected = np.array([to_ordinal(x) for x in pipe.dates], np.float32)
    np.testing.assert_allclose(out[0, :, 0], expected, rtol=1e-6)
    np.testing.assert_allclose(out[0, :, 1], 2 * expected, rtol=1e-6)


def test_gapfill_holds_nearest_value_outside_the_observed_range(scene):
    folder, _ = scene
    pipe = _pipeline(folder)
    nb_raw = len(pipe.raw_dates)
    raw = np.arange(nb_raw, dtype=np.float32)[None, :, None].repeat(2, axis=2)
    valid = np.zeros((1, nb_raw), bool)
    valid[0, 4] = valid[0, 6] = True
    out = pipe.compute(raw, valid)
    assert out[0, 0, 0] == 4.0  # before the first clear date: its value
    assert out[0, -1, 0] == 6.0  # after the last clear date: its value


def test_same_day_acquisitions_are_averaged_over_valid_ones(scene):
    folder, _ = scene
    pipe = _pipeline(folder, sensor_extra="")
    nb_raw = len(pipe.raw_dates)
    raw = np.zeros((1, nb_raw, 2), np.float32)
    raw[0, 2] = 1.0
    raw[0, 3] = 3.0  # same day as index 2
    valid = np.ones((1, nb_raw), bool)
    st = pipe.axis.times[0]
    group = torch.from_numpy(st.day_group)
    merged, mvalid = _merge_same_day(torch.from_numpy(raw), torch.from_numpy(valid), group, len(st.unique_dates))
    assert merged.shape[1] == nb_raw - 1 and merged[0, 2, 0] == 2.0
    valid[0, 3] = False
    merged, _ = _merge_same_day(torch.from_numpy(raw), torch.from_numpy(valid), group, len(st.unique_dates))
    assert merged[0, 2, 0] == 1.0


def test_raw_dates_mode_keeps_dates_and_masks_with_nan(scene):
    folder, info = scene
    cfg = load_config(str(write_config(folder)), ["arg_train.features_from_raw_dates=True"])
    pipe = FeaturePipeline(cfg, "T1")
    assert pipe.dates == sorted(set(info["dates"]))
    block = pipe.features(Window(0, 0, 24, 12))
    clouds = info["clouds"].astype(bool)
    # a pixel cloudy on the first date has NaN there
    r, c = np.argwhere(clouds[0])[0]
    i = np.nonzero((block.rows == r) & (block.cols == c))[0][0]
    assert np.isnan(block.values[i, 0]).all()
    assert block.clear_dates[r, c] == (~clouds[:, r, c]).sum()


def test_gapfilled_features_never_see_cloud_values(scene):
    folder, info = scene
    pipe = _pipeline(folder)
    block = pipe.features(Window(0, 0, 24, 12))
    assert np.isfinite(block.values).all()
    assert block.values.max() < 1.4  # clouds are 1.5 in the raw data and masked
    select = np.zeros((12, 24), bool)
    select[5, 7] = True
    one = pipe.features(Window(0, 0, 24, 12), select=select)
    assert one.rows.tolist() == [5] and one.cols.tolist() == [7]
    np.testing.assert_array_equal(one.values[0], block.values[(block.rows == 5) & (block.cols == 7)][0])


def test_wrong_number_of_dates_is_a_clear_error(scene):
    folder, _ = scene
    cfg = load_config(str(write_config(folder)), ["dated_raster.dates=['2020-01-01', '2020-02-01']"])
    with pytest.raises(BadInputError, match="2 dates declared"):
        FeaturePipeline(cfg, "T1")


def test_missing_raster_names_the_tile(scene):
    folder, _ = scene
    cfg = load_config(str(write_config(folder)), ["chain.list_tile=T9"])
    with pytest.raises(BadInputError, match="T9"):
        FeaturePipeline(cfg, "T9")


def test_gapfill_fast_path_for_fully_clear_pixels_matches_linear_interpolation():
    from sitsflow.features.compute import _gapfill

    rng = np.random.default_rng(0)
    t_obs = np.array([0.0, 7.0, 9.0, 20.0, 31.0])
    targets = np.arange(-3.0, 36.0, 4.0)
    raw = rng.normal(size=(3, 5, 2)).astype(np.float32)
    valid = np.ones((3, 5), bool)
    valid[2, 1] = False  # a mixed block: fast path for pixels 0 and 1, general path for pixel 2
    # fast=False: the path a GPU takes for every pixel (no look at which pixels are clear)
    for v, fast in ((np.ones((3, 5), bool), None), (valid, None), (np.ones((3, 5), bool), False), (valid, False)):
        out = _gapfill(torch.from_numpy(raw), torch.from_numpy(v), t_obs, targets, fast=fast).numpy()
        for p in range(3):
            for b in range(2):
                keep = v[p]
                np.testing.assert_allclose(out[p, :, b], np.interp(targets, t_obs[keep], raw[p, keep, b]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("grid", ["acquisitions", "every other acquisition", "between acquisitions"])
@pytest.mark.parametrize("cloudy", [0.0, 0.02, 0.3])
def test_gapfill_redoing_only_cloudy_values_equals_the_general_path(grid, cloudy):
    """The CPU path interpolates all pixels alike, then redoes only the values next to an invalid
    observation (or falls back to the general path when too many are): the same values bit for bit
    as interpolating every value between its own pixel's valid observations, np.interp's values,
    NaN for a pixel without any, and the caller's observations untouched."""
    from sitsflow.features.compute import _gapfill

    rng = np.random.default_rng(7)
    t_obs = np.sort(rng.choice(np.arange(500.0), 24, replace=False))
    targets = {
        "acquisitions": t_obs.copy(),
        "every other acquisition": t_obs[::2].copy(),
        "between acquisitions": np.arange(t_obs[0] - 12, t_obs[-1] + 12, 9.0),
    }[grid]
    raw = rng.normal(size=(300, 24, 3)).astype(np.float32)
    valid = rng.uniform(size=(300, 24)) >= cloudy
    valid[7] = False  # no valid observation
    valid[8] = False
    valid[8, 5] = True  # one
    before = raw.copy()
    fast = _gapfill(torch.from_numpy(raw), torch.from_numpy(valid), t_obs, targets).numpy()
    general = _gapfill(torch.from_numpy(raw), torch.from_numpy(valid), t_obs, targets, fast=False).numpy()
    np.testing.assert_array_equal(raw, before)
    np.testing.assert_array_equal(fast, general)  # NaN where NaN
    # observations the caller gives away may hold the result (no copy): the same values
    given = torch.from_numpy(raw.copy())
    result = _gapfill(given, torch.from_numpy(valid), t_obs, targets, overwrite=True)
    np.testing.assert_array_equal(result.numpy(), fast)
    if grid == "acquisitions" and 0 < cloudy < 0.5:  # the result is the observations, filled in place
        assert result.data_ptr() == given.data_ptr()
        assert _gapfill(torch.from_numpy(raw), torch.from_numpy(valid), t_obs, targets).data_ptr() != raw.ctypes.data
    assert np.isnan(fast[7]).all() and not np.isnan(np.delete(fast, 7, axis=0)).any()
    for p in (0, 8, 9, 100, 299):
        for b in range(3):
            keep = valid[p]
            np.testing.assert_allclose(fast[p, :, b], np.interp(targets, t_obs[keep], raw[p, keep, b]), rtol=1e-5, atol=1e-6)


def test_the_tile_grid_needs_no_user_code(scene):
    """Planning reads the tile grid only: sensor headers, never the user's external features module."""
    from sitsflow.features import tile_grid
    from sitsflow.planning import tile_chunks

    folder, _ = scene
    (folder / "feat.py").write_text("raise RuntimeError('user code ran')\n\ndef get_soi(self):\n    return None\n")
    extra = "external_features:\n{\n  module : 'feat.py'\n  functions : 'get_soi'\n}\n"
    cfg = load_config(str(write_config(folder, extra=extra)))
    grid = tile_grid(cfg, "T1")
    assert (grid.width, grid.height) == (24, 12)
    assert sum(int(w.width) * int(w.height) for w in tile_chunks(cfg, "T1")) == 24 * 12
    with pytest.raises(Exception, match="user code ran"):
        FeaturePipeline(cfg, "T1")  # the features themselves do need it


def test_planning_reads_the_grid_without_torch():
    """The feature computation is torch; planning (headers only) does not load it."""
    import subprocess
    import sys

    code = "import sys, sitsflow.planning, sitsflow.features; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_gap_filling_benchmark_finds_both_paths_equal(capsys):
    """bench/gapfill.py runs (small) and checks the CPU path against the general one in every case."""
    import importlib.util
    import json
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "bench"
    sys.path.insert(0, str(bench))
    try:
        spec = importlib.util.spec_from_file_location("bench_gapfill", bench / "gapfill.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        assert module.main(["--pixels", "600", "--batch", "200", "--dates", "7", "--bands", "2", "--repeat", "1"]) == 0
    finally:
        sys.path.remove(str(bench))
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(result["cases"]) == 8 and all(case["same"] for case in result["cases"])
