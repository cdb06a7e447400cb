"""Offline checks of Argo documents, for the tests: what ``argo lint`` and the API server would say.

No Argo is available offline, and a JSON schema checks shapes only: nothing else notices a task
that depends on an unknown task, a template that does not exist or a parameter that is never
declared. :func:`lint` does (every rendering of the pipeline's YAML and of the chart goes through
it); :func:`schema_errors` with :func:`hera_schema` or :func:`argo_schema` catches misspelt keys and
wrong types; :func:`evaluate_text` evaluates Argo's expression language (expr-lang), e.g. a
``retryStrategy.expression`` on ``lastRetry``. The local runner (``sitsflow.runner``) executes only
the part of Argo the pipeline uses and refuses the rest; these checks cover the whole document.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any


class ExprError(ValueError):
    """An expression that does not parse, or cannot be evaluated."""


# --- Argo's expression language (the part templates reasonably use) --------------------------------

_TOKEN = re.compile(
    r"""\s*(?:
      (?P<number>\d+\.\d+|\d+)
    | (?P<string>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")
    | (?P<name>[A-Za-z_$][A-Za-z0-9_$]*)
    | (?P<op>==|!=|<=|>=|&&|\|\||[<>!+\-*/%?:.,()\[\]])
    )""",
    re.VERBOSE,
)
_WORD_OPS = {"and": "&&", "or": "||", "not": "!"}
_BINARY_WORDS = ("in", "matches", "contains", "startsWith", "endsWith")


@dataclass(frozen=True)
class Node:
    """A parsed expression: ``kind`` and its ``args`` (sub-nodes or values)."""

    kind: str  # lit, var, member, index, call, unary, binary, cond, list
    args: tuple[Any, ...]


def _tokens(text: str) -> list[tuple[str, Any]]:
    tokens: list[tuple[str, Any]] = []
    pos = 0
    text = text.rstrip()
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None or match.end() == pos:
            raise ExprError(f"expression {text!r}: unexpected {text[pos:].strip()[:20]!r}")
        pos = match.end()
        if match.group("number"):
            raw = match.group("number")
            tokens.append(("lit", float(raw) if "." in raw else int(raw)))
        elif match.group("string"):
            raw = match.group("string")
            body = raw[1:-1]
            tokens.append(
                (
                    "lit",
                    json.loads('"' + body.replace('"', '\\"') + '"')
                    if raw[0] == "'"
                    else json.loads(raw),
                )
            )
        elif match.group("name"):
            name = match.group("name")
            if name in ("true", "false"):
                tokens.append(("lit", name == "true"))
            elif name == "nil":
                tokens.append(("lit", None))
            elif name in _WORD_OPS:
                tokens.append(("op", _WORD_OPS[name]))
            elif name in _BINARY_WORDS:
                tokens.append(("op", name))
            else:
                tokens.append(("name", name))
        else:
            tokens.append(("op", match.group("op")))
    return tokens


def parse(text: str) -> Node:
    """Parse an expression (without the ``{{=`` and ``}}``).

    Raises:
        ExprError: a syntax error, naming the expression.
    """
    tokens = _tokens(text)
    pos = 0

    def peek(offset: int = 0) -> tuple[str, Any] | None:
        return tokens[pos + offset] if pos + offset < len(tokens) else None

    def take_op(op: str) -> bool:
        nonlocal pos
        if peek() == ("op", op):
            pos += 1
            return True
        return False

    def expect(op: str) -> None:
        if not take_op(op):
            found = "the end" if peek() is None else repr(peek()[1])  # type: ignore[index]
            raise ExprError(f"expression {text!r}: expected {op!r}, found {found}")

    def conditional() -> Node:
        cond = or_()
        if take_op("?"):
            yes = conditional()
            expect(":")
            no = conditional()
            return Node("cond", (cond, yes, no))
        return cond

    def binary_level(ops: tuple[str, ...], lower: Callable[[], Node]) -> Callable[[], Node]:
        def level() -> Node:
            nonlocal pos
            left = lower()
            while True:
                token = peek()
                if token is not None and token[0] == "op" and token[1] in ops:
                    pos += 1
                    left = Node("binary", (token[1], left, lower()))
                elif "in" in ops and token == ("op", "!") and peek(1) == ("op", "in"):  # "not in"
                    pos += 2
                    left = Node("unary", ("!", Node("binary", ("in", left, lower()))))
                else:
                    return left

        return level

    def unary() -> Node:
        nonlocal pos
        token = peek()
        if token is not None and token[0] == "op" and token[1] in ("!", "-", "+"):
            pos += 1
            return Node("unary", (token[1], unary()))
        return postfix()

    def postfix() -> Node:
        nonlocal pos
        node = primary()
        while True:
            if take_op("."):
                token = peek()
                if token is None or token[0] != "name":
                    raise ExprError(f"expression {text!r}: expected a name after '.'")
                pos += 1
                node = Node("member", (node, token[1]))
            elif take_op("["):
                index = conditional()
                expect("]")
                node = Node("index", (node, index))
            elif take_op("("):
                if node.kind == "member" and node.args[0] == Node("var", ("sprig",)):
                    node = Node("var", (f"sprig.{node.args[1]}",))  # Argo's sprig.<function>
                if node.kind != "var":
                    raise ExprError(f"expression {text!r}: only named functions can be called")
                args: list[Node] = []
                if not take_op(")"):
                    args.append(conditional())
                    while take_op(","):
                        args.append(conditional())
                    expect(")")
                node = Node("call", (node.args[0], tuple(args)))
            else:
                return node

    def primary() -> Node:
        nonlocal pos
        token = peek()
        if token is None:
            raise ExprError(f"expression {text!r}: unexpected end")
        pos += 1
        if token[0] == "lit":
            return Node("lit", (token[1],))
        if token[0] == "name":
            return Node("var", (token[1],))
        if token == ("op", "("):
            inner = conditional()
            expect(")")
            return inner
        if token == ("op", "["):
            items: list[Node] = []
            if not take_op("]"):
                items.append(conditional())
                while take_op(","):
                    items.append(conditional())
                expect("]")
            return Node("list", tuple(items))
        raise ExprError(f"expression {text!r}: unexpected {token[1]!r}")

    mul = binary_level(("*", "/", "%"), unary)
    add = binary_level(("+", "-"), mul)
    compare = binary_level(("<", ">", "<=", ">=", *_BINARY_WORDS), add)
    equal = binary_level(("==", "!="), compare)
    and_ = binary_level(("&&",), equal)
    or_ = binary_level(("||",), and_)

    if not tokens:
        raise ExprError("expression is empty")
    node = conditional()
    if pos != len(tokens):
        raise ExprError(f"expression {text!r}: unexpected {tokens[pos][1]!r}")
    return node


def references(node: Node) -> list[str]:
    """The dotted variable paths an expression reads (``tasks.prepare.outputs.result``, ...).

    Index access with a string literal counts as a member (``tasks['plan-training'].x``).
    """
    found: list[str] = []

    def path(n: Node) -> str | None:
        if n.kind == "var":
            return str(n.args[0])
        if n.kind == "member":
            base = path(n.args[0])
            return None if base is None else f"{base}.{n.args[1]}"
        if n.kind == "index" and n.args[1].kind == "lit" and isinstance(n.args[1].args[0], str):
            base = path(n.args[0])
            return None if base is None else f"{base}.{n.args[1].args[0]}"
        return None

    def visit(n: Node) -> None:
        full = path(n)
        if full is not None:
            found.append(full)
            return
        if n.kind == "call":
            for arg in n.args[1]:
                visit(arg)
            return
        for arg in n.args:
            if isinstance(arg, Node):
                visit(arg)

    visit(node)
    return found


def jsonpath(document: Any, path: str) -> Any:
    """Argo's ``jsonpath(json_text, '$.a.b[0]')`` for simple paths (keys and indexes only)."""
    data = json.loads(document) if isinstance(document, str) else document
    if not isinstance(path, str) or not path.startswith("$"):
        raise ExprError(f"jsonpath {path!r}: a path starts with '$'")
    for match in re.finditer(r"\.([A-Za-z0-9_-]+)|\[(\d+)\]|\['([^']*)'\]|(.)", path[1:]):
        key = match.group(1) or match.group(3)
        if match.group(4):
            raise ExprError(f"jsonpath {path!r}: only .key, ['key'] and [index] are supported")
        try:
            data = data[int(match.group(2))] if match.group(2) else data[key]
        except (KeyError, IndexError, TypeError):
            raise ExprError(f"jsonpath {path!r}: nothing at {match.group(0)!r}") from None
    return data


def _as_int(value: Any) -> int:
    try:
        return int(value) if not isinstance(value, str) else int(value.strip())
    except (TypeError, ValueError):
        raise ExprError(f"asInt({value!r}): not an integer") from None


def _as_float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ExprError(f"asFloat({value!r}): not a number") from None


FUNCTIONS: dict[str, Callable[..., Any]] = {
    "asInt": _as_int,
    "asFloat": _as_float,
    "string": lambda value: to_text(value),
    "jsonpath": jsonpath,
    "toJson": lambda value: json.dumps(value, separators=(",", ":")),
    "lower": lambda value: str(value).lower(),
    "upper": lambda value: str(value).upper(),
    "trim": lambda value: str(value).strip(),
    "len": len,
    # Argo's expression environment has sprig's functions under ``sprig.``
    "sprig.sha256sum": lambda value: hashlib.sha256(str(value).encode()).hexdigest(),
}


def to_text(value: Any) -> str:
    """A value as Argo writes an expression's result into a string (Go's ``%v``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e21:
        return str(int(value))
    if isinstance(value, str | int | float):
        return str(value)
    raise ExprError(
        f"the expression gives a {type(value).__name__} ({value!r}); wrap it in toJson() or "
        "pick a value"
    )


def evaluate(node: Node, env: Mapping[str, Any], text: str = "") -> Any:
    """Evaluate a parsed expression against ``env`` (nested maps of variables)."""

    def fail(message: str) -> ExprError:
        return ExprError(f"expression {text!r}: {message}")

    def ev(n: Node) -> Any:
        kind, args = n.kind, n.args
        if kind == "lit":
            return args[0]
        if kind == "list":
            return [ev(a) for a in args]
        if kind == "var":
            if args[0] not in env:
                raise fail(f"unknown variable {args[0]!r} (known: {', '.join(sorted(env))})")
            return env[args[0]]
        if kind in ("member", "index"):
            base = ev(args[0])
            key = args[1] if kind == "member" else ev(args[1])
            try:
                return base[key]
            except (KeyError, IndexError, TypeError):
                name = ".".join(references(n)) or str(key)
                raise fail(f"{name} is not defined here") from None
        if kind == "call":
            name, call_args = args
            if name not in FUNCTIONS:
                raise fail(
                    f"function {name}() is not supported locally (known: {', '.join(FUNCTIONS)})"
                )
            return FUNCTIONS[name](*(ev(a) for a in call_args))
        if kind == "unary":
            op, operand = args
            value = ev(operand)
            if op == "!":
                if not isinstance(value, bool):
                    raise fail(f"'!' needs a boolean, got {value!r}")
                return not value
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise fail(f"'{op}' needs a number, got {value!r}")
            return -value if op == "-" else value
        if kind == "cond":
            cond = ev(args[0])
            if not isinstance(cond, bool):
                raise fail(f"'?' needs a boolean condition, got {cond!r}")
            return ev(args[1]) if cond else ev(args[2])
        op, left_node, right_node = args
        left = ev(left_node)
        if op in ("&&", "||"):  # short-circuit, booleans only (as expr-lang)
            if not isinstance(left, bool):
                raise fail(f"{op!r} needs booleans, got {left!r}")
            if (op == "&&" and not left) or (op == "||" and left):
                return left
            right = ev(right_node)
            if not isinstance(right, bool):
                raise fail(f"{op!r} needs booleans, got {right!r}")
            return right
        right = ev(right_node)
        return _binary(op, left, right, fail)

    return ev(node)


def _binary(op: str, left: Any, right: Any, fail: Callable[[str], ExprError]) -> Any:
    if op == "==":
        return left == right and type(left) is type(right) or _numbers_equal(left, right)
    if op == "!=":
        return not (left == right and type(left) is type(right) or _numbers_equal(left, right))
    if op in ("matches", "contains", "startsWith", "endsWith"):
        if not isinstance(left, str) or not isinstance(right, str):
            raise fail(f"{op!r} needs strings, got {left!r} and {right!r}")
        if op == "matches":
            try:
                return re.search(right, left) is not None
            except re.error as exc:
                raise fail(f"bad regular expression {right!r}: {exc}") from None
        return {
            "contains": right in left,
            "startsWith": left.startswith(right),
            "endsWith": left.endswith(right),
        }[op]
    if op == "in":
        if isinstance(right, list | dict):
            return left in right
        raise fail(f"'in' needs a list or map on its right, got {right!r}")
    if op == "+" and isinstance(left, str) and isinstance(right, str):
        return left + right
    numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (left, right))
    if op in ("<", ">", "<=", ">="):
        if not (numeric or (isinstance(left, str) and isinstance(right, str))):
            raise fail(f"{op!r} compares numbers or strings, got {left!r} and {right!r}")
        return {"<": left < right, ">": left > right, "<=": left <= right, ">=": left >= right}[op]
    if not numeric:
        raise fail(f"{op!r} needs numbers, got {left!r} and {right!r}")
    if op == "+":
        return left + right
    if op == "-":
        return left - right
    if op == "*":
        return left * right
    if right == 0:
        raise fail("division by zero")
    if op == "%":
        if not (isinstance(left, int) and isinstance(right, int)):
            raise fail("'%' needs integers")
        return left % right
    return left / right


def _numbers_equal(left: Any, right: Any) -> bool:
    numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (left, right))
    return numeric and left == right


def evaluate_text(text: str, env: Mapping[str, Any]) -> Any:
    """Parse and evaluate ``text`` against ``env``."""
    return evaluate(parse(text), env, text)


# --- {{...}} tags and DAG depends ------------------------------------------------------------

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
_DEPENDS_TOKEN = re.compile(rf"\s*(?:(&&|\|\||!|\(|\))|({_NAME})(?:\.({_NAME}))?)")


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


def _depends_tokens(text: str) -> list[tuple[str, str | None]]:
    """Split a depends expression into ("op", "&&") and ("ref", "name[.Suffix]") tokens."""
    tokens: list[tuple[str, str | None]] = []
    pos = 0
    text = text.rstrip()
    while pos < len(text):
        match = _DEPENDS_TOKEN.match(text, pos)
        if match is None or match.end() == pos:
            raise ValueError(
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
        ValueError: a syntax error or an unknown result suffix, naming the expression.
    """
    tokens = _depends_tokens(text)
    pos = 0

    def peek() -> tuple[str, str | None] | None:
        return tokens[pos] if pos < len(tokens) else None

    def expect_op(op: str) -> None:
        nonlocal pos
        token = peek()
        if token != ("op", op):
            found = "the end" if token is None else repr(token[1])
            raise ValueError(f"depends {text!r}: expected {op!r}, found {found}")
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
                raise ValueError(
                    f"depends {text!r}: unknown result {name}.{suffix}; allowed: "
                    + ", ".join(sorted(DEPENDS_SUFFIXES))
                )
            return Ref(name, suffix)
        found = "the end" if token is None else repr(token[1])
        raise ValueError(f"depends {text!r}: expected a task name, found {found}")

    if not tokens:
        raise ValueError("depends is empty; name at least one task")
    expr = parse_or()
    if pos != len(tokens):
        raise ValueError(f"depends {text!r}: unexpected {tokens[pos][1]!r}")
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


# --- DAG structure ----------------------------------------------------------------------------


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


# --- lint -------------------------------------------------------------------------------------

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
        problems.append(f"{where}.retryPolicy: {policy!r}; allowed: {', '.join(_RETRY_POLICIES)}")
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
    """``{{item...}}`` appears only inside DAG tasks that have withParam/withItems/withSequence."""
    problems = []
    looping = {
        id(task)
        for task in dag_tasks(template)
        if {"withParam", "withItems", "withSequence"} & set(task)
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
                        "withParam, withItems or withSequence"
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
        except ValueError as exc:
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
        loops = [key for key in ("withParam", "withItems", "withSequence") if key in task]
        if len(loops) > 1:
            problems.append(f"{at}: use one of {', '.join(loops)}, not several")
        if "withSequence" in task:
            problems += _lint_sequence(task["withSequence"], f"{at}.withSequence")
    return problems


def _lint_sequence(sequence: Any, at: str) -> list[str]:
    """``withSequence``: ``count`` or ``end`` (not both; Argo's expandSequence), each value an
    integer or one ``{{...}}`` tag that Argo substitutes before it parses the integer."""
    if not isinstance(sequence, dict):
        return [f"{at}: {sequence!r} is not a mapping"]
    problems = []
    if ("count" in sequence) == ("end" in sequence):
        problems.append(f"{at}: give exactly one of count and end")
    for key in ("count", "start", "end"):
        if key in sequence and not _int_or_tag(sequence[key]):
            problems.append(f"{at}.{key}: {sequence[key]!r} is neither an integer nor a {{{{...}}}} tag")
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
