"""Execute a rendered Argo Workflow/WorkflowTemplate on this machine.

Every container of the entrypoint DAG runs as a local subprocess (``sitsflow ...`` becomes
``python -m sitsflow ...`` with this interpreter), with Argo's semantics where the pipeline relies
on them: ``depends``/``dependencies``, ``{{...}}`` substitution, ``withParam``/``withItems``
fan-out, stdout as the task's result (trailing whitespace stripped) and fan-out results gathered
into a JSON list.

What is honoured locally: ``{{=...}}`` expression tags (:mod:`sitsflow.runner.expr`);
``retryStrategy`` (``limit``, ``retryPolicy``, ``expression`` on ``lastRetry.exitCode/status/
message/duration``, ``backoff`` duration/factor/maxDuration, scaled by ``backoff_scale``);
``activeDeadlineSeconds`` (the process is killed, the node fails as a pod past its deadline does);
``spec.parallelism`` and the entry DAG's ``parallelism`` (at most that many processes at once);
``podSpecPatch`` (must be JSON after substitution); a container whose resources (patch included)
request no ``nvidia.com/gpu`` runs with ``CUDA_VISIBLE_DEVICES=""``, as a pod without a GPU sees
none. Each node's effective pod settings are reported in the summary (``pods``).

Local differences, on purpose: ``valueFrom`` environment variables (Secrets, ConfigMaps) are
skipped and the local environment is inherited instead, as is an ``env`` value that is empty after
substitution; the image, CPU/memory requests, node selectors, tolerations and volumes are reported
but not enforced; after the first failure (retries exhausted) no new task starts (running ones
finish), so ``A.Failed``-style branches never fire. Local statuses follow Argo's: a non-zero exit
is ``Failed``; a process that cannot start or dies from a signal is ``Error``. Features whose
meaning would change (``when``, ``continueOn``, ``templateRef``, steps or script templates, ...)
are refused before anything runs.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import string
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sitsflow.errors import EXIT_BAD_INPUT, EXIT_TRANSIENT, BadInputError, SitsflowError
from sitsflow.log import get_logger
from sitsflow.runner.display import Display, make_display
from sitsflow.runner.expr import ExprError, evaluate_text
from sitsflow.runner.document import dag_tasks, load_workflow, templates_by_name
from sitsflow.runner.expressions import (
    Expr,
    evaluate,
    format_value,
    item_scope,
    referenced_tasks,
    substitute,
    task_dependencies,
)
from sitsflow.runner.validate import check

log = get_logger(__name__)

#: Lines of a failed task's stderr quoted in the error.
TAIL_LINES = 20

#: Task and template fields whose meaning the local runner cannot honour.
UNSUPPORTED_TASK_FIELDS = (
    "when", "continueOn", "onExit", "hooks", "templateRef", "inline", "withSequence",
)  # fmt: skip
UNSUPPORTED_TEMPLATE_KINDS = (
    "steps", "script", "resource", "suspend", "http", "data", "containerSet", "plugin", "dag",
)  # fmt: skip

#: Terminal task states. Skipped: empty fan-out; Omitted: ``depends`` evaluated false.
DONE_STATES = ("Succeeded", "Skipped", "Omitted", "Failed")


class WorkflowFailed(SitsflowError):
    """A task of the workflow failed; no new task was started after it.

    ``exit_code`` is the task's own exit code when it is 2 (bad input) or 75 (transient), else 1,
    so ``sitsflow run`` exits as the failing stage did. ``summary`` is the state of every task.
    """

    def __init__(
        self,
        message: str,
        *,
        task: str,
        returncode: int | None,
        log_path: Path | None,
        summary: dict[str, Any],
    ) -> None:
        super().__init__(message)
        self.task = task
        self.returncode = returncode
        self.log_path = log_path
        self.summary = summary
        self.exit_code = returncode if returncode in (EXIT_BAD_INPUT, EXIT_TRANSIENT) else 1


def container_argv(command: Sequence[str], args: Sequence[str]) -> list[str]:
    """The local command line of a container: ``sitsflow`` runs with this interpreter."""
    command = list(command)
    if command and command[0] == "sitsflow":
        command = [sys.executable, "-m", "sitsflow", *command[1:]]
    return [*command, *args]


def container_env(env: Sequence[Mapping[str, Any]], base: Mapping[str, str]) -> dict[str, str]:
    """``base`` with the container's plain ``value`` variables applied (already substituted).

    An empty value inherits the local variable; ``valueFrom`` entries (Secret, ConfigMap) are
    skipped, so the local environment's variable, if any, is inherited.
    """
    result = dict(base)
    for var in env:
        value = var.get("value")
        if "valueFrom" in var or value is None or str(value) == "":
            continue
        result[str(var["name"])] = str(value)
    return result


#: Argo's message for a pod stopped at its ``activeDeadlineSeconds``.
DEADLINE_MESSAGE = "Pod was active on the node longer than the specified deadline"


@dataclass(frozen=True)
class Retry:
    """A template's ``retryStrategy``, substituted and parsed.

    ``limit``: retries after the first attempt; ``policy``: Argo's ``retryPolicy``;
    ``expression``: expr-lang text on ``lastRetry``; ``backoff``: first delay (s), ``factor``,
    ``max_duration`` (s, total time since the first attempt after which no retry starts).
    """

    limit: int
    policy: str = "OnFailure"
    expression: str | None = None
    backoff: float = 0.0
    factor: float = 1.0
    max_duration: float | None = None

    def allows(self, status: str, exit_code: str, message: str, duration: float) -> bool:
        """Whether a node that ended so may be retried (the limit aside)."""
        by_policy = {
            "Always": status in ("Failed", "Error"),
            "OnFailure": status == "Failed",
            "OnError": status == "Error",
            "OnTransientError": status == "Error",
        }.get(self.policy, False)
        if not by_policy:
            return False
        if self.expression is None:
            return True
        env = {"lastRetry": {"exitCode": exit_code, "status": status, "message": message,
                             "duration": str(int(duration))}}
        value = evaluate_text(self.expression, env)
        if not isinstance(value, bool):
            raise ExprError(f"retryStrategy.expression gives {value!r}, not a boolean")
        return value

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (1 = the first retry)."""
        return self.backoff * self.factor ** (retry - 1)


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0,
                   "h": 3600.0}


