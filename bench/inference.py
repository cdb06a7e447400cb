"""Inference benchmark: pixels per second of the network alone and of the whole inference stage.

Generates one chunk (default 1024 x 1024 px, 36 dates x 10 bands, int16, a Cloud-Optimized
GeoTIFF: ZSTD by default (--compress), 256 x 256 blocks, pixel-interleaved, nodata -10000), a selected model with random weights (speed does not depend on the
weights), and measures:

* network alone: the stage's own ``sitsflow.nn.Predictor`` (the network's inference form; on CUDA
  bf16 and compiled) classifying in-memory features of every pixel;
* whole stage: ``sitsflow.inference.run`` on the chunk (windowed read -> masks -> gap filling ->
  network -> GeoTIFF writes), one chunk;
* the same stage on a chunk whose pixels are 90 % nodata (they must cost almost nothing).

The network alone and the whole stage on the full chunk are timed alternately, ``--repeat`` times
each, and the best of each kept: the ratio of the two then does not depend on which of them ran
while the machine was faster.

    python bench/inference.py [--size 1024] [--dates 36] [--bands 10] [--network MLPClassifier]
                              [--device cpu|cuda] [--repeat 2] [--readers N] [--tile-px 10980]
                              [--device-features 0|1|both] [--clouds 0.1]

The stage's timings say where its time went: ``read_s`` (reading and features, summed over the
reading threads; without any, the classifying thread's own reads), ``wait_read_s`` (the main loop
waiting for them; without reading threads it holds the reads themselves), ``classify_s`` (the main loop
classifying: copies, network, results back), ``copy_s``/``features_s``/``compute_s`` (CUDA-side
times of the copies, of the features computed on the device from the observations as read
(``SITSFLOW_DEVICE_FEATURES``, 1 by default; ``--device-features both`` measures the full chunk
both ways) and of the network), ``write_s`` (the writer thread), ``wait_write_s``; then the same
per part (the chunk's block-aligned parts, ``parts``), in milliseconds.

Local tiled GeoTIFFs are decoded by sitsflow's direct reader (``sitsflow.sensors.direct``);
``SITSFLOW_DIRECT_READS=0 python bench/inference.py ...`` measures the same through GDAL.

Prints a table and one JSON line; record the figures in docs/benchmarks.md with the machine.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
import rasterio.shutil
from rasterio.transform import from_origin

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "services"))
# as `sitsflow infer` does before torch is loaded (see sitsflow.cli.cmd_infer)
from sitsflow.process import tune_for_inference  # noqa: E402

tune_for_inference()

from sitsflow import layout, manifest, nn  # noqa: E402
from sitsflow.config import load_config  # noqa: E402
from sitsflow.features import FeaturePipeline  # noqa: E402
from sitsflow.log import setup_logging  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_name  # noqa: E402


def make_chunk(path: Path, size: int, nb_dates: int, nb_bands: int, nodata_fraction: float, compress: str, seed: int = 0,
               block: int = 256) -> list[str]:
    """Write a pixel-interleaved int16 COG of nb_dates*nb_bands bands (date-major), ``block`` px blocks;
    the top ``nodata_fraction`` of the rows are nodata (outside the swath)."""
    rng = np.random.default_rng(seed)
    dates = [dt.date(2021, 1, 3) + dt.timedelta(days=10 * i) for i in range(nb_dates)]
    yy, xx = np.mgrid[0:size, 0:size]
    field = (np.sin(xx / 37.0) + np.cos(yy / 23.0)) * 1000
    data = np.empty((nb_dates * nb_bands, size, size), np.int16)
    for t in range(nb_dates):
        season = np.sin(2 * np.pi * t / nb_dates)
        for b in range(nb_bands):
            band = 1500 + 300 * b + field * season + rng.normal(0, 50, (size, size))
            data[t * nb_bands + b] = band.astype(np.int16)
    if nodata_fraction > 0:
        rows = int(size * nodata_fraction)
        data[:, :rows, :] = -10000  # the top of the chunk is outside the swath
    profile = {"driver": "GTiff", "dtype": "int16", "count": data.shape[0], "width": size, "height": size,
               "crs": "EPSG:32631", "transform": from_origin(300000, 5000000, 10, 10), "nodata": -10000,
               "tiled": True, "blockxsize": block, "blockysize": block, "interleave": "pixel"}
    plain = path.with_suffix(".plain.tif")
    with rasterio.open(plain, "w", **profile) as dst:
        dst.write(data)
        for i, d in enumerate(dates):
            for b in range(nb_bands):
                dst.set_band_description(i * nb_bands + b + 1, d.isoformat())
    rasterio.shutil.copy(plain, path, driver="COG", compress=compress, blocksize=block, overviews="NONE")
    plain.unlink()
    return [d.strftime("%Y%m%d") for d in dates]


def make_clouds(path: Path, size: int, nb_dates: int, fraction: float, block: int = 256, seed: int = 1) -> None:
    """A cloud mask COG (uint8, one band per date, 1 = cloud): on each date ``fraction`` of the chunk
    under clouds, in 64-px cells (clouds are spatially correlated), different cells every date."""
    rng = np.random.default_rng(seed)
    cells = -(-size // 64)
    mask = np.empty((nb_dates, size, size), np.uint8)
    for t in range(nb_dates):
        cloudy = rng.random((cells, cells)) < fraction
        mask[t] = np.kron(cloudy, np.ones((64, 64), np.uint8))[:size, :size]
    profile = {"driver": "GTiff", "dtype": "uint8", "count": nb_dates, "width": size, "height": size,
               "crs": "EPSG:32631", "transform": from_origin(300000, 5000000, 10, 10), "tiled": True,
               "blockxsize": block, "blockysize": block}
    plain = path.with_suffix(".plain.tif")
    with rasterio.open(plain, "w", **profile) as dst:
        dst.write(mask)
    rasterio.shutil.copy(plain, path, driver="COG", compress="ZSTD", blocksize=block, overviews="NONE")
    plain.unlink()


def write_config(folder: Path, raster: Path, nb_bands: int, out: Path, mask: Path | None = None) -> Path:
    bands = ", ".join(f"'b{i + 1}'" for i in range(nb_bands))
    cfg = folder / "bench.cfg"
    cfg.write_text(f"""
