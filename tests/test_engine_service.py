"""engine_svc end to end: real processes for both services, a kill -9 of the engine."""

from __future__ import annotations

import asyncio
import json
import time

import grpc
import pytest
from google.protobuf import json_format
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from tests.engine_client import definition, engine_stub, watch
from tests.servers import checkpoint_stub
from workflow_stubs.checkpoint.v1 import checkpoint_pb2 as cpb
from workflow_stubs.engine.v1 import engine_pb2 as pb

pytestmark = pytest.mark.parametrize("backend", ["sqlite"], indirect=True)


async def test_register_start_watch_get(service, engine_factory, tenant) -> None:
    engine = engine_factory(service)
    channel, s, md = await engine_stub(engine, tenant)
    nodes = [
        {"id": "a", "type": "transform", "config": {"expression": "input['x'] + 1"}},
        {"id": "b", "type": "transform", "depends_on": ["a"], "config": {"expression": "a * 2"}},
        {"id": "c", "type": "noop", "depends_on": ["a"], "when": "a > 100"},
    ]
    reg = await s.RegisterWorkflow(
        pb.RegisterWorkflowRequest(definition=definition(nodes)), metadata=md
    )
    assert (reg.version, reg.created) == (1, True)
    got = await s.GetWorkflow(pb.GetWorkflowRequest(workflow_id="wf"), metadata=md)
    assert got.version == got.active_version == 1 and len(got.definition.nodes) == 3
    started = await s.StartRun(
        pb.StartRunRequest(
            workflow_id="wf", input=json_format.ParseDict({"x": 4}, pb.StartRunRequest().input)
        ),
        metadata=md,
    )
    run_id = started.run.run_id
    events = await asyncio.wait_for(watch(s, md, run_id), 30)
    assert events[-1].terminal and events[-1].status == pb.RUN_STATUS_COMPLETED
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    done = [e for e in events if e.type == "node.completed"]
    assert {e.node_id for e in done} == {"a", "b"} and done[-1].total_nodes == 3
    run = (await s.GetRun(pb.GetRunRequest(run_id=run_id), metadata=md)).run
    assert run.status == pb.RUN_STATUS_COMPLETED
    assert json_format.MessageToDict(run.state) == {"input": {"x": 4}, "a": 5, "b": 10}
    assert run.completed_nodes == 3 and run.progress_percent == 100.0
    listed = await s.ListRuns(pb.ListRunsRequest(), metadata=md)
    assert [r.run_id for r in listed.runs] == [run_id]
    done_runs = pb.ListRunsRequest(statuses=[pb.RUN_STATUS_COMPLETED])
    listed = await s.ListRuns(done_runs, metadata=md)
    assert [(r.run_id, r.status) for r in listed.runs] == [(run_id, pb.RUN_STATUS_COMPLETED)]
    # PAUSING is an answer about a RUNNING run, not a status runs are listed by.
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await s.ListRuns(pb.ListRunsRequest(statuses=[pb.RUN_STATUS_PAUSING]), metadata=md)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "statuses[0]" in refused.value.details() and "RUNNING" in refused.value.details()
    await channel.close()


