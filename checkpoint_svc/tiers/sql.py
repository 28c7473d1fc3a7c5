"""SQL tier: the durable record, on PostgreSQL (asyncpg) or SQLite (aiosqlite).

Writes happen in batches (see commit.py): a `Batch` reads the thread rows it
touches in key order, buffers inserts, and flushes them with executemany in
one transaction, so that many concurrent Saves cost one commit. This is the
SQLite batch (BEGIN IMMEDIATE holds the database's one write lock); on
PostgreSQL pg.PgBatch does the same work in fewer statements, locking the rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import threading
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, event, text
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool
from sqlalchemy.sql.elements import TextClause

from checkpoint_svc.domain import (
    TERMINAL_STATUSES,
    Checkpoint,
    Event,
    NewEvent,
    PendingWrite,
    Stats,
    Thread,
    ThreadKey,
    ThreadStatus,
    Trigger,
)
from checkpoint_svc.errors import AlreadyExists

log = logging.getLogger(__name__)
_MIGRATING = threading.Lock()

_KEY = "tenant = :tenant AND namespace = :namespace AND thread_id = :thread_id"


THREAD_COLUMNS = (
    "head_id, status, workflow_id, workflow_version, lease_owner, lease_expires_at, "
    "fencing_token, last_seq, created_at, updated_at, deleted, keep_last, keep_forever"
)
SELECT_THREAD = f"SELECT {THREAD_COLUMNS} FROM threads WHERE {_KEY}"
INSERT_THREAD = """
INSERT INTO threads (tenant, namespace, thread_id, created_at, updated_at)
VALUES (:tenant, :namespace, :thread_id, :now, :now) ON CONFLICT DO NOTHING"""
UPDATE_THREAD = f"""
UPDATE threads SET head_id = :head_id, status = :status, workflow_id = :workflow_id,
    workflow_version = :workflow_version, lease_owner = :lease_owner,
    lease_expires_at = :lease_expires_at, fencing_token = :fencing_token,
    last_seq = :last_seq, updated_at = :updated_at, deleted = :deleted, keep_last = :keep_last,
    keep_forever = :keep_forever
WHERE {_KEY}"""
# The namespaces under a prefix (see _prefix_params). substr, not LIKE: a prefix with % or _
# in it means just that.
_UNDER_PREFIX = "substr(namespace, 1, :prefix_length) = :prefix"
# PruneThreads KEEP_LATEST: everything but the heads of a thread id's namespaces.
_THREAD_UNDER_PREFIX = f"tenant = :tenant AND thread_id = :thread_id AND {_UNDER_PREFIX}"
_IS_HEAD = """EXISTS (SELECT 1 FROM threads t WHERE t.tenant = checkpoints.tenant
    AND t.namespace = checkpoints.namespace AND t.thread_id = checkpoints.thread_id
    AND t.head_id = checkpoints.checkpoint_id)"""
PRUNE_ALL_BUT_HEADS = f"""
DELETE FROM checkpoints WHERE {_THREAD_UNDER_PREFIX} AND NOT {_IS_HEAD}
RETURNING namespace, checkpoint_id"""
CLEAR_HEAD_PARENTS = f"""
UPDATE checkpoints SET parent_id = '' WHERE {_THREAD_UNDER_PREFIX} AND {_IS_HEAD}
RETURNING namespace, checkpoint_id"""
# CopyThread: one thread id's rows under a prefix, to another thread id. A tombstone of the
# target (a deleted thread) is revived; a live target is not touched, and the caller sees
# fewer rows copied than there are.
_FROM_SOURCE = f"WHERE tenant = :tenant AND thread_id = :source AND {_UNDER_PREFIX}"
COPY_THREADS = f"""
INSERT INTO threads (tenant, namespace, thread_id, head_id, status, workflow_id,
    workflow_version, created_at, updated_at, keep_last, keep_forever)
SELECT tenant, namespace, :target, head_id, status, workflow_id, workflow_version, :now, :now,
    keep_last, keep_forever FROM threads {_FROM_SOURCE} AND deleted = 0
ON CONFLICT (tenant, namespace, thread_id) DO UPDATE SET head_id = excluded.head_id,
    status = excluded.status, workflow_id = excluded.workflow_id,
    workflow_version = excluded.workflow_version, updated_at = excluded.updated_at,
    keep_last = excluded.keep_last, keep_forever = excluded.keep_forever, deleted = 0
WHERE threads.deleted = 1
RETURNING namespace"""
COUNT_SOURCE_THREADS = f"SELECT COUNT(*) FROM threads {_FROM_SOURCE} AND deleted = 0"
COPY_CHECKPOINTS = f"""
INSERT INTO checkpoints (tenant, namespace, thread_id, checkpoint_id, parent_id, step, state,
    content_type, trigger, name, completed_nodes, progress_percent, eta_seconds, metadata,
    created_at, expires_at, state_size)
SELECT tenant, namespace, :target, checkpoint_id, parent_id, step, state, content_type,
    trigger, name, completed_nodes, progress_percent, eta_seconds, metadata, created_at,
    expires_at, state_size FROM checkpoints {_FROM_SOURCE}"""
COPY_WRITES = f"""
INSERT INTO writes (tenant, namespace, thread_id, checkpoint_id, task_id, idx, channel, value,
    content_type, task_path)
SELECT tenant, namespace, :target, checkpoint_id, task_id, idx, channel, value, content_type,
    task_path FROM writes {_FROM_SOURCE}"""
SELECT_THREAD_HEAD = f"SELECT head_id FROM threads WHERE {_KEY}"
MOVE_HEAD_TO_NEWEST = f"""
UPDATE threads SET head_id = COALESCE((SELECT MAX(c.checkpoint_id) FROM checkpoints c
    WHERE c.tenant = :tenant AND c.namespace = :namespace AND c.thread_id = :thread_id), ''),
    updated_at = :now
