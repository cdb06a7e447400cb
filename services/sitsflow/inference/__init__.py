"""Inference stage: classify one (tile, chunk, seed) with the selected model of each region.

The chunk's window alone is read (local or object storage), in block-aligned sub-windows so that
memory stays bounded (``FeaturePipeline.read_windows``), into reused buffers: on a GPU, or with
inputs on object storage or HTTP, reading threads read ahead while the network classifies the
current sub-window; on the CPU with local inputs the classifying thread reads each one in turn
(:func:`reader_threads`); nodata areas are skipped after a cheap probe. The shared feature pipeline
computes the features of the pixels that have at least one clear acquisition (nodata and fully
masked pixels never reach the network): by default the reads hand the predictor the observations
as read and it computes the features batch by batch on the network's device
(:func:`device_features`); each region's selected model (``model/model_R_seed_S.txt``)
classifies its region's pixels in batches, on the GPU when there is one. Outputs per region model,
in ``classif/`` with iota2's names: the classification (class codes, 0 = nodata), the confidence
(max probability) and, with ``arg_classification.enable_probability_map``, the probabilities
(0-1000, one band per class); with seed 0 also the number of clear acquisitions per pixel. Each
output records the model fingerprint and the window (GeoTIFF tags), and the task's manifest lists
them: merging refuses chunks made by another model or on another window.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import shapely
from rasterio.windows import Window
from rasterio.windows import transform as window_transform

from sitsflow import layout, manifest, nn, process
from sitsflow.errors import BadInputError
from sitsflow.features import FeaturePipeline, ReadBuffers
from sitsflow.inference.writer import ChunkWriter
from sitsflow.log import get_logger
from sitsflow.planning import chunk_windows, sampled_regions
from sitsflow.reference import burn, read_polygons
from sitsflow.selection import load_selected

log = get_logger(__name__)

STAGE = "inference"

READERS = max(1, min(2, process.usable_cpus()))
"""Threads reading ahead of a network on the CPU when an input is remote (object storage, HTTP):
they hide the requests' latency (2; 1 on one CPU)."""


def reader_threads(gpu: bool = False, remote: bool = True) -> int:
    """How many threads read ahead of the network: ``SITSFLOW_READERS`` when set (0: none, each
    sub-window is read by the classifying thread just before it is classified; else that many);
    else every usable CPU when a GPU runs the network (reading is then the bound), :data:`READERS`
    on the CPU when an input is ``remote``, and 0 on the CPU with local inputs only: there is no
    latency to hide, and reading threads only take the cores from the network's (docs/benchmarks.md:
    the L-TAE's stage 201-208 k px/s without, 170-191 k with two on 2 cores)."""
    text = os.environ.get("SITSFLOW_READERS", "").strip()
    if not text:
        return process.usable_cpus() if gpu else (READERS if remote else 0)
    if not text.isdigit():
        raise BadInputError(
            f"SITSFLOW_READERS must be 0 (no reading thread) or a positive integer (reading threads), got {text!r}"
        )
    return int(text)


def device_features() -> bool:
    """Whether the network's device computes the features (``SITSFLOW_DEVICE_FEATURES``: ``1``, the
    default, or ``0``): the reads then hand it the observations as read (the files' integers and
    valid flags, :class:`~sitsflow.features.compute.RawFeatures`), which it converts, merges and
    gap-fills batch by batch (on a GPU on the device, on the CPU in cache-sized batches), instead
    of float32 features computed part by part by the reads. Only where every sensor reads native
    values (:attr:`~sitsflow.features.FeaturePipeline.native`)."""
    text = os.environ.get("SITSFLOW_DEVICE_FEATURES", "").strip() or "1"
    if text not in ("1", "0"):
        raise BadInputError(
            "SITSFLOW_DEVICE_FEATURES must be 1 (the network's device computes the features) or 0 "
            f"(the reads do), got {text!r}"
        )
    return text == "1"


class _ReadLater:
    """A read made when its result is asked for (no reading thread: the classifying thread reads)."""

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        self._fn, self._args = fn, args

    def result(self) -> Any:
        return self._fn(*self._args)


def model_classes(description: dict) -> list[int]:
    """Class codes in the order of the network's outputs."""
    return [int(c) for c in description["classes"]]


def _profile(pipe: FeaturePipeline, window: Window, dtype: str, count: int, nodata) -> dict:
    h, w = int(window.height), int(window.width)
    profile = {
        "driver": "GTiff",
        "dtype": dtype,
        "count": count,
        "width": w,
        "height": h,
        "crs": pipe.grid.crs,
        "transform": window_transform(window, pipe.grid.transform),
        "compress": "deflate",
        "nodata": nodata,
    }
    if w >= 256 and h >= 256:
        profile.update(tiled=True, blockxsize=256, blockysize=256)
    return profile


