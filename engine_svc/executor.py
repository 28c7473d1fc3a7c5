"""Running one workflow run in super-steps, with all of its state in the checkpoint service.

Each step runs every ready node at once (bounded); each node's output is saved as a pending
write the moment it finishes, and one checkpoint closes the step. A run picked up again (by
this engine after a crash, or by another) starts from the head checkpoint plus its pending
writes, so no node whose output was saved runs again. Every write carries the run's lease
token: an engine that lost the lease can no longer write.

Pause, cancel and manual checkpoints reach the engine that holds a run's lease through the
run's control feed (a thread of its own in the store, which anyone may append to); a run that
no engine holds is changed directly by whoever asks, under a short lease of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp
from tenacity import AsyncRetrying, stop_after_attempt, wait_exponential

from engine_svc import expressions, metrics
from engine_svc.definition import NodeSpec, Workflow
from engine_svc.nodes import NodeCall, NodeFailed, NodeRunner
from engine_svc.run_feed import RunFeed
from engine_svc.run_json import RunJson
from engine_svc.store import LeaseLost, NotFound, RequiredHeadMoved, Store, StoreError
from workflow_rpc.statuses import InvalidArgument
from workflow_stubs.checkpoint.v1 import checkpoint_pb2 as cpb
from workflow_stubs.engine.v1 import engine_pb2 as pb

log = logging.getLogger(__name__)

RUNS_NAMESPACE = "runs"
CONTROL_NAMESPACE = "run-control"
OUTPUT_CHANNEL = "output"
SKIPPED_CHANNEL = "skipped"
TERMINAL = frozenset({"COMPLETED", "FAILED", "CANCELLED"})
# How far into an execution the engine starts following the run's control feed: PauseRun,
# CancelRun and CheckpointRun wait in the feed until then (docs/engine.md#steering-a-run).
CONTROL_FOLLOW_AFTER = 0.25

__all__ = ["NodeFailed", "NodeRunner", "RunExecutor", "RunState"]


def status_event(status: str, **extra: Any) -> cpb.NewEvent:
    event = cpb.NewEvent(type="run.status")
    event.payload.update({"status": status, **extra})
    return event


def start_checkpoint_id(run_id: str) -> str:
    """A run's first checkpoint has a fixed id: starting the same run id twice is refused."""
    return f"0-start-{run_id}"


class Started(NamedTuple):
    """A run as its first checkpoint recorded it, the token of the lease that checkpoint
    took for this engine and its thread's row then (0 and None: a replayed StartRun), and
    that Save (its events open the run's feed here; they announce the first nodes)."""

    run: RunState
    token: int
    thread: cpb.Thread | None = None
    save: tuple[cpb.SaveRequest, cpb.SaveResponse] | None = None
    announced: frozenset[str] = frozenset()  # nodes whose node.started that Save carried


class LeaseHeld(RuntimeError):
    """Someone else holds the run's lease: ask them through the control feed."""


class WorkflowChanged(RuntimeError):
    """A run's first checkpoint required the workflow's head its version came from, and the
    head had moved (another engine registered or rolled back): nothing was written."""


class NotARun(ValueError):
    """A `runs/<id>` thread whose state is not a run's: for the engine, no such run."""


class RunNotFound(LookupError):
    """No such run (or no such checkpoint of it), said in the engine's words, not the
    store's (`thread runs/<id>`)."""


class NotResumable(Exception):
    """ResumeRun, PauseRun or CancelRun on a run in a status that does not allow it."""


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
    durations: dict[str, float] = field(default_factory=dict)  # seconds per finished node
    eta_seconds: float = 0.0
    control_seq: int = 0  # the last control request handled (seq in the control feed)
    interrupt_before: list[str] = field(default_factory=list)  # breakpoints (StartRun)
    interrupt_after: list[str] = field(default_factory=list)
    breaks_passed: list[str] = field(default_factory=list)  # "before:<id>" / "after:<id>"

    def state(self) -> dict[str, Any]:
        """The run's state as nodes and clients see it: the input and each node's output."""
        return {"input": self.input, **self.outputs}

    def done(self) -> set[str]:
        return set(self.completed) | set(self.skipped)

    def to_json(self) -> bytes:
        """As a checkpoint holds it (an execution encodes it piece by piece: run_json.py)."""
        return json.dumps(self.__dict__).encode()  # asdict would deep-copy every output

    @classmethod
    def from_json(cls, raw: bytes) -> RunState:
        """The run a checkpoint holds; NotARun if another client wrote something else there
        (anyone may write to `runs/<id>` through the store)."""
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise NotARun("its state is not JSON") from None
        if not isinstance(data, dict):
            raise NotARun("its state is not a JSON object")
        for name, kinds in _RUN_FIELD_KINDS.items():
            if name in data and (
                not isinstance(data[name], kinds) or isinstance(data[name], bool) != (bool in kinds)
            ):
                raise NotARun(f"its {name} is not a {kinds[0].__name__}")
        missing = [n for n in _RUN_REQUIRED if n not in data]
        if missing:
            raise NotARun(f"its state has no {', '.join(missing)}")
        if data.get("status", "PENDING") not in _RUN_STATUSES:
            raise NotARun(f"its status {data['status']!r} is not a run status")
        for name in _RUN_STRING_LISTS:
            if not all(isinstance(v, str) for v in data.get(name, ())):
                raise NotARun(f"its {name} is not a list of node ids")
        if not all(
            isinstance(v, int | float) and not isinstance(v, bool)
            for v in data.get("durations", {}).values()
        ):
            raise NotARun("its durations are not numbers")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


