"""Merging stage: chunks -> tile maps (``classif/``) -> final products and report (``final/``).

For every tile and seed, the chunks planned for the current configuration are checked (each
chunk's manifest must exist, cover the planned window and name the fingerprint of the currently
selected model: a stale chunk is refused, never merged) and assembled, window by window, into
``classif/Classif_{tile}_model_{R}_seed_{S}.tif`` (plus confidence and probabilities). The final
products are Cloud-Optimized GeoTIFFs, mosaicked over tiles and regions:
``Classif_Seed_S.tif``, ``Classif_Seed_S_ColorIndexed.tif``, ``Confidence_Seed_S.tif`` (0-100),
``ProbabilityMap_seed_S.tif`` (0-1000, with ``generate_final_probability_map``),
``PixelsValidity.tif`` (clear acquisitions per pixel), a PNG quick-look with a legend, and the
validation report ``RESULTS.txt`` / ``RESULTS.json`` measured on the test polygons.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pystac
import rasterio
import rasterio.shutil
from rasterio.merge import merge as rio_merge
from rasterio.windows import Window

from sitsflow import layout, manifest, storage
from sitsflow.accuracy import area_weighted, evaluate
from sitsflow.errors import BadInputError
from sitsflow.log import get_logger
from sitsflow.merging import stac
from sitsflow.merging.report import write_reports
from sitsflow.nn.predict import PROBABILITY_SCALE
from sitsflow.planning import sampled_regions, tile_chunks
from sitsflow.reference import read_color_table, read_nomenclature
from sitsflow.samples import load_samples
from sitsflow.selection import load_selected

log = get_logger(__name__)

STAGE = "merging"

# (layout function of chunks, of the tile file, dtype, nodata)
_KINDS = {
    "classif": (layout.chunk_classif, layout.tile_classif, "uint16", 0),
    "confidence": (layout.chunk_confidence, layout.tile_confidence, "float32", None),
    "probamap": (layout.chunk_probamap, layout.tile_probamap, "uint16", None),
}


def _check_chunks(cfg, tile: str, seed: int, windows: list[Window], fingerprints: dict[int, str]) -> list[dict]:
    """Return the chunk manifests, refusing missing, stale or misplaced chunks."""
    out = cfg.chain.output_path
    manifests = []
    for k, window in enumerate(windows):
        task = layout.inference_task(tile, k, seed)
        m = manifest.read_manifest(out, "inference", task)
        if m is None or not all(storage.exists(u) for u in m["outputs"]):
            raise BadInputError(
                f"chunk {k} of tile {tile!r} (seed {seed}) has not been classified: "
                f"run `sitsflow infer --tile {tile} --chunk {k} --seed {seed}`"
            )
        if m["window"] != layout.window_tuple(window):
            raise BadInputError(
                f"chunk {k} of tile {tile!r} covers window {m['window']}, "
                f"but the plan says {layout.window_tuple(window)}: rerun inference"
            )
        stale = {r: fp for r, fp in fingerprints.items() if m["models"].get(str(r)) != fp}
        if stale:
            raise BadInputError(
                f"stale chunk {k} of tile {tile!r} (seed {seed}): it was made by model(s) "
                f"{ {r: m['models'].get(str(r), 'none')[:12] for r in stale} }, the selected model(s) are "
                f"{ {r: fp[:12] for r, fp in stale.items()} }: rerun inference for this chunk"
            )
        manifests.append(m)
    return manifests


def _assemble(chunk_uris: list[str], windows: list[Window], dst_uri: str, fingerprint: str) -> None:
    """Write a tile raster from its chunks, window by window (memory: one chunk at a time)."""

    def header():
        with rasterio.open(storage.rasterio_path(chunk_uris[0])) as first:
            return first.profile.copy(), first.descriptions, first.transform

    def read_chunk(uri: str, window: Window):
        with rasterio.open(storage.rasterio_path(uri)) as src:
            if src.tags().get(layout.TAG_WINDOW) != json.dumps(layout.window_tuple(window)):
                raise BadInputError(f"{uri} does not cover the planned window {layout.window_tuple(window)}")
            if fingerprint and src.tags().get(layout.TAG_MODEL_FINGERPRINT) != fingerprint:
                raise BadInputError(f"stale chunk {uri}: its model fingerprint differs from the selected model's")
            return src.read()

    with storage.rasterio_env():
        profile, descriptions, transform0 = storage.raster_call("open", chunk_uris[0], header)
        width = max(int(w.col_off + w.width) for w in windows)
        height = max(int(w.row_off + w.height) for w in windows)
        # the chunk's transform is the tile's, shifted by its window: recover the tile origin
        origin = transform0 @ (-windows[0].col_off, -windows[0].row_off)
        transform = rasterio.Affine(transform0.a, transform0.b, origin[0], transform0.d, transform0.e, origin[1])
        profile.update(width=width, height=height, transform=transform, driver="GTiff", compress="deflate")
        if width >= 256 and height >= 256:
            profile.update(tiled=True, blockxsize=256, blockysize=256)
        else:
            profile.pop("blockxsize", None)
            profile.pop("blockysize", None)
            profile["tiled"] = False
        with storage.output_path(dst_uri, suffix=".tif") as tmp:
            with rasterio.open(tmp, "w", **profile) as dst:
                for uri, window in zip(chunk_uris, windows):
                    dst.write(
                        storage.raster_call("read", uri, lambda: read_chunk(uri, window)),  # noqa: B023 (called at once)
                        window=window,
                    )
                for i, d in enumerate(descriptions, 1):
                    if d:
                        dst.set_band_description(i, d)
                if fingerprint:
                    dst.update_tags(**{layout.TAG_MODEL_FINGERPRINT: fingerprint})


CONFIDENCE_SCALE = 100.0
"""The final confidence maps hold the confidence (0-1) times it, as integers."""

MOSAIC_BUDGET_BYTES = 256 * 1024 * 1024
"""Mosaic data held at once while a final product is written (it is written in row strips)."""

MOSAIC_ROW_ALIGN = 256
"""The strips' rows are a multiple of it (the output's block rows)."""


def _to_cog(
    src_uris: list[str],
    dst_path: str,
    *,
    dtype: str,
    nodata,
    scale: float = 1.0,
    method: str = "first",
    colormap: dict | None = None,
) -> None:
    """Mosaic the rasters ``src_uris``, optionally rescale, and write a COG at the local ``dst_path``.

    The mosaic is written in row strips of about :data:`MOSAIC_BUDGET_BYTES` (a whole tile's
    probability map can take gigabytes), then GDAL's COG driver copies it (tiles, overviews).
    Transient read trouble redoes the whole mosaic (see :func:`storage.raster_call`).
    """
    with storage.rasterio_env():
        storage.raster_call(
            "mosaic",
            src_uris,
            lambda: _mosaic_cog(
                src_uris, dst_path, dtype=dtype, nodata=nodata, scale=scale, method=method, colormap=colormap
            ),
        )


def _publish_cog(plain: str, dst_path: str) -> None:
    """Copy the staged GeoTIFF ``plain`` to ``dst_path`` as a COG: the one COG layout of every final
    product (DEFLATE, 256-px blocks, nearest overviews, BigTIFF when needed)."""
    rasterio.shutil.copy(
        plain,
        dst_path,
        driver="COG",
        compress="DEFLATE",
        overview_resampling="nearest",
        blocksize=256,
        BIGTIFF="IF_SAFER",
    )


def _open_all(paths: list[str]) -> list[Any]:
    """The rasters ``paths`` opened; those already open are closed when a later one fails."""
    sources: list[Any] = []
    try:
        for path in paths:
            sources.append(rasterio.open(path))
    except BaseException:
        for src in sources:
            src.close()
        raise
    return sources


def _mosaic_cog(
    src_uris: list[str], dst_path: str, *, dtype: str, nodata, scale: float, method: str, colormap: dict | None
) -> None:
    with storage.scratch_dir("sitsflow-cog-") as tmpdir:
        sources = _open_all([storage.rasterio_path(u) for u in src_uris])
        try:
            first = sources[0]
            if len(sources) == 1:
                transform, width, height = first.transform, first.width, first.height
            else:
                res = (abs(first.transform.a), abs(first.transform.e))
                west = min(src.bounds.left for src in sources)
                north = max(src.bounds.top for src in sources)
                width = round((max(src.bounds.right for src in sources) - west) / res[0])
                height = round((north - min(src.bounds.bottom for src in sources)) / res[1])
                transform = rasterio.Affine(res[0], 0.0, west, 0.0, -res[1], north)
            count = first.count
            profile = {
                "driver": "GTiff",
                "dtype": dtype,
                "count": count,
                "width": width,
                "height": height,
                "crs": first.crs,
                "transform": transform,
                "nodata": nodata,
                "BIGTIFF": "IF_SAFER",
            }
            if width >= 256 and height >= 256:
                profile.update(tiled=True, blockxsize=256, blockysize=256)
            per_row = width * count * 8  # the float64 rescaling at worst
            step = max(MOSAIC_ROW_ALIGN, MOSAIC_BUDGET_BYTES // max(1, per_row) // MOSAIC_ROW_ALIGN * MOSAIC_ROW_ALIGN)
            plain = str(Path(tmpdir) / "plain.tif")
            with rasterio.open(plain, "w", **profile) as dst:
                for row in range(0, height, step):
                    window = Window(0, row, width, min(step, height - row))
                    if len(sources) == 1:
                        data = first.read(window=window)
                    else:
                        bounds = rasterio.windows.bounds(window, transform)
                        data, _ = rio_merge(
                            sources,
                            bounds=bounds,
                            res=(abs(transform.a), abs(transform.e)),
                            nodata=nodata if nodata is not None else 0,
                            method=method,
                        )
                        if data.shape[1:] != (int(window.height), width):
                            raise RuntimeError(f"mosaic strip {data.shape} does not match {window}")
                    if scale != 1.0:
                        data = np.rint(data.astype(np.float64) * scale)
                    dst.write(data.astype(dtype), window=window)
                for i, d in enumerate(first.descriptions, 1):
                    if d:
                        dst.set_band_description(i, d)
                if colormap:
                    dst.write_colormap(1, colormap)
        finally:
            for src in sources:
                src.close()
        _publish_cog(plain, dst_path)


def _default_colors(codes: list[int]) -> dict[int, tuple[int, ...]]:
    import matplotlib

    cmap = matplotlib.colormaps["tab20"]
    return {c: tuple(int(255 * v) for v in cmap(i % 20)[:3]) for i, c in enumerate(sorted(codes))}


def _quicklook(classif_path: str, dst_path: str, colors: dict, names: dict, seed: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    with storage.rasterio_env(), rasterio.open(classif_path) as src:
        step = max(1, max(src.width, src.height) // 2000)
        data = src.read(
            1,
            out_shape=(max(1, src.height // step), max(1, src.width // step)),
            resampling=rasterio.enums.Resampling.nearest,
        )
    codes = sorted(int(c) for c in np.unique(data) if c != 0)
    lut = np.zeros(int(data.max()) + 1, np.int64)
    palette = [(1.0, 1.0, 1.0)]
    for i, c in enumerate(codes, 1):
        lut[c] = i
        palette.append(tuple(v / 255 for v in colors.get(c, (0, 0, 0))))
    fig, ax = plt.subplots(figsize=(8, 7))
    ax.imshow(lut[data], cmap=ListedColormap(palette), vmin=0, vmax=len(palette) - 1, interpolation="nearest")
    ax.set_title(f"Classification, seed {seed}")
    ax.set_axis_off()
    handles = [Patch(color=palette[i], label=f"{c} {names.get(c, '')}".strip()) for i, c in enumerate(codes, 1)]
    handles.append(Patch(facecolor="white", edgecolor="black", label="0 no data"))
    ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), title="Classes")
    fig.tight_layout()
    fig.savefig(dst_path, dpi=100, bbox_inches="tight", format="png")
    plt.close(fig)


def _class_pixels(path: str) -> dict[int, int]:
    """Pixel count of every class code of a local classification raster (0 = no data left out),
    read block row by block row: the strata sizes of the area-weighted estimates."""
    counts = np.zeros(1, np.int64)
    with storage.rasterio_env(), rasterio.open(path) as src:
        step = max(1, MOSAIC_BUDGET_BYTES // max(1, src.width * 8))
        for row in range(0, src.height, step):
            data = src.read(1, window=Window(0, row, src.width, min(step, src.height - row)))
            part = np.bincount(data.ravel().astype(np.int64))
            if part.size > counts.size:
                counts = np.pad(counts, (0, part.size - counts.size))
            counts[: part.size] += part
    return {c: int(v) for c, v in enumerate(counts.tolist()) if c and v}


def _read_window(uri: str, window: Window) -> np.ndarray:
    """Band 1 of ``window`` of the raster ``uri``."""

    def read():
        with rasterio.open(storage.rasterio_path(uri)) as src:
            return src.read(1, window=window)

    with storage.rasterio_env():
        return storage.raster_call("read", uri, read)


def majority_vote(labels: np.ndarray, undecided: int) -> np.ndarray:
    """OTB's majority voting over runs (iota2's fusion of the final classifications).

    ``labels``: (runs, ...) class codes, 0 = not classified. Per pixel, the code most runs give
    (runs giving 0 do not vote); a tie between several codes gives ``undecided``; no vote gives 0.
    """
    labels = np.asarray(labels)
    votes = (labels[:, None] == labels[None, :]).sum(axis=1) * (labels != 0)  # each run's code: its votes
    best = votes.max(axis=0)
    top = votes == best
    big = np.iinfo(labels.dtype).max if labels.dtype.kind in "iu" else np.inf
    low = np.where(top, labels, big).min(axis=0)
    high = np.where(top, labels, 0).max(axis=0)
    out = np.where(low == high, low, undecided).astype(labels.dtype)
    return np.where(best == 0, 0, out).astype(labels.dtype)


def _fuse(paths: list[str], dst_path: str, undecided: int, colormap: dict | None = None) -> None:
    """Write the majority vote of the local classification COGs ``paths`` (one grid) as a COG."""
    with storage.scratch_dir("sitsflow-fusion-") as tmpdir:
        sources = _open_all(paths)
        try:
            first = sources[0]
            profile = first.profile.copy()
            profile.update(driver="GTiff", nodata=0, dtype="uint16", count=1, compress="deflate")
            if colormap:
                profile["dtype"] = "uint8" if max(colormap) <= 255 else "uint16"
            step = max(MOSAIC_ROW_ALIGN, MOSAIC_BUDGET_BYTES // max(1, first.width * 2 * len(paths) ** 2))
            step = step // MOSAIC_ROW_ALIGN * MOSAIC_ROW_ALIGN
            plain = str(Path(tmpdir) / "plain.tif")
            with rasterio.open(plain, "w", **profile) as dst:
                for row in range(0, first.height, step):
                    window = Window(0, row, first.width, min(step, first.height - row))
                    stack = np.stack([src.read(1, window=window) for src in sources])
                    dst.write(majority_vote(stack, undecided).astype(profile["dtype"]), 1, window=window)
                if colormap:
                    dst.write_colormap(1, colormap)
        finally:
            for src in sources:
                src.close()
        _publish_cog(plain, dst_path)


def _run_labels(out: str, samples, region: int, runs: int) -> np.ndarray:
    """The codes each run's tile map gives the samples of ``region``: (runs, samples)."""
    assert samples.tile is not None and samples.row is not None and samples.col is not None
    labels = np.zeros((runs, len(samples)), np.uint16)
    for tile_index, tile in enumerate(samples.tiles):
        sel = samples.tile == tile_index
        if not sel.any():
            continue
        rows, cols = samples.row[sel], samples.col[sel]
        win = Window(
            int(cols.min()), int(rows.min()), int(cols.max() - cols.min() + 1), int(rows.max() - rows.min() + 1)
        )
        for seed in range(runs):
            data = _read_window(layout.tile_classif(out, tile, region, seed), win)
            labels[seed, sel] = data[rows - int(win.row_off), cols - int(win.col_off)]
    return labels


