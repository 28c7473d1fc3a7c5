"""CheckpointStore: the store's logic, composed of the three tiers, the group
committer, the event feed and the retention sweeper. The gRPC servicer only
translates to and from it; tests may call it directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import uuid6

from checkpoint_svc import metrics
from checkpoint_svc.commit import (
    SQL_ERRORS,
    GroupCommitter,
    as_store_error,
    describe,
    is_connectivity_error,
    sql_retrying,
    with_sql_retries,
)
from checkpoint_svc.config import Settings
from checkpoint_svc.domain import (
    Checkpoint,
    Event,
    NewEvent,
    PendingWrite,
    SaveCommand,
    Stats,
    Thread,
    ThreadKey,
    Tier,
    Trigger,
)
from checkpoint_svc.errors import NotFound, PayloadTooLarge, TierUnavailable
from checkpoint_svc.feed import EventFeed, Heartbeat
from checkpoint_svc.ops import (
    AcquireLeaseOp,
    Appended,
    DeleteThreadOp,
    PublishOp,
    PutWritesOp,
    ReleaseLeaseOp,
    RenewLeaseOp,
    SaveOp,
    SaveResult,
)
from checkpoint_svc.sealing import KeyRing, Sealing
from checkpoint_svc.tiers import StateCache
from checkpoint_svc.tiers.memory import MemoryTier
from checkpoint_svc.tiers.sql import Batch, SqlTier, ThreadFilter

if TYPE_CHECKING:
    from checkpoint_svc.tiers.redis import RedisTier

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_LEASE_SECONDS = 15.0
REQUEST_ID_TTL = 24 * 3600.0  # how long a request_id is remembered at least


@dataclass(slots=True)
class RestoreResult:
    checkpoint: Checkpoint
    writes: list[PendingWrite]
    served_from: Tier


@dataclass(slots=True)
class TierHealth:
    tier: Tier
    configured: bool
    up: bool
    detail: str


def new_checkpoint_id() -> str:
    """UUIDv7: unique and sorted by creation time."""
    return str(uuid6.uuid7())


class CheckpointStore:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        ring = KeyRing(settings.encryption_keys) if settings.encryption_keys else None
        self.sealing = Sealing(ring)
        self.sql = SqlTier(settings.db_url, timeout=settings.sql_timeout, sealing=self.sealing)
        if self.sql.hot is not None:
            # Writes committed before their checkpoint matter only to a memory tier that
            # answers heads: otherwise a claimed id needs no look-up of its own.
            self.sql.hot.claims_in_one_statement = not settings.memory_answers_heads
        self.memory = MemoryTier(
            int(settings.memory_mib * 1024 * 1024), answers_heads=settings.memory_answers_heads
        )
        self.redis: RedisTier | None = None
        if settings.redis_url:
            # Imported here: redis is a tenth of a start-up without Redis (the embedded default).
            from checkpoint_svc.tiers.redis import RedisTier

            self.redis = RedisTier(settings.redis_url, settings.redis_ttl, sealing=self.sealing)
        # The tiers that may supply a state SQL named, fastest first.
        self._caches: list[StateCache] = [self.memory] + ([self.redis] if self.redis else [])
        self.committer = GroupCommitter(
            self.sql,
            self._after_commit,
            settings.batch_max,
            settings.queue_max,
            in_commit_order=settings.memory_answers_heads,
        )
        # Set when the service begins to shut down: open Session streams end once their
        # calls are answered (checkpoint_svc/session.py).
        self.stopping = asyncio.Event()
        self.feed = EventFeed(
            self.sql,
            settings.heartbeat,
            poll_sql=not settings.memory_answers_heads,
            read=self._read,
        )
        metrics.STREAM_WATCHERS.set_function(lambda: self.feed.watchers)
        self._sweeper: asyncio.Task | None = None

    # ---- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        async for attempt in sql_retrying(budget_seconds=30.0):
            with attempt:
                await self.sql.migrate()
        if self.redis is not None:
            await self.redis.start()
            self.redis.follow_feed(self.feed.deliver, self.feed.watched)
        self.committer.start()
        if self.settings.sweep_interval > 0:
            self._sweeper = asyncio.create_task(self._sweep_loop(), name="retention")

    async def close(self) -> None:
        """Flush the write-behind queue, then release every connection."""
        self.feed.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        await self.committer.close(self.settings.shutdown_grace)
        if self.redis is not None:
            await self.redis.close()
        await self.sql.close()

    async def _after_commit(self, batch: Batch) -> Awaitable[None] | None:
        """Warm the memory tier and announce the events of a committed batch here; what is
        left for Redis (states, the feed for other replicas) is returned, to run after the
        callers have their answers (Restore asks SQL first, so it reads its writes anyway).

        Each step is guarded on its own: a failure in one must neither leave a head behind
        in memory nor silence the live feed.
        """
        memory = self.memory
        # Small states come back with the query that names a checkpoint: not worth caching.
        cached = [cp for cp in batch.flushed_checkpoints if len(cp.state) > self.sql.inline_state]
        try:
            for key in batch.deleted:
                memory.drop_thread(key)
            memory.put_bodies(batch.flushed_checkpoints if memory.answers_heads else cached)
            if memory.answers_heads:
                for cp in batch.flushed_checkpoints:
                    if (cp.key, cp.checkpoint_id) not in batch.early_writes:
                        memory.start_writes(cp.key, cp.checkpoint_id)
                for key, w in batch.flushed_writes:
                    memory.add_writes(key, [w])
                memory.set_heads(batch.heads)
        except Exception:
            log.exception("memory tier update failed; dropping its heads")
            for key in batch.heads:
                memory.drop_thread(key)
        finally:
            for event in batch.flushed_events:
                self.feed.deliver(event)
        if self.redis is None or not (cached or batch.flushed_events):
            return None
        return self.redis.apply(cached, batch.flushed_events)

    # ---- SQL reads, retried and mapped --------------------------------------

    async def _read(self, call: Callable[[], Awaitable[T]]) -> T:
        try:
            result = await with_sql_retries(call)
            self.sql.up = True
            return result
        except (TimeoutError, *SQL_ERRORS, OSError) as exc:
            if is_connectivity_error(exc):
                self.sql.up = False
                self.sql.detail = describe(exc)
            raise as_store_error(exc) from exc

    # ---- checkpoints -----------------------------------------------------------

    def _check_size(self, what: str, size: int) -> None:
        limit = self.settings.max_state_bytes
        if size > limit:
            raise PayloadTooLarge(
                f"{what} is {size} bytes; the limit is {limit} bytes (--max-state-bytes)"
            )

    async def save(self, cmd: SaveCommand, durable: bool = True) -> SaveResult:
        cp = cmd.checkpoint
        self._check_size("state", len(cp.state))
        client_id = bool(cp.checkpoint_id)
        if not client_id:
            cp.checkpoint_id = new_checkpoint_id()
        now = time.time()
        cp.created_at = now
        if cp.expires_at is None and self.settings.sql_ttl > 0 and not cmd.keep_forever:
            cp.expires_at = now + self.settings.sql_ttl
        op = SaveOp(cmd, client_supplied_id=client_id, explicit_parent=cp.parent_id)
        if durable:
            return await self.committer.submit(op)
        # Write-behind: acknowledged once queued; readable once committed (milliseconds),
        # so that a save the commit then rejects is never served from a cache.
        if not self.sql.up:
            raise TierUnavailable("SQL tier unavailable: not taking write-behind saves")
        await self.committer.submit(op, wait=False)
        return SaveResult(cp, seq=0)

    async def restore(
        self, key: ThreadKey, checkpoint_id: str = "", include_writes: bool = False
    ) -> RestoreResult:
        """The head (or a checkpoint by id) and its pending writes, never older than SQL's.

        SQL names the checkpoint and gives its metadata and writes; the state comes from the
        fastest tier holding that very checkpoint. Only the single writer's memory tier
        answers without asking SQL (docs/checkpoint-service.md#tiers).
        """
        hit = self.memory.restore(key, checkpoint_id, include_writes)
        if hit is not None:
            metrics.RESTORES.labels(Tier.MEMORY.name).inc()
            return RestoreResult(hit[0], hit[1], Tier.MEMORY)
        generation = self.memory.generation
        found = await self._read(
            lambda: self.sql.find_checkpoint(key, checkpoint_id, include_writes)
        )
        if found is None:
            raise self._not_found(key, checkpoint_id)
        cp, version, writes, state = found
        tier = Tier.SQL
        for cache in self._caches if state is None else ():  # fastest first
            state = await cache.state_of(cp)
            if state is not None:
                tier = cache.tier
                break
        if state is None:
            state = await self._read(lambda: self.sql.state_of(cp))
            if state is None:  # deleted since it was named
                raise self._not_found(key, checkpoint_id)
        cp.state = state
        # Read-through, into the tiers faster than the one found; a small state comes with
        # SQL's answer, so only the single writer's memory (which answers alone) keeps it.
        small = len(state) <= self.sql.inline_state
        for cache in self._caches:
            if cache.tier >= tier:
                break
            if small and not (cache is self.memory and self.memory.answers_heads):
                continue
            if cache is not self.memory or self.memory.generation == generation:
                await cache.put_states([cp])  # (memory: unless something was deleted since)
        if not checkpoint_id and self.memory.generation == generation:
            self.memory.set_heads({key: (cp.checkpoint_id, version)})
        metrics.RESTORES.labels(tier.name).inc()
        return RestoreResult(cp, writes, tier)

    @staticmethod
    def _not_found(key: ThreadKey, checkpoint_id: str) -> NotFound:
        where = f"{key.namespace}/{key.thread_id}"
        if checkpoint_id:
            return NotFound(f"checkpoint {checkpoint_id} not found in {where}")
        return NotFound(f"thread {where} has no checkpoint")

    async def list(
        self,
        key: ThreadKey,
        page_size: int,
        before_id: str = "",
        include_state: bool = False,
        trigger: Trigger = Trigger.UNSPECIFIED,
        created_after: float | None = None,
        created_before: float | None = None,
        metadata_equals: dict[str, Any] | None = None,
        namespace_prefix: str | None = None,
    ) -> tuple[list[Checkpoint], str]:
        """A page newest first, and the id to continue before ('' on the last page)."""
        rows = await self._read(
            lambda: self.sql.list_checkpoints(
                key,
                page_size + 1,
                before_id,
                include_state,
                trigger,
                created_after,
                created_before,
                metadata_equals or {},
                namespace_prefix,
            )
        )
        more = len(rows) > page_size
        rows = rows[:page_size]
        return rows, (rows[-1].checkpoint_id if more else "")

    async def writes_of(self, checkpoints: list[Checkpoint]) -> list[list[PendingWrite]]:
        return await self._read(lambda: self.sql.writes_of(checkpoints))

    async def put_writes(
        self,
        key: ThreadKey,
        writes: list[PendingWrite],
        token: int,
        events: list[NewEvent] | None = None,
        request_id: str = "",
    ) -> Appended:
        """Store writes (and append events with them)."""
        for w in writes:
            self._check_size(f"write {w.task_id}/{w.idx}", len(w.value))
        return await self.committer.submit(
            PutWritesOp(key, writes, token, events or [], request_id)
        )

    # ---- threads and feed ------------------------------------------------------

    async def publish(
        self, key: ThreadKey, events: list[NewEvent], request_id: str, token: int
    ) -> Appended:
        return await self.committer.submit(PublishOp(key, events, request_id, token))

    async def delete_thread(self, key: ThreadKey) -> int:
        return await self.committer.submit(DeleteThreadOp(key))

    async def prune_threads(
        self, tenant: str, thread_ids: list[str], prefix: str, keep_latest: bool
    ) -> int:
        """Keep only each (namespace, thread)'s head, or delete the threads; checkpoints
        deleted. Like the sweeper, it never touches a head's body in place: the caches drop
        what changed and re-read it from SQL."""
        total = 0
        for thread_id in thread_ids:
            if not keep_latest:
                total += (await self.delete_threads(tenant, thread_id, prefix))[1]
                continue
            deleted, changed = await self._read(
                lambda thread_id=thread_id: self.sql.keep_heads(tenant, thread_id, prefix)
            )
            self._forget(deleted + changed)
            total += len(deleted)
        return total

    async def copy_thread(
        self, tenant: str, source: str, target: str, prefix: str
    ) -> tuple[int, int]:
        """(threads, checkpoints) copied. The target's old cached heads, if it existed and
        was deleted, are forgotten."""
        namespaces, checkpoints = await self._read(
            lambda: self.sql.copy_thread(tenant, source, target, prefix, time.time())
        )
        self._forget([], [ThreadKey(tenant, ns, target) for ns in namespaces])
        return len(namespaces), checkpoints

    async def delete_for_runs(self, tenant: str, run_ids: list[str], prefix: str) -> int:
        """Checkpoints of these runs (metadata run_id) gone, with their writes; heads that
        went move back. The caches forget all of it and re-read from SQL."""
        if not run_ids:
            return 0
        deleted, moved = await self._read(
            lambda: self.sql.delete_for_runs(tenant, run_ids, prefix, time.time())
        )
        self._forget(deleted, moved)
        return len(deleted)

    def _forget(
        self, bodies: list[tuple[ThreadKey, str]], threads: list[ThreadKey] | None = None
    ) -> None:
        """After SQL was changed outside the group committer (retention, prune, copy, delete
        for runs): memory drops those bodies, and all it holds of those threads. Redis needs
        nothing: SQL names every checkpoint a Restore returns, and Redis only holds states."""
        self.memory.drop_bodies(bodies)
        for key in threads or []:
            self.memory.drop_thread(key)

    async def delete_threads(self, tenant: str, thread_id: str, prefix: str) -> tuple[int, int]:
        """A thread id in every namespace under `prefix`: (threads, checkpoints) deleted."""
        namespaces = await self._read(lambda: self.sql.namespaces_of(tenant, thread_id, prefix))

        async def one(namespace: str) -> int | None:
            try:
                return await self.delete_thread(ThreadKey(tenant, namespace, thread_id))
            except NotFound:  # deleted meanwhile
                return None

        done = [n for n in await asyncio.gather(*(one(ns) for ns in namespaces)) if n is not None]
        return len(done), sum(done)

    async def get_thread(self, key: ThreadKey) -> Thread:
        thread = await self._read(lambda: self.sql.get_thread(key))
        if thread is None:
            raise NotFound(f"thread {key.namespace}/{key.thread_id} not found")
        return thread

    async def list_threads(
        self, tenant: str, flt: ThreadFilter, page_size: int, after: tuple[str, ...] | None
    ) -> tuple[list[Thread], tuple[str, ...] | None]:
        """A page of threads and where the next one starts (None after the last)."""
        rows = await self._read(lambda: self.sql.list_threads(tenant, flt, page_size + 1, after))
        more = len(rows) > page_size
        rows = rows[:page_size]
        if not more:
            return rows, None
        key = rows[-1].key
        if flt.newest_first:
            return rows, (repr(rows[-1].created_at), key.namespace, key.thread_id)
        return rows, (key.namespace, key.thread_id)

    async def stats(self, key: ThreadKey) -> Stats:
        await self.get_thread(key)  # NOT_FOUND for a thread that does not exist
        return await self._read(lambda: self.sql.stats(key))

    async def acquire_lease(self, key: ThreadKey, owner: str, ttl: float) -> Thread:
        return await self.committer.submit(AcquireLeaseOp(key, owner, ttl or DEFAULT_LEASE_SECONDS))

    async def renew_lease(self, key: ThreadKey, owner: str, token: int, ttl: float) -> Thread:
        return await self.committer.submit(
            RenewLeaseOp(key, owner, token, ttl or DEFAULT_LEASE_SECONDS)
        )

    async def release_lease(self, key: ThreadKey, owner: str, token: int) -> None:
        await self.committer.submit(ReleaseLeaseOp(key, owner, token))

    def stream(
        self, tenant: str, key: ThreadKey | None, after: int, follow: bool, until_now: bool = False
    ) -> AsyncIterator[Event | Heartbeat]:
        return self.feed.stream(tenant, key, after, follow, until_now)

    # ---- health and retention --------------------------------------------------

    async def health(self) -> list[TierHealth]:
        try:
            await asyncio.wait_for(self.sql.ping(), timeout=1.0)
            self.sql.up, self.sql.detail = True, ""
        except Exception as exc:
            self.sql.up, self.sql.detail = False, describe(exc)
        tiers = [
            TierHealth(
                Tier.MEMORY,
                self.memory.max_bytes > 0,
                True,
                f"{self.memory.used_bytes} of {self.memory.max_bytes} bytes",
            ),
            TierHealth(
                Tier.REDIS,
                self.redis is not None,
                self.redis is not None and self.redis.up,
                self.redis.detail if self.redis is not None else "not configured",
            ),
            TierHealth(Tier.SQL, True, self.sql.up, self.sql.detail),
        ]
        for t in tiers:
            if t.configured:
                metrics.TIER_UP.labels(t.tier.name).set(1 if t.up else 0)
        return tiers

    async def sweep(self) -> int:
        """One retention pass; returns the number of checkpoints pruned."""
        pruned, gone = await self._read(
            lambda: self.sql.sweep(
                time.time(),
                self.settings.keep_last,
                # Request ids live as long as what they saved (forever with --sql-ttl 0).
                max(REQUEST_ID_TTL, self.settings.sql_ttl) if self.settings.sql_ttl > 0 else None,
            )
        )
        self._forget(pruned, gone)
        if pruned:
            log.info(
                "retention pruned checkpoints", extra={"pruned": len(pruned), "threads": len(gone)}
            )
        return len(pruned)

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.sweep_interval)
            try:
                await self.sweep()
            except TierUnavailable as exc:
                log.warning("retention sweep skipped", extra={"error": str(exc)})
            except Exception:
                log.exception("retention sweep failed")
