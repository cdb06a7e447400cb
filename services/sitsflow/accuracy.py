"""Accuracy measures of a classification: the one implementation used by training (validation
scores after every epoch) and merging (the report on the test polygons).

* :func:`scores`: OA, Cohen's kappa, macro and weighted precision / recall / F-score of a
  confusion matrix (rows: reference, columns: prediction);
* :func:`evaluate`: the same from class codes, with per-class user's accuracy (precision) and
  producer's accuracy (recall) and their 95 % Wilson score intervals;
* :func:`area_weighted`: the stratified estimator of Olofsson et al. (2014), "Good practices for
  estimating area and assessing accuracy of land change", Remote Sensing of Environment 148,
  42-57 (equations numbered as in the paper): overall, user's and producer's accuracies and class
  areas weighted by the map's class areas, with standard errors and 95 % intervals.

Edge cases, the same everywhere: an empty matrix has NaN scores; a class never predicted has
precision 0, a class absent from the reference recall 0; macro averages run over the classes
present in the reference or the predictions (as scikit-learn does); kappa is
``(p_o - p_e) / (1 - p_e)``, 1 when ``p_e = 1`` and the agreement is perfect (a single class).
"""

from __future__ import annotations

import math

import numpy as np

Z95 = 1.959963984540054
"""The two-sided 95 % quantile of the standard normal distribution."""


def confusion(labels: np.ndarray, predictions: np.ndarray, classes: list[int]) -> np.ndarray:
    """Confusion matrix (rows: reference ``labels``, columns: ``predictions``) over ``classes``."""
    index = {c: i for i, c in enumerate(classes)}
    cm = np.zeros((len(classes), len(classes)), np.int64)
    if len(labels):
        rows = np.fromiter((index[int(c)] for c in labels), np.int64, len(labels))
        cols = np.fromiter((index[int(c)] for c in predictions), np.int64, len(predictions))
        np.add.at(cm, (rows, cols), 1)
    return cm


