"""The cache tiers in front of SQL share one small contract.

SQL names every checkpoint a Restore returns, with its metadata and pending writes; a cache
only supplies the state of the checkpoint SQL named. States never change, and a cache keys
them by the checkpoint's identity (thread, id and creation time), so what it answers is
never older than SQL (docs/checkpoint-service.md#tiers).
"""

from __future__ import annotations

from typing import Protocol

from checkpoint_svc.domain import Checkpoint, PendingWrite, Tier


class StateCache(Protocol):
    tier: Tier

    async def state_of(self, named: Checkpoint) -> bytes | None:
        """The state of the checkpoint SQL named, if this tier holds that very checkpoint."""
        ...

    async def put_states(self, checkpoints: list[Checkpoint]) -> None:
        """Keep these checkpoints' states (best effort)."""
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
