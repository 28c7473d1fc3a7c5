"""Safe expressions over a run's state, for `when` conditions and `transform` nodes.

Evaluated by simpleeval, never `eval`: no attribute access to dunder names, no imports, only
the functions listed here. Bounded, so that no expression can hold the engine's memory or time
(docs/security.md#nodes-that-cannot-escape): every intermediate value (a string, a list, a
number's bits) is checked as it is made, and the calls that could make a huge one (a power, a
repeat, a join, a pad, a replace) are checked before they run; an evaluation past its time
budget stops. Constant bombs (`9**4000000`) are refused at registration.
"""

from __future__ import annotations

import ast
import math
import re
import threading
import time
import types
from typing import Any

import simpleeval

__all__ = [
    "EVAL_SECONDS",
    "FUNCTIONS",
    "MAX_INT_BITS",
    "MAX_LENGTH",
    "PLACEHOLDER",
    "ExpressionError",
    "check",
    "evaluate",
]

# The whole vocabulary: pure functions of their arguments.
FUNCTIONS: dict[str, Any] = {
    "len": len,
    "min": min,
    "max": max,
    "sum": sum,
    "abs": abs,
    "round": round,
    "int": int,
    "float": float,
    "str": str,
    "bool": bool,
    "sorted": sorted,
    "any": any,
    "all": all,
    "floor": math.floor,
    "ceil": math.ceil,
}

# The longest string, list, tuple, set or dict an expression may make, at any step.
MAX_LENGTH = 100_000
# The largest integer, in bits (about 4,900 decimal digits), at any step.
MAX_INT_BITS = 16_384
# The CPU time one evaluation may take, in its own thread (a transform node's runs off the
# event loop; a `when` condition's or a placeholder's on it): CPU, not the clock, so that a
# busy machine does not fail expressions that would pass on an idle one.
EVAL_SECONDS = 1.0
# How many steps pass between looks at the clock.
_CLOCK_EVERY = 64
# The most an output or a str() may hold in all, counting what its parts hold (a list of one
# long string many times over is short, and huge once written out).
MAX_WEIGHT = 1_000_000
# The deepest an expression's syntax may nest.
MAX_DEPTH = 100
# The methods an expression may call, by type: simpleeval's list, less those that change a
# value in place (the run's own state: an expression reads it, never writes it) and those that
# build a large value in one C call no check sees before (to_bytes, translate, format); bytes
# not at all.
_MUTATORS = {
    "append", "extend", "insert", "pop", "remove", "reverse", "sort", "clear", "popitem",
    "setdefault", "update", "add", "discard", "difference_update", "intersection_update",
    "symmetric_difference_update",
}  # fmt: skip
_ALLOWED_ATTRS: dict[Any, set[str]] = {
    kind: names
    - _MUTATORS
    - {"to_bytes", "from_bytes", "translate", "maketrans", "format", "format_map"}
    for kind, names in simpleeval.BASIC_ALLOWED_ATTRS.items()
    if kind is not bytes
}
# Numbers in a %-format or a format spec (widths, precisions).
_SPEC_NUMBER = re.compile(r"\d+")

# `${expression}` in a string of an http or subworkflow config (nodes.render fills them in).
PLACEHOLDER = re.compile(r"\$\{([^}]+)\}")


class ExpressionError(ValueError):
    """An expression that does not parse, fails on the state it was given, or goes past its
    bounds."""


class _TooBig(simpleeval.InvalidExpression):
    pass


def _int_bits(value: Any) -> int:
    return value.bit_length() if isinstance(value, int) and not isinstance(value, bool) else 0


def _weight(value: Any, cap: int = MAX_WEIGHT) -> int:
    """What a value holds in all, counting shared parts each time (as writing it out would),
    stopping past `cap`."""
    total, stack = 0, [value]
    while stack and total <= cap:
        item = stack.pop()
        if isinstance(item, (str, bytes)):
            total += len(item)
        elif isinstance(item, dict):
            total += len(item)
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            total += len(item)
            stack.extend(item)
        else:
            total += 1
    return total


def _refuse_heavy(value: Any, what: str) -> None:
    if _weight(value) > MAX_WEIGHT:
        raise _TooBig(f"{what} holds more than the {MAX_WEIGHT} allowed")


def _refuse_spec(spec: str, what: str) -> None:
    for number in _SPEC_NUMBER.findall(spec):
        _refuse_length(int(number), what)


def _length_problem(value: Any) -> str | None:
    if isinstance(value, (str, bytes, list, tuple, dict, set, frozenset)):
        if len(value) > MAX_LENGTH:
            kind = "string" if isinstance(value, str) else type(value).__name__
            return f"a {kind} of {len(value)} is longer than the {MAX_LENGTH} allowed"
    elif (bits := _int_bits(value)) > MAX_INT_BITS:
        return f"a number of {bits} bits is past the {MAX_INT_BITS} allowed"
    return None


def _refuse_length(length: int, what: str) -> None:
    if length > MAX_LENGTH:
        raise _TooBig(
            f"{what} would be {length} long, which is longer than the {MAX_LENGTH} allowed"
        )


