"""Process entry point: the engine's gRPC server, health, reflection, SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

import grpc
import prometheus_client
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from checkpoint_svc import logs
from checkpoint_svc.interceptors import RejectMalformedRequests
from checkpoint_svc.server import GIL_SWITCH_INTERVAL
from engine_svc.config import Settings, parse_settings
from engine_svc.engine import Engine
from engine_svc.servicer import EngineServicer
from workflow_stubs.engine.v1 import engine_pb2, engine_pb2_grpc

log = logging.getLogger("engine_svc")
SERVICE_NAME = engine_pb2.DESCRIPTOR.services_by_name["EngineService"].full_name


async def serve(settings: Settings) -> None:
    engine = Engine(settings)
    await engine.start()
    server = grpc.aio.server(interceptors=[RejectMalformedRequests()])
    engine_pb2_grpc.add_EngineServiceServicer_to_server(EngineServicer(engine), server)
    health_servicer = health.aio.HealthServicer()
    await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [
            SERVICE_NAME,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ],
        server,
    )
    if settings.metrics_port:
        host = settings.listen.rsplit(":", 1)[0].strip("[]") or "0.0.0.0"
        prometheus_client.start_http_server(settings.metrics_port, addr=host)
    if server.add_insecure_port(settings.listen) == 0:
        raise SystemExit(f"cannot listen on {settings.listen}")
    await server.start()
    log.info(
        "engine listening",
        extra={
            "listen": settings.listen,
            "owner": settings.owner,
            "checkpoint": settings.checkpoint_addr,
        },
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")
    await health_servicer.enter_graceful_shutdown()
    # Runs are checkpointed and handed over while the last calls finish.
    await asyncio.gather(server.stop(grace=5), engine.close())
    log.info("stopped")


def main(argv: list[str] | None = None) -> None:
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)
    settings = parse_settings(argv)
    logs.configure("engine_svc", settings.log_level)
    try:
        asyncio.run(serve(settings))
    except KeyboardInterrupt:
        pass
