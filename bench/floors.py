"""The machine's floors, measured in the same run as the figures they sit beside.

- a bare gRPC echo: a grpc.aio server on uvloop in a process of its own (as our services run),
  answering raw bytes with no work behind them, called one call at a time from the bench
  process: unary, and a bidirectional stream carrying one message each way per round trip;
- a bare commit: one autocommitted INSERT of 4 KiB on the bench's PostgreSQL, over asyncpg.

No step of ours can take less than one of each. `python -m bench.floors` prints them alone.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from dataclasses import dataclass

import asyncpg
import grpc

from bench import servers

_SERVICE = "bench.Echo"


@dataclass
class Floors:
    """Round trips in ms (p50), sequential, one at a time."""

    grpc_unary_ms: float
    grpc_stream_ms: float
    commit_ms: float | None

    def line(self) -> str:
        commit = f"{self.commit_ms:.3f} ms" if self.commit_ms is not None else "not measured"
        return (
            f"floors (p50, one at a time): bare gRPC echo unary {self.grpc_unary_ms:.3f} ms, "
            f"stream {self.grpc_stream_ms:.3f} ms; bare asyncpg commit (4 KiB INSERT) {commit}"
        )


async def _serve(port: int) -> None:
    async def unary(request: bytes, _context: grpc.aio.ServicerContext) -> bytes:
        return request

    async def stream(requests, _context: grpc.aio.ServicerContext):
        async for request in requests:
            yield request

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                _SERVICE,
                {
                    "Unary": grpc.unary_unary_rpc_method_handler(unary),
                    "Stream": grpc.stream_stream_rpc_method_handler(stream),
                },
            )
        ]
    )
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("serving", flush=True)
    await server.wait_for_termination()


async def _grpc_floors(target: str, n: int) -> tuple[float, float]:
    async with grpc.aio.insecure_channel(target) as channel:
        unary = channel.unary_unary(f"/{_SERVICE}/Unary")
        payload = b"x" * 64
        for _ in range(50):
            await unary(payload)
        times = []
        for _ in range(n):
            t = time.perf_counter()
            await unary(payload)
            times.append(time.perf_counter() - t)
        call = channel.stream_stream(f"/{_SERVICE}/Stream")()
        for _ in range(50):
            await call.write(payload)
            await call.read()
        stream_times = []
        for _ in range(n):
            t = time.perf_counter()
            await call.write(payload)
            await call.read()
            stream_times.append(time.perf_counter() - t)
        await call.done_writing()
    return statistics.median(times) * 1000, statistics.median(stream_times) * 1000


async def measure(libpq_url: str | None, n: int = 1000) -> Floors:
    """Start the echo server, measure, stop it."""
    port = servers.free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.floors",
        "--serve",
        str(port),
        stdout=asyncio.subprocess.PIPE,
        cwd=servers.REPO_ROOT,
    )
    try:
        assert proc.stdout is not None
        ready = await asyncio.wait_for(proc.stdout.readline(), 30)
        if b"serving" not in ready:
            raise servers.ServerError("the echo server did not start")
        unary, stream = await _grpc_floors(f"127.0.0.1:{port}", n)
    finally:
        proc.terminate()
        await proc.wait()
    # A logged table (temp tables skip the WAL), made and dropped here.
    commit = await _logged_commit_floor(libpq_url, n) if libpq_url else None
    return Floors(unary, stream, commit)


async def _logged_commit_floor(libpq_url: str, n: int) -> float:
    conn = await asyncpg.connect(libpq_url)
    try:
        await conn.execute(
            "DROP TABLE IF EXISTS bench_floor_commit; "
            "CREATE TABLE bench_floor_commit (id int PRIMARY KEY, v bytea)"
        )
        body = b"x" * 4096
        times = []
        for i in range(n):
            t = time.perf_counter()
            await conn.execute("INSERT INTO bench_floor_commit VALUES ($1, $2)", i, body)
            times.append(time.perf_counter() - t)
        await conn.execute("DROP TABLE bench_floor_commit")
        return statistics.median(times) * 1000
    finally:
        await conn.close()


def main(argv: list[str]) -> int:
    if argv[:1] == ["--serve"]:
        import uvloop

        uvloop.run(_serve(int(argv[1])))
        return 0
    url = argv[0] if argv else None
    print(asyncio.run(measure(url)).line())
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
