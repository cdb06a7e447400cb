"""The generic ``dated_raster`` sensor: one raster per tile stacking bands date-major.

It serves any product the dedicated readers do not (e.g. the Slovenia NDVI example): bands,
dates, scale, nodata and an optional validity mask (one band per date, nonzero = invalid) are
declared in the configuration.
"""

from __future__ import annotations

import json

import numpy as np
import rasterio
from rasterio.windows import Window

from sitsflow import storage
from sitsflow.sensors.dates import parse_date
from sitsflow.errors import BadInputError
from sitsflow.log import get_logger
from sitsflow.sensors.base import Grid, Sensor, grid_of, read_on_grid

log = get_logger(__name__)


class DatedRasterSensor(Sensor):
    """``dated_raster``: the bands as declared, no spectral index (band meanings are unknown)."""

    path: str
    mask_path: str | None
    raw_indices: np.ndarray
    nodata: float | None
    scale: float

    @classmethod
    def build(cls, cfg, tile: str) -> DatedRasterSensor:
        opts = cfg.dated_raster
        path = opts.path.replace("{tile}", tile)
        mask_path = opts.mask_path.replace("{tile}", tile) if opts.mask_path else None
        if not storage.exists(path):
            raise BadInputError(f"dated_raster.path: the raster {path} of tile {tile!r} does not exist")
        with storage.rasterio_env(), rasterio.open(storage.rasterio_path(path)) as src:
            count = src.count
            descriptions = list(src.descriptions)
            block_rows = int(src.block_shapes[0][0]) if src.block_shapes else 1
        bands = list(opts.bands)
        nb_bands = len(bands)
        if count % nb_bands:
            raise BadInputError(
                f"dated_raster: {path} has {count} bands, not a multiple of the "
                f"{nb_bands} declared bands {bands} (bands are stacked date-major)"
            )
        nb_raw = count // nb_bands
        all_dates = _declared_dates(opts.dates, path, descriptions, nb_bands, nb_raw)
        start, end = opts.start_date, opts.end_date
        keep = [i for i, d in enumerate(all_dates) if (start is None or d >= start) and (end is None or d <= end)]
        if not keep:
            raise BadInputError(
                f"dated_raster: no acquisition of {path} lies between start_date {start} and end_date {end}"
            )
        sensor = cls(
            key=opts.name, prefix=opts.name, ext_name=opts.name, section="dated_raster",
            bands=bands, keep=bands, roles={}, indices=[], raw_dates=[all_dates[i] for i in keep],
            start_date=start, end_date=end, temporal_resolution=int(opts.temporal_resolution), tile=tile,
            settings={"path": path, "mask_path": mask_path, "scale": opts.scale, "nodata": opts.nodata},
        )
        sensor.path, sensor.mask_path = path, mask_path
        sensor.raw_indices = np.array(keep)
        sensor.nodata, sensor.scale = opts.nodata, float(opts.scale)
        sensor.block_rows = block_rows
        if mask_path is not None:
            if not storage.exists(mask_path):
                raise BadInputError(f"dated_raster.mask_path: the mask {mask_path} of tile {tile!r} does not exist")
            with storage.rasterio_env(), rasterio.open(storage.rasterio_path(path)) as src, \
                    rasterio.open(storage.rasterio_path(mask_path)) as msk:
                if (msk.width, msk.height) != (src.width, src.height) or msk.count != nb_raw:
                    raise BadInputError(
                        f"dated_raster.mask_path: {mask_path} is {msk.width}x{msk.height} with {msk.count} "
                        f"bands; expected {src.width}x{src.height} with one band per date ({nb_raw})"
                    )
        return sensor

    def native_grid(self) -> Grid:
        with storage.rasterio_env(), rasterio.open(storage.rasterio_path(self.path)) as src:
            return grid_of(src)

    def input_files(self) -> list[str]:
        return [self.path] + ([self.mask_path] if self.mask_path else [])

    def read(self, window: Window, grid: Grid) -> tuple[np.ndarray, np.ndarray]:
        nb_bands = len(self.bands)
        indexes = [int(i) * nb_bands + b + 1 for i in self.raw_indices for b in range(nb_bands)]
        with storage.rasterio_env():
            with rasterio.open(storage.rasterio_path(self.path)) as src:
                integer = np.issubdtype(np.dtype(src.dtypes[0]), np.integer)
                data, inside = read_on_grid(src, window, grid, indexes, self.path,
                                            dtype=src.dtypes[0] if integer else "float32")
            nb_raw = len(self.raw_indices)
            h, w = data.shape[1:]
            raw = data.reshape(nb_raw, nb_bands, h, w)
            # validity first, on the band-sequential read: (dates, h, w)
            valid = np.repeat(inside[None], nb_raw, axis=0)
            if self.nodata is not None:
                valid &= ~(raw == raw.dtype.type(self.nodata)).any(axis=1)
            if not integer:
                valid &= np.isfinite(raw).all(axis=1)
            if self.mask_path is not None:
                with rasterio.open(storage.rasterio_path(self.mask_path)) as msk:
                    mask, _ = read_on_grid(msk, window, grid, [int(i) + 1 for i in self.raw_indices],
                                           self.mask_path, fill=1)
                valid &= mask == 0
        clear = valid.any(axis=0)
        valid = np.ascontiguousarray(valid.transpose(1, 2, 0))  # (h, w, dates)
        scale = np.float32(self.scale)
        if clear.all():
            # one pass: to pixel-major (h, w, dates, bands) and to float32
            data = raw.transpose(2, 3, 0, 1).astype(np.float32, order="C")
            if self.scale != 1.0:
                data *= scale
            if not valid.all():
                data[~valid] = 0.0
            return data, valid
        # pixels without any clear date (nodata areas) are neither converted nor touched
        data = np.zeros((h, w, nb_raw, nb_bands), np.float32)
        r, c = np.nonzero(clear)
        if r.size:
            sub = raw[:, :, r, c].transpose(2, 0, 1).astype(np.float32)
            if self.scale != 1.0:
                sub *= scale
            sub[~valid[r, c]] = 0.0
            data[r, c] = sub
        return data, valid


def _declared_dates(spec, path: str, descriptions: list, nb_bands: int, nb_raw: int) -> list[int]:
    if isinstance(spec, str) and spec == "descriptions":
        texts = [descriptions[i * nb_bands] for i in range(nb_raw)]
        if any(not t for t in texts):
            raise BadInputError(
                f"dated_raster.dates: {path} has no date in its band descriptions; "
                "declare the dates in the configuration (a list or a .json/.txt file)"
            )
        where = f"band description of {path}"
    elif isinstance(spec, str):
        text = storage.read_text(spec)
        texts = json.loads(text) if spec.endswith(".json") else [t for t in text.split() if t.strip()]
        where = f"dated_raster.dates file {spec}"
    else:
        texts = list(spec)
        where = "dated_raster.dates"
    dates = [t if isinstance(t, int) else parse_date(t, where) for t in texts]
    if len(dates) != nb_raw:
        raise BadInputError(
            f"{where}: {len(dates)} dates declared but {path} holds {nb_raw} acquisitions "
            f"({nb_raw * nb_bands} bands / {nb_bands} bands per date)"
        )
    if any(b < a for a, b in zip(dates, dates[1:])):
        raise BadInputError(f"{where}: dates must be in chronological order")
    return dates
