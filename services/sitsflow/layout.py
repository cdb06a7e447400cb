"""The output tree under ``chain.output_path``, with iota2's names.

Every object key is a pure function of its parameters, so a retried task overwrites rather than
duplicates. Paths are joined with ``/`` and work for local paths and ``s3://`` URIs alike.
"""

from __future__ import annotations

LEARNING_SAMPLES = "learningSamples"
MODEL = "model"
CLASSIF = "classif"
FINAL = "final"
CONFIG = "config"
MANIFESTS = "manifests"


def join(base: str, *parts: str) -> str:
    """Join URI/path parts with a single ``/``."""
    out = base.rstrip("/")
    for part in parts:
        out = f"{out}/{str(part).strip('/')}"
    return out


def resolved_config(out: str) -> str:
    """The resolved configuration written next to the outputs."""
    return join(out, CONFIG, "resolved.cfg")


# --- sampling --------------------------------------------------------------------------------
def samples_learn(out: str, region: int, seed: int) -> str:
    """Learning + validation samples (L+V) of one region and seed (iota2's name)."""
    return join(out, LEARNING_SAMPLES, f"Samples_region_{region}_seed{seed}_learn.nc")


def samples_test(out: str, region: int, seed: int) -> str:
    """Test samples (T, never seen in training) of one region and seed."""
    return join(out, LEARNING_SAMPLES, f"Samples_region_{region}_seed{seed}_test.nc")


def samples_fusion(out: str, region: int) -> str:
    """Validation samples of the fused map of the runs (``merge_final_classifications``): the
    pixels of the polygons held out of every run (iota2's ``final/merge_final_classifications/
    *_majvote.sqlite``)."""
    return join(out, LEARNING_SAMPLES, f"Samples_region_{region}_fusion_test.nc")


def split_table(out: str, seed: int) -> str:
    """Per-polygon record of the learning/test split of one seed (CSV, for audits)."""
    return join(out, LEARNING_SAMPLES, f"split_seed{seed}.csv")


# --- training / selection --------------------------------------------------------------------
def model_candidate(out: str, region: int, seed: int, hyp: int) -> str:
    return join(out, MODEL, f"model_{region}_seed_{seed}_hyp_{hyp}.txt")


def model_checkpoint(out: str, region: int, seed: int, hyp: int) -> str:
    return join(out, MODEL, f"model_{region}_seed_{seed}_hyp_{hyp}_checkpoint.txt")


def model_loss_plot(out: str, region: int, seed: int, hyp: int) -> str:
    return join(out, MODEL, f"model_{region}_seed_{seed}_hyp_{hyp}_loss.png")


def model_metrics_plot(out: str, region: int, seed: int, hyp: int) -> str:
    return join(out, MODEL, f"model_{region}_seed_{seed}_hyp_{hyp}_confusion_metrics.png")


def model_history(out: str, region: int, seed: int, hyp: int) -> str:
    return join(out, MODEL, f"model_{region}_seed_{seed}_hyp_{hyp}_history.parquet")


def model_selected(out: str, region: int, seed: int) -> str:
    return join(out, MODEL, f"model_{region}_seed_{seed}.txt")


def selection_report(out: str, region: int, seed: int) -> str:
    return join(out, MODEL, f"model_{region}_seed_{seed}_selection.json")


# --- inference -------------------------------------------------------------------------------
def chunk_classif(out: str, tile: str, region: int, seed: int, chunk: int) -> str:
    return join(out, CLASSIF, f"Classif_{tile}_model_{region}_seed_{seed}_SUBREGION_{chunk}.tif")


def chunk_confidence(out: str, tile: str, region: int, seed: int, chunk: int) -> str:
    return join(out, CLASSIF, f"{tile}_model_{region}_confidence_seed_{seed}_SUBREGION_{chunk}.tif")


def chunk_probamap(out: str, tile: str, region: int, seed: int, chunk: int) -> str:
    return join(out, CLASSIF, f"PROBAMAP_{tile}_model_{region}_seed_{seed}_SUBREGION_{chunk}.tif")


# --- merging ---------------------------------------------------------------------------------
def tile_classif(out: str, tile: str, region: int, seed: int) -> str:
    return join(out, CLASSIF, f"Classif_{tile}_model_{region}_seed_{seed}.tif")


def tile_confidence(out: str, tile: str, region: int, seed: int) -> str:
    return join(out, CLASSIF, f"{tile}_model_{region}_confidence_seed_{seed}.tif")


def tile_probamap(out: str, tile: str, region: int, seed: int) -> str:
    return join(out, CLASSIF, f"PROBAMAP_{tile}_model_{region}_seed_{seed}.tif")


