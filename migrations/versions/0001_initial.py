"""Initial catalog: images with float16 vectors, runs, model manifest, index checkpoints.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "images",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("path", sa.LargeBinary, nullable=False),
        sa.Column("path_text", sa.Text, nullable=False),
        sa.Column("folder", sa.Text, nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("mtime_ns", sa.BigInteger, nullable=False),
        sa.Column("sha256", sa.String(64)),
        sa.Column("width", sa.Integer),
        sa.Column("height", sa.Integer),
        sa.Column("format", sa.String(16)),
        sa.Column("frames", sa.Integer),
        sa.Column("captured_at", sa.String(19)),
        sa.Column("camera", sa.Text),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text),
        sa.Column("cls", sa.LargeBinary),
        sa.Column("patch", sa.LargeBinary),
        sa.Column("run_id", sa.Integer),
        sa.UniqueConstraint("path", name="uq_images_path"),
        sqlite_autoincrement=True,
    )
    for column in ("folder", "sha256", "captured_at", "status"):
        op.create_index(f"ix_images_{column}", "images", [column])
    op.create_table(
        "runs",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True)),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("counts", sa.JSON, nullable=False),
    )
    op.create_table(
        "manifest",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("data", sa.JSON, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "index_files",
        sa.Column("kind", sa.String(8), primary_key=True),
        sa.Column("factory", sa.Text, nullable=False),
        sa.Column("auto", sa.Integer, nullable=False),
        sa.Column("nprobe", sa.Integer),
        sa.Column("count", sa.BigInteger, nullable=False),
        sa.Column("dim", sa.Integer, nullable=False),
        sa.Column("checksum", sa.String(64), nullable=False),
        sa.Column("trained_on", sa.BigInteger, nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    for table in ("index_files", "manifest", "runs", "images"):
        op.drop_table(table)
