"""Alembic environment: runs on the connection `indexer.migrate` hands over (never from a config URL)."""

from alembic import context

from dinoseek.indexer.catalog import Base

connection = context.config.attributes["connection"]
# SQLite runs DDL inside transactions; Alembic assumes it does not unless told, and an interrupted
# migration would then leave tables without a version row.
transactional = connection.dialect.name in ("sqlite", "postgresql")
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True,
                  transactional_ddl=transactional, transaction_per_migration=False)
with context.begin_transaction():
    context.run_migrations()
