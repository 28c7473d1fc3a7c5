"""Engine settings from flags, falling back to environment variables, then defaults."""

from __future__ import annotations

import argparse
import os
import socket
from dataclasses import dataclass, field


@dataclass(slots=True)
class Settings:
    listen: str = "127.0.0.1:50052"
    checkpoint_addr: str = "127.0.0.1:50051"
    handlers: list[str] = field(default_factory=list)
    max_parallel: int = 16
    lease_ttl_seconds: float = 15.0
    recovery_interval_seconds: float = 5.0
    store_retry_seconds: float = 30.0
    shutdown_grace_seconds: float = 10.0
    control_wait_seconds: float = 30.0
    metrics_port: int = 0
    tenants: list[str] = field(default_factory=lambda: ["default"])
    owner: str = ""
    log_level: str = "INFO"
    store_calls: str = "session"
    heartbeat_seconds: float = 5.0


def _env(name: str, default: str) -> str:
    return os.environ.get(name) or default


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def parse_settings(argv: list[str] | None = None) -> Settings:
    d = Settings()
    p = argparse.ArgumentParser(
        prog="python -m engine_svc",
        description="Workflow engine: runs workflow DAGs; all state lives in checkpoint_svc.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--listen", default=_env("ENGINE_LISTEN", d.listen))
    p.add_argument(
        "--checkpoint",
        dest="checkpoint_addr",
        default=_env("ENGINE_CHECKPOINT_ADDR", d.checkpoint_addr),
        help="address of checkpoint_svc (env ENGINE_CHECKPOINT_ADDR)",
    )
    p.add_argument(
        "--handlers",
        type=_csv,
        default=_csv(_env("ENGINE_HANDLERS", "")),
        help="MODULE[,MODULE]: the only modules `python` nodes may call",
    )
    p.add_argument(
        "--max-parallel",
        type=int,
        default=int(_env("ENGINE_MAX_PARALLEL", str(d.max_parallel))),
        help="nodes run at once within a step, per run",
    )
    p.add_argument(
        "--lease-ttl",
        dest="lease_ttl_seconds",
        type=float,
        default=float(_env("ENGINE_LEASE_TTL", str(d.lease_ttl_seconds))),
        help="seconds a run's lease lasts unless renewed",
    )
    p.add_argument(
        "--recovery-interval",
        dest="recovery_interval_seconds",
        type=float,
        default=float(_env("ENGINE_RECOVERY_INTERVAL", str(d.recovery_interval_seconds))),
        help="seconds between scans for runs whose engine died (0 = never)",
    )
    p.add_argument(
        "--store-retry",
        dest="store_retry_seconds",
        type=float,
        default=float(_env("ENGINE_STORE_RETRY", str(d.store_retry_seconds))),
        help="seconds a run retries an unreachable checkpoint service before it stops "
        "(it is continued from its last checkpoint when the service is back)",
    )
    p.add_argument(
        "--shutdown-grace",
        dest="shutdown_grace_seconds",
        type=float,
        default=float(_env("ENGINE_SHUTDOWN_GRACE", str(d.shutdown_grace_seconds))),
        help="on SIGTERM, seconds running nodes get to finish before their runs are "
        "checkpointed and handed over",
    )
    p.add_argument(
        "--control-wait",
        dest="control_wait_seconds",
        type=float,
        default=float(_env("ENGINE_CONTROL_WAIT", str(d.control_wait_seconds))),
        help="seconds PauseRun, CancelRun and CheckpointRun wait for the engine running "
        "the run to act",
    )
    p.add_argument(
        "--tenants",
        type=_csv,
        default=_csv(_env("ENGINE_TENANTS", "default")),
        help="tenants to scan for orphaned runs, besides those recorded in the store",
    )
    p.add_argument(
        "--owner", default=_env("ENGINE_OWNER", ""), help="lease owner name (default: host-pid)"
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=int(_env("ENGINE_METRICS_PORT", str(d.metrics_port))),
        help="serve Prometheus metrics on this port, on the --listen host (0 = off)",
    )
    p.add_argument("--log-level", default=_env("ENGINE_LOG_LEVEL", d.log_level))
    p.add_argument(
        "--store-calls",
        choices=["session", "unary"],
        default=_env("ENGINE_STORE_CALLS", d.store_calls),
        help="how a run's saves, writes and leases reach the checkpoint service: on one "
        "Session stream per tenant, or as unary calls (env ENGINE_STORE_CALLS)",
    )
    p.add_argument(
        "--heartbeat",
        dest="heartbeat_seconds",
        type=float,
        default=float(_env("ENGINE_HEARTBEAT", str(d.heartbeat_seconds))),
        help="seconds between heartbeats on an idle WatchRun of a run this engine executes "
        "(other runs' watchers get the checkpoint service's)",
    )
    settings = Settings(**vars(p.parse_args(argv)))
    if not settings.owner:
        settings.owner = f"{socket.gethostname()}-{os.getpid()}"
    return settings