chain : {{
  output_path : '{out}'
  list_tile : 'T0'
  ground_truth : 'none.gpkg'
  data_field : 'code'
}}
dated_raster : {{
  name : 'bench'
  path : '{raster}'
  bands : [{bands}]
  scale : 0.0001
  nodata : -10000
  temporal_resolution : 10
  {f"mask_path : '{mask}'" if mask else ""}
}}
arg_train : {{ deep_learning_parameters : {{ dl_name : 'MLPClassifier' }} }}
python_data_managing : {{
  chunk_size_mode : 'split_number'
  number_of_chunks : 1
}}
""")
    return cfg


def install_model(cfg, network_name: str, nb_classes: int = 10) -> object:
    """A selected model with random weights and the sampling manifest inference needs."""
    pipe = FeaturePipeline(cfg, "T0")
    nb_dates, nb_comp = len(pipe.dates), len(pipe.components)
    stats = {pipe.sensor: {"mean": np.full(nb_dates * nb_comp, 0.2, np.float32),
                           "var": np.full(nb_dates * nb_comp, 0.01, np.float32)}}
    import torch

    torch.manual_seed(0)
    net = nn.build_network(network_name, {}, nb_dates=nb_dates, nb_components=nb_comp, nb_classes=nb_classes,
                           dates=pipe.dates, stats={k: {s: torch.from_numpy(v) for s, v in d.items()} for k, d in stats.items()},
                           sensor=pipe.sensor)
    desc = {"classes": list(range(1, nb_classes + 1)), "class_names": [str(c) for c in range(1, nb_classes + 1)],
            "feature_names": pipe.feature_names}
    out = cfg.chain.output_path
    Path(layout.model_selected(out, 1, 0)).parent.mkdir(parents=True, exist_ok=True)
    Path(layout.model_selected(out, 1, 0)).write_bytes(nn.save_model(net, desc))
    manifest.write_manifest(out, "sampling", "all", "bench", [], {"regions": [1], "summary": {}})
    return net


def time_stage(cfg, repeat: int) -> tuple[float, dict]:
    """The best of ``repeat`` runs of the stage on the chunk: (seconds, that run's timings)."""
    from sitsflow import inference

    best, timings = float("inf"), {}
    for _ in range(repeat):
        shutil.rmtree(Path(cfg.chain.output_path) / "manifests" / "inference", ignore_errors=True)
        t0 = time.perf_counter()
        summary = inference.run(cfg, "T0", 0, 0)
        seconds = time.perf_counter() - t0
        if seconds < best:
            best, timings = seconds, summary["timings"]
    return best, timings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--dates", type=int, default=36)
    parser.add_argument("--bands", type=int, default=10)
    parser.add_argument("--network", default="MLPClassifier")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--compress", default="ZSTD", help="COG compression: ZSTD (default), DEFLATE, LZW, NONE")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--readers", type=int, default=None, help="reading threads (SITSFLOW_READERS)")
    parser.add_argument("--tile-px", type=int, default=10980, help="tile width for the extrapolated tile time")
    parser.add_argument("--clouds", type=float, default=0.0,
                        help="fraction of each date under clouds (a cloud mask; those observations are gap-filled)")
    parser.add_argument("--device-features", choices=("0", "1", "both"), default=None,
                        help="SITSFLOW_DEVICE_FEATURES for the stage; both: the full chunk with 0 and with 1")
    args = parser.parse_args(argv)
    if args.device_features in ("0", "1"):
        os.environ["SITSFLOW_DEVICE_FEATURES"] = args.device_features
    if args.readers:
        os.environ["SITSFLOW_READERS"] = str(args.readers)
    setup_logging("WARNING")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="sitsflow-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    results = {"clouds": args.clouds, "compress": args.compress, "size": args.size, "dates": args.dates, "bands": args.bands, "network": args.network,
               "cpu": cpu_name(), "cores": os.cpu_count()}
    import torch

    results["device"] = str(nn.resolve_device(args.device))
    if results["device"].startswith("cuda"):
        results["gpu"] = torch.cuda.get_device_name(0)
    pixels = args.size * args.size
    stage_time: dict[str, float] = {}
    stage_best, stage_timings = float("inf"), {}  # the full chunk's, timed beside the network alone
    for label, fraction in (("full", 0.0), ("nodata90", 0.9)):
        raster = work / f"chunk_{label}.tif"
        t0 = time.perf_counter()
        make_chunk(raster, args.size, args.dates, args.bands, fraction, args.compress)
        mask = None
        if args.clouds > 0:
            mask = work / f"clouds_{label}.tif"
            make_clouds(mask, args.size, args.dates, args.clouds)
        results[f"generate_{label}_s"] = round(time.perf_counter() - t0, 1)
        cfg = load_config(str(write_config(work, raster, args.bands, work / f"out_{label}", mask)))
        net = install_model(cfg, args.network)
        if label == "full":
            pipe = FeaturePipeline(cfg, "T0")
            from rasterio.windows import Window

            x = pipe.features(Window(0, 0, args.size, args.size)).values  # kept through the stage's runs
            # the predictor the stage builds (inference form; on CUDA bf16 and compiled)
            predictor = nn.Predictor(net, device=args.device)
            codes = np.arange(1, 11)
            predictor.classify(x[:4096], codes)  # warm-up (and compilation)
            # the network alone and the stage alternately, best of each: a machine whose speed
            # drifts (by up to 10 % an hour on the shared 2-core machine) weighs on both alike
            best = float("inf")
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                predictor.classify(x, codes)
                best = min(best, time.perf_counter() - t0)
                seconds, timings = time_stage(cfg, 1)
                if seconds < stage_best:
                    stage_best, stage_timings = seconds, timings
            results["network_alone_px_s"] = round(x.shape[0] / best)
            results["compiled"] = predictor.compiled
            del x, predictor
        if label == "full" and args.device_features == "both":
            for setting in ("0", "1"):  # the reading side computes the features, then the device does
                os.environ["SITSFLOW_DEVICE_FEATURES"] = setting
                seconds, timings = time_stage(cfg, args.repeat)
                results[f"stage_full_device_features_{setting}_px_s"] = round(pixels / seconds)
                results[f"stage_full_device_features_{setting}_timings"] = timings
                print(f"SITSFLOW_DEVICE_FEATURES={setting}: whole stage {pixels / seconds:,.0f} px/s ({seconds:.2f} s); "
                      + ", ".join(f"{k} {v}" for k, v in timings.items()))
            del os.environ["SITSFLOW_DEVICE_FEATURES"]
        if label == "full":
            stage_time[label], results[f"stage_{label}_timings"] = stage_best, stage_timings
        else:
            stage_time[label], results[f"stage_{label}_timings"] = time_stage(cfg, args.repeat)
        results[f"stage_{label}_px_s"] = round(pixels / stage_time[label])
        results[f"stage_{label}_s"] = round(stage_time[label], 2)
    results["stage_over_network"] = round(results["stage_full_px_s"] / results["network_alone_px_s"], 3)
    results["nodata90_cost_over_full"] = round(stage_time["nodata90"] / stage_time["full"], 3)
    print(f"machine: {results['cpu']} ({results['cores']} cores), device {results['device']}")
    print(f"chunk: {args.size}x{args.size} px, {args.dates} dates x {args.bands} bands, int16 COG ({args.compress}), "
          f"{args.clouds:.0%} of each date under clouds; network {args.network}")
    print(f"network alone        : {results['network_alone_px_s']:>12,} px/s")
    print(f"whole stage (full)   : {results['stage_full_px_s']:>12,} px/s  ({results['stage_full_s']} s)  "
          f"= {results['stage_over_network']:.0%} of the network alone")
    print(f"whole stage (90% nd) : {results['stage_nodata90_px_s']:>12,} px/s  ({results['stage_nodata90_s']} s)  "
          f"= {results['nodata90_cost_over_full']:.0%} of a full chunk's time")
    from sitsflow.inference import reader_threads
    from sitsflow.sensors import direct

    results["readers"] = reader_threads(results["device"].startswith("cuda"), remote=False)  # the chunk is local
    results["direct_reads"] = direct.enabled()  # SITSFLOW_DIRECT_READS=0: GDAL reads the chunk
    results["tile_s_extrapolated"] = round(args.tile_px**2 / results["stage_full_px_s"], 1)
    timings = results["stage_full_timings"]
    print("where the full chunk's time went (s): " + ", ".join(f"{k} {v}" for k, v in timings.items()))
    parts = max(1, int(timings.get("parts", 1)))
    results["stage_full_per_part_s"] = {k: round(v / parts, 4) for k, v in timings.items() if k.endswith("_s")}
    print(f"per part ({parts} parts, ms): " + ", ".join(f"{k[:-2]} {1000 * v:.1f}" for k, v in results["stage_full_per_part_s"].items()))
    print(f"readers {results['readers']}, direct reads {'on' if results['direct_reads'] else 'off (GDAL)'}; a {args.tile_px} x {args.tile_px} px tile at this rate: "
          f"{results['tile_s_extrapolated']} s")
    print(json.dumps(results))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