def _add_outputs(
    writer: ChunkWriter, cfg, pipe: FeaturePipeline, window: Window, models: dict, tile: str, chunk: int, seed: int
) -> dict:
    """Create the chunk's output rasters in ``writer``; return their URIs by (region, kind) and "validity"."""
    out = cfg.chain.output_path
    prob_map = cfg.arg_classification.enable_probability_map
    uris: dict[tuple[int, str] | str, str] = {}
    for region, (_, desc) in models.items():
        tags = {
            layout.TAG_MODEL_FINGERPRINT: desc["fingerprint"],
            layout.TAG_WINDOW: json.dumps(layout.window_tuple(window)),
            layout.TAG_TILE: tile,
            layout.TAG_CHUNK: str(chunk),
            layout.TAG_SEED: str(seed),
        }
        uris[region, "classif"] = layout.chunk_classif(out, tile, region, seed, chunk)
        writer.add(uris[region, "classif"], _profile(pipe, window, "uint16", 1, 0), tags)
        uris[region, "confidence"] = layout.chunk_confidence(out, tile, region, seed, chunk)
        writer.add(uris[region, "confidence"], _profile(pipe, window, "float32", 1, None), tags)
        if prob_map:
            codes = [str(c) for c in model_classes(desc)]
            uris[region, "probamap"] = layout.chunk_probamap(out, tile, region, seed, chunk)
            writer.add(uris[region, "probamap"], _profile(pipe, window, "uint16", len(codes), None), tags, codes)
    if seed == 0:
        uris["validity"] = layout.chunk_validity(out, tile, chunk)
        writer.add(
            uris["validity"],
            _profile(pipe, window, "int16", 1, None),
            {layout.TAG_WINDOW: json.dumps(layout.window_tuple(window))},
        )
    return uris


