"""gRPC servicer: validates requests, translates protobuf to domain objects and
back, and maps domain errors to status codes (docs/checkpoint-service.md#errors). No logic lives
here beyond that; it is all in CheckpointStore.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import functools
import json
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.rpc import code_pb2, status_pb2
from grpc_status import rpc_status

from checkpoint_svc import convert
from checkpoint_svc.domain import (
    Event,
    NewEvent,
    SaveCommand,
    ThreadKey,
    ThreadStatus,
    Tier,
    Trigger,
)
from checkpoint_svc.errors import (
    AlreadyExists,
    DataLoss,
    HeadMoved,
    InvalidArgument,
    LeaseLost,
    NotFound,
    PayloadTooLarge,
    RequiredHeadMoved,
    StoreError,
    TierUnavailable,
)
from checkpoint_svc.feed import Heartbeat
from checkpoint_svc.session import serve_session
from checkpoint_svc.store import CheckpointStore, TierHealth
from checkpoint_svc.tiers.sql import ThreadFilter
from workflow_rpc import statuses
from workflow_rpc.audit import (
    AUDIT_NAMESPACE,
    AUDIT_THREAD,
    EVENT_PREFIX,
    EntryWrites,
    entry_payload,
)
from workflow_rpc.callers import CALLER, Role, roles_by_method
from workflow_rpc.identities import PermissionDenied
from workflow_rpc.namespaces import ENGINE_NAMESPACES
from workflow_rpc.tenants import tenant_of
from workflow_stubs.checkpoint.v1 import checkpoint_pb2 as pb
from workflow_stubs.checkpoint.v1 import checkpoint_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

_SERVICE = pb.DESCRIPTOR.services_by_name["CheckpointService"].full_name
# The role each RPC needs when credentials are checked (docs/security.md#identities-and-roles);
# the engine's system identity has them all. A Session's calls are those of a writer.
REQUIRED_ROLES: dict[str, Role] = roles_by_method(
    _SERVICE,
    {
        Role.READER: (
            "Restore",
            "List",
            "Stream",
            "GetThread",
            "ListThreads",
            "GetStats",
            "GetServerInfo",
        ),
        Role.WRITER: (
            "Save",
            "PutWrites",
            "Publish",
            "AcquireLease",
            "RenewLease",
            "ReleaseLease",
            "Session",
        ),
        Role.ADMIN: ("DeleteThread", "PruneThreads", "DeleteForRuns", "CopyThread"),
    },
)

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
MAX_LEASE_SECONDS = 24 * 3600.0
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

_CODES: list[tuple[type[Exception], int]] = [
    (statuses.InvalidArgument, code_pb2.INVALID_ARGUMENT),
    (NotFound, code_pb2.NOT_FOUND),
    (AlreadyExists, code_pb2.ALREADY_EXISTS),
    (HeadMoved, code_pb2.ABORTED),
    (LeaseLost, code_pb2.FAILED_PRECONDITION),
    (PayloadTooLarge, code_pb2.RESOURCE_EXHAUSTED),
    (TierUnavailable, code_pb2.UNAVAILABLE),
    (PermissionDenied, code_pb2.PERMISSION_DENIED),
    (DataLoss, code_pb2.DATA_LOSS),
]
# What a handler may raise for its caller: ours, and the shared request errors (the tenant,
# a namespace the caller may not write).
_REFUSALS = (StoreError, statuses.InvalidArgument, PermissionDenied)


def status_for(exc: Exception) -> status_pb2.Status:
    code = code_pb2.UNAVAILABLE
    for cls, rpc_code in _CODES:
        if isinstance(exc, cls):
            code = rpc_code
            break
    violations = exc.violations if isinstance(exc, statuses.InvalidArgument) else None
    reason = exc.reason if isinstance(exc, RequiredHeadMoved) else ""
    return statuses.status(code, str(exc), violations, reason)


R = TypeVar("R")


def translated(method: Callable[..., Awaitable[R]]) -> Callable[..., Awaitable[R]]:
    """Turn domain errors into gRPC statuses; anything else is our bug (INTERNAL)."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> R:
        try:
            return await method(self, request, context)
        except _REFUSALS as exc:
            await context.abort_with_status(rpc_status.to_status(status_for(exc)))
        raise AssertionError("unreachable")

    return wrapper


