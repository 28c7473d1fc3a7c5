"""Faults: Redis stopped and back, PostgreSQL stopped and back, kill -9 under load,
write-behind flushed on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.requests import NS, restore, save, state_of
from tests.servers import checkpoint_stub
from workflow_stubs.checkpoint.v1 import checkpoint_pb2 as pb


async def _health(s, md) -> int:
    return (await s.GetServerInfo(pb.GetServerInfoRequest(), metadata=md)).health


async def _wait_for_health(s, md, wanted: int, within: float = 15.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await _health(s, md) == wanted:
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"health never became {pb.ServingHealth.Name(wanted)}")


async def _wait_for_grpc_health(health, name: str, wanted: int, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        check = await health.Check(health_pb2.HealthCheckRequest(service=name))
        if check.status == wanted:
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"grpc health of {name} never became {wanted}")


@pytest.mark.parametrize("backend", ["postgres+redis"], indirect=True)
async def test_redis_stopped_mid_test_no_failed_save_then_recovery(
    service_process, backend, redis_server, tenant
) -> None:
    service = service_process
    channel, s, md = await checkpoint_stub(service.address, tenant)
    health = health_pb2_grpc.HealthStub(channel)
    redis_name = "checkpoint.v1.CheckpointService/redis"
    await _wait_for_health(s, md, pb.SERVING_HEALTH_HEALTHY)
    before = (await save(s, md, "r", {"phase": "before"})).checkpoint.checkpoint_id
    failures: list[BaseException] = []
    saved: list[str] = []
    stop = asyncio.Event()

    async def keep_saving(i: int) -> None:
        n = 0
        while not stop.is_set():
            try:
                r = await save(s, md, f"load-{i}", {"n": n})
                saved.append(r.checkpoint.checkpoint_id)
            except grpc.aio.AioRpcError as exc:
                failures.append(exc)
            n += 1
            await asyncio.sleep(0.01)

    load = [asyncio.create_task(keep_saving(i)) for i in range(4)]
    await asyncio.sleep(0.3)
    await redis_server.astop()
    during = (await save(s, md, "r", {"phase": "during"})).checkpoint.checkpoint_id
    # Writes against a checkpoint whose write set Redis held before it went away.
    await s.PutWrites(
        pb.PutWritesRequest(
            namespace=NS,
            thread_id="r",
            writes=[
                pb.PendingWrite(checkpoint_id=before, task_id="t", idx=0, channel="c", value=b"1")
            ],
        ),
        metadata=md,
    )
    await _wait_for_health(s, md, pb.SERVING_HEALTH_DEGRADED)
    await _wait_for_grpc_health(health, redis_name, health_pb2.HealthCheckResponse.NOT_SERVING)
    got = await restore(s, md, "r")
    assert got.checkpoint.checkpoint_id == during and got.served_from != pb.TIER_REDIS
    await asyncio.sleep(0.5)

    await redis_server.astart()
    await _wait_for_health(s, md, pb.SERVING_HEALTH_HEALTHY)
    await asyncio.sleep(0.3)
    stop.set()
    await asyncio.gather(*load)
    assert failures == [], "no Save may fail while Redis is down"
    assert len(saved) > 20
    # Redis held the old head while it was away; it must not be served now.
    got = await restore(s, md, "r")
    assert got.checkpoint.checkpoint_id == during != before
    old = await restore(s, md, "r", checkpoint_id=before, include_writes=True)
    assert [(w.task_id, w.value) for w in old.writes] == [("t", b"1")], "no stale write set"
    # Big enough to be cached (small states come back with SQL's answer itself).
    after = (
        await save(s, md, "r", {"phase": "after", "pad": "x" * 70_000})
    ).checkpoint.checkpoint_id
    await channel.close()
    # A fresh process (empty memory) finds the new head through Redis again.
    await service.arestart()
    channel, s, md = await checkpoint_stub(service.address, tenant)
    got = await restore(s, md, "r")
    assert got.checkpoint.checkpoint_id == after and got.served_from == pb.TIER_REDIS
    await _wait_for_grpc_health(
        health_pb2_grpc.HealthStub(channel), redis_name, health_pb2.HealthCheckResponse.SERVING
    )
    await channel.close()


@pytest.mark.parametrize("backend", ["postgres", "postgres+redis"], indirect=True)
async def test_sql_down_fails_saves_fast_with_unavailable_then_recovers(
    service, backend, postgres_server, tenant
) -> None:
    channel, s, md = await checkpoint_stub(service.address, tenant)
    await save(s, md, "q", {"i": 0})
    await restore(s, md, "q")  # a reader connection kept: it is dead once the server restarts
    await postgres_server.astop()
    try:
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await save(s, md, "q", {"i": 1})
        elapsed = time.monotonic() - started
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, "never a false ack"
        assert elapsed < 10, f"failed after {elapsed:.1f}s: not fast"
        assert await _health(s, md) == pb.SERVING_HEALTH_UNAVAILABLE
        with pytest.raises(grpc.aio.AioRpcError) as read:
            await restore(s, md, "q")
        info = await s.GetServerInfo(pb.GetServerInfoRequest(), metadata=md)
        # What a client sees names the failure, never the SQL or its parameters.
        for text in (failed.value.details(), read.value.details(), str(info)):
            assert "SELECT" not in text and "INSERT" not in text and "[SQL" not in text, text
    finally:
        await postgres_server.astart()
    deadline = time.monotonic() + 20
    while True:
        try:
            r = await save(s, md, "q", {"i": 2})
            break
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.3)
    assert (await restore(s, md, "q")).checkpoint.checkpoint_id == r.checkpoint.checkpoint_id
    assert state_of(await restore(s, md, "q")) == {"i": 2}
    await channel.close()


async def test_kill_9_under_concurrent_saves_loses_no_acknowledged_save(
    service_process, backend, tenant
) -> None:
    service = service_process
    channel, s, md = await checkpoint_stub(service.address, tenant)
    acked: dict[str, list[tuple[str, int]]] = {}
    clients = 16

    async def client(i: int) -> None:
        thread = f"crash-{i}"
        acked[thread] = []
        parent = ""
        step = 0
        while True:
            step += 1
            try:
                r = await save(
                    s,
                    md,
                    thread,
                    {"client": i, "step": step},
                    cp={"step": step},
                    expected_parent_id=parent,
                    request_id=f"{thread}-{step}",
                )
            except grpc.aio.AioRpcError:
                return  # the service is gone
            parent = r.checkpoint.checkpoint_id
            acked[thread].append((parent, step))

    tasks = [asyncio.create_task(client(i)) for i in range(clients)]
    await asyncio.sleep(2.0)
    await service.akill()
    await asyncio.wait_for(asyncio.gather(*tasks), 30)
    await channel.close()
    total = sum(len(v) for v in acked.values())
    assert total > 50, f"only {total} saves acknowledged before the kill"

    await service.astart()
    channel, s, md = await checkpoint_stub(service.address, tenant)
    for thread, saves in acked.items():
        for cid, step in saves:
            got = await restore(s, md, thread, checkpoint_id=cid)
            assert json.loads(got.checkpoint.state) == {"client": int(thread[6:]), "step": step}
        if saves:
            head = await restore(s, md, thread)
            # The head is the last acknowledged save, or one committed whose ack was lost.
            assert head.checkpoint.step >= saves[-1][1]
    print(f"audited {total} acknowledged saves after kill -9")
    await channel.close()


async def test_async_saves_are_flushed_on_sigterm(service_process, backend, tenant) -> None:
    service = service_process
    channel, s, md = await checkpoint_stub(service.address, tenant)
    responses = await asyncio.gather(
        *(save(s, md, f"wb-{i % 4}", {"i": i}, durability=pb.DURABILITY_ASYNC) for i in range(200))
    )
    assert all(r.checkpoint.checkpoint_id for r in responses)
    await channel.close()
    await service.arestart(graceful=True)
    channel, s, md = await checkpoint_stub(service.address, tenant)
    for r in responses:
        got = await restore(s, md, r.checkpoint.thread_id, checkpoint_id=r.checkpoint.checkpoint_id)
        assert got.checkpoint.checkpoint_id == r.checkpoint.checkpoint_id
    with contextlib.suppress(Exception):
        await channel.close()