def per_class(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Per-class ``precision`` (user's accuracy), ``recall`` (producer's accuracy), ``fscore``,
    ``reference`` (row sums) and ``predicted`` (column sums) of a confusion matrix."""
    cm = np.asarray(cm, np.float64)
    diag = np.diag(cm)
    ref = cm.sum(axis=1)
    pred = cm.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(pred > 0, diag / np.maximum(pred, 1), 0.0)
        recall = np.where(ref > 0, diag / np.maximum(ref, 1), 0.0)
        f = np.where(
            precision + recall > 0,
            2 * precision * recall / np.where(precision + recall > 0, precision + recall, 1),
            0.0,
        )
    return {"precision": precision, "recall": recall, "fscore": f, "reference": ref, "predicted": pred}


def scores(cm: np.ndarray, *, averaged: np.ndarray | None = None) -> dict[str, float]:
    """OA, kappa and macro precision / recall / F-score of a confusion matrix, plus the F-score
    weighted by each class's reference count (``fscore_weighted``).

    ``averaged`` (boolean, one per class) restricts the averages to some classes (the report
    leaves out code 0, "not classified"); by default every class present in the reference or the
    predictions counts. OA and kappa always use the whole matrix.
    """
    cm = np.asarray(cm, np.float64)
    total = cm.sum()
    if total == 0:
        nan = float("nan")
        return {"oa": nan, "kappa": nan, "precision": nan, "recall": nan, "fscore": nan, "fscore_weighted": nan}
    pc = per_class(cm)
    oa = float(np.trace(cm) / total)
    pe = float((pc["reference"] * pc["predicted"]).sum() / (total * total))
    kappa = (oa - pe) / (1.0 - pe) if pe < 1.0 else (1.0 if oa == 1.0 else 0.0)
    present = (pc["reference"] > 0) | (pc["predicted"] > 0)
    if averaged is not None:
        present &= np.asarray(averaged, bool)
    support = pc["reference"][present]
    mean = (lambda v: float(v[present].mean())) if present.any() else (lambda v: float("nan"))
    return {
        "oa": oa,
        "kappa": float(kappa),
        "precision": mean(pc["precision"]),
        "recall": mean(pc["recall"]),
        "fscore": mean(pc["fscore"]),
        "fscore_weighted": float((pc["fscore"][present] * support).sum() / support.sum())
        if support.sum()
        else float("nan"),
    }


def wilson(successes: float, n: float) -> tuple[float, float]:
    """95 % Wilson score interval of a binomial proportion (NaN, NaN when ``n`` is 0)."""
    if n <= 0:
        return float("nan"), float("nan")
    p = successes / n
    z2 = Z95 * Z95
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def evaluate(labels: np.ndarray, predictions: np.ndarray, names: dict[int, str]) -> dict:
    """Confusion matrix and scores of class codes ``labels`` / ``predictions``, shape (n,)
    (0 = not classified). The macro and weighted F-scores leave out code 0."""
    labels = np.asarray(labels, np.int64)
    predictions = np.asarray(predictions, np.int64)
    classes = sorted(set(labels.tolist()) | set(predictions.tolist()))
    cm = confusion(labels, predictions, classes)
    s = scores(cm, averaged=np.array([c != 0 for c in classes], bool))
    pc = per_class(cm)
    out_classes = {}
    for i, c in enumerate(classes):
        ua = wilson(cm[i, i], pc["predicted"][i])
        pa = wilson(cm[i, i], pc["reference"][i])
        out_classes[str(c)] = {
            "name": names.get(c, "no data" if c == 0 else str(c)),
            "precision": float(pc["precision"][i]),
            "recall": float(pc["recall"][i]),
            "fscore": float(pc["fscore"][i]),
            "reference_samples": int(pc["reference"][i]),
            "predicted_samples": int(pc["predicted"][i]),
            "users_accuracy_ci95": [_json_float(v) for v in ua],
            "producers_accuracy_ci95": [_json_float(v) for v in pa],
        }
    total = int(cm.sum())
    return {
        "classes": classes,
        "confusion_matrix": cm.tolist(),
        "overall_accuracy": s["oa"] if total else 0.0,
        "kappa": s["kappa"] if total else 0.0,
        "fscore_macro": _json_float(s["fscore"]),
        "fscore_weighted": _json_float(s["fscore_weighted"]),
        "per_class": out_classes,
        "samples": total,
    }


def _json_float(v: float) -> float | None:
    """``v``, or None for NaN (RESULTS.json stays strict JSON)."""
    v = float(v)
    return None if math.isnan(v) else v


def area_weighted(cm: np.ndarray, classes: list[int], map_pixels: dict[int, int], *, pixel_area: float = 1.0) -> dict:
    """Olofsson et al. (2014) stratified estimator, the map classes as strata.

    Args:
        cm: confusion matrix of the test samples, rows: reference, columns: map (prediction),
            over ``classes``.
        classes: the class codes of ``cm``'s rows and columns.
        map_pixels: pixel count of each map class (the strata sizes ``N_i``; code 0, "no data",
            is not a stratum).
        pixel_area: area of a pixel, in the unit the areas are reported in.

    Returns:
        ``overall_accuracy`` and, per class (every map stratum and every reference class found
        in them), ``users_accuracy`` (strata only), ``producers_accuracy`` and ``area`` (each
        ``{"estimate", "se", "ci95"}``, ``ci95`` = 1.96 SE, None where undefined), ``map_area``
        and ``weight`` (``W_i``, 0 for a class the map never shows); ``strata``: the map classes
        used. A map class without test sample cannot be estimated: it is listed in ``unsampled``
        and the estimate covers the sampled strata's area only (their weights renormalised).
        Test samples whose map class is not a stratum (e.g. 0) count in ``excluded_samples``.
    """
    cm = np.asarray(cm, np.float64)
    index = {c: i for i, c in enumerate(classes)}
    strata = [c for c in classes if c != 0 and map_pixels.get(c, 0) > 0 and cm[:, index[c]].sum() > 0]
    unsampled = sorted(c for c, v in map_pixels.items() if c != 0 and v > 0 and c not in strata)
    # n[i, j]: samples of map class strata[i] and reference class refs[j] (the paper's orientation)
    found = [c for c in classes if any(cm[index[c], index[m]] > 0 for m in strata)]
    refs = sorted(set(strata) | set(found))
    n = np.array([[cm[index[r], index[m]] if r in index else 0.0 for r in refs] for m in strata]).reshape(
        len(strata), len(refs)
    )
    row_total = n.sum(axis=1)
    excluded = int(cm.sum() - row_total.sum())
    if not strata:
        return {
            "strata": [],
            "unsampled": unsampled,
            "excluded_samples": excluded,
            "overall_accuracy": _estimate(float("nan"), float("nan")),
            "per_class": {},
        }
    N = np.array([float(map_pixels[c]) for c in strata])
    W = N / N.sum()
    diag = [refs.index(c) for c in strata]  # column of each stratum's own class
    rows = np.arange(len(strata))
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = n / row_total[:, None]  # n_ij / n_i.
        p = W[:, None] * frac  # eq. 4: p_ij = W_i n_ij / n_i.
        dof = np.where(row_total > 1, row_total - 1, np.nan)
        users = frac[rows, diag]  # eq. 2
        oa = float(p[rows, diag].sum())  # eq. 1
        oa_var = float(np.sum(W**2 * users * (1 - users) / dof))  # eq. 5
        col = p.sum(axis=0)  # p_.j, the estimated area proportion of reference class j (eq. 9)
        area_se = np.sqrt(np.sum(W[:, None] ** 2 * frac * (1 - frac) / dof[:, None], axis=0))  # eq. 10
        Nj = (N[:, None] * frac).sum(axis=0)  # estimated reference pixels of class j
        out = {}
        for j, c in enumerate(refs):
            i = strata.index(c) if c in strata else None
            if i is None:  # never mapped: producer's accuracy 0, with no sampling error
                ua, ua_var, pa, pa_var, Ni = float("nan"), float("nan"), 0.0, 0.0, 0.0
            else:
                ua, Ni = users[i], N[i]
                pa = p[i, j] / col[j]  # eq. 3
                ua_var = ua * (1 - ua) / dof[i]  # eq. 6
                others = sum(N[k] ** 2 * frac[k, j] * (1 - frac[k, j]) / dof[k] for k in rows if k != i)
                pa_var = (Ni**2 * (1 - pa) ** 2 * ua * (1 - ua) / dof[i] + pa**2 * others) / Nj[j] ** 2  # eq. 7
            out[str(c)] = {
                "map_area": float(Ni * pixel_area),
                "weight": float(W[i]) if i is not None else 0.0,
                "users_accuracy": _estimate(ua, math.sqrt(ua_var)),
                "producers_accuracy": _estimate(pa, math.sqrt(pa_var)),
                "area": _estimate(col[j] * N.sum() * pixel_area, area_se[j] * N.sum() * pixel_area),  # eq. 9, 11
            }
    return {
        "strata": strata,
        "unsampled": unsampled,
        "excluded_samples": excluded,
        "overall_accuracy": _estimate(oa, math.sqrt(oa_var)),
        "per_class": out,
    }


def _estimate(value: float, se: float) -> dict:
    return {"estimate": _json_float(value), "se": _json_float(se), "ci95": _json_float(Z95 * se)}
