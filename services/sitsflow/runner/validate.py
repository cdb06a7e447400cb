"""Checks of an Argo Workflow/WorkflowTemplate: a semantic lint and strict JSON-schema checks.

No ``argo lint`` is available offline, and a JSON schema checks shapes only: nothing else notices a
task that depends on an unknown task, a template that does not exist or a parameter that is never
declared. :func:`lint` does; :func:`schema_errors` with :func:`hera_schema` or :func:`argo_schema`
catches misspelt keys and wrong types.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

from sitsflow.errors import BadInputError
from sitsflow.runner.document import (
    ancestors,
    dag_tasks,
    find_cycle,
    templates_by_name,
)
from sitsflow.runner.expr import ExprError, Node, parse, references
from sitsflow.runner.expressions import (
    VARIABLE,
    referenced_tasks,
    task_dependencies,
    walk_strings,
)

#: Roots of the variables Argo defines; anything else (``{{input.parameters.x}}``) is a typo.
KNOWN_VARIABLE_ROOTS = frozenset(
    {"inputs", "outputs", "workflow", "tasks", "steps", "item", "pod", "node", "retries",
     "lastRetry", "cronworkflow", "status", "exitCode", "duration"}
)  # fmt: skip

_INPUT_PARAM = re.compile(r"^inputs\.parameters\.(.+)$")
_WORKFLOW_PARAM = re.compile(r"^workflow\.parameters\.(.+)$")
_TASK_REF = re.compile(r"^tasks\.([^.]+)(?:\.(.*))?$")
_WITH_PARAM = re.compile(
    r"^\{\{\s*(tasks\.[^.{}]+\.outputs\.(?:result|parameters\.[^{}\s]+)"
    r"|inputs\.parameters\.[^{}\s]+|workflow\.parameters\.[^{}\s]+)\s*\}\}$"
)


def variables(text: str) -> list[str]:
    """The variables a string reads: plain ``{{x.y}}`` tags, and the variables of expression tags
    (``{{=jsonpath(tasks.prepare.outputs.result, '$.config')}}`` reads
    ``tasks.prepare.outputs.result``; ``tasks['plan-training']`` reads ``tasks.plan-training``).
    Expression tags that do not parse read nothing (:func:`_lint_expressions` reports them).
    """
    found: list[str] = []
    for tag in VARIABLE.findall(text):
        if not tag.startswith("="):
            found.append(tag)
            continue
        try:
            node = parse(tag[1:])
        except ExprError:
            continue
        found += references(node)
    return found


def _expression_roots(node: Node) -> set[str]:
    return {ref.split(".", 1)[0] for ref in references(node)}


def _lint_expressions(spec: Mapping[str, Any]) -> list[str]:
    """Every ``{{=...}}`` tag parses; every ``retryStrategy`` is one Argo can apply."""
    problems: list[str] = []
    for path, text in walk_strings(spec, "spec"):
        for tag in VARIABLE.findall(text):
            if tag.startswith("="):
                try:
                    parse(tag[1:])
                except ExprError as exc:
                    problems.append(f"{path}: {{{{{tag}}}}} does not parse: {exc}")
    for index, template in enumerate(spec.get("templates") or []):
        if not isinstance(template, dict):
            continue
        where = f"spec.templates[{index}] ({template.get('name')})"
        problems += _lint_retry(template.get("retryStrategy"), f"{where}.retryStrategy")
        problems += _lint_pod_spec_patch(template.get("podSpecPatch"), f"{where}.podSpecPatch")
        deadline = template.get("activeDeadlineSeconds")
        if deadline is not None and not _int_or_tag(deadline, minimum=1):
            problems.append(
                f"{where}.activeDeadlineSeconds: {deadline!r} is neither a positive number of "
                "seconds nor a {{...}} parameter"
            )
    if spec.get("templateDefaults"):
        problems += _lint_retry(
            (spec["templateDefaults"] or {}).get("retryStrategy"),
            "spec.templateDefaults.retryStrategy",
        )
    return problems


def _int_or_tag(value: Any, minimum: int = 0) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return value >= minimum
    text = str(value).strip()
    return (text.isdigit() and int(text) >= minimum) or bool(VARIABLE.fullmatch(text))


_RETRY_POLICIES = ("Always", "OnFailure", "OnError", "OnTransientError")
_GO_DURATION = re.compile(r"^(?:\d+(?:\.\d+)?(?:ns|us|µs|ms|s|m|h))+$|^\d+$")


def _lint_retry(strategy: Any, where: str) -> list[str]:
    """limit, retryPolicy, backoff durations and the expression (on ``lastRetry`` only)."""
    if strategy is None:
        return []
    if not isinstance(strategy, dict):
        return [f"{where}: must be a mapping"]
    problems = []
    if "limit" in strategy and not _int_or_tag(strategy["limit"]):
        problems.append(f"{where}.limit: {strategy['limit']!r} is not a whole number")
    policy = strategy.get("retryPolicy")
    if policy is not None and policy not in _RETRY_POLICIES:
        problems.append(
            f"{where}.retryPolicy: {policy!r}; allowed: {', '.join(_RETRY_POLICIES)}"
        )
    for key in ("duration", "maxDuration", "cap"):
        value = (strategy.get("backoff") or {}).get(key)
        if value is not None and not (
            _GO_DURATION.match(str(value)) or VARIABLE.fullmatch(str(value))
        ):
            problems.append(f"{where}.backoff.{key}: {value!r} is not a duration (30s, 1m, 2h)")
    expression = strategy.get("expression")
    if expression is not None:
        try:
            roots = _expression_roots(parse(str(expression)))
        except ExprError as exc:
            problems.append(f"{where}.expression does not parse: {exc}")
        else:
            for root in sorted(roots - {"lastRetry"}):
                problems.append(
                    f"{where}.expression reads {root!r}; a retry expression sees lastRetry "
                    "(exitCode, status, duration, message) only"
                )
    return problems


def _lint_pod_spec_patch(patch: Any, where: str) -> list[str]:
    """A podSpecPatch is a JSON object once its tags are substituted; it patches ``main``."""
    if patch is None:
        return []
    text = VARIABLE.sub("null", str(patch))  # a tag stands for a value, quoted or not
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return [f"{where}: not JSON once its {{{{...}}}} tags are filled in ({exc})"]
    if not isinstance(value, dict):
        return [f"{where}: must be a JSON object (a pod spec patch)"]
    problems = []
    for entry in value.get("containers") or []:
        if not isinstance(entry, dict) or entry.get("name") != "main":
            problems.append(
                f"{where}: patches container {entry.get('name') if isinstance(entry, dict) else entry!r}; "
                "Argo names a template's container 'main'"
            )
    return problems


def _names(params: Iterable[Any] | None) -> list[str]:
    return [str(p["name"]) for p in params or [] if isinstance(p, dict) and "name" in p]


def _input_parameters(template: Mapping[str, Any]) -> list[dict[str, Any]]:
    inputs = template.get("inputs") or {}
    return [p for p in inputs.get("parameters") or [] if isinstance(p, dict)]


def _lint_variables(spec: Mapping[str, Any], declared_workflow: set[str]) -> list[str]:
    """Unknown variable roots and undeclared ``{{workflow.parameters.x}}`` anywhere in the spec."""
    problems: list[str] = []
    for path, text in walk_strings(spec, "spec"):
        for expr in variables(text):
            root = expr.split(".", 1)[0]
            if root not in KNOWN_VARIABLE_ROOTS:
                problems.append(f"{path}: unknown variable {{{{{expr}}}}}")
            match = _WORKFLOW_PARAM.match(expr)
            if match and match.group(1) not in declared_workflow:
                problems.append(
                    f"{path}: {{{{{expr}}}}} is not declared in spec.arguments.parameters "
                    f"(declared: {', '.join(sorted(declared_workflow)) or 'none'})"
                )
    return problems


def _lint_template_inputs(template: Mapping[str, Any], where: str) -> list[str]:
    """Every ``{{inputs.parameters.x}}`` of a template is declared in its inputs."""
    declared = set(_names(_input_parameters(template)))
    problems = []
    for path, text in walk_strings(template, where):
        for expr in variables(text):
            match = _INPUT_PARAM.match(expr)
            if match and match.group(1) not in declared:
                problems.append(
                    f"{path}: {{{{{expr}}}}} is not declared in the inputs of template "
                    f"{template.get('name')!r} (declared: {', '.join(sorted(declared)) or 'none'})"
                )
    return problems


def _lint_items_outside_loops(template: Mapping[str, Any], where: str) -> list[str]:
    """``{{item...}}`` appears only inside DAG tasks that have withParam/withItems."""
    problems = []
    looping = {
        id(task) for task in dag_tasks(template) if "withParam" in task or "withItems" in task
    }
    pieces: list[tuple[str, Any]] = [
        (f"{where}.{key}", value) for key, value in template.items() if key != "dag"
    ]
    for index, task in enumerate(dag_tasks(template)):
        if id(task) not in looping:
            pieces.append((f"{where}.dag.tasks[{index}]", task))
    for path_root, piece in pieces:
        for path, text in walk_strings(piece, path_root):
            for expr in variables(text):
                if expr == "item" or expr.startswith("item."):
                    problems.append(
                        f"{path}: {{{{{expr}}}}} is only valid in a DAG task with "
                        "withParam or withItems"
                    )
    return problems


def _lint_dag(
    template: Mapping[str, Any], where: str, templates: Mapping[str, Mapping[str, Any]]
) -> list[str]:
    """Task templates, arguments, dependencies, task references and withParam of one DAG."""
    problems: list[str] = []
    tasks = dag_tasks(template)
    names = [str(task.get("name")) for task in tasks]
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"{where}: task name {name!r} is used more than once")
    graph: dict[str, set[str]] = {}
    for index, task in enumerate(tasks):
        name = str(task.get("name"))
        at = f"{where}.dag.tasks[{index}] ({name})"
        if "depends" in task and "dependencies" in task:
            problems.append(f"{at}: use either depends or dependencies, not both")
        try:
            expr = task_dependencies(task)
        except BadInputError as exc:
            problems.append(f"{at}: {exc}")
            expr = None
        deps = set() if expr is None else referenced_tasks(expr)
        for dep in sorted(deps - set(names)):
            problems.append(
                f"{at}: depends on {dep!r}, which is not a task of DAG {template.get('name')!r} "
                f"(tasks: {', '.join(names)})"
            )
        graph[name] = deps & set(names)
        problems += _lint_task_template(task, at, templates)
    cycle = find_cycle(graph)
    if cycle:
        problems.append(
            f"{where}: dependency cycle {' -> '.join(cycle)} (each depends on the next)"
        )
    upstream = ancestors(graph)
    for index, task in enumerate(tasks):
        name = str(task.get("name"))
        at = f"{where}.dag.tasks[{index}] ({name})"
        for path, text in walk_strings(task, at):
            for variable in variables(text):
                match = _TASK_REF.match(variable)
                if match and match.group(1) not in upstream.get(name, set()):
                    ref = match.group(1)
                    reason = "which it does not depend on" if ref in names else "no such task"
                    problems.append(f"{path}: {{{{{variable}}}}} refers to task {ref!r}, {reason}")
        if "withParam" in task:
            value = task["withParam"]
            if not isinstance(value, str) or not _WITH_PARAM.match(value.strip()):
                problems.append(
                    f"{at}.withParam: {value!r} must be one reference to a task output "
                    "({{tasks.X.outputs.result}}) or to a parameter"
                )
        if "withParam" in task and "withItems" in task:
            problems.append(f"{at}: use either withParam or withItems, not both")
    return problems


def _lint_task_template(
    task: Mapping[str, Any], at: str, templates: Mapping[str, Mapping[str, Any]]
) -> list[str]:
    """The task's template exists; it is passed every required input and no undeclared one."""
    if "templateRef" in task or "inline" in task:
        return []
    if "template" not in task:
        return [f"{at}: no template (set template, templateRef or inline)"]
    name = str(task["template"])
    if name not in templates:
        return [f"{at}: template {name!r} does not exist (templates: {', '.join(templates)})"]
    inputs = _input_parameters(templates[name])
    declared = _names(inputs)
    passed = _names((task.get("arguments") or {}).get("parameters"))
    problems = []
    for param in inputs:
        if param["name"] not in passed and "default" not in param and "value" not in param:
            problems.append(
                f"{at}: input parameter {param['name']!r} of template {name!r} is not passed "
                "and has no default"
            )
    for extra in passed:
        if extra not in declared:
            problems.append(
                f"{at}: passes parameter {extra!r}, which template {name!r} does not declare "
                f"(inputs: {', '.join(declared) or 'none'})"
            )
    return problems


