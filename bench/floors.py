"""The machine's floors, measured in the same run as the figures they sit beside.

- a bare gRPC echo: a grpc.aio server on uvloop in a process of its own (as our services run),
  answering raw bytes with no work behind them, called one call at a time from the bench
  process: unary, and a bidirectional stream carrying one message each way per round trip;
- a bare commit: one autocommitted INSERT of 4 KiB on the bench's PostgreSQL, over asyncpg;
- the same stream round trip and commit after the caller was idle for WORK_MS (each process
  of a sequential step waits while the others work, and on this machine a process woken from
  idle answers later than one kept busy);
- a bare relayed step: a stream round trip to that server, which commits a 4 KiB INSERT
  before it answers (an engine's Save through the store, with no work on either side), back
  to back and after WORK_MS of CPU work in the caller (a step's own work, during which the
  relay and PostgreSQL go idle).

No step of ours can take less than one stream round trip and one commit, nor a sequential
step less than the relayed step after work. `python -m bench.floors [LIBPQ_URL]` prints them
alone.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import asyncpg
import grpc

from bench import servers

_SERVICE = "bench.Echo"
WORK_MS = 1.0  # idle (or busy) time before each call of the "after" floors
_BODY = b"x" * 4096
_INSERT = "INSERT INTO bench_floor_commit (v) VALUES ($1)"
_TABLE = "CREATE TABLE IF NOT EXISTS bench_floor_commit (id bigserial PRIMARY KEY, v bytea)"


@dataclass
class Floors:
    """Round trips in ms (p50), sequential, one at a time."""

    grpc_unary_ms: float
    grpc_stream_ms: float
    commit_ms: float | None
    grpc_stream_after_idle_ms: float | None = None
    commit_after_idle_ms: float | None = None
    relayed_step_ms: float | None = None
    relayed_step_after_work_ms: float | None = None

    def line(self) -> str:
        commit = f"{self.commit_ms:.3f} ms" if self.commit_ms is not None else "not measured"
        text = (
            f"floors (p50, one at a time): bare gRPC echo unary {self.grpc_unary_ms:.3f} ms, "
            f"stream {self.grpc_stream_ms:.3f} ms; bare asyncpg commit (4 KiB INSERT) {commit}"
        )
        if self.relayed_step_ms is not None:
            text += (
                f"\nfloors after {WORK_MS:.0f} ms idle: stream {self.grpc_stream_after_idle_ms:.3f}"
                f" ms, commit {self.commit_after_idle_ms:.3f} ms; bare relayed step (a stream"
                f" round trip to a process that commits before it answers) "
                f"{self.relayed_step_ms:.3f} ms, after {WORK_MS:.0f} ms of work in the caller "
                f"{self.relayed_step_after_work_ms:.3f} ms"
            )
        return text


async def _serve(port: int, libpq_url: str | None) -> None:
    conn = await asyncpg.connect(libpq_url) if libpq_url else None
    if conn is not None:
        await conn.execute(_TABLE)

    async def unary(request: bytes, _context: grpc.aio.ServicerContext) -> bytes:
        return request

    async def stream(requests: AsyncIterator[bytes], _context: grpc.aio.ServicerContext):
        async for request in requests:
            yield request

    async def relay(requests: AsyncIterator[bytes], _context: grpc.aio.ServicerContext):
        async for request in requests:
            await conn.execute(_INSERT, request)
            yield b"ok"

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                _SERVICE,
                {
                    "Unary": grpc.unary_unary_rpc_method_handler(unary),
                    "Stream": grpc.stream_stream_rpc_method_handler(stream),
                    "Relay": grpc.stream_stream_rpc_method_handler(relay),
                },
            )
        ]
    )
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("serving", flush=True)
    await server.wait_for_termination()


def _spin(ms: float) -> None:
    """CPU work in the caller, as a step's own work is."""
    end = time.perf_counter() + ms / 1000
    while time.perf_counter() < end:
        pass


async def _p50(
    call: Callable[[], Awaitable[object]], n: int, before: Callable[[], Awaitable[None]]
) -> float:
    times = []
    for _ in range(n):
        await before()
        t = time.perf_counter()
        await call()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


async def _nothing() -> None:
    return None


async def _idle() -> None:
    await asyncio.sleep(WORK_MS / 1000)


async def _work() -> None:
    _spin(WORK_MS)


class _Exchange:
    """One message each way on an open stream call."""

    def __init__(self, call: grpc.aio.StreamStreamCall, payload: bytes) -> None:
        self.call, self.payload = call, payload

    async def __call__(self) -> None:
        await self.call.write(self.payload)
        await self.call.read()


async def _grpc_floors(target: str, n: int, relayed: bool) -> dict[str, float]:
    out: dict[str, float] = {}
    async with grpc.aio.insecure_channel(target) as channel:
        unary = channel.unary_unary(f"/{_SERVICE}/Unary")
        payload = b"x" * 64
        await _p50(lambda: unary(payload), 50, _nothing)
        out["grpc_unary_ms"] = await _p50(lambda: unary(payload), n, _nothing)
        stream = _Exchange(channel.stream_stream(f"/{_SERVICE}/Stream")(), payload)
        await _p50(stream, 50, _nothing)
        out["grpc_stream_ms"] = await _p50(stream, n, _nothing)
        out["grpc_stream_after_idle_ms"] = await _p50(stream, n // 4, _idle)
        await stream.call.done_writing()
        if relayed:
            relay = _Exchange(channel.stream_stream(f"/{_SERVICE}/Relay")(), _BODY)
            await _p50(relay, 50, _nothing)
            out["relayed_step_ms"] = await _p50(relay, n // 2, _nothing)
            out["relayed_step_after_work_ms"] = await _p50(relay, n // 4, _work)
            await relay.call.done_writing()
    return out


async def measure(libpq_url: str | None, n: int = 1000) -> Floors:
    """Start the echo server, measure, stop it."""
    port = servers.free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.floors",
        "--serve",
        str(port),
        *([libpq_url] if libpq_url else []),
        stdout=asyncio.subprocess.PIPE,
        cwd=servers.REPO_ROOT,
    )
    try:
        assert proc.stdout is not None
        ready = await asyncio.wait_for(proc.stdout.readline(), 30)
        if b"serving" not in ready:
            raise servers.ServerError("the echo server did not start")
        figures = await _grpc_floors(f"127.0.0.1:{port}", n, relayed=libpq_url is not None)
    finally:
        proc.terminate()
        await proc.wait()
    if libpq_url:
        figures.update(await _commit_floors(libpq_url, n))
    else:
        figures["commit_ms"] = None
    return Floors(**figures)


async def _commit_floors(libpq_url: str, n: int) -> dict[str, float]:
    """On a logged table (temp tables skip the WAL), dropped afterwards."""
    conn = await asyncpg.connect(libpq_url)
    try:
        await conn.execute(_TABLE)

        async def commit() -> None:
            await conn.execute(_INSERT, _BODY)

        figures = {
            "commit_ms": await _p50(commit, n, _nothing),
            "commit_after_idle_ms": await _p50(commit, n // 4, _idle),
        }
        await conn.execute("DROP TABLE bench_floor_commit")
        return figures
    finally:
        await conn.close()


def main(argv: list[str]) -> int:
    if argv[:1] == ["--serve"]:
        import uvloop

        uvloop.run(_serve(int(argv[1]), argv[2] if len(argv) > 2 else None))
        return 0
    url = argv[0] if argv else None
    print(asyncio.run(measure(url)).line())
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
