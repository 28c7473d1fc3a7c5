"""The HTTP client of `http` nodes, held to the engine's HttpPolicy (engine_svc/http_policy.py,
docs/security.md#nodes-that-cannot-escape). Imported at the first http node: httpx is a
seventh of an engine's start-up, for the many engines that run none."""

from __future__ import annotations

import asyncio
import socket
import typing

import httpcore
import httpx

from engine_svc.http_policy import HttpPolicy

__all__ = ["guarded_client"]


class _GuardedBackend(httpcore.AnyIOBackend):
    """Connects only to the checked addresses of a host."""

    def __init__(self, policy: HttpPolicy) -> None:
        self.policy = policy

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's signature)
        local_address: str | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            found = await asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM
            )
        except OSError as exc:
            raise httpcore.ConnectError(f"{host}: {exc}") from exc
        addresses = list(dict.fromkeys(str(info[4][0]) for info in found))
        for address in addresses:  # every answer: the connect must not pick an unchecked one
            self.policy.check_address(host, address)
        return await super().connect_tcp(addresses[0], port, timeout, local_address, socket_options)


class _GuardedTransport(httpx.AsyncHTTPTransport):
    def __init__(self, policy: HttpPolicy) -> None:
        super().__init__(trust_env=False)
        # httpx builds its connection pool with the default network backend and has no
        # parameter for another: the pool is made again, with the same TLS settings.
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(trust_env=False),
            network_backend=_GuardedBackend(policy),
        )


def guarded_client(policy: HttpPolicy) -> httpx.AsyncClient:
    """A client that makes only the requests the policy allows, following redirects (each is
    checked like the first), with no proxy from the environment (it would hide where a
    request goes)."""

    async def check(request: httpx.Request) -> None:
        policy.check_url(str(request.url))

    return httpx.AsyncClient(
        transport=_GuardedTransport(policy),
        follow_redirects=True,
        trust_env=False,
        event_hooks={"request": [check]},
    )
