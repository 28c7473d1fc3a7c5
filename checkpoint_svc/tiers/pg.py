"""The hot path on PostgreSQL: group-commit batches and Restore on raw asyncpg.

SQLAlchemy keeps the schema, the migrations, SQLite and every statement that is not on a
step's path. Here a batch costs five round trips whatever it holds (BEGIN, lock its threads,
look up its request ids, one statement writing everything, COMMIT), and a Restore one, on
statements asyncpg prepares once per connection with a generic plan
(docs/checkpoint-service.md#the-hot-path-on-postgresql).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import datetime
import functools
import json
import logging
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

import asyncpg
from sqlalchemy.engine import make_url

from checkpoint_svc.domain import Checkpoint, Event, PendingWrite, Thread, ThreadKey
from checkpoint_svc.sealing import Sealing
from checkpoint_svc.tiers.sql import (
    THREAD_COLUMNS,
    Batch,
    SqlTier,
    _checkpoint_from_row,
    _sort_key,
    _thread_from_row,
)

log = logging.getLogger(__name__)

# States up to this size come back with the Restore query itself; bigger ones are read from
# the fastest cache holding them, then by a second query.
INLINE_STATE_BYTES = 65536

_KEYS = "unnest($1::text[], $2::text[], $3::text[])"
LOCK_THREADS = f"""
SELECT tenant, namespace, thread_id, {THREAD_COLUMNS} FROM threads
WHERE (tenant, namespace, thread_id) IN (SELECT * FROM {_KEYS})
ORDER BY tenant, namespace, thread_id FOR UPDATE"""
INSERT_THREADS = f"""
INSERT INTO threads (tenant, namespace, thread_id, created_at, updated_at)
SELECT k.*, $4, $4 FROM {_KEYS} AS k ON CONFLICT DO NOTHING"""
DELETE_NEW_THREADS = f"""
DELETE FROM threads WHERE (tenant, namespace, thread_id) IN (SELECT * FROM {_KEYS})"""
# FOR SHARE: a batch moving that head and not committed yet is waited for, and its head read.
SELECT_HEAD = """
SELECT head_id FROM threads WHERE tenant = $1 AND namespace = $2 AND thread_id = $3 FOR SHARE"""
FIND_REQUESTS = """
SELECT tenant, request_id, kind, result FROM requests
WHERE (tenant, request_id) IN (SELECT * FROM unnest($1::text[], $2::text[]))"""
# Client-supplied checkpoint ids of a batch: taken already? writes for them committed first?
CLAIMED_IDS = """
SELECT k.tenant, k.namespace, k.thread_id, k.checkpoint_id,
    EXISTS (SELECT 1 FROM checkpoints c WHERE c.tenant = k.tenant AND c.namespace = k.namespace
        AND c.thread_id = k.thread_id AND c.checkpoint_id = k.checkpoint_id) AS taken,
    EXISTS (SELECT 1 FROM writes w WHERE w.tenant = k.tenant AND w.namespace = k.namespace
        AND w.thread_id = k.thread_id AND w.checkpoint_id = k.checkpoint_id) AS has_writes
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[])
    AS k(tenant, namespace, thread_id, checkpoint_id)"""

# Everything a batch writes, in one statement: checkpoints, pending writes (kept once, or
# replacing their slot), the request ids and batch marker, the threads moved, then the
# tenants' feed rows bumped (locking them until COMMIT, so that feed seqs are dense and in
# commit order) and the events numbered from them. The statement's one row counts what each
# part wrote (each count runs its part, in the order of the row's columns: the feed rows are
# locked last, so another batch of the tenant waits on them only for this one's events and
# commit) and gives the feeds' new last seqs. Each parameter is an array of rows of its
# table's own type, in the table's column order (an event's feed_seq carries how far from its
# tenant's last one it is): one parameter per table, not one per column, which asyncpg encodes
# in a fraction of the time.
_WRITE_SLOT = "(tenant, namespace, thread_id, checkpoint_id, task_id, idx)"
_FLUSH = f"""
WITH new_checkpoints AS (
    INSERT INTO checkpoints SELECT * FROM unnest($1::checkpoints[]) RETURNING 1
), kept_writes AS (
    INSERT INTO writes SELECT * FROM unnest($2::writes[]) ON CONFLICT {_WRITE_SLOT} DO NOTHING
    RETURNING 1
), replacing_writes AS (
    INSERT INTO writes SELECT * FROM unnest($3::writes[])
    ON CONFLICT {_WRITE_SLOT} DO UPDATE SET channel = excluded.channel,
        value = excluded.value, content_type = excluded.content_type,
        task_path = excluded.task_path
    RETURNING 1
), new_requests AS (
    INSERT INTO requests SELECT * FROM unnest($6::requests[]) RETURNING 1
){{new_threads}}, moved AS (
    UPDATE threads t SET head_id = u.head_id, status = u.status, workflow_id = u.workflow_id,
        workflow_version = u.workflow_version, lease_owner = u.lease_owner,
        lease_expires_at = u.lease_expires_at, fencing_token = u.fencing_token,
        last_seq = u.last_seq, updated_at = u.updated_at, deleted = u.deleted,
        keep_last = u.keep_last, keep_forever = u.keep_forever
    FROM unnest($7::threads[]) WITH ORDINALITY AS u{{seen_rows}}
    WHERE t.tenant = u.tenant AND t.namespace = u.namespace AND t.thread_id = u.thread_id
        {{seen_check}}
    RETURNING 1
), bumped AS (
    INSERT INTO feeds SELECT * FROM unnest($4::feeds[])
    ON CONFLICT (tenant) DO UPDATE SET last_seq = feeds.last_seq + excluded.last_seq
    RETURNING tenant, last_seq
), new_events AS (
    INSERT INTO events
    SELECT e.tenant, e.namespace, e.thread_id, e.seq, b.last_seq - e.feed_seq, e.type, e.time,
        e.payload, e.terminal
    FROM unnest($5::events[]) AS e JOIN bumped b ON b.tenant = e.tenant
    RETURNING 1
)
SELECT (SELECT count(*) FROM new_checkpoints) AS checkpoints,
    (SELECT count(*) FROM kept_writes) + (SELECT count(*) FROM replacing_writes) AS writes,
    (SELECT count(*) FROM new_requests) AS requests,{{new_threads_count}}
    (SELECT count(*) FROM moved) AS moved,{{conflict}}
    (SELECT count(*) FROM new_events) AS events,
    ARRAY(SELECT tenant FROM bumped ORDER BY tenant) AS tenants,
    ARRAY(SELECT last_seq FROM bumped ORDER BY tenant) AS last_seqs"""
# Inside a transaction that locked the threads first.
FLUSH = _FLUSH.format(
    new_threads="", new_threads_count="", seen_rows="", seen_check="", conflict=""
)
# On its own, committing as it ends: every thread of the batch is updated only if its row is
# still as this replica last saw it ($8, in the order of $7: its operations were checked
# against that row), and the threads it takes for new ($10) are inserted (so a row there
# already fails the statement: unique). If one is not, 1/0 fails the statement (before the
# feed rows are locked) and nothing of it is written; the batch then runs again the long way
# (PgBatch.commit). Likewise unless every head its Saves require of other threads ($11-$14:
# tenant, namespace, thread id, head) is there: read FOR SHARE, so that a batch moving one and
# not committed yet is waited for and its new row checked, and before the feed rows (which
# that batch locks after its threads). The order of the parts is PostgreSQL's evaluation of
# the row's columns, left to right; what the statement writes does not depend on it, only
# how long it holds the feed rows. A required head is locked outside the key order of the
# batch's own threads: a cycle that makes (two batches each moving the head the other
# requires) PostgreSQL breaks after deadlock_timeout, and the batch is retried.
FLUSH_IF_UNCHANGED = _FLUSH.format(
    new_threads=""", new_threads AS (
    INSERT INTO threads SELECT * FROM unnest($10::threads[]) RETURNING 1
), required AS (
    SELECT 1 FROM threads t
    JOIN unnest($11::text[], $12::text[], $13::text[], $14::text[])
        AS r(tenant, namespace, thread_id, head_id)
        ON t.tenant = r.tenant AND t.namespace = r.namespace AND t.thread_id = r.thread_id
            AND t.head_id = r.head_id
    FOR SHARE OF t
)""",
    new_threads_count="""
    (SELECT count(*) FROM new_threads) AS new_threads,""",
    seen_rows="""
        JOIN unnest($8::threads[]) WITH ORDINALITY AS s ON s.ordinality = u.ordinality""",
    seen_check="""AND t.head_id = s.head_id AND t.status = s.status
        AND t.workflow_id = s.workflow_id AND t.workflow_version = s.workflow_version
        AND t.lease_owner = s.lease_owner AND t.lease_expires_at = s.lease_expires_at
        AND t.fencing_token = s.fencing_token AND t.last_seq = s.last_seq
        AND t.updated_at = s.updated_at AND t.deleted = s.deleted
        AND t.keep_last = s.keep_last AND t.keep_forever = s.keep_forever""",
    conflict="""
    1 / ((SELECT count(*) FROM moved) = $9
        AND (SELECT count(*) FROM required) = cardinality($11::text[]))::int AS unchanged,""",
)
# What FLUSH_IF_UNCHANGED fails with when a thread changed: division_by_zero, by design.
CHANGED_SINCE_SEEN = "22012"
# A request id used already (a retry) or a checkpoint id taken: the long way tells which.
UNIQUE_VIOLATION = "23505"
# Threads this replica committed last, as it left them, for FLUSH_IF_UNCHANGED to check.
SEEN_THREADS_MAX = 10_000

# Restore: the checkpoint (the head, or one by id) with its metadata, its state when small,
# and its pending writes aggregated in order: one row, one round trip.
_RESTORED = """c.checkpoint_id, c.parent_id, c.step, c.content_type, c.trigger, c.name,
    c.completed_nodes, c.progress_percent, c.eta_seconds, c.metadata, c.created_at,
    c.expires_at, CASE WHEN c.state_size <= $4 THEN c.state END AS state, w.*"""
_PENDING_WRITES = """LEFT JOIN LATERAL (
    SELECT array_agg(w.task_id ORDER BY w.task_id, w.idx) AS write_tasks,
        array_agg(w.idx ORDER BY w.task_id, w.idx) AS write_idxs,
        array_agg(w.channel ORDER BY w.task_id, w.idx) AS write_channels,
        array_agg(w.value ORDER BY w.task_id, w.idx) AS write_values,
        array_agg(w.content_type ORDER BY w.task_id, w.idx) AS write_content_types,
        array_agg(w.task_path ORDER BY w.task_id, w.idx) AS write_task_paths
    FROM writes w WHERE $5 AND w.tenant = c.tenant AND w.namespace = c.namespace
        AND w.thread_id = c.thread_id AND w.checkpoint_id = c.checkpoint_id) w ON true"""
RESTORE_HEAD = f"""
SELECT {_RESTORED}, t.last_seq AS version
FROM threads t JOIN checkpoints c ON c.tenant = t.tenant AND c.namespace = t.namespace
    AND c.thread_id = t.thread_id AND c.checkpoint_id = t.head_id
{_PENDING_WRITES}
WHERE t.tenant = $1 AND t.namespace = $2 AND t.thread_id = $3"""
RESTORE_CHECKPOINT = f"""
SELECT {_RESTORED}, 0::int8 AS version FROM checkpoints c
{_PENDING_WRITES}
WHERE c.tenant = $1 AND c.namespace = $2 AND c.thread_id = $3 AND c.checkpoint_id = $6"""
SELECT_STATE = """
SELECT state FROM checkpoints WHERE tenant = $1 AND namespace = $2 AND thread_id = $3
    AND checkpoint_id = $4 AND created_at = $5"""
DELETE_THREAD_CHECKPOINTS = """
DELETE FROM checkpoints WHERE tenant = $1 AND namespace = $2 AND thread_id = $3"""
DELETE_THREAD_WRITES = "DELETE FROM writes WHERE tenant = $1 AND namespace = $2 AND thread_id = $3"
DELETE_THREAD_EVENTS = "DELETE FROM events WHERE tenant = $1 AND namespace = $2 AND thread_id = $3"
# The row stays as a tombstone (see sql.TOMBSTONE_THREAD).
TOMBSTONE_THREAD = """
UPDATE threads SET deleted = 1, head_id = '', status = 0, workflow_id = '', workflow_version = 0,
    lease_owner = '', lease_expires_at = 0, keep_last = 0, keep_forever = 0, updated_at = $4
