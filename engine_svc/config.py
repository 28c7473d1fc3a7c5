"""The engine's settings, each declared once: flag, environment variable, type and help
(docs/operations.md#settings)."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Annotated, Literal

import grpc
from pydantic import Field, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from workflow_rpc.settings import ServiceSettings
from workflow_rpc.settings import parse_settings as parse_service_settings
from workflow_rpc.tls import channel_credentials

__all__ = ["Settings", "parse_settings"]


def host_pid() -> str:
    """The default lease owner: this host and process."""
    return f"{socket.gethostname()}-{os.getpid()}"


class Settings(ServiceSettings):
    """Workflow engine: runs workflow DAGs; all state lives in checkpoint_svc."""

    model_config = SettingsConfigDict(
        env_prefix="ENGINE_",
        cli_prog_name="python -m engine_svc",
        cli_shortcuts={"checkpoint-addr": "checkpoint"},
    )

    listen: str = Field("127.0.0.1:50052", description="host:port to serve")
    checkpoint_addr: str = Field("127.0.0.1:50051", description="address of checkpoint_svc")
    checkpoint_ca_file: Path | None = Field(
        None, description="PEM CA of checkpoint_svc's certificate: the channel to it uses TLS"
    )
    checkpoint_cert_file: Path | None = Field(
        None, description="PEM certificate the engine shows checkpoint_svc (mTLS)"
    )
    checkpoint_key_file: Path | None = Field(
        None, description="PEM private key of --checkpoint-cert-file"
    )
    checkpoint_token_file: Path | None = Field(
        None,
        description="file holding the bearer token the engine sends checkpoint_svc (a "
        "credential with the system role), if it checks credentials",
    )
    handlers: Annotated[list[str], NoDecode] = Field(
        [],
        description="MODULE[,MODULE]: the only modules `python` nodes may call",
    )
    max_parallel: int = Field(16, ge=1, description="nodes run at once within a step, per run")
    lease_ttl: float = Field(15.0, gt=0, description="seconds a run's lease lasts unless renewed")
    recovery_interval: float = Field(
        5.0, ge=0, description="seconds between scans for runs whose engine died (0 = never)"
    )
    store_retry: float = Field(
        30.0,
        ge=0,
        description="seconds a run retries an unreachable checkpoint service before it stops "
        "(it is continued from its last checkpoint when the service is back)",
    )
    shutdown_grace: float = Field(
        10.0,
        ge=0,
        description="on SIGTERM, seconds running nodes get to finish before their runs are "
        "checkpointed and handed over",
    )
    control_wait: float = Field(
        30.0,
        gt=0,
        description="seconds PauseRun, CancelRun and CheckpointRun wait for the engine running "
        "the run to act",
    )
    tenants: Annotated[list[str], NoDecode] = Field(
        ["default"],
        description="TENANT[,TENANT]: tenants to scan for orphaned runs, besides those "
        "recorded in the store",
    )
    owner: str = Field(default_factory=host_pid, min_length=1, description="lease owner name")
    store_calls: Literal["session", "unary"] = Field(
        "session",
        description="how a run's saves, writes and leases reach the checkpoint service: on "
        "one Session stream per tenant, or as unary calls",
    )
    heartbeat: float = Field(
        5.0,
        gt=0,
        description="seconds between heartbeats on an idle WatchRun of a run this engine "
        "executes (other runs' watchers get the checkpoint service's)",
    )

    def checkpoint_tls(self) -> grpc.ChannelCredentials | None:
        """The channel's TLS to checkpoint_svc (None: plaintext), or the process stops with
        one line."""
        if not (self.checkpoint_ca_file or self.checkpoint_cert_file or self.checkpoint_key_file):
            return None
        try:
            return channel_credentials(
                self.checkpoint_ca_file, self.checkpoint_cert_file, self.checkpoint_key_file
            )
        except (OSError, ValueError) as exc:
            raise SystemExit(f"python -m engine_svc: error: checkpoint TLS: {exc}") from None

    def checkpoint_token(self) -> str | None:
        """The token of --checkpoint-token-file, or the process stops with one line."""
        path = self.checkpoint_token_file
        if path is None:
            return None
        try:
            token = path.read_text().strip()
        except OSError as exc:
            token, problem = "", str(exc)
        else:
            problem = f"{path} is empty"
        if not token:
            raise SystemExit(f"python -m engine_svc: error: --checkpoint-token-file: {problem}")
        return token

    http_allow: Annotated[list[str], NoDecode] = Field(
        [],
        description="HOST|URL-PREFIX[,...]: the only places http nodes may reach (none: any "
        "host but loopback, link-local, metadata and other special addresses); a host named "
        "here may be any address",
    )
    http_max_bytes: int = Field(
        10 * 1024 * 1024, ge=1, description="the largest response body an http node reads"
    )

    @field_validator("handlers", "tenants", "http_allow", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value


def parse_settings(argv: list[str] | None = None) -> Settings:
    return parse_service_settings(Settings, argv)
