"""The Node.js client (clients/node/), loaded from protos/ alone with @grpc/proto-loader and run
with the machine's `node` against real services: proof that polyglot clients work."""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import subprocess
import threading
import time
from datetime import datetime
from typing import Any

import grpc
import pytest
from google.protobuf import json_format

from tests.engine_client import definition
from tests.servers import REPO_ROOT, free_port
from workflow_stubs.engine.v1 import engine_pb2 as pb
from workflow_stubs.engine.v1 import engine_pb2_grpc as pb_grpc

SQLITE = pytest.mark.parametrize("backend", ["sqlite"], indirect=True)

EXAMPLE = "clients/node/example.js"
WATCH = "clients/node/watch.js"
NODES = ["fetch", "validate_qty", "validate_price", "summarise", "publish"]
# `[ 40.0%] 2/5 node.completed validate_qty eta 0.3s ...`
EVENT_LINE = re.compile(r"^\[\s*(\d+\.\d)%\] (\d+)/(\d+) (\S+) (\S+) eta (\S+)")
RUN_LINE = re.compile(r"^run (\S+) started: [A-Z]+, 5 nodes$")
WATCH_LINE = re.compile(r"^seq=(\d+) (\S+) (\S+) (\S+) \d+/\d+ [\d.]+%( terminal)?$")


def node() -> str:
    """The machine's Node.js; a missing one fails the test (CI has it, nothing installs it)."""
    path = shutil.which("node")
    if path is None:
        pytest.fail("`node` (Node.js >= 18) is not on PATH: the Node.js client cannot be tested")
    if not (REPO_ROOT / "node_modules" / "@grpc" / "grpc-js").is_dir():
        pytest.fail("node_modules/@grpc/grpc-js is missing: run `npm install` at the repo root")
    return path


def node_env() -> dict[str, str]:
    """The environment without proxies, so loopback calls go straight to the services."""
    proxies = {"http_proxy", "https_proxy", "grpc_proxy", "all_proxy"}
    return {k: v for k, v in os.environ.items() if k.lower() not in proxies}


def run_node(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [node(), *args], cwd=REPO_ROOT, env=node_env(), capture_output=True, text=True,
        timeout=timeout, stdin=subprocess.DEVNULL, check=False,
    )  # fmt: skip


def engine_stub(address: str) -> tuple[grpc.Channel, pb_grpc.EngineServiceStub]:
    channel = grpc.insecure_channel(address, options=[("grpc.enable_http_proxy", 0)])
    return channel, pb_grpc.EngineServiceStub(channel)


def python_watch(stub: pb_grpc.EngineServiceStub, md, run_id: str) -> list[pb.RunEvent]:
    items = stub.WatchRun(pb.WatchRunRequest(run_id=run_id), metadata=md, timeout=30)
    return [item.event for item in items if item.HasField("event")]


