"""SQL tier: the durable record, on PostgreSQL (asyncpg) or SQLite (aiosqlite).

Writes happen in batches (see commit.py): a `Batch` reads the thread rows it
touches in key order, buffers inserts, and flushes them with executemany in
one transaction, so that many concurrent Saves cost one commit. This is the
SQLite batch (BEGIN IMMEDIATE holds the database's one write lock); on
PostgreSQL pg.PgBatch does the same work in fewer statements, locking the rows.

Statements are SQLAlchemy Core over the tables of schema.py, rows read by name. Those that
run at every step of a run on SQLite are built once, with named parameters (`bindparam`);
the rest are built per call from the filters they are given.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

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
from checkpoint_svc.errors import AlreadyExists, DataLoss
from checkpoint_svc.sealing import Sealing
from checkpoint_svc.tiers.schema import checkpoints, events, feeds, requests, threads, writes

log = logging.getLogger(__name__)
_MIGRATING = threading.Lock()

KEY_COLUMNS = ("tenant", "namespace", "thread_id")
# A threads row but its key, for pg.py's statements (read by name, as _thread_from_row does).
THREAD_COLUMNS = ", ".join(c.name for c in threads.c if c.name not in KEY_COLUMNS)
# Not a valid tenant id (tenants start with a letter or digit), so never a client's.
BATCH_MARKER_TENANT = "~batch"
_TERMINAL = sorted(int(s) for s in TERMINAL_STATUSES)
CHECKPOINT_KEY = (*KEY_COLUMNS, "checkpoint_id")
_WRITE_SLOT = [writes.c[name] for name in (*CHECKPOINT_KEY, "task_id", "idx")]
_META = [
    checkpoints.c[name]
    for name in (
        "checkpoint_id",
        "parent_id",
        "step",
        "content_type",
        "trigger",
        "name",
        "completed_nodes",
        "progress_percent",
        "eta_seconds",
        "metadata",
        "created_at",
        "expires_at",
    )
]
_WRITE_FIELDS = ("checkpoint_id", "task_id", "idx", "channel", "value", "content_type", "task_path")
_EVENT_FIELDS = ("namespace", "thread_id", "seq", "feed_seq", "type", "time", "payload", "terminal")


def _is(table: sa.Table, key: ThreadKey) -> sa.ColumnElement[bool]:
    """The rows of one thread."""
    return sa.and_(
        table.c.tenant == key.tenant,
        table.c.namespace == key.namespace,
        table.c.thread_id == key.thread_id,
    )


def _is_bound(table: sa.Table) -> sa.ColumnElement[bool]:
    """The rows of the thread the parameters b_tenant, b_namespace, b_thread_id name (_bound):
    for statements built once, and run with many parameter sets."""
    return sa.and_(*(table.c[name] == sa.bindparam(f"b_{name}") for name in KEY_COLUMNS))


def _same_thread(a: Any, b: Any) -> sa.ColumnElement[bool]:
    """Rows of two tables (or aliases) of the same thread."""
    return sa.and_(*(a.c[name] == b.c[name] for name in KEY_COLUMNS))


def _under(table: Any, prefix: str) -> sa.ColumnElement[bool]:
    """The namespaces under a prefix. substr, not LIKE: a prefix with % or _ in it means
    just that."""
    return sa.func.substr(table.c.namespace, 1, len(prefix)) == prefix


def _of_thread_id(table: Any, tenant: str, thread_id: str, prefix: str) -> sa.ColumnElement[bool]:
    """One thread id's rows in the namespaces under a prefix."""
    return sa.and_(table.c.tenant == tenant, table.c.thread_id == thread_id, _under(table, prefix))


# A thread's row and its head checkpoint's.
_HEAD_OF = sa.and_(
    _same_thread(threads, checkpoints), threads.c.head_id == checkpoints.c.checkpoint_id
)
# A checkpoint that is the head of its thread (PruneThreads KEEP_LATEST keeps those)...
_IS_HEAD = sa.exists().where(_HEAD_OF).correlate(checkpoints)
# ...protected from retention while its thread is not terminal...
_ACTIVE_HEAD = (
    sa.exists().where(_HEAD_OF, threads.c.status.not_in(_TERMINAL)).correlate(checkpoints)
)
# ...and everything of a thread kept forever (SaveRequest.keep_forever).
_KEPT_FOREVER = (
    sa.exists()
    .where(_same_thread(threads, checkpoints), threads.c.keep_forever == 1)
    .correlate(checkpoints)
)

# ---- built once: what a batch on SQLite, and a Restore there, run --------------------------

