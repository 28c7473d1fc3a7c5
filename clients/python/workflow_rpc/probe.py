"""A health probe for containers: `python -m workflow_rpc.probe [ADDRESS]` exits 0 when the
service at ADDRESS answers grpc.health.v1 SERVING for "", 1 otherwise. Without ADDRESS it
asks this container's own service on 127.0.0.1: the port of ENGINE_LISTEN if that is set,
else that of CHECKPOINT_LISTEN (50051 by default) or the engine's default 50052 (an engine
started with --listen as a flag), whichever answers."""

from __future__ import annotations

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def default_addresses() -> list[str]:
    """Where this container's own service may listen, on 127.0.0.1."""
    if engine := os.environ.get("ENGINE_LISTEN"):
        ports = [engine.rpartition(":")[2]]
    else:
        checkpoint = os.environ.get("CHECKPOINT_LISTEN") or ":50051"
        ports = [checkpoint.rpartition(":")[2], "50052"]
    return [f"127.0.0.1:{port}" for port in dict.fromkeys(ports)]


def serving(address: str, timeout: float = 3.0) -> bool:
    options = [("grpc.enable_http_proxy", 0)]
    with grpc.insecure_channel(address, options=options) as channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout
            )
        except grpc.RpcError as exc:
            print(f"probe: {address}: {exc.code().name}", file=sys.stderr)
            return False
    return answer.status == health_pb2.HealthCheckResponse.SERVING


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    addresses = args[:1] or default_addresses()
    sys.exit(0 if any(serving(address) for address in addresses) else 1)


if __name__ == "__main__":
    main()
