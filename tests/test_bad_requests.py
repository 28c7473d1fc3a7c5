"""Malformed, fuzzed and oversized requests get the right status code, never INTERNAL or
UNKNOWN, and the service keeps serving."""

from __future__ import annotations

import random

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from checkpoint_svc.servicer import encode_token
from tests.requests import NS, code_of, restore, save, state_of, status_of
from tests.servers import checkpoint_stub
from workflow_stubs.checkpoint.v1 import checkpoint_pb2 as pb

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def _violations(exc: grpc.aio.AioRpcError) -> dict[str, str]:
    status = rpc_status.from_call(exc)
    assert status is not None, "INVALID_ARGUMENT carries google.rpc.Status details"
    out = {}
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        assert detail.Unpack(bad)
        out.update({v.field: v.description for v in bad.field_violations})
    return out


async def test_invalid_requests_name_the_bad_fields(stub) -> None:
    s, md = stub
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await s.Save(
            pb.SaveRequest(checkpoint=pb.Checkpoint(namespace=NS, thread_id="", trigger=99)),
            metadata=md,
        )
    assert err.value.code() == INVALID
    fields = _violations(err.value)
    assert "checkpoint.thread_id" in fields and "checkpoint.trigger" in fields
    # Each bad completed node by its index (the good ones not named).
    nodes = ["ok", "nul\x00", "ok too", "n" * 257]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await s.Save(
            pb.SaveRequest(
                checkpoint=pb.Checkpoint(namespace=NS, thread_id="t", completed_nodes=nodes)
            ),
            metadata=md,
        )
    assert err.value.code() == INVALID
    named = {f for f in _violations(err.value) if f.startswith("checkpoint.completed_nodes")}
    assert named == {"checkpoint.completed_nodes[1]", "checkpoint.completed_nodes[3]"}

    cases = [
        s.Save(pb.SaveRequest(checkpoint=pb.Checkpoint(thread_id="x\x00y")), metadata=md),
        s.Save(
            pb.SaveRequest(checkpoint=pb.Checkpoint(thread_id="t", progress_percent=150)),
            metadata=md,
        ),
        s.Save(pb.SaveRequest(checkpoint=pb.Checkpoint(thread_id="t"), durability=7), metadata=md),
        s.Save(pb.SaveRequest(checkpoint=pb.Checkpoint(thread_id="t" * 300)), metadata=md),
        s.List(pb.ListRequest(namespace=NS, thread_id="t", page_size=-1), metadata=md),
        s.List(pb.ListRequest(namespace=NS, thread_id="t", page_token="%%%"), metadata=md),
        s.ListThreads(pb.ListThreadsRequest(page_token="bm90LWEtdG9rZW4"), metadata=md),
        s.ListThreads(pb.ListThreadsRequest(statuses=[42]), metadata=md),
        # A newest-first token whose time is not a finite number (NaN would restart the list
        # on PostgreSQL and end it on SQLite).
        s.ListThreads(
            pb.ListThreadsRequest(newest_first=True, page_token=encode_token("nan", NS, "t")),
            metadata=md,
        ),
        s.ListThreads(pb.ListThreadsRequest(newest_first=True, page_token="bm90"), metadata=md),
        s.Restore(pb.RestoreRequest(namespace=NS), metadata=md),
        s.PutWrites(pb.PutWritesRequest(namespace=NS, thread_id="t"), metadata=md),
        s.Publish(
            pb.PublishRequest(namespace=NS, thread_id="t", events=[pb.NewEvent()]), metadata=md
        ),
        s.AcquireLease(pb.AcquireLeaseRequest(namespace=NS, thread_id="t"), metadata=md),
        s.AcquireLease(
            pb.AcquireLeaseRequest(namespace=NS, thread_id="t", owner="o", ttl_seconds=-5),
            metadata=md,
        ),
        s.GetThread(
            pb.GetThreadRequest(namespace=NS, thread_id="t"),
            metadata=(("x-tenant-id", "bad tenant!"),),
        ),
    ]
    codes = [await status_of(call) for call in cases]
    assert codes == [INVALID] * len(cases)


async def test_unknown_things_are_not_found(stub) -> None:
    s, md = stub
    assert await code_of(restore(s, md, "nope")) == grpc.StatusCode.NOT_FOUND
    await save(s, md, "yes")
    assert await code_of(restore(s, md, "yes", checkpoint_id="0000")) == grpc.StatusCode.NOT_FOUND
    assert (
        await code_of(s.GetStats(pb.GetStatsRequest(namespace=NS, thread_id="nope"), metadata=md))
        == grpc.StatusCode.NOT_FOUND
    )
    assert (
        await code_of(
            s.RenewLease(
                pb.RenewLeaseRequest(namespace=NS, thread_id="nope", owner="o", fencing_token=1),
                metadata=md,
            )
        )
        == grpc.StatusCode.NOT_FOUND
    )
    assert (
        await code_of(
            s.DeleteThread(pb.DeleteThreadRequest(namespace=NS, thread_id="nope"), metadata=md)
        )
        == grpc.StatusCode.NOT_FOUND
    )