def run(cfg, tile: str, chunk: int, seed: int) -> dict:
    """Classify one chunk; return the JSON summary (``skipped`` when already done)."""
    out = cfg.chain.output_path
    pipe = FeaturePipeline(cfg, tile)
    windows = chunk_windows(cfg, pipe.grid.width, pipe.grid.height)
    if not 0 <= chunk < len(windows):
        raise BadInputError(f"tile {tile!r} has {len(windows)} chunks (0..{len(windows) - 1}); got chunk {chunk}")
    if not 0 <= seed < cfg.arg_train.runs:
        raise BadInputError(f"seed {seed} is out of range: arg_train.runs is {cfg.arg_train.runs}")
    window = windows[chunk]
    regions_with_models = sampled_regions(cfg)
    models = {r: load_selected(cfg, r, seed) for r in regions_with_models}
    prob_map = cfg.arg_classification.enable_probability_map
    fp = manifest.fingerprint(
        STAGE,
        {r: d["fingerprint"] for r, (_, d) in models.items()},
        layout.window_tuple(window),
        pipe.description(),
        cfg.section_dict("dated_raster"),
        prob_map,
    )
    task = layout.inference_task(tile, chunk, seed)
    previous = manifest.done(out, STAGE, task, fp)
    if previous:
        log.info("inference %s: up to date", task)
        return previous["summary"] | {"skipped": True}
    for region, (_, desc) in models.items():
        if list(desc.get("feature_names", pipe.feature_names)) != pipe.feature_names:
            raise BadInputError(
                f"model {layout.model_selected(out, region, seed)} was trained on other features "
                f"({len(desc.get('feature_names', []))} features) than tile {tile!r} yields "
                f"({len(pipe.feature_names)}): rerun sampling and training"
            )
    regions = region_tree = None
    if cfg.chain.region_path:
        regions, _ = read_polygons(
            cfg.chain.region_path, cfg.chain.region_field, "chain.region_path", crs=pipe.grid.crs
        )
        region_tree = shapely.STRtree(regions.geoms)

    h, w = int(window.height), int(window.width)
    classified = 0
    seen_regions: set[int] = set()
    subs = pipe.read_windows(window)

    timings = {"read_s": 0.0, "wait_read_s": 0.0, "classify_s": 0.0}
    lock = threading.Lock()

    def read(sub: Window, buffers: ReadBuffers, probe: bool):
        tic = time.perf_counter()
        region_map = (
            burn(regions, sub, pipe.grid.transform, tree=region_tree)
            if regions is not None
            else np.ones((int(sub.height), int(sub.width)), np.int64)
        )
        result = sub, region_map, pipe.features(sub, select=region_map > 0, buffers=buffers, probe=probe, native=native)
        with lock:
            timings["read_s"] += time.perf_counter() - tic
        return result

    # one predictor per model: the network's inference form (folded; on CUDA compiled, in bf16)
    predictors = {region: nn.Predictor(net) for region, (net, _) in models.items()}
    gpu = any(p.device.type == "cuda" for p in predictors.values())
    native = pipe.native and device_features()
    readers = min(reader_threads(gpu, pipe.reader.remote), len(subs))
    ahead = max(1, readers)
    buffers = [ReadBuffers() for _ in range(readers + 1)]
    # READERS threads read and compute the features of the next sub-windows while the network
    # classifies the current one (GDAL decodes each read's blocks on every core), and the writer
    # thread writes the previous ones. READERS + 1 sets of buffers go round: sub-window
    # k + READERS is submitted once sub-window k - 1 is classified, so it never reuses a set still
    # in use. Without reading threads, sub-window k + 1 is read when it is its turn, after k is
    # classified (the writer gets fresh arrays, never the buffers): one set serves them all.
    # Nodata areas are contiguous (outside the swath): after a sub-window without any valid
    # observation, the next ones are probed cheaply before they are read (the first ones too).

    def submit(k: int, probe: bool) -> Any:
        args = (subs[k], buffers[k % len(buffers)], probe)
        return pool.submit(read, *args) if readers else _ReadLater(read, *args)

    with ChunkWriter() as writer, ThreadPoolExecutor(max_workers=ahead, thread_name_prefix="sitsflow-read") as pool:
        uris = _add_outputs(writer, cfg, pipe, window, models, tile, chunk, seed)
        pending = {k: submit(k, True) for k in range(ahead)}
        for k in range(len(subs)):
            tic = time.perf_counter()
            sub, region_map, block = pending.pop(k).result()
            timings["wait_read_s"] += time.perf_counter() - tic
            nxt = k + ahead
            if nxt < len(subs):
                pending[nxt] = submit(nxt, not block.clear_dates.any())
            sh, sw = int(sub.height), int(sub.width)
            local = Window(int(sub.col_off - window.col_off), int(sub.row_off - window.row_off), sw, sh)
            if seed == 0:
                writer.write(uris["validity"], block.clear_dates, local)
            if regions is not None:
                seen_regions.update(int(v) for v in np.unique(region_map))
            rr = block.rows - int(sub.row_off)
            cc = block.cols - int(sub.col_off)
            pix_region = region_map[rr, cc]
            x = block.raw if block.raw is not None else block.values
            for region, (_net, desc) in models.items():
                labels = np.zeros((sh, sw), np.uint16)
                confidence = np.zeros((sh, sw), np.float32)
                probas = np.zeros((len(model_classes(desc)), sh, sw), np.uint16) if prob_map else None
                sel = pix_region == region
                if sel.any():
                    tic = time.perf_counter()
                    lab, conf, prob = predictors[region].classify(
                        x[sel] if not sel.all() else x,
                        model_classes(desc),
                        probabilities=prob_map,
                    )
                    timings["classify_s"] += time.perf_counter() - tic
                    labels[rr[sel], cc[sel]] = lab
                    confidence[rr[sel], cc[sel]] = conf
                    if probas is not None and prob is not None:
                        probas[:, rr[sel], cc[sel]] = prob
                    classified += int(sel.sum())
                writer.write(uris[region, "classif"], labels, local)
                writer.write(uris[region, "confidence"], confidence, local)
                if probas is not None:
                    writer.write(uris[region, "probamap"], probas, local)
    timings["write_s"], timings["wait_write_s"] = writer.busy_s, writer.wait_s
    for key in ("copy_s", "features_s", "compute_s"):
        timings[key] = sum(p.seconds[key] for p in predictors.values())
    timings["parts"] = len(subs)
    log.info(
        "inference %s: %s",
        task,
        ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in timings.items()),
    )
    unmodelled = seen_regions - set(models) - {0}
    if unmodelled:
        log.warning(
            "tile %s chunk %d: regions %s have no model (no samples): their pixels stay 0",
            tile,
            chunk,
            sorted(unmodelled),
        )
    outputs = writer.uris
    summary = {
        "stage": STAGE,
        "tile": tile,
        "chunk": chunk,
        "seed": seed,
        "window": layout.window_tuple(window),
        "pixels": h * w,
        "classified": classified,
        "models": {str(r): d["fingerprint"] for r, (_, d) in models.items()},
    }
    manifest.write_manifest(
        out, STAGE, task, fp, outputs, {"summary": summary, "models": summary["models"], "window": summary["window"]}
    )
    # where the time went (not in the manifest: it changes from run to run). read_s is summed over
    # the reading threads (without any, the classifying thread's reads, which wait_read_s then
    # includes); wait_* are the main loop's waits; copy_s/compute_s are CUDA-side times
    return summary | {"skipped": False, "timings": {k: round(v, 3) for k, v in timings.items()}}
