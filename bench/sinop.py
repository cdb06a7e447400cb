"""Transfer check: classify the Sinop MODIS cube with a network trained on the Mato Grosso samples.

Both data sets come from the R package ``sits`` (GPL-2) and are not shipped with sitsflow: give
their paths. ``MT_CSV`` is ``samples_mt_4bands.csv`` (1,892 labelled pixel series, 9 classes,
23 MOD13Q1 dates x NDVI / EVI / NIR / MIR, values in index units); ``SINOP_DIR`` holds
``sits_sinop_mod13q1_{NDVI,EVI}_23dates.tif`` (uint16 holding int16 values, scale 0.0001,
23 bands = the 23 dates of 2013-09-14 .. 2014-08-29, band descriptions = dates) and
``samples_sinop_crop.csv`` (18 labelled points: id, longitude, latitude, ..., label).

1. **Training**, through sitsflow's own code: the MT CSV is converted by
   ``matogrosso_cv.read_sits_csv`` with the cube's first date as the reference season start, so
   that the t-th composite of every sample takes the cube's t-th date (alignment by position in
   the season, as sits does: both are the 23 16-day composites from day of year 257); only the
   NDVI and EVI columns are kept (the cube has no NIR / MIR). The table is written as Parquet
   (``OUT/mt_ndvi_evi.parquet``), read back with ``sitsflow.training.load_samples`` and trained
   with ``sitsflow.training.train`` like one candidate of the training stage (80/20 learning /
   validation split, seeded; the epoch kept by ``--criterion`` on validation). Same training
   arguments as ``bench/matogrosso_cv.py`` (network, parameters, training options ...). The model
   is saved as ``OUT/model.txt`` (``sitsflow.nn.save_model``).
2. **Classification**, through the inference stage's feature path and predictor: the two rasters
   are stacked date-major (NDVI, EVI of date 1, then date 2 ...) into ``OUT/sinop_ndvi_evi.tif``
   (int16: the files' uint16 words are the two's complement of small negative values, e.g. 65530 is
   -6, so they are reinterpreted, not clipped), a ``dated_raster`` configuration
   (``OUT/sinop.cfg``: name ``modis``, bands ``[ndvi, evi]``, dates from the band descriptions,
   ``scale`` 0.0001, ``features_from_raw_dates``) is loaded with ``sitsflow.config.load_config``,
   ``sitsflow.features.FeaturePipeline`` computes every pixel's features (the scale applied by the
   sensor reader: the network sees index units, as in the MT table) and ``sitsflow.nn.Predictor``
   (the inference form the stage uses) classifies them. The feature names of the tile must equal
   the model's, as the inference stage requires. What is not used: the stage's chunking, region
   masks, manifests and merging (the cube is one 254 x 144 chunk), since the model comes from a
   foreign table rather than the sampling stage.
3. **Outputs**: ``OUT/sinop_map.tif`` (uint8 class codes, 0 = no data, the cube's grid and CRS;
   the codes and names are in its tags), ``OUT/sinop_map.png`` (quicklook with a legend and the
   18 points), and on stdout the agreement with the 18 points: each point (lon/lat, WGS 84) is
   projected to the cube's sinusoidal CRS with ``rasterio.warp.transform`` and its pixel is read
   from the map; a per-point table (with whether the label occurs in the 3 x 3 pixels around the
   point, since a point is located to a fraction of a 231 m pixel), the count of agreements, and
   one JSON line
   (``{"bench": "sinop", ...}``).

    .venv/bin/python bench/sinop.py MT_CSV SINOP_DIR --out /tmp/sinop --threads 1
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch
from rasterio.warp import transform as warp_transform
from rasterio.windows import Window

sys.path.insert(0, str(Path(__file__).resolve().parent))

from matogrosso_cv import (  # noqa: E402 - the sibling bench script, importable once its folder is on the path
    SENSOR,
    add_training_arguments,
    builder,
    cpu_model,
    mod13q1_dates,
    options_of,
    read_sits_csv,
    torch_seed_of,
    training_options_of,
    write_parquet,
)

from sitsflow import nn as sitsnn  # noqa: E402
from sitsflow.config import load_config  # noqa: E402
from sitsflow.errors import BadInputError  # noqa: E402
from sitsflow.features import FeaturePipeline  # noqa: E402
from sitsflow.log import get_logger, setup_logging  # noqa: E402
from sitsflow.training import load_samples, train  # noqa: E402

log = get_logger("bench.sinop")

CUBE_BANDS = ("NDVI", "EVI")
CUBE_FILE = "sits_sinop_mod13q1_{band}_23dates.tif"
POINTS_FILE = "samples_sinop_crop.csv"
CUBE_SCALE = 0.0001
TILE = "sinop"


def read_cube(sinop_dir: Path) -> tuple[np.ndarray, dict[str, Any], list[str]]:
    """The NDVI and EVI rasters as int16 (band, date, row, col), their profile and band dates."""
    arrays, profile, dates = [], None, None
    for band in CUBE_BANDS:
        path = sinop_dir / CUBE_FILE.format(band=band)
        if not path.exists():
            raise BadInputError(f"SINOP_DIR: {path} does not exist")
        with rasterio.open(path) as src:
            if src.dtypes[0] not in ("uint16", "int16"):
                raise BadInputError(f"{path}: expected uint16 or int16 values, found {src.dtypes[0]}")
            raw = src.read()
            # the files store int16 index values in uint16 words: 65530 is -6 (NDVI -0.0006)
            arrays.append(raw.view(np.int16) if raw.dtype == np.uint16 else raw)
            if profile is None:
                profile, dates = src.profile, list(src.descriptions)
            elif list(src.descriptions) != dates or (src.width, src.height) != (profile["width"], profile["height"]):
                raise BadInputError(f"{path}: not on the grid and dates of the {CUBE_BANDS[0]} raster")
    assert profile is not None and dates is not None
    return np.stack(arrays), profile, dates


def write_stack(path: Path, cube: np.ndarray, profile: dict[str, Any], dates: list[str]) -> None:
    """Write the (band, date, row, col) cube date-major as one int16 raster, descriptions = dates."""
    nb_bands, nb_dates = cube.shape[:2]
    out = {**profile, "dtype": "int16", "count": nb_bands * nb_dates, "nodata": None, "interleave": "pixel"}
    with rasterio.open(path, "w", **out) as dst:
        for t in range(nb_dates):
            for b in range(nb_bands):
                k = t * nb_bands + b + 1
                dst.write(cube[b, t], k)
                dst.set_band_description(k, dates[t])


def write_points(path: Path, points: list[dict[str, str]], code: dict[str, int]) -> None:
    """The labelled points as GeoJSON (WGS 84), field ``code``: the configuration's ground truth."""
    features = [
        {
            "type": "Feature",
            "properties": {"id": int(p["id"]), "code": code[p["label"]], "label": p["label"]},
            "geometry": {"type": "Point", "coordinates": [float(p["longitude"]), float(p["latitude"])]},
        }
        for p in points
    ]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))


