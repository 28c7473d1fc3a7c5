"""Real servers for the test session: Redis, PostgreSQL and the checkpoint service.

Plain classes, no pytest here. Every process is started in its own session (so a Ctrl-C in
the terminal reaches pytest only, and the fixtures stop the servers in order) and is stopped
three ways, from the most to the least graceful:

1. by its owner (a fixture's teardown: ``stop()`` / ``terminate()``);
2. by an ``atexit`` hook, for whatever is still running when the interpreter exits;
3. by a tiny "reaper" subprocess that holds a pipe from this interpreter and kills every
   process still registered once that pipe closes, i.e. when this interpreter dies in any way
   (SIGKILL, ``os._exit`` as used by pytest-timeout's thread method, a CI runner's SIGTERM).

Blocking methods have ``a``-prefixed twins (``astart``, ``astop``, ...) that run them in a
thread, so async tests keep their event loop (and open streams) going meanwhile; their
``timeout`` bounds that blocking call, hence the ``noqa: ASYNC109``.
"""

from __future__ import annotations

import asyncio
import atexit
import collections.abc
import contextlib
import glob
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

if TYPE_CHECKING:
    from workflow_stubs.checkpoint.v1 import checkpoint_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parent.parent
"""The repository root: the working directory of the service subprocess."""

Metadata = tuple[tuple[str, str], ...]

# Channel options for talking to local test servers: reconnect fast after a restart, and never
# route loopback traffic through an http proxy configured in the environment.
GRPC_TEST_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.enable_http_proxy", 0),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


def stream_watchers(metrics_port: int) -> float:
    """Open Stream calls on a checkpoint service, as its /metrics says."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return float(re.search(r"^checkpoint_stream_watchers (\S+)$", text, re.M).group(1))


@contextlib.asynccontextmanager
async def running_store(
    db_url: str, redis_url: str | None, **settings: Any
) -> collections.abc.AsyncIterator[Any]:
    """The real ``CheckpointStore`` in this process (no gRPC in between), on these databases,
    with its sweeper off unless `settings` say otherwise; closed after."""
    from checkpoint_svc.config import Settings
    from checkpoint_svc.store import CheckpointStore

    config = Settings(db_url=db_url, redis_url=redis_url, **{"sweep_interval": 0, **settings})
    store = CheckpointStore(config)
    await store.start()
    try:
        yield store
    finally:
        await store.close()


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tail(path: Path, n: int) -> str:
    """The last ``n`` lines of a text file ("" if it does not exist)."""
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-n:])


def _killpg(pid: int, sig: int) -> None:
    """Send ``sig`` to the process group led by ``pid`` (or to ``pid``), ignoring dead ones."""
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    except PermissionError:
        pass


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state first), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].decode().split()
    except (OSError, IndexError):
        return None


def _children(pid: int) -> list[int]:
    """Pids of the direct children of ``pid`` (Linux /proc; empty elsewhere)."""
    found = []
    for entry in glob.glob("/proc/[0-9]*"):
        stat = _proc_stat(int(entry[6:]))
        if stat is not None and len(stat) > 1 and stat[1] == str(pid):
            found.append(int(entry[6:]))
    return found


def _alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    stat = _proc_stat(pid)
    return stat is not None and stat[0] != "Z"


def _wait(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """Wait for ``proc`` to exit; True if it did within ``timeout`` seconds."""
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return False
    return True


# --------------------------------------------------------------------------------------------
# Last-resort cleanup: atexit hook and reaper subprocess.

_REAPER_SOURCE = r"""
import os, shutil, signal, sys, time

def start_time(pid):
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None

pids, dirs = {}, set()
for line in sys.stdin:
    cmd, _, arg = line.strip().partition(" ")
    if cmd == "add":
        pid, sig = (int(x) for x in arg.split())
        pids[pid] = (sig, start_time(pid))
    elif cmd == "del":
        pids.pop(int(arg), None)
    elif cmd == "dir":
        dirs.add(arg)
    elif cmd == "undir":
        dirs.discard(arg)

# The test process is gone: stop what it left behind.
alive = {}
for pid, (sig, started) in pids.items():
    now = start_time(pid)
    if started is not None and now is not None and now != started:
        continue  # the pid was reused by an unrelated process
    alive[pid] = now
    try:
        os.kill(pid, sig)
    except OSError:
        pass
