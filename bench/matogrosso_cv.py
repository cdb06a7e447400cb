"""Five-fold cross-validated accuracy of a sitsflow network on the Mato Grosso MODIS samples.

The data set (``samples_mt_4bands.csv``: 1,892 pixel time series, 9 classes, 23 MOD13Q1 dates x
4 bands NDVI / EVI / NIR / MIR, from the R package ``sits``) is GPL-2 and is not shipped with
sitsflow: give its path. Each CSV row holds ``label, longitude, latitude, start_date`` then the
columns ``NDVI_t01 .. NDVI_t23, EVI_t01 .. MIR_t23``.

Conversion to sitsflow's table format (see ``sitsflow.training.load_samples``):

* feature columns ``modis_<band>_YYYYMMDD`` (bands ``ndvi``, ``evi``, ``nir``, ``mir``);
* the 23 dates are the MOD13Q1 16-day composite dates of one agricultural year: composites start
  on days of year 1, 17, ..., 353 of every year, so from a start on day of year D the dates are
  D, D + 16, ... until 353, then 1, 17, ... of the next year. Every sample of the file starts on
  day of year 257 (13 or 14 September) of its own year; all samples share the calendar of one
  reference season (``--reference-start``, default: the most frequent ``start_date``), which
  keeps each value's place in the season (the networks only see day offsets);
* class names sorted alphabetically -> integer codes 1..9 (``label`` column); no polygon id
  column, so each sample is its own group in the 80/20 learning / validation split.

Protocol: a stratified, seeded split of the samples into ``--folds`` folds (per class, the
samples are permuted with ``numpy.random.default_rng(seed)`` and dealt round-robin to the folds).
For each fold k, the other folds form the training table: it is written as Parquet, read back with
``sitsflow.training.load_samples`` and trained with ``sitsflow.training.train`` exactly as the
training stage does it (80/20 learning / validation split drawn from ``seed + k``, one candidate
per (batch_size, learning_rate) pair of the product of the lists, numbered in that order, each
keeping its best epoch on validation by ``--criterion``; the candidate chosen by
``sitsflow.selection.pick`` on those validation values wins). Only then is the winner applied to
the held-out fold k (OA and Cohen's kappa). With ``--validation-only`` the held-out folds are never
classified: use it to choose settings on validation scores alone (with ``--ensemble N`` it also
reports the inner validation OA of the N-member ensemble).

Two standard additions, both decided on the inner validation split only:

* ``--refit``: once the pair and the number of epochs E (the epoch the winner kept on validation)
  are chosen, a fresh network is trained on all the training folds (no validation split) for E
  epochs, with the learning rate the winner had at each of those epochs (``adaptive_lr``
  reductions replayed; with an ``lr_schedule`` in ``--training-options``, that schedule's rates
  over the larger set, stopped after E epochs) and the same training options, and that network
  classifies the held-out fold;
* ``--ensemble N``: N networks of the same model and pair, differing only by their torch seed
  (initialisation, dropout, batch order; member 0 has the stage's seed), average their class
  probabilities. With ``--refit`` each member is refitted for E epochs; without it, members 1..N-1
  are trained like the winner and each keeps its own best epoch on validation.

    .venv/bin/python bench/matogrosso_cv.py /path/to/samples_mt_4bands.csv
    .venv/bin/python bench/matogrosso_cv.py CSV --epochs 60 --dl-parameters '{"d_model": 64, ...}'
    .venv/bin/python bench/matogrosso_cv.py CSV --ensemble 5 --validation-only   # choose settings
    .venv/bin/python bench/matogrosso_cv.py CSV --ensemble 5 --refit --threads 1 # the recorded figure
    .venv/bin/python bench/matogrosso_cv.py CSV --dl-name TempCNN --dl-parameters '{}' --learning-rate 0.001 \
        --training-options '{"gaussian_noise": 0.05, "date_dropout": 0.1}'   # TempCNN, augmented

Prints a plain-text table per fold, the mean OA and kappa, then one JSON line
(``{"bench": "matogrosso_cv", ...}``).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import platform
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError

from sitsflow import nn as sitsnn
from sitsflow.accuracy import scores
from sitsflow.config import ArgTrainSection, DeepLearningParameters, HyperparametersSolver, TrainingOptions
from sitsflow.errors import BadInputError
from sitsflow.log import get_logger, setup_logging
from sitsflow.selection import pick
from sitsflow.training import SampleSet, class_weights, load_samples, split_learn_validation, train
from sitsflow.training.loaders import InMemoryBatches
from sitsflow.training.options import TrainingExtras
from sitsflow.training.stage import candidate

log = get_logger("bench.matogrosso_cv")

SENSOR = "modis"
BANDS = ("NDVI", "EVI", "NIR", "MIR")
NB_DATES = 23
MOD13Q1_STEP = 16
_COLUMN_RE = re.compile(r"^(?P<band>[A-Za-z]+)_t(?P<t>\d+)$")

DEFAULT_DL_PARAMETERS: dict[str, Any] = {
    "d_model": 64, "n_head": 8, "d_k": 8, "mlp": [64, 64], "dropout": 0.2, "decoder": [64, 32],
}


def mod13q1_dates(start: dt.date, count: int = NB_DATES) -> list[int]:
    """The ``count`` MOD13Q1 composite dates from ``start`` on (YYYYMMDD integers).

    Composites start on days of year 1, 17, ..., 353 of every year; ``start`` must be one of them
    (leap years: the day of year, not the calendar day, is what repeats).
    """
    doy = start.timetuple().tm_yday
    if (doy - 1) % MOD13Q1_STEP:
        raise BadInputError(f"start date {start} (day of year {doy}) is not a MOD13Q1 composite date")
    out = []
    year, day = start.year, doy
    while len(out) < count:
        out.append(int((dt.date(year, 1, 1) + dt.timedelta(days=day - 1)).strftime("%Y%m%d")))
        day += MOD13Q1_STEP
        if day > 365:
            year, day = year + 1, 1
    return out


def read_sits_csv(path: str, reference_start: str | None) -> tuple[dict[str, np.ndarray], list[str], list[int]]:
    """Convert the sits CSV to sitsflow table columns.

    Returns:
        (columns, class_names, dates): ``columns`` maps ``label`` to int64 codes (n,) and each
        ``modis_<band>_YYYYMMDD`` to float32 values (n,); ``class_names[code - 1]`` is the name of
        ``code``; ``dates`` the 23 YYYYMMDD dates of the reference season.
    """
    with open(path, newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        rows = list(reader)
    idx = {name: j for j, name in enumerate(header)}
    for required in ("label", "start_date"):
        if required not in idx:
            raise BadInputError(f"{path}: no '{required}' column (columns: {header[:8]} ...)")
    cols_by_band: dict[str, list[tuple[int, int]]] = {b: [] for b in BANDS}
    for name, j in idx.items():
        m = _COLUMN_RE.match(name)
        if m and m["band"].upper() in cols_by_band:
            cols_by_band[m["band"].upper()].append((int(m["t"]), j))
    for band, items in cols_by_band.items():
        if sorted(t for t, _ in items) != list(range(1, NB_DATES + 1)):
            raise BadInputError(f"{path}: band {band} lacks some of the columns {band}_t01 .. {band}_t{NB_DATES}")
    starts = [dt.date.fromisoformat(r[idx["start_date"]]) for r in rows]
    doys = Counter(s.timetuple().tm_yday for s in starts)
    if len(doys) != 1:
        raise BadInputError(f"{path}: samples start on different days of year {dict(doys)}; one season grid is needed")
    ref = dt.date.fromisoformat(reference_start) if reference_start else Counter(starts).most_common(1)[0][0]
    dates = mod13q1_dates(ref)
    class_names = sorted({r[idx["label"]] for r in rows})
    code = {name: i + 1 for i, name in enumerate(class_names)}
    columns: dict[str, np.ndarray] = {"label": np.array([code[r[idx["label"]]] for r in rows], dtype=np.int64)}
    for band in BANDS:
        for t, j in sorted(cols_by_band[band]):
            columns[f"{SENSOR}_{band.lower()}_{dates[t - 1]}"] = np.array(
                [float(r[j]) if r[j].strip() else np.nan for r in rows], dtype=np.float32
            )
    return columns, class_names, dates


def stratified_folds(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Fold number (0..folds-1) of every sample, shape (n,): per class, a seeded permutation dealt round-robin."""
    rng = np.random.default_rng(seed)
    fold = np.empty(labels.shape[0], dtype=np.int64)
    offset = 0
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        perm = members[rng.permutation(members.shape[0])]
        fold[perm] = (np.arange(perm.shape[0]) + offset) % folds
        offset += perm.shape[0]  # classes continue the deal where the previous one stopped
    return fold


