import datetime

from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Trigger(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRIGGER_UNSPECIFIED: _ClassVar[Trigger]
    TRIGGER_MANUAL: _ClassVar[Trigger]
    TRIGGER_TIME_BASED: _ClassVar[Trigger]
    TRIGGER_NODE_COMPLETED: _ClassVar[Trigger]
    TRIGGER_STEP_COMPLETED: _ClassVar[Trigger]
    TRIGGER_BEFORE_CRITICAL: _ClassVar[Trigger]
    TRIGGER_INTERRUPT: _ClassVar[Trigger]
    TRIGGER_ERROR: _ClassVar[Trigger]
    TRIGGER_PAUSE: _ClassVar[Trigger]

class PruneStrategy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PRUNE_STRATEGY_UNSPECIFIED: _ClassVar[PruneStrategy]
    PRUNE_STRATEGY_KEEP_LATEST: _ClassVar[PruneStrategy]
    PRUNE_STRATEGY_DELETE: _ClassVar[PruneStrategy]

class Durability(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DURABILITY_UNSPECIFIED: _ClassVar[Durability]
    DURABILITY_SYNC: _ClassVar[Durability]
    DURABILITY_ASYNC: _ClassVar[Durability]

class Tier(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TIER_UNSPECIFIED: _ClassVar[Tier]
    TIER_MEMORY: _ClassVar[Tier]
    TIER_REDIS: _ClassVar[Tier]
    TIER_SQL: _ClassVar[Tier]

class ThreadStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    THREAD_STATUS_UNSPECIFIED: _ClassVar[ThreadStatus]
    THREAD_STATUS_PENDING: _ClassVar[ThreadStatus]
    THREAD_STATUS_RUNNING: _ClassVar[ThreadStatus]
    THREAD_STATUS_PAUSED: _ClassVar[ThreadStatus]
    THREAD_STATUS_WAITING: _ClassVar[ThreadStatus]
    THREAD_STATUS_COMPLETED: _ClassVar[ThreadStatus]
    THREAD_STATUS_FAILED: _ClassVar[ThreadStatus]
    THREAD_STATUS_CANCELLED: _ClassVar[ThreadStatus]

class ServingHealth(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SERVING_HEALTH_UNSPECIFIED: _ClassVar[ServingHealth]
    SERVING_HEALTH_HEALTHY: _ClassVar[ServingHealth]
    SERVING_HEALTH_DEGRADED: _ClassVar[ServingHealth]
    SERVING_HEALTH_UNAVAILABLE: _ClassVar[ServingHealth]
TRIGGER_UNSPECIFIED: Trigger
TRIGGER_MANUAL: Trigger
TRIGGER_TIME_BASED: Trigger
TRIGGER_NODE_COMPLETED: Trigger
TRIGGER_STEP_COMPLETED: Trigger
TRIGGER_BEFORE_CRITICAL: Trigger
TRIGGER_INTERRUPT: Trigger
TRIGGER_ERROR: Trigger
TRIGGER_PAUSE: Trigger
PRUNE_STRATEGY_UNSPECIFIED: PruneStrategy
PRUNE_STRATEGY_KEEP_LATEST: PruneStrategy
PRUNE_STRATEGY_DELETE: PruneStrategy
DURABILITY_UNSPECIFIED: Durability
DURABILITY_SYNC: Durability
DURABILITY_ASYNC: Durability
TIER_UNSPECIFIED: Tier
TIER_MEMORY: Tier
TIER_REDIS: Tier
TIER_SQL: Tier
THREAD_STATUS_UNSPECIFIED: ThreadStatus
THREAD_STATUS_PENDING: ThreadStatus
THREAD_STATUS_RUNNING: ThreadStatus
THREAD_STATUS_PAUSED: ThreadStatus
THREAD_STATUS_WAITING: ThreadStatus
THREAD_STATUS_COMPLETED: ThreadStatus
THREAD_STATUS_FAILED: ThreadStatus
THREAD_STATUS_CANCELLED: ThreadStatus
SERVING_HEALTH_UNSPECIFIED: ServingHealth
SERVING_HEALTH_HEALTHY: ServingHealth
SERVING_HEALTH_DEGRADED: ServingHealth
SERVING_HEALTH_UNAVAILABLE: ServingHealth

class SessionRequest(_message.Message):
    __slots__ = ("call_id", "save", "put_writes", "publish", "restore", "acquire_lease", "renew_lease", "release_lease", "get_thread", "batch")
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    SAVE_FIELD_NUMBER: _ClassVar[int]
    PUT_WRITES_FIELD_NUMBER: _ClassVar[int]
    PUBLISH_FIELD_NUMBER: _ClassVar[int]
    RESTORE_FIELD_NUMBER: _ClassVar[int]
    ACQUIRE_LEASE_FIELD_NUMBER: _ClassVar[int]
    RENEW_LEASE_FIELD_NUMBER: _ClassVar[int]
    RELEASE_LEASE_FIELD_NUMBER: _ClassVar[int]
    GET_THREAD_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    call_id: int
    save: SaveRequest
    put_writes: PutWritesRequest
    publish: PublishRequest
    restore: RestoreRequest
    acquire_lease: AcquireLeaseRequest
    renew_lease: RenewLeaseRequest
    release_lease: ReleaseLeaseRequest
    get_thread: GetThreadRequest
    batch: _containers.RepeatedCompositeFieldContainer[SessionRequest]
    def __init__(self, call_id: _Optional[int] = ..., save: _Optional[_Union[SaveRequest, _Mapping]] = ..., put_writes: _Optional[_Union[PutWritesRequest, _Mapping]] = ..., publish: _Optional[_Union[PublishRequest, _Mapping]] = ..., restore: _Optional[_Union[RestoreRequest, _Mapping]] = ..., acquire_lease: _Optional[_Union[AcquireLeaseRequest, _Mapping]] = ..., renew_lease: _Optional[_Union[RenewLeaseRequest, _Mapping]] = ..., release_lease: _Optional[_Union[ReleaseLeaseRequest, _Mapping]] = ..., get_thread: _Optional[_Union[GetThreadRequest, _Mapping]] = ..., batch: _Optional[_Iterable[_Union[SessionRequest, _Mapping]]] = ...) -> None: ...

class SessionResponse(_message.Message):
    __slots__ = ("call_id", "save", "put_writes", "publish", "restore", "acquire_lease", "renew_lease", "release_lease", "get_thread", "error", "batch")
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    SAVE_FIELD_NUMBER: _ClassVar[int]
    PUT_WRITES_FIELD_NUMBER: _ClassVar[int]
    PUBLISH_FIELD_NUMBER: _ClassVar[int]
    RESTORE_FIELD_NUMBER: _ClassVar[int]
    ACQUIRE_LEASE_FIELD_NUMBER: _ClassVar[int]
    RENEW_LEASE_FIELD_NUMBER: _ClassVar[int]
    RELEASE_LEASE_FIELD_NUMBER: _ClassVar[int]
    GET_THREAD_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    call_id: int
    save: SaveResponse
    put_writes: PutWritesResponse
    publish: PublishResponse
    restore: RestoreResponse
    acquire_lease: AcquireLeaseResponse
    renew_lease: RenewLeaseResponse
    release_lease: ReleaseLeaseResponse
    get_thread: GetThreadResponse
    error: CallError
    batch: _containers.RepeatedCompositeFieldContainer[SessionResponse]
    def __init__(self, call_id: _Optional[int] = ..., save: _Optional[_Union[SaveResponse, _Mapping]] = ..., put_writes: _Optional[_Union[PutWritesResponse, _Mapping]] = ..., publish: _Optional[_Union[PublishResponse, _Mapping]] = ..., restore: _Optional[_Union[RestoreResponse, _Mapping]] = ..., acquire_lease: _Optional[_Union[AcquireLeaseResponse, _Mapping]] = ..., renew_lease: _Optional[_Union[RenewLeaseResponse, _Mapping]] = ..., release_lease: _Optional[_Union[ReleaseLeaseResponse, _Mapping]] = ..., get_thread: _Optional[_Union[GetThreadResponse, _Mapping]] = ..., error: _Optional[_Union[CallError, _Mapping]] = ..., batch: _Optional[_Iterable[_Union[SessionResponse, _Mapping]]] = ...) -> None: ...

class CallError(_message.Message):
    __slots__ = ("code", "message", "details")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    details: bytes
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., details: _Optional[bytes] = ...) -> None: ...

class Checkpoint(_message.Message):
    __slots__ = ("namespace", "thread_id", "checkpoint_id", "parent_id", "step", "state", "content_type", "trigger", "name", "completed_nodes", "progress_percent", "eta_seconds", "metadata", "created_at", "expires_at", "metadata_json")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    THREAD_ID_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_ID_FIELD_NUMBER: _ClassVar[int]
    PARENT_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    TRIGGER_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_NODES_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_PERCENT_FIELD_NUMBER: _ClassVar[int]
    ETA_SECONDS_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    METADATA_JSON_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    thread_id: str
    checkpoint_id: str
    parent_id: str
    step: int
    state: bytes
    content_type: str
    trigger: Trigger
    name: str
    completed_nodes: _containers.RepeatedScalarFieldContainer[str]
    progress_percent: float
    eta_seconds: float
    metadata: _containers.ScalarMap[str, str]
    created_at: _timestamp_pb2.Timestamp
    expires_at: _timestamp_pb2.Timestamp
    metadata_json: str
    def __init__(self, namespace: _Optional[str] = ..., thread_id: _Optional[str] = ..., checkpoint_id: _Optional[str] = ..., parent_id: _Optional[str] = ..., step: _Optional[int] = ..., state: _Optional[bytes] = ..., content_type: _Optional[str] = ..., trigger: _Optional[_Union[Trigger, str]] = ..., name: _Optional[str] = ..., completed_nodes: _Optional[_Iterable[str]] = ..., progress_percent: _Optional[float] = ..., eta_seconds: _Optional[float] = ..., metadata: _Optional[_Mapping[str, str]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., metadata_json: _Optional[str] = ...) -> None: ...

class PendingWrite(_message.Message):
    __slots__ = ("checkpoint_id", "task_id", "idx", "channel", "value", "content_type", "task_path")
    CHECKPOINT_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    IDX_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    TASK_PATH_FIELD_NUMBER: _ClassVar[int]
    checkpoint_id: str
    task_id: str
    idx: int
    channel: str
    value: bytes
    content_type: str
    task_path: str
    def __init__(self, checkpoint_id: _Optional[str] = ..., task_id: _Optional[str] = ..., idx: _Optional[int] = ..., channel: _Optional[str] = ..., value: _Optional[bytes] = ..., content_type: _Optional[str] = ..., task_path: _Optional[str] = ...) -> None: ...

class Thread(_message.Message):
    __slots__ = ("namespace", "thread_id", "head_checkpoint_id", "status", "workflow_id", "workflow_version", "lease_owner", "lease_expires_at", "fencing_token", "last_seq", "created_at", "updated_at")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    THREAD_ID_FIELD_NUMBER: _ClassVar[int]
    HEAD_CHECKPOINT_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    WORKFLOW_ID_FIELD_NUMBER: _ClassVar[int]
    WORKFLOW_VERSION_FIELD_NUMBER: _ClassVar[int]
    LEASE_OWNER_FIELD_NUMBER: _ClassVar[int]
    LEASE_EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    FENCING_TOKEN_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQ_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    thread_id: str
    head_checkpoint_id: str
    status: ThreadStatus
    workflow_id: str
    workflow_version: int
    lease_owner: str
    lease_expires_at: _timestamp_pb2.Timestamp
    fencing_token: int
    last_seq: int
    created_at: _timestamp_pb2.Timestamp
    updated_at: _timestamp_pb2.Timestamp
    def __init__(self, namespace: _Optional[str] = ..., thread_id: _Optional[str] = ..., head_checkpoint_id: _Optional[str] = ..., status: _Optional[_Union[ThreadStatus, str]] = ..., workflow_id: _Optional[str] = ..., workflow_version: _Optional[int] = ..., lease_owner: _Optional[str] = ..., lease_expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., fencing_token: _Optional[int] = ..., last_seq: _Optional[int] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("seq", "namespace", "thread_id", "type", "time", "payload", "feed_seq", "terminal")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    THREAD_ID_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    FEED_SEQ_FIELD_NUMBER: _ClassVar[int]
    TERMINAL_FIELD_NUMBER: _ClassVar[int]
    seq: int
    namespace: str
    thread_id: str
    type: str
    time: _timestamp_pb2.Timestamp
    payload: _struct_pb2.Struct
    feed_seq: int
    terminal: bool
    def __init__(self, seq: _Optional[int] = ..., namespace: _Optional[str] = ..., thread_id: _Optional[str] = ..., type: _Optional[str] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., payload: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., feed_seq: _Optional[int] = ..., terminal: _Optional[bool] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("time", "last_seq")
    TIME_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQ_FIELD_NUMBER: _ClassVar[int]
    time: _timestamp_pb2.Timestamp
    last_seq: int
    def __init__(self, time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_seq: _Optional[int] = ...) -> None: ...

class SaveRequest(_message.Message):
    __slots__ = ("checkpoint", "expected_parent_id", "request_id", "fencing_token", "durability", "status", "workflow_id", "workflow_version", "events", "keep_last", "exact_parent", "lease_owner", "lease_ttl_seconds", "release_lease", "required_head", "keep_forever")
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_PARENT_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    FENCING_TOKEN_FIELD_NUMBER: _ClassVar[int]
    DURABILITY_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    WORKFLOW_ID_FIELD_NUMBER: _ClassVar[int]
    WORKFLOW_VERSION_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    KEEP_LAST_FIELD_NUMBER: _ClassVar[int]
    EXACT_PARENT_FIELD_NUMBER: _ClassVar[int]
    LEASE_OWNER_FIELD_NUMBER: _ClassVar[int]
    LEASE_TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    RELEASE_LEASE_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_HEAD_FIELD_NUMBER: _ClassVar[int]
    KEEP_FOREVER_FIELD_NUMBER: _ClassVar[int]
    checkpoint: Checkpoint
    expected_parent_id: str
    request_id: str
    fencing_token: int
    durability: Durability
    status: ThreadStatus
    workflow_id: str
    workflow_version: int
    events: _containers.RepeatedCompositeFieldContainer[NewEvent]
    keep_last: int
    exact_parent: bool
    lease_owner: str
    lease_ttl_seconds: float
    release_lease: bool
    required_head: RequiredHead
    keep_forever: bool
    def __init__(self, checkpoint: _Optional[_Union[Checkpoint, _Mapping]] = ..., expected_parent_id: _Optional[str] = ..., request_id: _Optional[str] = ..., fencing_token: _Optional[int] = ..., durability: _Optional[_Union[Durability, str]] = ..., status: _Optional[_Union[ThreadStatus, str]] = ..., workflow_id: _Optional[str] = ..., workflow_version: _Optional[int] = ..., events: _Optional[_Iterable[_Union[NewEvent, _Mapping]]] = ..., keep_last: _Optional[int] = ..., exact_parent: _Optional[bool] = ..., lease_owner: _Optional[str] = ..., lease_ttl_seconds: _Optional[float] = ..., release_lease: _Optional[bool] = ..., required_head: _Optional[_Union[RequiredHead, _Mapping]] = ..., keep_forever: _Optional[bool] = ...) -> None: ...

class RequiredHead(_message.Message):
    __slots__ = ("namespace", "thread_id", "checkpoint_id")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    THREAD_ID_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_ID_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    thread_id: str
    checkpoint_id: str
    def __init__(self, namespace: _Optional[str] = ..., thread_id: _Optional[str] = ..., checkpoint_id: _Optional[str] = ...) -> None: ...

class SaveResponse(_message.Message):
    __slots__ = ("checkpoint", "seq", "fencing_token", "thread", "events_time")
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    FENCING_TOKEN_FIELD_NUMBER: _ClassVar[int]
    THREAD_FIELD_NUMBER: _ClassVar[int]
    EVENTS_TIME_FIELD_NUMBER: _ClassVar[int]
    checkpoint: Checkpoint
    seq: int
    fencing_token: int
    thread: Thread
    events_time: _timestamp_pb2.Timestamp
    def __init__(self, checkpoint: _Optional[_Union[Checkpoint, _Mapping]] = ..., seq: _Optional[int] = ..., fencing_token: _Optional[int] = ..., thread: _Optional[_Union[Thread, _Mapping]] = ..., events_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class RestoreRequest(_message.Message):
    __slots__ = ("namespace", "thread_id", "checkpoint_id", "include_writes")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    THREAD_ID_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_ID_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_WRITES_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    thread_id: str
    checkpoint_id: str
    include_writes: bool
    def __init__(self, namespace: _Optional[str] = ..., thread_id: _Optional[str] = ..., checkpoint_id: _Optional[str] = ..., include_writes: _Optional[bool] = ...) -> None: ...

class RestoreResponse(_message.Message):
    __slots__ = ("checkpoint", "writes", "served_from")
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    WRITES_FIELD_NUMBER: _ClassVar[int]
    SERVED_FROM_FIELD_NUMBER: _ClassVar[int]
    checkpoint: Checkpoint
    writes: _containers.RepeatedCompositeFieldContainer[PendingWrite]
    served_from: Tier
    def __init__(self, checkpoint: _Optional[_Union[Checkpoint, _Mapping]] = ..., writes: _Optional[_Iterable[_Union[PendingWrite, _Mapping]]] = ..., served_from: _Optional[_Union[Tier, str]] = ...) -> None: ...

class ListRequest(_message.Message):
    __slots__ = ("namespace", "thread_id", "page_size", "page_token", "include_state", "trigger", "created_after", "created_before", "metadata_equals", "namespace_prefix", "before_checkpoint_id", "include_writes")
    class MetadataEqualsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    THREAD_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_STATE_FIELD_NUMBER: _ClassVar[int]
    TRIGGER_FIELD_NUMBER: _ClassVar[int]
    CREATED_AFTER_FIELD_NUMBER: _ClassVar[int]
    CREATED_BEFORE_FIELD_NUMBER: _ClassVar[int]
    METADATA_EQUALS_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_PREFIX_FIELD_NUMBER: _ClassVar[int]
    BEFORE_CHECKPOINT_ID_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_WRITES_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    thread_id: str
    page_size: int
    page_token: str
    include_state: bool
    trigger: Trigger
    created_after: _timestamp_pb2.Timestamp
    created_before: _timestamp_pb2.Timestamp
    metadata_equals: _containers.ScalarMap[str, str]
    namespace_prefix: str
    before_checkpoint_id: str
    include_writes: bool
    def __init__(self, namespace: _Optional[str] = ..., thread_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., include_state: _Optional[bool] = ..., trigger: _Optional[_Union[Trigger, str]] = ..., created_after: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., created_before: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., metadata_equals: _Optional[_Mapping[str, str]] = ..., namespace_prefix: _Optional[str] = ..., before_checkpoint_id: _Optional[str] = ..., include_writes: _Optional[bool] = ...) -> None: ...

class CheckpointWrites(_message.Message):
    __slots__ = ("namespace", "checkpoint_id", "writes")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_ID_FIELD_NUMBER: _ClassVar[int]
    WRITES_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    checkpoint_id: str
    writes: _containers.RepeatedCompositeFieldContainer[PendingWrite]
    def __init__(self, namespace: _Optional[str] = ..., checkpoint_id: _Optional[str] = ..., writes: _Optional[_Iterable[_Union[PendingWrite, _Mapping]]] = ...) -> None: ...

class ListResponse(_message.Message):
    __slots__ = ("checkpoints", "next_page_token", "writes")
    CHECKPOINTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    WRITES_FIELD_NUMBER: _ClassVar[int]
    checkpoints: _containers.RepeatedCompositeFieldContainer[Checkpoint]
    next_page_token: str
    writes: _containers.RepeatedCompositeFieldContainer[CheckpointWrites]
    def __init__(self, checkpoints: _Optional[_Iterable[_Union[Checkpoint, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., writes: _Optional[_Iterable[_Union[CheckpointWrites, _Mapping]]] = ...) -> None: ...

class StreamRequest(_message.Message):
    __slots__ = ("namespace", "thread_id", "after_seq", "follow", "until_now")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    THREAD_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQ_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_FIELD_NUMBER: _ClassVar[int]
    UNTIL_NOW_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    thread_id: str
    after_seq: int
    follow: bool
    until_now: bool
    def __init__(self, namespace: _Optional[str] = ..., thread_id: _Optional[str] = ..., after_seq: _Optional[int] = ..., follow: _Optional[bool] = ..., until_now: _Optional[bool] = ...) -> None: ...

class StreamResponse(_message.Message):
    __slots__ = ("event", "heartbeat")
    EVENT_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    event: Event
    heartbeat: Heartbeat
    def __init__(self, event: _Optional[_Union[Event, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ...) -> None: ...

class PutWritesRequest(_message.Message):
    __slots__ = ("namespace", "thread_id", "writes", "fencing_token", "events", "request_id")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    THREAD_ID_FIELD_NUMBER: _ClassVar[int]
    WRITES_FIELD_NUMBER: _ClassVar[int]
    FENCING_TOKEN_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    thread_id: str
    writes: _containers.RepeatedCompositeFieldContainer[PendingWrite]
    fencing_token: int
    events: _containers.RepeatedCompositeFieldContainer[NewEvent]
    request_id: str
    def __init__(self, namespace: _Optional[str] = ..., thread_id: _Optional[str] = ..., writes: _Optional[_Iterable[_Union[PendingWrite, _Mapping]]] = ..., fencing_token: _Optional[int] = ..., events: _Optional[_Iterable[_Union[NewEvent, _Mapping]]] = ..., request_id: _Optional[str] = ...) -> None: ...

class PutWritesResponse(_message.Message):
    __slots__ = ("written", "seqs", "events_time")
    WRITTEN_FIELD_NUMBER: _ClassVar[int]
    SEQS_FIELD_NUMBER: _ClassVar[int]
    EVENTS_TIME_FIELD_NUMBER: _ClassVar[int]
    written: int
    seqs: _containers.RepeatedScalarFieldContainer[int]
    events_time: _timestamp_pb2.Timestamp
    def __init__(self, written: _Optional[int] = ..., seqs: _Optional[_Iterable[int]] = ..., events_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class NewEvent(_message.Message):
    __slots__ = ("type", "payload", "terminal")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    TERMINAL_FIELD_NUMBER: _ClassVar[int]
    type: str
    payload: _struct_pb2.Struct
    terminal: bool
    def __init__(self, type: _Optional[str] = ..., payload: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., terminal: _Optional[bool] = ...) -> None: ...

class PublishRequest(_message.Message):
    __slots__ = ("namespace", "thread_id", "events", "request_id", "fencing_token")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    THREAD_ID_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    FENCING_TOKEN_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    thread_id: str
    events: _containers.RepeatedCompositeFieldContainer[NewEvent]
    request_id: str
    fencing_token: int
    def __init__(self, namespace: _Optional[str] = ..., thread_id: _Optional[str] = ..., events: _Optional[_Iterable[_Union[NewEvent, _Mapping]]] = ..., request_id: _Optional[str] = ..., fencing_token: _Optional[int] = ...) -> None: ...

class PublishResponse(_message.Message):
    __slots__ = ("seqs", "events_time")
    SEQS_FIELD_NUMBER: _ClassVar[int]
    EVENTS_TIME_FIELD_NUMBER: _ClassVar[int]
    seqs: _containers.RepeatedScalarFieldContainer[int]
    events_time: _timestamp_pb2.Timestamp
    def __init__(self, seqs: _Optional[_Iterable[int]] = ..., events_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class DeleteThreadRequest(_message.Message):
    __slots__ = ("namespace", "thread_id", "namespace_prefix", "allow_missing")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    THREAD_ID_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_PREFIX_FIELD_NUMBER: _ClassVar[int]
    ALLOW_MISSING_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    thread_id: str
    namespace_prefix: str
    allow_missing: bool
    def __init__(self, namespace: _Optional[str] = ..., thread_id: _Optional[str] = ..., namespace_prefix: _Optional[str] = ..., allow_missing: _Optional[bool] = ...) -> None: ...

class DeleteThreadResponse(_message.Message):
    __slots__ = ("checkpoints_deleted", "threads_deleted")
    CHECKPOINTS_DELETED_FIELD_NUMBER: _ClassVar[int]
    THREADS_DELETED_FIELD_NUMBER: _ClassVar[int]
    checkpoints_deleted: int
    threads_deleted: int
    def __init__(self, checkpoints_deleted: _Optional[int] = ..., threads_deleted: _Optional[int] = ...) -> None: ...

class GetThreadRequest(_message.Message):
    __slots__ = ("namespace", "thread_id")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    THREAD_ID_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    thread_id: str
    def __init__(self, namespace: _Optional[str] = ..., thread_id: _Optional[str] = ...) -> None: ...

class GetThreadResponse(_message.Message):
    __slots__ = ("thread",)
    THREAD_FIELD_NUMBER: _ClassVar[int]
    thread: Thread
    def __init__(self, thread: _Optional[_Union[Thread, _Mapping]] = ...) -> None: ...

class ListThreadsRequest(_message.Message):
    __slots__ = ("namespace", "statuses", "lease_expired_only", "page_size", "page_token", "workflow_id", "newest_first")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    STATUSES_FIELD_NUMBER: _ClassVar[int]
    LEASE_EXPIRED_ONLY_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    WORKFLOW_ID_FIELD_NUMBER: _ClassVar[int]
    NEWEST_FIRST_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    statuses: _containers.RepeatedScalarFieldContainer[ThreadStatus]
    lease_expired_only: bool
    page_size: int
    page_token: str
    workflow_id: str
    newest_first: bool
    def __init__(self, namespace: _Optional[str] = ..., statuses: _Optional[_Iterable[_Union[ThreadStatus, str]]] = ..., lease_expired_only: _Optional[bool] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., workflow_id: _Optional[str] = ..., newest_first: _Optional[bool] = ...) -> None: ...

class ListThreadsResponse(_message.Message):
    __slots__ = ("threads", "next_page_token")
    THREADS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    threads: _containers.RepeatedCompositeFieldContainer[Thread]
    next_page_token: str
    def __init__(self, threads: _Optional[_Iterable[_Union[Thread, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class AcquireLeaseRequest(_message.Message):
    __slots__ = ("namespace", "thread_id", "owner", "ttl_seconds")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    THREAD_ID_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    thread_id: str
    owner: str
    ttl_seconds: float
    def __init__(self, namespace: _Optional[str] = ..., thread_id: _Optional[str] = ..., owner: _Optional[str] = ..., ttl_seconds: _Optional[float] = ...) -> None: ...

class AcquireLeaseResponse(_message.Message):
    __slots__ = ("fencing_token", "expires_at", "thread")
    FENCING_TOKEN_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    THREAD_FIELD_NUMBER: _ClassVar[int]
    fencing_token: int
    expires_at: _timestamp_pb2.Timestamp
    thread: Thread
    def __init__(self, fencing_token: _Optional[int] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., thread: _Optional[_Union[Thread, _Mapping]] = ...) -> None: ...

class RenewLeaseRequest(_message.Message):
    __slots__ = ("namespace", "thread_id", "owner", "fencing_token", "ttl_seconds")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    THREAD_ID_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    FENCING_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    thread_id: str
    owner: str
    fencing_token: int
    ttl_seconds: float
    def __init__(self, namespace: _Optional[str] = ..., thread_id: _Optional[str] = ..., owner: _Optional[str] = ..., fencing_token: _Optional[int] = ..., ttl_seconds: _Optional[float] = ...) -> None: ...

class RenewLeaseResponse(_message.Message):
    __slots__ = ("expires_at",)
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    expires_at: _timestamp_pb2.Timestamp
    def __init__(self, expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ReleaseLeaseRequest(_message.Message):
    __slots__ = ("namespace", "thread_id", "owner", "fencing_token")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    THREAD_ID_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    FENCING_TOKEN_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    thread_id: str
    owner: str
    fencing_token: int
    def __init__(self, namespace: _Optional[str] = ..., thread_id: _Optional[str] = ..., owner: _Optional[str] = ..., fencing_token: _Optional[int] = ...) -> None: ...

class ReleaseLeaseResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ("namespace", "thread_id")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    THREAD_ID_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    thread_id: str
    def __init__(self, namespace: _Optional[str] = ..., thread_id: _Optional[str] = ...) -> None: ...

class TriggerCount(_message.Message):
    __slots__ = ("trigger", "count")
    TRIGGER_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    trigger: Trigger
    count: int
    def __init__(self, trigger: _Optional[_Union[Trigger, str]] = ..., count: _Optional[int] = ...) -> None: ...

class GetStatsResponse(_message.Message):
    __slots__ = ("checkpoint_count", "triggers", "oldest", "newest", "state_bytes", "event_count")
    CHECKPOINT_COUNT_FIELD_NUMBER: _ClassVar[int]
    TRIGGERS_FIELD_NUMBER: _ClassVar[int]
    OLDEST_FIELD_NUMBER: _ClassVar[int]
    NEWEST_FIELD_NUMBER: _ClassVar[int]
    STATE_BYTES_FIELD_NUMBER: _ClassVar[int]
    EVENT_COUNT_FIELD_NUMBER: _ClassVar[int]
    checkpoint_count: int
    triggers: _containers.RepeatedCompositeFieldContainer[TriggerCount]
    oldest: _timestamp_pb2.Timestamp
    newest: _timestamp_pb2.Timestamp
    state_bytes: int
    event_count: int
    def __init__(self, checkpoint_count: _Optional[int] = ..., triggers: _Optional[_Iterable[_Union[TriggerCount, _Mapping]]] = ..., oldest: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., newest: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., state_bytes: _Optional[int] = ..., event_count: _Optional[int] = ...) -> None: ...

class GetServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TierStatus(_message.Message):
    __slots__ = ("tier", "configured", "up", "detail")
    TIER_FIELD_NUMBER: _ClassVar[int]
    CONFIGURED_FIELD_NUMBER: _ClassVar[int]
    UP_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    tier: Tier
    configured: bool
    up: bool
    detail: str
    def __init__(self, tier: _Optional[_Union[Tier, str]] = ..., configured: _Optional[bool] = ..., up: _Optional[bool] = ..., detail: _Optional[str] = ...) -> None: ...

class GetServerInfoResponse(_message.Message):
    __slots__ = ("health", "tiers", "single_writer", "max_state_bytes", "commits", "committed_operations")
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    SINGLE_WRITER_FIELD_NUMBER: _ClassVar[int]
    MAX_STATE_BYTES_FIELD_NUMBER: _ClassVar[int]
    COMMITS_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_OPERATIONS_FIELD_NUMBER: _ClassVar[int]
    health: ServingHealth
    tiers: _containers.RepeatedCompositeFieldContainer[TierStatus]
    single_writer: bool
    max_state_bytes: int
    commits: int
    committed_operations: int
    def __init__(self, health: _Optional[_Union[ServingHealth, str]] = ..., tiers: _Optional[_Iterable[_Union[TierStatus, _Mapping]]] = ..., single_writer: _Optional[bool] = ..., max_state_bytes: _Optional[int] = ..., commits: _Optional[int] = ..., committed_operations: _Optional[int] = ...) -> None: ...

class PruneThreadsRequest(_message.Message):
    __slots__ = ("thread_ids", "strategy", "namespace_prefix")
    THREAD_IDS_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_PREFIX_FIELD_NUMBER: _ClassVar[int]
    thread_ids: _containers.RepeatedScalarFieldContainer[str]
    strategy: PruneStrategy
    namespace_prefix: str
    def __init__(self, thread_ids: _Optional[_Iterable[str]] = ..., strategy: _Optional[_Union[PruneStrategy, str]] = ..., namespace_prefix: _Optional[str] = ...) -> None: ...

class PruneThreadsResponse(_message.Message):
    __slots__ = ("checkpoints_deleted",)
    CHECKPOINTS_DELETED_FIELD_NUMBER: _ClassVar[int]
    checkpoints_deleted: int
    def __init__(self, checkpoints_deleted: _Optional[int] = ...) -> None: ...

class DeleteForRunsRequest(_message.Message):
    __slots__ = ("run_ids", "namespace_prefix")
    RUN_IDS_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_PREFIX_FIELD_NUMBER: _ClassVar[int]
    run_ids: _containers.RepeatedScalarFieldContainer[str]
    namespace_prefix: str
    def __init__(self, run_ids: _Optional[_Iterable[str]] = ..., namespace_prefix: _Optional[str] = ...) -> None: ...

class DeleteForRunsResponse(_message.Message):
    __slots__ = ("checkpoints_deleted",)
    CHECKPOINTS_DELETED_FIELD_NUMBER: _ClassVar[int]
    checkpoints_deleted: int
    def __init__(self, checkpoints_deleted: _Optional[int] = ...) -> None: ...

class CopyThreadRequest(_message.Message):
    __slots__ = ("source_thread_id", "target_thread_id", "namespace_prefix")
    SOURCE_THREAD_ID_FIELD_NUMBER: _ClassVar[int]
    TARGET_THREAD_ID_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_PREFIX_FIELD_NUMBER: _ClassVar[int]
    source_thread_id: str
    target_thread_id: str
    namespace_prefix: str
    def __init__(self, source_thread_id: _Optional[str] = ..., target_thread_id: _Optional[str] = ..., namespace_prefix: _Optional[str] = ...) -> None: ...

class CopyThreadResponse(_message.Message):
    __slots__ = ("threads_copied", "checkpoints_copied")
    THREADS_COPIED_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINTS_COPIED_FIELD_NUMBER: _ClassVar[int]
    threads_copied: int
    checkpoints_copied: int
    def __init__(self, threads_copied: _Optional[int] = ..., checkpoints_copied: _Optional[int] = ...) -> None: ...
