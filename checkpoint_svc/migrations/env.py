"""Alembic's environment: the connection the service hands over (migrations/__init__.py).

On SQLite every revision goes in one transaction, which takes the write lock first (BEGIN
IMMEDIATE): a second process migrating the same file waits, then finds the work done. On
PostgreSQL each revision commits on its own (an index built CONCURRENTLY needs none around
it), and replicas take turns under an advisory lock (SqlTier.migrate).
"""

from alembic import context

connection = context.config.attributes["connection"]
context.configure(
    connection=connection, transaction_per_migration=connection.dialect.name != "sqlite"
)
with context.begin_transaction():
    context.run_migrations()
