"""Sampling stage: labelled pixels -> polygon-wise splits -> the NetCDF sample databases.

For every tile, the reference polygons (``chain.ground_truth``, class in ``chain.data_field``)
are burnt window by window on the sensor's grid; only windows holding labelled pixels are read,
and the shared feature pipeline (:mod:`sitsflow.features`) computes their features. Then, for each
run ``r`` (seed ``random_seed + r``) and each (region, class), ``max(1, round(n * ratio))`` of the
polygons go to learning + validation (L+V) and the rest to the test set T; a (region, class) with
a single polygon goes to both; with ``split_ground_truth: False`` every polygon goes to both
(iota2's meaning). ``sample_selection`` then keeps, per class, part of the L+V pixels of each
(region, seed) (:mod:`sitsflow.sampling.strategies`); the test set keeps every pixel. Outputs, in
``learningSamples/``:
``Samples_region_R_seedS_learn.nc`` (L+V), ``Samples_region_R_seedS_test.nc`` (T) and
``split_seedS.csv`` (the set of every polygon, for audits).
"""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from typing import Any

import numpy as np
import shapely
from rasterio.windows import Window
from rasterio.windows import bounds as window_bounds

from sitsflow import layout, manifest, storage
from sitsflow.config import selection
from sitsflow.errors import BadInputError
from sitsflow.features import FeaturePipeline
from sitsflow.log import get_logger
from sitsflow.reference import burn, read_nomenclature, read_polygons
from sitsflow.samples import ArrayReader, SampleSet, write_samples
from sitsflow.sampling import strategies

log = get_logger(__name__)

STAGE = "sampling"
BLOCK = 512  # window size (pixels) for reading labelled areas: memory does not grow with the tile


def _input_stats(uris: list[str | None]) -> list:
    return [(u, storage.stat(u)) if u and storage.exists(u) else (u, None) for u in uris]


def fingerprint(cfg, pipelines: dict[str, FeaturePipeline] | None = None) -> str:
    """Everything the sample databases depend on: the reference files, the split settings, the
    feature pipeline of every tile (sensors, dates, bands, indices, external module) and the size
    and version of every input file."""
    chain = cfg.chain
    pipelines = pipelines or {tile: FeaturePipeline(cfg, tile) for tile in chain.tiles}
    sensor_files = [f for tile in chain.tiles for f in pipelines[tile].input_files()]
    if (
        cfg.dated_raster is not None
        and isinstance(cfg.dated_raster.dates, str)
        and cfg.dated_raster.dates != "descriptions"
    ):
        sensor_files.append(cfg.dated_raster.dates)
    split = {
        "runs": cfg.arg_train.runs,
        "ratio": cfg.arg_train.ratio,
        "random_seed": cfg.arg_train.random_seed,
        "features_from_raw_dates": cfg.arg_train.features_from_raw_dates,
    }
    # the keys below enter the fingerprint only when set, so that the databases of a
    # configuration without them stay those of before they existed
    if not cfg.arg_train.split_ground_truth:
        split["split_ground_truth"] = False
    if not selection.is_default(cfg.arg_train.sample_selection):
        split["sample_selection"] = cfg.arg_train.sample_selection
        sensor_files += selection.paths(cfg.arg_train.sample_selection)
    if fusion_holdout(cfg):
        split["fusion_holdout"] = cfg.arg_classification.merge_final_classifications_ratio
    grids = {tile: pipelines[tile].grid for tile in chain.tiles}
    if any(g.resampled for g in grids.values()):  # chain.proj / spatial_resolution: the pixels sampled
        split["grids"] = {
            tile: [g.width, g.height, list(g.transform)[:6], g.crs.to_wkt()] for tile, g in grids.items()
        }
    return manifest.fingerprint(
        STAGE,
        {
            "tiles": list(chain.tiles),
            "ground_truth": chain.ground_truth,
            "data_field": chain.data_field,
            "region_path": chain.region_path,
            "region_field": chain.region_field,
            "nomenclature_path": chain.nomenclature_path,
        },
        {tile: pipelines[tile].description() for tile in chain.tiles},
        split,
        _input_stats([chain.ground_truth, chain.region_path, chain.nomenclature_path, *sensor_files]),
    )


def _windows(width: int, height: int, block: int = BLOCK):
    for row in range(0, height, block):
        for col in range(0, width, block):
            yield Window(col, row, min(block, width - col), min(block, height - row))


