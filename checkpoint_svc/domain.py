"""Plain domain objects of the store; the servicer converts them to and from protobuf."""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from typing import Any


class Trigger(enum.IntEnum):
    UNSPECIFIED = 0
    MANUAL = 1
    TIME_BASED = 2
    NODE_COMPLETED = 3
    STEP_COMPLETED = 4
    BEFORE_CRITICAL = 5
    INTERRUPT = 6
    ERROR = 7
    PAUSE = 8


class ThreadStatus(enum.IntEnum):
    UNSPECIFIED = 0
    PENDING = 1
    RUNNING = 2
    PAUSED = 3
    WAITING = 4
    COMPLETED = 5
    FAILED = 6
    CANCELLED = 7

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset({ThreadStatus.COMPLETED, ThreadStatus.FAILED, ThreadStatus.CANCELLED})


class Tier(enum.IntEnum):
    UNSPECIFIED = 0
    MEMORY = 1
    REDIS = 2
    SQL = 3


@dataclass(frozen=True, slots=True)
class ThreadKey:
    tenant: str
    namespace: str
    thread_id: str


@dataclass(slots=True)
class Checkpoint:
    """An immutable snapshot; times are epoch seconds."""

    key: ThreadKey
    checkpoint_id: str
    parent_id: str = ""
    step: int = 0
    state: bytes = b""
    content_type: str = "application/json"
    trigger: Trigger = Trigger.UNSPECIFIED
    name: str = ""
    completed_nodes: list[str] = field(default_factory=list)
    progress_percent: float = 0.0
    eta_seconds: float = 0.0
    metadata: dict[str, Any] = field(default_factory=dict)  # JSON values
    created_at: float = 0.0
    expires_at: float | None = None

    @property
    def size(self) -> int:
        """Bytes the body holds, roughly: what a cache counts against its budget."""
        return (
            len(self.state)
            + len(self.name)
            + len(self.content_type)
            + sum(len(n) + 56 for n in self.completed_nodes)
            + (len(json.dumps(self.metadata)) * 3 if self.metadata else 0)
            + 400
        )


@dataclass(slots=True)
class PendingWrite:
    checkpoint_id: str
    task_id: str
    idx: int
    channel: str
    value: bytes
    content_type: str = "application/json"
    task_path: str = ""
    # Replaces an earlier write in its (task, idx) slot. LangGraph's rule: when every write
    # of its PutWrites call is special (a negative index); otherwise the first one stays.
    upsert: bool = False


@dataclass(slots=True)
class Thread:
    key: ThreadKey
    head_id: str = ""
    status: ThreadStatus = ThreadStatus.UNSPECIFIED
    workflow_id: str = ""
    workflow_version: int = 0
    lease_owner: str = ""
    lease_expires_at: float = 0.0
    fencing_token: int = 0
    last_seq: int = 0
    created_at: float = 0.0
    updated_at: float = 0.0
    deleted: bool = False  # a tombstone: keeps fencing token and seq after DeleteThread
    keep_last: int = 0  # retention of this thread; 0: the service's --keep-last
    keep_forever: bool = False  # retention never prunes this thread (sticky once set)

    def lease_held(self, now: float) -> bool:
        return bool(self.lease_owner) and self.lease_expires_at > now


@dataclass(slots=True)
class Event:
    key: ThreadKey
    seq: int
    feed_seq: int
    type: str
    time: float
    payload: dict[str, Any]
    terminal: bool = False
    # The Stream message carrying it, encoded once for all of its watchers (by the servicer).
    encoded: bytes | None = None


@dataclass(slots=True)
class NewEvent:
    type: str
    payload: dict[str, Any] = field(default_factory=dict)
    terminal: bool = False


@dataclass(slots=True)
class SaveCommand:
    checkpoint: Checkpoint
    expected_parent_id: str = ""
    request_id: str = ""
    fencing_token: int = 0
    status: ThreadStatus = ThreadStatus.UNSPECIFIED
    workflow_id: str = ""
    workflow_version: int = 0
    events: list[NewEvent] = field(default_factory=list)
    keep_last: int = 0
    keep_forever: bool = False  # exempt the thread from retention, from now on
    exact_parent: bool = False  # parent_id as given, "" meaning none
    lease_owner: str = ""  # take the thread's lease for this owner in the same commit
    lease_ttl: float = 0.0
    release_lease: bool = False  # let the lease go in the same commit (needs fencing_token)
    # Commit only if that other thread's head is that checkpoint (else RequiredHeadMoved).
    required_head: tuple[ThreadKey, str] | None = None


@dataclass(slots=True)
class Stats:
    checkpoint_count: int
    triggers: dict[Trigger, int]
    oldest: float | None
    newest: float | None
    state_bytes: int
    event_count: int
