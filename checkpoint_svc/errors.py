"""Domain errors; the servicer maps each to one gRPC status code
(docs/checkpoint-service.md#errors)."""

from __future__ import annotations

from workflow_rpc import statuses


class StoreError(Exception):
    """Base of every error a client can cause or must retry."""


class InvalidArgument(statuses.InvalidArgument, StoreError):
    """A malformed request; `violations` are (field, description) pairs."""


class NotFound(StoreError):
    """No such thread or checkpoint (in this tenant)."""


class HeadMoved(StoreError):
    """The thread's head is not the parent the Save expected (ABORTED)."""


class RequiredHeadMoved(HeadMoved):
    """Another thread's head, which the Save required, is not the one named (ABORTED, with
    the reason REQUIRED_HEAD_MOVED)."""

    reason = statuses.REQUIRED_HEAD_MOVED


class LeaseLost(StoreError):
    """A stale fencing token, or a lease held by someone else (FAILED_PRECONDITION)."""


class PayloadTooLarge(StoreError):
    """A state or write over the configured limit (RESOURCE_EXHAUSTED)."""


class TierUnavailable(StoreError):
    """A tier the operation needs is down (UNAVAILABLE, retryable)."""


class AlreadyExists(StoreError):
    """A client-supplied id that is already taken (ALREADY_EXISTS)."""


class DataLoss(StoreError):
    """A stored value that does not open: changed or moved since it was sealed, sealed with a
    key the key ring lacks, or not sealed where it must be (DATA_LOSS)."""
