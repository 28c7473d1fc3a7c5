"""Engine benchmark: engine_svc + checkpoint_svc against LangGraph and DBOS, end to end.

Two workloads, each on one PostgreSQL (default durability) that the bench starts, every
system in its own database:

- `dag`: 25 levels x 4 nodes, each node depending on all 4 of the level before (no-op nodes),
  ours over gRPC (StartRun, then WatchRun to the terminal event) against a LangGraph
  StateGraph of the same shape on AsyncPostgresSaver with durability="sync".
- `chain`: 100 sequential no-op nodes, ours against a DBOS workflow of 100 @DBOS.step calls
  on a PostgreSQL system database (async and sync workflows; the faster one is compared).
- `runs`: throughput of short runs, 16 clients each starting a 3-node chain and watching it to
  its end, again and again, against 16 callers of a 3-step DBOS workflow (async workflows on
  the bench's loop, sync ones on 16 threads): runs per second.

Repetitions of the systems under comparison are interleaved (A, B, B, A, ...) so that a
noisy neighbour slows both rather than one. It prints figures; it asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import functools
import json
import logging
import math
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypedDict

import grpc
import psycopg
from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
from langgraph.graph import END, START, StateGraph
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from bench import floors, servers
from workflow_client.calls import events_of
from workflow_client.saver import CheckpointServiceSaver
from workflow_stubs.checkpoint.v1 import checkpoint_pb2 as cpb
from workflow_stubs.checkpoint.v1 import checkpoint_pb2_grpc as cpb_grpc
from workflow_stubs.engine.v1 import engine_pb2 as pb
from workflow_stubs.engine.v1 import engine_pb2_grpc as pb_grpc

LEVELS, WIDTH, CHAIN = 25, 4, 100
TARGET = 0.5  # ours / theirs wall time, at most
THREE, RUN_CLIENTS = 3, 16  # the `runs` workload: nodes per run, concurrent clients
RUNS_TARGET = 1.0  # ours / theirs runs per second, at least
# Not the store bench's names: both may share one --pg-url server.
STORE_DB, LANGGRAPH_DB, DBOS_DB = (
    "engine_bench_store",
    "engine_bench_langgraph",
    "engine_bench_dbos",
)
RunOnce = Callable[[], Awaitable["RunFigures"]]


def dag_ids() -> list[list[str]]:
    """Node ids by level: n00_0 .. n24_3."""
    return [[f"n{k:02d}_{j}" for j in range(WIDTH)] for k in range(LEVELS)]


def chain_ids() -> list[str]:
    """Node ids of the chain: s000 .. s099."""
    return [f"s{i:03d}" for i in range(CHAIN)]


# ---------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------


@dataclass
class RunFigures:
    """One run's wall time, and for ours where in the run the time went (seconds)."""

    wall: float
    phases: dict[str, float] = field(default_factory=dict)


@dataclass
class Series:
    """Every timed run of one system in one workload."""

    name: str
    runs: list[RunFigures] = field(default_factory=list)

    @property
    def walls_ms(self) -> list[float]:
        """Wall times in ms."""
        return [r.wall * 1000 for r in self.runs]

    @property
    def median_ms(self) -> float:
        """Median wall time."""
        return statistics.median(self.walls_ms)

    @property
    def min_ms(self) -> float:
        """Best wall time (least disturbed by the neighbours)."""
        return min(self.walls_ms)

    def phase_median_ms(self, phase: str) -> float:
        """Median of one phase across runs."""
        return statistics.median(r.phases[phase] * 1000 for r in self.runs)


# ---------------------------------------------------------------------------------------
# Ours: engine_svc over gRPC
# ---------------------------------------------------------------------------------------


def dag_definition(workflow_id: str) -> pb.WorkflowDefinition:
    """The 25 x 4 DAG: each level's nodes depend on every node of the level before."""
    levels = dag_ids()
    nodes = [
        pb.Node(id=node, type="noop", depends_on=levels[k - 1] if k else [])
        for k, level in enumerate(levels)
        for node in level
    ]
    return pb.WorkflowDefinition(workflow_id=workflow_id, nodes=nodes)


def chain_definition(workflow_id: str) -> pb.WorkflowDefinition:
    """100 noop nodes, each depending on the one before."""
    ids = chain_ids()
    nodes = [
        pb.Node(id=node, type="noop", depends_on=[ids[i - 1]] if i else [])
        for i, node in enumerate(ids)
    ]
    return pb.WorkflowDefinition(workflow_id=workflow_id, nodes=nodes)


def three_definition(workflow_id: str) -> pb.WorkflowDefinition:
    """A short run: 3 noop nodes, each depending on the one before."""
    ids = [f"t{i}" for i in range(THREE)]
    nodes = [
        pb.Node(id=node, type="noop", depends_on=[ids[i - 1]] if i else [])
        for i, node in enumerate(ids)
    ]
    return pb.WorkflowDefinition(workflow_id=workflow_id, nodes=nodes)


