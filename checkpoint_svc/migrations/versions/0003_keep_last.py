"""Retention per thread (SaveRequest.keep_last).

Revision ID: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"


def upgrade() -> None:
    op.add_column(
        "threads", sa.Column("keep_last", sa.Integer, nullable=False, server_default=sa.text("0"))
    )