def _fusion_samples(cfg, region: int) -> Any:
    """The validation samples of the fused map in ``region``: the held-out polygons' pixels, or
    with ``fusionofclassification_all_samples_validation`` the union of the runs' test sets."""
    out = cfg.chain.output_path
    if not cfg.arg_classification.fusionofclassification_all_samples_validation:
        return load_samples(layout.samples_fusion(out, region), empty_ok=True)
    sets = [load_samples(layout.samples_test(out, region, s), empty_ok=True) for s in range(cfg.arg_train.runs)]
    # sampling's databases always carry the tile, row and col of each sample
    keys = np.concatenate([np.stack([np.asarray(s.tile), np.asarray(s.row), np.asarray(s.col)], axis=1) for s in sets])
    labels = np.concatenate([s.labels for s in sets])
    _, first = np.unique(keys, axis=0, return_index=True)
    first = np.sort(first)
    return _Pixels(sets[0].tiles, keys[first, 0], keys[first, 1], keys[first, 2], labels[first])


class _Pixels:
    """Labelled pixels (the union of the runs' test sets): what :func:`_run_labels` reads."""

    def __init__(self, tiles, tile, row, col, labels) -> None:
        self.tiles, self.tile, self.row, self.col, self.labels = tiles, tile, row, col, labels

    def __len__(self) -> int:
        return len(self.labels)