WHERE {_KEY}"""
NAMESPACES_OF_THREAD = f"""
SELECT namespace FROM threads WHERE tenant = :tenant AND thread_id = :thread_id
    AND deleted = 0 AND {_UNDER_PREFIX} ORDER BY namespace"""
LIST_THREADS = (
    f"SELECT namespace, thread_id, {THREAD_COLUMNS} FROM threads "
    "WHERE tenant = :tenant AND deleted = 0"
)
_AFTER_KEY = " AND (namespace > :after_ns OR (namespace = :after_ns AND thread_id > :after_id))"
# A row comparison: PostgreSQL seeks the index with it (an OR of the parts it cannot).
_BEFORE_CREATED = " AND (created_at, namespace, thread_id) < (:after_at, :after_ns, :after_id)"

SELECT_THREADS = f"""
SELECT tenant, namespace, thread_id, {THREAD_COLUMNS} FROM threads
WHERE (tenant, namespace, thread_id) IN :keys
ORDER BY tenant, namespace, thread_id"""
# Locks the tenant's feed row until commit, so feed_seq is dense and in commit order.
BUMP_FEED = """
INSERT INTO feeds (tenant, last_seq) VALUES (:tenant, :n)
ON CONFLICT (tenant) DO UPDATE SET last_seq = feeds.last_seq + excluded.last_seq
RETURNING last_seq"""

META_COLUMNS = (
    "checkpoint_id, parent_id, step, content_type, trigger, name, completed_nodes, "
    "progress_percent, eta_seconds, metadata, created_at, expires_at"
)
INSERT_CHECKPOINT = """
INSERT INTO checkpoints (tenant, namespace, thread_id, checkpoint_id, parent_id, step, state,
    content_type, trigger, name, completed_nodes, progress_percent, eta_seconds, metadata,
    created_at, expires_at, state_size)
VALUES (:tenant, :namespace, :thread_id, :checkpoint_id, :parent_id, :step, :state,
    :content_type, :trigger, :name, :completed_nodes, :progress_percent, :eta_seconds,
    :metadata, :created_at, :expires_at, :state_size)"""
# Restore: SQL names the checkpoint (the head, or one by id), with its metadata and, joined,
# its pending writes; the state comes from the fastest tier holding that very checkpoint.
_META_OF_C = (
    "c.checkpoint_id, c.parent_id, c.step, c.content_type, c.trigger, c.name, "
    "c.completed_nodes, c.progress_percent, c.eta_seconds, c.metadata, c.created_at, "
    "c.expires_at"
)
_WRITES_OF_C = """LEFT JOIN writes w ON w.tenant = c.tenant AND w.namespace = c.namespace
    AND w.thread_id = c.thread_id AND w.checkpoint_id = c.checkpoint_id"""
_W_COLUMNS = "w.task_id, w.idx, w.channel, w.value, w.content_type, w.task_path"
_HEAD_OF_T = """FROM threads t JOIN checkpoints c ON c.tenant = t.tenant
    AND c.namespace = t.namespace AND c.thread_id = t.thread_id AND c.checkpoint_id = t.head_id"""
_T_KEY = "t.tenant = :tenant AND t.namespace = :namespace AND t.thread_id = :thread_id"
_C_KEY = """c.tenant = :tenant AND c.namespace = :namespace AND c.thread_id = :thread_id
    AND c.checkpoint_id = :checkpoint_id"""
FIND_HEAD = f"SELECT {_META_OF_C}, t.last_seq {_HEAD_OF_T} WHERE {_T_KEY}"
FIND_HEAD_WITH_WRITES = f"""
SELECT {_META_OF_C}, t.last_seq, {_W_COLUMNS} {_HEAD_OF_T} {_WRITES_OF_C}
WHERE {_T_KEY} ORDER BY w.task_id, w.idx"""
FIND_CHECKPOINT = f"SELECT {_META_OF_C}, 0 FROM checkpoints c WHERE {_C_KEY}"
FIND_CHECKPOINT_WITH_WRITES = f"""
SELECT {_META_OF_C}, 0, {_W_COLUMNS} FROM checkpoints c {_WRITES_OF_C}
WHERE {_C_KEY} ORDER BY w.task_id, w.idx"""
SELECT_STATE = f"""
SELECT state FROM checkpoints WHERE {_KEY} AND checkpoint_id = :checkpoint_id
    AND created_at = :created_at"""
# A client-supplied id on Save: taken already? writes for it committed before it?
CHECKPOINT_OR_WRITES_EXIST = f"""
SELECT EXISTS (SELECT 1 FROM checkpoints WHERE {_KEY} AND checkpoint_id = :checkpoint_id),
    EXISTS (SELECT 1 FROM writes WHERE {_KEY} AND checkpoint_id = :checkpoint_id)"""
LIST_CHECKPOINTS = f"SELECT {META_COLUMNS}{{state}} FROM checkpoints WHERE {_KEY}"
LIST_CHECKPOINTS_ACROSS_NAMESPACES = f"""
SELECT {META_COLUMNS}{{state}}, namespace FROM checkpoints
WHERE tenant = :tenant AND thread_id = :thread_id AND {_UNDER_PREFIX}"""

_WRITE_INSERT = """
INSERT INTO writes (tenant, namespace, thread_id, checkpoint_id, task_id, idx, channel, value,
    content_type, task_path)
VALUES (:tenant, :namespace, :thread_id, :checkpoint_id, :task_id, :idx, :channel, :value,
    :content_type, :task_path)
ON CONFLICT (tenant, namespace, thread_id, checkpoint_id, task_id, idx)"""
INSERT_REGULAR_WRITE = _WRITE_INSERT + " DO NOTHING"
UPSERT_SPECIAL_WRITE = (
    _WRITE_INSERT
    + """ DO UPDATE SET channel = excluded.channel,
    value = excluded.value, content_type = excluded.content_type,
    task_path = excluded.task_path"""
)
WRITE_COLUMNS = "checkpoint_id, task_id, idx, channel, value, content_type, task_path"
# The writes of a page of one thread id's checkpoints (across its namespaces), in one query.
SELECT_WRITES_OF_CHECKPOINTS = f"""
SELECT namespace, {WRITE_COLUMNS} FROM writes
WHERE tenant = :tenant AND thread_id = :thread_id AND checkpoint_id IN :ids
ORDER BY task_id, idx"""

EVENT_COLUMNS = "namespace, thread_id, seq, feed_seq, type, time, payload, terminal"
INSERT_EVENT = """
INSERT INTO events (tenant, namespace, thread_id, seq, feed_seq, type, time, payload, terminal)
VALUES (:tenant, :namespace, :thread_id, :seq, :feed_seq, :type, :time, :payload, :terminal)"""
SELECT_THREAD_EVENTS = f"""
SELECT {EVENT_COLUMNS} FROM events WHERE {_KEY} AND seq > :after ORDER BY seq LIMIT :limit"""
SELECT_TENANT_EVENTS = f"""
SELECT {EVENT_COLUMNS} FROM events WHERE tenant = :tenant AND feed_seq > :after
ORDER BY feed_seq LIMIT :limit"""

# Not a valid tenant id (tenants start with a letter or digit), so never a client's.
BATCH_MARKER_TENANT = "~batch"
# The head of a thread another thread's Save requires (SaveCommand.required_head); a
# tombstone's is empty.
SELECT_HEAD = (
    "SELECT head_id FROM threads"
    " WHERE tenant = :tenant AND namespace = :namespace AND thread_id = :thread_id"
)
SELECT_REQUEST = (
    "SELECT kind, result FROM requests WHERE tenant = :tenant AND request_id = :request_id"
)
INSERT_REQUEST = """
INSERT INTO requests (tenant, request_id, kind, result, created_at)
VALUES (:tenant, :request_id, :kind, :result, :created_at)"""

DELETE_THREAD_ROWS = [
    f"DELETE FROM writes WHERE {_KEY}",
    f"DELETE FROM events WHERE {_KEY}",
]
# The row stays as a tombstone so that fencing tokens and event seqs never go back:
# a zombie holding an old token, or a watcher holding an old cursor, stays behind.
TOMBSTONE_THREAD = f"""
UPDATE threads SET deleted = 1, head_id = '', status = 0, workflow_id = '', workflow_version = 0,
    lease_owner = '', lease_expires_at = 0, keep_last = 0, keep_forever = 0, updated_at = :now
