"""Schema migrations: an append-only list. Never edit an entry; add a new one.

`{blob}` becomes BYTEA on PostgreSQL and BLOB on SQLite; a statement starting with
`{postgres_only}` runs on PostgreSQL only. Times are epoch
seconds (DOUBLE PRECISION) so both backends compare them the same way.
"""

from __future__ import annotations

MIGRATIONS: list[str] = [
    # 1: threads, checkpoints, pending writes, the event feed, idempotency keys
    """
    CREATE TABLE threads (
        tenant TEXT NOT NULL,
        namespace TEXT NOT NULL,
        thread_id TEXT NOT NULL,
        head_id TEXT NOT NULL DEFAULT '',
        status INTEGER NOT NULL DEFAULT 0,
        workflow_id TEXT NOT NULL DEFAULT '',
        workflow_version BIGINT NOT NULL DEFAULT 0,
        lease_owner TEXT NOT NULL DEFAULT '',
        lease_expires_at DOUBLE PRECISION NOT NULL DEFAULT 0,
        fencing_token BIGINT NOT NULL DEFAULT 0,
        last_seq BIGINT NOT NULL DEFAULT 0,
        created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (tenant, namespace, thread_id)
    );
    CREATE INDEX threads_by_status ON threads (tenant, status, namespace, thread_id);
    CREATE TABLE checkpoints (
        tenant TEXT NOT NULL,
        namespace TEXT NOT NULL,
        thread_id TEXT NOT NULL,
        checkpoint_id TEXT NOT NULL,
        parent_id TEXT NOT NULL DEFAULT '',
        step BIGINT NOT NULL DEFAULT 0,
        state {blob} NOT NULL,
        content_type TEXT NOT NULL,
        trigger INTEGER NOT NULL DEFAULT 0,
        name TEXT NOT NULL DEFAULT '',
        completed_nodes TEXT NOT NULL DEFAULT '[]',
        progress_percent DOUBLE PRECISION NOT NULL DEFAULT 0,
        eta_seconds DOUBLE PRECISION NOT NULL DEFAULT 0,
        metadata TEXT NOT NULL DEFAULT '{}',
        created_at DOUBLE PRECISION NOT NULL,
        expires_at DOUBLE PRECISION,
        state_size BIGINT NOT NULL DEFAULT 0,
        PRIMARY KEY (tenant, namespace, thread_id, checkpoint_id)
    );
    CREATE INDEX checkpoints_by_expiry ON checkpoints (expires_at);
    CREATE TABLE writes (
        tenant TEXT NOT NULL,
        namespace TEXT NOT NULL,
        thread_id TEXT NOT NULL,
        checkpoint_id TEXT NOT NULL,
        task_id TEXT NOT NULL,
        idx INTEGER NOT NULL,
        channel TEXT NOT NULL,
        value {blob} NOT NULL,
        content_type TEXT NOT NULL,
        task_path TEXT NOT NULL DEFAULT '',
        PRIMARY KEY (tenant, namespace, thread_id, checkpoint_id, task_id, idx)
    );
    CREATE TABLE events (
        tenant TEXT NOT NULL,
        namespace TEXT NOT NULL,
        thread_id TEXT NOT NULL,
        seq BIGINT NOT NULL,
        feed_seq BIGINT NOT NULL,
        type TEXT NOT NULL,
        time DOUBLE PRECISION NOT NULL,
        payload TEXT NOT NULL,
        terminal INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (tenant, namespace, thread_id, seq)
    );
    CREATE UNIQUE INDEX events_by_feed ON events (tenant, feed_seq);
    CREATE TABLE feeds (
        tenant TEXT PRIMARY KEY,
        last_seq BIGINT NOT NULL DEFAULT 0
    );
    CREATE TABLE requests (
        tenant TEXT NOT NULL,
        request_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        result TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (tenant, request_id)
    );
    CREATE INDEX requests_by_age ON requests (created_at);
    """,
    # 2: tombstones for deleted threads; Redis keys to drop on every replica
    """
    ALTER TABLE threads ADD COLUMN deleted INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE redis_stale (
        key TEXT PRIMARY KEY,
        created_at DOUBLE PRECISION NOT NULL
    );
    """,
    # 3: retention per thread (SaveRequest.keep_last)
    """
    ALTER TABLE threads ADD COLUMN keep_last INTEGER NOT NULL DEFAULT 0;
    """,
    # 4: metadata filters (ListRequest.metadata_equals) by index on PostgreSQL
    """
    {postgres_only}CREATE INDEX checkpoints_by_metadata ON checkpoints
        USING GIN ((CAST(metadata AS jsonb)) jsonb_path_ops);
    """,
    # 5: listing a thread across namespaces (ListRequest.namespace_prefix)
    """
    CREATE INDEX checkpoints_by_thread ON checkpoints (tenant, thread_id, checkpoint_id);
    """,
    # 6: Redis holds no heads or write sets any more (SQL answers them): no stale-key log
    """
    DROP TABLE redis_stale;
    """,
    # 7: listing threads newest first (ListThreadsRequest.newest_first: ListRuns)
    """
    CREATE INDEX threads_by_created ON threads (tenant, namespace, created_at, thread_id);
    """,
    # 8: threads retention never prunes (SaveRequest.keep_forever), set by their writer; the
    # engine's workflow definitions were kept by their namespace's name until now
    """
    ALTER TABLE threads ADD COLUMN keep_forever INTEGER NOT NULL DEFAULT 0;
    UPDATE threads SET keep_forever = 1 WHERE namespace = 'workflows';
    """,
]
