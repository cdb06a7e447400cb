"""A chunk's output rasters, written part by part in a thread of their own.

The inference loop hands over each part's arrays as soon as they are classified; GDAL compresses
and writes them while the network works on the next part, so a chunk's outputs never sit in
memory whole. Parts are gathered into whole rows of the output's blocks before they are written:
parts are cut on the *sources'* blocks, which need not line up with the output's (a chunk starts
anywhere), and a compressed block written in pieces would be re-encoded and appended again.

Files are written under temporary names, all closed, then published (atomically, uploaded for
S3) only when the whole chunk went well; an error before publishing publishes nothing. (An
error while publishing can leave some published; the chunk's manifest is then not written, so a
rerun redoes the chunk and merging never takes it.)
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack

import numpy as np
import rasterio
from rasterio.windows import Window

from sitsflow import storage

MAX_PENDING = 8
"""Parts handed over but not written yet, at most (the loop waits beyond)."""


class ChunkWriter:
    """Output rasters of one chunk; use as a context manager.

    >>> with ChunkWriter() as writer:                      # doctest: +SKIP
    ...     writer.add(uri, profile, tags)
    ...     writer.write(uri, array, Window(0, 0, w, h))   # any number of parts
    ... # published here, all of them, or none on an exception
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sitsflow-write")
        self._files = ExitStack()  # the temporary files, published on a clean exit
        self._open_datasets = ExitStack()  # the GDAL datasets, all closed before any file is published
        self._datasets: dict[str, _BlockRows] = {}
        self._pending: deque[Future] = deque()
        self.uris: list[str] = []
        self.busy_s = 0.0  # seconds the writer thread spent creating and writing (for the benchmarks)
        self.wait_s = 0.0  # seconds the caller waited for the writer to catch up

    def add(self, uri: str, profile: dict, tags: dict, descriptions: list[str] | None = None) -> None:
        """Create the output ``uri`` (a GeoTIFF of ``profile``, with ``tags`` and band descriptions)."""
        self.uris.append(uri)
        self._submit(self._open, uri, profile, tags, descriptions)

    def write(self, uri: str, array: np.ndarray, window: Window) -> None:
        """Write ``array`` ((h, w) or (bands, h, w)) at ``window`` of ``uri``; the writer owns it from now on."""
        if array.shape[-2:] != (int(window.height), int(window.width)):
            # GDAL would resample silently
            raise ValueError(
                f"{uri}: a {array.shape[-2:]} array for a {int(window.height)} x {int(window.width)} window"
            )
        self._submit(self._write, uri, array, window)

    def _submit(self, fn, *args) -> None:
        tic = time.perf_counter()
        while self._pending and (self._pending[0].done() or len(self._pending) >= MAX_PENDING):
            self._pending.popleft().result()  # raises the writer's error here, early
        self.wait_s += time.perf_counter() - tic
        self._pending.append(self._pool.submit(self._timed, fn, *args))

    def _timed(self, fn, *args) -> None:
        tic = time.perf_counter()
        try:
            fn(*args)
        finally:
            self.busy_s += time.perf_counter() - tic  # one writer thread: no race

    def _open(self, uri: str, profile: dict, tags: dict, descriptions: list[str] | None) -> None:
        tmp = self._files.enter_context(storage.output_path(uri, suffix=".tif"))
        dst = self._open_datasets.enter_context(rasterio.open(tmp, "w", **profile))
        dst.update_tags(**tags)
        for i, d in enumerate(descriptions or [], 1):
            dst.set_band_description(i, d)
        self._datasets[uri] = _BlockRows(dst)

    def _write(self, uri: str, array: np.ndarray, window: Window) -> None:
        self._datasets[uri].write(array if array.ndim == 3 else array[None], window)

    def _finish(self) -> None:
        for rows in self._datasets.values():
            rows.flush()
        self._open_datasets.close()

    def __enter__(self) -> ChunkWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                try:
                    while self._pending:
                        self._pending.popleft().result()
                except BaseException as error:  # a write failed: publish nothing
                    self._close(type(error), error, error.__traceback__)
                    raise
                try:
                    self._pool.submit(self._finish).result()  # every file complete and closed
                except BaseException as error:
                    self._close(type(error), error, error.__traceback__)
                    raise
                self._close(None, None, None)  # publishes them
            else:
                for job in self._pending:
                    job.cancel()
                self._close(exc_type, exc, tb)
        finally:
            self._pool.shutdown(wait=True)

    def _close(self, exc_type, exc, tb) -> None:
        # in the writer thread, where the files were opened; with an exception, output_path
        # removes the temporary files instead of publishing them
        def close() -> None:
            try:
                self._open_datasets.__exit__(exc_type, exc, tb)
            finally:
                self._files.__exit__(exc_type, exc, tb)

        self._pool.submit(close).result()


class _BlockRows:
    """Gathers the parts written to a dataset into whole rows of its blocks, each written once."""

    def __init__(self, dst) -> None:
        self.dst = dst
        self.block_rows = max(1, int(dst.block_shapes[0][0]))
        self.pending: dict[int, list] = {}  # block row -> [array (count, rows, width), pixels still missing]

    def write(self, array: np.ndarray, window: Window) -> None:
        r0, c0 = int(window.row_off), int(window.col_off)
        h, w = int(window.height), int(window.width)
        for k in range(r0 // self.block_rows, (r0 + h - 1) // self.block_rows + 1):
            top = k * self.block_rows
            rows = min(self.block_rows, self.dst.height - top)
            if k not in self.pending:
                self.pending[k] = [np.zeros((self.dst.count, rows, self.dst.width), array.dtype), rows * self.dst.width]
            entry = self.pending[k]
            a, b = max(r0, top), min(r0 + h, top + rows)
            entry[0][:, a - top : b - top, c0 : c0 + w] = array[:, a - r0 : b - r0]
            entry[1] -= (b - a) * w
            if entry[1] <= 0:
                self.dst.write(entry[0], window=Window(0, top, self.dst.width, rows))
                del self.pending[k]

    def flush(self) -> None:
        """Write the block rows that parts did not fill (zeros where nothing came)."""
        for k, (array, _) in sorted(self.pending.items()):
            self.dst.write(array, window=Window(0, k * self.block_rows, self.dst.width, array.shape[1]))
        self.pending.clear()
