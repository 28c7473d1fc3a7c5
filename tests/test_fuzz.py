"""Fuzzing every RPC of both services: random bytes and mutated valid messages.

Bounded in count and time. Whatever a client sends, the answer is a status it can act on:
never UNKNOWN or INTERNAL, never a hang, and the services' memory stays bounded (a second
pass of the same kind of input must not keep growing it: the store hands freed heap back
to the system every 2 s, see clients/python/workflow_rpc/arenas.py).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor as _descriptor
from google.protobuf import json_format
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from tests.servers import GRPC_TEST_OPTIONS
from workflow_stubs.checkpoint.v1 import checkpoint_pb2
from workflow_stubs.engine.v1 import engine_pb2

FD = _descriptor.FieldDescriptor
BAD = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
CALLS_PER_PASS = 1500  # per service and pass
ROUNDS = 3  # passes over the service
UNARY_DEADLINE = 15.0

_STRINGS = [
    "",
    "a",
    "runs",
    "lg:",
    "\x00",
    "é" * 300,
    "x" * 5000,
    "${input}",
    "../../etc",
    "\U0001f600",
    "a\x1fb",
    "v1",
    "0-start-x",
    "default",
]
_INTS = [0, 1, -1, 2, 7, 100, 2**31 - 1, -(2**31), 2**53, 2**63 - 1, -(2**63)]
_FLOATS = [0.0, 1.5, -1.0, 1e308, -1e308, float("nan"), float("inf"), 1e-300, 100.0, 101.0]


def _value(field: FD, rng: random.Random, depth: int) -> Any:
    t = field.type
    if t == FD.TYPE_STRING:
        return rng.choice(_STRINGS) if rng.random() < 0.7 else rng.randbytes(8).hex()
    if t == FD.TYPE_BYTES:
        return rng.randbytes(rng.choice([0, 1, 16, 300, 70_000]))
    if t == FD.TYPE_BOOL:
        return rng.random() < 0.5
    if t in (FD.TYPE_DOUBLE, FD.TYPE_FLOAT):
        return rng.choice(_FLOATS)
    if t == FD.TYPE_ENUM:
        values = [v.number for v in field.enum_type.values]
        return rng.choice([*values, 99, -5])
    if t in (FD.TYPE_INT32, FD.TYPE_SINT32, FD.TYPE_SFIXED32):
        return max(-(2**31), min(2**31 - 1, rng.choice(_INTS)))
    if t in (FD.TYPE_UINT32, FD.TYPE_FIXED32):
        return abs(rng.choice(_INTS)) % 2**32
    if t in (FD.TYPE_UINT64, FD.TYPE_FIXED64):
        return abs(rng.choice(_INTS)) % 2**64
    return rng.choice(_INTS)  # int64 and friends


def _fill(msg: Message, rng: random.Random, depth: int = 0) -> None:
    """Set a random selection of fields to random, often hostile, values."""
    if msg.DESCRIPTOR.full_name == "google.protobuf.Struct":
        _struct(msg, rng, depth)
        return
    for field in msg.DESCRIPTOR.fields:
        if rng.random() < 0.4:
            continue
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            target = getattr(msg, field.name)
            for _ in range(rng.choice([1, 2, 3, 70])):
                key = _value(field.message_type.fields_by_name["key"], rng, depth)
                value_field = field.message_type.fields_by_name["value"]
                if value_field.message_type is None:
                    target[key] = _value(value_field, rng, depth)
            continue
        repeated = field.is_repeated
        count = rng.choice([1, 2, 3, 50]) if repeated else 1
        if field.message_type is not None:
            if depth > 4:
                continue
            if field.message_type.full_name == msg.DESCRIPTOR.full_name:  # holds its own kind
                # (SessionRequest.batch): a few, nested once; not 50^4 requests in one
                if depth >= 2:
                    continue
                count = min(count, 3)
            for _ in range(count):
                child = getattr(msg, field.name).add() if repeated else getattr(msg, field.name)
                if repeated or rng.random() < 0.9:
                    _fill(child, rng, depth + 1)
                    if not repeated:
                        child.SetInParent()
            continue
        if repeated:
            getattr(msg, field.name).extend(_value(field, rng, depth) for _ in range(count))
        else:
            setattr(msg, field.name, _value(field, rng, depth))


def _struct(msg: Message, rng: random.Random, depth: int) -> None:
    nested: Any = rng.choice([1, "s", None, True, float("nan"), 1e308 * 10, [1, {"a": 2}]])
    for _ in range(rng.choice([0, 1, 5, 40])):
        nested = {"n": nested}
    try:
        msg.update({"k": nested, "input": rng.choice(_STRINGS), "x": rng.choice(_FLOATS)})
    except (ValueError, TypeError):
        msg.update({"k": 1})


def _mutate(raw: bytes, rng: random.Random) -> bytes:
    data = bytearray(raw)
    for _ in range(rng.choice([1, 2, 8])):
        if not data:
            break
        i = rng.randrange(len(data))
        action = rng.random()
        if action < 0.5:
            data[i] = rng.randrange(256)
        elif action < 0.75:
            del data[i]
        else:
            data[i:i] = rng.randbytes(rng.randint(1, 4))
    return bytes(data)


def _methods(file_descriptor: Any) -> Iterator[tuple[str, Any, bool]]:
    for service in file_descriptor.services_by_name.values():
        for method in service.methods:
            yield (
                f"/{service.full_name}/{method.name}",
                GetMessageClass(method.input_type),
                method.server_streaming,
            )


# Valid requests to start from, so that mutated ones get past validation into the store and
# the executor (threads and runs come from small pools, so they often exist).
_THREADS = ["t0", "t1", "t2"]
_DEFINITION = {
    "workflow_id": "fz",
    "nodes": [
        {"id": "a", "type": "transform", "config": {"expression": "input"}},
        {"id": "b", "type": "sleep", "depends_on": ["a"], "config": {"seconds": 0.01}},
        {"id": "c", "type": "approval", "depends_on": ["b"], "config": {"prompt": "ok?"}},
    ],
}
TEMPLATES: dict[str, Any] = {
    "Save": lambda r: {
        "checkpoint": {"namespace": "runs", "thread_id": r.choice(_THREADS), "state": "e30="},
        "events": [{"type": "x", "payload": {"n": 1}}],
    },
    "Restore": lambda r: {
        "namespace": "runs",
        "thread_id": r.choice(_THREADS),
        "include_writes": True,
    },
    "List": lambda r: {
        "namespace": "runs",
        "thread_id": r.choice(_THREADS),
        "page_size": 5,
        "include_state": True,
        "include_writes": True,
    },
    "Stream": lambda r: {"namespace": "runs", "thread_id": r.choice(_THREADS)},
    "PutWrites": lambda r: {
        "namespace": "runs",
        "thread_id": r.choice(_THREADS),
        "writes": [
            {"checkpoint_id": "c1", "task_id": "t", "idx": 0, "channel": "c", "value": "AQ=="}
        ],
    },
    "Publish": lambda r: {
        "namespace": "runs",
        "thread_id": r.choice(_THREADS),
        "events": [{"type": "e"}],
    },
    "GetThread": lambda r: {"namespace": "runs", "thread_id": r.choice(_THREADS)},
    "GetStats": lambda r: {"namespace": "runs", "thread_id": r.choice(_THREADS)},
    "ListThreads": lambda r: {"namespace": "runs", "statuses": [1, 2]},
    "AcquireLease": lambda r: {
        "namespace": "runs",
        "thread_id": r.choice(_THREADS),
        "owner": "fz",
        "ttl_seconds": 1,
    },
    "CopyThread": lambda r: {
        "source_thread_id": r.choice(_THREADS),
        "target_thread_id": r.randbytes(4).hex(),
        "namespace_prefix": "",
    },
    "RegisterWorkflow": lambda r: {"definition": _DEFINITION},
    "StartRun": lambda r: {"workflow_id": "fz", "input": {"x": 1}},
    "GetRun": lambda r: {"run_id": r.choice(_THREADS)},
    "WatchRun": lambda r: {"run_id": r.choice(_THREADS)},
    "ResumeRun": lambda r: {"run_id": r.choice(_THREADS), "value": True},
    "ForkRun": lambda r: {
        "run_id": r.choice(_THREADS),
        "checkpoint_id": "0-start-t0",
        "state_patch": {"a": 2},
    },
    "GetRunHistory": lambda r: {"run_id": r.choice(_THREADS), "include_state": True},
    "CancelRun": lambda r: {"run_id": r.randbytes(4).hex()},
    "GetWorkflow": lambda r: {"workflow_id": "fz"},
}


def _mutate_fields(msg: Message, rng: random.Random) -> None:
    """Replace one or two fields (at the top, or one level down) with hostile values."""
    for _ in range(rng.choice([0, 1, 1, 2])):
        target = msg
        fields = list(target.DESCRIPTOR.fields)
        nested = [f for f in fields if f.message_type is not None and not f.is_repeated]
        if nested and rng.random() < 0.4:
            field = rng.choice(nested)
            if field.message_type.full_name != "google.protobuf.Struct":
                target = getattr(target, field.name)
                fields = list(target.DESCRIPTOR.fields)
        if not fields:
            continue
        field = rng.choice(fields)
        if field.is_repeated:
            target.ClearField(field.name)
            if field.message_type is not None and field.message_type.GetOptions().map_entry:
                continue  # cleared: an empty map
            for _ in range(rng.choice([1, 3, 1500])):
                if field.message_type is not None:
                    _fill(getattr(target, field.name).add(), rng, 3)
                else:
                    getattr(target, field.name).append(_value(field, rng, 0))
        elif field.message_type is not None:
            child = getattr(target, field.name)
            child.Clear()
            _fill(child, rng, 2)
            child.SetInParent()
        else:
            setattr(target, field.name, _value(field, rng, 0))


def _payloads(cls: type[Message], rng: random.Random, method: str) -> bytes:
    kind = rng.random()
    if kind < 0.15:
        return rng.randbytes(rng.choice([0, 1, 5, 64, 2000]))
    msg = cls()
    if method in TEMPLATES and kind < 0.8:
        json_format.ParseDict(TEMPLATES[method](rng), msg)
        _mutate_fields(msg, rng)
    else:
        _fill(msg, rng)
    raw = msg.SerializeToString()
    return _mutate(raw, rng) if rng.random() < 0.25 else raw


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def _call(
    channel: grpc.aio.Channel, path: str, streaming: bool, payload: bytes, md: Any
) -> tuple[grpc.StatusCode, str]:
    """One call with raw bytes; its status (OK for a stream still open after a while)."""
    try:
        if streaming:
            call = channel.unary_stream(path)(payload, metadata=md, timeout=30)
            try:
                for _ in range(3):
                    item = await asyncio.wait_for(call.read(), 1.0)
                    if item is grpc.aio.EOF:
                        break
            except TimeoutError:  # a live stream waiting for events: not a hang
                pass
            finally:
                call.cancel()
            return grpc.StatusCode.OK, ""
        await channel.unary_unary(path)(payload, metadata=md, timeout=UNARY_DEADLINE)
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    except asyncio.CancelledError:
        return grpc.StatusCode.OK, ""
    return grpc.StatusCode.OK, ""


async def _fuzz_pass(
    address: str, file_descriptor: Any, seed: int, calls: int, tenant: str
) -> list[str]:
    rng = random.Random(seed)
    methods = list(_methods(file_descriptor))
    problems: list[str] = []
    channel = grpc.aio.insecure_channel(
        address,
        options=[
            *GRPC_TEST_OPTIONS,
            ("grpc.max_send_message_length", 32 * 1024 * 1024),
            ("grpc.max_receive_message_length", 32 * 1024 * 1024),
        ],
    )
    headers = [
        (("x-tenant-id", tenant),),
        (("x-tenant-id", tenant), ("x-tenant-id", tenant + "b")),
        (("x-tenant-id", "bad tenant!"),),
        (),
    ]
    gate = asyncio.Semaphore(8)

    async def one(i: int) -> None:
        path, cls, streaming = methods[i % len(methods)]
        payload = _payloads(cls, rng, path.rsplit("/", 1)[1])
        md = headers[0] if rng.random() < 0.85 else rng.choice(headers)
        async with gate:
            started = time.monotonic()
            code, details = await _call(channel, path, streaming, payload, md)
            elapsed = time.monotonic() - started
        if code in BAD:
            problems.append(f"{path}: {code.name}: {details[:300]}")
        elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
            problems.append(f"{path}: no answer within {elapsed:.1f}s (a hang)")

    try:
        await asyncio.gather(*(one(i) for i in range(calls)))
    finally:
        await channel.close()
    return problems


@pytest.mark.parametrize("backend", ["postgres+redis"], indirect=True)
@pytest.mark.parametrize("fuzzed", ["checkpoint_svc", "engine_svc"])
async def test_fuzzed_requests_to_every_rpc_of_each_service(
    service_factory, backend, engine_factory, tenant, fuzzed
) -> None:
    """One service's RPCs per test (the engine's reach the store behind it too): the two run
    at once on the suite's workers."""
    # A small memory tier: it is bounded by design, and would otherwise fill up to 256 MiB.
    service = service_factory(backend, "--memory-mib", "16")
    engine = engine_factory(service)
    targets = [
        (name, proc, fd)
        for name, proc, fd in (
            ("checkpoint_svc", service, checkpoint_pb2.DESCRIPTOR),
            ("engine_svc", engine, engine_pb2.DESCRIPTOR),
        )
        if name == fuzzed
    ]
    started = time.monotonic()
    rss: dict[str, list[float]] = {name: [] for name, _, _ in targets}
    problems: list[str] = []
    for round_ in range(ROUNDS):
        for name, proc, fd in targets:
            seed = 1000 * round_ + 7
            problems += await _fuzz_pass(proc.address, fd, seed, CALLS_PER_PASS, tenant)
            assert proc.running, f"{name} died:\n{proc.log_tail(40)}"
            await asyncio.sleep(2.5)  # the store gives freed heap back every 2 s
            rss[name].append(rss_mib(proc.pid))
    elapsed = time.monotonic() - started
    assert service.running, f"checkpoint_svc died:\n{service.log_tail(40)}"
    assert not problems, "\n".join(problems[:30])
    for name, seen in rss.items():
        # Later passes send the same kinds of input: memory must level off.
        grown = ", ".join(f"{m:.0f}" for m in seen)
        assert max(seen[1:]) - seen[0] < 48, f"{name}: RSS after each pass {grown} MiB"
        assert max(seen) < 256, f"{name}: RSS after each pass {grown} MiB"
    assert elapsed < 180, f"fuzzing took {elapsed:.0f}s"
