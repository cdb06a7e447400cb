"""The local runner executes the rendered Argo YAML: small hand-written templates run `python -c`,
and the pipeline's own YAML runs with a fake `sitsflow` that records its calls."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from sitsflow.config.resources import BUILTIN
from sitsflow.errors import BadInputError, SitsflowError
from sitsflow.runner import (
    WorkflowFailed,
    container_argv,
    default_workflow_path,
    load_workflow,
    output_lease,
    run_workflow,
)
from sitsflow.runner.execute import RESULT_LIMIT
from sitsflow.runner.lease import TTL_S, lease_uri
from sitsflow.runner.workflow import entry_dag, substitute

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


# --- the DAG ---------------------------------------------------------------------------------


def test_depends_orders_tasks(tmp_path: Path) -> None:
    out = tmp_path / "order.txt"
    tasks = [
        append_task("e", depends="d"),
        append_task("d", depends="b && c"),
        append_task("c", depends="a"),
        append_task("b", depends=" a "),
        append_task("a"),
    ]
    path = workflow(tmp_path, tasks, [append_template()], OUT_PARAM)
    summary = run_workflow(path, {"out": str(out)}, log_dir=tmp_path / "logs")
    order = lines(out)
    assert sorted(order[1:3]) == ["b", "c"] and order[0] == "a" and order[3:] == ["d", "e"]
    assert {t["status"] for t in summary["tasks"].values()} == {"Succeeded"}
    assert summary["tasks"]["d"]["results"] == ["d"]
    assert summary["tasks"]["d"]["inputs"] == [{"text": "d", "out": str(out)}]
    assert [t["name"] for t in entry_dag(load_workflow(path))[0]] == ["a", "c", "b", "d", "e"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"depends": "a || b"},
            "depends 'a || b': the local runner runs task names joined by && only",
        ),
        ({"depends": "a.Succeeded"}, "not 'a.Succeeded'"),
        ({"depends": "!a"}, "not '!a'"),
        ({"depends": "a && ghost"}, "depends on 'ghost', which is not a task"),
        ({"depends": "b"}, "depend on each other (a cycle)"),
        ({"when": "1 == 1"}, "uses when, which the local runner does not run"),
        ({"withItems": [1, 2]}, "uses withItems"),
        ({"template": "nope"}, "template 'nope' is not a container template"),
    ],
)
def test_what_the_runner_cannot_run_is_refused_before_anything_runs(
    tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    out = tmp_path / "out.txt"
    tasks = [append_task("a"), append_task("b", **change)]
    path = workflow(tmp_path, tasks, [append_template()], OUT_PARAM)
    with pytest.raises(BadInputError, match=re.escape(message)):
        run_workflow(path, {"out": str(out)})
    assert not out.exists()


def test_not_a_workflow(tmp_path: Path) -> None:
    path = tmp_path / "cm.yaml"
    path.write_text("kind: ConfigMap\nmetadata: {name: x}\n")
    with pytest.raises(BadInputError, match="'ConfigMap'; expected a Workflow or WorkflowTemplate"):
        run_workflow(path, {})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_workflow(tmp_path / "missing.yaml", {})
    steps = tmp_path / "steps.yaml"
    steps.write_text(
        yaml.safe_dump(
            {
                "kind": "Workflow",
                "spec": {"entrypoint": "s", "templates": [{"name": "s", "steps": []}]},
            }
        )
    )
    with pytest.raises(BadInputError, match="'s' is not a DAG template"):
        run_workflow(steps, {})


# --- parameters and outputs ------------------------------------------------------------------


def test_parameter_substitution(tmp_path: Path) -> None:
    echo = container(
        "echo",
        "import json, sys; print(json.dumps(sys.argv[1:]))",
        [
            "{{inputs.parameters.a}}",
            "{{ inputs.parameters.b }}",
            "{{workflow.parameters.greeting}}",
        ],
        inputs=[{"name": "a"}, {"name": "b", "default": "b-default"}],
    )
    second_args = [
        {"name": "a", "value": "[{{tasks.first.outputs.result}}]"},
        {"name": "b", "value": "{{workflow.parameters.greeting}}!"},
    ]
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
            "arguments": {"parameters": second_args},
        },
    ]
    path = workflow(tmp_path, tasks, [echo], [{"name": "greeting", "value": "hello"}])
    assert json.loads(run_workflow(path, {})["tasks"]["first"]["results"][0]) == [
        "x",
        "b-default",
        "hello",
    ]
    summary = run_workflow(path, {"greeting": "salut"})["tasks"]
    first = summary["first"]["results"][0]
    assert json.loads(first) == ["x", "b-default", "salut"]
    assert json.loads(summary["second"]["results"][0]) == [f"[{first}]", "salut!", "salut"]


def test_parameters_are_checked(tmp_path: Path) -> None:
    out = tmp_path / "never.txt"
    params = [{"name": "out"}, {"name": "mode", "value": "a"}]
    path = workflow(tmp_path, [append_task("a")], [append_template()], params)
    with pytest.raises(BadInputError, match="'out' is required"):
        run_workflow(path, {})
    with pytest.raises(
        BadInputError, match="unknown workflow parameter.*colour.*declared: out, mode"
    ):
        run_workflow(path, {"out": str(out), "colour": "red"})
    with pytest.raises(BadInputError, match="workers must be at least 1"):
        run_workflow(path, {"out": str(out)}, workers=0)
    assert not out.exists()


def test_expression_tags_are_evaluated(tmp_path: Path) -> None:
    echo = container(
        "echo",
        "import sys; print(' '.join(sys.argv[1:]))",
        ["{{inputs.parameters.x}}"],
        inputs=[{"name": "x"}],
    )
    emit = container("emit", 'print(\'{"a": {"b": [10, 20], "t": true}, "s": "text"}\')')
    value = (
        "{{=jsonpath(tasks.emit.outputs.result, '$.a.b[1]')}} "
        "{{= jsonpath(tasks.emit.outputs.result, '$.s') }} "
        "{{=jsonpath(tasks.emit.outputs.result, '$.a.t')}}"
    )
    tasks = [
        {"name": "emit", "template": "emit"},
        {
            "name": "use",
            "template": "echo",
            "depends": "emit",
            "arguments": {"parameters": [{"name": "x", "value": value}]},
        },
    ]
    path = workflow(tmp_path, tasks, [echo, emit])
    assert run_workflow(path, {})["tasks"]["use"]["results"] == ["20 text true"]
    for tag, message in [
        ("{{=jsonpath(tasks.emit.outputs.result, '$.a.b') }}", r"gives \[10, 20\], not a string"),
        ("{{=jsonpath(tasks.emit.outputs.result, '$.nope')}}", "has nothing at '.nope'"),
        ("{{=jsonpath(tasks.emit.outputs.result, '$..b')}}", "only .key and"),
        ("{{=asInt(workflow.parameters.n) + 1}}", "evaluates jsonpath"),
    ]:
        tasks[1]["arguments"]["parameters"][0]["value"] = tag
        path = workflow(tmp_path, tasks, [echo, emit])
        with pytest.raises(WorkflowFailed, match=message) as info:
            run_workflow(path, {})
        assert info.value.exit_code == 2 and info.value.task == "use"


def test_substitute_names_unresolved_variable() -> None:
    with pytest.raises(
        BadInputError, match=r"task x: \{\{inputs.parameters.b\}\} cannot be resolved"
    ):
        substitute("{{inputs.parameters.b}}", {"inputs.parameters.a": "1"}, "task x")
    assert substitute("{{a}}{{ b }}", {"a": "{{b}}", "b": "2"}, "here") == "{{b}}2"  # one pass


def test_stdout_loses_one_trailing_newline_as_in_argo(tmp_path: Path) -> None:
    out = container("out", "import sys; sys.stdout.write('  value \\n\\n')")
    path = workflow(tmp_path, [{"name": "o", "template": "out"}], [out])
    assert run_workflow(path, {})["tasks"]["o"]["results"] == ["  value \n"]


def test_env_values(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SITSFLOW_TEST_INHERITED", "local-value")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "local-key")
    monkeypatch.setenv("SITSFLOW_TEST_SET", "overridden-locally")
    secret = {"secretKeyRef": {"name": "s3", "key": "AWS_ACCESS_KEY_ID", "optional": True}}
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
            {"name": "AWS_ACCESS_KEY_ID", "valueFrom": secret},
        ],
    )
    tasks = [
        {
            "name": "env",
            "template": "show-env",
            "arguments": {"parameters": [{"name": "v", "value": "given"}]},
        }
    ]
    path = workflow(
        tmp_path,
        tasks,
        [show_env],
        [{"name": "p", "value": "param"}, {"name": "empty", "value": ""}],
    )
    result = json.loads(run_workflow(path, {})["tasks"]["env"]["results"][0])
    assert result == {
        "SITSFLOW_TEST_SET": "given-param",
        "SITSFLOW_TEST_INHERITED": "local-value",  # empty value: the local environment's
        "AWS_ACCESS_KEY_ID": "local-key",  # secret refs are skipped locally
        "SITSFLOW_TEST_UNSET": None,
    }
    result = json.loads(run_workflow(path, {"empty": "explicit"})["tasks"]["env"]["results"][0])
    assert result["SITSFLOW_TEST_INHERITED"] == "explicit"


def test_a_pod_without_gpu_sees_none(tmp_path: Path) -> None:
    show = container("show", "import os; print(repr(os.environ.get('CUDA_VISIBLE_DEVICES')))")
    show["inputs"] = {"parameters": [{"name": "gpu"}]}
    show["container"]["resources"] = {"limits": {"nvidia.com/gpu": "1"}}
    show["podSpecPatch"] = (
        '{"containers": [{"name": "main", "resources": {"limits": '
        '{"nvidia.com/gpu": "{{inputs.parameters.gpu}}"}}}], '
        '"nodeSelector": {{workflow.parameters.selector}}}'
    )
    plain = container("plain", "import os; print(repr(os.environ.get('CUDA_VISIBLE_DEVICES')))")
    tasks = [
        {
            "name": f"gpu{n}",
            "template": "show",
            "arguments": {"parameters": [{"name": "gpu", "value": n}]},
        }
        for n in ("0", "1")
    ] + [{"name": "plain", "template": "plain"}]
    path = workflow(
        tmp_path, tasks, [show, plain], [{"name": "selector", "value": '{"pool": "a"}'}]
    )
    summary = run_workflow(path, {})["tasks"]
    assert summary["gpu0"]["results"] == ["''"] and summary["plain"]["results"] == ["''"]
    assert summary["gpu1"]["results"] != ["''"]  # this machine's GPUs, if any
    assert summary["gpu1"]["pods"][0]["nodeSelector"] == {"pool": "a"}
    with pytest.raises(WorkflowFailed, match="podSpecPatch is not JSON") as info:
        run_workflow(path, {"selector": "{pool: a}"})
    assert info.value.exit_code == 2


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

    def plan_task(name: str, items: Any) -> dict[str, Any]:
        return {
            "name": name,
            "template": "plan",
            "arguments": {"parameters": [{"name": "items", "value": json.dumps(items)}]},
        }

    def fan(name: str, over: str, value: str, **extra: Any) -> dict[str, Any]:
        return {
            "name": name,
            "template": "show",
            "depends": over,
            "withParam": f"{{{{tasks.{over}.outputs.result}}}}",
            "arguments": {"parameters": [{"name": "x", "value": value}]},
            **extra,
        }

    tasks = [
        plan_task("plan-maps", [{"region": 1, "seed": 0}, {"region": 2, "seed": 1}]),
        plan_task("plan-scalars", ["T31TCJ", 7, True]),
        plan_task("plan-empty", []),
        fan("maps", "plan-maps", "r{{item.region}}-s{{item.seed}} {{item}}"),
        fan("scalars", "plan-scalars", "{{item}}"),
        fan("empty", "plan-empty", "{{item}}"),
        {
            "name": "after-empty",
            "template": "show",
            "depends": "empty",
            "arguments": {"parameters": [{"name": "x", "value": "ran"}]},
        },
        {
            "name": "sequence",
            "template": "show",
            "withSequence": {"count": "{{workflow.parameters.n}}"},
            "arguments": {"parameters": [{"name": "x", "value": "shard {{item}}"}]},
        },
    ]
    path = workflow(tmp_path, tasks, [plan, show], [{"name": "n", "value": "3"}])
    summary = run_workflow(path, {}, workers=2, log_dir=tmp_path / "logs")["tasks"]
    assert [json.loads(r) for r in summary["maps"]["results"]] == [
        ['r1-s0 {"region":1,"seed":0}'],
        ['r2-s1 {"region":2,"seed":1}'],
    ]
    assert [json.loads(r) for r in summary["scalars"]["results"]] == [["T31TCJ"], ["7"], ["true"]]
    assert summary["empty"] == {"status": "Skipped", "results": [], "inputs": [], "pods": []}
    assert json.loads(summary["after-empty"]["results"][0]) == ["ran"]
    assert [json.loads(r) for r in summary["sequence"]["results"]] == [
        ["shard 0"],
        ["shard 1"],
        ["shard 2"],
    ]
    assert (tmp_path / "logs" / "maps-0.log").exists() and (
        tmp_path / "logs" / "maps-1.log"
    ).exists()


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
    with pytest.raises(WorkflowFailed, match="task 'fan': withParam is not JSON"):
        run_workflow(workflow(tmp_path, tasks, [plan, show]), {})


def test_output_over_argos_limit_fails_when_another_task_reads_it(tmp_path: Path) -> None:
    """Argo keeps the last 256 KiB of stdout: a longer plan would be cut on a cluster, so it
    fails here; a long stdout nobody reads is cut as Argo cuts it."""
    emit = container(
        "emit",
        "import json, sys; print(json.dumps(list(range(int(sys.argv[1])))))",
        ["{{workflow.parameters.n}}"],
    )
    show = container("show", "print('ok')", ["{{inputs.parameters.x}}"], inputs=[{"name": "x"}])
    tasks = [
        {"name": "plan", "template": "emit"},
        {"name": "unread", "template": "emit"},
        {
            "name": "fan",
            "template": "show",
            "depends": "plan",
            "withParam": "{{tasks.plan.outputs.result}}",
            "arguments": {"parameters": [{"name": "x", "value": "{{item}}"}]},
        },
    ]
    n = 40_000  # about 270 kB of JSON
    path = workflow(tmp_path, tasks, [emit, show], [{"name": "n", "value": str(n)}])
    with pytest.raises(
        WorkflowFailed,
        match=r"task plan printed \d+ bytes on stdout; Argo keeps only the last 262144",
    ) as info:
        run_workflow(path, {})
    assert info.value.exit_code == 2 and info.value.task == "plan"
    assert "tasks that read it would get a cut" in str(info.value)
    assert info.value.summary["fan"]["status"] == "Pending"
    tasks[2]["withParam"] = "[1]"  # nobody reads plan's result now
    tasks[2].pop("depends")
    summary = run_workflow(
        workflow(tmp_path, tasks, [emit, show], [{"name": "n", "value": str(n)}]), {}
    )
    full = json.dumps(list(range(n)))
    assert summary["tasks"]["unread"]["results"] == [full[-RESULT_LIMIT:]]


# --- concurrency and failure -----------------------------------------------------------------


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

    params = [{"name": "dir"}, {"name": "timeout", "value": "120"}]
    path = workflow(tmp_path, [task("left", "right"), task("right", "left")], [wait], params)
    (tmp_path / "two").mkdir()
    summary = run_workflow(path, {"dir": str(tmp_path / "two")}, workers=2)
    assert summary["tasks"]["left"]["results"] == ["left"] and summary["tasks"]["right"][
        "results"
    ] == ["right"]
    (tmp_path / "one").mkdir()
    with pytest.raises(WorkflowFailed, match="task left failed with exit code 3"):
        run_workflow(path, {"dir": str(tmp_path / "one"), "timeout": "0"}, workers=1)
    assert not (tmp_path / "one" / "right").exists()  # with one worker, right never started


@pytest.mark.parametrize(("code", "exit_code"), [(2, 2), (75, 75), (3, 1)])
def test_failure_is_reported_once_the_running_tasks_finished(
    tmp_path: Path, code: int, exit_code: int
) -> None:
    """bad fails while slow runs: slow finishes, bad's dependents never start, the error names
    bad."""
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
        "(d / sys.argv[2]).write_text('done')",
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
        slow_task("after-bad", depends="bad"),
    ]
    path = workflow(tmp_path, tasks, [bad, slow], [{"name": "marks"}, {"name": "code"}])
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
    assert (marks / "slow").read_text() == "done"  # the running task finished
    assert not (marks / "after-bad").exists()
    assert (
        error.summary["slow"]["status"] == "Succeeded"
        and error.summary["after-bad"]["status"] == "Pending"
    )


def test_nothing_new_starts_after_a_failure(tmp_path: Path) -> None:
    """The scheduler itself, completions fed in order: bad fails, then slow succeeds."""
    import tempfile

    from sitsflow.runner.execute import _Run

    out = tmp_path / "out.txt"
    tasks = [append_task("slow"), append_task("bad"), append_task("after-slow", depends="slow")]
    doc = load_workflow(workflow(tmp_path, tasks, [append_template()], OUT_PARAM))
    run = _Run(doc, {"out": str(out)}, workers=2, log_dir=tmp_path)
    run._schedule()
    slow, bad = run.queue.popleft(), run.queue.popleft()
    (tmp_path / "bad.log").write_text("boom\n")
    run._finish(bad, 2, tempfile.TemporaryFile(), 0.0)
    stdout = tempfile.TemporaryFile()
    stdout.write(b"slow\n")
    run._finish(slow, 0, stdout, 0.0)
    run._schedule()
    assert (
        run.status == {"slow": "Succeeded", "bad": "Failed", "after-slow": "Pending"}
        and not run.queue
    )
    assert run.failure is not None and run.failure.task == "bad" and "boom" in str(run.failure)


def test_failed_item_is_named_and_a_missing_command_fails(tmp_path: Path) -> None:
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
            "withParam": json.dumps([{"region": 1, "seed": 0}, {"region": 2, "seed": 0}]),
            "arguments": {"parameters": [{"name": "region", "value": "{{item.region}}"}]},
        }
    ]
    with pytest.raises(
        WorkflowFailed, match=r"task train\(1:region:2,seed:0\) failed with exit code 75"
    ) as info:
        run_workflow(workflow(tmp_path, tasks, [fail_on]), {})
    assert info.value.exit_code == 75
    missing = {"name": "missing", "container": {"image": "x", "command": [str(tmp_path / "nope")]}}
    with pytest.raises(WorkflowFailed, match="task m failed: could not start") as info:
        run_workflow(workflow(tmp_path, [{"name": "m", "template": "missing"}], [missing]), {})
    assert info.value.exit_code == 1


def test_sitsflow_command_runs_with_this_interpreter() -> None:
    assert container_argv(["sitsflow"], ["plan", "training"]) == [
        PY,
        "-m",
        "sitsflow",
        "plan",
        "training",
    ]
    assert container_argv(["/bin/echo", "-n"], ["x"]) == ["/bin/echo", "-n", "x"]


def test_editing_the_yaml_changes_what_runs(tmp_path: Path) -> None:
    out = tmp_path / "out.txt"
    path = workflow(tmp_path, [append_task("a", "first version")], [append_template()], OUT_PARAM)
    assert run_workflow(path, {"out": str(out)})["tasks"]["a"]["results"] == ["first version"]
    path.write_text(path.read_text().replace("first version", "second version"))
    assert run_workflow(path, {"out": str(out)})["tasks"]["a"]["results"] == ["second version"]
    assert lines(out) == ["first version", "second version"]


def test_progress_display(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out.txt"
    path = workflow(
        tmp_path,
        [append_task("alpha"), append_task("beta", depends="alpha")],
        [append_template()],
        OUT_PARAM,
    )
    run_workflow(path, {"out": str(out)}, progress=True)
    captured = capsys.readouterr()
    assert "alpha" in captured.err and "beta" in captured.err and "1/1" in captured.err
    assert captured.out == ""  # stdout stays free for the orchestrator's JSON


# --- stopping the runner stops its tasks -----------------------------------------------------

# Starts a grandchild, records both pids, then sleeps: a task whose whole tree must be stopped.
SLEEPER = (
    "import os, pathlib, subprocess, sys, time\n"
    "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
    "mark = pathlib.Path(sys.argv[1], sys.argv[2])\n"
    "mark.with_suffix('.tmp').write_text(f'{os.getpid()} {child.pid}')\n"
    "mark.with_suffix('.tmp').rename(mark)  # whole, or not there\n"
    "time.sleep(600)\n"
)
RUNNER = (
    "import sys\n"
    "from sitsflow.errors import SitsflowError\n"
    "from sitsflow.runner import run_workflow\n"
    "try:\n"
    "    run_workflow(sys.argv[1], {'dir': sys.argv[2]}, workers=2, log_dir=sys.argv[3])\n"
    "except SitsflowError as exc:\n"
    "    sys.exit(exc.exit_code)\n"
)


def _gone(pid: int) -> bool:
    """The process no longer runs (it does not exist, or is a zombie waiting to be reaped)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def _started_runner(tmp_path: Path) -> tuple[subprocess.Popen[bytes], list[int]]:
    """A runner with two sleeping tasks (each with a child), once all four processes run."""
    sleep = container(
        "sleep",
        SLEEPER,
        ["{{workflow.parameters.dir}}", "{{inputs.parameters.name}}"],
        inputs=[{"name": "name"}],
    )
    tasks = [
        {
            "name": n,
            "template": "sleep",
            "arguments": {"parameters": [{"name": "name", "value": n}]},
        }
        for n in ("one", "two")
    ]
    path = workflow(tmp_path, tasks, [sleep], [{"name": "dir"}])
    marks = tmp_path / "pids"
    marks.mkdir()
    runner = subprocess.Popen([PY, "-c", RUNNER, str(path), str(marks), str(tmp_path / "logs")])
    deadline = time.monotonic() + 120  # an upper bound for a loaded machine, not a measurement
    while not ((marks / "one").exists() and (marks / "two").exists()):
        assert runner.poll() is None and time.monotonic() < deadline, "the tasks never started"
        time.sleep(0.05)
    pids = [int(p) for name in ("one", "two") for p in (marks / name).read_text().split()]
    assert not any(_gone(p) for p in pids)
    return runner, pids


