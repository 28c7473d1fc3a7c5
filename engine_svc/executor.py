"""Running one workflow run in super-steps, with all of its state in the checkpoint service.

Each step runs every ready node at once (bounded); each node's output is saved as a pending
write the moment it finishes, and one checkpoint closes the step. A run picked up again (by
this engine after a crash, or by another) starts from the head checkpoint plus its pending
writes, so no node whose output was saved runs again. Every write carries the run's lease
token: an engine that lost the lease can no longer write.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from tenacity import AsyncRetrying, stop_after_attempt, wait_exponential

from engine_svc import expressions
from engine_svc.definition import NodeSpec, Workflow
from workflow_stubs.checkpoint.v1 import checkpoint_pb2 as cpb
from workflow_stubs.checkpoint.v1 import checkpoint_pb2_grpc as cpb_grpc

log = logging.getLogger(__name__)

RUNS_NAMESPACE = "runs"
OUTPUT_CHANNEL = "output"
SKIPPED_CHANNEL = "skipped"


def status_event(status: str) -> cpb.NewEvent:
    event = cpb.NewEvent(type="run.status")
    event.payload.update({"status": status})
    return event


def start_checkpoint_id(run_id: str) -> str:
    """A run's first checkpoint has a fixed id: starting the same run id twice is refused."""
    return f"0-start-{run_id}"


class LeaseLostError(RuntimeError):
    """Another engine owns the run now; this one must stop touching it."""


class NodeFailed(RuntimeError):
    pass


@dataclass
class RunState:
    """What a run's checkpoints hold (as JSON, so any language can read it)."""

    run_id: str
    workflow_id: str
    version: int
    input: dict[str, Any]
    outputs: dict[str, Any] = field(default_factory=dict)
    completed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    status: str = "PENDING"
    error: str = ""
    step: int = 0
    total: int = 0
    waiting_node: str = ""  # the approval node the run waits on
    waiting_for: str = ""  # its prompt

    def state(self) -> dict[str, Any]:
        """The run's state as nodes and clients see it: the input and each node's output."""
        return {"input": self.input, **self.outputs}

    def done(self) -> set[str]:
        return set(self.completed) | set(self.skipped)

    def to_json(self) -> bytes:
        return json.dumps(self.__dict__).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> RunState:
        return cls(**json.loads(raw))


Handler = Callable[[dict[str, Any]], Any]


class NodeRunner:
    """Runs one node of a known type; `python` handlers only from allowed modules."""

    def __init__(self, allowed_modules: set[str]) -> None:
        self.allowed_modules = allowed_modules

    def resolve(self, spec: str) -> Handler:
        module_name, _, function = spec.partition(":")
        if module_name not in self.allowed_modules:
            raise NodeFailed(f"module {module_name!r} is not allowed (--handlers)")
        return getattr(importlib.import_module(module_name), function)

    async def run(self, node: NodeSpec, state: dict[str, Any]) -> Any:
        if node.type == "noop":
            return None
        if node.type == "sleep":
            await asyncio.sleep(float(node.config["seconds"]))
            return None
        if node.type == "transform":
            try:
                return expressions.evaluate(node.config["expression"], state)
            except expressions.ExpressionError as exc:
                raise NodeFailed(str(exc)) from exc
        if node.type == "python":
            handler = self.resolve(node.config["handler"])
            # A handler takes the run's state, and the node's id if it has a second parameter.
            args = (state, node.id) if len(inspect.signature(handler).parameters) > 1 else (state,)
            if inspect.iscoroutinefunction(handler):
                return await handler(*args)
            return await asyncio.to_thread(handler, *args)
        raise NodeFailed(f"node type {node.type!r} is not runnable yet")


