"""Alembic environment and revisions for the catalog schema."""
