"""Correctness at the edges (issue 10): concurrency, crashes between commit and cache, limits.

Each test reproduces a defect that once let the store answer differently from SQL, lose what
it acknowledged, or stall everyone for one request.
"""

from __future__ import annotations

import asyncio
import random
import sys

import grpc
import pytest
import redis.asyncio as aioredis
import uuid6

from checkpoint_svc.domain import Checkpoint, PendingWrite, SaveCommand, ThreadKey
from checkpoint_svc.store import CheckpointStore
from tests.requests import NS, code_of, restore, save
from tests.servers import REPO_ROOT, checkpoint_stub
from workflow_stubs.checkpoint.v1 import checkpoint_pb2 as pb


def _uuid7() -> str:
    return str(uuid6.uuid7())


def _write(cid: str, task: str, idx: int = 0, value: bytes = b"1") -> PendingWrite:
    return PendingWrite(checkpoint_id=cid, task_id=task, idx=idx, channel="ch", value=value)


async def _save(store: CheckpointStore, key: ThreadKey, cid: str = "", **cmd) -> str:
    cp = Checkpoint(key=key, checkpoint_id=cid, state=b'{"s": 1}')
    return (await store.save(SaveCommand(checkpoint=cp, **cmd))).checkpoint.checkpoint_id


async def _writes_of(store: CheckpointStore, key: ThreadKey, cid: str = "") -> list:
    got = await store.restore(key, cid, include_writes=True)
    return sorted((w.task_id, w.idx, w.value) for w in got.writes)


async def test_writes_that_arrive_before_their_checkpoint_are_kept(store, tenant) -> None:
    """LangGraph's durability="async" sends put_writes for checkpoint N while N is being
    saved; when the writes commit first, every tier must still return them."""
    key = ThreadKey(tenant, "lg:", "early")
    first = await _save(store, key, _uuid7())
    nxt = _uuid7()
    await store.put_writes(key, [_write(nxt, "a"), _write(nxt, "b", 1)], token=0)
    await _save(store, key, nxt, expected_parent_id=first)
    await store.put_writes(key, [_write(nxt, "c")], token=0)
    wanted = [("a", 0, b"1"), ("b", 1, b"1"), ("c", 0, b"1")]
    assert await _writes_of(store, key) == wanted, "by head"
    assert await _writes_of(store, key, nxt) == wanted, "by id"
    # Concurrently, in every order the group committer may choose.
    for _ in range(20):
        cid = _uuid7()
        await asyncio.gather(
            store.put_writes(key, [_write(cid, "x")], token=0),
            _save(store, key, cid),
            store.put_writes(key, [_write(cid, "y")], token=0),
        )
        assert await _writes_of(store, key) == [("x", 0, b"1"), ("y", 0, b"1")]
        assert await _writes_of(store, key, cid) == [("x", 0, b"1"), ("y", 0, b"1")]


async def test_writes_to_a_thread_with_no_checkpoint_yet_are_accepted(store, tenant) -> None:
    """A new subgraph's first writes may race ahead of its first checkpoint."""
    key = ThreadKey(tenant, "lg:child", "fresh")
    cid = _uuid7()
    assert (await store.put_writes(key, [_write(cid, "t")], token=0))[:2] == (1, [])
    assert (await store.get_thread(key)).head_id == ""
    await _save(store, key, cid)
    assert await _writes_of(store, key) == [("t", 0, b"1")]
    # The same fencing rules as any write: a leased thread needs the token.
    leased = ThreadKey(tenant, "lg:child", "leased")
    thread = await store.acquire_lease(leased, "engine-a", 30)
    from checkpoint_svc.errors import LeaseLost

    with pytest.raises(LeaseLost):
        await store.put_writes(leased, [_write(cid, "t")], token=0)
    await store.put_writes(leased, [_write(cid, "t")], token=thread.fencing_token)


