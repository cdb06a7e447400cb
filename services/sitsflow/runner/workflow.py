"""The rendered WorkflowTemplate as the local runner reads it: its DAG and Argo's ``{{...}}`` tags.

Only what the pipeline's YAML uses is understood, and anything else is refused before a task runs:
an entrypoint DAG of container templates; ``depends`` as task names joined by ``&&``;
``{{workflow.parameters.x}}``, ``{{inputs.parameters.x}}``, ``{{tasks.x.outputs.result}}``,
``{{item}}``/``{{item.key}}``; and the expression tag ``{{=jsonpath(<variable>, '$.a.b')}}`` (the
variable dotted, or with ``['name-with-dash']`` steps: ``tasks['plan-training'].outputs.result``).
Argo's semantic checks of the whole document (and its expression language) are test helpers
(``tests/argo_checks.py``), run on every rendering of the YAML.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from sitsflow.errors import BadInputError, InputNotFoundError

#: The task fields the runner executes; any other (``when``, ``withItems``, ``continueOn``…) is
#: refused rather than silently ignored.
TASK_FIELDS = frozenset({"name", "template", "depends", "arguments", "withParam", "withSequence"})

VARIABLE = re.compile(r"\{\{\s*([^{}]*?)\s*\}\}")
_JSONPATH = re.compile(r"jsonpath\(\s*((?:[\w.]|\['[\w-]+'\])+)\s*,\s*'(\$[^']*)'\s*\)")
#: ``tasks['plan-training']``: a name with ``-`` read by index in an expression.
_INDEXED = re.compile(r"\['([\w-]+)'\]")
_JSONPATH_STEP = re.compile(r"\.([\w-]+)|\[(\d+)\]")
_TASK_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9-]*")


def default_workflow_path() -> Path:
    """``$SITSFLOW_WORKFLOW`` if set, else the WorkflowTemplate shipped in the package."""
    env = os.environ.get("SITSFLOW_WORKFLOW")
    if env:
        return Path(env)
    return Path(str(resources.files("sitsflow") / "workflows" / "sitsflow.yaml"))


def load_workflow(path: str | Path) -> dict[str, Any]:
    """Read a Workflow or WorkflowTemplate YAML file.

    Raises:
        InputNotFoundError: the file does not exist.
        BadInputError: not YAML, or not an Argo Workflow/WorkflowTemplate.
    """
    try:
        doc = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise InputNotFoundError(
            f"workflow file {path} does not exist (set SITSFLOW_WORKFLOW or pass --workflow)"
        ) from exc
    except yaml.YAMLError as exc:
        raise BadInputError(f"workflow file {path} is not valid YAML: {exc}") from exc
    kind = doc.get("kind") if isinstance(doc, dict) else type(doc).__name__
    if kind not in ("Workflow", "WorkflowTemplate") or not isinstance(doc.get("spec"), dict):
        raise BadInputError(f"workflow file {path} is a {kind!r}; expected a Workflow or WorkflowTemplate")
    return doc


def format_value(value: Any) -> str:
    """A parameter value as Argo writes it into a string: JSON for maps, lists and booleans."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool | dict | list) or value is None:
        return json.dumps(value, separators=(",", ":"), sort_keys=True)
    return str(value)


def item_scope(item: Any) -> dict[str, str]:
    """``{{item}}`` and, for a map, ``{{item.key}}`` of one fan-out item."""
    scope = {"item": format_value(item)}
    if isinstance(item, dict):
        scope.update({f"item.{key}": format_value(value) for key, value in item.items()})
    return scope


