"""Blocking clients of both services, for scripts and the CLI."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import grpc

from workflow_client import calls
from workflow_client.aio import RECONNECT_FOR
from workflow_client.connection import Connection
from workflow_client.errors import from_rpc_error
from workflow_stubs.checkpoint.v1 import checkpoint_pb2 as cpb
from workflow_stubs.checkpoint.v1 import checkpoint_pb2_grpc as cpb_grpc
from workflow_stubs.engine.v1 import engine_pb2 as pb
from workflow_stubs.engine.v1 import engine_pb2_grpc as pb_grpc

T = TypeVar("T")


class _Client:
    def __init__(self, connection: Connection, stub_class: type) -> None:
        self.connection = connection
        self.channel = connection.channel()
        self.stub = stub_class(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> _Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _do(self, call: calls.Call[T]) -> T:
        try:
            reply = getattr(self.stub, call.rpc)(
                call.request, metadata=self.connection.metadata, timeout=self.connection.timeout
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc
        return call.result(reply)

    def _paged(self, call_for: Callable[[str], calls.Call[Any]], field: str) -> Iterator[Any]:
        """Every item of a paged list RPC: `call_for(page_token)`, items in `field`."""
        token = ""
        while True:
            page = self._do(call_for(token))
            yield from getattr(page, field)
            token = page.next_page_token
            if not token:
                return


class EngineClient(_Client):
    """engine.v1.EngineService: workflows and runs (blocking)."""

    def __init__(self, address: str = "127.0.0.1:50052", **options: Any) -> None:
        super().__init__(Connection(address, **options), pb_grpc.EngineServiceStub)

    def register(
        self, definition: pb.WorkflowDefinition | Mapping[str, Any]
    ) -> pb.RegisterWorkflowResponse:
        return self._do(calls.register(definition))

    def get_workflow(self, workflow_id: str, version: int = 0) -> pb.GetWorkflowResponse:
        return self._do(calls.get_workflow(workflow_id, version))

    def start_run(
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
        return self._do(call)

    def versions(self, workflow_id: str) -> pb.ListWorkflowVersionsResponse:
        return self._do(calls.list_versions(workflow_id))

    def rollback(
        self, workflow_id: str, version: int, reason: str = "", requested_by: str = ""
    ) -> pb.RollbackWorkflowResponse:
        return self._do(calls.rollback(workflow_id, version, reason, requested_by))

    def history(
        self, run_id: str, include_state: bool = False, page_size: int = 100
    ) -> Iterator[pb.RunCheckpoint]:
        """The run's checkpoints, newest first."""
        yield from self._paged(
            lambda token: calls.run_history(run_id, include_state, page_size, token), "checkpoints"
        )

    def fork_run(
        self,
        run_id: str,
        checkpoint_id: str,
        state_patch: Mapping[str, Any] | None = None,
        new_run_id: str = "",
    ) -> pb.Run:
        return self._do(calls.fork_run(run_id, checkpoint_id, state_patch, new_run_id))

    def get_run(self, run_id: str) -> pb.Run:
        return self._do(calls.get_run(run_id))

    def list_runs(
        self, workflow_id: str = "", statuses: list[int] | None = None, page_size: int = 100
    ) -> Iterator[pb.Run]:
        yield from self._paged(
            lambda token: calls.list_runs(workflow_id, statuses or [], page_size, token), "runs"
        )

    def audit(self, after_seq: int = 0, page_size: int = 100) -> Iterator[pb.AuditEntry]:
        """The tenant's audit log after `after_seq`, oldest first (an admin's call)."""
        while True:
            page = self._do(calls.audit_entries(after_seq, page_size))
            yield from page.entries
            if not page.next_after_seq:
                return
            after_seq = page.next_after_seq

    def pause_run(self, run_id: str) -> pb.Run:
        return self._do(calls.pause_run(run_id))

    def resume_run(self, run_id: str, value: Any = None) -> pb.Run:
        return self._do(calls.resume_run(run_id, value))

    def cancel_run(self, run_id: str, reason: str = "") -> pb.Run:
        return self._do(calls.cancel_run(run_id, reason))

    def checkpoint_run(
        self, run_id: str, name: str, metadata: Mapping[str, str] | None = None
    ) -> str:
        return self._do(calls.checkpoint_run(run_id, name, metadata))

    def watch(self, run_id: str, after_seq: int = 0) -> Iterator[pb.RunEvent]:
        """As AsyncEngineClient.watch: reconnects from the last seq seen."""
        last, failing_since = after_seq, None
        while True:
            try:
                for item in self.stub.WatchRun(
                    pb.WatchRunRequest(run_id=run_id, after_seq=last, batched=True),
                    metadata=self.connection.metadata,
                ):
                    failing_since = None
                    for event in calls.events_of(item):
                        last = event.seq
                        yield event
                return
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:  # type: ignore[attr-defined]
                    raise from_rpc_error(exc) from exc
                failing_since = failing_since or time.monotonic()
                if time.monotonic() - failing_since > RECONNECT_FOR:
                    raise from_rpc_error(exc) from exc
                time.sleep(0.5)


class CheckpointClient(_Client):
    """checkpoint.v1.CheckpointService (blocking); `stub` offers every RPC."""

    def __init__(self, address: str = "127.0.0.1:50051", **options: Any) -> None:
        super().__init__(Connection(address, **options), cpb_grpc.CheckpointServiceStub)

    def checkpoints(
        self, thread_id: str, namespace: str = "runs", page_size: int = 500
    ) -> Iterator[cpb.Checkpoint]:
        """A thread's checkpoints, newest first, without their state."""
        yield from self._paged(
            lambda token: calls.list_checkpoints(namespace, thread_id, page_size, token),
            "checkpoints",
        )

    def get_thread(self, thread_id: str, namespace: str = "runs") -> cpb.Thread:
        return self._do(calls.get_thread(namespace, thread_id))

    def restore(
        self,
        thread_id: str,
        namespace: str = "runs",
        checkpoint_id: str = "",
        include_writes: bool = False,
    ) -> cpb.RestoreResponse:
        """A checkpoint (the head by default), with the pending writes on it if asked."""
        return self._do(calls.restore(namespace, thread_id, checkpoint_id, include_writes))
