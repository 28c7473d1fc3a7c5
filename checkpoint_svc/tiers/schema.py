"""The SQL tier's tables as SQLAlchemy Core `Table`s: what the migrations build, declared once
for the statements to name (tests/test_tiers.py checks the two agree on both databases).

The migrations (checkpoint_svc/migrations/versions) stay the history of how the schema came
to be; this is where it is now. Every table of a thread's rows starts with its key (tenant,
namespace, thread_id). Numbers that are flags (deleted, keep_forever, terminal) are 0 or 1.
"""

from __future__ import annotations

import sqlalchemy as sa

METADATA = sa.MetaData()


def _key() -> list[sa.Column]:
    return [
        sa.Column("tenant", sa.Text, nullable=False, doc="The tenant (x-tenant-id)."),
        sa.Column("namespace", sa.Text, nullable=False, doc="The thread's namespace."),
        sa.Column("thread_id", sa.Text, nullable=False, doc="The thread's id in it."),
    ]


def _text(name: str, doc: str) -> sa.Column:
    return sa.Column(name, sa.Text, nullable=False, server_default="", doc=doc)


def _number(name: str, doc: str, kind: type[sa.types.TypeEngine] = sa.Integer) -> sa.Column:
    return sa.Column(name, kind, nullable=False, server_default=sa.text("0"), doc=doc)


threads = sa.Table(
    "threads",
    METADATA,
    *_key(),
    _text("head_id", "The newest checkpoint's id ('' before the first, and in a tombstone)."),
    _number("status", "domain.ThreadStatus, as the engine last set it."),
    _text("workflow_id", "The workflow a run thread executes ('' if none)."),
    _number("workflow_version", "Its version.", sa.BigInteger),
    _text("lease_owner", "Who holds the lease ('' if nobody)."),
    _number("lease_expires_at", "When the lease ends (epoch seconds).", sa.Double),
    _number("fencing_token", "Grows at every lease taken; never goes back.", sa.BigInteger),
    _number("last_seq", "The thread's last event seq (dense from 1).", sa.BigInteger),
    sa.Column("created_at", sa.Double, nullable=False, doc="When the thread was first written."),
    sa.Column("updated_at", sa.Double, nullable=False, doc="When the row last changed."),
    _number("deleted", "1: a tombstone, kept so that tokens and seqs never go back."),
    _number("keep_last", "Newest checkpoints retention keeps (0: the service's setting)."),
    _number("keep_forever", "1: retention never prunes the thread (SaveRequest.keep_forever)."),
    sa.PrimaryKeyConstraint("tenant", "namespace", "thread_id"),
    sa.Index("threads_by_status", "tenant", "status", "namespace", "thread_id"),
    sa.Index("threads_by_created", "tenant", "namespace", "created_at", "thread_id"),
)

checkpoints = sa.Table(
    "checkpoints",
    METADATA,
    *_key(),
    sa.Column("checkpoint_id", sa.Text, nullable=False, doc="Sortable: newer ids sort higher."),
    _text("parent_id", "The checkpoint it follows ('' for a thread's first)."),
    _number("step", "The client's step number.", sa.BigInteger),
    sa.Column("state", sa.LargeBinary, nullable=False, doc="The state, as the client sent it."),
    sa.Column("content_type", sa.Text, nullable=False, doc="How `state` is encoded."),
    _number("trigger", "domain.Trigger: why it was taken."),
    _text("name", "A label the client gave it."),
    sa.Column(
        "completed_nodes",
        sa.Text,
        nullable=False,
        server_default="[]",
        doc="A JSON list of the nodes done by then.",
    ),
    _number("progress_percent", "The run's progress at this checkpoint.", sa.Double),
    _number("eta_seconds", "The run's time left, as estimated then.", sa.Double),
    sa.Column(
        "metadata", sa.Text, nullable=False, server_default="{}", doc="A JSON object (filters)."
    ),
    sa.Column("created_at", sa.Double, nullable=False, doc="When it was saved (epoch seconds)."),
    sa.Column("expires_at", sa.Double, doc="When retention may prune it (NULL: never)."),
    _number("state_size", "len(state), summed by GetThreadStats.", sa.BigInteger),
    sa.PrimaryKeyConstraint("tenant", "namespace", "thread_id", "checkpoint_id"),
    sa.Index("checkpoints_by_expiry", "expires_at"),
    sa.Index("checkpoints_by_thread", "tenant", "thread_id", "checkpoint_id"),
    # And on PostgreSQL a GIN index of CAST(metadata AS jsonb) (migration 0004), which
    # metadata filters use; an expression index is not declared here.
)

writes = sa.Table(
    "writes",
    METADATA,
    *_key(),
    sa.Column(
        "checkpoint_id",
        sa.Text,
        nullable=False,
        doc="The checkpoint the write belongs to (it may be saved after its writes).",
    ),
    sa.Column("task_id", sa.Text, nullable=False, doc="The task that wrote it."),
    sa.Column("idx", sa.Integer, nullable=False, doc="Its place in the task's writes."),
    sa.Column("channel", sa.Text, nullable=False, doc="The channel written."),
    sa.Column("value", sa.LargeBinary, nullable=False, doc="The value, as the client sent it."),
    sa.Column("content_type", sa.Text, nullable=False, doc="How `value` is encoded."),
    _text("task_path", "The task's path in the graph."),
    sa.PrimaryKeyConstraint("tenant", "namespace", "thread_id", "checkpoint_id", "task_id", "idx"),
)

events = sa.Table(
    "events",
    METADATA,
    *_key(),
    sa.Column("seq", sa.BigInteger, nullable=False, doc="Dense per thread, from 1."),
    sa.Column("feed_seq", sa.BigInteger, nullable=False, doc="Dense per tenant, in commit order."),
    sa.Column("type", sa.Text, nullable=False, doc="e.g. node.completed."),
    sa.Column("time", sa.Double, nullable=False, doc="When it was committed (epoch seconds)."),
    sa.Column("payload", sa.Text, nullable=False, doc="A JSON object."),
    _number("terminal", "1: the thread's last event (the run ended)."),
    sa.PrimaryKeyConstraint("tenant", "namespace", "thread_id", "seq"),
    sa.Index("events_by_feed", "tenant", "feed_seq", unique=True),
)

feeds = sa.Table(
    "feeds",
    METADATA,
    sa.Column("tenant", sa.Text, primary_key=True, doc="The tenant whose feed this is."),
    _number(
        "last_seq", "The tenant's last feed_seq; locked by a batch until it commits.", sa.BigInteger
    ),
)

requests = sa.Table(
    "requests",
    METADATA,
    sa.Column("tenant", sa.Text, nullable=False, doc="The tenant, or sql.BATCH_MARKER_TENANT."),
    sa.Column("request_id", sa.Text, nullable=False, doc="The client's id (or a batch's)."),
    sa.Column("kind", sa.Text, nullable=False, doc="What it was: save, put_writes, batch..."),
    sa.Column("result", sa.Text, nullable=False, doc="The first answer, replayed (JSON)."),
    sa.Column("created_at", sa.Double, nullable=False, doc="When; old ones are swept."),
    sa.PrimaryKeyConstraint("tenant", "request_id"),
    sa.Index("requests_by_age", "created_at"),
)