WHERE tenant = $1 AND namespace = $2 AND thread_id = $3"""

# A server process, named by its pid and start time (a pid alone may be another's later).
SESSION_START = """
SELECT pid, backend_start FROM pg_stat_get_activity(pg_backend_pid())"""
END_SESSION = """
SELECT pg_terminate_backend(pid) FROM pg_stat_get_activity($1) WHERE backend_start = $2"""
SESSION_ALIVE = """
SELECT EXISTS (SELECT 1 FROM pg_stat_get_activity($1) WHERE backend_start = $2)"""


def libpq_url(url: str) -> str:
    """The asyncpg DSN of a SQLAlchemy `postgresql+asyncpg://` URL."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _columns(rows: Sequence[Sequence[Any]], width: int) -> list[list[Any]]:
    """Rows to columns: unnest() takes one array per column."""
    return [list(c) for c in zip(*rows, strict=True)] if rows else [[] for _ in range(width)]


def _keys(keys: Iterable[ThreadKey]) -> list[list[str]]:
    return _columns([(k.tenant, k.namespace, k.thread_id) for k in keys], 3)


class SessionOutlived(Exception):
    """The server process a lost COMMIT answer came from did not end in time: whether the
    COMMIT lands is unknown."""


class _Connection(asyncpg.Connection):
    """A connection that knows its server process, to end it after a lost COMMIT answer."""

    __slots__ = ("session",)

    session: tuple[int, datetime.datetime] | None


