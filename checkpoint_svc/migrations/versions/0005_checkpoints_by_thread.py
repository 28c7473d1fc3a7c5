"""Listing a thread across namespaces (ListRequest.namespace_prefix).

Revision ID: 0005
"""

from alembic import op

revision = "0005"
down_revision = "0004"


def upgrade() -> None:
    columns = ["tenant", "thread_id", "checkpoint_id"]
    if op.get_bind().dialect.name != "postgresql":
        op.create_index("checkpoints_by_thread", "checkpoints", columns)
        return
    with op.get_context().autocommit_block():  # CONCURRENTLY: writes go on meanwhile
        op.create_index(
            "checkpoints_by_thread",
            "checkpoints",
            columns,
            postgresql_concurrently=True,
            if_not_exists=True,
        )
