"""Process entry point: the engine's gRPC server, health, reflection, SIGTERM."""

from __future__ import annotations

import asyncio
import logging

import grpc
from grpc_health.v1 import health_pb2

from engine_svc.config import Settings, parse_settings
from engine_svc.engine import Engine
from engine_svc.servicer import EngineServicer
from workflow_rpc import logs
from workflow_rpc.interceptors import RejectMalformedRequests
from workflow_rpc.serving import (
    EXCLUSIVE_PORT,
    add_health_and_reflection,
    listen,
    run,
    serve_metrics,
    until_stopped,
)
from workflow_stubs.engine.v1 import engine_pb2, engine_pb2_grpc

log = logging.getLogger("engine_svc")
SERVICE_NAME = engine_pb2.DESCRIPTOR.services_by_name["EngineService"].full_name


async def serve(settings: Settings) -> None:
    engine = Engine(settings)
    server = grpc.aio.server(interceptors=[RejectMalformedRequests()], options=[EXCLUSIVE_PORT])
    engine_pb2_grpc.add_EngineServiceServicer_to_server(EngineServicer(engine), server)
    health_servicer = add_health_and_reflection(server, SERVICE_NAME)
    await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    # The port first: a second engine on it must stop before it takes over any run.
    listen(server, settings.listen, "engine_svc")
    if settings.metrics_port:
        serve_metrics(settings.metrics_port, settings.listen, "engine_svc")
    await engine.start()
    await server.start()
    log.info(
        "engine listening",
        extra={
            "listen": settings.listen,
            "owner": settings.owner,
            "checkpoint": settings.checkpoint_addr,
        },
    )
    await until_stopped()
    log.info("shutting down")
    await health_servicer.enter_graceful_shutdown()
    # Runs are checkpointed and handed over while the last calls finish.
    await asyncio.gather(server.stop(grace=5), engine.close())
    log.info("stopped")


def main(argv: list[str] | None = None) -> None:
    settings = parse_settings(argv)
    logs.configure("engine_svc", settings.log_level)
    run(serve(settings))