class EngineClient:
    """A client of engine_svc, as an application would call it (grpc.aio, no tenant header)."""

    def __init__(self, target: str) -> None:
        self.channel = grpc.aio.insecure_channel(target, options=servers.GRPC_OPTIONS)
        self.stub = pb_grpc.EngineServiceStub(self.channel)

    async def close(self) -> None:
        """Close the channel."""
        await self.channel.close()

    async def register(self, definition: pb.WorkflowDefinition) -> None:
        """RegisterWorkflow once per workload, outside the timing."""
        await self.stub.RegisterWorkflow(pb.RegisterWorkflowRequest(definition=definition))

    async def start_and_watch(self, workflow_id: str) -> None:
        """StartRun, then WatchRun until the terminal event; RuntimeError unless COMPLETED."""
        started = await self.stub.StartRun(pb.StartRunRequest(workflow_id=workflow_id))
        async for ev in self.events(started.run.run_id):
            if ev.terminal:
                if ev.status != pb.RUN_STATUS_COMPLETED:
                    status = pb.RunStatus.Name(ev.status)
                    raise RuntimeError(f"run {started.run.run_id} ended {status}")
                return
        raise RuntimeError(f"run {started.run.run_id}: WatchRun ended before its end")

    async def events(self, run_id: str) -> AsyncIterator[pb.RunEvent]:
        """The run's events as the Python client's watch gets them (batched: a step's
        events in one message)."""
        request = pb.WatchRunRequest(run_id=run_id, batched=True)
        async for item in self.stub.WatchRun(request):
            for ev in events_of(item):
                yield ev

    def runner(self, workflow_id: str, nodes: int, steps: int) -> RunOnce:
        """One timed run: StartRun, then WatchRun until the terminal event.

        Phases, from the store's event timestamps (same host clock): `start_rpc` is StartRun's
        round trip; `to_first_node` from StartRun's return to the first node.completed;
        `per_step` the time from the first to the last node.completed over the super-steps
        between them; `last_node_to_terminal` the closing checkpoint; `terminal_to_client`
        the WatchRun delivery lag.
        """

        async def once() -> RunFigures:
            t0_wall, t0 = time.time(), time.perf_counter()
            started = await self.stub.StartRun(pb.StartRunRequest(workflow_id=workflow_id))
            t_started_wall = time.time()
            node_times: list[float] = []
            terminal: pb.RunEvent | None = None
            async for ev in self.events(started.run.run_id):
                if ev.type == "node.completed":
                    node_times.append(ev.time.ToNanoseconds() / 1e9)
                if ev.terminal:
                    terminal = ev
                    break
            wall = time.perf_counter() - t0
            t_end_wall = time.time()
            if terminal is None or terminal.status != pb.RUN_STATUS_COMPLETED:
                status = pb.RunStatus.Name(terminal.status) if terminal else "no terminal event"
                raise RuntimeError(f"run {started.run.run_id} ended {status}")
            if len(node_times) != nodes:
                raise RuntimeError(f"{len(node_times)} node.completed events, expected {nodes}")
            t_term = terminal.time.ToNanoseconds() / 1e9
            return RunFigures(
                wall,
                {
                    "start_rpc": t_started_wall - t0_wall,
                    "to_first_node": node_times[0] - t_started_wall,
                    "per_step": (node_times[-1] - node_times[0]) / (steps - 1),
                    "last_node_to_terminal": t_term - node_times[-1],
                    "terminal_to_client": t_end_wall - t_term,
                },
            )

        return once


# ---------------------------------------------------------------------------------------
# LangGraph: StateGraph on AsyncPostgresSaver, durability="sync"
# ---------------------------------------------------------------------------------------


def _lg_node(key: str) -> Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]:
    """A trivial async node writing its own key (async: no thread hop, LangGraph's best)."""

    async def node(_state: dict[str, Any]) -> dict[str, Any]:
        return {key: True}

    return node


def langgraph_dag(saver: AsyncPostgresSaver) -> Any:
    """The same DAG as a StateGraph: one state key per node, a join edge per node."""
    levels = dag_ids()
    state = TypedDict(  # type: ignore[misc]  # one optional bool channel per node
        "DagState", {n: bool for level in levels for n in level}, total=False
    )
    builder = StateGraph(state)
    for k, level in enumerate(levels):
        for node in level:
            builder.add_node(node, _lg_node(node))
            if k == 0:
                builder.add_edge(START, node)
            else:
                builder.add_edge(levels[k - 1], node)  # waits for all 4 of the level before
    builder.add_edge(levels[-1], END)
    return builder.compile(checkpointer=saver)


def langgraph_runner(graph: Any, threads: list[str] | None = None) -> RunOnce:
    """One timed ainvoke on a new thread, checkpointing every super-step synchronously;
    the thread ids go to `threads`, if given."""

    async def once() -> RunFigures:
        thread_id = uuid.uuid4().hex
        if threads is not None:
            threads.append(thread_id)
        config: dict[str, Any] = {
            "configurable": {"thread_id": thread_id},
            "recursion_limit": 4 * LEVELS,
        }
        t0 = time.perf_counter()
        out = await graph.ainvoke({}, config, durability="sync")
        wall = time.perf_counter() - t0
        if len(out) != LEVELS * WIDTH:
            raise RuntimeError(f"LangGraph state has {len(out)} keys, expected {LEVELS * WIDTH}")
        return RunFigures(wall)

    return once


