"""Fan-out by shards (sitsflow.shards): plans stored, shards that partition them, bounded fan-outs.

The scale test plans iota2's national case, 2,000 tiles × 50 chunks × 5 runs (500,000 inference
tasks), with the real planning code (only the tiles' rasters are not read), and shows that what
Argo reads stays within its limits whatever the size of the plan.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from sitsflow import cli, layout, planning
from sitsflow.config.resources import BUILTIN, ResourcesSection
from sitsflow.errors import EXIT_BAD_INPUT
from sitsflow.runner.execute import RESULT_LIMIT
from sitsflow.shards import (
    MAX_SHARDS,
    largest_shard,
    read_shard,
    shard_count,
    shard_range,
    write_plan,
)

REPO = Path(__file__).resolve().parents[1]
YAML_PATH = REPO / "services" / "sitsflow" / "workflows" / "sitsflow.yaml"
EXAMPLE = REPO / "examples" / "slovenia" / "config.cfg"

TILES, CHUNKS, RUNS = 2000, 50, 5  # iota2's "2000×50×5": tiles, chunks per tile, runs (seeds)


def _national_cfg(out: Path) -> SimpleNamespace:
    """What plan_inference and write_plan read of a configuration of 2,000 tiles and 5 runs."""
    return SimpleNamespace(
        chain=SimpleNamespace(tiles=[f"T{t:05d}" for t in range(TILES)], output_path=str(out)),
        arg_train=SimpleNamespace(runs=RUNS),
        resources=ResourcesSection(),
    )


@pytest.fixture(scope="module")
def national(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, list[dict], dict]:
    """The national inference plan, stored; with the plan step's stdout."""
    out = tmp_path_factory.mktemp("national")
    cfg = _national_cfg(out)
    with pytest.MonkeyPatch.context() as mp:  # the chunk grid without reading 2,000 rasters
        mp.setattr(planning, "tile_chunks", lambda cfg, tile: [None] * CHUNKS)
        items = planning.plan_inference(cfg)
    return cfg, items, write_plan(cfg, "inference", items)


def test_national_plan_output_stays_far_below_argo_result_limit(national: Any) -> None:
    cfg, items, summary = national
    assert len(items) == TILES * CHUNKS * RUNS == 500_000
    printed = json.dumps(summary) + "\n"  # what `sitsflow plan inference` prints
    assert len(printed.encode()) < 1024 < RESULT_LIMIT
    assert summary["items"] == 500_000 and summary["shards"] == str(MAX_SHARDS) == "100"
    assert summary["per_shard"] == 5000
    # a shard's deadline: iota2's walltime of one inference task times the tasks of the shard
    assert summary["deadline"] == str(BUILTIN["infer"]["walltime"] * 5000)
    # the list itself lives in storage (~22 MB here), never in Argo
    stored = Path(summary["plan"])
    assert str(stored) == layout.plan(cfg.chain.output_path, "inference")
    assert stored.stat().st_size > 50 * RESULT_LIMIT


def test_national_plan_shards_partition_the_plan(national: Any) -> None:
    cfg, items, _ = national
    ranges = [shard_range(len(items), 100, k) for k in range(100)]
    covered = [i for r in ranges for i in r]
    assert covered == list(range(len(items)))  # union = plan, in order, no overlap
    assert {len(r) for r in ranges} == {5000}
    for k in (0, 1, 57, 99):  # what each shard task reads from the stored plan
        assert read_shard(cfg, "inference", k) == items[k * 5000 : (k + 1) * 5000]
    assert read_shard(cfg, "inference", 99)[-1] == {"tile": "T01999", "chunk": 49, "seed": 4}


@pytest.mark.parametrize("items", [0, 1, 7, 99, 100, 101, 997, 10_001])
@pytest.mark.parametrize("max_shards", [1, 3, 100])
def test_shards_partition_any_plan(items: int, max_shards: int) -> None:
    shards = shard_count(items, max_shards)
    assert 1 <= shards <= max_shards and (items == 0 or shards <= items)
    ranges = [shard_range(items, shards, k) for k in range(shards)]
    assert [i for r in ranges for i in r] == list(range(items))
    sizes = {len(r) for r in ranges}
    assert max(sizes) - min(sizes) <= 1 and max(sizes) == largest_shard(items, shards)
    if items <= max_shards:  # a small plan: one task per shard, as a plain fan-out
        assert sizes <= {1} if items else sizes == {0}


def _worst_case_nodes(doc: dict[str, Any], max_shards: int, retries: int) -> int:
    """Argo's workflow nodes of a run of the rendered DAG: the DAG node; per task a retry node and
    its attempts (``retries`` + 1 at most); per fan-out a group node and that per shard."""
    (dag,) = [t for t in doc["spec"]["templates"] if "dag" in t]
    per_task = 1 + (retries + 1)
    nodes = 1
    for task in dag["dag"]["tasks"]:
        if "withSequence" in task:
            nodes += 1 + max_shards * per_task
        else:
            nodes += per_task
    return nodes


