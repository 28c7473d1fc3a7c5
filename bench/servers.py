"""Throwaway servers for the benchmarks: PostgreSQL, Redis, checkpoint_svc and engine_svc,
started by the same code as the tests' (tests/servers.py): each on a free loopback port with
its files in a temp dir, PostgreSQL durable as in production (fsync and synchronous_commit
on), every one stopped by the ExitStack that started it. What is the benches' own: libpq URLs
for the peers (psycopg), and the settings printed beside the figures.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg

from tests.servers import (
    REPO_ROOT,
    CheckpointServiceProcess,
    EngineServiceProcess,
    PostgresServer,
    RedisServer,
    free_port,
)

__all__ = [
    "GRPC_OPTIONS",
    "REPO_ROOT",
    "CheckpointService",
    "EngineService",
    "Postgres",
    "Redis",
    "ServerError",
    "create_database",
    "drop_database",
    "free_port",
    "pg_settings",
]

GRPC_OPTIONS = [
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
]


class ServerError(RuntimeError):
    """A server the bench needs did not come up; the message carries its log tail."""


class Postgres:
    """The tests' PostgreSQL cluster, as the benches use it: by its libpq URL."""

    def __init__(self) -> None:
        self.server = PostgresServer()

    @property
    def url(self) -> str:
        """libpq URL of the maintenance database."""
        return self.server.plain_url("postgres")

    @property
    def postmaster_pid_file(self) -> Path:
        return self.server.data_dir / "postmaster.pid"

    def start(self) -> None:
        self.server.start()

    def stop(self) -> None:
        """Stop it and remove its files."""
        self.server.close()


# The tests' Redis, persistence off (the service treats Redis as a cache tier); close()
# stops it and removes its files.
Redis = RedisServer


def database_url(base_url: str, dbname: str) -> str:
    """Same server and user as base_url, another database."""
    parts = urlsplit(base_url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + dbname, parts.query, parts.fragment))


def asyncpg_url(libpq_url: str) -> str:
    """SQLAlchemy spelling of a libpq URL, as checkpoint_svc's --db wants."""
    parts = urlsplit(libpq_url)
    return urlunsplit(("postgresql+asyncpg", *parts[1:]))


def create_database(admin_url: str, dbname: str) -> str:
    """(Re)create an empty database and return its libpq URL."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{dbname}"')
    return database_url(admin_url, dbname)


def drop_database(admin_url: str, dbname: str) -> None:
    """Remove a database we created on a server we did not start."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')


def pg_settings(url: str) -> dict[str, str]:
    """The settings that decide whether the comparison is fair, printed with the figures."""
    names = [
        "server_version",
        "fsync",
        "synchronous_commit",
        "wal_sync_method",
        "full_page_writes",
        "shared_buffers",
        "max_connections",
    ]
    out: dict[str, str] = {}
    with psycopg.connect(url, autocommit=True) as conn:
        for name in names:
            row = conn.execute(f"SHOW {name}").fetchone()
            out[name] = str(row[0]) if row else "?"
    return out


class _AsTheBenchesCallIt:
    """A service process by the benches' names: its target, ServerError, stop()."""

    address: str

    @property
    def target(self) -> str:
        """gRPC target."""
        return self.address

    def start(self, timeout: float = 60.0, *, require_serving: bool = True) -> None:
        try:
            super().start(timeout, require_serving=require_serving)  # type: ignore[misc]
        except RuntimeError as exc:
            raise ServerError(str(exc)) from exc

    def stop(self) -> None:
        """Graceful stop (a graceful shutdown flushes)."""
        self.terminate()  # type: ignore[attr-defined]


class CheckpointService(_AsTheBenchesCallIt, CheckpointServiceProcess):
    """One `python -m checkpoint_svc`, on a libpq URL, with the documented flags."""

    def __init__(
        self,
        name: str,
        db_url: str,
        redis_url: str | None,
        single_writer: bool | None,  # None: leave it to the service's default (auto)
        workdir: Path,
        metrics_port: int = 0,  # serve Prometheus metrics there (0: off)
    ) -> None:
        extra = []
        if single_writer is not None:
            extra += ["--single-writer", "yes" if single_writer else "no"]
        if metrics_port:
            extra += ["--metrics-port", str(metrics_port)]
        super().__init__(asyncpg_url(db_url), redis_url, log_dir=workdir, extra_args=extra)
        self.name = name
        self.metrics_port = metrics_port


class EngineService(_AsTheBenchesCallIt, EngineServiceProcess):
    """One `python -m engine_svc`, with its defaults except the two addresses."""

    def __init__(
        self, checkpoint_target: str, workdir: Path, extra_args: tuple[str, ...] = ()
    ) -> None:
        super().__init__(checkpoint_target, log_dir=workdir, extra_args=extra_args)
