"""The validation report: confusion matrix, overall accuracy, kappa, per-class precision/recall/F-score.

Measured on the test samples (polygons never used for training or validation). With several
runs (seeds), the report adds the mean and the 95 % confidence interval over seeds (Student's t).
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from sitsflow import storage

# two-sided 95 % Student t quantiles for 1..30 degrees of freedom (beyond: 1.96)
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
         2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
         2.052, 2.048, 2.045, 2.042]


def evaluate(labels: np.ndarray, predictions: np.ndarray, names: dict[int, str]) -> dict:
    """Confusion matrix and scores. ``labels``/``predictions``: (n,) class codes (0 = not classified)."""
    labels = np.asarray(labels, np.int64)
    predictions = np.asarray(predictions, np.int64)
    classes = sorted(set(labels.tolist()) | set(predictions.tolist()))
    index = {c: i for i, c in enumerate(classes)}
    cm = np.zeros((len(classes), len(classes)), np.int64)
    np.add.at(cm, (np.vectorize(index.get)(labels), np.vectorize(index.get)(predictions)), 1)
    total = cm.sum()
    oa = float(np.trace(cm) / total) if total else 0.0
    expected = float((cm.sum(0) * cm.sum(1)).sum() / total**2) if total else 0.0
    kappa = (oa - expected) / (1 - expected) if expected < 1 else 1.0
    per_class = {}
    for c in classes:
        i = index[c]
        tp = cm[i, i]
        precision = tp / cm[:, i].sum() if cm[:, i].sum() else 0.0
        recall = tp / cm[i, :].sum() if cm[i, :].sum() else 0.0
        f = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[str(c)] = {
            "name": names.get(c, "no data" if c == 0 else str(c)),
            "precision": float(precision),
            "recall": float(recall),
            "fscore": float(f),
            "reference_samples": int(cm[i, :].sum()),
        }
    return {
        "classes": classes,
        "confusion_matrix": cm.tolist(),
        "overall_accuracy": oa,
        "kappa": float(kappa),
        "per_class": per_class,
        "samples": int(total),
    }


def _interval(values: list[float]) -> dict:
    n = len(values)
    mean = float(np.mean(values))
    if n < 2:
        return {"mean": mean, "ci95": 0.0}
    t = _T975[n - 2] if n - 2 < len(_T975) else 1.96
    return {"mean": mean, "ci95": float(t * np.std(values, ddof=1) / math.sqrt(n))}


def summarize(per_seed: list[dict]) -> dict:
    """Mean and 95 % interval over seeds of OA, kappa and per-class F-score."""
    codes = sorted({c for r in per_seed for c in r["per_class"]}, key=int)
    return {
        "overall_accuracy": _interval([r["overall_accuracy"] for r in per_seed]),
        "kappa": _interval([r["kappa"] for r in per_seed]),
        "fscore": {c: _interval([r["per_class"].get(c, {}).get("fscore", 0.0) for r in per_seed]) for c in codes},
    }


def _text(per_seed: list[dict]) -> str:
    lines = ["sitsflow validation report", "Measured on the test samples (polygons never used in training).", ""]
    for seed, r in enumerate(per_seed):
        classes = r["classes"]
        names = {c: r["per_class"][str(c)]["name"] for c in classes}
        lines.append(f"===== seed {seed} ({r['samples']} test pixels) =====")
        lines.append("Confusion matrix (rows: reference, columns: prediction; 0 = not classified)")
        width = max(8, *(len(f"{c} {names[c]}") for c in classes)) + 1
        lines.append(" " * width + "".join(f"{c:>9}" for c in classes))
        for i, c in enumerate(classes):
            lines.append(f"{c} {names[c]}".ljust(width) + "".join(f"{v:>9}" for v in r["confusion_matrix"][i]))
        lines.append("")
        lines.append(f"Overall accuracy : {r['overall_accuracy']:.4f}")
        lines.append(f"Kappa            : {r['kappa']:.4f}")
        lines.append("")
        lines.append(f"{'class':<{width}}{'precision':>10}{'recall':>10}{'F-score':>10}{'samples':>10}")
        for c in classes:
            pc = r["per_class"][str(c)]
            lines.append(
                f"{c} {pc['name']}".ljust(width)
                + f"{pc['precision']:>10.4f}{pc['recall']:>10.4f}{pc['fscore']:>10.4f}{pc['reference_samples']:>10}"
            )
        lines.append("")
    if len(per_seed) > 1:
        s = summarize(per_seed)
        lines.append(f"===== over {len(per_seed)} seeds: mean ± 95 % interval =====")
        lines.append(f"Overall accuracy : {s['overall_accuracy']['mean']:.4f} ± {s['overall_accuracy']['ci95']:.4f}")
        lines.append(f"Kappa            : {s['kappa']['mean']:.4f} ± {s['kappa']['ci95']:.4f}")
        for c, v in s["fscore"].items():
            lines.append(f"F-score {c:<8}: {v['mean']:.4f} ± {v['ci95']:.4f}")
    return "\n".join(lines) + "\n"


def write_reports(per_seed: list[dict], txt_uri: str, json_uri: str) -> None:
    """Write RESULTS.txt and RESULTS.json."""
    doc: dict[str, Any] = {"seeds": per_seed}
    if len(per_seed) > 1:
        doc["summary"] = summarize(per_seed)
    storage.write_text(json_uri, json.dumps(doc, indent=2))
    storage.write_text(txt_uri, _text(per_seed))
