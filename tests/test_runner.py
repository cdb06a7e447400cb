"""The local runner executes rendered Argo YAML: small hand-written templates run `python -c`."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from sitsflow.errors import BadInputError, SitsflowError
from sitsflow.runner import (
    WorkflowFailed,
    container_argv,
    dag_order,
    default_workflow_path,
    lint,
    load_workflow,
    run_workflow,
)
from sitsflow.runner.document import direct_dependencies, templates_by_name
from sitsflow.runner.expressions import evaluate, parse_depends, substitute

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable

# Appends its first argument to the file given as second argument, prints the first.
APPEND = "import sys; open(sys.argv[2], 'a').write(sys.argv[1] + '\\n'); print(sys.argv[1])"


def container(
    name: str,
    code: str,
    args: list[str] | None = None,
    inputs: list[dict[str, Any]] | None = None,
    env: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A container template running ``python -c code args...``."""
    template: dict[str, Any] = {
        "name": name,
        "container": {"image": "unused", "command": [PY, "-c", code], "args": args or []},
    }
    if inputs:
        template["inputs"] = {"parameters": inputs}
    if env:
        template["container"]["env"] = env
    return template


def workflow(
    tmp_path: Path,
    tasks: list[dict[str, Any]],
    templates: list[dict[str, Any]],
    parameters: list[dict[str, Any]] | None = None,
    name: str = "wf.yaml",
    **spec_extra: Any,
) -> Path:
    """Write a WorkflowTemplate whose entrypoint DAG ``main`` has ``tasks``."""
    doc = {
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "WorkflowTemplate",
        "metadata": {"name": "demo"},
        "spec": {
            "entrypoint": "main",
            "arguments": {"parameters": parameters or []},
            "templates": [*templates, {"name": "main", "dag": {"tasks": tasks}}],
            **spec_extra,
        },
    }
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def append_template() -> dict[str, Any]:
    """Template ``append``: appends input ``text`` to input ``out`` and prints it."""
    return container(
        "append",
        APPEND,
        ["{{inputs.parameters.text}}", "{{inputs.parameters.out}}"],
        inputs=[{"name": "text"}, {"name": "out"}],
    )


def append_task(name: str, text: str | None = None, **extra: Any) -> dict[str, Any]:
    params = [
        {"name": "text", "value": text or name},
        {"name": "out", "value": "{{workflow.parameters.out}}"},
    ]
    return {"name": name, "template": "append", "arguments": {"parameters": params}, **extra}


OUT_PARAM = [{"name": "out"}]


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


# --- ordering and dependencies -------------------------------------------------------------


def test_depends_orders_tasks(tmp_path: Path) -> None:
    out = tmp_path / "order.txt"
    tasks = [
        append_task("e", depends="(b || c) && d.Succeeded"),
        append_task("d", dependencies=["b", "c"]),
        append_task("c", depends="a"),
        append_task("b", depends="a"),
        append_task("a"),
    ]
    path = workflow(tmp_path, tasks, [append_template()], OUT_PARAM)
    summary = run_workflow(path, {"out": str(out)}, log_dir=tmp_path / "logs")
    order = lines(out)
    assert sorted(order) == ["a", "b", "c", "d", "e"]
    assert order[0] == "a" and order[3:] == ["d", "e"]
    assert {t["status"] for t in summary["tasks"].values()} == {"Succeeded"}
    assert summary["tasks"]["d"]["results"] == ["d"]
    assert summary["duration_s"] >= 0
    assert dag_order(load_workflow(path)) == ["a", "c", "b", "d", "e"]


def test_false_depends_omits_task_and_its_dependents(tmp_path: Path) -> None:
    out = tmp_path / "order.txt"
    tasks = [
        append_task("a"),
        append_task("never", depends="!a"),
        append_task("after-never", depends="never"),
        append_task("either", depends="a || never.Succeeded"),
    ]
    path = workflow(tmp_path, tasks, [append_template()], OUT_PARAM)
    summary = run_workflow(path, {"out": str(out)})
    assert lines(out) == ["a", "either"]
    assert summary["tasks"]["never"]["status"] == "Omitted"
    assert summary["tasks"]["after-never"]["status"] == "Omitted"
    assert summary["tasks"]["either"]["status"] == "Succeeded"


def test_depends_expressions() -> None:
    states = {"a": "Succeeded", "b": "Skipped", "c": "Omitted"}

    def result(task: str, suffix: str) -> bool:
        return states[task] == suffix

    assert evaluate(parse_depends("a && b"), result)  # bare: Succeeded or Skipped
    assert not evaluate(parse_depends("a && c"), result)
    assert evaluate(parse_depends("(c || a.Succeeded) && !b.Succeeded"), result)
    assert evaluate(parse_depends("c.Omitted"), result)
    for bad in ("a &&", "(a", "a b", "a.Done", "&& a", ""):
        with pytest.raises(BadInputError):
            parse_depends(bad)


# --- parameters ------------------------------------------------------------------------------


def test_parameter_substitution(tmp_path: Path) -> None:
    echo = container(
        "echo",
        "import json, sys; print(json.dumps(sys.argv[1:]))",
        [
            "{{inputs.parameters.a}}",
            "{{ inputs.parameters.b }}",
            "{{workflow.parameters.greeting}}",
            "{{workflow.name}}",
        ],
        inputs=[{"name": "a"}, {"name": "b", "default": "b-default"}],
    )
    tasks = [
        {
            "name": "first",
            "template": "echo",
            "arguments": {"parameters": [{"name": "a", "value": "x"}]},
        },
        {
            "name": "second",
            "template": "echo",
            "depends": "first",
            "arguments": {
                "parameters": [
                    {"name": "a", "value": "[{{tasks.first.outputs.result}}]"},
                    {"name": "b", "value": "{{workflow.parameters.greeting}}!"},
                ]
            },
        },
    ]
    params = [{"name": "greeting", "value": "hello"}]
    path = workflow(tmp_path, tasks, [echo], params)

    first = json.loads(run_workflow(path, {})["tasks"]["first"]["results"][0])
    text, b, greeting, name = first
    assert (text, b, greeting) == ("x", "b-default", "hello")
    assert name.startswith("demo-") and len(name) == len("demo-") + 5

    tasks_out = run_workflow(path, {"greeting": "salut"})["tasks"]
    first_out = tasks_out["first"]["results"][0]
    assert json.loads(first_out)[:3] == ["x", "b-default", "salut"]
    second = json.loads(tasks_out["second"]["results"][0])
    assert second == [f"[{first_out}]", "salut!", "salut", json.loads(first_out)[3]]