WHERE {_KEY}"""
DELETE_NEW_THREAD = f"DELETE FROM threads WHERE {_KEY}"
DELETE_THREAD_CHECKPOINTS = f"DELETE FROM checkpoints WHERE {_KEY}"

STATS_CHECKPOINTS = f"""
SELECT trigger, COUNT(*), MIN(created_at), MAX(created_at), COALESCE(SUM(state_size), 0)
FROM checkpoints WHERE {_KEY} GROUP BY trigger"""
STATS_EVENTS = f"SELECT COUNT(*) FROM events WHERE {_KEY}"

_TERMINAL = ", ".join(str(int(s)) for s in sorted(TERMINAL_STATUSES))
# A checkpoint is protected while it is the head of a thread that is not terminal.
_NOT_ACTIVE_HEAD = f"""
NOT EXISTS (SELECT 1 FROM threads WHERE threads.tenant = checkpoints.tenant
    AND threads.namespace = checkpoints.namespace AND threads.thread_id = checkpoints.thread_id
    AND threads.head_id = checkpoints.checkpoint_id AND threads.status NOT IN ({_TERMINAL}))"""
# ...nor while its thread is kept forever (SaveRequest.keep_forever).
_NOT_KEPT_FOREVER = """
NOT EXISTS (SELECT 1 FROM threads WHERE threads.tenant = checkpoints.tenant
    AND threads.namespace = checkpoints.namespace AND threads.thread_id = checkpoints.thread_id
    AND threads.keep_forever = 1)"""
SWEEP_EXPIRED = f"""
DELETE FROM checkpoints WHERE expires_at IS NOT NULL AND expires_at < :now
    AND {_NOT_KEPT_FOREVER} AND {_NOT_ACTIVE_HEAD}
RETURNING tenant, namespace, thread_id, checkpoint_id"""
# Each thread's own keep_last, else the service's (:keep_last, 0 = keep all).
SWEEP_BEYOND_KEEP_LAST = f"""
DELETE FROM checkpoints WHERE {_NOT_ACTIVE_HEAD}
    AND (tenant, namespace, thread_id, checkpoint_id) IN (
        SELECT ranked.tenant, ranked.namespace, ranked.thread_id, ranked.checkpoint_id FROM (
            SELECT tenant, namespace, thread_id, checkpoint_id, ROW_NUMBER() OVER (
                PARTITION BY tenant, namespace, thread_id ORDER BY checkpoint_id DESC) AS rn
            FROM checkpoints) ranked
        JOIN threads t ON t.tenant = ranked.tenant AND t.namespace = ranked.namespace
            AND t.thread_id = ranked.thread_id
        WHERE t.keep_forever = 0 AND ((t.keep_last > 0 AND ranked.rn > t.keep_last)
            OR (t.keep_last = 0 AND :keep_last > 0 AND ranked.rn > :keep_last)))
RETURNING tenant, namespace, thread_id, checkpoint_id"""
# The writes of checkpoints just deleted. Not "writes whose checkpoint is missing": writes may
# come before their checkpoint (LangGraph's async durability), and must not be swept then.
DELETE_WRITES_OF_CHECKPOINT = f"DELETE FROM writes WHERE {_KEY} AND checkpoint_id = :checkpoint_id"
DELETE_WRITES_OF_THREAD = f"DELETE FROM writes WHERE {_KEY}"
# A terminal thread whose head was pruned is gone: its row and feed go too.
SWEEP_HEADLESS_THREADS = f"""
DELETE FROM threads WHERE status IN ({_TERMINAL}) AND head_id <> ''
    AND NOT EXISTS (SELECT 1 FROM checkpoints WHERE checkpoints.tenant = threads.tenant
        AND checkpoints.namespace = threads.namespace
        AND checkpoints.thread_id = threads.thread_id)