def _validate_fusion(cfg, regions: list[int], names: dict[int, str], fused_pixels: dict[int, int]) -> dict:
    """The fused map's report on its validation samples; the undecided pixels are left out of the
    confusion matrix, as iota2 does, and counted."""
    out, runs = cfg.chain.output_path, cfg.arg_train.runs
    undecided = cfg.arg_classification.merge_final_classifications_undecidedlabel
    truth, fused = [], []
    for region in regions:
        samples = _fusion_samples(cfg, region)
        if len(samples):
            truth.append(np.asarray(samples.labels))
            fused.append(majority_vote(_run_labels(out, samples, region, runs), undecided))
    labels = np.concatenate(truth) if truth else np.zeros(0, np.int64)
    preds = np.concatenate(fused) if fused else np.zeros(0, np.uint16)
    decided = preds != undecided
    if not decided.any():
        raise BadInputError(
            "no validation sample for the fused map: raise arg_classification.merge_final_classifications_ratio "
            "(each class needs 2 polygons or more in a region to have one held out), or set "
            "fusionofclassification_all_samples_validation : True"
        )
    report = evaluate(labels[decided], preds[decided], names)
    report["undecided_samples"] = int((~decided).sum())
    report["area_weighted"] = area_weighted(
        np.asarray(report["confusion_matrix"]),
        report["classes"],
        {c: n for c, n in fused_pixels.items() if c != undecided},
    )
    return report


