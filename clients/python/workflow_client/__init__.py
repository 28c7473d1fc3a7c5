"""Python clients of the workflow services: async and blocking, over the generated stubs."""

from workflow_client.aio import AsyncCheckpointClient, AsyncEngineClient
from workflow_client.calls import load_definition, plain, state_of
from workflow_client.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
    WorkflowError,
)
from workflow_client.sync import CheckpointClient, EngineClient

__all__ = [
    "AlreadyExists",
    "AsyncCheckpointClient",
    "AsyncEngineClient",
    "CheckpointClient",
    "EngineClient",
    "FailedPrecondition",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "Unauthenticated",
    "Unavailable",
    "WorkflowError",
    "load_definition",
    "plain",
    "state_of",
]
