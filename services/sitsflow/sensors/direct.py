"""Direct reads of local tiled GeoTIFFs: tiles decoded straight into a pixel-major array.

GDAL's read of a window of a pixel-interleaved GeoTIFF into a pixel-major array (each pixel's
bands side by side, as the networks want them) decodes each tile and then copies it band by band
into the array: for the 360 ZSTD bands of the inference benchmark's chunk (36 dates x 10 bands,
256-px tiles) that costs 3.9-4.9 core-s per 1 M px in the two-tile parts the stage reads, twice
the decoding itself (docs/benchmarks.md). Here tifffile locates each tile of the window and
decodes it (its codecs are imagecodecs': ZSTD, DEFLATE, LZW ..., predictors included), and the
tile's rows land in the array with one copy; the tiles of one read are decoded in parallel, on as
many threads as GDAL would use (``SITSFLOW_GDAL_THREADS``, :func:`sitsflow.storage.decode_threads`).
ZSTD tiles are decompressed by python-zstandard and LZMA tiles by Python's lzma, one frame (one
stream) per tile as libtiff decodes them (imagecodecs reads on across frames and streams, where
GDAL's read fails), ZSTD tiles from a buffer each thread reuses, and then unpredicted as tifffile
does (3-5 % faster reads of the inference benchmark's chunk than tifffile's decoding,
docs/benchmarks.md). One known difference, GDAL's: its multi-threaded read of several LZMA tiles
with a predictor (files GDAL does not write: it drops LZMA's predictor) leaves the predictor undone
(GDAL 3.10.3); the direct reader undoes it, as GDAL's read on one thread does.

It reads exactly what GDAL reads, and only where it can: a **local** file, **tiled**, one image
(``pages[0]``, GDAL's full-resolution dataset), pixel-interleaved (or one band), a lossless
compression of :data:`CODECS`, a predictor where libtiff applies it (:data:`PREDICTED`), GDAL's
data type and size, opened read-only. A missing (sparse: no bytes) tile reads as GDAL reads it
(GDAL's own read of one of its pixels gives the value: the nodata value, else 0).
Everything else (object storage, HTTP, strips, band-interleaved files, JPEG/WEBP/LERC, ...) and any
failure or doubt of its own (a truncated or corrupt tile, one that does not decode to a whole tile,
one at offset 0) goes back to GDAL, whose read then succeeds or fails with GDAL's own error, which
:func:`sitsflow.storage.raster_call` classifies: this reader never decides an error.
"""

from __future__ import annotations

import functools
import lzma
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import numpy as np
import zstandard
from rasterio.windows import Window

from sitsflow import storage
from sitsflow.errors import ConfigError
from sitsflow.log import get_logger
from sitsflow.process import usable_memory

log = get_logger(__name__)

#: TIFF's codes of ZSTD and LZMA (decoded here one frame or stream a tile, as libtiff does)
ZSTD, LZMA = 50000, 34925
#: TIFF compressions decoded here (lossless; what GDAL writes for COGs of integers and floats):
#: none, LZW, Adobe DEFLATE, DEFLATE (old code), PackBits, LZMA, ZSTD
CODECS = frozenset({1, 5, 8, 32946, 32773, LZMA, ZSTD})
#: the compressions of :data:`CODECS` whose tiles libtiff (GDAL) "unpredicts": it ignores the
#: predictor of the others (PackBits, none), where tifffile would apply it
PREDICTED = frozenset({5, 8, 32946, LZMA, ZSTD})


@dataclass(frozen=True)
class _Layout:
    """Where the tiles of a file's first image are and how to decode them."""

    height: int
    width: int
    samples: int
    tile_h: int
    tile_w: int
    offsets: np.ndarray
    bytecounts: np.ndarray
    ident: tuple  # the file's identity (path, inode, time, size): the key of its tiles in the cache
    decode: Callable[[Any, int], np.ndarray]  # (compressed bytes, index) -> (rows, cols, samples)
    buffered: int  # tiles of at most this many bytes are read into this thread's buffer (0: none)


