"""Tests of the test infrastructure itself: real Redis, real PostgreSQL, process wrappers."""

from __future__ import annotations

import socket
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import asyncpg
import grpc
import pytest
import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2

from tests.conftest import Backend
from tests.servers import (
    CheckpointServiceProcess,
    PostgresServer,
    RedisServer,
    checkpoint_stub,
    free_port,
)


def test_free_port_is_bindable() -> None:
    port = free_port()
    assert 1024 <= port <= 65535
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


async def test_redis_answers_stops_and_restarts_on_the_same_port(
    redis_server: RedisServer,
) -> None:
    assert redis_server.running
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"
    client = aioredis.from_url(redis_server.url)
    try:
        assert await client.ping()
        await client.set("k", "v")
        assert await client.get("k") == b"v"

        port = redis_server.port
        await redis_server.astop()
        assert not redis_server.running
        assert not redis_server.ping()
        with pytest.raises(aioredis.ConnectionError):
            await client.ping()

        await redis_server.astart()
        assert redis_server.running and redis_server.port == port
        assert await client.ping()  # the same client reconnects
        assert await client.get("k") is None  # no persistence
    finally:
        await client.aclose()


async def test_postgres_create_database_and_select(postgres_server: PostgresServer) -> None:
    url = postgres_server.create_database("infra_select")
    assert url == f"postgresql+asyncpg://postgres@127.0.0.1:{postgres_server.port}/infra_select"
    plain = postgres_server.plain_url("infra_select")
    assert plain == f"postgresql://postgres@127.0.0.1:{postgres_server.port}/infra_select"

    conn = await asyncpg.connect(plain)
    try:
        assert await conn.fetchval("SELECT 1") == 1
        assert await conn.fetchval("SELECT current_database()") == "infra_select"
        assert await conn.fetchval("SHOW fsync") == "on"  # durable: see PostgresServer
        assert await conn.fetchval("SHOW synchronous_commit") == "on"
        assert await conn.fetchval("SHOW max_connections") == "300"
    finally:
        await conn.close()
    postgres_server.drop_database("infra_select")


async def test_postgres_url_works_with_sqlalchemy(postgres_server: PostgresServer) -> None:
    pytest.importorskip("greenlet", reason="sqlalchemy[asyncio] needs greenlet")
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(postgres_server.create_database("infra_sqlalchemy"))
    try:
        async with engine.connect() as conn:
            assert (await conn.execute(text("SELECT 1"))).scalar() == 1
    finally:
        await engine.dispose()
    postgres_server.drop_database("infra_sqlalchemy")


async def test_postgres_restart_keeps_data(postgres_server: PostgresServer) -> None:
    postgres_server.create_database("infra_restart")
    plain = postgres_server.plain_url("infra_restart")
    conn = await asyncpg.connect(plain)
    await conn.execute("CREATE TABLE t (x int); INSERT INTO t VALUES (42)")

    port = postgres_server.port
    await postgres_server.arestart()
    assert postgres_server.running and postgres_server.port == port
    with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, OSError)):
        await conn.fetchval("SELECT 1")  # the old session was cut
    conn.terminate()

    conn = await asyncpg.connect(plain)
    try:
        assert await conn.fetchval("SELECT x FROM t") == 42
    finally:
        await conn.close()

    # A crash (SIGKILL of postmaster and backends) also keeps committed data.
    postgres_server.kill()
    assert not postgres_server.running
    with pytest.raises(OSError):
        await asyncpg.connect(plain, timeout=2)
    await postgres_server.astart()
    conn = await asyncpg.connect(plain)
    try:
        assert await conn.fetchval("SELECT x FROM t") == 42
    finally:
        await conn.close()
    postgres_server.drop_database("infra_restart")


async def test_backend_fixture(backend: Backend, tmp_path: Path) -> None:
    if backend.name == "sqlite":
        assert backend.db_url == f"sqlite+aiosqlite:///{tmp_path}/store.db"
        assert backend.redis_url is None
        return
    assert backend.db_url.startswith("postgresql+asyncpg://postgres@127.0.0.1:")
    conn = await asyncpg.connect(backend.db_url.replace("postgresql+asyncpg", "postgresql"))
    try:
        assert (await conn.fetchval("SELECT current_database()")).startswith("test_")
    finally:
        await conn.close()
    if backend.name == "postgres+redis":
        assert backend.redis_url is not None
        client = aioredis.from_url(backend.redis_url)
        try:
            assert await client.ping()
        finally:
            await client.aclose()
    else:
        assert backend.redis_url is None