async def test_namespaces_as_long_as_langgraph_makes_them(stub) -> None:
    """Nested subgraphs under the `lg:` prefix pass 128 characters at two or three levels; deeper
    nesting is longer. Up to 1024 bytes are accepted, beyond is INVALID_ARGUMENT."""
    s, md = stub
    task = "b0e7c2d4-8a4f-6f31-9d8e-1c5a7e3f9b20"
    for levels in (3, 10):
        ns = "lg:" + "|".join(f"node_{i}:{task}" for i in range(levels))
        assert len(ns) > 128
        saved = await save(s, md, "deep", {"levels": levels}, ns=ns)
        got = await restore(s, md, "deep", ns=ns)
        assert got.checkpoint.checkpoint_id == saved.checkpoint.checkpoint_id
        listed = await s.List(pb.ListRequest(namespace=ns, thread_id="deep"), metadata=md)
        assert [c.checkpoint_id for c in listed.checkpoints] == [saved.checkpoint.checkpoint_id]
    wide = "lg:" + "é" * 510  # 1023 bytes in UTF-8
    await save(s, md, "wide", ns=wide)
    assert (await restore(s, md, "wide", ns=wide)).checkpoint.namespace == wide
    assert await code_of(save(s, md, "wide", ns="lg:" + "é" * 511)) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )


@pytest.mark.parametrize("backend", ["postgres+redis"], indirect=True)
async def test_a_crash_between_commit_and_redis_never_leaves_a_stale_head(
    service_process, backend, tenant
) -> None:
    """SIGKILL after a batch's COMMIT but before its Redis update: the restarted service must
    answer SQL's head (a client that restores and saves on it makes progress)."""
    service = service_process
    channel, s, md = await checkpoint_stub(service.address, tenant)
    redis = aioredis.Redis.from_url(backend.redis_url)
    try:
        await save(s, md, "h", {"n": 0})
        old = (await save(s, md, "h", {"n": 1})).checkpoint.checkpoint_id
        assert (await restore(s, md, "h")).checkpoint.checkpoint_id == old  # warm
        await redis.execute_command("CLIENT", "PAUSE", "5000", "WRITE")
        pending = asyncio.ensure_future(save(s, md, "h", {"n": 2}))
        get = pb.GetThreadRequest(namespace=NS, thread_id="h")
        for _ in range(200):  # the commit lands; its Redis update is held up
            head = (await s.GetThread(get, metadata=md)).thread.head_checkpoint_id
            if head != old:
                break
            await asyncio.sleep(0.01)
        await service.akill()
        pending.cancel()
        await redis.execute_command("CLIENT", "UNPAUSE")
        assert head != old, "the save never committed"
        await channel.close()
        await service.astart()
        channel, s, md = await checkpoint_stub(service.address, tenant)
        got = await restore(s, md, "h")
        assert got.checkpoint.checkpoint_id == head, "a head older than SQL's"
        chained = await save(s, md, "h", {"n": 3}, expected_parent_id=head)
        assert chained.checkpoint.parent_id == head
    finally:
        await redis.aclose()
        await channel.close()


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["postgres+redis"], indirect=True)
async def test_kill_9_under_load_then_every_thread_restores_sqls_head_and_chains(
    service_process, backend, tenant
) -> None:
    """Concurrent savers on many threads, the service SIGKILLed at random moments: after each
    restart every thread's Restore equals SQL's head, holds every acknowledged save, and a
    Save chained on it (expected_parent_id) succeeds."""
    service = service_process
    threads = [f"k{i}" for i in range(12)]
    acked: dict[str, list[str]] = {t: [] for t in threads}
    rng = random.Random(10)
    for _round in range(3):
        channel, s, md = await checkpoint_stub(service.address, tenant)
        stop = asyncio.Event()

        async def keep_saving(thread: str, s=s, md=md, stop=stop) -> None:
            n = 0
            while not stop.is_set():
                try:
                    r = await save(s, md, thread, {"n": n})
                except grpc.aio.AioRpcError:
                    return
                acked[thread].append(r.checkpoint.checkpoint_id)
                n += 1

        load = [asyncio.create_task(keep_saving(t)) for t in threads]
        await asyncio.sleep(0.3 + rng.random() * 0.5)
        await service.akill()
        stop.set()
        await asyncio.gather(*load, return_exceptions=True)
        await channel.close()
        await service.astart()
        channel, s, md = await checkpoint_stub(service.address, tenant)
        for thread in threads:
            sql_head = (
                await s.GetThread(pb.GetThreadRequest(namespace=NS, thread_id=thread), metadata=md)
            ).thread.head_checkpoint_id
            got = await restore(s, md, thread)
            assert got.checkpoint.checkpoint_id == sql_head, f"{thread}: stale head"
            assert not acked[thread] or sql_head >= acked[thread][-1], "an acked save was lost"
            chained = await save(s, md, thread, {"chained": True}, expected_parent_id=sql_head)
            acked[thread].append(chained.checkpoint.checkpoint_id)
        await channel.close()
    assert all(len(ids) > 3 for ids in acked.values())