def _merge_settings(cfg) -> dict:
    """The ``arg_classification`` keys the final products depend on; the merge's keys only when
    it is on, so that the fingerprint of a configuration without it stays that of before they existed."""
    section = cfg.section_dict("arg_classification")
    if cfg.arg_classification.merge_final_classifications:
        return section
    return {k: v for k, v in section.items() if not k.startswith(_MERGE_KEYS)}


_MERGE_KEYS = ("merge_final_classifications", "fusionofclassification_all_samples_validation", "keep_runs_results")


def run(cfg) -> dict:
    """Run the merging stage; return its JSON summary (``skipped`` when already done)."""
    out = cfg.chain.output_path
    runs = cfg.arg_train.runs
    regions = sampled_regions(cfg)
    prob = cfg.arg_classification.enable_probability_map
    models = {(r, s): load_selected(cfg, r, s)[1] for r in regions for s in range(runs)}
    plans = {tile: tile_chunks(cfg, tile) for tile in cfg.chain.tiles}
    chunk_fps = {}
    for tile, windows in plans.items():
        for seed in range(runs):
            fps = {r: models[(r, seed)]["fingerprint"] for r in regions}
            chunk_fps[(tile, seed)] = [m["fingerprint"] for m in _check_chunks(cfg, tile, seed, windows, fps)]
    fp = manifest.fingerprint(
        STAGE,
        {f"{t}/{s}": v for (t, s), v in chunk_fps.items()},
        _merge_settings(cfg),
        cfg.chain.nomenclature_path and storage.stat(cfg.chain.nomenclature_path),
        cfg.chain.color_table and storage.stat(cfg.chain.color_table),
        {"stac": pystac.get_stac_version()},  # runs merged before the catalog existed get it
    )
    previous = manifest.done(out, STAGE, layout.ALL, fp)
    if previous:
        log.info("merging: outputs are up to date")
        return previous["summary"] | {"skipped": True}

    outputs: list[str] = []
    kinds = ["classif", "confidence"] + (["probamap"] if prob else [])
    for tile, windows in plans.items():
        for seed in range(runs):
            for region in regions:
                model_fp = models[(region, seed)]["fingerprint"]
                for kind in kinds:
                    chunk_fn, tile_fn, _, _ = _KINDS[kind]
                    chunks = [chunk_fn(out, tile, region, seed, k) for k in range(len(windows))]
                    dst = tile_fn(out, tile, region, seed)
                    _assemble(chunks, windows, dst, model_fp)
                    outputs.append(dst)
        dst = layout.tile_validity(out, tile)
        _assemble([layout.chunk_validity(out, tile, k) for k in range(len(windows))], windows, dst, "")
        outputs.append(dst)

    names: dict[int, str] = read_nomenclature(cfg.chain.nomenclature_path)
    all_codes = sorted({int(c) for d in models.values() for c in d["classes"]})
    for d in models.values():
        for c, n in zip(d["classes"], d.get("class_names", [])):
            names.setdefault(int(c), n)
    colors = read_color_table(cfg.chain.color_table) or _default_colors(all_codes)

    def sources(fn, seed):
        return [fn(out, t, r, seed) for t in plans for r in regions]

    # The final products are staged and published as a set, then the manifest: a crash leaves no
    # manifest (the previous one is removed before publishing), and the rerun replaces the set.
    map_pixels: dict[int, dict[int, int]] = {}
    classif_paths: list[str] = []
    products: list[stac.Product] = []
    with storage.output_paths() as final:

        def publish(uri: str, srcs: list[str], *, described: dict | None = None, **cog: Any) -> str:
            """Mosaic ``srcs`` into the staged COG of ``uri``; ``described`` makes it a STAC item."""
            path = final.path(uri, ".tif")
            _to_cog(srcs, path, **cog)
            if described is not None:
                products.append(stac.Product(uri, path, **described))
            return path

        for seed in range(runs):
            classif = publish(
                layout.final_classif(out, seed),
                sources(layout.tile_classif, seed),
                dtype="uint16",
                nodata=0,
                described={
                    "title": f"Classification, seed {seed}",
                    "kind": "classification",
                    "seed": seed,
                    "extra_assets": [
                        (
                            "visual",
                            layout.final_classif_color(out, seed),
                            pystac.MediaType.COG,
                            f"Classification with its colour table, seed {seed}",
                            ["visual"],
                        ),
                        (
                            "overview",
                            layout.final_quicklook(out, seed),
                            pystac.MediaType.PNG,
                            f"Quick-look with a legend, seed {seed}",
                            ["overview"],
                        ),
                    ],
                },
            )
            map_pixels[seed] = _class_pixels(classif)
            classif_paths.append(classif)
            publish(
                layout.final_classif_color(out, seed),
                sources(layout.tile_classif, seed),
                dtype="uint8" if max(all_codes) <= 255 else "uint16",
                nodata=0,
                colormap={0: (255, 255, 255, 255)} | {c: (*colors.get(c, (0, 0, 0)), 255) for c in all_codes},
            )
            publish(
                layout.final_confidence(out, seed),
                sources(layout.tile_confidence, seed),
                dtype="uint8",
                nodata=None,
                scale=CONFIDENCE_SCALE,
                described={
                    "title": f"Confidence, seed {seed}",
                    "kind": "confidence",
                    "seed": seed,
                    "scale": 1 / CONFIDENCE_SCALE,
                },
            )
            if cfg.arg_classification.generate_final_probability_map:
                publish(
                    layout.final_probamap(out, seed),
                    sources(layout.tile_probamap, seed),
                    dtype="uint16",
                    nodata=None,
                    described={
                        "title": f"Probability of each class, seed {seed}",
                        "kind": "probability",
                        "seed": seed,
                        "scale": 1 / PROBABILITY_SCALE,
                    },
                )
            _quicklook(classif, final.path(layout.final_quicklook(out, seed), ".png"), colors, names, seed)
        publish(
            layout.final_validity(out),
            [layout.tile_validity(out, t) for t in plans],
            dtype="int16",
            nodata=None,
            method="max",
            described={"title": "Number of clear acquisitions per pixel", "kind": "validity"},
        )

        # validation on the test polygons (never used in training)
        per_seed = []
        for seed in range(runs):
            labels, preds = [], []
            for region in regions:
                samples = load_samples(layout.samples_test(out, region, seed), empty_ok=True)
                # sampling's databases always carry the tile, row and col of each sample
                assert samples.tile is not None and samples.row is not None and samples.col is not None
                for tile_index, tile in enumerate(samples.tiles):
                    sel = samples.tile == tile_index
                    if not sel.any():
                        continue
                    rows, cols = samples.row[sel], samples.col[sel]
                    win = Window(
                        int(cols.min()),
                        int(rows.min()),
                        int(cols.max() - cols.min() + 1),
                        int(rows.max() - rows.min() + 1),
                    )
                    data = _read_window(layout.tile_classif(out, tile, region, seed), win)
                    labels.append(samples.labels[sel])
                    preds.append(data[rows - int(win.row_off), cols - int(win.col_off)])
            if not labels:
                raise BadInputError(
                    "no test sample: the test set is empty (every class has a single polygon?); cannot validate"
                )
            report = evaluate(np.concatenate(labels), np.concatenate(preds), names)
            report["area_weighted"] = area_weighted(
                np.asarray(report["confusion_matrix"]), report["classes"], map_pixels[seed]
            )
            per_seed.append(report)
        merging = cfg.arg_classification
        fusion_report = None
        if merging.merge_final_classifications:
            # iota2's merge of the final classifications: the runs' maps fused by majority vote,
            # validated on its own samples; RESULTS.txt becomes the fused map's report
            undecided = merging.merge_final_classifications_undecidedlabel
            if undecided in all_codes:
                raise BadInputError(
                    f"arg_classification.merge_final_classifications_undecidedlabel {undecided} is a class code "
                    "of the models: choose a code no class has"
                )
            fused = final.path(layout.final_fusion(out), ".tif")
            _fuse(classif_paths, fused, undecided)
            products.append(
                stac.Product(
                    layout.final_fusion(out),
                    fused,
                    title=f"Fusion of the {runs} runs' classifications (majority vote; {undecided}: undecided)",
                    kind="classification",
                    undecided=undecided,
                    extra_assets=[
                        (
                            "visual",
                            layout.final_fusion_color(out),
                            pystac.MediaType.COG,
                            "Fusion of the runs' classifications with its colour table",
                            ["visual"],
                        )
                    ],
                )
            )
            fusion_colors = {0: (255, 255, 255, 255)} | {c: (*colors.get(c, (0, 0, 0)), 255) for c in all_codes}
            fusion_colors[undecided] = (0, 0, 0, 255)
            _fuse(classif_paths, final.path(layout.final_fusion_color(out), ".tif"), undecided, fusion_colors)
            fusion_report = _validate_fusion(cfg, regions, names, _class_pixels(fused))
            write_reports(
                [fusion_report],
                final.path(layout.final_results(out)),
                final.path(layout.final_results_json(out)),
                heading=(
                    f"Fusion of the {runs} runs by majority vote (final/Classifications_fusion.tif), measured on "
                    + (
                        "the union of the runs' test samples (some were learnt by other runs: optimistic)."
                        if merging.fusionofclassification_all_samples_validation
                        else "the polygons held out of every run."
                    )
                    + f" {fusion_report['undecided_samples']} samples with tied votes (label {undecided}) are left "
                    "out of the confusion matrix."
                ),
            )
            if merging.keep_runs_results:
                write_reports(
                    per_seed,
                    final.path(layout.final_results_seeds(out)),
                    final.path(layout.final_results_seeds_json(out)),
                )
        else:
            write_reports(per_seed, final.path(layout.final_results(out)), final.path(layout.final_results_json(out)))
        stac.write_catalog(
            out,
            final,
            products,
            names=names,
            colors=colors,
            codes=all_codes,
            pixels=map_pixels,
            dates=[d for m in models.values() for d in (m.get("dates") or [])],
        )
        storage.delete(layout.manifest(out, STAGE, layout.ALL))
    outputs += [uri for uri, _ in final.pending]
    keep = {uri.rsplit("/", 1)[-1] for uri, _ in final.pending}
    for stale in storage.list_files(layout.final_results(out).rsplit("/", 1)[0]):
        if stale.rsplit("/", 1)[-1] not in keep:
            log.info("merging: removing %s, which is not part of this set of final products", stale)
            storage.delete(stale)
    summary = {
        "stage": STAGE,
        "tiles": list(plans),
        "seeds": list(range(runs)),
        "overall_accuracy": [round(r["overall_accuracy"], 4) for r in per_seed],
        "kappa": [round(r["kappa"], 4) for r in per_seed],
        "outputs": len(outputs),
    }
    if fusion_report is not None:
        summary["fusion"] = {
            "overall_accuracy": round(fusion_report["overall_accuracy"], 4),
            "kappa": round(fusion_report["kappa"], 4),
            "undecided_samples": fusion_report["undecided_samples"],
        }
    manifest.write_manifest(out, STAGE, layout.ALL, fp, outputs, {"summary": summary})
    return summary | {"skipped": False}