def parse_duration(text: Any, where: str) -> float:
    """A Go duration (``30s``, ``1m30s``, ``2h``) or a number of seconds, in seconds.

    Raises:
        BadInputError: not a duration, naming ``where``.
    """
    raw = format_value(text).strip()
    if re.fullmatch(r"\d+(?:\.\d+)?", raw):
        return float(raw)
    pieces = _DURATION.findall(raw)
    if not pieces or "".join(a + u for a, u in pieces) != raw:
        raise BadInputError(f"{where}: {raw!r} is not a duration (e.g. 30s, 1m30s, 2h)")
    return sum(float(amount) * _DURATION_UNITS[unit] for amount, unit in pieces)


@dataclass
class _Node:
    """One execution of a task's container (one fan-out item, or the task itself)."""

    task: str
    index: int | None
    label: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    pod: dict[str, Any] = field(default_factory=dict)
    deadline: float | None = None
    retry: Retry | None = None
    attempt: int = 0
    first_start: float | None = None


@dataclass
class _Outcome:
    returncode: int | None
    stdout: str
    error: str = ""
    seconds: float = 0.0
    timed_out: bool = False

    @property
    def status(self) -> str:
        """Argo's node phase: ``Succeeded``, ``Failed`` (exit code or deadline) or ``Error``."""
        if self.returncode == 0 and not self.timed_out:
            return "Succeeded"
        if self.timed_out or (self.returncode is not None and self.returncode > 0):
            return "Failed"
        return "Error"

    @property
    def message(self) -> str:
        """What Argo would say about the node."""
        if self.timed_out:
            return DEADLINE_MESSAGE
        if self.returncode is None:
            return self.error
        if self.returncode < 0:
            return f"process killed by signal {-self.returncode}"
        return f"Error (exit code {self.returncode})"


@dataclass
class _TaskState:
    status: str = "Pending"
    results: list[str | None] = field(default_factory=list)
    remaining: int = 0
    looped: bool = False
    retries: int = 0
    pods: list[dict[str, Any]] = field(default_factory=list)


