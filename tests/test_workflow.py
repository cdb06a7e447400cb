"""The pipeline's WorkflowTemplate: the rendered YAML is current, valid and as designed.

``SITSFLOW_REGENERATE=1 pytest tests/test_workflow.py`` rewrites services/sitsflow/workflows/sitsflow.yaml.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from argo_checks import argo_schema, evaluate_text, hera_schema, lint, schema_errors, strict_schema

from sitsflow.config.resources import BUILTIN as STAGE_RESOURCES
from sitsflow.config.resources import GPU_STAGES as GPU
from sitsflow.shards import MAX_SHARDS

REPO = Path(__file__).resolve().parents[1]
YAML_PATH = REPO / "services" / "sitsflow" / "workflows" / "sitsflow.yaml"
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
        pipeline.main([])
    assert YAML_PATH.exists(), "run: python workflows/pipeline.py"
    assert YAML_PATH.read_text(encoding="utf-8") == rendered, (
        f"{YAML_PATH.relative_to(REPO)} is stale: run `python workflows/pipeline.py` "
        "(or SITSFLOW_REGENERATE=1 pytest tests/test_workflow.py)"
    )
    assert pipeline.CHART_COPY.read_text(encoding="utf-8") == rendered, (
        "charts/sitsflow/files/sitsflow.yaml is stale: run `python workflows/pipeline.py`"
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
    assert list(params) == [
        "config", "output-path", "overrides", "image", "gpu-image", "s3-endpoint", "s3-secret",
        "gpu-node-selector", "gpu-tolerations", "cpu-node-selector", "cpu-tolerations",
        "pool-label", "max-shards", "retry-limit", "retry-backoff", "retry-backoff-cap",
    ]  # fmt: skip
    assert params["max-shards"]["value"] == str(MAX_SHARDS) == "100"
    assert json.loads(params["gpu-tolerations"]["value"]) == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    assert params["gpu-node-selector"]["value"] == params["cpu-node-selector"]["value"] == "{}"
    assert params["retry-limit"]["value"] == "3" and params["retry-backoff"]["value"] == "30s"
    assert params["retry-backoff-cap"]["value"] == "10m"
    assert params["output-path"]["value"] == ""  # empty: the .cfg's; runs without one queue
    assert doc["spec"]["synchronization"] == {
        "mutexes": [{"name": "sitsflow-{{=sprig.sha256sum(workflow.parameters['output-path'])}}"}]
    }
    assert doc["spec"]["activeDeadlineSeconds"] == 7 * 86400
    assert doc["spec"]["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert doc["spec"]["parallelism"] == 20
    assert doc["spec"]["podGC"] == {"strategy": "OnPodSuccess"}
    assert doc["spec"]["securityContext"]["runAsNonRoot"] is True
    assert "value" not in params["config"]  # required
    assert params["overrides"]["value"] == "[]"
    assert params["image"]["value"] == "sitsflow:0.1.0"
    assert params["gpu-image"]["value"] == "sitsflow:0.1.0-gpu"
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
        "--output-path",
        "{{workflow.parameters.output-path}}",
        "--pool-label",
        "{{workflow.parameters.pool-label}}",
        "--gpu-node-selector",
        "{{workflow.parameters.gpu-node-selector}}",
        "--cpu-node-selector",
        "{{workflow.parameters.cpu-node-selector}}",
        "--gpu-tolerations",
        "{{workflow.parameters.gpu-tolerations}}",
        "--cpu-tolerations",
        "{{workflow.parameters.cpu-tolerations}}",
    ],
    "sample": ["sample", "--config", "{{inputs.parameters.config}}"],
    "plan-training": [
        "plan", "training", "--config", "{{inputs.parameters.config}}",
        "--max-shards", "{{workflow.parameters.max-shards}}",
    ],  # fmt: skip
    "train": [
        "train",
        "--config",
        "{{inputs.parameters.config}}",
        "--shard",
        "{{inputs.parameters.shard}}",
    ],
    "plan-selection": [
        "plan", "selection", "--config", "{{inputs.parameters.config}}",
        "--max-shards", "{{workflow.parameters.max-shards}}",
    ],  # fmt: skip
    "select": [
        "select",
        "--config",
        "{{inputs.parameters.config}}",
        "--shard",
        "{{inputs.parameters.shard}}",
    ],
    "plan-inference": [
        "plan", "inference", "--config", "{{inputs.parameters.config}}",
        "--max-shards", "{{workflow.parameters.max-shards}}",
    ],  # fmt: skip
    "infer": [
        "infer",
        "--config",
        "{{inputs.parameters.config}}",
        "--shard",
        "{{inputs.parameters.shard}}",
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

#: Each fan-out runs the shards of the plan step before it (withSequence over 0 .. shards-1).
EXPECTED_FANOUT = {"train": "plan-training", "select": "plan-selection", "infer": "plan-inference"}


RESTRICTED_CONTAINER = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "runAsNonRoot": True,
    "seccompProfile": {"type": "RuntimeDefault"},
}


@pytest.mark.parametrize("name", list(EXPECTED_ARGS))
def test_container_templates(doc: dict[str, Any], name: str) -> None:
    container = _template(doc, name)["container"]
    assert container["command"] == ["sitsflow"]
    assert container["args"] == EXPECTED_ARGS[name]
    image = "gpu-image" if name in GPU else "image"
    assert container["image"] == f"{{{{workflow.parameters.{image}}}}}"
    assert container["securityContext"] == RESTRICTED_CONTAINER
    env = {var["name"]: var for var in container["env"]}
    if name in GPU:  # the GPUs the pod was given: a GPU it cannot use is an error (device.py)
        assert env["SITSFLOW_GPUS"] == {"name": "SITSFLOW_GPUS", "value": "{{inputs.parameters.gpu}}"}
    else:
        assert "SITSFLOW_GPUS" not in env
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
    assert args.pop("config") == "{{=jsonpath(tasks.prepare.outputs.result, '$.config')}}"
    stage = name if name in STAGE_RESOURCES else None
    if stage is not None:
        keys = ["cpu", "memory", "deadline", "node-selector", "tolerations"]
        keys += ["gpu"] if stage in GPU else []
        for key in keys:
            field = "node_selector" if key == "node-selector" else key
            # a shard's deadline is its plan step's (the walltime of one task times its tasks)
            source = "tasks.prepare.outputs.result"
            if key == "deadline" and name in EXPECTED_FANOUT:
                source, field = f"tasks['{EXPECTED_FANOUT[name]}'].outputs.result", "deadline"
            else:
                field = f"resources.{stage}.{field}"
            assert args.pop(key) == f"{{{{=jsonpath({source}, '$.{field}')}}}}"
    assert "withParam" not in task and "withItems" not in task  # no list passes through Argo
    if name in EXPECTED_FANOUT:
        plan = EXPECTED_FANOUT[name]
        assert task["withSequence"] == {
            "count": f"{{{{=jsonpath(tasks['{plan}'].outputs.result, '$.shards')}}}}"
        }
        assert args == {"shard": "{{item}}"}
    else:
        assert "withSequence" not in task and args == {}


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
    _task(d, "train")["withSequences"] = _task(d, "train").pop("withSequence")


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
    parameters = _task(d, "train")["arguments"]["parameters"]
    parameters[:] = [p for p in parameters if p["name"] != "shard"]


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
    "withSequence from a task not depended on": (
        _task_mutation(
            "select",
            "withSequence",
            {"count": "{{=jsonpath(tasks['plan-inference'].outputs.result, '$.shards')}}"},
        ),
        "refers to task 'plan-inference', which it does not depend on",
    ),
    "withSequence with count and end": (
        _task_mutation("infer", "withSequence", {"count": "2", "end": "3"}),
        "give exactly one of count and end",
    ),
    "withSequence count not an integer": (
        _task_mutation("infer", "withSequence", {"count": "many"}),
        "'many' is neither an integer nor",
    ),
    "item outside a loop": (_item_outside_loop, "{{item.region}} is only valid in a DAG task with"),
    "item in a container": (_item_in_container, "{{item}} is only valid"),
    "missing required argument": (
        _missing_required_argument,
        "input parameter 'shard' of template 'train' is not passed",
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
    "misspelt task key": (_misspelt_key, "'withSequences' was unexpected"),
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
    assert not any("withSequences" in e for e in schema_errors(broken, official))
    assert any("withSequences" in e for e in schema_errors(broken, strict_schema(official)))


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


# --- scheduling, retries, robustness -----------------------------------------------------------


@pytest.mark.parametrize("name", list(STAGE_RESOURCES))
def test_stage_scheduling(doc: dict[str, Any], name: str) -> None:
    """GPU stages request nvidia.com/gpu with /dev/shm; every stage applies prepare's settings."""
    template = _template(doc, name)
    builtin = STAGE_RESOURCES[name]
    resources = template["container"]["resources"]
    assert resources["requests"]["cpu"] == str(builtin["nb_cpu"])
    assert resources["requests"]["memory"] == resources["limits"]["memory"] == builtin["ram"]
    assert template["activeDeadlineSeconds"] == "{{inputs.parameters.deadline}}"
    patch = json.loads(
        template["podSpecPatch"].replace("{{inputs.parameters.node-selector}}", '{"n": "1"}')
        .replace("{{inputs.parameters.tolerations}}", "[1]")
    )
    main = patch["containers"][0]
    assert main["name"] == "main"
    assert main["resources"]["requests"]["cpu"] == "{{inputs.parameters.cpu}}"
    assert main["resources"]["limits"]["memory"] == "{{inputs.parameters.memory}}"
    assert patch["nodeSelector"] == {"n": "1"}
    assert patch["tolerations"] == [1]  # prepare's: GPU ones for a pod with GPUs, else CPU ones
    if name in GPU:
        assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == "1"
        assert main["resources"]["limits"]["nvidia.com/gpu"] == "{{inputs.parameters.gpu}}"
        assert template["volumes"] == [{"name": "dshm", "emptyDir": {"medium": "Memory"}}]
        assert template["container"]["volumeMounts"] == [{"name": "dshm", "mountPath": "/dev/shm"}]
    else:
        assert "nvidia.com/gpu" not in json.dumps(template)
        assert "volumes" not in template