def read_pixel_major(src, window: Window, indexes: list[int], out: np.ndarray) -> bool:
    """Read ``indexes`` (1-based bands) of ``window`` of the open rasterio dataset ``src`` into
    ``out`` (h, w, len(indexes)) of its data type, decoding the tiles directly.

    Returns:
        False (``out`` untouched or partly written) when this reader does not take the file or
        the window, or failed: the caller then reads through GDAL.
    """
    path = src.name
    # a dataset open for update may hold blocks in GDAL's cache that are not in the file yet
    if not enabled() or src.driver != "GTiff" or src.mode != "r" or storage.is_remote(path) or path.startswith("/vsi"):
        return False
    try:
        if out.dtype != np.dtype(src.dtypes[0]) or not out.flags.c_contiguous:  # (complex_int16: no numpy type)
            return False
        st = os.stat(path)
        layout = _layout(path, st.st_ino, st.st_mtime_ns, st.st_size, src.height, src.width, src.count, out.dtype.str)
        if layout is None:
            return False
        _decode_window(src, layout, window, indexes, out)
    except ConfigError:
        raise  # a setting of this process (SITSFLOW_GDAL_THREADS), not the file: exit 2 naming it
    except Exception as exc:  # noqa: BLE001 (GDAL reads it again and reports its own error, if any)
        log.debug("direct read of %s failed (%s: %s): read through GDAL", path, type(exc).__name__, exc)
        return False
    return True


def enabled() -> bool:
    """``SITSFLOW_DIRECT_READS``: ``1`` (the default: local tiled GeoTIFFs are decoded here) or
    ``0`` (every read through GDAL: to compare, or to rule this reader out).

    Raises:
        ConfigError: another value.
    """
    value = os.environ.get("SITSFLOW_DIRECT_READS", "1").strip() or "1"
    if value not in ("0", "1"):
        raise ConfigError(
            f"SITSFLOW_DIRECT_READS must be 1 (direct reads of local tiled GeoTIFFs) or 0 (GDAL), got {value!r}"
        )
    return value == "1"