def test_parameters_are_checked(tmp_path: Path) -> None:
    out = tmp_path / "never.txt"
    params = [{"name": "out"}, {"name": "mode", "value": "a", "enum": ["a", "b"]}]
    path = workflow(tmp_path, [append_task("a")], [append_template()], params)
    with pytest.raises(BadInputError, match="'out' is required"):
        run_workflow(path, {})
    with pytest.raises(
        BadInputError, match="unknown workflow parameter.*colour.*declared: out, mode"
    ):
        run_workflow(path, {"out": str(out), "colour": "red"})
    with pytest.raises(BadInputError, match="'mode' is 'c'; allowed: a, b"):
        run_workflow(path, {"out": str(out), "mode": "c"})
    with pytest.raises(BadInputError, match="must be a string"):
        run_workflow(path, {"out": 3})  # type: ignore[dict-item]
    with pytest.raises(BadInputError, match="workers must be at least 1"):
        run_workflow(path, {"out": str(out)}, workers=0)
    assert not out.exists()


# --- fan-out ---------------------------------------------------------------------------------


def test_with_param_fans_out_over_a_printed_json_list(tmp_path: Path) -> None:
    plan = container(
        "plan",
        "import json, sys; print(json.dumps(json.loads(sys.argv[1])))",
        ["{{inputs.parameters.items}}"],
        inputs=[{"name": "items"}],
    )
    show = container(
        "show",
        "import sys, json; print(json.dumps(sys.argv[1:]))",
        ["{{inputs.parameters.x}}"],
        inputs=[{"name": "x"}],
    )
    gather = container(
        "gather",
        "import sys; print(sys.argv[1])",
        ["{{inputs.parameters.all}}"],
        inputs=[{"name": "all"}],
    )

    def plan_task(name: str, items: Any) -> dict[str, Any]:
        return {
            "name": name,
            "template": "plan",
            "arguments": {"parameters": [{"name": "items", "value": json.dumps(items)}]},
        }

    tasks = [
        plan_task("plan-maps", [{"region": 1, "seed": 0}, {"region": 2, "seed": 1}]),
        plan_task("plan-scalars", ["T31TCJ", 7, True]),
        plan_task("plan-empty", []),
        {
            "name": "maps",
            "template": "show",
            "depends": "plan-maps",
            "withParam": "{{tasks.plan-maps.outputs.result}}",
            "arguments": {
                "parameters": [{"name": "x", "value": "r{{item.region}}-s{{item.seed}} {{item}}"}]
            },
        },
        {
            "name": "scalars",
            "template": "show",
            "depends": "plan-scalars",
            "withParam": "{{tasks.plan-scalars.outputs.result}}",
            "arguments": {"parameters": [{"name": "x", "value": "{{item}}"}]},
        },
        {
            "name": "empty",
            "template": "show",
            "depends": "plan-empty",
            "withParam": "{{tasks.plan-empty.outputs.result}}",
            "arguments": {"parameters": [{"name": "x", "value": "{{item}}"}]},
        },
        {
            "name": "after-empty",
            "template": "gather",
            "depends": "empty",
            "arguments": {"parameters": [{"name": "all", "value": "ran"}]},
        },
        {
            "name": "gather",
            "template": "gather",
            "depends": "scalars",
            "arguments": {
                "parameters": [{"name": "all", "value": "{{tasks.scalars.outputs.result}}"}]
            },
        },
    ]
    path = workflow(tmp_path, tasks, [plan, show, gather])
    summary = run_workflow(path, {}, workers=2, log_dir=tmp_path / "logs")["tasks"]

    assert [json.loads(r) for r in summary["maps"]["results"]] == [
        ['r1-s0 {"region":1,"seed":0}'],
        ['r2-s1 {"region":2,"seed":1}'],
    ]
    assert [json.loads(r) for r in summary["scalars"]["results"]] == [["T31TCJ"], ["7"], ["true"]]
    # The fan-out's result, as Argo gathers it: a JSON list of each item's stdout.
    assert json.loads(summary["gather"]["results"][0]) == summary["scalars"]["results"]
    assert summary["empty"] == {"status": "Skipped", "results": [], "retries": 0, "pods": []}
    assert summary["after-empty"]["results"] == ["ran"]
    # one stderr log per item
    assert (tmp_path / "logs" / "maps-0.log").exists() and (
        tmp_path / "logs" / "maps-1.log"
    ).exists()


def test_with_items(tmp_path: Path) -> None:
    out = tmp_path / "items.txt"
    tasks = [
        append_task(
            "maps",
            "{{item.name}}={{item.size}}",
            withItems=[{"name": "a", "size": 1}, {"name": "b", "size": 2}],
        ),
        append_task(
            "scalars",
            "{{item}}",
            depends="maps",
            withItems=["x", 3, "{{workflow.parameters.extra}}"],
        ),
    ]
    params = [{"name": "out"}, {"name": "extra", "value": "from-param"}]
    path = workflow(tmp_path, tasks, [append_template()], params)
    summary = run_workflow(path, {"out": str(out)})
    assert lines(out) == ["a=1", "b=2", "x", "3", "from-param"]
    assert summary["tasks"]["scalars"]["results"] == ["x", "3", "from-param"]


