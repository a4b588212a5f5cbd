"""Paths of any length stay unique: a unique sha256 of the raw path replaces the unique raw path.

PostgreSQL refuses a btree entry over ~2.7 kB (a third of a page), so `uq_images_path` made a long
path (deep folders, long non-ASCII names) unindexable: the whole batch holding it failed. The raw
path loses its constraint and keeps no index at all (every lookup by path now goes through the
hash, then compares the path; a plain btree on it would refuse the same long entries). The hashes
of existing rows are computed here in Python, in blocks of rows, so both backends fill them alike.

On SQLite, dropping a constraint rebuilds the table (Alembic batch mode), and the rebuilt table's
AUTOINCREMENT counter would restart at the highest id still present: it is carried over, since
image ids are FAISS ids and never reused.

Revision ID: 0007
Revises: 0006
"""

import hashlib

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

BLOCK = 10_000  # rows hashed and written per round trip

images = sa.table("images", sa.column("id", sa.BigInteger), sa.column("path", sa.LargeBinary),
                  sa.column("path_sha256", sa.LargeBinary))


def _fill_hashes(connection) -> None:
    """path_sha256 of every row, in id order, BLOCK rows at a time (keyset pagination)."""
    last = -1
    while True:
        rows = connection.execute(sa.select(images.c.id, images.c.path).where(images.c.id > last)
                                  .order_by(images.c.id).limit(BLOCK)).all()
        if not rows:
            return
        connection.execute(images.update().where(images.c.id == sa.bindparam("row_id"))
                           .values(path_sha256=sa.bindparam("digest")),
                           [{"row_id": row_id, "digest": hashlib.sha256(path).digest()} for row_id, path in rows])
        last = rows[-1][0]


def _autoincrement_seq(connection) -> int | None:
    if connection.dialect.name != "sqlite":
        return None
    return connection.exec_driver_sql("SELECT seq FROM sqlite_sequence WHERE name = 'images'").scalar()


def _restore_autoincrement(connection, seq: int | None) -> None:
    """Put the AUTOINCREMENT counter of a rebuilt SQLite table back where it was (never lower)."""
    if seq is None:
        return
    updated = connection.exec_driver_sql("UPDATE sqlite_sequence SET seq = MAX(seq, ?) WHERE name = 'images'",
                                         (seq,)).rowcount
    if not updated:
        connection.exec_driver_sql("INSERT INTO sqlite_sequence (name, seq) VALUES ('images', ?)", (seq,))


def upgrade() -> None:
    connection = op.get_bind()
    seq = _autoincrement_seq(connection)
    op.add_column("images", sa.Column("path_sha256", sa.LargeBinary(32), nullable=True))
    _fill_hashes(connection)
    with op.batch_alter_table("images", table_kwargs={"sqlite_autoincrement": True}) as batch:
        batch.alter_column("path_sha256", existing_type=sa.LargeBinary(32), nullable=False)
        batch.drop_constraint("uq_images_path", type_="unique")
        batch.create_unique_constraint("uq_images_path_sha256", ["path_sha256"])
    _restore_autoincrement(connection, seq)


def downgrade() -> None:
    connection = op.get_bind()
    seq = _autoincrement_seq(connection)
    with op.batch_alter_table("images", table_kwargs={"sqlite_autoincrement": True}) as batch:
        batch.drop_constraint("uq_images_path_sha256", type_="unique")
        batch.create_unique_constraint("uq_images_path", ["path"])  # fails on PostgreSQL over ~2.7 kB paths
        batch.drop_column("path_sha256")
    _restore_autoincrement(connection, seq)