def _jsonpath(tag: str, expression: str, scope: Mapping[str, str], where: str) -> str:
    match = _JSONPATH.fullmatch(expression.strip())
    if match is None:
        raise BadInputError(f"{where}: {tag}: the local runner evaluates jsonpath(<variable>, '$.key...') only")
    name, path = match.groups()
    name = _INDEXED.sub(r".\1", name)  # tasks['plan-x'].outputs.result -> tasks.plan-x.outputs...
    if name not in scope:
        raise BadInputError(f"{where}: {tag}: {name} cannot be resolved here")
    try:
        value = json.loads(scope[name])
    except json.JSONDecodeError as exc:
        raise BadInputError(f"{where}: {tag}: {name} is not JSON ({exc}): {scope[name][:200]!r}") from None
    steps = list(_JSONPATH_STEP.finditer(path[1:]))
    if "".join(step.group(0) for step in steps) != path[1:]:
        raise BadInputError(f"{where}: {tag}: only .key and [index] steps are supported")
    for step in steps:
        key: str | int = step.group(1) if step.group(1) is not None else int(step.group(2))
        try:
            value = value[key]
        except (KeyError, IndexError, TypeError):
            raise BadInputError(f"{where}: {tag}: {name} has nothing at {step.group(0)!r}") from None
    if isinstance(value, dict | list) or value is None:
        raise BadInputError(f"{where}: {tag} gives {value!r}, not a string, number or boolean")
    return format_value(value)


def substitute(text: str, scope: Mapping[str, str], where: str) -> str:
    """Replace every ``{{variable}}`` and ``{{=jsonpath(...)}}`` tag of ``text`` (one pass: a
    substituted value is never substituted again, as in Argo).

    Raises:
        BadInputError: a tag cannot be resolved in ``scope``, naming ``where``.
    """

    def replace(match: re.Match[str]) -> str:
        expression = match.group(1)
        if expression.startswith("="):
            return _jsonpath(match.group(0), expression[1:], scope, where)
        if expression not in scope:
            known = ", ".join(sorted(scope)) or "none"
            raise BadInputError(f"{where}: {match.group(0)} cannot be resolved here (available: {known})")
        return scope[expression]

    return VARIABLE.sub(replace, text)


def dependencies(task: Mapping[str, Any]) -> list[str]:
    """The tasks named by a task's ``depends`` (names joined by ``&&``; a bare name is satisfied by
    a Succeeded or Skipped task, as in Argo).

    Raises:
        BadInputError: ``depends`` uses more of Argo's language than names joined by ``&&``.
    """
    depends = str(task.get("depends") or "").strip()
    if not depends:
        return []
    names = [name.strip() for name in depends.split("&&")]
    for name in names:
        if not _TASK_NAME.fullmatch(name):
            raise BadInputError(
                f"task {task.get('name')!r}: depends {depends!r}: the local runner runs task names "
                f"joined by && only, not {name!r}"
            )
    return names


def entry_dag(doc: Mapping[str, Any]) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """The entrypoint DAG's tasks in dependency order (ties in document order), and the templates
    by name.

    Raises:
        BadInputError: no entrypoint DAG, a task field or template the runner cannot run, a
            dependency on an unknown task, or a cycle; nothing has run.
    """
    spec = doc["spec"]
    templates = {str(t.get("name")): t for t in spec.get("templates") or [] if isinstance(t, dict)}
    entry = templates.get(str(spec.get("entrypoint")))
    if entry is None or "dag" not in entry:
        raise BadInputError(f"spec.entrypoint {spec.get('entrypoint')!r} is not a DAG template of this workflow")
    tasks = {str(t.get("name")): t for t in (entry["dag"] or {}).get("tasks") or []}
    graph: dict[str, list[str]] = {}
    for name, task in tasks.items():
        where = f"task {name!r}"
        if extra := sorted(set(task) - TASK_FIELDS):
            raise BadInputError(f"{where} uses {', '.join(extra)}, which the local runner does not run")
        template = templates.get(str(task.get("template")))
        if template is None or not (template.get("container") or {}).get("command"):
            raise BadInputError(
                f"{where}: template {task.get('template')!r} is not a container template with a "
                "command (the local runner runs those only)"
            )
        graph[name] = dependencies(task)
        if unknown := [d for d in graph[name] if d not in tasks]:
            known = ", ".join(tasks)
            raise BadInputError(f"{where} depends on {unknown[0]!r}, which is not a task ({known})")
    order: list[str] = []
    while len(order) < len(graph):
        ready = [n for n in graph if n not in order and set(graph[n]) <= set(order)]
        if not ready:
            stuck = sorted(set(graph) - set(order))
            raise BadInputError(f"the tasks {', '.join(stuck)} depend on each other (a cycle)")
        order.append(ready[0])
    return [tasks[name] for name in order], templates
