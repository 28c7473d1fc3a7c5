"""Metadata filters (ListRequest.metadata_equals) by index, on PostgreSQL.

Revision ID: 0004
"""

from alembic import op

revision = "0004"
down_revision = "0003"


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    with op.get_context().autocommit_block():  # CONCURRENTLY: writes go on meanwhile
        op.execute(
            "CREATE INDEX CONCURRENTLY IF NOT EXISTS checkpoints_by_metadata ON checkpoints"
            " USING GIN ((CAST(metadata AS jsonb)) jsonb_path_ops)"
        )