# ---------------------------------------------------------------------------------------
# DBOS: a workflow of 100 steps, system database on PostgreSQL
# ---------------------------------------------------------------------------------------


@dataclass
class Dbos:
    """DBOS launched with the bench's workflows: the chain (timed per run) and the 3-step
    workflow (for runs per second), each async and sync."""

    chain_async: RunOnce
    chain_sync: RunOnce
    three_async: Callable[[], Awaitable[int]]
    three_sync: Callable[[], int]
    shutdown: Callable[[], None]


def dbos_setup(system_db_url: str) -> Dbos:
    """Register the workflows (async and sync, distinct steps each) and launch DBOS. DBOS is
    a process-wide singleton with background threads, so it lives only while its workloads
    are measured."""
    from dbos import DBOS, DBOSConfig  # imported here: only the DBOS workloads need it

    def async_step(name: str, i: int) -> Callable[[], Awaitable[int]]:
        async def step() -> int:
            return i

        return DBOS.step(name=f"bench_async_{name}_{i:03d}")(step)

    def sync_step(name: str, i: int) -> Callable[[], int]:
        def step() -> int:
            return i

        return DBOS.step(name=f"bench_sync_{name}_{i:03d}")(step)

    def workflows(name: str, steps: int) -> tuple[Callable[[], Awaitable[int]], Callable[[], int]]:
        async_steps = [async_step(name, i) for i in range(steps)]
        sync_steps = [sync_step(name, i) for i in range(steps)]

        @DBOS.workflow(name=f"bench_{name}_async")
        async def run_async() -> int:
            done = 0
            for step in async_steps:
                await step()
                done += 1
            return done

        @DBOS.workflow(name=f"bench_{name}_sync")
        def run_sync() -> int:
            done = 0
            for step in sync_steps:
                step()
                done += 1
            return done

        return run_async, run_sync

    chain_async, chain_sync = workflows("chain", CHAIN)
    three_async, three_sync = workflows("three", THREE)
    config: DBOSConfig = {
        "name": "engine-bench",
        "system_database_url": system_db_url,
        "log_level": "WARNING",
    }
    DBOS(config=config)
    try:
        DBOS.launch()
    except BaseException:
        DBOS.destroy(destroy_registry=True)
        raise
    logging.getLogger("dbos").setLevel(logging.WARNING)

    async def run_async() -> RunFigures:
        t0 = time.perf_counter()
        done = await chain_async()
        wall = time.perf_counter() - t0
        if done != CHAIN:
            raise RuntimeError(f"DBOS async workflow ran {done} steps")
        return RunFigures(wall)

    async def run_sync() -> RunFigures:
        # Called on the event loop's thread, as a sync application would call it; nothing
        # else runs on this loop while it does.
        t0 = time.perf_counter()
        done = chain_sync()
        wall = time.perf_counter() - t0
        if done != CHAIN:
            raise RuntimeError(f"DBOS sync workflow ran {done} steps")
        return RunFigures(wall)

    def shutdown() -> None:
        DBOS.destroy(destroy_registry=True)

    return Dbos(run_async, run_sync, three_async, three_sync, shutdown)


# ---------------------------------------------------------------------------------------
# Accounting: what one run costs PostgreSQL and each process (an extra, untimed run)
# ---------------------------------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")
_SETTLE = 0.5  # s before and after the run: a run's tail (lease release) is its cost


def _proc_cpu(pid: int) -> float:
    """User + system CPU seconds of one process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def _postgres_cpu(postmaster: int) -> float:
    """CPU seconds of our PostgreSQL: the postmaster and its children (backends, walwriter)."""
    total = _proc_cpu(postmaster)
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) == postmaster:
                total += _proc_cpu(int(proc.name))
    return total


@dataclass
class Accountant:
    """Counts one run's write transactions (transaction ids assigned) and WAL bytes, both
    server-wide and exact at once (unlike pg_stat_*, which backends publish up to 10 s late),
    and each process's CPU. Nothing else writes to the server meanwhile: the other systems
    are idle, and their background reads take no transaction id."""

    admin_url: str
    pids: dict[str, int]  # engine_svc and checkpoint_svc
    postmaster: int | None  # None when the server is not ours (--pg-url)

    def _cpu(self) -> dict[str, float]:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        cpu = {"bench process": usage.ru_utime + usage.ru_stime}
        cpu.update({name: _proc_cpu(pid) for name, pid in self.pids.items()})
        if self.postmaster is not None:
            cpu["postgres"] = _postgres_cpu(self.postmaster)
        return cpu

    def _pg(self) -> tuple[int, str]:
        """(next transaction id, WAL insert position); reading them assigns no id."""
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            row = conn.execute(
                "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint, "
                "pg_current_wal_insert_lsn()::text"
            ).fetchone()
        assert row is not None
        return int(row[0]), str(row[1])

    def _wal_since(self, lsn: str) -> float:
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            row = conn.execute(
                "SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), %s::pg_lsn)", (lsn,)
            ).fetchone()
        return float(row[0]) if row else math.nan

    async def cost(self, once: RunOnce, limit: float) -> dict[str, float]:
        """One run's counters, its tail included."""
        await asyncio.sleep(_SETTLE)
        (xid0, lsn0), cpu0 = self._pg(), self._cpu()
        fig = await asyncio.wait_for(once(), limit)
        await asyncio.sleep(_SETTLE)
        cpu1 = self._cpu()
        xid1, _ = self._pg()
        out = {
            "wall ms": fig.wall * 1000,
            "write transactions": float(xid1 - xid0),
            "WAL kB": self._wal_since(lsn0) / 1024,
        }
        out.update({f"CPU ms {k}": (cpu1[k] - cpu0[k]) * 1000 for k in cpu0})
        return out


