"""The Session stream: the hot calls on one bidirectional stream behave as their unary RPCs,
and the clients' adapter (workflow_client/store_session.py) survives a store that goes away."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from checkpoint_svc.session import MAX_CALLS_PER_MESSAGE
from tests.requests import NS, checkpoint, code_of
from tests.servers import checkpoint_stub
from workflow_client.store_session import StoreSession
from workflow_rpc.headers import BATCHES_HEADER
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


async def _answers(call: grpc.aio.StreamStreamCall, count: int) -> tuple[dict, int]:
    """`count` answers by call id, read off however many messages carried them."""
    answers: dict[int, pb.SessionResponse] = {}
    messages = 0
    while len(answers) < count:
        message = await call.read()
        assert message is not grpc.aio.EOF
        messages += 1
        for answer in (message, *message.batch):
            if answer.WhichOneof("result") is not None:
                answers[answer.call_id] = answer
    return answers, messages


@pytest.mark.parametrize("backend", ["sqlite", "postgres"], indirect=True)
async def test_calls_sent_together_are_each_answered(service, tenant) -> None:
    """A message's batch: every call in it runs as if it came alone. Answers come in batches
    only to a client that says it reads them (BATCHES_HEADER); to others, one by one."""
    channel, stub, md = await checkpoint_stub(service.address, tenant)
    try:
        for batches in (True, False):
            call = stub.Session(metadata=(*md, (BATCHES_HEADER, "1")) if batches else md)
            thread = f"together-{batches}"
            calls = [
                pb.SessionRequest(call_id=2, save=_save(thread, {"n": 2})),
                pb.SessionRequest(call_id=3, save=_save(f"{thread}-b", {"n": 3})),
                pb.SessionRequest(call_id=4),  # names no call: fails alone
                pb.SessionRequest(
                    call_id=5, restore=pb.RestoreRequest(namespace=NS, thread_id="no-such")
                ),
            ]
            await call.write(
                pb.SessionRequest(call_id=1, save=_save(thread, {"n": 1}), batch=calls)
            )
            # Only a batch, no call of its own: nothing is answered for call id 0.
            later = [
                pb.SessionRequest(call_id=10 + i, save=_save(f"{thread}-{i}", {}))
                for i in range(30)
            ]
            await call.write(pb.SessionRequest(batch=later))
            answers, messages = await asyncio.wait_for(_answers(call, 35), 20)
            await call.done_writing()
            assert await call.read() is grpc.aio.EOF
            assert sorted(answers) == [1, 2, 3, 4, 5, *range(10, 40)]
            assert answers[1].save.checkpoint.thread_id == thread
            assert answers[3].save.checkpoint.thread_id == f"{thread}-b"
            assert answers[4].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
            assert answers[5].error.code == grpc.StatusCode.NOT_FOUND.value[0]
            assert answers[39].save.checkpoint.thread_id == f"{thread}-29"
            # In the order they were sent: the second Save of the thread came after the first.
            assert answers[2].save.checkpoint.parent_id == answers[1].save.checkpoint.checkpoint_id
            if batches:
                assert messages < 35, "answers ready together were not sent together"
            else:
                assert messages == 35
    finally:
        await channel.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgres"], indirect=True)
async def test_a_client_that_closes_its_side_gets_every_answer(service, tenant) -> None:
    """Calls in flight when the client half-closes are all answered before the stream ends,
    with batched answers and without."""
    channel, stub, md = await checkpoint_stub(service.address, tenant)
    try:
        for batches in (False, True):
            call = stub.Session(metadata=(*md, (BATCHES_HEADER, "1")) if batches else md)
            for i in range(200):
                await call.write(pb.SessionRequest(call_id=i + 1, save=_save(f"hc-{i}", {})))
            await call.done_writing()
            answered: set[int] = set()
            while (message := await asyncio.wait_for(call.read(), 20)) is not grpc.aio.EOF:
                answered.update(a.call_id for a in (message, *message.batch))
            assert answered == set(range(1, 201)), f"{200 - len(answered)} answers lost"
            assert await call.code() == grpc.StatusCode.OK
    finally:
        await channel.close()


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_a_batch_is_bounded_and_flat(service, tenant) -> None:
    """A call in a batch with a batch of its own fails alone (its batch is not run); a
    message of more than MAX_CALLS_PER_MESSAGE calls ends the stream RESOURCE_EXHAUSTED."""
    channel, stub, md = await checkpoint_stub(service.address, tenant)
    try:
        call = stub.Session(metadata=md)
        nested = pb.SessionRequest(
            call_id=2,
            save=_save("nested", {}),
            batch=[pb.SessionRequest(call_id=3, save=_save("never", {}))],
        )
        await call.write(pb.SessionRequest(call_id=1, save=_save("flat", {}), batch=[nested]))
        answers, _ = await asyncio.wait_for(_answers(call, 2), 20)
        assert answers[1].save.checkpoint.thread_id == "flat"
        assert answers[2].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert "batch" in answers[2].error.message
        never = await code_of(
            stub.GetThread(pb.GetThreadRequest(namespace=NS, thread_id="never"), metadata=md)
        )
        assert never == grpc.StatusCode.NOT_FOUND
        many = [
            pb.SessionRequest(
                call_id=10 + i, get_thread=pb.GetThreadRequest(namespace=NS, thread_id="flat")
            )
            for i in range(MAX_CALLS_PER_MESSAGE + 1)
        ]
        # As many as a message may carry, its own call among them: all answered.
        full = many[1:MAX_CALLS_PER_MESSAGE]
        await call.write(pb.SessionRequest(call_id=9, get_thread=many[0].get_thread, batch=full))
        answers, _ = await asyncio.wait_for(_answers(call, MAX_CALLS_PER_MESSAGE), 30)
        assert sorted(answers) == [9, *range(11, 10 + MAX_CALLS_PER_MESSAGE)]
        assert all(a.get_thread.thread.thread_id == "flat" for a in answers.values())
        # One more: the stream ends.
        await call.write(pb.SessionRequest(batch=many))
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            while await asyncio.wait_for(call.read(), 20) is not grpc.aio.EOF:
                pass
        assert ended.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        await channel.close()


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_the_client_sends_calls_made_together_in_one_message(service, tenant) -> None:
    """StoreSession: calls made while a message is being written go in the next one."""
    channel, stub, md = await checkpoint_stub(service.address, tenant)
    session = StoreSession(stub=stub, metadata=md)
    try:
        await session.Save(_save("first", {}))
        stream = session._stream
        assert stream is not None
        written: list[pb.SessionRequest] = []
        write = stream.call.write

        async def counted(message: pb.SessionRequest) -> None:
            written.append(message)
            await write(message)

        stream.call.write = counted  # the real call, its messages counted
        saves = await asyncio.gather(
            *(session.Save(_save(f"t-{i}", {"i": i}), timeout=10) for i in range(50))
        )
        assert [r.checkpoint.thread_id for r in saves] == [f"t-{i}" for i in range(50)]
        assert sum(1 + len(m.batch) for m in written) == 50
        assert len(written) < 50, "calls made together were sent one message each"
    finally:
        await session.close()
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
async def test_calls_in_flight_fail_unavailable_when_the_store_dies(
    service_process, tenant
) -> None:
    """Killed with SIGKILL under load: every call in flight fails UNAVAILABLE (none hangs,
    none fails otherwise), and once the store is back the next call opens a new stream."""
    service = service_process
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