_RUN_STATUSES = frozenset(
    name.removeprefix("RUN_STATUS_") for name, n in pb.RunStatus.items() if n
)  # PENDING, RUNNING, ... as RunState.status spells them
_RUN_REQUIRED = [
    f.name
    for f in dataclasses.fields(RunState)
    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
]
_RUN_STRING_LISTS = ("completed", "skipped", "interrupt_before", "interrupt_after", "breaks_passed")
# What each field of a stored run must be (JSON gives ints for whole floats).
_RUN_FIELD_KINDS: dict[str, tuple[type, ...]] = {
    "run_id": (str,),
    "workflow_id": (str,),
    "version": (int,),
    "input": (dict,),
    "outputs": (dict,),
    "completed": (list,),
    "skipped": (list,),
    "status": (str,),
    "error": (str,),
    "step": (int,),
    "total": (int,),
    "waiting_node": (str,),
    "waiting_for": (str,),
    "durations": (dict,),
    "eta_seconds": (float, int),
    "control_seq": (int,),
    "interrupt_before": (list,),
    "interrupt_after": (list,),
    "breaks_passed": (list,),
}


class WriteGate:
    """Node writes go on in parallel; a checkpoint waits for them and holds new ones back, so
    each write lands on the checkpoint whose state does not yet include it."""

    def __init__(self) -> None:
        self._cond = asyncio.Condition()
        self._writers = 0
        self._exclusive = False

    @contextlib.asynccontextmanager
    async def shared(self) -> AsyncIterator[None]:
        async with self._cond:
            await self._cond.wait_for(lambda: not self._exclusive)
            self._writers += 1
        try:
            yield
        finally:
            async with self._cond:
                self._writers -= 1
                self._cond.notify_all()

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        async with self._cond:
            await self._cond.wait_for(lambda: not self._exclusive and self._writers == 0)
            self._exclusive = True
        try:
            yield
        finally:
            async with self._cond:
                self._exclusive = False
                self._cond.notify_all()


@dataclass(slots=True)
class _Unwritten:
    """A node's result not sent yet: its write, its event, and whether a checkpoint follows
    its step (which may then save it instead)."""

    write: cpb.PendingWrite
    event: cpb.NewEvent | None
    step_saves: bool


