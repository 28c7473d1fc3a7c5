"""The engine's port to the checkpoint service (docs/engine.md#store-calls).

`Store` is every call the engine makes on one tenant's behalf; `GrpcStore` is its one
implementation and the only code of the engine that sees gRPC's errors. It owns each call's
deadline and the one retry layer (the channel to the store has no retry policy of its own),
and turns a refusal into a `StoreError` that the engine's logic catches by what it means.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any, Protocol

import grpc
from tenacity import AsyncRetrying, retry_if_exception, stop_after_delay, wait_exponential

from workflow_client.store_session import StoreSession
from workflow_rpc.headers import REQUIRED_HEAD_HEADER, tenant_metadata
from workflow_rpc.statuses import REQUIRED_HEAD_MOVED, error_reason
from workflow_stubs.checkpoint.v1 import checkpoint_pb2 as cpb
from workflow_stubs.checkpoint.v1 import checkpoint_pb2_grpc as cpb_grpc

__all__ = [
    "AlreadyExists",
    "Conflict",
    "EngineRefused",
    "GrpcStore",
    "LeaseLost",
    "NotFound",
    "RequiredHeadMoved",
    "Store",
    "StoreError",
    "StoreUnavailable",
    "tenant_metadata",
]

CALL_SECONDS = 10.0  # one attempt's deadline; the retry budget covers longer outages
# How long a call someone is waiting on (an engine RPC) is retried after its first attempt.
ANSWER_RETRY_SECONDS = 2.0
_TRANSIENT = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


class StoreError(Exception):
    """The store refused a call. `code` is its status, which the engine's servicer passes on
    to its own caller when no one handled the refusal."""

    code = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class StoreUnavailable(StoreError):
    """The checkpoint service stayed away past the retry budget. A run stops where its last
    save left it (it never runs on without saving); recovery continues it when the store is
    back."""

    code = grpc.StatusCode.UNAVAILABLE


class NotFound(StoreError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(StoreError):
    """The id is taken (a checkpoint id, so a run's or a workflow version's)."""

    code = grpc.StatusCode.ALREADY_EXISTS


class Conflict(StoreError):
    """The thread changed under the call (its head is not the expected parent): nothing was
    written; read again and retry."""

    code = grpc.StatusCode.ABORTED


class RequiredHeadMoved(Conflict):
    """SaveRequest.required_head named a head the other thread no longer has."""


class LeaseLost(StoreError):
    """The fencing token is not the lease's any more: another owner holds it (for an
    acquire: someone else does)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class EngineRefused(StoreError):
    """The store refused the engine's own credential (--checkpoint-token-file): an operator's
    mistake, not the caller's, so it reaches callers as INTERNAL."""

    code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[StoreError]] = {
    grpc.StatusCode.UNAUTHENTICATED: EngineRefused,
    grpc.StatusCode.PERMISSION_DENIED: EngineRefused,
    grpc.StatusCode.UNAVAILABLE: StoreUnavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: StoreUnavailable,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.ABORTED: Conflict,
    grpc.StatusCode.FAILED_PRECONDITION: LeaseLost,
}


def _refusal(exc: grpc.aio.AioRpcError) -> BaseException:
    """A failed call as the engine sees it. A call cut off while our task is being cancelled
    is that cancellation (a loop that swallowed it would run on after its run ended); any
    other CANCELLED is the store's (it stopped past its grace period)."""
    code = exc.code()
    task = asyncio.current_task()
    if code == grpc.StatusCode.CANCELLED and task is not None and task.cancelling():
        return asyncio.CancelledError()
    kind = _BY_CODE.get(code, StoreError)
    if kind is Conflict and error_reason(exc) == REQUIRED_HEAD_MOVED:
        kind = RequiredHeadMoved
    if kind is EngineRefused:
        return EngineRefused(
            f"the checkpoint service refused this engine's credential ({code.name}: "
            f"{exc.details()}): check --checkpoint-token-file"
        )
    return kind(exc.details() or code.name, code)


def _transient(exc: BaseException) -> bool:
    return isinstance(exc, grpc.aio.AioRpcError) and exc.code() in _TRANSIENT