async def _exits_refusing(*args: str) -> None:
    """Run a service process that must stop at once, saying the port is in use."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, *args, cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
    except TimeoutError:  # it took the port: stop it, and fail
        proc.kill()
        await proc.wait()
        raise AssertionError(f"{args[1]} started on a port in use") from None
    assert proc.returncode not in (0, None), out.decode()
    assert b"cannot listen on" in out, out.decode()


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_a_second_server_on_a_port_in_use_refuses_to_start(
    service, engine_factory, tmp_path, tenant
) -> None:
    """gRPC's SO_REUSEPORT would let a second checkpoint_svc (on an empty store) silently take
    most new connections; both services must refuse a port in use instead."""
    channel, s, md = await checkpoint_stub(service.address, tenant)
    await save(s, md, "mine", {"v": 1})
    await channel.close()
    other_db = f"sqlite+aiosqlite:///{tmp_path}/other.db"
    await _exits_refusing("-m", "checkpoint_svc", "--listen", service.address, "--db", other_db)
    engine = engine_factory(service)
    await _exits_refusing(
        "-m", "engine_svc", "--listen", engine.address, "--checkpoint", service.address
    )
    # Every new connection still reaches the first service and its data.
    for _ in range(12):
        channel, s, md = await checkpoint_stub(service.address, tenant)
        assert (await restore(s, md, "mine")).checkpoint.thread_id == "mine"
        await channel.close()


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_two_tenant_headers_are_invalid_argument_on_every_path(
    service, engine_factory, tenant
) -> None:
    """Exactly one tenant per call: with headers (A, B), B must never read A's data."""
    from tests.engine_client import engine_stub
    from workflow_stubs.engine.v1 import engine_pb2 as epb

    channel, s, md = await checkpoint_stub(service.address, tenant)
    await save(s, md, "secret", {"of": tenant})
    both = (("x-tenant-id", tenant), ("x-tenant-id", "intruder"))
    reverse = (("x-tenant-id", "intruder"), ("x-tenant-id", tenant))
    for headers in (both, reverse):
        assert await code_of(restore(s, headers, "secret")) == grpc.StatusCode.INVALID_ARGUMENT
        stream = s.Stream(pb.StreamRequest(namespace=NS, thread_id="secret"), metadata=headers)
        assert await code_of(stream.read()) == grpc.StatusCode.INVALID_ARGUMENT
        listing = s.ListThreads(pb.ListThreadsRequest(), metadata=headers)
        assert await code_of(listing) == grpc.StatusCode.INVALID_ARGUMENT
    engine = engine_factory(service)
    echannel, e, _ = await engine_stub(engine, tenant)
    for headers in (both, reverse):
        runs = e.ListRuns(epb.ListRunsRequest(), metadata=headers)
        assert await code_of(runs) == grpc.StatusCode.INVALID_ARGUMENT
        watch = e.WatchRun(epb.WatchRunRequest(run_id="secret"), metadata=headers)
        assert await code_of(watch.read()) == grpc.StatusCode.INVALID_ARGUMENT
    await echannel.close()
    await channel.close()