def _run_node(node: _Node) -> _Outcome:
    """Run a container locally: stdout captured, stderr to the node's log file.

    A node with a ``deadline`` is killed after that many seconds (``activeDeadlineSeconds``).
    """
    start = time.monotonic()
    try:
        with open(node.log_path, "wb") as stderr:
            proc = subprocess.run(
                node.argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr,
                env=node.env,
                check=False,
                timeout=node.deadline,
            )
    except subprocess.TimeoutExpired:
        return _Outcome(None, "", DEADLINE_MESSAGE, time.monotonic() - start, timed_out=True)
    except OSError as exc:
        return _Outcome(None, "", f"could not start {node.argv[0]!r}: {exc}")
    stdout = proc.stdout.decode("utf-8", errors="replace").rstrip()
    return _Outcome(proc.returncode, stdout, seconds=time.monotonic() - start)


def _tail(path: Path, lines: int = TAIL_LINES) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _item_label(task: str, index: int, item: Any) -> str:
    """Argo's node name of a fan-out item: ``train(0:hyp:0,region:1,seed:0)``."""
    if isinstance(item, dict):
        body = ",".join(f"{k}:{format_value(v)}" for k, v in sorted(item.items()))
    else:
        body = format_value(item)
    return f"{task}({index}:{body})"


def _aggregate(results: list[str | None]) -> str:
    """Fan-out results as Argo gathers them: a JSON list, JSON objects parsed, others strings."""
    gathered: list[Any] = []
    for result in results:
        if result is None:
            continue
        try:
            value = json.loads(result)
        except json.JSONDecodeError:
            value = None
        gathered.append(value if isinstance(value, dict) else result)
    return json.dumps(gathered, separators=(",", ":"))


def _merge(defaults: Mapping[str, Any], template: Mapping[str, Any]) -> dict[str, Any]:
    """``template`` laid over ``defaults`` (maps merged, other values replaced)."""
    merged = dict(defaults)
    for key, value in template.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _apply_defaults(defaults: Mapping[str, Any], template: Mapping[str, Any]) -> dict[str, Any]:
    """A template with ``spec.templateDefaults`` applied (its own values win).

    A default ``container`` (or other template kind) applies only to templates of that kind.
    """
    kinds = {"container", *UNSUPPORTED_TEMPLATE_KINDS}
    relevant = {k: v for k, v in defaults.items() if k not in kinds or k in template}
    return _merge(relevant, template)


def _workflow_name(doc: Mapping[str, Any]) -> str:
    """``{{workflow.name}}``: a Workflow's name, else generateName/template name + 5 characters."""
    meta = doc.get("metadata") or {}
    if doc.get("kind") == "Workflow" and meta.get("name"):
        return str(meta["name"])
    base = meta.get("generateName") or f"{meta.get('name', 'workflow')}-"
    alphabet = string.ascii_lowercase + string.digits
    return str(base) + "".join(secrets.choice(alphabet) for _ in range(5))


def _resolve_parameters(spec: Mapping[str, Any], given: Mapping[str, str]) -> dict[str, str]:
    """Workflow parameters: declared defaults overridden by ``given``.

    Raises:
        BadInputError: an undeclared or non-string parameter, a required one missing, or a value
            outside the parameter's ``enum``.
    """
    declared = [p for p in (spec.get("arguments") or {}).get("parameters") or []]
    names = [str(p["name"]) for p in declared]
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise BadInputError(
            f"unknown workflow parameter(s) {', '.join(unknown)}; declared: {', '.join(names)}"
        )
    values: dict[str, str] = {}
    for param in declared:
        name = str(param["name"])
        if name in given:
            value = given[name]
            if not isinstance(value, str):
                raise BadInputError(
                    f"workflow parameter {name!r} must be a string, got {type(value).__name__}"
                )
        elif "value" in param or "default" in param:
            value = format_value(param.get("value", param.get("default")))
        else:
            raise BadInputError(f"workflow parameter {name!r} is required and was not given")
        enum = param.get("enum")
        if enum and value not in [format_value(v) for v in enum]:
            raise BadInputError(
                f"workflow parameter {name!r} is {value!r}; allowed: {', '.join(map(str, enum))}"
            )
        values[name] = value
    return values