def _power(a: Any, b: Any) -> Any:
    if _int_bits(a) > 1 and isinstance(b, int) and b > 0:
        bits = b * (abs(a).bit_length() - 1)
        if bits > MAX_INT_BITS:
            digits = int(bits * math.log10(2))
            raise _TooBig(
                f"{a} ** {b} has about {digits} digits: past the {MAX_INT_BITS} bits allowed"
            )
    return a**b


def _mult(a: Any, b: Any) -> Any:
    for seq, n in ((a, b), (b, a)):
        if hasattr(seq, "__len__") and isinstance(n, int):
            _refuse_length(len(seq) * n, "a repeat")
    if _int_bits(a) + _int_bits(b) > MAX_INT_BITS:
        raise _TooBig(
            f"a product of {_int_bits(a) + _int_bits(b)} bits is past the {MAX_INT_BITS} allowed"
        )
    return a * b


def _add(a: Any, b: Any) -> Any:
    if hasattr(a, "__len__") and hasattr(b, "__len__"):
        _refuse_length(len(a) + len(b), "a sum of sequences")
    return a + b


def _mod(a: Any, b: Any) -> Any:
    if isinstance(a, str):  # %-formatting: a width or precision builds the string at once
        _refuse_spec(a, "a %-format")
        if "*" in a:
            for n in b if isinstance(b, tuple) else (b,):
                if isinstance(n, int):
                    _refuse_length(abs(n), "a %-format")
        _refuse_heavy(b, "a %-format's values")
    return a % b


def _lshift(a: Any, b: Any) -> Any:
    if isinstance(b, int) and _int_bits(a) + b > MAX_INT_BITS:
        raise _TooBig(f"{a} << {b} has {_int_bits(a) + b} bits: past the {MAX_INT_BITS} allowed")
    return a << b


_OPERATORS = {
    **simpleeval.DEFAULT_OPERATORS,
    ast.Pow: _power,
    ast.Mult: _mult,
    ast.Add: _add,
    ast.LShift: _lshift,
    ast.Mod: _mod,
}


def _round(number: Any, ndigits: Any = None) -> Any:
    if isinstance(ndigits, int) and abs(ndigits) > 1000:  # CPython builds 10**ndigits
        raise _TooBig(f"round(..., {ndigits}): ndigits beyond ±1000")
    return round(number) if ndigits is None else round(number, ndigits)


def _sum(values: Any, start: Any = 0) -> Any:
    if not isinstance(start, (int, float)):  # sum(lists, []) concatenates in one call
        raise _TooBig("sum() adds numbers only")
    return sum(values, start)


def _str(value: Any = "") -> str:
    _refuse_heavy(value, "str() of a value")
    return str(value)


# The functions as the evaluator calls them: those that can build a huge value checked first.
_CHECKED_FUNCTIONS = {**FUNCTIONS, "round": _round, "sum": _sum, "str": _str}
# simpleeval builds an evaluator under warnings.catch_warnings, which threads must not share.
_BUILDING = threading.Lock()


# The keyword arguments of the str methods _call_problem checks, in their positional order.
_KEYWORDS = {
    "ljust": ("width",),
    "rjust": ("width",),
    "center": ("width",),
    "zfill": ("width",),
    "expandtabs": ("tabsize",),
    "replace": ("old", "new", "count"),
}


def _call_problem(func: Any, args: list[Any], kwargs: dict[str, Any]) -> None:
    """Refuse a str method that would make a string past MAX_LENGTH, before it runs."""
    owner = getattr(func, "__self__", None)
    if not isinstance(owner, str):
        return
    name = getattr(func, "__name__", "")
    if kwargs:  # the same checks, whatever way the arguments come
        args = [*args, *(kwargs[k] for k in _KEYWORDS.get(name, ()) if k in kwargs)]
    if name == "join" and args and hasattr(args[0], "__iter__"):
        parts = args[0] = list(args[0])  # measured once, and joined as measured
        size = sum(len(p) for p in parts if isinstance(p, str)) + len(owner) * len(parts)
        _refuse_length(size, "a join")
    elif name in ("ljust", "rjust", "center", "zfill") and args and isinstance(args[0], int):
        _refuse_length(args[0], f"a {name}")
    elif name == "replace" and len(args) >= 2 and all(isinstance(a, str) for a in args[:2]):
        old, new = args[0], args[1]
        count = owner.count(old) if old else len(owner) + 1
        _refuse_length(len(owner) + (len(new) - len(old)) * count, "a replace")
    elif name == "expandtabs":
        width = args[0] if args and isinstance(args[0], int) else 8
        _refuse_length(len(owner) + owner.count("\t") * width, "an expandtabs")


