"""Alembic environment: runs on the connection `indexer.migrate` hands over (never from a config URL)."""

from alembic import context

from indexer.catalog import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
