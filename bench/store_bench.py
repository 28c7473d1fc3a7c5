"""Store benchmark: checkpoint_svc over gRPC against LangGraph's AsyncPostgresSaver.

Both run in one process run against one PostgreSQL (default durability), each in its own
database, phase by phase (all systems do Save, then all do Restore, ...) so that neither gets
a warmer or colder server. It prints figures; it is not a test and asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import (
    ChannelVersions,
    Checkpoint,
    CheckpointMetadata,
    create_checkpoint,
    empty_checkpoint,
)
from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
from prometheus_client.parser import text_string_to_metric_families
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from bench import floors, servers
from workflow_client.store_session import StoreSession
from workflow_stubs.checkpoint.v1 import checkpoint_pb2, checkpoint_pb2_grpc

NAMESPACE = "bench"
TENANT_MD = (("x-tenant-id", "bench"),)
STATE_BYTES = 4096
LIST_SIZE = 1000

# Random base64, not "aaaa": PostgreSQL compresses (TOAST) values over ~2 KiB, and a
# compressible payload would flatter whichever side stores it in a compressible column.
_PAYLOAD = base64.b64encode(os.urandom(STATE_BYTES))[:STATE_BYTES].decode()
OUR_STATE = json.dumps({"x": _PAYLOAD}).encode()


# ---------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------


def percentile(samples: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (no interpolation: the value some request really saw)."""
    if not samples:
        return math.nan
    ordered = sorted(samples)
    k = max(0, min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1))
    return ordered[k]


# The targets (issue 11): 16-client Save throughput against LangGraph's better configuration,
# and the latency of one client's Save.
SAVE_RATIO_TARGET = 1.0
SAVE_P50_TARGET_MS = 2.0


@dataclass
class SaveFigures:
    """One Save-throughput configuration."""

    clients: int
    saves: int
    seconds: float
    latencies_ms: list[float] = field(repr=False)

    @property
    def per_second(self) -> float:
        """Saves acknowledged per second of wall time."""
        return self.saves / self.seconds if self.seconds else math.nan

    @property
    def p50(self) -> float:
        """Median latency of one Save, ms."""
        return percentile(self.latencies_ms, 50)


@dataclass
class LatencyFigures:
    """Per-call latencies of one operation, and which tier served each call (ours only)."""

    latencies_ms: list[float] = field(repr=False)
    served_from: dict[str, int] = field(default_factory=dict)
    items: int = 0
    state_bytes: int = 0

    @property
    def p50(self) -> float:
        """Median."""
        return percentile(self.latencies_ms, 50)

    @property
    def p99(self) -> float:
        """Tail."""
        return percentile(self.latencies_ms, 99)


class Store(Protocol):
    """What one benchmarked system must offer; each call is one client's sequential loop."""

    name: str

    async def save_loop(self, thread_id: str, stop: Callable[[int], bool]) -> list[float]:
        """Save checkpoints to one thread until stop(i) is true; per-save latencies (ms)."""
        ...

    async def restore_head(self, thread_id: str) -> str:
        """Read a thread's head with its pending writes; returns the serving tier's name."""
        ...

    async def list_all(self, thread_id: str) -> tuple[int, int]:
        """List every checkpoint of a thread (metadata): (checkpoints, state bytes) returned."""
        ...


# ---------------------------------------------------------------------------------------
# checkpoint_svc over gRPC
# ---------------------------------------------------------------------------------------