async def test_huge_repeated_fields_are_refused_at_once(stub) -> None:
    """100,000 `statuses` once took 7-8 s, blocked health checks and answered UNAVAILABLE with
    the SQL statement and every parameter: every repeated field is bounded, and checked
    before any element is looked at."""
    s, md = stub
    await save(s, md, "busy")
    many = [pb.THREAD_STATUS_RUNNING] * 100_000
    ids = [f"r{i}" for i in range(100_000)]
    head = (await restore(s, md, "busy")).checkpoint.checkpoint_id
    calls = {
        "statuses": s.ListThreads(pb.ListThreadsRequest(statuses=many), metadata=md),
        "thread_ids": s.PruneThreads(
            pb.PruneThreadsRequest(thread_ids=ids, strategy=pb.PRUNE_STRATEGY_DELETE), metadata=md
        ),
        "run_ids": s.DeleteForRuns(pb.DeleteForRunsRequest(run_ids=ids), metadata=md),
        "metadata_equals": s.List(
            pb.ListRequest(
                namespace=NS, thread_id="busy", metadata_equals={i: "1" for i in ids[:1000]}
            ),
            metadata=md,
        ),
        "checkpoint.completed_nodes": save(s, md, "busy", cp={"completed_nodes": ids}),
    }
    for field, call in calls.items():
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await asyncio.wait_for(call, 10)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        assert field in refused.value.details() and len(refused.value.details()) < 200
    # One request commits a bounded amount of work: RESOURCE_EXHAUSTED beyond it.
    events = [pb.NewEvent(type="e")] * 1001
    writes = [
        pb.PendingWrite(checkpoint_id=head, task_id="t", idx=i, channel="c") for i in range(1001)
    ]
    for call in (
        save(s, md, "busy", events=events),
        s.Publish(pb.PublishRequest(namespace=NS, thread_id="busy", events=events), metadata=md),
        s.PutWrites(
            pb.PutWritesRequest(namespace=NS, thread_id="busy", writes=writes), metadata=md
        ),
    ):
        assert await code_of(call) == grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_a_run_id_another_call_used_first_can_still_be_started(
    service, engine_factory, tenant
) -> None:
    """An AcquireLease or a Publish on runs/<id> creates the thread row; StartRun of that id
    once answered NOT_FOUND "has no checkpoint", for ever."""
    from tests.engine_client import definition, engine_stub, wait_status
    from workflow_stubs.engine.v1 import engine_pb2 as epb

    channel, s, md = await checkpoint_stub(service.address, tenant)
    await s.Publish(
        pb.PublishRequest(namespace="runs", thread_id="published", events=[pb.NewEvent(type="x")]),
        metadata=md,
    )
    lease = await s.AcquireLease(
        pb.AcquireLeaseRequest(namespace="runs", thread_id="leased", owner="o", ttl_seconds=30),
        metadata=md,
    )
    await s.ReleaseLease(
        pb.ReleaseLeaseRequest(
            namespace="runs", thread_id="leased", owner="o", fencing_token=lease.fencing_token
        ),
        metadata=md,
    )
    engine = engine_factory(service)
    echannel, e, emd = await engine_stub(engine, tenant)
    await e.RegisterWorkflow(
        epb.RegisterWorkflowRequest(definition=definition([{"id": "a", "type": "noop"}])),
        metadata=emd,
    )
    for run_id in ("published", "leased"):
        await e.StartRun(epb.StartRunRequest(workflow_id="wf", run_id=run_id), metadata=emd)
        run = await wait_status(e, emd, run_id, epb.RUN_STATUS_COMPLETED)
        assert list(run.completed_node_ids) == ["a"]
    await echannel.close()
    await channel.close()