def test_small_steps_run_on_cpu_nodes(doc: dict[str, Any]) -> None:
    for name in ("prepare", "plan-training", "plan-selection", "plan-inference"):
        template = _template(doc, name)
        assert template["podSpecPatch"] == (
            '{"nodeSelector": {{workflow.parameters.cpu-node-selector}}, '
            '"tolerations": {{workflow.parameters.cpu-tolerations}}}'
        )
        assert "nvidia.com/gpu" not in json.dumps(template)


def _retry(doc: dict[str, Any], name: str = "train") -> dict[str, Any]:
    return _template(doc, name)["retryStrategy"]


def test_every_container_retries_with_backoff_and_the_dag_does_not(doc: dict[str, Any]) -> None:
    for template in doc["spec"]["templates"]:
        if "container" in template:
            assert template["retryStrategy"] == _retry(doc)
            assert template["container"]["terminationMessagePolicy"] == "FallbackToLogsOnError"
        else:
            assert "retryStrategy" not in template
    strategy = _retry(doc)
    assert strategy["limit"] == "{{workflow.parameters.retry-limit}}"
    assert strategy["retryPolicy"] == "Always"
    # a count and a capped backoff bound the retries; no maxDuration, which Argo counts from the
    # first attempt's start and would also cut a long step's retried deadline
    assert strategy["backoff"] == {
        "duration": "{{workflow.parameters.retry-backoff}}", "factor": 2,
        "cap": "{{workflow.parameters.retry-backoff-cap}}",
    }  # fmt: skip