class GrpcStore:
    """checkpoint_svc, called the way an engine would: grpc.aio, SYNC durability."""

    def __init__(self, name: str, target: str, session: bool, metrics_url: str = "") -> None:
        self.name = name
        self.metrics_url = metrics_url  # its /metrics, for the commits a phase made
        self.channel = grpc.aio.insecure_channel(target, options=servers.GRPC_OPTIONS)
        self.stub = checkpoint_pb2_grpc.CheckpointServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        # Save and Restore as the engine and the LangGraph saver send them: concurrent callers
        # share one Session stream (--store-calls session), like an engine's runs; or unary.
        self.calls: Any = StoreSession(stub=self.stub, metadata=TENANT_MD) if session else self.stub

    async def close(self) -> None:
        """Close the channel."""
        if isinstance(self.calls, StoreSession):
            await self.calls.close()
        await self.channel.close()

    async def save_loop(self, thread_id: str, stop: Callable[[int], bool]) -> list[float]:
        """Sequential Saves; the server chains each to the thread's head."""
        lat: list[float] = []
        i = 0
        while not stop(i):
            req = checkpoint_pb2.SaveRequest(
                checkpoint=checkpoint_pb2.Checkpoint(
                    namespace=NAMESPACE,
                    thread_id=thread_id,
                    state=OUR_STATE,
                    trigger=checkpoint_pb2.TRIGGER_STEP_COMPLETED,
                    step=i,
                ),
                durability=checkpoint_pb2.DURABILITY_SYNC,
            )
            t0 = time.perf_counter()
            await self.calls.Save(req, metadata=TENANT_MD)
            lat.append((time.perf_counter() - t0) * 1000)
            i += 1
        return lat

    async def commits(self) -> tuple[float, float, float] | None:
        """Group commits so far: (transactions, operations, seconds spent committing)."""
        if not self.metrics_url:
            return None

        def read() -> str:
            with urllib.request.urlopen(self.metrics_url, timeout=5) as r:
                return r.read().decode()

        text = await asyncio.to_thread(read)
        values = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
        return (
            values.get("checkpoint_commits_total", 0.0),
            values.get("checkpoint_committed_operations_total", 0.0),
            values.get("checkpoint_commit_seconds_sum", 0.0),
        )

    async def ping(self) -> None:
        """A health Check: the gRPC round trip with no storage work behind it."""
        await self.health.Check(health_pb2.HealthCheckRequest(service=""))

    async def restore_head(self, thread_id: str) -> str:
        """Restore with include_writes, like LangGraph's aget_tuple."""
        resp = await self.calls.Restore(
            checkpoint_pb2.RestoreRequest(
                namespace=NAMESPACE, thread_id=thread_id, include_writes=True
            ),
            metadata=TENANT_MD,
        )
        if len(resp.checkpoint.state) != len(OUR_STATE):
            raise RuntimeError(f"Restore returned {len(resp.checkpoint.state)} state bytes")
        return checkpoint_pb2.Tier.Name(resp.served_from)

    async def list_all(self, thread_id: str) -> tuple[int, int]:
        """Page (1000 at a time, the maximum) until next_page_token is empty."""
        count, state, token = 0, 0, ""
        while True:
            resp = await self.stub.List(
                checkpoint_pb2.ListRequest(
                    namespace=NAMESPACE,
                    thread_id=thread_id,
                    page_size=LIST_SIZE,
                    page_token=token,
                    include_state=False,
                ),
                metadata=TENANT_MD,
            )
            count += len(resp.checkpoints)
            state += sum(len(c.state) for c in resp.checkpoints)
            token = resp.next_page_token
            if not token:
                return count, state


# ---------------------------------------------------------------------------------------
# LangGraph AsyncPostgresSaver, in-process
# ---------------------------------------------------------------------------------------


def _lg_config(thread_id: str, checkpoint_id: str | None = None) -> RunnableConfig:
    """The config LangGraph passes to its saver."""
    conf: dict[str, Any] = {"thread_id": thread_id, "checkpoint_ns": ""}
    if checkpoint_id:
        conf["checkpoint_id"] = checkpoint_id
    return {"configurable": conf}


def _lg_next(
    saver: AsyncPostgresSaver, prev: Checkpoint | None, step: int
) -> tuple[Checkpoint, ChannelVersions]:
    """Next checkpoint of a one-channel graph whose channel holds the 4 KiB string."""
    base = prev if prev is not None else empty_checkpoint()
    prev_version = base["channel_versions"].get("x")
    version = saver.get_next_version(str(prev_version) if prev_version else None, None)
    ckpt = create_checkpoint(base, None, step)
    ckpt["channel_values"] = {"x": _PAYLOAD}
    ckpt["channel_versions"] = {**base["channel_versions"], "x": version}
    ckpt["versions_seen"] = {"node": {"x": version}}
    return ckpt, {"x": version}


