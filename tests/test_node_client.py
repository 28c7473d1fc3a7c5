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