RETURNING tenant, namespace, thread_id"""
SWEEP_ORPHAN_EVENTS = """
DELETE FROM events WHERE NOT EXISTS (SELECT 1 FROM threads WHERE threads.tenant = events.tenant
    AND threads.namespace = events.namespace AND threads.thread_id = events.thread_id)"""
SWEEP_OLD_REQUESTS = "DELETE FROM requests WHERE created_at < :before"
SWEEP_OLD_BATCH_MARKERS = "DELETE FROM requests WHERE tenant = :marker AND created_at < :before"


@functools.lru_cache(maxsize=1024)
def _sql(statement: str, *expanding: str) -> TextClause:
    """Parsed once: building a TextClause costs more than the round trip it describes.
    `expanding` names the parameters that are lists, for `IN :name` (SQLAlchemy renders
    one placeholder per item)."""
    clause = text(statement)
    if expanding:
        clause = clause.bindparams(*(bindparam(name, expanding=True) for name in expanding))
    return clause


def _sort_key(key: ThreadKey) -> tuple[str, str, str]:
    return (key.tenant, key.namespace, key.thread_id)


def _key_params(key: ThreadKey) -> dict[str, str]:
    return {"tenant": key.tenant, "namespace": key.namespace, "thread_id": key.thread_id}


def _thread_from_row(key: ThreadKey, row: Mapping[str, Any]) -> Thread:
    """A threads row (THREAD_COLUMNS), read by name: a SQLAlchemy row's `_mapping` or an
    asyncpg Record."""
    return Thread(
        key=key,
        head_id=row["head_id"],
        status=ThreadStatus(row["status"]),
        workflow_id=row["workflow_id"],
        workflow_version=row["workflow_version"],
        lease_owner=row["lease_owner"],
        lease_expires_at=row["lease_expires_at"],
        fencing_token=row["fencing_token"],
        last_seq=row["last_seq"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        deleted=bool(row["deleted"]),
        keep_last=row["keep_last"],
        keep_forever=bool(row["keep_forever"]),
    )


def _checkpoint_from_row(key: ThreadKey, row: Row | tuple, with_state: bool) -> Checkpoint:
    return Checkpoint(
        key=key,
        checkpoint_id=row[0],
        parent_id=row[1],
        step=row[2],
        content_type=row[3],
        trigger=Trigger(row[4]) if row[4] in Trigger._value2member_map_ else Trigger(0),
        name=row[5],
        completed_nodes=json.loads(row[6]),
        progress_percent=row[7],
        eta_seconds=row[8],
        metadata=json.loads(row[9]),
        created_at=row[10],
        expires_at=row[11],
        state=bytes(row[12]) if with_state else b"",
    )


def _event_from_row(tenant: str, row: Row | tuple) -> Event:
    return Event(
        key=ThreadKey(tenant, row[0], row[1]),
        seq=row[2],
        feed_seq=row[3],
        type=row[4],
        time=row[5],
        payload=json.loads(row[6]),
        terminal=bool(row[7]),
    )


@dataclass(slots=True)
class ThreadFilter:
    namespace: str = ""
    statuses: tuple[ThreadStatus, ...] = ()
    lease_expired_before: float | None = None
    workflow_id: str = ""
    """Only threads recorded for this workflow ("" for any)."""
    newest_first: bool = False
    """By creation time, newest first; else by namespace and thread id."""


class SqlTier:
    def __init__(self, url: str, *, timeout: float = 15.0) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        self.up = True
        self.detail = ""
        if self.is_sqlite:
            # One writer connection taking the write lock at BEGIN; readers in WAL mode.
            self.writer = create_async_engine(url, pool_size=1, max_overflow=0)
            self.reader = create_async_engine(url, pool_size=4, max_overflow=4)
            _configure_sqlite(self.writer, immediate=True)
            _configure_sqlite(self.reader, immediate=False)
        else:
            connect_args = {"timeout": 2.0, "command_timeout": timeout}
            # Separate pools: a burst of reads must never starve the group committer.
            self.writer = create_async_engine(
                url, pool_size=4, max_overflow=4, pool_timeout=5, connect_args=connect_args
            )
            # Reads need no transaction: skip BEGIN and ROLLBACK round trips.
            self.reader = create_async_engine(
                url,
                pool_size=16,
                max_overflow=16,
                pool_timeout=5,
                connect_args=connect_args,
                isolation_level="AUTOCOMMIT",
            )
        # PostgreSQL: batches and Restore on raw asyncpg (pg.py); SQLAlchemy for the rest.
        self.hot = None
        # States up to this size come back with the query naming a checkpoint, so caching
        # them would save nothing (-1: every state is worth caching).
        self.inline_state = -1
        if not self.is_sqlite:
            from checkpoint_svc.tiers.pg import INLINE_STATE_BYTES, PgHotPath  # builds on this

            self.hot = PgHotPath(url, timeout=timeout)
            self.inline_state = INLINE_STATE_BYTES

    async def close(self) -> None:
        if self.hot is not None:
            await self.hot.close()
        await self.writer.dispose()
        await self.reader.dispose()

    async def migrate(self, revision: str = "head") -> str:
        """Apply the migrations not applied yet (to `revision`); the revision the database is
        at then. Safe with several replicas starting: on PostgreSQL they take turns."""
        from checkpoint_svc import migrations  # Alembic: only when migrating

        # Alembic keeps its context in module globals: one migration at a time per process
        # (several stores in one process, as tests make them, would mix their contexts).
        # Taken by polling (a lock of threads: stores in threads of their own migrate too),
        # so a cancelled start leaves it free.
        while not _MIGRATING.acquire(blocking=False):  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        try:
            if self.is_sqlite:  # the writer's BEGIN IMMEDIATE serialises processes
                return await self._migrate(self.writer, migrations, revision)
            # Without the pool's 15 s command timeout: an index may take longer to build.
            engine = create_async_engine(self.url, poolclass=NullPool)
            try:
                return await self._migrate(engine, migrations, revision)
            finally:
                await engine.dispose()
        finally:
            _MIGRATING.release()

    async def _migrate(self, engine: AsyncEngine, migrations: Any, revision: str) -> str:
        async with engine.connect() as conn:
            # A session's lock (migrations commit one by one), tried rather than waited for:
            # a wait holds a snapshot, which another replica's CREATE INDEX CONCURRENTLY
            # would wait for in turn.
            while not self.is_sqlite:
                got = await conn.exec_driver_sql(
                    f"SELECT pg_try_advisory_lock({migrations.MIGRATION_LOCK_ID})"
                )
                locked = bool(got.scalar())
                await conn.commit()
                if locked:
                    break
                await asyncio.sleep(0.1)
            # The lock is the session's: it ends with the connection, which is not pooled (no
            # unlock that could fail on an aborted transaction and hide why).
            at = await conn.run_sync(migrations.upgrade, revision)
        log.info("schema migrated", extra={"revision": at})
        return at

    # ---- reads -------------------------------------------------------------

    async def keep_heads(
        self, tenant: str, thread_id: str, prefix: str
    ) -> tuple[list[tuple[ThreadKey, str]], list[tuple[ThreadKey, str]]]:
        """Delete all but the heads of a thread id's namespaces under `prefix`, and clear
        the heads' parents: (deleted, changed) checkpoints, for the caches to forget."""
        params = {"tenant": tenant, "thread_id": thread_id, **_prefix_params(prefix)}
        async with self.writer.begin() as conn:
            deleted = (await conn.execute(_sql(PRUNE_ALL_BUT_HEADS), params)).all()
            changed = (await conn.execute(_sql(CLEAR_HEAD_PARENTS), params)).all()
            await _delete_writes_of(
                conn, [(ThreadKey(tenant, r[0], thread_id), r[1]) for r in deleted]
            )

        def keys(rows: Sequence[Any]) -> list[tuple[ThreadKey, str]]:
            return [(ThreadKey(tenant, r[0], thread_id), r[1]) for r in rows]

        return keys(deleted), keys(changed)

    async def delete_for_runs(
        self, tenant: str, run_ids: list[str], prefix: str, now: float
    ) -> tuple[list[tuple[ThreadKey, str]], list[ThreadKey]]:
        """Delete the checkpoints of these runs (metadata run_id): (deleted, threads whose
        head moved back)."""
        run_id = (
            "json_extract(metadata, '$.run_id')"
            if self.is_sqlite
            else "(CAST(metadata AS jsonb) ->> 'run_id')"
        )
        sql = (
            f"DELETE FROM checkpoints WHERE tenant = :tenant AND {_UNDER_PREFIX}"
            f" AND {run_id} IN :run_ids"
            " RETURNING namespace, thread_id, checkpoint_id"
        )
        params: dict[str, Any] = {"tenant": tenant, **_prefix_params(prefix), "run_ids": run_ids}
        async with self.writer.begin() as conn:
            rows = (await conn.execute(_sql(sql, "run_ids"), params)).all()
            deleted = [(ThreadKey(tenant, r[0], r[1]), r[2]) for r in rows]
            moved: list[ThreadKey] = []
            for key in {k for k, _ in deleted}:
                head = (await conn.execute(_sql(SELECT_THREAD_HEAD), _key_params(key))).scalar()
                if (key, head) in deleted:
                    await conn.execute(_sql(MOVE_HEAD_TO_NEWEST), {**_key_params(key), "now": now})
                    moved.append(key)
            await _delete_writes_of(conn, deleted)
        return deleted, moved

    async def copy_thread(
        self, tenant: str, source: str, target: str, prefix: str, now: float
    ) -> tuple[list[str], int]:
        """(the namespaces copied, checkpoints copied); AlreadyExists if a live target
        thread is there."""
        params = {
            "tenant": tenant,
            "source": source,
            "target": target,
            "now": now,
            **_prefix_params(prefix),
        }
        async with self.writer.begin() as conn:
            wanted = (await conn.execute(_sql(COUNT_SOURCE_THREADS), params)).scalar_one()
            if not wanted:
                return [], 0
            copied = [r[0] for r in (await conn.execute(_sql(COPY_THREADS), params)).all()]
            if len(copied) != wanted:
                raise AlreadyExists(f"thread {target} already exists under {prefix!r}")
            checkpoints = (await conn.execute(_sql(COPY_CHECKPOINTS), params)).rowcount
            await conn.execute(_sql(COPY_WRITES), params)
        return copied, checkpoints

    async def namespaces_of(self, tenant: str, thread_id: str, prefix: str) -> list[str]:
        """The namespaces a thread id exists in, under a prefix."""
        params = {"tenant": tenant, "thread_id": thread_id, **_prefix_params(prefix)}
        async with self.reader.connect() as conn:
            return [r[0] for r in (await conn.execute(_sql(NAMESPACES_OF_THREAD), params)).all()]

    async def get_thread(self, key: ThreadKey) -> Thread | None:
        async with self.reader.connect() as conn:
            row = (await conn.execute(_sql(SELECT_THREAD), _key_params(key))).first()
        thread = _thread_from_row(key, row._mapping) if row else None
        return thread if thread is not None and not thread.deleted else None

    async def find_checkpoint(
        self, key: ThreadKey, checkpoint_id: str, include_writes: bool
    ) -> tuple[Checkpoint, int, list[PendingWrite], bytes | None] | None:
        """The head (or the checkpoint with this id), the thread's event seq if it is the head
        (its version, 0 otherwise), its writes if asked, and its state if the query brought
        it (PostgreSQL, small states): one query."""
        if self.hot is not None:
            return await self.hot.find_checkpoint(key, checkpoint_id, include_writes)
        if checkpoint_id:
            sql = FIND_CHECKPOINT_WITH_WRITES if include_writes else FIND_CHECKPOINT
            params = {**_key_params(key), "checkpoint_id": checkpoint_id}
        else:
            sql = FIND_HEAD_WITH_WRITES if include_writes else FIND_HEAD
            params = _key_params(key)
        async with self.reader.connect() as conn:
            rows = (await conn.execute(_sql(sql), params)).all()
        if not rows:
            return None
        cp = _checkpoint_from_row(key, rows[0], with_state=False)
        writes = [
            _write_from_row((cp.checkpoint_id, *r[13:19]))
            for r in rows
            if include_writes and r[13] is not None
        ]
        return cp, rows[0][12], writes, None

    async def state_of(self, named: Checkpoint) -> bytes | None:
        """The state of that very checkpoint (None if it is gone, or is another by that id)."""
        if self.hot is not None:
            return await self.hot.state_of(named)
        params = {
            **_key_params(named.key),
            "checkpoint_id": named.checkpoint_id,
            "created_at": named.created_at,
        }
        async with self.reader.connect() as conn:
            state = (await conn.execute(_sql(SELECT_STATE), params)).scalar()
        return bytes(state) if state is not None else None

    async def list_checkpoints(
        self,
        key: ThreadKey,
        limit: int,
        before_id: str = "",
        include_state: bool = False,
        trigger: Trigger = Trigger.UNSPECIFIED,
        created_after: float | None = None,
        created_before: float | None = None,
        metadata_equals: dict[str, Any] | None = None,
        namespace_prefix: str | None = None,
    ) -> list[Checkpoint]:
        """Newest first; with `namespace_prefix`, across the thread's matching namespaces."""
        state = ", state" if include_state else ""
        params: dict[str, Any] = {**_key_params(key), "limit": limit}
        if namespace_prefix is None:
            sql = LIST_CHECKPOINTS.format(state=state)
        else:
            sql = LIST_CHECKPOINTS_ACROSS_NAMESPACES.format(state=state)
            params |= _prefix_params(namespace_prefix)
        if before_id:
            sql += " AND checkpoint_id < :before_id"
            params["before_id"] = before_id
        if trigger:
            sql += " AND trigger = :trigger"
            params["trigger"] = int(trigger)
        if created_after is not None:
            sql += " AND created_at >= :created_after"
            params["created_after"] = created_after
        if created_before is not None:
            sql += " AND created_at < :created_before"
            params["created_before"] = created_before
        if metadata_equals and self.is_sqlite:
            for i, (k, v) in enumerate(metadata_equals.items()):
                sql += f" AND json_extract(metadata, :mk{i}) = json_extract(:mv{i}, '$')"
                params[f"mk{i}"] = "$." + json.dumps(k)
                params[f"mv{i}"] = json.dumps(v)
        elif metadata_equals:
            sql += " AND CAST(metadata AS jsonb) @> CAST(:metadata_equals AS jsonb)"
            params["metadata_equals"] = json.dumps(metadata_equals)
        sql += " ORDER BY checkpoint_id DESC LIMIT :limit"
        async with self.reader.connect() as conn:
            rows = (await conn.execute(_sql(sql), params)).all()
        if namespace_prefix is None:
            return [_checkpoint_from_row(key, r, with_state=include_state) for r in rows]
        return [
            _checkpoint_from_row(
                ThreadKey(key.tenant, r[-1], key.thread_id), r, with_state=include_state
            )
            for r in rows
        ]

    async def writes_of(self, checkpoints: list[Checkpoint]) -> list[list[PendingWrite]]:
        """The pending writes of each of a page of one thread id's checkpoints, in order."""
        if not checkpoints:
            return []
        key = checkpoints[0].key
        params = {
            "tenant": key.tenant,
            "thread_id": key.thread_id,
            "ids": [c.checkpoint_id for c in checkpoints],
        }
        found: dict[tuple[str, str], list[PendingWrite]] = {}
        async with self.reader.connect() as conn:
            statement = _sql(SELECT_WRITES_OF_CHECKPOINTS, "ids")
            for r in (await conn.execute(statement, params)).all():
                found.setdefault((r[0], r[1]), []).append(_write_from_row(r[1:]))
        return [found.get((c.key.namespace, c.checkpoint_id), []) for c in checkpoints]

    async def list_threads(
        self, tenant: str, flt: ThreadFilter, limit: int, after: tuple[str, ...] | None
    ) -> list[Thread]:
        """A page of threads after `after`: (namespace, thread id), or newest first
        (created_at, namespace, thread id)."""
        sql = LIST_THREADS
        params: dict[str, Any] = {"tenant": tenant, "limit": limit}
        if flt.namespace:
            sql += " AND namespace = :namespace"
            params["namespace"] = flt.namespace
        expanding: tuple[str, ...] = ()
        if flt.statuses:
            params["statuses"] = [int(status) for status in flt.statuses]
            sql += " AND status IN :statuses"
            expanding = ("statuses",)
        if flt.lease_expired_before is not None:
            sql += " AND (lease_owner = '' OR lease_expires_at < :lease_before)"
            params["lease_before"] = flt.lease_expired_before
        if flt.workflow_id:
            sql += " AND workflow_id = :workflow_id"
            params["workflow_id"] = flt.workflow_id
        if flt.newest_first:
            if after is not None:
                sql += _BEFORE_CREATED
                params["after_at"] = float(after[0])
                params["after_ns"], params["after_id"] = after[1], after[2]
            sql += " ORDER BY created_at DESC, namespace DESC, thread_id DESC LIMIT :limit"
        else:
            if after is not None:
                sql += _AFTER_KEY
                params["after_ns"], params["after_id"] = after
            sql += " ORDER BY namespace, thread_id LIMIT :limit"
        async with self.reader.connect() as conn:
            rows = (await conn.execute(_sql(sql, *expanding), params)).all()
        return [
            _thread_from_row(ThreadKey(tenant, r.namespace, r.thread_id), r._mapping) for r in rows
        ]

    async def events_after(
        self, tenant: str, key: ThreadKey | None, after: int, limit: int
    ) -> list[Event]:
        """Stored events after a cursor: a thread's seq, or the tenant's feed_seq."""
        async with self.reader.connect() as conn:
            if key is None:
                params: dict[str, Any] = {"tenant": tenant, "after": after, "limit": limit}
                rows = (await conn.execute(_sql(SELECT_TENANT_EVENTS), params)).all()
            else:
                params = {**_key_params(key), "after": after, "limit": limit}
                rows = (await conn.execute(_sql(SELECT_THREAD_EVENTS), params)).all()
        return [_event_from_row(tenant, r) for r in rows]

    async def stats(self, key: ThreadKey) -> Stats:
        async with self.reader.connect() as conn:
            rows = (await conn.execute(_sql(STATS_CHECKPOINTS), _key_params(key))).all()
            events = (await conn.execute(_sql(STATS_EVENTS), _key_params(key))).scalar_one()
        triggers = {
            Trigger(r[0]) if r[0] in Trigger._value2member_map_ else Trigger(0): r[1] for r in rows
        }
        return Stats(
            checkpoint_count=sum(r[1] for r in rows),
            triggers=triggers,
            oldest=min((r[2] for r in rows), default=None),
            newest=max((r[3] for r in rows), default=None),
            state_bytes=sum(int(r[4]) for r in rows),
            event_count=events,
        )

    async def batch_committed(self, batch_id: str, session: Any = None) -> bool:
        """Whether the batch whose COMMIT answer was lost landed: its marker row, read once
        the session that had the COMMIT (Batch.abandon) is over."""
        if session is not None and self.hot is not None:
            await self.hot.end_session(session)
        params = {"tenant": BATCH_MARKER_TENANT, "request_id": batch_id}
        async with self.writer.connect() as conn:
            return (await conn.execute(_sql(SELECT_REQUEST), params)).first() is not None

    async def ping(self) -> None:
        async with self.reader.connect() as conn:
            await conn.execute(_sql("SELECT 1"))

    # ---- writes ------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def open_batch(self, now: float, in_one_statement: bool = False) -> AsyncIterator[Batch]:
        """A write transaction for a group-commit batch: the caller commits it."""
        if self.hot is not None:
            async with self.hot.open_batch(self, now, in_one_statement) as batch:
                yield batch
            return
        async with self.writer.connect() as conn:
            yield Batch(self, conn, await conn.begin(), now)

    async def sweep(
        self, now: float, keep_last: int, request_ttl: float | None
    ) -> tuple[list[tuple[ThreadKey, str]], list[ThreadKey]]:
        """Retention: expired and beyond-keep-last checkpoints, never an active head."""
        pruned: list[tuple[ThreadKey, str]] = []
        async with self.writer.begin() as conn:
            rows = (await conn.execute(_sql(SWEEP_EXPIRED), {"now": now})).all()
            rows += (
                await conn.execute(_sql(SWEEP_BEYOND_KEEP_LAST), {"keep_last": keep_last})
            ).all()
            pruned = [(ThreadKey(r[0], r[1], r[2]), r[3]) for r in rows]
            gone: list[ThreadKey] = []
            if pruned:
                await _delete_writes_of(conn, pruned)
                gone = [
                    ThreadKey(r[0], r[1], r[2])
                    for r in (await conn.execute(_sql(SWEEP_HEADLESS_THREADS))).all()
                ]
                if gone:
                    await conn.execute(_sql(SWEEP_ORPHAN_EVENTS))
                    await conn.execute(
                        _sql(DELETE_WRITES_OF_THREAD), [_key_params(k) for k in gone]
                    )
            if request_ttl is not None:
                await conn.execute(_sql(SWEEP_OLD_REQUESTS), {"before": now - request_ttl})
            await conn.execute(
                _sql(SWEEP_OLD_BATCH_MARKERS),
                {"marker": BATCH_MARKER_TENANT, "before": now - 3600},
            )
        return pruned, gone