def write_parquet(path: Path, columns: dict[str, np.ndarray], rows: np.ndarray) -> None:
    """Write ``rows`` of ``columns`` as a Parquet table (sitsflow's table sample format)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({name: values[rows] for name, values in columns.items()}), str(path))


def features_of(columns: dict[str, np.ndarray], rows: np.ndarray, feature_names: list[str]) -> np.ndarray:
    """(len(rows), nb_dates, nb_components) float32 in the date-major order of ``feature_names``."""
    flat = np.stack([columns[name][rows] for name in feature_names], axis=1)
    nb_comp = len(BANDS)
    return flat.reshape(len(rows), -1, nb_comp)


def torch_seed_of(split_seed: int, hyp: int) -> int:
    """The training stage's seed of initialisation and batch order: ``SeedSequence([split_seed, hyp])``."""
    return int(np.random.SeedSequence([split_seed, hyp]).generate_state(1, dtype=np.uint32)[0])


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return platform.processor() or "cpu"


def member_seed(split_seed: int, hyp: int, member: int) -> int:
    """Torch seed of ensemble member ``member``: member 0 is the stage's own seed
    (``SeedSequence([split_seed, hyp])``), member m > 0 ``SeedSequence([split_seed, hyp, m])``."""
    if member == 0:
        return torch_seed_of(split_seed, hyp)
    return int(np.random.SeedSequence([split_seed, hyp, member]).generate_state(1, dtype=np.uint32)[0])