async def _note_session(conn: _Connection) -> None:
    """A writer connection's server process. Behind a connection pooler (pgbouncer) it is
    not the one the next transaction runs on, which the handshake's pid then shows: no
    session is noted, and a lost COMMIT answer is resolved by the marker alone."""
    row = await conn.fetchrow(SESSION_START)
    conn.session = (row["pid"], row["backend_start"])
    if row["pid"] != conn.get_server_pid():
        conn.session = None
        _warn_of_pooler()


@functools.cache  # said once per process
def _warn_of_pooler() -> None:
    log.warning(
        "PostgreSQL is reached through a connection pooler: a COMMIT whose answer is lost is "
        "resolved by its batch marker without ending the process that had it "
        "(docs/checkpoint-service.md#writes)"
    )


async def _keep_session(_conn: asyncpg.Connection) -> None:
    """Nothing to reset when a connection goes back to its pool: this module sets no session
    state (asyncpg's default reset would cost a round trip per batch and per Restore; an
    unfinished transaction is still rolled back)."""


_SPARE_MAX = 3  # the lanes of group commit (two light ones, one heavy)
# Reader connections kept between reads: a pool's acquire and release (a task and a shield
# each) cost about a third of a small Restore's time in this process.
_SPARE_READERS_MAX = 4


