"""Threads, checkpoints, pending writes, the event feed, idempotency keys.

Revision ID: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None


def _key() -> list[sa.Column]:
    """A thread's key: the first columns of every table of threads' rows."""
    return [
        sa.Column(name, sa.Text, nullable=False) for name in ("tenant", "namespace", "thread_id")
    ]


def _text(name: str) -> sa.Column:
    return sa.Column(name, sa.Text, nullable=False, server_default="")


def _number(name: str, kind: type = sa.Integer) -> sa.Column:
    return sa.Column(name, kind, nullable=False, server_default=sa.text("0"))


def upgrade() -> None:
    op.create_table(
        "threads",
        *_key(),
        _text("head_id"),
        _number("status"),
        _text("workflow_id"),
        _number("workflow_version", sa.BigInteger),
        _text("lease_owner"),
        _number("lease_expires_at", sa.Double),
        _number("fencing_token", sa.BigInteger),
        _number("last_seq", sa.BigInteger),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("updated_at", sa.Double, nullable=False),
        sa.PrimaryKeyConstraint("tenant", "namespace", "thread_id"),
    )
    op.create_index("threads_by_status", "threads", ["tenant", "status", "namespace", "thread_id"])
    op.create_table(
        "checkpoints",
        *_key(),
        sa.Column("checkpoint_id", sa.Text, nullable=False),
        _text("parent_id"),
        _number("step", sa.BigInteger),
        sa.Column("state", sa.LargeBinary, nullable=False),
        sa.Column("content_type", sa.Text, nullable=False),
        _number("trigger"),
        _text("name"),
        sa.Column("completed_nodes", sa.Text, nullable=False, server_default="[]"),
        _number("progress_percent", sa.Double),
        _number("eta_seconds", sa.Double),
        sa.Column("metadata", sa.Text, nullable=False, server_default="{}"),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("expires_at", sa.Double),
        _number("state_size", sa.BigInteger),
        sa.PrimaryKeyConstraint("tenant", "namespace", "thread_id", "checkpoint_id"),
    )
    op.create_index("checkpoints_by_expiry", "checkpoints", ["expires_at"])
    op.create_table(
        "writes",
        *_key(),
        sa.Column("checkpoint_id", sa.Text, nullable=False),
        sa.Column("task_id", sa.Text, nullable=False),
        sa.Column("idx", sa.Integer, nullable=False),
        sa.Column("channel", sa.Text, nullable=False),
        sa.Column("value", sa.LargeBinary, nullable=False),
        sa.Column("content_type", sa.Text, nullable=False),
        _text("task_path"),
        sa.PrimaryKeyConstraint(
            "tenant", "namespace", "thread_id", "checkpoint_id", "task_id", "idx"
        ),
    )
    op.create_table(
        "events",
        *_key(),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("feed_seq", sa.BigInteger, nullable=False),
        sa.Column("type", sa.Text, nullable=False),
        sa.Column("time", sa.Double, nullable=False),
        sa.Column("payload", sa.Text, nullable=False),
        _number("terminal"),
        sa.PrimaryKeyConstraint("tenant", "namespace", "thread_id", "seq"),
    )
    op.create_index("events_by_feed", "events", ["tenant", "feed_seq"], unique=True)
    op.create_table(
        "feeds",
        sa.Column("tenant", sa.Text, primary_key=True),
        _number("last_seq", sa.BigInteger),
    )
    op.create_table(
        "requests",
        sa.Column("tenant", sa.Text, nullable=False),
        sa.Column("request_id", sa.Text, nullable=False),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("result", sa.Text, nullable=False),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.PrimaryKeyConstraint("tenant", "request_id"),
    )
    op.create_index("requests_by_age", "requests", ["created_at"])