def _nested(levels: int) -> dict:
    value: dict = {"leaf": 1}
    for _ in range(levels - 1):
        value = {"n": value}
    return value


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_engine_input_it_could_not_read_back_is_invalid_argument(
    service, engine_factory, tenant
) -> None:
    """Deep Structs, NaN and Infinity, Durations out of range and a templated http host once
    answered UNKNOWN, and a run created from such input could never be read again."""
    import math

    from google.protobuf import duration_pb2, struct_pb2
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    from tests.engine_client import definition, engine_stub, wait_status
    from workflow_stubs.engine.v1 import engine_pb2 as epb

    engine = engine_factory(service)
    channel, e, md = await engine_stub(engine, tenant)
    nodes = [{"id": "a", "type": "transform", "config": {"expression": "input"}}]
    await e.RegisterWorkflow(epb.RegisterWorkflowRequest(definition=definition(nodes)), metadata=md)

    def struct(value: dict) -> struct_pb2.Struct:
        s = struct_pb2.Struct()
        s.update(value)
        return s

    async def refused(call, field: str) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await call
        assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT, failed.value.details()
        status = rpc_status.from_call(failed.value)
        bad = error_details_pb2.BadRequest()
        assert status is not None and status.details[0].Unpack(bad)
        fields = [v.field for v in bad.field_violations]
        assert any(f.startswith(field) for f in fields), fields

    for i, value in enumerate([_nested(33), {"x": math.nan}, {"y": [1, math.inf]}]):
        start = epb.StartRunRequest(workflow_id="wf", run_id=f"bad-{i}", input=struct(value))
        await refused(e.StartRun(start, metadata=md), "input")
        assert (
            await code_of(e.GetRun(epb.GetRunRequest(run_id=f"bad-{i}"), metadata=md))
            == grpc.StatusCode.NOT_FOUND
        ), "nothing may be written"
    await refused(
        e.ResumeRun(
            epb.ResumeRunRequest(run_id="x", value=struct_pb2.Value(number_value=math.nan)),
            metadata=md,
        ),
        "value",
    )
    await refused(
        e.ForkRun(
            epb.ForkRunRequest(run_id="x", checkpoint_id="c", state_patch=struct({"p": math.inf})),
            metadata=md,
        ),
        "state_patch",
    )
    # Definitions: a NaN in a config, Durations protobuf cannot represent, a bad URL template.
    bad_config = definition([{"id": "a", "type": "sleep", "config": {"seconds": 1}}], "nan")
    bad_config.nodes[0].config.update({"seconds": math.nan})
    await refused(
        e.RegisterWorkflow(epb.RegisterWorkflowRequest(definition=bad_config), metadata=md),
        "nodes[0].config",
    )
    for where, duration in [
        ("timeout", duration_pb2.Duration(seconds=10**12)),
        ("timeout", duration_pb2.Duration(seconds=1, nanos=1_500_000_000)),
        ("interval", duration_pb2.Duration(seconds=-(10**12))),
        ("ttl", duration_pb2.Duration(seconds=400 * 366 * 24 * 3600)),
    ]:
        d = definition([{"id": "a", "type": "noop"}], "dur")
        if where == "timeout":
            d.nodes[0].timeout.CopyFrom(duration)
            field = "nodes[0].timeout"
        else:
            getattr(d.checkpoint, where).CopyFrom(duration)
            field = f"checkpoint.{where}"
        await refused(
            e.RegisterWorkflow(epb.RegisterWorkflowRequest(definition=d), metadata=md), field
        )
    templated = definition(
        [{"id": "h", "type": "http", "config": {"url": "http://${input['host']}:1/x"}}], "web"
    )
    await e.RegisterWorkflow(epb.RegisterWorkflowRequest(definition=templated), metadata=md)
    unclosed = definition([{"id": "h", "type": "http", "config": {"url": "http://${a/x"}}], "w2")
    await refused(
        e.RegisterWorkflow(epb.RegisterWorkflowRequest(definition=unclosed), metadata=md),
        "nodes[0].config.url",
    )
    # The deepest input allowed still reads back; an output that could not fails its node.
    deep = await e.StartRun(
        epb.StartRunRequest(workflow_id="wf", input=struct(_nested(22))), metadata=md
    )
    done = await wait_status(e, md, deep.run.run_id, epb.RUN_STATUS_COMPLETED)
    assert done.state["a"] == done.state["input"]
    history = await e.GetRunHistory(
        epb.GetRunHistoryRequest(run_id=deep.run.run_id, include_state=True), metadata=md
    )
    assert history.checkpoints
    explode = definition(
        [{"id": "x", "type": "transform", "config": {"expression": "1e308*10"}}], "inf"
    )
    await e.RegisterWorkflow(epb.RegisterWorkflowRequest(definition=explode), metadata=md)
    run = await e.StartRun(epb.StartRunRequest(workflow_id="inf"), metadata=md)
    failed = await wait_status(e, md, run.run.run_id, epb.RUN_STATUS_FAILED)
    assert "finite" in failed.error
    web = await e.StartRun(
        epb.StartRunRequest(workflow_id="web", input=struct({"host": "127.0.0.1"})), metadata=md
    )
    assert (await wait_status(e, md, web.run.run_id, epb.RUN_STATUS_FAILED)).error
    await channel.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgres"], indirect=True)
