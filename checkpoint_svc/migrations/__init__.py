"""The checkpoint service's schema migrations, with Alembic (docs/operations.md#upgrading).

They run when a service starts, and with `python -m checkpoint_svc migrate` for operators
who run them first. Several replicas may start at once: on PostgreSQL an advisory lock makes
them take turns. Indexes added to existing tables on PostgreSQL are built CONCURRENTLY,
without blocking writes. A database migrated before Alembic (a `schema_migrations` table
with versions 1-8, by this package's predecessor) is stamped at its version first.
"""

from __future__ import annotations

import logging
from pathlib import Path

# Alembic says at INFO which of its plugins it set up, when imported: not news.
logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)

from alembic import command  # noqa: E402
from alembic.config import Config  # noqa: E402
from alembic.runtime.migration import MigrationContext  # noqa: E402
from alembic.script import ScriptDirectory  # noqa: E402
from sqlalchemy import Connection, inspect, text  # noqa: E402

__all__ = ["MIGRATION_LOCK_ID", "current_revision", "upgrade"]

MIGRATION_LOCK_ID = 7_270_001  # pg_advisory_lock key: one replica migrates at a time
_HERE = Path(__file__).resolve().parent
log = logging.getLogger(__name__)
# Before Alembic: one row per applied migration, numbered as the revisions are.
_LEGACY_TABLE = "schema_migrations"


def _config(connection: Connection | None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(_HERE))
    config.attributes["connection"] = connection
    return config


def current_revision(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


def upgrade(connection: Connection, revision: str = "head") -> str:
    """Bring the database to `revision`; the revision it is at then. `connection` is a
    synchronous SQLAlchemy connection outside a transaction (env.py opens them)."""
    config = _config(connection)
    at = current_revision(connection)
    known = {s.revision for s in ScriptDirectory.from_config(config).walk_revisions()}
    if at is not None and at not in known:
        # Migrated by a newer release (a rollback, or a rolling upgrade's old replica): its
        # schema only grew, so this one runs on it as it is.
        connection.commit()
        log.warning("schema at a newer revision than this release knows", extra={"revision": at})
        return at
    legacy = None
    if at is None and inspect(connection).has_table(_LEGACY_TABLE):
        legacy = connection.execute(text(f"SELECT MAX(version) FROM {_LEGACY_TABLE}")).scalar()
    connection.commit()  # what was read: Alembic's transactions start from none
    if legacy:
        command.stamp(config, f"{int(legacy):04d}")
    command.upgrade(config, revision)
    at = current_revision(connection) or ""
    connection.commit()
    return at