class PgHotPath:
    """asyncpg pools of their own: one for batches, one for Restore (a burst of reads never
    starves the group committer)."""

    def __init__(self, url: str, *, timeout: float = 15.0, sealing: Sealing) -> None:
        self.dsn = libpq_url(url)
        self.sealing = sealing
        self.timeout = timeout  # seconds a statement may take (Settings.sql_timeout)
        self._writer: asyncpg.Pool | None = None
        self._reader: asyncpg.Pool | None = None
        # The threads this replica's batches committed last, as they left them (newest last).
        self.seen: collections.OrderedDict[ThreadKey, Thread] = collections.OrderedDict()
        # Writer connections kept between batches (one per lane): a pool's acquire and
        # release cost more than a small batch's Python work.
        self._spare: list[asyncpg.Connection] = []
        self._spare_readers: list[asyncpg.Connection] = []
        self._closing = False  # close() began: connections go back to their pools
        # Whether a batch saving a client-chosen checkpoint id on a remembered thread may go
        # in one statement (the checkpoints' primary key refuses a taken id, and the batch
        # then runs the long way, which says so); not when early writes must be known.
        self.claims_in_one_statement = True

    def knows(self, key: ThreadKey) -> bool:
        """Whether this replica has the thread's row as its last batch left it."""
        return key in self.seen

    def remember(self, batch: Batch) -> None:
        """After a commit: the batch's threads as it left them (a hint, checked on use)."""
        for key in batch.deleted:
            self.seen.pop(key, None)
        for key, thread in batch.threads.items():
            if thread is None or thread.deleted:
                self.seen.pop(key, None)
            else:
                self.seen[key] = dataclasses.replace(thread)
                self.seen.move_to_end(key)
        while len(self.seen) > SEEN_THREADS_MAX:
            self.seen.popitem(last=False)

    def forget(self, keys: Iterable[ThreadKey]) -> None:
        for key in keys:
            self.seen.pop(key, None)

    async def _pool(self, size: int, *, sessions: bool = False) -> asyncpg.Pool:
        """`sessions`: each connection notes its server process (_note_session)."""
        # min_size 0: creating a pool never waits for PostgreSQL (it may be down at start).
        return await asyncpg.create_pool(
            self.dsn,
            min_size=0,
            max_size=size,
            timeout=2.0,
            command_timeout=self.timeout,
            # One plan per statement, made once: these statements take keys, not ranges.
            server_settings={"plan_cache_mode": "force_generic_plan"},
            reset=_keep_session,
            connection_class=_Connection,
            init=_note_session if sessions else None,
        )

    async def writer(self) -> asyncpg.Pool:
        if self._writer is None:
            self._writer = await self._pool(4, sessions=True)
        return self._writer

    async def reader(self) -> asyncpg.Pool:
        if self._reader is None:
            self._reader = await self._pool(16)
        return self._reader

    async def close(self) -> None:
        self._closing = True
        if self._writer is not None:
            for conn in self._spare:
                await self._writer.release(conn)
        self._spare.clear()
        if self._reader is not None:
            for conn in self._spare_readers:
                await self._reader.release(conn)
        self._spare_readers.clear()
        for pool in (self._writer, self._reader):
            if pool is not None:
                await pool.close()

    @contextlib.asynccontextmanager
    async def open_batch(
        self, sql: SqlTier, now: float, in_one_statement: bool = False
    ) -> AsyncIterator[Batch]:
        """A batch in a transaction that locks its threads first; `in_one_statement`: one
        that checks its operations against the threads as this replica saw them last and
        writes everything in one statement at commit (ChangedSinceSeen if a thread moved)."""
        pool = await self.writer()
        conn = await self._take(pool, self._spare)
        try:
            if in_one_statement:
                yield PgBatch(sql, conn, None, now, seen=self.seen)
            else:
                transaction = conn.transaction()
                await transaction.start()
                yield PgBatch(sql, conn, transaction, now)
        except BaseException:
            await pool.release(conn)  # resets it (an open transaction rolled back) or drops it
            raise
        await self._give_back(pool, self._spare, _SPARE_MAX, conn)

    async def end_session(self, session: tuple[int, datetime.datetime]) -> None:
        """After a lost COMMIT answer: end the server process it was sent to, and wait until
        it is gone. A COMMIT whose caller gave up (a timeout, a broken connection) may still
        land while that process lives; once it is gone, its transaction has landed or not
        for good, and the batch marker says which (docs/checkpoint-service.md#errors)."""
        deadline = time.monotonic() + self.timeout
        pool = await self.writer()  # the writers' host, if the URL names several
        async with pool.acquire(timeout=5.0) as conn:
            with contextlib.suppress(asyncpg.InsufficientPrivilegeError):
                await conn.fetchval(END_SESSION, *session)  # else it ends by itself, or not
            while await conn.fetchval(SESSION_ALIVE, *session):
                if time.monotonic() > deadline:
                    raise SessionOutlived("the server process that had the COMMIT is still there")
                await asyncio.sleep(0.05)

    @contextlib.asynccontextmanager
    async def _reading(self) -> AsyncIterator[asyncpg.Connection]:
        """A reader connection: a spare one if there is, else one from the pool."""
        pool = await self.reader()
        conn = await self._take(pool, self._spare_readers)
        try:
            yield conn
        except BaseException:
            await pool.release(conn)  # resets it or drops it
            raise
        await self._give_back(pool, self._spare_readers, _SPARE_READERS_MAX, conn)

    @staticmethod
    async def _take(pool: asyncpg.Pool, spares: list[asyncpg.Connection]) -> asyncpg.Connection:
        """A kept connection that is still open, else one from the pool."""
        while spares:
            conn = spares.pop()
            if not conn.is_closed():
                return conn
            await pool.release(conn)  # the server went away meanwhile: the pool replaces it
        return await pool.acquire(timeout=5.0)

    async def _give_back(
        self,
        pool: asyncpg.Pool,
        spares: list[asyncpg.Connection],
        most: int,
        conn: asyncpg.Connection,
    ) -> None:
        """Keep a connection for the next use, or return it to its pool."""
        idle = not conn.is_closed() and not conn.is_in_transaction()
        if idle and len(spares) < most and not self._closing:
            spares.append(conn)
        else:
            await pool.release(conn)

    async def find_checkpoint(
        self, key: ThreadKey, checkpoint_id: str, include_writes: bool
    ) -> tuple[Checkpoint, int, list[PendingWrite], bytes | None] | None:
        args = [key.tenant, key.namespace, key.thread_id, INLINE_STATE_BYTES, include_writes]
        async with self._reading() as conn:
            if checkpoint_id:
                row = await conn.fetchrow(RESTORE_CHECKPOINT, *args, checkpoint_id)
            else:
                row = await conn.fetchrow(RESTORE_HEAD, *args)
        if row is None:
            return None
        cp = _checkpoint_from_row(key, row)
        sealing, cid = self.sealing, cp.checkpoint_id
        writes = [
            PendingWrite(
                cid, task, idx, channel, sealing.open_value(key, cid, task, idx, value), *more
            )
            for task, idx, channel, value, *more in zip(
                row["write_tasks"] or (),
                row["write_idxs"] or (),
                row["write_channels"] or (),
                row["write_values"] or (),
                row["write_content_types"] or (),
                row["write_task_paths"] or (),
                strict=True,
            )
        ]
        state = row["state"]
        if state is not None:
            state = sealing.open_state(key, cid, state)
        return cp, row["version"], writes, state

    async def state_of(self, named: Checkpoint) -> bytes | None:
        key = named.key
        async with self._reading() as conn:
            state = await conn.fetchval(
                SELECT_STATE,
                key.tenant,
                key.namespace,
                key.thread_id,
                named.checkpoint_id,
                named.created_at,
            )
        return None if state is None else self.sealing.open_state(key, named.checkpoint_id, state)


