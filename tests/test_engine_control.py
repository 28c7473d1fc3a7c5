"""Steering runs: pause, resume, cancel, manual checkpoints, failed runs resumed, timeouts,
node types that reach out (http, subworkflow), checkpoint triggers, progress and ETA, and
both services going away mid-run. Real processes throughout."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import pytest
from google.protobuf import json_format

from tests.engine_client import definition, engine_stub, wait_event, wait_status, watch
from tests.servers import REPO_ROOT, checkpoint_stub, free_port
from workflow_stubs.checkpoint.v1 import checkpoint_pb2 as cpb
from workflow_stubs.engine.v1 import engine_pb2 as pb

SQLITE = pytest.mark.parametrize("backend", ["sqlite"], indirect=True)

HANDLERS = ("--handlers", "tests.engine_handlers")


def chain(n: int, node: dict, prefix: str = "n") -> list[dict]:
    return [
        {**node, "id": f"{prefix}{i}", "depends_on": [f"{prefix}{i - 1}"] if i else []}
        for i in range(n)
    ]


async def history(service, tenant: str, run_id: str) -> list[cpb.Checkpoint]:
    """The run's checkpoints, newest first (from the store itself)."""
    channel, store, md = await checkpoint_stub(service.address, tenant)
    listed = await store.List(
        cpb.ListRequest(namespace="runs", thread_id=run_id, page_size=1000), metadata=md
    )
    await channel.close()
    return list(listed.checkpoints)


@SQLITE
async def test_pause_and_resume_through_another_engine(service, engine_factory, tenant) -> None:
    runner, other = engine_factory(service), engine_factory(service)
    channel, s, md = await engine_stub(runner, tenant)
    channel2, s2, _ = await engine_stub(other, tenant)
    nodes = chain(6, {"type": "sleep", "config": {"seconds": 0.4}})
    await s.RegisterWorkflow(pb.RegisterWorkflowRequest(definition=definition(nodes)), metadata=md)
    run_id = (await s.StartRun(pb.StartRunRequest(workflow_id="wf"), metadata=md)).run.run_id
    await wait_event(s, md, run_id, "node.started", "n1")

    paused = (await s2.PauseRun(pb.PauseRunRequest(run_id=run_id), metadata=md)).run
    # n1 finishes first: PAUSING until then (issue 12, defect 4), PAUSED if it already has.
    assert paused.status in (pb.RUN_STATUS_PAUSING, pb.RUN_STATUS_PAUSED)
    run = await wait_status(s, md, run_id, pb.RUN_STATUS_PAUSED)
    assert list(run.completed_node_ids) == ["n0", "n1"], "the running node finishes, no new one"
    await asyncio.sleep(0.8)
    run = (await s.GetRun(pb.GetRunRequest(run_id=run_id), metadata=md)).run
    assert run.status == pb.RUN_STATUS_PAUSED and run.completed_nodes == 2
    newest = (await history(service, tenant, run_id))[0]
    assert newest.trigger == cpb.TRIGGER_PAUSE

    resumed = (await s2.ResumeRun(pb.ResumeRunRequest(run_id=run_id), metadata=md)).run
    assert resumed.status == pb.RUN_STATUS_RUNNING
    events = await asyncio.wait_for(watch(s, md, run_id), 30)
    assert events[-1].status == pb.RUN_STATUS_COMPLETED
    completed = [e.node_id for e in events if e.type == "node.completed"]
    assert completed == [f"n{i}" for i in range(6)], "each node once, in order"
    statuses = [e.status for e in events if e.type == "run.status"]
    assert pb.RUN_STATUS_PAUSED in statuses and pb.RUN_STATUS_RUNNING in statuses
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await s.PauseRun(pb.PauseRunRequest(run_id=run_id), metadata=md)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    await channel.close()
    await channel2.close()


