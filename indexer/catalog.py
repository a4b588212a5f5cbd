"""The catalog: SQLAlchemy 2 models. The source of truth for images, their vectors and the model.

Schema changes are Alembic revisions in `migrations/versions`; this module describes the head.
Image ids double as FAISS ids, so they are never reused (SQLite AUTOINCREMENT): a vector left in a
stale index can never be mistaken for a newer image.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone

from sqlalchemy import JSON, BigInteger, CheckConstraint, DateTime, Integer, LargeBinary, MetaData, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, validates

KINDS = ("cls", "patch")  # the two vector columns of an image row, each with its own FAISS index
EMBEDDED = "embedded"
QUARANTINED = "quarantined"  # set aside by `dinoseek dedup --apply`; `undo` makes it embedded again
# Statuses retried on every run: the cause may have gone away (permissions, a copy in progress).
TRANSIENT = frozenset({"unreadable", "changed", "crashed"})
# Other failures are retried only when the file's size or mtime changes.


# Row ids: 64-bit everywhere. SQLite's INTEGER PRIMARY KEY already is (and must stay INTEGER to be the
# rowid AUTOINCREMENT needs); PostgreSQL gets bigint (revision 0006).
Id = BigInteger().with_variant(Integer, "sqlite")


def path_digest(path: bytes) -> bytes:
    """What `images.path_sha256` holds for a raw relative path: the sha256 of its bytes (32 bytes)."""
    return hashlib.sha256(path).digest()


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention={"ix": "ix_%(table_name)s_%(column_0_name)s", "uq": "uq_%(table_name)s_%(column_0_name)s"})


class ImageRow(Base):
    __tablename__ = "images"
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    # Path relative to the library root as raw bytes (os.fsencode): lossless for non-UTF-8 names. Not
    # indexed: a btree entry holds ~2.7 kB on PostgreSQL and paths have no length limit (revision 0007).
    path: Mapped[bytes] = mapped_column(LargeBinary)
    # path_digest(path): what keeps paths unique and finds a row by path (then compared to `path`).
    # Set with `path` on ORM writes (the validator below); Core updates in the gateway set both.
    path_sha256: Mapped[bytes] = mapped_column(LargeBinary(32), unique=True)
    path_text: Mapped[str] = mapped_column(Text)  # printable form, undecodable bytes as \xNN
    folder: Mapped[str] = mapped_column(Text, index=True)  # printable parent folder, for filters
    size: Mapped[int] = mapped_column(BigInteger)
    mtime_ns: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str | None] = mapped_column(String(64), index=True)
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    format: Mapped[str | None] = mapped_column(String(16))
    frames: Mapped[int | None] = mapped_column(Integer)
    captured_at: Mapped[str | None] = mapped_column(String(19), index=True)  # "YYYY-MM-DD HH:MM:SS"
    camera: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), index=True)  # EMBEDDED or a decode failure status
    reason: Mapped[str | None] = mapped_column(Text)
    cls: Mapped[bytes | None] = mapped_column(LargeBinary)  # float16 (D,), unit norm
    patch: Mapped[bytes | None] = mapped_column(LargeBinary)  # float16 (D,), unit norm
    run_id: Mapped[int | None] = mapped_column(Id)

    @validates("path")
    def _hash_path(self, key: str, path: bytes) -> bytes:
        self.path_sha256 = path_digest(path)
        return path


class RunRow(Base):
    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    status: Mapped[str] = mapped_column(String(16), default="running")  # running | finished | failed
    counts: Mapped[dict] = mapped_column(JSON, default=dict)


class ManifestRow(Base):
    """The one model this library's vectors come from (a single row, id 1)."""

    __tablename__ = "manifest"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    data: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class LibraryRow(Base):
    """Which library this catalog belongs to and the photo folder it was last opened with (a single
    row, id 1; revision 0008). The id is also in the library folder's `library-id` file: a catalog
    and a folder agree on it, or the folder belongs to another library."""

    __tablename__ = "library"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    library_id: Mapped[str] = mapped_column(String(32))  # uuid4 hex
    root: Mapped[bytes] = mapped_column(LargeBinary)  # absolute photo folder, raw bytes (os.fsencode)
    root_seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class IndexFileRow(Base):
    """What the last checkpoint of each FAISS file holds, to detect stale or damaged files."""

    __tablename__ = "index_files"

    kind: Mapped[str] = mapped_column(String(8), primary_key=True)  # "cls" | "patch"
    factory: Mapped[str] = mapped_column(Text)  # FAISS factory string the index was built with
    auto: Mapped[bool] = mapped_column(Integer, default=1)  # requested == "auto" (kept for old readers)
    requested: Mapped[str] = mapped_column(Text, default="auto", server_default="auto")  # "auto" or --index
    nprobe: Mapped[int | None] = mapped_column(Integer)
    count: Mapped[int] = mapped_column(BigInteger)
    dim: Mapped[int] = mapped_column(Integer)
    checksum: Mapped[str] = mapped_column(String(64))  # sha256 of the file, which is named after it
    trained_on: Mapped[int] = mapped_column(BigInteger, default=0)  # library size when trained
    # bumped on every checkpoint; for on-disk lists, the generation in their file's name and trailer
    generation: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    lists_bytes: Mapped[int | None] = mapped_column(BigInteger)  # on-disk lists file size (None: in memory)
    lists_checksum: Mapped[str | None] = mapped_column(String(64))  # its sha256, checked by verify
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class JournalRow(Base):
    """One `dedup --apply`: its journal's file name and the two folders it may move bytes between.

    The journal file lives in the library folder, which more people may be able to write than the
    photos; `undo` trusts a journal only where it agrees with this row (revision 0003).
    """

    __tablename__ = "journals"

    name: Mapped[str] = mapped_column(String(255), primary_key=True)  # file name in <library>/journals
    root: Mapped[bytes] = mapped_column(LargeBinary)  # absolute photo folder, raw bytes (os.fsencode)
    quarantine: Mapped[bytes] = mapped_column(LargeBinary)  # absolute, resolved, raw bytes
    action: Mapped[str] = mapped_column(String(16))  # move | hardlink | symlink
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    undone_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    note: Mapped[str | None] = mapped_column(Text)  # files undo could not restore and the user accepted
    # `dinoseek purge` deleted the quarantined copies (revision 0004): undo refuses, `undo --list` says so
    purged_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class NotDuplicateRow(Base):
    """Two contents the user said are different photos, whatever their similarity (revision 0005).

    Keyed by sha256, not by row: the mark follows the bytes through renames and re-indexing, and
    covers every byte copy of either photo. One row per pair, ordered sha_a < sha_b; never two equal
    hashes (identical bytes are duplicates by definition).
    """

    __tablename__ = "not_duplicate"
    __table_args__ = (CheckConstraint("sha_a < sha_b", name="ck_not_duplicate_ordered"),)

    sha_a: Mapped[str] = mapped_column(String(64), primary_key=True)
    sha_b: Mapped[str] = mapped_column(String(64), primary_key=True, index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