def _check_supported(tasks: list[dict[str, Any]], templates: Mapping[str, Any]) -> None:
    """Refuse features the local runner would silently get wrong."""
    problems = []
    for task in tasks:
        for key in UNSUPPORTED_TASK_FIELDS:
            if key in task:
                problems.append(f"task {task.get('name')!r} uses {key}")
        template = templates.get(str(task.get("template")), {})
        for kind in UNSUPPORTED_TEMPLATE_KINDS:
            if kind in template:
                problems.append(f"task {task.get('name')!r} runs a {kind} template")
        if template and "container" in template and not template["container"].get("command"):
            problems.append(
                f"template {template.get('name')!r} has no container command "
                "(the image's entrypoint cannot be known locally)"
            )
    if problems:
        raise BadInputError(
            "the local runner executes DAGs of container templates only: " + "; ".join(problems)
        )


def _subst_tree(obj: Any, scope: Mapping[str, str], where: str) -> Any:
    """``obj`` with every string substituted (maps and lists walked)."""
    if isinstance(obj, str):
        return substitute(obj, scope, where)
    if isinstance(obj, Mapping):
        return {str(k): _subst_tree(v, scope, where) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_subst_tree(v, scope, where) for v in obj]
    return obj


def _pod_settings(
    template: Mapping[str, Any], scope: Mapping[str, str], where: str
) -> tuple[dict[str, Any], float | None]:
    """The pod a template would get (container resources with ``podSpecPatch`` merged in), and
    its ``activeDeadlineSeconds`` (None: none).

    Raises:
        BadInputError: the patch is not a JSON object after substitution, or the deadline is not a
            positive number of seconds.
    """
    container = template.get("container") or {}
    pod: dict[str, Any] = {
        "resources": _subst_tree(container.get("resources") or {}, scope, where),
        "nodeSelector": _subst_tree(template.get("nodeSelector") or {}, scope, where),
        "tolerations": _subst_tree(template.get("tolerations") or [], scope, where),
        "volumes": [v.get("name") for v in template.get("volumes") or []],
    }
    patch_text = template.get("podSpecPatch")
    if patch_text:
        text = substitute(str(patch_text), scope, f"{where} podSpecPatch")
        try:
            patch = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BadInputError(f"{where}: podSpecPatch is not JSON ({exc}): {text[:300]!r}")
        if not isinstance(patch, dict):
            raise BadInputError(f"{where}: podSpecPatch must be a JSON object: {text[:300]!r}")
        for entry in patch.get("containers") or []:
            if isinstance(entry, dict) and entry.get("name") == "main":
                pod["resources"] = _merge(pod["resources"], entry.get("resources") or {})
        if "nodeSelector" in patch:
            pod["nodeSelector"] = _merge(pod["nodeSelector"], patch["nodeSelector"] or {})
        if "tolerations" in patch:
            pod["tolerations"] = patch["tolerations"] or []
    deadline: float | None = None
    if template.get("activeDeadlineSeconds") is not None:
        raw = substitute(format_value(template["activeDeadlineSeconds"]), scope, where)
        try:
            deadline = float(raw)
        except ValueError:
            deadline = -1.0
        if deadline <= 0:
            raise BadInputError(
                f"{where}: activeDeadlineSeconds must be a positive number of seconds, got {raw!r}"
            )
        pod["activeDeadlineSeconds"] = int(deadline) if deadline.is_integer() else deadline
    return pod, deadline


def _requests_gpu(pod: Mapping[str, Any]) -> bool:
    """Whether a pod's resources ask for at least one ``nvidia.com/gpu``."""
    resources = pod.get("resources") or {}
    for kind in ("limits", "requests"):
        value = (resources.get(kind) or {}).get("nvidia.com/gpu")
        if value is not None:
            try:
                return float(str(value)) > 0
            except ValueError:
                return True
    return False


