"""A health probe for containers: `python -m workflow_rpc.probe [ADDRESS]` exits 0 when the
service at ADDRESS (default: this container's own service, from CHECKPOINT_LISTEN or
ENGINE_LISTEN, else 127.0.0.1:50051) answers grpc.health.v1 SERVING for "", 1 otherwise."""

from __future__ import annotations

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def default_address() -> str:
    """127.0.0.1 at the port this container's service listens on."""
    listen = os.environ.get("ENGINE_LISTEN") or os.environ.get("CHECKPOINT_LISTEN") or ":50051"
    return f"127.0.0.1:{listen.rpartition(':')[2]}"


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
    sys.exit(0 if serving(args[0] if args else default_address()) else 1)


if __name__ == "__main__":
    main()