async def test_invalid_definitions_and_replayed_starts(service, engine_factory, tenant) -> None:
    engine = engine_factory(service)
    channel, s, md = await engine_stub(engine, tenant)
    bad = definition(
        [
            {"id": "a", "type": "noop", "depends_on": ["b"]},
            {"id": "b", "type": "noop", "depends_on": ["a"]},
            {"id": "c", "type": "warp"},
        ]
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await s.RegisterWorkflow(pb.RegisterWorkflowRequest(definition=bad), metadata=md)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = error_details_pb2.BadRequest()
    rpc_status.from_call(err.value).details[0].Unpack(details)
    fields = {v.field for v in details.field_violations}
    assert {"nodes", "nodes[2].type"} <= fields
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await s.StartRun(pb.StartRunRequest(workflow_id="missing"), metadata=md)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND

    await s.RegisterWorkflow(
        pb.RegisterWorkflowRequest(definition=definition([{"id": "a", "type": "noop"}])),
        metadata=md,
    )
    first = await s.StartRun(pb.StartRunRequest(workflow_id="wf", request_id="once"), metadata=md)
    again = await s.StartRun(pb.StartRunRequest(workflow_id="wf", request_id="once"), metadata=md)
    assert first.run.run_id == again.run.run_id
    listed = await s.ListRuns(pb.ListRunsRequest(), metadata=md)
    assert len(listed.runs) == 1
    # A used run id: refused for another workflow whatever the run's status (the same
    # workflow's COMPLETED run would be continued; a WAITING one is refused, see below).
    await s.RegisterWorkflow(
        pb.RegisterWorkflowRequest(definition=definition([{"id": "a", "type": "noop"}], "other")),
        metadata=md,
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await s.StartRun(
            pb.StartRunRequest(workflow_id="other", run_id=first.run.run_id), metadata=md
        )
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    await channel.close()


async def test_kill_9_of_the_engine_mid_run_and_another_finishes(
    service, engine_factory, tenant, tmp_path
) -> None:
    log_file = tmp_path / "executions.log"
    log_file.write_text("")
    args = (
        "--handlers",
        "tests.engine_handlers",
        "--lease-ttl",
        "1.5",
        "--recovery-interval",
        "0.3",
        "--tenants",
        tenant,
    )
    env = {"ENGINE_TEST_LOG": str(log_file)}
    first = engine_factory(service, *args, env=env)
    channel, s, md = await engine_stub(first, tenant)
    nodes = []
    for level in range(8):
        for k in range(2):
            deps = [f"n{level - 1}_{j}" for j in range(2)] if level else []
            nodes.append(
                {
                    "id": f"n{level}_{k}",
                    "type": "python",
                    "depends_on": deps,
                    "config": {"handler": "tests.engine_handlers:record"},
                }
            )
    await s.RegisterWorkflow(pb.RegisterWorkflowRequest(definition=definition(nodes)), metadata=md)
    started = await s.StartRun(pb.StartRunRequest(workflow_id="wf"), metadata=md)
    run_id = started.run.run_id
    deadline = time.monotonic() + 20
    while len(log_file.read_text().split()) < 6:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    await first.akill()
    await channel.close()
    # What the store holds as done when the engine died: checkpointed or a pending write.
    cp_channel, store, cp_md = await checkpoint_stub(service.address, tenant)
    head = await store.Restore(
        cpb.RestoreRequest(namespace="runs", thread_id=run_id, include_writes=True), metadata=cp_md
    )
    saved = set(json.loads(head.checkpoint.state)["completed"])
    saved |= {w.task_id for w in head.writes if w.channel == "output"}
    await cp_channel.close()
    assert 0 < len(saved) < 16

    second = engine_factory(service, *args, env=env)
    channel, s, md = await engine_stub(second, tenant)
    events = await asyncio.wait_for(watch(s, md, run_id), 60)
    assert events[-1].terminal and events[-1].status == pb.RUN_STATUS_COMPLETED
    run = (await s.GetRun(pb.GetRunRequest(run_id=run_id), metadata=md)).run
    assert run.completed_nodes == 16
    executions = log_file.read_text().split()
    assert set(executions) == {n["id"] for n in nodes}
    # No node whose output was saved before the kill ran again.
    twice = [n for n in saved if executions.count(n) != 1]
    assert twice == [], f"completed nodes ran again: {twice}"
    await channel.close()


async def test_two_engines_fifty_runs_each_run_once(
    service, engine_factory, tenant, tmp_path
) -> None:
    log_file = tmp_path / "executions.log"
    log_file.write_text("")
    args = (
        "--handlers",
        "tests.engine_handlers",
        "--lease-ttl",
        "2",
        "--recovery-interval",
        "0.2",
        "--tenants",
        tenant,
    )
    env = {"ENGINE_TEST_LOG": str(log_file)}
    engines = [engine_factory(service, *args, env=env) for _ in range(2)]
    stubs = [await engine_stub(e, tenant) for e in engines]
    _, s0, md = stubs[0]
    nodes = [
        {"id": "a", "type": "python", "config": {"handler": "tests.engine_handlers:tagged"}},
        {
            "id": "b",
            "type": "python",
            "depends_on": ["a"],
            "config": {"handler": "tests.engine_handlers:tagged"},
        },
        {
            "id": "c",
            "type": "python",
            "depends_on": ["a"],
            "config": {"handler": "tests.engine_handlers:tagged"},
        },
    ]
    await s0.RegisterWorkflow(pb.RegisterWorkflowRequest(definition=definition(nodes)), metadata=md)

    async def start(i: int) -> str:
        stub = stubs[i % 2][1]
        request = pb.StartRunRequest(workflow_id="wf", run_id=f"r{i:02d}")
        request.input.update({"tag": f"r{i:02d}"})
        return (await stub.StartRun(request, metadata=md)).run.run_id

    run_ids = await asyncio.gather(*(start(i) for i in range(50)))
    deadline = time.monotonic() + 90
    while True:
        listed = await s0.ListRuns(
            pb.ListRunsRequest(statuses=[pb.RUN_STATUS_COMPLETED], page_size=100), metadata=md
        )
        if len(listed.runs) == 50:
            break
        assert time.monotonic() < deadline, f"{len(listed.runs)} of 50 runs completed"
        await asyncio.sleep(0.3)
    lines = log_file.read_text().split()
    expected = {f"{r}:{n}" for r in run_ids for n in ("a", "b", "c")}
    assert set(lines) == expected
    assert len(lines) == len(expected), "some node ran twice"
    for channel, _, _ in stubs:
        await channel.close()


async def test_an_approval_answered_after_the_engine_restarted(
    service, engine_factory, tenant
) -> None:
    args = ("--recovery-interval", "0.3", "--tenants", tenant)
    first = engine_factory(service, *args)
    channel, s, md = await engine_stub(first, tenant)
    nodes = [
        {"id": "build", "type": "transform", "config": {"expression": "'artifact-1'"}},
        {
            "id": "approve",
            "type": "approval",
            "depends_on": ["build"],
            "config": {"prompt": "Deploy artifact-1?"},
        },
        {
            "id": "deploy",
            "type": "transform",
            "depends_on": ["approve"],
            "when": "approve['ok']",
            "config": {"expression": "build + ' deployed'"},
        },
    ]
    await s.RegisterWorkflow(pb.RegisterWorkflowRequest(definition=definition(nodes)), metadata=md)
    run_id = (await s.StartRun(pb.StartRunRequest(workflow_id="wf"), metadata=md)).run.run_id
    deadline = time.monotonic() + 20
    while True:
        run = (await s.GetRun(pb.GetRunRequest(run_id=run_id), metadata=md)).run
        if run.status == pb.RUN_STATUS_WAITING:
            break
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    assert run.waiting_for == "Deploy artifact-1?"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await s.StartRun(pb.StartRunRequest(workflow_id="wf", run_id=run_id), metadata=md)
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    await channel.close()
    await first.arestart()  # hours later, on a restarted engine

    channel, s, md = await engine_stub(first, tenant)
    answer = pb.ResumeRunRequest(run_id=run_id)
    answer.value.struct_value.update({"ok": True, "by": "alice"})
    await s.ResumeRun(answer, metadata=md)
    events = await asyncio.wait_for(watch(s, md, run_id), 30)
    assert events[-1].terminal and events[-1].status == pb.RUN_STATUS_COMPLETED
    assert pb.RUN_STATUS_WAITING in [e.status for e in events]
    run = (await s.GetRun(pb.GetRunRequest(run_id=run_id), metadata=md)).run
    state = json_format.MessageToDict(run.state)
    assert state["approve"] == {"ok": True, "by": "alice"}
    assert state["deploy"] == "artifact-1 deployed"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await s.ResumeRun(answer, metadata=md)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    await channel.close()


async def test_a_watcher_that_reconnects_misses_no_event(service, engine_factory, tenant) -> None:
    engine = engine_factory(service)
    channel, s, md = await engine_stub(engine, tenant)
    nodes = [
        {
            "id": f"s{i}",
            "type": "sleep",
            "config": {"seconds": 0.1},
            "depends_on": [f"s{i - 1}"] if i else [],
        }
        for i in range(8)
    ]
    await s.RegisterWorkflow(pb.RegisterWorkflowRequest(definition=definition(nodes)), metadata=md)
    run_id = (await s.StartRun(pb.StartRunRequest(workflow_id="wf"), metadata=md)).run.run_id
    seen: list[pb.RunEvent] = []
    async for item in s.WatchRun(pb.WatchRunRequest(run_id=run_id), metadata=md):
        if item.HasField("event"):
            seen.append(item.event)
            if len(seen) == 4:
                break  # the watcher drops off mid-run
    await asyncio.sleep(0.4)
    seen += await asyncio.wait_for(watch(s, md, run_id, after=seen[-1].seq), 30)
    assert [e.seq for e in seen] == list(range(1, len(seen) + 1))
    assert seen[-1].terminal and seen[-1].status == pb.RUN_STATUS_COMPLETED
    assert len([e for e in seen if e.type == "node.completed"]) == 8
    await channel.close()