def _retry(
    template: Mapping[str, Any], scope: Mapping[str, str], where: str, scale: float
) -> Retry | None:
    """A template's ``retryStrategy`` (substituted), None when it has none.

    Raises:
        BadInputError: a limit, policy, factor or duration Argo would refuse.
    """
    strategy = template.get("retryStrategy")
    if not strategy:
        return None
    at = f"{where} retryStrategy"
    limit_text = substitute(format_value(strategy.get("limit", "0")), scope, at)
    if not limit_text.strip().isdigit():
        raise BadInputError(f"{at}: limit must be a whole number, got {limit_text!r}")
    policy = str(strategy.get("retryPolicy") or "OnFailure")
    if policy not in ("Always", "OnFailure", "OnError", "OnTransientError"):
        raise BadInputError(
            f"{at}: retryPolicy {policy!r}; allowed: Always, OnFailure, OnError, OnTransientError"
        )
    backoff = strategy.get("backoff") or {}
    duration = parse_duration(substitute(format_value(backoff.get("duration", "0")), scope, at),
                              f"{at}.backoff.duration")
    factor_text = substitute(format_value(backoff.get("factor", 1)), scope, at)
    try:
        factor = float(factor_text)
    except ValueError:
        raise BadInputError(f"{at}: backoff.factor must be a number, got {factor_text!r}") from None
    max_duration = None
    if backoff.get("maxDuration") is not None:
        max_duration = scale * parse_duration(
            substitute(format_value(backoff["maxDuration"]), scope, at), f"{at}.backoff.maxDuration"
        )
    expression = strategy.get("expression")
    return Retry(
        limit=int(limit_text),
        policy=policy,
        expression=str(expression) if expression else None,
        backoff=duration * scale,
        factor=factor,
        max_duration=max_duration,
    )


