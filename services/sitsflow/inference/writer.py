"""A chunk's output rasters, written part by part in a thread of their own.

The inference loop hands over each part's arrays as soon as they are classified; GDAL compresses
and writes them while the network works on the next part, so a chunk's outputs never sit in
memory whole. Files are written under temporary names and published (atomically, uploaded for S3)
only when the whole chunk went well; on any error nothing is published.
"""

from __future__ import annotations

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
        self._stack = ExitStack()
        self._datasets: dict[str, rasterio.io.DatasetWriter] = {}
        self._pending: deque[Future] = deque()
        self.uris: list[str] = []

    def add(self, uri: str, profile: dict, tags: dict, descriptions: list[str] | None = None) -> None:
        """Create the output ``uri`` (a GeoTIFF of ``profile``, with ``tags`` and band descriptions)."""
        self.uris.append(uri)
        self._submit(self._open, uri, profile, tags, descriptions)

    def write(self, uri: str, array: np.ndarray, window: Window) -> None:
        """Write ``array`` ((h, w) or (bands, h, w)) at ``window`` of ``uri``; the writer owns it from now on."""
        if array.shape[-2:] != (int(window.height), int(window.width)):
            # GDAL would resample silently
            raise ValueError(f"{uri}: a {array.shape[-2:]} array for a {int(window.height)} x {int(window.width)} window")
        self._submit(self._write, uri, array, window)

    def _submit(self, fn, *args) -> None:
        while self._pending and (self._pending[0].done() or len(self._pending) >= MAX_PENDING):
            self._pending.popleft().result()  # raises the writer's error here, early
        self._pending.append(self._pool.submit(fn, *args))

    def _open(self, uri: str, profile: dict, tags: dict, descriptions: list[str] | None) -> None:
        tmp = self._stack.enter_context(storage.output_path(uri, suffix=".tif"))
        dst = self._stack.enter_context(rasterio.open(tmp, "w", **profile))
        dst.update_tags(**tags)
        for i, d in enumerate(descriptions or [], 1):
            dst.set_band_description(i, d)
        self._datasets[uri] = dst

    def _write(self, uri: str, array: np.ndarray, window: Window) -> None:
        self._datasets[uri].write(array if array.ndim == 3 else array[None], window=window)

    def __enter__(self) -> ChunkWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is None:
                try:
                    while self._pending:
                        self._pending.popleft().result()
                except BaseException as error:  # a write failed: publish nothing
                    self._close(type(error), error, error.__traceback__)
                    raise
                self._close(None, None, None)  # closes the files, then publishes them
            else:
                for job in self._pending:
                    job.cancel()
                self._close(exc_type, exc, tb)
        finally:
            self._pool.shutdown(wait=True)
        return False

    def _close(self, exc_type, exc, tb) -> None:
        # in the writer thread, where the files were opened; with an exception, output_path
        # removes the temporary files instead of publishing them
        self._pool.submit(self._stack.__exit__, exc_type, exc, tb).result()
