"""Starting and stopping one of our gRPC servers: the port taken exclusively, health and
reflection, Prometheus metrics, uvloop, and the stop on SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from typing import Any

import grpc
import prometheus_client
import uvloop
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from workflow_rpc.callers import Role
from workflow_rpc.identities import authenticator_of
from workflow_rpc.interceptors import Authenticate, RejectMalformedRequests
from workflow_rpc.settings import ServiceSettings
from workflow_rpc.tls import server_credentials

# gRPC turns SO_REUSEPORT on by default: a second server on a port in use would then share
# it silently (taking some of its connections). Every server of ours refuses that.
EXCLUSIVE_PORT = ("grpc.so_reuseport", 0)
# grpc.aio polls its completion queue from its own threads; with the default 5 ms GIL switch
# interval the event loop waits on them, which halved Save throughput in bench/ (measured:
# 655 vs 1389 saves/s at 16 clients).
GIL_SWITCH_INTERVAL = 0.0005


def listen(
    server: grpc.aio.Server,
    address: str,
    what: str,
    credentials: grpc.ServerCredentials | None = None,
) -> int:
    """Bind the server's port (with TLS if `credentials`), or stop the process with a clear
    error if it is taken."""
    try:
        if credentials is not None:
            port = server.add_secure_port(address, credentials)
        else:
            port = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise SystemExit(
            f"{what}: cannot listen on {address}: {exc} (is the port in use?)"
        ) from None
    if port == 0:
        raise SystemExit(f"{what}: cannot listen on {address} (is the port in use?)")
    return port


def loopback(address: str) -> bool:
    """Whether a listen address (host:port) is reachable from this machine only."""
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name, or "" for every address
        return False


def check_exposure(address: str, authenticated: bool, insecure: bool, what: str) -> None:
    """Without credentials checked, a service listens on loopback only, unless --insecure
    says otherwise (docs/security.md#safe-by-default)."""
    if authenticated or loopback(address):
        return
    if not insecure:
        print(
            f"{what}: refusing to listen on {address} with no credentials checked: configure "
            "--auth-token-file or --auth-jwt-secret-file/--auth-jwks-file, listen on a "
            "loopback address, or pass --insecure",
            file=sys.stderr,
        )
        raise SystemExit(2)  # a bad setting, as the settings' own errors
    logging.getLogger(what).warning(
        "listening beyond loopback with no credentials checked (--insecure): anyone who "
        "reaches the port may do anything",
        extra={"listen": address},
    )


def tls_of(settings: ServiceSettings) -> grpc.ServerCredentials | None:
    """The settings' server TLS (None: plaintext), or the process stops with one line naming
    the file it cannot read."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    try:
        return server_credentials(
            settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file
        )
    except (OSError, ValueError) as exc:
        prog = settings.model_config.get("cli_prog_name") or "settings"
        raise SystemExit(f"{prog}: error: TLS: {exc}") from None


def serve_metrics(port: int, listen_address: str, what: str) -> None:
    """Prometheus metrics on the listen address's host, or a clear error if the port is taken."""
    host = listen_address.rsplit(":", 1)[0].strip("[]") or "0.0.0.0"
    try:
        prometheus_client.start_http_server(port, addr=host)
    except OSError as exc:
        raise SystemExit(f"{what}: cannot serve metrics on {host}:{port}: {exc}") from None


def add_health_and_reflection(
    server: grpc.aio.Server, service_name: str
) -> health.aio.HealthServicer:
    """The standard health service (its entries set by the caller) and server reflection
    of `service_name` and health."""
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    reflection.enable_server_reflection(
        [
            service_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ],
        server,
    )
    return servicer


async def until_stopped() -> None:
    """Return on SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def serve_until_stopped(
    *,
    what: str,
    service_name: str,
    listen_address: str,
    settings: ServiceSettings,
    roles: Mapping[str, Role],
    add_servicers: Callable[[grpc.aio.Server], None],
    start: Callable[[health.aio.HealthServicer], Awaitable[None]],
    stop: Callable[[grpc.aio.Server], Awaitable[None]],
    options: Sequence[tuple[str, Any]] = (),
    listening: Mapping[str, Any] | None = None,
    stopped: Awaitable[None] | None = None,
    system_tenant: str | None = None,
) -> None:
    """One of our services from start to stop: the server with its servicers, health,
    reflection and the malformed-request interceptor; the port taken before anything else
    (a second process on it stops there); metrics; `start` (given the health servicer);
    serving until SIGTERM or SIGINT (or `stopped`, for a service run inside another
    process, which has no signals of its own); then health NOT_SERVING and `stop` (given the
    server). The settings say who may call (every call but health and reflection needs a
    credential with the role `roles` gives its method; without credentials configured, the
    address must be loopback unless --insecure), with TLS or not, and the metrics port.
    `system_tenant`: a tenant only the system role may name."""
    log = logging.getLogger(what)
    auth = authenticator_of(settings, system_tenant=system_tenant)
    authenticate = Authenticate(auth, roles) if auth is not None else None
    check_exposure(listen_address, authenticate is not None, settings.insecure, what)
    tls = tls_of(settings)
    interceptors: list[grpc.aio.ServerInterceptor] = [RejectMalformedRequests()]
    if authenticate is not None:
        interceptors.insert(0, authenticate)
    server = grpc.aio.server(interceptors=interceptors, options=[EXCLUSIVE_PORT, *options])
    add_servicers(server)
    health_servicer = add_health_and_reflection(server, service_name)
    listen(server, listen_address, what, tls)
    if settings.metrics_port:
        serve_metrics(settings.metrics_port, listen_address, what)
    await start(health_servicer)
    await server.start()
    log.info(
        "listening",
        extra={
            "listen": listen_address,
            "credentials": "checked" if authenticate is not None else "none",
            "tls": tls is not None,
            **(listening or {}),
        },
    )
    await (stopped if stopped is not None else until_stopped())
    log.info("shutting down")
    await health_servicer.enter_graceful_shutdown()
    await stop(server)
    log.info("stopped")


def run(service: Coroutine[Any, Any, None]) -> None:
    """Run a service's main coroutine to its end, on uvloop: about a tenth less CPU per call
    than asyncio's own loop (docs/benchmarks.md)."""
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)
    try:
        uvloop.run(service)
    except KeyboardInterrupt:
        pass


__all__ = [
    "EXCLUSIVE_PORT",
    "add_health_and_reflection",
    "check_exposure",
    "listen",
    "loopback",
    "run",
    "serve_metrics",
    "serve_until_stopped",
    "tls_of",
    "until_stopped",
]
