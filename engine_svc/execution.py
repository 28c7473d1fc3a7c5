"""One engine's hold on one run while it executes: what its step loop, control watcher,
lease renewal and ticker share, and what it knows of the run's progress."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from engine_svc.definition import NodeSpec, Workflow
from engine_svc.run_json import RunJson
from engine_svc.run_state import RunState
from workflow_stubs.checkpoint.v1 import checkpoint_pb2 as cpb

__all__ = ["Execution", "Unwritten", "WriteGate"]


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
class Unwritten:
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
    # Results waiting to be sent together (RunRecorder.write), and the task sending them.
    unwritten: list[Unwritten] = field(default_factory=list)
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
