"""Remember the index the user asked for apart from the one built.

An explicit factory that had to start as Flat (too few vectors to train) was recorded as an
explicit "Flat" and never grew into the requested IVF; an auto index rebuilt as the library grew
lost its explicit flag. `requested` holds "auto" or the factory string given with --index.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("index_files") as batch:
        batch.add_column(sa.Column("requested", sa.Text, nullable=False, server_default="auto"))
    op.execute("UPDATE index_files SET requested = factory WHERE auto = 0")


def downgrade() -> None:
    with op.batch_alter_table("index_files") as batch:
        batch.drop_column("requested")