SELECT_THREADS = (
    sa.select(threads)
    .where(
        sa.tuple_(*(threads.c[n] for n in KEY_COLUMNS)).in_(sa.bindparam("keys", expanding=True))
    )
    .order_by(*(threads.c[n] for n in KEY_COLUMNS))
)
INSERT_THREAD = sqlite.insert(threads).on_conflict_do_nothing()
DELETE_NEW_THREAD = threads.delete().where(_is_bound(threads))
# Every column but the key and created_at, by name (_thread_params).
_SET_ON_UPDATE = [n for n in THREAD_COLUMNS.split(", ") if n != "created_at"]
UPDATE_THREAD = (
    threads.update()
    .where(_is_bound(threads))
    .values({name: sa.bindparam(name) for name in _SET_ON_UPDATE})
)
# The head of a thread another thread's Save requires (SaveCommand.required_head); a
# tombstone's is empty.
SELECT_HEAD = sa.select(threads.c.head_id).where(_is_bound(threads))
SELECT_REQUEST = sa.select(requests.c.kind, requests.c.result).where(
    requests.c.tenant == sa.bindparam("b_tenant"),
    requests.c.request_id == sa.bindparam("b_request_id"),
)
INSERT_REQUEST = requests.insert()
# A client-supplied id on Save: taken already? writes for it committed before it?
CHECKPOINT_OR_WRITES_EXIST = sa.select(
    sa.exists()
    .where(_is_bound(checkpoints), checkpoints.c.checkpoint_id == sa.bindparam("b_checkpoint_id"))
    .label("taken"),
    sa.exists()
    .where(_is_bound(writes), writes.c.checkpoint_id == sa.bindparam("b_checkpoint_id"))
    .label("has_writes"),
)
INSERT_CHECKPOINT = checkpoints.insert()
INSERT_REGULAR_WRITE = sqlite.insert(writes).on_conflict_do_nothing(index_elements=_WRITE_SLOT)
_upsert = sqlite.insert(writes)
UPSERT_SPECIAL_WRITE = _upsert.on_conflict_do_update(
    index_elements=_WRITE_SLOT,
    set_={
        name: _upsert.excluded[name] for name in ("channel", "value", "content_type", "task_path")
    },
)
INSERT_EVENT = events.insert()
_bump = sqlite.insert(feeds)
# Locks the tenant's feed row until commit, so feed_seq is dense and in commit order.
BUMP_FEED = _bump.on_conflict_do_update(
    index_elements=[feeds.c.tenant], set_={"last_seq": feeds.c.last_seq + _bump.excluded.last_seq}
).returning(feeds.c.last_seq)
DELETE_THREAD_CHECKPOINTS = checkpoints.delete().where(_is_bound(checkpoints))
DELETE_THREAD_ROWS = [table.delete().where(_is_bound(table)) for table in (writes, events)]
# The row stays as a tombstone so that fencing tokens and event seqs never go back:
# a zombie holding an old token, or a watcher holding an old cursor, stays behind.
TOMBSTONE_THREAD = (
    threads.update()
    .where(_is_bound(threads))
    .values(
        deleted=1,
        head_id="",
        status=0,
        workflow_id="",
        workflow_version=0,
        lease_owner="",
        lease_expires_at=0,
        keep_last=0,
        keep_forever=0,
        updated_at=sa.bindparam("b_now"),
    )
)

# Restore: SQL names the checkpoint (the head, or one by id), with its metadata and, joined,
# its pending writes; the state comes from the fastest tier holding that very checkpoint.
# `version` is the thread's event seq if it is the head (0 for one by id).
_WRITES_OF_CHECKPOINT = sa.and_(
    _same_thread(writes, checkpoints), writes.c.checkpoint_id == checkpoints.c.checkpoint_id
)
_WRITE_LABELS = [writes.c[name].label(f"w_{name}") for name in _WRITE_FIELDS[1:]]
_HEAD = threads.join(checkpoints, _HEAD_OF)
FIND_HEAD = (
    sa.select(*_META, threads.c.last_seq.label("version"))
    .select_from(_HEAD)
    .where(_is_bound(threads))
)
FIND_HEAD_WITH_WRITES = (
    sa.select(*_META, threads.c.last_seq.label("version"), *_WRITE_LABELS)
    .select_from(_HEAD.outerjoin(writes, _WRITES_OF_CHECKPOINT))
    .where(_is_bound(threads))
    .order_by(writes.c.task_id, writes.c.idx)
)
_BY_ID = sa.and_(
    _is_bound(checkpoints), checkpoints.c.checkpoint_id == sa.bindparam("b_checkpoint_id")
)
FIND_CHECKPOINT = sa.select(*_META, sa.literal(0).label("version")).where(_BY_ID)
FIND_CHECKPOINT_WITH_WRITES = (
    sa.select(*_META, sa.literal(0).label("version"), *_WRITE_LABELS)
    .select_from(checkpoints.outerjoin(writes, _WRITES_OF_CHECKPOINT))
    .where(_BY_ID)
    .order_by(writes.c.task_id, writes.c.idx)
)
SELECT_STATE = sa.select(checkpoints.c.state).where(
    _BY_ID, checkpoints.c.created_at == sa.bindparam("b_created_at")
)
# The writes of checkpoints just deleted. Not "writes whose checkpoint is missing": writes may
# come before their checkpoint (LangGraph's async durability), and must not be swept then.
DELETE_WRITES_OF_CHECKPOINT = writes.delete().where(
    _is_bound(writes), writes.c.checkpoint_id == sa.bindparam("b_checkpoint_id")
)
DELETE_WRITES_OF_THREAD = writes.delete().where(_is_bound(writes))
_EVENT_KEY = [events.c[n] for n in (*KEY_COLUMNS, "seq")]
SELECT_FEED_SEQS = sa.select(*_EVENT_KEY, events.c.feed_seq).where(
    sa.tuple_(*_EVENT_KEY).in_(sa.bindparam("keys", expanding=True))
)
PING = sa.text("SELECT 1")

# ---- retention ------------------------------------------------------------------------------

