"""Threads retention never prunes (SaveRequest.keep_forever), set by their writer; the
engine's workflow definitions were kept by their namespace's name until now.

Revision ID: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"


def upgrade() -> None:
    op.add_column(
        "threads",
        sa.Column("keep_forever", sa.Integer, nullable=False, server_default=sa.text("0")),
    )
    op.execute("UPDATE threads SET keep_forever = 1 WHERE namespace = 'workflows'")
