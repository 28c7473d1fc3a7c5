"""Memory tier: a byte-bounded LRU of checkpoint bodies.

With other replicas (or any doubt), it only supplies the state bytes of a checkpoint that SQL
has just named, and only if the cached body is that very checkpoint (same id and creation
time: a thread deleted and saved again gets new bodies). As the single writer it also answers
heads and pending writes: every commit goes through this process, in order, and its writes
reach this tier before the commit is acknowledged (docs/checkpoint-service.md#tiers).
"""

from __future__ import annotations

from collections import OrderedDict

from checkpoint_svc.domain import Checkpoint, PendingWrite, ThreadKey, Tier
from checkpoint_svc.tiers import merge_writes

_Slot = tuple[ThreadKey, str]
_MAX_HEADS = 1_000_000
_WRITE_OVERHEAD = 120  # bytes a cached write costs beyond its value, roughly


def _writes_size(writes: list[PendingWrite]) -> int:
    return sum(len(w.value) + len(w.channel) + len(w.task_path) + _WRITE_OVERHEAD for w in writes)


class MemoryTier:
    tier = Tier.MEMORY

    def __init__(self, max_bytes: int, answers_heads: bool) -> None:
        self.max_bytes = max_bytes
        self.answers_heads = answers_heads
        self.used_bytes = 0
        # Each body with the bytes it was counted for.
        self._bodies: OrderedDict[_Slot, tuple[Checkpoint, int]] = OrderedDict()
        # A checkpoint's writes, known here only when complete: from the Save of a
        # checkpoint that had none yet, plus every write committed since.
        self._writes: dict[_Slot, list[PendingWrite]] = {}
        self._heads: dict[ThreadKey, tuple[str, int]] = {}
        # Bumped whenever something is dropped: a read from SQL that began before may only
        # warm this tier if nothing was deleted meanwhile.
        self.generation = 0

    # ---- bodies ------------------------------------------------------------------

    def body(self, key: ThreadKey, checkpoint_id: str) -> Checkpoint | None:
        slot = (key, checkpoint_id)
        found = self._bodies.get(slot)
        if found is None:
            return None
        self._bodies.move_to_end(slot)
        return found[0]

    async def state_of(self, named: Checkpoint) -> bytes | None:
        """The state of the checkpoint SQL named, if the cached body is that checkpoint."""
        cp = self.body(named.key, named.checkpoint_id)
        return cp.state if cp is not None and cp.created_at == named.created_at else None

    async def put_states(self, checkpoints: list[Checkpoint]) -> None:
        self.put_bodies(checkpoints)

    def put_bodies(self, checkpoints: list[Checkpoint]) -> None:
        if self.max_bytes <= 0:
            return
        for cp in checkpoints:
            slot = (cp.key, cp.checkpoint_id)
            old = self._bodies.pop(slot, None)
            if old is not None:
                self.used_bytes -= old[1]
                if old[0].created_at != cp.created_at:  # another checkpoint by that id
                    self._drop_writes(slot)
            size = cp.size
            self._bodies[slot] = (cp, size)
            self.used_bytes += size
        self._evict()

    def drop_bodies(self, slots: list[_Slot]) -> None:
        self.generation += 1
        for slot in slots:
            found = self._bodies.pop(slot, None)
            if found is not None:
                self.used_bytes -= found[1]
            self._drop_writes(slot)

    def _evict(self) -> None:
        while self.used_bytes > self.max_bytes and self._bodies:
            old_slot, (_, size) = self._bodies.popitem(last=False)
            self.used_bytes -= size
            self._drop_writes(old_slot)

    # ---- heads and writes (single writer only) -------------------------------------

    def restore(
        self, key: ThreadKey, checkpoint_id: str, include_writes: bool
    ) -> tuple[Checkpoint, list[PendingWrite]] | None:
        """The head (or a checkpoint) with its writes, if this tier knows all of it."""
        if not self.answers_heads:
            return None
        if not checkpoint_id:
            head = self._heads.get(key)
            if head is None:
                return None
            checkpoint_id = head[0]
        cp = self.body(key, checkpoint_id)
        if cp is None:
            return None
        if not include_writes:
            return cp, []
        writes = self._writes.get((key, checkpoint_id))
        if writes is None:
            return None
        return cp, sorted(writes, key=lambda w: (w.task_id, w.idx))  # as SQL orders them

    def start_writes(self, key: ThreadKey, checkpoint_id: str) -> None:
        """A checkpoint just saved, with no writes committed before it: its set is empty."""
        slot = (key, checkpoint_id)
        if self.answers_heads and slot in self._bodies and slot not in self._writes:
            self._writes[slot] = []

    def add_writes(self, key: ThreadKey, writes: list[PendingWrite]) -> None:
        for w in writes:
            slot = (key, w.checkpoint_id)
            known = self._writes.get(slot)
            if known is not None:
                merged = merge_writes(known, [w])
                self.used_bytes += _writes_size(merged) - _writes_size(known)
                self._writes[slot] = merged
        self._evict()

    def set_heads(self, heads: dict[ThreadKey, tuple[str, int]]) -> None:
        """Move heads to (checkpoint_id, version) unless they hold a newer version."""
        if not self.answers_heads:
            return
        if len(self._heads) > _MAX_HEADS:
            self._heads.clear()
        for key, (cid, version) in heads.items():
            current = self._heads.get(key)
            if current is None or current[1] <= version:
                self._heads[key] = (cid, version)

    def drop_thread(self, key: ThreadKey) -> None:
        self.generation += 1
        self._heads.pop(key, None)
        self.drop_bodies([s for s in self._bodies if s[0] == key])
        for slot in [s for s in self._writes if s[0] == key]:
            self._drop_writes(slot)

    def _drop_writes(self, slot: _Slot) -> None:
        writes = self._writes.pop(slot, None)
        if writes:
            self.used_bytes -= _writes_size(writes)
