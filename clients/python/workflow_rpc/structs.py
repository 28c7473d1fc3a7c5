"""google.protobuf.Struct values as JSON would give them."""

from __future__ import annotations

from typing import Any

__all__ = ["plain"]


def plain(value: Any) -> Any:
    """A Struct's value (from json_format.MessageToDict) as JSON would give it: protobuf keeps
    every number as a double, so whole numbers come back as ints (an input of 20 formats as
    "20", not "20.0")."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value
