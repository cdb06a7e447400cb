"""Reads of single-band files (products, STAC items): the block caches sized to what a chunk's parts
need, strips or block tiles chosen from it, and the acquisition threads of remote files."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import rasterio.env
from rasterio.windows import Window

from sitsflow import features as features_module
from sitsflow import storage
from sitsflow.features.reader import CACHE_MARGIN, WindowReader
from sitsflow.sensors import base, direct

MiB = 1 << 20


@pytest.fixture
def gdal_cache(monkeypatch):
    """GDAL's block cache, restored afterwards."""
    monkeypatch.delenv("GDAL_CACHEMAX", raising=False)
    before = int(rasterio.env.get_gdal_config("GDAL_CACHEMAX"))
    yield before
    rasterio.env.set_gdal_config("GDAL_CACHEMAX", before)


def test_gdal_cache_is_raised_to_the_need_within_a_share_of_the_memory(gdal_cache, monkeypatch):
    before = gdal_cache
    assert storage.gdal_cache_at_least(before // 2) == before  # it holds it already: untouched
    assert int(rasterio.env.get_gdal_config("GDAL_CACHEMAX")) == before
    monkeypatch.setattr(storage, "usable_memory", lambda: 4 * (before + 300 * MiB))
    assert storage.gdal_cache_at_least(before + 100 * MiB) == before + 100 * MiB
    assert int(rasterio.env.get_gdal_config("GDAL_CACHEMAX")) == before + 100 * MiB  # GDAL's own setting
    assert storage.gdal_cache_at_least(before + 900 * MiB) == before + 300 * MiB  # a quarter of the memory
    assert storage.gdal_cache_at_least(10 * MiB) == before + 300 * MiB  # never lowered
    assert int(rasterio.env.get_gdal_config("GDAL_CACHEMAX")) == before + 300 * MiB


def test_a_gdal_cachemax_of_the_user_is_kept(gdal_cache, monkeypatch):
    monkeypatch.setenv("GDAL_CACHEMAX", "64")
    monkeypatch.setattr(storage, "usable_memory", lambda: 1 << 40)
    assert storage.gdal_cache_at_least(gdal_cache + 100 * MiB) == gdal_cache
    assert storage.gdal_cache_allowed() == gdal_cache
    assert int(rasterio.env.get_gdal_config("GDAL_CACHEMAX")) == gdal_cache


@pytest.mark.parametrize(
    ("v2", "v1", "expected"),
    [
        ("max", None, "machine"),
        ("2147483648\n", None, 2 << 30),
        (None, "1073741824", 1 << 30),
        (None, str(1 << 62), "machine"),
        (None, None, "machine"),
    ],
)
def test_usable_memory_follows_the_cgroup_limit(tmp_path, monkeypatch, v2, v1, expected):
    from sitsflow import process

    for name, value in (("CGROUP_MEMORY_MAX", v2), ("CGROUP_V1_MEMORY_LIMIT", v1)):
        path = tmp_path / name
        if value is not None:
            path.write_text(value)
        monkeypatch.setattr(process, name, str(path))
    machine = process.os.sysconf("SC_PHYS_PAGES") * process.os.sysconf("SC_PAGE_SIZE")
    assert process.usable_memory() == (machine if expected == "machine" else expected)


def test_the_direct_readers_cache_is_raised_within_a_share_of_the_memory(monkeypatch):
    monkeypatch.setattr(direct._CACHE, "nbytes", 192 * MiB)
    monkeypatch.setattr(direct, "usable_memory", lambda: 4000 * MiB)
    assert direct.cache_at_least(100 * MiB) == 192 * MiB
    assert direct.cache_at_least(600 * MiB) == 600 * MiB
    assert direct.cache_at_least(5000 * MiB) == 1000 * MiB


def _sensor(where: str) -> SimpleNamespace:
    """4 dates of 3 single-band files (2-byte samples) in 16 x 16 px blocks."""
    return SimpleNamespace(
        raw_dates=[1] * 4,
        bands=["a", "b", "c"],
        block_rows=16,
        block_cols=16,
        band_files=True,
        input_files=lambda: [f"{where}{k}.tif" for k in range(12)],
        sample_bytes=2,
        block_samples=1,
        remote=where.startswith("s3://"),
    )


def _stack(rows: int = 16) -> SimpleNamespace:
    """A local pixel-interleaved stack (dated_raster) of 4 dates x 3 bands, int16, in rows x 16 px blocks."""
    return SimpleNamespace(
        raw_dates=[1] * 4,
        bands=["a", "b", "c"],
        block_rows=rows,
        block_cols=16,
        band_files=False,
        input_files=lambda: ["/data/stack.tif"],
        sample_bytes=2,
        block_samples=12,
        remote=False,
    )


PER_PIXEL = 4 * (3 + 1) * 4 * 2  # the reader's estimate: dates x (bands + mask) x float32 x 2
BLOCK = 16 * 16 * 2  # bytes of a block
FILES = 12


@pytest.fixture
def caches(monkeypatch):
    """The two block caches, faked: ``allowed`` (bytes each may reach) and what was asked of them."""
    state = {"allowed": {"gdal": 0, "direct": 10**12}, "asked": {"gdal": [], "direct": []}}

    def cache(name):
        def at_least(nbytes):
            state["asked"][name].append(nbytes)
            return min(nbytes, state["allowed"][name])

        return at_least

    monkeypatch.setattr(storage, "gdal_cache_allowed", lambda: state["allowed"]["gdal"])
    monkeypatch.setattr(storage, "gdal_cache_at_least", cache("gdal"))
    monkeypatch.setattr(direct, "cache_allowed", lambda: state["allowed"]["direct"])
    monkeypatch.setattr(direct, "cache_at_least", cache("direct"))
    return state


def test_remote_band_files_keep_strips_when_the_cache_may_hold_a_block_row_of_every_file(caches, monkeypatch, caplog):
    window = Window(3, 5, 61, 44)  # columns 3-63: 4 block columns
    monkeypatch.setattr(features_module.reader, "READ_BUDGET_BYTES", 130 * PER_PIXEL)  # strips of 2 rows
    row = int(CACHE_MARGIN * FILES * BLOCK * 4)
    caches["allowed"]["gdal"] = row
    reader = WindowReader([_sensor("s3://bucket/")], None)
    strips = reader.read_windows(window)
    assert not reader.tile_by_tile and caches["asked"] == {"gdal": [row], "direct": []}
    assert all(int(p.width) == 61 for p in strips)
    # it may not: block tile by block tile, the cache raised to one block of every file only
    caches["asked"]["gdal"].clear()
    caches["allowed"]["gdal"] = row - 1
    tiles = reader.read_windows(window)
    assert reader.tile_by_tile and caches["asked"] == {"gdal": [int(CACHE_MARGIN * FILES * BLOCK)], "direct": []}
    assert all(int(p.col_off) // 16 == (int(p.col_off) + int(p.width) - 1) // 16 for p in tiles)
    assert sum(int(p.width) * int(p.height) for p in tiles) == 61 * 44
    assert "decoded more than once" not in caplog.text
    # not even one block of every file fits: a warning (once)
    caches["allowed"]["gdal"] = FILES * BLOCK - 1
    with caplog.at_level("WARNING"):
        reader.read_windows(window)
        reader.read_windows(window)
    assert caplog.text.count("blocks will be decoded more than once") == 1


@pytest.mark.parametrize("where", ["/data/", "s3://bucket/"])
def test_strips_of_whole_block_rows_ask_no_cache_and_stay_on_block_rows(caches, monkeypatch, where):
    """A strip at least a block row high is cut on block rows: every block is decoded once."""
    monkeypatch.setattr(features_module.reader, "READ_BUDGET_BYTES", 64 * 25 * PER_PIXEL)  # 25 rows of 64 px
    reader = WindowReader([_sensor(where)], None)
    parts = reader.read_windows(Window(0, 0, 64, 64))
    assert [(int(p.row_off), int(p.height)) for p in parts] == [(0, 16), (16, 16), (32, 16), (48, 16)]
    assert not reader.tile_by_tile and caches["asked"] == {"gdal": [], "direct": []}


def test_local_band_files_raise_gdals_cache_and_stacks_the_direct_readers(caches, monkeypatch):
    """Local single-band files go through GDAL (single-block reads: its block cache); a local stack's
    tiles through the direct reader's cache: one tile (the probe's), or those of a block tile."""
    caches["allowed"]["gdal"] = 10**9
    monkeypatch.setattr(features_module.reader, "READ_BUDGET_BYTES", 130 * PER_PIXEL)
    reader = WindowReader([_sensor("/data/")], None)
    reader.read_windows(Window(3, 5, 61, 44))
    assert reader.tile_by_tile
    assert caches["asked"] == {"gdal": [int(CACHE_MARGIN * FILES * BLOCK)], "direct": []}
    caches["asked"] = {"gdal": [], "direct": []}
    reader = WindowReader([_sensor("/data/"), _stack(rows=32)], None)  # block tiles 32 x 16: 2 blocks of 16 x 16
    parts = reader.read_windows(Window(3, 5, 61, 44))
    assert reader.tile_by_tile
    assert all(int(p.row_off) // 32 == (int(p.row_off) + int(p.height) - 1) // 32 for p in parts)
    assert caches["asked"] == {
        "gdal": [int(CACHE_MARGIN * FILES * BLOCK * 2)],
        "direct": [int(CACHE_MARGIN * 32 * 16 * 2 * 12)],
    }
    caches["asked"] = {"gdal": [], "direct": []}
    reader = WindowReader([_stack()], None)  # a stack alone: whole tiles, one kept for the probe
    reader.read_windows(Window(3, 5, 61, 44))
    assert not reader.tile_by_tile and caches["asked"] == {"gdal": [], "direct": [int(CACHE_MARGIN * 16 * 16 * 2 * 12)]}


def test_remote_strips_cut_on_a_stacks_block_rows_need_no_cache(caches, monkeypatch):
    """Strips cut on the block rows of a stack whose blocks are a multiple of the files' come back to
    no block of the files: no cache asked of GDAL, whatever the budget's rows."""
    monkeypatch.setattr(features_module.reader, "READ_BUDGET_BYTES", 130 * PER_PIXEL)
    reader = WindowReader([_sensor("s3://bucket/"), _stack(rows=32)], None)
    parts = reader.read_windows(Window(3, 5, 61, 44))
    assert not reader.tile_by_tile and caches["asked"]["gdal"] == []
    assert all(int(p.row_off) % 32 == 0 or int(p.row_off) == 5 for p in parts)
    assert sum(int(p.width) * int(p.height) for p in parts) == 61 * 44


def test_acquisitions_of_remote_files_each_keep_one_thread():
    """Acquisition t is always read on the same thread (its files' datasets, and their blocks in
    GDAL's cache, are that thread's), whichever thread asks; local files are read in order here."""
    lanes = base.acquisition_threads()
    seen: list[dict[int, str]] = [{}, {}]
    for k, caller in enumerate((threading.current_thread, None)):
        record = seen[k]

        def read(t: int, record: dict = record) -> None:
            record[t] = threading.current_thread().name

        if caller is None:  # from another thread (another reading thread of the stage)
            worker = threading.Thread(target=base.per_acquisition, args=(lanes + 3, read, True))
            worker.start()
            worker.join()
        else:
            base.per_acquisition(lanes + 3, read, True)
    assert seen[0] == seen[1] and len(seen[0]) == lanes + 3
    assert len(set(seen[0].values())) == lanes and seen[0][0] == seen[0][lanes]
    assert all(name.startswith("sitsflow-acq") for name in seen[0].values())
    here: list[str] = []
    base.per_acquisition(3, lambda t: here.append(threading.current_thread().name), False)
    assert here == [threading.current_thread().name] * 3
    one: list[str] = []  # a single acquisition stays on its thread too
    base.per_acquisition(1, lambda t: one.append(threading.current_thread().name), True)
    assert one == [seen[0][0]]


def test_every_acquisition_ends_before_a_failure_is_raised():
    """Acquisition 0 fails at once; acquisition 1 is held until released: the call must still be
    waiting for it (its writes into the caller's arrays are not over), then raise the failure."""
    release = threading.Event()
    done: list[int] = []
    raised: list[BaseException] = []

    def read(t: int) -> None:
        if t == 0:
            raise OSError("acquisition 0 failed")
        if t == 1:
            release.wait()
        done.append(t)

    def call() -> None:
        try:
            base.per_acquisition(6, read, True)
        except OSError as exc:
            raised.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    caller.join(0.5)
    assert caller.is_alive() and not raised  # still waiting for acquisition 1
    release.set()
    caller.join()
    assert [str(e) for e in raised] == ["acquisition 0 failed"] and sorted(done) == [1, 2, 3, 4, 5]
    # a call from an acquisition thread itself runs there, in order (waiting would deadlock)
    inner: list[str] = []

    def outer(t: int) -> None:
        base.per_acquisition(2, lambda u: inner.append(threading.current_thread().name), True)

    base.per_acquisition(2, outer, True)
    assert len(inner) == 4 and all(n.startswith("sitsflow-acq") for n in inner)