@SQLITE
def test_node_example_runs_a_workflow_and_prints_its_progress(
    service, engine_factory, tenant
) -> None:
    engine = engine_factory(service)
    result = run_node(EXAMPLE, "--engine", engine.address, "--tenant", tenant)
    output = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 0, output
    lines = result.stdout.splitlines()

    started = [m for line in lines if (m := RUN_LINE.match(line))]
    assert len(started) == 1, output
    run_id = started[0].group(1)

    events = [m.groups() for line in lines if (m := EVENT_LINE.match(line))]
    kinds = [(kind, what) for _, _, _, kind, what, _ in events]
    for node_id in NODES:
        assert kinds.count(("node.started", node_id)) == 1, (node_id, output)
        assert kinds.count(("node.completed", node_id)) == 1, (node_id, output)
        assert kinds.index(("node.started", node_id)) < kinds.index(("node.completed", node_id))
    for validation in ("validate_qty", "validate_price"):  # the DAG's order, as printed
        assert kinds.index(("node.completed", "fetch")) < kinds.index(("node.started", validation))
        assert kinds.index(("node.completed", validation)) < kinds.index(
            ("node.started", "summarise")
        )
    percents = [float(pct) for pct, *_ in events]
    assert max(percents) == 100.0 and percents[0] == 0.0, output
    assert all(total == "5" for _, _, total, *_ in events), "every line shows the run's 5 nodes"
    assert events[-1][:5] == ("100.0", "5", "5", "run.status", "COMPLETED"), output
    assert any(eta != "-" for *_, eta in events), "an ETA once nodes have durations"

    assert "final status: COMPLETED" in lines, output
    state_lines = [line.removeprefix("final state: ") for line in lines if "final state: " in line]
    assert len(state_lines) == 1, output
    state = json.loads(state_lines[0])
    assert state["summarise"] == {"orders": 3, "items": 6, "total": 42.75, "valid": True}
    assert state["validate_qty"] is True and state["validate_price"] is True
    assert state["fetch"] is None and state["publish"] is None
    assert state["input"]["orders"][0] == {"id": "A-1", "qty": 2, "price": 9.5}

    # The same run, seen from Python: the Node client created it and both see the same things.
    md = (("x-tenant-id", tenant),)
    channel, stub = engine_stub(engine.address)
    with channel:
        run = stub.GetRun(pb.GetRunRequest(run_id=run_id), metadata=md, timeout=10).run
        assert run.status == pb.RUN_STATUS_COMPLETED
        assert run.workflow_id == "node-client-example"
        assert sorted(run.completed_node_ids) == sorted(NODES)
        assert json_format.MessageToDict(run.state) == state  # 2.0 == 2: Struct numbers
        got = stub.GetWorkflow(
            pb.GetWorkflowRequest(workflow_id="node-client-example"), metadata=md, timeout=10
        )
        nodes = {n["id"]: n for n in json_format.MessageToDict(got.definition)["nodes"]}
        assert list(nodes) == NODES
        assert nodes["fetch"]["config"] == {"seconds": 0.2}, "a Struct config sent from JS"
        assert nodes["summarise"]["dependsOn"] == ["validate_qty", "validate_price"]
        watched = python_watch(stub, md, run_id)
    assert len(watched) == len(events), "one line per event, none lost or repeated"
    assert [e.type for e in watched] == [kind for kind, _ in kinds]
    assert [e.node_id for e in watched if e.node_id] == [
        what for kind, what in kinds if kind.startswith("node.")
    ]


def test_node_example_says_when_the_engine_is_unreachable() -> None:
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    result = run_node(EXAMPLE, "--engine", address, "--tenant", "nobody", timeout=30)
    assert result.returncode == 3, result
    assert f"cannot reach the engine at {address}" in result.stderr, result.stderr
    assert "UNAVAILABLE" in result.stderr
    assert "final status" not in result.stdout

    usage = run_node(EXAMPLE, timeout=30)
    assert usage.returncode == 2 and "usage:" in usage.stderr


