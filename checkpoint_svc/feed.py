"""The event feed: replay stored events after a cursor, then follow live ones.

Live events reach a watcher from this process directly and from other replicas
through Redis pub/sub. Cursors are dense (a thread's `seq`, or the tenant's
`feed_seq`), so a watcher can tell a gap from a duplicate: duplicates are
dropped, gaps are filled from SQL, where every event is committed before it is
announced. That is what makes the switch from replay to live exact, and what
lets a reconnecting watcher resume from its last cursor.

Fan-out costs little per watcher: the watchers of a topic (a thread, or a whole tenant)
share one bounded window of its recent events and hold only a cursor into it; an event is
appended once and encoded once (see `Event.encoded`), and waking a watcher costs one future.
A watcher that falls behind the window (a slow consumer) costs only itself: it reads what
it missed from SQL, by seq, like a reconnecting one.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from checkpoint_svc.domain import Event, ThreadKey
from checkpoint_svc.errors import TierUnavailable
from checkpoint_svc.tiers.sql import SqlTier

_PAGE = 500
# Events a topic keeps for its watchers; one behind by more reads the rest from SQL.
WINDOW = 2048

Topic = tuple[str, ...]


@dataclass(slots=True)
class Heartbeat:
    time: float
    last_seq: int


@dataclass(eq=False)
class _Window:
    """The recent events of one topic by position, shared by all its watchers."""

    thread: bool  # positions are thread seqs (else the tenant's feed_seqs)
    by_position: dict[int, Event] = field(default_factory=dict)
    arrived: deque[int] = field(default_factory=deque)  # positions, oldest arrival first
    newest: int = 0
    waiters: set[asyncio.Future[None]] = field(default_factory=set)
    watchers: int = 0
    polled_at: float = 0.0
    fills: int = 0
    filling: asyncio.Lock = field(default_factory=asyncio.Lock)

    def position(self, e: Event) -> int:
        return e.seq if self.thread else e.feed_seq

    def add(self, e: Event) -> None:
        p = self.position(e)
        if p in self.by_position:
            return  # a second copy (another delivery path)
        self.by_position[p] = e
        self.arrived.append(p)
        if len(self.arrived) > WINDOW:
            self.by_position.pop(self.arrived.popleft(), None)
        if p > self.newest:
            self.newest = p
            waiters, self.waiters = self.waiters, set()
            for w in waiters:
                if not w.done():
                    w.set_result(None)

    def after(self, cursor: int) -> tuple[list[Event], str]:
        """The window's events right after `cursor`, and what stops them: "end" (caught up),
        "gap" (an event is missing: fill the window from SQL) or "behind" (the cursor is
        older than the window: read SQL for this watcher alone)."""
        out: list[Event] = []
        p = cursor + 1
        found = self.by_position.get(p)
        while found is not None:
            out.append(found)
            p += 1
            found = self.by_position.get(p)
        if p > self.newest:
            return out, "end"
        full = len(self.arrived) >= WINDOW
        if not out and full and p < min(self.by_position):
            return out, "behind"  # evicted: this watcher is slow
        return out, "gap"

    async def wait(self, seconds: float) -> None:
        """Until the next event, or `seconds`."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters.add(fut)
        try:
            async with asyncio.timeout(seconds):
                await fut
        except TimeoutError:
            pass
        finally:
            self.waiters.discard(fut)  # an idle or departed watcher leaves nothing behind


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
        # With other replicas, a missed pub/sub message is caught by polling SQL at each
        # idle heartbeat, once per topic; a single writer sees every event directly.
        self.poll_sql = poll_sql
        self._topics: dict[Topic, _Window] = {}
        self._tenants: dict[str, int] = {}  # watchers per tenant

    def close(self) -> None:
        """End every open stream (shutdown): watchers reconnect to another replica."""
        self._closing = True
        for window in self._topics.values():
            waiters, window.waiters = window.waiters, set()
            for w in waiters:
                if not w.done():
                    w.set_result(None)

    @property
    def watchers(self) -> int:
        return sum(w.watchers for w in self._topics.values())

    def watched(self, tenant: str) -> bool:
        """Whether anyone here streams a thread of this tenant, or the whole tenant."""
        return self._tenants.get(tenant, 0) > 0

    def deliver(self, event: Event) -> None:
        k = event.key
        thread = self._topics.get((k.tenant, k.namespace, k.thread_id))
        if thread is not None:
            thread.add(event)
        tenant = self._topics.get((k.tenant,))
        if tenant is not None:
            tenant.add(event)

    async def stream(
        self, tenant: str, key: ThreadKey | None, after: int, follow: bool, until_now: bool = False
    ) -> AsyncIterator[Event | Heartbeat]:
        """Events after `after`, in order, each once; ends at a terminal event unless following,
        and once the stored ones are replayed if `until_now`."""
        topic: Topic = (key.tenant, key.namespace, key.thread_id) if key else (tenant,)
        window = self._topics.get(topic)
        if window is None:
            window = self._topics[topic] = _Window(thread=key is not None)
        window.watchers += 1
        self._tenants[tenant] = self._tenants.get(tenant, 0) + 1
        stop_at_terminal = key is not None and not follow
        cursor = after
        try:
            # Replay (the window already collects live events meanwhile).
            while True:
                page = await self._events_after(tenant, key, cursor)
                for e in page:
                    yield e
                    cursor = window.position(e)
                    if e.terminal and stop_at_terminal:
                        return
                if len(page) < _PAGE:
                    break
            if until_now:
                return
            if stop_at_terminal and key is not None:
                thread = await self._read(lambda: self.sql.get_thread(key))
                if thread is not None and thread.status.terminal and thread.last_seq <= cursor:
                    return
            # Follow.
            idle_since = time.monotonic()
            while True:
                if self._closing:
                    raise TierUnavailable("the service is shutting down; reconnect with after_seq")
                events, stop = window.after(cursor)
                if not events and stop == "gap":
                    await self._fill(window, tenant, key, cursor)
                    events, stop = window.after(cursor)
                if not events and stop != "end":  # behind the window: this watcher alone
                    events = await self._events_after(tenant, key, cursor)
                if not events:
                    remaining = self.heartbeat - (time.monotonic() - idle_since)
                    if remaining > 0:
                        await window.wait(remaining)
                        continue
                    if self.poll_sql and time.monotonic() - window.polled_at >= self.heartbeat:
                        await self._fill(window, tenant, key, cursor)
                        continue
                    yield Heartbeat(time.time(), cursor)
                    idle_since = time.monotonic()
                    continue
                for e in events:
                    yield e
                    cursor = window.position(e)
                    if e.terminal and stop_at_terminal:
                        return
                idle_since = time.monotonic()
        finally:
            self._tenants[tenant] -= 1
            if not self._tenants[tenant]:
                del self._tenants[tenant]
            window.watchers -= 1
            if window.watchers == 0 and self._topics.get(topic) is window:
                del self._topics[topic]

    async def _events_after(self, tenant: str, key: ThreadKey | None, cursor: int) -> list[Event]:
        return await self._read(lambda: self.sql.events_after(tenant, key, cursor, _PAGE))

    async def _fill(self, window: _Window, tenant: str, key: ThreadKey | None, cursor: int) -> None:
        """Read what the window misses after `cursor` from SQL into it: one read for all the
        topic's watchers (those waiting for it find the window filled)."""
        fills = window.fills
        async with window.filling:
            if window.fills != fills:  # another watcher filled it meanwhile
                return
            window.polled_at = time.monotonic()
            for e in await self._events_after(tenant, key, cursor):
                window.add(e)
            window.fills += 1