# Ids are bounded in UTF-8 bytes so that a key always fits PostgreSQL's index rows (2704
# bytes): tenant 128 + namespace 1024 + thread 256 + checkpoint 128 + task 256.
ID_MAX_BYTES = 256
CHECKPOINT_ID_MAX_BYTES = 128
# LangGraph's checkpoint namespaces nest a segment per subgraph level (node:task-uuid).
NAMESPACE_MAX_BYTES = 1024


def _check_id(
    violations: list[tuple[str, str]],
    field: str,
    value: str,
    required: bool,
    max_len: int = ID_MAX_BYTES,
) -> None:
    if required and not value:
        violations.append((field, "required"))
    elif len(value) > max_len // 4 and len(value.encode()) > max_len:
        violations.append((field, f"at most {max_len} bytes in UTF-8"))
    elif _CONTROL.search(value):
        violations.append((field, "must not contain control characters"))


def _check_checkpoint_id(
    violations: list[tuple[str, str]], field: str, value: str, required: bool = False
) -> None:
    _check_id(violations, field, value, required, CHECKPOINT_ID_MAX_BYTES)


def _check_namespace(violations: list[tuple[str, str]], field: str, value: str) -> None:
    _check_id(violations, field, value, False, NAMESPACE_MAX_BYTES)


def thread_key(
    context: grpc.aio.ServicerContext,
    namespace: str,
    thread_id: str,
    prefix: str = "",
    violations: list[tuple[str, str]] | None = None,
) -> ThreadKey:
    """The thread key of a request; bad ids are added to `violations`, or raised at once.
    With credentials checked, the audit log's thread is an admin's to read."""
    tenant = tenant_of(context)
    if namespace == AUDIT_NAMESPACE and not _may_read_audit():
        raise PermissionDenied(f"namespace {namespace!r} is the audit log: the admin role reads it")
    found: list[tuple[str, str]] = [] if violations is None else violations
    _check_namespace(found, prefix + "namespace", namespace)
    _check_id(found, prefix + "thread_id", thread_id, required=True)
    if violations is None:
        _raise_if(found)
    return ThreadKey(tenant, namespace, thread_id)


def _may_read_audit() -> bool:
    caller = CALLER.get()
    return caller is None or caller.may(Role.ADMIN)


def writable_key(
    context: grpc.aio.ServicerContext,
    namespace: str,
    thread_id: str,
    prefix: str = "",
    violations: list[tuple[str, str]] | None = None,
) -> ThreadKey:
    """The key of a thread the call saves, writes, publishes to or leases: with credentials
    checked, only the system role may do that in the engine's namespaces (a tenant's token
    changes runs through the engine; docs/security.md#the-engines-namespaces)."""
    key = thread_key(context, namespace, thread_id, prefix, violations)
    caller = CALLER.get()
    if caller is not None and namespace in ENGINE_NAMESPACES and not caller.may(Role.SYSTEM):
        raise PermissionDenied(
            f"namespace {namespace!r} is the engine's: {caller.subject} changes it through "
            "engine_svc (only the system role writes there)"
        )
    return key


def check_prefix_writable(prefix: str) -> None:
    """A delete, prune or copy of every namespace under `prefix`: with credentials checked,
    only the system role may reach the engine's namespaces that way (an admin's copy of a
    run would be a run the engine executes again)."""
    caller = CALLER.get()
    if caller is None or caller.may(Role.SYSTEM):
        return
    covered = sorted(ns for ns in ENGINE_NAMESPACES if ns.startswith(prefix))
    if covered:
        raise PermissionDenied(
            f"namespace_prefix {prefix!r} covers the engine's namespaces ({', '.join(covered)}): "
            f"{caller.subject} may name a prefix outside them (only the system role goes there)"
        )


_MIN_TS, _MAX_TS = -62135596800, 253402300799  # 0001-01-01 .. 9999-12-31, as protobuf allows


def _text(violations: list[tuple[str, str]], field: str, value: str, max_len: int = 4096) -> None:
    """Free text: any characters but NUL (PostgreSQL cannot store it), bounded in length."""
    if "\x00" in value:
        violations.append((field, "must not contain NUL characters"))
    elif len(value) > max_len:
        violations.append((field, f"at most {max_len} characters"))


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # NaN and Infinity: Python accepts them, JSON not


def _json_object(violations: list[tuple[str, str]], field: str, value: str) -> None:
    """A JSON object of finite values and no NUL, at most 64 KiB."""
    if len(value) > 65536:
        violations.append((field, "at most 65536 characters"))
        return
    if "\x00" in value or "\\u0000" in value:
        violations.append((field, "must not contain NUL characters"))
        return
    try:
        parsed = json.loads(value, parse_constant=_no_constant)
    except ValueError as exc:
        violations.append((field, f"not JSON: {exc}"))
        return
    if not isinstance(parsed, dict):
        violations.append((field, "must be a JSON object"))


