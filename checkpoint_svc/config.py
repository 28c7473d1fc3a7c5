"""The checkpoint service's settings, each declared once: flag, environment variable, type
and help (docs/operations.md#settings)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from workflow_rpc.settings import ServiceSettings
from workflow_rpc.settings import parse_settings as parse_service_settings

__all__ = ["DEFAULT_DB_URL", "Settings", "parse_settings"]

DEFAULT_DB_URL = "sqlite+aiosqlite:///./data/checkpoints.db"
_YES_NO = {"true": "yes", "on": "yes", "1": "yes", "false": "no", "off": "no", "0": "no"}


class Settings(ServiceSettings):
    """Checkpoint service: durable checkpoints, leases and event feed over gRPC."""

    model_config = SettingsConfigDict(
        env_prefix="CHECKPOINT_",
        cli_prog_name="python -m checkpoint_svc",
        cli_shortcuts={"db-url": "db", "redis-url": "redis"},
    )

    listen: str = Field("127.0.0.1:50051", description="host:port to serve")
    db_url: str = Field(
        DEFAULT_DB_URL,
        min_length=1,
        description="SQLAlchemy URL: sqlite+aiosqlite:///FILE or postgresql+asyncpg://...",
    )
    redis_url: str | None = Field(None, description="redis://host:port/db, or none")
    memory_mib: float = Field(256.0, ge=0, description="memory tier size in MiB (0 disables it)")
    redis_ttl: float = Field(3600.0, gt=0, description="seconds a checkpoint body stays in Redis")
    sql_ttl: float = Field(
        7 * 24 * 3600.0,
        ge=0,
        description="seconds a checkpoint is kept in SQL (0 = forever); the head of a "
        "non-terminal thread is always kept",
    )
    keep_last: int = Field(
        0, ge=0, description="keep only the newest N checkpoints per thread (0 = all)"
    )
    max_state_bytes: int = Field(
        16 * 1024 * 1024, gt=0, description="largest state or write value accepted"
    )
    sweep_interval: float = Field(
        60.0, ge=0, description="seconds between retention sweeps (0 disables the sweeper)"
    )
    heartbeat: float = Field(5.0, gt=0, description="seconds between heartbeats on an idle Stream")
    single_writer: Literal["yes", "no", "auto"] = Field(
        "auto",
        description="yes if this is the only replica (lets memory answer heads), no if not; "
        "auto = yes on SQLite without Redis",
    )
    batch_max: int = Field(
        256, ge=1, description="most operations the committer writes in one transaction"
    )
    queue_max: int = Field(
        10_000,
        ge=1,
        description="most operations waiting for a commit, per lane (ASYNC saves are answered "
        "once queued); a call past it waits for room",
    )
    sql_timeout: float = Field(
        15.0,
        gt=0,
        description="PostgreSQL: seconds one statement may take before it counts as failed "
        "(a commit's outcome is then found out before anything is tried again)",
    )
    encryption_keys: Path | None = Field(
        None,
        description="a key ring file (YAML: keys, oldest first, each an id and a base64 "
        "256-bit key): states, pending writes and event payloads are sealed with AES-GCM "
        "before SQL and Redis with the last key; every key listed still reads "
        "(docs/security.md#encryption-at-rest)",
    )
    shutdown_grace: float = Field(
        10.0,
        ge=0,
        description="on SIGTERM, seconds the last calls and queued writes get to finish",
    )

    @field_validator("redis_url", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if value in ("", "none") else value

    @field_validator("single_writer", mode="before")
    @classmethod
    def _yes_or_no(cls, value: object) -> object:
        """Any case, and true/false, on/off, 1/0 (and bools, in code) as yes and no."""
        if isinstance(value, bool):
            return "yes" if value else "no"
        if isinstance(value, str):
            value = value.strip().lower()
            return _YES_NO.get(value, value)
        return value

    @property
    def is_sqlite(self) -> bool:
        return self.db_url.startswith("sqlite")

    @property
    def memory_answers_heads(self) -> bool:
        """The memory tier may answer heads only when this process is the only writer."""
        if self.single_writer != "auto":
            return self.single_writer == "yes"
        return self.is_sqlite and self.redis_url is None


def parse_settings(argv: list[str] | None = None) -> Settings:
    settings = parse_service_settings(Settings, argv)
    if settings.is_sqlite and settings.db_url == DEFAULT_DB_URL:
        Path("data").mkdir(exist_ok=True)
    return settings
