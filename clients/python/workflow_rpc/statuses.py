"""Error statuses as our services send them and clients read them: a bounded message, and
google.rpc details (BadRequest field violations, ErrorInfo reasons) in the status trailer
(docs/api.md#errors)."""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

# A status travels in HTTP/2 trailers, which gRPC caps (8 KiB soft, 16 KiB hard: beyond, the
# client sees RESOURCE_EXHAUSTED instead of our answer). Echoed client input is cut to fit.
MAX_STATUS_MESSAGE = 300
MAX_VIOLATIONS = 8
# The domain of the ErrorInfo details the checkpoint service's errors carry.
ERROR_DOMAIN = "checkpoint.v1"
# The ErrorInfo reason of the store's ABORTED for a required head that moved.
REQUIRED_HEAD_MOVED = "REQUIRED_HEAD_MOVED"


class InvalidArgument(Exception):
    """A malformed request; `violations` are (field, description) pairs, sent as
    google.rpc.BadRequest field violations."""

    def __init__(self, message: str, violations: list[tuple[str, str]] | None = None) -> None:
        super().__init__(message)
        self.violations = violations or []


def bounded(text: str, limit: int = MAX_STATUS_MESSAGE) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def status(
    code: int,
    message: str,
    violations: list[tuple[str, str]] | None = None,
    reason: str = "",
) -> status_pb2.Status:
    """A google.rpc.Status (`code` from google.rpc.code_pb2) with its details."""
    built = status_pb2.Status(code=code, message=bounded(message))
    if violations:
        detail = any_pb2.Any()
        detail.Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=bounded(f, 100), description=bounded(d, 160)
                    )
                    for f, d in violations[:MAX_VIOLATIONS]
                ]
            )
        )
        built.details.append(detail)
    if reason:
        detail = any_pb2.Any()
        detail.Pack(error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN))
        built.details.append(detail)
    return built


def invalid_argument(exc: InvalidArgument) -> status_pb2.Status:
    return status(code_pb2.INVALID_ARGUMENT, str(exc), exc.violations)


def error_reason(exc: grpc.aio.AioRpcError) -> str:
    """The ErrorInfo reason in a failed call's status details ("" without one)."""
    found = rpc_status.from_call(exc)  # type: ignore[arg-type]
    for detail in found.details if found else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info.reason
    return ""


__all__ = [
    "ERROR_DOMAIN",
    "MAX_STATUS_MESSAGE",
    "REQUIRED_HEAD_MOVED",
    "InvalidArgument",
    "bounded",
    "error_reason",
    "invalid_argument",
    "status",
]
