"""Safe expressions over a run's state, for `when` conditions and `transform` nodes.

Evaluated by simpleeval, never `eval`: no attribute access to dunder names, no imports, only
the functions listed here, and bounded sizes (simpleeval's own limits on powers and strings).
"""

from __future__ import annotations

import math
import re
from typing import Any

import simpleeval

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


# `${expression}` in a string of an http or subworkflow config (nodes.render fills them in).
PLACEHOLDER = re.compile(r"\$\{([^}]+)\}")


class ExpressionError(ValueError):
    """An expression that does not parse, or fails on the state it was given."""


def _evaluator(state: dict[str, Any]) -> simpleeval.EvalWithCompoundTypes:
    # Names: the whole state as `state`, and each top-level key directly (node ids, input).
    names = {**state, "state": state, "true": True, "false": False, "null": None}
    return simpleeval.EvalWithCompoundTypes(names=names, functions=FUNCTIONS)


def check(expression: str) -> str | None:
    """Why the expression is not valid, or None; run once at registration."""
    if not expression.strip():
        return "empty expression"
    try:
        _evaluator({}).parse(expression)
    except (SyntaxError, simpleeval.InvalidExpression) as exc:
        return f"does not parse: {exc}"
    return None


def evaluate(expression: str, state: dict[str, Any]) -> Any:
    try:
        return _evaluator(state).eval(expression)
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
