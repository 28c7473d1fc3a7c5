"""Hot store calls on one Session stream (docs/api.md#session): the engine's, per tenant
(docs/engine.md#store-calls), and the LangGraph saver's.

Each method takes a request and returns a response as the stub's unary method does, and
fails the same way (`grpc.aio.AioRpcError`, its details trailer included), so the callers'
retries and error handling do not change. A broken stream fails every call in flight with
UNAVAILABLE (their answers are lost, not refused: Saves and Publishes are retried by request
id) and the next call opens a new stream. Calls made while a message is being written go
together in the next one (a SessionRequest's `batch`), and answers may come the same way.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from workflow_rpc.headers import BATCHES_HEADER
from workflow_stubs.checkpoint.v1 import checkpoint_pb2 as cpb
from workflow_stubs.checkpoint.v1 import checkpoint_pb2_grpc as cpb_grpc

log = logging.getLogger(__name__)

_DETAILS_KEY = "grpc-status-details-bin"
_CODES = {code.value[0]: code for code in grpc.StatusCode}
# Calls in one message, at most: how many, and up to how many bytes (a bigger call goes
# alone, uncopied; the store's receive limit stays far away).
BATCH_MAX_CALLS = 64
BATCH_MAX_BYTES = 1 << 20


def error_of(error: cpb.CallError) -> grpc.aio.AioRpcError:
    """A Session call's error as its unary call would have raised it."""
    trailing = grpc.aio.Metadata()
    if error.details:
        trailing.add(_DETAILS_KEY, error.details)
    code = _CODES.get(error.code, grpc.StatusCode.UNKNOWN)
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, details=error.message)


def _call_error(
    why: str, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE
) -> grpc.aio.AioRpcError:
    """What a call on the session fails with when its stream cannot answer it."""
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=why)


# What a stream refused for its credentials fails its calls with: no retry makes them pass.
_REFUSED = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})


def _why(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name} {exc.details()}"
    return f"{type(exc).__name__}: {exc}"


class _Stream:
    """One open Session call and the calls waiting for their answers on it."""

    def __init__(self, call: grpc.aio.StreamStreamCall) -> None:
        self.call = call
        self.waiting: dict[int, asyncio.Future] = {}
        self.unsent: collections.deque[cpb.SessionRequest] = collections.deque()  # next message
        self.wake = asyncio.Event()  # calls to send
        self.batches = False  # the store said it reads batched calls
        self.headers: frozenset[tuple[str, str]] = frozenset()  # the store's first headers
        self.sender: asyncio.Task | None = None  # the one writer (one write at a time)
        self.reader: asyncio.Task | None = None
        self.broken = False


