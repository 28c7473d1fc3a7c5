"""A health probe for containers: `python -m workflow_rpc.probe [ADDRESS]` exits 0 when the
service at ADDRESS answers grpc.health.v1 SERVING for "", 1 otherwise. Without ADDRESS it
asks this container's own service on 127.0.0.1: the port of ENGINE_LISTEN if that is set,
else that of CHECKPOINT_LISTEN (50051 by default) or the engine's default 50052 (an engine
started with --listen as a flag), whichever answers. A TLS service is asked over TLS with
`--ca` (and `--cert`/`--key` where it wants a client certificate), or $WF_CA, $WF_CERT and
$WF_KEY, as `wf` takes them; `--server-name` when its certificate does not name 127.0.0.1."""

from __future__ import annotations

import argparse
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from workflow_rpc.tls import channel_credentials


def default_addresses() -> list[str]:
    """Where this container's own service may listen, on 127.0.0.1."""
    if engine := os.environ.get("ENGINE_LISTEN"):
        ports = [engine.rpartition(":")[2]]
    else:
        checkpoint = os.environ.get("CHECKPOINT_LISTEN") or ":50051"
        ports = [checkpoint.rpartition(":")[2], "50052"]
    return [f"127.0.0.1:{port}" for port in dict.fromkeys(ports)]


def serving(
    address: str,
    timeout: float = 3.0,
    credentials: grpc.ChannelCredentials | None = None,
    server_name: str | None = None,
) -> bool:
    options: list[tuple[str, object]] = [("grpc.enable_http_proxy", 0)]
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    channel = (
        grpc.secure_channel(address, credentials, options=options)
        if credentials is not None
        else grpc.insecure_channel(address, options=options)
    )
    with channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout
            )
        except grpc.RpcError as exc:
            print(f"probe: {address}: {exc.code().name}", file=sys.stderr)
            return False
    return answer.status == health_pb2.HealthCheckResponse.SERVING


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m workflow_rpc.probe", description=__doc__)
    parser.add_argument("address", nargs="?", help="host:port (default: this container's)")
    parser.add_argument("--ca", default=os.environ.get("WF_CA"), help="PEM CA: ask over TLS")
    parser.add_argument("--cert", default=os.environ.get("WF_CERT"), help="client certificate")
    parser.add_argument("--key", default=os.environ.get("WF_KEY"), help="its private key")
    parser.add_argument("--server-name", help="the name the service's certificate carries")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    tls = args.ca or args.cert or args.key
    try:
        credentials = channel_credentials(args.ca, args.cert, args.key) if tls else None
    except (OSError, ValueError) as exc:
        parser.exit(2, f"probe: {exc}\n")
    addresses = [args.address] if args.address else default_addresses()
    ok = any(serving(a, credentials=credentials, server_name=args.server_name) for a in addresses)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
