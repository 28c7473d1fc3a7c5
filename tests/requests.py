"""Small builders for checkpoint.v1 requests, so tests read as what they check."""

from __future__ import annotations

import json
from typing import Any

import grpc

from workflow_stubs.checkpoint.v1 import checkpoint_pb2 as pb
from workflow_stubs.checkpoint.v1 import checkpoint_pb2_grpc as pb_grpc

Stub = pb_grpc.CheckpointServiceStub
NS = "runs"


def checkpoint(thread: str, state: Any = None, ns: str = NS, **fields: Any) -> pb.Checkpoint:
    body = json.dumps(state if state is not None else {}).encode()
    return pb.Checkpoint(namespace=ns, thread_id=thread, state=body, **fields)


async def save(
    stub: Stub,
    md: Any,
    thread: str,
    state: Any = None,
    ns: str = NS,
    cp: dict | None = None,
    **request: Any,
) -> pb.SaveResponse:
    return await stub.Save(
        pb.SaveRequest(checkpoint=checkpoint(thread, state, ns, **(cp or {})), **request),
        metadata=md,
    )


async def restore(stub: Stub, md: Any, thread: str, ns: str = NS, **kw: Any) -> pb.RestoreResponse:
    return await stub.Restore(pb.RestoreRequest(namespace=ns, thread_id=thread, **kw), metadata=md)


def state_of(response: pb.RestoreResponse) -> Any:
    return json.loads(response.checkpoint.state)


async def code_of(call: Any) -> grpc.StatusCode:
    """The status code a call fails with (fails the test if it succeeds)."""
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    raise AssertionError("the call succeeded but was expected to fail")


async def status_of(call: Any) -> grpc.StatusCode:
    """The status code a call ends with, OK included."""
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK
