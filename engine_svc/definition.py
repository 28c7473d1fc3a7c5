"""Workflow definitions: parsed from protobuf and validated once, at registration.

Every problem is reported with the field it is in (`nodes[2].depends_on[0]`), all of them
at once, so that a client can fix a definition in one round trip.
"""

from __future__ import annotations

import graphlib
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format

from engine_svc import expressions, values
from engine_svc.node_configs import CONFIG_MODELS, config_problems
from workflow_stubs.engine.v1 import engine_pb2 as pb

_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
DEFAULT_TRIGGERS = frozenset(
    {
        pb.CHECKPOINT_TRIGGER_STEP_COMPLETED,
        pb.CHECKPOINT_TRIGGER_BEFORE_CRITICAL,
        pb.CHECKPOINT_TRIGGER_INTERRUPT,
        pb.CHECKPOINT_TRIGGER_PAUSE,
        pb.CHECKPOINT_TRIGGER_ERROR,
    }
)

Violations = list[tuple[str, str]]

# Bounds that keep one definition's work and every time derived from it in range.
MAX_NODES = 10_000
MAX_PARALLEL = 1000  # a step's node.started events ride on one store request
MAX_DURATION_SECONDS = 10 * 366 * 24 * 3600.0  # ten years: expiries stay valid Timestamps
_DURATION_LIMIT = 315_576_000_000  # protobuf's own range for Duration.seconds


class DefinitionInvalid(ValueError):
    """A definition that cannot run; `violations` are (field, description) pairs."""

    def __init__(self, violations: Violations) -> None:
        super().__init__("; ".join(f"{f}: {d}" for f, d in violations))
        self.violations = violations


@dataclass(frozen=True, slots=True)
class Retry:
    max_attempts: int = 1
    initial_backoff: float = 1.0
    max_backoff: float = 60.0
    multiplier: float = 2.0


@dataclass(frozen=True, slots=True)
class NodeSpec:
    id: str
    type: str
    depends_on: tuple[str, ...] = ()
    config: dict[str, Any] = field(default_factory=dict)
    retry: Retry = Retry()
    timeout: float | None = None
    when: str = ""
    critical: bool = False


@dataclass(frozen=True, slots=True)
class Shape:
    """A workflow's graph as its executions read it, worked out once per definition."""

    levels: tuple[tuple[str, ...], ...]
    """Nodes grouped by depth: a node's level is one more than its deepest dependency."""
    spec: dict[str, NodeSpec]
    """Each node by id."""
    position: dict[str, int]
    """Each node's place in the definition (the order of a step's nodes)."""
    level_of: dict[str, int]
    """Each node's level."""
    dependents: dict[str, tuple[str, ...]]
    """The nodes that depend on each node."""

    @classmethod
    def of(cls, nodes: tuple[NodeSpec, ...]) -> Shape:
        levels = topological_levels({n.id: n.depends_on for n in nodes})
        dependents: dict[str, list[str]] = {n.id: [] for n in nodes}
        for n in nodes:
            for d in set(n.depends_on):
                dependents[d].append(n.id)
        return cls(
            levels=tuple(tuple(level) for level in levels),
            spec={n.id: n for n in nodes},
            position={n.id: i for i, n in enumerate(nodes)},
            level_of={n: i for i, level in enumerate(levels) for n in level},
            dependents={k: tuple(v) for k, v in dependents.items()},
        )


@dataclass(frozen=True, slots=True)
class Workflow:
    workflow_id: str
    nodes: tuple[NodeSpec, ...]
    description: str = ""
    triggers: frozenset[int] = DEFAULT_TRIGGERS
    interval: float | None = None
    keep_last: int = 0
    max_parallel: int = 0
    ttl: float | None = None  # seconds each run checkpoint is kept
    shape: Shape = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", Shape.of(self.nodes))

    def node(self, node_id: str) -> NodeSpec:
        return next(n for n in self.nodes if n.id == node_id)

    def levels(self) -> list[list[str]]:
        """Nodes grouped by depth: a node's level is one more than its deepest dependency."""
        return [list(level) for level in self.shape.levels]


def topological_levels(deps: dict[str, tuple[str, ...]]) -> list[list[str]]:
    """Nodes by level (a node's level is one more than its deepest dependency), in
    definition order within a level. graphlib.CycleError for a cycle (parse names it)."""
    order = {n: i for i, n in enumerate(deps)}
    sorter = graphlib.TopologicalSorter(deps)
    sorter.prepare()
    levels: list[list[str]] = []
    while sorter.is_active():
        level = sorted(sorter.get_ready(), key=order.__getitem__)
        levels.append(level)
        sorter.done(*level)
    return levels


def find_cycle(deps: dict[str, tuple[str, ...]]) -> list[str] | None:
    """One cycle as a path (its first node repeated at the end), or None."""
    try:
        graphlib.TopologicalSorter(deps).prepare()
    except graphlib.CycleError as exc:
        # graphlib lists each node before the one that depends on it; we say it the other way.
        return list(exc.args[1])[::-1]
    return None


# ---- parsing ----------------------------------------------------------------------------


def _seconds(d: Any) -> float:
    return d.seconds + d.nanos / 1e9


def _duration(msg: Any, name: str, where: str, out: Violations) -> float | None:
    """A Duration field in seconds (None if unset); positive, valid and at most ten years."""
    if not msg.HasField(name):
        return None
    d = getattr(msg, name)
    if (
        abs(d.seconds) > _DURATION_LIMIT
        or abs(d.nanos) > 999_999_999
        or (d.seconds and d.nanos and (d.seconds < 0) != (d.nanos < 0))
    ):
        out.append((f"{where}{name}", "not a valid Duration"))
        return None
    seconds = _seconds(d)
    if seconds <= 0:
        out.append((f"{where}{name}", "must be positive"))
    elif seconds > MAX_DURATION_SECONDS:
        out.append((f"{where}{name}", "at most ten years"))
    return seconds


