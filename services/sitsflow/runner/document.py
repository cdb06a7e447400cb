"""Reading a rendered Argo Workflow / WorkflowTemplate and the structure of its DAGs."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from sitsflow.errors import BadInputError, InputNotFoundError
from sitsflow.runner.expressions import referenced_tasks, task_dependencies

#: The kinds the runner executes (a ClusterWorkflowTemplate is a WorkflowTemplate cluster-wide).
KINDS = ("Workflow", "WorkflowTemplate", "ClusterWorkflowTemplate")


def default_workflow_path() -> Path:
    """The WorkflowTemplate ``sitsflow run`` executes.

    ``$SITSFLOW_WORKFLOW`` if set, else ``<repo>/workflows/sitsflow.yaml`` found relative to the
    installed package (``services/sitsflow/../../workflows``).
    """
    env = os.environ.get("SITSFLOW_WORKFLOW")
    if env:
        return Path(env)
    import sitsflow

    return Path(sitsflow.__file__).resolve().parents[2] / "workflows" / "sitsflow.yaml"


def load_workflow(path: str | Path) -> dict[str, Any]:
    """Read a Workflow or WorkflowTemplate YAML file into a dict.

    Raises:
        InputNotFoundError: the file does not exist.
        BadInputError: not YAML, or not an Argo Workflow/WorkflowTemplate.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise InputNotFoundError(
            f"workflow file {path} does not exist (set SITSFLOW_WORKFLOW or pass --workflow)"
        ) from exc
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise BadInputError(f"workflow file {path} is not valid YAML: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("kind") not in KINDS:
        kind = doc.get("kind") if isinstance(doc, dict) else type(doc).__name__
        raise BadInputError(
            f"workflow file {path} is a {kind!r}; expected one of {', '.join(KINDS)}"
        )
    return doc


def templates_by_name(doc: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``spec.templates`` keyed by name (the first of duplicated names wins)."""
    templates: dict[str, dict[str, Any]] = {}
    for template in (doc.get("spec") or {}).get("templates") or []:
        if isinstance(template, dict) and isinstance(template.get("name"), str):
            templates.setdefault(template["name"], template)
    return templates


def dag_tasks(template: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The tasks of a DAG template, in document order (empty for other templates)."""
    dag = template.get("dag") or {}
    return [task for task in dag.get("tasks") or [] if isinstance(task, dict)]


def direct_dependencies(tasks: list[dict[str, Any]]) -> dict[str, set[str]]:
    """Task name -> names of the tasks its ``depends``/``dependencies`` refer to."""
    graph: dict[str, set[str]] = {}
    for task in tasks:
        expr = task_dependencies(task)
        graph[str(task.get("name"))] = referenced_tasks(expr) if expr is not None else set()
    return graph


def ancestors(graph: Mapping[str, set[str]]) -> dict[str, set[str]]:
    """Task name -> every task it depends on, directly or transitively (cycles tolerated)."""
    result: dict[str, set[str]] = {}
    for name in graph:
        seen: set[str] = set()
        stack = list(graph[name])
        while stack:
            dep = stack.pop()
            if dep in seen:
                continue
            seen.add(dep)
            stack.extend(graph.get(dep, ()))
        result[name] = seen
    return result


def find_cycle(graph: Mapping[str, set[str]]) -> list[str] | None:
    """A dependency cycle as ``[a, b, ..., a]`` (each depends on the next), or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(name: str) -> list[str] | None:
        state[name] = 1
        path.append(name)
        for dep in sorted(graph.get(name, ())):
            if dep not in graph:
                continue
            if state.get(dep) == 1:
                return path[path.index(dep) :] + [dep]
            if dep not in state and (cycle := visit(dep)) is not None:
                return cycle
        path.pop()
        state[name] = 2
        return None

    for name in graph:
        if name not in state and (cycle := visit(name)) is not None:
            return cycle
    return None


def topological_order(tasks: list[dict[str, Any]]) -> list[str]:
    """The DAG's tasks in dependency order; ties keep document order (Kahn's algorithm).

    Raises:
        BadInputError: the dependencies form a cycle.
    """
    graph = direct_dependencies(tasks)
    order: list[str] = []
    done: set[str] = set()
    while len(order) < len(graph):
        ready = [n for n in graph if n not in done and graph[n] <= done | (graph[n] - graph.keys())]
        if not ready:
            cycle = find_cycle(graph) or sorted(set(graph) - done)
            raise BadInputError(f"DAG tasks form a dependency cycle: {' -> '.join(cycle)}")
        order.append(ready[0])
        done.add(ready[0])
    return order


def dag_order(doc: Mapping[str, Any], template: str | None = None) -> list[str]:
    """Topological order of the tasks of DAG ``template`` (default: the entrypoint)."""
    name = template or (doc.get("spec") or {}).get("entrypoint")
    templates = templates_by_name(doc)
    if name not in templates or "dag" not in templates[name]:
        raise BadInputError(f"template {name!r} is not a DAG template of this workflow")
    return topological_order(dag_tasks(templates[name]))
