"""The model-selection criteria of training. The scores themselves (OA, kappa, F-score) are
:func:`sitsflow.accuracy.scores`."""

from __future__ import annotations

import typing

from sitsflow.config.models import Criterion

CRITERIA: tuple[str, ...] = typing.get_args(Criterion)
"""The values of ``model_selection_criterion``: the minimum validation loss, or the maximum of the others."""

CRITERION_COLUMN = {"loss": "val_loss", "fscore": "fscore", "oa": "oa", "kappa": "kappa"}
"""History column holding each criterion's value."""


def minimise(criterion: str) -> bool:
    """True when a lower value of ``criterion`` (or history column) is better."""
    return criterion in ("loss", "val_loss", "train_loss", "valid_loss")
