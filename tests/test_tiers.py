"""Which tier serves what, across restarts; large threads; retention."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
import redis.asyncio as aioredis

from tests.requests import NS, code_of, restore, save, state_of
from tests.servers import checkpoint_stub
from workflow_stubs.checkpoint.v1 import checkpoint_pb2 as pb

MIGRATIONS_ON_EACH_DATABASE = pytest.mark.parametrize(
    "backend", ["sqlite", "postgres"], indirect=True
)


@pytest.mark.parametrize("backend", ["postgres+redis"], indirect=True)
async def test_restore_after_restart_from_redis_then_sql(service_process, backend, tenant) -> None:
    """States too big to come back with the query that names a checkpoint (the hot path on
    PostgreSQL, docs/checkpoint-service.md) are what the caches hold."""
    service = service_process
    channel, s, md = await checkpoint_stub(service.address, tenant)
    pad = "x" * 70_000
    ids = [
        (await save(s, md, "warm", {"i": i, "pad": pad})).checkpoint.checkpoint_id for i in range(3)
    ]
    assert (await restore(s, md, "warm")).served_from == pb.TIER_MEMORY
    await channel.close()

    await service.arestart()  # the memory tier is gone; Redis still holds head and body
    channel, s, md = await checkpoint_stub(service.address, tenant)
    got = await restore(s, md, "warm", include_writes=True)
    assert got.served_from == pb.TIER_REDIS
    assert got.checkpoint.checkpoint_id == ids[-1] and state_of(got) == {"i": 2, "pad": pad}
    await channel.close()

    await service.arestart()
    client = aioredis.Redis.from_url(backend.redis_url)
    await client.flushall()
    await client.aclose()
    channel, s, md = await checkpoint_stub(service.address, tenant)
    got = await restore(s, md, "warm")
    assert got.served_from == pb.TIER_SQL
    assert got.checkpoint.checkpoint_id == ids[-1] and state_of(got) == {"i": 2, "pad": pad}
    older = await restore(s, md, "warm", checkpoint_id=ids[0])
    assert older.served_from == pb.TIER_SQL and state_of(older) == {"i": 0, "pad": pad}
    # Read-through re-warms the tiers: the next read of the head is not from SQL.
    assert (await restore(s, md, "warm")).served_from != pb.TIER_SQL
    await channel.close()


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_restore_after_restart_from_sql_on_sqlite(service, tenant) -> None:
    channel, s, md = await checkpoint_stub(service.address, tenant)
    cid = (await save(s, md, "embedded", {"ok": 1})).checkpoint.checkpoint_id
    await channel.close()
    await service.arestart()
    channel, s, md = await checkpoint_stub(service.address, tenant)
    got = await restore(s, md, "embedded")
    assert got.served_from == pb.TIER_SQL and got.checkpoint.checkpoint_id == cid
    assert (await restore(s, md, "embedded")).served_from == pb.TIER_MEMORY
    await channel.close()


async def test_ten_thousand_checkpoints_listed_page_by_page(store) -> None:
    """The store itself, in this process (the page token the servicer makes of its cursor
    is tested over gRPC in test_roundtrip.py): every one of 10,000, newest first, no page
    overlapping another."""
    from checkpoint_svc.domain import Checkpoint, SaveCommand, ThreadKey

    key = ThreadKey("t1", NS, "big")
    total = 10_000
    gate = asyncio.Semaphore(64)

    async def one(i: int) -> str:
        cp = Checkpoint(key=key, checkpoint_id="", state=b'{"i": %d}' % i, step=i)
        async with gate:
            return (await store.save(SaveCommand(checkpoint=cp))).checkpoint.checkpoint_id

    saved = set(await asyncio.gather(*(one(i) for i in range(total))))
    assert len(saved) == total
    seen: list[str] = []
    cursor = ""
    pages = 0
    started = time.monotonic()
    while True:
        page, cursor = await store.list(key, 500, before_id=cursor)
        pages += 1
        seen += [c.checkpoint_id for c in page]
        if not cursor:
            break
    elapsed = time.monotonic() - started
    assert pages == 20
    assert len(seen) == total and set(seen) == saved
    assert seen == sorted(seen, reverse=True), "newest first, no overlap between pages"
    print(f"listed {total} checkpoints in {pages} pages in {elapsed:.2f}s")


async def test_list_filters_by_trigger_and_time(stub) -> None:
    s, md = stub
    await save(s, md, "flt", cp={"trigger": pb.TRIGGER_MANUAL})
    await asyncio.sleep(0.05)
    middle = (await save(s, md, "flt", cp={"trigger": pb.TRIGGER_STEP_COMPLETED})).checkpoint
    await save(s, md, "flt", cp={"trigger": pb.TRIGGER_MANUAL})
    manual = await s.List(
        pb.ListRequest(namespace=NS, thread_id="flt", trigger=pb.TRIGGER_MANUAL), metadata=md
    )
    assert len(manual.checkpoints) == 2
    assert all(c.trigger == pb.TRIGGER_MANUAL for c in manual.checkpoints)
    since = await s.List(
        pb.ListRequest(namespace=NS, thread_id="flt", created_after=middle.created_at), metadata=md
    )
    assert len(since.checkpoints) == 2
    before = await s.List(
        pb.ListRequest(namespace=NS, thread_id="flt", created_before=middle.created_at), metadata=md
    )
    assert len(before.checkpoints) == 1


async def test_retention_prunes_old_checkpoints_but_never_an_active_head(
    service_factory, backend, tenant
) -> None:
    svc = service_factory(backend, "--sql-ttl", "1", "--sweep-interval", "0.3", "--keep-last", "3")
    channel, s, md = await checkpoint_stub(svc.address, tenant)
    active = [
        (
            await save(s, md, "active", {"i": i}, status=pb.THREAD_STATUS_RUNNING)
        ).checkpoint.checkpoint_id
        for i in range(5)
    ]
    done = [
        (
            await save(s, md, "done", {"i": i}, status=pb.THREAD_STATUS_COMPLETED)
        ).checkpoint.checkpoint_id
        for i in range(2)
    ]
    # Kept forever by the flag on its first save (sticky), whatever its namespace.
    defs = [
        (await save(s, md, "wf-1", {"v": i}, ns="defs", keep_forever=i == 0)).checkpoint
        for i in range(5)
    ]
    assert all(not d.HasField("expires_at") for d in defs[:1])
    # A thread deleted forgets its retention: saved again without the flag, it is pruned.
    await save(s, md, "reborn", {"v": 0}, ns="defs", keep_forever=True)
    await s.DeleteThread(pb.DeleteThreadRequest(namespace="defs", thread_id="reborn"), metadata=md)
    reborn = [
        (await save(s, md, "reborn", {"v": i}, ns="defs")).checkpoint.checkpoint_id
        for i in range(5)
    ]
    # The engine's namespace is no special case: without the flag it is pruned as any other.
    plain = [
        (await save(s, md, "wf-2", {"v": i}, ns="workflows")).checkpoint.checkpoint_id
        for i in range(5)
    ]
    await asyncio.sleep(2.5)  # everything expired; several sweeps ran
    head = await restore(s, md, "active")
    assert head.checkpoint.checkpoint_id == active[-1], "an active head is never pruned"
    remaining = await s.List(pb.ListRequest(namespace=NS, thread_id="active"), metadata=md)
    assert [c.checkpoint_id for c in remaining.checkpoints] == [active[-1]]
    for old in active[:-1]:
        assert (
            await code_of(restore(s, md, "active", checkpoint_id=old)) == grpc.StatusCode.NOT_FOUND
        )
    # A finished thread's head may expire: the thread is gone.
    assert await code_of(restore(s, md, "done")) == grpc.StatusCode.NOT_FOUND
    assert await code_of(restore(s, md, "done", checkpoint_id=done[0])) == grpc.StatusCode.NOT_FOUND
    # A thread kept forever is never pruned, whatever its age or count.
    kept = await s.List(pb.ListRequest(namespace="defs", thread_id="wf-1"), metadata=md)
    assert [c.checkpoint_id for c in kept.checkpoints] == [d.checkpoint_id for d in defs[::-1]]
    pruned = await s.List(pb.ListRequest(namespace="workflows", thread_id="wf-2"), metadata=md)
    assert [c.checkpoint_id for c in pruned.checkpoints] == plain[-1:], "only its head is left"
    again = await s.List(pb.ListRequest(namespace="defs", thread_id="reborn"), metadata=md)
    assert [c.checkpoint_id for c in again.checkpoints] == reborn[-1:]
    await channel.close()


async def test_keep_last_n(service_factory, backend, tenant) -> None:
    svc = service_factory(backend, "--keep-last", "3", "--sweep-interval", "0.3")
    channel, s, md = await checkpoint_stub(svc.address, tenant)
    ids = [(await save(s, md, "k", {"i": i})).checkpoint.checkpoint_id for i in range(8)]
    await asyncio.sleep(1.5)
    listed = await s.List(pb.ListRequest(namespace=NS, thread_id="k"), metadata=md)
    assert [c.checkpoint_id for c in listed.checkpoints] == ids[-3:][::-1]
    await channel.close()


async def test_keep_last_per_thread(service_factory, backend, tenant) -> None:
    """A thread's own keep_last wins over the service's; threads without one follow it."""
    svc = service_factory(backend, "--keep-last", "4", "--sweep-interval", "0.3")
    channel, s, md = await checkpoint_stub(svc.address, tenant)
    own = [
        (await save(s, md, "own", {"i": i}, keep_last=2 if i == 0 else 0)).checkpoint.checkpoint_id
        for i in range(6)
    ]
    default = [(await save(s, md, "default", {"i": i})).checkpoint.checkpoint_id for i in range(6)]
    await asyncio.sleep(1.5)
    listed = await s.List(pb.ListRequest(namespace=NS, thread_id="own"), metadata=md)
    assert [c.checkpoint_id for c in listed.checkpoints] == own[-2:][::-1]
    listed = await s.List(pb.ListRequest(namespace=NS, thread_id="default"), metadata=md)
    assert [c.checkpoint_id for c in listed.checkpoints] == default[-4:][::-1]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await save(s, md, "own", {}, keep_last=-1)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    await channel.close()


@MIGRATIONS_ON_EACH_DATABASE  # Redis has no part in them
async def test_migration_8_marks_the_engines_definitions_kept_forever(backend) -> None:
    """A database from before keep_forever kept the `workflows` namespace by its name; after
    migration 8 its threads are kept by the flag, and no other thread is."""
    from checkpoint_svc.tiers import sql

    tier = sql.SqlTier(backend.db_url)
    try:
        assert await tier.migrate("0007") == "0007"  # the schema before it
        async with tier.writer.begin() as conn:
            for namespace in ("workflows", "runs"):
                await conn.exec_driver_sql(
                    "INSERT INTO threads (tenant, namespace, thread_id, created_at, updated_at)"
                    f" VALUES ('t', '{namespace}', 'x', 0, 0)"
                )
        assert await tier.migrate() == "0008"
        async with tier.reader.connect() as conn:
            rows = await conn.exec_driver_sql(
                "SELECT namespace, keep_forever FROM threads ORDER BY namespace"
            )
            assert [tuple(r) for r in rows] == [("runs", 0), ("workflows", 1)]
    finally:
        await tier.close()


@MIGRATIONS_ON_EACH_DATABASE  # Redis has no part in them
async def test_a_database_migrated_before_alembic_is_stamped_then_upgraded(backend) -> None:
    """Issue 12: migrations with Alembic. A database whose schema the earlier runner made (its
    `schema_migrations` table says 5) is not migrated again from the start: it is stamped at
    5, then 6 to 8 run; and several replicas migrating at once do it once."""
    import asyncio as aio

    from checkpoint_svc.tiers import sql

    tier = sql.SqlTier(backend.db_url)
    try:
        await tier.migrate("0005")
        async with tier.writer.begin() as conn:  # as the earlier runner left it
            await conn.exec_driver_sql("DROP TABLE alembic_version")
            await conn.exec_driver_sql(
                "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY,"
                " applied_at DOUBLE PRECISION NOT NULL)"
            )
            for version in range(1, 6):
                await conn.exec_driver_sql(f"INSERT INTO schema_migrations VALUES ({version}, 0)")
        replicas = [tier, sql.SqlTier(backend.db_url), sql.SqlTier(backend.db_url)]
        try:
            assert await aio.gather(*(r.migrate() for r in replicas)) == ["0008"] * 3
        finally:
            for replica in replicas[1:]:
                await replica.close()
        async with tier.reader.connect() as conn:
            version = await conn.exec_driver_sql("SELECT version_num FROM alembic_version")
            assert [tuple(r) for r in version] == [("0008",)]
            await conn.exec_driver_sql("SELECT keep_forever, keep_last, deleted FROM threads")
    finally:
        await tier.close()


@MIGRATIONS_ON_EACH_DATABASE  # Redis has no part in them
def test_migrate_command_brings_a_database_to_the_newest_revision(backend) -> None:
    """`python -m checkpoint_svc migrate` for operators who migrate before they start: two at
    once on a fresh database both end at the newest revision (they take turns); a database
    it cannot reach is one line and exit 1."""
    import subprocess
    import sys

    from tests.servers import REPO_ROOT, free_port

    def migrate(db: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "checkpoint_svc", "migrate", "--db", db], cwd=REPO_ROOT,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip

    both = [migrate(backend.db_url) for _ in range(2)]
    for done in both:
        out, err = done.communicate(timeout=120)
        assert done.returncode == 0, err
        assert out.strip().endswith("schema at revision 0008 (the newest)"), out
    away = f"postgresql+asyncpg://u:secret@127.0.0.1:{free_port()}/x"
    failed = subprocess.run(
        [sys.executable, "-m", "checkpoint_svc", "migrate", "--db", away],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert failed.returncode == 1
    said = failed.stderr.strip().splitlines()[-1]
    assert said.startswith("python -m checkpoint_svc migrate: postgresql+asyncpg://u:***@")
    assert "secret" not in failed.stderr


@MIGRATIONS_ON_EACH_DATABASE  # Redis has no part in them
async def test_a_database_migrated_by_a_newer_release_is_used_as_it_is(backend) -> None:
    """A rollback, or a rolling upgrade's old replica restarting after a new one migrated:
    a revision this release does not know is not an error (schemas only grow)."""
    from checkpoint_svc.tiers import sql

    tier = sql.SqlTier(backend.db_url)
    try:
        await tier.migrate()
        async with tier.writer.begin() as conn:
            await conn.exec_driver_sql("UPDATE alembic_version SET version_num = '0099'")
        assert await tier.migrate() == "0099"
    finally:
        await tier.close()


@MIGRATIONS_ON_EACH_DATABASE  # Redis has no part in them
async def test_the_declared_tables_are_what_the_migrations_build(backend) -> None:
    """Issue 12: the SQL tier's statements name the Core tables of tiers/schema.py; those
    must be the schema the migrations leave, column by column, type, nullability, keys and
    indexes (Alembic's autogenerate comparison finds nothing to change)."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from checkpoint_svc.tiers import schema, sql

    def ours(obj: object, name: str | None, kind: str, reflected: bool, _to: object) -> bool:
        # Alembic's own table, and the PostgreSQL-only expression index (see schema.py).
        return name not in ("alembic_version", "checkpoints_by_metadata")

    def differences(conn: object) -> list[object]:
        context = MigrationContext.configure(
            conn, opts={"compare_type": True, "include_object": ours}
        )
        return compare_metadata(context, schema.METADATA)

    tier = sql.SqlTier(backend.db_url)
    try:
        await tier.migrate()
        async with tier.reader.connect() as conn:
            assert await conn.run_sync(differences) == []
    finally:
        await tier.close()
