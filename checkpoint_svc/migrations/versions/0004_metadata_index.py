"""Metadata filters (ListRequest.metadata_equals) by index, on PostgreSQL.

Revision ID: 0004
"""

from alembic import op

from checkpoint_svc.migrations.indexes import create_index

revision = "0004"
down_revision = "0003"


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        create_index(
            "checkpoints_by_metadata",
            "checkpoints",
            "USING GIN ((CAST(metadata AS jsonb)) jsonb_path_ops)",
        )
