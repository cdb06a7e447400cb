"""Training stage: every deep_learning_parameters option has its effect (tiny MLPs, few epochs)."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import netCDF4
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from sitsflow import layout, nn, storage
from sitsflow.config import (
    ArgTrainSection,
    ChainSection,
    DatedRasterSection,
    DeepLearningParameters,
    HyperparametersSolver,
    SitsflowConfig,
)
from sitsflow.errors import ConfigError, InputNotFoundError
from sitsflow.training import (
    EarlyStopping,
    class_weights,
    load_samples,
    run,
    split_learn_validation,
)
from sitsflow import samples as sdb
from sitsflow.training.loaders import STREAM_BUFFER_BATCHES, StreamBatches
from sitsflow.accuracy import scores
from sitsflow.training.plots import HISTORY_COLUMNS, read_history
from sitsflow.training.stage import evaluate, make_scheduler

DATES = [20200105, 20200115, 20200125, 20200204]
BANDS = ["b2", "ndvi"]
SENSOR = "generic"


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Any:
    """One intra-op thread: tiny networks run faster and are not slowed by a busy machine."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


# --- helpers ---------------------------------------------------------------------------------
def make_samples(
    polygons_per_class: dict[int, int], pixels: int = 10, seed: int = 0, sep: float = 2.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Separable features (n, 4 dates, 2 components), labels (n,), polygon ids (n,), grouped by polygon."""
    rng = np.random.default_rng(seed)
    feats, labels, polys = [], [], []
    pid = 100
    for k, (code, npoly) in enumerate(sorted(polygons_per_class.items())):
        for _ in range(npoly):
            centre = rng.normal(k * sep, 0.5, size=(1, len(DATES), len(BANDS)))
            feats.append(centre + rng.normal(0.0, 0.7, size=(pixels, len(DATES), len(BANDS))))
            labels += [code] * pixels
            polys += [pid] * pixels
            pid += 1
    x = np.concatenate(feats).astype(np.float32)
    x[0, 1, 0] = np.nan  # one missing value
    return x, np.array(labels, dtype=np.int32), np.array(polys, dtype=np.int64)


def write_db(
    path: str | Path, x: np.ndarray, labels: np.ndarray, polys: np.ndarray | None, *, stats: bool = True
) -> None:
    """Write a sample database in the layout of docs/architecture.md."""
    with netCDF4.Dataset(str(path), "w") as ds:
        n, t, c = x.shape
        ds.createDimension("sample", n)
        ds.createDimension("date", t)
        ds.createDimension("component", c)
        ds.createDimension("feature", t * c)
        v = ds.createVariable("features", "f4", ("sample", "date", "component"), chunksizes=(min(n, 64), t, c))
        v[:] = x
        ds.createVariable("label", "i4", ("sample",))[:] = labels
        if polys is not None:
            ds.createVariable("polygon_id", "i8", ("sample",))[:] = polys
        ds.createVariable("date", "i4", ("date",))[:] = np.array(DATES[:t], dtype=np.int32)
        comp = ds.createVariable("component_name", str, ("component",))
        for i, b in enumerate(BANDS[:c]):
            comp[i] = b
        fn = ds.createVariable("feature_name", str, ("feature",))
        for i, (d, b) in enumerate((d, b) for d in DATES[:t] for b in BANDS[:c]):
            fn[i] = f"{SENSOR}_{b}_{d}"
        if stats:
            flat = x.reshape(n, -1).astype(np.float64)
            for key, fun in (("min", np.nanmin), ("max", np.nanmax), ("mean", np.nanmean), ("var", np.nanvar)):
                ds.createVariable(f"stats_{key}", "f4", ("feature",))[:] = fun(flat, axis=0)
        codes = sorted(int(c) for c in np.unique(labels))
        ds.setncattr("sensor", SENSOR)
        ds.setncattr("classes", json.dumps(codes))
        ds.setncattr("class_names", json.dumps({str(c): f"class {c}" for c in codes}))
        ds.setncattr("region", 1)
        ds.setncattr("seed", 0)
        ds.setncattr("fingerprint", "db-fp-1")


def make_cfg(
    out: str, *, pairs: tuple[tuple[int, ...], tuple[float, ...]] = ((32,), (0.01,)), **dl: Any
) -> SitsflowConfig:
    params: dict[str, Any] = {
        "dl_name": "MLPClassifier",
        "dl_parameters": {"hidden_layers": [16], "dropout": 0.2},
        "epochs": 3,
        "num_workers": 0,
        "dataloader_mode": "full",
        "hyperparameters_solver": HyperparametersSolver(batch_size=pairs[0], learning_rate=pairs[1]),
    }
    params.update(dl)
    return SitsflowConfig(
        source=f"{out}/test.cfg",
        chain=ChainSection(output_path=out, list_tile="T31TCJ", ground_truth="/gt.shp", data_field="code"),
        dated_raster=DatedRasterSection(path="/r/{tile}.tif", bands=tuple(BANDS)),
        arg_train=ArgTrainSection(deep_learning_parameters=DeepLearningParameters(**params)),
    )


@pytest.fixture
def out(tmp_path: Path) -> str:
    """An output tree holding region 1 / seed 0 samples (3 classes, 10 polygons each, 10 px)."""
    root = tmp_path / "out"
    (root / layout.LEARNING_SAMPLES).mkdir(parents=True)
    x, y, p = make_samples({11: 10, 12: 10, 31: 10})
    write_db(layout.samples_learn(str(root), 1, 0), x, y, p)
    return str(root)


def model_state(uri: str) -> dict[str, torch.Tensor]:
    return nn.load_model(storage.read_bytes(uri))[0].state_dict()


def checkpoint(uri: str) -> dict[str, Any]:
    return torch.load(io.BytesIO(storage.read_bytes(uri)), weights_only=True)


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# --- data ------------------------------------------------------------------------------------
def test_split_is_polygon_wise_stratified_and_seeded() -> None:
    labels = np.repeat([1, 1, 1, 1, 1, 2, 2, 3], 5)
    polys = np.repeat(np.arange(8), 5)
    learn, val = split_learn_validation(labels, polys, seed=3)
    for p in range(7):  # polygons of classes 1 and 2: in exactly one set
        m = polys == p
        assert (learn[m].all() and not val[m].any()) or (val[m].all() and not learn[m].any())
    assert val[labels == 1].sum() == 5 and val[labels == 2].sum() == 5  # round(0.2*5)=1, max(1, .)=1
    assert learn[labels == 3].all() and val[labels == 3].all()  # single polygon: both sets
    again = split_learn_validation(labels, polys, seed=3)
    assert (again[1] == val).all()
    seeds = {tuple(split_learn_validation(labels, polys, seed=s)[1]) for s in range(6)}
    assert len(seeds) > 1
    # without polygon ids every sample is its own group: 20 % of each class
    learn2, val2 = split_learn_validation(np.repeat([1, 2], 50), None, seed=0)
    assert val2.sum() == 20 and learn2.sum() == 80 and not (learn2 & val2).any()


def test_class_weights_reference_example() -> None:
    weights = class_weights(np.array([0] * 80 + [1] * 20), 3)
    assert weights.tolist() == [1.25, 5.0, 0.0]


def test_weighted_loss_follows_the_weights() -> None:
    """Validation/training loss = sum_i w_{y_i} l_i / sum_i w_{y_i} with w = (1.25, 5)."""
    torch.manual_seed(0)
    net = torch.nn.Linear(2, 2)
    x = torch.randn(10, 2)
    y = torch.tensor([0] * 8 + [1] * 2)
    w = torch.from_numpy(class_weights(y.numpy(), 2))
    assert w.tolist() == [1.25, 5.0]
    per_sample = torch.nn.functional.cross_entropy(net(x), y, reduction="none").detach().double()
    expected = float((per_sample * w.double()[y]).sum() / w.double()[y].sum())
    got = evaluate(net, [(x, y)], w, 2, torch.device("cpu"))["val_loss"]
    unweighted = evaluate(net, [(x, y)], None, 2, torch.device("cpu"))["val_loss"]
    assert got == pytest.approx(expected, rel=1e-6)
    assert unweighted == pytest.approx(float(per_sample.mean()), rel=1e-6)
    assert abs(got - unweighted) > 1e-3


def test_weighted_labels_in_training(tmp_path: Path) -> None:
    """On an 80/20 database the loss uses weights 1.25 / 5: the recorded validation loss of the
    kept state equals the weighted mean recomputed by hand, and differs from the plain mean."""
    out = str(tmp_path)
    (tmp_path / layout.LEARNING_SAMPLES).mkdir()
    x, y, p = make_samples({1: 20, 2: 5}, pixels=8, sep=0.5)
    db = layout.samples_learn(out, 1, 0)
    write_db(db, x, y, p)
    s = run(make_cfg(out, weighted_labels=True, epochs=2), 1, 0, 0)
    assert s["class_weights"] == [1.25, 5.0]
    hist = read_history(storage.read_bytes(s["outputs"]["history"]))
    net, desc = nn.load_model(storage.read_bytes(s["outputs"]["model"]))
    samples = load_samples(db)
    _, val = split_learn_validation(samples.labels, samples.polygon_ids, seed=0)
    target = torch.from_numpy(samples.label_indices()[val])
    with torch.no_grad():
        per_sample = torch.nn.functional.cross_entropy(
            net(torch.from_numpy(samples.load_all()[val])), target, reduction="none").double()
    w = torch.tensor([1.25, 5.0], dtype=torch.float64)[target]
    recorded = hist[desc["selection"]["epoch"] - 1]["val_loss"]
    assert recorded == pytest.approx(float((per_sample * w).sum() / w.sum()), rel=1e-5)
    assert abs(recorded - float(per_sample.mean())) > 1e-4
    plain = run(make_cfg(out, weighted_labels=False, epochs=2), 1, 0, 0)
    assert plain["class_weights"] is None


def test_load_samples_tables_and_netcdf(tmp_path: Path) -> None:
    x, y, p = make_samples({1: 2, 2: 2}, pixels=3)
    cols: dict[str, Any] = {"label": y, "polygon_id": p}
    # columns deliberately not date-major: loading must reorder them
    for b in reversed(BANDS):
        for d in reversed(DATES):
            cols[f"{SENSOR}_{b}_{d}"] = x[:, DATES.index(d), BANDS.index(b)]
    pq.write_table(pa.table(cols), tmp_path / "s.parquet")
    s = load_samples(str(tmp_path / "s.parquet"))
    assert s.dates == DATES and s.component_names == ["ndvi", "b2"]
    assert s.feature_names[:2] == [f"{SENSOR}_ndvi_{DATES[0]}", f"{SENSOR}_b2_{DATES[0]}"]
    np.testing.assert_array_equal(s.load_all()[:, :, 1], x[:, :, 0])
    np.testing.assert_allclose(s.stats["mean"][1], np.nanmean(x[:, 0, 0]), rtol=1e-5)
    assert s.classes == [1, 2] and (s.polygon_ids == p).all()

    lines = ["label," + ",".join(f"{SENSOR}_{b}_{d}" for d in DATES for b in BANDS)]
    for i in range(x.shape[0]):
        vals = ["" if np.isnan(v) else repr(float(v)) for v in x[i].reshape(-1)]
        lines.append(f"{y[i]}," + ",".join(vals))
    (tmp_path / "s.csv").write_text("\n".join(lines) + "\n")
    c = load_samples(str(tmp_path / "s.csv"))
    assert c.polygon_ids is None and c.component_names == BANDS
    np.testing.assert_allclose(c.load_all(), x, rtol=1e-6)
    np.testing.assert_allclose(c.stats["var"], np.nanvar(x.reshape(len(x), -1), axis=0), rtol=1e-4)

    write_db(tmp_path / "s.nc", x, y, p, stats=False)  # stats absent: computed
    n = load_samples(str(tmp_path / "s.nc"))
    np.testing.assert_allclose(n.stats["max"], np.nanmax(x.reshape(len(x), -1), axis=0))
    np.testing.assert_allclose(n.stats["var"], np.nanvar(x.reshape(len(x), -1).astype(np.float64), axis=0), rtol=1e-4)
    assert n.class_names == {"1": "class 1", "2": "class 2"}
    with pytest.raises(InputNotFoundError):
        load_samples(str(tmp_path / "missing.nc"))


def test_chunked_stats_match_numpy() -> None:
    x, _, _ = make_samples({1: 3, 2: 4}, pixels=7)
    x[:, 2, 1] = np.nan  # a feature with no value at all
    got = sdb.compute_stats(sdb.ArrayReader(x), chunk=5)
    flat = x.reshape(len(x), -1).astype(np.float64)
    ok = ~np.isnan(flat).all(axis=0)
    assert ok.sum() == flat.shape[1] - 1
    np.testing.assert_allclose(got["mean"][ok], np.nanmean(flat[:, ok], axis=0), rtol=1e-5)
    np.testing.assert_allclose(got["var"][ok], np.nanvar(flat[:, ok], axis=0), rtol=1e-4)
    np.testing.assert_allclose(got["min"][ok], np.nanmin(flat[:, ok], axis=0))
    assert np.isnan(got["var"][5]) and np.isnan(got["min"][5])


def test_scores_of_a_confusion_matrix() -> None:
    cm = np.array([[5, 1, 0], [2, 2, 0], [0, 0, 0]])  # class 3 absent everywhere: not averaged
    got = scores(cm)
    assert got["oa"] == pytest.approx(0.7)
    assert got["kappa"] == pytest.approx((0.7 - 0.54) / 0.46)
    assert got["precision"] == pytest.approx((5 / 7 + 2 / 3) / 2)
    assert got["recall"] == pytest.approx((5 / 6 + 0.5) / 2)
    assert got["fscore"] == pytest.approx((50 / 65 + 4 / 7) / 2)
    assert scores(np.diag([3, 4]))["kappa"] == 1.0


# --- early stop ------------------------------------------------------------------------------
def test_early_stop_on_constructed_loss_history() -> None:
    # the reference: dB = log10(loss_{N-1} / loss_N), N the current epoch; tol 0.01 dB ~ a 2.3 % drop
    losses = [5.0, 4.0, 1.0, 0.99, 0.5, 0.49, 0.485, 0.48, 0.475, 0.3]
    es = EarlyStopping("val_loss", tol=0.01, patience=3, epoch_to_trigger=2)
    stops = [es.update(e, v) for e, v in enumerate(losses, start=1)]
    # 1-2 not judged; 3: log10(4/1) = 0.6 improves; 4: log10(1/0.99) = 0.0044 no (1); 5: 0.30 yes;
    # 6: log10(0.5/0.49) = 0.0088 no (1); 7: 0.0045 no (2); 8: 0.0045 no (3) -> stop after epoch 8.
    # Measured from the best so far (0.5) epoch 8 would improve (log10(0.5/0.48) = 0.018 dB): the
    # reference's previous-epoch rule stops where best-so-far bookkeeping would go on.
    assert math.log10(0.5 / 0.48) > 0.01
    assert stops.index(True) == 7 and es.stopped_epoch == 8 and stops[8:] == [True, True]
    assert es.previous == 0.48 and es.previous_epoch == 8 and es.wait == 3
    # a rise resets nothing: the change is negative; the next drop is judged from the risen value
    es = EarlyStopping("train_loss", tol=0.01, patience=2, epoch_to_trigger=1)
    stops = [es.update(e, v) for e, v in enumerate([1.0, 0.5, 0.8, 0.6, 0.59, 0.585], start=1)]
    # 2: +0.30 yes; 3: -0.20 no (1); 4: log10(0.8/0.6) = 0.125 yes (0); 5: 0.007 no (1); 6: 0.004 no (2)
    assert stops == [False] * 5 + [True] and es.stopped_epoch == 6
    # a NaN epoch is no improvement, and the epoch after it cannot improve on NaN either
    es = EarlyStopping("val_loss", tol=0.01, patience=2, epoch_to_trigger=0)
    stops = [es.update(e, v) for e, v in enumerate([1.0, float("nan"), 0.5], start=1)]
    assert stops == [False, False, True]


def test_early_stop_documented_example() -> None:
    # docs/training.md: val losses 1.0, 0.8, 0.6, 0.595, 0.59, epoch_to_trigger 2, patience 2, tol 0.01
    es = EarlyStopping("valid_loss", tol=0.01, patience=2, epoch_to_trigger=2)
    assert [es.update(e, v) for e, v in enumerate([1.0, 0.8, 0.6, 0.595, 0.59], start=1)] == [False] * 4 + [True]
    es = EarlyStopping("val_loss", tol=0.01, patience=2, epoch_to_trigger=2)
    # 0.58 after 0.595: log10(0.595 / 0.58) = 0.011 dB > 0.01 improves, so training goes on
    assert [es.update(e, v) for e, v in enumerate([1.0, 0.8, 0.6, 0.595, 0.58], start=1)] == [False] * 5


def test_early_stop_on_scores_and_trigger() -> None:
    es = EarlyStopping("oa", tol=0.05, patience=2, epoch_to_trigger=3)
    values = [0.1, 0.1, 0.5, 0.52, 0.6, 0.61, 0.64, 0.7]
    stops = [es.update(e, v) for e, v in enumerate(values, start=1)]
    # 1-3 not judged (3 is only the previous epoch of 4); 4: +0.02 no (1); 5: +0.08 yes (0);
    # 6: +0.01 no (1); 7: +0.03 no (2) -> stop after epoch 7
    assert stops == [False] * 6 + [True, True]
    assert es.stopped_epoch == 7
    # value_N - value_{N-1}, not value_N - best: steady gains of 0.04 never exceed tol 0.05
    es = EarlyStopping("kappa", tol=0.05, patience=3, epoch_to_trigger=1)
    stops = [es.update(e, 0.2 + 0.04 * e) for e in range(1, 6)]
    assert stops == [False, False, False, True, True] and es.stopped_epoch == 4
    # epoch_to_trigger: the first judged epoch is epoch_to_trigger + 1
    es = EarlyStopping("fscore", tol=0.0, patience=1, epoch_to_trigger=3)
    assert [es.update(e, v) for e, v in enumerate([0.5, 0.4, 0.3, 0.2], start=1)] == [False, False, False, True]
    es = EarlyStopping("oa", 0.05, 2, 3)
    for e, v in enumerate(values[:5], start=1):
        es.update(e, v)
    state = es.state_dict()
    clone = EarlyStopping("oa", 0.05, 2, 3)
    clone.load_state_dict(state)
    assert clone.state_dict() == state
    assert [clone.update(e, v) for e, v in enumerate(values[5:], start=6)] == [False, True, True]
    with pytest.raises(ConfigError):
        EarlyStopping("accuracy", 0.1, 2, 1)


def test_training_stops_early(out: str) -> None:
    cfg = make_cfg(out, epochs=10, enable_early_stop=True, epoch_to_trigger=2, early_stop_patience=2,
                   early_stop_tol=1e6, early_stop_metric="train_loss")
    summary = run(cfg, 1, 0, 0)
    assert summary["stopped_early"] and summary["epochs_run"] == 4
    hist = read_history(storage.read_bytes(layout.model_history(out, 1, 0, 0)))
    assert [r["epoch"] for r in hist] == [1, 2, 3, 4]


# --- training runs ---------------------------------------------------------------------------
def test_outputs_model_description_and_rerun_skip(out: str) -> None:
    cfg = make_cfg(out, weighted_labels=True, model_selection_criterion="kappa")
    summary = run(cfg, 1, 0, 0)
    assert not summary["skipped"] and summary["epochs_run"] == 3
    assert summary["class_weights"] == pytest.approx([3.0, 3.0, 3.0])
    names = {k: summary["outputs"][k] for k in ("model", "checkpoint", "loss_plot", "metrics_plot", "history")}
    assert names["model"] == f"{out}/model/model_1_seed_0_hyp_0.txt"
    assert names["checkpoint"] == f"{out}/model/model_1_seed_0_hyp_0_checkpoint.txt"
    for key in ("loss_plot", "metrics_plot"):
        assert storage.read_bytes(names[key])[:8] == b"\x89PNG\r\n\x1a\n"
    hist = read_history(storage.read_bytes(names["history"]))
    assert list(hist[0]) == list(HISTORY_COLUMNS) and len(hist) == 3
    assert hist[0]["val_loss_db"] == pytest.approx(10 * math.log10(hist[0]["val_loss"]))
    net, desc = nn.load_model(storage.read_bytes(names["model"]))
    assert desc["classes"] == [11, 12, 31] and desc["class_names"]["31"] == "class 31"
    assert desc["dates"] == DATES and desc["component_names"] == BANDS and desc["sensor"] == SENSOR
    assert desc["hyperparameters"] == {"batch_size": 32, "learning_rate": 0.01, "hyp": 0}
    assert desc["dl_parameters"] == {"hidden_layers": [16], "dropout": 0.2}
    assert desc["training_data"]["fingerprint"] == "db-fp-1"
    kept = max(hist, key=lambda r: r["kappa"])  # first max
    assert desc["selection"] == {"criterion": "kappa", "epoch": kept["epoch"], "value": kept["kappa"]}
    ckpt = checkpoint(names["checkpoint"])  # weights_only load
    assert ckpt["epoch"] == 3 and set(ckpt["best"]) == {"loss", "fscore", "oa", "kappa"}
    assert_same_state(net.state_dict(), ckpt["best"]["kappa"]["state"])
    # rerun: nothing is redone
    mtimes = {k: Path(v).stat().st_mtime_ns for k, v in names.items()}
    again = run(cfg, 1, 0, 0)
    assert again["skipped"] and again["selected_epoch"] == summary["selected_epoch"]
    assert mtimes == {k: Path(v).stat().st_mtime_ns for k, v in names.items()}
    # a changed parameter that matters retrains
    assert not run(make_cfg(out, weighted_labels=False, model_selection_criterion="kappa"), 1, 0, 0)["skipped"]


def test_selection_criterion_picks_the_state(out: str) -> None:
    for crit in ("loss", "oa"):
        cfg = make_cfg(out, model_selection_criterion=crit, epochs=4)
        s = run(cfg, 1, 0, 0)
        ckpt = checkpoint(s["outputs"]["checkpoint"])
        assert s["selected_epoch"] == ckpt["best"][crit]["epoch"]
        assert_same_state(model_state(s["outputs"]["model"]), ckpt["best"][crit]["state"])


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("mode", ["full", "stream"])
def test_resume_after_interruption_is_bit_identical(tmp_path: Path, mode: str) -> None:
    x, y, p = make_samples({1: 6, 2: 6}, pixels=9)
    roots = []
    for name in ("a", "b"):
        root = tmp_path / name
        (root / layout.LEARNING_SAMPLES).mkdir(parents=True)
        write_db(layout.samples_learn(str(root), 1, 0), x, y, p)
        roots.append(str(root))
    # early stop carried through the checkpoint: no epoch can improve by 1e6 dB, so epochs 2, 3
    # and 4 count and training stops after epoch 4 of 6, with or without the interruption
    opts = {"epochs": 6, "dataloader_mode": mode, "adaptive_lr": {"patience": 0, "factor": 0.5},
            "enable_early_stop": True, "epoch_to_trigger": 1, "early_stop_patience": 3,
            "early_stop_tol": 1e6}
    full_run = run(make_cfg(roots[0], **opts), 1, 0, 0)
    assert full_run["resumed_from_epoch"] == 0 and full_run["stopped_early"] and full_run["epochs_run"] == 4

    def stop_after_2(epoch: int, row: dict[str, float]) -> None:
        if epoch == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        run(make_cfg(roots[1], **opts), 1, 0, 0, on_epoch_end=stop_after_2)
    assert checkpoint(layout.model_checkpoint(roots[1], 1, 0, 0))["epoch"] == 2
    seen: list[int] = []
    resumed = run(make_cfg(roots[1], **opts), 1, 0, 0, on_epoch_end=lambda e, r: seen.append(e))
    assert resumed["resumed_from_epoch"] == 2 and seen == [3, 4] and resumed["stopped_early"]
    a = checkpoint(layout.model_checkpoint(roots[0], 1, 0, 0))
    b = checkpoint(layout.model_checkpoint(roots[1], 1, 0, 0))
    assert_same_state(a["model"], b["model"])
    assert_same_state(model_state(layout.model_candidate(roots[0], 1, 0, 0)),
                      model_state(layout.model_candidate(roots[1], 1, 0, 0)))
    assert [h["val_loss"] for h in a["history"]] == [h["val_loss"] for h in b["history"]]
    assert [h["lr"] for h in a["history"]] == [h["lr"] for h in b["history"]]


def test_restart_from_checkpoint_false_restarts(out: str) -> None:
    def stop_after_2(epoch: int, row: dict[str, float]) -> None:
        if epoch == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        run(make_cfg(out, epochs=3), 1, 0, 0, on_epoch_end=stop_after_2)
    seen: list[int] = []
    s = run(make_cfg(out, epochs=3, restart_from_checkpoint=False), 1, 0, 0,
            on_epoch_end=lambda e, r: seen.append(e))
    assert seen == [1, 2, 3] and s["resumed_from_epoch"] == 0
    # a checkpoint written for other parameters is never resumed
    with pytest.raises(Interrupt):
        run(make_cfg(out, epochs=3, weighted_labels=True), 1, 0, 0, on_epoch_end=stop_after_2)
    seen.clear()
    s = run(make_cfg(out, epochs=4), 1, 0, 0, on_epoch_end=lambda e, r: seen.append(e))
    assert seen == [1, 2, 3, 4] and s["resumed_from_epoch"] == 0


def _two_trees(tmp_path: Path) -> list[str]:
    x, y, p = make_samples({1: 6, 2: 6}, pixels=9)
    roots = []
    for name in ("a", "b"):
        root = tmp_path / name
        (root / layout.LEARNING_SAMPLES).mkdir(parents=True)
        write_db(layout.samples_learn(str(root), 1, 0), x, y, p)
        roots.append(str(root))
    return roots


def test_more_epochs_continue_the_checkpoint_bit_identically(tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """3 epochs, then 5 with restart_from_checkpoint (and other loader and early-stop settings):
    exactly the weights of an uninterrupted 5-epoch training."""
    roots = _two_trees(tmp_path)
    opts = {"adaptive_lr": {"patience": 0, "factor": 0.5}}
    run(make_cfg(roots[0], epochs=5, **opts), 1, 0, 0)
    first = run(make_cfg(roots[1], epochs=3, **opts), 1, 0, 0)
    assert first["epochs_run"] == 3
    seen: list[int] = []
    caplog.set_level("INFO", logger="sitsflow")
    # early stop enabled but never triggered (patience 10 > 5 epochs): its settings do not matter
    more = run(make_cfg(roots[1], epochs=5, num_workers=1, enable_early_stop=True, early_stop_patience=10,
                        restart_from_checkpoint=True, **opts),
               1, 0, 0, on_epoch_end=lambda e, r: seen.append(e))
    assert more["resumed_from_epoch"] == 3 and seen == [4, 5] and not more["skipped"]
    assert "epochs 3 -> 5" in caplog.text and "num_workers 0 -> 1" in caplog.text
    a = checkpoint(layout.model_checkpoint(roots[0], 1, 0, 0))
    b = checkpoint(layout.model_checkpoint(roots[1], 1, 0, 0))
    assert_same_state(a["model"], b["model"])
    assert_same_state(model_state(layout.model_candidate(roots[0], 1, 0, 0)),
                      model_state(layout.model_candidate(roots[1], 1, 0, 0)))
    assert [h["val_loss"] for h in a["history"]] == [h["val_loss"] for h in b["history"]]
    assert [h["lr"] for h in a["history"]] == [h["lr"] for h in b["history"]]


@pytest.mark.parametrize(
    ("change", "group", "said"),
    [
        ({"dl_parameters": {"hidden_layers": [8], "dropout": 0.2}}, "network", "dl_parameters"),
        ({"dl_name": "ANN", "dl_parameters": {"hidden_1": 8, "hidden_2": 8}}, "network", "dl_name"),
        ({"pairs": ((16,), (0.01,))}, "optimisation", "batch_size 32 -> 16"),
        ({"pairs": ((32,), (0.001,))}, "optimisation", "learning_rate 0.01 -> 0.001"),
        ({"weighted_labels": True}, "optimisation", "weighted_labels false -> true"),
    ],
    ids=["parameters", "network", "batch size", "learning rate", "weighted labels"],
)
def test_incompatible_checkpoint_restarts_saying_why(out: str, caplog: pytest.LogCaptureFixture,
                                                     change: dict[str, Any], group: str, said: str) -> None:
    run(make_cfg(out, epochs=2), 1, 0, 0)
    seen: list[int] = []
    caplog.set_level("INFO", logger="sitsflow")
    s = run(make_cfg(out, **{"epochs": 3, **change}), 1, 0, 0, on_epoch_end=lambda e, r: seen.append(e))
    assert seen == [1, 2, 3] and s["resumed_from_epoch"] == 0
    assert f"the {group} changed" in caplog.text and said in caplog.text, caplog.text


def test_changed_data_or_code_restarts(out: str, caplog: pytest.LogCaptureFixture,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    run(make_cfg(out, epochs=2), 1, 0, 0)
    caplog.set_level("INFO", logger="sitsflow")
    monkeypatch.setenv("SITSFLOW_REVISION", "other-code")  # issue 12: other code never continues old state
    s = run(make_cfg(out, epochs=3), 1, 0, 0)
    assert s["resumed_from_epoch"] == 0 and "the code changed (code_version" in caplog.text
    caplog.clear()
    x, y, p = make_samples({11: 10, 12: 10, 31: 10}, seed=5)
    write_db(layout.samples_learn(out, 1, 0), x, y, p)  # new samples
    s = run(make_cfg(out, epochs=4), 1, 0, 0)
    assert s["resumed_from_epoch"] == 0 and "the data changed (stat" in caplog.text


def test_fewer_epochs_than_the_checkpoint_restart(out: str, caplog: pytest.LogCaptureFixture) -> None:
    run(make_cfg(out, epochs=3), 1, 0, 0)
    caplog.set_level("INFO", logger="sitsflow")
    s = run(make_cfg(out, epochs=2), 1, 0, 0)
    assert s["resumed_from_epoch"] == 0 and s["epochs_run"] == 2
    assert "past the configured epochs (3 epochs done, epochs is now 2)" in caplog.text


def test_early_stop_settings_are_replayed_on_the_checkpoint_history(out: str) -> None:
    # stopped early after epoch 3 (no epoch improves by 1e6 dB) ...
    opts = {"enable_early_stop": True, "epoch_to_trigger": 1, "early_stop_patience": 2, "early_stop_tol": 1e6}
    s = run(make_cfg(out, epochs=6, **opts), 1, 0, 0)
    assert s["stopped_early"] and s["epochs_run"] == 3
    # ... early stop disabled: the training goes on from epoch 4
    seen: list[int] = []
    s = run(make_cfg(out, epochs=5), 1, 0, 0, on_epoch_end=lambda e, r: seen.append(e))
    assert s["resumed_from_epoch"] == 3 and seen == [4, 5] and not s["stopped_early"]


def test_adaptive_lr_lowers_the_learning_rate_on_a_plateau(out: str) -> None:
    # threshold 10 (rel): no validation loss can count as an improvement -> a plateau every epoch
    cfg = make_cfg(out, adaptive_lr={"patience": 0, "factor": 0.5, "threshold": 10.0, "verbose": False})
    run(cfg, 1, 0, 0)
    hist = read_history(storage.read_bytes(layout.model_history(out, 1, 0, 0)))
    assert [h["lr"] for h in hist] == pytest.approx([0.01, 0.005, 0.0025])
    run(make_cfg(out), 1, 0, 0)
    hist = read_history(storage.read_bytes(layout.model_history(out, 1, 0, 0)))
    assert [h["lr"] for h in hist] == pytest.approx([0.01] * 3)
    with pytest.raises(ConfigError, match="adaptive_lr"):
        make_scheduler(torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.1), {"patient": 3})


def test_full_and_stream_train_and_stream_reads_bounded_chunks(out: str, monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[tuple[int, int]] = []
    original = sdb.NetCDFReader.read

    def spy(self: sdb.NetCDFReader, start: int, stop: int) -> np.ndarray:
        reads.append((start, stop))
        return original(self, start, stop)

    monkeypatch.setattr(sdb.NetCDFReader, "read", spy)
    buffered: list[int] = []
    original_iter = StreamBatches.__iter__

    def iter_spy(self: StreamBatches) -> Any:
        yield from original_iter(self)
        buffered.append(self.max_buffered)

    monkeypatch.setattr(StreamBatches, "__iter__", iter_spy)
    bs = 16
    stream = run(make_cfg(out, dataloader_mode="stream", epochs=2, pairs=((bs,), (0.01,))), 1, 0, 0)
    n = 300
    assert reads and max(stop - start for start, stop in reads) <= bs  # never the whole file
    assert max(buffered) <= (STREAM_BUFFER_BATCHES + 1) * bs < n
    assert stream["selected_value"] < 1.0  # it learned (3 classes: chance ~1.1)
    reads.clear()
    full = run(make_cfg(out, dataloader_mode="full", epochs=2, pairs=((bs,), (0.01,))), 1, 0, 0)
    assert not reads  # full mode reads everything at once through netCDF4 directly
    assert full["selected_value"] < 1.0
    assert model_state(stream["outputs"]["model"]).keys() == model_state(full["outputs"]["model"]).keys()


def test_stream_validation_reads_only_spans_of_selected_rows() -> None:
    # 40 polygons of 25 rows, every 5th polygon selected (validation-like, 20 %), batches of 64
    n, bs = 1000, 64
    x = np.arange(n, dtype=np.float32).reshape(n, 1, 1)
    mask = (np.arange(n) // 25) % 5 == 2
    reads: list[tuple[int, int]] = []

    class Spy(sdb.ArrayReader):
        def read(self, start: int, stop: int) -> np.ndarray:
            reads.append((start, stop))
            return super().read(start, stop)

    ds = StreamBatches(Spy(x), np.arange(n), mask, bs, shuffle=False, drop_single=False)
    batches = list(ds)
    rows = [int(v) for b, _ in batches for v in b.reshape(-1)]
    assert rows == np.flatnonzero(mask).tolist()  # each selected row once, in file order
    assert [len(y) for _, y in batches] == [bs] * 3 + [200 - 3 * bs]  # packed into full batches
    assert all(torch.equal(b.reshape(-1).long(), y) for b, y in batches)
    # one read per selected polygon: only the selected 20 % of the rows is read
    assert reads == [(p * 25, p * 25 + 25) for p in range(2, 40, 5)]
    assert ds.max_buffered <= 2 * bs
    # runs closer than batch_size // 8 rows are read together; reads never exceed a batch
    ds = StreamBatches(Spy(x), np.arange(n), np.arange(n) % 3 != 0, bs, shuffle=False, drop_single=False)
    reads.clear()
    assert sum(len(y) for _, y in ds) == int((np.arange(n) % 3 != 0).sum())
    assert max(b - a for a, b in reads) <= bs and sum(b - a for a, b in reads) <= n


def test_stream_batches_reshuffle_every_epoch() -> None:
    n, bs = 200, 10
    x = np.arange(n, dtype=np.float32).reshape(n, 1, 1)
    targets = np.zeros(n, dtype=np.int64)
    mask = np.ones(n, dtype=bool)
    mask[::7] = False
    ds = StreamBatches(sdb.ArrayReader(x), targets, mask, bs, shuffle=True, drop_single=False)
    gen = torch.Generator().manual_seed(5)

    def epoch() -> list[list[int]]:
        ds.set_epoch(gen)
        return [sorted(int(v) for v in b[0].reshape(-1)) for b in ds]

    e1, e2 = epoch(), epoch()
    assert sorted(v for b in e1 for v in b) == sorted(np.flatnonzero(mask).tolist())  # each row once
    assert e1 != e2 and e1[0] != e2[0]  # contents and order change between epochs
    assert not any(b == list(range(b[0], b[0] + len(b))) for b in e1[:5])  # batches mix chunks
    gen.manual_seed(5)
    assert epoch() == e1  # seeded: reproducible
    # 171 selected rows, batches of 10: the last batch holds one row, which BatchNorm cannot use
    ds.drop_single = True
    assert sum(len(b) for b in epoch()) == 170


def test_additional_statistics_percentage_adds_quantiles(out: str) -> None:
    s = run(make_cfg(out, additional_statistics_percentage=0.5, epochs=1), 1, 0, 0)
    assert {"quantile_0.1", "quantile_0.5", "quantile_0.95"} <= set(s["stats"])
    net, desc = nn.load_model(storage.read_bytes(s["outputs"]["model"]))
    stats = net.stats_dict()[SENSOR]
    samples = load_samples(layout.samples_learn(out, 1, 0))
    rows = np.sort(np.random.default_rng(0).choice(samples.n, size=150, replace=False))  # split seed 0
    expected = np.nanquantile(samples.load_all()[rows].reshape(150, -1).astype(np.float64), 0.95, axis=0)
    np.testing.assert_allclose(stats["quantile_0.95"].numpy(), expected, rtol=1e-5)
    assert not np.allclose(stats["quantile_0.95"].numpy(), stats["max"].numpy())
    s = run(make_cfg(out, epochs=1), 1, 0, 0)
    assert not any(k.startswith("quantile") for k in s["stats"])
    assert set(nn.load_model(storage.read_bytes(s["outputs"]["model"]))[0].stats_dict()[SENSOR]) == {
        "min", "max", "mean", "var"}


def test_num_workers_loads_in_subprocesses(out: str, tmp_path: Path) -> None:
    s0 = run(make_cfg(out, epochs=2, num_workers=0), 1, 0, 0)
    w0 = model_state(s0["outputs"]["model"])
    s2 = run(make_cfg(out, epochs=2, num_workers=2), 1, 0, 0)
    assert not s2["skipped"]
    # full mode: the batch order is drawn in the main process, so workers change nothing
    assert_same_state(w0, model_state(s2["outputs"]["model"]))
    # stream mode: two workers each read their share of the chunks; seeded, so reproducible
    states = []
    for name in ("w1", "w2"):
        root = tmp_path / name
        (root / layout.LEARNING_SAMPLES).mkdir(parents=True)
        storage.write_bytes(layout.samples_learn(str(root), 1, 0), storage.read_bytes(layout.samples_learn(out, 1, 0)))
        s = run(make_cfg(str(root), epochs=2, num_workers=2, dataloader_mode="stream"), 1, 0, 0)
        states.append(model_state(s["outputs"]["model"]))
    assert_same_state(*states)


def test_dl_module_network(out: str, tmp_path: Path) -> None:
    module = tmp_path / "mynet.py"
    module.write_text(
        "import torch\n"
        "from sitsflow.nn import Iota2NeuralNetwork\n\n"
        "class TinyNet(Iota2NeuralNetwork):\n"
        "    def __init__(self, *, width=8, **framework):\n"
        "        super().__init__(**framework)\n"
        "        self.fc = torch.nn.Linear(self.nb_dates * self.nb_components, width)\n"
        "        self.out = torch.nn.Linear(width, self.nb_classes)\n\n"
        "    def _forward(self, x):\n"
        "        return self.out(torch.relu(self.fc(self.normalize_input(x).flatten(1))))\n"
    )
    cfg = make_cfg(out, dl_name="TinyNet", dl_parameters={"width": 4}, dl_module=str(module), epochs=2)
    s = run(cfg, 1, 0, 0)
    net, desc = nn.load_model(storage.read_bytes(s["outputs"]["model"]), module_source=module.read_text())
    assert type(net).__name__ == "TinyNet" and net.out.in_features == 4
    assert desc["dl_name"] == "TinyNet" and desc["dl_module"] == str(module)
    assert desc["module_sha256"] == nn.module_sha256(module.read_text())  # the code itself is never stored
    assert run(cfg, 1, 0, 0)["skipped"]
    module.write_text(module.read_text().replace("torch.relu", "torch.tanh"))
    assert not run(cfg, 1, 0, 0)["skipped"]  # the module's text is part of the fingerprint


def test_bad_inputs(out: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="hyperparameter pair 3"):
        run(make_cfg(out), 1, 0, 3)
    with pytest.raises(InputNotFoundError, match="sampling"):
        run(make_cfg(out), 2, 0, 0)


@pytest.mark.s3
def test_training_on_s3(s3_bucket: str, tmp_path: Path) -> None:
    x, y, p = make_samples({1: 5, 2: 5}, pixels=6)
    write_db(tmp_path / "db.nc", x, y, p)
    out = f"{s3_bucket}/run"
    storage.write_bytes(layout.samples_learn(out, 1, 0), (tmp_path / "db.nc").read_bytes())
    s = run(make_cfg(out, epochs=2, dataloader_mode="stream"), 1, 0, 0)
    for uri in s["outputs"].values():
        assert storage.exists(uri)
    assert storage.exists(layout.manifest(out, "training", "region_1_seed_0_hyp_0"))
    assert run(make_cfg(out, epochs=2, dataloader_mode="stream"), 1, 0, 0)["skipped"]
    assert load_samples(layout.samples_learn(out, 1, 0)).n == x.shape[0]


def test_changed_training_options_restart_the_checkpoint_saying_why(out: str,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    """arg_train.training_options change the loss or the optimiser: a checkpoint made without
    them is not continued with them."""
    from sitsflow.config import TrainingOptions

    run(make_cfg(out, epochs=2), 1, 0, 0)
    cfg = make_cfg(out, epochs=3)
    cfg = cfg.model_copy(update={"arg_train": cfg.arg_train.model_copy(
        update={"training_options": TrainingOptions(label_smoothing=0.1)})})
    caplog.set_level("INFO", logger="sitsflow")
    s = run(cfg, 1, 0, 0)
    assert s["resumed_from_epoch"] == 0 and s["epochs_run"] == 3
    assert "the training options changed (training_options" in caplog.text, caplog.text