#: What Argo's controller hands the retry expression (``buildRetryStrategyLocalScope``, expanded
#: into nested maps by ``env.GetFuncMap``): every value a string; exitCode "-1" when the pod left
#: none; the message is the node's (a Failed pod's own status message when it has one, else
#: "<reason> (exit code N)"; "pod deleted" for a pod that vanished).
KUBELET_EVICTION = (
    "The node was low on resource: memory. Threshold quantity: 100Mi, available: 81404Ki. "
    "Container main was using 15Gi, request is 16Gi, has larger consumption of memory."
)
RETRY_CASES = [
    # (exitCode, status, message, retried)
    ("75", "Failed", "main: Error (exit code 75)", True),  # storage trouble or SIGTERM
    ("2", "Failed", "main: Error (exit code 2)", False),  # bad input: never
    ("1", "Failed", "main: Error (exit code 1)", False),  # a bug: retrying will not fix it
    ("137", "Failed", "main: OOMKilled (exit code 137)", False),  # same memory, same end
    ("-1", "Error", "pod deleted", True),  # deleted, preempted by the scheduler, node lost
    ("2", "Error", "pod deleted", False),  # a configuration error is never retried
    ("137", "Failed", KUBELET_EVICTION, True),  # kubelet eviction: Failed, no "evicted" in it
    ("75", "Failed", KUBELET_EVICTION, True),  # ... after sitsflow's clean stop on SIGTERM
    ("-1", "Failed", "Pod was terminated in response to imminent node shutdown.", True),
    ("143", "Error", "Pod was terminated in response to imminent node shutdown.", True),
    ("-1", "Failed", "Preempted in order to admit critical pod", True),
    ("-1", "Failed", "The node had condition: [DiskPressure]. Evicted", True),
    # the kubelet's SIGTERM at the deadline makes sitsflow exit 75: still never retried
    ("75", "Failed", "Pod was active on the node longer than the specified deadline", False),
    ("-1", "Failed", "Pod was active on the node longer than the specified deadline", False),
    ("-1", "Failed", "Step exceeded its deadline", False),
    ("-1", "Error", "Pod failed before main container starts due to ErrImagePull: x", False),
]


