"""The Python client library, the `wf` command and `make demo`'s script, against real
services."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from workflow_client import (
    AsyncEngineClient,
    CheckpointClient,
    EngineClient,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
    state_of,
)
from workflow_stubs.engine.v1 import engine_pb2 as pb

SQLITE = pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
ROOT = Path(__file__).resolve().parent.parent
WF = str(Path(sys.executable).with_name("wf"))

DEFINITION = {
    "workflow_id": "etl",
    "nodes": [
        {"id": "extract", "type": "transform", "config": {"expression": "input['n'] * 10"}},
        {"id": "wait", "type": "sleep", "depends_on": ["extract"], "config": {"seconds": 0.2}},
        {
            "id": "load",
            "type": "transform",
            "depends_on": ["wait"],
            "config": {"expression": "extract + 1"},
        },
    ],
}


@SQLITE
def test_sync_client_runs_a_workflow_and_raises_typed_errors(
    service, engine_factory, tenant
) -> None:
    engine = engine_factory(service)
    with EngineClient(engine.address, tenant=tenant) as client:
        registered = client.register(DEFINITION)
        assert (registered.version, registered.created) == (1, True)
        run = client.start_run("etl", {"n": 4}, request_id="etl-1")
        events = list(client.watch(run.run_id))
        assert events[-1].terminal and events[-1].status == pb.RUN_STATUS_COMPLETED
        done = client.get_run(run.run_id)
        assert state_of(done) == {"input": {"n": 4}, "extract": 40, "wait": None, "load": 41}
        again = client.start_run("etl", {"n": 4}, request_id="etl-1")
        assert again.run_id == run.run_id
        assert [r.run_id for r in client.list_runs(page_size=1)] == [run.run_id]

        with pytest.raises(NotFound) as missing:
            client.get_run("no-such-run")
        assert missing.value.code == grpc.StatusCode.NOT_FOUND
        with pytest.raises(FailedPrecondition):
            client.resume_run(run.run_id)
        bad = {"workflow_id": "bad", "nodes": [{"id": "a", "type": "teleport"}]}
        with pytest.raises(InvalidArgument) as invalid:
            client.register(bad)
        assert ("nodes[0].type", invalid.value.violations[0][1]) == invalid.value.violations[0]
        assert "teleport" in str(invalid.value)
    with CheckpointClient(service.address, tenant=tenant) as store:
        history = list(store.checkpoints(run.run_id))
        assert history[-1].name == "start" and len(history) >= 3
    with EngineClient("127.0.0.1:1", timeout=2) as nowhere, pytest.raises(Unavailable):
        nowhere.get_run("x")


@SQLITE
async def test_async_watch_reconnects_across_an_engine_restart(
    service, engine_factory, tenant
) -> None:
    engine = engine_factory(service, "--recovery-interval", "0.3", "--lease-ttl", "1.5")
    nodes = [
        {
            "id": f"s{i}",
            "type": "sleep",
            "config": {"seconds": 0.3},
            "depends_on": [f"s{i - 1}"] if i else [],
        }
        for i in range(8)
    ]
    async with AsyncEngineClient(engine.address, tenant=tenant) as client:
        await client.register({"workflow_id": "slow", "nodes": nodes})
        run = await client.start_run("slow")
        seen: list[pb.RunEvent] = []
        async for event in client.watch(run.run_id):
            seen.append(event)
            if event.type == "node.completed" and event.node_id == "s2":
                await engine.arestart()  # the stream breaks; the watch reopens it
        assert [e.seq for e in seen] == list(range(1, len(seen) + 1)), "a gap or a repeat"
        assert seen[-1].status == pb.RUN_STATUS_COMPLETED
        completed = {e.node_id for e in seen if e.type == "node.completed"}
        assert completed == {f"s{i}" for i in range(8)}
        assert (await client.get_run(run.run_id)).completed_nodes == 8


def wf(engine, tenant: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [WF, "--engine", engine.address, "--tenant", tenant, *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        input=stdin,
    )


def register_yaml(engine, tenant: str, path: Path, text: str, *flags: str) -> None:
    """Write a definition to `path` and register it with `wf register`."""
    path.write_text(text)
    registered = wf(engine, tenant, "register", str(path), *flags)
    assert registered.returncode == 0, registered.stderr


@SQLITE
def test_the_wf_command(service, engine_factory, tenant, tmp_path) -> None:
    engine = engine_factory(service)
    definition = tmp_path / "etl.yaml"
    definition.write_text(
        "workflow_id: etl\n"
        "nodes:\n"
        "  - {id: extract, type: transform, config: {expression: \"input['n'] * 10\"}}\n"
        "  - {id: ask, type: approval, depends_on: [extract], config: {prompt: 'Load it?'}}\n"
        "  - {id: load, type: transform, depends_on: [ask], config: {expression: extract + 1}}\n"
    )
    registered = wf(engine, tenant, "register", str(definition))
    assert registered.returncode == 0, registered.stderr
    assert registered.stdout.strip() == "etl version 1 (new version)"
    started = wf(engine, tenant, "start", "etl", "--input", '{"n": 2}', "--watch")
    assert started.returncode == 12, started.stderr  # waiting for the approval
    run_id = started.stdout.splitlines()[0]
    assert "node.completed extract" in started.stdout
    assert "Load it?" in started.stderr
    answered = wf(engine, tenant, "resume", run_id, "--value", '{"ok": true}')
    assert answered.returncode == 0 and "RUNNING" in answered.stdout
    watched = wf(engine, tenant, "--json", "watch", run_id)
    assert watched.returncode == 0, watched.stderr
    events = [json.loads(line) for line in watched.stdout.splitlines()]
    assert events[-1]["status"] == "COMPLETED" and events[-1]["terminal"]
    shown = wf(engine, tenant, "--json", "show", run_id)
    state = json.loads(shown.stdout)["state"]
    assert state["load"] == 21 and state["ask"] == {"ok": True}
    runs = wf(engine, tenant, "runs", "--status", "completed")
    assert runs.stdout.split("\t")[0] == run_id
    checkpoint = wf(engine, tenant, "checkpoint", run_id, "--name", "audit", "--meta", "by=ci")
    assert checkpoint.returncode == 0
    history = wf(engine, tenant, "checkpoints", run_id)
    assert history.stdout.splitlines()[0].split("\t")[0] == checkpoint.stdout.strip()

    assert wf(engine, tenant, "show", "no-such-run").returncode == 3
    assert wf(engine, tenant, "resume", run_id).returncode == 5
    assert wf(engine, tenant, "start", "etl", "--input", "{oops").returncode == 2
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"workflow_id": "x", "nodes": [{"id": "a", "type": "nope"}]}))
    rejected = wf(engine, tenant, "register", str(broken))
    assert rejected.returncode == 2 and "nodes[0].type" in rejected.stderr
    # Issue 12, defect 6: each violation once, not in the message and again below it.
    assert rejected.stderr.count("nodes[0].type") == 1, rejected.stderr
    # ... and an unknown field is hinted with the names the docs use (depends_on).
    broken.write_text(json.dumps({"workflow_id": "x", "nodes": [{"id": "a", "after": ["b"]}]}))
    hinted = wf(engine, tenant, "register", str(broken))
    assert hinted.returncode == 2 and "'after'" in hinted.stderr, hinted.stderr
    assert "depends_on" in hinted.stderr and "dependsOn" not in hinted.stderr, hinted.stderr
    unreachable = subprocess.run(
        [WF, "--engine", "127.0.0.1:1", "--timeout", "2", "runs"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert unreachable.returncode == 6
    assert wf(engine, tenant, "--help").returncode == 0

    # Time travel from the command line: fork from the checkpoint after `extract`, patched.
    after_extract = next(
        line.split("\t")[0]
        for line in reversed(history.stdout.splitlines())
        if line.split("\t")[4] == "1"
    )
    forked = wf(engine, tenant, "fork", run_id, after_extract, "--patch", '{"extract": 5}')
    assert forked.returncode == 0, forked.stderr
    fork_id = forked.stdout.strip()
    assert wf(engine, tenant, "watch", fork_id).returncode == 12  # the approval again
    wf(engine, tenant, "resume", fork_id, "--value", "true")
    assert wf(engine, tenant, "watch", fork_id).returncode == 0
    fork_state = json.loads(wf(engine, tenant, "--json", "show", fork_id).stdout)["state"]
    assert (fork_state["extract"], fork_state["load"]) == (5, 6)
    assert wf(engine, tenant, "register", str(definition)).returncode == 0
    definition.write_text(definition.read_text().replace("extract + 1", "extract + 2"))
    assert "version 2 (new version)" in wf(engine, tenant, "register", str(definition)).stdout
    rolled = wf(engine, tenant, "rollback", "etl", "1", "--reason", "v2 is wrong", "--by", "ci")
    assert rolled.stdout.strip() == "etl: version 1 active (was 2)"
    versions = wf(engine, tenant, "versions", "etl").stdout.splitlines()
    assert versions[0].split("\t")[1:] == ["rollback", "1", "2", "ci", "v2 is wrong"]
    assert versions[-1] == "active version: 1"


def test_the_demo_runs_and_leaves_nothing_running() -> None:
    """`make demo`'s script: engine killed with SIGKILL mid-run, the run finished by another."""
    done = subprocess.run(
        [sys.executable, "scripts/demo.py"], capture_output=True, text=True, timeout=180, cwd=ROOT
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "killed engine-a with SIGKILL" in done.stdout
    assert "no node that finished ran again" in done.stdout
    assert "run.status COMPLETED" in done.stdout
    pattern = f"{ROOT / 'data' / 'demo'}|demo_handlers"
    left = subprocess.run(["pgrep", "-f", pattern], capture_output=True)
    assert left.returncode == 1, f"processes left running: {left.stdout!r}"


@SQLITE
def test_wf_names_a_missing_run_not_the_stores_thread(service, engine_factory, tenant) -> None:
    """Issue 12, defect 6: errors said `thread runs/garbage not found`, the store's internals."""
    engine = engine_factory(service)
    for command in (["show", "garbage"], ["resume", "garbage"], ["checkpoints", "garbage"],
                    ["cancel", "garbage"], ["watch", "garbage"]):  # fmt: skip
        failed = wf(engine, tenant, *command)
        assert failed.returncode == 3, (command, failed.stdout, failed.stderr)
        assert failed.stderr.strip() == "wf: NOT_FOUND: run 'garbage' not found", (
            command,
            failed.stderr,
        )


@SQLITE
def test_wf_bad_input_is_a_one_line_error_and_a_closed_pipe_is_quiet(
    service, engine_factory, tenant, tmp_path
) -> None:
    """Issue 12, defect 3: mis-indented YAML gave a traceback (exit 1), `--meta KEY` without
    `=` raised, and `wf show RUN | head` ended in a BrokenPipeError traceback."""
    engine = engine_factory(service)
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("workflow_id: etl\nnodes:\n  - id: a\n   type: noop\n")
    rejected = wf(engine, tenant, "register", str(bad_yaml))
    assert rejected.returncode == 2, rejected.stderr
    assert "Traceback" not in rejected.stderr and "bad.yaml" in rejected.stderr
    register_yaml(
        engine,
        tenant,
        tmp_path / "good.yaml",
        "workflow_id: etl\nnodes:\n  - {id: a, type: approval, config: {prompt: 'Go on?'}}\n",
    )
    run_id = wf(engine, tenant, "start", "etl").stdout.split()[0]
    no_value = wf(engine, tenant, "checkpoint", run_id, "--meta", "KEY")
    assert no_value.returncode == 2, no_value.stderr
    assert "Traceback" not in no_value.stderr and "KEY=VALUE" in no_value.stderr
    # A reader that stops at once: the rest of the output has nowhere to go.
    shown = subprocess.run(
        f"{WF} --engine {engine.address} --tenant {tenant} --json show {run_id} | true",
        shell=True, capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert "Traceback" not in shown.stderr and "BrokenPipe" not in shown.stderr, shown.stderr
    # Plain output too, and with stdout buffered as it is outside this test session.
    buffered = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    for command in ("show", "checkpoints"):
        piped = subprocess.run(
            f"{WF} --engine {engine.address} --tenant {tenant} {command} {run_id} | true",
            shell=True, capture_output=True, text=True, timeout=60, cwd=ROOT, env=buffered,
        )  # fmt: skip
        assert "BrokenPipe" not in piped.stderr and "Exception" not in piped.stderr, piped.stderr
    negative = wf(engine, tenant, "runs", "--limit", "-1")
    assert negative.returncode == 2 and "Traceback" not in negative.stderr, negative.stderr
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    nothing = wf(engine, tenant, "register", str(empty))
    assert nothing.returncode == 2 and "Traceback" not in nothing.stderr, nothing.stderr
    assert len(rejected.stderr.strip().splitlines()) == 1, rejected.stderr  # one line


@SQLITE
def test_wf_resume_of_an_approval_needs_an_answer(
    service, engine_factory, tenant, tmp_path
) -> None:
    """Issue 12, defect 5: `wf resume` without `--value` answered the approval with null, and
    the run then FAILED in the next node."""
    engine = engine_factory(service)
    register_yaml(
        engine,
        tenant,
        tmp_path / "ask.yaml",
        "workflow_id: ask\nnodes:\n"
        "  - {id: ask, type: approval, config: {prompt: 'Ship it?'}}\n"
        "  - {id: after, type: transform, depends_on: [ask],"
        " config: {expression: \"ask['ok']\"}}\n",
    )
    started = wf(engine, tenant, "start", "ask", "--watch")
    assert started.returncode == 12, started.stderr
    run_id = started.stdout.split()[0]
    for answer in ([], ["--value", "null"]):
        refused = wf(engine, tenant, "resume", run_id, *answer)
        assert refused.returncode == 2, (answer, refused.stdout, refused.stderr)
        assert "needs an answer" in refused.stderr, refused.stderr
    assert "WAITING" in wf(engine, tenant, "show", run_id).stdout
    assert wf(engine, tenant, "resume", run_id, "--value", '{"ok": true}').returncode == 0
    assert wf(engine, tenant, "watch", run_id).returncode == 0


def _on_a_terminal(argv: list[str], columns: int) -> str:
    """What `argv` prints on an 80-column terminal (a real pty: wf's tables are rich there)."""
    import os
    import pty

    leader, follower = pty.openpty()
    env = {**os.environ, "COLUMNS": str(columns), "LINES": "50", "TERM": "xterm"}
    done = subprocess.run(argv, stdout=follower, stderr=subprocess.STDOUT, env=env, timeout=60)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the pty's other side is closed and drained
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert done.returncode == 0, b"".join(chunks).decode(errors="replace")
    return b"".join(chunks).decode(errors="replace")


@SQLITE
def test_wf_tables_on_a_terminal_keep_whole_ids(service, engine_factory, tenant, tmp_path) -> None:
    """Issue 12, defect 9: the checkpoint table cut the ids that `wf fork` needs."""
    engine = engine_factory(service)
    register_yaml(
        engine,
        tenant,
        tmp_path / "two.yaml",
        "workflow_id: two-steps-with-a-long-name\nnodes:\n  - {id: a, type: noop}\n"
        "  - {id: b, type: noop, depends_on: [a]}\n",
    )
    started = wf(engine, tenant, "start", "two-steps-with-a-long-name", "--watch")
    run_id = started.stdout.split()[0]
    base = [WF, "--engine", engine.address, "--tenant", tenant]
    ids = [
        line.split("\t")[0]
        for line in wf(engine, tenant, "checkpoints", run_id).stdout.splitlines()
    ]
    table = _on_a_terminal([*base, "checkpoints", run_id], 80)
    for checkpoint_id in ids:
        assert checkpoint_id in table, table
    assert run_id in _on_a_terminal([*base, "runs"], 80)


@SQLITE
def test_wf_shows_a_run_running_while_its_first_node_runs(
    service, engine_factory, tenant, tmp_path
) -> None:
    """Issue 12, defect 1: `wf show RUN` said PENDING while the first node ran, and `wf runs
    --status running` was empty (the run's first checkpoint records it RUNNING now)."""
    engine = engine_factory(service)
    register_yaml(
        engine,
        tenant,
        tmp_path / "nap.yaml",
        "workflow_id: nap\nnodes:\n  - {id: nap, type: sleep, config: {seconds: 3}}\n",
    )
    run_id = wf(engine, tenant, "start", "nap").stdout.split()[0]
    shown = json.loads(wf(engine, tenant, "--json", "show", run_id).stdout)
    assert shown["status"] == "RUNNING", shown["status"]
    running = wf(engine, tenant, "runs", "--status", "running").stdout
    assert run_id in running, running


@pytest.mark.parametrize("backend", ["sqlite", "postgres"], indirect=True)
def test_wf_runs_lists_newest_first_and_filters_in_the_query(
    service, engine_factory, tenant, tmp_path
) -> None:
    """Issue 12, defect 2: `wf runs` listed oldest first (paged by run id) and filtered by
    workflow after paging, so `--limit 1` gave the oldest."""
    engine = engine_factory(service)
    for name in ("a", "b"):
        register_yaml(
            engine,
            tenant,
            tmp_path / f"{name}.yaml",
            f"workflow_id: {name}\nnodes:\n  - {{id: n, type: noop}}\n",
        )
    started = []
    for name in ("a", "b", "a", "b"):
        done = wf(engine, tenant, "start", name, "--watch")
        assert done.returncode == 0, done.stderr
        started.append((name, done.stdout.split()[0]))

    def listed(*args: str) -> list[str]:
        out = wf(engine, tenant, "runs", *args)
        assert out.returncode == 0, out.stderr
        return [line.split("\t")[0] for line in out.stdout.splitlines()]

    newest = [run_id for _, run_id in reversed(started)]
    assert listed() == newest
    assert listed("--limit", "1") == newest[:1]
    assert listed("--limit", "3") == newest[:3]
    of_a = [run_id for name, run_id in reversed(started) if name == "a"]
    assert listed("--workflow", "a") == of_a
    assert listed("--workflow", "a", "--limit", "1") == of_a[:1]


@SQLITE
def test_wf_json_is_typed_accepted_anywhere_and_errors_too(
    service, engine_factory, tenant, tmp_path
) -> None:
    """Issue 12, defect 7: --json gave 21.0 for 21, versions as strings and statuses as
    RUN_STATUS_WAITING; errors stayed text; `wf start X --json` was refused."""
    engine = engine_factory(service)
    register_yaml(
        engine,
        tenant,
        tmp_path / "ask.yaml",
        "workflow_id: typed\nnodes:\n"
        "  - {id: n, type: transform, config: {expression: \"input['x'] + 1\"}}\n"
        "  - {id: ask, type: approval, depends_on: [n], config: {prompt: 'ok?'}}\n",
        "--json",
    )
    started = wf(engine, tenant, "start", "typed", "--input", '{"x": 20}', "--watch", "--json")
    assert started.returncode == 12, started.stderr
    events = [json.loads(line) for line in started.stdout.splitlines()]
    assert events[-1]["status"] == "WAITING" and isinstance(events[-1]["seq"], int)
    run_id = events[0]["run_id"]  # the run, then its events
    shown = json.loads(wf(engine, tenant, "show", run_id, "--json").stdout)
    assert shown["state"]["n"] == 21 and isinstance(shown["state"]["n"], int)
    assert shown["version"] == 1 and shown["status"] == "WAITING"
    assert isinstance(shown["completed_nodes"], int)
    missing = wf(engine, tenant, "show", "garbage", "--json")
    assert missing.returncode == 3
    assert json.loads(missing.stderr)["error"] == {
        "code": "NOT_FOUND",
        "message": "run 'garbage' not found",
        "violations": [],
    }
    bad_value = wf(engine, tenant, "--json", "resume", run_id, "--value", "{")
    assert bad_value.returncode == 2
    assert json.loads(bad_value.stderr)["error"]["code"] == "INVALID_ARGUMENT", bad_value.stderr
    version = subprocess.run([WF, "--version"], capture_output=True, text=True, timeout=30)
    assert version.returncode == 0 and version.stdout.startswith("wf "), version


@SQLITE
def test_wf_pause_says_pausing_and_a_resume_before_it_applies_takes_it_back(
    service, engine_factory, tenant, tmp_path
) -> None:
    """Issue 12, defect 4: `wf pause RUN` printed RUNNING, and a `wf resume RUN` right after
    failed "is RUNNING"."""
    gate = tmp_path / "gate"  # the first node runs until the test opens it
    engine = engine_factory(
        service, "--handlers", "tests.engine_handlers", env={"ENGINE_TEST_GATE": str(gate)}
    )
    register_yaml(
        engine,
        tenant,
        tmp_path / "slow.yaml",
        "workflow_id: slow\nnodes:\n"
        "  - {id: nap, type: python, config: {handler: 'tests.engine_handlers:held'}}\n"
        "  - {id: after, type: noop, depends_on: [nap]}\n",
    )
    run_id = wf(engine, tenant, "start", "slow").stdout.split()[0]
    refused = wf(engine, tenant, "resume", run_id)  # running, and nothing to take back
    assert refused.returncode == 5 and "RUNNING" in refused.stderr, refused.stderr
    paused = wf(engine, tenant, "pause", run_id)
    assert paused.returncode == 0 and "PAUSING" in paused.stdout, paused.stdout + paused.stderr
    resumed = wf(engine, tenant, "resume", run_id)
    assert resumed.returncode == 0 and "RUNNING" in resumed.stdout, resumed.stderr
    gate.touch()  # the node ends: the pause, had it stayed, would apply now
    watched = wf(engine, tenant, "watch", run_id)
    assert watched.returncode == 0, watched.stdout + watched.stderr  # COMPLETED, never PAUSED
    events = wf(engine, tenant, "--json", "watch", run_id).stdout.splitlines()
    types = [json.loads(line)["type"] for line in events]
    assert "run.pausing" in types and "run.unpaused" in types
    statuses = [json.loads(line)["status"] for line in events if '"run.status"' in line]
    assert "PAUSED" not in statuses, statuses


def test_every_wf_flag_has_help_and_the_shell_completes_commands() -> None:
    """Issue 12, defects 7 and 10: flags without help, and no shell completion."""
    top = subprocess.run([WF, "--help"], capture_output=True, text=True, timeout=30, check=True)
    commands = re.findall(r"^    ([a-z]+)  ", top.stdout, re.M)  # under COMMAND
    assert {"start", "watch", "completion"} <= set(commands), top.stdout
    for command in ["", *commands]:
        shown = subprocess.run(
            [WF, *([command] if command else []), "--help"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        lines = shown.split("options:", 1)[1].split("exit codes:", 1)[0].splitlines()
        # An option with nothing after its metavar, and no help on the next line (argparse
        # puts it there after a long option), is a flag without help.
        bare = [
            line.strip()
            for line, after in zip(lines, [*lines[1:], ""], strict=True)
            if re.fullmatch(r"  -[^ ]*( [A-Z_=]+|\s\{[^ ]*\})?(, -[^ ]*( [A-Z_=]+)?)*", line)
            and not re.match(r" {10,}\S", after)
        ]
        assert not bare, f"wf {command}: {bare}"
    script = subprocess.run(
        [WF, "completion", "bash"], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    assert "complete" in script and "checkpoints" in script and "--interrupt-before" in script