def write_config(path: Path, stack: Path, points: Path, dl: dict[str, Any]) -> None:
    """A sitsflow configuration describing the stacked cube as a ``dated_raster`` sensor."""
    hyp = dl["hyperparameters_solver"]
    path.write_text(
        f"""# written by bench/sinop.py
chain:
{{
  output_path : '{path.parent / "run"}'
  list_tile : '{TILE}'
  ground_truth : '{points}'
  data_field : 'code'
}}

dated_raster:
{{
  name : '{SENSOR}'
  path : '{stack}'
  bands : [{", ".join(repr(b.lower()) for b in CUBE_BANDS)}]
  dates : 'descriptions'
  scale : {CUBE_SCALE}
}}

arg_train:
{{
  features_from_raw_dates : True
  deep_learning_parameters:
  {{
    dl_name : '{dl["dl_name"]}'
    hyperparameters_solver : {{"batch_size" : {list(hyp["batch_size"])},
                               "learning_rate" : {list(hyp["learning_rate"])}}}
  }}
}}
"""
    )


def read_points(sinop_dir: Path) -> list[dict[str, str]]:
    path = sinop_dir / POINTS_FILE
    if not path.exists():
        raise BadInputError(f"SINOP_DIR: {path} does not exist")
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    for i, row in enumerate(rows, start=2):
        for key in ("id", "longitude", "latitude", "label"):
            if not row.get(key):
                raise BadInputError(f"{path}, line {i}: no '{key}' value")
    return rows


