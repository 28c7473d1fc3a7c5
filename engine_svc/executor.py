"""Running one workflow run in super-steps, with all of its state in the checkpoint service.

Each step runs every ready node at once (bounded); each node's output is saved as a pending
write the moment it finishes, and one checkpoint closes the step. A run picked up again (by
this engine after a crash, or by another) starts from the head checkpoint plus its pending
writes, so no node whose output was saved runs again. Every write carries the run's lease
token: an engine that lost the lease can no longer write.

Pause, cancel and manual checkpoints reach the engine that holds a run's lease through the
run's control feed (a thread of its own in the store, which anyone may append to); a run that
no engine holds is changed directly by whoever asks, under a short lease of its own.

The parts, each in a module of its own: the run and its status (run_state.py), an engine's
hold on a run (execution.py), what it writes (recording.py), leases (leases.py), the control
feed (control_feed.py), the step loop (step_loop.py) and one node's attempts
(node_execution.py). RunExecutor puts them together for one tenant.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator
from typing import Any, NamedTuple

from engine_svc import metrics
from engine_svc.control_feed import ControlFeed, check_control
from engine_svc.definition import Workflow
from engine_svc.execution import Execution
from engine_svc.leases import LeaseHeld, RunLeases
from engine_svc.node_execution import NodeExecution
from engine_svc.nodes import NodeFailed, NodeRunner
from engine_svc.recording import RunRecorder, run_checkpoint, started_events
from engine_svc.run_feed import RunFeed
from engine_svc.run_state import (
    OUTPUT_CHANNEL,
    RUNS_NAMESPACE,
    SKIPPED_CHANNEL,
    NotARun,
    NotResumable,
    RunState,
    RunStatus,
    apply_patch,
    event,
    start_checkpoint_id,
    status_event,
)
from engine_svc.step_loop import StepLoop
from engine_svc.store import LeaseLost, NotFound, RequiredHeadMoved, Store
from workflow_stubs.checkpoint.v1 import checkpoint_pb2 as cpb
from workflow_stubs.engine.v1 import engine_pb2 as pb

__all__ = [
    "NodeFailed",
    "NodeRunner",
    "RunExecutor",
    "RunNotFound",
    "Started",
    "WorkflowChanged",
]


class Started(NamedTuple):
    """A run as its first checkpoint recorded it, the token of the lease that checkpoint
    took for this engine and its thread's row then (0 and None: a replayed StartRun), and
    that Save (its events open the run's feed here; they announce the first nodes)."""

    run: RunState
    token: int
    thread: cpb.Thread | None = None
    save: tuple[cpb.SaveRequest, cpb.SaveResponse] | None = None
    announced: frozenset[str] = frozenset()  # nodes whose node.started that Save carried


class WorkflowChanged(RuntimeError):
    """A run's first checkpoint required the workflow's head its version came from, and the
    head had moved (another engine registered or rolled back): nothing was written."""


class RunNotFound(LookupError):
    """No such run (or no such checkpoint of it), said in the engine's words, not the
    store's (`thread runs/<id>`)."""


class RunExecutor:
    """Starts, runs and steers the runs of one tenant."""

    def __init__(
        self,
        store: Store,
        tenant: str,
        owner: str,
        runner: NodeRunner,
        *,
        lease_ttl: float,
        max_parallel: int = 16,
    ) -> None:
        self.store = store  # the tenant's, retried for --store-retry (docs/engine.md#store-calls)
        self.tenant = tenant
        self.owner = owner
        self.max_parallel = max_parallel
        self.live: dict[str, Execution] = {}  # run id -> this engine's execution of it
        # run id -> the events its execution here appended, for WatchRun (run_feed.py)
        self.feeds: dict[str, RunFeed] = {}
        self.recorder = RunRecorder(store, self.feeds)
        self.leases = RunLeases(store, owner, lease_ttl)
        self.control = ControlFeed(store, self.recorder)
        self.steps = StepLoop(self.recorder, NodeExecution(runner, tenant, self.recorder))

    async def close(self) -> None:
        await self.store.close()

    # ---- the run in the store ---------------------------------------------------------

    async def _restore(self, run_id: str) -> tuple[RunState, str]:
        try:
            head = await self.store.restore(
                cpb.RestoreRequest(namespace=RUNS_NAMESPACE, thread_id=run_id, include_writes=True)
            )
        except NotFound as exc:
            raise RunNotFound(f"run {run_id!r} not found") from exc
        run = RunState.from_json(head.checkpoint.state)
        for w in head.writes:  # nodes that finished after the last checkpoint
            if w.task_id in run.done():
                continue
            if w.channel == OUTPUT_CHANNEL:
                try:
                    run.outputs[w.task_id] = json.loads(w.value)
                except (ValueError, UnicodeDecodeError, RecursionError):
                    raise NotARun(f"the write of {w.task_id!r} is not JSON") from None
                run.completed.append(w.task_id)
            elif w.channel == SKIPPED_CHANNEL:
                run.skipped.append(w.task_id)
        return run, head.checkpoint.checkpoint_id

    async def load(self, run_id: str) -> RunState:
        """A run as of its head checkpoint and pending writes."""
        run, _ = await self._restore(run_id)
        return run

    @contextlib.asynccontextmanager
    async def _held(self, workflow: Workflow, run_id: str) -> AsyncIterator[Execution]:
        """The run under a short lease of the caller's own, for a change made from outside
        (no engine is running it)."""
        owner = f"{self.owner}/control"
        token = await self.leases.acquire(run_id, owner)
        try:
            run, head_id = await self._restore(run_id)
            yield self._execution(workflow, run, head_id, token)
        finally:
            await self.leases.release(run_id, owner, token)

    def _execution(self, workflow: Workflow, run: RunState, head_id: str, token: int) -> Execution:
        parallel = workflow.max_parallel or self.max_parallel
        return Execution(workflow, run, head_id, token, parallel)

    # ---- starting, resuming and steering -----------------------------------------------

    async def start(
        self,
        workflow: Workflow,
        version: int,
        run_id: str,
        run_input: dict[str, Any],
        request_id: str = "",
        interrupt_before: list[str] | None = None,
        interrupt_after: list[str] | None = None,
        required_head: cpb.RequiredHead | None = None,
    ) -> Started:
        """Record a new run (its first checkpoint, which takes the run's lease); `execute`
        then runs it.

        A used `request_id` returns the run it started first; a used run id is refused
        (ALREADY_EXISTS), since a run's first checkpoint has a fixed id. With
        `required_head` (the workflow's, as its version was read), WorkflowChanged if it
        moved.
        """
        run = RunState(
            run_id,
            workflow.workflow_id,
            version,
            run_input,
            total=len(workflow.nodes),
            interrupt_before=list(interrupt_before or []),
            interrupt_after=list(interrupt_after or []),
        )
        return await self._first_checkpoint(
            workflow, run, "start", request_id=request_id, required_head=required_head
        )

    async def at_checkpoint(self, run_id: str, checkpoint_id: str) -> RunState:
        """The run as one of its checkpoints holds it (without later pending writes)."""
        try:
            source = await self.store.restore(
                cpb.RestoreRequest(
                    namespace=RUNS_NAMESPACE, thread_id=run_id, checkpoint_id=checkpoint_id
                )
            )
        except NotFound as exc:
            raise RunNotFound(f"run {run_id!r} has no checkpoint {checkpoint_id!r}") from exc
        return RunState.from_json(source.checkpoint.state)

    async def history(
        self, run_id: str, include_state: bool, page_size: int, page_token: str
    ) -> tuple[list[cpb.Checkpoint], str]:
        page = await self.store.list_checkpoints(
            cpb.ListRequest(
                namespace=RUNS_NAMESPACE,
                thread_id=run_id,
                page_size=page_size,
                page_token=page_token,
                include_state=include_state,
            )
        )
        return list(page.checkpoints), page.next_page_token

    async def fork(
        self,
        workflow: Workflow,
        source: RunState,
        checkpoint_id: str,
        patch: dict[str, Any],
        new_run_id: str,
    ) -> Started:
        """A new run from a checkpoint of `source` (its first checkpoint's parent), with the
        patch applied; nodes done at that checkpoint stay done. The original is untouched."""
        run_id = source.run_id
        run = apply_patch(workflow, source, patch)
        run = dataclasses.replace(
            run,
            run_id=new_run_id,
            status=RunStatus.PENDING,
            error="",
            waiting_node="",
            waiting_for="",
            control_seq=0,
            eta_seconds=0.0,
        )
        forked = {"forked_from_run": run_id, "forked_from_checkpoint": checkpoint_id}
        return await self._first_checkpoint(
            workflow, run, "fork", parent_id=checkpoint_id, metadata=forked
        )

    async def _first_checkpoint(
        self,
        workflow: Workflow,
        run: RunState,
        name: str,
        *,
        request_id: str = "",
        parent_id: str = "",
        metadata: dict[str, str] | None = None,
        required_head: cpb.RequiredHead | None = None,
    ) -> Started:
        """The run's first checkpoint, taking its lease for this engine, which executes it at
        once: so the run is RUNNING from here, and the node.started events of its first step
        come with this checkpoint, not in a call of their own (docs/engine.md#checkpoints)."""
        ex = self._execution(workflow, run, "", 0)
        announced = self.steps.announceable(ex)
        pending = status_event(RunStatus.PENDING, total_nodes=len(workflow.nodes))
        run.status = RunStatus.RUNNING
        events = [
            pending,
            status_event(RunStatus.RUNNING, **ex.progress()),
            *started_events(ex, announced),
        ]
        checkpoint = run_checkpoint(ex, cpb.TRIGGER_MANUAL, name, metadata)
        checkpoint.checkpoint_id = start_checkpoint_id(run.run_id)
        checkpoint.parent_id = parent_id
        request = cpb.SaveRequest(
            checkpoint=checkpoint,
            keep_last=workflow.keep_last,
            expected_parent_id="",
            status=RunStatus.RUNNING.thread_status,
            workflow_id=workflow.workflow_id,
            workflow_version=run.version,
            request_id=f"start:{request_id}" if request_id else "",
            events=events,
            # The lease in the same commit: the run starts here without another call.
            lease_owner=self.owner,
            lease_ttl_seconds=self.leases.ttl,
            required_head=required_head,
        )
        try:
            response = await self.store.save(request)
        except RequiredHeadMoved as exc:
            raise WorkflowChanged(str(exc)) from exc
        if response.checkpoint.thread_id != run.run_id:  # the request was used: its run
            return Started(await self.load(response.checkpoint.thread_id), 0)
        thread = response.thread if response.HasField("thread") else None
        return Started(run, response.fencing_token, thread, (request, response), announced)

    async def continue_thread(
        self,
        workflow: Workflow,
        version: int,
        run_id: str,
        run_input: dict[str, Any],
        interrupt_before: list[str] | None = None,
        interrupt_after: list[str] | None = None,
    ) -> RunState:
        """Start a COMPLETED run's workflow again on top of its state, on the same history:
        the new input replaces the old, earlier outputs stay visible until nodes overwrite
        them. NotResumable unless the run is COMPLETED."""
        async with self._held(workflow, run_id) as ex:
            run = ex.run
            if run.status is not RunStatus.COMPLETED:
                raise NotResumable(
                    f"run {run_id!r} is {run.status}; only a COMPLETED run continues"
                )
            run.input, run.version, run.total = run_input, version, len(workflow.nodes)
            run.completed, run.skipped, run.breaks_passed = [], [], []
            run.interrupt_before = list(interrupt_before or [])
            run.interrupt_after = list(interrupt_after or [])
            run.status, run.error = RunStatus.PENDING, ""
            await self.recorder.save(
                ex,
                cpb.TRIGGER_MANUAL,
                name="continue",
                events=[status_event(RunStatus.PENDING, total_nodes=run.total)],
                workflow_version=version,
            )
            return run

    async def resume(self, workflow: Workflow, run_id: str, value: Any) -> RunState:
        """Make a PAUSED, FAILED or WAITING run RUNNING again (answering the approval with
        `value`) in one checkpoint; `execute` then continues it. NotResumable otherwise."""
        async with self._held(workflow, run_id) as ex:
            run = ex.run
            events: list[cpb.NewEvent] = []
            if run.status is RunStatus.WAITING:
                node_id = run.waiting_node
                run.outputs[node_id] = value
                run.completed.append(node_id)
                run.waiting_node = run.waiting_for = ""
                events.append(event("node.completed", node_id=node_id, **ex.progress()))
            elif run.status not in (RunStatus.PAUSED, RunStatus.FAILED):
                raise NotResumable(
                    f"run {run_id!r} is {run.status}: only PAUSED, WAITING and FAILED runs resume"
                )
            run.status, run.error = RunStatus.RUNNING, ""
            events.append(status_event(RunStatus.RUNNING, **ex.progress()))
            await self.recorder.save(ex, cpb.TRIGGER_MANUAL, name="resume", events=events)
            return run

    async def change_directly(
        self, workflow: Workflow, run_id: str, action: str, payload: dict[str, Any]
    ) -> tuple[RunState, str]:
        """Pause, cancel or checkpoint a run that no engine holds. (run, checkpoint id);
        LeaseHeld if an engine holds it, NotResumable if its status does not allow it."""
        async with self._held(workflow, run_id) as ex:
            run = ex.run
            run.control_seq = max(run.control_seq, int(payload.get("control_seq", 0)))
            check_control(run, action)
            control_id = payload.get("control_id", "")
            if action == "unpause":  # RUNNING, and no engine holds it: nothing is pausing it
                raise NotResumable(
                    f"run {run_id!r} is RUNNING: only PAUSED, WAITING and FAILED runs resume"
                )
            if action == "checkpoint":
                head = await self.recorder.save(
                    ex,
                    cpb.TRIGGER_MANUAL,
                    name=payload.get("name", ""),
                    metadata=payload.get("metadata", {}),
                    status=False,
                )
                return run, head
            if action == "pause" and run.status is RunStatus.PAUSED:
                return run, ex.head_id
            run.status = RunStatus.PAUSED if action == "pause" else RunStatus.CANCELLED
            if action == "cancel":
                run.error = f"cancelled: {payload.get('reason') or 'no reason given'}"
            run.waiting_node = run.waiting_for = ""
            trigger = cpb.TRIGGER_PAUSE if action == "pause" else cpb.TRIGGER_INTERRUPT
            event = status_event(run.status, control_id=control_id, **ex.progress())
            head = await self.recorder.save(ex, trigger, name=action, events=[event])
            return run, head

    # ---- executing --------------------------------------------------------------------

    async def execute(
        self, workflow: Workflow, run_id: str, started: Started | None = None
    ) -> RunState:
        """Run to the end, a pause, an approval or a failure, under a lease; continues from
        the head checkpoint. Returns at once if the run is not RUNNING or PENDING.

        `started`: the run as `start` recorded it, under the lease its first checkpoint took.
        It stands for the head only under that lease (token 1): any change from outside would
        have taken a lease first. Without it, the lease is taken here.
        """
        # Before any await: a watcher of a run just started finds its feed here.
        feed = self.feeds[run_id] = RunFeed(namespace=RUNS_NAMESPACE, run_id=run_id)
        if started is not None and started.save is not None:
            feed.saved(*started.save)
        try:
            return await self._execute(workflow, run_id, started)
        finally:
            feed.close()
            if self.feeds.get(run_id) is feed:
                del self.feeds[run_id]

    async def _execute(self, workflow: Workflow, run_id: str, started: Started | None) -> RunState:
        token = started.token if started is not None else 0
        if not token:
            try:
                token = await self.leases.acquire(run_id, self.owner)
            except LeaseHeld as exc:
                raise LeaseLost(str(exc)) from exc
        ex: Execution | None = None
        try:
            if started is not None and token == 1:
                run, head_id = started.run, start_checkpoint_id(run_id)
            else:
                run, head_id = await self._restore(run_id)
            ex = self._execution(workflow, run, head_id, token)
            if started is not None and head_id == start_checkpoint_id(run_id):
                # Still at its first checkpoint: the node.started that it carried stand.
                ex.announced = set(started.announced)
            if run.status not in (RunStatus.PENDING, RunStatus.RUNNING):
                return run
            self.live[run_id] = ex
            metrics.RUNS_EXECUTING.inc()
            steps = asyncio.create_task(self.steps.run(ex), name=f"steps-{run_id}")
            helpers = [
                asyncio.create_task(self.leases.keep_renewed(ex, asyncio.current_task())),
                asyncio.create_task(self.control.follow(ex, steps)),
            ]
            if pb.CHECKPOINT_TRIGGER_TIME_BASED in workflow.triggers and workflow.interval:
                helpers.append(asyncio.create_task(self._tick(ex, workflow.interval)))
            try:
                try:
                    return await steps
                except asyncio.CancelledError:
                    current = asyncio.current_task()
                    if ex.cancel is None or (current is not None and current.cancelling()):
                        raise  # the engine is stopping or lost the lease: not a CancelRun
                return await self.steps.cancelled(ex)
            finally:
                for task in (*helpers, steps):
                    task.cancel()
                for task in (*helpers, steps):
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
                self.live.pop(run_id, None)
                metrics.RUNS_EXECUTING.dec()
                metrics.RUNS_ENDED.labels(ex.run.status).inc()
        finally:
            if ex is None or not ex.released:
                await self.leases.release(run_id, self.owner, token)

    async def _tick(self, ex: Execution, interval: float) -> None:
        """The time-based trigger: a checkpoint every interval, long nodes included."""
        while True:
            await asyncio.sleep(interval)
            await self.recorder.save(ex, cpb.TRIGGER_TIME_BASED, name="interval", status=False)
