"""Indexes on existing tables, built on PostgreSQL without blocking writes (CONCURRENTLY).

A CONCURRENTLY build that was interrupted leaves an INVALID index behind, which `IF NOT
EXISTS` would then take for done: such an index is dropped and built again.
"""

from __future__ import annotations

from alembic import op
from sqlalchemy import text

__all__ = ["create_index"]


def create_index(name: str, table: str, definition: str) -> None:
    """`CREATE INDEX name ON table definition`, e.g. definition "(tenant, thread_id)"."""
    if op.get_bind().dialect.name != "postgresql":
        op.execute(f"CREATE INDEX IF NOT EXISTS {name} ON {table} {definition}")
        return
    with op.get_context().autocommit_block():
        valid = (
            op.get_bind()
            .execute(
                text("SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(:name)"),
                {"name": name},
            )
            .scalar()
        )
        if valid is False:
            op.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")
        op.execute(f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {name} ON {table} {definition}")