def extract(cfg, pipelines: dict[str, FeaturePipeline] | None = None) -> tuple[dict, dict]:
    """Extract the features of every labelled pixel of every tile.

    Returns:
        (arrays, meta): arrays holds per-sample ``features`` (n, nb_dates, nb_components) and
        ``label``, ``polygon_id``, ``region``, ``tile``, ``row``, ``col``; meta holds the feature
        description and the polygon report.
    """
    chain = cfg.chain
    parts: dict[str, list[np.ndarray]] = defaultdict(list)
    report: dict = {}
    description = None
    for tile_index, tile in enumerate(chain.tiles):
        pipe = pipelines[tile] if pipelines else FeaturePipeline(cfg, tile)
        if description is None:
            description = pipe.description() | {"feature_names": pipe.feature_names, "sensor_keys": pipe.sensor_keys}
        elif pipe.feature_names != description["feature_names"]:
            raise BadInputError(
                f"tile {tile!r}: its dates or bands differ from the first tile's; every tile must yield the same "
                "features (set start_date and end_date so that every tile gets the same date grid)"
            )
        polys, rep = read_polygons(chain.ground_truth, chain.data_field, "chain.ground_truth", crs=pipe.grid.crs)
        tile_box = shapely.box(*window_bounds(Window(0, 0, pipe.grid.width, pipe.grid.height), pipe.grid.transform))
        inside = shapely.intersects(polys.geoms, tile_box) if len(polys.ids) else np.zeros(0, bool)
        rep = rep | {"outside_tile": int((~inside).sum())}
        if (~inside).any():
            log.info(
                "tile %s: %d of %d labelled polygons lie outside the tile and are ignored",
                tile,
                int((~inside).sum()),
                len(inside),
            )
        report[tile] = rep
        tree = shapely.STRtree(polys.geoms)
        position = np.arange(len(polys.ids))
        if chain.region_path:
            regions, _ = read_polygons(chain.region_path, chain.region_field, "chain.region_path", crs=pipe.grid.crs)
            region_tree = shapely.STRtree(regions.geoms)
        for window in _windows(pipe.grid.width, pipe.grid.height):
            burnt = burn(polys, window, pipe.grid.transform, position + 1, tree=tree)
            labelled = burnt > 0
            if not labelled.any():
                continue
            if chain.region_path:
                region_map = burn(regions, window, pipe.grid.transform, tree=region_tree)
                labelled &= region_map > 0
            else:
                region_map = np.ones(burnt.shape, np.int64)
            block = pipe.features(window, select=labelled, count_clear=False)
            if not block.rows.size:
                continue
            r = block.rows - int(window.row_off)
            c = block.cols - int(window.col_off)
            pos = burnt[r, c] - 1
            parts["features"].append(block.values)
            parts["label"].append(polys.values[pos].astype(np.int32))
            parts["polygon_id"].append(polys.ids[pos])
            parts["region"].append(region_map[r, c].astype(np.int32))
            parts["tile"].append(np.full(r.size, tile_index, np.int16))
            parts["row"].append(block.rows)
            parts["col"].append(block.cols)
    if not parts:
        raise BadInputError(
            f"chain.ground_truth: no labelled pixel with a clear acquisition lies in tiles {list(chain.tiles)} "
            f"(check the polygons' extent and CRS, and chain.data_field)"
        )
    arrays = {k: np.concatenate(v) for k, v in parts.items()}
    return arrays, {"description": description, "report": report}


def _polygon_regions(arrays: dict) -> dict[int, int]:
    """Each polygon belongs to the region holding most of its pixels (ties: the lowest)."""
    out: dict[int, int] = {}
    pids, regions = arrays["polygon_id"], arrays["region"]
    for pid in np.unique(pids):
        vals, counts = np.unique(regions[pids == pid], return_counts=True)
        out[int(pid)] = int(vals[np.argmax(counts)])
    return out


def split_polygons(
    polygon_class: dict[int, int], polygon_region: dict[int, int], ratio: float, seed: int
) -> dict[int, str]:
    """Polygon-wise split for one seed: ``learn``, ``test`` or ``both`` per polygon id.

    Per (region, class), polygons sorted by id are permuted with ``numpy.random.default_rng(seed)``
    and ``max(1, round(n * ratio))`` go to L+V; a single polygon goes to both sets.
    """
    rng = np.random.default_rng(seed)
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for pid in sorted(polygon_class):
        groups[(polygon_region[pid], polygon_class[pid])].append(pid)
    sets: dict[int, str] = {}
    for key in sorted(groups):
        ids = groups[key]
        if len(ids) == 1:
            sets[ids[0]] = "both"
            continue
        perm = rng.permutation(np.asarray(ids))
        n_learn = max(1, round(len(ids) * ratio))
        for pid in perm[:n_learn]:
            sets[int(pid)] = "learn"
        for pid in perm[n_learn:]:
            sets[int(pid)] = "test"
    return sets