async def test_fan_out_costs_little_per_watcher_and_a_slow_one_only_itself(store, tenant) -> None:
    """200 watchers of one thread once cut publishing twentyfold, whether they read or not:
    an event is now shared (one object, encoded once, for every watcher), idle watchers poll
    SQL once per thread rather than once each, and a watcher that stops reading falls behind
    the shared window and reads what it missed from SQL, in order, costing no one else."""
    from checkpoint_svc.domain import NewEvent

    key = ThreadKey(tenant, NS, "watched")
    await _save(store, key)
    reads = 0
    events_after = store.sql.events_after

    async def counted(*args, **kwargs):
        nonlocal reads
        reads += 1
        return await events_after(*args, **kwargs)

    store.sql.events_after = counted  # type: ignore[method-assign]
    watchers = 200
    seen: list[list] = [[] for _ in range(watchers)]
    total = 1 + 60

    replayed = asyncio.Event()

    async def watch(i: int) -> None:
        async for item in store.stream(tenant, key, 0, follow=True):
            if hasattr(item, "seq"):
                seen[i].append(item)
                if all(seen):
                    replayed.set()
                if len(seen[i]) == total:
                    return

    tasks = [asyncio.create_task(watch(i)) for i in range(watchers)]
    await asyncio.wait_for(replayed.wait(), 30)
    replay_reads, reads = reads, 0
    assert replay_reads <= 2 * watchers
    await asyncio.sleep(1.2)  # two idle heartbeats: SQL polled per thread, not per watcher
    for n in range(60):
        await store.publish(key, [NewEvent("tick", {"n": n})], request_id="", token=0)
    await asyncio.wait_for(asyncio.gather(*tasks), 30)
    assert reads <= 10, f"{reads} SQL reads for {watchers} idle watchers"
    for s in seen:
        assert [e.seq for e in s] == list(range(1, total + 1))
    for j in range(1, total):  # the same object for everyone: encoded once
        assert all(s[j] is seen[0][j] for s in seen)

    # A watcher that stops reading costs only itself: the others get every event while it
    # sleeps, and it then reads what fell out of the window from SQL, with no gap.
    from checkpoint_svc import feed

    slow_seen: list[int] = []
    fast_seen: list[int] = []
    burst = feed.WINDOW + 300

    async def slow() -> None:
        async for item in store.stream(tenant, key, total, follow=True):
            if hasattr(item, "seq"):
                slow_seen.append(item.seq)
                if len(slow_seen) == 1:
                    await asyncio.sleep(1.0)  # not reading while the burst goes by
                if len(slow_seen) == burst:
                    return

    async def fast() -> None:
        async for item in store.stream(tenant, key, total, follow=True):
            if hasattr(item, "seq"):
                fast_seen.append(item.seq)
                if len(fast_seen) == burst:
                    return

    readers = [asyncio.create_task(slow()), asyncio.create_task(fast())]
    await asyncio.sleep(0.2)
    for start in range(0, burst, 500):
        batch = [NewEvent("burst", {"i": i}) for i in range(start, min(burst, start + 500))]
        await store.publish(key, batch, request_id="", token=0)
    await asyncio.wait_for(asyncio.gather(*readers), 60)
    wanted = list(range(total + 1, total + burst + 1))
    assert fast_seen == wanted and slow_seen == wanted


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
async def test_a_big_request_does_not_hold_small_ones_back(store, tenant) -> None:
    """A Save of 100,000 events once took 12.5 s with every other Save waiting behind it.
    Per-request work is bounded now, and big requests commit in a lane of their own: small
    Saves keep completing while big ones are in flight."""
    import os

    big_key, small_key = ThreadKey(tenant, NS, "big"), ThreadKey(tenant, NS, "small")
    await _save(store, small_key)
    state = os.urandom(12 * 1024 * 1024)  # incompressible: PostgreSQL works for it
    small_done = 0
    heavy_running = True

    async def heavy() -> None:
        nonlocal heavy_running
        for _ in range(3):
            cp = Checkpoint(key=big_key, checkpoint_id="", state=state)
            await store.save(SaveCommand(checkpoint=cp))
        heavy_running = False

    task = asyncio.create_task(heavy())
    await asyncio.sleep(0.05)
    while heavy_running:
        await _save(store, small_key)
        small_done += 1
    await task
    assert small_done >= 3 * 3, f"only {small_done} small saves beside 3 big ones"


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
async def test_write_behind_saves_survive_a_database_outage(store, postgres_server, tenant) -> None:
    """An ASYNC save acknowledged just before PostgreSQL stopped was lost: the write-behind
    queue now retries until the database is back."""
    from checkpoint_svc.errors import TierUnavailable

    key = ThreadKey(tenant, NS, "behind")
    await _save(store, key)
    acked: list[str] = []
    await postgres_server.astop()
    try:
        for i in range(20):
            cp = Checkpoint(key=key, checkpoint_id="", state=b'{"i": %d}' % i)
            try:
                saved = await store.save(SaveCommand(checkpoint=cp), durable=False)
            except TierUnavailable:
                break  # refused once the store knows SQL is down: never a false ack
            acked.append(saved.checkpoint.checkpoint_id)
        assert acked, "the store had not noticed the outage yet: the first one is queued"
        await asyncio.sleep(5)
    finally:
        await postgres_server.astart()
    for _ in range(100):
        try:
            listed, _ = await store.list(key, 100)
        except TierUnavailable:
            listed = []
        if {c.checkpoint_id for c in listed} >= set(acked):
            break
        await asyncio.sleep(0.2)
    assert {c.checkpoint_id for c in listed} >= set(acked), "an acknowledged save was lost"