def test_rendered_fan_outs_are_bounded_whatever_the_plan() -> None:
    """Every fan-out of the rendered workflow is a withSequence over its plan's shard count (no
    list passes through Argo), so the workflow's nodes do not grow with the plan: ~600 without
    retries at the default max-shards, for 500,000 inference tasks as for 5."""
    doc = yaml.safe_load(YAML_PATH.read_text())
    (dag,) = [t for t in doc["spec"]["templates"] if "dag" in t]
    fan_outs = {t["name"] for t in dag["dag"]["tasks"] if "withSequence" in t}
    assert fan_outs == {"train", "select", "infer"}
    assert not any("withParam" in t or "withItems" in t for t in dag["dag"]["tasks"])
    params = {p["name"]: p.get("value") for p in doc["spec"]["arguments"]["parameters"]}
    max_shards, retries = int(params["max-shards"]), int(params["retry-limit"])
    assert shard_count(500_000, max_shards) == max_shards == 100
    assert _worst_case_nodes(doc, max_shards, 0) == 616  # every task succeeds at once
    assert _worst_case_nodes(doc, max_shards, retries) == 1534  # every task retried to the end
    # with a smaller bound, fewer nodes: the parameter's effect
    assert _worst_case_nodes(doc, 10, 0) < _worst_case_nodes(doc, max_shards, 0)


# --- the shard commands --------------------------------------------------------------------------


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, Any, str]:
    code = cli.main(list(args))
    captured = capsys.readouterr()
    out = json.loads(captured.out) if code == 0 else None
    return code, out, captured.err


def _example(tmp_path: Path) -> list[str]:
    return ["--config", str(EXAMPLE), "--set", f"chain.output_path={tmp_path}"]


def test_plan_command_stores_the_plan_and_max_shards_bounds_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = _cli(capsys, "plan", "inference", *_example(tmp_path), "--max-shards", "3")
    assert code == 0 and out["items"] == 4 and out["shards"] == "3" and out["per_shard"] == 2
    stored = json.loads((tmp_path / "plans" / "inference.json").read_text())
    assert stored["shards"] == 3 and len(stored["items"]) == 4
    code, out, _ = _cli(capsys, "plan", "inference", *_example(tmp_path))
    assert code == 0 and out["shards"] == "4"  # the default bound: one task per shard here
    code, _, err = _cli(capsys, "plan", "inference", *_example(tmp_path), "--max-shards", "0")
    assert code == EXIT_BAD_INPUT and "--max-shards must be at least 1" in err


def test_a_shard_runs_its_tasks_and_counts_those_already_done(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from sitsflow import inference

    assert _cli(capsys, "plan", "inference", *_example(tmp_path), "--max-shards", "2")[0] == 0
    calls: list[tuple[str, int, int]] = []

    def run(cfg: Any, tile: str, chunk: int, seed: int) -> dict[str, Any]:
        calls.append((tile, chunk, seed))
        return {"skipped": chunk == 2}  # chunk 2's manifest says it is done

    monkeypatch.setattr(inference, "run", run)
    code, out, _ = _cli(capsys, "infer", *_example(tmp_path), "--shard", "1")
    assert code == 0 and calls == [("slovenia", 2, 0), ("slovenia", 3, 0)]
    assert out == {"stage": "infer", "shard": 1, "items": 2, "done": 1, "skipped": 1}
    code, out, _ = _cli(capsys, "infer", *_example(tmp_path), "--shard", "0")
    assert calls[2:] == [("slovenia", 0, 0), ("slovenia", 1, 0)] and out["done"] == 2
    # one task, as before
    code, out, _ = _cli(capsys, "infer", *_example(tmp_path), "--tile", "slovenia", "--chunk", "3", "--seed", "0")
    assert code == 0 and out == {"skipped": False} and calls[-1] == ("slovenia", 3, 0)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--shard", "2"], "--shard 2: the plan has 2 shard(s), numbered 0..1"),
        (["--shard", "0", "--tile", "slovenia"], "do not also give --tile"),
        (["--tile", "slovenia", "--seed", "0"], "give --chunk (one task) or --shard K"),
    ],
)
def test_bad_shard_arguments_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert _cli(capsys, "plan", "inference", *_example(tmp_path), "--max-shards", "2")[0] == 0
    code, _, err = _cli(capsys, "infer", *_example(tmp_path), *args)
    assert code == EXIT_BAD_INPUT and message in err


def test_a_shard_without_its_plan_exits_2_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = _cli(capsys, "train", *_example(tmp_path), "--shard", "0")
    assert code == EXIT_BAD_INPUT
    assert f"no training plan at {tmp_path}/plans/training.json" in err and "sitsflow plan training" in err
    (tmp_path / "plans").mkdir()
    (tmp_path / "plans" / "training.json").write_text('{"stage": "inference", "shards": 1, "items": []}')
    code, _, err = _cli(capsys, "train", *_example(tmp_path), "--shard", "0")
    assert code == EXIT_BAD_INPUT and "is not a sitsflow training plan" in err


def test_run_summaries_count_the_tasks_of_shards_and_single_tasks() -> None:
    from sitsflow.shards import count_tasks

    results = [
        '{"config": "x", "resources": {}}',  # prepare
        '{"plan": "p", "items": 9, "shards": "2", "per_shard": 5, "deadline": "5"}',
        '{"stage": "infer", "shard": 0, "items": 5, "done": 3, "skipped": 2}',
        '{"stage": "infer", "shard": 1, "items": 4, "done": 0, "skipped": 4}',
        '{"skipped": false, "tile": "T"}',
        '{"skipped": true}',
        "not json",
        None,
    ]
    assert count_tasks(results) == (3 + 1, 2 + 4 + 1)
