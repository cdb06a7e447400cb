"""Early stopping (``enable_early_stop``, ``epoch_to_trigger``, ``early_stop_patience``,
``early_stop_tol``, ``early_stop_metric``), exactly as the reference defines it.

Rules (epochs are numbered from 1):

* the monitoring starts after ``epoch_to_trigger``: epochs up to ``max(epoch_to_trigger, 1)``
  are never judged (their values are only remembered as "the previous epoch");
* every later epoch N is compared with the previous epoch N - 1 (not with the best so far). For
  ``train_loss`` and ``val_loss`` the change is in dB as in the reference,
  ``dB = log10(loss_{N-1} / loss_N)`` (a lower loss gives a positive dB); for ``fscore``, ``oa``
  and ``kappa`` it is ``value_N - value_{N-1}``. Epoch N improves when the change is larger than
  ``early_stop_tol``; an improvement resets the count of consecutive epochs without improvement,
  any other epoch (a NaN value included) adds one to it;
* training stops after the epoch at which that count reaches ``early_stop_patience``.
"""

from __future__ import annotations

import math
import typing
from typing import Any

from sitsflow.config.models import METRIC_ALIASES, EarlyStopMetric
from sitsflow.errors import ConfigError

EARLY_STOP_METRICS: tuple[str, ...] = typing.get_args(EarlyStopMetric)
_ALIASES = METRIC_ALIASES
_TINY = 1e-30  # a loss of exactly 0 is read as this (log10 stays finite)


class EarlyStopping:
    """Decides after each epoch whether training stops; pure (no torch), checkpointable.

    Args:
        metric: one of ``EARLY_STOP_METRICS`` (``valid_loss`` is read as ``val_loss``).
        tol: the change (dB for losses, absolute for scores) an epoch must exceed to improve.
        patience: consecutive epochs without improvement after which training stops (>= 1).
        epoch_to_trigger: the last epoch that is not judged; epoch ``epoch_to_trigger + 1`` is the
            first one compared with its previous epoch.
    """

    def __init__(self, metric: str, tol: float, patience: int, epoch_to_trigger: int) -> None:
        metric = _ALIASES.get(metric, metric)
        if metric not in EARLY_STOP_METRICS:
            raise ConfigError(
                "arg_train.deep_learning_parameters.early_stop_metric: "
                f"'{metric}' is not one of {list(EARLY_STOP_METRICS)}"
            )
        if patience < 1:
            raise ConfigError(f"arg_train.deep_learning_parameters.early_stop_patience must be >= 1, got {patience}")
        self.metric = metric
        self.tol = float(tol)
        self.patience = int(patience)
        self.epoch_to_trigger = int(epoch_to_trigger)
        self.previous: float | None = None
        self.previous_epoch: int | None = None
        self.wait = 0
        self.stopped_epoch: int | None = None

    @property
    def is_loss(self) -> bool:
        return self.metric in ("train_loss", "val_loss")

    def change(self, previous: float, value: float) -> float:
        """The change from ``previous`` (epoch N - 1) to ``value`` (epoch N); positive = better.

        Losses: ``log10(previous / value)`` (dB as the reference writes it); scores:
        ``value - previous``. NaN when either value is NaN.
        """
        if self.is_loss:
            return math.log10(max(previous, _TINY) / max(value, _TINY))
        return value - previous

    def update(self, epoch: int, value: float) -> bool:
        """Record the monitored ``value`` of ``epoch``; return True when training must stop now."""
        if self.stopped_epoch is not None:
            return True
        value = float(value)
        previous, previous_epoch = self.previous, self.previous_epoch
        self.previous, self.previous_epoch = value, epoch
        if epoch <= max(self.epoch_to_trigger, 1) or previous is None or previous_epoch != epoch - 1:
            return False
        change = self.change(previous, value)
        if not math.isnan(change) and change > self.tol:
            self.wait = 0
            return False
        self.wait += 1
        if self.wait >= self.patience:
            self.stopped_epoch = epoch
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        return {
            "previous": self.previous,
            "previous_epoch": self.previous_epoch,
            "wait": self.wait,
            "stopped_epoch": self.stopped_epoch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.previous = state["previous"]
        self.previous_epoch = state["previous_epoch"]
        self.wait = int(state["wait"])
        self.stopped_epoch = state["stopped_epoch"]
