"""Regressions for defects found in review: each once let a client see something wrong."""

from __future__ import annotations

import asyncio
import math

import grpc
import pytest
from google.protobuf import timestamp_pb2

from tests.requests import NS, code_of, restore, save, state_of, status_of
from tests.servers import checkpoint_stub
from workflow_stubs.checkpoint.v1 import checkpoint_pb2 as pb

INVALID = grpc.StatusCode.INVALID_ARGUMENT


async def test_values_the_database_cannot_take_are_invalid_argument(stub) -> None:
    s, md = stub
    far = timestamp_pb2.Timestamp(seconds=10**12)
    nan_payload = pb.NewEvent(type="x")
    nan_payload.payload.update({"v": math.nan})
    calls = [
        save(s, md, "v", cp={"name": "a\x00b"}),
        save(s, md, "v", cp={"content_type": "x\x00"}),
        save(s, md, "v", workflow_id="w\x00"),
        save(s, md, "v", cp={"eta_seconds": math.nan}),
        save(s, md, "v", cp={"progress_percent": math.inf}),
        save(s, md, "v", cp={"expires_at": far}),
        save(s, md, "v", events=[pb.NewEvent(type="t\x00")]),
        s.Publish(
            pb.PublishRequest(namespace=NS, thread_id="v", events=[nan_payload]), metadata=md
        ),
    ]
    assert [await status_of(c) for c in calls] == [INVALID] * len(calls)
    await save(s, md, "v", {"fine": True})
    head = (await save(s, md, "v")).checkpoint.checkpoint_id
    bad_write = pb.PendingWrite(checkpoint_id=head, task_id="t", idx=0, channel="c\x00", value=b"")
    assert (
        await code_of(
            s.PutWrites(
                pb.PutWritesRequest(namespace=NS, thread_id="v", writes=[bad_write]), metadata=md
            )
        )
        == INVALID
    )


async def test_a_deleted_thread_keeps_its_fencing_tokens_and_seqs(stub) -> None:
    s, md = stub
    await save(s, md, "d")
    old = await s.AcquireLease(
        pb.AcquireLeaseRequest(namespace=NS, thread_id="d", owner="a", ttl_seconds=30), metadata=md
    )
    await save(s, md, "d", fencing_token=old.fencing_token)
    await s.ReleaseLease(
        pb.ReleaseLeaseRequest(
            namespace=NS, thread_id="d", owner="a", fencing_token=old.fencing_token
        ),
        metadata=md,
    )
    await s.DeleteThread(pb.DeleteThreadRequest(namespace=NS, thread_id="d"), metadata=md)
    assert (
        await code_of(s.GetThread(pb.GetThreadRequest(namespace=NS, thread_id="d"), metadata=md))
        == grpc.StatusCode.NOT_FOUND
    )
    listed = await s.ListThreads(pb.ListThreadsRequest(), metadata=md)
    assert "d" not in [t.thread_id for t in listed.threads]
    new = await s.AcquireLease(
        pb.AcquireLeaseRequest(namespace=NS, thread_id="d", owner="b", ttl_seconds=30), metadata=md
    )
    assert new.fencing_token > old.fencing_token
    zombie = save(s, md, "d", {"zombie": True}, fencing_token=old.fencing_token)
    assert await code_of(zombie) == grpc.StatusCode.FAILED_PRECONDITION
    again = await save(s, md, "d", {"new": True}, fencing_token=new.fencing_token)
    assert again.seq > 2, "event seqs go on after a delete; a watcher's cursor stays valid"
    assert state_of(await restore(s, md, "d")) == {"new": True}


async def test_retried_request_id_answers_even_after_pruning(
    service_factory, backend, tenant
) -> None:
    svc = service_factory(backend, "--keep-last", "1", "--sweep-interval", "0.2")
    channel, s, md = await checkpoint_stub(svc.address, tenant)
    first = await save(s, md, "p", {"n": 1}, request_id="once")
    await save(s, md, "p", {"n": 2})
    await asyncio.sleep(1.0)  # the first checkpoint is pruned (keep-last 1)
    assert (
        await code_of(restore(s, md, "p", checkpoint_id=first.checkpoint.checkpoint_id))
        == grpc.StatusCode.NOT_FOUND
    )
    retried = await save(s, md, "p", {"n": 1}, request_id="once")
    assert retried.checkpoint.checkpoint_id == first.checkpoint.checkpoint_id
    assert retried.seq == first.seq
    await channel.close()


@pytest.mark.parametrize("backend", ["postgres+redis"], indirect=True)
async def test_a_replica_killed_during_a_redis_outage_leaves_no_stale_head(
    service_factory, backend, redis_server, tenant
) -> None:
    a = service_factory(backend)
    b = service_factory(backend)
    ch_a, sa, md = await checkpoint_stub(a.address, tenant)
    ch_b, sb, _ = await checkpoint_stub(b.address, tenant)
    old = (await save(sa, md, "h", {"v": "old"})).checkpoint.checkpoint_id
    assert (await restore(sb, md, "h")).checkpoint.checkpoint_id == old  # B caches it
    await redis_server.astop()
    new = (await save(sa, md, "h", {"v": "new"})).checkpoint.checkpoint_id
    await asyncio.sleep(0.5)
    await a.akill()  # A's memory of what it could not update in Redis dies with it
    await ch_a.close()
    await redis_server.astart()
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        got = await restore(sb, md, "h")
        if got.checkpoint.checkpoint_id == new:
            break
        assert asyncio.get_running_loop().time() < deadline, "B still serves the stale head"
        await asyncio.sleep(0.3)
    assert state_of(got) == {"v": "new"}
    await ch_b.close()


async def test_a_refused_write_leaves_no_thread_behind(stub) -> None:
    s, md = stub
    refused = save(s, md, "ghost", expected_parent_id="not-the-head")
    assert await code_of(refused) == grpc.StatusCode.ABORTED
    assert (
        await code_of(
            s.GetThread(pb.GetThreadRequest(namespace=NS, thread_id="ghost"), metadata=md)
        )
        == grpc.StatusCode.NOT_FOUND
    )
    listed = await s.ListThreads(pb.ListThreadsRequest(), metadata=md)
    assert listed.threads == []