class _Run:
    """The state of one workflow execution (all state changes happen on the calling thread)."""

    def __init__(
        self,
        doc: dict[str, Any],
        parameters: Mapping[str, str],
        workers: int,
        log_dir: Path,
        backoff_scale: float = 1.0,
    ) -> None:
        spec = doc["spec"]
        self.log_dir = log_dir
        self.backoff_scale = backoff_scale
        self.display: Display = make_display(False)
        defaults = spec.get("templateDefaults") or {}
        self.templates = {
            name: _apply_defaults(defaults, template)
            for name, template in templates_by_name(doc).items()
        }
        entry = self.templates[spec["entrypoint"]]
        # Argo's parallelism: the workflow's and the entry DAG's cap the processes run at once.
        caps = [workers]
        for where, value in (("spec.parallelism", spec.get("parallelism")),
                             (f"template {entry.get('name')!r} parallelism",
                              entry.get("parallelism"))):
            if value is not None:
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise BadInputError(f"{where} must be an integer >= 1, got {value!r}")
                caps.append(value)
        self.workers = min(caps)
        if "dag" in entry:
            self.tasks = dag_tasks(entry)
        else:  # a single-template workflow runs as a one-task DAG
            self.tasks = [{"name": entry["name"], "template": entry["name"]}]
        _check_supported(self.tasks, self.templates)
        self.global_scope = {
            f"workflow.parameters.{name}": value
            for name, value in _resolve_parameters(spec, parameters).items()
        }
        self.global_scope["workflow.name"] = _workflow_name(doc)
        # The entrypoint's own inputs come from the workflow parameters of the same name.
        self.dag_scope = dict(self.global_scope)
        for param in (entry.get("inputs") or {}).get("parameters") or []:
            name = str(param["name"])
            value = self.global_scope.get(f"workflow.parameters.{name}")
            if value is None and ("value" in param or "default" in param):
                value = format_value(param.get("value", param.get("default")))
            if value is not None:
                self.dag_scope[f"inputs.parameters.{name}"] = value
        if "dag" not in entry:  # the one task passes the entrypoint's inputs on
            self.tasks[0]["arguments"] = {
                "parameters": [
                    {"name": key.split(".", 2)[2], "value": f"{{{{{key}}}}}"}
                    for key in self.dag_scope
                    if key.startswith("inputs.parameters.")
                ]
            }
        self.depends: dict[str, Expr | None] = {
            str(t["name"]): task_dependencies(t) for t in self.tasks
        }
        self.states = {str(t["name"]): _TaskState() for t in self.tasks}
        self.queue: deque[_Node] = deque()
        self.delayed: list[tuple[float, _Node]] = []  # retries waiting for their backoff
        self.failure_reason: tuple[str, int | None, Path | None, str] | None = None

    # -- scheduling ---------------------------------------------------------------------------

    def _result(self, task: str, suffix: str) -> bool:
        state = self.states[task]
        if suffix == "AnySucceeded":
            return state.looped and state.status == "Succeeded" and bool(state.results)
        if suffix == "AllFailed":
            return state.looped and state.status == "Failed"
        return state.status == suffix

    def _scope(self) -> dict[str, str]:
        scope = dict(self.dag_scope)
        for name, state in self.states.items():
            if state.status == "Succeeded":
                if state.looped:
                    scope[f"tasks.{name}.outputs.result"] = _aggregate(state.results)
                elif state.results and state.results[0] is not None:
                    scope[f"tasks.{name}.outputs.result"] = state.results[0]
            if state.status in DONE_STATES:
                scope[f"tasks.{name}.status"] = state.status
        return scope

    def _items(self, task: Mapping[str, Any], scope: Mapping[str, str]) -> list[Any] | None:
        """The fan-out items of a task (None: no fan-out)."""
        name = task["name"]
        if "withItems" in task:
            items = task["withItems"]
            if not isinstance(items, list):
                raise BadInputError(f"task {name!r}: withItems must be a list")
            return [
                substitute(i, scope, f"task {name!r} withItems") if isinstance(i, str) else i
                for i in items
            ]
        if "withParam" in task:
            text = substitute(str(task["withParam"]), scope, f"task {name!r} withParam")
            try:
                items = json.loads(text)
            except json.JSONDecodeError as exc:
                raise BadInputError(
                    f"task {name!r}: withParam is not JSON ({exc}): {text[:200]!r}"
                ) from exc
            if not isinstance(items, list):
                raise BadInputError(f"task {name!r}: withParam must be a JSON list: {text[:200]!r}")
            return items
        return None

    def _node(
        self, task: Mapping[str, Any], index: int | None, item: Any, scope: dict[str, str]
    ) -> _Node:
        """Substitute a task's arguments, then its template's container, for one item."""
        name = str(task["name"])
        label = name if index is None else _item_label(name, index, item)
        task_scope = dict(scope)
        if index is not None:
            task_scope.update(item_scope(item))
        template = self.templates[task["template"]]
        passed = {
            str(p["name"]): substitute(
                format_value(p.get("value", "")), task_scope, f"task {label} argument {p['name']!r}"
            )
            for p in (task.get("arguments") or {}).get("parameters") or []
        }
        inner = dict(self.global_scope)
        for param in (template.get("inputs") or {}).get("parameters") or []:
            pname = str(param["name"])
            if pname in passed:
                value = passed[pname]
            elif "value" in param or "default" in param:
                value = format_value(param.get("value", param.get("default")))
            else:
                raise BadInputError(f"task {label}: input parameter {pname!r} was not passed")
            inner[f"inputs.parameters.{pname}"] = value
        container = template["container"]
        where = f"template {template['name']!r} (task {label})"
        argv = container_argv(
            [substitute(format_value(c), inner, where) for c in container.get("command") or []],
            [substitute(format_value(a), inner, where) for a in container.get("args") or []],
        )
        env = [
            {**var, "value": substitute(format_value(var["value"]), inner, where)}
            if "value" in var
            else var
            for var in container.get("env") or []
        ]
        log_name = name if index is None else f"{name}-{index}"
        pod, deadline = _pod_settings(template, inner, where)
        environment = container_env(env, os.environ)
        if not _requests_gpu(pod):  # a pod that requests no GPU sees none
            environment["CUDA_VISIBLE_DEVICES"] = ""
        return _Node(
            name,
            index,
            label,
            argv,
            environment,
            self.log_dir / f"{log_name}.log",
            pod=pod,
            deadline=deadline,
            retry=_retry(template, inner, where, self.backoff_scale),
        )

    def _fail(self, task: str, returncode: int | None, log_path: Path | None, message: str) -> None:
        if self.failure_reason is None:
            self.failure_reason = (task, returncode, log_path, message)

    def _schedule(self) -> None:
        """Start every task whose dependencies are complete (repeated while something changes)."""
        changed = True
        while changed and self.failure_reason is None:
            changed = False
            scope = self._scope()
            for task in self.tasks:
                name = str(task["name"])
                state = self.states[name]
                if state.status != "Pending":
                    continue
                expr = self.depends[name]
                deps = referenced_tasks(expr) if expr is not None else set()
                if any(self.states[d].status not in DONE_STATES for d in deps if d in self.states):
                    continue
                changed = True
                if expr is not None and not evaluate(expr, self._result):
                    state.status = "Omitted"
                    self.display.task_done(name, "Omitted")
                    continue
                try:
                    items = self._items(task, scope)
                    if items is None:
                        nodes = [self._node(task, None, None, scope)]
                    else:
                        state.looped = True
                        nodes = [self._node(task, i, item, scope) for i, item in enumerate(items)]
                except BadInputError as exc:
                    state.status = "Failed"
                    self._fail(name, None, None, str(exc))
                    return
                if not nodes:
                    state.status = "Skipped"  # Argo: an empty fan-out is skipped
                    self.display.task_done(name, "Skipped")
                    continue
                state.status = "Running"
                state.results = [None] * len(nodes)
                state.pods = [n.pod for n in nodes]
                state.remaining = len(nodes)
                self.display.task_started(name, len(nodes))
                self.queue.extend(nodes)

    def _retry_later(self, node: _Node, outcome: _Outcome) -> bool:
        """Queue ``node`` again if its retryStrategy allows it; whether it was queued."""
        retry = node.retry
        if retry is None or node.attempt >= retry.limit:
            return False
        # As a container reports it: a signal is 128 + its number, no process at all is -1.
        returncode = outcome.returncode
        code = "-1" if returncode is None else str(128 - returncode if returncode < 0 else returncode)
        try:
            allowed = retry.allows(outcome.status, code, outcome.message, outcome.seconds)
        except BadInputError as exc:
            self._fail(node.task, outcome.returncode, node.log_path,
                       f"task {node.label}: retryStrategy: {exc}")
            return True  # failed for good, with the message above
        if not allowed:
            return False
        now = time.monotonic()
        delay = retry.delay(node.attempt + 1)
        first = node.first_start if node.first_start is not None else now - outcome.seconds
        if retry.max_duration is not None and now + delay - first > retry.max_duration:
            return False
        attempt = node.attempt + 1
        base = node.log_path.name.removesuffix(".log").split(".retry")[0]
        again = replace(
            node,
            attempt=attempt,
            first_start=first,
            log_path=node.log_path.with_name(f"{base}.retry{attempt}.log"),
        )
        self.states[node.task].retries += 1
        log.warning(
            "task %s: %s; retry %d/%d in %.1f s (log: %s)",
            node.label, outcome.message, attempt, retry.limit, delay, node.log_path,
        )  # fmt: skip
        self.delayed.append((now + delay, again))
        return True

    def _finish(self, node: _Node, outcome: _Outcome) -> None:
        state = self.states[node.task]
        if outcome.status != "Succeeded" and self._retry_later(node, outcome):
            return
        if outcome.returncode == 0 and not outcome.timed_out:
            state.results[node.index or 0] = outcome.stdout
            state.remaining -= 1
            self.display.node_done(node.label, outcome.seconds)
            if state.remaining == 0:
                state.status = "Succeeded"
                self.display.task_done(node.task, "Succeeded")
            return
        state.status = "Failed"
        if outcome.timed_out:
            message = (
                f"task {node.label} failed: {DEADLINE_MESSAGE} "
                f"(activeDeadlineSeconds {node.deadline:g})"
            )
        elif outcome.returncode is None:
            message = f"task {node.label} failed: {outcome.error}"
        elif outcome.returncode < 0:
            message = f"task {node.label} was killed by signal {-outcome.returncode}"
        else:
            message = f"task {node.label} failed with exit code {outcome.returncode}"
        tail = _tail(node.log_path)
        if tail:
            message += f"\n--- last lines of {node.log_path} ---\n{tail}"
        else:
            message += f" (log: {node.log_path})"
        self.display.node_failed(node.label, outcome.returncode, tail)
        self._fail(node.task, outcome.returncode, node.log_path, message)

    def summary(self) -> dict[str, Any]:
        return {
            name: {
                "status": state.status,
                "results": [r for r in state.results if r is not None],
                "retries": state.retries,
                "pods": state.pods,
            }
            for name, state in self.states.items()
        }

    def execute(self, display: Display) -> dict[str, Any]:
        """Run the DAG, reporting to ``display``; the summary of every task.

        Raises:
            WorkflowFailed: after the first failure, once the tasks already running finished.
        """
        self.display = display
        in_flight: dict[Future[_Outcome], _Node] = {}
        with ThreadPoolExecutor(
            max_workers=self.workers, thread_name_prefix="sitsflow-task"
        ) as pool:
            while True:
                self._schedule()
                now = time.monotonic()
                ready = [entry for entry in self.delayed if entry[0] <= now]
                self.delayed = [entry for entry in self.delayed if entry[0] > now]
                self.queue.extendleft(node for _, node in reversed(ready))
                while self.failure_reason is None and self.queue and len(in_flight) < self.workers:
                    node = self.queue.popleft()
                    log.debug("running %s: %s", node.label, " ".join(node.argv))
                    self.display.node_started(node.label)
                    in_flight[pool.submit(_run_node, node)] = node
                pending = self.delayed if self.failure_reason is None else []
                if not in_flight and not pending:
                    break
                timeout = (
                    max(0.0, min(t for t, _ in pending) - time.monotonic()) if pending else None
                )
                if not in_flight:
                    time.sleep(timeout or 0.0)
                    continue
                done, _ = wait(in_flight, timeout=timeout, return_when=FIRST_COMPLETED)
                for future in done:
                    self._finish(in_flight.pop(future), future.result())
        if self.failure_reason is not None:
            task, returncode, log_path, message = self.failure_reason
            raise WorkflowFailed(
                message, task=task, returncode=returncode, log_path=log_path, summary=self.summary()
            )
        return self.summary()


