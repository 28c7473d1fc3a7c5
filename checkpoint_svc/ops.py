"""Write operations, each applied inside a shared batch transaction (commit.py).

Every operation checks first and changes second: a domain error raised by one
operation must leave the batch as it found it, so its neighbours still commit.
"""

from __future__ import annotations

import base64
import dataclasses
import json
from dataclasses import dataclass, field
from typing import ClassVar, NamedTuple

from checkpoint_svc.commit import HEAVY_WEIGHT
from checkpoint_svc.convert import checkpoint_from_pb, checkpoint_to_pb
from checkpoint_svc.domain import (
    Checkpoint,
    NewEvent,
    PendingWrite,
    SaveCommand,
    Thread,
    ThreadKey,
    Trigger,
)
from checkpoint_svc.errors import (
    AlreadyExists,
    HeadMoved,
    InvalidArgument,
    LeaseLost,
    NotFound,
    RequiredHeadMoved,
)
from checkpoint_svc.tiers import is_special_write
from checkpoint_svc.tiers.sql import Batch
from workflow_stubs.checkpoint.v1 import checkpoint_pb2 as pb

# An operation's share of a group-commit batch (commit.py): 1, plus each event and write it
# appends, plus one per this many bytes it stores.
WEIGHT_BYTES = 65536


@dataclass(slots=True)
class SaveResult:
    checkpoint: Checkpoint
    seq: int
    replayed: bool = False
    fencing_token: int = 0  # of the lease the Save took (SaveCommand.lease_owner)
    thread: Thread | None = None  # the row as the Save left it (None when replayed)
    time: float | None = None  # of the events appended (None if recorded without it)


class Appended(NamedTuple):
    """What PutWrites and Publish answer: writes stored (0 for Publish), the seqs of the
    events appended, and their time (None if none, or recorded without it)."""

    written: int
    seqs: list[int]
    time: float | None


def check_fencing(thread: Thread, token: int, now: float) -> None:
    """A writer must carry the current token while a lease is held (or at all, if it has one)."""
    if token:
        if token != thread.fencing_token:
            raise LeaseLost(  # never the current token: it is the holder's secret
                f"fencing token {token} is stale: the thread's lease was taken since "
                f"(held by {thread.lease_owner or 'nobody'})"
            )
    elif thread.lease_held(now):
        raise LeaseLost(
            f"thread is leased by {thread.lease_owner!r}; writes must carry its fencing token"
        )


def _existing(batch: Batch, key: ThreadKey) -> Thread:
    thread = batch.thread(key)
    if thread is None:
        raise NotFound(f"thread {key.namespace}/{key.thread_id} not found")
    return thread


async def _replay(batch: Batch, tenant: str, request_id: str, kind: str) -> dict | None:
    if not request_id:
        return None
    found = await batch.find_request(tenant, request_id)
    if found is None:
        return None
    if found[0] != kind:
        raise InvalidArgument(
            f"request_id {request_id!r} was already used by a {found[0]} request",
            [("request_id", "already used by a different kind of request")],
        )
    return json.loads(found[1])


class _Defaults:
    """What an operation is unless it says otherwise (commit.Operation): no request id, no
    client-chosen checkpoint id, and writable in one statement."""

    __slots__ = ()
    request_id: ClassVar[str] = ""
    claimed_id: ClassVar[str] = ""
    in_one_statement: ClassVar[bool] = True