def final_classif(out: str, seed: int) -> str:
    return join(out, FINAL, f"Classif_Seed_{seed}.tif")


def final_classif_color(out: str, seed: int) -> str:
    return join(out, FINAL, f"Classif_Seed_{seed}_ColorIndexed.tif")


def final_confidence(out: str, seed: int) -> str:
    return join(out, FINAL, f"Confidence_Seed_{seed}.tif")


def final_probamap(out: str, seed: int) -> str:
    return join(out, FINAL, f"ProbabilityMap_seed_{seed}.tif")


def final_validity(out: str) -> str:
    return join(out, FINAL, "PixelsValidity.tif")


def final_results(out: str) -> str:
    return join(out, FINAL, "RESULTS.txt")


def final_results_json(out: str) -> str:
    return join(out, FINAL, "RESULTS.json")


def final_results_seeds(out: str) -> str:
    """The runs' validation report when RESULTS.txt is the fused map's (iota2's name)."""
    return join(out, FINAL, "RESULTS_seeds.txt")


def final_results_seeds_json(out: str) -> str:
    """RESULTS_seeds.txt as JSON."""
    return join(out, FINAL, "RESULTS_seeds.json")


def final_fusion(out: str) -> str:
    """The fused map of the runs (``merge_final_classifications``; iota2's name)."""
    return join(out, FINAL, "Classifications_fusion.tif")


def final_fusion_color(out: str) -> str:
    """The fused map with its colour table."""
    return join(out, FINAL, "Classifications_fusion_ColorIndexed.tif")


def final_quicklook(out: str, seed: int) -> str:
    return join(out, FINAL, f"Classif_Seed_{seed}_quicklook.png")


STAC = "stac"
"""Folder of the STAC catalog of the final products, under ``final/``."""


def final_stac_catalog(out: str) -> str:
    """Root of the STAC catalog of the final products (it holds the collection)."""
    return join(out, FINAL, STAC, "catalog.json")


def final_stac_collection(out: str) -> str:
    """The STAC collection of the run: one item per final product."""
    return join(out, FINAL, STAC, "collection.json")


def final_stac_item(out: str, item_id: str) -> str:
    """The STAC item of the final product ``item_id`` (see :func:`product_id`)."""
    return join(out, FINAL, STAC, "items", f"{item_id}.json")


def product_id(uri: str) -> str:
    """The name of a final product without its folder and extension (``Classif_Seed_0``): its STAC item id."""
    return uri.rsplit("/", 1)[-1].rsplit(".", 1)[0]


# --- bookkeeping -----------------------------------------------------------------------------
def manifest(out: str, stage: str, task: str) -> str:
    """The manifest a stage task writes last (``manifests/<stage>/<task>.json``)."""
    return join(out, MANIFESTS, stage, f"{task}.json")


def chunk_validity(out: str, tile: str, chunk: int) -> str:
    """Number of clear acquisitions per pixel of one chunk (merged into PixelsValidity.tif)."""
    return join(out, CLASSIF, f"PixelsValidity_{tile}_SUBREGION_{chunk}.tif")


def tile_validity(out: str, tile: str) -> str:
    return join(out, CLASSIF, f"PixelsValidity_{tile}.tif")


# --- task ids (manifest names) and GeoTIFF tags ----------------------------------------------
ALL = "all"
"""Task id of the stages that run once per run (sampling, merging)."""


def training_task(region: int, seed: int, hyp: int) -> str:
    return f"region_{region}_seed_{seed}_hyp_{hyp}"


def selection_task(region: int, seed: int) -> str:
    return f"region_{region}_seed_{seed}"


def inference_task(tile: str, chunk: int, seed: int) -> str:
    return f"{tile}_seed_{seed}_chunk_{chunk}"


TAG_MODEL_FINGERPRINT = "SITSFLOW_MODEL_FINGERPRINT"
"""GeoTIFF tag of chunk and tile maps: the fingerprint of the model that made them."""
TAG_WINDOW = "SITSFLOW_WINDOW"
"""GeoTIFF tag of chunk rasters: their window in the tile, JSON of :func:`window_tuple`."""
TAG_TILE = "SITSFLOW_TILE"
TAG_CHUNK = "SITSFLOW_CHUNK"
TAG_SEED = "SITSFLOW_SEED"


def window_tuple(window) -> list[int]:
    """``[col_off, row_off, width, height]`` of a rasterio ``Window`` (manifests and tags)."""
    return [int(window.col_off), int(window.row_off), int(window.width), int(window.height)]


# --- plans -----------------------------------------------------------------------------------
def plan(out: str, stage: str) -> str:
    """The stored task list of a fan-out (``sitsflow plan <stage>``); its shards read it."""
    return join(out, "plans", f"{stage}.json")
