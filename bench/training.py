"""Training throughput: samples per second per epoch in ``full`` and ``stream`` data-loader modes.

A sample database of ``--samples`` pixels x ``--dates`` dates x ``--bands`` bands (default
1,000,000 x 36 x 10, 1.44 GB of float32) is generated on the fly in a temporary folder, in the
layout the sampling stage writes (``learningSamples/Samples_region_R_seedS_learn.nc``: NetCDF4,
``features`` (sample, date, component) float32 chunked by ``SAMPLE_CHUNK`` samples, no
compression, ``label``, ``polygon_id``, ``date``, ``component_name``, ``feature_name``,
``stats_*``; polygons of ``--polygon-size`` consecutive pixels) and flushed to disk (fsync), so
that its writeback does not run during the timings. Then, for each mode:

* **loader**: passes over the learning samples (the best of ``--repeats``), with 0 and with
  ``--num-workers`` workers, through the training stage's own batch sources (``InMemoryBatches`` /
  ``StreamBatches`` in a ``DataLoader``, as ``train`` builds them), no network: the rate at which
  the data loader can feed batches;
* **training**: ``sitsflow.training.train`` for ``--epochs`` epochs of a small network
  (``MLPClassifier``, ``--hidden`` units, so that the loader's share is visible), one line per epoch:
  (learning + validation samples) / the epoch's seconds (training pass + validation pass; the
  checkpoint write is timed apart). The setup (reading the file in ``full`` mode, statistics, split)
  is timed apart too.

The last line is the ratio stream / full of each rate, then one JSON line
(``{"bench": "training", ...}``).

    .venv/bin/python bench/training.py                        # 1M x 36 x 10, CUDA when available
    .venv/bin/python bench/training.py --samples 200000 --epochs 1
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import netCDF4
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402

from sitsflow import layout
from sitsflow import nn as sitsnn
from sitsflow.config import DeepLearningParameters, HyperparametersSolver
from sitsflow.log import get_logger, setup_logging
from sitsflow.samples import SAMPLE_CHUNK, open_netcdf
from sitsflow.training import split_learn_validation, train
from sitsflow.training.loaders import InMemoryBatches, StreamBatches, make_loader

log = get_logger("bench.training")

SENSOR = "s2_theia"


def generate(path: Path, n: int, nb_dates: int, nb_bands: int, nb_classes: int, polygon_size: int,
             seed: int, block: int = 65536) -> float:
    """Write a learnable synthetic sample database at ``path``; return the seconds it took.

    Each polygon of ``polygon_size`` consecutive samples has a class drawn at random; a sample is
    the class's mean series (uniform in [0, 0.5]) plus Gaussian noise (sd 0.25), float32.
    Statistics are accumulated block by block (float64), so memory stays at one block.
    """
    tic = time.monotonic()
    rng = np.random.default_rng(seed)
    means = rng.uniform(0.0, 0.5, (nb_classes, nb_dates, nb_bands)).astype(np.float32)
    start = dt.date(2018, 1, 1)
    dates = [int((start + dt.timedelta(days=10 * i)).strftime("%Y%m%d")) for i in range(nb_dates)]
    bands = [f"b{i + 1}" for i in range(nb_bands)]
    nfeat = nb_dates * nb_bands
    s1 = np.zeros(nfeat)
    s2 = np.zeros(nfeat)
    lo = np.full(nfeat, np.inf)
    hi = np.full(nfeat, -np.inf)
    n_poly = (n + polygon_size - 1) // polygon_size
    poly_class = rng.integers(1, nb_classes + 1, n_poly)
    with netCDF4.Dataset(str(path), "w", format="NETCDF4") as ds:
        ds.createDimension("sample", None)
        ds.createDimension("date", nb_dates)
        ds.createDimension("component", nb_bands)
        ds.createDimension("feature", nfeat)
        chunk = min(SAMPLE_CHUNK, n)
        feats = ds.createVariable("features", "f4", ("sample", "date", "component"),
                                  chunksizes=(chunk, nb_dates, nb_bands))
        label = ds.createVariable("label", "i4", ("sample",), chunksizes=(chunk,))
        poly = ds.createVariable("polygon_id", "i8", ("sample",), chunksizes=(chunk,))
        for b0 in range(0, n, block):
            b1 = min(n, b0 + block)
            pid = np.arange(b0, b1) // polygon_size
            lab = poly_class[pid]
            x = rng.standard_normal((b1 - b0, nb_dates, nb_bands), dtype=np.float32)
            x *= 0.25
            x += means[lab - 1]
            feats[b0:b1] = x
            label[b0:b1] = lab
            poly[b0:b1] = pid
            flat = x.reshape(b1 - b0, -1).astype(np.float64)
            s1 += flat.sum(0)
            s2 += (flat * flat).sum(0)
            lo = np.minimum(lo, flat.min(0))
            hi = np.maximum(hi, flat.max(0))
        ds.createVariable("date", "i4", ("date",))[:] = np.array(dates, np.int32)
        comp = ds.createVariable("component_name", str, ("component",))
        for i, b in enumerate(bands):
            comp[i] = b
        fname = ds.createVariable("feature_name", str, ("feature",))
        for i, (d, b) in enumerate((d, b) for d in dates for b in bands):
            fname[i] = f"{SENSOR}_{b}_{d}"
        mean = s1 / n
        stats = {"min": lo, "max": hi, "mean": mean, "var": np.maximum(s2 / n - mean * mean, 0.0)}
        for key, values in stats.items():
            ds.createVariable(f"stats_{key}", "f4", ("feature",))[:] = values.astype(np.float32)
        ds.sensor = SENSOR
        ds.classes = json.dumps(list(range(1, nb_classes + 1)))
        ds.class_names = json.dumps({str(c): f"class {c}" for c in range(1, nb_classes + 1)})
        ds.region = 1
        ds.seed = 0
        ds.fingerprint = f"bench-{n}-{nb_dates}-{nb_bands}-{seed}"
    # flush the new file to disk now: its writeback must not run during the timed epochs (a real
    # database was written by the sampling stage long before training)
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.monotonic() - tic


def options(mode: str, args: argparse.Namespace) -> DeepLearningParameters:
    """The deep-learning parameters of the benchmark (one candidate: hyp 0)."""
    return DeepLearningParameters(
        dl_name=args.network,
        dl_parameters=json.loads(args.dl_parameters) if args.dl_parameters else (
            {"hidden_layers": [args.hidden], "dropout": 0.1} if args.network == "MLPClassifier" else {}),
        epochs=args.epochs, num_workers=args.num_workers, restart_from_checkpoint=False,
        dataloader_mode=mode, epoch_to_trigger=1,
        hyperparameters_solver=HyperparametersSolver(batch_size=(args.batch_size,), learning_rate=(1e-3,)),
    )


def loader_alone(path: Path, mode: str, args: argparse.Namespace, num_workers: int) -> dict[str, float]:
    """Passes over the learning samples through ``train``'s batch source, no network; the best of
    ``args.repeats`` passes counts (each pass draws a new epoch order)."""
    tic = time.monotonic()
    samples = open_netcdf(str(path), lazy=mode == "stream")
    try:
        label_idx = samples.label_indices()
        learn, _ = split_learn_validation(samples.labels, samples.polygon_ids, 0)
        if mode == "full":
            x_all = torch.from_numpy(samples.load_all())
            learn_t = torch.from_numpy(learn)
            ds: Any = InMemoryBatches(x_all[learn_t], torch.from_numpy(label_idx)[learn_t],
                                      args.batch_size, drop_single=True)
            del x_all
        else:
            ds = StreamBatches(samples.reader, label_idx, learn, args.batch_size, shuffle=True, drop_single=True)
        setup = time.monotonic() - tic
        gen = torch.Generator().manual_seed(0)
        seconds = float("inf")
        for _ in range(args.repeats):
            if mode == "full":
                ds.set_order(torch.randperm(len(ds.targets), generator=gen))
            else:
                ds.set_epoch(gen)
            loader = make_loader(ds, num_workers=num_workers, generator=gen, pin_memory=False)
            tic = time.monotonic()
            count = 0
            for x, y in loader:
                count += int(y.shape[0])
                float(x[-1, -1, -1])  # touch the batch
            seconds = min(seconds, time.monotonic() - tic)
    finally:
        samples.reader.close()
    return {"num_workers": num_workers, "setup_s": round(setup, 2), "seconds": round(seconds, 2),
            "samples": count, "samples_per_s": count / seconds}


def training(path: Path, mode: str, args: argparse.Namespace, device: torch.device, workdir: Path) -> dict[str, Any]:
    """``train`` for ``args.epochs`` epochs; per-epoch rates from the history's epoch seconds."""
    opts = options(mode, args)
    ends: list[float] = []
    tic = time.monotonic()
    samples = open_netcdf(str(path), lazy=mode == "stream")
    try:
        def build(*, stats: dict[str, dict[str, torch.Tensor]]) -> torch.nn.Module:
            return sitsnn.build_network(
                opts.dl_name, opts.dl_parameters, nb_dates=samples.nb_dates,
                nb_components=samples.nb_components, nb_classes=len(samples.classes),
                dates=samples.dates, stats=stats, sensor=samples.sensor,
            )

        result = train(samples, opts, 0, build=build, split_seed=0, torch_seed=0, fingerprint=f"bench-{mode}",
                       checkpoint_uri=str(workdir / f"checkpoint_{mode}.txt"), device=device,
                       on_epoch_end=lambda e, r: ends.append(time.monotonic()))
    finally:
        samples.reader.close()
    total = time.monotonic() - tic
    n = result.nb_learn + result.nb_validation
    epochs = [{"epoch": int(r["epoch"]), "seconds": round(r["seconds"], 2), "samples_per_s": n / r["seconds"],
               "val_oa": round(r["oa"], 4)} for r in result.history]
    epoch_s = sum(r["seconds"] for r in result.history)
    return {"nb_learn": result.nb_learn, "nb_validation": result.nb_validation, "epochs": epochs,
            "setup_and_checkpoints_s": round(total - epoch_s, 2),
            "samples_per_s": n * len(epochs) / epoch_s}