def _wait_gone(pids: list[int]) -> list[int]:
    deadline = time.monotonic() + 120  # signal delivery is asynchronous; generous upper bound
    while any(not _gone(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [p for p in pids if not _gone(p)]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stopping_the_runner_stops_every_task_process(tmp_path: Path, signum: int) -> None:
    runner, pids = _started_runner(tmp_path)
    runner.send_signal(signum)
    assert runner.wait(timeout=120) == (75 if signum == signal.SIGTERM else 130)
    task_pids = pids[0::2]
    assert all(_gone(p) for p in task_pids)  # the runner waited for its tasks before exiting
    assert _wait_gone(pids) == []  # and their children went with them (their process group)


def test_killing_the_runner_outright_leaves_no_orphans(tmp_path: Path) -> None:
    runner, pids = _started_runner(tmp_path)
    runner.kill()  # SIGKILL: no handler runs; the watcher process stops the tasks
    runner.wait(timeout=120)
    assert _wait_gone(pids) == []


# --- the lease on the output path ------------------------------------------------------------

HOLDER = (
    "import sys, time\n"
    "from sitsflow.runner import output_lease\n"
    "with output_lease(sys.argv[1]):\n"
    "    print('held', flush=True)\n"
    "    time.sleep(600)\n"
)


def test_second_run_on_a_local_output_path_is_refused_naming_the_first(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    with output_lease(out) as record:
        assert json.loads(Path(lease_uri(out)).read_text())["run_id"] == record["run_id"]
        with pytest.raises(
            BadInputError,
            match=f"output path is in use: .*run.lock is held by the run of pid {os.getpid()} on ",
        ) as info:
            with output_lease(out):
                pass
        assert record["started"] in str(info.value) and info.value.exit_code == 2
    assert not Path(lease_uri(out)).exists()  # released: nothing left in the output tree
    with output_lease(out):
        pass


def test_a_killed_holders_local_lease_is_taken_over(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    holder = subprocess.Popen([PY, "-c", HOLDER, out], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    with pytest.raises(BadInputError, match=f"held by the run of pid {holder.pid}"):
        with output_lease(out):
            pass
    holder.kill()
    holder.wait()
    assert Path(lease_uri(out)).exists()  # its record stays; the lock died with it
    with output_lease(out) as record:
        assert json.loads(Path(lease_uri(out)).read_text())["pid"] == record["pid"] == os.getpid()


@pytest.mark.s3
def test_s3_lease_is_a_conditional_write_refused_then_taken_over_when_stale(s3_bucket: str) -> None:
    import boto3

    out = f"{s3_bucket}/runs/one"
    bucket, key = lease_uri(out)[5:].split("/", 1)
    client = boto3.client("s3")
    with output_lease(out) as record:
        stored = json.loads(client.get_object(Bucket=bucket, Key=key)["Body"].read())
        assert stored["run_id"] == record["run_id"] and stored["expires"] > time.time() + TTL_S / 2
        with pytest.raises(BadInputError, match=f"is held by the run of pid {os.getpid()} on host"):
            with output_lease(out):
                pass
    assert "Contents" not in client.list_objects_v2(Bucket=bucket, Prefix=key)
    # a live holder elsewhere whose lease expired (it stopped renewing), then a dead one here
    for stale in (
        {"host": "elsewhere", "pid": 1, "expires": time.time() - 1},
        {"host": os.uname().nodename, "pid": 2**22 + 7, "expires": time.time() + TTL_S},
    ):
        client.put_object(
            Bucket=bucket, Key=key, Body=json.dumps({**stale, "started": "then"}).encode()
        )
        with output_lease(out) as record:
            assert (
                json.loads(client.get_object(Bucket=bucket, Key=key)["Body"].read())["run_id"]
                == record["run_id"]
            )
    live = {
        "host": "elsewhere",
        "pid": 1,
        "started": "2026-01-01T00:00:00+00:00",
        "expires": time.time() + 60,
    }
    client.put_object(Bucket=bucket, Key=key, Body=json.dumps(live).encode())
    with pytest.raises(
        BadInputError, match="held by the run of pid 1 on host 'elsewhere', started 2026-01-01"
    ):
        with output_lease(out):
            pass


@pytest.mark.s3
def test_s3_lease_renewal_is_conditional_on_still_holding_it(s3_bucket: str) -> None:
    import boto3
    from sitsflow.runner.lease import _record, _S3Lease

    lease = _S3Lease(lease_uri(f"{s3_bucket}/out"))
    record = _record()
    lease.acquire(record)
    before = record["expires"]
    assert lease.renew(record) and record["expires"] >= before
    bucket, key = lease.uri.removeprefix("s3://").split("/", 1)
    boto3.client("s3").put_object(Bucket=bucket, Key=key, Body=b"{}")  # another run took it
    assert not lease.renew(record)


def test_sitsflow_run_refuses_a_busy_output_path(tmp_path: Path) -> None:
    out = tmp_path / "busy"
    with output_lease(str(out)):
        proc = subprocess.run(
            [
                PY,
                "-m",
                "sitsflow",
                "run",
                str(REPO / "examples" / "slovenia" / "config.cfg"),
                "--set",
                f"chain.output_path={out}",
                "--no-progress",
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert sorted(p.name for p in out.rglob("*")) == ["config", "run.lock"]  # nothing ran
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"is held by the run of pid {os.getpid()}" in proc.stderr


# --- the pipeline's own YAML -----------------------------------------------------------------


def test_the_pipeline_ships_in_the_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("SITSFLOW_WORKFLOW", raising=False)
    assert default_workflow_path() == REPO / "services" / "sitsflow" / "workflows" / "sitsflow.yaml"
    tasks, _ = entry_dag(load_workflow(default_workflow_path()))
    assert [t["name"] for t in tasks] == [
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
    monkeypatch.setenv("SITSFLOW_WORKFLOW", str(tmp_path / "other.yaml"))
    assert default_workflow_path() == tmp_path / "other.yaml"


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
    calls.write(json.dumps({"args": args, "endpoint": os.environ.get("AWS_ENDPOINT_URL"),
                            "cuda": os.environ.get("CUDA_VISIBLE_DEVICES")}) + "\\n")
stage = " ".join(args[:2]) if args[0] == "plan" else args[0]
tiles = int(os.environ.get("FAKE_TILES", "1"))
outputs = {"prepare": os.environ["FAKE_PREPARED"]}
if args[0] == "plan":  # what sitsflow.shards.write_plan prints for a plan of that many tasks
    from sitsflow.shards import PLAN_STAGES, largest_shard, shard_count
    items = {"training": 2, "selection": 2, "inference": 2 * tiles}[args[1]]
    shards = shard_count(items, int(args[args.index("--max-shards") + 1]))
    walltime = json.loads(os.environ["FAKE_PREPARED"])["resources"][PLAN_STAGES[args[1]]]["deadline"]
    outputs[stage] = json.dumps({"plan": f"/runs/plans/{args[1]}.json", "items": items,
                                 "shards": str(shards), "per_shard": largest_shard(items, shards),
                                 "deadline": str(int(walltime) * largest_shard(items, shards))})
if stage == os.environ.get("FAKE_FAILS"):
    sys.exit(3)
print(outputs.get(stage, json.dumps({"stage": stage})))
"""


def _pipeline_with_fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **blocks: Any) -> Path:
    """The shipped pipeline YAML with every `sitsflow` container replaced by the fake."""
    fake = tmp_path / "fake_sitsflow.py"
    fake.write_text(FAKE_SITSFLOW)
    monkeypatch.setenv("FAKE_CALLS", str(tmp_path / "calls.jsonl"))
    monkeypatch.setenv("FAKE_PREPARED", json.dumps(fake_prepared(**blocks)))
    doc = load_workflow(default_workflow_path())
    for template in doc["spec"]["templates"]:
        if "container" in template:
            assert template["container"]["command"] == ["sitsflow"]
            template["container"]["command"] = [PY, str(fake)]
    path = tmp_path / "sitsflow.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_pipeline_wiring_with_a_fake_sitsflow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _pipeline_with_fake(tmp_path, monkeypatch)
    params = {
        "config": "/data/run.cfg",
        "overrides": '["chain.seed=3"]',
        "s3-endpoint": "http://s3:9000",
    }
    summary = run_workflow(path, params, workers=2)
    recorded = [json.loads(line) for line in lines(tmp_path / "calls.jsonl")]
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
        "plan training --config /runs/resolved.cfg --max-shards 100",
        "train --config /runs/resolved.cfg --shard 0",
        "train --config /runs/resolved.cfg --shard 1",
        "plan selection --config /runs/resolved.cfg --max-shards 100",
        "select --config /runs/resolved.cfg --shard 0",
        "select --config /runs/resolved.cfg --shard 1",
        "plan inference --config /runs/resolved.cfg --max-shards 100",
        "infer --config /runs/resolved.cfg --shard 0",
        "infer --config /runs/resolved.cfg --shard 1",
    }
    assert set(argv[1:-1]) == expected and len(argv) == len(expected) + 2
    first = {
        stage: min(i for i, a in enumerate(argv) if a.startswith(stage))
        for stage in ("select", "infer")
    }
    last = {
        stage: max(i for i, a in enumerate(argv) if a.startswith(stage))
        for stage in ("train", "select")
    }
    assert last["train"] < first["select"] and last["select"] < first["infer"]
    assert len(summary["tasks"]["infer"]["results"]) == 2
    assert os.environ.get("AWS_ENDPOINT_URL") != "http://s3:9000"  # the runner's env is untouched
    # GPU stages may use this machine's GPUs; the others see none, as their pods would
    cuda = {c["args"][0]: c["cuda"] for c in recorded}
    assert cuda["sample"] == cuda["merge"] == cuda["prepare"] == "" and cuda["train"] != ""


def test_resource_blocks_reach_the_pods(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """iota2 blocks → prepare's JSON → each task's inputs and pod patch, as a cluster applies
    them."""
    blocks = {
        "default": {"nb_cpu": 3},
        "train": {"nb_cpu": 10, "ram": "92Gi", "walltime": 43200, "nb_gpu": 1, "queue": "qgpgpu"},
        "infer": {"nb_gpu": 0},
        "merge": {"queue": "big-mem"},
    }
    tasks = run_workflow(
        _pipeline_with_fake(tmp_path, monkeypatch, **blocks), {"config": "/data/run.cfg"}, workers=2
    )["tasks"]
    train = tasks["train"]["pods"][0]
    assert train["containers"][0]["resources"]["requests"] == {
        "cpu": "10",
        "memory": "92Gi",
        "nvidia.com/gpu": "1",
    }
    assert train["nodeSelector"] == {"gpu": "yes", "pool": "qgpgpu"}
    assert tasks["train"]["inputs"][0]["deadline"] == "43200"
    assert (
        tasks["infer"]["pods"][0]["containers"][0]["resources"]["requests"]["nvidia.com/gpu"] == "0"
    )
    assert tasks["merge"]["pods"][0]["nodeSelector"] == {"pool": "big-mem"}
    assert tasks["select"]["inputs"][0]["cpu"] == "3"
    cuda = {c["args"][0]: c["cuda"] for c in map(json.loads, lines(tmp_path / "calls.jsonl"))}
    assert cuda["infer"] == "" and cuda["train"] != ""  # nb_gpu 0: infer sees no GPU locally either


@pytest.mark.parametrize("max_shards", [None, "7"])
def test_a_plan_of_any_size_fans_out_to_at_most_max_shards(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, max_shards: str | None
) -> None:
    """4,000 tiles × 2 chunks: the plan step prints a few bytes (the list stays in storage), and
    infer runs max-shards tasks (the default 100, or the parameter's), each with the deadline of
    its shard (the per-task walltime times the tasks of the largest shard)."""
    monkeypatch.setenv("FAKE_TILES", "4000")
    params = {"config": "/data/run.cfg"} | ({"max-shards": max_shards} if max_shards else {})
    tasks = run_workflow(_pipeline_with_fake(tmp_path, monkeypatch), params, workers=2)["tasks"]
    shards = int(max_shards or 100)
    (plan,) = tasks["plan-inference"]["results"]
    assert len(plan) < 200 and json.loads(plan)["items"] == 8000
    assert [i["shard"] for i in tasks["infer"]["inputs"]] == [str(k) for k in range(shards)]
    walltime = BUILTIN["infer"]["walltime"]
    assert {i["deadline"] for i in tasks["infer"]["inputs"]} == {str(walltime * -(-8000 // shards))}
    assert len(tasks["train"]["inputs"]) == 2  # small plans: one task per shard
    assert tasks["train"]["inputs"][0]["deadline"] == str(BUILTIN["train"]["walltime"])


def test_a_result_too_long_for_argo_still_fails_here(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The runner keeps enforcing Argo's 256 KiB limit on results other tasks read: a plan step
    that printed its list again would fail here, as it would be cut on a cluster."""
    path = _pipeline_with_fake(tmp_path, monkeypatch)
    fake = tmp_path / "fake_sitsflow.py"
    fake.write_text(fake.read_text().replace(
        "if stage == os.environ.get", "if stage == 'plan inference': print('x' * 300_000)\nif stage == os.environ.get"
    ))  # fmt: skip
    with pytest.raises(WorkflowFailed, match="task plan-inference printed") as info:
        run_workflow(path, {"config": "/data/run.cfg"}, workers=2)
    assert info.value.exit_code == 2 and info.value.summary["infer"]["status"] == "Pending"


# --- an installed wheel, outside the checkout ------------------------------------------------


@pytest.mark.e2e
@pytest.mark.slow  # builds a wheel, installs it into a venv, runs the whole pipeline
def test_sitsflow_run_from_a_wheel_in_a_fresh_venv(tmp_path: Path) -> None:
    """Build the wheel, install it (no dependencies downloaded: the fresh venv sees this venv's
    packages through a .pth), and run the pipeline from a folder outside the checkout."""
    import shutil
    import sysconfig

    from synthetic import write_config, write_scene

    source, dist = tmp_path / "source", tmp_path / "dist"  # what the image's build copies
    shutil.copytree(
        REPO / "services",
        source / "services",
        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"),
    )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    subprocess.run(
        [
            PY,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(dist),
            str(source),
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    wheel = next(dist.glob("sitsflow-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([PY, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    fresh = venv / "bin" / "python"
    site = subprocess.run(
        [fresh, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # this venv's dependencies, after the fresh venv's own packages (the wheel's sitsflow wins)
    Path(site, "test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [
            PY,
            "-m",
            "pip",
            "--python",
            str(fresh),
            "install",
            "--no-deps",
            "--no-index",
            "-q",
            str(wheel),
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    work = tmp_path / "elsewhere"
    write_scene(work, width=24, height=12, nb_dates=7, polygons_per_class=2, duplicate_date=False)
    cfg = write_config(work, epochs=1, chunks=1)
    env = {k: v for k, v in os.environ.items() if k not in ("SITSFLOW_WORKFLOW", "PYTHONPATH")}
    where = subprocess.run(
        [fresh, "-c", "import sitsflow; print(sitsflow.__file__)"],
        capture_output=True,
        text=True,
        check=True,
        cwd=work,
        env=env,
    ).stdout
    assert where.startswith(site) and str(REPO) not in where
    proc = subprocess.run(
        [venv / "bin" / "sitsflow", "run", str(cfg), "--workers", "2", "--no-progress"],
        capture_output=True,
        text=True,
        cwd=work,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["tasks"]["merge"] == 1 and (work / "output" / "final" / "RESULTS.txt").exists()
    assert f"running {site}/sitsflow/workflows/sitsflow.yaml" in proc.stderr
