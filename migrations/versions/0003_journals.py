"""Record every dedup apply in the catalog.

A journal file lives in the library folder, which more people may be able to write than the photos,
and undo once trusted the root and quarantine its header named: a forged header could name any
folder outside the photo folder as the "quarantine" and have undo delete or fetch files there.
Apply now inserts a row (journal name, root, quarantine, action) before it moves anything; undo
refuses a journal that disagrees with its row. Journals written before this revision have no row:
undo accepts those only when they name the library's default quarantine folder.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "journals",
        sa.Column("name", sa.String(255), primary_key=True),
        sa.Column("root", sa.LargeBinary, nullable=False),
        sa.Column("quarantine", sa.LargeBinary, nullable=False),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("undone_at", sa.DateTime(timezone=True)),
        sa.Column("note", sa.Text),
    )


def downgrade() -> None:
    op.drop_table("journals")