class LangGraphStore:
    """AsyncPostgresSaver on a psycopg pool, configured as LangGraph's docs say.

    `shared=True` is the documented pattern (one saver for the app). An AsyncPostgresSaver
    holds an asyncio.Lock around every query, so one shared saver runs one query at a time;
    `shared=False` gives each client its own saver on the same pool, LangGraph's best case.
    """

    def __init__(self, name: str, pool: AsyncConnectionPool[Any], shared: bool) -> None:
        self.name = name
        self.pool = pool
        self.shared = shared
        self.saver = AsyncPostgresSaver(pool)  # type: ignore[arg-type]

    def _saver(self) -> AsyncPostgresSaver:
        return self.saver if self.shared else AsyncPostgresSaver(self.pool)  # type: ignore[arg-type]

    async def save_loop(self, thread_id: str, stop: Callable[[int], bool]) -> list[float]:
        """Sequential aput calls, each extending the previous checkpoint."""
        saver = self._saver()
        lat: list[float] = []
        prev: Checkpoint | None = None
        config = _lg_config(thread_id)
        i = 0
        while not stop(i):
            ckpt, new_versions = _lg_next(saver, prev, i)
            metadata: CheckpointMetadata = {"source": "loop", "step": i, "parents": {}}
            t0 = time.perf_counter()
            config = await saver.aput(config, ckpt, metadata, new_versions)
            lat.append((time.perf_counter() - t0) * 1000)
            prev = ckpt
            i += 1
        return lat

    async def restore_head(self, thread_id: str) -> str:
        """aget_tuple of the head (it always loads pending writes)."""
        tup = await self.saver.aget_tuple(_lg_config(thread_id))
        if tup is None or tup.checkpoint["channel_values"].get("x") != _PAYLOAD:
            raise RuntimeError("aget_tuple did not return the saved head")
        return "postgres"

    async def list_all(self, thread_id: str) -> tuple[int, int]:
        """alist with no limit (it has no metadata-only mode: every row comes with state)."""
        tuples = [t async for t in self.saver.alist(_lg_config(thread_id))]
        return len(tuples), sum(len(t.checkpoint["channel_values"].get("x", "")) for t in tuples)


# ---------------------------------------------------------------------------------------
# Phases
# ---------------------------------------------------------------------------------------