@dataclass(slots=True)
class SaveOp(_Defaults):
    cmd: SaveCommand
    client_supplied_id: bool = False
    explicit_parent: str = ""  # as requested; empty means "the head at commit time"
    creates: bool = True

    @property
    def key(self) -> ThreadKey:
        return self.cmd.checkpoint.key

    @property
    def weight(self) -> int:
        return 1 + len(self.cmd.events) + len(self.cmd.checkpoint.state) // WEIGHT_BYTES

    @property
    def request_id(self) -> str:
        return self.cmd.request_id

    @property
    def claimed_id(self) -> str:
        """The checkpoint id the client chose, if it did: the batch checks it is free."""
        return self.cmd.checkpoint.checkpoint_id if self.client_supplied_id else ""

    async def apply(self, batch: Batch) -> SaveResult:
        cmd, cp, key = self.cmd, self.cmd.checkpoint, self.key
        done = await _replay(batch, key.tenant, cmd.request_id, "save")
        if done is not None:  # the first result, as it was answered (even if pruned since)
            first = pb.Checkpoint.FromString(base64.b64decode(done["checkpoint"]))
            cp = checkpoint_from_pb(first, key.tenant)
            return SaveResult(cp, done["seq"], replayed=True, time=done.get("time"))
        thread = _existing(batch, key)
        check_fencing(thread, cmd.fencing_token, batch.now)
        if cmd.expected_parent_id and cmd.expected_parent_id != thread.head_id:
            raise HeadMoved(
                f"head moved: expected parent {cmd.expected_parent_id}, "
                f"head is {thread.head_id or '(none)'}"
            )
        if cmd.required_head is not None:
            other, head = cmd.required_head
            if (found := await batch.head_of(other, head)) != head:
                raise RequiredHeadMoved(
                    f"the head of {other.namespace}/{other.thread_id} is {found or '(none)'}, "
                    f"not {head} as required"
                )
        if cmd.lease_owner and thread.lease_held(batch.now):
            if thread.lease_owner != cmd.lease_owner:
                raise LeaseLost(
                    f"thread is leased by {thread.lease_owner!r} for another "
                    f"{thread.lease_expires_at - batch.now:.1f}s"
                )
        early_writes = False
        if self.client_supplied_id:
            exists, early_writes = await batch.checkpoint_or_writes_exist(key, cp.checkpoint_id)
            if exists:
                raise AlreadyExists(f"checkpoint {cp.checkpoint_id} already exists")
        if not cmd.exact_parent:
            cp.parent_id = self.explicit_parent or thread.head_id
        batch.checkpoints.append(cp)
        if early_writes:
            batch.early_writes.add((key, cp.checkpoint_id))
        thread.head_id = cp.checkpoint_id
        if cmd.status:
            thread.status = cmd.status
        if cmd.workflow_id:
            thread.workflow_id = cmd.workflow_id
        if cmd.workflow_version:
            thread.workflow_version = cmd.workflow_version
        if cmd.keep_last:
            thread.keep_last = cmd.keep_last
        if cmd.keep_forever:
            thread.keep_forever = True
        if cmd.lease_owner:
            thread.fencing_token += 1
            thread.lease_owner = cmd.lease_owner
            thread.lease_expires_at = batch.now + cmd.lease_ttl
        elif cmd.release_lease:
            thread.lease_owner, thread.lease_expires_at = "", 0.0
        saved = batch.emit(
            thread,
            NewEvent(
                "checkpoint.saved",
                {
                    "checkpoint_id": cp.checkpoint_id,
                    "parent_id": cp.parent_id,
                    "step": cp.step,
                    "trigger": Trigger(cp.trigger).name,
                    "name": cp.name,
                    "status": thread.status.name,
                    "progress_percent": cp.progress_percent,
                    "eta_seconds": cp.eta_seconds,
                    "completed_nodes": len(cp.completed_nodes),
                },
            ),
        )
        emitted = [saved] + [batch.emit(thread, e) for e in cmd.events]
        if cmd.status.terminal:
            emitted[-1].terminal = True
        batch.heads[key] = (cp.checkpoint_id, saved.seq)
        if cmd.request_id:
            batch.record_request(
                key.tenant,
                cmd.request_id,
                "save",
                json.dumps(
                    {
                        "checkpoint": base64.b64encode(
                            checkpoint_to_pb(cp, include_state=False).SerializeToString()
                        ).decode(),
                        "seq": saved.seq,
                        "time": batch.now,
                    }
                ),
            )
        token = thread.fencing_token if cmd.lease_owner else 0
        return SaveResult(
            cp, saved.seq, fencing_token=token, thread=dataclasses.replace(thread), time=batch.now
        )


