"""Prometheus metrics of the engine, served over HTTP when --metrics-port is set."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

RUNS_ENDED = Counter(
    "engine_runs_stopped", "Executions of runs that stopped here, by the run's status", ["status"]
)
RUNS_EXECUTING = Gauge("engine_runs_executing", "Runs this engine executes now")
NODES = Counter("engine_nodes", "Node executions by type and outcome", ["type", "outcome"])
NODE_SECONDS = Histogram("engine_node_seconds", "Time a node took, retries included", ["type"])
CHECKPOINTS = Counter("engine_checkpoints", "Checkpoints saved, by trigger", ["trigger"])
TAKEOVERS = Counter("engine_takeovers", "Runs taken over from an engine whose lease expired")