def test_workers_run_tasks_concurrently(tmp_path: Path) -> None:
    """Two tasks that each wait for the other to have started: only possible side by side."""
    barrier = (
        "import pathlib, sys, time\n"
        "d = pathlib.Path(sys.argv[1]); me, other = sys.argv[2], sys.argv[3]\n"
        "(d / me).write_text('started')\n"
        "deadline = time.monotonic() + float(sys.argv[4])\n"
        "while not (d / other).exists():\n"
        "    if time.monotonic() > deadline: sys.exit(3)\n"
        "    time.sleep(0.01)\n"
        "print(me)\n"
    )
    wait = container(
        "wait",
        barrier,
        [
            "{{workflow.parameters.dir}}",
            "{{inputs.parameters.me}}",
            "{{inputs.parameters.other}}",
            "{{workflow.parameters.timeout}}",
        ],
        inputs=[{"name": "me"}, {"name": "other"}],
    )

    def task(me: str, other: str) -> dict[str, Any]:
        params = [{"name": "me", "value": me}, {"name": "other", "value": other}]
        return {"name": me, "template": "wait", "arguments": {"parameters": params}}

    params = [{"name": "dir"}, {"name": "timeout", "value": "20"}]
    path = workflow(tmp_path, [task("left", "right"), task("right", "left")], [wait], params)
    run_dir = tmp_path / "two"
    run_dir.mkdir()
    summary = run_workflow(path, {"dir": str(run_dir)}, workers=2)
    assert summary["tasks"]["left"]["results"] == ["left"]
    assert summary["tasks"]["right"]["results"] == ["right"]

    one_dir = tmp_path / "one"
    one_dir.mkdir()
    with pytest.raises(WorkflowFailed, match="task left failed with exit code 3"):
        run_workflow(path, {"dir": str(one_dir), "timeout": "0.5"}, workers=1)
    assert not (one_dir / "right").exists()  # with one worker, right never started


# --- failure ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("code", "exit_code"), [(2, 2), (75, 75), (3, 1)])
def test_failure_stops_the_dag(tmp_path: Path, code: int, exit_code: int) -> None:
    """bad fails while slow runs: slow finishes, nothing new starts, the error names bad."""
    marks = tmp_path / "marks"
    marks.mkdir()
    bad = container(
        "bad",
        "import pathlib, sys; sys.stderr.write('first line\\nboom: disk on fire\\n');"
        "pathlib.Path(sys.argv[1], 'bad').write_text('x'); sys.exit(int(sys.argv[2]))",
        ["{{workflow.parameters.marks}}", "{{workflow.parameters.code}}"],
    )
    slow = container(
        "slow",
        "import pathlib, sys, time\n"
        "d = pathlib.Path(sys.argv[1])\n"
        "while not (d / 'bad').exists(): time.sleep(0.01)\n"
        "time.sleep(0.2); (d / sys.argv[2]).write_text('done')",
        ["{{workflow.parameters.marks}}", "{{inputs.parameters.name}}"],
        inputs=[{"name": "name"}],
    )

    def slow_task(name: str, **extra: Any) -> dict[str, Any]:
        return {
            "name": name,
            "template": "slow",
            "arguments": {"parameters": [{"name": "name", "value": name}]},
            **extra,
        }

    tasks = [
        slow_task("slow"),
        {"name": "bad", "template": "bad"},
        slow_task("after-slow", depends="slow"),
        slow_task("after-bad", depends="bad.Failed || bad"),
    ]
    params = [{"name": "marks"}, {"name": "code"}]
    path = workflow(tmp_path, tasks, [bad, slow], params)
    with pytest.raises(WorkflowFailed) as info:
        run_workflow(
            path, {"marks": str(marks), "code": str(code)}, workers=2, log_dir=tmp_path / "logs"
        )
    error = info.value
    assert isinstance(error, SitsflowError)
    assert error.exit_code == exit_code and error.returncode == code and error.task == "bad"
    assert f"task bad failed with exit code {code}" in str(error)
    assert "boom: disk on fire" in str(error)  # the stderr tail
    assert error.log_path == tmp_path / "logs" / "bad.log"
    assert "boom: disk on fire" in error.log_path.read_text()
    assert (marks / "slow").read_text() == "done"  # the running task finished
    assert not (marks / "after-slow").exists()  # no new task started
    assert not (marks / "after-bad").exists()
    assert error.summary["slow"]["status"] == "Succeeded"
    assert error.summary["after-slow"]["status"] == "Pending"


def test_failed_item_is_named(tmp_path: Path) -> None:
    fail_on = container(
        "fail-on",
        "import sys; sys.exit(75 if sys.argv[1] == '2' else 0)",
        ["{{inputs.parameters.region}}"],
        inputs=[{"name": "region"}],
    )
    tasks = [
        {
            "name": "train",
            "template": "fail-on",
            "withItems": [{"region": 1, "seed": 0}, {"region": 2, "seed": 0}],
            "arguments": {"parameters": [{"name": "region", "value": "{{item.region}}"}]},
        },
    ]
    path = workflow(tmp_path, tasks, [fail_on])
    with pytest.raises(
        WorkflowFailed, match=r"task train\(1:region:2,seed:0\) failed with exit code 75"
    ) as info:
        run_workflow(path, {})
    assert info.value.exit_code == 75


def test_command_that_cannot_start(tmp_path: Path) -> None:
    missing = {"name": "missing", "container": {"image": "x", "command": [str(tmp_path / "nope")]}}
    path = workflow(tmp_path, [{"name": "m", "template": "missing"}], [missing])
    with pytest.raises(WorkflowFailed, match="task m failed: could not start") as info:
        run_workflow(path, {})
    assert info.value.exit_code == 1


def test_bad_with_param_output_fails_the_task(tmp_path: Path) -> None:
    plan = container("plan", "print('not json')")
    show = container("show", "print(1)", ["{{inputs.parameters.x}}"], inputs=[{"name": "x"}])
    tasks = [
        {"name": "plan", "template": "plan"},
        {
            "name": "fan",
            "template": "show",
            "depends": "plan",
            "withParam": "{{tasks.plan.outputs.result}}",
            "arguments": {"parameters": [{"name": "x", "value": "{{item}}"}]},
        },
    ]
    path = workflow(tmp_path, tasks, [plan, show])
    with pytest.raises(WorkflowFailed, match="task 'fan': withParam is not JSON"):
        run_workflow(path, {})


