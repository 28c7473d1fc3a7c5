"""Process entry point: the gRPC server with health checking, reflection and a
graceful shutdown on SIGTERM (stop taking calls, flush the write-behind queue)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable

import grpc
from grpc_health.v1 import health, health_pb2
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from checkpoint_svc.commit import sql_retrying
from checkpoint_svc.config import Settings, parse_settings
from checkpoint_svc.domain import Tier
from checkpoint_svc.sealing import KeyRing, Sealing, new_key
from checkpoint_svc.servicer import REQUIRED_ROLES, CheckpointServicer
from checkpoint_svc.store import CheckpointStore
from checkpoint_svc.tiers.sql import Resealed, SqlTier
from workflow_rpc import logs
from workflow_rpc.arenas import trim_malloc
from workflow_rpc.headers import SYSTEM_TENANT
from workflow_rpc.serving import run, serve_until_stopped
from workflow_stubs.checkpoint.v1 import checkpoint_pb2, checkpoint_pb2_grpc

SERVICE_NAME = checkpoint_pb2.DESCRIPTOR.services_by_name["CheckpointService"].full_name
# Per-tier health entries, e.g. "checkpoint.v1.CheckpointService/redis".
TIER_HEALTH_NAMES = {Tier.REDIS: f"{SERVICE_NAME}/redis", Tier.SQL: f"{SERVICE_NAME}/sql"}
_MESSAGE_OVERHEAD = 1024 * 1024


def grpc_options(settings: Settings) -> list[tuple[str, int]]:
    limit = settings.max_state_bytes + _MESSAGE_OVERHEAD
    return [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ]


async def _report_health(store: CheckpointStore, servicer: health.aio.HealthServicer) -> None:
    serving = health_pb2.HealthCheckResponse.SERVING
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    rounds = 0
    while True:
        tiers = {t.tier: t for t in await store.health()}
        for tier, name in TIER_HEALTH_NAMES.items():
            if tiers[tier].configured:
                await servicer.set(name, serving if tiers[tier].up else not_serving)
        overall = serving if tiers[Tier.SQL].up else not_serving
        await servicer.set(SERVICE_NAME, overall)
        await servicer.set("", overall)  # what probes ask by default
        rounds += 1
        if rounds % 4 == 0:  # every 2 s
            trim_malloc()
        await asyncio.sleep(0.5)


async def serve(settings: Settings, *, stopped: Awaitable[None] | None = None) -> None:
    try:
        store = CheckpointStore(settings)
    except (OSError, ValueError) as exc:  # the key ring file: one line, as a bad flag
        raise SystemExit(f"python -m checkpoint_svc: error: --encryption-keys: {exc}") from None
    reporter: asyncio.Task[None] | None = None

    async def start(health_servicer: health.aio.HealthServicer) -> None:
        nonlocal reporter
        await store.start()
        reporter = asyncio.create_task(_report_health(store, health_servicer))

    async def stop(server: grpc.aio.Server) -> None:
        if reporter is not None:
            reporter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reporter
        store.feed.close()  # open Streams end now (UNAVAILABLE) instead of holding up the stop
        store.stopping.set()  # and Sessions once their calls are answered
        await server.stop(grace=settings.shutdown_grace)
        await store.close()

    await serve_until_stopped(
        what="checkpoint_svc",
        service_name=SERVICE_NAME,
        listen_address=settings.listen,
        settings=settings,
        roles=REQUIRED_ROLES,
        add_servicers=lambda server: checkpoint_pb2_grpc.add_CheckpointServiceServicer_to_server(
            CheckpointServicer(store), server
        ),
        start=start,
        stop=stop,
        options=grpc_options(settings),
        listening={
            "db": redacted(settings.db_url),
            "redis": redacted(settings.redis_url) if settings.redis_url else None,
            "single_writer": settings.memory_answers_heads,
        },
        stopped=stopped,
        system_tenant=SYSTEM_TENANT,
    )


def redacted(url: str) -> str:
    """A URL as it may be logged: its password hidden."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return "(a URL that does not parse)"


def migrate_main(argv: list[str]) -> None:
    """Migrate the database the settings name, say where it is, exit (1 if it cannot)."""
    settings = parse_settings(argv)
    logs.configure("checkpoint_svc", settings.log_level)

    async def migrate() -> str:
        sql = SqlTier(settings.db_url, timeout=settings.sql_timeout)
        try:
            async for attempt in sql_retrying(budget_seconds=30.0):  # as a start does
                with attempt:
                    return await sql.migrate()
            raise AssertionError("unreachable")
        finally:
            await sql.close()

    try:
        revision = asyncio.run(migrate())
    except Exception as exc:  # an unreachable database, a refused migration: one line
        raise SystemExit(
            f"python -m checkpoint_svc migrate: {redacted(settings.db_url)}: "
            f"{type(exc).__name__}: {exc}"
        ) from None
    print(f"{redacted(settings.db_url)}: schema at revision {revision} (the newest)")


def main(argv: list[str] | None = None) -> None:
    settings = parse_settings(argv)
    logs.configure("checkpoint_svc", settings.log_level)
    run(serve(settings))


def reseal_main(argv: list[str]) -> None:
    """Seal again, with the key ring's newest key, every value that is not sealed with it,
    saying how far it got; exit 1 if some value did not open (docs/security.md)."""
    settings = parse_settings(argv)
    logs.configure("checkpoint_svc", settings.log_level)
    prog = "python -m checkpoint_svc reseal"
    if settings.encryption_keys is None:
        raise SystemExit(f"{prog}: error: --encryption-keys is required")
    try:
        ring = KeyRing(settings.encryption_keys)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"{prog}: error: --encryption-keys: {exc}") from None

    async def reseal() -> int:
        sql = SqlTier(settings.db_url, timeout=settings.sql_timeout, sealing=Sealing(ring))
        unreadable, shown = 0, time.monotonic()
        try:
            last = None
            async for progress in sql.reseal():
                if last is not None and last.table != progress.table:
                    print(_reseal_line(last), flush=True)
                    unreadable += last.unreadable
                elif time.monotonic() - shown > 5:
                    print(_reseal_line(progress) + " ...", flush=True)
                    shown = time.monotonic()
                last = progress
            if last is not None:
                print(_reseal_line(last), flush=True)
                unreadable += last.unreadable
        finally:
            await sql.close()
        return unreadable

    try:
        unreadable = asyncio.run(reseal())
    except Exception as exc:  # an unreachable database: one line
        raise SystemExit(
            f"{prog}: {redacted(settings.db_url)}: {type(exc).__name__}: {exc}"
        ) from None
    if unreadable:
        raise SystemExit(f"{prog}: {unreadable} values did not open (the log names each)")


def _reseal_line(progress: Resealed) -> str:
    return (
        f"{progress.table}: {progress.looked_at} looked at, {progress.resealed} sealed again, "
        f"{progress.unreadable} unreadable"
    )


def new_key_main(argv: list[str]) -> None:
    """Print a key ring entry with a fresh key, to append to a --encryption-keys file."""
    if len(argv) > 1 or (argv and argv[0].startswith("-")):
        raise SystemExit("usage: python -m checkpoint_svc new-key [KEY_ID]")
    key_id = argv[0] if argv else time.strftime("k%Y%m%d-%H%M%S", time.gmtime())
    print(f"  - {{id: {key_id}, key: {new_key()}}}")
