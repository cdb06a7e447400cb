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
from sitsflow.errors import BadInputError
from sitsflow.log import get_logger
from sitsflow.sensors import direct
from sitsflow.sensors.base import MASKS, VALUES, Grid, ReadBuffers, Sensor, grid_of, new_array, read_on_grid
from sitsflow.sensors.dates import parse_date

log = get_logger(__name__)


class DatedRasterSensor(Sensor):
    """``dated_raster``: the bands as declared, no spectral index (band meanings are unknown)."""

    path: str
    mask_path: str | None
    raw_indices: np.ndarray
    nodata: float | None
    scale: float
    dtype: str
    all_dates: list[int]

    @classmethod
    def build(cls, cfg, tile: str) -> DatedRasterSensor:
        opts = cfg.dated_raster
        path = opts.path.replace("{tile}", tile)
        mask_path = opts.mask_path.replace("{tile}", tile) if opts.mask_path else None
        if not storage.exists(path):
            raise BadInputError(f"dated_raster.path: the raster {path} of tile {tile!r} does not exist")

        def header():
            with storage.rasterio_env(), rasterio.open(storage.rasterio_path(path)) as src:
                blocks = tuple(int(n) for n in src.block_shapes[0]) if src.block_shapes else (1, 1)
                return src.count, src.dtypes[0], list(src.descriptions), blocks

        # GDAL reads the band descriptions (the TIFF's GDAL_METADATA tag) while opening, and a
        # connection reset during that read loses them with a mere warning: on object storage,
        # descriptions missing are read again (storage attempts, backoff, cleared cache) before they count
        count, dtype, descriptions, (block_rows, block_cols) = storage.raster_call(
            "open", path, header, culprit="dated_raster.path", incomplete=lambda found: not all(found[2])
        )
        bands = list(opts.bands)
        nb_bands = len(bands)
        if count % nb_bands:
            raise BadInputError(
                f"dated_raster.bands: {path} has {count} bands, not a multiple of the "
                f"{nb_bands} declared bands {bands} (bands are stacked date-major)"
            )
        nb_raw = count // nb_bands
        mask_count = None
        if mask_path is not None:
            if not storage.exists(mask_path):
                raise BadInputError(f"dated_raster.mask_path: the mask {mask_path} of tile {tile!r} does not exist")

            def mask_header():
                with (
                    storage.rasterio_env(),
                    rasterio.open(storage.rasterio_path(path)) as src,
                    rasterio.open(storage.rasterio_path(mask_path)) as msk,
                ):
                    return (msk.width, msk.height), (src.width, src.height), msk.count

            mask_size, size, mask_count = storage.raster_call(
                "open", [path, mask_path], mask_header, culprit="dated_raster.mask_path"
            )
            if mask_size != size:
                raise BadInputError(
                    f"dated_raster.mask_path: {mask_path} is {mask_size[0]}x{mask_size[1]}; expected "
                    f"{size[0]}x{size[1]} like {path}"
                )
        _check_band_count(bands, count, path, mask_count, mask_path)
        if mask_count is not None and mask_count != nb_raw:
            raise BadInputError(
                f"dated_raster.mask_path: {mask_path} has {mask_count} bands; expected one band per "
                f"date of {path} ({nb_raw})"
            )
        all_dates = _declared_dates(opts.dates, path, descriptions, nb_bands, nb_raw)
        start, end = opts.start_date, opts.end_date
        keep = [i for i, d in enumerate(all_dates) if (start is None or d >= start) and (end is None or d <= end)]
        if not keep:
            raise BadInputError(
                f"dated_raster: no acquisition of {path} lies between start_date {start} and end_date {end}"
            )
        sensor = cls(
            key=opts.name,
            prefix=opts.name,
            ext_name=opts.name,
            section="dated_raster",
            bands=bands,
            keep=bands,
            roles={},
            indices=[],
            raw_dates=[all_dates[i] for i in keep],
            start_date=start,
            end_date=end,
            temporal_resolution=int(opts.temporal_resolution),
            tile=tile,
            settings={"path": path, "mask_path": mask_path, "scale": opts.scale, "nodata": opts.nodata},
        )
        sensor.path, sensor.mask_path = path, mask_path
        sensor.raw_indices = np.array(keep)
        sensor.nodata, sensor.scale = opts.nodata, float(opts.scale)
        sensor.block_rows, sensor.block_cols = block_rows, block_cols
        sensor.sample_bytes, sensor.block_samples = np.dtype(dtype).itemsize, count
        sensor.dtype = dtype
        sensor.all_dates = all_dates
        return sensor

    def native_grid(self) -> Grid:
        def grid():
            with storage.rasterio_env(), rasterio.open(storage.rasterio_path(self.path)) as src:
                return grid_of(src)

        return storage.raster_call("open", self.path, grid, culprit="dated_raster.path")

    def input_files(self) -> list[str]:
        return [self.path] + ([self.mask_path] if self.mask_path else [])

    def _culprit(self, uri: str, band: int) -> str:
        """The date and band of band number ``band`` (1-based) of the raster or of its mask."""
        if uri == self.mask_path:
            return f"mask of date {self.all_dates[band - 1]}"
        nb_bands = len(self.bands)
        return f"date {self.all_dates[(band - 1) // nb_bands]}, band {self.bands[(band - 1) % nb_bands]}"

    def read(self, window: Window, grid: Grid, buffers: ReadBuffers | None = None) -> tuple[np.ndarray, np.ndarray]:
        return storage.raster_call(
            "read", self.input_files(), lambda: self._read(window, grid, buffers), locate=self._culprit
        )

    def native_conversion(self, grid: Grid) -> tuple[np.ndarray, float] | None:
        return np.zeros(len(self.raw_indices), np.float32), self.scale

    def read_native(
        self, window: Window, grid: Grid, buffers: ReadBuffers | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        return storage.raster_call(
            "read", self.input_files(), lambda: self._read(window, grid, buffers, True), locate=self._culprit
        )

    def _read(
        self, window: Window, grid: Grid, buffers: ReadBuffers | None = None, native: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        nb_bands, nb_raw = len(self.bands), len(self.raw_indices)
        h, w = int(window.height), int(window.width)
        indexes = [int(i) * nb_bands + b + 1 for i in self.raw_indices for b in range(nb_bands)]
        key = f"dated_raster:{self.path}"
        with storage.rasterio_env():
            with rasterio.open(storage.rasterio_path(self.path)) as src:
                integer = np.issubdtype(np.dtype(src.dtypes[0]), np.integer)
                dtype = src.dtypes[0] if integer else "float32"
                # pixel-major: each pixel's series side by side, as the networks want them
                raw, inside = read_on_grid(
                    src,
                    window,
                    grid,
                    indexes,
                    self.path,
                    dtype=dtype,
                    pixel_major=True,
                    out=new_array(buffers, key + ":raw", (h, w, len(indexes)), dtype),
                    resampling=VALUES,
                    nodata=self.nodata,
                )
            raw = raw.reshape(h, w, nb_raw, nb_bands)
            valid = new_array(buffers, key + ":valid", (h, w, nb_raw), bool)
            valid[...] = inside[:, :, None]
            flags = None
            if self.nodata is not None:
                flags = is_nodata = new_array(buffers, key + ":flags", raw.shape, bool)
                nodata = raw.dtype.type(self.nodata)
                # (all nodata, any nodata) per slab of rows, the slabs on every core
                slabs = direct.by_rows(h, lambda s: _all_any(np.equal(raw[s], nodata, out=is_nodata[s])))
                if all(a for a, _ in slabs):  # nodata everywhere (outside the swath)
                    valid[...] = False
                    if native:
                        return raw, valid
                    return new_array(buffers, key + ":data", (h, w, nb_raw, nb_bands), np.float32), valid
                if any(a for _, a in slabs):  # an acquisition is invalid where any of its bands is nodata
                    valid &= ~_any_band(flags)
            if not integer:
                flags = finite = flags if flags is not None else new_array(buffers, key + ":flags", raw.shape, bool)
                if not all(a for a, _ in direct.by_rows(h, lambda s: _all_any(np.isfinite(raw[s], out=finite[s])))):
                    valid &= ~_any_band(~flags)
            if self.mask_path is not None:
                with rasterio.open(storage.rasterio_path(self.mask_path)) as msk:
                    mask, _ = read_on_grid(
                        msk,
                        window,
                        grid,
                        [int(i) + 1 for i in self.raw_indices],
                        self.mask_path,
                        fill=1,
                        pixel_major=True,
                        resampling=MASKS,
                    )
                valid &= mask == 0
        if native:  # integers, or floats with NaN where invalid (masked where they are converted)
            return raw, valid
        data = new_array(buffers, key + ":data", (h, w, nb_raw, nb_bands), np.float32)
        # to float32 and scaled, in one pass over the rows that hold a pixel with a clear date
        # (the rest, nodata areas, is neither converted nor touched)
        busy = np.nonzero(valid.any(axis=(1, 2)))[0]
        if not busy.size:
            return data, valid
        a, b = int(busy[0]), int(busy[-1]) + 1
        scale = np.float32(self.scale)

        def convert(s: slice) -> None:
            rows = slice(a + s.start, a + s.stop)
            if self.scale != 1.0:
                np.multiply(raw[rows], scale, out=data[rows])
            else:
                np.copyto(data[rows], raw[rows], casting="unsafe")

        direct.by_rows(b - a, convert)
        if not valid[a:b].all():
            data[a:b][~valid[a:b]] = 0.0
        return data, valid

    def surely_empty(self, window: Window, grid: Grid) -> bool:
        return storage.raster_call("read", self.path, lambda: self._surely_empty(window, grid), locate=self._culprit)

    def _surely_empty(self, window: Window, grid: Grid) -> bool:
        """The first band of every date alone, one source block after the other: where it is
        nodata (or NaN) on every date, no acquisition is valid. From a pixel-interleaved raster
        this costs the blocks' decoding (almost nothing for nodata blocks) but not GDAL's copy of
        every band; it stops at the first block with a valid value, so that a window with data
        costs one block's decoding."""
        if self.nodata is None and np.issubdtype(np.dtype(self.dtype), np.integer):
            return False
        nb_bands = len(self.bands)
        indexes = [int(i) * nb_bands + 1 for i in self.raw_indices]
        c0, c1 = int(window.col_off), int(window.col_off + window.width)
        step = max(1, self.block_cols)
        cuts = [c0, *range((c0 // step + 1) * step, c1, step), c1]
        with storage.rasterio_env(), rasterio.open(storage.rasterio_path(self.path)) as src:
            integer = np.issubdtype(np.dtype(src.dtypes[0]), np.integer)
            for a, b in zip(cuts[:-1], cuts[1:]):
                piece = Window(a, window.row_off, b - a, window.height)
                first, inside = read_on_grid(
                    src,
                    piece,
                    grid,
                    indexes,
                    self.path,
                    dtype=src.dtypes[0] if integer else "float32",
                    pixel_major=True,
                    resampling=VALUES,
                    nodata=self.nodata,
                )
                invalid = np.zeros(first.shape, bool) if self.nodata is None else first == first.dtype.type(self.nodata)
                if not integer:
                    invalid |= ~np.isfinite(first)
                if not (invalid.all(axis=-1) | ~inside).all():
                    return False
        return True


def _all_any(flags: np.ndarray) -> tuple[bool, bool]:
    """(every flag set, any flag set)."""
    return bool(flags.all()), bool(flags.any())


def _any_band(flags: np.ndarray) -> np.ndarray:
    """(h, w, dates, bands) bool -> (h, w, dates): any band set (an OR per band: much faster
    than ``any(axis=-1)`` over a short last axis)."""
    out = flags[..., 0].copy()
    for b in range(1, flags.shape[-1]):
        out |= flags[..., b]
    return out


def _check_band_count(bands: list[str], count: int, path: str, mask_count: int | None, mask_path: str | None) -> None:
    """Blame ``bands`` when the mask (one band per date) implies another number of bands per date
    than declared: a wrong band list otherwise shows up as a mask error."""
    if mask_count and count % mask_count == 0 and count // mask_count != len(bands):
        raise BadInputError(
            f"dated_raster.bands: {len(bands)} band(s) declared ({bands}), but {path} has {count} bands for "
            f"the {mask_count} dates of the mask {mask_path}: {count // mask_count} band(s) per date; declare "
            f"{count // mask_count} band name(s)"
        )


def _declared_dates(spec, path: str, descriptions: list, nb_bands: int, nb_raw: int) -> list[int]:
    if isinstance(spec, str) and spec == "descriptions":
        texts = [descriptions[i * nb_bands] for i in range(nb_raw)]
        if any(not t for t in texts):
            raise BadInputError(
                f"dated_raster.dates: {path} has no date in its band descriptions; "
                "declare the dates in the configuration (a list or a .json/.txt file)"
            )
        where = f"band description of {path}"
        per_date = [descriptions[i * nb_bands : (i + 1) * nb_bands] for i in range(nb_raw)]
        if nb_bands > 1 and all(len(set(group)) == nb_bands and all(group) for group in per_date):
            raise BadInputError(
                f"dated_raster.bands: {nb_bands} bands declared, but each band of {path} describes another "
                f"date ({descriptions[0]!r}, {descriptions[1]!r}, ...): one band per date; declare one band name"
            )
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
