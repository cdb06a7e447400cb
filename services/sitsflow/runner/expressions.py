"""Argo's two small languages: ``{{...}}`` variables and DAG ``depends`` expressions.

Variables: ``{{workflow.parameters.x}}``, ``{{inputs.parameters.x}}``,
``{{tasks.X.outputs.result}}``, ``{{item}}``, ``{{item.key}}``, ``{{workflow.name}}``, ... are
replaced in one pass (a substituted value is never substituted again, as in Argo).

``depends`` (Argo's "enhanced depends logic"): task names combined with ``&&``, ``||``, ``!`` and
parentheses, each optionally suffixed with a result (``A.Succeeded``, ``A.Failed``, ...). A bare
``A`` means ``A.Succeeded || A.Skipped || A.Daemoned``. The legacy ``dependencies`` list means every
listed task, bare.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from sitsflow.errors import BadInputError

#: ``{{ expression }}``; the group is the expression without braces and surrounding blanks.
VARIABLE = re.compile(r"\{\{\s*([^{}]*?)\s*\}\}")

#: The results a ``depends`` reference may name (Argo's TaskResult fields).
DEPENDS_SUFFIXES = frozenset(
    {
        "Succeeded",
        "Failed",
        "Errored",
        "Skipped",
        "Omitted",
        "Daemoned",
        "AnySucceeded",
        "AllFailed",
    }
)

_NAME = r"[A-Za-z0-9_][A-Za-z0-9_-]*"
_TOKEN = re.compile(rf"\s*(?:(&&|\|\||!|\(|\))|({_NAME})(?:\.({_NAME}))?)")


def variables(text: str) -> list[str]:
    """The ``{{...}}`` expressions in ``text``, braces and blanks stripped, in order."""
    return VARIABLE.findall(text)


def walk_strings(obj: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """Every string value inside a YAML-like tree, with its dotted path (``a.b[2].c``)."""
    if isinstance(obj, str):
        yield path, obj
    elif isinstance(obj, Mapping):
        for key, value in obj.items():
            yield from walk_strings(value, f"{path}.{key}" if path else str(key))
    elif isinstance(obj, list):
        for index, value in enumerate(obj):
            yield from walk_strings(value, f"{path}[{index}]")


def format_value(value: Any) -> str:
    """A parameter value as Argo writes it into a string: JSON for maps/lists and booleans."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or value is None or isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"), sort_keys=True)
    return str(value)


