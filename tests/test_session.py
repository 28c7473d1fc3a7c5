"""The Session stream: the hot calls on one bidirectional stream behave as their unary RPCs,
and the clients' adapter (workflow_client/store_session.py) survives a store that goes away."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from tests.requests import NS, checkpoint, code_of
from tests.servers import checkpoint_stub
from workflow_client.store_session import StoreSession
from workflow_stubs.checkpoint.v1 import checkpoint_pb2 as pb


def _save(thread: str, state: object, **request: object) -> pb.SaveRequest:
    return pb.SaveRequest(checkpoint=checkpoint(thread, state), **request)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"], indirect=True)
async def test_session_calls_answer_as_their_unary_rpcs(service, tenant) -> None:
    channel, stub, md = await checkpoint_stub(service.address, tenant)
    session = StoreSession(stub=stub, metadata=md)
    try:
        first = await session.Save(_save("s", {"n": 1}))
        assert first.checkpoint.parent_id == ""
        # Concurrent calls on one stream: each answered with its own result.
        saves = await asyncio.gather(
            *(session.Save(_save(f"many-{i}", {"i": i}), timeout=10) for i in range(40))
        )
        assert sorted(r.checkpoint.thread_id for r in saves) == sorted(
            f"many-{i}" for i in range(40)
        )
        got = await session.Restore(pb.RestoreRequest(namespace=NS, thread_id="many-7"))
        assert json.loads(got.checkpoint.state) == {"i": 7}
        # The same failures as the unary calls, with their details.
        moved = await code_of(session.Save(_save("s", {"n": 2}, expected_parent_id="nope")))
        assert moved == grpc.StatusCode.ABORTED
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await session.Save(_save("", {"n": 3}))
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        status = rpc_status.from_call(bad.value)
        assert status is not None
        request = error_details_pb2.BadRequest()
        assert status.details[0].Unpack(request)
        assert "checkpoint.thread_id" in [v.field for v in request.field_violations]
        unary = await code_of(stub.Save(_save("", {"n": 3}), metadata=md))
        assert unary == bad.value.code()
        # A retried Save with its request id gets the first answer.
        again = [await session.Save(_save("idem", {"n": 1}, request_id="r-1")) for _ in range(2)]
        assert again[0].checkpoint.checkpoint_id == again[1].checkpoint.checkpoint_id
        lease = await session.AcquireLease(
            pb.AcquireLeaseRequest(namespace=NS, thread_id="s", owner="me", ttl_seconds=30)
        )
        fenced = await code_of(session.Save(_save("s", {"n": 4})))
        assert fenced == grpc.StatusCode.FAILED_PRECONDITION
        await session.Save(_save("s", {"n": 4}, fencing_token=lease.fencing_token))
    finally:
        await session.close()
        await channel.close()


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_a_request_naming_no_call_fails_alone(service, tenant) -> None:
    channel, stub, md = await checkpoint_stub(service.address, tenant)
    call = stub.Session(metadata=md)
    await call.write(pb.SessionRequest(call_id=1))
    await call.write(pb.SessionRequest(call_id=2, save=_save("ok", {})))
    answers = {}
    for _ in range(2):
        answer = await call.read()
        answers[answer.call_id] = answer
    await call.done_writing()
    assert answers[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert answers[2].save.checkpoint.thread_id == "ok"
    assert await call.read() is grpc.aio.EOF
    await channel.close()


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_malformed_bytes_end_the_stream_with_invalid_argument(service, tenant) -> None:
    channel = grpc.aio.insecure_channel(service.address)
    raw = channel.stream_stream(
        "/checkpoint.v1.CheckpointService/Session",
        request_serializer=lambda b: b,
        response_deserializer=pb.SessionResponse.FromString,
    )
    call = raw(metadata=(("x-tenant-id", tenant),))
    await call.write(b"\xff\xff\xff")
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await call.read()
    assert ended.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    await channel.close()


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_calls_in_flight_fail_unavailable_when_the_store_dies(service, tenant) -> None:
    """Killed with SIGKILL under load: every call in flight fails UNAVAILABLE (none hangs,
    none fails otherwise), and once the store is back the next call opens a new stream."""
    channel, stub, md = await checkpoint_stub(service.address, tenant)
    session = StoreSession(stub=stub, metadata=md)
    try:
        await session.Save(_save("warm", {}))
        calls = [
            asyncio.ensure_future(session.Save(_save(f"k-{i}", {"i": i}), timeout=20))
            for i in range(200)
        ]
        await asyncio.sleep(0.01)
        await service.akill()
        results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 20)
        failed = [r for r in results if isinstance(r, BaseException)]
        assert failed, "the kill came after every call was answered: nothing was in flight"
        assert {r.code() for r in failed} == {grpc.StatusCode.UNAVAILABLE}
        await service.astart()
        for _ in range(100):
            try:
                done = await session.Save(_save("after", {"back": True}), timeout=5)
                break
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE
                await asyncio.sleep(0.1)
        else:
            raise AssertionError("no call went through after the store came back")
        assert done.checkpoint.thread_id == "after"
    finally:
        await session.close()
        await channel.close()