@functools.lru_cache(maxsize=64)
def _layout(
    path: str, ino: int, mtime_ns: int, size: int, height: int, width: int, count: int, dtype: str
) -> _Layout | None:
    """The tile layout of ``path`` (identified by inode, time and size: a replaced file is read
    again), or None when this reader does not take it."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.pages.first  # GDAL's full-resolution dataset
        why = _refusal(page, height, width, count, np.dtype(dtype))
        if why:
            log.debug("%s read through GDAL: %s", path, why)
            return None
        compression = int(page.compression)
        # GDAL's data type (_refusal), in the file's byte order (tifffile's page.dtype is native);
        # the floating-point predictor's bytes are undone as they are (they say their own order)
        file_dtype = np.dtype((tif.byteorder if int(page.predictor) != 3 else "=") + np.dtype(dtype).char)
        tile_shape = (int(page.tilelength), int(page.tilewidth), count)
        unpredict = None if int(page.predictor) == 1 else tifffile.TIFF.UNPREDICTORS[int(page.predictor)]
        return _Layout(
            ident=(path, ino, mtime_ns, size),
            height=height,
            width=width,
            samples=count,
            tile_h=int(page.tilelength),
            tile_w=int(page.tilewidth),
            offsets=np.asarray(page.dataoffsets, np.int64),
            bytecounts=np.asarray(page.databytecounts, np.int64),
            decode=functools.partial(
                _decode_one, _zstd_frame if compression == ZSTD else _lzma_stream, tile_shape, file_dtype, unpredict
            )
            if compression in (ZSTD, LZMA)
            else functools.partial(_decode_tifffile, page.decode),
            # ZSTD tiles (the decompressor returns new bytes); a byte count beyond a frame's bound
            # of the tile, trailing bytes, is read once, not kept
            buffered=_zstd_bound(int(np.prod(tile_shape)) * file_dtype.itemsize) if compression == ZSTD else 0,
        )


def _refusal(page, height: int, width: int, count: int, dtype: np.dtype) -> str:
    """Why this reader does not take ``page`` (empty: it does)."""
    if not page.is_tiled:
        return "not tiled"
    if page.imagedepth != 1 or page.tiledepth != 1:
        return "a volume"
    if (page.imagelength, page.imagewidth) != (height, width):
        return "its first image is not GDAL's dataset"
    if page.samplesperpixel != count:
        return f"{page.samplesperpixel} samples per pixel, GDAL sees {count} bands"
    if count > 1 and int(page.planarconfig) != 1:
        return "band-interleaved"
    if int(page.compression) not in CODECS:
        return f"compression {int(page.compression)}"
    if int(page.predictor) != 1 and (int(page.compression) not in PREDICTED or dtype.kind == "c"):
        return f"predictor {int(page.predictor)} with compression {int(page.compression)} or complex data"
    if int(page.predictor) not in (1, 2, 3) or (int(page.predictor) == 3 and dtype.kind != "f"):
        return f"predictor {int(page.predictor)} for {dtype}"  # libtiff: an error, or unknown
    if page.fillorder != 1 or page.bitspersample not in (8, 16, 32, 64):
        return "bit packing"
    if page.dtype is None or np.dtype(page.dtype).newbyteorder("=") != dtype:
        return f"data type {page.dtype}, GDAL reads {dtype}"
    if len(page.dataoffsets) != -(-height // page.tilelength) * -(-width // page.tilewidth):
        return "unexpected number of tiles"
    return ""


def _decode_window(src, layout: _Layout, window: Window, indexes: list[int], out: np.ndarray) -> None:
    path = src.name
    r0, c0 = int(window.row_off), int(window.col_off)
    h, w = int(window.height), int(window.width)
    if r0 < 0 or c0 < 0 or r0 + h > layout.height or c0 + w > layout.width:
        raise ValueError(f"window {window} outside the {layout.width} x {layout.height} image")
    if out.shape != (h, w, len(indexes)):
        raise ValueError(f"out is {out.shape}, expected {(h, w, len(indexes))}")
    bands = np.asarray(indexes, np.intp) - 1
    if bands.min() < 0 or bands.max() >= layout.samples:
        raise ValueError(f"band indexes {indexes} outside 1..{layout.samples}")
    every = bands.size == layout.samples and bool((bands == np.arange(layout.samples)).all())
    step = int(bands[1] - bands[0]) if bands.size > 1 else 1
    regular = step > 0 and bool((bands == bands[0] + step * np.arange(bands.size)).all())
    pick: slice | np.ndarray = (
        slice(None) if every else slice(int(bands[0]), int(bands[-1]) + 1, step) if regular else bands
    )
    across = -(-layout.width // layout.tile_w)
    tiles = [
        ty * across + tx
        for ty in range(r0 // layout.tile_h, (r0 + h - 1) // layout.tile_h + 1)
        for tx in range(c0 // layout.tile_w, (c0 + w - 1) // layout.tile_w + 1)
    ]
    sparse = [t for t in tiles if layout.bytecounts[t] == 0]
    if sparse:
        # what GDAL reads in a missing tile, band by band: its nodata (the tag's or an .aux.xml's,
        # rounded and clamped to the data type; rasterio's ``nodata`` hides one out of range), else 0
        ty, tx = divmod(sparse[0], across)
        fill = src.read(indexes, window=Window(tx * layout.tile_w, ty * layout.tile_h, 1, 1))[:, 0, 0]
    fd = os.open(path, os.O_RDONLY)
    try:
        st = os.fstat(fd)  # the file the layout was read from, not one put in its place since
        if (path, st.st_ino, st.st_mtime_ns, st.st_size) != layout.ident:
            raise OSError(f"{path} replaced while read")

        def one(index: int) -> None:
            ty, tx = divmod(index, across)
            tr, tc = ty * layout.tile_h, tx * layout.tile_w
            # the tile's part inside the window, in window and in tile coordinates
            a, b = max(tr, r0), min(tr + layout.tile_h, r0 + h)
            c, d = max(tc, c0), min(tc + layout.tile_w, c0 + w)
            target = out[a - r0 : b - r0, c - c0 : d - c0]
            nbytes, offset = int(layout.bytecounts[index]), int(layout.offsets[index])
            if nbytes == 0:  # sparse
                target[...] = fill
                return
            if offset == 0 or offset + nbytes > layout.ident[3]:  # GDAL reads (and maybe decodes) what is there
                raise ValueError(f"tile {index}: {nbytes} bytes at {offset} in a file of {layout.ident[3]}")
            tile = _CACHE.get((layout.ident, index))
            if tile is None:
                tile = layout.decode(_read_tile(layout, fd, index), index)
                # a whole tile only: tifffile also takes a short edge tile, which libtiff refuses
                if tile.shape != (layout.tile_h, layout.tile_w, layout.samples):
                    raise ValueError(f"tile {index} decodes to {tile.shape}")
                whole = (a, c) == (tr, tc) and (b, d) == (
                    min(tr + layout.tile_h, layout.height),
                    min(tc + layout.tile_w, layout.width),
                )
                if not (whole and every):  # a part of it is still to be read (see _TileCache)
                    _CACHE.put((layout.ident, index), tile)
            target[...] = tile[a - tr : b - tr, c - tc : d - tc, pick]

        _run_all(one, tiles)
    finally:
        os.close(fd)


class _Scratch(threading.local):
    """Each thread's ZSTD decompressor (not shareable between threads) and the buffer it reads
    compressed ZSTD tiles into (reused: a new 36 MB ``bytes`` per tile costs its copy and pages)."""

    def __init__(self) -> None:
        self.decompressor = zstandard.ZstdDecompressor()
        self.buffer = bytearray()


_SCRATCH = _Scratch()


def _read_tile(layout: _Layout, fd: int, index: int) -> Any:
    """The compressed bytes of tile ``index``: up to :attr:`_Layout.buffered` bytes a view of this
    thread's buffer, valid until its next read; else ``bytes`` (tifffile may return a view of them:
    uncompressed tiles)."""
    nbytes, offset = int(layout.bytecounts[index]), int(layout.offsets[index])
    if nbytes <= layout.buffered:
        if len(_SCRATCH.buffer) < nbytes:
            _SCRATCH.buffer = bytearray(nbytes)
        data: Any = memoryview(_SCRATCH.buffer)[:nbytes]
        got = os.preadv(fd, [data], offset)
    else:
        data = os.pread(fd, nbytes, offset)
        got = len(data)
    if got != nbytes:
        raise OSError(f"tile {index}: {got} of {nbytes} bytes")
    return data


def _zstd_bound(size: int) -> int:
    """The most bytes a ZSTD frame of ``size`` bytes takes (libzstd's ``ZSTD_COMPRESSBOUND``, with
    room for the frame's header)."""
    return size + size // 255 + 1024


def _zstd_frame(data: Any, size: int) -> bytes:
    """The first ZSTD frame of ``data``, when it holds ``size`` bytes or does not say: libtiff
    decodes one frame per tile. A frame whose header announces another size is refused before it
    is decoded (a header may announce gigabytes)."""
    announced = zstandard.frame_content_size(data)
    if announced not in (-1, size):
        raise ValueError(f"a ZSTD frame of {announced} bytes, not {size}")
    return _SCRATCH.decompressor.decompress(data, max_output_size=size, read_across_frames=False, allow_extra_data=True)


def _lzma_stream(data: Any, size: int) -> bytes:
    """At most ``size`` bytes of the first xz stream of ``data``: libtiff decodes one xz stream per
    tile (``lzma_stream_decoder``, not ``.lzma`` data) and takes the first bytes of a longer one.
    (Python's lzma also checks the stream's check where libtiff, stopping once its tile is full,
    does not: such a tile goes back to GDAL, which reads it.)"""
    return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data, max_length=size)