def fusion_holdout(cfg) -> bool:
    """Whether polygons are held out of every run to validate the fused map (iota2's
    ``merge_final_classifications`` without ``fusionofclassification_all_samples_validation``)."""
    merging = cfg.arg_classification
    return merging.merge_final_classifications and not merging.fusionofclassification_all_samples_validation


FUSION_STREAM = 1
"""The held-out polygons are drawn with ``numpy.random.default_rng([random_seed, FUSION_STREAM])``,
a stream of its own (the runs' splits use ``default_rng(random_seed + run)``)."""


def hold_out_polygons(
    polygon_class: dict[int, int], polygon_region: dict[int, int], ratio: float, seed: int
) -> set[int]:
    """The polygons held out of every run to validate the fused map of the runs (iota2's
    ``extract_maj_vote_samples``): per (region, class), polygons sorted by id are permuted with
    ``default_rng([seed, FUSION_STREAM])`` and ``round(n * ratio)`` of them are held out, at most
    ``n - 1`` (the runs keep at least one polygon of each class)."""
    rng = np.random.default_rng([seed, FUSION_STREAM])
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for pid in sorted(polygon_class):
        groups[(polygon_region[pid], polygon_class[pid])].append(pid)
    held: set[int] = set()
    for key in sorted(groups):
        ids = groups[key]
        n_held = min(len(ids) - 1, round(len(ids) * ratio))
        held.update(int(p) for p in rng.permutation(np.asarray(ids))[:n_held])
    return held


def _subset(arrays: dict, mask: np.ndarray, **meta) -> SampleSet:
    return SampleSet(
        reader=ArrayReader(arrays["features"][mask]),
        labels=arrays["label"][mask],
        polygon_ids=arrays["polygon_id"][mask],
        region=arrays["region"][mask],
        tile=arrays["tile"][mask],
        row=arrays["row"][mask],
        col=arrays["col"][mask],
        **meta,
    )


