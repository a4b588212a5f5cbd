"""Record which library a catalog belongs to, and the photo folder it was last used from.

A PostgreSQL catalog lives apart from its library folder (FAISS files, journals, quarantine), which
other machines reach over a shared filesystem, often at another mount path. The catalog alone cannot
tell a second mount path of its library from a folder of another library: a random library id,
written here and in the library folder (`library-id`) when the library is made, can. The root path
is informational (logged when it changes); the id decides. One row, id 1; catalogs made before this
revision get their id from the next writer that opens them.

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "library",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("library_id", sa.String(32), nullable=False),  # uuid4 hex, as in <folder>/library-id
        sa.Column("root", sa.LargeBinary, nullable=False),  # absolute photo folder last used, raw bytes
        sa.Column("root_seen_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("library")