def parse(msg: pb.WorkflowDefinition) -> Workflow:
    """The workflow a definition describes; DefinitionInvalid lists everything wrong."""
    out: Violations = []
    if not _ID.match(msg.workflow_id):
        out.append(("workflow_id", "1-128 of A-Z a-z 0-9 _ -"))
    if not msg.nodes:
        out.append(("nodes", "at least one node"))
    if len(msg.nodes) > MAX_NODES:
        raise DefinitionInvalid([("nodes", f"at most {MAX_NODES} nodes")])
    seen: dict[str, int] = {}
    nodes: list[NodeSpec] = []
    for i, n in enumerate(msg.nodes):
        where = f"nodes[{i}]"
        if not _ID.match(n.id):
            out.append((f"{where}.id", "1-128 of A-Z a-z 0-9 _ -"))
        elif n.id in seen:
            out.append((f"{where}.id", f"duplicate of nodes[{seen[n.id]}]"))
        else:
            seen[n.id] = i
        if n.type not in CONFIG_MODELS:
            out.append(
                (
                    f"{where}.type",
                    f"unknown node type {n.type!r}; one of " + ", ".join(sorted(CONFIG_MODELS)),
                )
            )
        if len(n.depends_on) > MAX_NODES:
            raise DefinitionInvalid([(f"{where}.depends_on", f"at most {MAX_NODES}")])
        config: dict[str, Any] = {}
        if bad := values.struct_problem(n.config, f"{where}.config"):
            out.append(bad)
        else:
            config = json_format.MessageToDict(n.config)
        if n.type in CONFIG_MODELS and not bad:
            out.extend(config_problems(n.type, config, f"{where}.config"))
        if n.when and (problem := expressions.check(n.when)):
            out.append((f"{where}.when", problem))
        retry = _retry(n, where, out)
        timeout = _duration(n, "timeout", f"{where}.", out)
        nodes.append(
            NodeSpec(n.id, n.type, tuple(n.depends_on), config, retry, timeout, n.when, n.critical)
        )
    for i, n in enumerate(msg.nodes):
        for j, dep in enumerate(n.depends_on):
            if dep not in seen:
                out.append((f"nodes[{i}].depends_on[{j}]", f"unknown node {dep!r}"))
            elif dep == n.id:
                out.append((f"nodes[{i}].depends_on[{j}]", "a node cannot depend on itself"))
    deps: dict[str, tuple[str, ...]] = {}
    for n in nodes:  # the first node of a duplicated id stands for it
        if n.id in seen and n.id not in deps:
            deps[n.id] = tuple(d for d in n.depends_on if d in seen and d != n.id)
    cycle = find_cycle(deps)
    if cycle:
        out.append(("nodes", "cycle: " + " -> ".join(cycle)))
    policy = msg.checkpoint
    if len(policy.triggers) > 64:
        raise DefinitionInvalid([("checkpoint.triggers", "at most 64")])
    triggers = frozenset(policy.triggers) or DEFAULT_TRIGGERS
    for i, t in enumerate(policy.triggers):
        if t not in pb.CheckpointTrigger.values() or t == pb.CHECKPOINT_TRIGGER_UNSPECIFIED:
            out.append((f"checkpoint.triggers[{i}]", f"unknown trigger {t}"))
    interval = _duration(policy, "interval", "checkpoint.", out)
    if pb.CHECKPOINT_TRIGGER_TIME_BASED in triggers and not policy.HasField("interval"):
        out.append(("checkpoint.interval", "required with CHECKPOINT_TRIGGER_TIME_BASED"))
    if policy.keep_last < 0:
        out.append(("checkpoint.keep_last", "must not be negative"))
    ttl = _duration(policy, "ttl", "checkpoint.", out)
    if not 0 <= msg.max_parallel <= MAX_PARALLEL:
        out.append(("max_parallel", f"between 0 and {MAX_PARALLEL}"))
    if out:
        raise DefinitionInvalid(out)
    return Workflow(
        msg.workflow_id,
        tuple(nodes),
        msg.description,
        triggers,
        interval,
        policy.keep_last,
        msg.max_parallel,
        ttl,
    )


def _retry(n: pb.Node, where: str, out: Violations) -> Retry:
    r = n.retry
    if r.max_attempts < 0:
        out.append((f"{where}.retry.max_attempts", "must not be negative"))
    if not math.isfinite(r.backoff_multiplier):
        out.append((f"{where}.retry.backoff_multiplier", "must be a finite number"))
        return Retry()
    initial = 1.0
    if r.HasField("initial_backoff"):  # zero: retry at once
        zero = r.initial_backoff.seconds == 0 and r.initial_backoff.nanos == 0
        initial = 0.0 if zero else _duration(r, "initial_backoff", f"{where}.retry.", out) or 0.0
    maximum = max(60.0, initial)
    if r.HasField("max_backoff"):
        maximum = _duration(r, "max_backoff", f"{where}.retry.", out) or maximum
    multiplier = r.backoff_multiplier or 2.0
    if initial < 0 or maximum < initial:
        out.append((f"{where}.retry", "need 0 <= initial_backoff <= max_backoff"))
    if multiplier < 1:
        out.append((f"{where}.retry.backoff_multiplier", "must be at least 1"))
    return Retry(max(1, r.max_attempts), initial, maximum, multiplier)


def fingerprint(msg: pb.WorkflowDefinition) -> str:
    """Equal for equal definitions: registering an unchanged one makes no new version."""
    canonical = json_format.MessageToDict(msg, preserving_proto_field_name=True)
    return hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()
