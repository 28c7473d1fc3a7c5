"""Errors raised by the clients: one class per gRPC status a caller acts on differently,
each keeping the status code, the message and any field violations from the server."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


class WorkflowError(Exception):
    """A call to one of the services failed."""

    exit_code = 1  # what the CLI exits with

    def __init__(
        self, code: grpc.StatusCode, details: str, violations: list[tuple[str, str]] | None = None
    ) -> None:
        super().__init__(details)
        self.code = code
        self.details = details
        self.violations = violations or []

    def __str__(self) -> str:
        lines = [f"{self.code.name}: {self.details}"]
        # Each violation once: the services often say the first ones in the message too.
        lines += [
            f"  {field}: {why}"
            for field, why in self.violations
            if f"{field}: {why}" not in self.details
        ]
        return "\n".join(lines)


class InvalidArgument(WorkflowError):
    """The request was wrong; `violations` names the fields."""

    exit_code = 2


class NotFound(WorkflowError):
    exit_code = 3


class AlreadyExists(WorkflowError):
    exit_code = 4


class FailedPrecondition(WorkflowError):
    """The run or thread is not in a state that allows this (e.g. resuming a running run)."""

    exit_code = 5


class Unavailable(WorkflowError):
    """A service did not answer in time, even after retries: safe to try again later."""

    exit_code = 6


class Unauthenticated(WorkflowError):
    """No credential, or one the service does not accept (unknown, expired): see --token."""

    exit_code = 7


class PermissionDenied(WorkflowError):
    """The credential is valid but may not do this (a role, or a tenant, it lacks)."""

    exit_code = 8


_CLASSES: dict[grpc.StatusCode, type[WorkflowError]] = {
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: Unavailable,
}


def from_rpc_error(exc: grpc.RpcError) -> WorkflowError:
    """The exception for a failed call, with google.rpc.BadRequest violations if present."""
    code: grpc.StatusCode = exc.code()  # type: ignore[attr-defined]
    details: str = exc.details() or code.name  # type: ignore[attr-defined]
    violations: list[tuple[str, str]] = []
    # Both grpc.Call and grpc.aio.AioRpcError carry the status in their trailing metadata.
    status = rpc_status.from_call(exc) if hasattr(exc, "trailing_metadata") else None  # type: ignore[arg-type]
    for detail in status.details if status else []:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations += [(v.field, v.description) for v in bad.field_violations]
    return _CLASSES.get(code, WorkflowError)(code, details, violations)