def run(cfg) -> dict:
    """Run the sampling stage; return its JSON summary (``skipped`` when already done)."""
    out = cfg.chain.output_path
    pipelines = {tile: FeaturePipeline(cfg, tile) for tile in cfg.chain.tiles}
    fp = fingerprint(cfg, pipelines)
    previous = manifest.done(out, STAGE, layout.ALL, fp)
    if previous:
        log.info("sampling: outputs are up to date (manifest %s)", layout.manifest(out, STAGE, layout.ALL))
        return previous["summary"] | {"skipped": True}
    arrays, meta = extract(cfg, pipelines)
    desc = meta["description"]
    class_names = read_nomenclature(cfg.chain.nomenclature_path)
    polygon_class = {int(p): int(c) for p, c in zip(arrays["polygon_id"], arrays["label"])}
    polygon_region = _polygon_regions(arrays)
    # every pixel of a polygon goes to the polygon's region
    arrays["region"] = np.array([polygon_region[int(p)] for p in arrays["polygon_id"]], np.int32)
    regions = sorted(set(polygon_region.values()))
    sample_selection = cfg.arg_train.sample_selection
    selecting = not selection.is_default(sample_selection)
    byclass = strategies.byclass_tables(sample_selection) if selecting else {}
    if not cfg.arg_train.split_ground_truth:
        log.warning(
            "arg_train.split_ground_truth is False: every polygon is in both the L+V and the test set, "
            "so the accuracy is measured on the polygons the models learn from (optimistic)"
        )
    outputs: list[str] = []
    counts: dict[str, dict[str, Any]] = {}
    held: set[int] = set()
    if fusion_holdout(cfg):
        held = hold_out_polygons(
            polygon_class,
            polygon_region,
            cfg.arg_classification.merge_final_classifications_ratio,
            cfg.arg_train.random_seed,
        )
        log.info("merge_final_classifications: %d polygons held out of every run to validate the fused map", len(held))
    in_runs = {p: c for p, c in polygon_class.items() if p not in held}
    for run_index in range(cfg.arg_train.runs):
        seed = cfg.arg_train.random_seed + run_index
        if cfg.arg_train.split_ground_truth:
            sets = split_polygons(in_runs, polygon_region, cfg.arg_train.ratio, seed)
        else:
            sets = dict.fromkeys(sorted(in_runs), "both")
        sets.update(dict.fromkeys(held, "fusion"))
        table = io.StringIO()
        writer = csv.writer(table)
        writer.writerow(["polygon_id", "class", "region", "set", "pixels"])
        pix: defaultdict[int, int] = defaultdict(int)
        for p in arrays["polygon_id"]:
            pix[int(p)] += 1
        for pid in sorted(sets):
            writer.writerow([pid, polygon_class[pid], polygon_region[pid], sets[pid], pix[pid]])
        split_uri = layout.split_table(out, run_index)
        storage.write_text(split_uri, table.getvalue())
        outputs.append(split_uri)
        pset = np.array([sets[int(p)] for p in arrays["polygon_id"]])
        for region in regions:
            in_region = arrays["region"] == region
            learn = in_region & np.isin(pset, ["learn", "both"])
            test = in_region & np.isin(pset, ["test", "both"])
            kept: dict[int, tuple[int, int]] = {}
            if selecting:
                rule = selection.for_region(sample_selection, int(region))
                counts_file = byclass.get(rule.get("strategy.byclass.in", ""))
                chosen, kept = strategies.select(arrays, learn, int(region), seed, rule, counts_file)
                log.info(
                    "region %s seed %s: sample selection %s kept %d of %d L+V pixels (class: kept/all %s)",
                    region,
                    run_index,
                    rule,
                    chosen.sum(),
                    learn.sum(),
                    ", ".join(f"{c}: {k}/{n}" for c, (k, n) in kept.items()),
                )
                learn = chosen
            classes = sorted({int(c) for c in arrays["label"][learn]})
            names = {str(c): class_names.get(c, str(c)) for c in classes}
            common = {
                "dates": desc["dates"],
                "component_names": desc["components"],
                "feature_names": desc["feature_names"],
                "tiles": list(cfg.chain.tiles),
                "sensor": desc["sensor"],
                "sensors": tuple(desc["sensor_keys"]),
                "classes": classes,
                "class_names": names,
                "fingerprint": fp,
            }
            for kind, mask, uri in (
                ("learn", learn, layout.samples_learn(out, region, run_index)),
                ("test", test, layout.samples_test(out, region, run_index)),
            ):
                write_samples(
                    uri,
                    _subset(arrays, mask, **common),
                    attrs={"region": int(region), "seed": int(run_index), "random_seed": int(seed), "set": kind},
                )
                outputs.append(uri)
            counts[f"region_{region}_seed_{run_index}"] = {"learn": int(learn.sum()), "test": int(test.sum())}
            if selecting:
                counts[f"region_{region}_seed_{run_index}"]["selected"] = {
                    str(c): {"kept": k, "of": n} for c, (k, n) in kept.items()
                }
            log.info("region %s seed %s: %d L+V samples, %d test samples", region, run_index, learn.sum(), test.sum())
    if fusion_holdout(cfg):
        pheld = np.isin(arrays["polygon_id"], np.fromiter(held, np.int64, len(held)))
        for region in regions:
            mask = pheld & (arrays["region"] == region)
            classes = sorted({int(c) for c in arrays["label"][mask]})
            uri = layout.samples_fusion(out, region)
            write_samples(
                uri,
                _subset(
                    arrays,
                    mask,
                    dates=desc["dates"],
                    component_names=desc["components"],
                    feature_names=desc["feature_names"],
                    tiles=list(cfg.chain.tiles),
                    sensor=desc["sensor"],
                    sensors=tuple(desc["sensor_keys"]),
                    classes=classes,
                    class_names={str(c): class_names.get(c, str(c)) for c in classes},
                    fingerprint=fp,
                ),
                attrs={"region": int(region), "set": "fusion"},
            )
            outputs.append(uri)
            counts[f"region_{region}_fusion"] = {"test": int(mask.sum())}
    summary = {
        "stage": STAGE,
        "regions": regions,
        "seeds": list(range(cfg.arg_train.runs)),
        "samples": counts,
        "polygons": meta["report"],
        "nb_dates": len(desc["dates"]),
        "components": desc["components"],
    }
    manifest.write_manifest(out, STAGE, layout.ALL, fp, outputs, {"summary": summary, "regions": regions})
    return summary | {"skipped": False}