async def account(
    workload: str,
    systems: dict[str, RunOnce],
    acct: Accountant | None,
    args: argparse.Namespace,
    results: Results,
) -> None:
    """One extra run per system, untimed for the comparison, to see where its time goes."""
    if acct is None:
        return
    for name, once in systems.items():
        if name not in results.series.get(workload, {}):
            continue  # it failed while timed
        if name == UNARY:
            continue  # its engine is another process than the one accounted for
        try:
            cost = await acct.cost(once, args.run_timeout)
        except Exception as exc:
            results.errors[f"{workload}/{name} accounting"] = _describe(exc)
            continue
        results.costs.setdefault(workload, {})[name] = cost
        print(
            f"   {name:12s} accounting run: {cost['wall ms']:.0f} ms, "
            f"{cost['write transactions']:.0f} write transactions",
            flush=True,
        )


# ---------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------


@dataclass
class Results:
    """Everything measured, by workload then system; errors keep a partial run printable."""

    env: dict[str, Any] = field(default_factory=dict)
    series: dict[str, dict[str, Series]] = field(default_factory=dict)
    costs: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    # The `runs` workload: runs per second of each measuring window, by system.
    rates: dict[str, list[float]] = field(default_factory=dict)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    if isinstance(exc, TimeoutError):
        return "timed out (see --run-timeout)"
    return f"{type(exc).__name__}: {exc}"


async def interleaved(
    workload: str, systems: dict[str, RunOnce], args: argparse.Namespace, results: Results
) -> None:
    """Warm every system up, then run them in turn, the order reversed every repetition.

    Each run is bounded by --run-timeout: a run that never ends (a crashed engine task
    publishes no terminal event) is reported as an error instead of hanging the bench.
    """
    live = dict(systems)
    out = results.series.setdefault(workload, {})
    reps, warmup, limit = args.reps, args.warmup, args.run_timeout
    for name, once in list(live.items()):
        try:
            for _ in range(warmup):
                await asyncio.wait_for(once(), limit)
        except Exception as exc:  # a broken system must not hide the other figures
            results.errors[f"{workload}/{name}"] = f"warm-up: {_describe(exc)}"
            print(f"  !! {name} warm-up failed: {_describe(exc)}", flush=True)
            del live[name]
    for rep in range(reps):
        order = list(live.items()) if rep % 2 == 0 else list(reversed(live.items()))
        for name, once in order:
            if name not in live:
                continue
            try:
                fig = await asyncio.wait_for(once(), limit)
            except Exception as exc:
                results.errors[f"{workload}/{name}"] = f"run {rep + 1}: {_describe(exc)}"
                print(f"  !! {name} run {rep + 1} failed: {_describe(exc)}", flush=True)
                del live[name]
                continue
            out.setdefault(name, Series(name)).runs.append(fig)
            print(f"   {name:12s} run {rep + 1}: {fig.wall * 1000:8.1f} ms", flush=True)


async def show_feed(store: str, thread_id: str, saver: CheckpointServiceSaver) -> None:
    """The graph's checkpoints, as the store's own event feed shows them to any watcher."""
    channel = grpc.aio.insecure_channel(store)
    stub = cpb_grpc.CheckpointServiceStub(channel)
    saved = 0
    try:
        async for item in stub.Stream(
            cpb.StreamRequest(namespace=saver.prefix, thread_id=thread_id, follow=True),
            metadata=saver.connection.metadata,
            timeout=30,
        ):
            if item.HasField("heartbeat"):
                break
            saved += item.event.type == "checkpoint.saved"
    finally:
        await channel.close()
    listed = [t async for t in saver.alist({"configurable": {"thread_id": thread_id}})]
    print(
        f"   lg-our-saver: the store's Stream of thread {thread_id} shows {saved} "
        f"checkpoint.saved events for the graph's {len(listed)} checkpoints",
        flush=True,
    )