deadline = time.monotonic() + 5
while alive and time.monotonic() < deadline:
    alive = {p: s for p, s in alive.items() if start_time(p) is not None}
    time.sleep(0.1)
for pid in pids:
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass
time.sleep(0.2)
for d in dirs:
    shutil.rmtree(d, ignore_errors=True)
"""


class _Reaper:
    """Kills registered process groups and removes directories if this interpreter dies."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None

    def _send(self, line: str) -> None:
        with self._lock:
            if self._proc is None:
                self._proc = subprocess.Popen(
                    [sys.executable, "-I", "-c", _REAPER_SOURCE],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                )
            assert self._proc.stdin is not None
            try:
                self._proc.stdin.write(line.encode() + b"\n")
                self._proc.stdin.flush()
            except (BrokenPipeError, ValueError):
                pass

    def watch(self, pid: int, first_signal: int = signal.SIGKILL) -> None:
        """Kill ``pid`` (``first_signal``, then SIGKILL its group) if this interpreter dies."""
        self._send(f"add {pid} {int(first_signal)}")

    def unwatch(self, pid: int) -> None:
        """Forget ``pid`` (it was stopped normally)."""
        if self._proc is not None:
            self._send(f"del {pid}")

    def add_dir(self, path: Path) -> None:
        """Remove ``path`` if this interpreter dies."""
        self._send(f"dir {path}")

    def remove_dir(self, path: Path) -> None:
        """Forget ``path`` (it was removed normally)."""
        if self._proc is not None:
            self._send(f"undir {path}")

    def close(self) -> None:
        """Let the reaper exit (it has nothing left to do after a clean shutdown)."""
        with self._lock:
            proc, self._proc = self._proc, None
        if proc is not None and proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
            _wait(proc, 10)


_reaper = _Reaper()
_live: dict[int, Any] = {}  # id(obj) -> obj with an ``_emergency_stop()`` method


def _register(obj: Any) -> None:
    _live[id(obj)] = obj


def _unregister(obj: Any) -> None:
    _live.pop(id(obj), None)


@atexit.register
def _stop_everything() -> None:
    """Stop every server still running when the interpreter exits."""
    for obj in list(_live.values()):
        with contextlib.suppress(Exception):
            obj._emergency_stop()
    _reaper.close()


# --------------------------------------------------------------------------------------------
# Redis


def _find_redis_server() -> str:
    """Path of redis-server: $REDIS_SERVER, /usr/bin/redis-server, or the PATH."""
    candidates = [os.environ.get("REDIS_SERVER"), "/usr/bin/redis-server"]
    candidates.append(shutil.which("redis-server"))
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise RuntimeError("redis-server not found (run scripts/install_system_deps.sh)")


