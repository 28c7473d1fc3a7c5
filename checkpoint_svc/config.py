"""Settings from flags, falling back to environment variables, then defaults."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_DB_URL = "sqlite+aiosqlite:///./data/checkpoints.db"


@dataclass(slots=True)
class Settings:
    listen: str = "127.0.0.1:50051"
    db_url: str = DEFAULT_DB_URL
    redis_url: str | None = None
    memory_mib: float = 256.0
    redis_ttl_seconds: float = 3600.0
    sql_ttl_seconds: float = 7 * 24 * 3600.0
    keep_last: int = 0
    max_state_bytes: int = 16 * 1024 * 1024
    sweep_interval_seconds: float = 60.0
    heartbeat_seconds: float = 5.0
    single_writer: bool | None = None  # None: decided by the backend (SQLite: yes)
    batch_max: int = 256
    async_queue_max: int = 10_000
    shutdown_grace_seconds: float = 10.0
    log_level: str = "INFO"
    metrics_port: int = 0

    @property
    def is_sqlite(self) -> bool:
        return self.db_url.startswith("sqlite")

    @property
    def memory_answers_heads(self) -> bool:
        """The memory tier may answer heads only when this process is the only writer."""
        if self.single_writer is not None:
            return self.single_writer
        return self.is_sqlite and self.redis_url is None


def _env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else default


def _bool_flag(value: str) -> bool | None:
    lowered = value.lower()
    if lowered in ("auto", ""):
        return None
    if lowered in ("yes", "true", "1", "on"):
        return True
    if lowered in ("no", "false", "0", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected yes, no or auto, got {value!r}")


def build_parser() -> argparse.ArgumentParser:
    d = Settings()
    p = argparse.ArgumentParser(
        prog="python -m checkpoint_svc",
        description="Checkpoint service: durable checkpoints, leases and event feed over gRPC.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    e = _env
    p.add_argument("--listen", default=e("CHECKPOINT_LISTEN", d.listen), help="host:port to serve")
    p.add_argument(
        "--db",
        dest="db_url",
        default=e("CHECKPOINT_DB_URL", d.db_url),
        help="SQLAlchemy URL: sqlite+aiosqlite:///FILE or postgresql+asyncpg://... "
        "(env CHECKPOINT_DB_URL)",
    )
    p.add_argument(
        "--redis",
        dest="redis_url",
        default=e("CHECKPOINT_REDIS_URL"),
        help="redis://host:port/db; none by default (env CHECKPOINT_REDIS_URL)",
    )
    p.add_argument(
        "--memory-mib",
        type=float,
        default=float(e("CHECKPOINT_MEMORY_MIB", str(d.memory_mib))),
        help="memory tier size in MiB (0 disables it)",
    )
    p.add_argument(
        "--redis-ttl",
        dest="redis_ttl_seconds",
        type=float,
        default=float(e("CHECKPOINT_REDIS_TTL", str(d.redis_ttl_seconds))),
        help="seconds a checkpoint body stays in Redis",
    )
    p.add_argument(
        "--sql-ttl",
        dest="sql_ttl_seconds",
        type=float,
        default=float(e("CHECKPOINT_SQL_TTL", str(d.sql_ttl_seconds))),
        help="seconds a checkpoint is kept in SQL (0 = forever); "
        "the head of a non-terminal thread is always kept",
    )
    p.add_argument(
        "--keep-last",
        type=int,
        default=int(e("CHECKPOINT_KEEP_LAST", "0")),
        help="keep only the newest N checkpoints per thread (0 = all)",
    )
    p.add_argument(
        "--max-state-bytes",
        type=int,
        default=int(e("CHECKPOINT_MAX_STATE_BYTES", str(d.max_state_bytes))),
        help="largest state or write value accepted",
    )
    p.add_argument(
        "--sweep-interval",
        dest="sweep_interval_seconds",
        type=float,
        default=float(e("CHECKPOINT_SWEEP_INTERVAL", str(d.sweep_interval_seconds))),
        help="seconds between retention sweeps (0 disables the sweeper)",
    )
    p.add_argument(
        "--heartbeat",
        dest="heartbeat_seconds",
        type=float,
        default=float(e("CHECKPOINT_HEARTBEAT", str(d.heartbeat_seconds))),
        help="seconds between heartbeats on an idle Stream",
    )
    p.add_argument(
        "--single-writer",
        type=_bool_flag,
        default=_bool_flag(e("CHECKPOINT_SINGLE_WRITER", "auto") or "auto"),
        help="yes if this is the only replica (lets memory answer heads); "
        "auto = yes on SQLite without Redis",
    )
    p.add_argument("--log-level", default=e("CHECKPOINT_LOG_LEVEL", d.log_level))
    p.add_argument(
        "--metrics-port",
        type=int,
        default=int(e("CHECKPOINT_METRICS_PORT", "0")),
        help="serve Prometheus metrics on this port, on the --listen host (0 = off)",
    )
    return p


def parse_settings(argv: list[str] | None = None) -> Settings:
    ns = build_parser().parse_args(argv)
    settings = Settings(**{k: v for k, v in vars(ns).items()})
    if settings.is_sqlite and settings.db_url == DEFAULT_DB_URL:
        Path("data").mkdir(exist_ok=True)
    return settings