def lint(doc: Mapping[str, Any]) -> list[str]:
    """Semantic problems of an Argo Workflow/WorkflowTemplate, one message each (empty: fine).

    Checks: the entrypoint and every task's template exist; ``depends``/``dependencies`` name
    tasks of the same DAG and form no cycle; every ``{{inputs.parameters.x}}`` is declared by its
    template and every ``{{workflow.parameters.x}}`` in ``spec.arguments``; every task passes each
    input without a default and nothing undeclared; every ``{{tasks.X...}}`` and ``withParam``
    names a task the referencing task depends on (directly or transitively); ``{{item...}}`` only
    in looping tasks; no unknown variable roots. Expression tags (``{{=...}}``) parse, and the
    variables they read obey the same rules; ``podSpecPatch`` is a JSON object once its tags are
    filled in and patches the container ``main``; ``activeDeadlineSeconds`` and
    ``retryStrategy`` (limit, retryPolicy, backoff durations, an expression on ``lastRetry``
    only) are values Argo accepts.
    """
    spec = doc.get("spec")
    if not isinstance(spec, dict):
        return ["spec is missing or not a mapping"]
    raw_templates = spec.get("templates")
    if not isinstance(raw_templates, list) or not raw_templates:
        return ["spec.templates is missing or empty"]
    templates = templates_by_name(doc)
    problems: list[str] = []
    all_names = [t.get("name") for t in raw_templates if isinstance(t, dict)]
    for name in sorted({str(n) for n in all_names if all_names.count(n) > 1}):
        problems.append(f"spec.templates: template name {name!r} is used more than once")
    entrypoint = spec.get("entrypoint")
    if not entrypoint:
        problems.append("spec.entrypoint is not set")
    elif entrypoint not in templates:
        problems.append(
            f"spec.entrypoint: template {entrypoint!r} does not exist "
            f"(templates: {', '.join(templates)})"
        )
    declared = set(_names((spec.get("arguments") or {}).get("parameters")))
    problems += _lint_variables(spec, declared)
    problems += _lint_expressions(spec)
    for index, template in enumerate(raw_templates):
        if not isinstance(template, dict):
            problems.append(f"spec.templates[{index}] is not a mapping")
            continue
        where = f"spec.templates[{index}] ({template.get('name')})"
        problems += _lint_template_inputs(template, where)
        problems += _lint_items_outside_loops(template, where)
        if "dag" in template:
            problems += _lint_dag(template, where, templates)
    return problems