@dataclass(slots=True)
class PutWritesOp(_Defaults):
    key: ThreadKey
    writes: list[PendingWrite]
    fencing_token: int = 0
    events: list[NewEvent] = field(default_factory=list)
    request_id: str = ""
    # Writes may come before their thread's first checkpoint (a new LangGraph subgraph).
    creates: bool = True

    @property
    def weight(self) -> int:
        stored = sum(len(w.value) for w in self.writes)
        return 1 + len(self.writes) + len(self.events) + stored // WEIGHT_BYTES

    async def apply(self, batch: Batch) -> Appended:
        done = await _replay(batch, self.key.tenant, self.request_id, "put_writes")
        if done is not None:
            return Appended(done["written"], list(done["seqs"]), done.get("time"))
        thread = _existing(batch, self.key)
        check_fencing(thread, self.fencing_token, batch.now)
        batch.keep(thread)
        upsert = all(is_special_write(w.idx) for w in self.writes)
        for w in self.writes:
            w.upsert = upsert
        batch.writes.extend((self.key, w) for w in self.writes)
        seqs = [batch.emit(thread, e).seq for e in self.events]
        time = batch.now if seqs else None
        if self.request_id:
            batch.record_request(
                self.key.tenant,
                self.request_id,
                "put_writes",
                json.dumps({"written": len(self.writes), "seqs": seqs, "time": time}),
            )
        return Appended(len(self.writes), seqs, time)


@dataclass(slots=True)
class PublishOp(_Defaults):
    key: ThreadKey
    events: list[NewEvent]
    request_id: str = ""
    fencing_token: int = 0
    creates: bool = True

    @property
    def weight(self) -> int:
        return 1 + len(self.events)

    async def apply(self, batch: Batch) -> Appended:
        done = await _replay(batch, self.key.tenant, self.request_id, "publish")
        if done is not None:
            return Appended(0, list(done["seqs"]), done.get("time"))
        thread = _existing(batch, self.key)
        check_fencing(thread, self.fencing_token, batch.now)
        seqs = [batch.emit(thread, e).seq for e in self.events]
        if self.request_id:
            batch.record_request(
                self.key.tenant,
                self.request_id,
                "publish",
                json.dumps({"seqs": seqs, "time": batch.now}),
            )
        return Appended(0, seqs, batch.now)


@dataclass(slots=True)
class AcquireLeaseOp(_Defaults):
    key: ThreadKey
    owner: str
    ttl: float
    creates: bool = True
    weight: int = 1

    async def apply(self, batch: Batch) -> Thread:
        thread = _existing(batch, self.key)
        if thread.lease_held(batch.now) and thread.lease_owner != self.owner:
            raise LeaseLost(
                f"thread is leased by {thread.lease_owner!r} for another "
                f"{thread.lease_expires_at - batch.now:.1f}s"
            )
        thread.fencing_token += 1
        thread.lease_owner = self.owner
        thread.lease_expires_at = batch.now + self.ttl
        batch.touch(thread)
        return thread


@dataclass(slots=True)
class RenewLeaseOp(_Defaults):
    key: ThreadKey
    owner: str
    fencing_token: int
    ttl: float
    creates: bool = False
    weight: int = 1

    async def apply(self, batch: Batch) -> Thread:
        thread = _existing(batch, self.key)
        if thread.lease_owner != self.owner or thread.fencing_token != self.fencing_token:
            raise LeaseLost(
                f"lease lost: held by {thread.lease_owner or 'nobody'}, not {self.owner!r} "
                f"with token {self.fencing_token}"
            )
        thread.lease_expires_at = batch.now + self.ttl
        batch.touch(thread)
        return thread


@dataclass(slots=True)
class ReleaseLeaseOp(_Defaults):
    key: ThreadKey
    owner: str
    fencing_token: int
    creates: bool = False
    weight: int = 1

    async def apply(self, batch: Batch) -> Thread:
        thread = _existing(batch, self.key)
        if thread.lease_owner != self.owner or thread.fencing_token != self.fencing_token:
            raise LeaseLost(
                f"lease not held by {self.owner!r} with token {self.fencing_token}: the holder "
                f"is {thread.lease_owner or 'nobody'}"
            )
        thread.lease_owner = ""
        thread.lease_expires_at = 0.0
        batch.touch(thread)
        return thread


@dataclass(slots=True)
class DeleteThreadOp(_Defaults):
    key: ThreadKey
    creates: bool = False
    # Its work grows with the thread: never in a batch of small operations.
    weight: int = HEAVY_WEIGHT
    in_one_statement: ClassVar[bool] = False  # it deletes as it goes

    async def apply(self, batch: Batch) -> int:
        _existing(batch, self.key)
        return await batch.delete_thread(self.key)