@SQLITE
async def test_cancel_stops_a_long_node_at_once(service, engine_factory, tenant) -> None:
    runner, other = engine_factory(service), engine_factory(service)
    channel, s, md = await engine_stub(runner, tenant)
    channel2, s2, _ = await engine_stub(other, tenant)
    nodes = [
        {"id": "quick", "type": "noop"},
        {"id": "long", "type": "sleep", "depends_on": ["quick"], "config": {"seconds": 120}},
        {"id": "after", "type": "noop", "depends_on": ["long"]},
    ]
    await s.RegisterWorkflow(pb.RegisterWorkflowRequest(definition=definition(nodes)), metadata=md)
    run_id = (await s.StartRun(pb.StartRunRequest(workflow_id="wf"), metadata=md)).run.run_id
    await wait_event(s, md, run_id, "node.started", "long")
    cancelled = (
        await s2.CancelRun(pb.CancelRunRequest(run_id=run_id, reason="wrong input"), metadata=md)
    ).run
    assert cancelled.status == pb.RUN_STATUS_CANCELLED
    assert cancelled.error == "cancelled: wrong input"
    assert list(cancelled.completed_node_ids) == ["quick"]
    events = await asyncio.wait_for(watch(s, md, run_id), 10)
    assert events[-1].terminal and events[-1].status == pb.RUN_STATUS_CANCELLED
    for call in (s.CancelRun, s.ResumeRun):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call(
                pb.CancelRunRequest(run_id=run_id)
                if call is s.CancelRun
                else pb.ResumeRunRequest(run_id=run_id),
                metadata=md,
            )
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    # A waiting run has no engine holding it: the engine asked cancels it itself.
    approval = [{"id": "ask", "type": "approval", "config": {"prompt": "go?"}}]
    await s.RegisterWorkflow(
        pb.RegisterWorkflowRequest(definition=definition(approval, "ask")), metadata=md
    )
    waiting = (await s.StartRun(pb.StartRunRequest(workflow_id="ask"), metadata=md)).run.run_id
    await wait_status(s, md, waiting, pb.RUN_STATUS_WAITING)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await s2.PauseRun(pb.PauseRunRequest(run_id=waiting), metadata=md)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    done = (await s2.CancelRun(pb.CancelRunRequest(run_id=waiting), metadata=md)).run
    assert done.status == pb.RUN_STATUS_CANCELLED and done.waiting_for == ""
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await s.CancelRun(pb.CancelRunRequest(run_id="no-such-run"), metadata=md)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    await channel.close()
    await channel2.close()


@SQLITE
async def test_manual_checkpoint_while_running_and_after(service, engine_factory, tenant) -> None:
    runner, other = engine_factory(service), engine_factory(service)
    channel, s, md = await engine_stub(runner, tenant)
    channel2, s2, _ = await engine_stub(other, tenant)
    nodes = chain(4, {"type": "sleep", "config": {"seconds": 0.3}})
    await s.RegisterWorkflow(pb.RegisterWorkflowRequest(definition=definition(nodes)), metadata=md)
    run_id = (await s.StartRun(pb.StartRunRequest(workflow_id="wf"), metadata=md)).run.run_id
    await wait_event(s, md, run_id, "node.completed", "n1")
    request = pb.CheckpointRunRequest(run_id=run_id, name="before-migration")
    request.metadata["ticket"] = "OPS-7"
    made = await s2.CheckpointRun(request, metadata=md)
    assert made.checkpoint_id
    await wait_status(s, md, run_id, pb.RUN_STATUS_COMPLETED)
    after = await s.CheckpointRun(
        pb.CheckpointRunRequest(run_id=run_id, name="archived"), metadata=md
    )
    checkpoints = {c.checkpoint_id: c for c in await history(service, tenant, run_id)}
    mine = checkpoints[made.checkpoint_id]
    assert (mine.trigger, mine.name, dict(mine.metadata)) == (
        cpb.TRIGGER_MANUAL,
        "before-migration",
        {"ticket": "OPS-7"},
    )
    assert {"n0", "n1"} <= set(mine.completed_nodes)
    assert checkpoints[after.checkpoint_id].name == "archived"
    run = (await s.GetRun(pb.GetRunRequest(run_id=run_id), metadata=md)).run
    assert run.status == pb.RUN_STATUS_COMPLETED and run.completed_nodes == 4
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await s.CheckpointRun(pb.CheckpointRunRequest(run_id=run_id), metadata=md)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    await channel.close()
    await channel2.close()