@pytest.fixture(scope="module")
def expr_lang() -> Any:
    """Argo's expression language itself: github.com/expr-lang/expr (v1.17, as in Argo 3.7-4.x),
    compiled into the enchanter-golem wheel; Argo compiles and runs the retry expression with
    ``expr.Compile(input, expr.Env(env))`` on exactly such a map."""
    golem = pytest.importorskip("golem")
    return golem.Engine(strict_vars=False)


@pytest.mark.parametrize(("code", "status", "message", "retried"), RETRY_CASES)
def test_retry_expression_truth_table(
    doc: dict[str, Any], expr_lang: Any, code: str, status: str, message: str, retried: bool
) -> None:
    env = {"lastRetry": {"exitCode": code, "status": status, "message": message, "duration": "5"}}
    assert expr_lang.eval(_retry(doc)["expression"], env) is retried


def test_expr_lang_evaluator_is_real(expr_lang: Any) -> None:
    """The evaluator parses and fails as Go's expr does (no stand-in that accepts anything)."""
    import golem

    with pytest.raises(golem.CompileError, match="unexpected token"):
        expr_lang.eval("lastRetry.exitCode == ", {"lastRetry": {}})
    env = {"lastRetry": {"message": "Pod Deleted"}}
    assert expr_lang.eval("lastRetry.message matches '(?i)pod deleted'", env) is True
    assert expr_lang.eval("lastRetry.message matches 'pod deleted'", env) is False


# --- planted errors in the new fields ------------------------------------------------------