async def run_saves(
    store: Store, clients: int, total: int, duration: float, tag: str
) -> tuple[SaveFigures, list[str]]:
    """`clients` concurrent loops, each on its own thread; count- or time-bounded."""
    threads = [f"{tag}-c{clients}-{k}" for k in range(clients)]
    # Warm-up on other threads: connections, pools and caches, outside the timing.
    warm = [f"{tag}-warm-c{clients}-{k}" for k in range(clients)]
    await asyncio.gather(*(store.save_loop(t, lambda i: i >= 5) for t in warm))

    if duration > 0:
        deadline = time.perf_counter() + duration

        def stop(_: int) -> bool:
            return time.perf_counter() >= deadline
    else:
        per_client = max(1, total // clients)

        def stop(i: int) -> bool:
            return i >= per_client

    t0 = time.perf_counter()
    results = await asyncio.gather(*(store.save_loop(t, stop) for t in threads))
    elapsed = time.perf_counter() - t0
    lat = [x for r in results for x in r]
    return SaveFigures(clients, len(lat), elapsed, lat), threads


async def run_restores(store: Store, threads: Sequence[str], n: int) -> LatencyFigures:
    """Sequential head reads cycling over threads that already have history."""
    for t in threads:
        await store.restore_head(t)  # warm-up
    lat: list[float] = []
    tiers: Counter[str] = Counter()
    for i in range(n):
        t0 = time.perf_counter()
        tier = await store.restore_head(threads[i % len(threads)])
        lat.append((time.perf_counter() - t0) * 1000)
        tiers[tier] += 1
    return LatencyFigures(lat, dict(tiers))


async def run_floor(store: GrpcStore, n: int) -> LatencyFigures:
    """Round-trip floor of a unary call to the same service: what no storage tier can beat."""
    for _ in range(50):
        await store.ping()
    lat: list[float] = []
    for _ in range(n):
        t0 = time.perf_counter()
        await store.ping()
        lat.append((time.perf_counter() - t0) * 1000)
    return LatencyFigures(lat)


async def run_listing(store: Store, thread_id: str, reps: int) -> LatencyFigures:
    """Full listing of a LIST_SIZE-checkpoint thread, timed `reps` times after one warm-up."""
    got, state_bytes = await store.list_all(thread_id)
    if got != LIST_SIZE:
        raise RuntimeError(f"{store.name}: listing returned {got}, expected {LIST_SIZE}")
    lat: list[float] = []
    for _ in range(reps):
        t0 = time.perf_counter()
        await store.list_all(thread_id)
        lat.append((time.perf_counter() - t0) * 1000)
    return LatencyFigures(lat, items=got, state_bytes=state_bytes)


# ---------------------------------------------------------------------------------------
# Orchestration
# ---------------------------------------------------------------------------------------

OUR_CONFIGS = [
    # (name, uses Redis, single writer): which tier answers heads.
    ("redis", True, False),
    ("memory", False, True),
    ("sql", False, False),
]
TIER_OF = {"redis": "Redis", "memory": "memory", "sql": "SQL"}


@dataclass
class Results:
    """Everything measured, keyed by store name; errors keep a partial run printable."""

    env: dict[str, Any] = field(default_factory=dict)
    saves: dict[str, dict[int, SaveFigures]] = field(default_factory=dict)
    restores: dict[str, LatencyFigures] = field(default_factory=dict)
    listings: dict[str, LatencyFigures] = field(default_factory=dict)
    floors: dict[str, LatencyFigures] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


async def _guard(results: Results, store: str, what: str, coro: Awaitable[None]) -> bool:
    """Run one measurement; on failure record it and drop that store from later phases."""
    try:
        await coro
        return True
    except Exception as exc:  # a broken service must not hide the other figures
        if isinstance(exc, grpc.aio.AioRpcError):
            msg = f"{exc.code().name}: {exc.details()}"
        else:
            msg = f"{type(exc).__name__}: {exc}"
        results.errors[store] = f"{what}: {msg}"
        print(f"  !! {store} {what} failed: {msg}", flush=True)
        return False


async def measure(
    args: argparse.Namespace,
    ours: dict[str, tuple[str, str]],
    lg_url: str | None,
    results: Results,
) -> None:
    """Run every phase over every live store."""
    run_id = uuid.uuid4().hex[:8]
    stores: dict[str, Store] = {}
    grpc_stores: list[GrpcStore] = []
    pool: AsyncConnectionPool[Any] | None = None
    try:
        for name, (target, metrics_url) in ours.items():
            gs = GrpcStore(name, target, args.store_calls == "session", metrics_url)
            grpc_stores.append(gs)
            stores[name] = gs
        if lg_url is not None:
            pool = AsyncConnectionPool(
                lg_url,
                min_size=16,
                max_size=16,
                kwargs={"autocommit": True, "prepare_threshold": 0, "row_factory": dict_row},
                open=False,
            )
            await pool.open(wait=True, timeout=30)
            shared = LangGraphStore("langgraph-shared", pool, shared=True)
            await shared.saver.setup()
            stores["langgraph"] = LangGraphStore("langgraph", pool, shared=False)
            stores["langgraph-shared"] = shared

        live = dict(stores)
        save_threads: dict[str, list[str]] = {}
        for clients in args.clients:
            print(f"-- Save, {clients} client(s)", flush=True)
            for name, store in list(live.items()):
                if clients == 1 and name == "langgraph-shared":
                    continue  # identical to "langgraph" with one client

                async def one(store: Store = store, name: str = name, c: int = clients) -> None:
                    before = await store.commits() if isinstance(store, GrpcStore) else None
                    fig, threads = await run_saves(
                        store, c, args.saves, args.duration, f"{run_id}-{name}"
                    )
                    results.saves.setdefault(name, {})[c] = fig
                    save_threads[name] = threads
                    after = await store.commits() if isinstance(store, GrpcStore) else None
                    batches = ""
                    if before is not None and after is not None and after[0] > before[0]:
                        n, ops, secs = (a - b for a, b in zip(after, before, strict=True))
                        # How group commit went: one tenant's batches commit one at a time.
                        batches = f", {ops / n:.1f} saves per commit, {secs / n * 1e3:.2f} ms each"
                    print(
                        f"   {name:17s} {fig.per_second:9.1f} saves/s "
                        f"(n={fig.saves}, p50 {percentile(fig.latencies_ms, 50):.2f} ms{batches})",
                        flush=True,
                    )

                if not await _guard(results, name, f"Save x{clients}", one()):
                    del live[name]
        live.pop("langgraph-shared", None)  # reads do not depend on sharing

        print("-- Restore head", flush=True)
        for name, store in list(live.items()):

            async def restore(store: Store = store, name: str = name) -> None:
                fig = await run_restores(store, save_threads[name], args.restores)
                results.restores[name] = fig
                print(
                    f"   {name:17s} p50 {fig.p50:.3f} ms  p99 {fig.p99:.3f} ms  "
                    f"served_from {fig.served_from}",
                    flush=True,
                )

            if not await _guard(results, name, "Restore", restore()):
                del live[name]
        for gs in grpc_stores:
            if gs.name in live:

                async def floor(gs: GrpcStore = gs) -> None:
                    fig = await run_floor(gs, args.restores)
                    results.floors[gs.name] = fig
                    print(
                        f"   {gs.name:17s} gRPC floor (health Check) p50 {fig.p50:.3f} ms "
                        f"p99 {fig.p99:.3f} ms",
                        flush=True,
                    )

                await _guard(results, gs.name, "health Check", floor())

        print(f"-- List a {LIST_SIZE}-checkpoint thread", flush=True)
        for name, store in list(live.items()):

            async def listing(store: Store = store, name: str = name) -> None:
                thread = f"{run_id}-{name}-list"
                t0 = time.perf_counter()
                await store.save_loop(thread, lambda i: i >= LIST_SIZE)
                build = time.perf_counter() - t0
                fig = await run_listing(store, thread, args.list_reps)
                results.listings[name] = fig
                print(
                    f"   {name:17s} p50 {fig.p50:.2f} ms, min {min(fig.latencies_ms):.2f} ms, "
                    f"{fig.state_bytes / 1e6:.1f} MB of state returned "
                    f"(thread built in {build:.1f} s)",
                    flush=True,
                )

            await _guard(results, name, "List", listing())
    finally:
        for gs in grpc_stores:
            await gs.close()
        if pool is not None:
            await pool.close()


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------


def _fmt(v: float | None, unit: str) -> str:
    if v is None or math.isnan(v):
        return "n/a"
    if unit == "/s":
        return f"{v:,.0f}/s"
    return f"{v:.3f} ms" if v < 10 else f"{v:.1f} ms"


def _lg_best_saves(results: Results, clients: int) -> tuple[float | None, str]:
    """LangGraph's stronger configuration, so that a target met is not a strawman's."""
    best: tuple[float | None, str] = (None, "")
    for name in ("langgraph", "langgraph-shared"):
        fig = results.saves.get(name, {}).get(clients)
        if fig is not None and (best[0] is None or fig.per_second > best[0]):
            best = (fig.per_second, name)
    return best


def render(results: Results, args: argparse.Namespace) -> str:
    """The table: operation, ours, LangGraph, ratio (>1 means ours is better), target."""
    rows: list[tuple[str, str, str, str, str]] = []
    verdicts: dict[str, list[tuple[str, bool]]] = {
        "save": [],
        "save_p50": [],
        "restore": [],
        "list": [],
    }

    def ratio_s(r: float | None) -> str:
        return "n/a" if r is None or math.isnan(r) else f"{r:.2f}x"

    for clients in args.clients:
        lg, lg_name = _lg_best_saves(results, clients)
        for name, _redis, _sw in OUR_CONFIGS:
            fig = results.saves.get(name, {}).get(clients)
            ours_v = fig.per_second if fig else None
            r = ours_v / lg if ours_v is not None and lg else None
            target = ""
            if clients == 16:
                ok = r is not None and r >= SAVE_RATIO_TARGET
                if ours_v is not None and lg is not None:
                    verdicts["save"].append((name, ok))
                want = f">={SAVE_RATIO_TARGET:g}x: "
                target = want + ("met" if ok else "MISSED") if r is not None else want + "n/a"
            if clients == 1 and fig is not None:
                ok = fig.p50 <= SAVE_P50_TARGET_MS
                verdicts["save_p50"].append((name, ok))
                target = f"p50 {fig.p50:.2f} ms <={SAVE_P50_TARGET_MS:g} ms: " + (
                    "met" if ok else "MISSED"
                )
            rows.append(
                (
                    f"Save {clients} client(s) [{name} svc]",
                    _fmt(ours_v, "/s"),
                    _fmt(lg, "/s"),
                    ratio_s(r),
                    target,
                )
            )
        shared = results.saves.get("langgraph-shared", {}).get(clients)
        if shared is not None and lg_name != "langgraph-shared":
            rows.append(
                (
                    f"  LangGraph, one shared saver, {clients} clients",
                    "",
                    _fmt(shared.per_second, "/s"),
                    "",
                    "(info)",
                )
            )
        elif shared is not None:
            per_client = results.saves.get("langgraph", {}).get(clients)
            if per_client is not None:
                rows.append(
                    (
                        f"  LangGraph, saver per client, {clients} clients",
                        "",
                        _fmt(per_client.per_second, "/s"),
                        "",
                        "(info)",
                    )
                )

    lg_r = results.restores.get("langgraph")
    for stat in ("p50", "p99"):
        for name, _redis, _sw in OUR_CONFIGS:
            fig = results.restores.get(name)
            ours_v = getattr(fig, stat) if fig else None
            lg_v = getattr(lg_r, stat) if lg_r else None
            r = lg_v / ours_v if ours_v and lg_v else None
            target = ""
            if stat == "p50":
                ok = ours_v is not None and lg_v is not None and ours_v <= lg_v
                if ours_v is not None and lg_v is not None:
                    verdicts["restore"].append((name, ok))
                    target = "<=LG: " + ("met" if ok else "MISSED")
                else:
                    target = "<=LG: n/a"
            served = ""
            if fig is not None and stat == "p50":
                served = " served_from=" + ",".join(
                    f"{k.removeprefix('TIER_').lower()}:{v}" for k, v in fig.served_from.items()
                )
            rows.append(
                (
                    f"Restore head {stat} [{TIER_OF[name]} tier]{served}",
                    _fmt(ours_v, "ms"),
                    _fmt(lg_v, "ms"),
                    ratio_s(r),
                    target,
                )
            )
    for name, fig in results.floors.items():
        rows.append(
            (f"  gRPC floor: health Check p50 [{name} svc]", _fmt(fig.p50, "ms"), "", "", "(info)")
        )

    lg_l = results.listings.get("langgraph")
    for name, _redis, _sw in OUR_CONFIGS:
        fig = results.listings.get(name)
        ours_v = fig.p50 if fig else None
        lg_v = lg_l.p50 if lg_l else None
        r = lg_v / ours_v if ours_v and lg_v else None
        ok = r is not None and r >= 5.0
        if r is not None:
            verdicts["list"].append((name, ok))
        rows.append(
            (
                f"List {LIST_SIZE} checkpoints, p50 [{name} svc]",
                _fmt(ours_v, "ms"),
                _fmt(lg_v, "ms"),
                ratio_s(r),
                (">=5x: " + ("met" if ok else "MISSED")) if r is not None else ">=5x: n/a",
            )
        )

    head = ("Operation", "checkpoint_svc", "LangGraph", "ratio", "target")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(5)]
    sep = "-+-".join("-" * w for w in widths)

    def line(r: Sequence[str]) -> str:
        cells = zip(r, widths, strict=True)
        return " | ".join(
            c.ljust(w) if i in (0, 4) else c.rjust(w) for i, (c, w) in enumerate(cells)
        )

    out = [line(head), sep, *(line(r) for r in rows), ""]
    out.append(
        "ratio: how many times better checkpoint_svc is (>1 = ours better); "
        "throughput ours/LG, latency LG/ours."
    )
    out.append(
        "LangGraph Save figure = the better of 'saver per client' and 'one shared "
        "saver' (both on one 16-connection pool)."
    )
    out.append(
        "LangGraph runs in-process (no RPC hop); ours pays a gRPC round trip, whose "
        "floor is the health Check row."
    )
    if results.listings:
        shipped = ", ".join(
            f"{n} {f.state_bytes / 1e6:.2f} MB" for n, f in results.listings.items()
        )
        out.append(
            f"State returned by one full listing: {shipped} (alist has no metadata-only mode)."
        )
    out.append("")
    out.append("Targets (evaluated on every one of our service configurations):")
    labels = {
        "save": f"16-client Save throughput >= {SAVE_RATIO_TARGET:g}x LangGraph",
        "save_p50": f"one-client Save p50 <= {SAVE_P50_TARGET_MS:g} ms",
        "restore": "Restore-head p50 <= LangGraph aget_tuple p50",
        "list": f"List {LIST_SIZE} checkpoints' metadata >= 5x faster than LangGraph alist",
    }
    for key, label in labels.items():
        v = verdicts[key]
        if not v:
            status = "NOT MEASURED"
        elif all(ok for _, ok in v):
            status = "MET (" + ", ".join(n for n, _ in v) + ")"
        else:
            status = (
                "MISSED on "
                + ", ".join(n for n, ok in v if not ok)
                + (
                    f"; met on {', '.join(n for n, ok in v if ok)}"
                    if any(ok for _, ok in v)
                    else ""
                )
            )
        out.append(f"  - {label}: {status}")
    if results.errors:
        out.append("")
        out.append("Errors:")
        out.extend(f"  - {k}: {v}" for k, v in results.errors.items())
    return "\n".join(out)


