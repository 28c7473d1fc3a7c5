"""Alembic's environment: the connection the service hands over (migrations/__init__.py)."""

from alembic import context

context.configure(
    connection=context.config.attributes["connection"], transaction_per_migration=True
)
with context.begin_transaction():
    context.run_migrations()