def _finite(violations: list[tuple[str, str]], field: str, value: float) -> None:
    if not math.isfinite(value):
        violations.append((field, "must be a finite number"))


def _timestamp(violations: list[tuple[str, str]], field: str, msg: Any, name: str) -> None:
    if msg.HasField(name):
        t = getattr(msg, name)
        if not _MIN_TS <= t.seconds <= _MAX_TS or not 0 <= t.nanos < 1_000_000_000:
            violations.append((field, "out of the Timestamp range"))


# JSON levels an event payload may nest: a Stream response around it must still parse under
# protobuf's limit of 100 nested messages (each JSON level costs three).
MAX_PAYLOAD_DEPTH = 30


def _payload(violations: list[tuple[str, str]], field: str, struct: Any) -> dict[str, Any]:
    """The payload as stored (checked and converted in one walk); {} if it cannot be."""
    try:
        return convert.plain_struct(struct, MAX_PAYLOAD_DEPTH)
    except convert.NotPlain as exc:
        violations.append((field, str(exc)))
        return {}


def _raise_if(violations: list[tuple[str, str]]) -> None:
    if violations:
        summary = "; ".join(f"{f}: {d}" for f, d in violations)
        raise InvalidArgument(f"invalid request: {summary}", violations)


# What one request may put into a group-commit batch (RESOURCE_EXHAUSTED beyond), so that
# one big request never stalls everyone else's (docs/checkpoint-service.md#limits).
MAX_EVENTS_PER_REQUEST = 1000
MAX_WRITES_PER_REQUEST = 1000
# Other repeated fields (INVALID_ARGUMENT beyond): checked before any element is looked at.
MAX_COMPLETED_NODES = 10_000
MAX_METADATA_ENTRIES = 1000
MAX_METADATA_FILTERS = 64
MAX_STATUSES = 16
MAX_IDS_PER_REQUEST = 1000


def _at_most(field: str, items: Any, limit: int) -> None:
    """A repeated field over its bound: refused before any element is looked at."""
    if len(items) > limit:
        raise InvalidArgument(
            f"{field}: {len(items)} given, at most {limit}", [(field, f"at most {limit}")]
        )


def _work_at_most(field: str, items: Any, limit: int) -> None:
    """Events or writes over what one request may commit: RESOURCE_EXHAUSTED."""
    if len(items) > limit:
        raise PayloadTooLarge(
            f"{field}: {len(items)} in one request, at most {limit}; split it into several"
        )


def _events(violations: list[tuple[str, str]], events: Any) -> list[NewEvent]:
    """The events checked, as stored (meaningful only if no violation was found)."""
    _work_at_most("events", events, MAX_EVENTS_PER_REQUEST)
    checked = []
    for i, e in enumerate(events):
        if not e.type:
            violations.append((f"events[{i}].type", "required"))
        _text(violations, f"events[{i}].type", e.type, 256)
        payload = _payload(violations, f"events[{i}].payload", e.payload)
        checked.append(NewEvent(type=e.type, payload=payload, terminal=e.terminal))
    return checked


def _enum(violations: list[tuple[str, str]], field: str, value: int, enum: Any) -> None:
    if value not in enum._value2member_map_:
        violations.append((field, f"unknown value {value}"))


