"""Prometheus metrics, served over HTTP when --metrics-port is set."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

COMMITS = Counter("checkpoint_commits", "SQL transactions committed by the group committer")
COMMITTED_OPERATIONS = Counter(
    "checkpoint_committed_operations", "Writes (saves, writes, events, leases) committed"
)
BATCH_SIZE = Histogram(
    "checkpoint_batch_size",
    "Operations per committed transaction",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
LOST_COMMIT_ANSWERS = Counter(
    "checkpoint_lost_commit_answers",
    "COMMITs whose answer was lost (a timeout, a broken connection), by what the batch marker "
    "then said: landed, not_landed, unknown",
    ["outcome"],
)
COMMIT_SECONDS = Histogram("checkpoint_commit_seconds", "Time to commit one batch")
RESTORES = Counter("checkpoint_restores", "Restores by the tier that served the body", ["tier"])
TIER_UP = Gauge("checkpoint_tier_up", "1 if the tier is reachable", ["tier"])
STREAM_WATCHERS = Gauge("checkpoint_stream_watchers", "Open Stream calls")
