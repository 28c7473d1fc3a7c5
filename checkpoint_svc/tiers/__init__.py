"""The cache tiers in front of SQL share one small contract.

Bodies are immutable, so any tier may serve a body by id; heads are mutable and
carry a version (the thread's event seq at the time) so that a late writer can
never move a head backwards.
"""

from __future__ import annotations

from typing import Protocol

from checkpoint_svc.domain import Checkpoint, PendingWrite, ThreadKey


class CacheTier(Protocol):
    async def get_body(self, key: ThreadKey, checkpoint_id: str) -> Checkpoint | None:
        """The checkpoint with this id, if this tier holds it."""
        ...

    async def put_bodies(self, checkpoints: list[Checkpoint]) -> None:
        """Keep these checkpoints (best effort)."""
        ...

    async def get_head(self, key: ThreadKey) -> str | None:
        """The head id, if this tier may answer heads and knows it."""
        ...

    async def set_heads(self, heads: dict[ThreadKey, tuple[str, int]]) -> None:
        """Move heads to (checkpoint_id, version) unless they hold a newer version."""
        ...

    async def drop_thread(self, key: ThreadKey) -> None:
        """Forget the thread's head (bodies expire on their own)."""
        ...


def is_special_write(idx: int) -> bool:
    """Negative indexes are special writes (errors, interrupts) that replace earlier ones."""
    return idx < 0


def merge_writes(existing: list[PendingWrite], new: list[PendingWrite]) -> list[PendingWrite]:
    """LangGraph's rule: a write is kept once, unless it is an upsert (see PendingWrite)."""
    by_slot = {(w.task_id, w.idx): w for w in existing}
    for w in new:
        slot = (w.task_id, w.idx)
        if slot not in by_slot or w.upsert:
            by_slot[slot] = w
    return list(by_slot.values())
