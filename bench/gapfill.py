"""Gap-filling benchmark: seconds to gap-fill generated pixel series, batch by batch, with the CPU's
path (every pixel interpolated between the same acquisitions, then only the values next to an
invalid observation redone) against the general path (every value between its own pixel's valid
observations: what a GPU runs), and the check that both give the same values bit for bit.

Cases: the date grid on the acquisitions (a 10-day grid over 10-day acquisitions: the inference
benchmark's chunk) or between them (acquisitions on irregular days onto a 10-day grid); every
observation valid, or a fraction invalid at random (a cloud mask).

    python bench/gapfill.py [--pixels 131072] [--batch 8192] [--dates 36] [--bands 10] [--repeat 3]

Prints a table and one JSON line; record the figures in docs/benchmarks.md with the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "services"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import cpu_name  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pixels", type=int, default=131072)
    parser.add_argument("--batch", type=int, default=8192, help="pixels per call (the predictor's CPU batches: 4-8 k)")
    parser.add_argument("--dates", type=int, default=36, help="acquisitions (and grid dates)")
    parser.add_argument("--bands", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)

    import torch

    from sitsflow.features.compute import _gapfill

    rng = np.random.default_rng(0)
    raw = torch.from_numpy(rng.uniform(0, 1, (args.pixels, args.dates, args.bands)).astype(np.float32))
    start = 738000.0
    regular = start + 10.0 * np.arange(args.dates)
    irregular = np.sort(rng.choice(np.arange(start, start + 10 * args.dates), args.dates, replace=False))
    grids = {"on acquisitions": (regular, regular), "between acquisitions": (irregular, regular)}
    results: dict = {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                     "pixels": args.pixels, "batch": args.batch, "dates": args.dates, "bands": args.bands, "cases": []}
    print(f"machine: {results['cpu']} ({results['cores']} cores, torch {results['torch_threads']} threads); "
          f"{args.pixels} px in batches of {args.batch}, {args.dates} dates x {args.bands} bands")
    print(f"{'grid':22s} {'invalid':>8s} {'CPU path (s)':>13s} {'general (s)':>12s}  same")
    for invalid in (0.0, 0.1, 0.3, 0.6):
        valid = torch.from_numpy(rng.uniform(0, 1, (args.pixels, args.dates)) >= invalid)
        for grid, (t_obs, targets) in grids.items():
            seconds, outputs = {}, {}
            for label, fast in (("cpu", None), ("general", False)):
                best = float("inf")
                with torch.inference_mode():
                    for _ in range(args.repeat):
                        t0 = time.perf_counter()
                        out = [_gapfill(raw[i : i + args.batch], valid[i : i + args.batch], t_obs, targets, fast=fast)
                               for i in range(0, args.pixels, args.batch)]
                        best = min(best, time.perf_counter() - t0)
                seconds[label], outputs[label] = best, torch.cat(out)
            same = torch.equal(outputs["cpu"].nan_to_num(7.0), outputs["general"].nan_to_num(7.0))
            print(f"{grid:22s} {invalid:>8.0%} {seconds['cpu']:>13.3f} {seconds['general']:>12.3f}  {same}")
            results["cases"].append({"grid": grid, "invalid": invalid, "cpu_s": round(seconds["cpu"], 3),
                                     "general_s": round(seconds["general"], 3), "same": same})
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