class Store(Protocol):
    """The checkpoint service's calls the engine makes, for one tenant. Each fails with a
    StoreError (or CancelledError, when its task is cancelled); a transient failure is
    retried within the store's budget first. The engine's Saves and Publishes carry request
    ids and PutWrites are upserts, so a retry after a lost answer applies nothing twice."""

    async def save(self, request: cpb.SaveRequest) -> cpb.SaveResponse: ...

    async def put_writes(self, request: cpb.PutWritesRequest) -> cpb.PutWritesResponse: ...

    async def publish(self, request: cpb.PublishRequest) -> cpb.PublishResponse: ...

    async def restore(self, request: cpb.RestoreRequest) -> cpb.RestoreResponse: ...

    async def list_checkpoints(self, request: cpb.ListRequest) -> cpb.ListResponse: ...

    async def get_thread(self, request: cpb.GetThreadRequest) -> cpb.GetThreadResponse: ...

    async def list_threads(self, request: cpb.ListThreadsRequest) -> cpb.ListThreadsResponse: ...

    async def acquire_lease(self, request: cpb.AcquireLeaseRequest) -> cpb.AcquireLeaseResponse: ...

    async def renew_lease(self, request: cpb.RenewLeaseRequest) -> cpb.RenewLeaseResponse:
        """One attempt: a lease is renewed again on its schedule."""
        ...

    async def release_lease(self, request: cpb.ReleaseLeaseRequest) -> None:
        """One attempt, and no error: a lease not released expires."""
        ...

    def stream(self, request: cpb.StreamRequest) -> AsyncIterator[cpb.StreamResponse]:
        """A thread's feed; opening it is retried, a stream broken later fails (the caller
        resumes from the last seq it saw)."""
        ...

    def checks_required_heads(self) -> bool:
        """Whether the store honours SaveRequest.required_head (an older one ignores it)."""
        ...

    def with_retry(self, seconds: float) -> Store:
        """The same store, its calls retried for `seconds` at most."""
        ...

    async def close(self) -> None: ...


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class GrpcStore:
    """`Store` over gRPC: the hot calls on the tenant's Session stream when there is one
    (docs/engine.md#store-calls), the rest unary."""

    stub: cpb_grpc.CheckpointServiceStub
    """The store's stub, on a channel without a retry policy."""
    tenant: str
    """The tenant every call is made for."""
    token: str | None = None
    """The engine's bearer token for the store (None: the store checks no credentials)."""
    session: StoreSession | None = None
    """The tenant's Session stream (None: every call unary)."""
    retry_seconds: float = 30.0
    """How long a transient failure (UNAVAILABLE, a deadline) is retried."""
    call_seconds: float = CALL_SECONDS
    """One attempt's deadline."""
    metadata: tuple[tuple[str, str], ...] = dataclasses.field(init=False)
    """The tenant's call metadata (made once: every call sends it)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "metadata", tenant_metadata(self.tenant, self.token))

    def with_retry(self, seconds: float) -> GrpcStore:
        return dataclasses.replace(self, retry_seconds=seconds)

    def checks_required_heads(self) -> bool:
        return self.session is not None and self.session.store_says(REQUIRED_HEAD_HEADER)

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    def _retryable(self, exc: BaseException) -> bool:
        """A transient failure, unless the session was closed (the engine is stopping: its
        calls fail at once)."""
        closed = self.session is not None and self.session.closed
        return self.retry_seconds > 0 and _transient(exc) and not closed

    def _retrying(self, wait_max: float) -> AsyncRetrying:
        return AsyncRetrying(
            retry=retry_if_exception(self._retryable),
            stop=stop_after_delay(self.retry_seconds),
            wait=wait_exponential(multiplier=0.2, max=wait_max),
            reraise=True,
        )

    def _on(self, name: str) -> Any:
        """The call `name` on the session if it carries it, else the unary stub's."""
        return getattr(self.session if self.session is not None else self.stub, name)

    async def _call(self, method: Any, request: Any, *, retry: bool = True) -> Any:
        try:
            try:  # the first attempt without the retry machinery: most calls need no more
                return await method(request, metadata=self.metadata, timeout=self.call_seconds)
            except grpc.aio.AioRpcError as exc:
                if not (retry and self._retryable(exc)):
                    raise
            async for attempt in self._retrying(wait_max=3.0):
                with attempt:
                    return await method(request, metadata=self.metadata, timeout=self.call_seconds)
        except grpc.aio.AioRpcError as exc:
            raise _refusal(exc) from exc
        except grpc.aio.UsageError as exc:  # the engine closed its channel: it is stopping
            raise StoreUnavailable(f"the engine is stopping ({exc})") from exc
        raise AssertionError("unreachable")

    async def save(self, request: cpb.SaveRequest) -> cpb.SaveResponse:
        return await self._call(self._on("Save"), request)

    async def put_writes(self, request: cpb.PutWritesRequest) -> cpb.PutWritesResponse:
        return await self._call(self._on("PutWrites"), request)

    async def publish(self, request: cpb.PublishRequest) -> cpb.PublishResponse:
        return await self._call(self._on("Publish"), request)

    async def restore(self, request: cpb.RestoreRequest) -> cpb.RestoreResponse:
        return await self._call(self._on("Restore"), request)

    async def list_checkpoints(self, request: cpb.ListRequest) -> cpb.ListResponse:
        return await self._call(self.stub.List, request)

    async def get_thread(self, request: cpb.GetThreadRequest) -> cpb.GetThreadResponse:
        return await self._call(self._on("GetThread"), request)

    async def list_threads(self, request: cpb.ListThreadsRequest) -> cpb.ListThreadsResponse:
        return await self._call(self.stub.ListThreads, request)

    async def acquire_lease(self, request: cpb.AcquireLeaseRequest) -> cpb.AcquireLeaseResponse:
        return await self._call(self._on("AcquireLease"), request)

    async def renew_lease(self, request: cpb.RenewLeaseRequest) -> cpb.RenewLeaseResponse:
        return await self._call(self._on("RenewLease"), request, retry=False)

    async def release_lease(self, request: cpb.ReleaseLeaseRequest) -> None:
        try:
            await self._call(self._on("ReleaseLease"), request, retry=False)
        except StoreError:
            pass  # it expires

    async def stream(self, request: cpb.StreamRequest) -> AsyncIterator[cpb.StreamResponse]:
        call: grpc.aio.UnaryStreamCall | None = None
        try:
            # Until its first item the stream is retried like a call; after it, it fails.
            async for attempt in self._retrying(wait_max=2.0):
                with attempt:
                    if call is not None:
                        call.cancel()
                    call = self.stub.Stream(request, metadata=self.metadata)
                    items = aiter(call)
                    first = await anext(items, None)
            if first is None:
                return
            yield first
            async for item in items:
                yield item
        except grpc.aio.AioRpcError as exc:
            raise _refusal(exc) from exc
        except grpc.aio.UsageError as exc:  # the engine closed its channel: it is stopping
            raise StoreUnavailable(f"the engine is stopping ({exc})") from exc
        finally:
            if call is not None:
                call.cancel()  # a no-op once it ended; else the caller stopped reading