@dataclass
class Execution:
    """One engine's hold on one run: what the step loop, the control watcher and the ticker
    share."""

    workflow: Workflow
    run: RunState
    head_id: str
    token: int
    parallel: int
    gate: WriteGate = field(default_factory=WriteGate)
    pause: tuple[str, str] | None = None  # (why, control id) once a pause is asked for
    pausing: bool = False  # the pause is being applied: too late to take it back
    shutdown: bool = False  # the pause is the engine's own: leave the run RUNNING
    cancel: tuple[str, str] | None = None  # (reason, control id)
    # The step's last node to finish is saved by the step's checkpoint, not a write of its
    # own; its events wait here for that checkpoint (or any earlier one).
    carry: list[cpb.NewEvent] = field(default_factory=list)
    running: int = 0  # nodes of the current step that have not finished
    # Results waiting to be sent together (RunExecutor._write), and the task sending them.
    unwritten: list[_Unwritten] = field(default_factory=list)
    writer: asyncio.Future | None = None
    released: bool = False  # its last checkpoint let the lease go (no ReleaseLease needed)
    follow_control: asyncio.Event = field(default_factory=asyncio.Event)  # asked here: follow now
    state_json: RunJson = field(default_factory=RunJson)  # its checkpoints' state, encoded
    announced: set[str] = field(default_factory=set)  # node.started sent ahead of their step
    # What is done, ready and left per level, kept up to date as nodes finish (_sync), so that
    # the ready set and the ETA cost O(1) per event, not a walk over the workflow.
    _seen: tuple[int, int] = field(default=(-1, -1), init=False)
    _done: set[str] = field(default_factory=set, init=False)
    _missing: dict[str, int] = field(default_factory=dict, init=False)
    _ready: set[str] = field(default_factory=set, init=False)
    _left: list[int] = field(default_factory=list, init=False)
    _steps_left: int = field(default=0, init=False)
    _duration_sum: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        shape = self.workflow.shape
        self._spec, self._position = shape.spec, shape.position
        self._level_of, self._dependents = shape.level_of, shape.dependents
        self._levels = shape.levels
        self._duration_sum = sum(self.run.durations.values())

    def _sync(self) -> None:
        """Take in the nodes done since the last call. The run's completed and skipped lists
        only grow while it executes; the first time, or if one shrank, count from scratch."""
        run = self.run
        seen = (len(run.completed), len(run.skipped))
        if seen == self._seen:
            return
        if self._seen[0] < 0 or seen[0] < self._seen[0] or seen[1] < self._seen[1]:
            done = run.done()
            self._done = {n for n in done if n in self._spec}
            self._missing = {
                n.id: sum(1 for d in set(n.depends_on) if d not in done)
                for n in self.workflow.nodes
            }
            self._ready = {n for n, k in self._missing.items() if k == 0 and n not in done}
            self._left = [sum(1 for n in level if n not in done) for level in self._levels]
            self._steps_left = sum(math.ceil(k / self.parallel) for k in self._left)
        else:
            for node in (*run.completed[self._seen[0] :], *run.skipped[self._seen[1] :]):
                self._mark(node)
        self._seen = seen

    def _mark(self, node: str) -> None:
        if node in self._done or node not in self._spec:
            return
        self._done.add(node)
        self._ready.discard(node)
        level, p = self._level_of[node], self.parallel
        before = math.ceil(self._left[level] / p)
        self._left[level] -= 1
        self._steps_left += math.ceil(self._left[level] / p) - before
        for dependent in self._dependents[node]:
            self._missing[dependent] -= 1
            if self._missing[dependent] == 0 and dependent not in self._done:
                self._ready.add(dependent)

    def ready(self) -> list[NodeSpec]:
        """Nodes not done whose dependencies all are, in the workflow's order."""
        self._sync()
        return [self._spec[n] for n in sorted(self._ready, key=self._position.__getitem__)]

    def all_done(self) -> bool:
        self._sync()
        return len(self._done) == len(self._spec)

    def finished(self, node_id: str, seconds: float) -> None:
        """A node's duration, for the ETA."""
        durations = self.run.durations
        self._duration_sum += seconds - durations.get(node_id, 0.0)
        durations[node_id] = seconds
        self.state_json.put("durations", node_id, seconds)

    def eta(self) -> float:
        """Seconds left: the mean observed node duration per remaining (bounded) step."""
        run = self.run
        if not run.durations:
            return 0.0
        self._sync()
        return round(self._steps_left * self._duration_sum / len(run.durations), 3)

    def progress(self) -> dict[str, Any]:
        """The progress fields of events and checkpoints."""
        run = self.run
        done, total = len(run.completed) + len(run.skipped), run.total
        return {
            "completed_nodes": done,
            "total_nodes": total,
            "progress_percent": round(100.0 * done / total, 2) if total else 0.0,
            "eta_seconds": self.eta(),
        }


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
        self.runner = runner
        self.lease_ttl = lease_ttl
        self.max_parallel = max_parallel
        self.live: dict[str, Execution] = {}  # run id -> this engine's execution of it
        # run id -> the events its execution here appended, for WatchRun (run_feed.py)
        self.feeds: dict[str, RunFeed] = {}

    # ---- store calls ----------------------------------------------------------------

    async def close(self) -> None:
        await self.store.close()

    async def _save(
        self,
        ex: Execution,
        trigger: int,
        *,
        name: str = "",
        metadata: dict[str, str] | None = None,
        events: list[cpb.NewEvent] | None = None,
        status: bool = True,
        workflow_version: int = 0,
        release: bool = False,
    ) -> str:
        """A checkpoint of the run as it is now; the new head. Holds node writes back meanwhile.
        `release`: the execution ends with it, and it lets the lease go in the same commit."""
        run = ex.run
        async with ex.gate.exclusive():
            run.eta_seconds = ex.eta()
            progress = ex.progress()
            # Results not sent yet are in this checkpoint's state: it saves their events too.
            absorbed, ex.unwritten = ex.unwritten, []
            events = [*ex.carry, *(i.event for i in absorbed if i.event), *(events or [])]
            checkpoint = _run_checkpoint(ex, trigger, name, metadata)
            checkpoint.progress_percent = progress["progress_percent"]
            checkpoint.eta_seconds = run.eta_seconds
            request = cpb.SaveRequest(
                checkpoint=checkpoint,
                keep_last=ex.workflow.keep_last,
                expected_parent_id=ex.head_id,
                fencing_token=ex.token,
                status=getattr(cpb, f"THREAD_STATUS_{run.status}") if status else 0,
                workflow_version=workflow_version,
                events=events,
                # Unique per (head, token): a retry after a lost answer gets the first result.
                request_id=f"save:{run.run_id}:{ex.token}:{ex.head_id}",
                release_lease=release,
            )
            try:
                saved = await self.store.save(request)
            except BaseException:
                ex.unwritten = absorbed + ex.unwritten  # still to be written
                raise
            if feed := self.feeds.get(run.run_id):
                feed.saved(request, saved)
            ex.carry.clear()
            ex.released = release
            ex.head_id = saved.checkpoint.checkpoint_id
            metrics.checkpoints(trigger).inc()
            return ex.head_id

    async def _write(
        self,
        ex: Execution,
        node_id: str,
        channel: str,
        value: Any,
        event_of: Callable[[], cpb.NewEvent] | None = None,
        *,
        deferred: bool = False,
        step_saves: bool = False,
    ) -> None:
        """A node's result, saved with its event before this returns. `deferred`: the step's
        checkpoint, which comes next, saves it instead. `step_saves`: a checkpoint follows the
        step, so if the step is over by the time the write would be sent, it saves it.

        Results that finish together go in one PutWrites; a checkpoint taken meanwhile saves
        them itself (docs/engine.md#checkpoints). The node counts as done from here on (so
        events of nodes finishing together count each other); no checkpoint can be taken
        while a write is being sent, and if a write fails the run stops."""
        run = ex.run
        async with ex.gate.shared():
            if channel == OUTPUT_CHANNEL:
                run.outputs[node_id] = value
                ex.state_json.put("outputs", node_id, value)
                run.completed.append(node_id)
            else:
                run.skipped.append(node_id)
            event = event_of() if event_of else None
            if deferred:
                ex.carry.extend([event] if event else [])
                return
            write = cpb.PendingWrite(
                task_id=node_id, idx=0, channel=channel, value=json.dumps(value).encode()
            )
            ex.unwritten.append(_Unwritten(write, event, step_saves))
            if ex.writer is None:
                ex.writer = asyncio.ensure_future(self._write_together(ex))
            writer = ex.writer
        await asyncio.shield(writer)

    async def _write_together(self, ex: Execution) -> None:
        """Send the results waiting to be written, in one call, once the nodes finishing in
        this same turn of the event loop have joined them."""
        await asyncio.sleep(0)
        run = ex.run
        async with ex.gate.shared():
            ex.writer = None  # results from now on go in a call of their own
            items, ex.unwritten = ex.unwritten, []
            events = [i.event for i in items if i.event is not None]
            if not items:
                return  # a checkpoint saved them meanwhile
            if ex.running == 0 and all(i.step_saves for i in items):
                ex.carry.extend(events)  # the step is over: its checkpoint, next, saves them
                return
            for i in items:
                i.write.checkpoint_id = ex.head_id
            written = await self.store.put_writes(
                cpb.PutWritesRequest(
                    namespace=RUNS_NAMESPACE,
                    thread_id=run.run_id,
                    fencing_token=ex.token,
                    writes=[i.write for i in items],
                    events=events,
                    request_id=(
                        f"writes:{run.run_id}:{ex.token}:{ex.head_id}:"
                        f"{items[0].write.task_id}:{len(items)}"
                    ),
                )
            )
            if events and (feed := self.feeds.get(run.run_id)):
                feed.appended(events, written.seqs, written.events_time)

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

    # ---- leases ---------------------------------------------------------------------

    async def _acquire(self, run_id: str, owner: str) -> int:
        try:
            lease = await self.store.acquire_lease(
                cpb.AcquireLeaseRequest(
                    namespace=RUNS_NAMESPACE,
                    thread_id=run_id,
                    owner=owner,
                    ttl_seconds=self.lease_ttl,
                )
            )
        except LeaseLost as exc:
            raise LeaseHeld(str(exc)) from exc
        return lease.fencing_token

    async def _release(self, run_id: str, owner: str, token: int) -> None:
        await self.store.release_lease(
            cpb.ReleaseLeaseRequest(
                namespace=RUNS_NAMESPACE, thread_id=run_id, owner=owner, fencing_token=token
            )
        )

    @contextlib.asynccontextmanager
    async def _held(self, workflow: Workflow, run_id: str) -> AsyncIterator[Execution]:
        """The run under a short lease of the caller's own, for a change made from outside
        (no engine is running it)."""
        owner = f"{self.owner}/control"
        token = await self._acquire(run_id, owner)
        try:
            run, head_id = await self._restore(run_id)
            yield self._execution(workflow, run, head_id, token)
        finally:
            await self._release(run_id, owner, token)

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
            status="PENDING",
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
        announced = self._announceable(ex)
        pending = status_event("PENDING", total_nodes=len(workflow.nodes))
        run.status = "RUNNING"
        events = [pending, status_event("RUNNING", **ex.progress()), *self._started(ex, announced)]
        checkpoint = _run_checkpoint(ex, cpb.TRIGGER_MANUAL, name, metadata)
        checkpoint.checkpoint_id = start_checkpoint_id(run.run_id)
        checkpoint.parent_id = parent_id
        request = cpb.SaveRequest(
            checkpoint=checkpoint,
            keep_last=workflow.keep_last,
            expected_parent_id="",
            status=cpb.THREAD_STATUS_RUNNING,
            workflow_id=workflow.workflow_id,
            workflow_version=run.version,
            request_id=f"start:{request_id}" if request_id else "",
            events=events,
            # The lease in the same commit: the run starts here without another call.
            lease_owner=self.owner,
            lease_ttl_seconds=self.lease_ttl,
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
            if run.status != "COMPLETED":
                raise NotResumable(
                    f"run {run_id!r} is {run.status}; only a COMPLETED run continues"
                )
            run.input, run.version, run.total = run_input, version, len(workflow.nodes)
            run.completed, run.skipped, run.breaks_passed = [], [], []
            run.interrupt_before = list(interrupt_before or [])
            run.interrupt_after = list(interrupt_after or [])
            run.status, run.error = "PENDING", ""
            await self._save(
                ex,
                cpb.TRIGGER_MANUAL,
                name="continue",
                events=[status_event("PENDING", total_nodes=run.total)],
                workflow_version=version,
            )
            return run

    async def resume(self, workflow: Workflow, run_id: str, value: Any) -> RunState:
        """Make a PAUSED, FAILED or WAITING run RUNNING again (answering the approval with
        `value`) in one checkpoint; `execute` then continues it. NotResumable otherwise."""
        async with self._held(workflow, run_id) as ex:
            run = ex.run
            events: list[cpb.NewEvent] = []
            if run.status == "WAITING":
                node_id = run.waiting_node
                run.outputs[node_id] = value
                run.completed.append(node_id)
                run.waiting_node = run.waiting_for = ""
                completed = cpb.NewEvent(type="node.completed")
                completed.payload.update({"node_id": node_id, **ex.progress()})
                events.append(completed)
            elif run.status not in ("PAUSED", "FAILED"):
                raise NotResumable(
                    f"run {run_id!r} is {run.status}: only PAUSED, WAITING and FAILED runs resume"
                )
            run.status, run.error = "RUNNING", ""
            events.append(status_event("RUNNING", **ex.progress()))
            await self._save(ex, cpb.TRIGGER_MANUAL, name="resume", events=events)
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
                head = await self._save(
                    ex,
                    cpb.TRIGGER_MANUAL,
                    name=payload.get("name", ""),
                    metadata=payload.get("metadata", {}),
                    status=False,
                )
                return run, head
            if action == "pause" and run.status == "PAUSED":
                return run, ex.head_id
            run.status = "PAUSED" if action == "pause" else "CANCELLED"
            if action == "cancel":
                run.error = f"cancelled: {payload.get('reason') or 'no reason given'}"
            run.waiting_node = run.waiting_for = ""
            trigger = cpb.TRIGGER_PAUSE if action == "pause" else cpb.TRIGGER_INTERRUPT
            event = status_event(run.status, control_id=control_id, **ex.progress())
            head = await self._save(ex, trigger, name=action, events=[event])
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
                token = await self._acquire(run_id, self.owner)
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
            if run.status not in ("PENDING", "RUNNING"):
                return run
            self.live[run_id] = ex
            metrics.RUNS_EXECUTING.inc()
            steps = asyncio.create_task(self._steps(ex), name=f"steps-{run_id}")
            helpers = [
                asyncio.create_task(self._renew(ex, asyncio.current_task())),
                asyncio.create_task(self._control(ex, steps)),
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
                return await self._cancelled(ex)
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
                await self._release(run_id, self.owner, token)

    async def _renew(self, ex: Execution, work: asyncio.Task | None) -> None:
        failing = False  # said once per outage, not at every renewal
        while True:
            await asyncio.sleep(self.lease_ttl / 3)
            if ex.released:
                return
            try:
                await self.store.renew_lease(
                    cpb.RenewLeaseRequest(
                        namespace=RUNS_NAMESPACE,
                        thread_id=ex.run.run_id,
                        owner=self.owner,
                        fencing_token=ex.token,
                        ttl_seconds=self.lease_ttl,
                    )
                )
            except StoreError as exc:
                if ex.released:
                    return  # its last checkpoint let the lease go meanwhile
                if isinstance(exc, LeaseLost) and work is not None:
                    log.warning("lease lost; stopping run", extra={"run_id": ex.run.run_id})
                    work.cancel()
                    return
                # The store is away: keep trying; writes are fenced if someone took over.
                if not failing:
                    log.warning(
                        "lease renewal failed; retrying",
                        extra={"run_id": ex.run.run_id, "error": str(exc)},
                    )
                failing = True
                continue
            if failing:
                log.info("lease renewed again", extra={"run_id": ex.run.run_id})
                failing = False

    async def _control(self, ex: Execution, steps: asyncio.Task) -> None:
        """Follow the run's control feed from the last request handled, and act on each.
        Only from CONTROL_FOLLOW_AFTER into the execution, or once this engine was asked
        (follow_control): a short run opens no stream, and a request made on another engine
        before then waits in the feed until it is read."""
        run = ex.run
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CONTROL_FOLLOW_AFTER):
                await ex.follow_control.wait()
        while True:
            try:
                async for item in self.store.stream(
                    cpb.StreamRequest(
                        namespace=CONTROL_NAMESPACE,
                        thread_id=run.run_id,
                        after_seq=run.control_seq,
                        follow=True,
                    )
                ):
                    if not item.HasField("event"):
                        continue
                    ev = item.event
                    run.control_seq = ev.seq
                    request = json_format.MessageToDict(ev.payload)
                    if float(request.get("deadline", math.inf)) < time.time():
                        continue  # the asker gave up on it and said so
                    await self._on_control(ex, steps, ev.type, request)
            except StoreError:
                await asyncio.sleep(1.0)  # the store is away; resume from the last seq

    async def _on_control(
        self, ex: Execution, steps: asyncio.Task, kind: str, request: dict[str, Any]
    ) -> None:
        control_id = str(request.get("control_id", ""))
        if kind == "control.cancel":
            ex.cancel = (str(request.get("reason", "")), control_id)
            async with ex.gate.exclusive():  # no save or write is cut off half-way
                steps.cancel()
        elif kind == "control.pause" and ex.pause is None:
            ex.pause = ("requested", control_id)
            await self._publish_events(ex, [_event("run.pausing", control_id=control_id)])
        elif kind == "control.unpause":  # a ResumeRun of a run whose pause is still pending
            # The answer's type says which: taken back, too late (PAUSED in a moment), or none.
            if ex.pause is not None and not ex.pausing and not ex.shutdown:
                ex.pause = None
                answer = "run.unpaused"
            else:
                answer = "run.pausing" if ex.pause is not None else "control.refused"
            await self._publish_events(ex, [_event(answer, control_id=control_id)])
        elif kind == "control.checkpoint":
            ack = cpb.NewEvent(type="control.applied")
            ack.payload.update({"control_id": control_id})
            await self._save(
                ex,
                cpb.TRIGGER_MANUAL,
                name=str(request.get("name", "")),
                metadata={str(k): str(v) for k, v in request.get("metadata", {}).items()},
                events=[ack],
                status=False,
            )

    async def _tick(self, ex: Execution, interval: float) -> None:
        """The time-based trigger: a checkpoint every interval, long nodes included."""
        while True:
            await asyncio.sleep(interval)
            await self._save(ex, cpb.TRIGGER_TIME_BASED, name="interval", status=False)

    async def _cancelled(self, ex: Execution) -> RunState:
        reason, control_id = ex.cancel or ("", "")
        run = ex.run
        run.status = "CANCELLED"
        run.error = f"cancelled: {reason or 'no reason given'}"
        event = status_event("CANCELLED", control_id=control_id, **ex.progress())
        await self._save(ex, cpb.TRIGGER_INTERRUPT, name="cancel", events=[event], release=True)
        return run

    async def _paused(self, ex: Execution) -> RunState:
        ex.pausing = True
        why, control_id = ex.pause or ("", "")
        run = ex.run
        if ex.shutdown:  # another engine (or this one, restarted) goes on from here at once
            await self._save(ex, cpb.TRIGGER_PAUSE, name="engine-shutdown", release=True)
            return run
        run.status = "PAUSED"
        event = status_event("PAUSED", control_id=control_id, reason=why, **ex.progress())
        await self._save(ex, cpb.TRIGGER_PAUSE, name="pause", events=[event], release=True)
        return run

    async def _steps(self, ex: Execution) -> RunState:
        run, workflow = ex.run, ex.workflow
        opening: list[cpb.NewEvent] = []  # sent with the first node.started events
        if run.status == "PENDING":
            run.status = "RUNNING"
            opening.append(status_event("RUNNING", **ex.progress()))
        gate = asyncio.Semaphore(ex.parallel)
        # With a checkpoint after every step, the step's last node rides on it (one call less
        # per step), and so do the node.started events of the next step.
        step_checkpoints = pb.CHECKPOINT_TRIGGER_STEP_COMPLETED in workflow.triggers
        before_critical = pb.CHECKPOINT_TRIGGER_BEFORE_CRITICAL in workflow.triggers
        while True:
            if ex.pause is not None:
                return await self._paused(ex)
            ready = ex.ready()
            if not ready:
                break
            runnable = [n for n in ready if n.type != "approval"]
            if not runnable:  # only approvals are left to start: wait for an answer
                node = ready[0]
                if node.when and not expressions.evaluate(node.when, run.state()):
                    await self._write(ex, node.id, SKIPPED_CHANNEL, True, _done_event(ex, node))
                    continue
                run.status = "WAITING"
                run.waiting_node, run.waiting_for = node.id, str(node.config.get("prompt", ""))
                event = status_event("WAITING", node_id=node.id, **ex.progress())
                await self._save(
                    ex, cpb.TRIGGER_INTERRUPT, name=node.id, events=[event], release=True
                )
                return run  # nothing holds a task or a lease while it waits
            held = [
                f"before:{n.id}"
                for n in runnable
                if n.id in run.interrupt_before and f"before:{n.id}" not in run.breaks_passed
            ]
            if held:
                return await self._breakpoint(ex, held)
            critical = [n.id for n in runnable if n.critical]
            if critical and before_critical:
                name = "before:" + ",".join(critical)
                await self._save(ex, cpb.TRIGGER_BEFORE_CRITICAL, name=name)
            state = run.state()
            first = [
                n.id for n in runnable[: ex.parallel] if not n.when and n.id not in ex.announced
            ]
            if first or opening:
                await self._publish_events(ex, [*opening, *self._started(ex, first)])
                opening = []
            announced, ex.announced = ex.announced | set(first), set()
            ex.running = len(runnable)
            results = await asyncio.gather(
                *(
                    self._node(ex, n, state, gate, n.id in announced, step_checkpoints)
                    for n in runnable
                )
            )
            failures = {nid: err for nid, err in results if err}
            run.step += 1
            if failures:
                run.status = "FAILED"
                run.error = "; ".join(f"{k}: {v}" for k, v in failures.items())
                event = status_event("FAILED", error=run.error, **ex.progress())
                await self._save(ex, cpb.TRIGGER_ERROR, name="error", events=[event], release=True)
                return run
            hit = [
                f"after:{n.id}"
                for n in runnable
                if n.id in run.interrupt_after
                and n.id in run.completed
                and f"after:{n.id}" not in run.breaks_passed
            ]
            if hit:
                return await self._breakpoint(ex, hit)
            if ex.all_done():
                break
            if step_checkpoints:
                following = self._announceable(ex) if ex.pause is None else []
                ex.announced = set(following)
                await self._save(
                    ex, cpb.TRIGGER_STEP_COMPLETED, events=self._started(ex, following)
                )
        run.status = "COMPLETED"
        event = status_event("COMPLETED", **ex.progress())
        await self._save(ex, cpb.TRIGGER_STEP_COMPLETED, events=[event], release=True)
        return run

    async def _breakpoint(self, ex: Execution, keys: list[str]) -> RunState:
        """Pause at breakpoints ("before:<id>", "after:<id>"); ResumeRun goes past them."""
        run = ex.run
        run.breaks_passed += keys
        run.status = "PAUSED"
        name = ",".join(keys)
        event = status_event("PAUSED", reason="breakpoint", breakpoint=name, **ex.progress())
        await self._save(ex, cpb.TRIGGER_INTERRUPT, name=name, events=[event], release=True)
        return run

    @staticmethod
    def _announceable(ex: Execution) -> list[str]:
        """The nodes the next step starts at once, whose node.started may go out ahead with
        a checkpoint: ready, not approvals, without a condition or a checkpoint or breakpoint
        before them, within max_parallel."""
        before_critical = pb.CHECKPOINT_TRIGGER_BEFORE_CRITICAL in ex.workflow.triggers
        return [
            n.id
            for n in ex.ready()
            if n.type != "approval"
            and not n.when
            and not (n.critical and before_critical)
            and n.id not in ex.run.interrupt_before
        ][: ex.parallel]

    @staticmethod
    def _started(ex: Execution, node_ids: list[str]) -> list[cpb.NewEvent]:
        progress = ex.progress()
        return [
            _event("node.started", node_id=n, attempt=1, status=ex.run.status, **progress)
            for n in node_ids
        ]

    async def _publish_events(self, ex: Execution, events: list[cpb.NewEvent]) -> None:
        published = await self.store.publish(
            cpb.PublishRequest(
                namespace=RUNS_NAMESPACE,
                thread_id=ex.run.run_id,
                events=events,
                fencing_token=ex.token,
                request_id=f"publish:{ex.run.run_id}:{ex.token}:{time.time_ns()}",
            )
        )
        if feed := self.feeds.get(ex.run.run_id):
            feed.appended(events, published.seqs, published.events_time)

    async def _node(
        self,
        ex: Execution,
        node: NodeSpec,
        state: dict[str, Any],
        gate: asyncio.Semaphore,
        announced: bool,
        may_defer: bool,
    ) -> tuple[str, str]:
        """Run one node with its retry policy; record its output at once. (node id, error);
        a node held back by a pause is neither done nor failed."""
        if node.when and not expressions.evaluate(node.when, state):
            ex.running -= 1
            await self._write(
                ex, node.id, SKIPPED_CHANNEL, True, _done_event(ex, node), step_saves=may_defer
            )
            return node.id, ""
        policy = node.retry
        attempt = 0
        call = NodeCall(self.tenant, ex.run.run_id)
        async with gate:
            if ex.pause is not None:
                ex.running -= 1
                return node.id, ""  # not started: it runs when the run is resumed
            if not announced:
                await self._publish_events(ex, self._started(ex, [node.id]))
            started = time.monotonic()

            async def once() -> Any:
                nonlocal attempt
                attempt += 1
                async with asyncio.timeout(node.timeout):  # no task of its own, unlike wait_for
                    return await self.runner.run(call, node, state)

            try:
                try:  # the first attempt without the retry machinery: most nodes need no more
                    output = await once()
                except Exception:
                    if policy.max_attempts <= 1:
                        raise
                    # The same waits as one AsyncRetrying over every attempt: initial_backoff,
                    # then growing by `multiplier`, at most max_backoff.
                    await asyncio.sleep(min(policy.initial_backoff, policy.max_backoff))
                    async for trying in AsyncRetrying(
                        stop=stop_after_attempt(policy.max_attempts - 1),
                        wait=wait_exponential(
                            multiplier=policy.initial_backoff * policy.multiplier,
                            max=policy.max_backoff,
                            exp_base=policy.multiplier,
                        ),
                        reraise=True,
                    ):
                        with trying:
                            output = await once()
            except Exception as exc:  # the node's failure, not the engine's
                ex.running -= 1
                metrics.nodes(node.type, "failed").inc()
                if isinstance(exc, TimeoutError):
                    error = f"timed out after {node.timeout:g}s"
                else:
                    error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                failed = _event(
                    "node.failed",
                    node_id=node.id,
                    attempt=attempt,
                    error=error,
                    status=ex.run.status,
                    **ex.progress(),
                )
                await self._publish_events(ex, [failed])
                return node.id, error
        duration = time.monotonic() - started
        ex.finished(node.id, round(duration, 6))
        metrics.nodes(node.type, "completed").inc()
        metrics.node_seconds(node.type).observe(duration)
        ex.running -= 1
        completed = _done_event(ex, node, attempt=attempt, duration_seconds=duration, output=output)
        deferred = may_defer and ex.running == 0  # the step's checkpoint comes next
        await self._write(
            ex, node.id, OUTPUT_CHANNEL, output, completed, deferred=deferred, step_saves=may_defer
        )
        if pb.CHECKPOINT_TRIGGER_NODE_COMPLETED in ex.workflow.triggers:
            await self._save(ex, cpb.TRIGGER_NODE_COMPLETED, name=node.id, status=False)
        return node.id, ""


def _done_event(ex: Execution, node: NodeSpec, **payload: Any) -> Callable[[], cpb.NewEvent]:
    """node.completed (or node.skipped, without a payload), built once the node counts as
    done, so that its progress includes it."""
    kind = "node.completed" if payload else "node.skipped"
    return lambda: _event(kind, node_id=node.id, status=ex.run.status, **payload, **ex.progress())


def _run_checkpoint(
    ex: Execution, trigger: int, name: str, metadata: dict[str, str] | None
) -> cpb.Checkpoint:
    """A checkpoint of the run as it is now, as every save of a run sends it."""
    run = ex.run
    return cpb.Checkpoint(
        namespace=RUNS_NAMESPACE,
        thread_id=run.run_id,
        state=ex.state_json.encode(run.__dict__),
        content_type="application/json",
        step=run.step,
        trigger=trigger,
        name=name,
        completed_nodes=run.completed,
        metadata=metadata or {},
        expires_at=_expiry(ex.workflow),
    )


def _expiry(workflow: Workflow) -> Timestamp | None:
    """When a checkpoint of this workflow's runs expires (its policy's ttl), if ever."""
    if workflow.ttl is None:
        return None
    expires = Timestamp()
    expires.FromNanoseconds(int((time.time() + workflow.ttl) * 1e9))
    return expires


def _event(kind: str, **payload: Any) -> cpb.NewEvent:
    event = cpb.NewEvent(type=kind)
    event.payload.update(payload)
    return event


def apply_patch(workflow: Workflow, run: RunState, patch: dict[str, Any]) -> RunState:
    """A fork's state patch: "input" (an object) is merged into the input; a node id sets
    that node's output and counts it as done. Anything else is InvalidArgument."""
    ids = {n.id for n in workflow.nodes}
    bad = [
        (f"state_patch.{key}", 'not a node of the workflow, nor "input"')
        for key in patch
        if key != "input" and key not in ids
    ]
    if "input" in patch and not isinstance(patch["input"], dict):
        bad.append(("state_patch.input", "must be an object"))
    if bad:
        raise InvalidArgument("state_patch: " + "; ".join(f"{f}: {d}" for f, d in bad), bad)
    for key, value in patch.items():
        if key == "input":
            run.input = {**run.input, **value}
            continue
        run.outputs[key] = value
        if key in run.skipped:
            run.skipped.remove(key)
        if key not in run.completed:
            run.completed.append(key)
    return run


def check_control(run: RunState, action: str) -> None:
    """NotResumable unless `action` applies to a run in this status."""
    if action == "checkpoint":
        return
    if run.status in TERMINAL:
        raise NotResumable(f"run {run.run_id!r} is already {run.status}")
    if action == "pause" and run.status == "WAITING":
        raise NotResumable(f"run {run.run_id!r} is WAITING for an answer: resume or cancel it")
    if action == "unpause" and run.status != "RUNNING":
        raise NotResumable(f"run {run.run_id!r} is {run.status}, not pausing")
