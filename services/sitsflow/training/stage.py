"""The training stage: one model per (region, seed, hyperparameter pair).

``run(cfg, region, seed, hyp)`` reads ``learningSamples/Samples_region_R_seedS_learn.nc`` (L+V),
splits it polygon-wise into learning (80 %) and validation (20 %), trains the network
``cfg.dl.dl_name`` with Adam and the cross-entropy loss (as changed by ``arg_train.training_options``,
see :mod:`sitsflow.training.options`) for ``cfg.dl.epochs`` epochs (or until early stop) and
writes, under ``model/``:

* ``model_R_seed_S_hyp_H.txt``: the network state that was best on validation for
  ``model_selection_criterion`` (``sitsflow.nn.save_model`` bytes with a JSON description);
* ``model_R_seed_S_hyp_H_checkpoint.txt``: everything needed to resume after the last completed
  epoch (rewritten after every epoch; ``torch.save`` of tensors and plain containers only, read
  back with ``weights_only=True``);
* ``_loss.png``, ``_confusion_metrics.png`` and ``_history.parquet`` (one row per epoch);
* last, the manifest ``manifests/training/region_R_seed_S_hyp_H.json``.

Randomness: the learning/validation split is drawn from ``random_seed + seed`` (the same for every
hyperparameter pair, so candidates are compared on the same validation set); the network's
initialisation, dropout and batch order from ``SeedSequence([random_seed + seed, hyp])``.
"""

from __future__ import annotations

import contextlib
import io
import math
import pickle
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sitsflow import layout, manifest, storage
from sitsflow import nn as sitsnn
from sitsflow.accuracy import scores
from sitsflow.config import DeepLearningParameters, SitsflowConfig, TrainingOptions
from sitsflow.device import choose as device_choose
from sitsflow.errors import BadInputError, ConfigError, InputNotFoundError
from sitsflow.log import get_logger
from sitsflow.process import stop_deferred
from sitsflow.samples import SampleSet, open_netcdf, quantile_stats
from sitsflow.training import checkpoint as ckpt_compat
from sitsflow.training import plots
from sitsflow.training.data import class_weights, split_learn_validation
from sitsflow.training.early_stop import EarlyStopping
from sitsflow.training.loaders import InMemoryBatches, StreamBatches, make_loader
from sitsflow.training.metrics import CRITERIA
from sitsflow.training.options import TrainingExtras
from sitsflow.training.options import fingerprint_part as options_fingerprint

log = get_logger(__name__)

STAGE = "training"
FORMAT_VERSION = 2  # 2: early stop compares each epoch with the previous one (the reference)
CHECKPOINT_FORMAT = "sitsflow-training-checkpoint/3"  # 3: what may change when continuing (checkpoint.py)
_KEY = "arg_train.deep_learning_parameters"

EpochHook = Callable[[int, dict[str, float]], None]
"""Called after each epoch (once its checkpoint is written) with the epoch number and its history row."""


def candidate(dl: DeepLearningParameters, hyp: int) -> tuple[int, float]:
    """(batch_size, learning_rate) of pair ``hyp`` of ``dl.hyperparameter_pairs()``.

    Raises:
        ConfigError: there is no pair ``hyp``.
    """
    pairs = dl.hyperparameter_pairs()
    if isinstance(hyp, bool) or not 0 <= int(hyp) < len(pairs):
        raise ConfigError(
            f"hyperparameter pair {hyp} does not exist: {_KEY}.hyperparameters_solver gives "
            f"{len(pairs)} pair(s), numbered 0..{len(pairs) - 1}"
        )
    return pairs[int(hyp)]


def fingerprint_parts(dl: DeepLearningParameters, hyp: int) -> dict[str, Any]:
    """Everything the trained weights of candidate ``hyp`` depend on: every deep-learning
    parameter but ``restart_from_checkpoint`` and the other candidates' pairs."""
    batch_size, learning_rate = candidate(dl, hyp)
    parts = dl.model_dump(mode="json", exclude={"restart_from_checkpoint", "hyperparameters_solver"})
    return {**parts, "batch_size": batch_size, "learning_rate": learning_rate, "hyp": int(hyp)}