def machine(device: torch.device) -> str:
    """A short description of the CPU or GPU that ran the benchmark."""
    return describe(device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1_000_000)
    parser.add_argument("--dates", type=int, default=36)
    parser.add_argument("--bands", type=int, default=10)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--polygon-size", type=int, default=50, help="consecutive samples per polygon")
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64, help="width of the MLP's single hidden layer")
    parser.add_argument("--network", default="MLPClassifier", choices=list(sitsnn.NETWORKS),
                        help="the network trained (default: a one-layer MLP, so that the loader's share shows)")
    parser.add_argument("--dl-parameters", default=None, help="its dl_parameters as JSON (default: its defaults)")
    parser.add_argument("--num-workers", type=int, default=1, help="data-loader workers of the training runs "
                        "(config default: 1); the loader alone is measured with 0 and this many")
    parser.add_argument("--repeats", type=int, default=2, help="passes of the loader alone; the best counts")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--modes", nargs="+", default=["full", "stream"], choices=["full", "stream"])
    parser.add_argument("--skip-training", action="store_true", help="measure the data loader only")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:K (default: cuda when available)")
    parser.add_argument("--workdir", default=None, help="folder of the generated database (default: a temp dir)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    setup_logging(os.environ.get("SITSFLOW_LOG_LEVEL", "WARNING"))
    device = sitsnn.resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="sitsflow-bench-training-", dir=args.workdir) as tmp:
        work = Path(tmp)
        path = Path(layout.samples_learn(str(work), 1, 0))
        path.parent.mkdir(parents=True, exist_ok=True)
        gen_s = generate(path, args.samples, args.dates, args.bands, args.classes, args.polygon_size, args.seed)
        size_gb = path.stat().st_size / 1e9
        print(f"database: {args.samples} samples x {args.dates} dates x {args.bands} bands, "
              f"{size_gb:.2f} GB, generated in {gen_s:.0f} s", flush=True)
        results: dict[str, Any] = {"loader": {}, "training": {}}
        for workers in sorted({0, args.num_workers}):
            for mode in args.modes:
                r = loader_alone(path, mode, args, workers)
                results["loader"][f"{mode}_workers_{workers}"] = r
                print(f"loader alone  {mode:6s} ({workers} workers): {r['samples_per_s']:12,.0f} samples/s "
                      f"({r['samples']} samples in {r['seconds']:.1f} s; setup {r['setup_s']:.1f} s)", flush=True)
        if not args.skip_training:
            for mode in args.modes:
                r = training(path, mode, args, device, work)
                results["training"][mode] = r
                for e in r["epochs"]:
                    print(f"training      {mode:6s}: epoch {e['epoch']}: {e['samples_per_s']:12,.0f} samples/s "
                          f"({e['seconds']:.1f} s, validation OA {e['val_oa']:.3f})", flush=True)
                print(f"training      {mode:6s}: setup + checkpoints {r['setup_and_checkpoints_s']:.1f} s", flush=True)
    ratios = {}
    for workers in sorted({0, args.num_workers}):
        full, stream = (results["loader"].get(f"{m}_workers_{workers}") for m in ("full", "stream"))
        if full and stream:
            ratios[f"loader_workers_{workers}"] = stream["samples_per_s"] / full["samples_per_s"]
    if all(m in results["training"] for m in ("full", "stream")):
        ratios["training"] = results["training"]["stream"]["samples_per_s"] / results["training"]["full"]["samples_per_s"]
    for what, ratio in ratios.items():
        print(f"stream / full ({what}): {ratio:.2f}")
    summary = {"bench": "training", "samples": args.samples, "dates": args.dates, "bands": args.bands,
               "batch_size": args.batch_size, "num_workers": args.num_workers, "hidden": args.hidden,
               "network": args.network,
               "threads": torch.get_num_threads(),
               "device": str(device), "machine": machine(device), "torch": torch.__version__,
               "generation_s": round(gen_s, 1), "database_gb": round(size_gb, 3), **results,
               "stream_over_full": ratios}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
