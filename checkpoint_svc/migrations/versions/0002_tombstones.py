"""Tombstones for deleted threads; Redis keys to drop on every replica.

Revision ID: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    op.add_column(
        "threads", sa.Column("deleted", sa.Integer, nullable=False, server_default=sa.text("0"))
    )
    op.create_table(
        "redis_stale",
        sa.Column("key", sa.Text, primary_key=True),
        sa.Column("created_at", sa.Double, nullable=False),
    )