def _decode_one(
    decompress: Callable[[Any, int], bytes],
    shape: tuple[int, int, int],
    dtype: np.dtype,
    unpredict: Callable | None,
    data: Any,
    index: int,
) -> np.ndarray:
    """A tile of ``dtype`` (the file's byte order) compressed as one frame or stream, as libtiff
    reads it: (rows, cols, samples), native byte order. A tile that does not decode to a whole
    tile here goes back to GDAL, whose own read decides; the predictor and the byte order are
    applied as tifffile applies them."""
    size = shape[0] * shape[1] * shape[2] * dtype.itemsize
    raw = decompress(data, size)
    if len(raw) != size:
        raise ValueError(f"tile {index} decodes to {len(raw)} bytes, not {size}")
    tile = np.frombuffer(raw, dtype).reshape(shape)  # read-only: the decompressor's bytes
    if not dtype.isnative:
        tile = tile.astype(dtype.newbyteorder("="))
    if unpredict is not None:
        tile = unpredict(tile, axis=-2, out=tile if tile.flags.writeable else None)
    return tile


def _decode_tifffile(decode: Callable, data: bytes, index: int) -> np.ndarray:
    """A tile decoded by tifffile (``page.decode``): (rows, cols, samples)."""
    tile, _, _ = decode(data, index)
    if tile.shape[0] != 1:
        raise ValueError(f"tile {index} decodes to {tile.shape}")
    return tile[0]