async def measure_dag(
    args: argparse.Namespace,
    engine: str,
    store: str,
    lg_url: str,
    acct: Accountant | None,
    results: Results,
    unary_engine: str | None = None,
) -> None:
    """Ours vs LangGraph on the 25 x 4 DAG; and the same StateGraph on our LangGraph saver
    (over checkpoint_svc) vs on AsyncPostgresSaver."""
    print(f"-- DAG {LEVELS} levels x {WIDTH} wide, noop nodes", flush=True)
    client = EngineClient(engine)
    unary = EngineClient(unary_engine) if unary_engine else None
    ours_saver = CheckpointServiceSaver(store, tenant="bench-langgraph")
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        lg_url,
        min_size=4,
        max_size=4,
        kwargs={"autocommit": True, "prepare_threshold": 0, "row_factory": dict_row},
        open=False,
    )
    try:
        systems: dict[str, RunOnce] = {}
        try:
            await client.register(dag_definition("bench-dag"))
            systems["ours"] = client.runner("bench-dag", LEVELS * WIDTH, LEVELS)
            if unary is not None:
                systems[UNARY] = unary.runner("bench-dag", LEVELS * WIDTH, LEVELS)
        except grpc.aio.AioRpcError as exc:
            results.errors["dag/ours"] = f"register: {_describe(exc)}"
        await pool.open(wait=True, timeout=30)
        saver = AsyncPostgresSaver(pool)  # type: ignore[arg-type]
        await saver.setup()
        systems["langgraph"] = langgraph_runner(langgraph_dag(saver))
        saver_threads: list[str] = []
        systems["lg-our-saver"] = langgraph_runner(langgraph_dag(ours_saver), saver_threads)
        await interleaved("dag", systems, args, results)
        await account("dag", systems, acct, args, results)
        if saver_threads:
            await show_feed(store, saver_threads[-1], ours_saver)
    finally:
        await client.close()
        if unary is not None:
            await unary.close()
        await pool.close()
        await ours_saver.aclose()


async def measure_chain(
    args: argparse.Namespace,
    engine: str,
    dbos: Dbos | None,
    acct: Accountant | None,
    results: Results,
    unary_engine: str | None = None,
) -> None:
    """Ours vs DBOS on 100 sequential steps."""
    print(f"-- Chain of {CHAIN} sequential noop steps", flush=True)
    client = EngineClient(engine)
    unary = EngineClient(unary_engine) if unary_engine else None
    try:
        systems: dict[str, RunOnce] = {}
        try:
            await client.register(chain_definition("bench-chain"))
            systems["ours"] = client.runner("bench-chain", CHAIN, CHAIN)
            if unary is not None:
                systems[UNARY] = unary.runner("bench-chain", CHAIN, CHAIN)
        except grpc.aio.AioRpcError as exc:
            results.errors["chain/ours"] = f"register: {_describe(exc)}"
        if dbos is not None:
            systems["dbos-async"] = dbos.chain_async
            systems["dbos-sync"] = dbos.chain_sync
        await interleaved("chain", systems, args, results)
        await account("chain", systems, acct, args, results)
    finally:
        await client.close()
        if unary is not None:
            await unary.close()


async def measure_runs(
    args: argparse.Namespace, engine: str, dbos: Dbos | None, results: Results
) -> None:
    """Runs per second: 16 clients starting 3-node runs and watching each to its end, against
    16 callers of a 3-step DBOS workflow; windows interleaved, the order reversed each time."""
    print(f"-- Runs per second: {RUN_CLIENTS} clients, {THREE}-node runs", flush=True)
    clients = [EngineClient(engine) for _ in range(RUN_CLIENTS)]
    threads = concurrent.futures.ThreadPoolExecutor(RUN_CLIENTS, thread_name_prefix="dbos")
    try:
        systems: dict[str, list[Callable[[], Awaitable[Any]]]] = {}
        try:
            await clients[0].register(three_definition("bench-three"))
            # Each caller on a channel of its own, as separate applications would be.
            systems["ours"] = [functools.partial(c.start_and_watch, "bench-three") for c in clients]
        except grpc.aio.AioRpcError as exc:
            results.errors["runs/ours"] = f"register: {_describe(exc)}"
        if dbos is not None:
            loop = asyncio.get_running_loop()
            systems["dbos-async"] = [dbos.three_async] * RUN_CLIENTS
            systems["dbos-sync"] = [
                functools.partial(loop.run_in_executor, threads, dbos.three_sync)
            ] * RUN_CLIENTS
        live = dict(systems)
        for name, runs in list(live.items()):
            try:  # warm-up: every caller once
                await asyncio.wait_for(asyncio.gather(*(r() for r in runs)), args.run_timeout)
            except Exception as exc:
                results.errors[f"runs/{name}"] = f"warm-up: {_describe(exc)}"
                del live[name]
        for rep in range(args.reps):
            order = list(live.items()) if rep % 2 == 0 else list(reversed(live.items()))
            for name, runs in order:
                if name not in live:
                    continue
                try:
                    rate = await asyncio.wait_for(
                        _rates(runs, args.runs_seconds), args.run_timeout + args.runs_seconds
                    )
                except Exception as exc:
                    results.errors[f"runs/{name}"] = f"window {rep + 1}: {_describe(exc)}"
                    del live[name]
                    continue
                results.rates.setdefault(name, []).append(rate)
                print(f"   {name:12s} window {rep + 1}: {rate:8.1f} runs/s", flush=True)
    finally:
        threads.shutdown(wait=False)
        for c in clients:
            await c.close()