class ChangedSinceSeen(Exception):
    """A batch in one statement met a thread that changed since this replica saw it (or a
    request id or checkpoint id taken): nothing was written; run it the long way."""


class PgBatch(Batch):
    """A batch on one asyncpg connection: the same operations, fewer and cheaper statements."""

    def __init__(
        self,
        sql: SqlTier,
        conn: Any,
        transaction: Any,
        now: float,
        *,
        seen: dict[ThreadKey, Thread] | None = None,
    ) -> None:
        super().__init__(sql, conn, transaction, now)
        # What prefetch() read: request ids (found or not), client-chosen checkpoint ids.
        self._requests: dict[tuple[str, str], tuple[str, str]] = {}
        self._looked_up: set[tuple[str, str]] = set()
        self._claimed: dict[tuple[ThreadKey, str], tuple[bool, bool]] = {}
        # In one statement (no transaction): the rows the operations are checked against,
        # the statement's arguments once flushed.
        self._seen = seen
        self._unchanged: dict[ThreadKey, tuple[Any, ...]] = {}
        self._new: set[ThreadKey] = set()  # taken for new (not in seen): inserted, checked
        # Heads of other threads the Saves require (in one statement: checked by it).
        self._required: dict[ThreadKey, str] = {}
        self._statement: tuple[list[Any], list[Event], list[int]] | None = None
        self._session: tuple[int, datetime.datetime] | None = conn.session  # while it is open

    async def commit(self) -> None:
        if self._seen is None:
            await self._transaction.commit()
            return
        if self._statement is None:
            return
        args, events, backs = self._statement
        known = [k for k, t in self.threads.items() if t is not None and k not in self._new]
        seen = [self._unchanged[k] for k in known]
        created = [_thread_row(self.threads[k]) for k in self._new if self.threads[k]]
        required = _keys(self._required)
        required.append(list(self._required.values()))
        try:
            row = await self.conn.fetchrow(
                FLUSH_IF_UNCHANGED, *args, seen, len(known), created, *required
            )
        except asyncpg.PostgresError as exc:
            if exc.sqlstate in (CHANGED_SINCE_SEEN, UNIQUE_VIOLATION):
                raise ChangedSinceSeen(str(exc)) from exc
            raise
        self._number(row, events, backs)

    async def rollback(self) -> None:
        if self._seen is None:
            await self._transaction.rollback()

    def abandon(self) -> tuple[int, datetime.datetime] | None:
        """After a lost COMMIT answer: drop the connection (its pool makes a new one) and say
        which server process has the COMMIT (PgHotPath.end_session)."""
        with contextlib.suppress(asyncpg.InterfaceError):  # closed already, and released
            self.conn.terminate()
        return self._session

    async def prefetch(
        self, request_ids: list[tuple[str, str]], claimed: list[tuple[ThreadKey, str]]
    ) -> None:
        self._looked_up.update(request_ids)
        if self._seen is not None:
            # Not read: a request id used already makes the statement fail (unique), and
            # the batch then runs the long way, which answers it as the replay it is.
            return
        if request_ids:
            for r in await self.conn.fetch(FIND_REQUESTS, *_columns(request_ids, 2)):
                self._requests[(r["tenant"], r["request_id"])] = (r["kind"], r["result"])
        if claimed:
            rows = [(k.tenant, k.namespace, k.thread_id, cid) for k, cid in claimed]
            for r in await self.conn.fetch(CLAIMED_IDS, *_columns(rows, 4)):
                key = ThreadKey(r["tenant"], r["namespace"], r["thread_id"])
                self._claimed[(key, r["checkpoint_id"])] = (r["taken"], r["has_writes"])

    async def head_of(self, key: ThreadKey, required: str) -> str:
        if key in self.threads:
            return await super().head_of(key, required)
        if self._seen is not None:  # the statement checks it (the first one asked, if two)
            return self._required.setdefault(key, required)
        head = await self.conn.fetchval(SELECT_HEAD, key.tenant, key.namespace, key.thread_id)
        return head or ""

    async def find_request(self, tenant: str, request_id: str) -> tuple[str, str] | None:
        if (tenant, request_id) in self.new_requests:
            return self.new_requests[(tenant, request_id)]
        if (tenant, request_id) in self._looked_up:
            return self._requests.get((tenant, request_id))
        row = await self.conn.fetchrow(FIND_REQUESTS, [tenant], [request_id])
        return (row["kind"], row["result"]) if row else None

    async def checkpoint_or_writes_exist(
        self, key: ThreadKey, checkpoint_id: str
    ) -> tuple[bool, bool]:
        in_batch = any(c.key == key and c.checkpoint_id == checkpoint_id for c in self.checkpoints)
        writes = any(k == key and w.checkpoint_id == checkpoint_id for k, w in self.writes)
        if in_batch:
            return True, writes
        if key in self._new:  # no row yet, so neither checkpoints nor writes (or: unique)
            return False, writes
        if self._seen is not None:  # in one statement: a taken id fails it (unique)
            return False, writes
        found = self._claimed.get((key, checkpoint_id))
        if found is None:
            args = [[key.tenant], [key.namespace], [key.thread_id], [checkpoint_id]]
            r = await self.conn.fetchrow(CLAIMED_IDS, *args)
            found = (r["taken"], r["has_writes"])
        return found[0], writes or found[1]

    async def _select_threads(self, keys: list[ThreadKey]) -> dict[ThreadKey, Thread]:
        if self._seen is not None:
            known = [k for k in keys if k in self._seen]
            copies = {k: dataclasses.replace(self._seen[k]) for k in known}
            self._unchanged.update({k: _thread_row(t) for k, t in copies.items()})
            copies.update(
                {k: Thread(k, created_at=self.now, updated_at=self.now) for k in self._new}
            )
            return copies
        rows = await self.conn.fetch(LOCK_THREADS, *_keys(keys))
        threads = (
            _thread_from_row(ThreadKey(r["tenant"], r["namespace"], r["thread_id"]), r)
            for r in rows
        )
        return {t.key: t for t in threads}

    async def _insert_threads(self, keys: list[ThreadKey]) -> None:
        if self._seen is not None:
            self._new.update(keys)  # inserted by the statement, with the batch's changes
            return
        await self.conn.execute(INSERT_THREADS, *_keys(keys), self.now)

    async def _delete_new_threads(self, keys: list[ThreadKey]) -> None:
        if self._seen is not None:
            self._new.difference_update(keys)
            return
        await self.conn.execute(DELETE_NEW_THREADS, *_keys(keys))

    async def _delete_thread_rows(self, key: ThreadKey) -> int:
        c, k = self.conn, (key.tenant, key.namespace, key.thread_id)
        status = await c.execute(DELETE_THREAD_CHECKPOINTS, *k)
        await c.execute(DELETE_THREAD_WRITES, *k)
        await c.execute(DELETE_THREAD_EVENTS, *k)
        await c.execute(TOMBSTONE_THREAD, *k, self.now)
        return int(status.rsplit(" ", 1)[-1])

    async def _write_queued(self) -> None:
        if not (self.checkpoints or self.writes or self.events or self.new_requests or self.dirty):
            return
        by_tenant: dict[str, list[Event]] = {}
        for e in self.events:
            by_tenant.setdefault(e.key.tenant, []).append(e)
        tenants = sorted(by_tenant)  # feed rows locked in one order by every replica
        events = [e for t in tenants for e in by_tenant[t]]
        backs = [len(by_tenant[t]) - 1 - i for t in tenants for i in range(len(by_tenant[t]))]
        # In one statement every thread is written, so that every one is checked (the new
        # ones are inserted instead: commit()).
        if self._seen is not None:
            threads = [t for k, t in self.threads.items() if k not in self._new]
        else:
            threads = [self.threads[k] for k in sorted(self.dirty, key=_sort_key)]
        sealing = self.sql.sealing
        writes = _write_rows(self.writes, sealing)
        args = [
            [_checkpoint_row(cp, sealing) for cp in self.checkpoints],
            [w for w, replaces in writes if not replaces],
            [w for w, replaces in writes if replaces],
            [(t, len(by_tenant[t])) for t in tenants],
            [
                (
                    e.key.tenant,
                    e.key.namespace,
                    e.key.thread_id,
                    e.seq,
                    back,  # in the feed_seq column: see _FLUSH
                    e.type,
                    e.time,
                    sealing.payload(e.key, e.seq, e.payload),
                    int(e.terminal),
                )
                for e, back in zip(events, backs, strict=True)
            ],
            [(t, r, k, res, self.now) for (t, r), (k, res) in self.new_requests.items()],
            [_thread_row(t) for t in threads if t is not None],
        ]
        if self._seen is not None:
            if self._statement is not None:
                raise AssertionError("a batch in one statement is flushed once")
            self._statement = (args, events, backs)
            return
        self._number(await self.conn.fetchrow(FLUSH, *args), events, backs)

    @staticmethod
    def _number(row: asyncpg.Record, events: list[Event], backs: list[int]) -> None:
        """Each event's feed seq, from its tenant's last seq after the batch."""
        last = dict(zip(row["tenants"], row["last_seqs"], strict=True))
        for e, back in zip(events, backs, strict=True):
            e.feed_seq = last[e.key.tenant] - back


