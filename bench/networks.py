"""Inference speed of the built-in networks: pixels per second through ``Predictor.proba``.

Each built-in network, with its default parameters, classifies ``--pixels`` random pixel series of
36 dates x 10 bands (float32 reflectances, 5 % NaN) into ``--classes`` classes, after a warm-up
batch; the best of ``--repeats`` timed passes counts. Each variant is a form (the training form,
``reference``, or the folded ``inference`` form), a precision, and on CUDA optionally
``torch.compile``; "same labels" compares each variant's labels with the first one's. On CUDA the
rate with the inputs already on the device (labels made, nothing copied) is measured too: the
host's float32 series cost 1.44 kB a pixel to copy. Prints a plain-text table, then one JSON line
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

from sitsflow.nn import NETWORKS, Predictor, build_network, resolve_device

NB_DATES, NB_BANDS = 36, 10


def machine(device: torch.device) -> str:
    """A short description of the CPU or GPU that ran the benchmark."""
    return describe(device)


VARIANTS = ("reference-fp32", "inference-fp32", "reference-bf16", "inference-bf16", "inference-bf16-compiled",
            "inference-bf16-max")
"""form-precision[-compiled|-max]: the training form or the folded inference form (sitsflow.nn.inference_form);
compiled = ``SITSFLOW_COMPILE=1``, max = ``SITSFLOW_COMPILE=max`` (autotuned kernels, static batch shape)."""


def device_rate(predictor: Predictor, x_dev: torch.Tensor, repeats: int) -> float:
    """Pixels/s of the network alone on inputs already on the device (labels made, nothing copied)."""
    size = predictor.batch_size
    best = float("inf")
    with torch.inference_mode():
        for k in range(repeats + 1):  # the first pass warms up (and compiles)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for start in range(0, x_dev.shape[0], size):
                predictor.forward(x_dev[start : start + size]).argmax(1)
            torch.cuda.synchronize()
            if k:
                best = min(best, time.perf_counter() - t0)
    return x_dev.shape[0] / best


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; return the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:K (default: cuda when available)")
    parser.add_argument("--pixels", type=int, default=None, help="pixels per pass (default 30000 on CPU, 4M on CUDA)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the automatic choice")
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2, help="timed passes per network; the best counts")
    parser.add_argument("--networks", nargs="*", default=list(NETWORKS), choices=list(NETWORKS))
    parser.add_argument("--variants", nargs="*", default=None, choices=VARIANTS,
                        help="default: reference-fp32 and inference-fp32 on the CPU, all on CUDA")
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    variants = args.variants or (VARIANTS if cuda else VARIANTS[:2])
    pixels = args.pixels or (4_000_000 if cuda else 30_000)
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
        reference = None
        for variant in variants:
            form, precision, *rest = variant.split("-")
            predictor = Predictor(net, device=device, batch_size=args.batch_size, form=form, precision=precision,
                                  compile="max" if rest == ["max"] else bool(rest))  # each form's own automatic batch size
            batch = predictor.batch_size
            predictor.proba(x[: min(pixels, 2 * batch)])  # warm-up (and compilation)
            best = float("inf")
            for _ in range(args.repeats):
                if cuda:
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                proba = predictor.proba(x)
                if cuda:
                    torch.cuda.synchronize(device)
                best = min(best, time.perf_counter() - t0)
            labels = proba.argmax(1)
            if reference is None:
                reference = labels
            row = {
                "network": name, "variant": variant,
                "parameters": sum(p.numel() for p in net.parameters()),
                "batch_size": batch,
                "seconds": round(best, 4),
                "pixels_per_second": round(pixels / best),
                "labels_as_first_variant": round(float((labels == reference).mean()), 5),
            }
            if cuda:
                n_dev = max(batch, pixels // batch * batch)
                x_dev = torch.from_numpy(x[:n_dev]).to(device)
                row["device_resident_pixels_per_second"] = round(device_rate(predictor, x_dev, args.repeats))
                del x_dev
            rows.append(row)
            del predictor

    out = sys.stdout
    out.write(f"device: {device} ({machine(device)}); torch {torch.__version__}; "
              f"{pixels} pixels of {NB_DATES} dates x {NB_BANDS} bands, {args.classes} classes\n")
    out.write(f"{'network':<30}{'variant':<26}{'batch':>9}{'pixels/s':>14}{'on device':>14}{'same labels':>12}\n")
    for r in rows:
        dev_rate = r.get("device_resident_pixels_per_second")
        out.write(f"{r['network']:<30}{r['variant']:<26}{r['batch_size']:>9}{r['pixels_per_second']:>14,}"
                  f"{(f'{dev_rate:,}' if dev_rate else '-'):>14}{r['labels_as_first_variant']:>12.4f}\n")
    out.write(json.dumps({
        "bench": "networks", "device": str(device), "machine": machine(device), "torch": torch.__version__,
        "pixels": pixels, "dates": NB_DATES, "bands": NB_BANDS, "classes": args.classes, "results": rows,
    }) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
