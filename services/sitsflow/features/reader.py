"""The windowed reader: a window of a tile read from every sensor in block-aligned parts of bounded
memory, its valid observations counted, the selected pixels with a clear date picked and handed
to the feature computation."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from rasterio.windows import Window

from sitsflow import storage
from sitsflow.log import get_logger
from sitsflow.sensors import Sensor, direct
from sitsflow.sensors.base import Grid, NativeUnavailable, ReadBuffers

if TYPE_CHECKING:  # (torch is imported where features are computed: planning reads headers only)
    from sitsflow.features.compute import FeatureComputer, RawFeatures

log = get_logger(__name__)

READ_BUDGET_BYTES = 64 * 1024 * 1024
"""Raw data read at once by :meth:`FeaturePipeline.features`: larger windows are read in parts."""

READ_MIN_BLOCKS = 2
"""Source blocks side by side in one read, at least (see :meth:`FeaturePipeline.read_windows`)."""

CACHE_MARGIN = 1.25
"""Block cache asked for the blocks the parts come back to, over their size (other reads use it too)."""


@dataclass
class FeatureBlock:
    """Features of the selected pixels of one window.

    Attributes:
        values: float32 (nb_pixels, nb_dates, nb_components), NaN where a raw-date value is masked.
        rows, cols: int32 (nb_pixels,) pixel coordinates in the tile grid (row-major order).
        clear_dates: int16 (window height, window width), number of clear (valid) acquisitions
            per pixel of the whole window, all sensors together (0 = no valid date: such pixels
            are never returned).
    """

    values: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    clear_dates: np.ndarray
    #: with ``native``: the selected pixels' observations as read, left to the feature computation
    #: (``values`` is then empty; None without any pixel)
    raw: RawFeatures | None = None


class WindowReader:
    """Reads windows of one tile from its sensors, on the tile grid.

    Args:
        sensors: the sensors, in stacking order.
        grid: the tile grid.
    """

    def __init__(self, sensors: list[Sensor], grid: Grid) -> None:
        self.sensors = sensors
        self.grid = grid
        #: an input is on object storage or HTTP (request latency to hide, blocks fetched by request)
        self.remote = any(s.remote for s in sensors)
        #: the single-band files of the last :meth:`read_windows` are read block tile by block tile
        self.tile_by_tile = False
        #: files of each single-band sensor (counted once: the parts are planned again as they are read)
        self._files = {id(s): len(s.input_files()) if s.band_files else 1 for s in sensors}
        self._said: set[str] = set()

    def read_windows(self, window: Window) -> list[Window]:
        """The sub-windows ``window`` is read in, row-major.

        Each holds about :data:`READ_BUDGET_BYTES` of raw data, and is cut on the sources' internal
        blocks (whole blocks; boundaries at multiples of the block size in the tile grid) so that
        no compressed block is decoded twice: whole-width strips when a block row fits the budget,
        else tiles one block row high and at least :data:`READ_MIN_BLOCKS` blocks wide (GDAL
        decodes the blocks of one read in parallel, straight into the array, without its block
        cache). Local sensors of single-band files (:attr:`~sitsflow.sensors.base.Sensor.band_files`:
        hundreds of files, whose blocks of a whole block row would not fit the budget) are read
        block tile by block tile instead, each tile in strips within the budget: every file's block
        is decoded once into GDAL's block cache (which must hold one block of every file) and
        serves the tile's strips from there; strips across blocks decode each block again for
        every strip (72 local files: 34 s against 4.4 s). On object storage or HTTP the strips
        stay while GDAL's block cache can hold a block row of every file (a multi-block read fetches
        a block row in one request, and GDAL's reads of remote files keep the decoded blocks in its
        cache for the next strips; one request per block made a 2048² px chunk of 132 COGs of 256-px
        blocks slower: 44 s against 25 s, 8,839 requests against 2,324), block tile by block tile
        otherwise (see :meth:`_tile_by_tile`; docs/benchmarks.md).
        """
        parts, self.tile_by_tile = self._plan(window)
        return parts

    def _plan(self, window: Window) -> tuple[list[Window], bool]:
        """:meth:`read_windows`, and whether the single-band files are read block tile by block tile."""
        h, w = int(window.height), int(window.width)
        per_pixel = sum(max(1, len(s.raw_dates)) * (len(s.bands) + 1) for s in self.sensors) * 4 * 2
        budget_px = max(1, READ_BUDGET_BYTES // max(1, per_pixel))
        r0, c0 = int(window.row_off), int(window.col_off)
        rows = budget_px // max(1, w)
        tile_by_tile = self._tile_by_tile(window, rows)
        # single-band files shape the parts when read block tile by block tile, or in strips of
        # whole block rows of every source; remote ones in lower strips do not (parts two blocks wide and a block
        # row high would hold a block row of hundreds of files)
        aligned = rows >= max((max(1, s.block_rows) for s in self.sensors), default=1)
        shaping = [s for s in self.sensors if tile_by_tile or aligned or not s.band_files]
        block_rows = max(max((s.block_rows for s in shaping), default=1), 1)
        block_cols = max(max((s.block_cols for s in shaping), default=1), 1)
        if rows < block_rows and tile_by_tile:
            # one file per band and date: a read across several blocks of a local file decodes them
            # all again (GDAL's multi-block reads of local files bypass its block cache), so each
            # part stays inside one block tile; a tile's blocks, decoded once, serve its parts from a
            # block cache (see _tile_by_tile)
            tile_cols = min(block_cols, w)
            sub = max(1, budget_px // tile_cols)
            return [
                Window(a, p, b - a, q - p)
                for r, e in _cuts(r0, h, block_rows)
                for a, b in _cuts(c0, w, block_cols)
                for p, q in _cuts(r, e - r, sub)
            ], True
        cols = max(block_cols * READ_MIN_BLOCKS, budget_px // block_rows // block_cols * block_cols)
        if rows >= block_rows or cols >= w:
            step = max(block_rows, rows // block_rows * block_rows)
            return [Window(c0, a, w, b - a) for a, b in _cuts(r0, h, step)], tile_by_tile
        return [
            Window(a, r, b - a, e - r) for r, e in _cuts(r0, h, block_rows) for a, b in _cuts(c0, w, cols)
        ], tile_by_tile

    def _say(self, level: int, message: str, *args: object) -> None:
        """Log ``message`` once per reader (the parts of a chunk are planned again as they are read)."""
        if message not in self._said:
            self._said.add(message)
            log.log(level, message, *args)

    def _tile_by_tile(self, window: Window, rows: int) -> bool:
        """Whether the single-band files are read block tile by block tile in ``window``, whose
        whole-width strips would be ``rows`` high; the block caches are raised to what the parts
        come back to.

        A source block is decoded once only if a cache keeps it for the later parts that need it.
        Strips at least as high as every source's blocks are cut on block rows and come back to
        none. Lower ones: local single-band files are read block tile by block tile (GDAL's reads
        across several blocks of a local file decode them all again, whatever its cache; within one
        block they go through its block cache), so that cache must hold one block of every file.
        Remote ones go through GDAL's block cache either way: they keep the strips (one request
        fetches a file's block row) when that cache may hold a block row of every file whose blocks
        the strips cut (:func:`~sitsflow.storage.gdal_cache_allowed`), and are read tile by tile
        otherwise (a cache too small for the strips fetched and decoded every block again for each
        strip: docs/benchmarks.md, "Single-band files"). The direct reader's cache holds the tiles of
        the local stacks (``dated_raster``) the parts come back to: one each (the nodata probe's),
        the tiles of a block tile when the parts are cut inside it. Caches are raised to
        :data:`CACHE_MARGIN` times the need, which covers other reads and in part two reading threads
        on either side of a block row's end. Block shapes are counted in tile-grid pixels: a coarser
        file's blocks (Sentinel-2's 20 m bands on a 10 m grid) cover more, and come back more often.
        """
        banded = [s for s in self.sensors if s.band_files]
        stacks = [s for s in self.sensors if not s.band_files and not s.remote]
        tallest = max((max(1, s.block_rows) for s in self.sensors), default=1)
        widest = max((max(1, s.block_cols) for s in self.sensors), default=1)
        c0, w = int(window.col_off), int(window.width)

        files = self._files

        def block(s) -> int:  # bytes of one block of every file of s (all bands of a stack's tile)
            return files[id(s)] * max(1, s.block_rows) * max(1, s.block_cols) * s.sample_bytes * s.block_samples

        def per_tile(s) -> int:  # blocks of s under one block tile of the parts
            return -(-tallest // max(1, s.block_rows)) * -(-widest // max(1, s.block_cols))

        tile_by_tile = False
        if banded and rows < tallest:
            if not any(s.remote for s in banded):
                tile_by_tile = True
            else:
                # strips cut on the other sources' block rows: files whose blocks they cut come back
                other = max((max(1, s.block_rows) for s in self.sensors if not s.band_files), default=1)
                step = other if rows < other else rows // other * other
                cut = [s for s in banded if step % max(1, s.block_rows)]
                row = [block(s) * ((c0 + w - 1) // max(1, s.block_cols) - c0 // max(1, s.block_cols) + 1) for s in cut]
                need = int(CACHE_MARGIN * sum(row))
                if need and storage.gdal_cache_allowed() < need:
                    tile_by_tile = True
                    self._say(
                        logging.INFO,
                        "a block row of the %d remote single-band files (%d MiB) does not fit in GDAL's block "
                        "cache: they are read block tile by block tile",
                        sum(files[id(s)] for s in cut),
                        sum(row) >> 20,
                    )
                elif need:
                    storage.gdal_cache_at_least(need)
        short = []
        if tile_by_tile:
            need = sum(block(s) * per_tile(s) for s in banded)
            if storage.gdal_cache_at_least(int(CACHE_MARGIN * need)) < need:
                short.append(f"GDAL's: {need >> 20} MiB needed, {storage.gdal_cache_allowed() >> 20} MiB allowed")
        if stacks:
            need = sum(block(s) * (per_tile(s) if tile_by_tile else 1) for s in stacks)
            if direct.cache_at_least(int(CACHE_MARGIN * need)) < need:
                short.append(f"the direct reader's: {need >> 20} MiB needed, {direct.cache_allowed() >> 20} allowed")
        if short:
            self._say(
                logging.WARNING,
                "the block caches cannot hold what the parts come back to (%s): blocks will be decoded more "
                "than once (raise the memory limit, or GDAL_CACHEMAX)",
                "; ".join(short),
            )
        return tile_by_tile

    def features(
        self,
        window: Window,
        compute: Callable[[list, list], np.ndarray],
        empty_shape: tuple[int, int],
        select: np.ndarray | None = None,
        *,
        count_clear: bool = True,
        buffers: ReadBuffers | None = None,
        probe: bool = False,
        native: FeatureComputer | None = None,
    ) -> FeatureBlock:
        """Features of the pixels of ``window`` that are selected and have a clear date.

        The window is read in the sub-windows of :meth:`read_windows`, so that about
        :data:`READ_BUDGET_BYTES` of raw data is in memory at once, whatever the window's size.

        Args:
            window: the window to read, in tile pixel coordinates.
            compute: turns the raw observations of the picked pixels (per sensor) into features
                (:meth:`~sitsflow.features.compute.FeatureComputer.compute`).
            empty_shape: (nb_dates, nb_components), for a window without any pixel.
            select: optional bool (h, w): only these pixels are computed (labelled pixels when
                sampling, a region's pixels when classifying).
            count_clear: when False, sub-windows without any selected pixel are not read at all
                (their ``clear_dates`` stay 0); sampling uses this.
            buffers: reusable arrays for a window read at once (one sub-window; see
                :class:`~sitsflow.sensors.base.ReadBuffers`): the block's ``values`` may then live
                in them, valid until the next read with the same buffers.
            probe: first look cheaply whether a sub-window has any valid observation at all
                (:meth:`~sitsflow.sensors.base.Sensor.surely_empty`), and skip it when not. Worth
                it inside nodata areas (outside the swath), where it saves most of the read; a
                waste where there are data. Inference probes after a sub-window without any.
            native: no features: the picked pixels' observations as read
                (:meth:`~sitsflow.sensors.base.Sensor.read_native`; every sensor must have a
                :meth:`~sitsflow.sensors.base.Sensor.native_conversion`) go to ``raw``, left to
                this computation (:meth:`~sitsflow.features.compute.FeatureComputer.compute_native`).
                A sensor that finds it cannot hand its values as they are
                (:class:`~sitsflow.sensors.base.NativeUnavailable`) has the window read again
                with the features computed here (a warning, once).
        """
        args = (window, compute, empty_shape, select, count_clear, buffers, probe)
        if native is None:
            return self._features(*args, None)
        try:
            return self._features(*args, native)
        except NativeUnavailable as exc:
            self._say(logging.WARNING, "%s: the reading threads compute the features", str(exc))
            return self._features(*args, None)

    def _features(
        self,
        window: Window,
        compute: Callable[[list, list], np.ndarray],
        empty_shape: tuple[int, int],
        select: np.ndarray | None,
        count_clear: bool,
        buffers: ReadBuffers | None,
        probe: bool,
        native: FeatureComputer | None,
    ) -> FeatureBlock:
        h, w = int(window.height), int(window.width)
        clear = np.zeros((h, w), np.int16)
        values: list[np.ndarray] = []
        observed: list[list[tuple[np.ndarray, np.ndarray]]] = []
        rows: list[np.ndarray] = []
        cols: list[np.ndarray] = []
        parts, _ = self._plan(window)  # (not read_windows: the chunk's plan stays in tile_by_tile)
        if len(parts) > 1:
            buffers = None  # the parts' values are kept until they are concatenated
        for part in parts:
            pr, pc = int(part.row_off - window.row_off), int(part.col_off - window.col_off)
            ph, pw = int(part.height), int(part.width)
            sel = select[pr : pr + ph, pc : pc + pw] if select is not None else None
            if not count_clear and sel is not None and not sel.any():
                continue
            if probe and all(s.surely_empty(part, self.grid) for s in self.sensors if not s.static):
                continue  # clear_dates stay 0
            reads = [
                s.read_native(part, self.grid, buffers) if native is not None else s.read(part, self.grid, buffers)
                for s in self.sensors
            ]
            # a static sensor (userFeat) is no acquisition: it never makes a pixel clear
            part_clear = np.asarray(
                sum(np.count_nonzero(v, axis=-1) for s, (_, v) in zip(self.sensors, reads) if not s.static)
            ).astype(np.int16)
            clear[pr : pr + ph, pc : pc + pw] = part_clear
            keep = part_clear > 0
            if sel is not None:
                keep &= sel
            r, c = np.nonzero(keep)
            if not r.size:
                continue
            if r.size == keep.size:  # every pixel of the part: a reshape, not a gather
                picked = [(x.reshape(r.size, *x.shape[2:]), v.reshape(r.size, *v.shape[2:])) for x, v in reads]
            else:
                flat = r * pw + c
                picked = [
                    (
                        _take(x.reshape(ph * pw, *x.shape[2:]), flat, buffers, f"picked:{k}"),
                        v.reshape(ph * pw, *v.shape[2:])[flat],
                    )
                    for k, (x, v) in enumerate(reads)
                ]
            if native is not None:
                observed.append(picked)
            else:
                values.append(compute([x for x, _ in picked], [v for _, v in picked]))
            rows.append(r + int(part.row_off))
            cols.append(c + int(part.col_off))
        empty = np.empty((0, *empty_shape), np.float32)
        if not rows:  # (raw stays None)
            return FeatureBlock(empty, np.empty(0, np.int32), np.empty(0, np.int32), clear)
        rr, cc = (rows[0], cols[0]) if len(rows) == 1 else (np.concatenate(rows), np.concatenate(cols))
        # tiles -> the window's row-major order
        order = np.lexsort((cc, rr)) if len(rows) > 1 and int(parts[0].width) < w else None

        def join(arrays: list[np.ndarray]) -> np.ndarray:
            joined = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
            return joined if order is None else joined[order]

        rr, cc = join([rr]).astype(np.int32), join([cc]).astype(np.int32)
        if native is not None:
            from sitsflow.features.compute import RawFeatures

            raw = RawFeatures(
                [join([p[k][0] for p in observed]) for k in range(len(self.sensors))],
                [join([p[k][1] for p in observed]) for k in range(len(self.sensors))],
                native,
            )
            return FeatureBlock(values=empty, rows=rr, cols=cc, clear_dates=clear, raw=raw)
        return FeatureBlock(values=join(values), rows=rr, cols=cc, clear_dates=clear)


def _cuts(start: int, length: int, step: int) -> list[tuple[int, int]]:
    """[start, start + length) cut at the multiples of ``step``."""
    points = [start, *range((start // step + 1) * step, start + length, step), start + length]
    return list(zip(points[:-1], points[1:]))


def _take(x: np.ndarray, index: np.ndarray, buffers: ReadBuffers | None, key: str) -> np.ndarray:
    """``x[index]`` (rows of a 2-D or more array), into reused memory when there are buffers."""
    if buffers is None:
        return x[index]
    return np.take(x, index, axis=0, out=buffers.get(key, (index.size, *x.shape[1:]), x.dtype))
