"""Session infrastructure: real Redis and PostgreSQL servers and checkpoint service processes.

Fixtures
--------
- ``redis_server`` / ``postgres_server`` (session): started lazily, on first use, stopped at the
  end of the session. A test that stops one must not restart it for the others: the
  ``backend`` fixture starts them again if a previous test left them stopped.
- ``backend`` (function, parametrized "sqlite", "postgres", "postgres+redis"): a ``Backend``
  with a fresh store (a SQLite file in tmp_path, or a new PostgreSQL database).
- ``tenant``: a unique tenant id; tests isolate themselves by tenant (Redis is shared).
- ``service_factory``: ``(backend, *extra_args, start=True, timeout=30.0, port=None,
  env=None) -> CheckpointServiceProcess``; everything it started is terminated at teardown.
- ``service``: one started service on ``backend``.
- ``stub``: ``(CheckpointServiceStub, metadata)`` for ``service`` and ``tenant``.
- ``store``: the real ``CheckpointStore`` on ``backend``, called in-process.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Generator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.servers import (
    CheckpointServiceProcess,
    EngineServiceProcess,
    Metadata,
    PostgresServer,
    RedisServer,
    checkpoint_stub,
)

if TYPE_CHECKING:
    from checkpoint_svc.store import CheckpointStore
    from workflow_stubs.checkpoint.v1 import checkpoint_pb2_grpc

BACKENDS = ("sqlite", "postgres", "postgres+redis")


@dataclass(frozen=True)
class Backend:
    """Where a checkpoint service keeps its state."""

    name: str
    db_url: str
    redis_url: str | None = None


ServiceFactory = Callable[..., CheckpointServiceProcess]

_SERVICES = pytest.StashKey[list[CheckpointServiceProcess]]()
_DATABASES = pytest.StashKey[list[tuple[PostgresServer, str]]]()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """The session's Redis (started on first use)."""
    server = RedisServer()
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """The session's PostgreSQL cluster (started on first use)."""
    server = PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """A fresh store on each backend: SQLite file, PostgreSQL, PostgreSQL + Redis."""
    name: str = request.param
    if name == "sqlite":
        return Backend(name, f"sqlite+aiosqlite:///{tmp_path}/store.db")
    postgres: PostgresServer = request.getfixturevalue("postgres_server")
    postgres.start()  # no-op unless an earlier test left it stopped
    dbname = f"test_{uuid.uuid4().hex[:16]}"
    db_url = postgres.create_database(dbname)
    # Dropped after every fixture of the test is torn down (see pytest_runtest_teardown), so
    # that services still connected to it are gone by then.
    request.node.stash.setdefault(_DATABASES, []).append((postgres, dbname))
    redis_url = None
    if name == "postgres+redis":
        redis: RedisServer = request.getfixturevalue("redis_server")
        redis.start()
        redis_url = redis.url
    return Backend(name, db_url, redis_url)


@pytest.fixture
def tenant() -> str:
    """A tenant id unique to this test."""
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def service_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ServiceFactory]:
    """Start checkpoint services; all of them are terminated at teardown."""
    started: list[CheckpointServiceProcess] = []
    request.node.stash.setdefault(_SERVICES, [])

    def factory(
        backend: Backend,
        *extra_args: str,
        start: bool = True,
        timeout: float = 30.0,
        port: int | None = None,
        env: Mapping[str, str] | None = None,
    ) -> CheckpointServiceProcess:
        proc = CheckpointServiceProcess(
            backend.db_url,
            backend.redis_url,
            log_dir=tmp_path,
            extra_args=extra_args,
            port=port,
            env=env,
        )
        started.append(proc)
        request.node.stash[_SERVICES].append(proc)
        if start:
            proc.start(timeout)
        return proc

    try:
        yield factory
    finally:
        for proc in reversed(started):
            proc.terminate()


@pytest.fixture
def engine_factory(tmp_path: Path) -> Iterator[Callable[..., EngineServiceProcess]]:
    """Start engines against a checkpoint service; all are terminated at teardown."""
    started: list[EngineServiceProcess] = []

    def factory(
        checkpoint: CheckpointServiceProcess,
        *extra_args: str,
        env: Mapping[str, str] | None = None,
    ) -> EngineServiceProcess:
        proc = EngineServiceProcess(
            checkpoint.address, log_dir=tmp_path, extra_args=extra_args, env=env
        )
        started.append(proc)
        proc.start()
        return proc

    try:
        yield factory
    finally:
        for proc in reversed(started):
            proc.terminate()


@pytest.fixture
def service(service_factory: ServiceFactory, backend: Backend) -> CheckpointServiceProcess:
    """One checkpoint service, started on ``backend``."""
    return service_factory(backend)


@pytest.fixture
async def stub(
    service: CheckpointServiceProcess, tenant: str
) -> AsyncIterator[tuple[checkpoint_pb2_grpc.CheckpointServiceStub, Metadata]]:
    """An async CheckpointService stub for ``service`` and the metadata naming ``tenant``."""
    channel, checkpoint, metadata = await checkpoint_stub(service.address, tenant)
    try:
        yield checkpoint, metadata
    finally:
        await channel.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Attach the tail of each service's log to a failed test's report."""
    report = yield
    if report.failed:
        for proc in item.stash.get(_SERVICES, []):
            report.sections.append((f"{proc.module} {proc.address} log", proc.log_tail(80)))
    return report


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(
    item: pytest.Item, nextitem: pytest.Item | None
) -> Generator[None, None, None]:
    """After all the test's fixtures are gone, drop the databases it created."""
    try:
        return (yield)
    finally:
        for postgres, dbname in item.stash.get(_DATABASES, []):
            if postgres.running:
                try:
                    postgres.drop_database(dbname)
                except RuntimeError as exc:
                    item.add_report_section("teardown", "drop database", str(exc))


@pytest.fixture
async def store(backend: Backend) -> AsyncIterator[CheckpointStore]:
    """The real ``CheckpointStore``, in this process, on ``backend`` (no gRPC in between)."""
    from checkpoint_svc.config import Settings
    from checkpoint_svc.store import CheckpointStore

    settings = Settings(db_url=backend.db_url, redis_url=backend.redis_url)
    settings.sweep_interval = 0
    settings.heartbeat = 0.5
    store = CheckpointStore(settings)
    await store.start()
    try:
        yield store
    finally:
        await store.close()