# --- environment, commands -------------------------------------------------------------------


def test_env_values(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SITSFLOW_TEST_INHERITED", "local-value")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "local-key")
    monkeypatch.setenv("SITSFLOW_TEST_SET", "overridden-locally")
    show_env = container(
        "show-env",
        "import json, os; print(json.dumps({k: os.environ.get(k) for k in ("
        "'SITSFLOW_TEST_SET', 'SITSFLOW_TEST_INHERITED', 'AWS_ACCESS_KEY_ID', "
        "'SITSFLOW_TEST_UNSET')}))",
        inputs=[{"name": "v"}],
        env=[
            {
                "name": "SITSFLOW_TEST_SET",
                "value": "{{inputs.parameters.v}}-{{workflow.parameters.p}}",
            },
            {"name": "SITSFLOW_TEST_INHERITED", "value": "{{workflow.parameters.empty}}"},
            {
                "name": "AWS_ACCESS_KEY_ID",
                "valueFrom": {
                    "secretKeyRef": {"name": "s3", "key": "AWS_ACCESS_KEY_ID", "optional": True}
                },
            },
        ],
    )
    tasks = [
        {
            "name": "env",
            "template": "show-env",
            "arguments": {"parameters": [{"name": "v", "value": "given"}]},
        }
    ]
    params = [{"name": "p", "value": "param"}, {"name": "empty", "value": ""}]
    path = workflow(tmp_path, tasks, [show_env], params)
    result = json.loads(run_workflow(path, {})["tasks"]["env"]["results"][0])
    assert result == {
        "SITSFLOW_TEST_SET": "given-param",
        "SITSFLOW_TEST_INHERITED": "local-value",  # empty value: the local environment's
        "AWS_ACCESS_KEY_ID": "local-key",  # secret refs are skipped locally
        "SITSFLOW_TEST_UNSET": None,
    }
    result = json.loads(run_workflow(path, {"empty": "explicit"})["tasks"]["env"]["results"][0])
    assert result["SITSFLOW_TEST_INHERITED"] == "explicit"


def test_template_defaults_apply_to_container_templates(tmp_path: Path) -> None:
    code = "import os; print(os.environ.get('SITSFLOW_TEST_DEFAULT'))"
    own_env = [{"name": "SITSFLOW_TEST_DEFAULT", "value": "own"}]
    templates = [container("plain", code), container("own", code, env=own_env)]
    tasks = [{"name": "plain", "template": "plain"}, {"name": "own", "template": "own"}]
    defaults = {"container": {"env": [{"name": "SITSFLOW_TEST_DEFAULT", "value": "default"}]}}
    path = workflow(tmp_path, tasks, templates, templateDefaults=defaults)
    summary = run_workflow(path, {})["tasks"]
    assert summary["plain"]["results"] == ["default"]
    assert summary["own"]["results"] == ["own"]


def test_single_container_entrypoint_takes_workflow_parameters(tmp_path: Path) -> None:
    echo = container(
        "echo", "import sys; print(sys.argv[1])", ["{{inputs.parameters.word}}"],
        inputs=[{"name": "word"}],
    )  # fmt: skip
    path = workflow(tmp_path, [], [echo], [{"name": "word", "value": "bonjour"}])
    doc = yaml.safe_load(path.read_text())
    doc["spec"]["entrypoint"] = "echo"
    path.write_text(yaml.safe_dump(doc))
    assert run_workflow(path, {})["tasks"]["echo"]["results"] == ["bonjour"]
    assert run_workflow(path, {"word": "salut"})["tasks"]["echo"]["results"] == ["salut"]


def test_sitsflow_command_runs_with_this_interpreter() -> None:
    assert container_argv(["sitsflow"], ["plan", "training"]) == [
        sys.executable,
        "-m",
        "sitsflow",
        "plan",
        "training",
    ]
    assert container_argv(["/bin/echo", "-n"], ["x"]) == ["/bin/echo", "-n", "x"]


def test_stdout_trailing_whitespace_is_stripped(tmp_path: Path) -> None:
    out = container("out", "import sys; sys.stdout.write('  value \\n\\n\\t')")
    path = workflow(tmp_path, [{"name": "o", "template": "out"}], [out])
    assert run_workflow(path, {})["tasks"]["o"]["results"] == ["  value"]


def test_editing_the_yaml_changes_what_runs(tmp_path: Path) -> None:
    out = tmp_path / "out.txt"
    path = workflow(tmp_path, [append_task("a", "first version")], [append_template()], OUT_PARAM)
    assert run_workflow(path, {"out": str(out)})["tasks"]["a"]["results"] == ["first version"]
    path.write_text(path.read_text().replace("first version", "second version"))
    assert run_workflow(path, {"out": str(out)})["tasks"]["a"]["results"] == ["second version"]
    assert lines(out) == ["first version", "second version"]


def test_progress_display(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out.txt"
    tasks = [append_task("alpha"), append_task("beta", depends="alpha")]
    path = workflow(tmp_path, tasks, [append_template()], OUT_PARAM)
    run_workflow(path, {"out": str(out)}, progress=True)
    captured = capsys.readouterr()
    assert "alpha" in captured.err and "beta" in captured.err and "1/1" in captured.err
    assert captured.out == ""  # stdout stays free for the orchestrator's JSON


# --- refusals --------------------------------------------------------------------------------


def test_broken_document_is_refused_before_running(tmp_path: Path) -> None:
    out = tmp_path / "out.txt"
    tasks = [append_task("a"), append_task("b", depends="a && ghost")]
    path = workflow(tmp_path, tasks, [append_template()], OUT_PARAM)
    with pytest.raises(BadInputError, match="depends on 'ghost'"):
        run_workflow(path, {"out": str(out)})
    assert not out.exists()


def test_unsupported_features_are_refused(tmp_path: Path) -> None:
    out = tmp_path / "out.txt"
    path = workflow(tmp_path, [append_task("a", when="1 == 1")], [append_template()], OUT_PARAM)
    with pytest.raises(BadInputError, match="task 'a' uses when"):
        run_workflow(path, {"out": str(out)})
    assert not out.exists()


def test_not_a_workflow(tmp_path: Path) -> None:
    path = tmp_path / "cm.yaml"
    path.write_text("kind: ConfigMap\nmetadata: {name: x}\n")
    with pytest.raises(BadInputError, match="'ConfigMap'; expected one of Workflow"):
        run_workflow(path, {})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_workflow(tmp_path / "missing.yaml", {})


def test_substitute_names_unresolved_variable() -> None:
    with pytest.raises(
        BadInputError, match=r"task x: \{\{inputs.parameters.b\}\} cannot be resolved"
    ):
        substitute("{{inputs.parameters.b}}", {"inputs.parameters.a": "1"}, "task x")
    assert substitute("{{a}}{{ b }}", {"a": "{{b}}", "b": "2"}, "here") == "{{b}}2"  # one pass


# --- the real pipeline -----------------------------------------------------------------------


def test_default_workflow_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("SITSFLOW_WORKFLOW", raising=False)
    assert default_workflow_path() == REPO / "workflows" / "sitsflow.yaml"
    assert default_workflow_path().exists()
    monkeypatch.setenv("SITSFLOW_WORKFLOW", str(tmp_path / "other.yaml"))
    assert default_workflow_path() == tmp_path / "other.yaml"


def test_real_workflow_lints_and_is_ordered_as_designed() -> None:
    doc = load_workflow(REPO / "workflows" / "sitsflow.yaml")
    assert lint(doc) == []
    order = dag_order(doc)
    assert order == [
        "prepare",
        "sample",
        "plan-training",
        "train",
        "plan-selection",
        "select",
        "plan-inference",
        "infer",
        "merge",
    ]
    deps = direct_dependencies(templates_by_name(doc)["pipeline"]["dag"]["tasks"])
    assert deps == {
        "prepare": set(),
        "sample": {"prepare"},
        "plan-training": {"sample"},
        "train": {"plan-training"},
        "plan-selection": {"sample"},
        "select": {"train", "plan-selection"},
        "plan-inference": {"prepare"},
        "infer": {"select", "plan-inference"},
        "merge": {"infer"},
    }


#: The WorkflowTemplate's default tolerations of pods with GPUs (parameter gpu-tolerations).
GPU_TOLERATIONS = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


def fake_prepared(**blocks: Any) -> dict[str, Any]:
    """What `sitsflow prepare` prints for a configuration with these resource blocks."""
    from sitsflow.config.resources import ResourcesSection, stage_pods

    resources = ResourcesSection.model_validate(blocks)
    pods = stage_pods(resources, pool_label="pool", gpu_node_selector='{"gpu": "yes"}',
                      gpu_tolerations=json.dumps(GPU_TOLERATIONS))
    return {"config": "/runs/resolved.cfg", "resources": pods}


FAKE_SITSFLOW = """
import json, os, sys
args = sys.argv[1:]
with open(os.environ["FAKE_CALLS"], "a") as calls:
    calls.write(json.dumps({"args": args, "endpoint": os.environ.get("AWS_ENDPOINT_URL")}) + "\\n")
stage = " ".join(args[:2]) if args[0] == "plan" else args[0]
outputs = {
    "prepare": os.environ["FAKE_PREPARED"],
    "plan training": json.dumps([{"region": 1, "seed": 0, "hyp": 0},
                                 {"region": 2, "seed": 0, "hyp": 1}]),
    "plan selection": json.dumps([{"region": 1, "seed": 0}, {"region": 2, "seed": 0}]),
    "plan inference": json.dumps([{"tile": "T31TCJ", "chunk": 0, "seed": 0},
                                  {"tile": "T31TCJ", "chunk": 1, "seed": 0}]),
}
print(outputs.get(stage, json.dumps({"stage": stage})))
"""


def test_real_workflow_wiring_with_a_fake_sitsflow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The committed YAML, each `sitsflow` container replaced by a fake that records its call."""
    fake = tmp_path / "fake_sitsflow.py"
    fake.write_text(FAKE_SITSFLOW)
    calls = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_CALLS", str(calls))
    monkeypatch.setenv("FAKE_PREPARED", json.dumps(fake_prepared()))
    doc = load_workflow(REPO / "workflows" / "sitsflow.yaml")
    for template in doc["spec"]["templates"]:
        if "container" in template:
            assert template["container"]["command"] == ["sitsflow"]
            template["container"]["command"] = [PY, str(fake)]
    path = tmp_path / "sitsflow.yaml"
    path.write_text(yaml.safe_dump(doc))

    params = {
        "config": "/data/run.cfg",
        "overrides": '["chain.seed=3"]',
        "s3-endpoint": "http://s3:9000",
    }
    summary = run_workflow(path, params, workers=2)
    recorded = [json.loads(line) for line in lines(calls)]
    argv = [" ".join(c["args"]) for c in recorded]
    assert argv[0] == (
        'prepare --config /data/run.cfg --overrides ["chain.seed=3"] --output-path  --pool-label '
        " --gpu-node-selector {} --cpu-node-selector {} --gpu-tolerations "
        + json.dumps(GPU_TOLERATIONS) + " --cpu-tolerations []"
    )
    assert argv[-1] == "merge --config /runs/resolved.cfg"
    assert {c["endpoint"] for c in recorded} == {"http://s3:9000"}
    expected = {
        "sample --config /runs/resolved.cfg",
        "plan training --config /runs/resolved.cfg",
        "train --config /runs/resolved.cfg --region 1 --seed 0 --hyp 0",
        "train --config /runs/resolved.cfg --region 2 --seed 0 --hyp 1",
        "plan selection --config /runs/resolved.cfg",
        "select --config /runs/resolved.cfg --region 1 --seed 0",
        "select --config /runs/resolved.cfg --region 2 --seed 0",
        "plan inference --config /runs/resolved.cfg",
        "infer --config /runs/resolved.cfg --tile T31TCJ --chunk 0 --seed 0",
        "infer --config /runs/resolved.cfg --tile T31TCJ --chunk 1 --seed 0",
    }
    assert set(argv[1:-1]) == expected and len(argv) == len(expected) + 2
    position = {a.split(" --region")[0].split(" --tile")[0] + str(i): i for i, a in enumerate(argv)}
    last_train = max(i for a, i in position.items() if a.startswith("train"))
    first_select = min(i for a, i in position.items() if a.startswith("select"))
    last_select = max(i for a, i in position.items() if a.startswith("select"))
    first_infer = min(i for a, i in position.items() if a.startswith("infer"))
    assert last_train < first_select and last_select < first_infer
    assert summary["tasks"]["train"]["status"] == "Succeeded"
    assert len(summary["tasks"]["infer"]["results"]) == 2
    assert os.environ.get("AWS_ENDPOINT_URL") != "http://s3:9000"  # the runner's env is untouched
    # prepare's per-stage settings reach the pods: GPU stages on GPU nodes, the rest on CPU nodes
    train_pod = summary["tasks"]["train"]["pods"][0]
    assert train_pod["resources"]["requests"] == {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "1"}
    assert train_pod["resources"]["limits"] == {"memory": "16Gi", "nvidia.com/gpu": "1"}
    assert train_pod["nodeSelector"] == {"gpu": "yes"}
    assert train_pod["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    assert train_pod["activeDeadlineSeconds"] == 86400 and train_pod["volumes"] == ["dshm"]
    sample_pod = summary["tasks"]["sample"]["pods"][0]
    assert sample_pod["resources"]["requests"] == {"cpu": "2", "memory": "8Gi"}
    assert sample_pod["nodeSelector"] == {} and sample_pod["tolerations"] == []
    assert summary["tasks"]["prepare"]["pods"][0]["resources"]["requests"]["cpu"] == "500m"


# --- retries, deadlines, parallelism, pod settings (what the local runner honours) -----------

# Fails with the exit code of its first argument until it has run as often as the second says,
# counting its runs in the file given third; then prints the number of runs.
FLAKY = (
    "import pathlib, sys\n"
    "code, succeed_at, counter = int(sys.argv[1]), int(sys.argv[2]), pathlib.Path(sys.argv[3])\n"
    "runs = int(counter.read_text()) + 1 if counter.exists() else 1\n"
    "counter.write_text(str(runs))\n"
    "print(runs)\n"
    "sys.exit(0 if runs >= succeed_at else code)\n"
)

#: The rule of the real pipeline: exit 75 or a pod lost to the cluster, never exit 2.
TRANSIENT_RULE = (
    "lastRetry.exitCode != '2' && (lastRetry.exitCode == '75' || (lastRetry.status == 'Error' "
    "&& lastRetry.message matches '(?i)(pod deleted|node shutdown)'))"
)


def flaky_workflow(tmp_path: Path, strategy: dict[str, Any] | None, **spec: Any) -> Path:
    template = container(
        "flaky",
        FLAKY,
        [
            "{{workflow.parameters.code}}",
            "{{workflow.parameters.succeed-at}}",
            "{{workflow.parameters.counter}}",
        ],
    )
    if strategy is not None:
        template["retryStrategy"] = strategy
    params = [
        {"name": "code", "value": "75"},
        {"name": "succeed-at", "value": "3"},
        {"name": "counter"},
        {"name": "limit", "value": "5"},
    ]
    return workflow(tmp_path, [{"name": "flaky", "template": "flaky"}], [template], params, **spec)


RETRY = {
    "limit": "{{workflow.parameters.limit}}",
    "retryPolicy": "Always",
    "expression": TRANSIENT_RULE,
    "backoff": {"duration": "1s", "factor": 2, "maxDuration": "1m"},
}


def test_transient_failure_is_retried_until_it_succeeds(tmp_path: Path) -> None:
    path = flaky_workflow(tmp_path, RETRY)
    counter = tmp_path / "runs"
    summary = run_workflow(
        path, {"counter": str(counter)}, backoff_scale=0.01, log_dir=tmp_path / "logs"
    )
    assert summary["tasks"]["flaky"] == {
        "status": "Succeeded", "results": ["3"], "retries": 2, "pods": summary["tasks"]["flaky"]["pods"],
    }  # fmt: skip
    assert counter.read_text() == "3"
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == [
        "flaky.log", "flaky.retry1.log", "flaky.retry2.log",
    ]  # fmt: skip


def test_retry_limit_is_honoured(tmp_path: Path) -> None:
    path = flaky_workflow(tmp_path, RETRY)
    counter = tmp_path / "runs"
    with pytest.raises(WorkflowFailed, match="exit code 75") as info:
        run_workflow(path, {"counter": str(counter), "limit": "1"}, backoff_scale=0.01)
    assert counter.read_text() == "2"  # the first run and one retry
    assert info.value.exit_code == 75 and info.value.summary["flaky"]["retries"] == 1


@pytest.mark.parametrize("code", ["2", "1"])
def test_permanent_failure_is_never_retried(tmp_path: Path, code: str) -> None:
    path = flaky_workflow(tmp_path, RETRY)
    counter = tmp_path / "runs"
    with pytest.raises(WorkflowFailed, match=f"exit code {code}"):
        run_workflow(path, {"counter": str(counter), "code": code}, backoff_scale=0.01)
    assert counter.read_text() == "1"


def test_without_retry_strategy_nothing_is_retried(tmp_path: Path) -> None:
    path = flaky_workflow(tmp_path, None)
    counter = tmp_path / "runs"
    with pytest.raises(WorkflowFailed, match="exit code 75"):
        run_workflow(path, {"counter": str(counter)})
    assert counter.read_text() == "1"


def test_retry_policy_on_error_skips_failures(tmp_path: Path) -> None:
    """A non-zero exit is Failed, which OnError does not retry (as in Argo)."""
    path = flaky_workflow(tmp_path, {**RETRY, "retryPolicy": "OnError"})
    counter = tmp_path / "runs"
    with pytest.raises(WorkflowFailed):
        run_workflow(path, {"counter": str(counter)}, backoff_scale=0.01)
    assert counter.read_text() == "1"


def test_backoff_delays_grow_by_factor(tmp_path: Path) -> None:
    path = flaky_workflow(tmp_path, RETRY)
    start = time.monotonic()
    run_workflow(path, {"counter": str(tmp_path / "runs")}, backoff_scale=0.2)
    # 1 s then 2 s, scaled by 0.2: at least 0.6 s of waiting
    assert time.monotonic() - start >= 0.6


def test_backoff_max_duration_stops_retries(tmp_path: Path) -> None:
    strategy = {**RETRY, "backoff": {"duration": "10s", "factor": 1, "maxDuration": "5s"}}
    path = flaky_workflow(tmp_path, strategy)
    counter = tmp_path / "runs"
    with pytest.raises(WorkflowFailed):
        run_workflow(path, {"counter": str(counter)}, backoff_scale=0.01)
    assert counter.read_text() == "1"  # the first delay alone passes maxDuration


def test_retry_expression_sees_errors_and_messages(tmp_path: Path) -> None:
    """A process killed by a signal is an Error; the rule retries it only for node trouble."""
    killer = container("killer", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    killer["retryStrategy"] = {**RETRY, "limit": 2}
    path = workflow(tmp_path, [{"name": "k", "template": "killer"}], [killer])
    with pytest.raises(WorkflowFailed, match="killed by signal 9") as info:
        run_workflow(path, {}, backoff_scale=0.01)
    assert info.value.summary["k"]["retries"] == 0  # "process killed by signal" is not transient
    killer["retryStrategy"]["expression"] = (
        "lastRetry.status == 'Error' && lastRetry.exitCode == '137'"
    )
    path = workflow(tmp_path, [{"name": "k", "template": "killer"}], [killer])
    with pytest.raises(WorkflowFailed) as info:
        run_workflow(path, {}, backoff_scale=0.01)
    assert info.value.summary["k"]["retries"] == 2


def test_active_deadline_kills_the_task(tmp_path: Path) -> None:
    sleeper = container("sleeper", "import time; time.sleep(30)")
    sleeper["activeDeadlineSeconds"] = "{{workflow.parameters.deadline}}"
    sleeper["retryStrategy"] = {**RETRY, "limit": 2}  # a deadline is not transient: no retry
    params = [{"name": "deadline", "value": "0.5"}]
    path = workflow(tmp_path, [{"name": "s", "template": "sleeper"}], [sleeper], params)
    start = time.monotonic()
    with pytest.raises(WorkflowFailed, match="longer than the specified deadline") as info:
        run_workflow(path, {})
    assert time.monotonic() - start < 10
    assert info.value.summary["s"]["retries"] == 0
    with pytest.raises(WorkflowFailed, match="activeDeadlineSeconds must be a positive"):
        run_workflow(path, {"deadline": "soon"})


def test_parallelism_caps_workers(tmp_path: Path) -> None:
    """The barrier tasks need two processes at once: parallelism 1 in the YAML forbids it."""
    barrier = (
        "import pathlib, sys, time\n"
        "d = pathlib.Path(sys.argv[1]); (d / sys.argv[2]).write_text('x')\n"
        "deadline = time.monotonic() + 1.0\n"
        "while not (d / sys.argv[3]).exists():\n"
        "    if time.monotonic() > deadline: sys.exit(3)\n"
        "    time.sleep(0.01)\n"
    )
    wait = container(
        "wait", barrier,
        ["{{workflow.parameters.dir}}", "{{inputs.parameters.me}}", "{{inputs.parameters.other}}"],
        inputs=[{"name": "me"}, {"name": "other"}],
    )  # fmt: skip

    def task(me: str, other: str) -> dict[str, Any]:
        params = [{"name": "me", "value": me}, {"name": "other", "value": other}]
        return {"name": me, "template": "wait", "arguments": {"parameters": params}}

    tasks = [task("left", "right"), task("right", "left")]
    for parallelism, ok in ((2, True), (1, False)):
        run_dir = tmp_path / f"p{parallelism}"
        run_dir.mkdir()
        path = workflow(
            tmp_path, tasks, [wait], [{"name": "dir"}], name=f"p{parallelism}.yaml",
            parallelism=parallelism,
        )  # fmt: skip
        if ok:
            assert run_workflow(path, {"dir": str(run_dir)}, workers=4)["workers"] == 2
        else:
            with pytest.raises(WorkflowFailed, match="exit code 3"):
                run_workflow(path, {"dir": str(run_dir)}, workers=4)


def test_pod_spec_patch_and_gpu_visibility(tmp_path: Path) -> None:
    show = container("show", "import os; print(repr(os.environ.get('CUDA_VISIBLE_DEVICES')))")
    show["inputs"] = {"parameters": [{"name": "gpu"}]}
    show["container"]["resources"] = {"requests": {"cpu": "1", "nvidia.com/gpu": "1"}}
    show["podSpecPatch"] = (
        '{"containers": [{"name": "main", "resources": {"requests": '
        '{"nvidia.com/gpu": "{{inputs.parameters.gpu}}"}, "limits": '
        '{"nvidia.com/gpu": "{{inputs.parameters.gpu}}"}}}], '
        '"nodeSelector": {{workflow.parameters.selector}}}'
    )
    tasks = [
        {"name": f"gpu{n}", "template": "show",
         "arguments": {"parameters": [{"name": "gpu", "value": n}]}}
        for n in ("0", "1")
    ]  # fmt: skip
    params = [{"name": "selector", "value": '{"pool": "a"}'}]
    path = workflow(tmp_path, tasks, [show], params)
    summary = run_workflow(path, {})["tasks"]
    assert summary["gpu0"]["results"] == ["''"]  # no GPU requested: none visible
    assert summary["gpu1"]["results"] != ["''"]
    assert summary["gpu1"]["pods"][0]["resources"] == {
        "requests": {"cpu": "1", "nvidia.com/gpu": "1"}, "limits": {"nvidia.com/gpu": "1"},
    }  # fmt: skip
    assert summary["gpu1"]["pods"][0]["nodeSelector"] == {"pool": "a"}
    with pytest.raises(WorkflowFailed, match="podSpecPatch is not JSON"):
        run_workflow(path, {"selector": "{pool: a}"})


def test_expression_tags_are_evaluated(tmp_path: Path) -> None:
    echo = container(
        "echo", "import sys; print(' '.join(sys.argv[1:]))", ["{{inputs.parameters.x}}"],
        inputs=[{"name": "x"}],
    )  # fmt: skip
    emit = container("emit", "print('{\"a\": {\"b\": [10, 20]}, \"s\": \"t\"}')")
    tasks = [
        {"name": "emit", "template": "emit"},
        {
            "name": "use",
            "template": "echo",
            "depends": "emit",
            "arguments": {"parameters": [{
                "name": "x",
                "value": "{{=jsonpath(tasks.emit.outputs.result, '$.a.b[1]') + 1}} "
                "{{=asInt(workflow.parameters.n) > 2 ? 'big' : 'small'}} "
                "{{=jsonpath(tasks['emit'].outputs.result, '$.s')}}",
            }]},
        },
    ]  # fmt: skip
    path = workflow(tmp_path, tasks, [echo, emit], [{"name": "n", "value": "3"}])
    assert run_workflow(path, {})["tasks"]["use"]["results"] == ["21 big t"]
    assert run_workflow(path, {"n": "1"})["tasks"]["use"]["results"] == ["21 small t"]


# --- the real pipeline's retry rules, scheduling and the YAML as the single source -----------


def _real_with_fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_code: str) -> Path:
    """The committed pipeline YAML with every `sitsflow` container replaced by ``fake_code``."""
    fake = tmp_path / "fake_sitsflow.py"
    fake.write_text(fake_code)
    doc = load_workflow(REPO / "workflows" / "sitsflow.yaml")
    for template in doc["spec"]["templates"]:
        if "container" in template:
            template["container"]["command"] = [PY, str(fake)]
    path = tmp_path / "sitsflow.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


# A fake sitsflow whose `train` exits with $FAKE_TRAIN_CODE on its first run, then succeeds.
FLAKY_SITSFLOW = FAKE_SITSFLOW.replace(
    'stage = " ".join(args[:2]) if args[0] == "plan" else args[0]\n',
    'stage = " ".join(args[:2]) if args[0] == "plan" else args[0]\n'
    "import pathlib\n"
    'mark = pathlib.Path(os.environ["FAKE_CALLS"] + "." + "-".join(args[1:]).replace("/", "_"))\n'
    'if stage == "train" and not mark.exists():\n'
    '    mark.write_text("x"); sys.exit(int(os.environ["FAKE_TRAIN_CODE"]))\n',
)


@pytest.mark.parametrize(("code", "retried"), [(75, True), (2, False), (1, False)])
def test_real_workflow_retries_only_transient_failures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, retried: bool
) -> None:
    path = _real_with_fake(tmp_path, monkeypatch, FLAKY_SITSFLOW)
    monkeypatch.setenv("FAKE_CALLS", str(tmp_path / "calls.jsonl"))
    monkeypatch.setenv("FAKE_PREPARED", json.dumps(fake_prepared()))
    monkeypatch.setenv("FAKE_TRAIN_CODE", str(code))
    params = {"config": "/data/run.cfg"}
    if retried:
        summary = run_workflow(path, params, workers=2, backoff_scale=0.001)
        assert summary["tasks"]["train"]["retries"] == 2  # both items failed once
        assert summary["tasks"]["merge"]["status"] == "Succeeded"
    else:
        with pytest.raises(WorkflowFailed, match=f"exit code {code}") as info:
            run_workflow(path, params, workers=2, backoff_scale=0.001)
        assert info.value.summary["train"]["retries"] == 0


def test_editing_the_rendered_retry_limit_changes_what_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The YAML is the only source: its retry-limit default decides whether a 75 heals locally."""
    path = _real_with_fake(tmp_path, monkeypatch, FLAKY_SITSFLOW)
    monkeypatch.setenv("FAKE_CALLS", str(tmp_path / "calls.jsonl"))
    monkeypatch.setenv("FAKE_PREPARED", json.dumps(fake_prepared()))
    monkeypatch.setenv("FAKE_TRAIN_CODE", "75")
    doc = yaml.safe_load(path.read_text())
    for param in doc["spec"]["arguments"]["parameters"]:
        if param["name"] == "retry-limit":
            param["value"] = "0"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(WorkflowFailed, match="exit code 75"):
        run_workflow(path, {"config": "/data/run.cfg"}, backoff_scale=0.001)


def test_resource_blocks_reach_the_pods(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """iota2 blocks → prepare's JSON → the tasks' pod settings, as the cluster would apply them."""
    path = _real_with_fake(tmp_path, monkeypatch, FAKE_SITSFLOW)
    monkeypatch.setenv("FAKE_CALLS", str(tmp_path / "calls.jsonl"))
    blocks = {
        "default": {"nb_cpu": 3},
        "train": {"nb_cpu": 10, "ram": "92Gi", "walltime": 43200, "nb_gpu": 2, "queue": "qgpgpu"},
        "infer": {"nb_gpu": 0},
        "merge": {"queue": "big-mem"},
    }
    monkeypatch.setenv("FAKE_PREPARED", json.dumps(fake_prepared(**blocks)))
    tasks = run_workflow(path, {"config": "/data/run.cfg"}, workers=2)["tasks"]
    train = tasks["train"]["pods"][0]
    assert train["resources"]["requests"] == {"cpu": "10", "memory": "92Gi", "nvidia.com/gpu": "2"}
    assert train["activeDeadlineSeconds"] == 43200
    assert train["nodeSelector"] == {"gpu": "yes", "pool": "qgpgpu"}
    infer = tasks["infer"]["pods"][0]
    assert infer["resources"]["requests"] == {"cpu": "3", "memory": "16Gi", "nvidia.com/gpu": "0"}
    assert tasks["merge"]["pods"][0]["nodeSelector"] == {"pool": "big-mem"}
    assert tasks["select"]["pods"][0]["resources"]["requests"]["cpu"] == "3"