async def test_the_session_postgres_is_durable(postgres_server) -> None:
    """Durability tests (kill -9, database stop) prove nothing on a PostgreSQL that may lose
    acknowledged commits: the suite's runs with fsync and synchronous_commit on."""
    settings = postgres_server.psql(
        "SELECT current_setting('fsync') || ' ' || current_setting('synchronous_commit')"
    )
    assert settings.split() == ["on", "on"], settings


def test_the_memory_tier_counts_all_it_holds() -> None:
    """RSS once grew from 77 to 474 MiB under fuzzed calls: the memory tier counted a body as
    its state plus 200 bytes, so bodies with big metadata (or many completed nodes) and the
    pending writes it caches went uncounted. What it holds now stays within its budget."""
    import tracemalloc

    from checkpoint_svc.tiers.memory import MemoryTier

    budget = 4 * 1024 * 1024
    tier = MemoryTier(budget, answers_heads=True)
    key = ThreadKey("t", NS, "m")
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(1500):
            meta = {f"k{j}": "v" * 500 for j in range(100)}  # ~50 KB of metadata, no state
            cp = Checkpoint(key=key, checkpoint_id=f"c{i:05}", metadata=meta, created_at=i)
            tier.put_bodies([cp])
            tier.start_writes(key, cp.checkpoint_id)
            tier.add_writes(key, [_write(cp.checkpoint_id, "w", 0, b"x" * 20_000)])
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert tier.used_bytes <= budget
    assert held < 3 * budget, f"{held / 2**20:.0f} MiB held for a {budget / 2**20:.0f} MiB tier"


