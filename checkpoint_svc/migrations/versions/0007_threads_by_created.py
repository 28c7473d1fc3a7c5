"""Listing threads newest first (ListThreadsRequest.newest_first: ListRuns).

Revision ID: 0007
"""

from checkpoint_svc.migrations.indexes import create_index

revision = "0007"
down_revision = "0006"


def upgrade() -> None:
    create_index("threads_by_created", "threads", "(tenant, namespace, created_at, thread_id)")
