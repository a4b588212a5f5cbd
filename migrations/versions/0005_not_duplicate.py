"""Remember which pairs of photos the user said are not duplicates.

The review page and `dinoseek mark-distinct` let a person overrule the similarity score: two photos
that look alike (a burst, the same view a year apart) are different photos. The mark is kept per
pair of contents (sha256), not per row or path: it survives renames, moves and re-indexing (a moved
file keeps its sha256), and applies to every byte copy of either photo. Each pair is stored once,
ordered (sha_a < sha_b), so lookups need not try both orders. Identical contents are never a pair:
byte copies are duplicates by definition.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "not_duplicate",
        sa.Column("sha_a", sa.String(64), primary_key=True),
        sa.Column("sha_b", sa.String(64), primary_key=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("sha_a < sha_b", name="ck_not_duplicate_ordered"),
    )
    # The primary key finds marks by sha_a; this finds them by sha_b (the marks of one photo).
    op.create_index("ix_not_duplicate_sha_b", "not_duplicate", ["sha_b"])


def downgrade() -> None:
    op.drop_index("ix_not_duplicate_sha_b", table_name="not_duplicate")
    op.drop_table("not_duplicate")