@SQLITE
async def test_failed_run_resumed_reruns_only_the_failed_node(
    service, engine_factory, tenant, tmp_path
) -> None:
    log_file, gate = tmp_path / "executions.log", tmp_path / "gate"
    log_file.write_text("")
    env = {"ENGINE_TEST_LOG": str(log_file), "ENGINE_TEST_GATE": str(gate)}
    engine = engine_factory(service, *HANDLERS, env=env)
    channel, s, md = await engine_stub(engine, tenant)
    record = {"type": "python", "config": {"handler": "tests.engine_handlers:record"}}
    nodes = [
        {**record, "id": "a"},
        {
            "id": "b",
            "type": "python",
            "depends_on": ["a"],
            "config": {"handler": "tests.engine_handlers:gated"},
            "retry": {"max_attempts": 2, "initial_backoff": "0.05s"},
        },
        {**record, "id": "c", "depends_on": ["a"]},
        {**record, "id": "d", "depends_on": ["b", "c"]},
    ]
    await s.RegisterWorkflow(pb.RegisterWorkflowRequest(definition=definition(nodes)), metadata=md)
    run_id = (await s.StartRun(pb.StartRunRequest(workflow_id="wf"), metadata=md)).run.run_id
    events = await asyncio.wait_for(watch(s, md, run_id), 30)
    assert events[-1].terminal and events[-1].status == pb.RUN_STATUS_FAILED
    failed = [e for e in events if e.type == "node.failed"]
    assert [(e.node_id, e.attempt) for e in failed] == [("b", 2)]
    assert "gate" in failed[0].error
    run = (await s.GetRun(pb.GetRunRequest(run_id=run_id), metadata=md)).run
    assert sorted(run.completed_node_ids) == ["a", "c"] and "b:" in run.error

    gate.write_text("open")
    resumed = (await s.ResumeRun(pb.ResumeRunRequest(run_id=run_id), metadata=md)).run
    assert resumed.status == pb.RUN_STATUS_RUNNING and resumed.error == ""
    events = await asyncio.wait_for(watch(s, md, run_id, after=events[-1].seq), 30)
    assert events[-1].status == pb.RUN_STATUS_COMPLETED
    assert sorted(log_file.read_text().split()) == ["a", "b", "b", "b", "c", "d"]
    full = await asyncio.wait_for(watch(s, md, run_id), 30)  # from seq 1, across the FAILED
    assert full[-1].status == pb.RUN_STATUS_COMPLETED and full[-1].seq == events[-1].seq
    await channel.close()


@SQLITE
async def test_a_node_that_overruns_its_timeout_fails(service, engine_factory, tenant) -> None:
    engine = engine_factory(service)
    channel, s, md = await engine_stub(engine, tenant)
    nodes = [
        {
            "id": "slow",
            "type": "sleep",
            "config": {"seconds": 30},
            "timeout": "0.3s",
            "retry": {"max_attempts": 2, "initial_backoff": "0.01s"},
        }
    ]
    await s.RegisterWorkflow(pb.RegisterWorkflowRequest(definition=definition(nodes)), metadata=md)
    run_id = (await s.StartRun(pb.StartRunRequest(workflow_id="wf"), metadata=md)).run.run_id
    events = await asyncio.wait_for(watch(s, md, run_id), 15)
    assert events[-1].status == pb.RUN_STATUS_FAILED
    failed = [e for e in events if e.type == "node.failed"]
    assert [(e.node_id, e.attempt, e.error) for e in failed] == [
        ("slow", 2, "timed out after 0.3s")
    ]
    await channel.close()


