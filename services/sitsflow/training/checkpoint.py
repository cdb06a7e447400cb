"""When a training checkpoint may be continued (``restart_from_checkpoint``), and why not.

A checkpoint records two JSON descriptions of the training that wrote it:

* ``compat``: what the weights and the optimiser's state depend on. Any difference restarts the
  training from epoch 1, with a log line naming what changed: the code version (issue 12: other
  code never continues old state), the **network** (``dl_name``, ``dl_parameters``, the
  dl_module's text), the **data** (the sample database, its region, seed and ``random_seed``,
  the statistics the network is built with), the **optimisation** (the batch size and learning
  rate of the pair, ``weighted_labels``, ``adaptive_lr``). A deep-learning parameter this module
  does not know is taken as one the weights depend on (never continued by mistake);
* ``options``: the parameters in :data:`CONTINUABLE`, which only steer how long and how training
  goes on: more (or as many) ``epochs``, another ``num_workers``, ``dataloader_mode``,
  early-stop settings, ``model_selection_criterion``, the dl_module's location (its text is
  compared). Changing them continues the checkpoint, logging what changed.

A checkpoint past the configured number of epochs is not continued (its weights and best states
may come from epochs the configuration no longer allows).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from sitsflow import manifest

#: Deep-learning parameters a checkpoint can be continued across.
CONTINUABLE: frozenset[str] = frozenset(
    {
        "epochs",
        "num_workers",
        "dataloader_mode",
        "enable_early_stop",
        "epoch_to_trigger",
        "early_stop_patience",
        "early_stop_tol",
        "early_stop_metric",
        "model_selection_criterion",
        "dl_module",
        "restart_from_checkpoint",
        "hyperparameters_solver",
    }
)

#: What each part of ``compat`` is, for the log line saying why a checkpoint is not continued.
GROUPS: dict[str, str] = {
    "code_version": "code",
    "dl_name": "network",
    "dl_parameters": "network",
    "dl_module_sha256": "network",
    "samples": "data",
    "stat": "data",
    "region": "data",
    "seed": "data",
    "random_seed": "data",
    "additional_statistics_percentage": "data",
    "batch_size": "optimisation",
    "learning_rate": "optimisation",
    "hyp": "optimisation",
    "weighted_labels": "optimisation",
    "adaptive_lr": "optimisation",
    "schedule_epochs": "learning-rate schedule",
}


def _json(value: Any) -> str:
    return json.dumps(manifest._canonical(value), sort_keys=True, separators=(",", ":"), default=str)


def describe(parts: Mapping[str, Any], identity: Mapping[str, Any]) -> tuple[str, str]:
    """``(compat, options)`` JSON texts of a training.

    Args:
        parts: the deep-learning parameters of the candidate (``stage.fingerprint_parts``).
        identity: what else the weights depend on: data, region, seed, the dl_module's hash.
    """
    compat = {"code_version": manifest.code_version(), **identity}
    compat.update({k: v for k, v in parts.items() if k not in CONTINUABLE})
    options = {k: v for k, v in parts.items() if k in CONTINUABLE}
    return _json(compat), _json(options)


def _changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(key, "old -> new") for every key that differs."""
    out = []
    for key in sorted(set(old) | set(new)):
        if old.get(key, "<absent>") != new.get(key, "<absent>"):
            out.append((key, f"{_short(old.get(key, '<absent>'))} -> {_short(new.get(key, '<absent>'))}"))
    return out


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, sort_keys=True, default=str) if not isinstance(value, str) else value
    return text if len(text) <= limit else text[: limit - 3] + "..."


def verdict(saved: Mapping[str, Any], compat: str, options: str, epochs: int) -> tuple[bool, str]:
    """Whether the checkpoint ``saved`` may be continued by a training described by
    ``(compat, options)`` with ``epochs`` epochs, and the reason in words.

    Returns:
        ``(True, "what changed that does not matter" or "")`` or ``(False, why)``.
    """
    try:
        old_compat = json.loads(saved["compat"])
        old_options = json.loads(saved["options"])
    except (KeyError, TypeError, ValueError):
        return False, "it does not describe the training that wrote it"
    new_compat, new_options = json.loads(compat), json.loads(options)
    blocking = _changes(old_compat, new_compat)
    if blocking:
        by_group: dict[str, list[str]] = {}
        for key, change in blocking:
            by_group.setdefault(GROUPS.get(key, "training options"), []).append(f"{key} {change}")
        why = "; ".join(f"the {group} changed ({', '.join(items)})" for group, items in by_group.items())
        return False, why
    done = int(saved.get("epoch", 0))
    if done > epochs:
        return False, f"it is past the configured epochs ({done} epochs done, epochs is now {epochs})"
    harmless = _changes(old_options, new_options)
    return True, ", ".join(f"{key} {change}" for key, change in harmless)


__all__ = ["CONTINUABLE", "GROUPS", "describe", "verdict"]