def _write_from_row(r: Row | Sequence[Any]) -> PendingWrite:
    return PendingWrite(r[0], r[1], r[2], r[3], bytes(r[4]), r[5], r[6])


async def _delete_writes_of(
    conn: AsyncConnection, checkpoints: Sequence[tuple[ThreadKey, str]]
) -> None:
    """The pending writes of these (deleted) checkpoints."""
    if checkpoints:
        params = [{**_key_params(k), "checkpoint_id": cid} for k, cid in checkpoints]
        await conn.execute(_sql(DELETE_WRITES_OF_CHECKPOINT), params)


def _prefix_params(prefix: str) -> dict[str, Any]:
    """Parameters of _UNDER_PREFIX."""
    return {"prefix": prefix, "prefix_length": len(prefix)}


def _configure_sqlite(engine: AsyncEngine, immediate: bool) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # we issue BEGIN ourselves
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA busy_timeout=10000")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


class Batch:
    """One write transaction shared by a group of operations.

    Operations read thread rows through `thread()` (locked, cached), change them
    in place, and queue inserts; nothing is sent until `flush()`. An operation
    that raises a domain error must do so before changing anything.
    """

    def __init__(self, sql: SqlTier, conn: Any, transaction: Any, now: float) -> None:
        self.sql = sql
        self.conn = conn
        self._transaction = transaction
        self.now = now
        self.threads: dict[ThreadKey, Thread | None] = {}
        self.dirty: set[ThreadKey] = set()
        self.checkpoints: list[Checkpoint] = []
        self.writes: list[tuple[ThreadKey, PendingWrite]] = []
        self.events: list[Event] = []
        self.new_requests: dict[tuple[str, str], tuple[str, str]] = {}
        self.heads: dict[ThreadKey, tuple[str, int]] = {}
        self.deleted: list[ThreadKey] = []
        # Checkpoints saved after some of their writes: no cache may call their writes complete.
        self.early_writes: set[tuple[ThreadKey, str]] = set()
        self.created: set[ThreadKey] = set()  # rows inserted by this batch
        self.written: set[ThreadKey] = set()  # rows some operation changed
        self.revived: set[ThreadKey] = set()  # tombstones (deleted threads) written again
        # What flush() has sent, for the caches and the feed after commit.
        self.flushed_checkpoints: list[Checkpoint] = []
        self.flushed_writes: list[tuple[ThreadKey, PendingWrite]] = []
        self.flushed_events: list[Event] = []

    async def lock(self, keys: Iterable[ThreadKey], create: set[ThreadKey]) -> None:
        """Read (and lock, where the batch's kind locks rows) the thread rows of a batch in
        one statement, in key order (no deadlocks)."""
        wanted = sorted(set(keys) - self.threads.keys(), key=_sort_key)
        if not wanted:
            return
        rows = await self._select_threads(wanted)
        missing = [k for k in wanted if k not in rows and k in create]
        if missing:
            await self._insert_threads(missing)
            rows.update(await self._select_threads(missing))
            self.created.update(missing)
        for key in wanted:
            thread = rows.get(key)
            if thread is not None and thread.deleted:
                if key not in create:
                    thread = None
                else:  # written again after a delete: back to life once an operation writes it
                    thread.deleted = False
                    thread.created_at = self.now
                    self.revived.add(key)
            self.threads[key] = thread

    async def commit(self) -> None:
        await self._transaction.commit()

    async def rollback(self) -> None:
        await self._transaction.rollback()

    def abandon(self) -> Any:
        """After a lost COMMIT answer: what names the database session that has the COMMIT,
        for batch_committed (None here: SQLite's commit ends with the call that made it)."""
        return None

    async def prefetch(
        self, request_ids: list[tuple[str, str]], claimed: list[tuple[ThreadKey, str]]
    ) -> None:
        """Read ahead what the operations will ask (request ids, client-chosen checkpoint ids):
        here they ask one at a time."""

    async def _insert_threads(self, keys: list[ThreadKey]) -> None:
        await self.conn.execute(
            _sql(INSERT_THREAD), [{**_key_params(k), "now": self.now} for k in keys]
        )

    async def _delete_new_threads(self, keys: list[ThreadKey]) -> None:
        for key in keys:
            await self.conn.execute(_sql(DELETE_NEW_THREAD), _key_params(key))

    async def _select_threads(self, keys: list[ThreadKey]) -> dict[ThreadKey, Thread]:
        params = {"keys": [(k.tenant, k.namespace, k.thread_id) for k in keys]}
        result = await self.conn.execute(_sql(SELECT_THREADS, "keys"), params)
        out = {}
        for row in result.all():
            key = ThreadKey(row.tenant, row.namespace, row.thread_id)
            out[key] = _thread_from_row(key, row._mapping)
        return out

    def thread(self, key: ThreadKey) -> Thread | None:
        return self.threads.get(key)

    async def head_of(self, key: ThreadKey, required: str) -> str:
        """The head of a thread an operation requires to be `required` ("" if none): as
        this batch has it if it holds the row (an operation before may have moved it), else
        as committed. A plain read: a change committed after it orders after this batch."""
        if key in self.threads:
            thread = self.threads[key]
            return thread.head_id if thread is not None else ""
        row = (await self.conn.execute(_sql(SELECT_HEAD), _key_params(key))).first()
        return row[0] if row is not None else ""

    def keep(self, thread: Thread) -> None:
        """An operation wrote under this row without changing it: keep it if just created,
        revive it if it was a tombstone."""
        if thread.key in self.revived:
            self.touch(thread)
        self.written.add(thread.key)

    def touch(self, thread: Thread) -> None:
        thread.updated_at = self.now
        self.dirty.add(thread.key)
        self.written.add(thread.key)

    async def drop_unwritten_threads(self) -> None:
        """Rows this batch created for operations that all failed their checks: not a thread."""
        unwritten = sorted(self.created - self.written, key=_sort_key)
        if unwritten:
            await self._delete_new_threads(unwritten)
        for key in unwritten:
            self.threads[key] = None
        self.created.clear()

    def emit(self, thread: Thread, new: NewEvent) -> Event:
        """Append an event; its feed_seq is assigned at flush, when the feed row is locked."""
        thread.last_seq += 1
        ev = Event(
            key=thread.key,
            seq=thread.last_seq,
            feed_seq=0,
            type=new.type,
            time=self.now,
            payload=new.payload,
            terminal=new.terminal,
        )
        self.events.append(ev)
        self.touch(thread)
        return ev

    async def find_request(self, tenant: str, request_id: str) -> tuple[str, str] | None:
        if (tenant, request_id) in self.new_requests:
            return self.new_requests[(tenant, request_id)]
        params = {"tenant": tenant, "request_id": request_id}
        row = (await self.conn.execute(_sql(SELECT_REQUEST), params)).first()
        return (row[0], row[1]) if row else None

    def record_request(self, tenant: str, request_id: str, kind: str, result: str) -> None:
        self.new_requests[(tenant, request_id)] = (kind, result)

    def mark(self, batch_id: str) -> None:
        """A marker row: after a lost COMMIT answer, its presence says the batch landed."""
        self.record_request(BATCH_MARKER_TENANT, batch_id, "batch", "")

    async def checkpoint_or_writes_exist(
        self, key: ThreadKey, checkpoint_id: str
    ) -> tuple[bool, bool]:
        """Whether this checkpoint exists, and whether writes for it do (committed or in this
        batch): writes may arrive before their checkpoint (LangGraph's async durability)."""
        in_batch = any(c.key == key and c.checkpoint_id == checkpoint_id for c in self.checkpoints)
        writes = any(k == key and w.checkpoint_id == checkpoint_id for k, w in self.writes)
        if in_batch:
            return True, writes
        params = {**_key_params(key), "checkpoint_id": checkpoint_id}
        row = (await self.conn.execute(_sql(CHECKPOINT_OR_WRITES_EXIST), params)).one()
        return bool(row[0]), writes or bool(row[1])

    async def _delete_thread_rows(self, key: ThreadKey) -> int:
        """Delete the thread's checkpoints, writes and events and tombstone its row: the
        number of checkpoints deleted."""
        params = _key_params(key)
        deleted = (await self.conn.execute(_sql(DELETE_THREAD_CHECKPOINTS), params)).rowcount
        for sql in DELETE_THREAD_ROWS:
            await self.conn.execute(_sql(sql), params)
        await self.conn.execute(_sql(TOMBSTONE_THREAD), {**params, "now": self.now})
        return deleted

    async def delete_thread(self, key: ThreadKey) -> int:
        await self.flush()
        deleted = await self._delete_thread_rows(key)
        self.threads[key] = None
        self.dirty.discard(key)
        self.heads.pop(key, None)
        self.deleted.append(key)
        # What this batch wrote to the thread before is gone with it: no cache or watcher
        # may see it (a Save after the delete, in the same batch, is flushed later).
        self.flushed_checkpoints = [c for c in self.flushed_checkpoints if c.key != key]
        self.flushed_writes = [(k, w) for k, w in self.flushed_writes if k != key]
        self.flushed_events = [e for e in self.flushed_events if e.key != key]
        return deleted

    async def _assign_feed_seqs(self) -> None:
        """Take the next feed_seqs of each tenant: one upsert that locks and bumps its row."""
        by_tenant: dict[str, list[Event]] = {}
        for e in self.events:
            by_tenant.setdefault(e.key.tenant, []).append(e)
        for tenant in sorted(by_tenant):
            events = by_tenant[tenant]
            params = {"tenant": tenant, "n": len(events)}
            last = (await self.conn.execute(_sql(BUMP_FEED), params)).scalar_one()
            for offset, e in enumerate(events):
                e.feed_seq = last - len(events) + 1 + offset

    async def flush(self) -> None:
        """Send what the operations queued (see _write_queued); keep it for after commit."""
        await self._write_queued()
        self.flushed_checkpoints += self.checkpoints
        self.flushed_writes += self.writes
        self.flushed_events += self.events
        self.checkpoints, self.writes, self.events = [], [], []
        self.new_requests = {}
        self.dirty = set()

    async def _write_queued(self) -> None:
        c = self.conn
        if self.checkpoints:
            await c.execute(
                _sql(INSERT_CHECKPOINT), [_checkpoint_params(cp) for cp in self.checkpoints]
            )
        if self.writes:
            regular = [_write_params(k, w) for k, w in self.writes if not w.upsert]
            special = [_write_params(k, w) for k, w in self.writes if w.upsert]
            if regular:
                await c.execute(_sql(INSERT_REGULAR_WRITE), regular)
            for params in special:  # one at a time: a batch may upsert one slot twice
                await c.execute(_sql(UPSERT_SPECIAL_WRITE), params)
        if self.events:
            await self._assign_feed_seqs()
            await c.execute(_sql(INSERT_EVENT), [_event_params(e) for e in self.events])
        if self.new_requests:
            await c.execute(
                _sql(INSERT_REQUEST),
                [
                    {"tenant": t, "request_id": r, "kind": k, "result": res, "created_at": self.now}
                    for (t, r), (k, res) in self.new_requests.items()
                ],
            )
        if self.dirty:
            rows = [self.threads[k] for k in sorted(self.dirty, key=_sort_key)]
            await c.execute(_sql(UPDATE_THREAD), [_thread_params(t) for t in rows if t is not None])


