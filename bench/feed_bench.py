"""Feed benchmark: what Stream watchers cost the store, and how far behind they are.

One checkpoint_svc on PostgreSQL + Redis. In every phase 50 "runs" publish to threads of
their own as fast as they can, and one more publishes a few events a second to the watched
thread, stamped with the time it sent them. Phases: no watcher; 1,000 watchers reading; 1,000
watchers that never read (slow consumers). The figures: the 50 runs' events/s (what the
watchers cost everyone else) and the lag of the watched thread's events at the watchers that
read (from send to receipt). It prints figures; it is not a test and asserts nothing.

    python -m bench feed [--watchers 1000] [--seconds 6]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
from google.protobuf import struct_pb2

from bench import servers
from bench.store_bench import percentile
from workflow_stubs.checkpoint.v1 import checkpoint_pb2 as pb
from workflow_stubs.checkpoint.v1 import checkpoint_pb2_grpc as pb_grpc

TENANT = (("x-tenant-id", "feedbench"),)
NS = "runs"
RUNS = 50
STREAMS_PER_CHANNEL = 100


def _event(kind: str, **payload: float) -> pb.NewEvent:
    s = struct_pb2.Struct()
    s.update(payload)
    return pb.NewEvent(type=kind, payload=s)


async def _publisher(stub: pb_grpc.CheckpointServiceStub, thread: str, stop: asyncio.Event) -> int:
    n = 0
    while not stop.is_set():
        await stub.Publish(
            pb.PublishRequest(namespace=NS, thread_id=thread, events=[_event("tick", n=n)]),
            metadata=TENANT,
        )
        n += 1
    return n


async def _watched(
    stub: pb_grpc.CheckpointServiceStub, thread: str, rate: float, stop: asyncio.Event
) -> None:
    while not stop.is_set():
        await stub.Publish(
            pb.PublishRequest(
                namespace=NS, thread_id=thread, events=[_event("stamp", t=time.time())]
            ),
            metadata=TENANT,
        )
        await asyncio.sleep(1 / rate)


async def _watcher(
    stub: pb_grpc.CheckpointServiceStub,
    thread: str,
    after: int,
    reads: bool,
    lags: list[float],
    ready: asyncio.Event,
) -> None:
    call = stub.Stream(
        pb.StreamRequest(namespace=NS, thread_id=thread, after_seq=after, follow=True),
        metadata=TENANT,
    )
    with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
        first = await call.read()  # the first message: the stream is open
        del first
        ready.set()
        if not reads:
            await asyncio.Event().wait()  # a consumer that never reads again
        while True:  # read(), not `async for`: gRPC refuses to mix the two on one call
            item = await call.read()
            if item is grpc.aio.EOF:
                break
            if item.HasField("event") and item.event.type == "stamp":
                lags.append(time.time() - item.event.payload.fields["t"].number_value)
    call.cancel()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    import os

    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _phase(
    target: str, watchers: int, reads: bool, seconds: float, rate: float, label: str, pid: int
) -> dict[str, float]:
    channels = [
        grpc.aio.insecure_channel(target)
        for _ in range(max(1, (watchers + STREAMS_PER_CHANNEL - 1) // STREAMS_PER_CHANNEL))
    ]
    pub_channel = grpc.aio.insecure_channel(target)
    stub = pb_grpc.CheckpointServiceStub(pub_channel)
    thread = f"watched-{label}"
    # A heartbeat-free start: one event so that every watcher has something to open on.
    opened = await stub.Publish(
        pb.PublishRequest(namespace=NS, thread_id=thread, events=[_event("open")]),
        metadata=TENANT,
    )
    lags: list[float] = []
    tasks: list[asyncio.Task] = []
    readies = []
    for i in range(watchers):
        ready = asyncio.Event()
        readies.append(ready)
        s = pb_grpc.CheckpointServiceStub(channels[i // STREAMS_PER_CHANNEL])
        tasks.append(
            asyncio.create_task(_watcher(s, thread, opened.seqs[0] - 1, reads, lags, ready))
        )
    await asyncio.wait_for(asyncio.gather(*(r.wait() for r in readies)), 120)
    stop = asyncio.Event()
    started, cpu_before = time.monotonic(), cpu_seconds(pid)
    pubs = [asyncio.create_task(_publisher(stub, f"{label}-run-{i}", stop)) for i in range(RUNS)]
    stamp = asyncio.create_task(_watched(stub, thread, rate, stop))
    await asyncio.sleep(seconds)
    stop.set()
    published = sum(await asyncio.gather(*pubs))
    elapsed = time.monotonic() - started
    cpu = cpu_seconds(pid) - cpu_before
    await stamp
    await asyncio.sleep(1.0)  # late deliveries count as lag, not as lost
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for c in [*channels, pub_channel]:
        await c.close()
    lag_ms = [x * 1000 for x in lags]
    return {
        "events_per_s": published / elapsed,
        "lag_p50_ms": percentile(lag_ms, 50),
        "lag_p99_ms": percentile(lag_ms, 99),
        "lag_max_ms": max(lag_ms) if lag_ms else float("nan"),
        "deliveries": len(lag_ms),
        "service_cpu": cpu / elapsed,
    }


async def measure(
    target: str, pid: int, args: argparse.Namespace
) -> list[tuple[str, dict[str, float]]]:
    rows = []
    for label, watchers, reads in (
        ("no watcher", 1, True),
        (f"{args.watchers} watchers reading", args.watchers, True),
        (f"{args.watchers} watchers not reading", args.watchers, False),
    ):
        print(f"-- {label}", flush=True)
        key = label.split()[0] + ("r" if reads else "n")
        rows.append(
            (label, await _phase(target, watchers, reads, args.seconds, args.rate, key, pid))
        )
    return rows


def render(rows: list[tuple[str, dict[str, float]]], args: argparse.Namespace) -> str:
    base = rows[0][1]["events_per_s"]
    out = [
        f"Feed: {RUNS} runs publishing, one watched thread at {args.rate:g} events/s "
        "(checkpoint_svc on PostgreSQL + Redis)",
        "",
        "| phase | events/s of the 50 runs | vs no watcher | watched-thread lag p50 / p99 / max "
        "| deliveries | checkpoint_svc CPU |",
        "|---|---|---|---|---|---|",
    ]
    for label, r in rows:
        out.append(
            f"| {label} | {r['events_per_s']:.0f} | {r['events_per_s'] / base:.2f}x | "
            f"{r['lag_p50_ms']:.1f} / {r['lag_p99_ms']:.1f} / {r['lag_max_ms']:.1f} ms | "
            f"{r['deliveries']:.0f} | {r['service_cpu'] * 100:.0f} % of a core |"
        )
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench feed", description=__doc__)
    p.add_argument("--watchers", type=int, default=1000)
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--rate", type=float, default=5.0, help="events/s on the watched thread")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="feed-bench-"))
    stack = contextlib.ExitStack()
    try:
        pg = servers.Postgres()
        pg.start()
        stack.callback(pg.stop)
        redis = servers.Redis()
        redis.start()
        stack.callback(redis.close)
        db = servers.create_database(pg.url, "feed")
        svc = servers.CheckpointService("feed", db, redis.url, None, work)
        svc.start()
        stack.callback(svc.stop)
        assert svc.pid is not None
        rows = asyncio.run(measure(svc.target, svc.pid, args))
        print(render(rows, args))
    finally:
        stack.close()
        shutil.rmtree(work, ignore_errors=True)
    return 0