@pytest.fixture
def http_server() -> Iterator[tuple[str, list[dict]]]:
    """A real HTTP server on loopback: answers 201 with what it got; /fail answers 503."""
    received: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append({"path": self.path, "body": json.loads(body)})
            status = 503 if self.path == "/fail" else 201
            reply = json.dumps({"accepted": json.loads(body)}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", received
    server.shutdown()


@SQLITE
async def test_http_and_subworkflow_nodes(service, engine_factory, tenant, http_server) -> None:
    url, received = http_server
    engine = engine_factory(service, "--http-allow", "127.0.0.1")  # its local server
    channel, s, md = await engine_stub(engine, tenant)
    child = [
        {"id": "double", "type": "transform", "config": {"expression": "input['n'] * 2"}},
        {
            "id": "more",
            "type": "transform",
            "depends_on": ["double"],
            "config": {"expression": "double + 1"},
        },
    ]
    await s.RegisterWorkflow(
        pb.RegisterWorkflowRequest(definition=definition(child, "child")), metadata=md
    )
    nodes = [
        {
            "id": "child",
            "type": "subworkflow",
            "config": {"workflow_id": "child", "input": {"n": "${input['n']}"}},
        },
        {
            "id": "notify",
            "type": "http",
            "depends_on": ["child"],
            "config": {
                "method": "POST",
                "url": url + "/hook",
                "body": {"result": "${child['more']}", "note": "n was ${input['n']}"},
                "expect_status": 201,
            },
        },
    ]
    await s.RegisterWorkflow(pb.RegisterWorkflowRequest(definition=definition(nodes)), metadata=md)
    request = pb.StartRunRequest(workflow_id="wf")
    request.input.update({"n": 20})
    run_id = (await s.StartRun(request, metadata=md)).run.run_id
    run = await wait_status(s, md, run_id, pb.RUN_STATUS_COMPLETED)
    state = json_format.MessageToDict(run.state)
    assert state["child"] == {"double": 40, "more": 41}
    sent = {"result": 41, "note": "n was 20"}
    assert state["notify"] == {"status": 201, "body": {"accepted": sent}}
    assert received == [{"path": "/hook", "body": sent}]
    sub = (await s.GetRun(pb.GetRunRequest(run_id=f"{run_id}.child"), metadata=md)).run
    assert sub.status == pb.RUN_STATUS_COMPLETED and sub.workflow_id == "child"

    failing = [
        {
            "id": "call",
            "type": "http",
            "config": {"method": "POST", "url": url + "/fail", "body": {"x": 1}},
            "retry": {"max_attempts": 2, "initial_backoff": "0.01s"},
        }
    ]
    await s.RegisterWorkflow(
        pb.RegisterWorkflowRequest(definition=definition(failing, "failing")), metadata=md
    )
    run_id = (await s.StartRun(pb.StartRunRequest(workflow_id="failing"), metadata=md)).run.run_id
    run = await wait_status(s, md, run_id, pb.RUN_STATUS_FAILED)
    assert "answered 503" in run.error
    assert len([r for r in received if r["path"] == "/fail"]) == 2
    await channel.close()


@SQLITE
async def test_triggers_progress_and_eta(service, engine_factory, tenant) -> None:
    engine = engine_factory(service)
    channel, s, md = await engine_stub(engine, tenant)
    nodes = [
        *chain(3, {"type": "sleep", "config": {"seconds": 0.2}}, "w"),
        {"id": "long", "type": "sleep", "depends_on": ["w2"], "config": {"seconds": 1.2}},
        {"id": "deploy", "type": "noop", "depends_on": ["long"], "critical": True},
    ]
    policy = {
        "triggers": [
            "CHECKPOINT_TRIGGER_STEP_COMPLETED",
            "CHECKPOINT_TRIGGER_BEFORE_CRITICAL",
            "CHECKPOINT_TRIGGER_TIME_BASED",
        ],
        "interval": "0.3s",
    }
    await s.RegisterWorkflow(
        pb.RegisterWorkflowRequest(definition=definition(nodes, checkpoint=policy)), metadata=md
    )
    run_id = (await s.StartRun(pb.StartRunRequest(workflow_id="wf"), metadata=md)).run.run_id
    events = await asyncio.wait_for(watch(s, md, run_id), 30)
    assert events[-1].status == pb.RUN_STATUS_COMPLETED
    completed = [e for e in events if e.type == "node.completed"]
    assert [e.completed_nodes for e in completed] == [1, 2, 3, 4, 5]
    assert [round(e.progress_percent) for e in completed] == [20, 40, 60, 80, 100]
    # After w0 (0.2 s) four nodes are left, in four steps: the ETA is about 0.8 s.
    assert 0.5 < completed[0].eta_seconds < 2.0
    assert completed[-1].eta_seconds == 0.0
    assert completed[0].duration.ToTimedelta().total_seconds() >= 0.2
    started = [e.node_id for e in events if e.type == "node.started"]
    assert started == ["w0", "w1", "w2", "long", "deploy"]
    cps = await history(service, tenant, run_id)
    by_trigger: dict[int, list[cpb.Checkpoint]] = {}
    for c in cps:
        by_trigger.setdefault(c.trigger, []).append(c)
    assert [c.name for c in by_trigger[cpb.TRIGGER_BEFORE_CRITICAL]] == ["before:deploy"]
    # During the 1.2 s node, with a 0.3 s interval: at least three time-based checkpoints.
    during_long = [
        c for c in by_trigger[cpb.TRIGGER_TIME_BASED] if "w2" in c.completed_nodes
        and "long" not in c.completed_nodes
    ]  # fmt: skip
    assert len(during_long) >= 3
    await channel.close()


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
async def test_checkpoint_service_restarted_mid_run(
    service_process, engine_factory, tenant, tmp_path
) -> None:
    service = service_process
    log_file = tmp_path / "executions.log"
    log_file.write_text("")
    engine = engine_factory(service, *HANDLERS, env={"ENGINE_TEST_LOG": str(log_file)})
    channel, s, md = await engine_stub(engine, tenant)
    nodes = chain(12, {"type": "python", "config": {"handler": "tests.engine_handlers:record"}})
    await s.RegisterWorkflow(pb.RegisterWorkflowRequest(definition=definition(nodes)), metadata=md)
    run_ids = [
        (await s.StartRun(pb.StartRunRequest(workflow_id="wf"), metadata=md)).run.run_id
        for _ in range(3)
    ]
    deadline = time.monotonic() + 20
    while len(log_file.read_text().split()) < 9:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    await service.akill()  # no goodbye: in-flight calls fail mid-way
    await asyncio.sleep(1.5)
    await service.astart()
    for run_id in run_ids:
        run = await wait_status(s, md, run_id, pb.RUN_STATUS_COMPLETED, timeout=90)
        assert run.completed_nodes == 12
        assert sorted(json_format.MessageToDict(run.state)) == sorted(
            ["input", *(n["id"] for n in nodes)]
        )
    await channel.close()


@SQLITE
async def test_sigterm_hands_running_runs_over(service, engine_factory, tenant, tmp_path) -> None:
    log_file = tmp_path / "executions.log"
    log_file.write_text("")
    args = (*HANDLERS, "--lease-ttl", "1.5", "--recovery-interval", "0.3", "--tenants", tenant)
    env = {"ENGINE_TEST_LOG": str(log_file)}
    first = engine_factory(service, *args, env=env)
    channel, s, md = await engine_stub(first, tenant)
    nodes = chain(10, {"type": "python", "config": {"handler": "tests.engine_handlers:record"}})
    await s.RegisterWorkflow(pb.RegisterWorkflowRequest(definition=definition(nodes)), metadata=md)
    run_id = (await s.StartRun(pb.StartRunRequest(workflow_id="wf"), metadata=md)).run.run_id
    deadline = time.monotonic() + 20
    while len(log_file.read_text().split()) < 3:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    await channel.close()
    assert await first.aterminate() == 0
    newest = (await history(service, tenant, run_id))[0]
    assert (newest.trigger, newest.name) == (cpb.TRIGGER_PAUSE, "engine-shutdown")
    cp_channel, store, cp_md = await checkpoint_stub(service.address, tenant)
    request = cpb.GetThreadRequest(namespace="runs", thread_id=run_id)
    thread = (await store.GetThread(request, metadata=cp_md)).thread
    await cp_channel.close()
    assert thread.status == cpb.THREAD_STATUS_RUNNING and thread.lease_owner == ""
    handed_over = len(newest.completed_nodes)

    second = engine_factory(service, *args, env=env)
    channel, s, md = await engine_stub(second, tenant)
    run = await wait_status(s, md, run_id, pb.RUN_STATUS_COMPLETED, timeout=60)
    assert run.completed_nodes == 10
    executions = log_file.read_text().split()
    assert sorted(executions) == sorted(n["id"] for n in nodes), "a node ran twice"
    assert 3 <= handed_over < 10
    await channel.close()


@SQLITE
async def test_a_fresh_engine_finds_orphaned_runs_of_any_tenant(
    service, engine_factory, tenant, tmp_path
) -> None:
    """No --tenants: the engines record which tenants have runs in the store itself."""
    log_file = tmp_path / "executions.log"
    log_file.write_text("")
    args = (*HANDLERS, "--lease-ttl", "1.5", "--recovery-interval", "0.3")
    env = {"ENGINE_TEST_LOG": str(log_file)}
    first = engine_factory(service, *args, env=env)
    channel, s, md = await engine_stub(first, tenant)
    nodes = chain(8, {"type": "python", "config": {"handler": "tests.engine_handlers:record"}})
    await s.RegisterWorkflow(pb.RegisterWorkflowRequest(definition=definition(nodes)), metadata=md)
    run_id = (await s.StartRun(pb.StartRunRequest(workflow_id="wf"), metadata=md)).run.run_id
    deadline = time.monotonic() + 20
    while len(log_file.read_text().split()) < 2:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    await first.akill()
    await channel.close()

    second = engine_factory(service, *args, env=env)
    channel, s, md = await engine_stub(second, tenant)
    run = await wait_status(s, md, run_id, pb.RUN_STATUS_COMPLETED, timeout=60)
    assert run.completed_nodes == 8
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await s.ListRuns(pb.ListRunsRequest(), metadata=(("x-tenant-id", "engine.system"),))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    await channel.close()


@SQLITE
async def test_engine_metrics(service, engine_factory, tenant) -> None:
    port = free_port()
    engine = engine_factory(service, "--metrics-port", str(port))
    channel, s, md = await engine_stub(engine, tenant)
    nodes = [
        {"id": "a", "type": "transform", "config": {"expression": "1"}},
        {"id": "b", "type": "transform", "depends_on": ["a"], "config": {"expression": "1 / 0"}},
    ]
    await s.RegisterWorkflow(pb.RegisterWorkflowRequest(definition=definition(nodes)), metadata=md)
    run_id = (await s.StartRun(pb.StartRunRequest(workflow_id="wf"), metadata=md)).run.run_id
    await wait_status(s, md, run_id, pb.RUN_STATUS_FAILED)
    await asyncio.sleep(0.2)  # the execution winds down after its last checkpoint
    url = f"http://127.0.0.1:{port}/metrics"
    text = (await asyncio.to_thread(urllib.request.urlopen, url, timeout=5)).read().decode()
    assert 'engine_nodes_total{outcome="completed",type="transform"} 1.0' in text
    assert 'engine_nodes_total{outcome="failed",type="transform"} 1.0' in text
    assert 'engine_runs_stopped_total{status="FAILED"} 1.0' in text
    assert 'engine_checkpoints_total{trigger="ERROR"} 1.0' in text
    assert "engine_runs_executing 0.0" in text
    assert "checkpoint_" not in text, "the engine exports the store's series"
    await channel.close()


def test_the_engine_loads_none_of_the_stores_code() -> None:
    """The engine speaks to the store through the stubs and workflow_rpc only: importing it
    loads neither checkpoint_svc nor SQLAlchemy, Redis or asyncpg."""
    probe = (
        "import sys, engine_svc.server; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'checkpoint_svc', 'sqlalchemy', 'redis', 'asyncpg', 'aiosqlite'}))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=REPO_ROOT
    )
    assert loaded.stdout.strip() == "[]", loaded.stdout + loaded.stderr