def check(doc: Mapping[str, Any], source: str = "workflow") -> None:
    """Raise :class:`BadInputError` listing every :func:`lint` problem of ``doc``."""
    problems = lint(doc)
    if problems:
        raise BadInputError(
            f"{source} has {len(problems)} problem(s):\n" + "\n".join(f"- {p}" for p in problems)
        )


# --- JSON schemas ------------------------------------------------------------------------------


def _subschemas(schema: Any) -> Iterable[dict[str, Any]]:
    """Every (sub)schema dict inside a JSON schema, the schema itself included."""
    if not isinstance(schema, dict):
        return
    yield schema
    for key in ("definitions", "$defs", "properties", "patternProperties"):
        for sub in (schema.get(key) or {}).values():
            yield from _subschemas(sub)
    for key in ("items", "additionalProperties", "not", "if", "then", "else", "contains"):
        if isinstance(schema.get(key), dict):
            yield from _subschemas(schema[key])
    for key in ("anyOf", "oneOf", "allOf", "prefixItems"):
        for sub in schema.get(key) or []:
            yield from _subschemas(sub)


def strict_schema(schema: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``schema`` where every object schema with ``properties`` rejects unknown keys.

    Argo's and Hera's schemas let unknown keys through, so a misspelt key (``withParams``,
    ``agrs``) would pass silently; here it fails. Schemas that already say something about
    additional properties, or preserve unknown fields (``x-kubernetes-preserve-unknown-fields``),
    are left alone.
    """
    strict = copy.deepcopy(dict(schema))
    for sub in _subschemas(strict):
        if (
            isinstance(sub.get("properties"), dict)
            and "additionalProperties" not in sub
            and not sub.get("x-kubernetes-preserve-unknown-fields")
        ):
            sub["additionalProperties"] = False
    return strict


#: Argo's official schema types these Kubernetes int-or-string / quantity definitions as
#: ``string`` only, yet Kubernetes and Argo accept ``port: 8080``, ``cpu: 2`` or
#: ``nvidia.com/gpu: 1`` (YAML numbers). :func:`argo_schema` widens them to what the API accepts.
ARGO_RELAXED = {
    "io.k8s.apimachinery.pkg.util.intstr.IntOrString": {"type": ["string", "integer"]},
    "io.k8s.apimachinery.pkg.api.resource.Quantity": {"type": ["string", "number"]},
}


def argo_schema(official: Mapping[str, Any]) -> dict[str, Any]:
    """Argo's official JSON schema made strict (:func:`strict_schema`) with int-or-string relaxed.

    The definitions in :data:`ARGO_RELAXED` keep their descriptions; only the type widens.
    """
    schema = strict_schema(official)
    definitions = schema.get("definitions") or {}
    for name, relaxed in ARGO_RELAXED.items():
        if name in definitions:
            definitions[name] = {**definitions[name], **relaxed}
    return schema


def _drop_nullable(schema: Any) -> None:
    """Turn pydantic's ``anyOf: [X, {type: null}]`` into ``X`` (in place).

    Hera never writes nulls, and without the wrapper a wrong nested key is reported where it is,
    not as "not valid under any of the given schemas" at the top.
    """
    for sub in list(_subschemas(schema)):
        options = sub.get("anyOf")
        if isinstance(options, list) and {"type": "null"} in options:
            rest = [option for option in options if option != {"type": "null"}]
            del sub["anyOf"]
            sub.pop("default", None)
            if len(rest) == 1:
                sub.update(rest[0])
            else:
                sub["anyOf"] = rest


def hera_schema() -> dict[str, Any]:
    """Hera's WorkflowTemplate JSON schema (Argo v4.0.5 models), made strict."""
    from hera.workflows.models import WorkflowTemplate

    schema = WorkflowTemplate.model_json_schema(by_alias=True)
    _drop_nullable(schema)
    return strict_schema(schema)


def _root_for_kind(schema: Mapping[str, Any], kind: Any) -> dict[str, Any]:
    """Point a multi-kind schema (root ``oneOf`` of definitions) at the definition of ``kind``.

    Errors then name the offending key instead of "not valid under any of the given schemas".
    """
    for option in schema.get("oneOf") or []:
        ref = option.get("$ref", "") if isinstance(option, dict) else ""
        if isinstance(kind, str) and ref.rsplit(".", 1)[-1] == kind:
            rooted = {k: v for k, v in schema.items() if k not in ("oneOf", "type")}
            rooted["$ref"] = ref
            return rooted
    return dict(schema)


def _path(error: Any) -> str:
    """``$.spec.templates[3].container`` for a jsonschema ValidationError."""
    parts = [f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path]
    return ("$" + "".join(parts)) if parts else "$"


def schema_errors(doc: Mapping[str, Any], schema: Mapping[str, Any]) -> list[str]:
    """Every JSON-schema error of ``doc`` as ``"$.path.to.key: message"`` (empty: valid).

    A schema whose root is a ``oneOf`` of kinds (Argo's) is applied through the definition that
    matches ``doc["kind"]``.
    """
    import jsonschema  # only the schema checks need it; lint() does not

    rooted = _root_for_kind(schema, doc.get("kind"))
    validator_class = jsonschema.validators.validator_for(rooted, jsonschema.Draft202012Validator)
    validator = validator_class(rooted)
    messages = []
    for error in sorted(validator.iter_errors(dict(doc)), key=lambda e: list(map(str, e.path))):
        best = jsonschema.exceptions.best_match([error])
        messages.append(f"{_path(best)}: {best.message}")
    return messages
