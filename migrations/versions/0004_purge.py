"""Record which dedup journals `dinoseek purge` emptied.

Purge deletes the quarantined copies of a journal for good and removes their rows. Undo must then
refuse that journal (nothing is left to restore) and `undo --list` must say why, even if the journal
file's own last record ("purged") was never written (killed right after the catalog committed) or
was edited since: the catalog, not the file in the library folder, is what undo trusts.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("journals") as batch:  # SQLite cannot ALTER every column: batch mode copes
        batch.add_column(sa.Column("purged_at", sa.DateTime(timezone=True)))


def downgrade() -> None:
    with op.batch_alter_table("journals") as batch:
        batch.drop_column("purged_at")
