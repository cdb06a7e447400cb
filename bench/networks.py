"""Inference speed of the built-in networks: pixels per second through ``predict_proba``.

Each built-in network, with its default parameters, classifies ``--pixels`` random pixel series of
36 dates x 10 bands (float32 reflectances, 5 % NaN) into ``--classes`` classes, after a warm-up
batch; the best of ``--repeats`` timed passes counts. Prints a plain-text table, then one JSON line
(``{"bench": "networks", ...}``) for tooling.

    .venv/bin/python bench/networks.py                  # CPU here, CUDA when available
    .venv/bin/python bench/networks.py --device cpu --pixels 20000
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402

from sitsflow.nn import NETWORKS, auto_batch_size, build_network, predict_proba, resolve_device

NB_DATES, NB_BANDS = 36, 10


def machine(device: torch.device) -> str:
    """A short description of the CPU or GPU that ran the benchmark."""
    return describe(device)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; return the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:K (default: cuda when available)")
    parser.add_argument("--pixels", type=int, default=None, help="pixels per pass (default 30000 on CPU, 4M on CUDA)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: predict_proba's automatic choice")
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2, help="timed passes per network; the best counts")
    parser.add_argument("--networks", nargs="*", default=list(NETWORKS), choices=list(NETWORKS))
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    pixels = args.pixels or (4_000_000 if device.type == "cuda" else 30_000)
    rng = np.random.default_rng(0)
    x = rng.uniform(0.0, 0.6, (pixels, NB_DATES, NB_BANDS)).astype(np.float32)
    x[rng.random(x.shape) < 0.05] = np.nan
    flat = np.nan_to_num(x[:10_000], nan=0.3).reshape(min(pixels, 10_000), -1)
    stats = {"s2_theia": {"mean": flat.mean(0), "var": flat.var(0)}}
    start = dt.date(2018, 1, 1)
    dates = [int((start + dt.timedelta(days=10 * i)).strftime("%Y%m%d")) for i in range(NB_DATES)]

    rows = []
    for name in args.networks:
        torch.manual_seed(0)
        net = build_network(
            name, {}, nb_dates=NB_DATES, nb_components=NB_BANDS, nb_classes=args.classes, dates=dates,
            stats=stats, sensor="s2_theia",
        ).eval()
        net.to(device)
        batch = args.batch_size or auto_batch_size(net, device)
        predict_proba(net, x[: min(pixels, 4 * batch)], batch_size=batch, device=device)  # warm-up
        best = float("inf")
        for _ in range(args.repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            predict_proba(net, x, batch_size=batch, device=device)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - t0)
        rows.append({
            "network": name,
            "parameters": sum(p.numel() for p in net.parameters()),
            "batch_size": batch,
            "seconds": round(best, 4),
            "pixels_per_second": round(pixels / best),
        })

    out = sys.stdout
    out.write(f"device: {device} ({machine(device)}); torch {torch.__version__}; "
              f"{pixels} pixels of {NB_DATES} dates x {NB_BANDS} bands, {args.classes} classes\n")
    out.write(f"{'network':<32}{'parameters':>12}{'batch':>9}{'seconds':>10}{'pixels/s':>14}\n")
    for r in rows:
        out.write(f"{r['network']:<32}{r['parameters']:>12,}{r['batch_size']:>9}{r['seconds']:>10.3f}"
                  f"{r['pixels_per_second']:>14,}\n")
    out.write(json.dumps({
        "bench": "networks", "device": str(device), "machine": machine(device), "torch": torch.__version__,
        "pixels": pixels, "dates": NB_DATES, "bands": NB_BANDS, "classes": args.classes, "results": rows,
    }) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