def _checkpoint_params(cp: Checkpoint) -> dict[str, Any]:
    return {
        **_key_params(cp.key),
        "checkpoint_id": cp.checkpoint_id,
        "parent_id": cp.parent_id,
        "step": cp.step,
        "state": cp.state,
        "content_type": cp.content_type,
        "trigger": int(cp.trigger),
        "name": cp.name,
        "completed_nodes": json.dumps(cp.completed_nodes),
        "progress_percent": cp.progress_percent,
        "eta_seconds": cp.eta_seconds,
        "metadata": json.dumps(cp.metadata),
        "created_at": cp.created_at,
        "expires_at": cp.expires_at,
        "state_size": len(cp.state),
    }


def _write_params(key: ThreadKey, w: PendingWrite) -> dict[str, Any]:
    return {
        **_key_params(key),
        "checkpoint_id": w.checkpoint_id,
        "task_id": w.task_id,
        "idx": w.idx,
        "channel": w.channel,
        "value": w.value,
        "content_type": w.content_type,
        "task_path": w.task_path,
    }


def _event_params(e: Event) -> dict[str, Any]:
    return {
        **_key_params(e.key),
        "seq": e.seq,
        "feed_seq": e.feed_seq,
        "type": e.type,
        "time": e.time,
        "payload": json.dumps(e.payload),
        "terminal": int(e.terminal),
    }


def _thread_params(t: Thread) -> dict[str, Any]:
    return {
        **_key_params(t.key),
        "head_id": t.head_id,
        "status": int(t.status),
        "workflow_id": t.workflow_id,
        "workflow_version": t.workflow_version,
        "lease_owner": t.lease_owner,
        "lease_expires_at": t.lease_expires_at,
        "fencing_token": t.fencing_token,
        "last_seq": t.last_seq,
        "updated_at": t.updated_at,
        "deleted": int(t.deleted),
        "keep_last": t.keep_last,
        "keep_forever": int(t.keep_forever),
    }
