"""The event feed: replay then follow, exactly once, across service processes."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from tests.requests import NS, save
from tests.servers import checkpoint_stub
from workflow_stubs.checkpoint.v1 import checkpoint_pb2 as pb

PER_PUBLISHER = 60


async def _publish(stub, md, who: str, thread: str) -> None:
    for i in range(PER_PUBLISHER):
        await stub.Publish(
            pb.PublishRequest(
                namespace=NS, thread_id=thread, events=[pb.NewEvent(type=f"{who}-{i}")]
            ),
            metadata=md,
        )
        if i % 10 == 0:
            await asyncio.sleep(0.01)


async def _watch(
    stub, md, thread: str, after: int, out: list[pb.Event], stop_after: int | None = None
) -> None:
    async for item in stub.Stream(
        pb.StreamRequest(namespace=NS, thread_id=thread, after_seq=after), metadata=md
    ):
        if item.HasField("event"):
            out.append(item.event)
            if stop_after is not None and len(out) >= stop_after:
                return  # disconnect mid-run


@pytest.mark.parametrize("backend", ["postgres", "postgres+redis"], indirect=True)
async def test_two_watchers_see_every_event_once_while_two_services_publish(
    service_factory, backend, tenant
) -> None:
    a = service_factory(backend, "--heartbeat", "0.3")
    b = service_factory(backend, "--heartbeat", "0.3")
    ch_a, sa, md = await checkpoint_stub(a.address, tenant)
    ch_b, sb, _ = await checkpoint_stub(b.address, tenant)
    thread = "feed"
    await save(sa, md, thread, {"start": True}, status=pb.THREAD_STATUS_RUNNING)

    first: list[pb.Event] = []
    second: list[pb.Event] = []
    tenant_wide: list[pb.Event] = []
    w1 = asyncio.create_task(_watch(sa, md, thread, 0, first))

    async def resuming_watcher() -> None:
        await _watch(sb, md, thread, 0, second, stop_after=25)
        await asyncio.sleep(0.3)  # away while events keep coming
        await _watch(sa, md, thread, second[-1].seq, second)

    async def tenant_watcher() -> None:
        async for item in sb.Stream(pb.StreamRequest(after_seq=0), metadata=md):
            if item.HasField("event"):
                tenant_wide.append(item.event)
                if item.event.terminal:
                    return

    w2 = asyncio.create_task(resuming_watcher())
    w3 = asyncio.create_task(tenant_watcher())
    await asyncio.sleep(0.2)
    await asyncio.gather(_publish(sa, md, "a", thread), _publish(sb, md, "b", thread))
    await save(
        sb,
        md,
        thread,
        {"done": True},
        status=pb.THREAD_STATUS_COMPLETED,
        events=[pb.NewEvent(type="run.completed")],
    )
    await asyncio.wait_for(asyncio.gather(w1, w2, w3), timeout=30)

    total = 2 * PER_PUBLISHER + 3  # two saves' checkpoint.saved, the publishes, run.completed
    for seen in (first, second):
        assert [e.seq for e in seen] == list(range(1, total + 1)), "in order, no gap, no dup"
        assert seen[-1].type == "run.completed" and seen[-1].terminal
    assert [e.type for e in first] == [e.type for e in second]
    assert [e.feed_seq for e in tenant_wide] == list(range(1, total + 1))
    assert {e.type for e in first} >= {f"a-{i}" for i in range(PER_PUBLISHER)}
    await ch_a.close()
    await ch_b.close()


async def test_stream_replays_then_follows_and_sends_heartbeats(
    service_factory, backend, tenant
) -> None:
    svc = service_factory(backend, "--heartbeat", "0.2")
    channel, s, md = await checkpoint_stub(svc.address, tenant)
    await save(s, md, "hb")
    await save(s, md, "hb")
    items: list[pb.StreamResponse] = []

    async def watch() -> None:
        async for item in s.Stream(
            pb.StreamRequest(namespace=NS, thread_id="hb", after_seq=1), metadata=md
        ):
            items.append(item)
            if item.HasField("event") and item.event.terminal:
                return

    task = asyncio.create_task(watch())
    await asyncio.sleep(0.7)
    await s.Publish(
        pb.PublishRequest(namespace=NS, thread_id="hb", events=[pb.NewEvent(type="late")]),
        metadata=md,
    )
    await save(s, md, "hb", status=pb.THREAD_STATUS_FAILED)
    await asyncio.wait_for(task, 10)
    events = [i.event for i in items if i.HasField("event")]
    beats = [i.heartbeat for i in items if i.HasField("heartbeat")]
    assert [e.seq for e in events] == [2, 3, 4]
    assert [e.type for e in events] == ["checkpoint.saved", "late", "checkpoint.saved"]
    assert events[-1].terminal and events[-1].payload["status"] == "FAILED"
    assert beats and beats[-1].last_seq == 2
    # A watcher arriving after the end gets the rest and stops; one that saw it all stops at once.
    replay = [
        i async for i in s.Stream(pb.StreamRequest(namespace=NS, thread_id="hb"), metadata=md)
    ]
    assert [i.event.seq for i in replay] == [1, 2, 3, 4]
    done = [
        i
        async for i in s.Stream(
            pb.StreamRequest(namespace=NS, thread_id="hb", after_seq=4), metadata=md
        )
    ]
    assert done == []
    await channel.close()


async def test_stream_rejects_bad_cursor(stub) -> None:
    s, md = stub
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in s.Stream(
            pb.StreamRequest(namespace=NS, thread_id="x", after_seq=-1), metadata=md
        ):
            pass
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_writes_carry_events_once_even_when_retried(stub) -> None:
    """PutWrites appends its events in the same commit; a retry with its request_id adds none."""
    s, md = stub
    head = (await save(s, md, "w")).checkpoint.checkpoint_id
    done = pb.NewEvent(type="node.completed")
    done.payload.update({"node_id": "a"})
    request = pb.PutWritesRequest(
        namespace=NS,
        thread_id="w",
        writes=[pb.PendingWrite(checkpoint_id=head, task_id="a", channel="out", value=b"1")],
        events=[done],
        request_id="writes-a-1",
    )
    first = await s.PutWrites(request, metadata=md)
    again = await s.PutWrites(request, metadata=md)
    assert (first.written, list(first.seqs)) == (again.written, list(again.seqs)) == (1, [2])
    events = []
    async for item in s.Stream(pb.StreamRequest(namespace=NS, thread_id="w"), metadata=md):
        if item.HasField("heartbeat"):
            break
        events.append(item.event)
        if item.event.seq == 2:
            break
    assert [(e.seq, e.type) for e in events] == [(1, "checkpoint.saved"), (2, "node.completed")]
    thread = await s.GetThread(pb.GetThreadRequest(namespace=NS, thread_id="w"), metadata=md)
    assert thread.thread.last_seq == 2
    with pytest.raises(grpc.aio.AioRpcError) as err:
        bad = pb.PutWritesRequest(namespace=NS, thread_id="w", writes=request.writes)
        bad.events.add(type="")
        await s.PutWrites(bad, metadata=md)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
