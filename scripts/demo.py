"""`make demo`: both services on SQLite, a release workflow with a live progress bar, the
engine killed with SIGKILL half-way, a new engine continuing the run from its last
checkpoint, an approval answered, and everything stopped again.

Writes nothing outside ./data/demo. Uses only the `wf` command and the Python client, as a
user would.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from workflow_client import CheckpointClient, EngineClient

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "demo"
PY = sys.executable
WF = str(Path(PY).with_name("wf"))


def say(text: str) -> None:
    print(f"\n\033[1;35m==> {text}\033[0m", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_serving(address: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"demo: nothing serving on {address} after {timeout:.0f}s")
            time.sleep(0.1)


class Services:
    """The processes the demo starts; all of them are stopped on the way out."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.store = f"127.0.0.1:{free_port()}"
        self.engine = f"127.0.0.1:{free_port()}"
        self.env = {
            **os.environ,
            "PYTHONPATH": str(ROOT / "scripts"),
            "DEMO_LOG": str(DATA / "executions.log"),
            "PYTHONDONTWRITEBYTECODE": "1",
        }

    def _start(self, args: list[str], log_name: str) -> subprocess.Popen[bytes]:
        log = open(DATA / log_name, "ab")
        proc = subprocess.Popen(
            [PY, *args], cwd=ROOT, env=self.env, stdout=log, stderr=log, start_new_session=True
        )
        self.procs.append(proc)
        return proc

    def start_store(self) -> None:
        db = f"sqlite+aiosqlite:///{DATA / 'checkpoints.db'}"
        self._start(["-m", "checkpoint_svc", "--listen", self.store, "--db", db], "store.log")
        wait_serving(self.store)

    def start_engine(self, name: str) -> subprocess.Popen[bytes]:
        proc = self._start(
            [
                "-m", "engine_svc",
                "--listen", self.engine,
                "--checkpoint", self.store,
                "--handlers", "demo_handlers",
                "--lease-ttl", "3",
                "--recovery-interval", "0.5",
                "--owner", name,
            ],
            f"{name}.log",
        )  # fmt: skip
        wait_serving(self.engine)
        return proc

    def start_console(self) -> str:
        """The web console, on 8080 if that is free; its URL once it answers."""
        port = 8080
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                port = free_port()
        address = f"127.0.0.1:{port}"
        args = ["-m", "workflow_console", "--engine", self.engine, "--listen", address]
        self._start(args, "console.log")
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + 30
        while True:
            try:
                with opener.open(f"http://{address}/healthz", timeout=1):
                    return f"http://{address}"
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit(f"demo: the console is not answering on {address}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@contextmanager
def services() -> Iterator[Services]:
    running = Services()
    try:
        yield running
    finally:
        running.stop()


def wf(svc: Services, *args: str, check: bool = True) -> int:
    """Run the `wf` command as a user would, on this terminal."""
    print(f"$ wf {shlex.join(args)}", flush=True)  # quoted: a reader can paste it
    code = subprocess.call([WF, "--engine", svc.engine, *args], cwd=ROOT)
    if check and code != 0:
        raise SystemExit(f"demo: `wf {args[0]}` exited {code}")
    return code


def main() -> int:
    if DATA.exists():
        for old in DATA.iterdir():
            old.unlink()
    DATA.mkdir(parents=True, exist_ok=True)
    (DATA / "executions.log").write_text("")
    with services() as svc:
        say(f"starting checkpoint_svc on {svc.store} (SQLite: data/demo/checkpoints.db)")
        svc.start_store()
        say(f"starting engine_svc 'engine-a' on {svc.engine}")
        engine_a = svc.start_engine("engine-a")
        console = svc.start_console()
        say(f"starting the web console on {console}")
        say("registering the release workflow (scripts/demo_workflow.yaml)")
        wf(svc, "register", "scripts/demo_workflow.yaml")
        client = EngineClient(svc.engine)
        run = client.start_run("release", {"dataset": "sales-2026q4"}, request_id="demo-run")
        say(f"started run {run.run_id}; watching it live")
        say(f"the web console shows it live too, while the demo runs: {console}/runs/{run.run_id}")

        watcher = subprocess.Popen(
            [WF, "--engine", svc.engine, "watch", run.run_id], cwd=ROOT
        )  # the watcher rides through the engine's death: it reconnects from its last seq
        while client.get_run(run.run_id).completed_nodes < 3:
            time.sleep(0.1)
        time.sleep(0.5)  # mid-way through the parallel checks
        engine_a.send_signal(signal.SIGKILL)
        engine_a.wait()
        store = CheckpointClient(svc.store)
        head = store.restore(run.run_id, include_writes=True)
        store.close()
        done = set(json.loads(head.checkpoint.state)["completed"])
        done |= {w.task_id for w in head.writes if w.channel == "output"}
        say(
            f"killed engine-a with SIGKILL; the store holds {len(done)} finished nodes: "
            f"{', '.join(sorted(done))}"
        )
        say("starting engine-b on the same address: it takes the run over once the lease expires")
        svc.start_engine("engine-b")
        code = watcher.wait()
        if code != 12:
            raise SystemExit(f"demo: expected the run to wait for an approval, watch exited {code}")

        say("the run waits for a human: answering the approval")
        wf(svc, "resume", run.run_id, "--value", '{"approved": true, "by": "demo-user"}')
        wf(svc, "watch", run.run_id)
        say("the run's checkpoints, newest first")
        wf(svc, "checkpoints", run.run_id)
        say("the run")
        wf(svc, "show", run.run_id)

        log = [line.split() for line in (DATA / "executions.log").read_text().splitlines()]
        finished = [node for what, node in log if what == "finished"]
        started = [node for what, node in log if what == "started"]
        twice = sorted({n for n in finished if finished.count(n) > 1})
        again = sorted({n for n in started if started.count(n) > 1} - set(twice))
        client.close()
        say(
            f"{len(finished)} node executions finished for {len(set(finished))} python nodes; "
            + (f"finished twice: {twice}" if twice else "no node that finished ran again")
            + (
                f"; started again after the kill: {', '.join(again)} (cut off on engine-a)"
                if again
                else ""
            )
        )
        say("stopping everything the demo started")
    print("done. Logs and the SQLite database are in data/demo/.")
    return 1 if twice else 0


if __name__ == "__main__":
    sys.exit(main())
