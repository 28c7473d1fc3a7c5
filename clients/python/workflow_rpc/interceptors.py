"""Server interceptors shared by our gRPC services: each wraps a method's handler once, in a
handler of the same kind that checks every call before the servicer sees it."""

from __future__ import annotations

import abc
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from workflow_rpc.callers import CALLER, Role
from workflow_rpc.identities import Authenticator, PermissionDenied, Unauthenticated
from workflow_rpc.tls import peer_names

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
    # While a stream is open, the check runs again this often at most (between messages
    # either way): a credential revoked or expired meanwhile ends it. None: once, at its start.
    recheck_seconds: float | None = None

    def __init__(self) -> None:
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    @abc.abstractmethod
    def _check_for(self, method: str) -> _Check | None:
        """The check each call of `method` gets (None: none)."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        cached = self._wrapped.get(details.method)
        if cached is not None:
            return cached
        handler = await continuation(details)
        if handler is None:  # no such method: nothing cached (any caller could name any)
            return handler
        check = self._check_for(details.method)
        wrapped = (
            handler
            if check is None
            else _wrap(
                handler, check, self.lenient, self.checks_request_streams, self.recheck_seconds
            )
        )
        self._wrapped[details.method] = wrapped
        return wrapped


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
    until it is given a role. An open stream is checked again as it goes, so a token removed
    from the file, or a JWT past its exp, ends it within a second or so of its next message."""

    recheck_seconds = 1.0

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
            def names() -> list[str]:  # only for a call without a token: mTLS names
                return peer_names(context.auth_context())

            try:
                CALLER.set(admit(method, needed, context.invocation_metadata() or (), names))
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


class _Rechecks:
    """The check again while a stream is open, at most every `seconds`. Its refusal is kept:
    the stream's other direction meets the same one (a second abort would be refused)."""

    def __init__(self, check: _Check, context: grpc.aio.ServicerContext, seconds: float) -> None:
        self.check, self.context, self.seconds = check, context, seconds
        self.last = time.monotonic()
        self.failed: BaseException | None = None

    async def due(self) -> None:
        if self.failed is not None:
            raise self.failed
        now = time.monotonic()
        if now - self.last < self.seconds:
            return
        self.last = now
        try:
            await self.check(None, self.context)
        except BaseException as exc:
            self.failed = exc
            raise


def _wrap(
    handler: grpc.RpcMethodHandler,
    check: _Check,
    lenient: bool,
    streams: bool,
    recheck_seconds: float | None,
) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that runs `check` before each call (and for
    streams, again every `recheck_seconds`)."""
    deserialize = handler.request_deserializer
    parse = _lenient(deserialize) if lenient and deserialize is not None else deserialize
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
            if recheck_seconds is None:
                async for item in stream(request, context):
                    yield item
                return
            again = _Rechecks(check, context, recheck_seconds)
            async with contextlib.aclosing(stream(request, context)) as items:
                async for item in items:
                    await again.due()
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
            if recheck_seconds is None:
                async for item in both(requests, context):
                    yield item
                return
            again = _Rechecks(check, context, recheck_seconds)

            async def checked() -> AsyncIterator[Any]:
                async for request in requests:
                    await again.due()
                    yield request

            async with contextlib.aclosing(both(checked(), context)) as items:
                async for item in items:
                    await again.due()
                    yield item

        return grpc.stream_stream_rpc_method_handler(
            both_call,
            request_deserializer=parse,
            response_serializer=_encoded_or(handler.response_serializer),
        )
    if handler.stream_unary is not None and streams:
        unary_of_stream = handler.stream_unary

        async def stream_unary_call(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            await check(None, context)
            return await unary_of_stream(requests, context)

        return grpc.stream_unary_rpc_method_handler(
            stream_unary_call,
            request_deserializer=parse,
            response_serializer=handler.response_serializer,
        )
    return handler  # a stream of requests with a check of messages only: nothing to check
