"""The executor against a real checkpoint service: super-steps, skips, retries, and a run
taken over by another engine after the first one died."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest
from google.protobuf import json_format

from engine_svc.definition import parse
from engine_svc.executor import NodeRunner, RunExecutor
from engine_svc.run_state import RUNS_NAMESPACE
from engine_svc.store import GrpcStore
from tests import engine_handlers
from workflow_stubs.checkpoint.v1 import checkpoint_pb2 as cpb
from workflow_stubs.engine.v1 import engine_pb2 as pb

RUNNER = NodeRunner({"tests.engine_handlers"})


def workflow(nodes: list[dict], **extra):
    return parse(
        json_format.ParseDict(
            {"workflow_id": "wf", "nodes": nodes, **extra}, pb.WorkflowDefinition()
        )
    )


def grid(levels: int, width: int, node: dict) -> list[dict]:
    nodes = []
    for level in range(levels):
        for k in range(width):
            deps = [f"n{level - 1}_{j}" for j in range(width)] if level else []
            nodes.append({"id": f"n{level}_{k}", "depends_on": deps, **node})
    return nodes


async def test_a_25_by_4_dag_completes_with_the_right_state(stub, tenant) -> None:
    s, md = stub
    nodes = grid(25, 4, {"type": "noop"})
    nodes.append(
        {
            "id": "total",
            "type": "transform",
            "depends_on": [f"n24_{k}" for k in range(4)],
            "config": {"expression": "input['a'] + input['b']"},
        }
    )
    wf = workflow(nodes)
    ex = RunExecutor(GrpcStore(stub=s, tenant=tenant), tenant, "engine-1", RUNNER, lease_ttl=15.0)
    await ex.start(wf, 1, "run-grid", {"a": 2, "b": 3})
    run = await ex.execute(wf, "run-grid")
    assert run.status == "COMPLETED" and run.outputs["total"] == 5
    assert len(run.completed) == 101 and run.step == 26
    listed = await s.List(
        cpb.ListRequest(namespace=RUNS_NAMESPACE, thread_id="run-grid", page_size=100), metadata=md
    )
    assert len(listed.checkpoints) == 27  # start + one per super-step
    thread = await s.GetThread(
        cpb.GetThreadRequest(namespace=RUNS_NAMESPACE, thread_id="run-grid"), metadata=md
    )
    assert thread.thread.status == cpb.THREAD_STATUS_COMPLETED and thread.thread.lease_owner == ""


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_when_false_skips_and_retries_then_succeed(stub, tenant) -> None:
    s, _ = stub
    engine_handlers.EXECUTIONS.clear()
    engine_handlers.FAILURES_LEFT["flaky"] = 2
    wf = workflow(
        [
            {"id": "a", "type": "transform", "config": {"expression": "input['n'] * 10"}},
            {"id": "big", "type": "noop", "depends_on": ["a"], "when": "a > 100"},
            {
                "id": "small",
                "type": "transform",
                "depends_on": ["a"],
                "when": "a <= 100",
                "config": {"expression": "'small'"},
            },
            {
                "id": "flaky",
                "type": "python",
                "depends_on": ["small"],
                "config": {"handler": "tests.engine_handlers:flaky"},
                "retry": {"max_attempts": 3, "initial_backoff": "0.01s"},
            },
        ]
    )
    ex = RunExecutor(GrpcStore(stub=s, tenant=tenant), tenant, "engine-1", RUNNER, lease_ttl=15.0)
    await ex.start(wf, 1, "run-skip", {"n": 5})
    run = await ex.execute(wf, "run-skip")
    assert run.status == "COMPLETED"
    assert run.skipped == ["big"] and run.outputs["small"] == "small"
    assert run.outputs["flaky"] == "ok" and engine_handlers.EXECUTIONS.count("flaky") == 3


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_retries_exhausted_fail_the_run_keeping_siblings(stub, tenant) -> None:
    s, _ = stub
    engine_handlers.FAILURES_LEFT["flaky"] = 10
    wf = workflow(
        [
            {
                "id": "flaky",
                "type": "python",
                "config": {"handler": "tests.engine_handlers:flaky"},
                "retry": {"max_attempts": 2, "initial_backoff": "0.01s"},
            },
            {"id": "sibling", "type": "transform", "config": {"expression": "1"}},
            {"id": "after", "type": "noop", "depends_on": ["flaky"]},
        ]
    )
    ex = RunExecutor(GrpcStore(stub=s, tenant=tenant), tenant, "engine-1", RUNNER, lease_ttl=15.0)
    await ex.start(wf, 1, "run-fail", {})
    run = await ex.execute(wf, "run-fail")
    assert run.status == "FAILED" and "transient" in run.error
    assert run.outputs == {"sibling": 1} and "after" not in run.done()


async def test_a_run_taken_over_after_a_crash_reruns_no_completed_node(stub, tenant) -> None:
    s, md = stub
    engine_handlers.EXECUTIONS.clear()
    wf = workflow(
        grid(6, 2, {"type": "python", "config": {"handler": "tests.engine_handlers:step"}})
    )
    first = RunExecutor(GrpcStore(stub=s, tenant=tenant), tenant, "engine-1", RUNNER, lease_ttl=1.0)
    await first.start(wf, 1, "run-crash", {})
    task = asyncio.create_task(first.execute(wf, "run-crash"))
    while len(engine_handlers.EXECUTIONS) < 5:  # noqa: ASYNC110 (a few steps in)
        await asyncio.sleep(0.005)
    task.cancel()  # the engine dies mid-step
    with pytest.raises(asyncio.CancelledError):
        await task
    head = await s.Restore(
        cpb.RestoreRequest(namespace=RUNS_NAMESPACE, thread_id="run-crash", include_writes=True),
        metadata=md,
    )
    saved = set(json.loads(head.checkpoint.state)["completed"])
    saved |= {w.task_id for w in head.writes if w.channel == "output"}
    assert 0 < len(saved) < 12
    runs_before = len(engine_handlers.EXECUTIONS)

    second = RunExecutor(
        GrpcStore(stub=s, tenant=tenant), tenant, "engine-2", RUNNER, lease_ttl=1.0
    )
    run = await second.execute(wf, "run-crash")
    assert run.status == "COMPLETED" and len(run.completed) == 12
    # Only the nodes whose outputs were not saved ran again.
    assert len(engine_handlers.EXECUTIONS) - runs_before == 12 - len(saved)


async def test_a_failed_lease_renewal_is_logged_once_per_outage(tenant, caplog) -> None:
    """Issue 12, defect 12: the lease renewal swallowed the store's errors without a word."""
    from engine_svc.run_state import RunState
    from tests.servers import free_port
    from workflow_stubs.checkpoint.v1 import checkpoint_pb2_grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{free_port()}") as channel:  # nobody
        store = GrpcStore(stub=checkpoint_pb2_grpc.CheckpointServiceStub(channel), tenant=tenant)
        ex = RunExecutor(store, tenant, "engine-1", RUNNER, lease_ttl=0.15)
        wf = workflow([{"id": "a", "type": "noop"}])
        execution = ex._execution(wf, RunState("r-1", "wf", 1, {}, total=1), "", 1)
        renewing = asyncio.create_task(ex.leases.keep_renewed(execution, None))
        with caplog.at_level("WARNING", logger="engine_svc.leases"):
            await asyncio.sleep(0.6)  # about ten renewals, every one refused
        renewing.cancel()
    said = [r for r in caplog.records if "lease renewal failed" in r.getMessage()]
    assert len(said) == 1, [r.getMessage() for r in caplog.records]
    assert said[0].run_id == "r-1"


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_a_when_that_fails_fails_its_node_and_the_run(stub, tenant) -> None:
    """A condition that cannot be evaluated on the state (a missing key) is the node's
    failure, with the expression named, not a crash that leaves the run RUNNING."""
    s, _ = stub
    wf = workflow(
        [
            {"id": "a", "type": "noop"},
            {"id": "b", "type": "noop", "depends_on": ["a"], "when": "input['missing'] > 1"},
            {
                "id": "ask",
                "type": "approval",
                "depends_on": ["a"],
                "when": "input['absent']",
                "config": {"prompt": "go?"},
            },
        ]
    )
    ex = RunExecutor(GrpcStore(stub=s, tenant=tenant), tenant, "engine-1", RUNNER, lease_ttl=15.0)
    await ex.start(wf, 1, "run-when", {})
    run = await asyncio.wait_for(ex.execute(wf, "run-when"), 30)
    assert run.status == "FAILED", run
    assert "when" in run.error and "missing" in run.error, run.error
    # An approval whose condition fails, when it is all that is left to start.
    ask = workflow(
        [
            {"id": "a", "type": "noop"},
            {
                "id": "ask",
                "type": "approval",
                "depends_on": ["a"],
                "when": "input['absent']",
                "config": {"prompt": "go?"},
            },
        ]
    )
    await ex.start(ask, 1, "run-ask", {})
    run = await asyncio.wait_for(ex.execute(ask, "run-ask"), 30)
    assert run.status == "FAILED" and "ask: when:" in run.error and "absent" in run.error