def by_rows(nb_rows: int, fn: Callable[[slice], object], *, min_rows: int = 16) -> list:
    """``fn`` over slabs of ``nb_rows`` rows on the decoding threads (one slab per thread; inline
    when there are too few rows): numpy's element-wise work on a read's arrays (nodata tests,
    conversions) releases the GIL and runs on every core, as the decoding does.

    Returns:
        what ``fn`` returned for each slab, in row order.
    """
    threads = 1 if _WORKER.on else max(1, min(storage.decode_threads(), nb_rows // max(1, min_rows)))
    cuts = [nb_rows * i // threads for i in range(threads + 1)]
    return _run_all(fn, [slice(a, b) for a, b in zip(cuts[:-1], cuts[1:])])


def _run_all(fn: Callable[[Any], Any], items: list) -> list:
    """``[fn(item) for item in items]`` on the decoding threads; inline for one item, or on a
    decoding thread (waiting there for the others could wait forever). Every call ends before
    the first failure is raised: none still writes into the caller's arrays then."""
    if len(items) < 2 or _WORKER.on:
        return [fn(item) for item in items]
    futures = [_pool().submit(fn, item) for item in items]
    wait(futures)
    return [f.result() for f in futures]


class _TileCache:
    """Decoded tiles of which a read used only a part (some rows, columns or bands), least
    recently used first out beyond :data:`CACHE_BYTES`.

    Reads that take whole tiles (the parts of :meth:`~sitsflow.features.reader.WindowReader.read_windows`
    are cut on the blocks) leave nothing here. Two kinds of reads come back for the rest of a
    tile: the nodata probe (the first band of each date, then the whole part) and the strips a
    block tile is read in when the tile also holds sensors of single-band files
    (``tile_by_tile``); as GDAL's block cache does for its own reads, this decodes their tiles once.
    """

    def __init__(self, nbytes: int) -> None:
        self.nbytes, self.used = nbytes, 0
        self.tiles: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key: tuple) -> np.ndarray | None:
        with self.lock:
            tile = self.tiles.get(key)
            if tile is not None:
                self.tiles.move_to_end(key)
            return tile

    def put(self, key: tuple, tile: np.ndarray) -> None:
        with self.lock:
            old = self.tiles.pop(key, None)
            self.used -= 0 if old is None else old.nbytes
            self.tiles[key] = tile
            self.used += tile.nbytes
            while self.used > self.nbytes and self.tiles:
                self.used -= self.tiles.popitem(last=False)[1].nbytes


#: memory of decoded tiles kept for the reads that come back to them (see :class:`_TileCache`):
#: four 256 x 256 px tiles of 360 int16 bands (the probe's, then the part's), or one of 512 x 512 px;
#: beyond, tiles are decoded again (as GDAL's block cache, ``GDAL_CACHEMAX``, does when full).
#: Raised by :func:`cache_at_least` when a chunk's parts need more.
CACHE_BYTES = 192 * 1024 * 1024
_CACHE = _TileCache(CACHE_BYTES)


def cache_allowed() -> int:
    """The largest cache of decoded tiles :func:`cache_at_least` may give: its size now, or
    :data:`~sitsflow.storage.GDAL_CACHE_SHARE` of the usable memory when larger."""
    return max(_CACHE.nbytes, int(storage.GDAL_CACHE_SHARE * usable_memory()))


def cache_at_least(nbytes: int) -> int:
    """Raise the cache of decoded tiles to hold ``nbytes`` (never lowered, at most
    :func:`cache_allowed`); return its size now. Local single-band files read block tile by
    block tile need one tile of every file there (see
    :meth:`~sitsflow.features.reader.WindowReader.read_windows`)."""
    allowed = cache_allowed()
    with _CACHE.lock:
        _CACHE.nbytes = max(_CACHE.nbytes, min(int(nbytes), allowed))
        return _CACHE.nbytes


_POOL: dict[int, ThreadPoolExecutor] = {}
_POOL_LOCK = threading.Lock()


class _Worker(threading.local):
    """Whether this thread is one of the decoding threads (which must never wait for the others)."""

    on = False


_WORKER = _Worker()


def _worker_starts() -> None:
    _WORKER.on = True


def _forget_after_fork() -> None:
    """A forked child has none of its parent's threads: it starts its own pool (and locks)."""
    global _POOL_LOCK
    _POOL.clear()
    _POOL_LOCK = threading.Lock()
    _CACHE.lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)


def _pool() -> ThreadPoolExecutor:
    """The decoding threads (shared by every read of the process, created on first use)."""
    threads = storage.decode_threads()
    with _POOL_LOCK:
        pool = _POOL.get(threads)
        if pool is None:
            pool = _POOL[threads] = ThreadPoolExecutor(
                threads, thread_name_prefix="sitsflow-decode", initializer=_worker_starts
            )
        return pool
