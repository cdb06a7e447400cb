"""Validation metrics computed after every epoch: OA, Cohen's kappa, macro precision/recall/F-score."""

from __future__ import annotations

import typing

import numpy as np

from sitsflow.config.models import Criterion

CRITERIA: tuple[str, ...] = typing.get_args(Criterion)
"""The values of ``model_selection_criterion``: the minimum validation loss, or the maximum of the others."""

CRITERION_COLUMN = {"loss": "val_loss", "fscore": "fscore", "oa": "oa", "kappa": "kappa"}
"""History column holding each criterion's value."""


def minimise(criterion: str) -> bool:
    """True when a lower value of ``criterion`` (or history column) is better."""
    return criterion in ("loss", "val_loss", "train_loss", "valid_loss")


def scores(cm: np.ndarray) -> dict[str, float]:
    """OA, kappa and macro precision / recall / F-score of a confusion matrix.

    Macro averages run over the classes present in the reference or the predictions (as
    scikit-learn does); a class never predicted has precision 0, never present recall 0.
    Kappa is ``(p_o - p_e) / (1 - p_e)`` (1 when ``p_e = 1`` and the agreement is perfect).
    """
    cm = cm.astype(np.float64)
    total = cm.sum()
    if total == 0:
        return {"oa": float("nan"), "kappa": float("nan"), "precision": float("nan"),
                "recall": float("nan"), "fscore": float("nan")}
    diag = np.diag(cm)
    ref = cm.sum(axis=1)
    pred = cm.sum(axis=0)
    oa = diag.sum() / total
    pe = float((ref * pred).sum() / (total * total))
    kappa = (oa - pe) / (1.0 - pe) if pe < 1.0 else (1.0 if oa == 1.0 else 0.0)
    present = (ref > 0) | (pred > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(pred > 0, diag / np.maximum(pred, 1), 0.0)
        recall = np.where(ref > 0, diag / np.maximum(ref, 1), 0.0)
        f = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    return {
        "oa": float(oa),
        "kappa": float(kappa),
        "precision": float(precision[present].mean()),
        "recall": float(recall[present].mean()),
        "fscore": float(f[present].mean()),
    }