def run_workflow(
    path: str | Path,
    parameters: dict[str, str],
    *,
    workers: int = 1,
    progress: bool | None = None,
    log_dir: Path | None = None,
    backoff_scale: float | None = None,
) -> dict[str, Any]:
    """Execute a rendered Argo Workflow/WorkflowTemplate YAML on this machine.

    Args:
        path: the YAML file (``workflows/sitsflow.yaml`` for the pipeline).
        parameters: workflow parameters (``spec.arguments.parameters``) by name; undeclared
            ones are refused, declared ones not given take their default.
        workers: containers run at the same time (a thread pool of subprocesses), at least 1.
        progress: a rich progress display on stderr (None: when stderr is a terminal; otherwise
            one log line per task start and end).
        log_dir: where each task's stderr goes (``<task>.log``, ``<task>-<index>.log`` for
            fan-out items, ``<task>-<index>.retry<n>.log`` for retries); default a new temporary
            folder.
        backoff_scale: factor on every retry backoff delay (0: retry at once); None reads
            ``$SITSFLOW_BACKOFF_SCALE``, else 1 (the delays written in the YAML).

    Returns:
        ``{"tasks": {name: {"status": "Succeeded"|"Skipped"|"Omitted", "results": [stdout, ...],
        "retries": int, "pods": [{...}, ...]}}, "duration_s": float, "log_dir": str,
        "workers": int}``; ``results`` holds one stdout per item, ``pods`` each item's pod
        settings (``resources``, ``nodeSelector``, ``tolerations``, ``activeDeadlineSeconds``,
        ``volumes``), ``workers`` the processes run at once (``workers`` capped by parallelism).

    Raises:
        BadInputError: the document fails :func:`sitsflow.runner.validate.lint`, uses features
            the local runner cannot honour, or the parameters are wrong; nothing has run.
        WorkflowFailed: a task failed (its ``exit_code`` is 2 or 75 when the task's was).
    """
    if workers < 1:
        raise BadInputError(f"workers must be at least 1, got {workers}")
    if backoff_scale is None:
        raw = os.environ.get("SITSFLOW_BACKOFF_SCALE", "1")
        try:
            backoff_scale = float(raw)
        except ValueError:
            raise BadInputError(f"SITSFLOW_BACKOFF_SCALE must be a number, got {raw!r}") from None
    if backoff_scale < 0:
        raise BadInputError(f"backoff_scale must be >= 0, got {backoff_scale}")
    start = time.monotonic()
    doc = load_workflow(path)
    check(doc, source=f"workflow file {path}")
    if log_dir is None:
        log_dir = Path(tempfile.mkdtemp(prefix="sitsflow-run-"))
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    if progress is None:
        progress = sys.stderr.isatty()
    run = _Run(doc, parameters, workers, log_dir, backoff_scale)
    log.info(
        "running %s (%d tasks, %d worker(s)); task logs in %s",
        path, len(run.tasks), workers, log_dir,
    )  # fmt: skip
    try:
        with make_display(progress) as display:
            tasks = run.execute(display)
    except WorkflowFailed as exc:
        log.error("%s", exc)
        raise
    duration = time.monotonic() - start
    log.info("workflow %s succeeded in %.1f s", path, duration)
    return {
        "tasks": tasks,
        "duration_s": round(duration, 3),
        "log_dir": str(log_dir),
        "workers": run.workers,
    }
