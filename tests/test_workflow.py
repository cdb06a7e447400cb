"""The pipeline's WorkflowTemplate: the rendered YAML is current, valid and as designed.

``SITSFLOW_REGENERATE=1 pytest tests/test_workflow.py`` rewrites workflows/sitsflow.yaml.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from sitsflow.runner.validate import argo_schema, hera_schema, lint, schema_errors, strict_schema

REPO = Path(__file__).resolve().parents[1]
YAML_PATH = REPO / "workflows" / "sitsflow.yaml"
ARGO_SCHEMA_PATH = Path(__file__).with_name("data") / "argo-workflows-schema.json"


def _load_pipeline() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "sitsflow_pipeline", REPO / "workflows" / "pipeline.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


pipeline = _load_pipeline()


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    return yaml.safe_load(pipeline.render())


@pytest.fixture(scope="module")
def strict_hera() -> dict[str, Any]:
    return hera_schema()


@pytest.fixture(scope="module")
def strict_argo() -> dict[str, Any]:
    return argo_schema(json.loads(ARGO_SCHEMA_PATH.read_text()))


def _template(doc: dict[str, Any], name: str) -> dict[str, Any]:
    return next(t for t in doc["spec"]["templates"] if t["name"] == name)


def _task(doc: dict[str, Any], name: str) -> dict[str, Any]:
    return next(t for t in _template(doc, "pipeline")["dag"]["tasks"] if t["name"] == name)


def test_rendered_yaml_is_current() -> None:
    rendered = pipeline.render()
    if os.environ.get("SITSFLOW_REGENERATE") == "1":
        YAML_PATH.write_text(rendered, encoding="utf-8")
    assert YAML_PATH.exists(), "run: python workflows/pipeline.py"
    assert YAML_PATH.read_text(encoding="utf-8") == rendered, (
        "workflows/sitsflow.yaml is stale: run `python workflows/pipeline.py` "
        "(or SITSFLOW_REGENERATE=1 pytest tests/test_workflow.py)"
    )


def test_main_writes_the_rendered_yaml(tmp_path: Path) -> None:
    out = tmp_path / "wf.yaml"
    assert pipeline.main([str(out)]) == 0
    assert out.read_text() == pipeline.render()


def test_committed_yaml_is_valid(strict_hera: dict[str, Any], strict_argo: dict[str, Any]) -> None:
    committed = yaml.safe_load(YAML_PATH.read_text())
    assert schema_errors(committed, strict_hera) == []
    assert schema_errors(committed, strict_argo) == []
    assert lint(committed) == []


def test_parameters(doc: dict[str, Any]) -> None:
    params = {p["name"]: p for p in doc["spec"]["arguments"]["parameters"]}
    assert list(params) == ["config", "overrides", "image", "s3-endpoint", "s3-secret"]
    assert "value" not in params["config"]  # required
    assert params["overrides"]["value"] == "[]"
    assert params["image"]["value"] == "sitsflow:0.1.0"
    assert params["s3-endpoint"]["value"] == ""
    assert params["s3-secret"]["value"] == "sitsflow-s3"
    assert doc["kind"] == "WorkflowTemplate"
    assert doc["metadata"]["name"] == "sitsflow"
    assert doc["spec"]["entrypoint"] == "pipeline"


EXPECTED_ARGS = {
    "prepare": [
        "prepare",
        "--config",
        "{{workflow.parameters.config}}",
        "--overrides",
        "{{workflow.parameters.overrides}}",
    ],
    "sample": ["sample", "--config", "{{inputs.parameters.config}}"],
    "plan-training": ["plan", "training", "--config", "{{inputs.parameters.config}}"],
    "train": [
        "train",
        "--config",
        "{{inputs.parameters.config}}",
        "--region",
        "{{inputs.parameters.region}}",
        "--seed",
        "{{inputs.parameters.seed}}",
        "--hyp",
        "{{inputs.parameters.hyp}}",
    ],
    "plan-selection": ["plan", "selection", "--config", "{{inputs.parameters.config}}"],
    "select": [
        "select",
        "--config",
        "{{inputs.parameters.config}}",
        "--region",
        "{{inputs.parameters.region}}",
        "--seed",
        "{{inputs.parameters.seed}}",
    ],
    "plan-inference": ["plan", "inference", "--config", "{{inputs.parameters.config}}"],
    "infer": [
        "infer",
        "--config",
        "{{inputs.parameters.config}}",
        "--tile",
        "{{inputs.parameters.tile}}",
        "--chunk",
        "{{inputs.parameters.chunk}}",
        "--seed",
        "{{inputs.parameters.seed}}",
    ],
    "merge": ["merge", "--config", "{{inputs.parameters.config}}"],
}

EXPECTED_DEPENDS = {
    "prepare": None,
    "sample": "prepare",
    "plan-training": "sample",
    "train": "plan-training",
    "plan-selection": "sample",
    "select": "train && plan-selection",
    "plan-inference": "prepare",
    "infer": "select && plan-inference",
    "merge": "infer",
}

EXPECTED_FANOUT = {
    "train": ("plan-training", ["region", "seed", "hyp"]),
    "select": ("plan-selection", ["region", "seed"]),
    "infer": ("plan-inference", ["tile", "chunk", "seed"]),
}


@pytest.mark.parametrize("name", list(EXPECTED_ARGS))
def test_container_templates(doc: dict[str, Any], name: str) -> None:
    container = _template(doc, name)["container"]
    assert container["command"] == ["sitsflow"]
    assert container["args"] == EXPECTED_ARGS[name]
    assert container["image"] == "{{workflow.parameters.image}}"
    env = {var["name"]: var for var in container["env"]}
    assert env["AWS_ENDPOINT_URL"]["value"] == "{{workflow.parameters.s3-endpoint}}"
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[key]["valueFrom"]["secretKeyRef"] == {
            "name": "{{workflow.parameters.s3-secret}}",
            "key": key,
            "optional": True,
        }


@pytest.mark.parametrize("name", list(EXPECTED_DEPENDS))
def test_dag_tasks(doc: dict[str, Any], name: str) -> None:
    task = _task(doc, name)
    assert task["template"] == name
    assert task.get("depends") == EXPECTED_DEPENDS[name]
    args = {p["name"]: p["value"] for p in task.get("arguments", {}).get("parameters", [])}
    if name == "prepare":
        assert args == {}
        return
    assert args["config"] == "{{tasks.prepare.outputs.result}}"
    if name in EXPECTED_FANOUT:
        plan, keys = EXPECTED_FANOUT[name]
        assert task["withParam"] == f"{{{{tasks.{plan}.outputs.result}}}}"
        assert args == {"config": args["config"], **{k: f"{{{{item.{k}}}}}" for k in keys}}
    else:
        assert "withParam" not in task and list(args) == ["config"]


def test_render_ignores_hera_global_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing process-wide leaks into the template (image, namespace, service account)."""
    from hera.shared import global_config

    expected = pipeline.render()
    monkeypatch.setattr(global_config, "image", "elsewhere:9")
    monkeypatch.setattr(global_config, "namespace", "someone-elses")
    monkeypatch.setattr(global_config, "service_account_name", "root-sa")
    assert pipeline.render() == expected