@SQLITE
def test_node_watch_reconnects_after_its_engine_dies(service, engine_factory, tenant) -> None:
    """watchRun through an engine that is killed and restarted mid-run (another engine runs
    the run): it reconnects from its last seq, so every event arrives once, in order."""
    runner, watcher = engine_factory(service), engine_factory(service)
    md = (("x-tenant-id", tenant),)
    nodes = [
        {"id": f"n{i}", "type": "sleep", "config": {"seconds": 0.3}}
        | ({"depends_on": [f"n{i - 1}"]} if i else {})
        for i in range(8)
    ]
    channel, stub = engine_stub(runner.address)
    with channel:
        stub.RegisterWorkflow(
            pb.RegisterWorkflowRequest(definition=definition(nodes)), metadata=md, timeout=10
        )
        run_id = stub.StartRun(
            pb.StartRunRequest(workflow_id="wf"), metadata=md, timeout=10
        ).run.run_id

        proc = subprocess.Popen(
            [node(), WATCH, "--engine", watcher.address, "--tenant", tenant, run_id],
            cwd=REPO_ROOT, env=node_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        lines: queue.Queue[str | None] = queue.Queue()

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.put(line.rstrip("\n"))
            lines.put(None)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            seen: list[str] = []
            deadline = time.monotonic() + 30
            while not any(" node.completed n1 " in line for line in seen):
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
                assert line is not None, f"watch.js ended early: {seen} {proc.stderr}"
                seen.append(line)
            watcher.kill()  # SIGKILL: the stream breaks with UNAVAILABLE
            time.sleep(1.0)  # the run goes on meanwhile, on the other engine
            watcher.start()
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        reader.join(10)
        while (line := lines.get_nowait()) is not None:
            seen.append(line)
        stderr = proc.stderr.read() if proc.stderr else ""
        output = "\n".join(seen) + f"\nstderr:\n{stderr}"
        assert proc.returncode == 0, output
        assert "reconnecting after seq " in stderr and "UNAVAILABLE" in stderr, output
        assert seen[-1] == "final status: COMPLETED", output
        printed = [m.groups() for line in seen if (m := WATCH_LINE.match(line))]
        assert len(printed) == len(seen) - 1, output
        seqs = [int(seq) for seq, *_ in printed]
        watched = python_watch(stub, md, run_id)
        assert seqs == [e.seq for e in watched] == list(range(1, len(watched) + 1)), output
        assert [kind for _, kind, *_ in printed] == [e.type for e in watched]
        killed_at = next(i for i, (_, kind, node_id, *_) in enumerate(printed)
                         if (kind, node_id) == ("node.completed", "n1"))  # fmt: skip
        assert killed_at < len(printed) - 5, "the run was far from over when the watcher died"
        assert printed[-1][4] == " terminal" and printed[-1][3] == "COMPLETED"


HISTORY = "clients/node/history_example.js"
PACKAGE = "@durable-workflows/client"


def labelled(stdout: str) -> list[tuple[str, Any]]:
    """history_example.js's `label: JSON` lines."""
    steps = []
    for line in stdout.splitlines():
        label, sep, rest = line.partition(": ")
        assert sep, f"not a `label: JSON` line: {line!r}"
        steps.append((label, json.loads(rest)))
    return steps


def iso_ms(text: str) -> int:
    """A JS Date's ISO string as milliseconds since the epoch (a Timestamp's ToMilliseconds)."""
    return round(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000)


def run_status(status: int) -> str:
    return pb.RunStatus.Name(status).removeprefix("RUN_STATUS_")


def checkpoint_as_js(cp: pb.RunCheckpoint) -> dict[str, Any]:
    """A RunCheckpoint as history_example.js prints it (createdAt in milliseconds)."""
    return {
        "checkpointId": cp.checkpoint_id,
        "parentId": cp.parent_id,
        "step": cp.step,
        "trigger": pb.CheckpointTrigger.Name(cp.trigger),
        "name": cp.name,
        "completedNodeIds": list(cp.completed_node_ids),
        "progressPercent": cp.progress_percent,
        "createdAt": cp.created_at.ToMilliseconds(),
        "metadata": dict(cp.metadata),
        "state": json_format.MessageToDict(cp.state),
        "status": run_status(cp.status),
    }


def versions_as_js(res: pb.ListWorkflowVersionsResponse) -> dict[str, Any]:
    return {
        "versions": [
            {"version": v.version, "createdAt": v.created_at.ToMilliseconds(), "active": v.active}
            for v in res.versions
        ],
        "activeVersion": res.active_version,
        "history": [
            {
                "kind": h.kind,
                "version": h.version,
                "previousVersion": h.previous_version,
                "reason": h.reason,
                "requestedBy": h.requested_by,
                "time": h.time.ToMilliseconds(),
            }
            for h in res.history
        ],
    }


def js_times(value: dict[str, Any], *keys: str) -> dict[str, Any]:
    return value | {k: iso_ms(value[k]) for k in keys}


def js_versions(listed: dict[str, Any]) -> dict[str, Any]:
    return listed | {
        "versions": [js_times(v, "createdAt") for v in listed["versions"]],
        "history": [js_times(h, "time") for h in listed["history"]],
    }


@SQLITE
def test_node_client_waits_resumes_forks_and_rolls_back(service, engine_factory, tenant) -> None:
    """history_example.js: watchRun returns at WAITING (and goes past it with follow, or once
    the run has left it), then GetRunHistory, ForkRun with a patch, ListWorkflowVersions and
    RollbackWorkflow, each result checked against the engine from Python."""
    engine = engine_factory(service)
    workflow_id = "node-history"
    result = run_node(
        HISTORY, "--engine", engine.address, "--tenant", tenant, "--workflow", workflow_id
    )
    output = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 0, output
    steps = labelled(result.stdout)
    assert [label for label, _ in steps] == [
        "registered", "started", "waiting", "resumed", "followed", "replayed", "final",
        "history", "paged", "forked", "fork watched", "fork final",
        "registered", "versions", "rollback", "versions",
    ], output  # fmt: skip
    (
        reg1, started, waiting, resumed, followed, replayed, final,
        history, paged, forked, fork_watched, fork_final,
        reg2, versions_before, rollback, versions_after,
    ) = [value for _, value in steps]  # fmt: skip

    assert reg1 == {"workflowId": workflow_id, "version": 1, "created": True}
    assert reg2 == {"workflowId": workflow_id, "version": 2, "created": True}
    run_id = started["runId"]
    assert started["version"] == 1
    md = (("x-tenant-id", tenant),)
    channel, stub = engine_stub(engine.address)
    with channel:
        events = python_watch(stub, md, run_id)
        waited_at = next(
            e for e in events if e.type == "run.status" and e.status == pb.RUN_STATUS_WAITING
        )
        assert waited_at.seq < events[-1].seq
        # Stopped at the WAITING event (every event up to it delivered), the run still WAITING.
        assert waiting == {
            "status": "WAITING", "type": "run.status", "seq": waited_at.seq, "terminal": False,
            "events": waited_at.seq, "runStatus": "WAITING", "waitingFor": "Ship these orders?",
        }, output  # fmt: skip
        assert resumed["status"] != "WAITING"
        ended = {
            "status": "COMPLETED", "type": "run.status", "seq": events[-1].seq,
            "terminal": True, "events": len(events),
        }  # fmt: skip
        assert followed == ended, "follow: past the WAITING, answered meanwhile, to the end"
        assert replayed == ended, "a replayed WAITING the run has left does not stop it"

        run = stub.GetRun(pb.GetRunRequest(run_id=run_id), metadata=md, timeout=10).run
        state = {
            "input": {"qty": 3, "price": 2.5}, "total": 7.5, "approve": "yes",
            "ship": {"total": 7.5, "approved": "yes"},
        }  # fmt: skip
        assert final == {"status": "COMPLETED", "state": state}
        assert run.status == pb.RUN_STATUS_COMPLETED
        assert json_format.MessageToDict(run.state) == state

        def python_history(run: str) -> list[pb.RunCheckpoint]:
            request = pb.GetRunHistoryRequest(run_id=run, include_state=True)
            return list(stub.GetRunHistory(request, metadata=md, timeout=10).checkpoints)

        checkpoints = python_history(run_id)
        ids = [cp.checkpoint_id for cp in checkpoints]
        assert history["nextPageToken"] == ""
        assert [js_times(cp, "createdAt") for cp in history["checkpoints"]] == [
            checkpoint_as_js(cp) for cp in checkpoints
        ]
        assert any(cp["status"] == "WAITING" for cp in history["checkpoints"])
        assert paged == {"first": ids[:2], "second": ids[2:4], "more": len(ids) > 2}

        # The fork: from the run's first checkpoint, input patched and the approval given.
        assert forked["from"] == ids[-1] and checkpoints[-1].completed_node_ids == []
        assert forked["workflowId"] == workflow_id and forked["version"] == 1
        fork_id = forked["runId"]
        assert fork_id != run_id
        fork_events = python_watch(stub, md, fork_id)
        assert fork_watched == {
            "status": "COMPLETED", "type": "run.status", "seq": fork_events[-1].seq,
            "terminal": True, "events": len(fork_events),
        }  # fmt: skip
        fork_state = {
            "input": {"qty": 10, "price": 2.5}, "total": 25, "approve": "auto",
            "ship": {"total": 25, "approved": "auto"},
        }  # fmt: skip
        assert fork_final == {"status": "COMPLETED", "state": fork_state}
        fork_run = stub.GetRun(pb.GetRunRequest(run_id=fork_id), metadata=md, timeout=10).run
        assert fork_run.status == pb.RUN_STATUS_COMPLETED
        assert json_format.MessageToDict(fork_run.state) == fork_state
        first_of_fork = python_history(fork_id)[-1]
        assert first_of_fork.parent_id == ids[-1]
        assert dict(first_of_fork.metadata) == {
            "forked_from_run": run_id, "forked_from_checkpoint": ids[-1],
        }  # fmt: skip
        assert [cp.checkpoint_id for cp in python_history(run_id)] == ids, "the original stays"

        # Versions: v2 registered, then v1 made active again.
        listed = versions_as_js(
            stub.ListWorkflowVersions(
                pb.ListWorkflowVersionsRequest(workflow_id=workflow_id), metadata=md, timeout=10
            )
        )
        assert rollback == {"activeVersion": 1, "previousVersion": 2}
        assert js_versions(versions_after) == listed
        assert listed["activeVersion"] == 1
        assert listed["history"][0] == listed["history"][0] | {
            "kind": "rollback", "version": 1, "previousVersion": 2,
            "reason": "v2 ships too much", "requestedBy": "history_example.js",
        }  # fmt: skip
        before = js_versions(versions_before)
        assert before["activeVersion"] == 2
        assert before["history"] == listed["history"][1:]
        assert [(v["version"], v["active"]) for v in before["versions"]] == [
            (v["version"], v["version"] == 2) for v in listed["versions"]
        ]


def start_node(*args: str) -> tuple[subprocess.Popen[str], queue.Queue[str | None]]:
    """A node process and a queue of its stdout lines (None at the end)."""
    proc = subprocess.Popen(
        [node(), *args], cwd=REPO_ROOT, env=node_env(), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return proc, lines


@SQLITE
def test_node_watch_stops_at_paused_and_waiting_unless_follow(
    service, engine_factory, tenant
) -> None:
    """watch.js returns (exit 4) when the run is PAUSED or WAITING, not at a replayed PAUSED
    the run has left; with --follow it goes on through the WAITING to the end."""
    engine = engine_factory(service)
    md = (("x-tenant-id", tenant),)
    nodes = [
        {"id": "first", "type": "transform", "config": {"expression": "1"}},
        {"id": "approve", "type": "approval", "depends_on": ["first"],
         "config": {"prompt": "go on?"}},
        {"id": "last", "type": "noop", "depends_on": ["approve"]},
    ]  # fmt: skip

    def watch_js(*extra: str) -> tuple[int, list[tuple[str, ...]], str]:
        result = run_node(WATCH, "--engine", engine.address, "--tenant", tenant, *extra)
        lines = result.stdout.splitlines()
        printed = [m.groups() for line in lines if (m := WATCH_LINE.match(line))]
        assert len(printed) == len(lines) - 1, result
        return result.returncode, printed, lines[-1]

    channel, stub = engine_stub(engine.address)
    with channel:
        stub.RegisterWorkflow(
            pb.RegisterWorkflowRequest(definition=definition(nodes)), metadata=md, timeout=10
        )
        start = pb.StartRunRequest(workflow_id="wf", interrupt_before=["first"])
        run_id = stub.StartRun(start, metadata=md, timeout=10).run.run_id

        def status() -> int:
            return stub.GetRun(pb.GetRunRequest(run_id=run_id), metadata=md, timeout=10).run.status

        code, printed, last = watch_js(run_id)
        assert (code, last) == (4, "final status: PAUSED"), printed
        assert printed[-1][1:4] == ("run.status", "-", "PAUSED")
        assert status() == pb.RUN_STATUS_PAUSED

        stub.ResumeRun(pb.ResumeRunRequest(run_id=run_id), metadata=md, timeout=40)
        deadline = time.monotonic() + 15
        while status() != pb.RUN_STATUS_WAITING:
            assert time.monotonic() < deadline, "the run never got to its approval"
            time.sleep(0.05)
        code, printed, last = watch_js(run_id)
        assert (code, last) == (4, "final status: WAITING"), printed
        statuses = [s for _, kind, _, s, _ in printed if kind == "run.status"]
        assert "PAUSED" in statuses and statuses[-1] == "WAITING", "past the replayed PAUSED"

        proc, lines = start_node(WATCH, "--engine", engine.address, "--tenant", tenant,
                                 "--follow", run_id)  # fmt: skip
        try:
            seen: list[str] = []
            deadline = time.monotonic() + 15
            while not any(
                (m := WATCH_LINE.match(line)) and m.group(2, 4) == ("run.status", "WAITING")
                for line in seen
            ):
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
                assert line is not None, f"watch.js --follow ended early: {seen}"
                seen.append(line)
            time.sleep(0.3)  # it goes on watching the WAITING run
            assert proc.poll() is None, seen
            value = pb.ResumeRunRequest(run_id=run_id)
            value.value.string_value = "yes"
            stub.ResumeRun(value, metadata=md, timeout=40)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        while (line := lines.get(timeout=10)) is not None:
            seen.append(line)
        assert proc.returncode == 0, seen
        assert seen[-1] == "final status: COMPLETED", seen
        assert status() == pb.RUN_STATUS_COMPLETED

        code, printed, last = watch_js(run_id)  # replays PAUSED and WAITING: the run left both
        assert (code, last) == (0, "final status: COMPLETED"), printed
        assert printed[-1][4] == " terminal"
        assert [int(seq) for seq, *_ in printed] == [e.seq for e in python_watch(stub, md, run_id)]


@SQLITE
def test_node_package_installs_and_works_outside_the_repo(
    service, engine_factory, tenant, tmp_path
) -> None:
    """`npm pack` ships the client with its protos; installed from the tarball in a directory
    outside the repository, `require` finds both and the client talks to the engine."""
    npm = shutil.which("npm")
    if npm is None:
        pytest.fail("`npm` is not on PATH: the Node.js package cannot be tested")
    node_bin = node()
    pack_dir, app = tmp_path / "pack", tmp_path / "app"
    pack_dir.mkdir()
    app.mkdir()
    # Packed from a copy laid out as the repository is: prepack's protos/ next to client.js
    # would otherwise show, for a moment, to the Node processes of other tests.
    source = tmp_path / "source"
    shutil.copytree(REPO_ROOT / "protos", source / "protos")
    shutil.copytree(
        REPO_ROOT / "clients" / "node", source / "clients" / "node",
        ignore=shutil.ignore_patterns("node_modules", "protos", "*.tgz"),
    )  # fmt: skip
    packed = subprocess.run(
        [npm, "pack", "--json", "--pack-destination", str(pack_dir)],
        cwd=source / "clients" / "node", capture_output=True, text=True, timeout=60,
        stdin=subprocess.DEVNULL, check=False,
    )  # fmt: skip
    assert packed.returncode == 0, packed
    (info,) = json.loads(packed.stdout)
    assert info["name"] == PACKAGE
    assert {f["path"] for f in info["files"]} == {
        "package.json", "README.md", "client.js", "watch.js", "example.js",
        "protos/engine/v1/engine.proto",
    }  # fmt: skip
    assert not (source / "clients" / "node" / "protos").exists(), "postpack removes the copy"

    (app / "package.json").write_text('{"name": "app", "private": true}\n')
    installed = subprocess.run(
        [npm, "install", "--prefer-offline", "--no-audit", "--no-fund", "--loglevel=error",
         str(pack_dir / info["filename"])],
        cwd=app, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
        check=False,
    )  # fmt: skip
    assert installed.returncode == 0, installed
    package_dir = app / "node_modules" / "@durable-workflows" / "client"
    shipped = package_dir / "protos" / "engine" / "v1" / "engine.proto"
    assert shipped.read_text() == (REPO_ROOT / "protos/engine/v1/engine.proto").read_text()
    assert (app / "node_modules" / "@grpc" / "grpc-js").is_dir(), "its dependencies came along"

    engine = engine_factory(service)
    md = (("x-tenant-id", tenant),)
    nodes = [{"id": "double", "type": "transform", "config": {"expression": "input['n'] * 2"}}]
    channel, stub = engine_stub(engine.address)
    with channel:
        stub.RegisterWorkflow(
            pb.RegisterWorkflowRequest(definition=definition(nodes)), metadata=md, timeout=10
        )
        start = pb.StartRunRequest(workflow_id="wf")
        start.input.update({"n": 21})
        run_id = stub.StartRun(start, metadata=md, timeout=10).run.run_id
    script = """
const { EngineClient, PROTO_ROOT, statusName } = require('@durable-workflows/client');
const [address, tenant, runId] = process.argv.slice(1);
const engine = new EngineClient(address, { tenant });
engine
  .watchRun(runId)
  .then(() => engine.getRun(runId))
  .then((run) => console.log(JSON.stringify({ root: PROTO_ROOT, status: statusName(run.status),
                                              state: run.state })))
  .finally(() => engine.close());
"""
    result = subprocess.run(
        [node_bin, "-e", script, engine.address, tenant, run_id], cwd=app, env=node_env(),
        capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result
    got = json.loads(result.stdout)
    assert os.path.realpath(got["root"]) == os.path.realpath(package_dir / "protos")
    assert got["status"] == "COMPLETED"
    assert got["state"] == {"input": {"n": 21}, "double": 42}
