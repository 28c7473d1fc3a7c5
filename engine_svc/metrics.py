"""Prometheus metrics of the engine, served over HTTP when --metrics-port is set."""

from __future__ import annotations

import functools

from prometheus_client import Counter, Gauge, Histogram

from workflow_stubs.checkpoint.v1 import checkpoint_pb2 as cpb

RUNS_ENDED = Counter(
    "engine_runs_stopped", "Executions of runs that stopped here, by the run's status", ["status"]
)
RUNS_EXECUTING = Gauge("engine_runs_executing", "Runs this engine executes now")
NODES = Counter("engine_nodes", "Node executions by type and outcome", ["type", "outcome"])
NODE_SECONDS = Histogram("engine_node_seconds", "Time a node took, retries included", ["type"])
CHECKPOINTS = Counter("engine_checkpoints", "Checkpoints saved, by trigger", ["trigger"])
TAKEOVERS = Counter("engine_takeovers", "Runs taken over from an engine whose lease expired")


# A series per label values, looked up once (labels() takes a lock and builds a key each call,
# several times per step). Their values are few: node types, outcomes, triggers.
@functools.cache
def nodes(node_type: str, outcome: str) -> Counter:
    return NODES.labels(node_type, outcome)


@functools.cache
def node_seconds(node_type: str) -> Histogram:
    return NODE_SECONDS.labels(node_type)


@functools.cache
def checkpoints(trigger: int) -> Counter:
    return CHECKPOINTS.labels(cpb.Trigger.Name(trigger).removeprefix("TRIGGER_"))