class RedisServer:
    """A throwaway redis-server on a loopback port, without persistence.

    ``stop()`` and ``start()`` may be called any number of times; the port stays the same, so
    clients configured with ``url`` reconnect once it is back.
    """

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="test-redis-"))
        self.log_path = self.dir / "redis.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self.starts = 0  # how many times it was started: a restart changes it
        _reaper.add_dir(self.dir)
        _register(self)

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        """True while the redis-server process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def ping(self, timeout: float = 1.0) -> bool:
        """True if the server answers PING with PONG."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def start(self, timeout: float = 20.0) -> None:
        """Start the server (no-op if running) and wait until it answers PING."""
        if self.running:
            return
        cmd = [
            _find_redis_server(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.dir),
            "--daemonize", "no",
            "--logfile", "",
        ]  # fmt: skip
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip
        _reaper.watch(self._proc.pid)
        deadline = time.monotonic() + timeout
        while not self.ping():
            if self._proc.poll() is not None:
                self._reap()
                raise RuntimeError(f"redis-server exited early:\n{_tail(self.log_path, 30)}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"redis-server did not start:\n{_tail(self.log_path, 30)}")
            time.sleep(0.02)
        self.starts += 1

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server with SIGTERM and wait (SIGKILL after ``timeout``)."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            if not _wait(proc, timeout):
                _killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self._reap()

    def kill(self) -> None:
        """Kill the server with SIGKILL and wait."""
        proc = self._proc
        if proc is None:
            return
        _killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        self._reap()

    def _reap(self) -> None:
        if self._proc is not None:
            self._proc.wait()
            _reaper.unwatch(self._proc.pid)
            self._proc = None

    async def astart(self, timeout: float = 20.0) -> None:  # noqa: ASYNC109
        """``start()`` without blocking the event loop."""
        await asyncio.to_thread(self.start, timeout)

    async def astop(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """``stop()`` without blocking the event loop."""
        await asyncio.to_thread(self.stop, timeout)

    def close(self) -> None:
        """Stop the server for good and remove its directory."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
        _reaper.remove_dir(self.dir)
        _unregister(self)

    def _emergency_stop(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# PostgreSQL


def _version_key(path: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", Path(path).parent.name))


def find_postgres_bindir() -> Path:
    """Directory of initdb/postgres/psql: $POSTGRES_BINDIR, the newest
    /usr/lib/postgresql/*/bin, or the directory of an ``initdb`` on the PATH."""
    env = os.environ.get("POSTGRES_BINDIR")
    if env and (Path(env) / "initdb").exists():
        return Path(env)
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_version_key)
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).resolve().parent
    raise RuntimeError("PostgreSQL not found (run scripts/install_system_deps.sh)")


def _traversable_tempdir() -> str | None:
    """A temp parent directory that other users can traverse (needed when we are root)."""
    base = Path(tempfile.gettempdir()).resolve()
    for part in (base, *base.parents):
        if not part.stat().st_mode & 0o001:
            return "/tmp"
    return None


def _clean_env() -> dict[str, str]:
    """Environment for PostgreSQL programs: no stray PG* settings, C messages."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    return env


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class PostgresServer:
    """A throwaway PostgreSQL cluster on a loopback port, with trust auth for ``postgres``.

    The cluster lives in a temporary directory and survives ``stop()``/``start()``/
    ``restart()`` (same port, same data); ``close()`` removes it. When the test process runs as
    root, initdb and postgres run as the ``postgres`` OS user, which owns that directory.
    """

    # Durable, as in production: the crash and outage tests prove nothing against a server
    # that may lose what it acknowledged (fsync and synchronous_commit on; a commit's fsync
    # costs about 0.1 ms on the development machine).
    SETTINGS: dict[str, str] = {
        "listen_addresses": "127.0.0.1",
        "fsync": "on",
        "full_page_writes": "on",
        "synchronous_commit": "on",
        "max_connections": "300",
    }

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.bindir = find_postgres_bindir()
        self._as_root = os.geteuid() == 0
        self.dir = Path(tempfile.mkdtemp(prefix="test-pg-", dir=_traversable_tempdir()))
        self.data_dir = self.dir / "data"
        self.socket_dir = self.dir
        self.log_path = self.dir / "postgres.log"
        self._initialized = False
        self._proc: subprocess.Popen[bytes] | None = None
        self.starts = 0  # how many times it was started: a restart changes it
        self._server_version = 0
        _reaper.add_dir(self.dir)
        _register(self)
        # Commands run through setpriv rather than Popen(user=...): Popen then has to fork()
        # a process whose gRPC threads are running, and gRPC's fork handlers can kill the
        # child before it execs (seen in CI). setpriv lets Popen use vfork and exec at once.
        self._as_postgres: list[str] = []
        if self._as_root:
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError(
                    "running as root but there is no 'postgres' user to run PostgreSQL as"
                ) from None
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            self._as_postgres = [
                "setpriv",
                f"--reuid={pw.pw_uid}",
                f"--regid={pw.pw_gid}",
                "--clear-groups",
                "--",
            ]

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """True while the postmaster process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def _initdb(self) -> None:
        cmd = [
            str(self.bindir / "initdb"),
            "-D", str(self.data_dir),
            "-U", "postgres",
            "-A", "trust",
            "-E", "UTF8",
            "--locale=C",
            "-N",  # no fsync
        ]  # fmt: skip
        with open(self.log_path, "ab") as log:
            result = subprocess.run(
                [*self._as_postgres, *cmd], stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, cwd=self.dir, env=_clean_env(), timeout=120,
                check=False,
            )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"initdb failed:\n{_tail(self.log_path, 30)}")
        self._initialized = True

    def is_ready(self) -> bool:
        """True if the server accepts connections (pg_isready)."""
        result = subprocess.run(
            [str(self.bindir / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port),
             "-U", "postgres", "-d", "postgres", "-t", "2"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env=_clean_env(), timeout=10, check=False,
        )  # fmt: skip
        return result.returncode == 0

    def start(self, timeout: float = 60.0) -> None:
        """Start the server (initdb on first use; no-op if running) and wait until ready."""
        if self.running:
            return
        if not self._initialized:
            self._initdb()
        cmd = [
            str(self.bindir / "postgres"),
            "-D", str(self.data_dir),
            "-p", str(self.port),
            "-k", str(self.socket_dir),
        ]  # fmt: skip
        for key, value in self.SETTINGS.items():
            cmd += ["-c", f"{key}={value}"]
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                [*self._as_postgres, *cmd], stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, cwd=self.dir, env=_clean_env(), start_new_session=True,
            )  # fmt: skip
        # If we die, SIGQUIT (immediate shutdown: postgres cleans up its shared memory).
        _reaper.watch(self._proc.pid, signal.SIGQUIT)
        deadline = time.monotonic() + timeout
        while not self.is_ready():
            if self._proc.poll() is not None:
                self._reap()
                raise RuntimeError(f"postgres exited early:\n{_tail(self.log_path, 30)}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"postgres did not start:\n{_tail(self.log_path, 30)}")
            time.sleep(0.05)
        self._server_version = int(self.psql("SHOW server_version_num").strip())
        self.starts += 1

    def stop(self, timeout: float = 30.0) -> None:
        """Fast shutdown (SIGINT: disconnect clients, checkpoint) and wait; escalate on timeout."""
        proc = self._proc
        if proc is None:
            return
        for sig, wait in ((signal.SIGINT, timeout), (signal.SIGQUIT, 10.0)):
            if proc.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
            if _wait(proc, wait):
                break
        else:
            _killpg(proc.pid, signal.SIGKILL)
        self._reap()

    def kill(self) -> None:
        """Kill the postmaster and its backends with SIGKILL (a crash) and wait for all."""
        proc = self._proc
        if proc is None:
            return
        # Postgres children call setsid(), so they are not in the postmaster's process group.
        children = _children(proc.pid)
        _killpg(proc.pid, signal.SIGKILL)
        for pid in children:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
        self._reap()
        # A restart fails while an old backend still holds the shared memory: wait them out.
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.02)

    def restart(self, timeout: float = 60.0) -> None:
        """Stop, then start again on the same port with the same data."""
        self.stop()
        self.start(timeout)

    def _reap(self) -> None:
        if self._proc is not None:
            self._proc.wait()
            _reaper.unwatch(self._proc.pid)
            self._proc = None

    async def astart(self, timeout: float = 60.0) -> None:  # noqa: ASYNC109
        """``start()`` without blocking the event loop."""
        await asyncio.to_thread(self.start, timeout)

    async def astop(self, timeout: float = 30.0) -> None:  # noqa: ASYNC109
        """``stop()`` without blocking the event loop."""
        await asyncio.to_thread(self.stop, timeout)

    async def arestart(self, timeout: float = 60.0) -> None:  # noqa: ASYNC109
        """``restart()`` without blocking the event loop."""
        await asyncio.to_thread(self.restart, timeout)

    def close(self) -> None:
        """Stop the server for good and remove the cluster."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
        _reaper.remove_dir(self.dir)
        _unregister(self)

    def _emergency_stop(self) -> None:
        proc = self._proc
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGQUIT)
            if not _wait(proc, 5):
                _killpg(proc.pid, signal.SIGKILL)
            self._reap()
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- databases ---------------------------------------------------------------------------

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        """Run SQL with psql as ``postgres``; return unaligned, tuples-only output."""
        cmd = [
            str(self.bindir / "psql"), "-X", "-q", "-A", "-t", "-w",
            "-v", "ON_ERROR_STOP=1",
            "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", dbname,
            "-c", sql,
        ]  # fmt: skip
        result = subprocess.run(
            cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL,
            env=_clean_env(), timeout=120, check=False,
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"psql failed ({sql!r}): {result.stderr.strip()}")
        return result.stdout

    def url(self, name: str) -> str:
        """SQLAlchemy URL of database ``name``: ``postgresql+asyncpg://postgres@host:port/name``."""
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{name}"

    def plain_url(self, name: str) -> str:
        """libpq URL of database ``name`` (psycopg, asyncpg.connect, psql)."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def create_database(self, name: str) -> str:
        """Create database ``name`` and return its SQLAlchemy (asyncpg) URL."""
        # FILE_COPY (PG 15+) copies the template's files instead of WAL-logging every block:
        # faster, and it keeps the WAL small when every test creates a database.
        strategy = " STRATEGY FILE_COPY" if self._server_version >= 150000 else ""
        self.psql(f"CREATE DATABASE {_quote_ident(name)}{strategy}")
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """Drop database ``name`` if it exists, disconnecting its clients."""
        force = " WITH (FORCE)" if self._server_version >= 130000 else ""
        self.psql(f"DROP DATABASE IF EXISTS {_quote_ident(name)}{force}")


# --------------------------------------------------------------------------------------------
# The checkpoint service


class _AsyncTwins:
    """The blocking lifecycle calls of a server, as ``a``-prefixed coroutines that run them in
    a thread (the event loop, and the test's open streams, go on meanwhile)."""

    async def astart(self, timeout: float = 30.0, *, require_serving: bool = True) -> None:  # noqa: ASYNC109
        await asyncio.to_thread(self.start, timeout, require_serving=require_serving)

    async def aterminate(self, timeout: float = 15.0) -> int | None:  # noqa: ASYNC109
        return await asyncio.to_thread(self.terminate, timeout)

    async def akill(self) -> None:
        await asyncio.to_thread(self.kill)

    async def arestart(self, timeout: float = 30.0, *, graceful: bool = True) -> None:  # noqa: ASYNC109
        await asyncio.to_thread(self.restart, timeout, graceful=graceful)


class CheckpointServiceProcess(_AsyncTwins):
    """``python -m checkpoint_svc`` as a subprocess on a fixed loopback port.

    The port stays the same across ``restart()``/``kill()``+``start()``, so clients can
    reconnect. stdout and stderr are appended to ``<log_dir>/checkpoint_svc-<port>.log``.
    """

    def __init__(
        self,
        db_url: str,
        redis_url: str | None = None,
        *,
        log_dir: Path,
        extra_args: Sequence[str] = (),
        port: int | None = None,
        env: Mapping[str, str] | None = None,
        module: str = "checkpoint_svc",
        probe_credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self.probe_credentials = probe_credentials  # a TLS server's health is asked over TLS
        self.db_url = db_url
        self.redis_url = redis_url
        self.extra_args = list(extra_args)
        self.port = port or free_port()
        self.env = dict(env) if env is not None else None
        self.module = module
        self.log_path = Path(log_dir) / f"{module}-{self.port}.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._last_returncode: int | None = None

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT``."""
        return f"127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        """True while the process is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The process id, while started."""
        return self._proc.pid if self._proc is not None else None

    @property
    def returncode(self) -> int | None:
        """Exit status of the last process, once it has exited."""
        return self._proc.poll() if self._proc is not None else self._last_returncode

    @property
    def command(self) -> list[str]:
        """The command line the service is started with."""
        return [
            sys.executable, "-m", self.module,
            "--listen", self.address,
            "--db", self.db_url,
            *(["--redis", self.redis_url] if self.redis_url else []),
            *self.extra_args,
        ]  # fmt: skip

    def log_tail(self, n: int = 50) -> str:
        """The last ``n`` lines of the service's log."""
        return _tail(self.log_path, n)

    def health(self, timeout: float = 1.0) -> int | None:
        """The gRPC health status of service "" (a ``HealthCheckResponse`` enum), or None."""
        with grpc.insecure_channel(self.address, options=GRPC_TEST_OPTIONS) as channel:
            try:
                response = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=timeout
                )
            except grpc.RpcError:
                return None
            return int(response.status)

    def start(self, timeout: float = 30.0, *, require_serving: bool = True) -> None:
        """Start the process and wait until its health check says SERVING.

        With ``require_serving=False`` any health answer will do (e.g. NOT_SERVING while a
        tier is down). Raises RuntimeError, with the tail of the log, if the process exits
        first or does not get there within ``timeout`` seconds (it is killed then).
        """
        if self.running:
            raise RuntimeError(f"{self.module} on {self.address} is already running")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(self.env or {})}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"==== {time.strftime('%H:%M:%S')} start: {self.command}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                self.command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=REPO_ROOT, env=env, start_new_session=True,
            )  # fmt: skip
        _reaper.watch(self._proc.pid)
        _register(self)
        proc = self._proc

        def gone() -> str | None:
            if proc.poll() is None:
                return None
            code = proc.returncode
            self._reap()
            return f"{self.module} exited early with status {code}:\n{self.log_tail(40)}"

        def give_up() -> str:
            self.kill()
            return f"{self.module} on {self.address} not SERVING after {timeout}s:\n" + (
                self.log_tail(40)
            )

        self._wait_ready(timeout, require_serving, gone, give_up)

    def _wait_ready(
        self,
        timeout: float,
        require_serving: bool,
        gone: Callable[[], str | None],
        give_up: Callable[[], str],
    ) -> None:
        wait_serving(self.address, timeout, require_serving, gone, give_up, self.probe_credentials)

    def kill(self) -> None:
        """SIGKILL the process (and anything in its process group) and wait: a crash."""
        proc = self._proc
        if proc is None:
            return
        _killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        self._reap()

    def terminate(self, timeout: float = 15.0) -> int | None:
        """SIGTERM (graceful shutdown) and wait; SIGKILL after ``timeout``. Returns the status."""
        proc = self._proc
        if proc is None:
            return self._last_returncode
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            if not _wait(proc, timeout):
                _killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self._reap()
        return self._last_returncode

    def restart(self, timeout: float = 30.0, *, graceful: bool = True) -> None:
        """Terminate (or kill, with ``graceful=False``) and start again on the same port."""
        if graceful:
            self.terminate()
        else:
            self.kill()
        self.start(timeout)

    def _reap(self) -> None:
        if self._proc is not None:
            self._last_returncode = self._proc.wait()
            _reaper.unwatch(self._proc.pid)
            self._proc = None
        _unregister(self)

    def _emergency_stop(self) -> None:
        self.kill()


def wait_serving(
    address: str,
    timeout: float,
    require_serving: bool,
    gone: Callable[[], str | None],
    give_up: Callable[[], str],
    credentials: grpc.ChannelCredentials | None = None,
) -> None:
    """Poll grpc.health.v1 at `address` until SERVING (any answer, without
    `require_serving`). `gone()` says why the server is no longer there (None while it is);
    past `timeout`, `give_up()` stops it and says so. Either way: RuntimeError with that."""
    deadline = time.monotonic() + timeout
    channel = (
        grpc.secure_channel(address, credentials, options=GRPC_TEST_OPTIONS)
        if credentials is not None
        else grpc.insecure_channel(address, options=GRPC_TEST_OPTIONS)
    )
    with channel:
        health = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service="")
        while True:
            if (why := gone()) is not None:
                raise RuntimeError(why)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError(give_up())
            try:
                response = health.Check(request, timeout=min(1.0, remaining), wait_for_ready=True)
            except grpc.RpcError:
                time.sleep(0.05)
                continue
            if not require_serving or response.status == health_pb2.HealthCheckResponse.SERVING:
                return
            time.sleep(0.05)


async def checkpoint_stub(
    address: str, tenant: str
) -> tuple[grpc.aio.Channel, checkpoint_pb2_grpc.CheckpointServiceStub, Metadata]:
    """An async channel to ``address``, a CheckpointService stub on it, and the call metadata
    naming ``tenant``. The caller closes the channel (``await channel.close()``)."""
    from workflow_stubs.checkpoint.v1 import checkpoint_pb2_grpc

    channel = grpc.aio.insecure_channel(address, options=GRPC_TEST_OPTIONS)
    stub = checkpoint_pb2_grpc.CheckpointServiceStub(channel)
    metadata: Metadata = (("x-tenant-id", tenant),)
    return channel, stub, metadata


class EngineServiceProcess(CheckpointServiceProcess):
    """``python -m engine_svc`` as a subprocess, pointed at a checkpoint service."""

    def __init__(
        self,
        checkpoint_address: str,
        *,
        log_dir: Path,
        extra_args: Sequence[str] = (),
        port: int | None = None,
        env: Mapping[str, str] | None = None,
        probe_credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        super().__init__(
            "",
            None,
            log_dir=log_dir,
            extra_args=extra_args,
            port=port,
            env=env,
            module="engine_svc",
            probe_credentials=probe_credentials,
        )
        self.checkpoint_address = checkpoint_address

    @property
    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "engine_svc",
            "--listen", self.address,
            "--checkpoint", self.checkpoint_address,
            *self.extra_args,
        ]  # fmt: skip


# HTTP to local test servers, never through a proxy the environment names.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ConsoleProcess(CheckpointServiceProcess):
    """``python -m workflow_console`` as a subprocess, pointed at an engine; ready once its
    /healthz answers."""

    def __init__(
        self,
        engine_address: str,
        *,
        log_dir: Path,
        extra_args: Sequence[str] = (),
        port: int | None = None,
    ) -> None:
        super().__init__(
            "", None, log_dir=log_dir, extra_args=extra_args, port=port, module="workflow_console"
        )
        self.engine_address = engine_address

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    @property
    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "workflow_console",
            "--listen", self.address,
            "--engine", self.engine_address,
            *self.extra_args,
        ]  # fmt: skip

    def _wait_ready(
        self,
        timeout: float,
        require_serving: bool,
        gone: Callable[[], str | None],
        give_up: Callable[[], str],
    ) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if (why := gone()) is not None:
                raise RuntimeError(why)
            if time.monotonic() > deadline:
                raise RuntimeError(give_up())
            try:
                with _DIRECT.open(f"{self.url}/healthz", timeout=1.0) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                time.sleep(0.05)


class InProcessCheckpointService(_AsyncTwins):
    """checkpoint_svc in this process, on an event loop of its own in a thread: the settings
    parser, store, servicer and gRPC server of ``python -m checkpoint_svc``, without a
    process's start-up (about a second of CPU: imports and migrations in a new interpreter).

    For tests that talk to a service but neither kill it nor signal it; ``kill()`` refuses, as
    a crash needs a process (CheckpointServiceProcess). A restart is a new store on the same
    port and database. Its logs go to this process's logging (pytest shows them on failure).
    """

    module = "checkpoint_svc (in process)"

    def __init__(
        self,
        db_url: str,
        redis_url: str | None = None,
        *,
        extra_args: Sequence[str] = (),
        port: int | None = None,
        probe_credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self.probe_credentials = probe_credentials
        self.db_url = db_url
        self.redis_url = redis_url
        self.extra_args = list(extra_args)
        self.port = port or free_port()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._failure: BaseException | None = None
        self._started = threading.Event()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def log_tail(self, n: int = 50) -> str:
        return "(in this process: its log records are in the test's captured logging)"

    def start(self, timeout: float = 30.0, *, require_serving: bool = True) -> None:
        """Start it and wait until its health check says SERVING."""
        if self.running:
            raise RuntimeError(f"{self.module} on {self.address} is already running")
        from checkpoint_svc.config import parse_settings

        argv = ["--listen", self.address, "--db", self.db_url, *self.extra_args]
        if self.redis_url:
            argv += ["--redis", self.redis_url]
        settings = parse_settings(argv)
        self._failure = None
        self._started = threading.Event()  # its loop, to be told to stop, is there
        self._thread = threading.Thread(
            target=self._run,
            args=(settings,),
            name=f"checkpoint_svc-{self.port}",
            daemon=True,  # never holds the interpreter's exit, whatever a test left running
        )
        self._thread.start()
        self._started.wait(timeout)

        def give_up() -> str:
            self.terminate()
            return f"{self.module} not SERVING after {timeout}s"

        wait_serving(
            self.address,
            timeout,
            require_serving,
            lambda: None if self.running else f"{self.module} stopped early: {self._failure!r}",
            give_up,
            self.probe_credentials,
        )

    def _run(self, settings: Any) -> None:
        from checkpoint_svc.server import serve

        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            self._started.set()
            await serve(settings, stopped=self._stop.wait())

        try:
            asyncio.run(main())
        except BaseException as exc:  # SystemExit from a port in use, or a bug: start() says
            self._failure = exc

    def terminate(self, timeout: float = 15.0) -> int | None:
        """A graceful stop, as SIGTERM gives a process: 0 once it is over, 1 if it failed."""
        thread = self._thread
        if thread is None:
            return 1 if self._failure is not None else 0
        self._started.wait(timeout)
        loop, stop = self._loop, self._stop
        if thread.is_alive() and loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):  # its loop closed meanwhile
                loop.call_soon_threadsafe(stop.set)
        thread.join(timeout)
        if thread.is_alive():
            raise RuntimeError(f"{self.module} on {self.address} did not stop in {timeout}s")
        self._thread = self._loop = self._stop = None
        return 1 if self._failure is not None else 0

    def kill(self) -> None:
        raise RuntimeError("an in-process service cannot be killed: start a process for that")

    def restart(self, timeout: float = 30.0, *, graceful: bool = True) -> None:
        if not graceful:
            self.kill()
        self.terminate()
        self.start(timeout)