SWEEP_EXPIRED = (
    checkpoints.delete()
    .where(
        checkpoints.c.expires_at.is_not(None),
        checkpoints.c.expires_at < sa.bindparam("b_now"),
        ~_KEPT_FOREVER,
        ~_ACTIVE_HEAD,
    )
    .returning(*(checkpoints.c[n] for n in CHECKPOINT_KEY))
)
# A terminal thread whose head was pruned is gone: its row and feed go too.
SWEEP_HEADLESS_THREADS = (
    threads.delete()
    .where(
        threads.c.status.in_(_TERMINAL),
        threads.c.head_id != "",
        ~sa.exists().where(_same_thread(checkpoints, threads)).correlate(threads),
    )
    .returning(*(threads.c[n] for n in KEY_COLUMNS))
)
SWEEP_ORPHAN_EVENTS = events.delete().where(
    ~sa.exists().where(_same_thread(threads, events)).correlate(events)
)
SWEEP_OLD_REQUESTS = requests.delete().where(requests.c.created_at < sa.bindparam("b_before"))
SWEEP_OLD_BATCH_MARKERS = requests.delete().where(
    requests.c.tenant == BATCH_MARKER_TENANT, requests.c.created_at < sa.bindparam("b_before")
)


def _beyond_keep_last(keep_last: int) -> sa.Delete:
    """The checkpoints past each thread's own keep_last, else past the service's (0: keep
    all), newest kept; never an active head."""
    ranked_from = checkpoints.alias("c")
    ranked = sa.select(
        *(ranked_from.c[n] for n in CHECKPOINT_KEY),
        sa.func.row_number()
        .over(
            partition_by=[ranked_from.c[n] for n in KEY_COLUMNS],
            order_by=ranked_from.c.checkpoint_id.desc(),
        )
        .label("rn"),
    ).subquery("ranked")
    t = threads.alias("t")
    beyond = sa.and_(t.c.keep_last > 0, ranked.c.rn > t.c.keep_last)
    if keep_last > 0:
        beyond = sa.or_(beyond, sa.and_(t.c.keep_last == 0, ranked.c.rn > keep_last))
    victims = (
        sa.select(*(ranked.c[n] for n in CHECKPOINT_KEY))
        .select_from(ranked.join(t, _same_thread(t, ranked)))
        .where(t.c.keep_forever == 0, beyond)
    )
    key = [checkpoints.c[n] for n in CHECKPOINT_KEY]
    return checkpoints.delete().where(~_ACTIVE_HEAD, sa.tuple_(*key).in_(victims)).returning(*key)


def _sort_key(key: ThreadKey) -> tuple[str, str, str]:
    return (key.tenant, key.namespace, key.thread_id)


def _bound(key: ThreadKey, **more: Any) -> dict[str, Any]:
    """The parameters of _is_bound (and of the statement's other b_ parameters)."""
    return {
        "b_tenant": key.tenant,
        "b_namespace": key.namespace,
        "b_thread_id": key.thread_id,
        **{f"b_{name}": value for name, value in more.items()},
    }


def _key_params(key: ThreadKey) -> dict[str, str]:
    """A row's key columns, by name."""
    return {"tenant": key.tenant, "namespace": key.namespace, "thread_id": key.thread_id}


def _thread_from_row(key: ThreadKey, row: Mapping[str, Any]) -> Thread:
    """A threads row, read by name: a SQLAlchemy row's `_mapping` or an asyncpg Record."""
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


def _trigger(value: int) -> Trigger:
    return Trigger(value) if value in Trigger._value2member_map_ else Trigger(0)


def _checkpoint_from_row(
    key: ThreadKey, row: Mapping[str, Any], state_from: Sealing | None = None
) -> Checkpoint:
    """A checkpoints row (_META, and `state` opened by `state_from` if given), read by name."""
    cp = Checkpoint(
        key=key,
        checkpoint_id=row["checkpoint_id"],
        parent_id=row["parent_id"],
        step=row["step"],
        content_type=row["content_type"],
        trigger=_trigger(row["trigger"]),
        name=row["name"],
        completed_nodes=json.loads(row["completed_nodes"]),
        progress_percent=row["progress_percent"],
        eta_seconds=row["eta_seconds"],
        metadata=json.loads(row["metadata"]),
        created_at=row["created_at"],
        expires_at=row["expires_at"],
    )
    if state_from is not None:
        cp.state = state_from.open_state(key, cp.checkpoint_id, bytes(row["state"]))
    return cp


def _write_from_row(
    key: ThreadKey, row: Mapping[str, Any], sealing: Sealing, prefix: str = ""
) -> PendingWrite:
    """A writes row, read by name (`prefix`: its columns' labels in a join, _WRITE_LABELS)."""
    checkpoint_id, task_id, idx = row["checkpoint_id"], row[f"{prefix}task_id"], row[f"{prefix}idx"]
    return PendingWrite(
        checkpoint_id,
        task_id,
        idx,
        row[f"{prefix}channel"],
        sealing.open_value(key, checkpoint_id, task_id, idx, bytes(row[f"{prefix}value"])),
        row[f"{prefix}content_type"],
        row[f"{prefix}task_path"],
    )