async def _rates(runs: list[Callable[[], Awaitable[Any]]], seconds: float) -> float:
    """Runs per second of one caller per entry of `runs`, for `seconds`."""
    done = 0
    t0 = time.perf_counter()
    until = t0 + seconds

    async def caller(run: Callable[[], Awaitable[Any]]) -> None:
        nonlocal done
        while time.perf_counter() < until:
            await run()
            done += 1

    await asyncio.gather(*(caller(r) for r in runs))
    return done / (time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------

# A second engine_svc on the same store with --store-calls unary (--compare-unary): what the
# Session stream is worth, measured in the same run.
UNARY = "ours-unary"

THEIRS = {"dag": ("LangGraph", ["langgraph"]), "chain": ("DBOS", ["dbos-async", "dbos-sync"])}
TITLES = {
    "dag": f"DAG {LEVELS}x{WIDTH} ({LEVELS * WIDTH} noop nodes), StartRun->terminal event",
    "chain": f"Chain of {CHAIN} sequential noop steps",
}


STEPS = {"dag": LEVELS, "chain": CHAIN}


def _render_costs(costs: dict[str, dict[str, float]], steps: int) -> list[str]:
    """The accounting run of each system: totals, and per step in brackets."""
    if not costs:
        return []
    cols = sorted({k for c in costs.values() for k in c}, key=_cost_order)
    head = ["one more run", *(c.removeprefix("CPU ms ") for c in cols)]
    rows = [
        [name, *(_cost_cell(c.get(k, math.nan), k, steps) for k in cols)]
        for name, c in costs.items()
    ]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = [f"   where the work goes (accounting run; per super-step in brackets, {steps} steps):"]
    labels = ["" for _ in head]
    cpu_cols = [i + 1 for i, c in enumerate(cols) if c.startswith("CPU ms")]
    if cpu_cols:
        labels[cpu_cols[0]] = "CPU ms:"
    for r in [labels, head, *rows]:
        cells = zip(r, widths, strict=True)
        line = "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(cells))
        lines.append(("     " + line).rstrip())
    return lines


def _cost_order(key: str) -> int:
    """Columns in reading order: time, database work, then CPU by process."""
    order = [
        "wall ms",
        "write transactions",
        "WAL kB",
        "CPU ms bench process",
        "CPU ms engine_svc",
        "CPU ms checkpoint_svc",
        "CPU ms postgres",
    ]
    return order.index(key) if key in order else len(order)


def _cost_cell(v: float, key: str, steps: int) -> str:
    """A total with its per-step share (wall time alone has no share: it is the run's)."""
    if math.isnan(v):
        return "n/a"
    return f"{v:.0f} ({v / steps:.1f})" if key != "wall ms" else f"{v:.0f}"


def render(results: Results, args: argparse.Namespace) -> str:
    """Per-system medians and minima, then each workload's ratio against its target."""
    out: list[str] = []
    for workload, by_name in results.series.items():
        out.append(f"{TITLES[workload]} ({args.reps} runs each after {args.warmup} warm-up):")
        for name, s in by_name.items():
            runs = ", ".join(f"{w:.0f}" for w in s.walls_ms)
            out.append(
                f"   {name:12s} median {s.median_ms:8.1f} ms  min {s.min_ms:8.1f} ms  "
                f"(runs: {runs})"
            )
        ours = by_name.get("ours")
        label, candidates = THEIRS[workload]
        theirs = [by_name[c] for c in candidates if c in by_name]
        if ours is not None:
            ph = ours.runs[0].phases
            if ph:
                parts = ", ".join(f"{k} {ours.phase_median_ms(k):.2f}" for k in ph)
                out.append(f"   ours, where the time goes (median ms): {parts}")
                fl = results.env.get("floors")
                if fl and fl.get("commit_ms"):
                    floor = fl["grpc_stream_ms"] + fl["commit_ms"]
                    out.append(
                        f"   per step {ours.phase_median_ms('per_step'):.2f} ms = "
                        f"{ours.phase_median_ms('per_step') / floor:.1f}x the floor of one "
                        f"stream round trip and one commit ({floor:.2f} ms)"
                    )
                    if relayed := fl.get("relayed_step_after_work_ms"):
                        out.append(
                            f"   = {ours.phase_median_ms('per_step') / relayed:.1f}x a bare "
                            f"relayed step after {floors.WORK_MS:.0f} ms of work ({relayed:.2f} ms)"
                        )
        if ours is None or not theirs:
            out.extend(_render_costs(results.costs.get(workload, {}), STEPS[workload]))
            out.append("   ratio: n/a (a side is missing; see errors)")
            out.append("")
            continue
        out.extend(_render_costs(results.costs.get(workload, {}), STEPS[workload]))
        if UNARY in by_name:
            plain = by_name[UNARY]
            per_step = plain.phase_median_ms("per_step") if plain.runs[0].phases else math.nan
            out.append(
                f"   ratio ours (Session stream) / {UNARY}: median "
                f"{ours.median_ms / plain.median_ms:.2f}x, min {ours.min_ms / plain.min_ms:.2f}x"
                f" ({UNARY} per step {per_step:.2f} ms)"
            )
        if "lg-our-saver" in by_name and "langgraph" in by_name:
            mine, pg = by_name["lg-our-saver"], by_name["langgraph"]
            out.append(
                f"   ratio StateGraph on our saver / on AsyncPostgresSaver: median "
                f"{mine.median_ms / pg.median_ms:.2f}x, min {mine.min_ms / pg.min_ms:.2f}x"
            )
        best = min(theirs, key=lambda s: s.median_ms)
        r_med = ours.median_ms / best.median_ms
        r_min = ours.min_ms / min(s.min_ms for s in theirs)
        verdict = "met" if r_med <= TARGET else "MISSED"
        out.append(
            f"   ratio ours/{label} [{best.name}]: median {r_med:.2f}x, min {r_min:.2f}x; "
            f"target <= {TARGET}x: {verdict}"
        )
        out.append("")
    out.extend(_render_rates(results, args))
    if len(results.series.get("chain", {})) > 2:
        out.append("DBOS is compared by its faster variant (by median): async or sync workflow.")
    if results.env.get("floors"):
        out.append(floors.Floors(**results.env["floors"]).line())
    out.append("ratio < 1: ours faster. Ours crosses two gRPC services (engine -> checkpoint")
    out.append("store -> PostgreSQL); LangGraph and DBOS run in the bench process.")
    if results.errors:
        out.append("")
        out.append("Errors:")
        out.extend(f"  - {k}: {v}" for k, v in results.errors.items())
    return "\n".join(out)


def _render_rates(results: Results, args: argparse.Namespace) -> list[str]:
    """The `runs` workload: runs per second by system, and ours against DBOS's better."""
    if not results.rates:
        return []
    out = [
        f"Runs per second, {RUN_CLIENTS} clients each starting a {THREE}-node run and "
        f"watching it to its end ({args.reps} windows of {args.runs_seconds:g} s each):"
    ]
    for name, rates in results.rates.items():
        listed = ", ".join(f"{r:.0f}" for r in rates)
        out.append(
            f"   {name:12s} median {statistics.median(rates):8.1f} runs/s  "
            f"max {max(rates):8.1f}  (windows: {listed})"
        )
    theirs = {n: r for n, r in results.rates.items() if n.startswith("dbos")}
    if "ours" in results.rates and theirs:
        best = max(theirs, key=lambda n: statistics.median(theirs[n]))
        ratio = statistics.median(results.rates["ours"]) / statistics.median(theirs[best])
        verdict = "met" if ratio >= RUNS_TARGET else "MISSED"
        out.append(
            f"   ratio ours/DBOS [{best}] runs/s: median {ratio:.2f}x; "
            f"target >= {RUNS_TARGET}x: {verdict}"
        )
    else:
        out.append("   ratio: n/a (a side is missing; see errors)")
    out.append("")
    return out


def to_json(results: Results, args: argparse.Namespace) -> dict[str, Any]:
    """Raw figures for later comparison."""
    return {
        "env": results.env,
        "params": {k: v for k, v in vars(args).items() if k not in ("json", "logs")},
        "costs": results.costs,
        "rates": results.rates,
        "series": {
            w: {n: {"runs": [asdict(r) for r in s.runs]} for n, s in by.items()}
            for w, by in results.series.items()
        },
        "errors": results.errors,
    }


# ---------------------------------------------------------------------------------------
# Orchestration
# ---------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """CLI."""
    p = argparse.ArgumentParser(
        prog="python -m bench engine",
        description="engine_svc vs LangGraph (25x4 DAG) and DBOS (100-step chain, runs per "
        "second of 3-node runs) on one PostgreSQL.",
    )
    p.add_argument("--only", choices=["all", "dag", "chain", "runs"], default="all")
    p.add_argument("--reps", type=int, default=5, help="timed runs per system and workload")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first, per system")
    p.add_argument(
        "--run-timeout", type=float, default=120.0, help="seconds before one run counts as failed"
    )
    p.add_argument(
        "--pg-url",
        help="use this PostgreSQL (libpq URL, may CREATE DATABASE) instead of starting one",
    )
    p.add_argument(
        "--no-accounting",
        dest="accounting",
        action="store_false",
        help="skip the extra run per system that counts write transactions, WAL and CPU",
    )
    p.add_argument("--logs", type=Path, help="keep the services' logs in this directory")
    p.add_argument(
        "--store-calls",
        choices=["session", "unary"],
        default="session",
        help="engine_svc --store-calls: its saves on one Session stream, or unary",
    )
    p.add_argument(
        "--compare-unary",
        action="store_true",
        help=f"also time a second engine_svc with --store-calls unary ({UNARY}), interleaved",
    )
    p.add_argument(
        "--runs-seconds",
        type=float,
        default=4.0,
        help="the `runs` workload: seconds per measuring window (one per system and rep)",
    )
    p.add_argument("--json", type=Path, help="write raw figures here")
    return p.parse_args(argv)


def _keep_logs(src: Path, dest: Path) -> None:
    """Copy the services' logs out of the temp dir (none if they never started)."""
    with contextlib.suppress(OSError):
        shutil.copytree(src, dest, dirs_exist_ok=True)


def _sigterm(_signum: int, _frame: object) -> None:
    """Turn SIGTERM into an exception so the ExitStack stops every server we started."""
    raise SystemExit(143)


def main(argv: Sequence[str] | None = None) -> int:
    """Start PostgreSQL, checkpoint_svc and engine_svc; measure; print; stop them."""
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm)
    results = Results()
    workdir = Path(tempfile.mkdtemp(prefix="engine-bench-"))
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, workdir, True)
        if args.logs:  # copied once the services stopped, before the workdir goes (LIFO)
            stack.callback(_keep_logs, workdir / "logs", args.logs)
        created_dbs: list[str] = []
        pg: servers.Postgres | None = None
        if args.pg_url:
            admin_url = args.pg_url

            def drop_ours() -> None:
                for d in created_dbs:
                    servers.drop_database(admin_url, d)

            stack.callback(drop_ours)
        else:
            pg = servers.Postgres()
            stack.callback(pg.stop)
            print("starting PostgreSQL ...", flush=True)
            pg.start()
            admin_url = pg.url

        def new_db(name: str) -> str:
            created_dbs.append(name)
            return servers.create_database(admin_url, name)

        results.env = {
            "postgres": servers.pg_settings(admin_url),
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "grpc": grpc.__version__,
            "versions": _versions(),
            "code": _code_version(),
            "loadavg_before": os.getloadavg(),
        }
        store = servers.CheckpointService("engine", new_db(STORE_DB), None, None, workdir / "logs")
        stack.callback(store.stop)
        print("starting checkpoint_svc ...", flush=True)
        store.start()
        engine = servers.EngineService(
            store.target, workdir / "logs", ("--store-calls", args.store_calls)
        )
        stack.callback(engine.stop)
        print("starting engine_svc ...", flush=True)
        engine.start()
        unary_engine: servers.EngineService | None = None
        if args.compare_unary:
            unary_engine = servers.EngineService(
                store.target, workdir / "logs-unary", ("--store-calls", "unary")
            )
            stack.callback(unary_engine.stop)
            print("starting engine_svc --store-calls unary ...", flush=True)
            unary_engine.start()
        lg_url = new_db(LANGGRAPH_DB) if args.only in ("all", "dag") else ""
        dbos_url = new_db(DBOS_DB) if args.only in ("all", "chain", "runs") else ""
        acct: Accountant | None = None
        if args.accounting:
            postmaster = None
            if pg is not None:
                postmaster = int(pg.postmaster_pid_file.read_text().split()[0])
            assert store.pid is not None and engine.pid is not None
            acct = Accountant(
                admin_url,
                {"engine_svc": engine.pid, "checkpoint_svc": store.pid},
                postmaster,
            )

        pgs = results.env["postgres"]
        vers = " ".join(f"{k} {v}" for k, v in results.env["versions"].items())
        print(
            f"PostgreSQL {pgs['server_version']}: fsync={pgs['fsync']} "
            f"synchronous_commit={pgs['synchronous_commit']} "
            f"wal_sync_method={pgs['wal_sync_method']} full_page_writes={pgs['full_page_writes']} "
            f"shared_buffers={pgs['shared_buffers']}; {os.cpu_count()} CPUs; {vers}",
            flush=True,
        )
        print(
            f"services' code: {results.env['code']}; engine_svc --store-calls {args.store_calls}",
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

        async def measure() -> None:
            second = unary_engine.target if unary_engine else None
            if lg_url:
                await measure_dag(args, engine.target, store.target, lg_url, acct, results, second)
            if not dbos_url:
                return
            dbos: Dbos | None = None
            try:
                dbos = dbos_setup(dbos_url)
            except Exception as exc:
                results.errors["dbos"] = f"launch: {_describe(exc)}"
                print(f"  !! DBOS launch failed: {_describe(exc)}", flush=True)
            try:
                if args.only in ("all", "chain"):
                    await measure_chain(args, engine.target, dbos, acct, results, second)
                if args.only in ("all", "runs"):
                    await measure_runs(args, engine.target, dbos, results)
            finally:
                if dbos is not None:
                    dbos.shutdown()

        asyncio.run(measure())
        results.env["loadavg_after"] = os.getloadavg()

    print()
    print(render(results, args))
    la, lb = results.env["loadavg_before"], results.env["loadavg_after"]
    print(
        f"load average (1/5/15 min) before {la[0]:.2f}/{la[1]:.2f}/{la[2]:.2f}, "
        f"after {lb[0]:.2f}/{lb[1]:.2f}/{lb[2]:.2f}"
    )
    if args.json:
        args.json.write_text(json.dumps(to_json(results, args), indent=2))
        print(f"\nraw figures written to {args.json}")
    return 0


def _code_version() -> str:
    """The commit the services ran from, and whether their code had uncommitted changes."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=servers.REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "engine_svc", "checkpoint_svc"],
            cwd=servers.REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" + uncommitted changes to the services" if dirty else "")


def _versions() -> dict[str, str]:
    """Versions of the systems compared, printed with the figures."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str] = {}
    for dist in ("langgraph", "langgraph-checkpoint-postgres", "dbos"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "missing"
    return out