def _set_template(name: str, key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(d: dict[str, Any]) -> None:
        _template(d, name)[key] = value

    return mutate


def _set_argument(task: str, param: str, value: str) -> Callable[[dict[str, Any]], None]:
    def mutate(d: dict[str, Any]) -> None:
        for entry in _task(d, task)["arguments"]["parameters"]:
            if entry["name"] == param:
                entry["value"] = value

    return mutate


def _retry_field(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(d: dict[str, Any]) -> None:
        _template(d, "train")["retryStrategy"] = {**_retry(d), key: value}

    return mutate


NEW_LINT_ERRORS = {
    "expression does not parse": (
        _set_argument("merge", "config", "{{=jsonpath(tasks.prepare.outputs.result, '$.config'}}"),
        "does not parse",
    ),
    "expression reads a task not depended on": (
        _set_argument("sample", "config", "{{=jsonpath(tasks.merge.outputs.result, '$.config')}}"),
        "refers to task 'merge', which it does not depend on",
    ),
    "expression reads an undeclared workflow parameter": (
        _set_argument("sample", "cpu", "{{=workflow.parameters.cpus}}"),
        "{{workflow.parameters.cpus}} is not declared",
    ),
    "expression reads an undeclared input": (
        _set_template("train", "activeDeadlineSeconds", "{{=inputs.parameters.walltime}}"),
        "{{inputs.parameters.walltime}} is not declared in the inputs of template 'train'",
    ),
    "podSpecPatch not JSON": (
        _set_template("train", "podSpecPatch", '{"nodeSelector": {{inputs.parameters.node-selector}}'),
        "podSpecPatch: not JSON",
    ),
    "podSpecPatch patches another container": (
        _set_template("train", "podSpecPatch", '{"containers": [{"name": "train"}]}'),
        "Argo names a template's container 'main'",
    ),
    "deadline not a number": (
        _set_template("merge", "activeDeadlineSeconds", "12h"),
        "activeDeadlineSeconds: '12h' is neither",
    ),
    "retry policy": (_retry_field("retryPolicy", "Sometimes"), "retryPolicy: 'Sometimes'"),
    "retry limit": (_retry_field("limit", "three"), "limit: 'three' is not a whole number"),
    "retry backoff duration": (
        _retry_field("backoff", {"duration": "30 seconds"}),
        "backoff.duration: '30 seconds' is not a duration",
    ),
    "retry expression syntax": (
        _retry_field("expression", "lastRetry.exitCode == "),
        "expression does not parse",
    ),
    "retry expression reads other variables": (
        _retry_field("expression", "inputs.parameters.region == '1'"),
        "reads 'inputs'; a retry expression sees lastRetry",
    ),
}


@pytest.mark.parametrize("case", list(NEW_LINT_ERRORS))
def test_lint_catches_planted_error_in_new_fields(doc: dict[str, Any], case: str) -> None:
    mutate, expected = NEW_LINT_ERRORS[case]
    broken = copy.deepcopy(doc)
    mutate(broken)
    problems = lint(broken)
    assert any(expected in p for p in problems), problems


NEW_SCHEMA_ERRORS = {
    "misspelt retry key": (_retry_field("limt", "3"), "'limt' was unexpected"),
    "misspelt pod GC key": (
        _set(["spec", "podGC"], {"stratgy": "OnPodSuccess"}),
        "'stratgy' was unexpected",
    ),
    "misspelt volume key": (
        _set_template("train", "volumes", [{"name": "dshm", "emptyDir": {"medum": "Memory"}}]),
        "'medum' was unexpected",
    ),
    "parallelism not an integer": (_set(["spec", "parallelism"], "many"), "is not of type"),
}


@pytest.mark.parametrize("case", list(NEW_SCHEMA_ERRORS))
@pytest.mark.parametrize("schema_name", ["hera", "argo"])
def test_schema_catches_planted_error_in_new_fields(
    doc: dict[str, Any],
    strict_hera: dict[str, Any],
    strict_argo: dict[str, Any],
    case: str,
    schema_name: str,
) -> None:
    mutate, expected = NEW_SCHEMA_ERRORS[case]
    broken = copy.deepcopy(doc)
    mutate(broken)
    schema = strict_hera if schema_name == "hera" else strict_argo
    errors = schema_errors(broken, schema)
    assert any(expected in e for e in errors), errors


# --- iota2 resource blocks: from the .cfg to prepare's JSON ----------------------------------

RESOURCE_CFG = """
chain : {
  output_path : 'out'
  list_tile : 'T1'
  ground_truth : 'gt.gpkg'
  data_field : 'code'
}
dated_raster : {
  path : 'T1.tif'
  bands : ['ndvi']
}
arg_train : { deep_learning_parameters : { dl_name : 'MLPClassifier' } }
resources : {
  default : { nb_cpu : 3
              ram : "8gb" }
  train : {
              name:"training"
              nb_cpu:10
              ram:"92gb"
              walltime:"12:00:00"
              nb_gpu:1 # number of GPUs to use
              queue:"qgpgpu" # queue containing GPUs
            }
}
"""


def test_resource_blocks_are_read_and_mapped(tmp_path: Path) -> None:
    from sitsflow.config import load_config
    from sitsflow.config.resources import stage_pods

    path = tmp_path / "run.cfg"
    path.write_text(RESOURCE_CFG)
    cfg = load_config(str(path))
    assert cfg.resources.train is not None and cfg.resources.train.ram == "92Gi"
    assert cfg.resources.train.walltime == 43200
    again = tmp_path / "resolved.cfg"
    again.write_text(cfg.to_cfg())
    assert load_config(str(again)).resources == cfg.resources  # the resolved file keeps them
    pods = stage_pods(
        cfg.resources, pool_label="cloud.google.com/gke-nodepool",
        gpu_node_selector='{"cloud.google.com/gke-accelerator": "nvidia-l4"}',
        cpu_node_selector='{"pool": "cpu"}', gpu_tolerations='[{"key": "gpu"}]',
        cpu_tolerations='[{"key": "cpu"}]',
    )  # fmt: skip
    assert pods["train"] == {
        "cpu": "10", "memory": "92Gi", "gpu": "1", "deadline": "43200",
        "node_selector": json.dumps(
            {"cloud.google.com/gke-accelerator": "nvidia-l4",
             "cloud.google.com/gke-nodepool": "qgpgpu"}, sort_keys=True, separators=(",", ":"),
        ),
        "tolerations": '[{"key":"gpu"}]',
    }  # fmt: skip
    assert pods["sample"] == {
        "cpu": "3", "memory": "8Gi", "gpu": "0", "deadline": "86400",
        "node_selector": '{"pool":"cpu"}', "tolerations": '[{"key":"cpu"}]',
    }  # fmt: skip
    assert pods["infer"]["gpu"] == "1" and pods["infer"]["cpu"] == "3"
    with pytest.raises(ValueError, match="gpu-tolerations: expected a JSON list"):
        stage_pods(cfg.resources, pool_label="pool", gpu_tolerations='{"key": "gpu"}')
    with pytest.raises(ValueError, match="pool-label is empty"):
        stage_pods(cfg.resources)
    with pytest.raises(ValueError, match="gpu-node-selector: expected a JSON object"):
        stage_pods(cfg.resources, pool_label="pool", gpu_node_selector='["a"]')
    with pytest.raises(ValueError, match="not a Kubernetes label key"):
        stage_pods(cfg.resources, pool_label="bad key!")


def test_nb_gpu_0_makes_a_cpu_pod(tmp_path: Path) -> None:
    """train/infer with nb_gpu 0: no GPU request, the CPU node selector and tolerations."""
    from sitsflow.config import load_config
    from sitsflow.config.resources import stage_pods

    path = tmp_path / "run.cfg"
    path.write_text(RESOURCE_CFG)
    cfg = load_config(str(path), ["resources.infer={nb_gpu : 0}"])
    pods = stage_pods(
        cfg.resources, pool_label="pool", gpu_node_selector='{"accelerator": "l4"}',
        cpu_node_selector='{"pool": "cpu"}', gpu_tolerations='[{"key": "gpu"}]',
    )  # fmt: skip
    assert pods["infer"]["gpu"] == "0"
    assert pods["infer"]["node_selector"] == '{"pool":"cpu"}'
    assert pods["infer"]["tolerations"] == "[]"
    assert pods["train"]["gpu"] == "1" and pods["train"]["tolerations"] == '[{"key":"gpu"}]'


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("resources.sample.nb_gpu=1", "resources.sample.nb_gpu: expected 0 (sample runs on CPU"),
        ("resources.train.nb_gpu=2", "multi-GPU training and inference are not implemented"),
        ("resources.default.nb_gpu=4", "resources.default.nb_gpu: expected None or 0 or 1"),
        ("resources.train.ram=lots", "resources.train.ram: expected a memory size"),
        ("resources.train.walltime='1:99:00'", "minutes and seconds must be below 60"),
        ("resources.train.nb_cpu=0", "resources.train.nb_cpu: expected None or an integer >= 1"),
        ("resources.train.queue='gpu pool'", "resources.train.queue: expected None or a node pool name"),
        ("resources.train.cpus=2", "unknown key 'resources.train.cpus' (from --set); did you mean"),
        ("resources.iota2_chain={}", "the whole chain is an Argo workflow"),
        ("resources.training={nb_cpu : 2}", "the train stage is given both as resources.train and as iota2's training"),
    ],
)
def test_bad_resource_blocks_are_refused(tmp_path: Path, override: str, message: str) -> None:
    from sitsflow.config import load_config
    from sitsflow.errors import ConfigError

    path = tmp_path / "run.cfg"
    path.write_text(RESOURCE_CFG)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(str(path), [override])


