"""Channels to the two services: retries of UNAVAILABLE come from gRPC's service config
(not hand-written loops), the tenant travels as `x-tenant-id` metadata, TLS is optional."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import grpc

from workflow_rpc.headers import DEFAULT_TENANT, tenant_metadata

RETRY_POLICY = {
    "maxAttempts": 5,
    "initialBackoff": "0.1s",
    "maxBackoff": "2s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}
SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [
                    {"service": "engine.v1.EngineService"},
                    {"service": "checkpoint.v1.CheckpointService"},
                ],
                "retryPolicy": RETRY_POLICY,
            }
        ]
    }
)
_OPTIONS = [
    ("grpc.service_config", SERVICE_CONFIG),
    ("grpc.enable_retries", 1),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
]


@dataclass(frozen=True, slots=True)
class Connection:
    """Where a service is and how to talk to it."""

    address: str
    tenant: str = DEFAULT_TENANT
    timeout: float = 30.0  # default deadline of unary calls, seconds
    tls: bool = False
    ca_file: str | None = None  # PEM roots for TLS; the system's if None

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return tenant_metadata(self.tenant)

    def _credentials(self) -> grpc.ChannelCredentials:
        roots = Path(self.ca_file).read_bytes() if self.ca_file else None
        return grpc.ssl_channel_credentials(root_certificates=roots)

    def aio_channel(self) -> grpc.aio.Channel:
        if self.tls or self.ca_file:
            return grpc.aio.secure_channel(self.address, self._credentials(), options=_OPTIONS)
        return grpc.aio.insecure_channel(self.address, options=_OPTIONS)

    def channel(self) -> grpc.Channel:
        if self.tls or self.ca_file:
            return grpc.secure_channel(self.address, self._credentials(), options=_OPTIONS)
        return grpc.insecure_channel(self.address, options=_OPTIONS)
