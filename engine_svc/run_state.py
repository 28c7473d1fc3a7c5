"""A run as its checkpoints hold it, and its status (docs/engine.md#how-a-run-executes).

The status is one enum end to end: RunState holds it, events and checkpoints spell it by
name, and each member knows its engine.v1.RunStatus and the store's thread status.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from dataclasses import dataclass, field
from typing import Any

from engine_svc.definition import Workflow
from workflow_rpc.namespaces import RUNS_NAMESPACE
from workflow_rpc.statuses import InvalidArgument
from workflow_stubs.checkpoint.v1 import checkpoint_pb2 as cpb
from workflow_stubs.engine.v1 import engine_pb2 as pb

__all__ = [
    "OUTPUT_CHANNEL",
    "RUNS_NAMESPACE",
    "SKIPPED_CHANNEL",
    "TERMINAL",
    "NotARun",
    "NotResumable",
    "RunState",
    "RunStatus",
    "apply_patch",
    "event",
    "start_checkpoint_id",
    "status_event",
]

OUTPUT_CHANNEL = "output"
SKIPPED_CHANNEL = "skipped"


class RunStatus(enum.StrEnum):
    """A run's status, as RunState, its events and its checkpoints spell it."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    PAUSED = "PAUSED"
    WAITING = "WAITING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    PAUSING = "PAUSING"  # only in answers: a RUNNING run whose pause waits for its step

    @property
    def proto(self) -> pb.RunStatus.ValueType:
        """As engine.v1 says it."""
        return _PROTO[self]

    @property
    def thread_status(self) -> cpb.ThreadStatus.ValueType:
        """The run's thread's status in the store (a pausing run is still RUNNING there)."""
        return _THREAD[self]

    @property
    def terminal(self) -> bool:
        return self in TERMINAL

    @classmethod
    def of_thread(cls, status: int) -> RunStatus | None:
        """The status a run's thread records; None for none (UNSPECIFIED) or an unknown one."""
        return _OF_THREAD.get(status)

    @classmethod
    def of_proto(cls, status: int) -> RunStatus | None:
        """An engine.v1.RunStatus; None for UNSPECIFIED or an unknown one."""
        return _OF_PROTO.get(status)

    @classmethod
    def of_name(cls, name: str) -> RunStatus | None:
        """The status a name spells (as checkpoints and events hold it); None if none does."""
        return _OF_NAME.get(name)


_PROTO = {
    RunStatus.PENDING: pb.RUN_STATUS_PENDING,
    RunStatus.RUNNING: pb.RUN_STATUS_RUNNING,
    RunStatus.PAUSED: pb.RUN_STATUS_PAUSED,
    RunStatus.WAITING: pb.RUN_STATUS_WAITING,
    RunStatus.COMPLETED: pb.RUN_STATUS_COMPLETED,
    RunStatus.FAILED: pb.RUN_STATUS_FAILED,
    RunStatus.CANCELLED: pb.RUN_STATUS_CANCELLED,
    RunStatus.PAUSING: pb.RUN_STATUS_PAUSING,
}
_THREAD = {
    RunStatus.PENDING: cpb.THREAD_STATUS_PENDING,
    RunStatus.RUNNING: cpb.THREAD_STATUS_RUNNING,
    RunStatus.PAUSED: cpb.THREAD_STATUS_PAUSED,
    RunStatus.WAITING: cpb.THREAD_STATUS_WAITING,
    RunStatus.COMPLETED: cpb.THREAD_STATUS_COMPLETED,
    RunStatus.FAILED: cpb.THREAD_STATUS_FAILED,
    RunStatus.CANCELLED: cpb.THREAD_STATUS_CANCELLED,
    RunStatus.PAUSING: cpb.THREAD_STATUS_RUNNING,
}
_OF_THREAD = {t: s for s, t in _THREAD.items() if s is not RunStatus.PAUSING}
_OF_PROTO = {p: s for s, p in _PROTO.items()}
_OF_NAME = {s.value: s for s in RunStatus}
TERMINAL = frozenset({RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED})


class NotARun(ValueError):
    """A `runs/<id>` thread whose state is not a run's: for the engine, no such run."""


class NotResumable(Exception):
    """ResumeRun, PauseRun or CancelRun on a run in a status that does not allow it."""


def start_checkpoint_id(run_id: str) -> str:
    """A run's first checkpoint has a fixed id: starting the same run id twice is refused."""
    return f"0-start-{run_id}"


def event(kind: str, **payload: Any) -> cpb.NewEvent:
    """An event for the run's feed."""
    new = cpb.NewEvent(type=kind)
    new.payload.update(payload)
    return new


def status_event(status: RunStatus, **extra: Any) -> cpb.NewEvent:
    return event("run.status", status=status.value, **extra)


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
    status: RunStatus = RunStatus.PENDING
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
        status = RunStatus.of_name(data.get("status", "PENDING"))
        if status is None:
            raise NotARun(f"its status {data['status']!r} is not a run status")
        data["status"] = status
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
