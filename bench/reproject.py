"""Cost of a warped read (chain.proj / chain.spatial_resolution) against the plain windowed read.

A dated raster of 10 bands x 20 dates (int16, tiled 512, pixel-interleaved, DEFLATE, as a COG),
1,200 x 1,200 pixels of 10 m in EPSG:32631; one 1,024 x 1,024 window of the tile grid read as the
dated-raster reader does (pixel-major int16, every band), through ``read_on_grid``:

* plain: the tile grid is the raster's grid (the fast path, no resampling);
* warped onto EPSG:3035 at 10 m, cubic (reflectances) and nearest (what masks get);
* warped onto the raster's CRS at 20 m (``chain.spatial_resolution: 20``), cubic, a 512 x 512 window
  (the same ground).

Usage: ``PYTHONPATH=services python bench/reproject.py [--repeat 3] [--folder /tmp/bench-reproject]``
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.transform import from_origin
from rasterio.windows import Window

from sitsflow import storage
from sitsflow.features.grid import target_grid
from sitsflow.sensors.base import MASKS, VALUES, grid_of, read_on_grid

SIZE, BANDS, DATES, WINDOW = 1200, 10, 20, 1024


def write_raster(path: Path) -> None:
    if path.exists():
        return
    rng = np.random.default_rng(0)
    profile = {
        "driver": "GTiff",
        "dtype": "int16",
        "count": BANDS * DATES,
        "width": SIZE,
        "height": SIZE,
        "crs": "EPSG:32631",
        "transform": from_origin(300000, 5000000, 10, 10),
        "tiled": True,
        "blockxsize": 512,
        "blockysize": 512,
        "interleave": "pixel",
        "compress": "deflate",
        "nodata": None,
    }
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    field = (np.sin(xx / 37.0) + np.cos(yy / 23.0)) * 1500 + 3000
    with rasterio.open(path, "w", **profile) as dst:
        for b in range(BANDS * DATES):
            noise = rng.normal(0, 80, (SIZE, SIZE))
            dst.write((field * (0.6 + 0.02 * b) + noise).astype(np.int16), b + 1)


def time_read(src, grid, window, resampling, repeat: int) -> float:
    indexes = list(range(1, src.count + 1))
    best = float("inf")
    for _ in range(repeat):
        tic = time.perf_counter()
        read_on_grid(
            src, window, grid, indexes, "bench", dtype="int16", pixel_major=True, resampling=resampling, nodata=-10000
        )
        best = min(best, time.perf_counter() - tic)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--folder", default="/tmp/bench-reproject")
    args = parser.parse_args()
    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "series.tif"
    write_raster(path)
    with storage.rasterio_env(), rasterio.open(path) as src:
        native = grid_of(src)
        win = Window(88, 88, WINDOW, WINDOW)
        laea = target_grid(native, CRS.from_epsg(3035), (10.0, 10.0), "bench")
        coarse = target_grid(native, native.crs, (20.0, 20.0), "bench")
        half = Window(44, 44, WINDOW // 2, WINDOW // 2)
        cases = [
            ("plain (same grid)", native, win, MASKS),
            ("warped EPSG:3035 10 m, cubic", laea, win, VALUES),
            ("warped EPSG:3035 10 m, nearest", laea, win, MASKS),
            ("warped 20 m same CRS, cubic (512 x 512 window)", coarse, half, VALUES),
        ]
        mb = WINDOW * WINDOW * BANDS * DATES * 2 / 1e6
        print(f"{BANDS * DATES} int16 bands, window {WINDOW} x {WINDOW} ({mb:.0f} MB), best of {args.repeat}")
        for name, grid, window, resampling in cases:
            seconds = time_read(src, grid, window, resampling, args.repeat)
            pixels = int(window.width) * int(window.height)
            print(f"| {name} | {seconds:.2f} s | {pixels / seconds / 1e6:.2f} Mpx/s |")


if __name__ == "__main__":
    main()
