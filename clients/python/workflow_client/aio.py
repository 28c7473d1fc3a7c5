"""Async clients of both services (grpc.aio)."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, Self, TypeVar

import grpc

from workflow_client import calls
from workflow_client.connection import Connection
from workflow_client.errors import from_rpc_error
from workflow_stubs.checkpoint.v1 import checkpoint_pb2 as cpb
from workflow_stubs.checkpoint.v1 import checkpoint_pb2_grpc as cpb_grpc
from workflow_stubs.engine.v1 import engine_pb2 as pb
from workflow_stubs.engine.v1 import engine_pb2_grpc as pb_grpc

T = TypeVar("T")

RECONNECT_FOR = 60.0  # seconds a watch keeps reconnecting without getting anything


class _AsyncClient:
    def __init__(self, connection: Connection, stub_class: type) -> None:
        self.connection = connection
        self.channel = connection.aio_channel()
        self.stub = stub_class(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    def as_caller(self, *, token: str | None, tenant: str | None) -> Self:
        """The same channel, its calls made with another caller's credentials (a web
        console's users share one channel). Close the original, not this."""
        caller = copy.copy(self)
        caller.connection = dataclasses.replace(self.connection, token=token, tenant=tenant)
        return caller

    async def __aenter__(self) -> _AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _do(self, call: calls.Call[T]) -> T:
        try:
            reply = await getattr(self.stub, call.rpc)(
                call.request, metadata=self.connection.metadata, timeout=self.connection.timeout
            )
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from exc
        return call.result(reply)

    async def _paged(
        self, call_for: Callable[[str], calls.Call[Any]], field: str
    ) -> AsyncIterator[Any]:
        """Every item of a paged list RPC: `call_for(page_token)`, items in `field`."""
        token = ""
        while True:
            page = await self._do(call_for(token))
            for item in getattr(page, field):
                yield item
            token = page.next_page_token
            if not token:
                return


class AsyncEngineClient(_AsyncClient):
    """engine.v1.EngineService: workflows and runs."""

    def __init__(self, address: str = "127.0.0.1:50052", **options: Any) -> None:
        super().__init__(Connection(address, **options), pb_grpc.EngineServiceStub)

    async def register(
        self, definition: pb.WorkflowDefinition | Mapping[str, Any]
    ) -> pb.RegisterWorkflowResponse:
        return await self._do(calls.register(definition))

    async def get_workflow(self, workflow_id: str, version: int = 0) -> pb.GetWorkflowResponse:
        return await self._do(calls.get_workflow(workflow_id, version))

    async def start_run(
        self,
        workflow_id: str,
        input: Mapping[str, Any] | None = None,
        *,
        version: int = 0,
        run_id: str = "",
        request_id: str = "",
        interrupt_before: list[str] | None = None,
        interrupt_after: list[str] | None = None,
    ) -> pb.Run:
        """Start a run (with the id of a COMPLETED run: continue it on its own state)."""
        call = calls.start_run(
            workflow_id, input, version, run_id, request_id, interrupt_before, interrupt_after
        )
        return await self._do(call)

    async def versions(self, workflow_id: str) -> pb.ListWorkflowVersionsResponse:
        return await self._do(calls.list_versions(workflow_id))

    async def rollback(
        self, workflow_id: str, version: int, reason: str = "", requested_by: str = ""
    ) -> pb.RollbackWorkflowResponse:
        return await self._do(calls.rollback(workflow_id, version, reason, requested_by))

    async def history(
        self, run_id: str, include_state: bool = False, page_size: int = 100
    ) -> AsyncIterator[pb.RunCheckpoint]:
        """The run's checkpoints, newest first."""
        async for item in self._paged(
            lambda token: calls.run_history(run_id, include_state, page_size, token), "checkpoints"
        ):
            yield item

    async def fork_run(
        self,
        run_id: str,
        checkpoint_id: str,
        state_patch: Mapping[str, Any] | None = None,
        new_run_id: str = "",
    ) -> pb.Run:
        return await self._do(calls.fork_run(run_id, checkpoint_id, state_patch, new_run_id))

    async def get_run(self, run_id: str) -> pb.Run:
        return await self._do(calls.get_run(run_id))

    async def audit(self, after_seq: int = 0, page_size: int = 100) -> AsyncIterator[pb.AuditEntry]:
        """The tenant's audit log after `after_seq`, oldest first (an admin's call)."""
        while True:
            page = await self._do(calls.audit_entries(after_seq, page_size))
            for entry in page.entries:
                yield entry
            if not page.next_after_seq:
                return
            after_seq = page.next_after_seq

    async def list_runs(
        self, workflow_id: str = "", statuses: list[int] | None = None, page_size: int = 100
    ) -> AsyncIterator[pb.Run]:
        async for item in self._paged(
            lambda token: calls.list_runs(workflow_id, statuses or [], page_size, token), "runs"
        ):
            yield item

    async def pause_run(self, run_id: str) -> pb.Run:
        return await self._do(calls.pause_run(run_id))

    async def resume_run(self, run_id: str, value: Any = None) -> pb.Run:
        return await self._do(calls.resume_run(run_id, value))

    async def cancel_run(self, run_id: str, reason: str = "") -> pb.Run:
        return await self._do(calls.cancel_run(run_id, reason))

    async def checkpoint_run(
        self, run_id: str, name: str, metadata: Mapping[str, str] | None = None
    ) -> str:
        return await self._do(calls.checkpoint_run(run_id, name, metadata))

    async def watch(self, run_id: str, after_seq: int = 0) -> AsyncIterator[pb.RunEvent]:
        """The run's events after `after_seq` until its terminal event. A dropped stream is
        reopened from the last seq seen, so nothing is missed or repeated."""
        last, failing_since = after_seq, None
        while True:
            try:
                async for item in self.stub.WatchRun(
                    pb.WatchRunRequest(run_id=run_id, after_seq=last, batched=True),
                    metadata=self.connection.metadata,
                ):
                    failing_since = None
                    for event in calls.events_of(item):
                        last = event.seq
                        yield event
                return
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise from_rpc_error(exc) from exc
                now = asyncio.get_running_loop().time()
                failing_since = failing_since or now
                if now - failing_since > RECONNECT_FOR:
                    raise from_rpc_error(exc) from exc
                await asyncio.sleep(0.5)


class AsyncCheckpointClient(_AsyncClient):
    """checkpoint.v1.CheckpointService: the store. `stub` offers every RPC; the common reads
    are wrapped here."""

    def __init__(self, address: str = "127.0.0.1:50051", **options: Any) -> None:
        super().__init__(Connection(address, **options), cpb_grpc.CheckpointServiceStub)

    async def checkpoints(
        self, thread_id: str, namespace: str = "runs", page_size: int = 500
    ) -> AsyncIterator[cpb.Checkpoint]:
        """A thread's checkpoints, newest first, without their state."""
        async for item in self._paged(
            lambda token: calls.list_checkpoints(namespace, thread_id, page_size, token),
            "checkpoints",
        ):
            yield item

    async def get_thread(self, thread_id: str, namespace: str = "runs") -> cpb.Thread:
        return await self._do(calls.get_thread(namespace, thread_id))

    async def restore(
        self,
        thread_id: str,
        namespace: str = "runs",
        checkpoint_id: str = "",
        include_writes: bool = False,
    ) -> cpb.RestoreResponse:
        """A checkpoint (the head by default), with the pending writes on it if asked."""
        return await self._do(calls.restore(namespace, thread_id, checkpoint_id, include_writes))
