"""What every sensor reader provides, and windowed reads of a raster onto the tile grid.

A sensor reader knows, for one tile, its acquisitions (dates, in chronological order; same-day
acquisitions are kept and merged later by the feature pipeline), its bands, and how to read one
window of the tile grid: raw values (scaled reflectances) and a validity flag per acquisition.

Rasters coarser than the tile grid (Sentinel-2's 20 m bands on the 10 m grid, Landsat 8's 30 m
pixels on a Sentinel-2 grid) are resampled by **nearest neighbour**: a tile pixel takes the value
of the coarse pixel that contains its centre. Nearest neighbour is exact and independent of how
the tile is cut into windows (a windowed bilinear read depends on the window's edges), so
sampling and inference compute bit-identical features for a pixel whatever their windows.

On a **target grid** (``chain.proj`` / ``chain.spatial_resolution``, :attr:`Grid.resampled`), a
raster that is not on it by an integer factor in the same CRS (another projection, a finer pixel,
a pixel size that does not divide) is read through GDAL's warper (:func:`warped_read`): a
``WarpedVRT`` of the whole tile grid, of which only the window is warped (only the source pixels
under it are read, /vsis3/ included). Reflectances are resampled by **cubic convolution** (a 4 x 4
kernel, as iota2's OTB ``Superimpose`` default, ``bco`` of radius 2), masks and any integer class
data by **nearest neighbour** (a mask value is never interpolated). The VRT warps fixed blocks of
the tile grid and is read block by block, so a pixel's value does not depend on the window it is read in either.
"""

from __future__ import annotations

import functools
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.windows import Window

from sitsflow import storage
from sitsflow.errors import BadInputError
from sitsflow.process import usable_cpus
from sitsflow.sensors import direct

#: resampling of the values read by :func:`warped_read` (reflectances, dated-raster values)
VALUES = "cubic"
#: resampling of masks and other integer class data (their values are never interpolated)
MASKS = "nearest"


class NativeUnavailable(Exception):
    """A sensor cannot hand its files' values as they are after all (:meth:`Sensor.read_native`: a
    file of another data type than the one its values were planned in): read them converted."""


class ReadBuffers:
    """Arrays reused from one read to the next.

    Reading a strip of a chunk produces arrays of hundreds of MB; allocating them afresh for every
    strip costs a page fault per 4 KiB (the allocator returns such blocks to the system when they
    are freed), about as much as decoding the data. A reader given a ``ReadBuffers`` takes its
    arrays from it instead: :meth:`get` hands out the same memory for the same key.

    Whatever a read returns may therefore live in these buffers: it stays valid until the next
    read with the same ``ReadBuffers``. Its owner guarantees that (inference alternates two of
    them: one being filled by the reading thread while the network consumes the other).
    """

    def __init__(self) -> None:
        self._store: dict[str, np.ndarray] = {}

    def get(self, key: str, shape: tuple[int, ...], dtype) -> np.ndarray:
        """An uninitialised array of ``shape`` and ``dtype``, backed by the memory of ``key``."""
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        store = self._store.get(key)
        if store is None or store.nbytes < nbytes:
            store = self._store[key] = np.empty(max(nbytes, 1), np.uint8)
        return store[:nbytes].view(dtype).reshape(shape)

    @property
    def nbytes(self) -> int:
        """Memory held."""
        return sum(a.nbytes for a in self._store.values())


#: bounds of the number of threads reading the acquisitions of remote single-band files (twice
#: the usable CPUs): many files' requests in flight at once hide their latency
ACQUISITION_THREADS_MIN, ACQUISITION_THREADS_MAX = 8, 32


def acquisition_threads() -> int:
    """Threads of :func:`per_acquisition`: twice the usable CPUs, within the bounds above."""
    return min(ACQUISITION_THREADS_MAX, max(ACQUISITION_THREADS_MIN, 2 * usable_cpus()))


class _Lane(threading.local):
    """Whether this thread is one of the acquisition threads (which must never wait for the others)."""

    on = False


_LANE = _Lane()
_LANES: list[ThreadPoolExecutor] = []
_LANES_LOCK = threading.Lock()


def _lane_starts() -> None:
    _LANE.on = True


def _forget_lanes_after_fork() -> None:
    """A forked child has none of its parent's threads: it starts its own."""
    global _LANES_LOCK
    _LANES.clear()
    _LANES_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_forget_lanes_after_fork)


