"""A run's state as JSON for every checkpoint, without encoding all of it every time.

A run's checkpoints grow with it (every node's output and duration), and every step saves
one: encoding the whole state each time makes a run of n steps cost O(n^2). `RunJson` keeps
each output and duration as encoded when the executor recorded it, and encodes the rest of
the run (small) in one call (docs/engine.md#checkpoints).
"""

from __future__ import annotations

import json
from typing import Any

# The fields that grow with the run, kept encoded entry by entry.
GROWING = ("outputs", "durations")


class _Entries:
    """One growing dict's entries, encoded."""

    __slots__ = ("index", "of", "pieces")

    def __init__(self) -> None:
        self.of: dict[str, Any] | None = None  # the dict they encode
        self.pieces: list[str] = []
        self.index: dict[str, int] = {}

    def put(self, key: str, value: Any) -> None:
        piece = f"{json.dumps(key)}: {json.dumps(value)}"
        at = self.index.get(key)
        if at is None:
            self.index[key] = len(self.pieces)
            self.pieces.append(piece)
        else:
            self.pieces[at] = piece

    def body(self, current: dict[str, Any]) -> str:
        if current is not self.of or len(current) != len(self.pieces):  # changed elsewhere
            self.of, self.pieces, self.index = current, [], {}
            for key, value in current.items():
                self.put(key, value)
        return "{" + ", ".join(self.pieces) + "}"


class RunJson:
    """The JSON of one run's state as an execution changes it.

    The executor records each output and duration here as it sets it (`put`); anything else
    that changed the run's dicts (a patch, a resume) is seen by their size or identity and
    encoded anew. An output is kept as encoded when recorded: a value a later node changed in
    place is saved as the node returned it, which is also what its pending write holds.
    """

    __slots__ = ("_growing",)

    def __init__(self) -> None:
        self._growing = {name: _Entries() for name in GROWING}

    def put(self, name: str, key: str, value: Any) -> None:
        """`run.<name>[key] = value` was just done: keep its encoding."""
        entries = self._growing[name]
        if entries.of is not None:
            entries.put(key, value)

    def encode(self, fields: dict[str, Any]) -> bytes:
        """The JSON of a run's `__dict__` (its growing dicts last)."""
        rest = json.dumps({k: v for k, v in fields.items() if k not in self._growing})
        parts = [rest[1:-1]] if len(rest) > 2 else []
        parts += (
            f"{json.dumps(name)}: {entries.body(fields[name])}"
            for name, entries in self._growing.items()
        )
        return ("{" + ", ".join(parts) + "}").encode()
