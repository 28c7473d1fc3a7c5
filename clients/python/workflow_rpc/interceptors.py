"""Server interceptors shared by our gRPC services: each wraps a method's handler once, in a
handler of the same kind that checks every call before the servicer sees it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from workflow_rpc.callers import CALLER, Role
from workflow_rpc.identities import Authenticator, PermissionDenied, Unauthenticated

__all__ = ["OPEN_SERVICES", "Authenticate", "RejectMalformedRequests"]

# Services any caller may use without credentials: probes and tooling need them, and they tell
# nothing of any tenant.
OPEN_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection")

# A check run before each call: given the request (None for a stream of requests) and the
# context, it aborts the call or lets it through.
_Check = Callable[[Any, grpc.aio.ServicerContext], Awaitable[None]]


class _Malformed:
    def __init__(self, reason: str) -> None:
        self.reason = reason


class _Wrapping(grpc.aio.ServerInterceptor):
    """Wraps each method's handler once (cached by method) with the check `_check_for` gives
    it (None: the method's handler as it is)."""

    lenient = False  # the wrapped handler's requests parse to _Malformed instead of failing
    checks_request_streams = True  # the check runs before a stream of requests too

    def __init__(self) -> None:
        self._wrapped: dict[str, grpc.RpcMethodHandler | None] = {}

    def _check_for(self, method: str) -> _Check | None:
        raise NotImplementedError

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = details.method
        if method in self._wrapped:
            cached = self._wrapped[method]
            return cached if cached is not None else await continuation(details)
        handler = await continuation(details)
        check = self._check_for(method) if handler is not None else None
        wrapped = (
            _wrap(handler, check, self.lenient, self.checks_request_streams)
            if check is not None
            else None
        )
        self._wrapped[method] = wrapped
        return wrapped if wrapped is not None else handler


class RejectMalformedRequests(_Wrapping):
    """Bytes that do not parse as the request message are INVALID_ARGUMENT.

    Left to itself, gRPC Python answers them with UNKNOWN; a client can cause
    it, so it must not look like our failure (docs/checkpoint-service.md#errors).
    A malformed message of a stream of requests arrives as _Malformed, for the handler to end
    the stream with.
    """

    lenient = True
    checks_request_streams = False

    def _check_for(self, method: str) -> _Check | None:
        return _reject_malformed


async def _reject_malformed(request: Any, context: grpc.aio.ServicerContext) -> None:
    if isinstance(request, _Malformed):
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: {request.reason}"
        )


class Authenticate(_Wrapping):
    """Every call carries a credential that admits it (docs/security.md): UNAUTHENTICATED
    without a valid one, PERMISSION_DENIED for a role or tenant it lacks. The caller's identity
    is CALLER for the servicer. A method missing from `roles` is refused: a new RPC is closed
    until it is given a role."""

    def __init__(self, authenticator: Authenticator, roles: Mapping[str, Role]) -> None:
        super().__init__()
        self.authenticator = authenticator
        self.roles = dict(roles)
        """The role each method needs, by full method name (/package.Service/Method)."""

    def _check_for(self, method: str) -> _Check | None:
        if method.lstrip("/").split("/", 1)[0] in OPEN_SERVICES:
            return None
        needed = self.roles.get(method)
        admit = self.authenticator.admit

        async def check(request: Any, context: grpc.aio.ServicerContext) -> None:
            try:
                CALLER.set(admit(method, needed, context.invocation_metadata() or ()))
            except Unauthenticated as exc:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
            except PermissionDenied as exc:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))

        return check


def _lenient(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def parse(raw: bytes) -> Any:
        try:
            return deserialize(raw)
        except DecodeError as exc:
            return _Malformed(str(exc))

    return parse


def _encoded_or(serialize: Callable[[Any], bytes] | None) -> Callable[[Any], bytes]:
    """A streamed response may come already encoded (an event sent to many watchers)."""

    def encode(response: Any) -> bytes:
        if isinstance(response, bytes):
            return response
        return serialize(response) if serialize is not None else response

    return encode


def _wrap(
    handler: grpc.RpcMethodHandler, check: _Check, lenient: bool, streams: bool
) -> grpc.RpcMethodHandler | None:
    if handler.request_deserializer is None:
        return None
    parse = _lenient(handler.request_deserializer) if lenient else handler.request_deserializer
    if handler.unary_unary is not None:
        unary = handler.unary_unary

        async def unary_call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await check(request, context)
            return await unary(request, context)

        return grpc.unary_unary_rpc_method_handler(
            unary_call,
            request_deserializer=parse,
            response_serializer=handler.response_serializer,
        )
    if handler.unary_stream is not None:
        stream = handler.unary_stream

        async def stream_call(
            request: Any, context: grpc.aio.ServicerContext
        ) -> AsyncIterator[Any]:
            await check(request, context)
            async for item in stream(request, context):
                yield item

        return grpc.unary_stream_rpc_method_handler(
            stream_call,
            request_deserializer=parse,
            response_serializer=_encoded_or(handler.response_serializer),
        )
    if handler.stream_stream is not None and not streams:
        return grpc.stream_stream_rpc_method_handler(
            handler.stream_stream,
            request_deserializer=parse,
            response_serializer=handler.response_serializer,
        )
    if handler.stream_stream is not None:
        both = handler.stream_stream

        async def both_call(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            await check(None, context)
            async for item in both(requests, context):
                yield item

        return grpc.stream_stream_rpc_method_handler(
            both_call,
            request_deserializer=parse,
            response_serializer=_encoded_or(handler.response_serializer),
        )
    return None
