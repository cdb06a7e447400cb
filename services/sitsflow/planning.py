"""The task lists an orchestrator fans out over (``sitsflow plan ...``), and the chunk grid.

Chunks follow iota2's ``python_data_managing``: ``split_number`` cuts the tile into
``number_of_chunks`` full-width horizontal strips (row bounds ``floor(linspace(0, height, n+1))``;
empty strips, when there are more chunks than rows, are dropped); ``user_fixed`` cuts it into a
grid of ``chunk_size_x`` × ``chunk_size_y`` pixel blocks, row-major.
"""

from __future__ import annotations

import numpy as np
from rasterio.windows import Window

from sitsflow import layout, manifest
from sitsflow.errors import BadInputError
from sitsflow.features import tile_grid


def chunk_windows(cfg, width: int, height: int) -> list[Window]:
    """The chunks of a ``width`` × ``height`` tile, in chunk-number order."""
    pdm = cfg.python_data_managing
    if pdm.chunk_size_mode == "split_number":
        bounds = np.floor(np.linspace(0, height, pdm.number_of_chunks + 1)).astype(int)
        return [Window(0, int(a), width, int(b - a)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    windows = []
    for row in range(0, height, pdm.chunk_size_y):
        for col in range(0, width, pdm.chunk_size_x):
            windows.append(Window(col, row, min(pdm.chunk_size_x, width - col), min(pdm.chunk_size_y, height - row)))
    return windows


def tile_chunks(cfg, tile: str) -> list[Window]:
    """The chunks of one tile (reads only the raster's metadata)."""
    grid = tile_grid(cfg, tile)
    return chunk_windows(cfg, grid.width, grid.height)


def sampled_regions(cfg) -> list[int]:
    """The regions that have samples, from the sampling stage's manifest."""
    m = manifest.read_manifest(cfg.chain.output_path, "sampling", layout.ALL)
    if m is None:
        raise BadInputError(
            f"no sampling manifest under {cfg.chain.output_path}: run the sampling stage (sitsflow sample) first"
        )
    return [int(r) for r in m["regions"]]


def plan_training(cfg) -> list[dict]:
    """One task per (region, seed, hyperparameter pair)."""
    pairs = cfg.dl.hyperparameter_pairs()
    return [
        {"region": r, "seed": s, "hyp": h}
        for r in sampled_regions(cfg)
        for s in range(cfg.arg_train.runs)
        for h in range(len(pairs))
    ]


def plan_selection(cfg) -> list[dict]:
    """One task per (region, seed)."""
    return [{"region": r, "seed": s} for r in sampled_regions(cfg) for s in range(cfg.arg_train.runs)]


def plan_inference(cfg) -> list[dict]:
    """One task per (tile, chunk, seed)."""
    tasks = []
    for tile in cfg.chain.tiles:
        nb = len(tile_chunks(cfg, tile))
        tasks += [{"tile": tile, "chunk": k, "seed": s} for s in range(cfg.arg_train.runs) for k in range(nb)]
    return tasks


PLANS = {"training": plan_training, "selection": plan_selection, "inference": plan_inference}
