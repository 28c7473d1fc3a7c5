"""Listing threads newest first (ListThreadsRequest.newest_first: ListRuns).

Revision ID: 0007
"""

from alembic import op

revision = "0007"
down_revision = "0006"


def upgrade() -> None:
    columns = ["tenant", "namespace", "created_at", "thread_id"]
    if op.get_bind().dialect.name != "postgresql":
        op.create_index("threads_by_created", "threads", columns)
        return
    with op.get_context().autocommit_block():  # CONCURRENTLY: writes go on meanwhile
        op.create_index(
            "threads_by_created",
            "threads",
            columns,
            postgresql_concurrently=True,
            if_not_exists=True,
        )