def _page_size(value: int) -> int:
    if value < 0:
        raise InvalidArgument("page_size must not be negative", [("page_size", "negative")])
    return min(value or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


_TOKEN_MARK = "v1"


def encode_token(*parts: str) -> str:
    """An opaque page token (AIP-158): the position to continue after."""
    raw = "\x1f".join((_TOKEN_MARK, *parts)).encode()
    return base64.urlsafe_b64encode(raw).decode()


def decode_token(token: str, parts: int) -> list[str]:
    try:
        raw = base64.b64decode(token.encode(), altchars=b"-_", validate=True).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raw = ""
    values = raw.split("\x1f")
    if len(values) != parts + 1 or values[0] != _TOKEN_MARK:
        raise InvalidArgument("bad page_token", [("page_token", "not issued by this service")])
    return values[1:]


def _finite_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _ttl_out_of_range(value: float) -> bool:
    """A lease's seconds out of range (or NaN)."""
    return value < 0 or value > MAX_LEASE_SECONDS or value != value


def _ttl(field: str, value: float) -> float:
    if _ttl_out_of_range(value):
        raise InvalidArgument(
            f"{field} must be between 0 and {MAX_LEASE_SECONDS:.0f}",
            [(field, "out of range")],
        )
    return value


class CheckpointServicer(pb_grpc.CheckpointServiceServicer):
    def __init__(self, store: CheckpointStore) -> None:
        self.store = store
        self._audits = EntryWrites()

    @translated
    async def Save(
        self, request: pb.SaveRequest, context: grpc.aio.ServicerContext
    ) -> pb.SaveResponse:
        msg = request.checkpoint
        violations: list[tuple[str, str]] = []
        key = writable_key(context, msg.namespace, msg.thread_id, "checkpoint.", violations)
        _check_checkpoint_id(violations, "checkpoint.checkpoint_id", msg.checkpoint_id)
        _check_checkpoint_id(violations, "checkpoint.parent_id", msg.parent_id)
        _check_checkpoint_id(violations, "expected_parent_id", request.expected_parent_id)
        _check_id(violations, "request_id", request.request_id, False, 256)
        if request.keep_last < 0:
            violations.append(("keep_last", "must not be negative"))
        _enum(violations, "checkpoint.trigger", msg.trigger, Trigger)
        _enum(violations, "status", request.status, ThreadStatus)
        _text(violations, "checkpoint.name", msg.name)
        _text(violations, "checkpoint.content_type", msg.content_type, 256)
        _text(violations, "workflow_id", request.workflow_id, 256)
        _at_most("checkpoint.completed_nodes", msg.completed_nodes, MAX_COMPLETED_NODES)
        _at_most("checkpoint.metadata", msg.metadata, MAX_METADATA_ENTRIES)
        nodes = msg.completed_nodes
        if nodes and (max(map(len, nodes)) > 256 or "\x00" in "".join(nodes)):
            for i, node in enumerate(nodes):  # only now: to name each bad one
                _text(violations, f"checkpoint.completed_nodes[{i}]", node, 256)
        for k, v in msg.metadata.items():
            _text(violations, f"checkpoint.metadata[{k[:40]!r}]", k + v, 65536)
        if msg.metadata_json:
            _json_object(violations, "checkpoint.metadata_json", msg.metadata_json)
        _finite(violations, "checkpoint.progress_percent", msg.progress_percent)
        _finite(violations, "checkpoint.eta_seconds", msg.eta_seconds)
        _timestamp(violations, "checkpoint.expires_at", msg, "expires_at")
        if request.durability not in pb.Durability.values():
            violations.append(("durability", f"unknown value {request.durability}"))
        if not 0 <= msg.progress_percent <= 100:
            violations.append(("checkpoint.progress_percent", "must be within 0..100"))
        if msg.eta_seconds < 0:
            violations.append(("checkpoint.eta_seconds", "must not be negative"))
        _check_id(violations, "lease_owner", request.lease_owner, False)
        if request.lease_owner and _ttl_out_of_range(request.lease_ttl_seconds):
            violations.append(("lease_ttl_seconds", f"must be within 0..{MAX_LEASE_SECONDS:.0f}"))
        if request.lease_owner and request.durability == pb.DURABILITY_ASYNC:
            violations.append(("lease_owner", "a lease is taken only by a durable (SYNC) Save"))
        if request.release_lease:
            if not request.fencing_token:
                violations.append(("release_lease", "needs the lease's fencing_token"))
            if request.lease_owner:
                violations.append(("release_lease", "not with lease_owner"))
            if request.durability == pb.DURABILITY_ASYNC:
                violations.append(("release_lease", "only by a durable (SYNC) Save"))
        required = None
        if request.HasField("required_head"):
            need = request.required_head
            other = thread_key(
                context, need.namespace, need.thread_id, "required_head.", violations
            )
            _check_checkpoint_id(violations, "required_head.checkpoint_id", need.checkpoint_id)
            if not need.checkpoint_id:
                violations.append(("required_head.checkpoint_id", "required"))
            if request.durability == pb.DURABILITY_ASYNC:
                violations.append(("required_head", "only for a durable (SYNC) Save"))
            required = (other, need.checkpoint_id)
        events = _events(violations, request.events)
        _raise_if(violations)
        cp = convert.checkpoint_from_pb(msg, key.tenant)
        cmd = SaveCommand(
            checkpoint=cp,
            expected_parent_id=request.expected_parent_id,
            request_id=request.request_id,
            fencing_token=request.fencing_token,
            status=ThreadStatus(request.status),
            workflow_id=request.workflow_id,
            workflow_version=request.workflow_version,
            events=events,
            keep_last=request.keep_last,
            keep_forever=request.keep_forever,
            exact_parent=request.exact_parent,
            lease_owner=request.lease_owner,
            lease_ttl=request.lease_ttl_seconds,
            release_lease=request.release_lease,
            required_head=required,
        )
        durable = request.durability != pb.DURABILITY_ASYNC
        result = await self.store.save(cmd, durable=durable)
        return pb.SaveResponse(
            checkpoint=convert.checkpoint_to_pb(result.checkpoint, include_state=False),
            seq=result.seq,
            fencing_token=result.fencing_token,
            thread=convert.thread_to_pb(result.thread) if result.thread else None,
            events_time=convert.ts(result.time),
        )

    @translated
    async def Restore(
        self, request: pb.RestoreRequest, context: grpc.aio.ServicerContext
    ) -> pb.RestoreResponse:
        key = thread_key(context, request.namespace, request.thread_id)
        result = await self.store.restore(key, request.checkpoint_id, request.include_writes)
        return pb.RestoreResponse(
            checkpoint=convert.checkpoint_to_pb(result.checkpoint),
            writes=[convert.write_to_pb(w) for w in result.writes],
            served_from=int(result.served_from),
        )

    @translated
    async def List(
        self, request: pb.ListRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListResponse:
        violations: list[tuple[str, str]] = []
        prefix = request.namespace_prefix if request.HasField("namespace_prefix") else None
        key = thread_key(context, request.namespace, request.thread_id, violations=violations)
        if prefix is not None:
            _check_namespace(violations, "namespace_prefix", prefix)
        _check_checkpoint_id(violations, "before_checkpoint_id", request.before_checkpoint_id)
        _enum(violations, "trigger", request.trigger, Trigger)
        metadata_equals: dict[str, Any] = {}
        _at_most("metadata_equals", request.metadata_equals, MAX_METADATA_FILTERS)
        for k, v in request.metadata_equals.items():
            where = f"metadata_equals[{k[:40]!r}]"
            _text(violations, where, k + v, 65536)
            if "\\u0000" in v:
                violations.append((where, "must not contain NUL characters"))
                continue
            try:
                metadata_equals[k] = json.loads(v, parse_constant=_no_constant)
            except ValueError:
                violations.append((where, 'must be a JSON value, e.g. 2, true or "loop"'))
        _raise_if(violations)
        before = decode_token(request.page_token, 1)[0] if request.page_token else ""
        if request.before_checkpoint_id and (not before or request.before_checkpoint_id < before):
            before = request.before_checkpoint_id
        rows, last = await self.store.list(
            key,
            _page_size(request.page_size),
            before_id=before,
            include_state=request.include_state,
            trigger=Trigger(request.trigger),
            created_after=convert.seconds(request.created_after)
            if request.HasField("created_after")
            else None,
            created_before=convert.seconds(request.created_before)
            if request.HasField("created_before")
            else None,
            metadata_equals=metadata_equals,
            namespace_prefix=prefix,
        )
        writes = []
        if request.include_writes and rows:
            for c, found in zip(rows, await self.store.writes_of(rows), strict=True):
                if found:
                    writes.append(
                        pb.CheckpointWrites(
                            namespace=c.key.namespace,
                            checkpoint_id=c.checkpoint_id,
                            writes=[convert.write_to_pb(w) for w in found],
                        )
                    )
        return pb.ListResponse(
            checkpoints=[convert.checkpoint_to_pb(c, request.include_state) for c in rows],
            next_page_token=encode_token(last) if last else "",
            writes=writes,
        )

    async def Stream(
        self, request: pb.StreamRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamResponse]:
        try:
            tenant = tenant_of(context)
            key = None
            if request.thread_id:
                key = thread_key(context, request.namespace, request.thread_id)
            if request.after_seq < 0:
                raise InvalidArgument("after_seq must not be negative", [("after_seq", "negative")])
            hide_audit = key is None and not _may_read_audit()  # a tenant-wide stream
            async for item in self.store.stream(
                tenant, key, request.after_seq, request.follow, request.until_now
            ):
                if hide_audit and isinstance(item, Event) and item.key.namespace == AUDIT_NAMESPACE:
                    # In its place (the feed's seqs stay dense), without what it says.
                    item = dataclasses.replace(
                        item, type=EVENT_PREFIX + "hidden", payload={}, encoded=None
                    )
                if isinstance(item, Heartbeat):
                    yield pb.StreamResponse(
                        heartbeat=pb.Heartbeat(time=convert.ts(item.time), last_seq=item.last_seq)
                    )
                else:  # encoded once, whatever the number of watchers (interceptors.py)
                    if item.encoded is None:
                        message = pb.StreamResponse(event=convert.event_to_pb(item))
                        item.encoded = message.SerializeToString()
                    yield item.encoded
        except _REFUSALS as exc:
            await context.abort_with_status(rpc_status.to_status(status_for(exc)))

    @translated
    async def PutWrites(
        self, request: pb.PutWritesRequest, context: grpc.aio.ServicerContext
    ) -> pb.PutWritesResponse:
        key = writable_key(context, request.namespace, request.thread_id)
        violations: list[tuple[str, str]] = []
        _work_at_most("writes", request.writes, MAX_WRITES_PER_REQUEST)
        if not request.writes:
            violations.append(("writes", "at least one write"))
        for i, w in enumerate(request.writes):
            _check_checkpoint_id(
                violations, f"writes[{i}].checkpoint_id", w.checkpoint_id, required=True
            )
            _check_id(violations, f"writes[{i}].task_id", w.task_id, True, 256)
            _text(violations, f"writes[{i}].channel", w.channel, 1024)
            _text(violations, f"writes[{i}].task_path", w.task_path, 4096)
            _text(violations, f"writes[{i}].content_type", w.content_type, 256)
        events = _events(violations, request.events)
        _check_id(violations, "request_id", request.request_id, False, 256)
        _raise_if(violations)
        appended = await self.store.put_writes(
            key,
            [convert.write_from_pb(w) for w in request.writes],
            request.fencing_token,
            events,
            request.request_id,
        )
        return pb.PutWritesResponse(
            written=appended.written, seqs=appended.seqs, events_time=convert.ts(appended.time)
        )

    @translated
    async def Publish(
        self, request: pb.PublishRequest, context: grpc.aio.ServicerContext
    ) -> pb.PublishResponse:
        key = writable_key(context, request.namespace, request.thread_id)
        violations: list[tuple[str, str]] = []
        if not request.events:
            violations.append(("events", "at least one event"))
        events = _events(violations, request.events)
        _check_id(violations, "request_id", request.request_id, False, 256)
        _raise_if(violations)
        appended = await self.store.publish(
            key,
            events,
            request.request_id,
            request.fencing_token,
        )
        return pb.PublishResponse(seqs=appended.seqs, events_time=convert.ts(appended.time))

    @translated
    async def DeleteThread(
        self, request: pb.DeleteThreadRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteThreadResponse:
        if request.HasField("namespace_prefix"):
            key = thread_key(context, request.namespace, request.thread_id)
            _check_namespace(violations := [], "namespace_prefix", request.namespace_prefix)
            _raise_if(violations)
            check_prefix_writable(request.namespace_prefix)
            threads, deleted = await self.store.delete_threads(
                key.tenant, key.thread_id, request.namespace_prefix
            )
            if not threads and not request.allow_missing:
                raise NotFound(
                    f"thread {key.thread_id} not found under {request.namespace_prefix!r}"
                )
            await self._audit(
                key.tenant,
                "delete",
                key.thread_id,
                {"namespace_prefix": request.namespace_prefix, "checkpoints_deleted": deleted},
            )
            return pb.DeleteThreadResponse(checkpoints_deleted=deleted, threads_deleted=threads)
        key = writable_key(context, request.namespace, request.thread_id)
        try:
            deleted = await self.store.delete_thread(key)
        except NotFound:
            if not request.allow_missing:
                raise
            return pb.DeleteThreadResponse()
        await self._audit(
            key.tenant,
            "delete",
            key.thread_id,
            {"namespace": key.namespace, "checkpoints_deleted": deleted},
        )
        return pb.DeleteThreadResponse(checkpoints_deleted=deleted, threads_deleted=1)

    async def _audit(self, tenant: str, action: str, target: str, details: dict) -> None:
        """An entry in the tenant's audit log (workflow_rpc/audit.py), after the action, by a
        task of its own: a caller going away does not take the entry with it."""
        key = ThreadKey(tenant, AUDIT_NAMESPACE, AUDIT_THREAD)
        event = NewEvent(EVENT_PREFIX + action, entry_payload(action, target, details))
        write = self.store.publish(key, [event], "", 0)
        await asyncio.shield(self._audits.start(write, action, target))

    @translated
    async def GetThread(
        self, request: pb.GetThreadRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetThreadResponse:
        key = thread_key(context, request.namespace, request.thread_id)
        return pb.GetThreadResponse(thread=convert.thread_to_pb(await self.store.get_thread(key)))

    @translated
    async def ListThreads(
        self, request: pb.ListThreadsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListThreadsResponse:
        tenant = tenant_of(context)
        violations: list[tuple[str, str]] = []
        _at_most("statuses", request.statuses, MAX_STATUSES)
        for i, s in enumerate(request.statuses):
            _enum(violations, f"statuses[{i}]", s, ThreadStatus)
        _text(violations, "workflow_id", request.workflow_id, 256)
        _raise_if(violations)
        parts = 3 if request.newest_first else 2
        after = tuple(decode_token(request.page_token, parts)) if request.page_token else None
        if after is not None and request.newest_first and not _finite_number(after[0]):
            raise InvalidArgument("bad page_token", [("page_token", "not issued by this service")])
        flt = ThreadFilter(
            namespace=request.namespace,
            statuses=tuple(ThreadStatus(s) for s in request.statuses),
            lease_expired_before=time.time() if request.lease_expired_only else None,
            workflow_id=request.workflow_id,
            newest_first=request.newest_first,
        )
        rows, last = await self.store.list_threads(
            tenant,
            flt,
            _page_size(request.page_size),
            after,  # type: ignore[arg-type]
        )
        return pb.ListThreadsResponse(
            threads=[convert.thread_to_pb(t) for t in rows],
            next_page_token=encode_token(*last) if last else "",
        )

    @translated
    async def AcquireLease(
        self, request: pb.AcquireLeaseRequest, context: grpc.aio.ServicerContext
    ) -> pb.AcquireLeaseResponse:
        key = writable_key(context, request.namespace, request.thread_id)
        violations: list[tuple[str, str]] = []
        _check_id(violations, "owner", request.owner, True)
        _raise_if(violations)
        thread = await self.store.acquire_lease(
            key, request.owner, _ttl("ttl_seconds", request.ttl_seconds)
        )
        return pb.AcquireLeaseResponse(
            fencing_token=thread.fencing_token,
            expires_at=convert.ts(thread.lease_expires_at),
            thread=convert.thread_to_pb(thread),
        )

    @translated
    async def RenewLease(
        self, request: pb.RenewLeaseRequest, context: grpc.aio.ServicerContext
    ) -> pb.RenewLeaseResponse:
        key = writable_key(context, request.namespace, request.thread_id)
        thread = await self.store.renew_lease(
            key, request.owner, request.fencing_token, _ttl("ttl_seconds", request.ttl_seconds)
        )
        return pb.RenewLeaseResponse(expires_at=convert.ts(thread.lease_expires_at))

    @translated
    async def ReleaseLease(
        self, request: pb.ReleaseLeaseRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReleaseLeaseResponse:
        key = writable_key(context, request.namespace, request.thread_id)
        await self.store.release_lease(key, request.owner, request.fencing_token)
        return pb.ReleaseLeaseResponse()

    @translated
    async def CopyThread(
        self, request: pb.CopyThreadRequest, context: grpc.aio.ServicerContext
    ) -> pb.CopyThreadResponse:
        tenant = tenant_of(context)
        violations: list[tuple[str, str]] = []
        _check_id(violations, "source_thread_id", request.source_thread_id, required=True)
        _check_id(violations, "target_thread_id", request.target_thread_id, required=True)
        _check_namespace(violations, "namespace_prefix", request.namespace_prefix)
        if request.source_thread_id == request.target_thread_id:
            violations.append(("target_thread_id", "must differ from source_thread_id"))
        _raise_if(violations)
        check_prefix_writable(request.namespace_prefix)
        threads, checkpoints = await self.store.copy_thread(
            tenant, request.source_thread_id, request.target_thread_id, request.namespace_prefix
        )
        await self._audit(
            tenant,
            "copy",
            request.source_thread_id,
            {
                "target_thread_id": request.target_thread_id,
                "namespace_prefix": request.namespace_prefix,
                "threads_copied": threads,
            },
        )
        return pb.CopyThreadResponse(threads_copied=threads, checkpoints_copied=checkpoints)

    @translated
    async def DeleteForRuns(
        self, request: pb.DeleteForRunsRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteForRunsResponse:
        tenant = tenant_of(context)
        violations: list[tuple[str, str]] = []
        _at_most("run_ids", request.run_ids, MAX_IDS_PER_REQUEST)
        for i, run_id in enumerate(request.run_ids):
            _check_id(violations, f"run_ids[{i}]", run_id, required=True)
        _check_namespace(violations, "namespace_prefix", request.namespace_prefix)
        _raise_if(violations)
        check_prefix_writable(request.namespace_prefix)
        deleted = await self.store.delete_for_runs(
            tenant, list(dict.fromkeys(request.run_ids)), request.namespace_prefix
        )
        await self._audit(
            tenant,
            "delete_for_runs",
            ",".join(request.run_ids),
            {"namespace_prefix": request.namespace_prefix, "checkpoints_deleted": deleted},
        )
        return pb.DeleteForRunsResponse(checkpoints_deleted=deleted)

    @translated
    async def PruneThreads(
        self, request: pb.PruneThreadsRequest, context: grpc.aio.ServicerContext
    ) -> pb.PruneThreadsResponse:
        tenant = tenant_of(context)
        violations: list[tuple[str, str]] = []
        _at_most("thread_ids", request.thread_ids, MAX_IDS_PER_REQUEST)
        for i, thread_id in enumerate(request.thread_ids):
            _check_id(violations, f"thread_ids[{i}]", thread_id, required=True)
        _check_namespace(violations, "namespace_prefix", request.namespace_prefix)
        if request.strategy not in (pb.PRUNE_STRATEGY_KEEP_LATEST, pb.PRUNE_STRATEGY_DELETE):
            violations.append(("strategy", "PRUNE_STRATEGY_KEEP_LATEST or PRUNE_STRATEGY_DELETE"))
        _raise_if(violations)
        check_prefix_writable(request.namespace_prefix)
        deleted = await self.store.prune_threads(
            tenant,
            list(dict.fromkeys(request.thread_ids)),
            request.namespace_prefix,
            keep_latest=request.strategy == pb.PRUNE_STRATEGY_KEEP_LATEST,
        )
        await self._audit(
            tenant,
            "prune",
            ",".join(request.thread_ids),
            {
                "namespace_prefix": request.namespace_prefix,
                "strategy": pb.PruneStrategy.Name(request.strategy),
                "checkpoints_deleted": deleted,
            },
        )
        return pb.PruneThreadsResponse(checkpoints_deleted=deleted)

    @translated
    async def GetStats(
        self, request: pb.GetStatsRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetStatsResponse:
        key = thread_key(context, request.namespace, request.thread_id)
        s = await self.store.stats(key)
        return pb.GetStatsResponse(
            checkpoint_count=s.checkpoint_count,
            triggers=[
                pb.TriggerCount(trigger=int(t), count=c) for t, c in sorted(s.triggers.items())
            ],
            oldest=convert.ts(s.oldest),
            newest=convert.ts(s.newest),
            state_bytes=s.state_bytes,
            event_count=s.event_count,
        )

    @translated
    async def GetServerInfo(
        self, request: pb.GetServerInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetServerInfoResponse:
        tiers = await self.store.health()
        return pb.GetServerInfoResponse(
            health=int(overall_health(tiers)),
            tiers=[
                pb.TierStatus(tier=int(t.tier), configured=t.configured, up=t.up, detail=t.detail)
                for t in tiers
            ],
            single_writer=self.store.settings.memory_answers_heads,
            max_state_bytes=self.store.settings.max_state_bytes,
            commits=self.store.committer.batches,
            committed_operations=self.store.committer.operations,
        )

    async def Session(
        self,
        request_iterator: AsyncIterator[pb.SessionRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.SessionResponse]:
        """Each call through its unary handler (checkpoint_svc/session.py)."""
        async for response in serve_session(
            lambda name: getattr(self, name), request_iterator, context, self.store.stopping
        ):
            yield response


def overall_health(tiers: list[TierHealth]) -> int:
    by_tier = {t.tier: t for t in tiers}
    if not by_tier[Tier.SQL].up:
        return pb.SERVING_HEALTH_UNAVAILABLE
    if by_tier[Tier.REDIS].configured and not by_tier[Tier.REDIS].up:
        return pb.SERVING_HEALTH_DEGRADED
    return pb.SERVING_HEALTH_HEALTHY