# --- planted errors ------------------------------------------------------------------------


def _set(path: list[Any], value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(d: dict[str, Any]) -> None:
        node: Any = d
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return mutate


def _task_mutation(name: str, key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(d: dict[str, Any]) -> None:
        _task(d, name)[key] = value

    return mutate


def _misspelt_key(d: dict[str, Any]) -> None:
    _task(d, "train")["withParams"] = _task(d, "train").pop("withParam")


def _misspelt_container_key(d: dict[str, Any]) -> None:
    container = _template(d, "merge")["container"]
    container["agrs"] = container.pop("args")


def _undeclared_input(d: dict[str, Any]) -> None:
    _template(d, "merge")["container"]["args"].append("{{inputs.parameters.tile}}")


def _undeclared_workflow_param(d: dict[str, Any]) -> None:
    _template(d, "merge")["container"]["args"].append("{{workflow.parameters.bucket}}")


def _item_outside_loop(d: dict[str, Any]) -> None:
    _task(d, "merge")["arguments"]["parameters"][0]["value"] = "{{item.region}}"


def _item_in_container(d: dict[str, Any]) -> None:
    _template(d, "sample")["container"]["args"].append("{{item}}")


def _missing_required_argument(d: dict[str, Any]) -> None:
    del _task(d, "train")["arguments"]["parameters"][1]  # region


def _undeclared_argument(d: dict[str, Any]) -> None:
    _task(d, "merge")["arguments"]["parameters"].append({"name": "tile", "value": "x"})


def _entrypoint_missing(d: dict[str, Any]) -> None:
    d["spec"]["entrypoint"] = "pipelines"


def _unknown_variable_root(d: dict[str, Any]) -> None:
    _template(d, "merge")["container"]["args"][2] = "{{input.parameters.config}}"


LINT_ERRORS = {
    "unknown template": (
        _task_mutation("merge", "template", "merged"),
        "template 'merged' does not exist",
    ),
    "depends on unknown task": (
        _task_mutation("merge", "depends", "infer && inference"),
        "depends on 'inference'",
    ),
    "dependencies unknown task": (
        _task_mutation("prepare", "dependencies", ["nothing"]),
        "depends on 'nothing'",
    ),
    "cycle": (_task_mutation("sample", "depends", "prepare && merge"), "dependency cycle"),
    "undeclared input parameter": (_undeclared_input, "{{inputs.parameters.tile}} is not declared"),
    "undeclared workflow parameter": (
        _undeclared_workflow_param,
        "{{workflow.parameters.bucket}} is not declared",
    ),
    "withParam from a task not depended on": (
        _task_mutation("select", "withParam", "{{tasks.plan-inference.outputs.result}}"),
        "refers to task 'plan-inference', which it does not depend on",
    ),
    "item outside a loop": (_item_outside_loop, "{{item.region}} is only valid in a DAG task with"),
    "item in a container": (_item_in_container, "{{item}} is only valid"),
    "missing required argument": (
        _missing_required_argument,
        "input parameter 'region' of template 'train' is not passed",
    ),
    "undeclared argument": (_undeclared_argument, "passes parameter 'tile'"),
    "entrypoint missing": (
        _entrypoint_missing,
        "spec.entrypoint: template 'pipelines' does not exist",
    ),
    "unknown variable": (_unknown_variable_root, "unknown variable {{input.parameters.config}}"),
    "task reference not depended on": (
        _task_mutation(
            "plan-inference",
            "arguments",
            {"parameters": [{"name": "config", "value": "{{tasks.sample.outputs.result}}"}]},
        ),
        "refers to task 'sample', which it does not depend on",
    ),
    "depends syntax": (_task_mutation("merge", "depends", "infer &&"), "expected a task name"),
    "depends suffix": (
        _task_mutation("merge", "depends", "infer.Finished"),
        "unknown result infer.Finished",
    ),
    "withParam not a reference": (
        _task_mutation("train", "withParam", "[1, 2]"),
        "must be one reference",
    ),
}


@pytest.mark.parametrize("case", list(LINT_ERRORS))
def test_lint_catches_planted_error(doc: dict[str, Any], case: str) -> None:
    mutate, expected = LINT_ERRORS[case]
    broken = copy.deepcopy(doc)
    mutate(broken)
    problems = lint(broken)
    assert any(expected in p for p in problems), problems


SCHEMA_ERRORS = {
    "misspelt task key": (_misspelt_key, "'withParams' was unexpected"),
    "misspelt container key": (_misspelt_container_key, "'agrs' was unexpected"),
    "wrong type": (_set(["spec", "entrypoint"], ["pipeline"]), "is not of type 'string'"),
}


@pytest.mark.parametrize("case", list(SCHEMA_ERRORS))
@pytest.mark.parametrize("schema_name", ["hera", "argo"])
def test_schema_catches_planted_error(
    doc: dict[str, Any],
    strict_hera: dict[str, Any],
    strict_argo: dict[str, Any],
    case: str,
    schema_name: str,
) -> None:
    mutate, expected = SCHEMA_ERRORS[case]
    broken = copy.deepcopy(doc)
    mutate(broken)
    schema = strict_hera if schema_name == "hera" else strict_argo
    errors = schema_errors(broken, schema)
    assert any(expected in e for e in errors), errors


def test_official_schema_alone_lets_misspelt_keys_through(doc: dict[str, Any]) -> None:
    """Why strict_schema exists: as shipped, Argo's schema accepts unknown keys."""
    broken = copy.deepcopy(doc)
    _misspelt_key(broken)
    official = json.loads(ARGO_SCHEMA_PATH.read_text())
    assert schema_errors(broken, official) == []
    assert schema_errors(broken, strict_schema(official)) != []


def test_argo_schema_relaxes_int_or_string(doc: dict[str, Any]) -> None:
    """Kubernetes int-or-string and quantity fields accept YAML numbers."""
    with_numbers = copy.deepcopy(doc)
    template = _template(with_numbers, "train")
    template["retryStrategy"] = {"limit": 3}  # IntOrString
    template["container"]["resources"] = {"limits": {"nvidia.com/gpu": 1, "memory": "8Gi"}}
    official = json.loads(ARGO_SCHEMA_PATH.read_text())
    as_shipped = schema_errors(with_numbers, strict_schema(official))
    assert any("retryStrategy.limit" in e for e in as_shipped), as_shipped
    assert any("nvidia.com/gpu" in e for e in as_shipped), as_shipped
    assert schema_errors(with_numbers, argo_schema(official)) == []
    template["retryStrategy"] = {"limit": [3]}
    assert any(
        "retryStrategy.limit" in e for e in schema_errors(with_numbers, argo_schema(official))
    )


def test_strict_schema_marks_every_object_with_properties() -> None:
    schema = {
        "$defs": {
            "A": {"type": "object", "properties": {"x": {"$ref": "#/$defs/B"}}},
            "B": {
                "type": "object",
                "properties": {"y": {"type": "string"}},
                "additionalProperties": True,
            },
            "C": {
                "type": "object",
                "properties": {"z": {"type": "object", "properties": {"w": {}}}},
            },
            "D": {"type": "object", "properties": {}, "x-kubernetes-preserve-unknown-fields": True},
        },
        "$ref": "#/$defs/A",
    }
    strict = strict_schema(schema)
    assert "additionalProperties" not in schema["$defs"]["A"]  # the input is not modified
    assert strict["$defs"]["A"]["additionalProperties"] is False
    assert strict["$defs"]["B"]["additionalProperties"] is True
    assert strict["$defs"]["C"]["properties"]["z"]["additionalProperties"] is False
    assert "additionalProperties" not in strict["$defs"]["D"]
    assert schema_errors({"x": {"y": "1", "q": 2}}, strict) == []
    assert any("'q' was unexpected" in e for e in schema_errors({"x": {"y": "1"}, "q": 1}, strict))
