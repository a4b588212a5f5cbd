"""64-bit image and run ids on PostgreSQL.

Image ids are FAISS ids and never reused, so a library that indexes and re-indexes hundreds of
millions of files runs through more than 2**31 ids. SQLite's INTEGER PRIMARY KEY is already a 64-bit
rowid (nothing to do there); on PostgreSQL revision 0001 made `integer` columns with `integer`
sequences (SERIAL), both widened here. The sequence is widened too: `ALTER COLUMN ... TYPE bigint`
leaves a SERIAL's sequence at `AS integer`, which would stop at 2**31 - 1 all the same.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

COLUMNS = (("images", "id", True), ("images", "run_id", False), ("runs", "id", True))


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table, column, serial in COLUMNS:
        op.alter_column(table, column, type_=sa.BigInteger, existing_type=sa.Integer)
        if serial:
            op.execute(f"DO $$ BEGIN EXECUTE format('ALTER SEQUENCE %s AS bigint', "
                       f"pg_get_serial_sequence('{table}', '{column}')); END $$")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table, column, serial in COLUMNS:
        if serial:
            op.execute(f"DO $$ BEGIN EXECUTE format('ALTER SEQUENCE %s AS integer', "
                       f"pg_get_serial_sequence('{table}', '{column}')); END $$")
        op.alter_column(table, column, type_=sa.Integer, existing_type=sa.BigInteger)
