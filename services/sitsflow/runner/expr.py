"""The subset of Argo's expression language (expr-lang) the pipeline uses, evaluated locally.

Argo evaluates ``{{=...}}`` tags and ``retryStrategy.expression`` with expr-lang. This module
parses and evaluates the part of that language a WorkflowTemplate reasonably needs, with the same
meaning: literals (``'text'``, ``"text"``, ``12``, ``1.5``, ``true``, ``false``, ``nil``,
``[a, b]``), variables with member and index access (``lastRetry.exitCode``,
``tasks.prepare.outputs.result``, ``inputs.parameters['my-param']``), ``! not - +`` (unary),
``* / %``, ``+ -`` (numbers; ``+`` joins strings), comparisons, ``in`` / ``not in``,
``matches`` (regular expression), ``contains``, ``startsWith``, ``endsWith``, ``&& and || or``
and ``cond ? a : b``; functions ``asInt``, ``asFloat``, ``string``, ``jsonpath``, ``toJson``,
``lower``, ``upper``, ``trim``, ``len``. Anything else is refused with a message (never guessed).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from sitsflow.errors import BadInputError

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


class ExprError(BadInputError):
    """An expression that does not parse, or cannot be evaluated (exit 2: the template is wrong)."""


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
            tokens.append(("lit", json.loads('"' + body.replace('"', '\\"') + '"')
                           if raw[0] == "'" else json.loads(raw)))
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
                elif (
                    "in" in ops and token == ("op", "!") and peek(1) == ("op", "in")
                ):  # "not in"
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
                raise fail(f"function {name}() is not supported locally (known: "
                           f"{', '.join(FUNCTIONS)})")
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
        return {"contains": right in left, "startsWith": left.startswith(right),
                "endsWith": left.endswith(right)}[op]
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
        return {"<": left < right, ">": left > right, "<=": left <= right,
                ">=": left >= right}[op]
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


def nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Argo's expression environment: ``{"a.b.c": v}`` becomes ``{"a": {"b": {"c": v}}}``.

    Where a name is both a value and a prefix (``item`` and ``item.region``), the map wins: the
    map's members are what expressions reach into.
    """
    env: dict[str, Any] = {}
    for key in sorted(flat, key=lambda k: k.count(".")):
        parts = key.split(".")
        node = env
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        if not isinstance(node.get(parts[-1]), dict):
            node[parts[-1]] = flat[key]
    return env


def evaluate_text(text: str, env: Mapping[str, Any]) -> Any:
    """Parse and evaluate ``text`` against ``env``."""
    return evaluate(parse(text), env, text)