def to_json(results: Results, args: argparse.Namespace) -> dict[str, Any]:
    """Raw figures, samples included, for later comparison."""
    return {
        "env": results.env,
        "params": {k: v for k, v in vars(args).items() if k != "json"},
        "state_bytes": len(OUR_STATE),
        "saves": {
            name: {str(c): {**asdict(f), "per_second": f.per_second} for c, f in by_c.items()}
            for name, by_c in results.saves.items()
        },
        "restores": {
            n: {**asdict(f), "p50_ms": f.p50, "p99_ms": f.p99} for n, f in results.restores.items()
        },
        "listings": {
            n: {**asdict(f), "p50_ms": f.p50, "p99_ms": f.p99} for n, f in results.listings.items()
        },
        "grpc_floor": {
            n: {**asdict(f), "p50_ms": f.p50, "p99_ms": f.p99} for n, f in results.floors.items()
        },
        "errors": results.errors,
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """CLI."""
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="checkpoint_svc vs LangGraph AsyncPostgresSaver on one PostgreSQL.",
    )
    p.add_argument("--only", choices=["all", "ours", "langgraph"], default="all")
    p.add_argument(
        "--pg-url",
        help="use this PostgreSQL (libpq URL, may CREATE DATABASE) instead of starting one",
    )
    p.add_argument("--redis-url", help="use this Redis instead of starting one")
    p.add_argument(
        "--saves",
        type=int,
        default=2000,
        help="Saves per throughput configuration, split over the clients",
    )
    p.add_argument(
        "--duration",
        type=float,
        default=0.0,
        help="if > 0, run each throughput configuration this many seconds instead",
    )
    p.add_argument("--clients", type=int, nargs="+", default=[1, 16])
    p.add_argument(
        "--store-calls",
        choices=["session", "unary"],
        default="session",
        help="our Save and Restore: on a Session stream per client (as the engine and the "
        "LangGraph saver send them), or unary",
    )
    p.add_argument("--restores", type=int, default=1000, help="timed head reads per store")
    p.add_argument("--list-reps", type=int, default=20, help="timed full listings per store")
    p.add_argument("--json", type=Path, help="write raw figures here")
    return p.parse_args(argv)


