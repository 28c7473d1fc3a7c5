"""Server interceptors shared by our gRPC services."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError


class _Malformed:
    def __init__(self, reason: str) -> None:
        self.reason = reason


class RejectMalformedRequests(grpc.aio.ServerInterceptor):
    """Bytes that do not parse as the request message are INVALID_ARGUMENT.

    Left to itself, gRPC Python answers them with UNKNOWN; a client can cause
    it, so it must not look like our failure (docs/checkpoint-service.md#errors).
    """

    def __init__(self) -> None:
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        cached = self._wrapped.get(details.method)
        if cached is not None:
            return cached
        handler = await continuation(details)
        wrapped = _wrap(handler) if handler is not None else None
        if wrapped is not None:
            self._wrapped[details.method] = wrapped
            return wrapped
        return handler


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


async def _reject(request: _Malformed, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: {request.reason}")


def _wrap(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler | None:
    if handler.request_deserializer is None:
        return None
    parse = _lenient(handler.request_deserializer)
    if handler.unary_unary is not None:
        unary = handler.unary_unary

        async def unary_call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, _Malformed):
                await _reject(request, context)
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
            if isinstance(request, _Malformed):
                await _reject(request, context)
            async for item in stream(request, context):
                yield item

        return grpc.unary_stream_rpc_method_handler(
            stream_call,
            request_deserializer=parse,
            response_serializer=_encoded_or(handler.response_serializer),
        )
    if handler.stream_stream is not None:
        # A malformed message arrives as _Malformed, for the handler to end the stream with.
        return grpc.stream_stream_rpc_method_handler(
            handler.stream_stream,
            request_deserializer=parse,
            response_serializer=handler.response_serializer,
        )
    return None