def _options_part(options: TrainingOptions) -> dict[str, Any]:
    """``{"training_options": {...}}`` with the options set away from their defaults; ``{}`` when none."""
    part = options_fingerprint(options)
    return {"training_options": part} if part else {}


def make_scheduler(optimizer: torch.optim.Optimizer, adaptive_lr: Mapping[str, Any]) -> Any:
    """``ReduceLROnPlateau(optimizer, mode="min", **adaptive_lr)``, or None when ``adaptive_lr`` is {}.

    ``verbose`` is dropped (PyTorch no longer accepts it; learning rates are in the history).
    """
    if not adaptive_lr:
        return None
    kwargs = {k: v for k, v in adaptive_lr.items() if k != "verbose"}
    try:
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", **kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"{_KEY}.adaptive_lr {adaptive_lr}: {exc}; allowed keys: patience, factor, threshold, "
            "threshold_mode, cooldown, min_lr, eps, verbose"
        ) from exc


@dataclass
class TrainResult:
    """What a training run produced (the inputs of the outputs)."""

    network: sitsnn.Iota2NeuralNetwork
    history: list[dict[str, float]]
    best: dict[str, dict[str, Any]]
    stopped_early: bool
    resumed_from_epoch: int
    epochs_run: int
    nb_learn: int
    nb_validation: int
    class_weights: list[float] | None
    stats_keys: list[str]
    device: str


