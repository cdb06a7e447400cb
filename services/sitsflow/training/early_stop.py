"""Early stopping (``enable_early_stop``, ``epoch_to_trigger``, ``early_stop_patience``,
``early_stop_tol``, ``early_stop_metric``).

Rules (epochs are numbered from 1):

* epochs before ``epoch_to_trigger`` are not monitored; the value at epoch
  ``max(epoch_to_trigger, 1)`` becomes the reference ("best so far");
* at every later epoch N the value is compared to the best so far. For ``train_loss`` and
  ``val_loss`` the change is measured as in the reference, ``dB = log10(loss_best / loss_N)``
  (a lower loss gives a positive dB); for ``fscore``, ``oa`` and ``kappa`` it is
  ``value_N - value_best``. It is an improvement when the change is larger than
  ``early_stop_tol``; the best is then updated and the count of epochs without improvement reset,
  otherwise the count grows by one;
* training stops after the epoch at which that count reaches ``early_stop_patience``.
"""

from __future__ import annotations

import math
from typing import Any

from sitsflow.errors import ConfigError

EARLY_STOP_METRICS = ("train_loss", "val_loss", "fscore", "oa", "kappa")
_ALIASES = {"valid_loss": "val_loss"}


class EarlyStopping:
    """Decides after each epoch whether training stops; pure (no torch), checkpointable."""

    def __init__(self, metric: str, tol: float, patience: int, epoch_to_trigger: int) -> None:
        metric = _ALIASES.get(metric, metric)
        if metric not in EARLY_STOP_METRICS:
            raise ConfigError(
                "arg_train.deep_learning_parameters.early_stop_metric: "
                f"'{metric}' is not one of {list(EARLY_STOP_METRICS)}"
            )
        if patience < 1:
            raise ConfigError(
                f"arg_train.deep_learning_parameters.early_stop_patience must be >= 1, got {patience}"
            )
        self.metric = metric
        self.tol = float(tol)
        self.patience = int(patience)
        self.epoch_to_trigger = int(epoch_to_trigger)
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.wait = 0
        self.stopped_epoch: int | None = None

    @property
    def is_loss(self) -> bool:
        return self.metric in ("train_loss", "val_loss")

    def change(self, value: float) -> float:
        """The change from the best so far to ``value`` (positive = better)."""
        assert self.best is not None
        if self.is_loss:
            tiny = 1e-30
            return math.log10(max(self.best, tiny) / max(value, tiny))
        return value - self.best

    def update(self, epoch: int, value: float) -> bool:
        """Record the monitored ``value`` of ``epoch``; return True when training must stop now."""
        if self.stopped_epoch is not None:
            return True
        if epoch < max(self.epoch_to_trigger, 1):
            return False
        if self.best is None:
            self.best, self.best_epoch = float(value), epoch
            return False
        if not math.isnan(value) and self.change(float(value)) > self.tol:
            self.best, self.best_epoch, self.wait = float(value), epoch, 0
            return False
        self.wait += 1
        if self.wait >= self.patience:
            self.stopped_epoch = epoch
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch, "wait": self.wait,
                "stopped_epoch": self.stopped_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = state["best"]
        self.best_epoch = state["best_epoch"]
        self.wait = int(state["wait"])
        self.stopped_epoch = state["stopped_epoch"]
