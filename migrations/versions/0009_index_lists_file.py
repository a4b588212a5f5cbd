"""Record the generation of each index checkpoint and, for IVF indexes whose inverted lists live
in a file of their own (indexer.ondisk), that file's size and sha256.

The lists file is memory-mapped by path, never read whole on open, so the checkpoint's checksum
cannot vouch for it: its size and generation are checked on every open, its sha256 by `verify`.
Existing rows get generation 0 and no lists file (their indexes are in memory).

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("index_files") as batch:
        batch.add_column(sa.Column("generation", sa.BigInteger, nullable=False, server_default="0"))
        batch.add_column(sa.Column("lists_bytes", sa.BigInteger, nullable=True))
        batch.add_column(sa.Column("lists_checksum", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("index_files") as batch:
        batch.drop_column("lists_checksum")
        batch.drop_column("lists_bytes")
        batch.drop_column("generation")
