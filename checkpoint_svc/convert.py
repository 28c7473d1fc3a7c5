"""Translation between protobuf messages and domain objects, in one place."""

from __future__ import annotations

import json
import math
from typing import Any

from google.protobuf import json_format, struct_pb2, timestamp_pb2

from checkpoint_svc.domain import (
    Checkpoint,
    Event,
    PendingWrite,
    Thread,
    ThreadKey,
    Trigger,
)
from workflow_stubs.checkpoint.v1 import checkpoint_pb2 as pb


def ts(seconds: float | None) -> timestamp_pb2.Timestamp | None:
    if not seconds:
        return None
    t = timestamp_pb2.Timestamp()
    t.FromNanoseconds(int(seconds * 1e9))
    return t


def seconds(t: timestamp_pb2.Timestamp) -> float:
    return t.seconds + t.nanos / 1e9


def checkpoint_to_pb(cp: Checkpoint, include_state: bool = True) -> pb.Checkpoint:
    msg = pb.Checkpoint(
        namespace=cp.key.namespace,
        thread_id=cp.key.thread_id,
        checkpoint_id=cp.checkpoint_id,
        parent_id=cp.parent_id,
        step=cp.step,
        state=cp.state if include_state else b"",
        content_type=cp.content_type,
        trigger=int(cp.trigger),
        name=cp.name,
        completed_nodes=cp.completed_nodes,
        progress_percent=cp.progress_percent,
        eta_seconds=cp.eta_seconds,
        metadata={k: v if isinstance(v, str) else json.dumps(v) for k, v in cp.metadata.items()},
        metadata_json=json.dumps(cp.metadata),
        created_at=ts(cp.created_at),
        expires_at=ts(cp.expires_at),
    )
    return msg


def checkpoint_from_pb(msg: pb.Checkpoint, tenant: str) -> Checkpoint:
    return Checkpoint(
        key=ThreadKey(tenant, msg.namespace, msg.thread_id),
        checkpoint_id=msg.checkpoint_id,
        parent_id=msg.parent_id,
        step=msg.step,
        state=msg.state,
        content_type=msg.content_type or "application/json",
        trigger=Trigger(msg.trigger) if msg.trigger in Trigger._value2member_map_ else Trigger(0),
        name=msg.name,
        completed_nodes=list(msg.completed_nodes),
        progress_percent=msg.progress_percent,
        eta_seconds=msg.eta_seconds,
        metadata=json.loads(msg.metadata_json) if msg.metadata_json else dict(msg.metadata),
        created_at=seconds(msg.created_at) if msg.HasField("created_at") else 0.0,
        expires_at=seconds(msg.expires_at) if msg.HasField("expires_at") else None,
    )


def write_to_pb(w: PendingWrite) -> pb.PendingWrite:
    return pb.PendingWrite(
        checkpoint_id=w.checkpoint_id,
        task_id=w.task_id,
        idx=w.idx,
        channel=w.channel,
        value=w.value,
        content_type=w.content_type,
        task_path=w.task_path,
    )


def write_from_pb(msg: pb.PendingWrite) -> PendingWrite:
    return PendingWrite(
        checkpoint_id=msg.checkpoint_id,
        task_id=msg.task_id,
        idx=msg.idx,
        channel=msg.channel,
        value=msg.value,
        content_type=msg.content_type or "application/json",
        task_path=msg.task_path,
    )


def thread_to_pb(t: Thread) -> pb.Thread:
    """A thread as any reader may see it: without its fencing token, the lease holder's secret
    (AcquireLease and Save answer it to the one that took the lease; docs/security.md)."""
    return pb.Thread(
        namespace=t.key.namespace,
        thread_id=t.key.thread_id,
        head_checkpoint_id=t.head_id,
        status=int(t.status),
        workflow_id=t.workflow_id,
        workflow_version=t.workflow_version,
        lease_owner=t.lease_owner,
        lease_expires_at=ts(t.lease_expires_at),
        last_seq=t.last_seq,
        created_at=ts(t.created_at),
        updated_at=ts(t.updated_at),
    )


def struct_from_dict(data: dict) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(data)
    return s


def event_to_pb(e: Event) -> pb.Event:
    return pb.Event(
        seq=e.seq,
        namespace=e.key.namespace,
        thread_id=e.key.thread_id,
        type=e.type,
        time=ts(e.time),
        payload=struct_from_dict(e.payload),
        feed_seq=e.feed_seq,
        terminal=e.terminal,
    )


def event_from_pb(msg: pb.Event, tenant: str) -> Event:
    return Event(
        key=ThreadKey(tenant, msg.namespace, msg.thread_id),
        seq=msg.seq,
        feed_seq=msg.feed_seq,
        type=msg.type,
        time=seconds(msg.time),
        payload=json_format.MessageToDict(msg.payload),
        terminal=msg.terminal,
    )


class NotPlain(ValueError):
    """A Struct that JSON cannot hold as it is: too deep, or a NaN or infinity in it."""


def plain_struct(struct: struct_pb2.Struct, max_depth: int) -> dict[str, Any]:
    """A Struct as json_format.MessageToDict gives it, checked in the same walk: nested at
    most `max_depth` levels (the Struct itself is 1), every number finite."""
    return _plain_fields(struct, 1, max_depth)


def _plain_fields(struct: struct_pb2.Struct, depth: int, max_depth: int) -> dict[str, Any]:
    if depth > max_depth:
        raise NotPlain(f"nested deeper than {max_depth} levels")
    return {k: _plain_value(v, depth, max_depth) for k, v in struct.fields.items()}


def _plain_value(value: struct_pb2.Value, depth: int, max_depth: int) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return value.string_value
    if kind == "number_value":
        number = value.number_value
        if not math.isfinite(number):
            raise NotPlain("must hold only finite numbers")
        return number
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return _plain_fields(value.struct_value, depth + 1, max_depth)
    if kind == "list_value":
        if depth + 1 > max_depth:
            raise NotPlain(f"nested deeper than {max_depth} levels")
        return [_plain_value(v, depth + 1, max_depth) for v in value.list_value.values]
    return None
