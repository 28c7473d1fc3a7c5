"""Throwaway servers for the benchmarks: PostgreSQL, Redis, checkpoint_svc and engine_svc.

Each one runs on a free loopback port with its files in a temp dir, so a bench run never
touches a developer's own servers, and every one is stopped by the ExitStack that started it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import grpc
import psycopg
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parent.parent
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
]


class ServerError(RuntimeError):
    """A server the bench needs did not come up; the message carries its log tail."""


def free_port() -> int:
    """Pick a free loopback port (the tiny race with another binder is acceptable here)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def log_tail(path: Path, lines: int = 40) -> str:
    """Last lines of a log, to explain why a server died."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _pg_bin_dir() -> Path:
    """Newest installed PostgreSQL's bin dir (Debian keeps them per major version)."""
    dirs = [p for p in Path("/usr/lib/postgresql").glob("*/bin") if (p / "initdb").exists()]
    if not dirs:
        raise ServerError("no PostgreSQL under /usr/lib/postgresql/*/bin")
    return max(dirs, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)


def _as_postgres(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root, so drop to the `postgres` user when we are root."""
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *cmd]
    return cmd


@dataclass
class Postgres:
    """A private PostgreSQL cluster with default durability (fsync and synchronous_commit on).

    `workdir` must be reachable by the `postgres` user: give it its own mkdtemp dir.
    """

    workdir: Path
    port: int = 0
    bin_dir: Path | None = None

    @property
    def url(self) -> str:
        """libpq URL of the maintenance database."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        """initdb and start; only the port, socket dir and connection limit are changed."""
        self.bin_dir = _pg_bin_dir()
        self.workdir.mkdir(parents=True, exist_ok=True)
        data, sock = self.workdir / "data", self.workdir / "sock"
        sock.mkdir(exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.workdir, "postgres")
            shutil.chown(sock, "postgres")
        self.port = free_port()
        log = self.workdir / "postgres.log"
        init = subprocess.run(
            _as_postgres(
                [
                    str(self.bin_dir / "initdb"),
                    "-D",
                    str(data),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "-E",
                    "UTF8",
                    "--locale=C",
                ]
            ),
            check=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        if init.returncode != 0:
            raise ServerError(f"initdb failed:\n{init.stderr.decode(errors='replace')}")
        opts = f"-p {self.port} -k {sock} -c listen_addresses=127.0.0.1 -c max_connections=200"
        proc = subprocess.run(
            _as_postgres(
                [
                    str(self.bin_dir / "pg_ctl"),
                    "-D",
                    str(data),
                    "-l",
                    str(log),
                    "-o",
                    opts,
                    "-w",
                    "-t",
                    "60",
                    "start",
                ]
            ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            check=False,
        )
        if proc.returncode != 0:
            raise ServerError(f"pg_ctl start failed:\n{proc.stderr.decode()}\n{log_tail(log)}")

    def stop(self) -> None:
        """Fast shutdown; the temp dir is removed by the caller."""
        if self.bin_dir is None:
            return
        subprocess.run(
            _as_postgres(
                [
                    str(self.bin_dir / "pg_ctl"),
                    "-D",
                    str(self.workdir / "data"),
                    "-m",
                    "fast",
                    "-w",
                    "-t",
                    "60",
                    "stop",
                ]
            ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
        )
        self.bin_dir = None


def _stop_process(proc: subprocess.Popen[bytes], grace: float = 15.0) -> None:
    """SIGTERM (a graceful shutdown flushes), then SIGKILL if it hangs."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


@dataclass
class Redis:
    """A private Redis with persistence off (the service treats Redis as a cache tier)."""

    workdir: Path
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """redis-py URL."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start and wait until it accepts a PING."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        log = self.workdir / "redis.log"
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [
                    "/usr/bin/redis-server",
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(self.workdir),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"redis-server exited:\n{log_tail(log)}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=1) as s,
            ):
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return
            time.sleep(0.05)
        raise ServerError(f"redis-server did not answer PING:\n{log_tail(log)}")

    def stop(self) -> None:
        """Stop the process we started."""
        if self.proc is not None:
            _stop_process(self.proc)
            self.proc = None


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


@dataclass
class CheckpointService:
    """One `python -m checkpoint_svc` subprocess."""

    name: str
    db_url: str
    redis_url: str | None
    single_writer: bool | None  # None: leave it to the service's default (auto)
    workdir: Path
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    metrics_port: int = 0  # serve Prometheus metrics there (0: off)

    @property
    def target(self) -> str:
        """gRPC target."""
        return f"127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        """Where its stdout and stderr go."""
        return self.workdir / f"checkpoint_svc-{self.name}.log"

    def command(self) -> list[str]:
        """The documented CLI."""
        cmd = [
            sys.executable,
            "-m",
            "checkpoint_svc",
            "--listen",
            self.target,
            "--db",
            asyncpg_url(self.db_url),
        ]
        if self.single_writer is not None:
            cmd += ["--single-writer", "yes" if self.single_writer else "no"]
        if self.redis_url:
            cmd += ["--redis", self.redis_url]
        if self.metrics_port:
            cmd += ["--metrics-port", str(self.metrics_port)]
        return cmd

    def start(self, timeout: float = 60.0) -> None:
        """Start and wait for grpc.health.v1 SERVING."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc = _spawn(self.command(), self.log)
        _wait_serving(
            self.proc, self.target, f"checkpoint_svc[{self.name}]", self.log, timeout, self.stop
        )

    def stop(self) -> None:
        """Graceful stop of the process we started."""
        if self.proc is not None:
            _stop_process(self.proc)
            self.proc = None


@dataclass
class EngineService:
    """One `python -m engine_svc` subprocess, with its defaults except the two addresses."""

    checkpoint_target: str
    workdir: Path
    extra_args: tuple[str, ...] = ()  # more of the documented flags
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        """gRPC target."""
        return f"127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        """Where its stdout and stderr go."""
        return self.workdir / "engine_svc.log"

    def command(self) -> list[str]:
        """The documented CLI."""
        return [
            sys.executable,
            "-m",
            "engine_svc",
            "--listen",
            self.target,
            "--checkpoint",
            self.checkpoint_target,
            *self.extra_args,
        ]

    def start(self, timeout: float = 60.0) -> None:
        """Start and wait for grpc.health.v1 SERVING."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc = _spawn(self.command(), self.log)
        _wait_serving(self.proc, self.target, "engine_svc", self.log, timeout, self.stop)

    def stop(self) -> None:
        """Graceful stop of the process we started."""
        if self.proc is not None:
            _stop_process(self.proc)
            self.proc = None


def _spawn(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
    """Start a service from the repo root, its output in `log`, in its own session."""
    with log.open("wb") as out:
        return subprocess.Popen(
            cmd, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def _wait_serving(
    proc: subprocess.Popen[bytes],
    target: str,
    what: str,
    log: Path,
    timeout: float,
    stop: Callable[[], None],
) -> None:
    """Poll grpc.health.v1 until SERVING; on death or timeout stop it and raise with its log."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise ServerError(f"{what} exited with {proc.returncode}:\n{log_tail(log)}")
            try:
                resp = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError as exc:
                last = f"{exc.code().name}: {exc.details()}"
            time.sleep(0.1)
    stop()
    raise ServerError(f"{what} not SERVING after {timeout:.0f}s ({last}):\n{log_tail(log)}")
