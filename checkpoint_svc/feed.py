"""The event feed: replay stored events after a cursor, then follow live ones.

Live events reach a watcher from this process directly and from other replicas
through Redis pub/sub. Cursors are dense (a thread's `seq`, or the tenant's
`feed_seq`), so a watcher can tell a gap from a duplicate: duplicates are
dropped, gaps are filled from SQL, where every event is committed before it is
announced. That is what makes the switch from replay to live exact, and what
lets a reconnecting watcher resume from its last cursor.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from checkpoint_svc.domain import Event, ThreadKey
from checkpoint_svc.errors import TierUnavailable
from checkpoint_svc.tiers.sql import SqlTier

_PAGE = 500
_QUEUE_MAX = 10_000
_CLOSING: Any = object()  # wakes a waiting stream at shutdown


@dataclass(slots=True)
class Heartbeat:
    time: float
    last_seq: int


@dataclass(eq=False)
class _Subscriber:
    queue: asyncio.Queue[Event] = field(default_factory=lambda: asyncio.Queue(_QUEUE_MAX))
    overflowed: bool = False

    def push(self, event: Event) -> None:
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.overflowed = True  # the watcher re-reads from SQL


class EventFeed:
    def __init__(
        self,
        sql: SqlTier,
        heartbeat_seconds: float,
        poll_sql: bool,
        read: Callable[[Callable[[], Awaitable[Any]]], Awaitable[Any]],
    ) -> None:
        self.sql = sql
        # SQL reads go through the store's retried, error-mapped path (UNAVAILABLE, not UNKNOWN).
        self._read = read
        self._closing = False
        self.heartbeat = heartbeat_seconds
        # With other replicas, a missed pub/sub message is caught by polling SQL
        # at each idle heartbeat; a single writer sees every event directly.
        self.poll_sql = poll_sql
        self._subs: dict[tuple[str, ...], set[_Subscriber]] = {}

    def close(self) -> None:
        """End every open stream (shutdown): watchers reconnect to another replica."""
        self._closing = True
        for subs in self._subs.values():
            for sub in subs:
                sub.push(_CLOSING)

    @property
    def watchers(self) -> int:
        return sum(len(s) for s in self._subs.values())

    def deliver(self, event: Event) -> None:
        k = event.key
        for topic in ((k.tenant, k.namespace, k.thread_id), (k.tenant,)):
            for sub in self._subs.get(topic, ()):
                sub.push(event)

    async def stream(
        self, tenant: str, key: ThreadKey | None, after: int, follow: bool
    ) -> AsyncIterator[Event | Heartbeat]:
        """Events after `after`, in order, each once; ends at a terminal event unless following."""
        topic = (key.tenant, key.namespace, key.thread_id) if key else (tenant,)
        sub = _Subscriber()
        self._subs.setdefault(topic, set()).add(sub)
        stop_at_terminal = key is not None and not follow
        cursor = after

        def position(e: Event) -> int:
            return e.seq if key is not None else e.feed_seq

        try:
            # Replay (the subscription is already buffering live events).
            while True:
                page = await self._events_after(tenant, key, cursor)
                for e in page:
                    yield e
                    cursor = position(e)
                    if e.terminal and stop_at_terminal:
                        return
                if len(page) < _PAGE:
                    break
            if stop_at_terminal and key is not None:
                thread = await self._read(lambda: self.sql.get_thread(key))
                if thread is not None and thread.status.terminal and thread.last_seq <= cursor:
                    return
            # Follow.
            while True:
                if self._closing:
                    raise TierUnavailable("the service is shutting down; reconnect with after_seq")
                try:
                    e = await asyncio.wait_for(sub.queue.get(), timeout=self.heartbeat)
                except TimeoutError:
                    if self.poll_sql or sub.overflowed:
                        async for filled in self._fill(tenant, key, cursor, None, sub):
                            yield filled
                            cursor = position(filled)
                            if filled.terminal and stop_at_terminal:
                                return
                    yield Heartbeat(time.time(), cursor)
                    continue
                if e is _CLOSING:
                    continue
                if sub.overflowed:  # events were dropped: everything stored after the cursor
                    async for filled in self._fill(tenant, key, cursor, None, sub):
                        yield filled
                        cursor = position(filled)
                        if filled.terminal and stop_at_terminal:
                            return
                p = position(e)
                if p <= cursor:
                    continue  # already sent (replay overlap or a second delivery path)
                if p > cursor + 1:
                    async for filled in self._fill(tenant, key, cursor, p, sub):
                        yield filled
                        cursor = position(filled)
                        if filled.terminal and stop_at_terminal:
                            return
                yield e
                cursor = p
                if e.terminal and stop_at_terminal:
                    return
        finally:
            subs = self._subs.get(topic)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._subs[topic]

    async def _events_after(self, tenant: str, key: ThreadKey | None, cursor: int) -> list[Event]:
        return await self._read(lambda: self.sql.events_after(tenant, key, cursor, _PAGE))

    async def _fill(
        self, tenant: str, key: ThreadKey | None, cursor: int, upto: int | None, sub: _Subscriber
    ) -> AsyncIterator[Event]:
        """Stored events after cursor and before `upto` (all of them if None)."""
        if upto is None:
            sub.overflowed = False  # only a fill to the end catches up with what was dropped
        while True:
            page = await self._events_after(tenant, key, cursor)
            for e in page:
                p = e.seq if key is not None else e.feed_seq
                if upto is not None and p >= upto:
                    return
                yield e
                cursor = p
            if len(page) < _PAGE:
                return