def _event_from_row(tenant: str, row: Mapping[str, Any], sealing: Sealing) -> Event:
    key = ThreadKey(tenant, row["namespace"], row["thread_id"])
    return Event(
        key=key,
        seq=row["seq"],
        feed_seq=row["feed_seq"],
        type=row["type"],
        time=row["time"],
        payload=sealing.open_payload(key, row["seq"], row["payload"]),
        terminal=bool(row["terminal"]),
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
    def __init__(self, url: str, *, timeout: float = 15.0, sealing: Sealing | None = None) -> None:
        self.url = url
        # How states, writes and event payloads are stored (sealed with a key ring, or not).
        self.sealing = sealing or Sealing()
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

            self.hot = PgHotPath(url, timeout=timeout, sealing=self.sealing)
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
            # Without the pools' command timeout (--sql-timeout): an index may take longer.
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

    @property
    def _insert(self) -> Any:
        """This dialect's INSERT (for ON CONFLICT)."""
        return sqlite.insert if self.is_sqlite else postgresql.insert

    async def keep_heads(
        self, tenant: str, thread_id: str, prefix: str
    ) -> tuple[list[tuple[ThreadKey, str]], list[tuple[ThreadKey, str]]]:
        """Delete all but the heads of a thread id's namespaces under `prefix`, and clear
        the heads' parents: (deleted, changed) checkpoints, for the caches to forget."""
        mine = _of_thread_id(checkpoints, tenant, thread_id, prefix)
        named = (checkpoints.c.namespace, checkpoints.c.checkpoint_id)
        async with self.writer.begin() as conn:
            deleted = (
                await conn.execute(checkpoints.delete().where(mine, ~_IS_HEAD).returning(*named))
            ).all()
            changed = (
                await conn.execute(
                    checkpoints.update()
                    .where(mine, _IS_HEAD)
                    .values(parent_id="")
                    .returning(*named)
                )
            ).all()

            def keys(rows: Sequence[Any]) -> list[tuple[ThreadKey, str]]:
                return [(ThreadKey(tenant, r.namespace, thread_id), r.checkpoint_id) for r in rows]

            await _delete_writes_of(conn, keys(deleted))
        return keys(deleted), keys(changed)

    async def delete_for_runs(
        self, tenant: str, run_ids: list[str], prefix: str, now: float
    ) -> tuple[list[tuple[ThreadKey, str]], list[ThreadKey]]:
        """Delete the checkpoints of these runs (metadata run_id): (deleted, threads whose
        head moved back)."""
        if self.is_sqlite:
            run_id = sa.func.json_extract(checkpoints.c.metadata, "$.run_id")
        else:
            run_id = sa.cast(checkpoints.c.metadata, postgresql.JSONB)["run_id"].astext
        statement = (
            checkpoints.delete()
            .where(checkpoints.c.tenant == tenant, _under(checkpoints, prefix), run_id.in_(run_ids))
            .returning(
                checkpoints.c.namespace, checkpoints.c.thread_id, checkpoints.c.checkpoint_id
            )
        )
        async with self.writer.begin() as conn:
            deleted = [
                (ThreadKey(tenant, r.namespace, r.thread_id), r.checkpoint_id)
                for r in (await conn.execute(statement)).all()
            ]
            moved: list[ThreadKey] = []
            for key in {k for k, _ in deleted}:
                head = (await conn.execute(SELECT_HEAD, _bound(key))).scalar()
                if (key, head) in deleted:
                    await conn.execute(_move_head_to_newest(key, now))
                    moved.append(key)
            await _delete_writes_of(conn, deleted)
        return deleted, moved

    async def copy_thread(
        self, tenant: str, source: str, target: str, prefix: str, now: float
    ) -> tuple[list[str], int]:
        """(the namespaces copied, checkpoints copied); AlreadyExists if a live target
        thread is there. A tombstone of the target (a deleted thread) is revived; a live
        target is not touched, and fewer rows are copied than there are."""
        live_source = sa.and_(
            _of_thread_id(threads, tenant, source, prefix), threads.c.deleted == 0
        )
        copied = (
            "head_id",
            "status",
            "workflow_id",
            "workflow_version",
            "keep_last",
            "keep_forever",
        )
        insert = self._insert(threads).from_select(
            [*KEY_COLUMNS, *copied, "created_at", "updated_at"],
            sa.select(
                threads.c.tenant,
                threads.c.namespace,
                sa.literal(target, sa.Text),
                *(threads.c[n] for n in copied),
                sa.literal(now, sa.Double),
                sa.literal(now, sa.Double),
            ).where(live_source),
        )
        revived = {n: insert.excluded[n] for n in (*copied, "updated_at")}
        copy_threads = insert.on_conflict_do_update(
            index_elements=[threads.c[n] for n in KEY_COLUMNS],
            set_={**revived, "deleted": 0},
            where=threads.c.deleted == 1,
        ).returning(threads.c.namespace)
        async with self.writer.begin() as conn:
            wanted = (
                await conn.execute(sa.select(sa.func.count()).where(live_source))
            ).scalar_one()
            if not wanted:
                return [], 0
            namespaces = [r.namespace for r in (await conn.execute(copy_threads)).all()]
            if len(namespaces) != wanted:
                raise AlreadyExists(f"thread {target} already exists under {prefix!r}")
            if self.sealing.ring is not None:  # sealed to their thread: opened and sealed again
                copied = await self._copy_resealed(
                    conn, checkpoints, tenant, source, target, prefix
                )
                await self._copy_resealed(conn, writes, tenant, source, target, prefix)
                return namespaces, copied
            result = await conn.execute(_copy_rows(checkpoints, tenant, source, target, prefix))
            await conn.execute(_copy_rows(writes, tenant, source, target, prefix))
        return namespaces, result.rowcount

    async def _copy_resealed(
        self,
        conn: AsyncConnection,
        table: sa.Table,
        tenant: str,
        source: str,
        target: str,
        prefix: str,
    ) -> int:
        """`_copy_rows` through this process, a page at a time: each state (or write value)
        opened as the source's and sealed as the target's."""
        sealing, copied = self.sealing, 0
        blob = "state" if table is checkpoints else "value"
        source_rows = _of_thread_id(table, tenant, source, prefix)
        async for rows in _pages(conn, table, source_rows, blob):
            for row in rows:
                was = ThreadKey(tenant, row["namespace"], source)
                now = ThreadKey(tenant, row["namespace"], target)
                row[blob] = _sealed_again(sealing, table, row, was, now)
                row["thread_id"] = target
            await conn.execute(table.insert(), rows)
            copied += len(rows)
        return copied

    async def reseal(self) -> AsyncIterator[Resealed]:
        """Seal again, with the key new values are sealed with, every stored value that is not
        sealed with it yet (an older key, or plaintext where the ring reads it), a page per
        transaction; after each page, how far it got. A value that does not open is left as
        it is, and counted."""
        sealing = self.sealing
        if sealing.ring is None:
            raise ValueError("resealing needs a key ring (--encryption-keys)")
        for table, blob in ((checkpoints, "state"), (writes, "value"), (events, "payload")):
            progress = Resealed(table.name)
            pk = list(table.primary_key.columns)
            update = (
                table.update()
                .where(*(c == sa.bindparam(f"b_{c.name}") for c in pk))
                .where(table.c[blob] == sa.bindparam("b_old"))
                .values({blob: sa.bindparam("b_new")})
            )
            async with self.reader.connect() as reading:
                async for rows in _pages(reading, table, sa.true(), blob):
                    changes = []
                    for row in rows:
                        try:
                            new = _resealed(sealing, table, row)
                        except DataLoss as exc:
                            progress.unreadable += 1
                            log.error("not resealed", extra={"error": str(exc)})
                            continue
                        if new is not None:
                            keys = {f"b_{c.name}": row[c.name] for c in pk}
                            changes.append({**keys, "b_old": row[blob], "b_new": new})
                    if changes:
                        async with self.writer.begin() as conn:
                            progress.resealed += (await conn.execute(update, changes)).rowcount
                    progress.looked_at += len(rows)
                    yield progress

    async def namespaces_of(self, tenant: str, thread_id: str, prefix: str) -> list[str]:
        """The namespaces a thread id exists in, under a prefix."""
        statement = (
            sa.select(threads.c.namespace)
            .where(_of_thread_id(threads, tenant, thread_id, prefix), threads.c.deleted == 0)
            .order_by(threads.c.namespace)
        )
        async with self.reader.connect() as conn:
            return list((await conn.execute(statement)).scalars())

    async def get_thread(self, key: ThreadKey) -> Thread | None:
        async with self.reader.connect() as conn:
            row = (await conn.execute(sa.select(threads).where(_is(threads, key)))).first()
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
            statement = FIND_CHECKPOINT_WITH_WRITES if include_writes else FIND_CHECKPOINT
            params = _bound(key, checkpoint_id=checkpoint_id)
        else:
            statement = FIND_HEAD_WITH_WRITES if include_writes else FIND_HEAD
            params = _bound(key)
        async with self.reader.connect() as conn:
            rows = [r._mapping for r in (await conn.execute(statement, params)).all()]
        if not rows:
            return None
        cp = _checkpoint_from_row(key, rows[0])
        found = [
            _write_from_row(key, r, self.sealing, "w_")
            for r in rows
            if include_writes and r["w_task_id"] is not None
        ]
        return cp, rows[0]["version"], found, None

    async def state_of(self, named: Checkpoint) -> bytes | None:
        """The state of that very checkpoint (None if it is gone, or is another by that id)."""
        if self.hot is not None:
            return await self.hot.state_of(named)
        params = _bound(named.key, checkpoint_id=named.checkpoint_id, created_at=named.created_at)
        async with self.reader.connect() as conn:
            state = (await conn.execute(SELECT_STATE, params)).scalar()
        if state is None:
            return None
        return self.sealing.open_state(named.key, named.checkpoint_id, bytes(state))

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
        c = checkpoints.c
        statement = sa.select(*_META, c.namespace, *([c.state] if include_state else []))
        if namespace_prefix is None:
            statement = statement.where(_is(checkpoints, key))
        else:
            statement = statement.where(
                _of_thread_id(checkpoints, key.tenant, key.thread_id, namespace_prefix)
            )
        if before_id:
            statement = statement.where(c.checkpoint_id < before_id)
        if trigger:
            statement = statement.where(c.trigger == int(trigger))
        if created_after is not None:
            statement = statement.where(c.created_at >= created_after)
        if created_before is not None:
            statement = statement.where(c.created_at < created_before)
        if metadata_equals and self.is_sqlite:
            for k, v in metadata_equals.items():
                statement = statement.where(
                    sa.func.json_extract(c.metadata, "$." + json.dumps(k))
                    == sa.func.json_extract(json.dumps(v), "$")
                )
        elif metadata_equals:  # the GIN index of migration 0004 is on this very expression
            wanted = sa.cast(sa.literal(json.dumps(metadata_equals), sa.Text), postgresql.JSONB)
            statement = statement.where(sa.cast(c.metadata, postgresql.JSONB).contains(wanted))
        statement = statement.order_by(c.checkpoint_id.desc()).limit(limit)
        async with self.reader.connect() as conn:
            rows = (await conn.execute(statement)).all()
        return [
            _checkpoint_from_row(
                ThreadKey(key.tenant, r.namespace, key.thread_id),
                r._mapping,
                self.sealing if include_state else None,
            )
            for r in rows
        ]

    async def writes_of(self, checkpoints_of: list[Checkpoint]) -> list[list[PendingWrite]]:
        """The pending writes of each of a page of one thread id's checkpoints (across its
        namespaces), in order: one query."""
        if not checkpoints_of:
            return []
        key = checkpoints_of[0].key
        statement = (
            sa.select(writes)
            .where(
                writes.c.tenant == key.tenant,
                writes.c.thread_id == key.thread_id,
                writes.c.checkpoint_id.in_([c.checkpoint_id for c in checkpoints_of]),
            )
            .order_by(writes.c.task_id, writes.c.idx)
        )
        found: dict[tuple[str, str], list[PendingWrite]] = {}
        async with self.reader.connect() as conn:
            for r in (await conn.execute(statement)).all():
                found.setdefault((r.namespace, r.checkpoint_id), []).append(
                    _write_from_row(
                        ThreadKey(key.tenant, r.namespace, key.thread_id), r._mapping, self.sealing
                    )
                )
        return [found.get((c.key.namespace, c.checkpoint_id), []) for c in checkpoints_of]

    async def list_threads(
        self, tenant: str, flt: ThreadFilter, limit: int, after: tuple[str, ...] | None
    ) -> list[Thread]:
        """A page of threads after `after`: (namespace, thread id), or newest first
        (created_at, namespace, thread id)."""
        t = threads.c
        statement = sa.select(threads).where(t.tenant == tenant, t.deleted == 0)
        if flt.namespace:
            statement = statement.where(t.namespace == flt.namespace)
        if flt.statuses:
            statement = statement.where(t.status.in_([int(s) for s in flt.statuses]))
        if flt.lease_expired_before is not None:
            statement = statement.where(
                sa.or_(t.lease_owner == "", t.lease_expires_at < flt.lease_expired_before)
            )
        if flt.workflow_id:
            statement = statement.where(t.workflow_id == flt.workflow_id)
        if flt.newest_first:
            if after is not None:
                # A row comparison (threads_by_created serves a namespace's newest first;
                # across namespaces, the tenant's rows are sorted).
                at, namespace, thread_id = float(after[0]), after[1], after[2]
                statement = statement.where(
                    sa.tuple_(t.created_at, t.namespace, t.thread_id)
                    < sa.tuple_(
                        sa.literal(at, sa.Double),
                        sa.literal(namespace, sa.Text),
                        sa.literal(thread_id, sa.Text),
                    )
                )
            statement = statement.order_by(
                t.created_at.desc(), t.namespace.desc(), t.thread_id.desc()
            )
        else:
            if after is not None:
                namespace, thread_id = after
                statement = statement.where(
                    sa.or_(
                        t.namespace > namespace,
                        sa.and_(t.namespace == namespace, t.thread_id > thread_id),
                    )
                )
            statement = statement.order_by(t.namespace, t.thread_id)
        async with self.reader.connect() as conn:
            rows = (await conn.execute(statement.limit(limit))).all()
        return [
            _thread_from_row(ThreadKey(tenant, r.namespace, r.thread_id), r._mapping) for r in rows
        ]

    async def events_after(
        self, tenant: str, key: ThreadKey | None, after: int, limit: int
    ) -> list[Event]:
        """Stored events after a cursor: a thread's seq, or the tenant's feed_seq."""
        statement = sa.select(*(events.c[n] for n in _EVENT_FIELDS))
        if key is None:
            statement = statement.where(events.c.tenant == tenant, events.c.feed_seq > after)
            statement = statement.order_by(events.c.feed_seq)
        else:
            statement = statement.where(_is(events, key), events.c.seq > after)
            statement = statement.order_by(events.c.seq)
        async with self.reader.connect() as conn:
            rows = (await conn.execute(statement.limit(limit))).all()
        return [_event_from_row(tenant, r._mapping, self.sealing) for r in rows]

    async def stats(self, key: ThreadKey) -> Stats:
        c = checkpoints.c
        by_trigger = (
            sa.select(
                c.trigger,
                sa.func.count().label("count"),
                sa.func.min(c.created_at).label("oldest"),
                sa.func.max(c.created_at).label("newest"),
                sa.func.coalesce(sa.func.sum(c.state_size), 0).label("state_bytes"),
            )
            .where(_is(checkpoints, key))
            .group_by(c.trigger)
        )
        async with self.reader.connect() as conn:
            rows = (await conn.execute(by_trigger)).all()
            events_of = sa.select(sa.func.count()).select_from(events).where(_is(events, key))
            event_count = (await conn.execute(events_of)).scalar_one()
        return Stats(
            checkpoint_count=sum(r.count for r in rows),
            triggers={_trigger(r.trigger): r.count for r in rows},
            oldest=min((r.oldest for r in rows), default=None),
            newest=max((r.newest for r in rows), default=None),
            state_bytes=sum(int(r.state_bytes) for r in rows),
            event_count=event_count,
        )

    async def batch_committed(self, batch_id: str, session: Any = None) -> bool:
        """Whether the batch whose COMMIT answer was lost landed: its marker row, read once
        the session that had the COMMIT (Batch.abandon) is over."""
        if session is not None and self.hot is not None:
            await self.hot.end_session(session)
        params = {"b_tenant": BATCH_MARKER_TENANT, "b_request_id": batch_id}
        async with self.writer.connect() as conn:
            return (await conn.execute(SELECT_REQUEST, params)).first() is not None

    async def number_events(self, flushed: list[Event]) -> None:
        """The feed seqs of a batch's events that its lost answer would have given (a batch
        written in one statement learns them from that statement's answer)."""
        unnumbered = {(*_sort_key(e.key), e.seq): e for e in flushed if not e.feed_seq}
        if not unnumbered:
            return
        async with self.reader.connect() as conn:
            rows = (await conn.execute(SELECT_FEED_SEQS, {"keys": list(unnumbered)})).all()
        for r in rows:
            unnumbered[(r.tenant, r.namespace, r.thread_id, r.seq)].feed_seq = r.feed_seq

    async def ping(self) -> None:
        async with self.reader.connect() as conn:
            await conn.execute(PING)

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

        def pruned_of(rows: Sequence[Any]) -> list[tuple[ThreadKey, str]]:
            return [(ThreadKey(r.tenant, r.namespace, r.thread_id), r.checkpoint_id) for r in rows]

        async with self.writer.begin() as conn:
            pruned = pruned_of((await conn.execute(SWEEP_EXPIRED, {"b_now": now})).all())
            pruned += pruned_of((await conn.execute(_beyond_keep_last(keep_last))).all())
            gone: list[ThreadKey] = []
            if pruned:
                await _delete_writes_of(conn, pruned)
                gone = [
                    ThreadKey(r.tenant, r.namespace, r.thread_id)
                    for r in (await conn.execute(SWEEP_HEADLESS_THREADS)).all()
                ]
                if gone:
                    await conn.execute(SWEEP_ORPHAN_EVENTS)
                    await conn.execute(DELETE_WRITES_OF_THREAD, [_bound(k) for k in gone])
            if request_ttl is not None:
                await conn.execute(SWEEP_OLD_REQUESTS, {"b_before": now - request_ttl})
            await conn.execute(SWEEP_OLD_BATCH_MARKERS, {"b_before": now - 3600})
        return pruned, gone


def _move_head_to_newest(key: ThreadKey, now: float) -> sa.Update:
    """A thread's head back to its newest checkpoint ('' if none is left)."""
    newest = sa.select(sa.func.max(checkpoints.c.checkpoint_id)).where(_is(checkpoints, key))
    return (
        threads.update()
        .where(_is(threads, key))
        .values(head_id=sa.func.coalesce(newest.scalar_subquery(), ""), updated_at=now)
    )


# What a sealed copy (CopyThread with a key ring) or a reseal holds in memory at once: this
# many rows at most, and no more once their values reach PAGE_BYTES.
PAGE_ROWS = 200
PAGE_BYTES = 32 * 1024 * 1024
# Keys listed at once, to cut into pages.
_LISTED_KEYS = 10_000


@dataclass(slots=True)
class Resealed:
    """How far SqlTier.reseal got in one table."""

    table: str
    looked_at: int = 0
    resealed: int = 0
    unreadable: int = 0


async def _pages(
    conn: AsyncConnection, table: sa.Table, where: sa.ColumnElement[bool], blob: str
) -> AsyncIterator[list[dict[str, Any]]]:
    """The rows of `table` matching `where`, in key order, a page at a time (PAGE_ROWS and
    PAGE_BYTES of `blob`): keys listed first, by key from the last one, so a row is met once."""
    pk = list(table.primary_key.columns)
    after: tuple[Any, ...] | None = None
    while True:
        listing = sa.select(*pk, sa.func.length(table.c[blob]).label("size")).where(where)
        if after is not None:
            listing = listing.where(sa.tuple_(*pk) > sa.tuple_(*after))
        keys = (await conn.execute(listing.order_by(*pk).limit(_LISTED_KEYS))).all()
        if not keys:
            return
        page: list[tuple[Any, ...]] = []
        size = 0
        for n, row in enumerate(keys, 1):
            page.append(tuple(row)[: len(pk)])
            size += row.size or 0
            if len(page) >= PAGE_ROWS or size >= PAGE_BYTES or n == len(keys):
                fetch = sa.select(table).where(sa.tuple_(*pk).in_(page)).order_by(*pk)
                yield [dict(r._mapping) for r in (await conn.execute(fetch)).all()]
                page, size = [], 0
        after = tuple(keys[-1])[: len(pk)]


def _resealed(sealing: Sealing, table: sa.Table, row: dict[str, Any]) -> Any:
    """A row's value sealed again with the newest key, or None if it is sealed with it."""
    ring = sealing.ring
    assert ring is not None
    key = ThreadKey(row["tenant"], row["namespace"], row["thread_id"])
    if table is events:
        sealed = Sealing.sealed_payload(row["payload"])
        if sealed is not None and ring.sealed_with_newest(sealed):
            return None
        payload = sealing.open_payload(key, row["seq"], row["payload"])
        return sealing.payload(key, row["seq"], payload)
    if ring.sealed_with_newest(bytes(row["state" if table is checkpoints else "value"])):
        return None
    return _sealed_again(sealing, table, row, key, key)


def _sealed_again(
    sealing: Sealing, table: sa.Table, row: dict[str, Any], was: ThreadKey, now: ThreadKey
) -> bytes:
    """A checkpoints row's state (a writes row's value) opened as `was`'s, sealed as `now`'s."""
    cid = row["checkpoint_id"]
    if table is checkpoints:
        return sealing.state(now, cid, sealing.open_state(was, cid, bytes(row["state"])))
    task, idx = row["task_id"], row["idx"]
    plain = sealing.open_value(was, cid, task, idx, bytes(row["value"]))
    return sealing.value(now, cid, task, idx, plain)


def _copy_rows(table: sa.Table, tenant: str, source: str, target: str, prefix: str) -> sa.Insert:
    """One thread id's rows of `table`, under a prefix, again under another thread id."""
    columns = [
        sa.literal(target, sa.Text) if column.name == "thread_id" else column for column in table.c
    ]
    return table.insert().from_select(
        [column.name for column in table.c],
        sa.select(*columns).where(_of_thread_id(table, tenant, source, prefix)),
    )


async def _delete_writes_of(
    conn: AsyncConnection, deleted: Sequence[tuple[ThreadKey, str]]
) -> None:
    """The pending writes of these (deleted) checkpoints."""
    if deleted:
        params = [_bound(k, checkpoint_id=cid) for k, cid in deleted]
        await conn.execute(DELETE_WRITES_OF_CHECKPOINT, params)


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
            INSERT_THREAD,
            [{**_key_params(k), "created_at": self.now, "updated_at": self.now} for k in keys],
        )

    async def _delete_new_threads(self, keys: list[ThreadKey]) -> None:
        for key in keys:
            await self.conn.execute(DELETE_NEW_THREAD, _bound(key))

    async def _select_threads(self, keys: list[ThreadKey]) -> dict[ThreadKey, Thread]:
        params = {"keys": [(k.tenant, k.namespace, k.thread_id) for k in keys]}
        result = await self.conn.execute(SELECT_THREADS, params)
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
        row = (await self.conn.execute(SELECT_HEAD, _bound(key))).first()
        return row.head_id if row is not None else ""

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
        params = {"b_tenant": tenant, "b_request_id": request_id}
        row = (await self.conn.execute(SELECT_REQUEST, params)).first()
        return (row.kind, row.result) if row else None

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
        early = any(k == key and w.checkpoint_id == checkpoint_id for k, w in self.writes)
        if in_batch:
            return True, early
        params = _bound(key, checkpoint_id=checkpoint_id)
        row = (await self.conn.execute(CHECKPOINT_OR_WRITES_EXIST, params)).one()
        return bool(row.taken), early or bool(row.has_writes)

    async def _delete_thread_rows(self, key: ThreadKey) -> int:
        """Delete the thread's checkpoints, writes and events and tombstone its row: the
        number of checkpoints deleted."""
        params = _bound(key)
        deleted = (await self.conn.execute(DELETE_THREAD_CHECKPOINTS, params)).rowcount
        for sql in DELETE_THREAD_ROWS:
            await self.conn.execute(sql, params)
        await self.conn.execute(TOMBSTONE_THREAD, _bound(key, now=self.now))
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
            taken = by_tenant[tenant]
            params = {"tenant": tenant, "last_seq": len(taken)}
            last = (await self.conn.execute(BUMP_FEED, params)).scalar_one()
            for offset, e in enumerate(taken):
                e.feed_seq = last - len(taken) + 1 + offset

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
        c, sealing = self.conn, self.sql.sealing
        if self.checkpoints:
            await c.execute(
                INSERT_CHECKPOINT, [_checkpoint_params(cp, sealing) for cp in self.checkpoints]
            )
        if self.writes:
            regular = [_write_params(k, w, sealing) for k, w in self.writes if not w.upsert]
            special = [_write_params(k, w, sealing) for k, w in self.writes if w.upsert]
            if regular:
                await c.execute(INSERT_REGULAR_WRITE, regular)
            for params in special:  # one at a time: a batch may upsert one slot twice
                await c.execute(UPSERT_SPECIAL_WRITE, params)
        if self.events:
            await self._assign_feed_seqs()
            await c.execute(INSERT_EVENT, [_event_params(e, sealing) for e in self.events])
        if self.new_requests:
            await c.execute(
                INSERT_REQUEST,
                [
                    {"tenant": t, "request_id": r, "kind": k, "result": res, "created_at": self.now}
                    for (t, r), (k, res) in self.new_requests.items()
                ],
            )
        if self.dirty:
            rows = [self.threads[k] for k in sorted(self.dirty, key=_sort_key)]
            await c.execute(UPDATE_THREAD, [_thread_params(t) for t in rows if t is not None])


