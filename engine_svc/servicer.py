"""gRPC servicer of engine.v1: validation, translation and status codes; logic in Engine."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, TypeVar

import grpc
from google.protobuf import json_format
from grpc_status import rpc_status

from engine_svc import values
from engine_svc.definition import DefinitionInvalid
from engine_svc.engine import ControlTimeout, Engine, NotResumable, RunExists
from engine_svc.executor import RunNotFound, Started
from engine_svc.registry import RegistrationContended, WorkflowNotFound
from engine_svc.run_state import NotARun, RunState, RunStatus
from engine_svc.store import LeaseLost, StoreError
from workflow_rpc import statuses
from workflow_rpc.callers import Role, roles_by_method
from workflow_rpc.headers import SYSTEM_TENANT, TENANT_HEADER
from workflow_rpc.statuses import InvalidArgument, bounded
from workflow_rpc.tenants import tenant_of as call_tenant_of
from workflow_stubs.checkpoint.v1 import checkpoint_pb2 as cpb
from workflow_stubs.engine.v1 import engine_pb2 as pb
from workflow_stubs.engine.v1 import engine_pb2_grpc as pb_grpc

R = TypeVar("R")

_SERVICE = pb.DESCRIPTOR.services_by_name["EngineService"].full_name
# The role each RPC needs when credentials are checked (docs/security.md#identities-and-roles).
REQUIRED_ROLES: dict[str, Role] = roles_by_method(
    _SERVICE,
    {
        Role.READER: (
            "GetWorkflow",
            "GetRun",
            "ListRuns",
            "WatchRun",
            "ListWorkflowVersions",
            "GetRunHistory",
        ),
        Role.ADMIN: ("ListAuditEntries",),
        Role.WRITER: (
            "RegisterWorkflow",
            "StartRun",
            "PauseRun",
            "ResumeRun",
            "CancelRun",
            "CheckpointRun",
            "RollbackWorkflow",
            "ForkRun",
        ),
    },
)


_CODES: dict[type[Exception], grpc.StatusCode] = {
    WorkflowNotFound: grpc.StatusCode.NOT_FOUND,
    NotARun: grpc.StatusCode.NOT_FOUND,
    RunNotFound: grpc.StatusCode.NOT_FOUND,
    RunExists: grpc.StatusCode.ALREADY_EXISTS,
    NotResumable: grpc.StatusCode.FAILED_PRECONDITION,
    ControlTimeout: grpc.StatusCode.UNAVAILABLE,
    RegistrationContended: grpc.StatusCode.ABORTED,
}
_TRANSLATED = (DefinitionInvalid, InvalidArgument, StoreError, *_CODES)


async def _abort(context: grpc.aio.ServicerContext, exc: Exception) -> None:
    if isinstance(exc, DefinitionInvalid):
        exc = InvalidArgument(f"invalid definition: {exc}", exc.violations)
    if isinstance(exc, InvalidArgument):
        await context.abort_with_status(rpc_status.to_status(statuses.invalid_argument(exc)))
    if isinstance(exc, LeaseLost):  # the run changed under us: try again
        await context.abort(grpc.StatusCode.ABORTED, bounded(str(exc)))
    if isinstance(exc, StoreError):  # the store's answer, passed on (UNAVAILABLE: go on
        await context.abort(exc.code, bounded(str(exc)))  # with another engine or later)
    message = f"not a run ({exc})" if isinstance(exc, NotARun) else str(exc)
    await context.abort(_CODES[type(exc)], bounded(message))


def translated(method: Callable[..., Awaitable[R]]) -> Callable[..., Awaitable[R]]:
    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> R:
        try:
            return await method(self, request, context)
        except _TRANSLATED as exc:
            await _abort(context, exc)
        raise AssertionError("unreachable")

    return wrapper


DEFAULT_AUDIT_PAGE = 100
MAX_AUDIT_PAGE = 1000


def audit_entry(event: cpb.Event) -> pb.AuditEntry:
    """An audit log event (workflow_rpc/audit.py) as ListAuditEntries gives it."""
    fields = event.payload.fields
    entry = pb.AuditEntry(
        seq=event.seq,
        time=event.time,
        subject=fields["subject"].string_value if "subject" in fields else "",
        action=fields["action"].string_value if "action" in fields else "",
        target=fields["target"].string_value if "target" in fields else "",
    )
    if "details" in fields:
        entry.details.CopyFrom(fields["details"].struct_value)
    return entry


def tenant_of(context: grpc.aio.ServicerContext) -> str:
    tenant = call_tenant_of(context)
    if tenant == SYSTEM_TENANT:
        raise InvalidArgument(
            f"tenant {SYSTEM_TENANT!r} is reserved", [(TENANT_HEADER, "reserved for the engine")]
        )
    return tenant


def _run_status_of(thread: cpb.Thread) -> pb.RunStatus.ValueType:
    status = RunStatus.of_thread(thread.status)
    return status.proto if status is not None else pb.RUN_STATUS_UNSPECIFIED


def _thread_statuses(statuses: Iterable[int]) -> list[int]:
    """ListRuns' statuses as the store records the runs' threads."""
    out, bad = [], []
    for i, value in enumerate(statuses):
        status = RunStatus.of_proto(value)
        if status is None:
            bad.append((f"statuses[{i}]", f"unknown run status {value}"))
        elif status is RunStatus.PAUSING:
            bad.append(
                (
                    f"statuses[{i}]",
                    "PAUSING is what PauseRun answers for a RUNNING run whose pause waits for "
                    "its step; list RUNNING runs",
                )
            )
        else:
            out.append(int(status.thread_status))
    if bad:
        raise InvalidArgument("; ".join(f"{f}: {d}" for f, d in bad), bad)
    return out


def run_to_pb(run: RunState, thread: cpb.Thread) -> pb.Run:
    done = len(run.done())
    msg = pb.Run(
        run_id=run.run_id,
        workflow_id=run.workflow_id,
        version=run.version,
        status=_run_status_of(thread),
        error=run.error,
        completed_nodes=done,
        total_nodes=run.total,
        progress_percent=100.0 * done / run.total if run.total else 0.0,
        head_checkpoint_id=thread.head_checkpoint_id,
        created_at=thread.created_at,
        updated_at=thread.updated_at,
        completed_node_ids=run.completed,
        waiting_for=run.waiting_for,
        eta_seconds=run.eta_seconds if run.status is RunStatus.RUNNING else 0.0,
    )
    msg.state.update(run.state())
    return msg


def run_checkpoint_to_pb(c: cpb.Checkpoint) -> pb.RunCheckpoint:
    trigger = cpb.Trigger.Name(c.trigger).removeprefix("TRIGGER_")
    msg = pb.RunCheckpoint(
        checkpoint_id=c.checkpoint_id,
        parent_id=c.parent_id,
        step=c.step,
        trigger=pb.CheckpointTrigger.Value(f"CHECKPOINT_TRIGGER_{trigger}"),
        name=c.name,
        completed_node_ids=c.completed_nodes,
        progress_percent=c.progress_percent,
        created_at=c.created_at,
        metadata=dict(c.metadata),
    )
    if c.state:
        run = RunState.from_json(c.state)
        msg.state.update(run.state())
        msg.status = run.status.proto
    return msg


class EngineServicer(pb_grpc.EngineServiceServicer):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    async def _started(self, tenant: str, started: Started) -> pb.Run:
        """A new run, with its thread's row as its first checkpoint left it (or as it is now,
        for a replayed start)."""
        if started.thread is not None:
            return run_to_pb(started.run, started.thread)
        return await self._reply(tenant, started.run)

    async def _reply(self, tenant: str, run: RunState) -> pb.Run:
        """A run the engine just changed, with its thread row (status, head, times)."""
        return run_to_pb(run, await self.engine.thread(tenant, run.run_id))

    @translated
    async def RegisterWorkflow(
        self, request: pb.RegisterWorkflowRequest, context: grpc.aio.ServicerContext
    ) -> pb.RegisterWorkflowResponse:
        done = await self.engine.register(tenant_of(context), request.definition)
        return pb.RegisterWorkflowResponse(
            workflow_id=done.workflow_id, version=done.version, created=done.created
        )

    @translated
    async def GetWorkflow(
        self, request: pb.GetWorkflowRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetWorkflowResponse:
        got = await self.engine.get_workflow(
            tenant_of(context), request.workflow_id, request.version
        )
        return pb.GetWorkflowResponse(
            definition=got.definition, version=got.version, active_version=got.active_version
        )

    @translated
    async def StartRun(
        self, request: pb.StartRunRequest, context: grpc.aio.ServicerContext
    ) -> pb.StartRunResponse:
        tenant = tenant_of(context)
        started = await self.engine.start_run(
            tenant,
            request.workflow_id,
            request.version,
            values.from_struct(request.input, "input"),
            request.run_id,
            request.request_id,
            list(request.interrupt_before),
            list(request.interrupt_after),
        )
        return pb.StartRunResponse(run=await self._started(tenant, started))

    @translated
    async def ListWorkflowVersions(
        self, request: pb.ListWorkflowVersionsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListWorkflowVersionsResponse:
        found = await self.engine.versions(tenant_of(context), request.workflow_id)
        return pb.ListWorkflowVersionsResponse(
            active_version=found.active,
            versions=[
                pb.WorkflowVersion(version=v, created_at=at, active=v == found.active)
                for v, at in found.versions
            ],
            history=[
                pb.VersionChange(
                    kind=h.kind,
                    version=h.version,
                    previous_version=h.previous_version,
                    reason=h.reason,
                    requested_by=h.requested_by,
                    time=h.time,
                )
                for h in found.history
            ],
        )

    @translated
    async def RollbackWorkflow(
        self, request: pb.RollbackWorkflowRequest, context: grpc.aio.ServicerContext
    ) -> pb.RollbackWorkflowResponse:
        if request.version < 1:
            raise InvalidArgument("version: must be at least 1", [("version", "at least 1")])
        tenant = tenant_of(context)
        active, previous = await self.engine.rollback(
            tenant, request.workflow_id, request.version, request.reason, request.requested_by
        )
        return pb.RollbackWorkflowResponse(active_version=active, previous_version=previous)

    @translated
    async def GetRunHistory(
        self, request: pb.GetRunHistoryRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetRunHistoryResponse:
        checkpoints, token = await self.engine.history(
            tenant_of(context),
            request.run_id,
            request.include_state,
            request.page_size,
            request.page_token,
        )
        return pb.GetRunHistoryResponse(
            checkpoints=[run_checkpoint_to_pb(c) for c in checkpoints], next_page_token=token
        )

    @translated
    async def ForkRun(
        self, request: pb.ForkRunRequest, context: grpc.aio.ServicerContext
    ) -> pb.ForkRunResponse:
        tenant = tenant_of(context)
        if not request.checkpoint_id:
            raise InvalidArgument("checkpoint_id: required", [("checkpoint_id", "required")])
        started = await self.engine.fork_run(
            tenant,
            request.run_id,
            request.checkpoint_id,
            values.from_struct(request.state_patch, "state_patch"),
            request.new_run_id,
        )
        reply = await self._started(tenant, started)
        await asyncio.shield(
            self.engine.audit(
                tenant,
                "fork",
                request.run_id,
                {
                    "checkpoint_id": request.checkpoint_id,
                    "new_run_id": reply.run_id,
                    "state_patch": json_format.MessageToDict(request.state_patch),
                },
            )
        )
        return pb.ForkRunResponse(run=reply)

    @translated
    async def GetRun(
        self, request: pb.GetRunRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetRunResponse:
        run, thread = await self.engine.get_run(tenant_of(context), request.run_id)
        return pb.GetRunResponse(run=run_to_pb(run, thread))

    @translated
    async def ListRuns(
        self, request: pb.ListRunsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListRunsResponse:
        threads, token = await self.engine.list_runs(
            tenant_of(context),
            _thread_statuses(request.statuses),
            request.page_size,
            request.page_token,
            request.workflow_id,
        )
        runs = [
            pb.Run(
                run_id=t.thread_id,
                workflow_id=t.workflow_id,
                version=t.workflow_version,
                status=_run_status_of(t),
                head_checkpoint_id=t.head_checkpoint_id,
                created_at=t.created_at,
                updated_at=t.updated_at,
            )
            for t in threads
            # The store filters (ListThreadsRequest.workflow_id); an older one does not.
            if not request.workflow_id or t.workflow_id == request.workflow_id
        ]
        return pb.ListRunsResponse(runs=runs, next_page_token=token)

    @translated
    async def ResumeRun(
        self, request: pb.ResumeRunRequest, context: grpc.aio.ServicerContext
    ) -> pb.ResumeRunResponse:
        tenant = tenant_of(context)
        value = values.from_struct(request.value, "value") if request.HasField("value") else None
        run = await self.engine.resume_run(tenant, request.run_id, value)
        await asyncio.shield(
            self.engine.audit(
                tenant,
                "resume",
                request.run_id,
                {"value": value} if request.HasField("value") else {},
            )
        )
        return pb.ResumeRunResponse(run=await self._reply(tenant, run))

    @translated
    async def PauseRun(
        self, request: pb.PauseRunRequest, context: grpc.aio.ServicerContext
    ) -> pb.PauseRunResponse:
        tenant = tenant_of(context)
        done = await self._controlled(tenant, request.run_id, "pause", {}, {})
        reply = await self._reply(tenant, done.run)
        if done.answer == "run.pausing" and reply.status == pb.RUN_STATUS_RUNNING:
            reply.status = pb.RUN_STATUS_PAUSING  # it pauses when its running step ends
        return pb.PauseRunResponse(run=reply)

    @translated
    async def CancelRun(
        self, request: pb.CancelRunRequest, context: grpc.aio.ServicerContext
    ) -> pb.CancelRunResponse:
        tenant = tenant_of(context)
        reason = {"reason": request.reason}
        done = await self._controlled(tenant, request.run_id, "cancel", reason, reason)
        return pb.CancelRunResponse(run=await self._reply(tenant, done.run))

    @translated
    async def CheckpointRun(
        self, request: pb.CheckpointRunRequest, context: grpc.aio.ServicerContext
    ) -> pb.CheckpointRunResponse:
        if not request.name:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "name: required")
        checkpoint_id = (
            await self.engine.control(
                tenant_of(context),
                request.run_id,
                "checkpoint",
                {"name": request.name, "metadata": dict(request.metadata)},
            )
        ).checkpoint_id
        return pb.CheckpointRunResponse(checkpoint_id=checkpoint_id)

    async def _controlled(
        self, tenant: str, run_id: str, action: str, args: dict[str, Any], details: dict[str, Any]
    ) -> Any:
        """A pause or cancel, then its audit entry. A call that ends while it waits for the
        run's engine to act still leaves one: the request stands and may yet be acted on."""
        try:
            done = await self.engine.control(tenant, run_id, action, args)
        except asyncio.CancelledError:
            self.engine.audit(
                tenant, action, run_id, {**details, "outcome": "asked; the call ended first"}
            )
            raise
        await asyncio.shield(self.engine.audit(tenant, action, run_id, details))
        return done

    @translated
    async def ListAuditEntries(
        self, request: pb.ListAuditEntriesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListAuditEntriesResponse:
        if not 0 <= request.page_size <= MAX_AUDIT_PAGE:
            raise InvalidArgument(
                f"page_size: between 0 and {MAX_AUDIT_PAGE}", [("page_size", "out of range")]
            )
        if request.after_seq < 0:
            raise InvalidArgument("after_seq: must not be negative", [("after_seq", "negative")])
        events, next_after = await self.engine.audit_entries(
            tenant_of(context), request.after_seq, request.page_size or DEFAULT_AUDIT_PAGE
        )
        return pb.ListAuditEntriesResponse(
            entries=[audit_entry(e) for e in events], next_after_seq=next_after
        )

    async def WatchRun(
        self, request: pb.WatchRunRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchRunResponse]:
        try:
            async for item in self.engine.watch_run(
                tenant_of(context), request.run_id, request.after_seq, batched=request.batched
            ):
                yield item
        except _TRANSLATED as exc:
            await _abort(context, exc)
