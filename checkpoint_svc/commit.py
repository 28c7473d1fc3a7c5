"""Group commit: concurrent write operations share one SQL transaction.

A single consumer drains the queue; whatever arrived while the previous batch
was committing goes into the next one, so throughput is not bounded by one
commit per request. A batch that fails on a data error is split and each
operation retried alone, so one bad request cannot fail its neighbours.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import asyncpg
from sqlalchemy.exc import DBAPIError, IntegrityError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential,
)

from checkpoint_svc import metrics
from checkpoint_svc.domain import ThreadKey
from checkpoint_svc.errors import AlreadyExists, InvalidArgument, StoreError, TierUnavailable
from checkpoint_svc.tiers.pg import ChangedSinceSeen, PgHotPath, SessionOutlived
from checkpoint_svc.tiers.sql import Batch, SqlTier

log = logging.getLogger(__name__)
T = TypeVar("T")

# PostgreSQL serialization failure and deadlock: safe to retry as a whole.
_RETRYABLE_SQLSTATES = {"40001", "40P01"}
# The server cannot be reached or is going away: connection exceptions (08), shutdown and
# start-up (57P), too many connections.
_UNREACHABLE_SQLSTATES = ("08", "57P", "53300")
# What a database call may raise: through SQLAlchemy, or from the raw asyncpg hot path.
SQL_ERRORS: tuple[type[Exception], ...] = (
    SQLAlchemyError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
)


class Operation(Protocol):
    creates: bool
    # Its changes are all queued in the batch (none sent by apply): a batch of such operations
    # may be checked and written in one statement.
    in_one_statement: bool
    weight: int  # its share of a batch (BATCH_WEIGHT), see ops.py
    request_id: str  # "" if none: the batch reads every request id of its operations at once
    claimed_id: str  # a checkpoint id the client chose, read at once likewise

    @property
    def key(self) -> ThreadKey: ...

    async def apply(self, batch: Batch) -> Any: ...


def is_connectivity_error(exc: BaseException) -> bool:
    """The database could not be reached (as opposed to rejecting the data)."""
    if isinstance(exc, (OSError, PoolTimeout, asyncio.TimeoutError, ConnectionError)):
        return True
    if isinstance(exc, asyncpg.InterfaceError):  # e.g. the connection closed under a call
        return True
    if isinstance(exc, asyncpg.PostgresError):
        return str(exc.sqlstate or "").startswith(_UNREACHABLE_SQLSTATES)
    if isinstance(exc, DBAPIError):
        if exc.connection_invalidated:
            return True
        orig = exc.orig
        if isinstance(orig, (OSError, ConnectionError, asyncio.TimeoutError)):
            return True
        name = type(orig).__name__.lower() if orig is not None else ""
        return any(s in name for s in ("connection", "cannotconnect", "interfaceerror"))
    return False


def is_transient(exc: BaseException) -> bool:
    if is_connectivity_error(exc):
        return True
    state = getattr(getattr(exc, "orig", None) or exc, "sqlstate", None)
    if state in _RETRYABLE_SQLSTATES:
        return True
    msg = str(exc).lower()
    return "database is locked" in msg or "deadlock" in msg


def sql_retrying(budget_seconds: float = 2.0) -> AsyncRetrying:
    """Transient SQL errors are retried, bounded in time (docs/checkpoint-service.md#errors)."""
    return AsyncRetrying(
        retry=retry_if_exception(is_transient),
        stop=stop_after_delay(budget_seconds) | stop_after_attempt(6),
        wait=wait_exponential(multiplier=0.02, max=0.5),
        reraise=True,
    )


async def with_sql_retries(call: Callable[[], Awaitable[T]], budget_seconds: float = 2.0) -> T:
    """`call`, retried as sql_retrying says while its errors are transient. The first attempt
    goes without the retry machinery, which costs more than a small call; most need no more."""
    try:
        return await call()
    except (TimeoutError, *SQL_ERRORS, OSError) as exc:
        if not is_transient(exc):
            raise
    async for attempt in sql_retrying(budget_seconds):
        with attempt:
            return await call()
    raise AssertionError("unreachable")


def describe(exc: BaseException) -> str:
    """A database error as a client or a health check may see it: its kind and SQLSTATE,
    never the statement or its parameters (those go to the service's log only)."""
    orig = getattr(exc, "orig", None) or exc
    state = getattr(orig, "sqlstate", None)
    return f"{type(orig).__name__}" + (f" (SQLSTATE {state})" if state else "")


def as_store_error(exc: BaseException) -> StoreError:
    """The status a client gets for a database error: its data, or our availability."""
    if isinstance(exc, StoreError):
        return exc
    orig = getattr(exc, "orig", None) or exc
    state = str(getattr(orig, "sqlstate", "") or "")
    text = str(orig).lower()
    log.warning("database error", extra={"error": str(exc)[:2000]})
    if state == "23505" or "unique constraint failed" in text:
        return AlreadyExists(f"conflicting write: the row exists already ({describe(exc)})")
    integrity = isinstance(exc, IntegrityError) or state.startswith("23")
    if integrity or state.startswith("22") or state.startswith("54"):
        return InvalidArgument(f"the database refused a value ({describe(exc)})")
    return TierUnavailable(f"SQL tier unavailable: {describe(exc)}")


# What a caller whose call may or may not have landed is told to do.
_RETRY_ADVICE = (
    "a retry with the same request_id is answered as the replay it is if it landed; without "
    "a request_id, read the thread's head before trying again"
)


class _AmbiguousCommit(Exception):
    """COMMIT was sent but its answer was lost: the batch may or may not be durable."""

    def __init__(
        self,
        batch: Batch,
        results: list[tuple[bool, Any]],
        batch_id: str,
        cause: BaseException,
        session: Any,
    ) -> None:
        super().__init__(str(cause))
        self.batch = batch
        self.results = results  # what the operations answered, if the batch landed
        self.batch_id = batch_id
        self.cause = cause
        self.session = session  # the database session that had the COMMIT (Batch.abandon)


# An operation's weight (ops.py): 1, plus its events and writes, plus a unit per 64 KiB it
# stores. A batch carries at most BATCH_WEIGHT of it; an operation of HEAVY_WEIGHT or more
# commits in a lane of its own on PostgreSQL, beside the small ones, so that one big request
# never holds everyone else's back (docs/checkpoint-service.md#limits).
BATCH_WEIGHT = 512
HEAVY_WEIGHT = 64
# On PostgreSQL two light lanes commit side by side (two connections, so both cores of the
# server work): a batch formed while the other lane waits for work gives it the operations of
# half its threads, once it has at least this many.
SHARE_MIN = 16
_RETRY_BACKOFF = (0.1, 2.0)  # write-behind retries while SQL is down: first and longest wait


@dataclass(slots=True)
class _Item:
    op: Operation
    future: asyncio.Future
    behind: bool  # write-behind: acknowledged already, so retried until SQL takes it
    weight: int
    lane: _Lane | None = None  # the lane it is queued in (it may be handed to another)
    settled: bool = False  # committed, refused or dropped (see GroupCommitter._settle)


@dataclass(eq=False)
class _Lane:
    """One consumer of operations, committing them batch after batch."""

    name: str
    queue: asyncio.Queue[_Item]
    # Operations of each thread queued here and not answered yet: the next one of a thread
    # joins their lane, so that a thread's operations commit in the order they came.
    pending: dict[ThreadKey, int] = field(default_factory=dict)
    carry: list[_Item] = field(default_factory=list)  # taken, for the next batch
    retry: list[_Item] = field(default_factory=list)  # write-behind, waiting for SQL
    backoff: float = 0.0
    task: asyncio.Task | None = None
    idle: bool = True  # its consumer waits for work (nothing queued, nothing committing)
    batches: int = 0  # committed


class GroupCommitter:
    def __init__(
        self,
        sql: SqlTier,
        after_commit: Callable[[Batch], Awaitable[Awaitable[None] | None]],
        batch_max: int = 256,
        queue_max: int = 10_000,
        *,
        in_commit_order: bool = False,
    ) -> None:
        self.sql = sql
        self._after_commit = after_commit
        self.batch_max = batch_max
        # One lane where a second would not help: SQLite has one writer at a time. A single
        # writer's memory tier must see each thread's commits in their order, which the lanes
        # keep (a thread's operations go through one lane at a time); its heavy operations
        # share the light lanes.
        self._lights = [
            _Lane(name, asyncio.Queue(maxsize=queue_max))
            for name in (["group-commit"] if sql.is_sqlite else ["group-commit", "group-commit-2"])
        ]
        self._heavy = (
            None
            if sql.is_sqlite or in_commit_order
            else _Lane("group-commit-heavy", asyncio.Queue(maxsize=queue_max))
        )
        self._deadline: float | None = None  # set by close(): write-behind retries end then
        # Committed batches wait here, in commit order, for the caches and the feed; that
        # work overlaps the next batch's commit instead of delaying it.
        self._committed: asyncio.Queue[tuple[Batch, list[_Item], list[tuple[bool, Any]]]] = (
            asyncio.Queue(maxsize=4)
        )
        self._announcer: asyncio.Task | None = None
        self._closing = False
        self._unsettled = 0  # operations queued and not answered yet
        self._settled = asyncio.Event()
        self._settled.set()
        self.batches = 0
        self.operations = 0

    @property
    def light_lanes(self) -> list[_Lane]:
        """The lanes of all but heavy operations: two on PostgreSQL, one on SQLite."""
        return self._lights

    @property
    def _lanes(self) -> list[_Lane]:
        return self._lights if self._heavy is None else [*self._lights, self._heavy]

    def start(self) -> None:
        for lane in self._lanes:
            lane.task = asyncio.create_task(self._run(lane), name=lane.name)
        self._announcer = asyncio.create_task(self._announce(), name="after-commit")

    async def submit(self, op: Operation, wait: bool = True) -> Any:
        """Queue an operation; with wait=False, return once queued (write-behind)."""
        if self._closing:
            raise TierUnavailable("the service is shutting down")
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        item = _Item(op, future, behind=not wait, weight=op.weight)
        lane = item.lane = self._lane_for(item)
        key = op.key
        lane.pending[key] = lane.pending.get(key, 0) + 1
        self._unsettled += 1
        self._settled.clear()
        try:
            await lane.queue.put(item)
        except BaseException:  # cancelled while the queue was full: it was never queued
            future.cancel()
            self._settle(item)
            raise
        if not wait:
            future.add_done_callback(_log_lost_write)
            return None
        return await future

    def _lane_for(self, item: _Item) -> _Lane:
        """An operation follows its thread's operations not answered yet, so that they
        commit in order; else a heavy one goes to its own lane, and a light one to a light
        lane waiting for work, or the first."""
        key = item.op.key
        for lane in self._lanes:
            if lane.pending.get(key):
                return lane
        if self._heavy is not None and item.weight >= HEAVY_WEIGHT:
            return self._heavy
        return next((lane for lane in self._lights if lane.idle), self._lights[0])

    def _share(self, lane: _Lane, items: list[_Item]) -> list[_Item]:
        """A light lane's batch, less what it hands to a light lane that waits for work:
        the operations of the later half of its threads, each thread's all (none of them
        left in this lane), so that each thread's operations still commit in order."""
        if len(items) < SHARE_MIN or lane not in self._lights:
            return items
        other = next(
            (o for o in self._lights if o is not lane and o.idle and o.queue.empty()), None
        )
        if other is None:
            return items
        counts = collections.Counter(item.op.key for item in items)
        keys = [k for k, n in counts.items() if lane.pending.get(k) == n]
        given = set(keys[len(keys) - len(counts) // 2 :])  # none of a lone thread
        if not given:
            return items
        kept = []
        for item in items:
            if item.op.key not in given:
                kept.append(item)
                continue
            item.lane = other
            other.queue.put_nowait(item)  # its consumer waits: the queue is empty
        for key in given:
            other.pending[key] = lane.pending.pop(key)
        other.idle = False
        return kept

    def _settle(self, item: _Item) -> None:
        """Its operation was committed, refused or dropped: the next of its thread need no
        longer follow it, and close() no longer waits for it. Not when its caller gives up:
        a queued operation is committed all the same, before the next of its thread."""
        if item.settled:
            return
        item.settled = True
        lane, key = item.lane, item.op.key
        left = lane.pending[key] - 1
        if left:
            lane.pending[key] = left
        else:
            del lane.pending[key]
        self._unsettled -= 1
        if self._unsettled == 0:
            self._settled.set()

    async def close(self, grace: float) -> None:
        """Stop taking operations and commit everything queued (the write-behind flush)."""
        self._closing = True
        self._deadline = time.monotonic() + grace
        try:
            await asyncio.wait_for(self._settled.wait(), grace)
        except TimeoutError:
            log.error("write-behind queue not flushed", extra={"lost": self._unsettled})
        tasks = [lane.task for lane in self._lanes] + [self._announcer]
        for task in tasks:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _next_batch(self, lane: _Lane) -> list[_Item]:
        """Write-behind retries first (after their backoff), then what came meanwhile, up to
        the batch's count and weight."""
        if lane.retry:
            await asyncio.sleep(lane.backoff)
        items, lane.retry, lane.carry = lane.retry + lane.carry, [], []
        if not items:
            lane.idle = lane.queue.empty()
            items = [await lane.queue.get()]
            lane.idle = False
        weight = sum(i.weight for i in items)
        while len(items) < self.batch_max and weight < BATCH_WEIGHT:
            try:
                item = lane.queue.get_nowait()
            except asyncio.QueueEmpty:
                break
            if weight + item.weight > BATCH_WEIGHT:
                lane.carry.append(item)  # the next batch starts with it
                break
            items.append(item)
            weight += item.weight
        return self._share(lane, items)

    async def _run(self, lane: _Lane) -> None:
        while True:
            items = await self._next_batch(lane)
            try:
                await self._commit(lane, items)
            except Exception as exc:  # never let the consumer die
                log.exception("group commit failed")
                error = TierUnavailable(
                    f"commit failed in the service ({type(exc).__name__}, in its log), landed "
                    f"or not: {_RETRY_ADVICE}"
                )
                for item in items:
                    if not item.future.done():
                        item.future.set_exception(error)
                    self._settle(item)

    async def _commit(self, lane: _Lane, items: list[_Item]) -> None:
        started = time.monotonic()
        try:
            batch, results = await self._attempt(items)
        except (TimeoutError, *SQL_ERRORS, OSError, TierUnavailable) as exc:
            unavailable = isinstance(exc, TierUnavailable) or is_connectivity_error(exc)
            if len(items) > 1 and not unavailable:
                for item in items:  # a data error: find whose, commit the others
                    await self._commit(lane, [item])
                return
            error = as_store_error(exc)
            if unavailable:
                self.sql.up, self.sql.detail = False, str(error)
            for item in items:
                if item.future.done():
                    self._settle(item)
                elif unavailable and item.behind and self._retrying():
                    lane.retry.append(item)  # acknowledged: never dropped while SQL is down
                else:
                    item.future.set_exception(error)
                    self._settle(item)
            if lane.retry:
                low, high = _RETRY_BACKOFF
                lane.backoff = min(high, max(low, lane.backoff * 2))
                log.warning(
                    "SQL unavailable; write-behind saves kept for a retry",
                    extra={"waiting": len(lane.retry), "retry_in": lane.backoff},
                )
            return
        lane.backoff = 0.0
        self.sql.up = True
        lane.batches += 1
        self.batches += 1
        self.operations += len(items)
        metrics.COMMITS.inc()
        metrics.COMMITTED_OPERATIONS.inc(len(items))
        metrics.BATCH_SIZE.observe(len(items))
        metrics.COMMIT_SECONDS.observe(time.monotonic() - started)
        await self._committed.put((batch, items, results))

    def _retrying(self) -> bool:
        """Write-behind saves are retried while SQL is down, until a shutdown's grace ends."""
        return self._deadline is None or time.monotonic() < self._deadline

    async def _announce(self) -> None:
        """Warm the local caches and feed, answer the callers (read-your-writes), then do
        what the hook left for later (shared caches), in commit order."""
        while True:
            batch, items, results = await self._committed.get()
            later: Awaitable[None] | None = None
            try:
                later = await self._after_commit(batch)
            except Exception:  # caches are best effort; the data is committed
                log.exception("after-commit hook failed")
            for item, (ok, value) in zip(items, results, strict=True):
                if not item.future.done():
                    if ok:
                        item.future.set_result(value)
                    else:
                        item.future.set_exception(value)
                self._settle(item)
            if later is not None:
                try:
                    await later
                except Exception:
                    log.exception("after-commit work failed")
            self._committed.task_done()

    async def _attempt(self, items: list[_Item]) -> tuple[Batch, list[tuple[bool, Any]]]:
        """Commit with bounded retries; never re-run a batch whose COMMIT may have landed."""

        async def once() -> tuple[Batch, list[tuple[bool, Any]]]:
            try:
                return await self._once(items)
            except _AmbiguousCommit as lost:
                if not await self._landed(lost):
                    raise lost.cause from None
                await self._number_events(lost.batch)
                return lost.batch, lost.results

        return await with_sql_retries(once)

    async def _landed(self, lost: _AmbiguousCommit) -> bool:
        """Whether an ambiguous commit is durable, by its marker row; UNAVAILABLE if unknowable."""
        try:
            landed = await with_sql_retries(
                lambda: self.sql.batch_committed(lost.batch_id, lost.session)
            )
        except (TimeoutError, *SQL_ERRORS, OSError, SessionOutlived) as exc:
            metrics.LOST_COMMIT_ANSWERS.labels("unknown").inc()
            raise TierUnavailable(
                f"commit outcome unknown ({describe(exc)} while finding it out): {_RETRY_ADVICE}"
            ) from exc
        metrics.LOST_COMMIT_ANSWERS.labels("landed" if landed else "not_landed").inc()
        return landed

    async def _number_events(self, landed: Batch) -> None:
        """The feed seqs of a landed batch's events, which the lost answer carried (in one
        statement). Never raises: the batch is committed, and must not run again."""
        try:
            await with_sql_retries(lambda: self.sql.number_events(landed.flushed_events))
        except (TimeoutError, *SQL_ERRORS, OSError) as exc:
            log.warning(
                "feed seqs of a landed batch unread; watchers read them from SQL",
                extra={"error": describe(exc)},
            )

    async def _once(self, items: list[_Item]) -> tuple[Batch, list[tuple[bool, Any]]]:
        """One attempt: in one statement if it can be (docs/checkpoint-service.md#the-hot-
        path-on-postgresql), else the long way; the threads as it left them remembered."""
        ops = [i.op for i in items]
        hot = self.sql.hot
        if hot is None:  # SQLite
            return await self._apply(ops, in_one_statement=False)
        try:
            if _in_one_statement(hot, ops):
                try:
                    return await self._apply(ops, in_one_statement=True)
                except ChangedSinceSeen:
                    hot.forget(op.key for op in ops)
            return await self._apply(ops, in_one_statement=False)
        except BaseException:
            hot.forget(op.key for op in ops)
            raise

    async def _apply(
        self, ops: list[Operation], *, in_one_statement: bool
    ) -> tuple[Batch, list[tuple[bool, Any]]]:
        results: list[tuple[bool, Any]] = []
        batch_id = uuid.uuid4().hex
        async with self.sql.open_batch(time.time(), in_one_statement) as batch:
            try:
                await batch.lock(
                    (op.key for op in ops), create={op.key for op in ops if op.creates}
                )
                await batch.prefetch(
                    [(op.key.tenant, op.request_id) for op in ops if op.request_id],
                    [(op.key, op.claimed_id) for op in ops if op.claimed_id],
                )
                for op in ops:
                    try:
                        results.append((True, await op.apply(batch)))
                    except StoreError as exc:
                        results.append((False, exc))
                await batch.drop_unwritten_threads()
                batch.mark(batch_id)
                await batch.flush()
            except BaseException:
                with contextlib.suppress(Exception):
                    await batch.rollback()
                raise
            if in_one_statement and not all(ok for ok, _ in results):
                # Refused on what this replica saw: nothing sent; the long way says whether
                # SQL agrees.
                raise ChangedSinceSeen("an operation was refused on a remembered row")
            try:
                await batch.commit()
            except (TimeoutError, *SQL_ERRORS, OSError) as exc:
                if not is_connectivity_error(exc):
                    raise  # an answer: the transaction was rolled back
                raise _AmbiguousCommit(batch, results, batch_id, exc, batch.abandon()) from exc
        if self.sql.hot is not None:
            self.sql.hot.remember(batch)
        return batch, results


def _in_one_statement(hot: PgHotPath, ops: list[Operation]) -> bool:
    """Whether a batch can be checked and written in one statement: every thread either as
    this replica left it, or new to SQL (then the statement inserts it, and fails if it was
    not new); no operation that deletes, or needs a thread to exist, or (unless the hot path
    may: PgHotPath.claims_in_one_statement) a client-chosen checkpoint id checked on a thread
    that has checkpoints."""
    for op in ops:
        if not op.in_one_statement:
            return False
        if not hot.knows(op.key) and not op.creates:
            return False
        if op.claimed_id and hot.knows(op.key) and not hot.claims_in_one_statement:
            return False
    return True


def _log_lost_write(future: asyncio.Future) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("write-behind save failed", extra={"error": str(future.exception())})
