"""What the JSON API answers: the engine's messages as plain JSON, with statuses as short
names ("RUNNING"), times as epoch seconds and durations as seconds (docs/console.md#api)."""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message

from workflow_stubs.engine.v1 import engine_pb2 as pb

__all__ = ["checkpoint_view", "definition_view", "event_view", "run_view", "versions_view"]

_PREFIXES = {"status": "RUN_STATUS_", "trigger": "CHECKPOINT_TRIGGER_"}


def _plain(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(
        message,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
    )


def _seconds(timestamp: Any) -> float:
    return timestamp.seconds + timestamp.nanos / 1e9


def _short(view: dict[str, Any]) -> dict[str, Any]:
    for field, prefix in _PREFIXES.items():
        if isinstance(view.get(field), str):
            view[field] = view[field].removeprefix(prefix)
    return view


def run_view(run: pb.Run) -> dict[str, Any]:
    view = _short(_plain(run))
    view["version"] = run.version  # (JSON mapping writes int64 as a string)
    view["created_at"] = _seconds(run.created_at)
    view["updated_at"] = _seconds(run.updated_at)
    return view


def event_view(event: pb.RunEvent) -> dict[str, Any]:
    view = _short(_plain(event))
    view["seq"] = event.seq
    view["time"] = _seconds(event.time)
    view["duration"] = _seconds(event.duration) if event.HasField("duration") else None
    view["output"] = json_format.MessageToDict(event.output) if event.HasField("output") else None
    return view


def checkpoint_view(checkpoint: pb.RunCheckpoint) -> dict[str, Any]:
    view = _short(_plain(checkpoint))
    view["step"] = checkpoint.step
    view["created_at"] = _seconds(checkpoint.created_at)
    return view


def definition_view(definition: pb.WorkflowDefinition) -> dict[str, Any]:
    return _plain(definition)


def versions_view(versions: pb.ListWorkflowVersionsResponse) -> dict[str, Any]:
    return {
        "active_version": versions.active_version,
        "versions": [
            {"version": v.version, "created_at": _seconds(v.created_at), "active": v.active}
            for v in versions.versions
        ],
        "history": [
            {
                **_plain(change),
                "version": change.version,
                "previous_version": change.previous_version,
                "time": _seconds(change.time),
            }
            for change in versions.history
        ],
    }