def test_tenant_fixture(tenant: str) -> None:
    assert tenant.startswith("t-") and len(tenant) == 14


# A stand-in for checkpoint_svc with the same command line, serving only gRPC health, to test
# CheckpointServiceProcess without depending on the real service.
FAKE_SERVICE = textwrap.dedent(
    """
    import argparse, signal, sys, time
    from concurrent import futures
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", required=True)
    parser.add_argument("--db", required=True)
    parser.add_argument("--redis")
    parser.add_argument("--exit-early", action="store_true")
    parser.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args()
    print("fake: args", sys.argv[1:])
    if args.exit_early:
        print("fake: refusing to start")
        sys.exit(3)
    time.sleep(args.delay)
    server = grpc.server(futures.ThreadPoolExecutor(4))
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_insecure_port(args.listen)
    server.start()
    print("fake: serving on", args.listen)

    def on_term(*_):
        print("fake: SIGTERM")
        server.stop(0)

    signal.signal(signal.SIGTERM, on_term)
    server.wait_for_termination()
    """
)


FakeFactory = Callable[..., CheckpointServiceProcess]


@pytest.fixture
def fake_service(tmp_path: Path) -> Iterator[FakeFactory]:
    """Build CheckpointServiceProcess objects that run FAKE_SERVICE instead of checkpoint_svc."""
    (tmp_path / "fake_svc.py").write_text(FAKE_SERVICE)
    made: list[CheckpointServiceProcess] = []

    def make(
        db_url: str, redis_url: str | None = None, *extra_args: str
    ) -> CheckpointServiceProcess:
        proc = CheckpointServiceProcess(
            db_url, redis_url, log_dir=tmp_path, extra_args=extra_args, module="fake_svc",
            env={"PYTHONPATH": str(tmp_path)},
        )  # fmt: skip
        made.append(proc)
        return proc

    yield make
    for proc in made:
        proc.kill()


async def test_service_process_lifecycle(fake_service: FakeFactory) -> None:
    proc = fake_service("sqlite+aiosqlite:///x.db", "redis://127.0.0.1:1/0", "--delay", "0.5")
    try:
        await proc.astart(timeout=30)
        assert proc.running
        assert proc.address == f"127.0.0.1:{proc.port}"
        assert proc.health() == health_pb2.HealthCheckResponse.SERVING
        assert "--redis', 'redis://127.0.0.1:1/0'" in proc.log_tail(20)

        port, pid = proc.port, proc.pid
        await proc.arestart()
        assert proc.running and proc.port == port and proc.pid != pid
        assert "fake: SIGTERM" in proc.log_tail(20)

        channel, _stub, metadata = await checkpoint_stub(proc.address, "t-x")
        try:
            await channel.channel_ready()
            assert metadata == (("x-tenant-id", "t-x"),)
        finally:
            await channel.close()

        await proc.akill()
        assert not proc.running and proc.returncode == -9
        assert proc.health(timeout=0.2) is None
        await proc.astart()
        assert proc.health() == health_pb2.HealthCheckResponse.SERVING
        assert await proc.aterminate() == 0
        assert not proc.running
    finally:
        await proc.akill()


def test_service_process_early_exit_reports_log(fake_service: FakeFactory) -> None:
    proc = fake_service("sqlite+aiosqlite:///x.db", None, "--exit-early")
    with pytest.raises(RuntimeError, match="refusing to start"):
        proc.start(timeout=30)
    assert not proc.running and proc.returncode == 3
    assert "--redis" not in proc.command


def test_service_process_start_timeout(fake_service: FakeFactory) -> None:
    proc = fake_service("sqlite+aiosqlite:///x.db", None, "--delay", "30")
    with pytest.raises(RuntimeError, match="not SERVING"):
        proc.start(timeout=1.5)
    assert not proc.running


def test_grpc_is_importable_for_stubs() -> None:
    from workflow_stubs.checkpoint.v1 import checkpoint_pb2_grpc

    assert hasattr(checkpoint_pb2_grpc, "CheckpointServiceStub")
    assert grpc.__version__