def _lanes() -> list[ThreadPoolExecutor]:
    with _LANES_LOCK:
        if not _LANES:
            _LANES.extend(
                ThreadPoolExecutor(1, thread_name_prefix=f"sitsflow-acq{k}", initializer=_lane_starts)
                for k in range(acquisition_threads())
            )
        return _LANES


def per_acquisition(count: int, fn: Callable[[int], None], spread: bool) -> None:
    """``fn(t)`` for every acquisition ``t`` of a sensor of single-band files.

    With ``spread`` (files on object storage or HTTP), on the acquisition threads, acquisition
    ``t`` always on the same one (``t`` modulo their number): a file is then opened, fetched and
    decoded into GDAL's block cache by one thread only, whichever reading thread asks for the part
    (a dataset a thread keeps open is its own: the same file read by another thread fetches and
    decodes its blocks again), and the requests of many files are in flight at once (one
    acquisition too: its files stay on its thread). Else in this thread, in order. Every call
    ends before the first failure is raised (none still writes into the caller's arrays then);
    ``fn`` enters :func:`~sitsflow.storage.rasterio_env` itself (GDAL's settings are per thread).
    """
    if not spread or _LANE.on:
        for t in range(count):
            fn(t)
        return
    lanes = _lanes()
    futures = [lanes[t % len(lanes)].submit(fn, t) for t in range(count)]
    wait(futures)
    for f in futures:
        f.result()


def new_array(buffers: ReadBuffers | None, key: str, shape: tuple[int, ...], dtype) -> np.ndarray:
    """``buffers.get(key, shape, dtype)``, or a fresh array when there are no buffers."""
    return np.empty(shape, dtype) if buffers is None else buffers.get(key, shape, dtype)


@dataclass(frozen=True)
class Grid:
    """The pixel grid of a tile: size, georeferencing and CRS.

    ``resampled``: the grid is a target grid (``chain.proj`` / ``chain.spatial_resolution``):
    rasters not on it by an integer factor are warped onto it (:func:`warped_read`). Otherwise such
    rasters are refused (bad input).
    """

    width: int
    height: int
    transform: rasterio.Affine
    crs: rasterio.crs.CRS
    resampled: bool = False

    def profile(self) -> dict:
        """A rasterio profile fragment for rasters on this grid."""
        return {"width": self.width, "height": self.height, "transform": self.transform, "crs": self.crs}

    @property
    def resolution(self) -> float:
        return float(abs(self.transform.a))