class StoreSession:
    """Save, PutWrites, Publish, Restore, GetThread and the lease calls of one tenant, on a
    Session stream of the store; the stub's other calls stay unary. It belongs to the event
    loop it was first used in, like its channel."""

    def __init__(self, *, stub: cpb_grpc.CheckpointServiceStub, metadata: Any) -> None:
        self._stub = stub
        self._md = metadata
        self._ids = itertools.count(1)
        self._stream: _Stream | None = None
        self._closed = False
        self.Save = self._method("save")
        self.PutWrites = self._method("put_writes")
        self.Publish = self._method("publish")
        self.Restore = self._method("restore")
        self.AcquireLease = self._method("acquire_lease")
        self.RenewLease = self._method("renew_lease")
        self.ReleaseLease = self._method("release_lease")
        self.GetThread = self._method("get_thread")

    def _method(self, kind: str) -> Callable[..., Awaitable[Any]]:
        # The stub's signature (metadata: the session's own; timeout: seconds per call).
        async def method(request: Any, *, metadata: Any = None, timeout: float | None = None):  # noqa: ASYNC109
            return await self.call(kind, request, timeout)

        return method

    def _open(self) -> _Stream:
        if self._stream is None or self._stream.broken:
            metadata = (*tuple(self._md or ()), (BATCHES_HEADER, "1"))
            stream = _Stream(self._stub.Session(metadata=metadata))
            stream.reader = asyncio.create_task(self._read(stream), name="store-session")
            stream.sender = asyncio.create_task(self._send(stream), name="store-session-send")
            self._stream = stream
        return self._stream

    @property
    def closed(self) -> bool:
        """close() was called: every call fails with UNAVAILABLE from now on."""
        return self._closed

    def store_says(self, header: str) -> bool:
        """Whether the store of the open stream said `header: 1` in its first headers (False
        before they came, or with no stream open)."""
        stream = self._stream
        return stream is not None and not stream.broken and (header, "1") in stream.headers

    async def call(self, kind: str, request: Any, seconds: float | None) -> Any:
        """One call: its response, or the AioRpcError the unary call would raise."""
        if self._closed:
            raise _call_error("the engine is shutting down")
        stream = self._open()
        call_id = next(self._ids)
        message = cpb.SessionRequest(call_id=call_id, **{kind: request})
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        stream.waiting[call_id] = future
        stream.unsent.append(message)
        stream.wake.set()
        try:
            async with asyncio.timeout(seconds):  # cheaper than wait_for: no waiter of its own
                return await future
        except TimeoutError:
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                grpc.aio.Metadata(),
                grpc.aio.Metadata(),
                details="deadline exceeded on the store session",
            ) from None
        finally:
            stream.waiting.pop(call_id, None)

    async def _send(self, stream: _Stream) -> None:
        """Write the calls waiting to be sent: those made while a message was being written
        (or in the same turn of the event loop) go together in the next one."""
        unsent, waiting = stream.unsent, stream.waiting
        try:
            while not stream.broken:
                if not unsent:
                    stream.wake.clear()
                    await stream.wake.wait()
                    continue
                calls: list[cpb.SessionRequest] = []
                size = 0
                while unsent and len(calls) < BATCH_MAX_CALLS:
                    if unsent[0].call_id not in waiting:
                        unsent.popleft()  # its caller gave up before it was sent: it is not
                        continue
                    if calls and not stream.batches:
                        break
                    size += unsent[0].ByteSize() if stream.batches else 0
                    if calls and size > BATCH_MAX_BYTES:
                        break
                    calls.append(unsent.popleft())
                if calls:
                    calls[0].batch.extend(calls[1:])
                    await stream.call.write(calls[0])
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError) as exc:
            self._break(stream, f"store session broken: {_why(exc)}")
        except Exception as exc:  # our bug: no call may wait for a writer that is gone
            log.exception("store session writer failed")
            self._break(stream, f"store session writer failed: {exc}")

    async def _read(self, stream: _Stream) -> None:
        why, code = "store session ended", grpc.StatusCode.UNAVAILABLE
        try:
            stream.headers = frozenset(tuple(h) for h in await stream.call.initial_metadata() or ())
            stream.batches = (BATCHES_HEADER, "1") in stream.headers
            async for response in stream.call:
                self._answer(stream, response)
                for answer in response.batch:
                    self._answer(stream, answer)
        except grpc.aio.AioRpcError as exc:
            why = f"store session broken: {_why(exc)}"
            if exc.code() in _REFUSED:
                code = exc.code()
        except asyncio.CancelledError:
            why = "store session closed"
            raise
        finally:
            self._break(stream, why, code)

    @staticmethod
    def _answer(stream: _Stream, response: cpb.SessionResponse) -> None:
        kind = response.WhichOneof("result")
        if kind is None:
            return  # a message carrying only a batch
        future = stream.waiting.pop(response.call_id, None)
        if future is None or future.done():
            return  # its caller gave up (deadline, cancellation)
        if kind == "error":
            future.set_exception(error_of(response.error))
        else:
            future.set_result(getattr(response, kind))

    def _break(
        self, stream: _Stream, why: str, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE
    ) -> None:
        """The stream is gone: every call on it fails with UNAVAILABLE, to be retried (or, if
        the store refused its credentials, with that refusal)."""
        stream.broken = True
        stream.unsent.clear()
        if stream.sender is not None and stream.sender is not asyncio.current_task():
            stream.sender.cancel()
        for future in stream.waiting.values():
            if not future.done():
                future.set_exception(_call_error(why, code))
        stream.waiting.clear()
        if stream is self._stream:
            self._stream = None
        if not stream.call.done():
            stream.call.cancel()

    async def close(self) -> None:
        self._closed = True
        stream, self._stream = self._stream, None
        if stream is None:
            return
        for task in (stream.sender, stream.reader):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task


__all__ = ["StoreSession", "error_of"]
