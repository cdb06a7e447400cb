"""Seeded generator of small THEIA Sentinel-2 L2A and Landsat 8 L2A product folders, in the exact
on-disk layout, with class signals a network can learn, plus reference polygons.

Layout written under ``root``::

    s2/{tile}/SENTINEL2A_YYYYMMDD-105853-123_L2A_{tile}_C_V2-2/
        SENTINEL2A_..._FRE_B2.tif ... _FRE_B12.tif   (int16, reflectance x 10000, nodata -10000;
                                                       B2 B3 B4 B8 at 10 m, B5 B6 B7 B8A B11 B12 at 20 m)
        MASKS/SENTINEL2A_..._CLM_R1.tif, _SAT_R1.tif, _EDG_R1.tif   (uint8, 10 m, 0 = valid)
    l8/{tile}/LANDSAT8-OLITIRS-XS_YYYYMMDD-103602-612_L2A_{tile}_D_V1-9/
        ..._FRE_B1.tif ... _FRE_B7.tif (30 m), MASKS/..._CLM_XS.tif, _SAT_XS.tif, _EDG_XS.tif
    reference.gpkg   (layer with integer field ``code``; also a polygon without class, one outside
                      the tile and one self-intersecting polygon)

Classes differ by the timing and height of their vegetation peak (red/NIR/SWIR reflectances), so
NDVI series separate them; clouds (CLM), saturation (SAT), edges (EDG + nodata) are scattered.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pyogrio
import rasterio
import shapely
from rasterio.transform import from_origin

CRS = "EPSG:32631"
ORIGIN = (300000.0, 4900020.0)
S2_10M = ("B2", "B3", "B4", "B8")
S2_20M = ("B5", "B6", "B7", "B8A", "B11", "B12")
L8_BANDS = ("B1", "B2", "B3", "B4", "B5", "B6", "B7")
# base reflectance per band (soil-like) and sensitivity to vegetation vigour
_S2_BASE = {"B2": 0.05, "B3": 0.08, "B4": 0.10, "B5": 0.13, "B6": 0.18, "B7": 0.20, "B8": 0.22,
            "B8A": 0.23, "B11": 0.25, "B12": 0.18}
_S2_VEG = {"B2": -0.02, "B3": 0.0, "B4": -0.07, "B5": 0.02, "B6": 0.15, "B7": 0.22, "B8": 0.30,
           "B8A": 0.30, "B11": -0.08, "B12": -0.09}
_L8_BASE = {"B1": 0.04, "B2": 0.05, "B3": 0.08, "B4": 0.10, "B5": 0.22, "B6": 0.25, "B7": 0.18}
_L8_VEG = {"B1": -0.01, "B2": -0.02, "B3": 0.0, "B4": -0.07, "B5": 0.30, "B6": -0.08, "B7": -0.09}


def _vigour(doy: float, code: int) -> float:
    """Vegetation vigour in [0, 1] of class ``code`` on a day of year."""
    peak = 20 + 35 * (code - 1)
    height = 0.4 + 0.2 * (code % 3)
    return height * float(np.exp(-((doy - peak) ** 2) / (2 * 30.0**2)))


def _write(path: Path, array: np.ndarray, transform, dtype: str, nodata=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    profile = {"driver": "GTiff", "dtype": dtype, "count": 1, "width": array.shape[1], "height": array.shape[0],
               "crs": CRS, "transform": transform, "compress": "deflate"}
    if nodata is not None:
        profile["nodata"] = nodata
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(array.astype(dtype), 1)


def label_layout(width: int, height: int, classes: tuple[int, ...], polygons_per_class: int):
    """Rectangles of polygons (columns of blocks), in 10 m pixel coordinates.

    Returns (label_map int32 (height, width), [(row0, row1, col0, col1, code), ...]).
    """
    label_map = np.zeros((height, width), np.int32)
    boxes = []
    n = len(classes) * polygons_per_class
    cols = 4 if n >= 8 else 2
    nrows = -(-n // cols)
    bw, bh = width // cols, height // nrows
    k = 0
    for ci, code in enumerate(classes):
        for _ in range(polygons_per_class):
            r, c = divmod(k, cols)
            r0, r1 = r * bh + 1, (r + 1) * bh - 1
            c0, c1 = c * bw + 1, (c + 1) * bw - 1
            label_map[r0:r1, c0:c1] = code
            boxes.append((r0, r1, c0, c1, code))
            k += 1
    return label_map, boxes


def acquisition_dates(n: int, seed: int, start: dt.date = dt.date(2018, 1, 5), step: int = 20) -> list[dt.date]:
    rng = np.random.default_rng(seed)
    out, d = [], start
    for _ in range(n):
        out.append(d)
        d = d + dt.timedelta(days=step + int(rng.integers(-4, 5)))
    return out


def write_products(
    root: Path,
    *,
    tile: str = "T31TCJ",
    width: int = 60,
    height: int = 48,
    nb_dates: int = 10,
    classes: tuple[int, ...] = (1, 2, 3),
    polygons_per_class: int = 4,
    cloud_fraction: float = 0.15,
    landsat: bool = True,
    duplicate_date: bool = True,
    seed: int = 0,
) -> dict:
    """Write THEIA S2 (and Landsat 8) products of one tile and reference polygons under ``root``.

    ``width`` and ``height`` (10 m pixels) must be multiples of 6 (20 m and 30 m grids).
    Returns what was written: dates, label map, product folders, paths.
    """
    if width % 6 or height % 6:
        raise ValueError("width and height must be multiples of 6")
    rng = np.random.default_rng(seed)
    root = Path(root)
    label_map, boxes = label_layout(width, height, classes, polygons_per_class)
    t10 = from_origin(ORIGIN[0], ORIGIN[1], 10.0, 10.0)
    t20 = from_origin(ORIGIN[0], ORIGIN[1], 20.0, 20.0)
    t30 = from_origin(ORIGIN[0], ORIGIN[1], 30.0, 30.0)
    dates = acquisition_dates(nb_dates, seed)
    s2_dates = list(dates)
    if duplicate_date and nb_dates > 3:
        s2_dates.insert(3, dates[2])  # a second acquisition (other satellite) on the same day
    noise_field = rng.normal(0, 0.01, (height, width))
    folders = []
    clouds_all = []
    for k, d in enumerate(s2_dates):
        sat = "SENTINEL2B" if (duplicate_date and k == 3 and nb_dates > 3) else "SENTINEL2A"
        name = f"{sat}_{d:%Y%m%d}-105853-{123 + k:03d}_L2A_{tile}_C_V2-2"
        folder = root / "s2" / tile / name
        doy = d.timetuple().tm_yday
        vig = np.zeros((height, width), np.float32)
        for code in classes:
            vig[label_map == code] = _vigour(doy, code)
        # clouds come in 20 m blocks, so a 20 m band is never half cloudy under a clear 10 m mask
        clouds = np.kron(rng.random((height // 2, width // 2)) < cloud_fraction, np.ones((2, 2), bool))
        clouds_all.append(clouds)
        saturated = rng.random((height, width)) < 0.01
        edge = np.zeros((height, width), bool)
        if k == len(s2_dates) - 1:
            edge[:, : width // 6] = True  # the last acquisition misses the tile's west edge
        for band in S2_10M + S2_20M:
            refl = _S2_BASE[band] + _S2_VEG[band] * vig + noise_field + rng.normal(0, 0.005, (height, width))
            refl[clouds] = 0.6 + rng.normal(0, 0.02, int(clouds.sum()))
            dn = np.clip(np.rint(refl * 10000), -9999, 15999).astype(np.int16)
            dn[edge] = -10000
            if band in S2_20M:
                dn = dn.reshape(height // 2, 2, width // 2, 2)[:, 0, :, 0]  # a 20 m pixel: its NW 10 m value
                _write(folder / f"{name}_FRE_{band}.tif", dn, t20, "int16", -10000)
            else:
                _write(folder / f"{name}_FRE_{band}.tif", dn, t10, "int16", -10000)
        _write(folder / "MASKS" / f"{name}_CLM_R1.tif", np.where(clouds, 2, 0), t10, "uint8")
        _write(folder / "MASKS" / f"{name}_SAT_R1.tif", np.where(saturated, 1, 0), t10, "uint8")
        _write(folder / "MASKS" / f"{name}_EDG_R1.tif", edge.astype(np.uint8), t10, "uint8")
        folders.append(folder)
    l8_folders = []
    if landsat:
        h3, w3 = height // 3, width // 3
        lab3 = label_map[1::3, 1::3]
        for k, d in enumerate(dates[::2]):
            d = d + dt.timedelta(days=3)
            name = f"LANDSAT8-OLITIRS-XS_{d:%Y%m%d}-103602-612_L2A_{tile}_D_V1-9"
            folder = root / "l8" / tile / name
            doy = d.timetuple().tm_yday
            vig = np.zeros((h3, w3), np.float32)
            for code in classes:
                vig[lab3 == code] = _vigour(doy, code)
            clouds = rng.random((h3, w3)) < cloud_fraction
            for band in L8_BANDS:
                refl = _L8_BASE[band] + _L8_VEG[band] * vig + rng.normal(0, 0.005, (h3, w3))
                refl[clouds] = 0.6
                _write(folder / f"{name}_FRE_{band}.tif", np.rint(refl * 10000), t30, "int16", -10000)
            _write(folder / "MASKS" / f"{name}_CLM_XS.tif", clouds.astype(np.uint8), t30, "uint8")
            _write(folder / "MASKS" / f"{name}_SAT_XS.tif", np.zeros((h3, w3)), t30, "uint8")
            _write(folder / "MASKS" / f"{name}_EDG_XS.tif", np.zeros((h3, w3)), t30, "uint8")
            l8_folders.append(folder)
    # reference polygons (pixel-aligned rectangles, slightly inset so pixel centres decide)
    geoms, codes = [], []
    for r0, r1, c0, c1, code in boxes:
        x0, y0 = t10 @ (c0 + 0.1, r0 + 0.1)
        x1, y1 = t10 @ (c1 - 0.1, r1 - 0.1)
        geoms.append(shapely.box(x0, y1, x1, y0))
        codes.append(code)
    x0, y0 = t10 @ (0, 0)
    geoms.append(shapely.box(x0, y0 - 10, x0 + 10, y0))  # no class
    codes.append(None)
    geoms.append(shapely.box(x0 - 5000, y0 - 1000, x0 - 4000, y0))  # outside the tile
    codes.append(classes[0])
    geoms.append(shapely.Polygon([(x0 + 1, y0 - 1), (x0 + 9, y0 - 9), (x0 + 9, y0 - 1), (x0 + 1, y0 - 9)]))  # bow-tie
    codes.append(classes[-1])
    gpkg = root / "reference.gpkg"
    pyogrio.raw.write(
        str(gpkg),
        geometry=shapely.to_wkb(np.array(geoms, dtype=object)),
        field_data=[np.array([c if c is not None else 0 for c in codes], np.int64)],
        field_mask=[np.array([c is None for c in codes])],
        fields=["code"],
        crs=CRS,
        driver="GPKG",
        geometry_type="Unknown",
    )
    return {
        "root": root,
        "tile": tile,
        "dates": [int(f"{d:%Y%m%d}") for d in s2_dates],
        "l8_dates": [int(f"{d + dt.timedelta(days=3):%Y%m%d}") for d in dates[::2]] if landsat else [],
        "label_map": label_map,
        "boxes": boxes,
        "folders": folders,
        "l8_folders": l8_folders,
        "reference": gpkg,
        "clouds": clouds_all,
        "width": width,
        "height": height,
    }


def upload(root: Path, bucket: str, prefix: str = "data") -> str:
    """Copy the generated tree to ``{bucket}/{prefix}`` (an s3:// URI); returns that URI."""
    from sitsflow import storage

    for path in sorted(Path(root).rglob("*")):
        if path.is_file():
            storage.write_bytes(f"{bucket}/{prefix}/{path.relative_to(root).as_posix()}", path.read_bytes())
    return f"{bucket}/{prefix}"


def write_theia_config(folder: Path, *, data: str, output: str = "output", tile: str = "T31TCJ",
                       landsat: bool = False, extra: str = "", arg_train_extra: str = "",
                       epochs: int = 30, chunks: int = 2, dl_name: str = "MLPClassifier",
                       name: str = "config.cfg") -> Path:
    """A configuration for the products of :func:`write_products` (``data``: their root)."""
    text = f"""
chain:
{{
  output_path : '{output}'
  list_tile : '{tile}'
  ground_truth : '{data}/reference.gpkg'
  data_field : 'code'
  s2_path : '{data}/s2'
  {"l8_path : '" + data + "/l8'" if landsat else ""}
}}
Sentinel_2:
{{
  start_date : '2018-01-01'
  end_date : '2018-07-31'
  temporal_resolution : 15
}}
arg_train:
{{
  runs : 1
  ratio : 0.5
  random_seed : 0
  {arg_train_extra}
  deep_learning_parameters:
  {{
    dl_name : '{dl_name}'
    epochs : {epochs}
    num_workers : 0
    dataloader_mode : 'full'
    hyperparameters_solver : {{"batch_size" : [64], "learning_rate" : [0.01]}}
  }}
}}
python_data_managing:
{{
  chunk_size_mode : 'split_number'
  number_of_chunks : {chunks}
}}
{extra}
"""
    path = Path(folder) / name
    path.write_text(text)
    return path