class RunExecutor:
    def __init__(
        self,
        store: cpb_grpc.CheckpointServiceStub,
        tenant: str,
        owner: str,
        runner: NodeRunner,
        lease_ttl: float = 10.0,
        max_parallel: int = 16,
    ) -> None:
        self.store = store
        self.md = (("x-tenant-id", tenant),)
        self.owner = owner
        self.runner = runner
        self.lease_ttl = lease_ttl
        self.max_parallel = max_parallel

    async def start(
        self,
        workflow: Workflow,
        version: int,
        run_id: str,
        run_input: dict[str, Any],
        request_id: str = "",
    ) -> RunState:
        """Record a new run (its first checkpoint); `execute` then runs it.

        A used `request_id` returns the run it started first; a used run id is refused
        (ALREADY_EXISTS), since a run's first checkpoint has a fixed id.
        """
        run = RunState(run_id, workflow.workflow_id, version, run_input, total=len(workflow.nodes))
        response = await self.store.Save(
            cpb.SaveRequest(
                checkpoint=cpb.Checkpoint(
                    namespace=RUNS_NAMESPACE,
                    thread_id=run_id,
                    state=run.to_json(),
                    trigger=cpb.TRIGGER_MANUAL,
                    name="start",
                    checkpoint_id=start_checkpoint_id(run_id),
                ),
                expected_parent_id="",
                status=cpb.THREAD_STATUS_PENDING,
                workflow_id=workflow.workflow_id,
                workflow_version=version,
                request_id=f"start:{request_id}" if request_id else "",
                events=[status_event("PENDING")],
            ),
            metadata=self.md,
        )
        if response.checkpoint.thread_id != run_id:  # the request was used: its run
            return await self.load(response.checkpoint.thread_id)
        return run

    async def load(self, run_id: str) -> RunState:
        """A run as of its head checkpoint and pending writes."""
        run, _ = await self._restore(run_id)
        return run

    async def execute(
        self, workflow: Workflow, run_id: str, answers: dict[str, Any] | None = None
    ) -> RunState:
        """Run to the end (or failure) under a lease; resumes from the head checkpoint."""
        lease = await self.store.AcquireLease(
            cpb.AcquireLeaseRequest(
                namespace=RUNS_NAMESPACE,
                thread_id=run_id,
                owner=self.owner,
                ttl_seconds=self.lease_ttl,
            ),
            metadata=self.md,
        )
        token = lease.fencing_token
        work = asyncio.current_task()
        assert work is not None
        renewer = asyncio.create_task(self._renew(run_id, token, work))
        try:
            return await self._steps(workflow, run_id, token, answers or {})
        finally:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer
            with contextlib.suppress(grpc.aio.AioRpcError):
                await self.store.ReleaseLease(
                    cpb.ReleaseLeaseRequest(
                        namespace=RUNS_NAMESPACE,
                        thread_id=run_id,
                        owner=self.owner,
                        fencing_token=token,
                    ),
                    metadata=self.md,
                )

    async def _renew(self, run_id: str, token: int, work: asyncio.Task) -> None:
        while True:
            await asyncio.sleep(self.lease_ttl / 3)
            try:
                await self.store.RenewLease(
                    cpb.RenewLeaseRequest(
                        namespace=RUNS_NAMESPACE,
                        thread_id=run_id,
                        owner=self.owner,
                        fencing_token=token,
                        ttl_seconds=self.lease_ttl,
                    ),
                    metadata=self.md,
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                    log.warning("lease lost; stopping run", extra={"run_id": run_id})
                    work.cancel()
                    return

    async def _restore(self, run_id: str) -> tuple[RunState, str]:
        head = await self.store.Restore(
            cpb.RestoreRequest(namespace=RUNS_NAMESPACE, thread_id=run_id, include_writes=True),
            metadata=self.md,
        )
        run = RunState.from_json(head.checkpoint.state)
        for w in head.writes:  # nodes that finished after the last checkpoint
            if w.task_id in run.done():
                continue
            if w.channel == OUTPUT_CHANNEL:
                run.outputs[w.task_id] = json.loads(w.value)
                run.completed.append(w.task_id)
            elif w.channel == SKIPPED_CHANNEL:
                run.skipped.append(w.task_id)
        return run, head.checkpoint.checkpoint_id

    async def _steps(
        self, workflow: Workflow, run_id: str, token: int, answers: dict[str, Any]
    ) -> RunState:
        run, head_id = await self._restore(run_id)
        if run.status in ("COMPLETED", "FAILED", "CANCELLED"):
            return run
        if run.status == "WAITING":
            if run.waiting_node not in answers:
                return run  # still waiting: nothing holds a task or a lease meanwhile
            node_id, value = run.waiting_node, answers[run.waiting_node]
            await self._write(run_id, head_id, token, node_id, OUTPUT_CHANNEL, value)
            run.outputs[node_id] = value
            run.completed.append(node_id)
            run.waiting_node = run.waiting_for = ""
            await self._publish(
                run_id,
                token,
                "node.completed",
                {
                    "node_id": node_id,
                    "completed_nodes": len(run.done()),
                    "total_nodes": len(workflow.nodes),
                },
            )
        run.status, run.error = "RUNNING", ""
        gate = asyncio.Semaphore(workflow.max_parallel or self.max_parallel)
        while True:
            done = run.done()
            ready = [
                n
                for n in workflow.nodes
                if n.id not in done and all(d in done for d in n.depends_on)
            ]
            if not ready:
                break
            runnable = [n for n in ready if n.type != "approval"]
            if not runnable:  # only approvals are left to start: wait for an answer
                node = ready[0]
                if node.when and not expressions.evaluate(node.when, run.state()):
                    await self._write(run_id, head_id, token, node.id, SKIPPED_CHANNEL, True)
                    run.skipped.append(node.id)
                    continue
                run.status = "WAITING"
                run.waiting_node, run.waiting_for = node.id, str(node.config.get("prompt", ""))
                await self._checkpoint(run, head_id, token)
                return run
            results = await asyncio.gather(
                *(self._node(workflow, n, run, head_id, token, gate) for n in runnable)
            )
            failures = {nid: err for nid, err in results if err}
            run.step += 1
            if failures:
                run.status = "FAILED"
                run.error = "; ".join(f"{k}: {v}" for k, v in failures.items())
            elif len(run.done()) == len(workflow.nodes):
                run.status = "COMPLETED"
            head_id = await self._checkpoint(run, head_id, token)
            if run.status != "RUNNING":
                return run
        run.status = "COMPLETED"
        await self._checkpoint(run, head_id, token)
        return run

    async def _node(
        self,
        workflow: Workflow,
        node: NodeSpec,
        run: RunState,
        head_id: str,
        token: int,
        gate: asyncio.Semaphore,
    ) -> tuple[str, str]:
        """Run one node with its retry policy; record its output at once. (node id, error)."""
        state = run.state()
        if node.when and not expressions.evaluate(node.when, state):
            await self._write(run.run_id, head_id, token, node.id, SKIPPED_CHANNEL, True)
            run.skipped.append(node.id)
            return node.id, ""
        policy = node.retry
        attempt = 0
        started = time.monotonic()
        try:
            async with gate:
                async for trying in AsyncRetrying(
                    stop=stop_after_attempt(policy.max_attempts),
                    wait=wait_exponential(
                        multiplier=policy.initial_backoff,
                        max=policy.max_backoff,
                        exp_base=policy.multiplier,
                    ),
                    reraise=True,
                ):
                    with trying:
                        attempt += 1
                        output = await asyncio.wait_for(self.runner.run(node, state), node.timeout)
        except Exception as exc:  # the node's failure, not the engine's
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            await self._publish(
                run.run_id,
                token,
                "node.failed",
                {"node_id": node.id, "attempt": attempt, "error": error},
            )
            return node.id, error
        await self._write(run.run_id, head_id, token, node.id, OUTPUT_CHANNEL, output)
        run.outputs[node.id] = output
        run.completed.append(node.id)
        await self._publish(
            run.run_id,
            token,
            "node.completed",
            {
                "node_id": node.id,
                "attempt": attempt,
                "duration_seconds": time.monotonic() - started,
                "completed_nodes": len(run.completed),
                "total_nodes": len(workflow.nodes),
            },
        )
        return node.id, ""

    async def _write(
        self, run_id: str, head_id: str, token: int, node_id: str, channel: str, value: Any
    ) -> None:
        await self._call(
            self.store.PutWrites(
                cpb.PutWritesRequest(
                    namespace=RUNS_NAMESPACE,
                    thread_id=run_id,
                    fencing_token=token,
                    writes=[
                        cpb.PendingWrite(
                            checkpoint_id=head_id,
                            task_id=node_id,
                            idx=0,
                            channel=channel,
                            value=json.dumps(value).encode(),
                        )
                    ],
                ),
                metadata=self.md,
            )
        )

    async def _publish(self, run_id: str, token: int, kind: str, payload: dict) -> None:
        event = cpb.NewEvent(type=kind)
        event.payload.update(payload)
        await self._call(
            self.store.Publish(
                cpb.PublishRequest(
                    namespace=RUNS_NAMESPACE, thread_id=run_id, events=[event], fencing_token=token
                ),
                metadata=self.md,
            )
        )

    async def _checkpoint(self, run: RunState, head_id: str, token: int) -> str:
        status = getattr(cpb, f"THREAD_STATUS_{run.status}")
        terminal = run.status in ("COMPLETED", "FAILED")
        events = [status_event(run.status)] if terminal or run.status == "WAITING" else []
        response = await self._call(
            self.store.Save(
                cpb.SaveRequest(
                    checkpoint=cpb.Checkpoint(
                        namespace=RUNS_NAMESPACE,
                        thread_id=run.run_id,
                        state=run.to_json(),
                        step=run.step,
                        trigger=cpb.TRIGGER_STEP_COMPLETED,
                        completed_nodes=run.completed,
                    ),
                    expected_parent_id=head_id,
                    fencing_token=token,
                    status=status,
                    events=events,
                ),
                metadata=self.md,
            )
        )
        return response.checkpoint.checkpoint_id

    @staticmethod
    async def _call(call: Awaitable[Any]) -> Any:
        try:
            return await call
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                raise LeaseLostError(exc.details()) from exc
            raise
