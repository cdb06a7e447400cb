"""Batch sources for the two data-loader modes (``full`` and ``stream``).

Both are datasets whose items are whole batches, wrapped in a ``torch.utils.data.DataLoader``
with ``batch_size=None`` so ``num_workers`` processes can prepare them. The randomness of an epoch
(the sample permutation in ``full`` mode; the chunk order and the shuffle-buffer seed in ``stream``
mode) is drawn in the main process from one ``torch.Generator`` before the epoch's iterator is
created, so results do not depend on which worker prepares which batch, and the generator's state
is all a checkpoint needs to replay the next epochs exactly.

Batches are ``(x, y)``: x float32 of shape (batch, nb_dates, nb_components), y int64 class indices
of shape (batch,).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from sitsflow.samples import FeatureReader

STREAM_BUFFER_BATCHES = 4
"""Capacity of the stream-mode shuffle buffer, in batches."""
STREAM_GAP_FRACTION = 8
"""Without shuffling (validation), runs of selected rows closer than ``batch_size // 8`` rows are
read in one call (the rows between them are read and dropped)."""


class InMemoryBatches(Dataset):
    """``full`` mode: every selected sample in memory; item ``i`` is batch ``i`` of the current order.

    Args:
        features: float32 CPU tensor (n, nb_dates, nb_components).
        targets: int64 CPU tensor (n,).
        batch_size: samples per batch.
        drop_single: skip a final batch of exactly one sample (BatchNorm cannot train on it).
    """

    def __init__(self, features: torch.Tensor, targets: torch.Tensor, batch_size: int, *, drop_single: bool) -> None:
        self.features = features
        self.targets = targets
        self.batch_size = batch_size
        self.drop_single = drop_single
        self.order = torch.arange(features.shape[0])

    def set_order(self, order: torch.Tensor) -> None:
        """Use ``order`` (a permutation of 0..n-1, shape (n,)) for the next iteration."""
        self.order = order

    def __len__(self) -> int:
        n = int(self.features.shape[0])
        full, rest = divmod(n, self.batch_size)
        return full + (1 if rest > (1 if self.drop_single else 0) else 0)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.order[i * self.batch_size : (i + 1) * self.batch_size].numpy()
        # numpy's row gather: the same values as ``features[idx]``, but a memcpy per row where
        # torch's advanced indexing runs an element-wise kernel (5-20x slower on 2 CPU threads)
        x = np.take(self.features.numpy(), idx, axis=0)
        return torch.from_numpy(x), torch.from_numpy(np.take(self.targets.numpy(), idx))


class StreamBatches(IterableDataset):
    """``stream`` mode: batch-sized contiguous chunks read from the database, never the whole file.

    The file's rows are cut into chunks of ``batch_size`` contiguous rows. An epoch reads the
    chunks in a seeded random order (``set_epoch``), keeps the rows of ``mask`` and passes them
    through a shuffle buffer of ``STREAM_BUFFER_BATCHES`` batches: once full, a random batch is
    drawn from it, so batch contents change from epoch to epoch while at most
    ``(STREAM_BUFFER_BATCHES + 1) * batch_size`` rows are held. The buffer is one preallocated
    pool of that many rows: a drawn batch's holes are filled from the pool's tail, so each batch
    costs O(batch_size) copies, not a copy of the whole buffer.

    Without shuffling (validation) only the rows of ``mask`` are read, in file order: the spans of
    ``row_spans`` (runs of selected rows, merged across gaps shorter than
    ``batch_size // STREAM_GAP_FRACTION`` rows, at most ``batch_size`` rows per read), packed into
    full batches of ``batch_size`` rows. A validation set of whole polygons (20 % of L+V) is thus
    read as 20 % of the file, not as every chunk that holds one of its rows, and crosses to the
    training process in a fifth of the batches; at most ``2 * batch_size`` rows are held.

    With several workers, worker ``w`` of ``W`` reads chunks ``order[w::W]`` (spans ``[w::W]``
    without shuffling) with its own buffer.

    Args:
        reader: the feature rows, shape (n, nb_dates, nb_components).
        targets: class index of every row of the file, shape (n,), int64.
        mask: rows to use, shape (n,), bool.
        batch_size: rows per chunk and per batch.
        shuffle: shuffle chunks and rows (training) or not (validation).
        drop_single: skip a final batch of exactly one sample.
    """

    def __init__(
        self,
        reader: FeatureReader,
        targets: np.ndarray,
        mask: np.ndarray,
        batch_size: int,
        *,
        shuffle: bool,
        drop_single: bool,
    ) -> None:
        super().__init__()
        self.reader = reader
        self.targets = targets
        self.mask = mask
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_single = drop_single
        n = int(targets.shape[0])
        self.nb_chunks = (n + batch_size - 1) // batch_size
        # only chunks holding at least one selected row are read
        per_chunk = np.add.reduceat(mask.astype(np.int64), np.arange(0, n, batch_size)) if n else np.zeros(0, np.int64)
        self.chunks = np.flatnonzero(np.asarray(per_chunk) > 0)
        self.chunk_order = self.chunks.copy()
        # without shuffling: the selected rows in file order, read span by span (below)
        self.spans = row_spans(mask, max_rows=batch_size, max_gap=max(1, batch_size // STREAM_GAP_FRACTION))
        self.buffer_seed = 0
        self.max_buffered = 0  # largest number of rows held at once (main-process diagnostics)

    def set_epoch(self, generator: torch.Generator) -> None:
        """Draw this epoch's chunk order and buffer seed from ``generator`` (when shuffling)."""
        if not self.shuffle:
            return
        perm = torch.randperm(len(self.chunks), generator=generator).numpy()
        self.chunk_order = self.chunks[perm]
        self.buffer_seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())

    def _emit(self, x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        if not self.shuffle:
            yield from self._iter_in_order(self.spans[wid::nw])
            return
        chunks = self.chunk_order[wid::nw]
        bs = self.batch_size
        rng = np.random.default_rng([self.buffer_seed, wid])
        capacity = STREAM_BUFFER_BATCHES * bs
        # the shuffle buffer: rows 0..held-1 of a preallocated pool of capacity + bs rows (a chunk
        # adds at most bs rows to a buffer holding fewer than capacity)
        pool_x: np.ndarray | None = None
        pool_y = np.empty(capacity + bs, dtype=self.targets.dtype)
        held = 0
        for c in chunks.tolist():
            start, stop = c * bs, min(self.reader.n, (c + 1) * bs)
            keep = self.mask[start:stop]
            x = self.reader.read(start, stop)
            y = self.targets[start:stop]
            if not keep.all():
                x, y = x[keep], y[keep]
            if pool_x is None:
                pool_x = np.empty((capacity + bs, *x.shape[1:]), dtype=x.dtype)
            m = x.shape[0]
            pool_x[held : held + m] = x
            pool_y[held : held + m] = y
            held += m
            self.max_buffered = max(self.max_buffered, held)
            while held >= capacity:
                take = rng.permutation(held)[:bs]
                yield self._emit(pool_x[take], pool_y[take])  # fancy indexing copies the rows
                held = _fill_holes(pool_x, pool_y, take, held)
        if held:
            assert pool_x is not None
            perm = rng.permutation(held)
            for i in range(0, held, bs):
                take = perm[i : i + bs]
                if take.size == 1 and self.drop_single:
                    continue
                yield self._emit(pool_x[take], pool_y[take])

    def _iter_in_order(self, spans: np.ndarray) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The selected rows of ``spans`` ((k, 2) [start, stop) row ranges) in file order, packed
        into full batches of ``batch_size`` rows (the last one may be shorter)."""
        bs = self.batch_size
        out_x: np.ndarray | None = None
        out_y = np.empty(bs, dtype=self.targets.dtype)
        filled = 0
        for start, stop in spans.tolist():
            keep = self.mask[start:stop]
            x = self.reader.read(start, stop)
            y = self.targets[start:stop]
            if not keep.all():
                x, y = x[keep], y[keep]
            if out_x is None:
                out_x = np.empty((bs, *x.shape[1:]), dtype=x.dtype)
            self.max_buffered = max(self.max_buffered, filled + x.shape[0])
            pos = 0
            while pos < x.shape[0]:
                take = min(bs - filled, x.shape[0] - pos)
                out_x[filled : filled + take] = x[pos : pos + take]
                out_y[filled : filled + take] = y[pos : pos + take]
                filled += take
                pos += take
                if filled == bs:
                    yield torch.from_numpy(out_x), torch.from_numpy(out_y)
                    # a new buffer per batch: the one just yielded may still be in use
                    out_x, out_y, filled = np.empty_like(out_x), np.empty_like(out_y), 0
        if filled and not (filled == 1 and self.drop_single):
            assert out_x is not None
            yield torch.from_numpy(out_x[:filled]), torch.from_numpy(out_y[:filled])


def row_spans(mask: np.ndarray, *, max_rows: int, max_gap: int) -> np.ndarray:
    """Row ranges to read so that every selected row is read once, in file order.

    The runs of consecutive selected rows of ``mask`` (shape (n,), bool) are merged when fewer
    than ``max_gap`` unselected rows separate them (one read of a few extra rows costs less than
    one more read call), then cut into pieces of at most ``max_rows`` rows. Returns an int64
    array of shape (k, 2): [start, stop) of each read, increasing, each holding a selected row.
    """
    idx = np.flatnonzero(mask)
    if idx.size == 0:
        return np.zeros((0, 2), dtype=np.int64)
    breaks = np.flatnonzero(np.diff(idx) > max_gap) + 1
    starts = idx[np.concatenate(([0], breaks))]
    stops = idx[np.concatenate((breaks - 1, [idx.size - 1]))] + 1
    pieces = (stops - starts + max_rows - 1) // max_rows
    first = np.repeat(starts, pieces)
    offset = np.arange(int(pieces.sum())) - np.repeat(np.cumsum(pieces) - pieces, pieces)
    span_start = first + offset * max_rows
    span_stop = np.minimum(span_start + max_rows, np.repeat(stops, pieces))
    spans = np.stack([span_start, span_stop], axis=1).astype(np.int64)
    # a piece cut inside a merged gap may hold no selected row: drop it
    count = np.add.reduceat(np.concatenate([mask.astype(np.int64), [0]]), spans.ravel())[::2]
    return spans[count > 0]


def _fill_holes(pool_x: np.ndarray, pool_y: np.ndarray, taken: np.ndarray, held: int) -> int:
    """Remove the rows ``taken`` from the first ``held`` rows of the pool; return the new count.

    The rows left in the tail ``[held - len(taken), held)`` move into the holes that ``taken``
    left before it, so the pool stays contiguous while at most ``len(taken)`` rows are copied
    (not the whole buffer). Args: pool_x (rows, ...), pool_y (rows,), taken: distinct row
    indices < held.
    """
    new_held = held - taken.shape[0]
    is_taken = np.zeros(held, dtype=bool)
    is_taken[taken] = True
    holes = taken[taken < new_held]
    movers = new_held + np.flatnonzero(~is_taken[new_held:])
    if holes.size:
        pool_x[holes] = pool_x[movers]
        pool_y[holes] = pool_y[movers]
    return new_held


def make_loader(dataset: Dataset, *, num_workers: int, generator: torch.Generator, pin_memory: bool) -> DataLoader:
    """Wrap a batch dataset in a DataLoader (``batch_size=None``: items already are batches)."""
    return DataLoader(
        dataset,
        batch_size=None,
        shuffle=False,
        num_workers=num_workers,
        generator=generator,
        pin_memory=pin_memory,
        persistent_workers=False,
    )
