"""Seeded generator of a small dated-raster scene: a multi-band time series with clouds, a cloud
mask and labelled polygons whose classes have learnable temporal signatures."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pyogrio
import rasterio
import shapely
from rasterio.transform import from_origin

CRS = "EPSG:32631"
ORIGIN = (300000.0, 5000000.0)
RES = 10.0


def dates_between(start: dt.date, n: int, step: int = 7, jitter: int = 3, seed: int = 0) -> list[dt.date]:
    rng = np.random.default_rng(seed)
    out, d = [], start
    for _ in range(n):
        out.append(d)
        d = d + dt.timedelta(days=step + int(rng.integers(-jitter, jitter + 1)))
    return out


def write_scene(
    folder: Path,
    *,
    width: int = 60,
    height: int = 48,
    nb_dates: int = 15,
    bands: tuple[str, ...] = ("red", "nir"),
    classes: tuple[int, ...] = (1, 2, 3),
    polygons_per_class: int = 4,
    cloud_fraction: float = 0.2,
    duplicate_date: bool = True,
    seed: int = 0,
    tile: str = "T1",
    origin: tuple[float, float] = ORIGIN,
    polygons_name: str = "polygons.geojson",
) -> dict:
    """Write ``{folder}/{tile}/series.tif`` (bands stacked date-major, dates in the band
    descriptions), ``{tile}/clouds.tif`` (1 = cloud) and ``polygons.geojson`` (field ``code``;
    plus one polygon with code 0 = no class). Returns a description of what was written.
    """
    rng = np.random.default_rng(seed)
    folder = Path(folder)
    (folder / tile).mkdir(parents=True, exist_ok=True)
    dates = dates_between(dt.date(2020, 1, 5), nb_dates, seed=seed)
    if duplicate_date and nb_dates > 3:
        dates[3] = dates[2]  # two acquisitions on one day
    doy = np.array([d.timetuple().tm_yday for d in dates], np.float64)
    # class layout: vertical stripes of polygons, each a rectangle with a 1-pixel gap
    nb_cls = len(classes)
    cols_per_poly = width // (nb_cls * polygons_per_class)
    label_map = np.zeros((height, width), np.int32)
    polygon_rows = []
    transform = from_origin(origin[0], origin[1], RES, RES)
    pid = 0
    for ci, code in enumerate(classes):
        for k in range(polygons_per_class):
            c0 = (ci * polygons_per_class + k) * cols_per_poly
            c1 = c0 + cols_per_poly - 1
            r0 = 2 + (k % 2) * 3
            r1 = height - 2
            label_map[r0:r1, c0:c1] = code
            x0, y0 = transform @ (c0, r0)
            x1, y1 = transform @ (c1, r1)
            polygon_rows.append((shapely.box(x0, y1, x1, y0), code))
            pid += 1
    # one unlabelled polygon (code 0)
    x0, y0 = transform @ (0, 0)
    x1, y1 = transform @ (4, 2)
    polygon_rows.append((shapely.box(x0, y1, x1, y0), 0))
    # signatures: class c has a seasonal peak at a class-specific day of year
    data = np.empty((nb_dates, len(bands), height, width), np.float32)
    base = rng.normal(0.0, 0.02, (len(bands), height, width))
    for t in range(nb_dates):
        for b in range(len(bands)):
            signal = np.zeros((height, width), np.float32)
            for ci, code in enumerate(classes):
                peak = 20 + 40 * ci
                amp = 0.5 if b % 2 else 0.2 + 0.1 * ci
                val = amp * np.exp(-((doy[t] - peak) ** 2) / (2 * 15.0**2)) + 0.1 * (b + 1)
                signal[label_map == code] = val
            signal[label_map == 0] = 0.15 + 0.05 * b
            data[t, b] = signal + base[b] + rng.normal(0, 0.01, (height, width))
    clouds = (rng.random((nb_dates, height, width)) < cloud_fraction).astype(np.uint8)
    data[clouds.astype(bool)[:, None].repeat(len(bands), axis=1)] = 1.5  # bright clouds
    profile = {"driver": "GTiff", "dtype": "float32", "count": nb_dates * len(bands), "width": width,
               "height": height, "crs": CRS, "transform": transform}
    series = folder / tile / "series.tif"
    with rasterio.open(series, "w", **profile) as dst:
        dst.write(data.reshape(nb_dates * len(bands), height, width))
        for t, d in enumerate(dates):
            for b in range(len(bands)):
                dst.set_band_description(t * len(bands) + b + 1, d.isoformat())
    mask = folder / tile / "clouds.tif"
    with rasterio.open(mask, "w", **(profile | {"dtype": "uint8", "count": nb_dates})) as dst:
        dst.write(clouds)
    gj = folder / polygons_name
    pyogrio.raw.write(
        str(gj),
        geometry=shapely.to_wkb(np.array([g for g, _ in polygon_rows], dtype=object)),
        field_data=[np.array([c for _, c in polygon_rows], np.int64)],
        fields=["code"],
        crs=CRS,
        driver="GeoJSON",
        geometry_type="Polygon",
    )
    return {
        "series": series,
        "mask": mask,
        "polygons": gj,
        "dates": [int(d.strftime("%Y%m%d")) for d in dates],
        "label_map": label_map,
        "data": data,
        "clouds": clouds,
        "tile": tile,
    }


def write_config(folder: Path, *, output: str = "output", dl_name: str = "MLPClassifier", extra: str = "",
                 dl_extra: str = "", sensor_extra: str = "", chunks: int = 3, runs: int = 1, epochs: int = 3,
                 tile: str = "T1") -> Path:
    """Write a configuration for the scene of :func:`write_scene` (relative paths)."""
    text = f"""
chain:
{{
  output_path : '{output}'
  list_tile : '{tile}'
  ground_truth : 'polygons.geojson'
  data_field : 'code'
}}
dated_raster:
{{
  name : 'synth'
  path : '{{tile}}/series.tif'
  bands : ['red', 'nir']
  mask_path : '{{tile}}/clouds.tif'
  temporal_resolution : 8
  {sensor_extra}
}}
arg_train:
{{
  runs : {runs}
  ratio : 0.5
  random_seed : 0
  deep_learning_parameters:
  {{
    dl_name : '{dl_name}'
    epochs : {epochs}
    num_workers : 0
    dataloader_mode : 'full'
    hyperparameters_solver : {{"batch_size" : [64], "learning_rate" : [0.01, 0.001]}}
    {dl_extra}
  }}
}}
python_data_managing:
{{
  chunk_size_mode : 'split_number'
  number_of_chunks : {chunks}
}}
{extra}
"""
    path = Path(folder) / "config.cfg"
    path.write_text(text)
    return path