def _checkpoint_row(cp: Checkpoint, sealing: Sealing) -> tuple[Any, ...]:
    return (
        cp.key.tenant,
        cp.key.namespace,
        cp.key.thread_id,
        cp.checkpoint_id,
        cp.parent_id,
        cp.step,
        sealing.state(cp.key, cp.checkpoint_id, cp.state),
        cp.content_type,
        int(cp.trigger),
        cp.name,
        json.dumps(cp.completed_nodes),
        cp.progress_percent,
        cp.eta_seconds,
        json.dumps(cp.metadata),
        cp.created_at,
        cp.expires_at,
        len(cp.state),
    )


def _write_rows(
    writes: list[tuple[ThreadKey, PendingWrite]], sealing: Sealing
) -> list[tuple[tuple, bool]]:
    """One row per slot (and whether it replaces what is there), as applying the writes one
    by one would leave it: a kept write stays, a replacing one overwrites (one statement may
    not touch a row twice)."""
    slots: dict[tuple[Any, ...], tuple[PendingWrite, bool]] = {}
    for key, w in writes:
        slot = (key, w.checkpoint_id, w.task_id, w.idx)
        if slot not in slots:
            slots[slot] = (w, w.upsert)
        elif w.upsert:
            slots[slot] = (w, True)
    return [
        (
            (
                key.tenant,
                key.namespace,
                key.thread_id,
                w.checkpoint_id,
                w.task_id,
                w.idx,
                w.channel,
                sealing.value(key, w.checkpoint_id, w.task_id, w.idx, w.value),
                w.content_type,
                w.task_path,
            ),
            replaces,
        )
        for (key, *_), (w, replaces) in slots.items()
    ]


def _thread_row(t: Thread) -> tuple[Any, ...]:
    """A threads row, in the table's column order."""
    return (
        t.key.tenant,
        t.key.namespace,
        t.key.thread_id,
        t.head_id,
        int(t.status),
        t.workflow_id,
        t.workflow_version,
        t.lease_owner,
        t.lease_expires_at,
        t.fencing_token,
        t.last_seq,
        t.created_at,
        t.updated_at,
        int(t.deleted),
        t.keep_last,
        int(t.keep_forever),
    )