def item_scope(item: Any) -> dict[str, str]:
    """The variables of one fan-out item: ``item`` and, for maps, ``item.key`` (nested: a.b)."""
    scope = {"item": format_value(item)}

    def add(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, sub in value.items():
                scope[f"{prefix}.{key}"] = format_value(sub)
                add(f"{prefix}.{key}", sub)

    add("item", item)
    return scope


def substitute(text: str, scope: Mapping[str, str], where: str) -> str:
    """Replace every ``{{expr}}`` in ``text`` by ``scope[expr]``.

    An expression tag (``{{=jsonpath(tasks.prepare.outputs.result, '$.config')}}``) is evaluated
    by :mod:`sitsflow.runner.expr` with ``scope`` as Argo's nested variables.

    Raises:
        BadInputError: a variable is not in ``scope`` (message names ``where``), or an expression
            does not parse or evaluate.
    """

    env: dict[str, Any] | None = None

    def replace(match: re.Match[str]) -> str:
        nonlocal env
        expr = match.group(1)
        if expr.startswith("="):
            from sitsflow.runner.expr import ExprError, evaluate_text, nest, to_text

            if env is None:
                env = nest(scope)
            try:
                return to_text(evaluate_text(expr[1:], env))
            except ExprError as exc:
                raise BadInputError(f"{where}: {match.group(0)}: {exc}") from None
        if expr not in scope:
            known = ", ".join(sorted(scope)) or "none"
            raise BadInputError(
                f"{where}: {match.group(0)} cannot be resolved here (available: {known})"
            )
        return scope[expr]

    return VARIABLE.sub(replace, text)


# --- depends ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ref:
    """``task`` or ``task.Suffix`` in a depends expression (suffix None = bare)."""

    task: str
    suffix: str | None = None


@dataclass(frozen=True)
class Not:
    """``!operand``."""

    operand: Expr


@dataclass(frozen=True)
class BoolOp:
    """``a && b && ...`` (op "&&") or ``a || b || ...`` (op "||")."""

    op: str
    operands: tuple[Expr, ...]


Expr = Ref | Not | BoolOp


def _tokens(text: str) -> list[tuple[str, str | None]]:
    """Split a depends expression into ("op", "&&") and ("ref", "name[.Suffix]") tokens."""
    tokens: list[tuple[str, str | None]] = []
    pos = 0
    text = text.rstrip()
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None or match.end() == pos:
            raise BadInputError(
                f"depends {text!r}: unexpected {text[pos:].strip()!r} at column {pos + 1}; "
                "allowed: task names, .Succeeded-style suffixes, &&, ||, !, parentheses"
            )
        if match.group(1):
            tokens.append(("op", match.group(1)))
        else:
            tokens.append(("ref", match.group(2)))
            tokens.append(("suffix", match.group(3)))
        pos = match.end()
    return tokens


def parse_depends(text: str) -> Expr:
    """Parse an Argo ``depends`` expression.

    Raises:
        BadInputError: a syntax error or an unknown result suffix, naming the expression.
    """
    tokens = _tokens(text)
    pos = 0

    def peek() -> tuple[str, str | None] | None:
        return tokens[pos] if pos < len(tokens) else None

    def expect_op(op: str) -> None:
        nonlocal pos
        token = peek()
        if token != ("op", op):
            found = "the end" if token is None else repr(token[1])
            raise BadInputError(f"depends {text!r}: expected {op!r}, found {found}")
        pos += 1

    def parse_or() -> Expr:
        operands = [parse_and()]
        while peek() == ("op", "||"):
            expect_op("||")
            operands.append(parse_and())
        return operands[0] if len(operands) == 1 else BoolOp("||", tuple(operands))

    def parse_and() -> Expr:
        operands = [parse_unary()]
        while peek() == ("op", "&&"):
            expect_op("&&")
            operands.append(parse_unary())
        return operands[0] if len(operands) == 1 else BoolOp("&&", tuple(operands))

    def parse_unary() -> Expr:
        nonlocal pos
        token = peek()
        if token == ("op", "!"):
            pos += 1
            return Not(parse_unary())
        if token == ("op", "("):
            pos += 1
            inner = parse_or()
            expect_op(")")
            return inner
        if token is not None and token[0] == "ref":
            name = token[1]
            suffix = tokens[pos + 1][1]
            pos += 2
            assert name is not None
            if suffix is not None and suffix not in DEPENDS_SUFFIXES:
                raise BadInputError(
                    f"depends {text!r}: unknown result {name}.{suffix}; allowed: "
                    + ", ".join(sorted(DEPENDS_SUFFIXES))
                )
            return Ref(name, suffix)
        found = "the end" if token is None else repr(token[1])
        raise BadInputError(f"depends {text!r}: expected a task name, found {found}")

    if not tokens:
        raise BadInputError("depends is empty; name at least one task")
    expr = parse_or()
    if pos != len(tokens):
        raise BadInputError(f"depends {text!r}: unexpected {tokens[pos][1]!r}")
    return expr


def referenced_tasks(expr: Expr) -> set[str]:
    """The task names an expression refers to."""
    if isinstance(expr, Ref):
        return {expr.task}
    if isinstance(expr, Not):
        return referenced_tasks(expr.operand)
    return set().union(*(referenced_tasks(operand) for operand in expr.operands))


def task_dependencies(task: Mapping[str, Any]) -> Expr | None:
    """The dependency expression of a DAG task (``depends`` or ``dependencies``), None if none."""
    depends = task.get("depends")
    dependencies = task.get("dependencies")
    if depends is not None and str(depends).strip():
        return parse_depends(str(depends))
    if dependencies:
        refs = tuple(Ref(str(name)) for name in dependencies)
        return refs[0] if len(refs) == 1 else BoolOp("&&", refs)
    return None


def evaluate(expr: Expr, result: Callable[[str, str], bool]) -> bool:
    """Evaluate ``expr``; ``result(task, suffix)`` says whether a task has that result.

    A bare reference is ``Succeeded || Skipped || Daemoned`` (Argo's expansion).
    """
    if isinstance(expr, Ref):
        if expr.suffix is None:
            return any(result(expr.task, s) for s in ("Succeeded", "Skipped", "Daemoned"))
        return result(expr.task, expr.suffix)
    if isinstance(expr, Not):
        return not evaluate(expr.operand, result)
    values = (evaluate(operand, result) for operand in expr.operands)
    return all(values) if expr.op == "&&" else any(values)