def test_the_memory_tier_evicts_a_body_with_its_writes_and_skips_one_too_large() -> None:
    """The tier is one byte-bounded LRU (cachetools): a body and its cached writes are one
    entry, so the least recently used goes with its writes, and a write that makes an entry
    grow counts at once; a body larger than the whole budget is not cached and evicts
    nothing."""
    from checkpoint_svc.tiers.memory import MemoryTier

    tier = MemoryTier(100_000, answers_heads=True)
    key = ThreadKey("t", NS, "lru")
    first, second = (
        Checkpoint(key=key, checkpoint_id=c, state=b"s" * 30_000, created_at=1)
        for c in ("c1", "c2")
    )
    tier.put_bodies([first, second])
    for cp in (first, second):
        tier.start_writes(key, cp.checkpoint_id)
    tier.add_writes(key, [_write("c1", "w", 0, b"x" * 10_000)])  # c1 now the most recent
    assert tier.restore(key, "c1", include_writes=True) is not None
    used = tier.used_bytes
    assert used >= 70_000, "the write counts with its body"
    tier.put_bodies([Checkpoint(key=key, checkpoint_id="c3", state=b"s" * 40_000, created_at=1)])
    assert tier.body(key, "c2") is None, "the least recently used went"
    assert tier.restore(key, "c1", include_writes=True) is not None
    assert tier.used_bytes <= 100_000
    before = tier.used_bytes
    tier.put_bodies([Checkpoint(key=key, checkpoint_id="huge", state=b"s" * 200_000)])
    assert tier.body(key, "huge") is None and tier.used_bytes == before


async def test_writes_before_their_checkpoint_survive_retention(store, tenant) -> None:
    """Retention swept "writes whose checkpoint does not exist": writes that came before
    their checkpoint (acknowledged) were deleted by any sweep, prune or delete-for-runs."""
    key = ThreadKey(tenant, "lg:", "swept")
    old = await _save(store, key, _uuid7())
    store.settings.keep_last = 1  # the sweep below prunes `old` once another is saved
    nxt = _uuid7()
    await store.put_writes(key, [_write(nxt, "early")], token=0)
    await _save(store, key, _uuid7())
    assert await store.sweep() >= 1
    await _save(store, key, nxt)
    assert await _writes_of(store, key, nxt) == [("early", 0, b"1")]
    with pytest.raises(Exception, match="not found"):
        await store.restore(key, old)


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
async def test_a_threads_operations_commit_in_order_across_lanes(store, tenant) -> None:
    """A big ASYNC save then a small one of the same thread: the big one went to the heavy
    lane, the small one to the other, and the older save could end up the head."""
    import os

    key = ThreadKey(tenant, NS, "ordered")
    await _save(store, key)
    for _ in range(3):
        for _ in range(3):  # the last waits in the heavy lane while the others commit
            big = Checkpoint(key=key, checkpoint_id="", state=os.urandom(12 * 1024 * 1024))
            await store.save(SaveCommand(checkpoint=big), durable=False)
        small = Checkpoint(key=key, checkpoint_id="", state=b'{"last": true}')
        last = (await store.save(SaveCommand(checkpoint=small), durable=False)).checkpoint
        for _ in range(200):
            head = (await store.get_thread(key)).head_id
            if head == last.checkpoint_id:
                break
            await asyncio.sleep(0.05)
        listed, _ = await store.list(key, 2)
        assert listed[0].checkpoint_id == last.checkpoint_id
        assert head == last.checkpoint_id, "the older save became the head"
        assert listed[0].parent_id == listed[1].checkpoint_id


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_a_save_and_a_delete_in_one_batch_leave_nothing_cached(store, tenant) -> None:
    """DeleteThread flushes the batch's earlier Save first; the caches were then warmed with
    the deleted checkpoint, and the single writer served it."""
    from checkpoint_svc.errors import NotFound

    for i in range(10):
        key = ThreadKey(tenant, NS, f"gone-{i}")
        await _save(store, key)
        cid = _uuid7()
        await asyncio.gather(_save(store, key, cid), store.delete_thread(key))
        with pytest.raises(NotFound):
            await store.restore(key, cid)


async def test_idle_watchers_leave_nothing_behind(store, tenant) -> None:
    """Each idle heartbeat left a cancelled future in the topic's list of waiters."""
    key = ThreadKey(tenant, NS, "idle")
    await _save(store, key)
    beats = 0
    async for item in store.stream(tenant, key, 10**6, follow=True):
        if not hasattr(item, "seq"):
            beats += 1
            window = store.feed._topics[(tenant, NS, "idle")]
            assert len(window.waiters) <= 1
            if beats == 4:
                break
