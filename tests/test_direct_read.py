"""Direct reads of local tiled GeoTIFFs (sitsflow.sensors.direct): the same values as GDAL's read
for every file they take, GDAL for every file they do not take, and GDAL's errors for damaged ones."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin
from rasterio.windows import Window

from sitsflow import process, storage
from sitsflow.errors import BadInputError, ConfigError
from sitsflow.sensors import direct
from sitsflow.sensors.base import Grid, read_on_grid

NODATA = -10000


def _write(path: Path, data: np.ndarray, *, block=16, tiled=True, nodata=NODATA, **options) -> Path:
    profile = {
        "driver": "GTiff",
        "dtype": data.dtype.name,
        "count": data.shape[0],
        "width": data.shape[2],
        "height": data.shape[1],
        "crs": "EPSG:32631",
        "transform": from_origin(300000, 5000000, 10, 10),
        "nodata": nodata,
        "interleave": "pixel",
        **options,
    }
    if tiled:
        profile |= {"tiled": True, "blockxsize": block, "blockysize": block}
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path


def _data(dtype="int16", count=12, height=45, width=53, seed=0, nodata=NODATA) -> np.ndarray:
    rng = np.random.default_rng(seed)
    low = 0 if np.dtype(dtype).kind == "u" else -3000
    data = rng.integers(low, 250 if dtype == "uint8" else 9000, (count, height, width)).astype(dtype)
    if np.dtype(dtype).kind == "f":
        data += rng.random(data.shape).astype(dtype)
        data[rng.random(data.shape) < 0.03] = np.nan
    data[:, :7, :9] = nodata
    return data


def _both(path: Path, window: Window, indexes: list[int]) -> tuple[np.ndarray, np.ndarray, bool]:
    """(GDAL's pixel-major read, the direct read, whether the direct reader took it)."""
    with storage.rasterio_env(), rasterio.open(path) as src:
        expected = src.read(indexes, window=window).transpose(1, 2, 0)
        got = np.full(expected.shape, 77, expected.dtype)
        took = direct.read_pixel_major(src, window, indexes, got)
    return expected, got, took


WINDOWS = [
    Window(0, 0, 53, 45),
    Window(3, 5, 17, 29),
    Window(16, 16, 16, 16),
    Window(47, 40, 6, 5),
    Window(50, 0, 3, 45),
]


@pytest.mark.parametrize(
    ("dtype", "options"),
    [
        ("int16", {"compress": "zstd"}),
        ("int16", {"compress": "deflate", "predictor": 2}),
        ("int16", {"compress": "lzw"}),
        ("int16", {}),
        ("uint16", {"compress": "zstd", "predictor": 2}),
        ("uint8", {"compress": "packbits"}),
        ("float32", {"compress": "zstd", "predictor": 3}),
        ("float64", {"compress": "deflate"}),
        ("int32", {"compress": "lzma"}),
    ],
)
def test_direct_reads_equal_gdal_reads(tmp_path, dtype, options):
    """Windows inside one tile, across tiles, on the image's partial edge tiles, with every band,
    a regular subset (the probe's first band of each date) and an irregular one."""
    nodata = 0 if np.dtype(dtype).kind == "u" else NODATA
    data = _data(dtype, nodata=nodata)
    path = _write(tmp_path / "stack.tif", data, nodata=nodata, **options)
    for window in WINDOWS:
        for indexes in (list(range(1, 13)), [1, 4, 7, 10], [12, 2, 5], [6]):
            expected, got, took = _both(path, window, indexes)
            assert took, (window, indexes)
            np.testing.assert_array_equal(got, expected)


def test_single_band_tiled_files_are_read_directly(tmp_path):
    path = _write(tmp_path / "one.tif", _data(count=1), compress="zstd", block=32)
    expected, got, took = _both(path, Window(5, 3, 40, 40), [1])
    assert took
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("nodata", [NODATA, None])
def test_sparse_tiles_read_as_gdal_reads_them(tmp_path, nodata):
    """A COG written with SPARSE_OK leaves tiles of nodata (or zeros) out of the file: GDAL reads
    them as the nodata value, else 0, and so must the direct read."""
    data = _data(count=4)
    data[:, 16:32, 16:48] = NODATA if nodata is not None else 0
    path = _write(tmp_path / "sparse.tif", data, nodata=nodata, compress="zstd", sparse_ok=True)
    import tifffile

    with tifffile.TiffFile(path) as tif:
        assert 0 in list(tif.pages[0].databytecounts)  # the test file really has missing tiles
    expected, got, took = _both(path, Window(10, 10, 40, 30), [1, 2, 3, 4])
    assert took
    np.testing.assert_array_equal(got, expected)
    assert (got[6:22, 6:38] == (NODATA if nodata is not None else 0)).all()


def test_files_the_direct_reader_does_not_take_go_to_gdal(tmp_path):
    data = _data(count=3)
    cases = {
        "striped": _write(tmp_path / "striped.tif", data, tiled=False, compress="zstd"),
        "band-interleaved": _write(tmp_path / "band.tif", data, compress="zstd", interleave="band"),
        "jpeg": _write(tmp_path / "jpeg.tif", _data("uint8", count=3, nodata=0), nodata=0, compress="jpeg"),
    }
    for name, path in cases.items():
        with storage.rasterio_env(), rasterio.open(path) as src:
            out = np.empty((10, 10, 3), src.dtypes[0])
            assert not direct.read_pixel_major(src, Window(0, 0, 10, 10), [1, 2, 3], out), name
            # and read_on_grid still reads it (through GDAL), pixel-major
            grid = Grid(src.width, src.height, src.transform, src.crs)
            values, _ = read_on_grid(
                src, Window(0, 0, 10, 10), grid, [1, 2, 3], name, dtype=src.dtypes[0], pixel_major=True
            )
            np.testing.assert_array_equal(values, src.read([1, 2, 3], window=Window(0, 0, 10, 10)).transpose(1, 2, 0))
    # another data type than the file's (a conversion: GDAL's job)
    path = _write(tmp_path / "ints.tif", data, compress="zstd")
    with storage.rasterio_env(), rasterio.open(path) as src:
        assert not direct.read_pixel_major(src, Window(0, 0, 10, 10), [1, 2, 3], np.empty((10, 10, 3), np.float32))


def test_read_on_grid_takes_the_direct_path_for_local_tiled_files(tmp_path, monkeypatch):
    path = _write(tmp_path / "stack.tif", _data(), compress="zstd")
    calls = []
    real = direct.read_pixel_major
    monkeypatch.setattr(direct, "read_pixel_major", lambda *a: calls.append(a[1]) or real(*a))
    with storage.rasterio_env(), rasterio.open(path) as src:
        grid = Grid(src.width, src.height, src.transform, src.crs)
        window = Window(4, 4, 30, 20)
        values, inside = read_on_grid(src, window, grid, list(range(1, 13)), "stack", dtype="int16", pixel_major=True)
        np.testing.assert_array_equal(values, src.read(window=window).transpose(1, 2, 0))
    assert calls == [window] and inside.all()


def _corrupt_tile(path: Path, index: int) -> None:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        offset, size = tif.pages[0].dataoffsets[index], tif.pages[0].databytecounts[index]
    with open(path, "r+b") as f:
        f.seek(offset + size // 4)
        f.write(b"\xff\x00\xa5" * (size // 6))


def test_a_corrupt_tile_is_left_to_gdal_whose_error_names_the_file(tmp_path):
    path = _write(tmp_path / "bad.tif", _data(), compress="zstd")
    _corrupt_tile(path, 4)  # the fifth tile: row 1, column 0
    with storage.rasterio_env(), rasterio.open(path) as src:
        out = np.empty((16, 16, 12), np.int16)
        assert not direct.read_pixel_major(src, Window(0, 16, 16, 16), list(range(1, 13)), out)
        # the tiles around it still read directly
        expected, got, took = _both(path, Window(16, 0, 30, 14), list(range(1, 13)))
        assert took
        np.testing.assert_array_equal(got, expected)
        grid = Grid(src.width, src.height, src.transform, src.crs)
        with pytest.raises(BadInputError, match="bad.tif"):
            storage.raster_call(
                "read",
                str(path),
                lambda: read_on_grid(
                    src, Window(0, 16, 16, 16), grid, list(range(1, 13)), str(path), dtype="int16", pixel_major=True
                ),
            )


def test_a_truncated_file_is_left_to_gdal(tmp_path):
    path = _write(tmp_path / "cut.tif", _data(), compress="zstd")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 200)
    with storage.rasterio_env(), rasterio.open(path) as src:
        out = np.empty((45, 53, 12), np.int16)
        assert not direct.read_pixel_major(src, Window(0, 0, 53, 45), list(range(1, 13)), out)


def test_a_replaced_file_is_read_anew(tmp_path):
    """The tile layout is cached per file identity (inode, time, size): a file rewritten between
    two reads is read as it is now."""
    path = tmp_path / "stack.tif"
    for seed, block in ((0, 16), (1, 32)):
        data = _data(seed=seed)
        _write(tmp_path / "new.tif", data, compress="zstd", block=block)
        os.replace(tmp_path / "new.tif", path)
        expected, got, took = _both(path, Window(0, 0, 53, 45), list(range(1, 13)))
        assert took
        np.testing.assert_array_equal(got, data.transpose(1, 2, 0))
        np.testing.assert_array_equal(got, expected)


def test_decoding_threads_follow_sitsflow_gdal_threads(tmp_path, monkeypatch):
    monkeypatch.setenv("SITSFLOW_GDAL_THREADS", "3")
    assert storage.decode_threads() == 3
    assert direct._pool()._max_workers == 3
    names = set()
    real = direct._Layout
    path = _write(tmp_path / "stack.tif", _data(), compress="zstd")
    import threading

    layout = direct._layout(
        str(path), *(lambda s: (s.st_ino, s.st_mtime_ns, s.st_size))(os.stat(path)), 45, 53, 12, "<i2"
    )
    assert isinstance(layout, real)
    decode = layout.decode
    object.__setattr__(
        layout, "decode", lambda data, index: names.add(threading.current_thread().name) or decode(data, index)
    )
    try:
        expected, got, took = _both(path, Window(0, 0, 53, 45), list(range(1, 13)))
    finally:
        object.__setattr__(layout, "decode", decode)
    assert took and names and all(n.startswith("sitsflow-decode") for n in names)
    np.testing.assert_array_equal(got, expected)
    monkeypatch.setenv("SITSFLOW_GDAL_THREADS", "ALL_CPUS")
    assert storage.decode_threads() == process.usable_cpus()
    quota = tmp_path / "cpu.max"
    quota.write_text("100000 100000\n")  # a pod limited to one CPU decodes on one thread
    monkeypatch.setattr(process, "CGROUP_CPU_MAX", str(quota))
    assert storage.decode_threads() == 1
    monkeypatch.setenv("SITSFLOW_GDAL_THREADS", "many")
    with pytest.raises(ConfigError, match="SITSFLOW_GDAL_THREADS"):
        storage.decode_threads()
    # a bad setting is the process's fault, not the file's: it is not hidden behind GDAL's read
    with storage.rasterio_env(), rasterio.open(path) as src:
        with pytest.raises(ConfigError, match="SITSFLOW_GDAL_THREADS"):
            direct.read_pixel_major(src, Window(0, 0, 53, 45), list(range(1, 13)), np.empty((45, 53, 12), np.int16))


def test_tiles_read_in_part_are_decoded_once_and_whole_ones_are_not_kept(tmp_path, monkeypatch):
    """Strips inside one tile (the reads of a block tile next to single-band-file sensors) and the
    probe's few bands decode a tile once; reads of whole tiles keep nothing; the cache's memory is
    bounded."""
    path = _write(tmp_path / "stack.tif", _data(height=64, width=64), compress="zstd", block=32)
    monkeypatch.setattr(direct, "_CACHE", direct._TileCache(direct.CACHE_BYTES))
    st = os.stat(path)
    layout = direct._layout(str(path), st.st_ino, st.st_mtime_ns, st.st_size, 64, 64, 12, "<i2")
    decoded = []
    decode = layout.decode
    object.__setattr__(layout, "decode", lambda data, index: decoded.append(index) or decode(data, index))
    try:
        for row in range(0, 32, 8):  # four strips of the first tile
            expected, got, took = _both(path, Window(0, row, 32, 8), list(range(1, 13)))
            assert took
            np.testing.assert_array_equal(got, expected)
        assert decoded == [0]
        _both(path, Window(32, 0, 32, 32), [1, 4, 7, 10])  # the probe's bands of the second tile
        _both(path, Window(32, 0, 32, 32), list(range(1, 13)))  # then all of them
        assert decoded == [0, 1]
        _both(path, Window(0, 32, 64, 32), list(range(1, 13)))  # whole tiles: decoded, not kept
        assert sorted(decoded) == [0, 1, 2, 3] and len(direct._CACHE.tiles) == 2
        small = direct._TileCache(32 * 32 * 12 * 2)  # room for one tile
        monkeypatch.setattr(direct, "_CACHE", small)
        _both(path, Window(0, 0, 64, 8), list(range(1, 13)))
        assert len(small.tiles) == 1 and small.used == small.nbytes  # the tile put last stays
    finally:
        object.__setattr__(layout, "decode", decode)


def test_a_forked_child_decodes_with_threads_of_its_own(tmp_path):
    """A child forked after the parent's decoding threads started (e.g. a data loader's worker)
    has none of them: it must start its own instead of waiting for them forever."""
    import multiprocessing

    path = _write(tmp_path / "stack.tif", _data(), compress="zstd")
    expected, got, took = _both(path, Window(0, 0, 53, 45), list(range(1, 13)))  # the parent's pool runs
    assert took and direct._POOL
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        child = pool.apply_async(_read_in_child, (str(path),)).get(timeout=30)
    np.testing.assert_array_equal(child, expected)


def _read_in_child(path: str) -> np.ndarray:
    with rasterio.open(path) as src:  # the direct reader alone (GDAL's own threads do not survive a fork either)
        out = np.empty((45, 53, 12), np.int16)
        assert direct.read_pixel_major(src, Window(0, 0, 53, 45), list(range(1, 13)), out)
    return out


def _patch_tile(path: Path, index: int, *, offset: int | None = None, blob: bytes | None = None) -> None:
    """Point tile ``index`` at ``offset``, or at ``blob`` appended to the file (its byte count then)."""
    import struct

    import tifffile

    with tifffile.TiffFile(path) as tif:
        tags = tif.pages[0].tags
        where = {
            name: (tags[name].valueoffset, "<" + {3: "H", 4: "I", 16: "Q"}[tags[name].dtype])
            for name in ("TileOffsets", "TileByteCounts")
        }
    with open(path, "r+b") as f:
        if blob is not None:
            offset = f.seek(0, 2)
            f.write(blob)
            at, fmt = where["TileByteCounts"]
            f.seek(at + index * struct.calcsize(fmt))
            f.write(struct.pack(fmt, len(blob)))
        at, fmt = where["TileOffsets"]
        f.seek(at + index * struct.calcsize(fmt))
        f.write(struct.pack(fmt, offset))


@pytest.mark.parametrize(("dtype", "nodata"), [("int16", 0.5), ("uint16", 70000.0)])
def test_sparse_tiles_of_a_nodata_the_type_cannot_hold_read_as_gdal_reads_them(tmp_path, dtype, nodata):
    """GDAL fills a missing tile with its nodata rounded and clamped to the data type (0.5 -> 1,
    70000 -> 65535), and rasterio's ``nodata`` hides one out of range (None): the fill is GDAL's."""
    data = _data(dtype, count=3, nodata=0)
    data[:, 16:32, 16:32] = 0
    path = _write(tmp_path / "sparse.tif", data, nodata=None, compress="zstd", sparse_ok=True)
    with rasterio.open(path, "r+") as dst:
        dst.nodata = nodata
    expected, got, took = _both(path, Window(10, 10, 40, 30), [1, 2, 3])
    assert took
    np.testing.assert_array_equal(got, expected)
    assert len(np.unique(expected[6:22, 6:22])) == 1 and expected[6, 6, 0] != 0  # the file really has them


def test_a_tile_at_offset_zero_is_left_to_gdal(tmp_path):
    """Only a tile without bytes is missing for GDAL: one at offset 0 with bytes is read there (an
    uncompressed one reads the TIFF header as pixels), so the direct reader leaves it to GDAL."""
    path = _write(tmp_path / "zero.tif", _data(count=2), nodata=None)
    _patch_tile(path, 5, offset=0)
    expected, got, took = _both(path, Window(0, 0, 53, 45), [1, 2])
    assert not took
    assert (expected[16:32, 16:32] != 0).any()  # GDAL's read of the header, not a missing tile's zeros


def test_a_tile_that_does_not_decode_to_a_whole_tile_is_left_to_gdal(tmp_path):
    """tifffile takes an edge tile holding only the image's part of it; libtiff (GDAL) refuses it:
    a damaged file must end as GDAL's error, not as values."""
    import imagecodecs

    path = _write(tmp_path / "short.tif", _data(count=2), nodata=None, compress="zstd")
    last = 3 * 4 - 1  # the bottom-right tile: 13 rows x 5 columns of the image
    _patch_tile(path, last, blob=imagecodecs.zstd_encode(np.arange(13 * 5 * 2, dtype="<i2").tobytes()))
    with storage.rasterio_env(), rasterio.open(path) as src:
        out = np.empty((45, 53, 2), np.int16)
        assert not direct.read_pixel_major(src, Window(0, 0, 53, 45), [1, 2], out)
        with pytest.raises(rasterio.errors.RasterioIOError):
            src.read([1, 2])


ZSTD_CASES = [
    (dtype, predictor, endianness)
    for dtype in ("uint8", "int8", "int16", "uint16", "int32", "uint32", "int64", "float32", "float64")
    for predictor in ((1, 2, 3) if dtype.startswith("float") else (1, 2))  # (GDAL: 3 for floats only)
    for endianness in ("little", "big")
]


@pytest.mark.parametrize(("dtype", "predictor", "endianness"), ZSTD_CASES)
def test_zstd_tiles_of_every_type_predictor_and_byte_order_read_as_gdal_reads_them(tmp_path, dtype, predictor, endianness):
    nodata = 0 if np.dtype(dtype).kind == "u" else (-100 if dtype == "int8" else NODATA)
    data = _data("int16" if dtype == "int8" else dtype, nodata=nodata)
    data = np.clip(data, -128, 127).astype(dtype) if dtype == "int8" else data
    path = _write(tmp_path / "stack.tif", data, nodata=nodata, compress="zstd", predictor=predictor, endianness=endianness)
    for window in (Window(0, 0, 53, 45), Window(3, 5, 17, 29)):
        expected, got, took = _both(path, window, list(range(1, 13)))
        assert took
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize(
    ("dtype", "options"),
    [
        ("int16", {"compress": "zstd"}),
        ("float32", {"compress": "zstd", "predictor": 3}),
        ("uint16", {"compress": "zstd", "predictor": 2}),
        ("int16", {"compress": "zstd", "predictor": 2, "endianness": "big"}),
        ("float32", {"compress": "zstd", "predictor": 3, "endianness": "big"}),
        ("float64", {"compress": "zstd", "predictor": 3, "endianness": "big"}),
        ("int32", {"compress": "lzma", "endianness": "big"}),
        ("int16", {"compress": "deflate"}),
    ],
)
def test_zstd_and_lzma_tiles_read_as_gdal_reads_them(tmp_path, dtype, options):
    """ZSTD tiles go through python-zstandard, LZMA tiles through Python's lzma (then the predictor
    and the byte order), each thread reading ZSTD tiles into a buffer it reuses; the values are
    GDAL's, tile after tile: a tile kept in the cache is not the buffer the next tile is read into
    (the single-tile reads run inline, on this thread)."""
    nodata = 0 if np.dtype(dtype).kind == "u" else NODATA
    path = _write(tmp_path / "stack.tif", _data(dtype, nodata=nodata), nodata=nodata, **options)
    st = os.stat(path)
    layout = direct._layout(str(path), st.st_ino, st.st_mtime_ns, st.st_size, 45, 53, 12, np.dtype(dtype).str)
    zstd = options["compress"] == "zstd"
    assert (layout.decode.func is direct._decode_one) is (zstd or options["compress"] == "lzma")
    assert (layout.buffered > 0) is zstd
    direct._SCRATCH.buffer = bytearray()
    direct._CACHE.tiles.clear()
    for window, indexes in [
        (Window(0, 0, 16, 16), [1, 2]),  # part of tile 0: kept in the cache
        (Window(16, 0, 16, 16), list(range(1, 13))),  # tile 1 whole, through the same buffer
        (Window(16, 16, 37, 29), list(range(1, 13))),  # other tiles, on the decoding threads
        (Window(0, 0, 16, 16), list(range(1, 13))),  # tile 0 again, from the cache
    ]:
        expected, got, took = _both(path, window, indexes)
        assert took
        np.testing.assert_array_equal(got, expected)
    assert (len(direct._SCRATCH.buffer) > 0) is zstd  # this thread's buffer took the inline reads
    if options.get("endianness") == "big":
        import tifffile

        with tifffile.TiffFile(path) as tif:
            assert tif.byteorder == ">"  # the file's samples really are big-endian


def _tile_bytes(data: np.ndarray, row: int, col: int, block: int = 16) -> bytes:
    """Tile (row, col) of ``data`` (bands, rows, cols) as a pixel-interleaved TIFF tile holds it."""
    return np.ascontiguousarray(
        data[:, row * block : (row + 1) * block, col * block : (col + 1) * block].transpose(1, 2, 0)
    ).tobytes()


@pytest.mark.parametrize("how", ["no content size", "trailing bytes"])
def test_zstd_frames_libtiff_reads_are_read(tmp_path, how):
    """GDAL's frames announce no size (libtiff streams them); bytes after the frame are left
    unread by libtiff: the direct reader takes both, with GDAL's values."""
    import zstandard

    data = _data(count=2)
    path = _write(tmp_path / "frames.tif", data, nodata=None, compress="zstd")
    tile = _tile_bytes(data, 1, 1)
    blob = zstandard.ZstdCompressor(write_content_size=how != "no content size").compress(tile)
    _patch_tile(path, 5, blob=blob + (b"\x00garbage" if how == "trailing bytes" else b""))
    expected, got, took = _both(path, Window(0, 0, 53, 45), [1, 2])
    assert took
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(got, data.transpose(1, 2, 0))


@pytest.mark.parametrize(("compress", "predictor"), [("zstd", 1), ("zstd", 2), ("lzma", 1)])  # (GDAL writes LZMA unpredicted)
def test_a_tile_of_two_frames_is_left_to_gdal(tmp_path, compress, predictor):
    """The direct reader decodes one ZSTD frame or xz stream per tile (as libtiff does), with or
    without a predictor: a tile of two is short there and left to GDAL, whose read then fails with
    its own error (libtiff: "Not enough data"), as for any damaged tile."""
    import lzma

    import zstandard

    data = _data(count=2)
    path = _write(tmp_path / "frames.tif", data, nodata=None, compress=compress, predictor=predictor)
    tile = _tile_bytes(data, 1, 1)  # (values only: the file's read fails before they matter)
    half = len(tile) // 2
    one = zstandard.ZstdCompressor(write_content_size=False).compress if compress == "zstd" else lzma.compress
    _patch_tile(path, 5, blob=one(tile[:half]) + one(tile[half:]))
    with storage.rasterio_env(), rasterio.open(path) as src:
        out = np.empty((45, 53, 2), np.int16)
        assert not direct.read_pixel_major(src, Window(0, 0, 53, 45), [1, 2], out)
        with pytest.raises(rasterio.errors.RasterioIOError):
            src.read([1, 2])


@pytest.mark.parametrize("announced", ["longer", "huge"])
def test_a_zstd_tile_of_too_many_bytes_is_left_to_gdal(tmp_path, monkeypatch, announced):
    """libtiff takes the first bytes of a ZSTD frame longer than the tile; the direct reader leaves
    it to GDAL, whose values are then the ones read. A frame whose header announces another size
    is refused before it is decoded (a header may announce gigabytes)."""
    import zstandard

    data = _data(count=2)
    path = _write(tmp_path / "long.tif", data, nodata=None, compress="zstd")
    tile = _tile_bytes(data, 1, 1)
    extra = b"\x01\x02" * 100 if announced == "longer" else bytes(64 << 20)
    _patch_tile(path, 5, blob=zstandard.ZstdCompressor().compress(tile + extra))
    decoded = []

    class Counting(direct._Scratch):  # each thread's decompressor, counting its calls
        def __init__(self) -> None:
            super().__init__()
            real = self.decompressor
            self.decompressor = type(
                "Decompressor",
                (),
                {"decompress": staticmethod(lambda d, **k: decoded.append(len(d)) or real.decompress(d, **k))},
            )()

    monkeypatch.setattr(direct, "_SCRATCH", Counting())
    expected, got, took = _both(path, Window(16, 16, 16, 16), [1, 2])
    assert not took and decoded == []  # refused on the frame's header
    np.testing.assert_array_equal(expected, data[:, 16:32, 16:32].transpose(1, 2, 0))


def test_a_predictor_libtiff_ignores_is_left_to_gdal(tmp_path):
    """libtiff applies the predictor only with LZW, DEFLATE, LZMA and ZSTD: a PackBits file with a
    predictor tag reads without it through GDAL, where tifffile would undo it."""
    import tifffile

    path = tmp_path / "packbits.tif"
    tifffile.imwrite(
        path,
        _data(count=2).transpose(1, 2, 0),
        tile=(16, 16),
        compression="packbits",
        predictor=2,
        photometric="minisblack",
        planarconfig="contig",
    )
    expected, got, took = _both(path, Window(0, 0, 53, 45), [1, 2])
    assert not took


def test_datasets_open_for_update_and_types_numpy_lacks_are_left_to_gdal(tmp_path):
    path = _write(tmp_path / "stack.tif", _data(count=2), compress="zstd")
    with rasterio.open(path, "r+") as src:  # its blocks may be in GDAL's cache, not in the file yet
        assert not direct.read_pixel_major(src, Window(0, 0, 16, 16), [1, 2], np.empty((16, 16, 2), np.int16))
    path = _write(tmp_path / "cint16.tif", np.zeros((1, 16, 16), np.complex64), dtype="complex_int16", block=16)
    with rasterio.open(path) as src:
        assert src.dtypes[0] == "complex_int16"
        assert not direct.read_pixel_major(src, Window(0, 0, 16, 16), [1], np.empty((16, 16, 1), np.complex64))


def test_a_file_replaced_after_its_layout_was_read_is_left_to_gdal(tmp_path, monkeypatch):
    """The layout comes from the file's identity before the read opens it: a file put in its place
    in between (another tile layout) must not be decoded with the old one."""
    path = tmp_path / "stack.tif"
    _write(path, _data(seed=0), block=16)
    real = direct._layout

    def replace_then_layout(*args):
        layout = real(*args)
        _write(tmp_path / "new.tif", _data(seed=1), block=16)  # the same layout: readable with the old one
        os.replace(tmp_path / "new.tif", path)
        return layout

    monkeypatch.setattr(direct, "_layout", replace_then_layout)
    with storage.rasterio_env(), rasterio.open(path) as src:
        out = np.empty((45, 53, 12), np.int16)
        assert not direct.read_pixel_major(src, Window(0, 0, 53, 45), list(range(1, 13)), out)


def test_concurrent_reads_of_one_file_share_threads_and_cache(tmp_path, monkeypatch):
    """Several reading threads (the inference stage's) reading parts of the same tiles at once,
    with a cache too small for them all (evictions while others read): every read is GDAL's."""
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setenv("SITSFLOW_GDAL_THREADS", "3")
    path = _write(tmp_path / "stack.tif", _data(height=64, width=64), compress="zstd", block=32)
    monkeypatch.setattr(direct, "_CACHE", direct._TileCache(2 * 32 * 32 * 12 * 2))
    with storage.rasterio_env(), rasterio.open(path) as src:
        whole = src.read().transpose(1, 2, 0)
    windows = [
        (Window(c, r, 24, 9), idx)
        for r in range(0, 56, 7)
        for c in (0, 20, 40)
        for idx in (list(range(1, 13)), [1, 4, 7, 10], [12, 3])
    ]

    def read(job):
        window, idx = job
        with storage.rasterio_env(), rasterio.open(path) as src:
            out = np.empty((9, 24, len(idx)), np.int16)
            took = direct.read_pixel_major(src, window, idx, out)
        rows, cols = window.toslices()
        return took and np.array_equal(out, whole[rows, cols][:, :, np.asarray(idx) - 1])

    with ThreadPoolExecutor(4) as readers:
        assert all(readers.map(read, windows * 3))
    assert direct._CACHE.used <= direct._CACHE.nbytes


def test_reads_on_the_decoding_threads_do_not_wait_for_them(tmp_path):
    """by_rows' work may itself read (or run by_rows): on a decoding thread it runs inline instead
    of waiting for decoding threads that are all busy waiting too (in a child process, killed
    when it hangs)."""
    import subprocess
    import sys

    path = _write(tmp_path / "stack.tif", _data(height=64, width=64), compress="zstd", block=16)
    script = f"""
import numpy as np, rasterio
from rasterio.windows import Window
from sitsflow.sensors import direct
with rasterio.open({str(path)!r}) as src:
    whole = src.read().transpose(1, 2, 0)
def read(rows):
    with rasterio.open({str(path)!r}) as src:
        out = np.empty((rows.stop - rows.start, 64, 12), np.int16)
        took = direct.read_pixel_major(src, Window(0, rows.start, 64, rows.stop - rows.start), list(range(1, 13)), out)
    return took and np.array_equal(out, whole[rows]) and direct.by_rows(32, lambda s: s) == [slice(0, 32)]
assert all(direct.by_rows(64, read))
"""
    env = {**os.environ, "SITSFLOW_GDAL_THREADS": "2"}
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=60)


def test_sitsflow_direct_reads_0_reads_everything_through_gdal(tmp_path, monkeypatch):
    path = _write(tmp_path / "stack.tif", _data(), compress="zstd")
    decoded = []
    real = direct._decode_window
    monkeypatch.setattr(direct, "_decode_window", lambda *a: decoded.append(a[2]) or real(*a))
    window, bands = Window(3, 5, 17, 29), list(range(1, 13))
    for setting, direct_read in (("0", False), ("1", True), ("", True)):
        monkeypatch.setenv("SITSFLOW_DIRECT_READS", setting)
        decoded.clear()
        with storage.rasterio_env(), rasterio.open(path) as src:
            grid = Grid(src.width, src.height, src.transform, src.crs)
            values, _ = read_on_grid(src, window, grid, bands, "stack", dtype="int16", pixel_major=True)
            np.testing.assert_array_equal(values, src.read(bands, window=window).transpose(1, 2, 0))
        assert decoded == ([window] if direct_read else []), setting
    monkeypatch.setenv("SITSFLOW_DIRECT_READS", "yes")
    with storage.rasterio_env(), rasterio.open(path) as src:
        with pytest.raises(ConfigError, match="SITSFLOW_DIRECT_READS must be 1 .* or 0"):
            direct.read_pixel_major(src, window, bands, np.empty((29, 17, 12), np.int16))
