"""SIGTERM (what Kubernetes sends a pod that is deleted, evicted, preempted or on a node shutting
down) stops a step cleanly with exit 75, and the retried step resumes from what was published.

The signal is sent by the process to itself at a chosen point (a checkpoint write, a prediction),
so the tests do not depend on timing; the real handler of ``sitsflow.cli.main`` turns it into the
exit code.
"""

from __future__ import annotations

import io
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from sitsflow import cli, inference, layout, manifest, nn, process, sampling, selection, storage, training
from sitsflow.config import load_config
from sitsflow.planning import plan_inference, plan_selection, plan_training
from sitsflow.training import stage as training_stage
from synthetic import write_config, write_scene


@pytest.fixture(autouse=True)
def _restore_sigterm() -> Iterator[None]:
    previous = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, previous)
    assert not process._STOP["requested"] and not process._STOP["deferred"]  # nothing left over


@pytest.fixture
def run_cfg(tmp_path: Path) -> tuple[Path, str]:
    folder = tmp_path / "scene"
    folder.mkdir()
    write_scene(folder, width=40, height=30)
    path = write_config(folder, epochs=4, chunks=2)
    return path, str(tmp_path / "out")


def _stage(path: Path, out: str, *words: str) -> list[str]:
    return [*words, "--config", str(path), "--set", f"chain.output_path={out}"]


def _last_json(capsys: pytest.CaptureFixture[str]) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_sigterm_during_training_saves_the_checkpoint_exits_75_and_the_rerun_resumes(
    run_cfg: tuple[Path, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path, out = run_cfg
    cfg = load_config(str(path), [f"chain.output_path={out}"])
    sampling.run(cfg)
    task = plan_training(cfg)[0]
    args = _stage(path, out, "train") + [
        "--region", str(task["region"]), "--seed", str(task["seed"]), "--hyp", str(task["hyp"]),
    ]  # fmt: skip
    checkpoint = layout.model_checkpoint(out, task["region"], task["seed"], task["hyp"])
    real_write = training_stage.storage.write_bytes
    writes: list[str] = []

    def write_bytes(uri: str, data: bytes) -> None:
        if uri == checkpoint:
            writes.append(uri)
            if len(writes) == 2:  # SIGTERM arrives while epoch 2's checkpoint is being written
                os.kill(os.getpid(), signal.SIGTERM)
        real_write(uri, data)

    monkeypatch.setattr(training_stage.storage, "write_bytes", write_bytes)
    assert cli.main(args) == 75
    captured = capsys.readouterr()
    assert "stopped by signal SIGTERM" in captured.err
    assert "failed (exit 75)" in captured.err.strip().splitlines()[-1]
    assert captured.out == ""  # nothing for Argo to read from a stopped step
    # the interrupted write was completed before the stop: epoch 2's checkpoint is whole
    raw = torch.load(io.BytesIO(storage.read_bytes(checkpoint)), weights_only=True)
    assert raw["epoch"] == 2
    monkeypatch.setattr(training_stage.storage, "write_bytes", real_write)
    assert cli.main(args) == 0  # the retried pod
    result = _last_json(capsys)
    assert result["resumed_from_epoch"] == 2


def test_sigterm_during_inference_publishes_nothing_exits_75_and_the_rerun_completes(
    run_cfg: tuple[Path, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path, out = run_cfg
    cfg = load_config(str(path), [f"chain.output_path={out}"])
    sampling.run(cfg)
    for t in plan_training(cfg):
        training.run(cfg, t["region"], t["seed"], t["hyp"])
    for t in plan_selection(cfg):
        selection.run(cfg, t["region"], t["seed"])
    task = plan_inference(cfg)[0]
    args = _stage(path, out, "infer") + [
        "--tile", task["tile"], "--chunk", str(task["chunk"]), "--seed", str(task["seed"]),
    ]  # fmt: skip
    real_classify = nn.Predictor.classify
    calls: list[int] = []

    def classify(self: object, *a: object, **k: object) -> object:
        calls.append(1)
        if len(calls) == 1:  # in the middle of the chunk
            os.kill(os.getpid(), signal.SIGTERM)
        return real_classify(self, *a, **k)

    monkeypatch.setattr(nn.Predictor, "classify", classify)
    task_id = layout.inference_task(task["tile"], task["chunk"], task["seed"])
    assert cli.main(args) == 75
    assert "stopped by signal SIGTERM" in capsys.readouterr().err
    assert manifest.read_manifest(out, inference.STAGE, task_id) is None
    chunk_dir = Path(layout.manifest(out, inference.STAGE, task_id)).parents[2]
    leftovers = [p for p in chunk_dir.rglob("*.tif")]
    assert leftovers == []  # no half chunk under a final name
    monkeypatch.setattr(nn.Predictor, "classify", real_classify)
    assert cli.main(args) == 0
    result = _last_json(capsys)
    assert result["skipped"] is False
    assert manifest.read_manifest(out, inference.STAGE, task_id) is not None