def quicklook(path: Path, classes: np.ndarray, names: list[str], points: list[dict[str, Any]]) -> None:
    """PNG of the map (a colour per class present, legend) with the points (agreeing: white ring)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    palette = plt.get_cmap("tab10").colors
    colours = ["#000000"] + [palette[i % len(palette)] for i in range(len(names))]
    fig, ax = plt.subplots(figsize=(7.2, 4.6), dpi=90)
    ax.imshow(classes, cmap=ListedColormap(colours), vmin=0, vmax=len(names), interpolation="nearest")
    for p in points:
        ax.plot(
            p["col"] + 0.0,
            p["row"] + 0.0,
            marker="o",
            markersize=6,
            markerfacecolor=colours[p["code"]],
            markeredgecolor="white" if p["agrees"] else "red",
            markeredgewidth=1.5,
        )
    present = sorted(int(c) for c in np.unique(classes) if c)
    handles: list[Any] = [Patch(color=colours[c], label=names[c - 1]) for c in present]
    handles += [
        Line2D(
            [], [], marker="o", linestyle="", markerfacecolor="grey", markeredgecolor="white", label="point, agrees"
        ),
        Line2D([], [], marker="o", linestyle="", markerfacecolor="grey", markeredgecolor="red", label="point, differs"),
    ]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    ax.set_title("Sinop MOD13Q1 2013-09-14..2014-08-29, model trained on the Mato Grosso samples", fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mt_csv", help="path of samples_mt_4bands.csv (the training samples)")
    parser.add_argument("sinop_dir", help="folder of the Sinop cube (the two rasters and samples_sinop_crop.csv)")
    parser.add_argument("--out", default="sinop-output", help="output folder (created)")
    add_training_arguments(parser)
    args = parser.parse_args(argv)
    args.options = training_options_of(args, parser)
    setup_logging()
    if args.threads:
        torch.set_num_threads(args.threads)
    tic = time.monotonic()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    sinop_dir = Path(args.sinop_dir)
    if not Path(args.mt_csv).is_file():
        raise BadInputError(f"MT_CSV: {args.mt_csv} is not a file")

    # --- the cube and its dates; the training table on the cube's season ----------------------
    cube, profile, cube_dates = read_cube(sinop_dir)
    start = args.reference_start or cube_dates[0]
    season = [int(d) for d in mod13q1_dates(dt.date.fromisoformat(start))]
    as_int = [int(d.replace("-", "")) for d in cube_dates]
    if season != as_int:
        raise BadInputError(
            f"{sinop_dir}: the cube's dates {cube_dates[0]} .. {cube_dates[-1]} are not the 23 MOD13Q1 "
            f"composites from {start}: the samples cannot be aligned on them by position"
        )
    columns, class_names, dates = read_sits_csv(args.mt_csv, start)
    keep = {"label"} | {f"{SENSOR}_{b.lower()}_{d}" for b in CUBE_BANDS for d in dates}
    columns = {k: v for k, v in columns.items() if k in keep}
    table = out / "mt_ndvi_evi.parquet"
    write_parquet(table, columns, np.arange(columns["label"].size))
    samples = load_samples(str(table))
    opts = options_of(args)
    result = train(
        samples,
        opts,
        0,
        build=builder(samples, opts),
        split_seed=args.seed,
        torch_seed=torch_seed_of(args.seed, 0),
        fingerprint="sinop-transfer",
        checkpoint_uri=str(out / "checkpoint.txt"),
        device=torch.device("cpu"),
        options=args.options,
    )
    chosen = result.best[args.criterion]
    row = next(r for r in result.history if r["epoch"] == chosen["epoch"])
    network = result.network
    codes = [int(c) for c in samples.classes]
    (out / "model.txt").write_bytes(
        sitsnn.save_model(
            network,
            {
                "classes": codes,
                "class_names": class_names,
                "feature_names": samples.feature_names,
                "dates": samples.dates,
                "epoch": int(chosen["epoch"]),
            },
        )
    )
    train_s = time.monotonic() - tic

    # --- the cube through the inference stage's feature pipeline and predictor ----------------
    stack = out / "sinop_ndvi_evi.tif"
    write_stack(stack, cube, profile, cube_dates)
    points = read_points(sinop_dir)
    unknown = sorted({p["label"] for p in points} - set(class_names))
    if unknown:
        raise BadInputError(f"{sinop_dir / POINTS_FILE}: labels {unknown} are not classes of the samples {class_names}")
    code = {name: i + 1 for i, name in enumerate(class_names)}
    write_points(out / "sinop_points.geojson", points, code)
    write_config(out / "sinop.cfg", stack, out / "sinop_points.geojson", opts.model_dump(mode="json"))
    cfg = load_config(str(out / "sinop.cfg"))
    pipe = FeaturePipeline(cfg, TILE)
    if pipe.feature_names != samples.feature_names:
        raise BadInputError(
            f"the cube yields the features {pipe.feature_names[:2]} ... ({len(pipe.feature_names)}), the model was "
            f"trained on {samples.feature_names[:2]} ... ({len(samples.feature_names)})"
        )
    grid = pipe.grid
    block = pipe.features(Window(0, 0, grid.width, grid.height))
    predictor = sitsnn.Predictor(network, device="cpu")
    labels, confidence, _ = predictor.classify(block.values, codes)
    classes = np.zeros((grid.height, grid.width), np.uint8)
    classes[block.rows, block.cols] = labels
    tags = {f"class_{c}": n for c, n in zip(codes, class_names)}
    with rasterio.open(
        out / "sinop_map.tif",
        "w",
        driver="GTiff",
        dtype="uint8",
        count=1,
        nodata=0,
        compress="deflate",
        **grid.profile(),
    ) as dst:
        dst.write(classes, 1)
        dst.update_tags(**tags, model="model.txt", training_samples=str(args.mt_csv))

    # --- agreement with the labelled points ---------------------------------------------------
    xs, ys = warp_transform(
        "EPSG:4326", grid.crs, [float(p["longitude"]) for p in points], [float(p["latitude"]) for p in points]
    )
    inverse = ~grid.transform
    rows_out = []
    print(
        f"{'id':>3} {'longitude':>10} {'latitude':>10} {'row':>4} {'col':>4}  {'label':<14} {'map':<14} agrees  "
        "label in 3x3"
    )
    for p, x, y in zip(points, xs, ys):
        col, row_ = (int(np.floor(v)) for v in inverse * (x, y))
        inside = 0 <= row_ < grid.height and 0 <= col < grid.width
        mapped = int(classes[row_, col]) if inside else 0
        name = class_names[mapped - 1] if mapped else "(outside)" if not inside else "(no data)"
        agrees = name == p["label"]
        # a point's location is known to a fraction of a 231 m pixel: is its class in the 3 x 3 block around it?
        around = classes[max(row_ - 1, 0) : row_ + 2, max(col - 1, 0) : col + 2] if inside else classes[:0, :0]
        near = bool((around == code[p["label"]]).any())
        rows_out.append(
            {
                "id": int(p["id"]),
                "longitude": float(p["longitude"]),
                "latitude": float(p["latitude"]),
                "row": row_,
                "col": col,
                "label": p["label"],
                "map": name,
                "agrees": agrees,
                "in_3x3": near,
                "code": code[p["label"]],
            }
        )
        print(
            f"{p['id']:>3} {float(p['longitude']):>10.5f} {float(p['latitude']):>10.5f} {row_:>4} {col:>4}  "
            f"{p['label']:<14} {name:<14} {'yes' if agrees else 'no':<6}  {'yes' if near else 'no'}"
        )
    agree = sum(r["agrees"] for r in rows_out)
    near_count = sum(r["in_3x3"] for r in rows_out)
    print(f"agreement: {agree} of {len(rows_out)} points (the label within the 3 x 3 pixels around: {near_count})")
    quicklook(out / "sinop_map.png", classes, class_names, rows_out)

    counts = {class_names[c - 1]: int((classes == c).sum()) for c in codes if (classes == c).any()}
    seconds = time.monotonic() - tic
    summary = {
        "bench": "sinop",
        "samples": int(samples.n),
        "classes": class_names,
        "dates": [dates[0], dates[-1]],
        "dl_name": args.dl_name,
        "dl_parameters": args.dl_parameters,
        "training_options": args.training_options,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "criterion": args.criterion,
        "seed": args.seed,
        "epoch": int(chosen["epoch"]),
        "val_oa": float(row["oa"]),
        "pixels": int(grid.width * grid.height),
        "classified": int(labels.size),
        "map_classes": counts,
        "agreement": agree,
        "agreement_3x3": near_count,
        "points": len(rows_out),
        "per_point": rows_out,
        "outputs": [str(out / n) for n in ("sinop_map.tif", "sinop_map.png", "model.txt", "sinop.cfg")],
        "train_seconds": round(train_s, 1),
        "seconds": round(seconds, 1),
        "machine": f"{cpu_model()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
    }
    print(f"validation OA {summary['val_oa']:.4f} (epoch {summary['epoch']}); map classes {counts}")
    print(f"{seconds:.0f} s on {summary['machine']}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BadInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
