"""WatchRun from the engine that executes the run: its events come from the calls that
appended them, not read back from the store's Stream, and are the same events the store's
Stream gives, seq for seq (docs/engine.md#watching-a-run)."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3

import grpc
import pytest
from google.protobuf import json_format, struct_pb2

from engine_svc.config import Settings
from engine_svc.engine import Engine
from engine_svc.servicer import EngineServicer
from tests.engine_client import definition, engine_stub, watch
from tests.servers import checkpoint_stub, free_port, stream_watchers
from workflow_stubs.checkpoint.v1 import checkpoint_pb2 as cpb
from workflow_stubs.engine.v1 import engine_pb2 as pb
from workflow_stubs.engine.v1 import engine_pb2_grpc

pytestmark = pytest.mark.parametrize("backend", ["sqlite"], indirect=True)


async def test_the_executing_engine_serves_the_stores_events_without_its_stream(
    service_factory, backend, engine_factory, tenant
) -> None:
    metrics_port = free_port()
    service = service_factory(backend, "--metrics-port", str(metrics_port))
    here, elsewhere = engine_factory(service), engine_factory(service)
    channel, s, md = await engine_stub(here, tenant)
    other_channel, other, _ = await engine_stub(elsewhere, tenant)
    nodes = [
        {"id": "first", "type": "transform", "config": {"expression": "input['x'] * 2"}},
        *(
            {"id": f"p{i}", "type": "transform", "depends_on": ["first"],
             "config": {"expression": f"first + {i}"}}
            for i in range(3)
        ),
        {"id": "never", "type": "noop", "depends_on": ["first"], "when": "first > 100"},
        {"id": "nap", "type": "sleep", "depends_on": ["p0", "p1", "p2"],
         "config": {"seconds": 1.5}},
        {"id": "last", "type": "transform", "depends_on": ["nap"],
         "config": {"expression": "p2 + 1"}},
    ]  # fmt: skip
    await s.RegisterWorkflow(pb.RegisterWorkflowRequest(definition=definition(nodes)), metadata=md)
    started = await s.StartRun(
        pb.StartRunRequest(
            workflow_id="wf", input=json_format.ParseDict({"x": 3}, struct_pb2.Struct())
        ),
        metadata=md,
    )
    run_id = started.run.run_id
    local: list[pb.RunEvent] = []
    napping = asyncio.Event()

    async def follow_here() -> None:
        async for item in s.WatchRun(pb.WatchRunRequest(run_id=run_id), metadata=md):
            if item.HasField("event"):
                local.append(item.event)
                if item.event.type == "node.started" and item.event.node_id == "nap":
                    napping.set()

    responses: list[pb.WatchRunResponse] = []

    async def follow_batched() -> None:
        request = pb.WatchRunRequest(run_id=run_id, batched=True)
        async for item in s.WatchRun(request, metadata=md):
            responses.append(item)

    watcher = asyncio.create_task(follow_here())
    batched = asyncio.create_task(follow_batched())
    await asyncio.wait_for(napping.wait(), 20)
    await asyncio.sleep(0.6)  # the engine follows the run's control feed by now
    # Mid-run, with a watcher open on the engine running it: the only Stream open on the
    # store is that engine's own control feed.
    assert await asyncio.to_thread(stream_watchers, metrics_port) == 1
    await asyncio.wait_for(asyncio.gather(watcher, batched), 20)
    from_store = await asyncio.wait_for(watch(other, md, run_id), 20)
    # Batched: the same events, a step's in one response.
    assert not any(r.HasField("event") for r in responses)
    together = [e for r in responses if r.HasField("events") for e in r.events.events]
    assert together == local
    assert sum(r.HasField("events") for r in responses) <= len(local) // 2
    elsewhere_batched = []
    async for r in other.WatchRun(pb.WatchRunRequest(run_id=run_id, batched=True), metadata=md):
        elsewhere_batched += [e for e in r.events.events] if r.HasField("events") else []
        assert not r.HasField("event")
    assert elsewhere_batched == from_store
    assert [e.seq for e in local] == list(range(1, len(local) + 1))
    assert local[-1].terminal and local[-1].status == pb.RUN_STATUS_COMPLETED
    kinds = {e.type for e in local}
    assert {"checkpoint.saved", "node.started", "node.completed", "node.skipped"} <= kinds
    assert [json_format.MessageToDict(e) for e in local] == [
        json_format.MessageToDict(e) for e in from_store
    ]
    # The same from the middle of the run, as a watcher that reconnects asks for it.
    middle = len(local) // 2
    assert await asyncio.wait_for(watch(s, md, run_id, after=middle), 20) == local[middle:]
    await channel.close()
    await other_channel.close()


async def test_a_watcher_gets_every_event_across_an_approval_and_events_of_others(
    service, engine_factory, tenant
) -> None:
    """Events the engine did not append (another client's, while the run waits and while it
    runs) reach the watcher in their place; heartbeats come while a node runs."""
    engine = engine_factory(service, "--heartbeat", "0.2")
    channel, s, md = await engine_stub(engine, tenant)
    store_channel, store, _ = await checkpoint_stub(service.address, tenant)
    nodes = [
        {"id": "a", "type": "noop"},
        {"id": "ask", "type": "approval", "depends_on": ["a"], "config": {"prompt": "go?"}},
        {"id": "nap", "type": "sleep", "depends_on": ["ask"], "config": {"seconds": 1.0}},
        {"id": "z", "type": "noop", "depends_on": ["nap"]},
    ]
    await s.RegisterWorkflow(pb.RegisterWorkflowRequest(definition=definition(nodes)), metadata=md)
    run_id = (await s.StartRun(pb.StartRunRequest(workflow_id="wf"), metadata=md)).run.run_id
    items: list[pb.WatchRunResponse] = []
    waiting, napping = asyncio.Event(), asyncio.Event()

    async def follow() -> None:
        async for item in s.WatchRun(pb.WatchRunRequest(run_id=run_id), metadata=md):
            items.append(item)
            if item.event.status == pb.RUN_STATUS_WAITING:
                waiting.set()
            if item.event.type == "node.started" and item.event.node_id == "nap":
                napping.set()

    watcher = asyncio.create_task(follow())

    async def note(text: str, token: int = 0) -> None:
        event = cpb.NewEvent(type="note.added")
        event.payload.update({"text": text})
        await store.Publish(
            cpb.PublishRequest(
                namespace="runs", thread_id=run_id, events=[event], fencing_token=token
            ),
            metadata=md,
        )

    async def thread() -> cpb.Thread:
        got = await store.GetThread(
            cpb.GetThreadRequest(namespace="runs", thread_id=run_id), metadata=md
        )
        return got.thread

    await asyncio.wait_for(waiting.wait(), 20)
    while (await thread()).lease_owner:  # noqa: ASYNC110 (the engine lets the waiting run go)
        await asyncio.sleep(0.01)
    await note("while it waits")
    await s.ResumeRun(
        pb.ResumeRunRequest(run_id=run_id, value=struct_pb2.Value(bool_value=True)), metadata=md
    )
    await asyncio.wait_for(napping.wait(), 20)
    # Someone the lease holder gave its token to (no RPC discloses it): a seq the engine skips.
    await note("while it runs", _fencing_token(service.db_url, tenant, run_id))
    await asyncio.wait_for(watcher, 30)
    events = [i.event for i in items if i.HasField("event")]
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert [e.type for e in events].count("note.added") == 2
    assert events[-1].terminal and events[-1].status == pb.RUN_STATUS_COMPLETED
    stored = []
    async for item in store.Stream(
        cpb.StreamRequest(namespace="runs", thread_id=run_id), metadata=md
    ):
        stored.append(item.event)
    assert [(e.seq, e.type) for e in events] == [(e.seq, e.type) for e in stored]
    beats = [i.heartbeat for i in items if i.HasField("heartbeat")]
    nap_started = next(e.seq for e in events if e.node_id == "nap")
    assert any(b.last_seq >= nap_started for b in beats), "no heartbeat while the node ran"
    for i, item in enumerate(items):
        if item.HasField("heartbeat"):
            before = [x.event.seq for x in items[:i] if x.HasField("event")]
            assert item.heartbeat.last_seq == (before[-1] if before else 0)
    await channel.close()
    await store_channel.close()


async def test_a_watch_cut_off_by_the_engine_stopping_fails_unavailable(service, tenant) -> None:
    """A watcher's stream cut off by a stopping engine (its store channel closed under the
    watch) fails UNAVAILABLE, which clients reconnect on, not UNKNOWN."""
    settings = Settings()
    settings.checkpoint_addr = service.address
    settings.recovery_interval = 0
    engine = Engine(settings)
    server = grpc.aio.server()
    engine_pb2_grpc.add_EngineServiceServicer_to_server(EngineServicer(engine), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await engine.start()
    await server.start()
    try:
        await engine.channel.close()  # as the engine's close() does while it still serves
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = engine_pb2_grpc.EngineServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as cut:
                async for _ in stub.WatchRun(
                    pb.WatchRunRequest(run_id="r-1"), metadata=(("x-tenant-id", tenant),)
                ):
                    pass
        assert cut.value.code() == grpc.StatusCode.UNAVAILABLE, cut.value.details()
    finally:
        await server.stop(0)
        with contextlib.suppress(Exception):
            await engine.close()


def _fencing_token(db_url: str, tenant: str, run_id: str) -> int:
    """A run's fencing token, read from the store's SQLite file."""
    with sqlite3.connect(db_url.split("///", 1)[1]) as db:
        (token,) = db.execute(
            "SELECT fencing_token FROM threads WHERE tenant = ? AND namespace = 'runs' "
            "AND thread_id = ?",
            (tenant, run_id),
        ).fetchone()
    return int(token)