def test_prepare_prints_config_and_pod_settings(tmp_path: Path) -> None:
    """The CLI contract the WorkflowTemplate reads: one JSON object on stdout."""
    import subprocess

    cfg = REPO / "examples" / "slovenia" / "config.cfg"
    out = subprocess.run(
        [sys.executable, "-m", "sitsflow", "prepare", "--config", str(cfg),
         "--overrides", json.dumps([f"chain.output_path={tmp_path / 'run'}"]),
         "--gpu-node-selector", '{"accelerator": "nvidia"}'],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    prepared = json.loads(out.stdout)
    assert prepared["config"] == str(tmp_path / "run" / "config" / "resolved.cfg")
    assert Path(prepared["config"]).exists()
    assert prepared["resources"]["train"]["node_selector"] == '{"accelerator":"nvidia"}'
    assert prepared["resources"]["merge"]["node_selector"] == "{}"
    bad = subprocess.run(
        [sys.executable, "-m", "sitsflow", "prepare", "--config", str(cfg),
         "--overrides", json.dumps([f"chain.output_path={tmp_path / 'run'}"]),
         "--cpu-node-selector", "{nope"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert bad.returncode == 2 and "cpu-node-selector" in bad.stderr
    assert "sitsflow prepare failed (exit 2)" in bad.stderr.strip().splitlines()[-1]


# --- the run's mutex ----------------------------------------------------------------------------


def _decode_lock_key(key: str) -> tuple[str, str, str]:
    """Argo's ``DecodeLockName`` (workflow/sync/lock_name.go) of a mutex key
    ``<namespace>/Mutex/<name>``: the versions with lock selectors first cut the key at its first
    ``?`` (what follows is read as selectors), then every version splits it in 3 at ``/``."""
    namespace, kind, name = key.split("?")[0].split("/", 2)
    return namespace, kind, name


@pytest.mark.parametrize(
    "output_path",
    [
        "s3://bucket/runs/2024?version=2",  # '?' starts Argo's selectors
        "s3://bucket/a&b=c/run",
        "/data/runs/été 2024",
        "",  # the .cfg's output path: every such run shares one mutex
    ],
)
def test_run_mutex_name_is_a_hash_argo_decodes_back(doc: dict[str, Any], output_path: str) -> None:
    """The mutex is named from a hash of the output path, never the path itself: Argo cuts a lock
    key at '?' when it decodes it, so a raw path would not decode to the lock it encoded (the
    controller panics on that mismatch, lock_name.go validateEncoding)."""
    import hashlib

    (mutex,) = doc["spec"]["synchronization"]["mutexes"]
    (tag,) = re.findall(r"\{\{=(.*?)\}\}", mutex["name"])
    env = {"workflow": {"parameters": {"output-path": output_path}}}
    name = mutex["name"].replace(f"{{{{={tag}}}}}", evaluate_text(tag, env))
    assert name == "sitsflow-" + hashlib.sha256(output_path.encode()).hexdigest()
    assert re.fullmatch(r"sitsflow-[0-9a-f]{64}", name)
    key = f"ns/Mutex/{name}"
    assert _decode_lock_key(key) == ("ns", "Mutex", name)
    # the raw path would not have survived that decoding
    if "?" in output_path:
        assert _decode_lock_key(f"ns/Mutex/sitsflow-{output_path}")[2] != f"sitsflow-{output_path}"


def test_run_mutex_differs_per_output_path(doc: dict[str, Any]) -> None:
    (mutex,) = doc["spec"]["synchronization"]["mutexes"]
    (tag,) = re.findall(r"\{\{=(.*?)\}\}", mutex["name"])

    def name(path: str) -> str:
        return evaluate_text(tag, {"workflow": {"parameters": {"output-path": path}}})

    assert name("s3://b/run1") == name("s3://b/run1") != name("s3://b/run2")
