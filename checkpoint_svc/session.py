"""The Session stream: the hot calls of one client on one bidirectional stream.

A call on the stream costs about half the CPU of the same unary RPC on both sides (no call
set-up, metadata or status per call), and the calls of one stream run concurrently, so the
Saves of all of an engine's runs share group commits. Each call runs through the very
handler of its unary RPC, with the stream's metadata, and answers with what that handler
returns or the status it ends with. Calls sent together in one message, and answers ready
together, travel as one message's `batch` (docs/api.md#session).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from workflow_rpc.headers import BATCHES_HEADER, REQUIRED_HEAD_HEADER
from workflow_stubs.checkpoint.v1 import checkpoint_pb2 as pb

log = logging.getLogger(__name__)

_DETAILS_KEY = "grpc-status-details-bin"
# Calls one message may carry (its own and its batch's): RESOURCE_EXHAUSTED beyond, which
# ends the stream (docs/checkpoint-service.md#limits).
MAX_CALLS_PER_MESSAGE = 1000
# Answers in one message, at most: how many, and up to how many bytes (a bigger answer goes
# alone, uncopied; the client's receive limit stays far away).
BATCH_MAX_CALLS = 64
BATCH_MAX_BYTES = 1 << 20
# The unary handler of each call a SessionRequest may carry, by its oneof field name.
CALLS = {
    "save": "Save",
    "put_writes": "PutWrites",
    "publish": "Publish",
    "restore": "Restore",
    "acquire_lease": "AcquireLease",
    "renew_lease": "RenewLease",
    "release_lease": "ReleaseLease",
    "get_thread": "GetThread",
}


class _CallEnded(Exception):
    """A call's handler ended it with a status (what abort does to a unary call)."""

    def __init__(self, error: pb.CallError) -> None:
        super().__init__(error.message)
        self.error = error


class SessionCallContext:
    """What a unary handler sees of its call when it runs on a Session stream: the stream's
    metadata; aborting ends this one call, not the stream."""

    def __init__(self, stream: grpc.aio.ServicerContext) -> None:
        self._stream = stream
        # The stream's tenant once a handler has read it (servicer.tenant_of): the same for
        # every call on the stream.
        self.known_tenant: str | None = None

    def invocation_metadata(self) -> Any:
        return self._stream.invocation_metadata()

    async def abort_with_status(self, status: grpc.Status) -> None:
        details = b""
        for key, value in status.trailing_metadata or ():
            if key == _DETAILS_KEY:
                details = value
        raise _CallEnded(
            pb.CallError(code=status.code.value[0], message=status.details, details=details)
        )

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        raise _CallEnded(pb.CallError(code=code.value[0], message=details))


async def serve_session(
    handler_of: Callable[[str], Callable[[Any, Any], Awaitable[Any]]],
    requests: AsyncIterator[pb.SessionRequest],
    stream: grpc.aio.ServicerContext,
    stopping: asyncio.Event | None = None,
) -> AsyncIterator[pb.SessionResponse]:
    """Run each call as it comes and yield its answer when it has one; end once the client
    has closed its side and every call is answered. Once `stopping` is set (the service is
    shutting down) it reads no more calls, answers those it has, and ends UNAVAILABLE, so
    that the client takes its next calls elsewhere instead of holding the shutdown for the
    whole grace period."""
    answers: asyncio.Queue[pb.SessionResponse | None] = asyncio.Queue()
    unanswered = 0
    calls: set[asyncio.Task] = set()

    def answer(response: pb.SessionResponse) -> None:
        nonlocal unanswered
        unanswered -= 1  # with the put, in one step: the loop below never misses the last
        answers.put_nowait(response)

    async def run(request: pb.SessionRequest, batched: bool) -> None:
        kind = request.WhichOneof("call")
        try:
            if kind is None or (batched and request.batch):
                why = "must name a call" if kind is None else "in a batch carries no batch"
                raise _CallEnded(
                    pb.CallError(
                        code=grpc.StatusCode.INVALID_ARGUMENT.value[0],
                        message=f"a SessionRequest {why}",
                    )
                )
            result = await handler_of(CALLS[kind])(getattr(request, kind), context)
            answer(pb.SessionResponse(call_id=request.call_id, **{kind: result}))
        except _CallEnded as ended:
            answer(pb.SessionResponse(call_id=request.call_id, error=ended.error))
        except asyncio.CancelledError:
            raise
        except Exception:  # our bug: this call fails, the stream and its other calls go on
            log.exception("session call failed", extra={"call": kind})
            error = pb.CallError(code=grpc.StatusCode.INTERNAL.value[0], message="internal error")
            answer(pb.SessionResponse(call_id=request.call_id, error=error))

    def start(request: pb.SessionRequest, batched: bool = False) -> None:
        nonlocal unanswered
        unanswered += 1
        task = asyncio.create_task(run(request, batched))
        calls.add(task)
        task.add_done_callback(calls.discard)

    async def read() -> None:
        try:
            async for request in requests:
                if not isinstance(request, pb.SessionRequest):  # malformed bytes
                    await stream.abort(
                        grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: {request.reason}"
                    )
                batch = request.batch
                if not batch:
                    start(request)
                    continue
                own = request.WhichOneof("call") is not None
                if len(batch) + own > MAX_CALLS_PER_MESSAGE:
                    await stream.abort(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"a Session message carries at most {MAX_CALLS_PER_MESSAGE} calls",
                    )
                if own:
                    start(request)
                for call in batch:
                    start(call, batched=True)
        finally:
            answers.put_nowait(None)  # the client's side is closed (or broke)

    context = SessionCallContext(stream)  # one for all the stream's calls
    batches = (BATCHES_HEADER, "1") in tuple(stream.invocation_metadata() or ())
    await stream.send_initial_metadata(((BATCHES_HEADER, "1"), (REQUIRED_HEAD_HEADER, "1")))
    reader = asyncio.create_task(read())
    closed = False
    stopped = False

    async def stop_reading() -> None:
        nonlocal stopped
        assert stopping is not None
        await stopping.wait()
        stopped = True
        reader.cancel()  # its `finally` says the client's side is done

    stopper = asyncio.create_task(stop_reading()) if stopping is not None else None

    def check_reading() -> None:
        """Once the client's side ended: re-raise what broke the reading, if anything did."""
        if reader.done() and not reader.cancelled() and reader.exception() is not None:
            raise reader.exception()  # type: ignore[misc]

    try:
        # Until the client's side is closed and every answer is sent, not merely made.
        while not (closed and unanswered == 0 and answers.empty()):
            item = await answers.get()
            if item is None:
                closed = True
                check_reading()
                continue
            # The answers ready by now go with it, while the message stays small.
            size = item.ByteSize() if batches else 0
            while batches and not answers.empty() and len(item.batch) < BATCH_MAX_CALLS - 1:
                more = answers.get_nowait()
                if more is None:
                    closed = True  # checked once what is gathered is sent
                    continue
                more_size = more.ByteSize()
                if size + more_size > BATCH_MAX_BYTES:
                    yield item
                    item, size = more, more_size
                else:
                    item.batch.append(more)
                    size += more_size
            yield item
            if closed:
                check_reading()
        if stopped:
            await stream.abort(
                grpc.StatusCode.UNAVAILABLE, "the service is shutting down; reconnect"
            )
    finally:
        reader.cancel()
        if stopper is not None:
            stopper.cancel()
        for task in list(calls):
            task.cancel()


__all__ = ["CALLS", "SessionCallContext", "serve_session"]