def options_of(args: argparse.Namespace) -> DeepLearningParameters:
    """The deep-learning parameters of the arguments (candidate ``hyp``: pair ``hyp`` of
    ``itertools.product(args.batch_size, args.learning_rate)``)."""
    return DeepLearningParameters(
        dl_name=args.dl_name, dl_parameters=dict(args.dl_parameters),
        model_selection_criterion=args.criterion, epochs=args.epochs,
        weighted_labels=args.weighted_labels, num_workers=args.num_workers,
        hyperparameters_solver=HyperparametersSolver(
            batch_size=tuple(args.batch_size), learning_rate=tuple(args.learning_rate)
        ),
        restart_from_checkpoint=False, dataloader_mode="full",
        enable_early_stop=args.early_stop_patience is not None,
        epoch_to_trigger=args.epoch_to_trigger, early_stop_patience=args.early_stop_patience or 10,
        early_stop_tol=args.early_stop_tol, early_stop_metric=args.early_stop_metric,
        adaptive_lr=dict(args.adaptive_lr),
    )


def builder(samples: SampleSet, opts: DeepLearningParameters) -> Any:
    """``build(stats=...)`` as the training stage makes it."""
    def build(*, stats: dict[str, dict[str, torch.Tensor]]) -> torch.nn.Module:
        return sitsnn.build_network(
            opts.dl_name, opts.dl_parameters, nb_dates=samples.nb_dates,
            nb_components=samples.nb_components, nb_classes=len(samples.classes),
            dates=samples.dates, stats=stats, sensor=samples.sensor,
        )
    return build