def _checkpoint_params(cp: Checkpoint, sealing: Sealing) -> dict[str, Any]:
    return {
        **_key_params(cp.key),
        "checkpoint_id": cp.checkpoint_id,
        "parent_id": cp.parent_id,
        "step": cp.step,
        "state": sealing.state(cp.key, cp.checkpoint_id, cp.state),
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


def _write_params(key: ThreadKey, w: PendingWrite, sealing: Sealing) -> dict[str, Any]:
    return {
        **_key_params(key),
        "checkpoint_id": w.checkpoint_id,
        "task_id": w.task_id,
        "idx": w.idx,
        "channel": w.channel,
        "value": sealing.value(key, w.checkpoint_id, w.task_id, w.idx, w.value),
        "content_type": w.content_type,
        "task_path": w.task_path,
    }


def _event_params(e: Event, sealing: Sealing) -> dict[str, Any]:
    return {
        **_key_params(e.key),
        "seq": e.seq,
        "feed_seq": e.feed_seq,
        "type": e.type,
        "time": e.time,
        "payload": sealing.payload(e.key, e.seq, e.payload),
        "terminal": int(e.terminal),
    }


def _thread_params(t: Thread) -> dict[str, Any]:
    """UPDATE_THREAD's parameters: the key (b_), and every column to set by its name."""
    return {
        **_bound(t.key),
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
