"""Redis holds no heads or write sets any more (SQL answers them): no stale-key log.

Revision ID: 0006
"""

from alembic import op

revision = "0006"
down_revision = "0005"


def upgrade() -> None:
    op.drop_table("redis_stale")