async def test_client_supplied_id_taken_is_already_exists(stub) -> None:
    s, md = stub
    await save(s, md, "c", cp={"checkpoint_id": "1ef-client-made-1"})
    code = await code_of(save(s, md, "c", {"other": 1}, cp={"checkpoint_id": "1ef-client-made-1"}))
    assert code == grpc.StatusCode.ALREADY_EXISTS


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_oversized_payloads_are_resource_exhausted_with_the_limit(
    service_factory, backend, tenant
) -> None:
    limit = 256 * 1024
    svc = service_factory(backend, "--max-state-bytes", str(limit))
    channel, s, md = await checkpoint_stub(svc.address, tenant)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await s.Save(
            pb.SaveRequest(
                checkpoint=pb.Checkpoint(namespace=NS, thread_id="big", state=b"x" * (limit + 1))
            ),
            metadata=md,
        )
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert str(limit) in err.value.details()
    head = (await save(s, md, "big", {"ok": 1})).checkpoint.checkpoint_id
    write = pb.PendingWrite(
        checkpoint_id=head, task_id="t", idx=0, channel="c", value=b"y" * (limit + 1)
    )
    assert (
        await code_of(
            s.PutWrites(
                pb.PutWritesRequest(namespace=NS, thread_id="big", writes=[write]), metadata=md
            )
        )
        == grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    # Far beyond the limit: refused by gRPC's own message limit, also RESOURCE_EXHAUSTED.
    huge = pb.SaveRequest(
        checkpoint=pb.Checkpoint(
            namespace=NS, thread_id="big", state=b"z" * (limit + 2 * 1024 * 1024)
        )
    )
    assert await code_of(s.Save(huge, metadata=md)) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert state_of(await restore(s, md, "big")) == {"ok": 1}
    await channel.close()


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_fuzzed_requests_never_crash_the_service(service, tenant) -> None:
    channel, s, md = await checkpoint_stub(service.address, tenant)
    rng = random.Random(7)
    methods = [
        "Save",
        "Restore",
        "List",
        "PutWrites",
        "Publish",
        "AcquireLease",
        "GetThread",
        "ListThreads",
        "GetStats",
        "DeleteThread",
    ]
    codes = set()
    for i in range(300):
        method = methods[i % len(methods)]
        raw = rng.randbytes(rng.randint(0, 200))
        call = channel.unary_unary(
            f"/checkpoint.v1.CheckpointService/{method}",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        try:
            await call(raw, metadata=md, timeout=5)
            codes.add(grpc.StatusCode.OK)
        except grpc.aio.AioRpcError as exc:
            codes.add(exc.code())
    assert not codes & {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
    }, codes
    assert grpc.StatusCode.INVALID_ARGUMENT in codes
    # Still serving, and still correct.
    await save(s, md, "after-fuzz", {"alive": True})
    assert state_of(await restore(s, md, "after-fuzz")) == {"alive": True}
    await channel.close()


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_reflection_lists_the_services(service, tenant) -> None:
    channel, _, _ = await checkpoint_stub(service.address, tenant)
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)

    async def requests():
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    names = []
    async for resp in refl.ServerReflectionInfo(requests()):
        names = [svc.name for svc in resp.list_services_response.service]
        break
    assert "checkpoint.v1.CheckpointService" in names and "grpc.health.v1.Health" in names
    await channel.close()


async def test_a_required_head_is_checked_and_its_refusal_says_why(stub) -> None:
    """SaveRequest.required_head: a bad one names its fields; one that moved is ABORTED with
    the ErrorInfo reason REQUIRED_HEAD_MOVED, and nothing is written."""
    s, md = stub
    await s.Save(
        pb.SaveRequest(checkpoint=pb.Checkpoint(namespace="workflows", thread_id="w")),
        metadata=md,
    )

    def start(run: str, need: pb.RequiredHead, **fields: object) -> pb.SaveRequest:
        cp = pb.Checkpoint(namespace=NS, thread_id=run)
        return pb.SaveRequest(checkpoint=cp, required_head=need, **fields)

    with pytest.raises(grpc.aio.AioRpcError) as err:
        bad = pb.RequiredHead(namespace="workflows", thread_id="", checkpoint_id="")
        await s.Save(start("r1", bad, durability=pb.DURABILITY_ASYNC), metadata=md)
    assert err.value.code() == INVALID
    assert {
        "required_head.thread_id",
        "required_head.checkpoint_id",
        "required_head",
    } <= _violations(err.value).keys()
    moved = pb.RequiredHead(namespace="workflows", thread_id="w", checkpoint_id="not-the-head")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await s.Save(start("r1", moved), metadata=md)
    assert err.value.code() == grpc.StatusCode.ABORTED
    status = rpc_status.from_call(err.value)
    info = error_details_pb2.ErrorInfo()
    assert status is not None and status.details[0].Unpack(info)
    assert (info.reason, info.domain) == ("REQUIRED_HEAD_MOVED", "checkpoint.v1")
    assert await code_of(restore(s, md, "r1")) == grpc.StatusCode.NOT_FOUND