def _cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def _save_checkpoint(uri: str, payload: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(payload, buf)
    with stop_deferred():  # a SIGTERM meanwhile stops training once the checkpoint is written
        storage.write_bytes(uri, buf.getvalue())


def _load_checkpoint(uri: str, compat: str, options: str, epochs: int) -> dict[str, Any] | None:
    """The checkpoint at ``uri`` if it exists, is readable and may be continued by a training
    described by ``(compat, options)`` (``sitsflow.training.checkpoint``) of ``epochs`` epochs."""
    if not storage.exists(uri):
        return None
    try:
        ckpt = torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        log.warning(
            "refusing checkpoint %s: it holds objects other than plain tensors and containers (none was "
            "unpickled, nothing in it ran); training from scratch",
            uri,
        )
        return None
    except Exception as exc:  # noqa: BLE001 - any unreadable checkpoint is ignored, not fatal
        log.warning("ignoring unreadable checkpoint %s (%s); training from scratch", uri, exc)
        return None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        log.warning("ignoring checkpoint %s of unknown format; training from scratch", uri)
        return None
    ok, why = ckpt_compat.verdict(ckpt, compat, options, epochs)
    if not ok:
        log.warning("not continuing checkpoint %s: %s; training from epoch 1", uri, why)
        return None
    if why:
        log.info("checkpoint %s is continued: what changed does not affect its state (%s)", uri, why)
    return ckpt


def _autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CUDA; nothing on the CPU."""
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def evaluate(
    network: torch.nn.Module,
    loader: Any,
    weights: torch.Tensor | None,
    nb_classes: int,
    device: torch.device,
) -> dict[str, float]:
    """Validation loss (weighted mean cross-entropy, as in training) and scores over ``loader``.

    Returns ``{"val_loss", "oa", "kappa", "fscore", "precision", "recall"}``.
    """
    network.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    weight_sum = torch.zeros((), dtype=torch.float64, device=device)
    cm = torch.zeros(nb_classes * nb_classes, dtype=torch.int64, device=device)
    with torch.no_grad():
        for x, y in loader:
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            if y.numel() == 0:
                continue
            with _autocast(device):
                logits = network(x)
            logits = logits.float()
            loss_sum += torch.nn.functional.cross_entropy(logits, y, weight=weights, reduction="sum").double()
            weight_sum += (weights[y].sum() if weights is not None else torch.tensor(y.numel(), device=device)).double()
            pred = logits.argmax(dim=1)
            cm += torch.bincount(y * nb_classes + pred, minlength=nb_classes * nb_classes)
    total_w = float(weight_sum.item())
    out = {"val_loss": float(loss_sum.item()) / total_w if total_w > 0 else float("nan")}
    out.update(scores(cm.cpu().numpy().reshape(nb_classes, nb_classes)))
    return out


def train(
    samples: SampleSet,
    dl: DeepLearningParameters,
    hyp: int,
    *,
    build: Callable[..., sitsnn.Iota2NeuralNetwork],
    split_seed: int,
    torch_seed: int,
    fingerprint: str,
    checkpoint_uri: str,
    on_epoch_end: EpochHook | None = None,
    device: torch.device | None = None,
    identity: Mapping[str, Any] | None = None,
    options: TrainingOptions | None = None,
) -> TrainResult:
    """Train one candidate on ``samples``; resume from ``checkpoint_uri`` when allowed and valid.

    Args:
        samples: the L+V database (features read through ``samples.reader``).
        dl: the deep-learning parameters.
        hyp: the candidate: pair ``hyp`` of ``dl.hyperparameter_pairs()``.
        build: ``build(stats=...) -> network``; the network maps (batch, nb_dates, nb_components)
            to logits (batch, nb_classes).
        split_seed: seed of the learning/validation split and of the quantile subsample.
        torch_seed: seed of initialisation, dropout and batch order.
        fingerprint: identifies the data and the run when ``identity`` is not given.
        checkpoint_uri: where the checkpoint is written after every epoch.
        identity: what the weights depend on besides ``dl`` (data, region, seed, dl_module hash);
            a checkpoint is continued only when it and the parameters outside
            ``checkpoint.CONTINUABLE`` are the same (``sitsflow.training.checkpoint``).
        on_epoch_end: optional hook called after each epoch's checkpoint is written.
        device: defaults to :func:`sitsflow.device.choose`'s (CUDA when available, else the CPU).
        options: ``arg_train.training_options`` (:mod:`sitsflow.training.options`); None: defaults.
    """
    device = device_choose(device)  # a pod given a GPU it cannot use fails here (exit 2)
    batch_size, learning_rate = candidate(dl, hyp)
    label_idx = samples.label_indices()
    nb_classes = len(samples.classes)
    learn, val = split_learn_validation(samples.labels, samples.polygon_ids, split_seed)
    log.info(
        "%d samples: %d for learning, %d for validation (%d classes)",
        samples.n,
        int(learn.sum()),
        int(val.sum()),
        nb_classes,
    )

    stats = {k: v for k, v in samples.stats.items()}
    if dl.additional_statistics_percentage is not None:
        stats.update(
            quantile_stats(
                samples.reader, float(dl.additional_statistics_percentage), split_seed, chunk=max(batch_size, 1024)
            )
        )
    weights_np = class_weights(label_idx, nb_classes) if dl.weighted_labels else None
    weights = torch.from_numpy(weights_np).to(device) if weights_np is not None else None

    torch.manual_seed(torch_seed)
    tensors = {k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in stats.items()}
    # a multi-sensor database has one feature vector: its statistics serve every sensor key
    network = build(stats={key: tensors for key in dict.fromkeys((samples.sensor, *samples.sensors))})
    network.to(device)
    extras = TrainingExtras(
        options or TrainingOptions(),
        learning_rate=learning_rate,
        epochs=dl.epochs,
        steps_per_epoch=-(-int(learn.sum()) // batch_size),
        learn_labels=label_idx[learn],
        nb_classes=nb_classes,
        stats=stats,
        nb_dates=samples.nb_dates,
        nb_components=samples.nb_components,
        stream=dl.dataloader_mode == "stream",
    )
    optimizer = extras.optimizer(network.parameters())
    scheduler = make_scheduler(optimizer, dl.adaptive_lr)
    data_gen = torch.Generator().manual_seed(torch_seed)
    early = (
        EarlyStopping(dl.early_stop_metric, dl.early_stop_tol, dl.early_stop_patience, dl.epoch_to_trigger)
        if dl.enable_early_stop
        else None
    )

    pin = device.type == "cuda"
    bs = batch_size
    if dl.dataloader_mode == "full":
        x_all = torch.from_numpy(samples.load_all())
        y_all = torch.from_numpy(label_idx)
        learn_t, val_t = torch.from_numpy(learn), torch.from_numpy(val)
        train_ds: Any = InMemoryBatches(x_all[learn_t], y_all[learn_t], bs, drop_single=True)
        val_ds: Any = InMemoryBatches(x_all[val_t], y_all[val_t], bs, drop_single=False)
        del x_all
    else:
        train_ds = StreamBatches(samples.reader, label_idx, learn, bs, shuffle=True, drop_single=True)
        val_ds = StreamBatches(samples.reader, label_idx, val, bs, shuffle=False, drop_single=False)
    val_loader = make_loader(
        val_ds, num_workers=dl.num_workers, generator=torch.Generator().manual_seed(0), pin_memory=pin
    )

    history: list[dict[str, float]] = []
    best: dict[str, dict[str, Any]] = {}
    start_epoch = 0
    stopped = False
    # training options (augmentation, schedule ...) are part of what a checkpoint must match; a
    # cosine or one-cycle schedule spans all the epochs, so more epochs would change its past steps
    spanning = {"schedule_epochs": dl.epochs} if extras.options.lr_schedule != "constant" else {}
    compat, continuable = ckpt_compat.describe(
        {**fingerprint_parts(dl, hyp), **_options_part(extras.options), **spanning},
        identity if identity is not None else {"fingerprint": fingerprint},
    )
    ckpt = _load_checkpoint(checkpoint_uri, compat, continuable, dl.epochs) if dl.restart_from_checkpoint else None
    if ckpt is not None:
        network.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if scheduler is not None and ckpt["scheduler"] is not None:
            scheduler.load_state_dict(ckpt["scheduler"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if device.type == "cuda" and ckpt["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        data_gen.set_state(ckpt["rng"]["data"])
        best = ckpt["best"]
        history = list(ckpt["history"])
        # the early-stop state is replayed from the history, under the current settings
        if early is not None:
            for row in history:
                stopped = early.update(int(row["epoch"]), row[early.metric])
        start_epoch = int(ckpt["epoch"])
        log.info("resuming %s after epoch %d", checkpoint_uri, start_epoch)
    elif not dl.restart_from_checkpoint and storage.exists(checkpoint_uri):
        log.info("restart_from_checkpoint is False: ignoring %s, training from scratch", checkpoint_uri)

    for epoch in range(start_epoch + 1, dl.epochs + 1):
        if stopped:
            break
        tic = time.monotonic()
        extras.set_lr(optimizer, epoch, 0)
        lr = float(optimizer.param_groups[0]["lr"])
        if dl.dataloader_mode == "full":
            train_ds.set_order(extras.epoch_order(train_ds.targets, data_gen))
        else:
            train_ds.set_epoch(data_gen)
        loader = make_loader(train_ds, num_workers=dl.num_workers, generator=data_gen, pin_memory=pin)
        network.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        count = 0
        for index, (x, y) in enumerate(loader):
            x, y = extras.batch(x, y, data_gen)
            extras.set_lr(optimizer, epoch, index)
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            with _autocast(device):
                logits = network(x)
            loss = extras.loss(logits.float(), y, weights)
            loss.backward()
            extras.clip(network.parameters())
            optimizer.step()
            loss_sum += loss.detach().double() * y.shape[0]
            count += int(y.shape[0])
        train_loss = float(loss_sum.item()) / count if count else float("nan")
        metrics = evaluate(network, val_loader, weights, nb_classes, device)
        if scheduler is not None:
            scheduler.step(metrics["val_loss"])
        row = {
            "epoch": epoch,
            "train_loss": train_loss,
            "val_loss": metrics["val_loss"],
            "train_loss_db": plots.loss_db(train_loss),
            "val_loss_db": plots.loss_db(metrics["val_loss"]),
            "oa": metrics["oa"],
            "kappa": metrics["kappa"],
            "fscore": metrics["fscore"],
            "precision": metrics["precision"],
            "recall": metrics["recall"],
            "lr": lr,
            "seconds": time.monotonic() - tic,
        }
        history.append(row)
        for crit in CRITERIA:
            value = row["val_loss" if crit == "loss" else crit]
            prev = best.get(crit)
            better = prev is None or (
                not math.isnan(value)
                and (math.isnan(prev["value"]) or (value < prev["value"] if crit == "loss" else value > prev["value"]))
            )
            if better:
                best[crit] = {"epoch": epoch, "value": value, "state": _cpu_state(network)}
        if early is not None:
            stopped = early.update(epoch, row[early.metric])
        log.info(
            "epoch %d/%d: train loss %.4f, val loss %.4f, OA %.4f, kappa %.4f, F %.4f, lr %.3g",
            epoch,
            dl.epochs,
            train_loss,
            row["val_loss"],
            row["oa"],
            row["kappa"],
            row["fscore"],
            lr,
        )
        _save_checkpoint(
            checkpoint_uri,
            {
                "format": CHECKPOINT_FORMAT,
                "compat": compat,
                "options": continuable,
                "epoch": epoch,
                "stopped": stopped,
                "model": _cpu_state(network),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "rng": {
                    "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else [],
                    "data": data_gen.get_state(),
                },
                "best": best,
                "history": history,
                "early_stop": early.state_dict() if early is not None else None,
            },
        )
        if on_epoch_end is not None:
            on_epoch_end(epoch, row)
        if stopped:
            log.info(
                "early stop after epoch %d (%s did not improve on its previous epoch by more than %g "
                "for %d consecutive epochs)",
                epoch,
                dl.early_stop_metric,
                dl.early_stop_tol,
                dl.early_stop_patience,
            )
            break

    crit = dl.model_selection_criterion
    if crit not in best:
        raise BadInputError(f"no validation result to select a model by '{crit}' (empty validation set?)")
    network.load_state_dict(best[crit]["state"])
    network.to("cpu")
    return TrainResult(
        network=network,
        history=history,
        best=best,
        stopped_early=stopped,
        resumed_from_epoch=start_epoch,
        epochs_run=len(history),
        nb_learn=int(learn.sum()),
        nb_validation=int(val.sum()),
        class_weights=[float(w) for w in weights_np] if weights_np is not None else None,
        stats_keys=sorted(stats),
        device=str(device),
    )


def _seeds(random_seed: int, seed: int, hyp: int) -> tuple[int, int]:
    """(split seed, torch seed): ``random_seed + seed`` and ``SeedSequence([random_seed + seed, hyp])``."""
    split_seed = int(random_seed) + int(seed)
    torch_seed = int(np.random.SeedSequence([split_seed, int(hyp)]).generate_state(1, dtype=np.uint32)[0])
    return split_seed, torch_seed


def run(cfg: SitsflowConfig, region: int, seed: int, hyp: int, *, on_epoch_end: EpochHook | None = None) -> dict:
    """Train candidate ``hyp`` of region ``region``, seed ``seed``; return a JSON-able summary.

    A rerun whose manifest matches (same parameters, pair and sample database) does nothing and
    returns the previous summary with ``"skipped": true``.
    """
    tic = time.monotonic()
    out = cfg.chain.output_path
    dl = cfg.dl
    batch_size, learning_rate = candidate(dl, hyp)
    random_seed = cfg.arg_train.random_seed
    split_seed, torch_seed = _seeds(random_seed, seed, hyp)
    db_uri = layout.samples_learn(out, region, seed)
    if not storage.exists(db_uri):
        raise InputNotFoundError(
            f"learning samples of region {region}, seed {seed} not found at {db_uri}; "
            "run the sampling stage first (sitsflow sample)"
        )
    db_stat = storage.stat(db_uri)
    module_source = sitsnn.read_dl_module(dl.dl_module)
    module_sha = sitsnn.module_sha256(module_source) if module_source is not None else None
    identity = {
        "region": region,
        "seed": seed,
        "random_seed": random_seed,
        "samples": db_uri,
        "stat": db_stat,
        "dl_module_sha256": module_sha,
    }
    options = cfg.arg_train.training_options
    fp = manifest.fingerprint(
        STAGE,
        FORMAT_VERSION,
        {**fingerprint_parts(dl, hyp), **_options_part(options)},
        {"region": region, "seed": seed, "random_seed": random_seed},
        {"samples": db_uri, "stat": db_stat, "dl_module_sha256": module_sha},
    )
    task = layout.training_task(region, seed, hyp)
    previous = manifest.done(out, STAGE, task, fp)
    if previous is not None and "summary" in previous:
        log.info("training %s already done (manifest matches): skipped", task)
        return {**previous["summary"], "skipped": True}

    uris = {
        "model": layout.model_candidate(out, region, seed, hyp),
        "checkpoint": layout.model_checkpoint(out, region, seed, hyp),
        "loss_plot": layout.model_loss_plot(out, region, seed, hyp),
        "metrics_plot": layout.model_metrics_plot(out, region, seed, hyp),
        "history": layout.model_history(out, region, seed, hyp),
    }
    with storage.local_path(db_uri) as local:
        samples = open_netcdf(str(local), lazy=dl.dataloader_mode == "stream")
        try:

            def build(*, stats: dict[str, dict[str, torch.Tensor]]) -> sitsnn.Iota2NeuralNetwork:
                return sitsnn.build_network(
                    dl.dl_name,
                    dl.dl_parameters,
                    module_source=module_source,
                    module_uri=dl.dl_module,
                    nb_dates=samples.nb_dates,
                    nb_components=samples.nb_components,
                    nb_classes=len(samples.classes),
                    dates=samples.dates,
                    stats=stats,
                    sensor=samples.sensor,
                )

            result = train(
                samples,
                dl,
                hyp,
                build=build,
                split_seed=split_seed,
                torch_seed=torch_seed,
                fingerprint=fp,
                checkpoint_uri=uris["checkpoint"],
                on_epoch_end=on_epoch_end,
                identity=identity,
                options=options,
            )
        finally:
            samples.reader.close()

    crit = dl.model_selection_criterion
    selected = result.best[crit]
    data_fp = samples.fingerprint or manifest.fingerprint(db_uri, db_stat)
    description = {
        "dl_name": dl.dl_name,
        "dl_module": dl.dl_module,
        "classes": samples.classes,
        "class_names": samples.class_names,
        "feature_names": samples.feature_names,
        "dates": samples.dates,
        "component_names": samples.component_names,
        "sensor": samples.sensor,
        "nb_dates": samples.nb_dates,
        "nb_components": samples.nb_components,
        "nb_classes": len(samples.classes),
        "region": region,
        "seed": seed,
        "hyperparameters": {"batch_size": batch_size, "learning_rate": learning_rate, "hyp": hyp},
        "selection": {"criterion": crit, "epoch": int(selected["epoch"]), "value": float(selected["value"])},
        "training_data": {"uri": db_uri, "fingerprint": data_fp},
        "training_fingerprint": fp,
    }
    storage.write_bytes(uris["model"], sitsnn.save_model(result.network, description))
    title = f"model {region}, seed {seed}, hyp {hyp} (batch {batch_size}, lr {learning_rate:g})"
    storage.write_bytes(uris["loss_plot"], plots.loss_plot(result.history, f"Loss - {title}", int(selected["epoch"])))
    storage.write_bytes(
        uris["metrics_plot"],
        plots.metrics_plot(result.history, f"Validation metrics - {title}", int(selected["epoch"])),
    )
    storage.write_bytes(uris["history"], plots.history_parquet(result.history))

    summary = {
        "stage": STAGE,
        "region": region,
        "seed": seed,
        "hyp": hyp,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "criterion": crit,
        "selected_epoch": int(selected["epoch"]),
        "selected_value": float(selected["value"]),
        "best": {k: {"epoch": int(v["epoch"]), "value": float(v["value"])} for k, v in result.best.items()},
        "epochs_run": result.epochs_run,
        "stopped_early": result.stopped_early,
        "resumed_from_epoch": result.resumed_from_epoch,
        "nb_learn": result.nb_learn,
        "nb_validation": result.nb_validation,
        "class_weights": result.class_weights,
        "stats": result.stats_keys,
        "dataloader_mode": dl.dataloader_mode,
        "device": result.device,
        "outputs": uris,
        "seconds": round(time.monotonic() - tic, 3),
        "skipped": False,
    }
    manifest.write_manifest(out, STAGE, task, fp, list(uris.values()), extra={"summary": summary})
    log.info(
        "training %s done: epoch %d selected by %s = %.4f",
        task,
        summary["selected_epoch"],
        crit,
        summary["selected_value"],
    )
    return summary
