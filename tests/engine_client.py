"""Small helpers for tests that talk to a real engine over gRPC."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
from google.protobuf import json_format

from workflow_stubs.engine.v1 import engine_pb2 as pb
from workflow_stubs.engine.v1 import engine_pb2_grpc as pb_grpc

Metadata = tuple[tuple[str, str], ...]


def definition(nodes: list[dict], workflow_id: str = "wf", **extra: Any) -> pb.WorkflowDefinition:
    return json_format.ParseDict(
        {"workflow_id": workflow_id, "nodes": nodes, **extra}, pb.WorkflowDefinition()
    )


async def engine_stub(
    engine: Any, tenant: str
) -> tuple[grpc.aio.Channel, pb_grpc.EngineServiceStub, Metadata]:
    channel = grpc.aio.insecure_channel(engine.address)
    return channel, pb_grpc.EngineServiceStub(channel), (("x-tenant-id", tenant),)


async def watch(
    stub: pb_grpc.EngineServiceStub, md: Metadata, run_id: str, after: int = 0
) -> list[pb.RunEvent]:
    """Every event of a run after `after`, until its terminal event."""
    events = []
    async for item in stub.WatchRun(
        pb.WatchRunRequest(run_id=run_id, after_seq=after), metadata=md
    ):
        if item.HasField("event"):
            events.append(item.event)
    return events


async def wait_status(
    stub: pb_grpc.EngineServiceStub,
    md: Metadata,
    run_id: str,
    status: int,
    timeout: float = 30.0,  # noqa: ASYNC109
) -> pb.Run:
    deadline = time.monotonic() + timeout
    while True:
        try:
            run = (await stub.GetRun(pb.GetRunRequest(run_id=run_id), metadata=md)).run
        except grpc.aio.AioRpcError as exc:  # a poller rides out a store restart
            if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)
            continue
        if run.status == status:
            return run
        assert time.monotonic() < deadline, (
            f"run {run_id} is {pb.RunStatus.Name(run.status)}, not {pb.RunStatus.Name(status)}"
        )
        await asyncio.sleep(0.05)


async def wait_event(
    stub: pb_grpc.EngineServiceStub,
    md: Metadata,
    run_id: str,
    kind: str,
    node_id: str = "",
    timeout: float = 30.0,  # noqa: ASYNC109
) -> pb.RunEvent:
    """The first event of a kind (for a node), from the start of the run's feed."""

    async def first() -> pb.RunEvent:
        async for item in stub.WatchRun(pb.WatchRunRequest(run_id=run_id), metadata=md):
            ev = item.event
            if (
                item.HasField("event")
                and ev.type == kind
                and (not node_id or ev.node_id == node_id)
            ):
                return ev
        raise AssertionError(f"run {run_id} ended without a {kind} event for {node_id!r}")

    return await asyncio.wait_for(first(), timeout)
