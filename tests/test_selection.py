"""Selection stage: the best candidate by model_selection_criterion, its copy and report, skips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sitsflow import layout, nn, storage
from sitsflow.errors import InputNotFoundError
from sitsflow.selection import candidate_value, pick, run
from sitsflow.training import run as train
from sitsflow.training.plots import history_parquet
from test_training import _one_thread, make_cfg, make_samples, write_db  # noqa: F401 (an autouse fixture)


def rows(val_loss: list[float], oa: list[float]) -> list[dict[str, float]]:
    out = []
    for i, (loss, acc) in enumerate(zip(val_loss, oa, strict=True), start=1):
        out.append({"epoch": i, "train_loss": loss, "val_loss": loss, "train_loss_db": 0.0, "val_loss_db": 0.0,
                    "oa": acc, "kappa": acc - 0.1, "fscore": acc - 0.2, "precision": acc, "recall": acc,
                    "lr": 0.01, "seconds": 0.1})
    return out


def write_candidates(out: str, histories: list[list[dict[str, float]]]) -> None:
    for hyp, hist in enumerate(histories):
        storage.write_bytes(layout.model_history(out, 1, 0, hyp), history_parquet(hist))
        storage.write_bytes(layout.model_candidate(out, 1, 0, hyp), f"model of hyp {hyp}".encode())


PAIRS = ((64,), (0.1, 0.01, 0.001))


def test_criterion_decides_on_constructed_histories(tmp_path: Path) -> None:
    out = str(tmp_path)
    write_candidates(out, [
        rows([0.9, 0.5, 0.7], [0.60, 0.70, 0.95]),   # hyp 0: best loss 0.5 (epoch 2), best oa 0.95 (epoch 3)
        rows([0.8, 0.4, 0.45], [0.60, 0.80, 0.81]),  # hyp 1: best loss 0.4 (epoch 2), best oa 0.81
        rows([0.6, 0.6, 0.6], [0.90, 0.95, 0.90]),   # hyp 2: loss 0.6 (epoch 1), oa 0.95 (epoch 2): tie
    ])
    by_loss = run(make_cfg(out, pairs=PAIRS, model_selection_criterion="loss"), 1, 0)
    assert by_loss["winner"]["hyp"] == 1 and by_loss["winner"]["value"] == 0.4 and by_loss["winner"]["epoch"] == 2
    assert by_loss["margin_to_runner_up"] == pytest.approx(0.1)
    assert storage.read_bytes(layout.model_selected(out, 1, 0)) == b"model of hyp 1"
    report = json.loads(storage.read_text(layout.selection_report(out, 1, 0)))
    assert report["criterion"] == "loss" and report["direction"] == "min"
    assert [c["value"] for c in report["candidates"]] == [0.5, 0.4, 0.6]
    assert report["winner"]["learning_rate"] == 0.01
    assert run(make_cfg(out, pairs=PAIRS, model_selection_criterion="loss"), 1, 0)["skipped"]

    by_oa = run(make_cfg(out, pairs=PAIRS, model_selection_criterion="oa"), 1, 0)
    assert not by_oa["skipped"]
    assert by_oa["winner"]["hyp"] == 0 and by_oa["winner"]["epoch"] == 3  # tie 0.95 with hyp 2 -> lowest hyp
    assert by_oa["margin_to_runner_up"] == 0.0
    assert storage.read_bytes(layout.model_selected(out, 1, 0)) == b"model of hyp 0"
    by_kappa = run(make_cfg(out, pairs=PAIRS, model_selection_criterion="kappa"), 1, 0)
    assert by_kappa["winner"]["value"] == pytest.approx(0.85)

    # a changed candidate is noticed: the selection is redone
    write_candidates(out, [rows([0.9], [0.1]), rows([0.9], [0.1]), rows([0.9], [0.99])])
    again = run(make_cfg(out, pairs=PAIRS, model_selection_criterion="oa"), 1, 0)
    assert not again["skipped"] and again["winner"]["hyp"] == 2


def test_helpers() -> None:
    nan = float("nan")
    assert candidate_value(rows([nan, 0.3, 0.3], [0.1, 0.2, 0.3]), "loss") == (0.3, 2)
    assert pick({0: nan, 1: 0.2, 2: 0.1}, "fscore") == (1, pytest.approx(0.1))
    assert pick({0: 0.2}, "loss") == (0, None)


def test_missing_candidate_is_named(tmp_path: Path) -> None:
    out = str(tmp_path)
    write_candidates(out, [rows([0.5], [0.5]), rows([0.4], [0.6])])
    with pytest.raises(InputNotFoundError, match=r"candidate hyp 2 \(batch_size 64, learning_rate 0.001\)"):
        run(make_cfg(out, pairs=PAIRS), 1, 0)


def test_two_trained_pairs_then_selection(tmp_path: Path) -> None:
    out = str(tmp_path)
    (tmp_path / layout.LEARNING_SAMPLES).mkdir()
    x, y, p = make_samples({1: 5, 2: 5}, pixels=8)
    write_db(layout.samples_learn(out, 1, 0), x, y, p)
    cfg = make_cfg(out, pairs=((16,), (0.05, 1e-6)), epochs=3, model_selection_criterion="loss")
    summaries = [train(cfg, 1, 0, hyp) for hyp in (0, 1)]
    assert storage.exists(layout.model_candidate(out, 1, 0, 0)) and storage.exists(layout.model_candidate(out, 1, 0, 1))
    result = run(cfg, 1, 0)
    best = min((s["selected_value"], s["hyp"]) for s in summaries)
    assert result["winner"]["hyp"] == best[1] == 0  # lr 1e-6 barely learns
    assert result["winner"]["value"] == pytest.approx(summaries[0]["selected_value"])
    selected = storage.read_bytes(layout.model_selected(out, 1, 0))
    assert selected == storage.read_bytes(layout.model_candidate(out, 1, 0, 0))
    _, desc = nn.load_model(selected)
    assert desc["hyperparameters"]["learning_rate"] == 0.05
    assert storage.exists(layout.manifest(out, "selection", "region_1_seed_0"))
