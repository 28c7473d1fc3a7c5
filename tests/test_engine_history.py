"""Versions and rollback, run history, forks, breakpoints and thread continuation (issue 5),
against real services."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.protobuf import json_format

from tests.engine_client import definition, engine_stub, wait_status
from tests.servers import checkpoint_stub
from workflow_stubs.checkpoint.v1 import checkpoint_pb2 as cpb
from workflow_stubs.engine.v1 import engine_pb2 as pb

pytestmark = pytest.mark.parametrize("backend", ["sqlite"], indirect=True)


def emits(value: str, workflow_id: str = "app", sleep: float = 0.0) -> pb.WorkflowDefinition:
    nodes: list[dict] = [{"id": "out", "type": "transform", "config": {"expression": value}}]
    if sleep:
        nodes.insert(0, {"id": "wait", "type": "sleep", "config": {"seconds": sleep}})
        nodes[1]["depends_on"] = ["wait"]
    return definition(nodes, workflow_id)


async def run_to_end(s, md, workflow_id: str, **start) -> pb.Run:
    run = (await s.StartRun(pb.StartRunRequest(workflow_id=workflow_id, **start), metadata=md)).run
    return await wait_status(s, md, run.run_id, pb.RUN_STATUS_COMPLETED)


def state(run: pb.Run) -> dict:
    return json_format.MessageToDict(run.state)


async def test_versions_and_rollback(service, engine_factory, tenant) -> None:
    engine = engine_factory(service)
    channel, s, md = await engine_stub(engine, tenant)
    for value in ("'v1'", "'v2'"):
        await s.RegisterWorkflow(
            pb.RegisterWorkflowRequest(definition=emits(value, sleep=0.5)), metadata=md
        )
    assert state(await run_to_end(s, md, "app"))["out"] == "v2"
    on_v2 = (await s.StartRun(pb.StartRunRequest(workflow_id="app"), metadata=md)).run

    rolled = await s.RollbackWorkflow(
        pb.RollbackWorkflowRequest(
            workflow_id="app", version=1, reason="v2 breaks checkout", requested_by="alice"
        ),
        metadata=md,
    )
    assert (rolled.active_version, rolled.previous_version) == (1, 2)
    assert state(await run_to_end(s, md, "app"))["out"] == "v1", "new runs take v1 at once"
    kept = await wait_status(s, md, on_v2.run_id, pb.RUN_STATUS_COMPLETED)
    assert (kept.version, state(kept)["out"]) == (2, "v2"), "a running run keeps its version"

    listed = await s.ListWorkflowVersions(
        pb.ListWorkflowVersionsRequest(workflow_id="app"), metadata=md
    )
    assert listed.active_version == 1
    assert [(v.version, v.active) for v in listed.versions] == [(2, False), (1, True)]
    history = [
        (h.kind, h.version, h.previous_version, h.reason, h.requested_by) for h in listed.history
    ]
    assert history == [
        ("rollback", 1, 2, "v2 breaks checkout", "alice"),
        ("registered", 2, 1, "", ""),
        ("registered", 1, 0, "", ""),
    ]
    got = await s.GetWorkflow(pb.GetWorkflowRequest(workflow_id="app"), metadata=md)
    assert (got.version, got.active_version) == (1, 1)
    again = await s.RegisterWorkflow(
        pb.RegisterWorkflowRequest(definition=emits("'v1'", sleep=0.5)), metadata=md
    )
    assert (again.version, again.created) == (1, False)
    newer = await s.RegisterWorkflow(
        pb.RegisterWorkflowRequest(definition=emits("'v3'")), metadata=md
    )
    assert (newer.version, newer.created) == (3, True)
    for bad, code in ((9, grpc.StatusCode.NOT_FOUND), (0, grpc.StatusCode.INVALID_ARGUMENT)):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await s.RollbackWorkflow(
                pb.RollbackWorkflowRequest(workflow_id="app", version=bad), metadata=md
            )
        assert err.value.code() == code
    await channel.close()


async def test_a_rollback_node_after_a_failed_canary(service, engine_factory, tenant) -> None:
    engine = engine_factory(service)
    channel, s, md = await engine_stub(engine, tenant)
    for value in ("'stable'", "'risky'"):
        await s.RegisterWorkflow(pb.RegisterWorkflowRequest(definition=emits(value)), metadata=md)
    release = [
        {"id": "canary", "type": "transform", "config": {"expression": "{'error_rate': 0.2}"}},
        {
            "id": "roll_back",
            "type": "rollback",
            "depends_on": ["canary"],
            "when": "canary['error_rate'] > 0.05",
            "config": {"workflow_id": "app", "version": 1, "reason": "canary error rate"},
        },
    ]
    await s.RegisterWorkflow(
        pb.RegisterWorkflowRequest(definition=definition(release, "release")), metadata=md
    )
    done = await run_to_end(s, md, "release")
    assert state(done)["roll_back"] == {
        "workflow_id": "app",
        "active_version": 1,
        "previous_version": 2,
    }
    assert state(await run_to_end(s, md, "app"))["out"] == "stable"
    listed = await s.ListWorkflowVersions(
        pb.ListWorkflowVersionsRequest(workflow_id="app"), metadata=md
    )
    newest = listed.history[0]
    assert (newest.kind, newest.reason) == ("rollback", "canary error rate")
    assert newest.requested_by == f"run {done.run_id} (node roll_back)"
    bad = [{"id": "r", "type": "rollback", "config": {"workflow_id": "app"}}]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await s.RegisterWorkflow(
            pb.RegisterWorkflowRequest(definition=definition(bad, "bad")), metadata=md
        )
    assert "nodes[0].config.version" in err.value.details()
    await channel.close()


async def test_fork_from_step_two_with_a_patch(service, engine_factory, tenant, tmp_path) -> None:
    log_file = tmp_path / "executions.log"
    log_file.write_text("")
    engine = engine_factory(
        service, "--handlers", "tests.engine_handlers", env={"ENGINE_TEST_LOG": str(log_file)}
    )
    channel, s, md = await engine_stub(engine, tenant)
    nodes = [
        {
            "id": f"n{i}",
            "type": "python",
            "depends_on": [f"n{i - 1}"] if i else [],
            "config": {"handler": "tests.engine_handlers:compute"},
        }
        for i in range(5)
    ]
    await s.RegisterWorkflow(pb.RegisterWorkflowRequest(definition=definition(nodes)), metadata=md)
    request = pb.StartRunRequest(workflow_id="wf")
    request.input.update({"x": 1})
    original = await run_to_end(s, md, "wf", input=request.input)
    assert [state(original)[f"n{i}"] for i in range(5)] == [2, 3, 4, 5, 6]

    async def history(run_id: str, **kw) -> list[pb.RunCheckpoint]:
        got = await s.GetRunHistory(pb.GetRunHistoryRequest(run_id=run_id, **kw), metadata=md)
        return list(got.checkpoints)

    before = await history(original.run_id, include_state=True)
    step2 = next(
        c for c in before if c.step == 2 and c.trigger == pb.CHECKPOINT_TRIGGER_STEP_COMPLETED
    )
    assert list(step2.completed_node_ids) == ["n0", "n1"]
    assert json_format.MessageToDict(step2.state)["n1"] == 3
    assert step2.status == pb.RUN_STATUS_RUNNING

    fork = pb.ForkRunRequest(run_id=original.run_id, checkpoint_id=step2.checkpoint_id)
    fork.state_patch.update({"n1": 100})
    forked = (await s.ForkRun(fork, metadata=md)).run
    forked = await wait_status(s, md, forked.run_id, pb.RUN_STATUS_COMPLETED)
    assert [state(forked)[f"n{i}"] for i in range(5)] == [2, 100, 101, 102, 103]
    assert log_file.read_text().split() == ["n0", "n1", "n2", "n3", "n4", "n2", "n3", "n4"], (
        "the fork re-ran only what comes after its checkpoint"
    )
    assert [c.checkpoint_id for c in await history(original.run_id, include_state=True)] == [
        c.checkpoint_id for c in before
    ]
    assert (
        state((await s.GetRun(pb.GetRunRequest(run_id=original.run_id), metadata=md)).run)["n4"]
        == 6
    )
    first = (await history(forked.run_id))[-1]
    assert first.parent_id == step2.checkpoint_id
    assert first.metadata["forked_from_run"] == original.run_id

    for patch, code in (({"nope": 1}, "INVALID_ARGUMENT"), ({"input": 3}, "INVALID_ARGUMENT")):
        bad = pb.ForkRunRequest(run_id=original.run_id, checkpoint_id=step2.checkpoint_id)
        bad.state_patch.update(patch)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await s.ForkRun(bad, metadata=md)
        assert err.value.code().name == code
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await s.ForkRun(
            pb.ForkRunRequest(run_id=original.run_id, checkpoint_id="no-such"), metadata=md
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    await channel.close()


async def test_breakpoints_pause_before_and_after(service, engine_factory, tenant) -> None:
    engine = engine_factory(service)
    channel, s, md = await engine_stub(engine, tenant)
    nodes = [
        {"id": "a", "type": "transform", "config": {"expression": "1"}},
        {"id": "b", "type": "transform", "depends_on": ["a"], "config": {"expression": "a + 1"}},
        {"id": "c", "type": "transform", "depends_on": ["b"], "config": {"expression": "b + 1"}},
    ]
    await s.RegisterWorkflow(pb.RegisterWorkflowRequest(definition=definition(nodes)), metadata=md)
    start = pb.StartRunRequest(workflow_id="wf", interrupt_before=["b"], interrupt_after=["b"])
    run_id = (await s.StartRun(start, metadata=md)).run.run_id
    run = await wait_status(s, md, run_id, pb.RUN_STATUS_PAUSED)
    assert list(run.completed_node_ids) == ["a"]
    newest = (
        await s.GetRunHistory(pb.GetRunHistoryRequest(run_id=run_id, page_size=1), metadata=md)
    ).checkpoints[0]
    assert (newest.trigger, newest.name) == (pb.CHECKPOINT_TRIGGER_INTERRUPT, "before:b")
    await s.ResumeRun(pb.ResumeRunRequest(run_id=run_id), metadata=md)
    await asyncio.sleep(0.1)
    run = await wait_status(s, md, run_id, pb.RUN_STATUS_PAUSED)
    assert list(run.completed_node_ids) == ["a", "b"]
    await s.ResumeRun(pb.ResumeRunRequest(run_id=run_id), metadata=md)
    run = await wait_status(s, md, run_id, pb.RUN_STATUS_COMPLETED)
    assert state(run)["c"] == 3
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await s.StartRun(pb.StartRunRequest(workflow_id="wf", interrupt_before=["zz"]), metadata=md)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "interrupt_before[0]" in err.value.details()
    await channel.close()


async def test_thread_continuation_remembers(service, engine_factory, tenant) -> None:
    engine = engine_factory(service)
    channel, s, md = await engine_stub(engine, tenant)
    nodes = [
        {"id": "count", "type": "transform",
         "config": {"expression": "(count if 'count' in state else 0) + 1"}},
        {"id": "said", "type": "transform", "depends_on": ["count"],
         "config": {"expression": "(said if 'said' in state else []) + [input['msg']]"}},
    ]  # fmt: skip
    await s.RegisterWorkflow(
        pb.RegisterWorkflowRequest(definition=definition(nodes, "chat")), metadata=md
    )
    for i, msg in enumerate(("hello", "again", "bye")):
        request = pb.StartRunRequest(workflow_id="chat", run_id="conversation-1")
        request.input.update({"msg": msg})
        started = (await s.StartRun(request, metadata=md)).run
        assert started.run_id == "conversation-1"
        run = await wait_status(s, md, "conversation-1", pb.RUN_STATUS_COMPLETED)
        assert state(run)["count"] == i + 1
    assert state(run)["said"] == ["hello", "again", "bye"]
    history = (
        await s.GetRunHistory(pb.GetRunHistoryRequest(run_id="conversation-1"), metadata=md)
    ).checkpoints
    assert [c.name for c in history].count("continue") == 2
    assert history[-1].name == "start"
    await channel.close()


async def test_checkpoint_policy_per_workflow(service_factory, backend, engine_factory, tenant):
    """keep_last and ttl from the workflow's policy, enforced by the store's sweeper; a
    checkpoint after every node with the NODE_COMPLETED trigger."""
    service = service_factory(backend, "--sweep-interval", "0.3")
    engine = engine_factory(service)
    channel, s, md = await engine_stub(engine, tenant)
    nodes = [
        {"id": f"n{i}", "type": "noop", "depends_on": [f"n{i - 1}"] if i else []} for i in range(8)
    ]
    policy = {
        "keep_last": 3,
        "triggers": ["CHECKPOINT_TRIGGER_STEP_COMPLETED", "CHECKPOINT_TRIGGER_NODE_COMPLETED"],
    }
    await s.RegisterWorkflow(
        pb.RegisterWorkflowRequest(definition=definition(nodes, "kept", checkpoint=policy)),
        metadata=md,
    )
    kept = await run_to_end(s, md, "kept")
    await asyncio.sleep(1.2)
    history = (
        await s.GetRunHistory(pb.GetRunHistoryRequest(run_id=kept.run_id), metadata=md)
    ).checkpoints
    assert len(history) == 3 and history[0].checkpoint_id == kept.head_checkpoint_id
    assert pb.CHECKPOINT_TRIGGER_NODE_COMPLETED in {c.trigger for c in history}
    # GetStats per run: the store's stats of the run's thread.
    cp_channel, store, cp_md = await checkpoint_stub(service.address, tenant)
    stats = await store.GetStats(
        cpb.GetStatsRequest(namespace="runs", thread_id=kept.run_id), metadata=cp_md
    )
    await cp_channel.close()
    assert stats.checkpoint_count == 3 and stats.event_count > 8
    assert sum(t.count for t in stats.triggers) == 3

    await s.RegisterWorkflow(
        pb.RegisterWorkflowRequest(
            definition=definition(nodes[:2], "brief", checkpoint={"ttl": "1s"})
        ),
        metadata=md,
    )
    brief = await run_to_end(s, md, "brief")
    await asyncio.sleep(2.0)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await s.GetRun(pb.GetRunRequest(run_id=brief.run_id), metadata=md)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND, "a finished run expires with its ttl"
    assert (await s.GetRun(pb.GetRunRequest(run_id=kept.run_id), metadata=md)).run.run_id
    await channel.close()