@dataclass
class Sensor(ABC):
    """One sensor of one tile.

    Attributes:
        key: statistics key (``s2_theia``, ``s2_l3a``, ``s2_s2c``, ``l8`` or dated_raster.name).
        prefix: the sensor part of feature names, lower case (``sentinel2``, ``landsat8`` ...).
        ext_name: the sensor name of external-feature accessors and labels (``Sentinel2`` ...).
        section: the configuration section describing it.
        bands: every band read, in stacking order (names as in the configuration, e.g. ``B8A``).
        keep: the bands fed to the network (a subset of ``bands``, same order).
        roles: band of each index role (``red``, ``nir``, ``swir``); {} when indices do not apply.
        indices: spectral indices computed per date (lower case), after the bands.
        raw_dates: YYYYMMDD of the acquisitions used (within start/end dates), chronological.
        start_date, end_date, temporal_resolution: the regular date grid settings.
    """

    #: a static sensor (``userFeat``) has no date: its one "acquisition" is repeated on every date
    #: of the date axis and never counts as a clear acquisition
    static: ClassVar[bool] = False
    #: one single-band file per band and acquisition (products, STAC items): reads stay inside
    #: one source block at a time (see :meth:`~sitsflow.features.reader.WindowReader.read_windows`)
    band_files: ClassVar[bool] = False

    key: str
    prefix: str
    ext_name: str
    section: str
    bands: list[str]
    keep: list[str]
    roles: dict[str, str]
    indices: list[str]
    raw_dates: list[int]
    start_date: int | None
    end_date: int | None
    temporal_resolution: int
    tile: str
    settings: dict = field(default_factory=dict)
    #: rows of the source rasters' internal blocks: reads are cut in multiples of it, so every
    #: compressed block is decoded once
    block_rows: int = 1
    #: columns of those blocks
    block_cols: int = 1
    #: bytes of one sample of those blocks (the data type of the file that gave the block shape)
    sample_bytes: int = 2
    #: samples of one pixel in a block: 1 for single-band files, every band of a pixel-interleaved stack
    block_samples: int = 1

    @abstractmethod
    def native_grid(self) -> Grid:
        """The sensor's finest grid for this tile (the tile grid when it is the finest sensor)."""

    @abstractmethod
    def read(self, window: Window, grid: Grid, buffers: ReadBuffers | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Read one window of the tile grid.

        Args:
            window: the window, in tile pixel coordinates.
            grid: the tile grid.
            buffers: reusable arrays to read into (see :class:`ReadBuffers`); fresh arrays when None.

        Returns:
            values: float32 (h, w, nb_raw, nb_bands), scaled (reflectances), 0 where an observation
                is invalid; the values of a pixel without any valid observation may be anything
                (they are never used).
            valid: bool (h, w, nb_raw): False under clouds, saturation, edges, nodata, off-footprint.
        """

    def native_conversion(self, grid: Grid) -> tuple[np.ndarray, float] | None:
        """How :meth:`read_native`'s values become :meth:`read`'s on ``grid``: (offset of each raw
        acquisition (nb_raw,), scale), ``(value + offset) * scale`` in float32; None when this
        sensor reads no native values there (its reads are not such a conversion of the files'
        values)."""
        return None

    def read_native(
        self, window: Window, grid: Grid, buffers: ReadBuffers | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`read`, the files' values as they are (their data type), unconverted; the values
        of invalid observations may be anything. Only where :meth:`native_conversion` is not None."""
        raise TypeError(f"{self.section} reads no native values")

    @functools.cached_property
    def remote(self) -> bool:
        """Some of its files are on object storage or HTTP."""
        return any(storage.is_remote(f) for f in self.input_files())

    def surely_empty(self, window: Window, grid: Grid) -> bool:
        """Whether a cheap look shows that ``window`` has no valid observation at all (False when
        unsure, or when the look would cost about a read)."""
        return False

    @abstractmethod
    def input_files(self) -> list[str]:
        """Every file read (for fingerprints)."""

    def description(self) -> dict:
        """What identifies this sensor's features."""
        return {
            "key": self.key,
            "prefix": self.prefix,
            "bands": list(self.bands),
            "keep": list(self.keep),
            "indices": list(self.indices),
            "raw_dates": list(self.raw_dates),
            "start_date": self.start_date,
            "end_date": self.end_date,
            "temporal_resolution": self.temporal_resolution,
            "settings": self.settings,
        }


def grid_of(src) -> Grid:
    """The grid of an open rasterio dataset."""
    return Grid(src.width, src.height, src.transform, src.crs)


def _placement(src, grid: Grid, what: str) -> tuple[int, int, int, int] | None:
    """How ``src`` lies on ``grid``: (factor_x, factor_y, col offset, row offset) in grid pixels;
    None when it is not on the grid by an integer factor and ``grid`` is a target grid (the
    raster is then warped onto it)."""
    t, g = src.transform, grid.transform
    if src.crs != grid.crs:
        if grid.resampled:
            return None
        raise BadInputError(
            f"{what} is in {src.crs}, the tile grid in {grid.crs}: every raster of a tile must share one CRS "
            "(or set chain.proj: every input is then reprojected onto it)"
        )
    if t.b or t.d or g.b or g.d:
        if grid.resampled:
            return None
        raise BadInputError(f"{what}: rotated rasters are not supported")
    fx, fy = t.a / g.a, t.e / g.e
    rx, ry = round(fx), round(fy)
    if rx < 1 or ry < 1 or abs(fx - rx) > 1e-6 or abs(fy - ry) > 1e-6:
        if grid.resampled:
            return None
        raise BadInputError(
            f"{what} has {abs(t.a)} x {abs(t.e)} pixels; the tile grid's are {abs(g.a)} x {abs(g.e)}: "
            "a raster's pixel size must be an integer multiple of the tile grid's "
            "(or set chain.spatial_resolution: every input is then resampled onto it)"
        )
    ox, oy = (t.c - g.c) / g.a, (t.f - g.f) / g.e
    if abs(ox - round(ox)) > 1e-3 or abs(oy - round(oy)) > 1e-3:
        if grid.resampled:
            return None
        raise BadInputError(f"{what} is not aligned on the tile grid (offset {ox:.3f}, {oy:.3f} pixels)")
    return rx, ry, round(ox), round(oy)


def read_on_grid(
    src,
    window: Window,
    grid: Grid,
    indexes: list[int],
    what: str,
    fill: float = np.nan,
    dtype: str = "float32",
    *,
    pixel_major: bool = False,
    out: np.ndarray | None = None,
    resampling: str = MASKS,
    nodata: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Read bands of ``src`` for a window of ``grid`` (nearest neighbour when ``src`` is coarser by
    an integer factor; warped with ``resampling`` when ``grid`` is a target grid ``src`` is not on,
    see :func:`warped_read`).

    Only the source pixels under the window are read (a windowed read, /vsis3/ included).

    Args:
        pixel_major: return (h, w, len(indexes)) instead of (len(indexes), h, w). GDAL then
            writes each pixel's bands side by side: from a pixel-interleaved source (a COG's
            default) this is a plain copy, where the band-sequential layout costs a transposition
            in GDAL and another one back to the networks' pixel-major layout.
        out: an array of the returned shape and ``dtype`` to read into (reused buffers).
        resampling: ``"cubic"`` (:data:`VALUES`) or ``"nearest"`` (:data:`MASKS`, the default):
            how a warped read resamples; unused when ``src`` is on the grid by an integer factor.
        nodata: the value of ``src`` that marks missing data (a warped read leaves it out of the
            interpolation and writes it where no valid source pixel contributes); None: none but
            the one the raster's header may declare.

    Returns:
        data: ``dtype`` (float32 by default), ``fill`` off the raster's footprint (0 for an
            integer ``dtype``, where ``inside`` tells).
        inside: bool (h, w), False off the raster's footprint.
    """
    placement = _placement(src, grid, what)
    h, w = int(window.height), int(window.width)
    shape = (h, w, len(indexes)) if pixel_major else (len(indexes), h, w)
    if out is None:
        out = np.empty(shape, dtype)
    elif out.shape != shape or out.dtype != np.dtype(dtype):
        raise ValueError(f"out is {out.shape} {out.dtype}, expected {shape} {np.dtype(dtype)}")
    bands = out.transpose(2, 0, 1) if pixel_major else out  # (n, h, w) view: rasterio honours its strides
    if placement is None:
        inside = warped_read(src, window, grid, indexes, bands, resampling=resampling, nodata=nodata)
        if not inside.all():
            bands[:, ~inside] = fill if np.issubdtype(np.dtype(dtype), np.floating) else 0
        return out, inside
    fx, fy, ox, oy = placement
    rows = np.arange(int(window.row_off), int(window.row_off) + h) - oy
    cols = np.arange(int(window.col_off), int(window.col_off) + w) - ox
    src_rows = np.floor_divide(rows, fy)
    src_cols = np.floor_divide(cols, fx)
    in_r = (src_rows >= 0) & (src_rows < src.height)
    in_c = (src_cols >= 0) & (src_cols < src.width)
    inside = in_r[:, None] & in_c[None, :]
    rr = np.nonzero(in_r)[0]
    cc = np.nonzero(in_c)[0]
    if fx == 1 and fy == 1 and rr.size == h and cc.size == w:
        # same grid, window wholly inside: read straight into the answer (a local tiled GeoTIFF's
        # tiles decoded directly into the pixel-major array: half GDAL's cost, see sensors.direct)
        src_window = Window(int(src_cols[0]), int(src_rows[0]), w, h)
        if not (pixel_major and direct.read_pixel_major(src, src_window, indexes, out)):
            src.read(indexes, window=src_window, out=bands)
        return out, inside
    bands[...] = fill if np.issubdtype(np.dtype(dtype), np.floating) else 0
    if not rr.size or not cc.size:
        return out, inside
    r0, r1 = int(src_rows[rr[0]]), int(src_rows[rr[-1]]) + 1
    c0, c1 = int(src_cols[cc[0]]), int(src_cols[cc[-1]]) + 1
    data = src.read(indexes, window=Window(c0, r0, c1 - c0, r1 - r0), out_dtype=dtype)
    # nearest neighbour onto the grid: one take per axis (much cheaper than a 2-D fancy index)
    data = np.take(data, src_rows[rr] - r0, axis=1)
    data = np.take(data, src_cols[cc] - c0, axis=2)
    bands[:, rr[0] : rr[-1] + 1, cc[0] : cc[-1] + 1] = data
    return out, inside


def warped_read(
    src, window: Window, grid: Grid, indexes: list[int], bands: np.ndarray, *, resampling: str, nodata: float | None
) -> np.ndarray:
    """Warp bands ``indexes`` of ``src`` onto ``window`` of ``grid``, into ``bands`` (n, h, w).

    A ``WarpedVRT`` spans the whole tile grid and only the blocks under the window are warped
    (GDAL reads the source pixels they need, and the kernel's margin). Its blocks are fixed by the
    grid, so a pixel's value does not depend on the window it is read in: sampling and inference
    read the same features.

    The warp goes through a plain VRT of the bands ``indexes`` alone: only they are warped (a
    warped VRT warps every band of a block), and none is taken for an alpha band (GDAL takes the
    fourth band of a 4-band byte GeoTIFF, e.g. four dates of a mask, for one) nor gets the
    header's nodata.

    With ``nodata``, the value is left out of the interpolation band by band (GDAL's
    ``UNIFIED_SRC_NODATA=NO``: one date of a dated raster may be nodata where the next is not)
    and fills the pixels no valid source pixel reaches, off the footprint included. Without it, an
    alpha band tells those pixels; a nodata value in the raster's header is ignored, as by the
    plain reads (a mask's header may call a valid value nodata).

    Returns:
        inside: bool (h, w), False where no band has a value (off the footprint; with ``nodata``,
        also where every band is nodata, which the readers would invalidate anyway).
    """
    from rasterio.io import MemoryFile
    from rasterio.vrt import WarpedVRT

    options: dict = {
        "crs": grid.crs,
        "transform": grid.transform,
        "width": grid.width,
        "height": grid.height,
        "resampling": Resampling[resampling],
    }
    if nodata is not None:
        options.update(src_nodata=nodata, nodata=nodata)
    else:
        # NaN: no source value is nodata (a header's nodata is ignored, as by the plain reads,
        # and NaNs of a float raster stay out of the interpolation); the alpha band is then the
        # footprint itself
        options.update(src_nodata=float("nan"), add_alpha=True)
    options["UNIFIED_SRC_NODATA"] = "NO"
    with (
        MemoryFile(_bands_vrt(src, indexes).encode(), ext=".vrt") as memory,
        memory.open() as picked,
        WarpedVRT(picked, **options) as vrt,
    ):
        # block by block: GDAL warps a read wider than a block in other chunks, and with a nodata
        # value its result then differs (up to 20 % of the range, GDAL 3.10); within one block of
        # the VRT a pixel's value is the same whatever the window
        alpha = np.empty(bands.shape[1:], bool)
        for sub, rows, cols in _block_windows(window, vrt.block_shapes[0]):
            bands[:, rows, cols] = vrt.read(list(range(1, len(indexes) + 1)), window=sub)
            if nodata is None:
                alpha[rows, cols] = vrt.read(vrt.count, window=sub) > 0
        if nodata is None:
            return alpha
    if np.isnan(nodata):
        return ~np.isnan(bands).all(axis=0)
    return (bands != bands.dtype.type(nodata)).any(axis=0)


def _block_windows(window: Window, block: tuple[int, int]) -> Iterator[tuple[Window, slice, slice]]:
    """The parts of ``window`` that each lie in one ``block`` (rows, cols) of the grid, with
    their rows and columns in the window."""
    r0, c0, h, w = int(window.row_off), int(window.col_off), int(window.height), int(window.width)
    bh, bw = block
    for top in range(r0 - r0 % bh, r0 + h, bh):
        ra, rb = max(top, r0), min(top + bh, r0 + h)
        for left in range(c0 - c0 % bw, c0 + w, bw):
            ca, cb = max(left, c0), min(left + bw, c0 + w)
            yield Window(ca, ra, cb - ca, rb - ra), slice(ra - r0, rb - r0), slice(ca - c0, cb - c0)


_GDAL_TYPES = {
    "uint8": "Byte",
    "int8": "Int8",
    "uint16": "UInt16",
    "int16": "Int16",
    "uint32": "UInt32",
    "int32": "Int32",
    "uint64": "UInt64",
    "int64": "Int64",
    "float32": "Float32",
    "float64": "Float64",
}


def _bands_vrt(src, indexes: list[int]) -> str:
    """A VRT (XML) of bands ``indexes`` of ``src``, georeferenced as ``src``, colour
    interpretation undefined, no nodata."""
    from xml.sax.saxutils import escape

    path = escape(src.name)
    bands = "".join(
        f'<VRTRasterBand dataType="{_GDAL_TYPES[src.dtypes[i - 1]]}" band="{k}"><ColorInterp>Undefined</ColorInterp>'
        f'<SimpleSource><SourceFilename relativeToVRT="0">{path}</SourceFilename><SourceBand>{i}</SourceBand>'
        "</SimpleSource></VRTRasterBand>"
        for k, i in enumerate(indexes, 1)
    )
    geo = ", ".join(repr(float(v)) for v in src.transform.to_gdal())
    return (
        f'<VRTDataset rasterXSize="{src.width}" rasterYSize="{src.height}"><SRS>{escape(src.crs.to_wkt())}</SRS>'
        f"<GeoTransform>{geo}</GeoTransform>{bands}</VRTDataset>"
    )
