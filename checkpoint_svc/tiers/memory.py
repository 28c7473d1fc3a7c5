"""Memory tier: a byte-bounded LRU of checkpoint bodies (cachetools' LRUCache).

With other replicas (or any doubt), it only supplies the state bytes of a checkpoint that SQL
has just named, and only if the cached body is that very checkpoint (same id and creation
time: a thread deleted and saved again gets new bodies). As the single writer it also answers
heads and pending writes: every commit goes through this process, in order, and its writes
reach this tier before the commit is acknowledged (docs/checkpoint-service.md#tiers).

A body and the pending writes cached with it are one entry, counted together against the
budget: evicting the body drops its writes, and a write that makes an entry grow counts at
once (the entry is put again with its new size).
"""

from __future__ import annotations

from dataclasses import dataclass

from cachetools import LRUCache

from checkpoint_svc.domain import Checkpoint, PendingWrite, ThreadKey, Tier
from checkpoint_svc.tiers import merge_writes

_Slot = tuple[ThreadKey, str]
_MAX_HEADS = 1_000_000
_WRITE_OVERHEAD = 120  # bytes a cached write costs beyond its value, roughly


def _writes_size(writes: list[PendingWrite] | None) -> int:
    if not writes:
        return 0
    return sum(len(w.value) + len(w.channel) + len(w.task_path) + _WRITE_OVERHEAD for w in writes)


@dataclass(slots=True)
class _Entry:
    checkpoint: Checkpoint
    # Its writes, known here only when complete: from the Save of a checkpoint that had none
    # yet, plus every write committed since (None: not known).
    writes: list[PendingWrite] | None
    size: int  # bytes it is counted for: the body and its writes


def _entry(cp: Checkpoint, writes: list[PendingWrite] | None) -> _Entry:
    return _Entry(cp, writes, cp.size + _writes_size(writes))


class MemoryTier:
    tier = Tier.MEMORY

    def __init__(self, max_bytes: int, answers_heads: bool) -> None:
        self.max_bytes = max_bytes
        self.answers_heads = answers_heads
        self._entries: LRUCache[_Slot, _Entry] = LRUCache(
            maxsize=max(max_bytes, 0), getsizeof=lambda entry: entry.size
        )
        self._heads: dict[ThreadKey, tuple[str, int]] = {}
        # Bumped whenever something is dropped: a read from SQL that began before may only
        # warm this tier if nothing was deleted meanwhile.
        self.generation = 0

    @property
    def used_bytes(self) -> int:
        return int(self._entries.currsize)

    def _put(self, slot: _Slot, entry: _Entry) -> None:
        try:
            self._entries[slot] = entry  # evicts the least recently used to make room
        except ValueError:  # larger than the whole budget: not cached at all
            self._entries.pop(slot, None)

    # ---- bodies ------------------------------------------------------------------

    def body(self, key: ThreadKey, checkpoint_id: str) -> Checkpoint | None:
        found = self._entries.get((key, checkpoint_id))
        return found.checkpoint if found is not None else None

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
            old = self._entries.pop(slot, None)
            # The writes stay with the same checkpoint, not with another by that id.
            writes = (
                old.writes
                if old is not None and old.checkpoint.created_at == cp.created_at
                else None
            )
            self._put(slot, _entry(cp, writes))

    def drop_bodies(self, slots: list[_Slot]) -> None:
        self.generation += 1
        for slot in slots:
            self._entries.pop(slot, None)

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
        found = self._entries.get((key, checkpoint_id))
        if found is None:
            return None
        if not include_writes:
            return found.checkpoint, []
        if found.writes is None:
            return None
        # As SQL orders them.
        return found.checkpoint, sorted(found.writes, key=lambda w: (w.task_id, w.idx))

    def start_writes(self, key: ThreadKey, checkpoint_id: str) -> None:
        """A checkpoint just saved, with no writes committed before it: its set is empty."""
        found = self._entries.get((key, checkpoint_id)) if self.answers_heads else None
        if found is not None and found.writes is None:
            found.writes = []  # no bytes more

    def add_writes(self, key: ThreadKey, writes: list[PendingWrite]) -> None:
        for w in writes:
            slot = (key, w.checkpoint_id)
            found = self._entries.get(slot)
            if found is not None and found.writes is not None:
                self._put(slot, _entry(found.checkpoint, merge_writes(found.writes, [w])))

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
        self.drop_bodies([s for s in self._entries if s[0] == key])
