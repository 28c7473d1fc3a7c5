"""Session infrastructure: real Redis and PostgreSQL servers and checkpoint service processes.

Fixtures
--------
- ``redis_server`` / ``postgres_server`` (session): started lazily, on first use, stopped at the
  end of the session. A test that stops one must not restart it for the others: the
  ``backend`` fixture starts them again if a previous test left them stopped.
- ``backend`` (function, parametrized "sqlite", "postgres", "postgres+redis"): a ``Backend``
  with a fresh store (a SQLite file in tmp_path, or a new PostgreSQL database, created when
  ``db_url`` is first read: a test on the shared service creates none).
- ``tenant``: a unique tenant id; tests isolate themselves by tenant (Redis is shared).
- ``service_factory``: ``(backend, *extra_args, start=True, timeout=30.0, port=None,
  env=None, in_process=False) -> CheckpointServiceProcess`` (an InProcessCheckpointService
  with ``in_process``); everything it started is terminated at teardown.
- ``console_factory``: ``(engine, *extra_args) -> ConsoleProcess``: the web console as a
  process of its own, terminated at teardown.
- ``service``: one started service on ``backend``, the test's own, in this process (a thread
  of its own): for tests that neither kill nor signal it.
- ``service_process``: the same as a process of its own, for crashes, SIGTERM and restarts.
- ``shared_service``: a default service on ``backend``'s kind, shared by the session's tests
  (of one xdist worker) that isolate themselves by tenant; started again if a test left it,
  PostgreSQL or Redis stopped or restarted.
- ``stub``: ``(CheckpointServiceStub, metadata)`` for ``shared_service`` and ``tenant``.
- ``store``: the real ``CheckpointStore`` on ``backend``, called in-process.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import AsyncIterator, Callable, Generator, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import grpc
import pytest

from tests.servers import (
    CheckpointServiceProcess,
    ConsoleProcess,
    EngineServiceProcess,
    InProcessCheckpointService,
    Metadata,
    PostgresServer,
    RedisServer,
    checkpoint_stub,
    running_store,
)

if TYPE_CHECKING:
    from checkpoint_svc.store import CheckpointStore
    from workflow_stubs.checkpoint.v1 import checkpoint_pb2_grpc

BACKENDS = ("sqlite", "postgres", "postgres+redis")


class Backend:
    """Where a checkpoint service keeps its state."""

    def __init__(
        self, name: str, db_url: str | Callable[[], str], redis_url: str | None = None
    ) -> None:
        self.name = name
        self._db_url = db_url
        self.redis_url = redis_url

    def __repr__(self) -> str:
        return f"Backend({self.name!r})"

    @functools.cached_property
    def db_url(self) -> str:
        """The SQLAlchemy URL (a PostgreSQL database is created on first use)."""
        return self._db_url() if callable(self._db_url) else self._db_url


ServiceFactory = Callable[..., CheckpointServiceProcess]

_SERVICES = pytest.StashKey[list[CheckpointServiceProcess]]()  # engines too (a subclass)
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

    def create() -> str:
        dbname = f"test_{uuid.uuid4().hex[:16]}"
        db_url = postgres.create_database(dbname)
        # Dropped after every fixture of the test is torn down (see pytest_runtest_teardown),
        # so that services still connected to it are gone by then.
        request.node.stash.setdefault(_DATABASES, []).append((postgres, dbname))
        return db_url

    redis_url = None
    if name == "postgres+redis":
        redis: RedisServer = request.getfixturevalue("redis_server")
        redis.start()
        redis_url = redis.url
    return Backend(name, create, redis_url)


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
        in_process: bool = False,
        probe_credentials: grpc.ChannelCredentials | None = None,
    ) -> CheckpointServiceProcess:
        proc: CheckpointServiceProcess
        if in_process:
            assert env is None, "a service in this process has this process's environment"
            proc = InProcessCheckpointService(  # type: ignore[assignment]
                backend.db_url,
                backend.redis_url,
                extra_args=extra_args,
                port=port,
                probe_credentials=probe_credentials,
            )
        else:
            proc = CheckpointServiceProcess(
                backend.db_url,
                backend.redis_url,
                log_dir=tmp_path,
                extra_args=extra_args,
                port=port,
                env=env,
                probe_credentials=probe_credentials,
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
def engine_factory(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Callable[..., EngineServiceProcess]]:
    """Start engines against a checkpoint service; all are terminated at teardown (and
    their logs are in a failed test's report)."""
    started: list[EngineServiceProcess] = []

    def factory(
        checkpoint: CheckpointServiceProcess,
        *extra_args: str,
        env: Mapping[str, str] | None = None,
        probe_credentials: grpc.ChannelCredentials | None = None,
    ) -> EngineServiceProcess:
        proc = EngineServiceProcess(
            checkpoint.address,
            log_dir=tmp_path,
            extra_args=extra_args,
            env=env,
            probe_credentials=probe_credentials,
        )
        return _started(request, started, proc)

    try:
        yield factory
    finally:
        _terminate(started)


P = TypeVar("P", bound=CheckpointServiceProcess)


def _started(request: pytest.FixtureRequest, started: list, proc: P) -> P:
    """Start a fixture's process, kept for its teardown (and its log for the report)."""
    started.append(proc)
    request.node.stash.setdefault(_SERVICES, []).append(proc)
    proc.start()
    return proc


def _terminate(started: list[CheckpointServiceProcess]) -> None:
    for proc in reversed(started):
        proc.terminate()


@pytest.fixture
def console_factory(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Callable[..., ConsoleProcess]]:
    """Start web consoles against an engine; all are terminated at teardown."""
    started: list[ConsoleProcess] = []

    def factory(engine: EngineServiceProcess, *extra_args: str) -> ConsoleProcess:
        proc = ConsoleProcess(engine.address, log_dir=tmp_path, extra_args=extra_args)
        return _started(request, started, proc)

    try:
        yield factory
    finally:
        _terminate(started)


@pytest.fixture
def service(service_factory: ServiceFactory, backend: Backend) -> CheckpointServiceProcess:
    """One checkpoint service of the test's own, started on ``backend``, in this process."""
    return service_factory(backend, in_process=True)


@pytest.fixture
def service_process(service_factory: ServiceFactory, backend: Backend) -> CheckpointServiceProcess:
    """One checkpoint service of the test's own, started on ``backend``, as a process: to
    kill, signal or restart."""
    return service_factory(backend)


class SharedServices:
    """One default checkpoint service per backend kind, for the tests that need nothing of
    their own: they isolate by tenant, and save a service start and a database each."""

    def __init__(self, log_dir: Path, postgres: PostgresServer, redis: RedisServer) -> None:
        self.log_dir = log_dir
        self.postgres = postgres
        self.redis = redis
        self._running: dict[str, tuple[CheckpointServiceProcess, tuple[int, ...]]] = {}

    def get(self, backend: Backend) -> CheckpointServiceProcess:
        postgres = self.postgres
        starts = (postgres.starts, self.redis.starts)
        if backend.name in self._running:
            proc, seen = self._running[backend.name]
            if proc.running and seen == starts:
                return proc
            proc.terminate()
        db_url = (
            f"sqlite+aiosqlite:///{self.log_dir}/shared-{uuid.uuid4().hex[:8]}.db"
            if backend.name == "sqlite"
            else postgres.create_database(f"shared_{uuid.uuid4().hex[:16]}")
        )
        proc = CheckpointServiceProcess(db_url, backend.redis_url, log_dir=self.log_dir)
        proc.start()
        self._running[backend.name] = (proc, starts)
        return proc

    def close(self) -> None:
        for proc, _ in self._running.values():
            proc.terminate()


@pytest.fixture(scope="session")
def shared_services(
    tmp_path_factory: pytest.TempPathFactory,
    postgres_server: PostgresServer,
    redis_server: RedisServer,
) -> Iterator[SharedServices]:
    """Set up after PostgreSQL and Redis, so torn down before them: the services stop
    gracefully (and write their coverage data) while their databases are still there."""
    services = SharedServices(tmp_path_factory.mktemp("shared"), postgres_server, redis_server)
    try:
        yield services
    finally:
        services.close()


@pytest.fixture
def shared_service(
    request: pytest.FixtureRequest, backend: Backend, shared_services: SharedServices
) -> CheckpointServiceProcess:
    """A default checkpoint service of ``backend``'s kind, shared with other tests."""
    proc = shared_services.get(backend)
    request.node.stash.setdefault(_SERVICES, []).append(proc)  # its log, if the test fails
    return proc


@pytest.fixture
async def stub(
    shared_service: CheckpointServiceProcess, tenant: str
) -> AsyncIterator[tuple[checkpoint_pb2_grpc.CheckpointServiceStub, Metadata]]:
    """An async CheckpointService stub for ``shared_service`` and the metadata naming
    ``tenant``."""
    channel, checkpoint, metadata = await checkpoint_stub(shared_service.address, tenant)
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
    async with running_store(backend.db_url, backend.redis_url, heartbeat=0.5) as store:
        yield store


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Where the console tests' screenshots are, if they took any."""
    from tests.test_console import ARTIFACTS

    if ARTIFACTS.is_dir() and any(ARTIFACTS.iterdir()):
        terminalreporter.write_line(f"console screenshots: {ARTIFACTS}")