def refit(
    samples: SampleSet, opts: DeepLearningParameters, batch_size: int, lrs: list[float], seed: int,
    options: TrainingOptions | None = None, learning_rate: float | None = None,
) -> torch.nn.Module:
    """Train a fresh network on every sample of ``samples`` (no validation split) for ``len(lrs)``
    epochs, then return it (eval mode, CPU).

    Learning rate: without a schedule, epoch e runs at ``lrs[e - 1]`` (the rates the selected
    candidate had, so ``adaptive_lr`` reductions are replayed); with an ``lr_schedule`` or a
    warm-up in ``options``, every step's rate comes from that schedule with ``learning_rate`` (the
    candidate's) as its peak, spanning ``opts.epochs`` epochs of this (larger) training set, and
    the refit stops after ``len(lrs)`` of them, as the candidate's kept epoch did. The training
    options (AdamW, label smoothing, balanced sampling, augmentation, clipping) act as in
    ``sitsflow.training.train`` (``sitsflow.training.options.TrainingExtras``).

    Same network, statistics (from the whole table), optimiser, loss, class weights and batch
    rules as ``sitsflow.training.train`` (a seeded order every epoch; a final batch of one
    sample skipped); ``seed`` seeds initialisation, dropout, batch order and augmentation.
    """
    label_idx = samples.label_indices()
    nb_classes = len(samples.classes)
    weights = torch.from_numpy(class_weights(label_idx, nb_classes)) if opts.weighted_labels else None
    torch.manual_seed(seed)
    tensors = {k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in samples.stats.items()}
    network = builder(samples, opts)(stats={key: tensors for key in dict.fromkeys((samples.sensor, *samples.sensors))})
    extras = TrainingExtras(
        options or TrainingOptions(), learning_rate=learning_rate if learning_rate is not None else lrs[0],
        epochs=opts.epochs, steps_per_epoch=-(-samples.n // batch_size), learn_labels=label_idx,
        nb_classes=nb_classes, stats=samples.stats, nb_dates=samples.nb_dates,
        nb_components=samples.nb_components, stream=False,
    )
    optimizer = extras.optimizer(network.parameters())
    order_gen = torch.Generator().manual_seed(seed)
    targets = torch.from_numpy(label_idx)
    batches = InMemoryBatches(torch.from_numpy(samples.load_all()), targets, batch_size, drop_single=True)
    for epoch, lr in enumerate(lrs, start=1):
        for group in optimizer.param_groups:
            group["lr"] = lr
        batches.set_order(extras.epoch_order(targets, order_gen))
        network.train()
        for i in range(len(batches)):
            x, y = extras.batch(*batches[i], order_gen)
            extras.set_lr(optimizer, epoch, i)
            optimizer.zero_grad(set_to_none=True)
            loss = extras.loss(network(x), y, weights)
            loss.backward()
            extras.clip(network.parameters())
            optimizer.step()
    network.eval()
    return network


def ensemble_proba(networks: list[torch.nn.Module], x: np.ndarray) -> np.ndarray:
    """Mean class probabilities of ``networks`` on ``x`` (n, nb_dates, nb_components): (n, nb_classes)."""
    return np.mean([sitsnn.predict_proba(net, x, batch_size=1024, device="cpu") for net in networks], axis=0)


def oa_of(proba: np.ndarray, truth_idx: np.ndarray) -> float:
    return float((proba.argmax(axis=1) == truth_idx).mean())


def run_fold(
    k: int, args: argparse.Namespace, columns: dict[str, np.ndarray], fold: np.ndarray, workdir: Path
) -> dict[str, Any]:
    """Train on every fold but ``k`` (all hyperparameter pairs, selection on validation), test on fold ``k``.

    1. every (batch_size, learning_rate) pair is trained by ``sitsflow.training.train`` (80/20 split
       drawn from ``seed + k``), keeping its best epoch by ``--criterion``; ``pick`` chooses the pair;
    2. ``--ensemble N``: members 1..N-1 train the chosen pair with other seeds (``member_seed``);
    3. ``--refit``: every member is retrained from scratch on all the training folds (no
       validation split) for the number of epochs the chosen candidate selected on validation,
       with its learning-rate schedule; otherwise each member is its best epoch on validation;
    4. the mean of the members' class probabilities classifies the held-out fold.
    """
    tic = time.monotonic()
    train_rows = np.flatnonzero(fold != k)
    test_rows = np.flatnonzero(fold == k)
    table = workdir / f"fold_{k}_train.parquet"
    write_parquet(table, columns, train_rows)
    samples = load_samples(str(table))
    split_seed = args.seed + k

    opts = options_of(args)
    pairs = opts.hyperparameter_pairs()

    def inner(hyp: int, seed: int, tag: str) -> dict[str, Any]:
        result = train(
            samples, opts, hyp, build=builder(samples, opts), split_seed=split_seed, torch_seed=seed,
            fingerprint=f"matogrosso-fold-{k}-{tag}",
            checkpoint_uri=str(workdir / f"fold_{k}_{tag}_checkpoint.txt"),
            device=torch.device("cpu"), options=args.options,
        )
        chosen = result.best[args.criterion]
        row = next(r for r in result.history if r["epoch"] == chosen["epoch"])
        batch_size, learning_rate = candidate(opts, hyp)
        return {"hyp": hyp, "batch_size": batch_size, "learning_rate": learning_rate,
                "value": float(chosen["value"]), "epoch": int(chosen["epoch"]),
                "val_oa": float(row["oa"]), "val_kappa": float(row["kappa"]),
                "epochs_run": result.epochs_run, "network": result.network,
                "lrs": [float(r["lr"]) for r in result.history]}

    candidates = []
    for hyp, (bs, lr) in enumerate(pairs):
        c = inner(hyp, member_seed(split_seed, hyp, 0), f"hyp-{hyp}")
        candidates.append(c)
        log.info("fold %d hyp %d (batch %d, lr %g): %s %.4f at epoch %d, validation OA %.4f",
                 k, hyp, bs, lr, args.criterion, c["value"], c["epoch"], c["val_oa"])
    winner, _ = pick({c["hyp"]: c["value"] for c in candidates}, args.criterion)
    won = candidates[winner]
    out: dict[str, Any] = {
        "fold": k, "n_train": int(train_rows.size), "n_test": int(test_rows.size),
        "hyp": winner, "batch_size": won["batch_size"], "learning_rate": won["learning_rate"],
        "epoch": won["epoch"], "epochs_run": won["epochs_run"],
        "val_oa": won["val_oa"], "val_kappa": won["val_kappa"],
    }
    members = [won["network"]]
    if args.ensemble > 1 and (not args.refit or args.validation_only):
        for m in range(1, args.ensemble):
            members.append(inner(winner, member_seed(split_seed, winner, m), f"member-{m}")["network"])
        # the inner validation OA of the ensemble (each member at its own best epoch)
        _, val = split_learn_validation(samples.labels, samples.polygon_ids, split_seed)
        out["val_ensemble_oa"] = oa_of(ensemble_proba(members, samples.load_all()[val]),
                                       samples.label_indices()[val])
    if args.refit and not args.validation_only:
        lrs = won["lrs"][: won["epoch"]]
        members = [refit(samples, opts, won["batch_size"], lrs, member_seed(split_seed, winner, m),
                         args.options, won["learning_rate"])
                   for m in range(args.ensemble)]
        out["refit_epochs"] = len(lrs)
    if not args.validation_only:
        x = features_of(columns, test_rows, samples.feature_names)
        proba = ensemble_proba(members, x)
        classes = np.asarray(samples.classes)
        pred = classes[proba.argmax(axis=1)]
        truth = columns["label"][test_rows]
        nb = int(max(classes.max(), truth.max())) + 1
        cm = np.bincount(truth * nb + pred, minlength=nb * nb).reshape(nb, nb)
        s = scores(cm)
        out.update({"oa": s["oa"], "kappa": s["kappa"], "fscore": s["fscore"]})
    out["seconds"] = round(time.monotonic() - tic, 1)
    return out


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of one training through ``sitsflow.training.train`` (network, deep-learning
    parameters, training options, seed, threads): shared with ``bench/sinop.py``."""
    parser.add_argument("--seed", type=int, default=0, help="seed of the folds (and, + fold, of the 80/20 split)")
    parser.add_argument("--dl-name", default="LTAEClassifier",
                        help="a built-in network (docs/networks.md): LTAEClassifier, TempCNN, InceptionTime ...")
    parser.add_argument("--dl-parameters", type=json.loads, default=DEFAULT_DL_PARAMETERS,
                        help=f"JSON object (default {json.dumps(DEFAULT_DL_PARAMETERS)}; "
                        "'{}': the network's own defaults)")
    parser.add_argument("--training-options", type=json.loads, default={},
                        help="arg_train.training_options as a JSON object (docs/training.md), e.g. "
                        "'{\"label_smoothing\": 0.1, \"lr_schedule\": \"cosine\"}'")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--batch-size", type=int, nargs="+", default=[64])
    parser.add_argument("--learning-rate", type=float, nargs="+", default=[0.002])
    parser.add_argument("--criterion", default="loss", choices=["loss", "fscore", "oa", "kappa"],
                        help="model_selection_criterion (epoch kept and candidate chosen, on validation)")
    parser.add_argument("--weighted-labels", action="store_true")
    parser.add_argument("--adaptive-lr", type=json.loads, default={}, help="ReduceLROnPlateau arguments (JSON)")
    parser.add_argument("--early-stop-patience", type=int, default=None, help="enable early stop with this patience")
    parser.add_argument("--epoch-to-trigger", type=int, default=5)
    parser.add_argument("--early-stop-tol", type=float, default=0.01)
    parser.add_argument("--early-stop-metric", default="val_loss")
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--reference-start", default=None, help="YYYY-MM-DD start of the reference season")


def training_options_of(args: argparse.Namespace, parser: argparse.ArgumentParser) -> TrainingOptions:
    """``--training-options`` checked as ``arg_train.training_options`` is (bad keys or values,
    and the combinations the configuration refuses: exit 2 through ``parser.error``)."""
    try:
        options = TrainingOptions(**args.training_options)
        ArgTrainSection(deep_learning_parameters=options_of(args), training_options=options)
    except (TypeError, ValidationError) as exc:
        parser.error(f"--training-options {json.dumps(args.training_options)}: {exc}")
    return options


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", help="path of samples_mt_4bands.csv")
    parser.add_argument("--folds", type=int, default=5)
    add_training_arguments(parser)
    parser.add_argument("--only-folds", type=int, nargs="*", default=None, help="run only these folds")
    parser.add_argument("--ensemble", type=int, default=1,
                        help="members of the same model and pair trained with different seeds; their mean "
                        "class probabilities classify (1: a single model)")
    parser.add_argument("--refit", action="store_true",
                        help="after choosing the pair and the epoch count on the inner validation split, "
                        "retrain each member on all the training folds for that many epochs")
    parser.add_argument("--validation-only", action="store_true",
                        help="report the inner validation scores only; never classify the held-out folds")
    args = parser.parse_args(argv)
    if args.ensemble < 1:
        parser.error(f"--ensemble must be >= 1, got {args.ensemble}")
    args.options = training_options_of(args, parser)
    setup_logging()
    if args.threads:
        torch.set_num_threads(args.threads)

    tic = time.monotonic()
    columns, class_names, dates = read_sits_csv(args.csv, args.reference_start)
    labels = columns["label"]
    fold = stratified_folds(labels, args.folds, args.seed)
    folds = args.only_folds if args.only_folds is not None else list(range(args.folds))
    results = []
    with tempfile.TemporaryDirectory(prefix="sitsflow-mt-cv-") as tmp:
        for k in folds:
            res = run_fold(k, args, columns, fold, Path(tmp))
            results.append(res)
            test = "" if args.validation_only else f"  test OA {res['oa']:.4f} kappa {res['kappa']:.4f}"
            print(f"fold {k}: n_test {res['n_test']:4d}  hyp {res['hyp']} (batch {res['batch_size']}, "
                  f"lr {res['learning_rate']:g})  epoch {res['epoch']:3d}/{res['epochs_run']}  "
                  f"val OA {res['val_oa']:.4f}{test}  {res['seconds']:.0f} s", flush=True)
    seconds = time.monotonic() - tic
    summary: dict[str, Any] = {
        "bench": "matogrosso_cv", "samples": int(labels.size), "classes": class_names,
        "dates": [dates[0], dates[-1]], "folds": args.folds, "folds_run": folds, "seed": args.seed,
        "dl_name": args.dl_name, "dl_parameters": args.dl_parameters,
        "training_options": args.training_options, "epochs": args.epochs,
        "batch_size": args.batch_size, "learning_rate": args.learning_rate, "criterion": args.criterion,
        "weighted_labels": args.weighted_labels, "adaptive_lr": args.adaptive_lr,
        "early_stop_patience": args.early_stop_patience, "ensemble": args.ensemble, "refit": args.refit,
        "mean_val_oa": float(np.mean([r["val_oa"] for r in results])),
        "per_fold": results, "seconds": round(seconds, 1),
        "machine": f"{cpu_model()}, {torch.get_num_threads()} threads", "torch": torch.__version__,
    }
    print(f"mean validation OA {summary['mean_val_oa']:.4f}")
    if all("val_ensemble_oa" in r for r in results):
        summary["mean_val_ensemble_oa"] = float(np.mean([r["val_ensemble_oa"] for r in results]))
        print(f"mean validation OA of the {args.ensemble}-member ensemble {summary['mean_val_ensemble_oa']:.4f}")
    if not args.validation_only:
        oas = np.array([r["oa"] for r in results])
        kappas = np.array([r["kappa"] for r in results])
        # pooled OA over every held-out sample (folds differ in size by at most one per class)
        pooled = float(sum(r["oa"] * r["n_test"] for r in results) / sum(r["n_test"] for r in results))
        summary.update({"mean_oa": float(oas.mean()), "std_oa": float(oas.std(ddof=1)) if oas.size > 1 else 0.0,
                        "pooled_oa": pooled, "mean_kappa": float(kappas.mean())})
        print(f"mean test OA {summary['mean_oa']:.4f} (sd {summary['std_oa']:.4f}, pooled {pooled:.4f}), "
              f"mean kappa {summary['mean_kappa']:.4f}")
    print(f"{seconds:.0f} s on {summary['machine']}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
