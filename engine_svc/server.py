"""Process entry point: the engine's gRPC server, health, reflection, SIGTERM."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

import grpc
from grpc_health.v1 import health, health_pb2

from engine_svc.config import Settings, parse_settings
from engine_svc.engine import Engine
from engine_svc.servicer import REQUIRED_ROLES, EngineServicer
from workflow_rpc import logs
from workflow_rpc.serving import run, serve_until_stopped
from workflow_stubs.engine.v1 import engine_pb2, engine_pb2_grpc

SERVICE_NAME = engine_pb2.DESCRIPTOR.services_by_name["EngineService"].full_name


async def serve(settings: Settings, *, stopped: Awaitable[None] | None = None) -> None:
    engine = Engine(settings)

    async def start(health_servicer: health.aio.HealthServicer) -> None:
        await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        await engine.start()

    async def stop(server: grpc.aio.Server) -> None:
        # Runs are checkpointed and handed over while the last calls finish.
        await asyncio.gather(server.stop(grace=5), engine.close())

    await serve_until_stopped(
        what="engine_svc",
        service_name=SERVICE_NAME,
        listen_address=settings.listen,
        settings=settings,
        roles=REQUIRED_ROLES,
        add_servicers=lambda server: engine_pb2_grpc.add_EngineServiceServicer_to_server(
            EngineServicer(engine), server
        ),
        start=start,
        stop=stop,
        listening={"owner": settings.owner, "checkpoint": settings.checkpoint_addr},
        stopped=stopped,
    )


def main(argv: list[str] | None = None) -> None:
    settings = parse_settings(argv)
    logs.configure("engine_svc", settings.log_level)
    run(serve(settings))
