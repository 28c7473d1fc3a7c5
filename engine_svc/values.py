"""What the engine stores must read back: JSON values, finite, and not nested too deep.

A run's state travels as a `google.protobuf.Struct` (GetRun, WatchRun, GetRunHistory), and
protobuf refuses to parse messages nested more than 100 levels; each JSON level costs about
three of them (Struct, map entry, Value). A run whose input or a node output were deeper, or
held NaN or Infinity (which JSON cannot carry), could be saved but never read again. Every
value is checked before anything is written: client input here (INVALID_ARGUMENT, with the
field path), node outputs in the node runner (the node fails).
"""

from __future__ import annotations

import math
from typing import Any

from google.protobuf import json_format, struct_pb2

from workflow_rpc.statuses import InvalidArgument
from workflow_rpc.structs import plain

# JSON levels a value may nest: leaves room for the messages around a run's state and an
# event's payload (output inside payload inside Event inside StreamResponse).
MAX_DEPTH = 24
_TOO_BIG = 2**1023  # a Struct holds numbers as doubles


def problem_of(value: Any, where: str, max_depth: int = MAX_DEPTH) -> tuple[str, str] | None:
    """(field path, what is wrong) for the first part of `value` that cannot be stored."""
    stack: list[tuple[Any, str, int]] = [(value, where, 0)]
    while stack:
        item, path, depth = stack.pop()
        if isinstance(item, dict | list | tuple):  # json.dumps writes a tuple as a list
            if depth >= max_depth:
                return path, f"nested deeper than {max_depth} levels"
            children = item.items() if isinstance(item, dict) else enumerate(item)
            for k, v in children:
                if isinstance(item, dict) and not (k is None or isinstance(k, str | int | float)):
                    return path, f"keys must be strings, not {type(k).__name__}"  # as JSON
                if isinstance(k, str) and "\x00" in k:
                    return path, "keys must not contain NUL characters"
                child = f"{path}.{k}" if isinstance(item, dict) else f"{path}[{k}]"
                stack.append((v, child, depth + 1))
        elif isinstance(item, float) and not math.isfinite(item):
            return path, "must be a finite number (JSON has no NaN or Infinity)"
        elif isinstance(item, int) and not isinstance(item, bool) and abs(item) >= _TOO_BIG:
            return path, "a number too large for a double"
        elif isinstance(item, str) and "\x00" in item:
            return path, "must not contain NUL characters"
        elif not (item is None or isinstance(item, bool | int | float | str)):
            return path, f"not a JSON value: {type(item).__name__}"
    return None


def struct_problem(msg: struct_pb2.Struct | struct_pb2.Value, where: str) -> tuple[str, str] | None:
    """(field path, what is wrong) if a client's Struct cannot be stored and read back."""
    return _read(msg, where)[1]


def from_struct(msg: struct_pb2.Struct | struct_pb2.Value, where: str) -> Any:
    """A client's Struct (or Value) as a plain, storable value; InvalidArgument otherwise."""
    value, found = _read(msg, where)
    if found is not None:
        raise InvalidArgument(f"{found[0]}: {found[1]}", [found])
    return plain(value)


def _read(
    msg: struct_pb2.Struct | struct_pb2.Value, where: str
) -> tuple[Any, tuple[str, str] | None]:
    """A Struct as JSON gives it, and what is wrong with it (json_format would raise a bare
    ValueError on NaN or Infinity, so those are looked for first)."""
    found = _non_finite(msg, where)
    if found is not None:
        return None, (found, "must be a finite number (JSON has no NaN or Infinity)")
    value = json_format.MessageToDict(msg)
    return value, problem_of(value, where)


def _non_finite(msg: struct_pb2.Struct | struct_pb2.Value, where: str) -> str | None:
    """The path of a NaN or Infinity in a Struct."""
    stack: list[tuple[Any, str]] = [(msg, where)]
    while stack:
        item, path = stack.pop()
        if isinstance(item, struct_pb2.Struct):
            stack.extend((v, f"{path}.{k}") for k, v in item.fields.items())
        elif isinstance(item, struct_pb2.ListValue):
            stack.extend((v, f"{path}[{i}]") for i, v in enumerate(item.values))
        else:
            kind = item.WhichOneof("kind")
            if kind == "number_value" and not math.isfinite(item.number_value):
                return path
            if kind == "struct_value":
                stack.append((item.struct_value, path))
            elif kind == "list_value":
                stack.append((item.list_value, path))
    return None
