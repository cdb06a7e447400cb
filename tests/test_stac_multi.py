"""Several ``stac`` sources in one run (``stac : [ { ... }, { ... } ]``): Sentinel-2 L2A and
Sentinel-1 RTC, Sentinel-1's ascending and descending passes as two sources, each a sensor of its
own (feature names, statistics key) on the run's one date axis; the list's key paths in errors;
and runs from sampling to the final map with Sentinel-1 alone and Sentinel-1 + Sentinel-2, on the
catalogs of tests/stac_catalog.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin
from rasterio.windows import Window

from sitsflow import layout, storage
from sitsflow.config import load_config
from sitsflow.errors import ConfigError
from sitsflow.features import FeaturePipeline
from sitsflow.sensors.base import ReadBuffers
from stac_catalog import (
    HEIGHT,
    S1_DAYS,
    WIDTH,
    backscatter,
    stac_sources,
    write_catalog,
    write_config,
    write_s1_catalog,
)

TILE = "T31TCJ"
FULL = Window(0, 0, WIDTH, HEIGHT)


@pytest.fixture(scope="module")
def catalogs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("multi")
    s2 = write_catalog(folder)
    s1 = write_s1_catalog(folder)
    return folder, s2, s1


def _s2(info: dict) -> dict:
    return {"catalog": info["catalog"], "profile": "sentinel-2-l2a", "end_date": "2023-04-01", "max_cloud_cover": 50}


def _s1(info: dict, orbit: str, name: str | None = None) -> dict:
    return {"catalog": info["catalog"], "profile": "sentinel-1-rtc", "orbit_state": orbit, **({"name": name} if name else {})}


def _cfg(folder: Path, *sources: dict, overrides: tuple[str, ...] = (), name: str = "multi.cfg", **kw):
    return load_config(str(write_config(folder, "", stac=stac_sources(*sources), name=name, **kw)), list(overrides))


def _days(orbit: str) -> list[int]:
    return [int(d.strftime("%Y%m%d")) for d in S1_DAYS[orbit]]


def test_each_source_is_a_sensor_on_one_date_axis(catalogs):
    folder, s2, s1 = catalogs
    cfg = _cfg(folder, _s2(s2), _s1(s1, "ascending", "s1asc"), _s1(s1, "descending", "s1des"))
    assert [s.sensor_key for s in cfg.stac] == ["sentinel2l2a", "s1asc", "s1des"]
    pipe = FeaturePipeline(cfg, TILE)
    assert pipe.sensor_keys == ["sentinel2l2a", "s1asc", "s1des"]
    assert [s.raw_dates for s in pipe.sensors[1:]] == [_days("ascending"), _days("descending")]
    # gap-filled: the union of the sources' regular grids (10 days from 2023-03-01, 12 days from each orbit's first pass)
    want = {20230301, 20230311, 20230321, 20230331, *_days("ascending"), *_days("descending")}
    assert pipe.dates == sorted(want)
    assert pipe.components[:2] == ["sentinel2l2a_b02", "sentinel2l2a_b03"]
    assert pipe.components[-4:] == ["s1asc_vv", "s1asc_vh", "s1des_vv", "s1des_vh"]
    assert "s1asc_vh_20230314" in pipe.feature_names and "s1des_vv_20230305" in pipe.feature_names
    assert len(pipe.feature_names) == len(pipe.dates) * len(pipe.components)
    # raw dates: the union of the acquisition days, NaN where a source has none
    raw = FeaturePipeline(load_config(cfg.source, ["arg_train.features_from_raw_dates=True"]), TILE)
    assert raw.dates == sorted({20230301, 20230311, 20230321, *_days("ascending"), *_days("descending")})
    block = raw.features(FULL)
    labels = s1["labels"]
    pix = (block.rows == 10) & (block.cols == 5)
    values = block.values[pix][0]
    asc_vv = raw.components.index("s1asc_vv")
    des_vh = raw.components.index("s1des_vh")
    for t, day in enumerate(_days("ascending")):
        d = raw.dates.index(day)
        assert values[d, asc_vv] == pytest.approx(backscatter("ascending", t, "vv", labels)[10, 5], rel=1e-6)
        assert np.isnan(values[d, des_vh])  # no descending pass that day
    d = raw.dates.index(_days("descending")[1])
    assert values[d, des_vh] == pytest.approx(backscatter("descending", 1, "vh", labels)[10, 5], rel=1e-6)
    assert np.isnan(values[d, asc_vv])
    # the sources' reads of one window live side by side in reused buffers
    buffered = raw.features(FULL, buffers=ReadBuffers())
    np.testing.assert_array_equal(buffered.values, block.values)


def test_one_source_in_a_list_is_the_section(catalogs, tmp_path):
    folder, s2, _ = catalogs
    listed = _cfg(folder, _s2(s2), name="listed.cfg")
    single = load_config(str(write_config(folder, s2["catalog"], name="single.cfg")))
    assert listed.stac == single.stac and len(single.stac) == 1
    assert FeaturePipeline(listed, TILE).feature_names == FeaturePipeline(single, TILE).feature_names


def test_several_sources_are_written_back(catalogs, tmp_path):
    folder, s2, s1 = catalogs
    cfg = _cfg(folder, _s2(s2), _s1(s1, "ascending", "s1asc"), _s1(s1, "descending", "s1des"))
    text = cfg.to_cfg()
    assert "stac : [" in text
    (tmp_path / "again.cfg").write_text(text)
    assert load_config(str(tmp_path / "again.cfg")) == cfg
    # a cluster run names each local catalog by its source (sitsflow submit refuses local inputs)
    from sitsflow.submit import _local_inputs

    local = [k for k, _ in _local_inputs("stac", cfg.section_dict("stac")) if k.endswith("catalog")]
    assert local == ["stac[0].catalog", "stac[1].catalog", "stac[2].catalog"]


def test_list_errors_name_the_source_index_and_line(catalogs, tmp_path):
    folder, s2, s1 = catalogs
    with pytest.raises(ConfigError) as err:
        _cfg(folder, _s1(s1, "ascending"), _s1(s1, "descending"), name="twice.cfg")
    assert "stac[1].profile" in str(err.value) and "'sentinel1rtc'" in str(err.value)
    assert "already that of stac[0]" in str(err.value) and "twice.cfg" in str(err.value)
    with pytest.raises(ConfigError, match=r"stac\[2\]\.name: the sensor name 's1' of stac\[2\] is already that of stac\[1\]"):
        _cfg(folder, _s2(s2), _s1(s1, "ascending", "s1"), _s1(s1, "descending", "s1"))
    with pytest.raises(ConfigError) as err:
        _cfg(folder, _s2(s2), _s1(s1, "up", "s1"), name="bad.cfg")
    line = (folder / "bad.cfg").read_text().split("\n").index('    orbit_state : "up"') + 1
    assert f"stac[1].orbit_state: expected None or one of 'ascending', 'descending', got 'up' (str) " in str(err.value)
    assert f"bad.cfg:{line})" in str(err.value)
    with pytest.raises(ConfigError, match=r"stac\[1\]\.catalog: give one of catalog .* and api"):
        _cfg(folder, _s2(s2), {"profile": "sentinel-1-rtc"})
    with pytest.raises(ConfigError, match=r"unknown key 'stac\[1\]\.orbit'"):
        _cfg(folder, _s2(s2), {**_s1(s1, "ascending", "s1"), "orbit": "x"})
    with pytest.raises(ConfigError, match=r"stac: expected a section \{ key : value \} or a list of sections"):
        load_config(str(write_config(folder, "", stac="stac : []", name="empty.cfg")))
    # the sensor names that clash exit 2 from the command line
    bad = write_config(folder, "", stac=stac_sources(_s1(s1, "ascending"), _s1(s1, "descending")), name="clash.cfg")
    proc = subprocess.run([sys.executable, "-m", "sitsflow", "prepare", "--config", str(bad)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and "stac[1].profile" in proc.stderr


def _run(cfg) -> np.ndarray:
    from test_stages import _pipeline

    _pipeline(cfg)
    out = cfg.chain.output_path
    with rasterio.open(layout.final_classif(out, 0)) as src:
        assert (src.width, src.height, src.transform) == (WIDTH, HEIGHT, from_origin(300000, 5000000, 10, 10))
        classif = src.read(1)
    report = json.loads(storage.read_text(layout.final_results_json(out)))
    assert report["seeds"][0]["overall_accuracy"] > 0.9
    return classif


@pytest.mark.parametrize("with_s2", [False, True], ids=["s1-alone", "s1-and-s2"])
def test_sentinel1_runs_to_the_final_map(catalogs, tmp_path, with_s2):
    from sitsflow import inference

    folder, s2, s1 = catalogs
    sources = [_s1(s1, "ascending", "s1asc"), _s1(s1, "descending", "s1des")]
    cfg = _cfg(folder, *([_s2(s2)] if with_s2 else []), *sources, epochs=30, name=f"run{int(with_s2)}.cfg",
               overrides=(f"chain.output_path='{tmp_path / 'out'}'",))
    classif = _run(cfg)
    assert (classif[6:26] == s1["labels"][6:26]).mean() > 0.9
    net, _ = inference.load_selected(cfg, 1, 0)
    assert set(net.stats_dict()) == ({"sentinel2l2a"} if with_s2 else set()) | {"s1asc", "s1des"}
