"""The selection stage: pick the best candidate of a (region, seed) among its hyperparameter pairs.

``run(cfg, region, seed)`` reads the per-epoch history of every candidate
``model_R_seed_S_hyp_H`` (one per pair of ``cfg.dl.hyperparameter_pairs()``), takes each
candidate's value of ``model_selection_criterion`` at the epoch its model file kept (the minimum
validation loss for ``loss``, the maximum of ``fscore``, ``oa`` or ``kappa`` otherwise: that is the
epoch training kept), and copies the winner's model file to ``model_R_seed_S.txt`` (iota2's
``model_1_seed_0.txt``). Ties go to the lowest hyp; a NaN value never wins. A JSON report
``model_R_seed_S_selection.json`` records the criterion, every candidate's value and epoch, the
winner and its margin to the runner-up. The manifest is written last; a rerun with the same
candidates does nothing.
"""

from __future__ import annotations

import json
import math
from typing import Any

from sitsflow import layout, manifest, storage
from sitsflow.config import SitsflowConfig
from sitsflow.errors import BadInputError, InputNotFoundError
from sitsflow.log import get_logger
from sitsflow.training.metrics import CRITERION_COLUMN, minimise
from sitsflow.training.plots import read_history

__all__ = ["run", "candidate_value", "pick", "load_selected"]

log = get_logger(__name__)

STAGE = "selection"
FORMAT_VERSION = 1


def load_selected(cfg, region: int, seed: int):
    """Load the selected model of (region, seed): (network, description)."""
    from sitsflow import nn

    uri = layout.model_selected(cfg.chain.output_path, region, seed)
    if not storage.exists(uri):
        raise BadInputError(f"no selected model {uri}: run the selection stage (sitsflow select) first")
    # the network's code comes only from the configured dl_module, never from the model file
    return nn.load_model(
        storage.read_bytes(uri), module_source=nn.read_dl_module(cfg.dl.dl_module), module_uri=cfg.dl.dl_module
    )


def candidate_value(history: list[dict[str, Any]], criterion: str) -> tuple[float, int]:
    """``(value, epoch)`` of ``criterion`` at the epoch a candidate kept (first best epoch).

    Args:
        history: per-epoch rows with ``epoch`` and the criterion's column (``val_loss`` for loss).
        criterion: ``loss``, ``fscore``, ``oa`` or ``kappa``.
    """
    column = CRITERION_COLUMN[criterion]
    best: tuple[float, int] | None = None
    for row in history:
        value = float(row[column])
        if math.isnan(value):
            continue
        if best is None or (value < best[0] if minimise(criterion) else value > best[0]):
            best = (value, int(row["epoch"]))
    return best if best is not None else (float("nan"), -1)


def pick(values: dict[int, float], criterion: str) -> tuple[int, float | None]:
    """The winning hyp (ties: lowest hyp; NaN never wins) and its margin to the runner-up.

    The margin is ``|best - second|`` (None with a single finite candidate).
    """
    finite = sorted((h, v) for h, v in values.items() if not math.isnan(v))
    if not finite:
        raise BadInputError(f"no candidate has a valid '{criterion}' value: {values}")
    sign = 1.0 if minimise(criterion) else -1.0
    ranked = sorted(finite, key=lambda hv: (sign * hv[1], hv[0]))
    margin = abs(ranked[0][1] - ranked[1][1]) if len(ranked) > 1 else None
    return ranked[0][0], margin


def run(cfg: SitsflowConfig, region: int, seed: int) -> dict:
    """Select the model of region ``region``, seed ``seed``; return a JSON-able summary."""
    out = cfg.chain.output_path
    criterion = cfg.dl.model_selection_criterion
    pairs = cfg.dl.hyperparameter_pairs()
    candidates: list[dict[str, Any]] = []
    for hyp, (batch_size, lr) in enumerate(pairs):
        model_uri = layout.model_candidate(out, region, seed, hyp)
        history_uri = layout.model_history(out, region, seed, hyp)
        for what, uri in (("model", model_uri), ("history", history_uri)):
            if not storage.exists(uri):
                raise InputNotFoundError(
                    f"candidate hyp {hyp} (batch_size {batch_size}, learning_rate {lr}) of region "
                    f"{region}, seed {seed} has no {what} file {uri}; run its training first "
                    f"(sitsflow train --region {region} --seed {seed} --hyp {hyp})"
                )
        candidates.append(
            {"hyp": hyp, "batch_size": batch_size, "learning_rate": lr, "model": model_uri, "history": history_uri}
        )

    fp = manifest.fingerprint(
        STAGE,
        FORMAT_VERSION,
        criterion,
        [
            {"hyp": c["hyp"], "model": storage.stat(c["model"]), "history": storage.stat(c["history"])}
            for c in candidates
        ],
    )
    task = layout.selection_task(region, seed)
    previous = manifest.done(out, STAGE, task, fp)
    if previous is not None and "summary" in previous:
        log.info("selection %s already done (manifest matches): skipped", task)
        return {**previous["summary"], "skipped": True}

    values: dict[int, float] = {}
    for cand in candidates:
        history = read_history(storage.read_bytes(cand["history"]))
        if not history:
            raise BadInputError(f"history {cand['history']} of candidate hyp {cand['hyp']} is empty")
        value, epoch = candidate_value(history, criterion)
        cand["value"] = None if math.isnan(value) else value
        cand["epoch"] = epoch
        values[cand["hyp"]] = value
    winner, margin = pick(values, criterion)
    won = candidates[winner]

    selected_uri = layout.model_selected(out, region, seed)
    report_uri = layout.selection_report(out, region, seed)
    storage.write_bytes(selected_uri, storage.read_bytes(won["model"]))
    report = {
        "region": region,
        "seed": seed,
        "criterion": criterion,
        "direction": "min" if minimise(criterion) else "max",
        "winner": {
            "hyp": winner,
            "value": won["value"],
            "epoch": won["epoch"],
            "batch_size": won["batch_size"],
            "learning_rate": won["learning_rate"],
            "model": won["model"],
        },
        "margin_to_runner_up": margin,
        "candidates": [
            {k: c[k] for k in ("hyp", "batch_size", "learning_rate", "value", "epoch", "model")} for c in candidates
        ],
        "selected_model": selected_uri,
    }
    storage.write_text(report_uri, json.dumps(report, indent=2))
    summary = {"stage": STAGE, **report, "report": report_uri, "skipped": False}
    manifest.write_manifest(out, STAGE, task, fp, [selected_uri, report_uri], extra={"summary": summary})
    log.info("selection %s: hyp %d wins by %s = %s", task, winner, criterion, won["value"])
    return summary