def _sigterm(_signum: int, _frame: object) -> None:
    """Turn SIGTERM into an exception so the ExitStack stops every server we started."""
    raise SystemExit(143)


def main(argv: Sequence[str] | None = None) -> int:
    """Start servers, measure, print, stop servers."""
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm)
    results = Results()
    workdir = Path(tempfile.mkdtemp(prefix="store-bench-"))
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, workdir, True)
        created_dbs: list[str] = []
        if args.pg_url:
            admin_url = args.pg_url
        else:
            pg = servers.Postgres()
            stack.callback(pg.stop)
            print("starting PostgreSQL ...", flush=True)
            pg.start()
            admin_url = pg.url
        if args.pg_url:  # leave a server we did not start as we found it

            def drop_ours() -> None:
                for d in created_dbs:
                    servers.drop_database(admin_url, d)

            stack.callback(drop_ours)
        results.env = {
            "postgres": servers.pg_settings(admin_url),
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "grpc": grpc.__version__,
            "loadavg_before": os.getloadavg(),
        }

        def new_db(name: str) -> str:
            created_dbs.append(name)
            return servers.create_database(admin_url, name)

        ours: dict[str, tuple[str, str]] = {}
        if args.only in ("all", "ours"):
            redis_url = args.redis_url
            if redis_url is None:
                redis = servers.Redis()
                stack.callback(redis.close)
                print("starting Redis ...", flush=True)
                redis.start()
                redis_url = redis.url
            for name, with_redis, single_writer in OUR_CONFIGS:
                svc = servers.CheckpointService(
                    name,
                    new_db(f"bench_svc_{name}"),
                    redis_url if with_redis else None,
                    single_writer,
                    workdir / "logs",
                    metrics_port=servers.free_port(),
                )
                stack.callback(svc.stop)
                print(f"starting checkpoint_svc [{name}] ...", flush=True)
                try:
                    svc.start()
                    ours[name] = (svc.target, f"http://127.0.0.1:{svc.metrics_port}/metrics")
                except (servers.ServerError, OSError) as exc:
                    results.errors[name] = f"start: {exc}"
                    print(f"  !! {exc}", flush=True)
        lg_url = new_db("bench_langgraph") if args.only in ("all", "langgraph") else None

        pgs = results.env["postgres"]
        print(
            f"PostgreSQL {pgs['server_version']}: fsync={pgs['fsync']} "
            f"synchronous_commit={pgs['synchronous_commit']} "
            f"wal_sync_method={pgs['wal_sync_method']}; {os.cpu_count()} CPUs; "
            f"state {len(OUR_STATE)} bytes",
            flush=True,
        )
        machine = asyncio.run(floors.measure(admin_url))
        results.env["floors"] = asdict(machine)
        print(machine.line(), flush=True)
        load = os.getloadavg()[0]
        if load > 0.5:
            print(
                f"WARNING: 1-minute load average is {load:.2f} before measuring; other work "
                "on this machine will skew the figures",
                flush=True,
            )
        asyncio.run(measure(args, ours, lg_url, results))
        results.env["loadavg_after"] = os.getloadavg()

    print()
    print(render(results, args))
    if args.json:
        args.json.write_text(json.dumps(to_json(results, args), indent=2))
        print(f"\nraw figures written to {args.json}")
    return 0
