"""Memory tier: a byte-bounded LRU of immutable checkpoint bodies.

It answers heads only when this process is the single writer; otherwise another
replica may have moved a head and only a shared tier can be trusted for it.
"""

from __future__ import annotations

from collections import OrderedDict

from checkpoint_svc.domain import Checkpoint, PendingWrite, ThreadKey
from checkpoint_svc.tiers import merge_writes

_Slot = tuple[ThreadKey, str]
_MAX_HEADS = 1_000_000


class MemoryTier:
    def __init__(self, max_bytes: int, answers_heads: bool) -> None:
        self.max_bytes = max_bytes
        self.answers_heads = answers_heads
        self.used_bytes = 0
        self._bodies: OrderedDict[_Slot, Checkpoint] = OrderedDict()
        # Writes are known here only for checkpoints this process saved.
        self._writes: dict[_Slot, list[PendingWrite]] = {}
        self._heads: dict[ThreadKey, tuple[str, int]] = {}

    async def get_body(self, key: ThreadKey, checkpoint_id: str) -> Checkpoint | None:
        slot = (key, checkpoint_id)
        cp = self._bodies.get(slot)
        if cp is not None:
            self._bodies.move_to_end(slot)
        return cp

    async def put_bodies(self, checkpoints: list[Checkpoint]) -> None:
        if self.max_bytes <= 0:
            return
        for cp in checkpoints:
            slot = (cp.key, cp.checkpoint_id)
            if slot in self._bodies:
                self._bodies.move_to_end(slot)
                continue
            self._bodies[slot] = cp
            self.used_bytes += cp.size
        while self.used_bytes > self.max_bytes and self._bodies:
            old_slot, old = self._bodies.popitem(last=False)
            self.used_bytes -= old.size
            self._writes.pop(old_slot, None)

    def writes_known(self, key: ThreadKey, checkpoint_id: str) -> list[PendingWrite] | None:
        """Writes of a checkpoint, if this process knows all of them."""
        if not self.answers_heads:
            return None
        return self._writes.get((key, checkpoint_id))

    def start_writes(self, key: ThreadKey, checkpoint_id: str) -> None:
        """A checkpoint this process just saved has no writes yet."""
        if self.answers_heads and (key, checkpoint_id) in self._bodies:
            self._writes[(key, checkpoint_id)] = []

    def add_writes(self, key: ThreadKey, writes: list[PendingWrite]) -> None:
        for w in writes:
            slot = (key, w.checkpoint_id)
            if slot in self._writes:
                self._writes[slot] = merge_writes(self._writes[slot], [w])

    async def get_head(self, key: ThreadKey) -> str | None:
        if not self.answers_heads:
            return None
        head = self._heads.get(key)
        return head[0] if head else None

    async def set_heads(self, heads: dict[ThreadKey, tuple[str, int]]) -> None:
        if not self.answers_heads:
            return
        if len(self._heads) > _MAX_HEADS:
            self._heads.clear()
        for key, (cid, version) in heads.items():
            current = self._heads.get(key)
            if current is None or current[1] <= version:
                self._heads[key] = (cid, version)

    async def drop_thread(self, key: ThreadKey) -> None:
        self._heads.pop(key, None)
        for slot in [s for s in self._bodies if s[0] == key]:
            self.used_bytes -= self._bodies.pop(slot).size
            self._writes.pop(slot, None)

    def drop_bodies(self, slots: list[tuple[ThreadKey, str]]) -> None:
        for slot in slots:
            cp = self._bodies.pop(slot, None)
            if cp is not None:
                self.used_bytes -= cp.size
            self._writes.pop(slot, None)
