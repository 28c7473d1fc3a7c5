"""Channels to the two services: retries of UNAVAILABLE come from gRPC's service config
(not hand-written loops), the tenant travels as `x-tenant-id` metadata and a bearer token as
`authorization`; TLS is optional.
The one retry policy is declared here, for gRPC's unary calls and, through tenacity, for the
calls of a Session stream, which the service config does not cover."""

from __future__ import annotations

import json
from dataclasses import dataclass

import grpc
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential

from workflow_rpc.headers import tenant_metadata
from workflow_rpc.tls import channel_credentials

RETRY_ATTEMPTS = 5  # in all, the first one included
RETRY_INITIAL_BACKOFF = 0.1  # seconds before the second attempt, doubled each time after it
RETRY_MAX_BACKOFF = 2.0
RETRY_POLICY = {
    "maxAttempts": RETRY_ATTEMPTS,
    "initialBackoff": f"{RETRY_INITIAL_BACKOFF}s",
    "maxBackoff": f"{RETRY_MAX_BACKOFF}s",
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


def unavailable(exc: BaseException) -> bool:
    return isinstance(exc, grpc.aio.AioRpcError) and exc.code() == grpc.StatusCode.UNAVAILABLE


def retrying_unavailable(attempts: int = RETRY_ATTEMPTS) -> AsyncRetrying:
    """RETRY_POLICY for calls gRPC does not retry itself (those of a Session stream)."""
    return AsyncRetrying(
        retry=retry_if_exception(unavailable),
        stop=stop_after_attempt(attempts),
        wait=wait_exponential(multiplier=RETRY_INITIAL_BACKOFF, max=RETRY_MAX_BACKOFF),
        reraise=True,
    )


@dataclass(frozen=True, slots=True)
class Connection:
    """Where a service is and how to talk to it."""

    address: str
    tenant: str | None = None  # None: none named, so the token's tenant, else "default"
    timeout: float = 30.0  # default deadline of unary calls, seconds
    tls: bool = False
    ca_file: str | None = None  # PEM roots for TLS; the system's if None
    token: str | None = None  # a bearer token, for a service that checks credentials
    cert_file: str | None = None  # PEM client certificate, for mTLS (with key_file)
    key_file: str | None = None

    def __repr__(self) -> str:  # never the token
        return f"Connection({self.address!r}, tenant={self.tenant!r})"

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return tenant_metadata(self.tenant, self.token)

    @property
    def secure(self) -> bool:
        return bool(self.tls or self.ca_file or self.cert_file)

    def _credentials(self) -> grpc.ChannelCredentials:
        return channel_credentials(self.ca_file, self.cert_file, self.key_file)

    def aio_channel(self) -> grpc.aio.Channel:
        if self.secure:
            return grpc.aio.secure_channel(self.address, self._credentials(), options=_OPTIONS)
        return grpc.aio.insecure_channel(self.address, options=_OPTIONS)

    def channel(self) -> grpc.Channel:
        if self.secure:
            return grpc.secure_channel(self.address, self._credentials(), options=_OPTIONS)
        return grpc.insecure_channel(self.address, options=_OPTIONS)
