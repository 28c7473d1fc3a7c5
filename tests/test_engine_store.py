"""The engine's store port (engine_svc/store.py) against a real checkpoint service: refusals
reach the engine as what they mean, transient failures are retried within the budget and no
longer, over the Session stream and unary alike."""

from __future__ import annotations

import asyncio
import contextlib
import time

import grpc
import pytest

from engine_svc.store import (
    Conflict,
    GrpcStore,
    LeaseLost,
    NotFound,
    RequiredHeadMoved,
    StoreError,
    StoreUnavailable,
)
from tests.requests import NS, checkpoint
from tests.servers import GRPC_TEST_OPTIONS, free_port, stream_watchers
from workflow_client.store_session import StoreSession
from workflow_stubs.checkpoint.v1 import checkpoint_pb2 as cpb
from workflow_stubs.checkpoint.v1 import checkpoint_pb2_grpc as cpb_grpc

pytestmark = pytest.mark.parametrize("backend", ["sqlite"], indirect=True)


def _store(channel: grpc.aio.Channel, tenant: str, session: bool, **kw: float) -> GrpcStore:
    stub = cpb_grpc.CheckpointServiceStub(channel)
    store = GrpcStore(stub=stub, tenant=tenant, **kw)
    if session:
        store = GrpcStore(
            stub=stub, tenant=tenant, session=StoreSession(stub=stub, metadata=store.metadata), **kw
        )
    return store


@pytest.mark.parametrize("session", [True, False], ids=["session", "unary"])
async def test_refusals_come_as_what_they_mean(service, tenant, session) -> None:
    async with grpc.aio.insecure_channel(service.address, options=GRPC_TEST_OPTIONS) as channel:
        store = _store(channel, tenant, session)
        try:
            first = await store.save(cpb.SaveRequest(checkpoint=checkpoint("a", {"i": 1})))
            head = first.checkpoint.checkpoint_id
            with pytest.raises(Conflict) as moved:  # not the head's child
                await store.save(
                    cpb.SaveRequest(
                        checkpoint=checkpoint("a", {"i": 2}), expected_parent_id="not-the-head"
                    )
                )
            assert type(moved.value) is Conflict and moved.value.code == grpc.StatusCode.ABORTED
            required = cpb.RequiredHead(namespace=NS, thread_id="a", checkpoint_id="old")
            with pytest.raises(RequiredHeadMoved):
                await store.save(
                    cpb.SaveRequest(checkpoint=checkpoint("b", {}), required_head=required)
                )
            required.checkpoint_id = head  # the head it has: the Save commits
            await store.save(
                cpb.SaveRequest(checkpoint=checkpoint("b", {}), required_head=required)
            )
            with pytest.raises(NotFound):
                await store.restore(cpb.RestoreRequest(namespace=NS, thread_id="nothing"))
            lease = await store.acquire_lease(
                cpb.AcquireLeaseRequest(namespace=NS, thread_id="a", owner="me", ttl_seconds=5)
            )
            with pytest.raises(LeaseLost):
                await store.renew_lease(
                    cpb.RenewLeaseRequest(
                        namespace=NS,
                        thread_id="a",
                        owner="me",
                        fencing_token=lease.fencing_token + 1,
                        ttl_seconds=5,
                    )
                )
            with pytest.raises(StoreError) as bad:  # what the engine does not handle: its code
                await store.restore(cpb.RestoreRequest(namespace=NS, thread_id=""))
            assert bad.value.code == grpc.StatusCode.INVALID_ARGUMENT
        finally:
            await store.close()


@pytest.mark.parametrize("session", [True, False], ids=["session", "unary"])
async def test_a_store_that_comes_back_within_the_budget_answers(
    service_factory, backend, tenant, session
) -> None:
    service = service_factory(backend, port=free_port(), start=False)
    async with grpc.aio.insecure_channel(service.address, options=GRPC_TEST_OPTIONS) as channel:
        store = _store(channel, tenant, session, retry_seconds=20.0)
        impatient = store.with_retry(0.0)
        try:
            started = time.monotonic()
            with pytest.raises(StoreUnavailable):  # no retry of its own: at once
                await impatient.save(cpb.SaveRequest(checkpoint=checkpoint("a", {"i": 1})))
            assert time.monotonic() - started < 2.0
            briefly = store.with_retry(1.0)
            started = time.monotonic()
            with pytest.raises(StoreUnavailable):  # the budget, and not much more
                await briefly.save(cpb.SaveRequest(checkpoint=checkpoint("a", {"i": 1})))
            assert 0.9 < time.monotonic() - started < 5.0
            # Down when the call is made, up a moment later: the call answers.
            call = asyncio.create_task(
                store.save(cpb.SaveRequest(checkpoint=checkpoint("a", {"i": 1})))
            )
            await asyncio.sleep(0.5)
            assert not call.done()
            await service.astart()
            saved = await asyncio.wait_for(call, 20)
            got = await store.restore(cpb.RestoreRequest(namespace=NS, thread_id="a"))
            assert got.checkpoint.checkpoint_id == saved.checkpoint.checkpoint_id
            # A feed's stream retries until it opens, too. (The store stops at once: an open
            # Session ends once its calls are answered, not at the end of the shutdown grace.)
            stopping = time.monotonic()
            await service.aterminate()
            assert time.monotonic() - stopping < 5.0
            items = []

            async def read() -> None:
                request = cpb.StreamRequest(namespace=NS, thread_id="a", follow=True)
                async for item in store.stream(request):
                    if item.HasField("event"):
                        items.append(item)
                        return

            reader = asyncio.create_task(read())
            await asyncio.sleep(0.5)
            await service.astart()
            await asyncio.wait_for(reader, 20)
            assert [i.event.type for i in items if i.HasField("event")] == ["checkpoint.saved"]
        finally:
            await store.close()


async def test_a_closed_session_fails_at_once_and_a_left_stream_ends_the_stores_call(
    service_factory, backend, tenant
) -> None:
    metrics_port = free_port()
    service = service_factory(backend, "--metrics-port", str(metrics_port))
    async with grpc.aio.insecure_channel(service.address, options=GRPC_TEST_OPTIONS) as channel:
        store = _store(channel, tenant, True, retry_seconds=20.0)
        await store.save(cpb.SaveRequest(checkpoint=checkpoint("a", {"i": 1})))
        request = cpb.StreamRequest(namespace=NS, thread_id="a", follow=True)
        async with contextlib.aclosing(store.stream(request)) as items:
            async for item in items:
                if item.HasField("event"):
                    assert stream_watchers(metrics_port) == 1
                    break
        deadline = time.monotonic() + 5
        while stream_watchers(metrics_port) != 0:  # the store saw the call end
            assert time.monotonic() < deadline, "the stream left open on the store"
            await asyncio.sleep(0.05)
        await store.close()  # as the engine does when it stops
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await store.save(cpb.SaveRequest(checkpoint=checkpoint("a", {"i": 2})))
        assert time.monotonic() - started < 1.0, "a closed session's call was retried"
