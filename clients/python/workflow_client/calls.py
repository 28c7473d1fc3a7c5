"""The requests both clients send, built once: the async and the sync client differ only in
how they wait for the answer."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from google.protobuf import json_format, struct_pb2

from workflow_rpc.structs import plain
from workflow_stubs.checkpoint.v1 import checkpoint_pb2 as cpb
from workflow_stubs.engine.v1 import engine_pb2 as pb

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Call(Generic[T]):
    """One unary call: the RPC's name, its request, and what the caller gets from the reply."""

    rpc: str
    request: Any
    result: Callable[[Any], T]


def events_of(item: pb.WatchRunResponse) -> list[pb.RunEvent]:
    """The events of one WatchRun response: one, several (batched), or none (a heartbeat)."""
    if item.HasField("events"):
        return list(item.events.events)
    return [item.event] if item.HasField("event") else []


def state_of(run: pb.Run) -> dict[str, Any]:
    """A run's state as a dict: its input and each finished node's output."""
    return plain(json_format.MessageToDict(run.state))


def load_definition(source: str | Path | Mapping[str, Any]) -> pb.WorkflowDefinition:
    """A definition from a dict, or a JSON or YAML file (by extension; JSON otherwise)."""
    if isinstance(source, Mapping):
        data: Any = source
    else:
        path = Path(source)
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    if not isinstance(data, Mapping):
        raise ValueError(f"a workflow definition is a mapping, not {type(data).__name__}")
    try:
        return json_format.ParseDict(data, pb.WorkflowDefinition())
    except json_format.ParseError as exc:
        raise json_format.ParseError(_in_our_names(str(exc))) from None


_NO_SUCH_FIELD = re.compile(r'Message type "([\w.]+)" has no field named "([^"]*)" at "([^"]*)"')


def _in_our_names(message: str) -> str:
    """protobuf's error for an unknown field lists the fields by their JSON names
    (`dependsOn`); the docs and our examples write them as in the proto (`depends_on`)."""
    found = _NO_SUCH_FIELD.search(message)
    if found is None:
        return message
    type_name, name, where = found.groups()
    fields = pb.DESCRIPTOR.pool.FindMessageTypeByName(type_name).fields
    known = ", ".join(f.name for f in fields)
    return f"{where}: no field {name!r} (the fields of {type_name.split('.')[-1]}: {known})"


def register(definition: pb.WorkflowDefinition | Mapping[str, Any]) -> Call:
    if not isinstance(definition, pb.WorkflowDefinition):
        definition = load_definition(definition)
    return Call("RegisterWorkflow", pb.RegisterWorkflowRequest(definition=definition), lambda r: r)


def get_workflow(workflow_id: str, version: int) -> Call:
    request = pb.GetWorkflowRequest(workflow_id=workflow_id, version=version)
    return Call("GetWorkflow", request, lambda r: r)


def start_run(
    workflow_id: str,
    run_input: Mapping[str, Any] | None,
    version: int,
    run_id: str,
    request_id: str,
    interrupt_before: list[str] | None = None,
    interrupt_after: list[str] | None = None,
) -> Call[pb.Run]:
    request = pb.StartRunRequest(
        workflow_id=workflow_id,
        version=version,
        run_id=run_id,
        request_id=request_id,
        interrupt_before=interrupt_before or [],
        interrupt_after=interrupt_after or [],
    )
    request.input.update(dict(run_input or {}))
    return Call("StartRun", request, lambda r: r.run)


def get_run(run_id: str) -> Call[pb.Run]:
    return Call("GetRun", pb.GetRunRequest(run_id=run_id), lambda r: r.run)


def list_runs(
    workflow_id: str, statuses: list[int], page_size: int, page_token: str
) -> Call[pb.ListRunsResponse]:
    request = pb.ListRunsRequest(
        workflow_id=workflow_id, statuses=statuses, page_size=page_size, page_token=page_token
    )
    return Call("ListRuns", request, lambda r: r)


def audit_entries(after_seq: int, page_size: int) -> Call[pb.ListAuditEntriesResponse]:
    request = pb.ListAuditEntriesRequest(after_seq=after_seq, page_size=page_size)
    return Call("ListAuditEntries", request, lambda r: r)


def pause_run(run_id: str) -> Call[pb.Run]:
    return Call("PauseRun", pb.PauseRunRequest(run_id=run_id), lambda r: r.run)


def resume_run(run_id: str, value: Any) -> Call[pb.Run]:
    request = pb.ResumeRunRequest(run_id=run_id)
    if value is not None:
        request.value.CopyFrom(json_format.ParseDict(value, struct_pb2.Value()))
    return Call("ResumeRun", request, lambda r: r.run)


def cancel_run(run_id: str, reason: str) -> Call[pb.Run]:
    return Call("CancelRun", pb.CancelRunRequest(run_id=run_id, reason=reason), lambda r: r.run)


def checkpoint_run(run_id: str, name: str, metadata: Mapping[str, str] | None) -> Call[str]:
    request = pb.CheckpointRunRequest(run_id=run_id, name=name, metadata=dict(metadata or {}))
    return Call("CheckpointRun", request, lambda r: r.checkpoint_id)


def list_versions(workflow_id: str) -> Call[pb.ListWorkflowVersionsResponse]:
    request = pb.ListWorkflowVersionsRequest(workflow_id=workflow_id)
    return Call("ListWorkflowVersions", request, lambda r: r)


def rollback(
    workflow_id: str, version: int, reason: str, requested_by: str
) -> Call[pb.RollbackWorkflowResponse]:
    request = pb.RollbackWorkflowRequest(
        workflow_id=workflow_id, version=version, reason=reason, requested_by=requested_by
    )
    return Call("RollbackWorkflow", request, lambda r: r)


def run_history(
    run_id: str, include_state: bool, page_size: int, page_token: str
) -> Call[pb.GetRunHistoryResponse]:
    request = pb.GetRunHistoryRequest(
        run_id=run_id, include_state=include_state, page_size=page_size, page_token=page_token
    )
    return Call("GetRunHistory", request, lambda r: r)


def fork_run(
    run_id: str, checkpoint_id: str, state_patch: Mapping[str, Any] | None, new_run_id: str
) -> Call[pb.Run]:
    request = pb.ForkRunRequest(run_id=run_id, checkpoint_id=checkpoint_id, new_run_id=new_run_id)
    request.state_patch.update(dict(state_patch or {}))
    return Call("ForkRun", request, lambda r: r.run)


def list_checkpoints(
    namespace: str, thread_id: str, page_size: int, page_token: str
) -> Call[cpb.ListResponse]:
    request = cpb.ListRequest(
        namespace=namespace, thread_id=thread_id, page_size=page_size, page_token=page_token
    )
    return Call("List", request, lambda r: r)


def get_thread(namespace: str, thread_id: str) -> Call[cpb.Thread]:
    request = cpb.GetThreadRequest(namespace=namespace, thread_id=thread_id)
    return Call("GetThread", request, lambda r: r.thread)


def restore(
    namespace: str, thread_id: str, checkpoint_id: str, include_writes: bool
) -> Call[cpb.RestoreResponse]:
    request = cpb.RestoreRequest(
        namespace=namespace,
        thread_id=thread_id,
        checkpoint_id=checkpoint_id,
        include_writes=include_writes,
    )
    return Call("Restore", request, lambda r: r)