class _Bounded(simpleeval.EvalWithCompoundTypes):
    """simpleeval's evaluator, every step of it checked (see the module's docstring)."""

    def __init__(self, names: dict[str, Any], seconds: float) -> None:
        with _BUILDING:
            super().__init__(
                names=names,
                functions=dict(_CHECKED_FUNCTIONS),  # simpleeval adds list, dict, ... to it
                operators=_OPERATORS,
                allowed_attrs=_ALLOWED_ATTRS,
            )
        self.seconds = seconds
        self.deadline = time.thread_time() + seconds
        self.steps = 0

    def parse(self, expr: str) -> ast.AST:
        try:
            return super().parse(expr)
        except SystemError:
            # CPython 3.11's parser has raised "AST constructor recursion depth mismatch" for a
            # shallow expression too, once in a full suite (coverage, xdist): once more. A truly
            # deep one fails again, and is refused as such (_TOO_DEEP).
            return super().parse(expr)

    def _eval(self, node: ast.AST) -> Any:
        self.steps += 1
        if self.steps % _CLOCK_EVERY == 0 and time.thread_time() > self.deadline:
            raise _TooBig(f"took more than {self.seconds}s of CPU")
        result = super()._eval(node)
        if (problem := _length_problem(result)) is not None:
            raise _TooBig(problem)
        return result

    def _check_disallowed_items(self, item: Any) -> None:
        """Only the value itself: names are JSON state and the functions a fixed list, so no
        container holds a forbidden function or module (simpleeval walks every container at
        every step: a CPU bomb of its own)."""
        if isinstance(item, types.ModuleType):
            raise simpleeval.FeatureNotAvailable("Sorry, modules are not allowed")
        if callable(item) and item in simpleeval.DISALLOW_FUNCTIONS:
            raise simpleeval.FeatureNotAvailable("This function is forbidden")

    def _eval_formattedvalue(self, node: ast.FormattedValue) -> Any:
        if node.format_spec is not None:
            spec = self._eval(node.format_spec)
            _refuse_spec(str(spec), "a format spec")
            value = self._eval(node.value)
            return ("{:" + str(spec) + "}").format(value)
        value = self._eval(node.value)
        _refuse_heavy(value, "a formatted value")
        return value

    def _eval_call(self, node: ast.Call) -> Any:
        if isinstance(node.func, ast.Attribute):
            func = self._eval(node.func)
        else:
            try:
                func = self.functions[node.func.id]  # type: ignore[attr-defined]
            except KeyError:
                raise simpleeval.FunctionNotDefined(node.func.id, self.expr) from None  # type: ignore[attr-defined]
            except AttributeError:
                raise simpleeval.FeatureNotAvailable("Lambda Functions not implemented") from None
        if func in simpleeval.DISALLOW_FUNCTIONS:
            raise simpleeval.FeatureNotAvailable("This function is forbidden")
        args = [self._eval(a) for a in node.args]
        kwargs = dict(self._eval(k) for k in node.keywords)
        _call_problem(func, args, kwargs)
        return func(*args, **kwargs)


def _evaluator(state: dict[str, Any], seconds: float = EVAL_SECONDS) -> _Bounded:
    # Names: the whole state as `state`, and each top-level key directly (node ids, input).
    names = {**state, "state": state, "true": True, "false": False, "null": None}
    return _Bounded(names, seconds)


def _constant_problem(tree: ast.AST) -> str | None:
    """A power, shift or repeat of constants past the bounds: evaluated (bounded) at once."""
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Pow, ast.LShift, ast.Mult)):
            if isinstance(node.left, ast.Constant | ast.List | ast.Tuple) and isinstance(
                node.right, ast.Constant
            ):
                try:
                    _evaluator({}).eval(ast.unparse(node))
                except _TooBig as exc:
                    return str(exc)
                except Exception:  # any other failure is the run's to see
                    continue
    return None


# What parsing or walking a too deeply nested expression raises. CPython 3.11's parser can
# raise SystemError ("AST constructor recursion depth mismatch") instead of RecursionError,
# depending on how deep the stack already is.
_TOO_DEEP = (RecursionError, MemoryError, SystemError)


def _depth(tree: ast.AST) -> int:
    deepest, stack = 0, [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > MAX_DEPTH:
            break
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))
    return deepest


def check(expression: str) -> str | None:
    """Why the expression is not valid, or None; run once at registration."""
    if not expression.strip():
        return "empty expression"
    try:
        tree = _evaluator({}).parse(expression)
    except (SyntaxError, simpleeval.InvalidExpression) as exc:
        return f"does not parse: {exc}"
    except _TOO_DEEP:
        return f"nests deeper than {MAX_DEPTH}"
    if _depth(tree) > MAX_DEPTH:
        return f"nests deeper than {MAX_DEPTH}"
    return _constant_problem(tree)


def evaluate(expression: str, state: dict[str, Any], seconds: float = EVAL_SECONDS) -> Any:
    """The expression's value on `state`, within `seconds` and the size bounds."""
    try:
        value = _evaluator(state, seconds).eval(expression)
        _refuse_heavy(value, "the value")  # it is written out as JSON next
        return value
    except _TooBig as exc:
        raise ExpressionError(f"{expression!r}: {exc}") from exc
    except _TOO_DEEP as exc:
        raise ExpressionError(f"{expression!r}: nests too deep") from exc
    except (
        SyntaxError,
        simpleeval.InvalidExpression,
        ArithmeticError,
        TypeError,
        KeyError,
        IndexError,
        ValueError,
    ) as exc:
        raise ExpressionError(f"{expression!r}: {type(exc).__name__}: {exc}") from exc
