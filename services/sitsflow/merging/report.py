"""The validation report RESULTS.txt / RESULTS.json, measured on the test samples (polygons never
used for training or validation); the measures are :mod:`sitsflow.accuracy`'s.

Per seed: the confusion matrix, OA, kappa, macro and weighted F-score, per class precision
(user's accuracy) and recall (producer's accuracy) with their 95 % intervals and the F-score,
and the area-weighted estimates of Olofsson et al. (2014) with the final map's class areas as
weights. With several runs (seeds), the report adds the mean and the 95 % confidence interval
over seeds (Student's t).
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from sitsflow import storage

# two-sided 95 % Student t quantiles for 1..30 degrees of freedom (beyond: 1.96)
_T975 = [
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
]


def _interval(values: list[float]) -> dict:
    n = len(values)
    mean = float(np.mean(values))
    if n < 2:
        return {"mean": mean, "ci95": 0.0}
    t = _T975[n - 2] if n - 2 < len(_T975) else 1.96
    return {"mean": mean, "ci95": float(t * np.std(values, ddof=1) / math.sqrt(n))}


def summarize(per_seed: list[dict]) -> dict:
    """Mean and 95 % interval over seeds of OA, kappa, macro and weighted F-score and per-class F-score."""
    codes = sorted({c for r in per_seed for c in r["per_class"]}, key=int)
    out = {
        "overall_accuracy": _interval([r["overall_accuracy"] for r in per_seed]),
        "kappa": _interval([r["kappa"] for r in per_seed]),
        "fscore": {c: _interval([r["per_class"].get(c, {}).get("fscore", 0.0) for r in per_seed]) for c in codes},
    }
    for key in ("fscore_macro", "fscore_weighted"):
        values = [r[key] for r in per_seed if r.get(key) is not None]
        if len(values) == len(per_seed):
            out[key] = _interval(values)
    return out


def _fmt(v, digits: int = 4) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _interval_text(ci) -> str:
    return f"[{_fmt(ci[0], 3)}, {_fmt(ci[1], 3)}]"


def _area_text(aw: dict, names: dict, width: int) -> list[str]:
    lines = [
        "Area-weighted estimates (Olofsson et al. 2014; weights: the map's class areas in pixels;",
        "± = 95 % interval, 1.96 standard errors)",
    ]
    oa = aw["overall_accuracy"]
    lines.append(f"Overall accuracy : {_fmt(oa['estimate'])} ± {_fmt(oa['ci95'])} (SE {_fmt(oa['se'])})")
    lines.append(f"{'class':<{width}}{'map pixels':>12}{'user':>16}{'producer':>16}{'area (pixels)':>24}")
    for c, e in aw["per_class"].items():
        ua, pa, area = e["users_accuracy"], e["producers_accuracy"], e["area"]
        lines.append(
            f"{c} {names.get(int(c), '')}".ljust(width)
            + f"{e['map_area']:>12.0f}"
            + f"{_fmt(ua['estimate'], 3) + ' ± ' + _fmt(ua['ci95'], 3):>16}"
            + f"{_fmt(pa['estimate'], 3) + ' ± ' + _fmt(pa['ci95'], 3):>16}"
            + f"{_fmt(area['estimate'], 0) + ' ± ' + _fmt(area['ci95'], 0):>24}"
        )
    if aw["unsampled"]:
        lines.append(f"Map classes without test sample (left out of the estimate): {aw['unsampled']}")
    if aw["excluded_samples"]:
        lines.append(f"Test samples on unclassified pixels (left out of the estimate): {aw['excluded_samples']}")
    return lines


def _text(per_seed: list[dict], heading: str | None = None) -> str:
    lines = [
        "sitsflow validation report",
        heading or "Measured on the test samples (polygons never used in training).",
        "",
    ]
    for seed, r in enumerate(per_seed):
        classes = r["classes"]
        names = {c: r["per_class"][str(c)]["name"] for c in classes}
        title = "fusion of the runs" if heading else f"seed {seed}"
        lines.append(f"===== {title} ({r['samples']} test pixels) =====")
        lines.append("Confusion matrix (rows: reference, columns: prediction; 0 = not classified)")
        width = max(8, *(len(f"{c} {names[c]}") for c in classes)) + 1
        lines.append(" " * width + "".join(f"{c:>9}" for c in classes))
        for i, c in enumerate(classes):
            lines.append(f"{c} {names[c]}".ljust(width) + "".join(f"{v:>9}" for v in r["confusion_matrix"][i]))
        lines.append("")
        lines.append(f"Overall accuracy : {r['overall_accuracy']:.4f}")
        lines.append(f"Kappa            : {r['kappa']:.4f}")
        if "fscore_macro" in r:
            lines.append(f"F-score, macro   : {_fmt(r['fscore_macro'])}")
            lines.append(f"F-score, weighted: {_fmt(r['fscore_weighted'])}")
        lines.append("")
        lines.append(
            f"{'class':<{width}}{'precision':>10}{'recall':>10}{'F-score':>10}{'samples':>10}"
            f"{'user 95 % interval':>22}{'producer 95 % interval':>24}"
        )
        for c in classes:
            pc = r["per_class"][str(c)]
            lines.append(
                f"{c} {pc['name']}".ljust(width)
                + f"{pc['precision']:>10.4f}{pc['recall']:>10.4f}{pc['fscore']:>10.4f}{pc['reference_samples']:>10}"
                + f"{_interval_text(pc['users_accuracy_ci95']) if 'users_accuracy_ci95' in pc else '':>22}"
                + f"{_interval_text(pc['producers_accuracy_ci95']) if 'producers_accuracy_ci95' in pc else '':>24}"
            )
        lines.append(
            "(precision = user's accuracy, recall = producer's accuracy; "
            "intervals: Wilson score, pixels taken as independent)"
        )
        if r.get("area_weighted"):
            lines.append("")
            lines.extend(_area_text(r["area_weighted"], names, width))
        lines.append("")
    if len(per_seed) > 1:
        s = summarize(per_seed)
        lines.append(f"===== over {len(per_seed)} seeds: mean ± 95 % interval =====")
        lines.append(f"Overall accuracy : {s['overall_accuracy']['mean']:.4f} ± {s['overall_accuracy']['ci95']:.4f}")
        lines.append(f"Kappa            : {s['kappa']['mean']:.4f} ± {s['kappa']['ci95']:.4f}")
        for key, label in (("fscore_macro", "F-score, macro   "), ("fscore_weighted", "F-score, weighted")):
            if key in s:
                lines.append(f"{label}: {s[key]['mean']:.4f} ± {s[key]['ci95']:.4f}")
        for c, v in s["fscore"].items():
            lines.append(f"F-score {c:<8}: {v['mean']:.4f} ± {v['ci95']:.4f}")
    return "\n".join(lines) + "\n"


def write_reports(per_seed: list[dict], txt_uri: str, json_uri: str, *, heading: str | None = None) -> None:
    """Write RESULTS.txt and RESULTS.json: the runs' reports (``seeds``), or with ``heading`` (what
    was measured on what) the one report of the runs' fused map (``fusion``)."""
    doc: dict[str, Any] = {"fusion": per_seed[0], "heading": heading} if heading else {"seeds": per_seed}
    if len(per_seed) > 1:
        doc["summary"] = summarize(per_seed)
    storage.write_text(json_uri, json.dumps(doc, indent=2))
    storage.write_text(txt_uri, _text(per_seed, heading))
