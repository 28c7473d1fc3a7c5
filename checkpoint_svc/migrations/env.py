"""Alembic's environment: the connection the service hands over (migrations/__init__.py).

On SQLite every revision goes in one transaction, which takes the write lock first (BEGIN
IMMEDIATE): a second process migrating the same file waits, then finds the work done. On
PostgreSQL each revision commits on its own (an index built CONCURRENTLY needs none around
it), and replicas take turns under an advisory lock (SqlTier.migrate).
"""

from alembic import context

connection = context.config.attributes["connection"]
sqlite = connection.dialect.name == "sqlite"
context.configure(
    connection=connection,
    transaction_per_migration=not sqlite,
    # Alembic assumes SQLite's DDL is not transactional and would run it outside any: it is,
    # and the one transaction is what makes a second process wait.
    transactional_ddl=True if sqlite else None,
)
with context.begin_transaction():
    context.run_migrations()
