"""The catalog gateway: every query the indexer and the query layer make goes through `Catalog`.

Callers ask for what they need (vectors by id or in blocks, filtered ids, group members, a status
change, one indexing batch) and get plain values back; no SQL leaves this module. Long id lists
are cut into `IN (...)` chunks in one place (`chunks`). The schema itself is `indexer.catalog`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import date, datetime, timezone
from pathlib import Path

import numpy as np
from sqlalchemy import LargeBinary, cast, delete, func, select, tuple_, update
from sqlalchemy.engine import Engine, Row
from sqlalchemy.exc import DatabaseError, IntegrityError, OperationalError
from sqlalchemy.orm import Session

from .catalog import (
    EMBEDDED,
    QUARANTINED,
    ImageRow,
    IndexFileRow,
    JournalRow,
    LibraryRow,
    ManifestRow,
    NotDuplicateRow,
    RunRow,
    path_digest,
    utcnow,
)
from .catalog_file import one_line, restore_hint
from .errors import InvalidArgumentError, LibraryError, LibraryLockedError, NeedsRepairError

# Ids per `IN (...)`: SQLite allows 32766 bound parameters (3.32+), PostgreSQL 65535; larger
# chunks mean fewer round trips, which dominate the search API's cost at large batches.
ID_CHUNK = 10_000
MANIFEST_DIGEST = "manifest_sha256"  # the manifest's own checksum, stored inside its JSON


def chunks(ids: Iterable, size: int | None = None) -> Iterator[list]:
    """`ids` in lists of at most `size` (default ID_CHUNK, read at call time), for `IN (...)` conditions."""
    size = size or ID_CHUNK
    ids = list(ids)
    for start in range(0, len(ids), size):
        yield ids[start:start + size]


BLOB_DTYPE = np.dtype(np.float16)  # the catalog's vector columns: half the size, ~5e-4 off a unit norm


def blob_from_vector(vector: np.ndarray) -> bytes:
    """A (dim,) vector as the catalog stores it: float16 bytes (read back by vectors_from_blobs)."""
    return np.asarray(vector).astype(BLOB_DTYPE).tobytes()


def vectors_from_blobs(blobs: list[bytes], dim: int) -> np.ndarray:
    """float16 blobs (see blob_from_vector) -> (N, dim) float32."""
    if not blobs:
        return np.zeros((0, dim), np.float32)
    if any(b is None or len(b) != BLOB_DTYPE.itemsize * dim for b in blobs):
        raise NeedsRepairError("an embedded image has no usable vectors in the catalog")
    return np.frombuffer(b"".join(blobs), dtype=BLOB_DTYPE).reshape(len(blobs), dim).astype(np.float32)


def vectors_usable(dim: int | None):
    """SQL condition: both vectors present and of the model's length. Rows failing it are left out
    of searches and indexes (never a crash) until `verify --repair` or `index` re-embeds them."""
    present = ImageRow.cls.is_not(None) & ImageRow.patch.is_not(None)
    if dim is None:
        return present
    return present & (func.length(ImageRow.cls) == 2 * dim) & (func.length(ImageRow.patch) == 2 * dim)


def at_path(path: bytes):
    """SQL condition: the row at this raw relative path. Found by its unique hash (revision 0007: the
    raw path has no index, since PostgreSQL's btree cannot hold a long one), then the path itself is
    compared, so that a sha256 collision could never select another photo's row."""
    return (ImageRow.path_sha256 == path_digest(path)) & (ImageRow.path == path)


def with_path_hash(values: dict) -> dict:
    """Column values for a Core insert or update: a new `path` always comes with its `path_sha256`."""
    return {**values, "path_sha256": path_digest(values["path"])} if "path" in values else values


def _digest(manifest: dict) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


# The date forms a filter accepts: ISO dates and datetimes (T or a space before the time, seconds
# optional) and 2023/01/01. Checked by pattern first because datetime.fromisoformat also takes
# "20230101" and week dates, and natural language ("yesterday") is deliberately not a date here.
_CAPTURE_TIME = re.compile(r"\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2})?)?")
_SLASH_DATE = re.compile(r"\d{4}/\d{2}/\d{2}")


def parse_capture_time(value: str | date) -> str:
    """A date or datetime as the catalog stores capture times ("YYYY-MM-DD HH:MM:SS"), so that
    string comparison in SQL is time comparison. A date alone means its midnight."""
    if isinstance(value, (date, datetime)):  # datetime is a date too; a date has no time
        value = value.isoformat(sep=" ", timespec="seconds") if isinstance(value, datetime) else value.isoformat()
    if not isinstance(value, str):
        raise InvalidArgumentError(f"expected a date string like 2023-06-30, got {type(value).__name__}")
    text = value.strip()
    if _SLASH_DATE.fullmatch(text):
        text = text.replace("/", "-")
    try:
        if not _CAPTURE_TIME.fullmatch(text):
            raise ValueError
        parsed = datetime.fromisoformat(text)  # refuses 2023-13-45 and 2023-02-30
    except ValueError:
        raise InvalidArgumentError(
            f"{value!r} is not a date: use YYYY-MM-DD, YYYY/MM/DD or YYYY-MM-DDTHH:MM[:SS]"
        ) from None
    return parsed.strftime("%Y-%m-%d %H:%M:%S")


_SHA256 = re.compile(r"[0-9a-f]{64}")


def not_duplicate_key(sha_a: str, sha_b: str) -> tuple[str, str]:
    """A pair of contents as the "not a duplicate" marks store it: two sha256 hex digests, lower
    case, in order. Identical contents are refused: byte copies are duplicates by definition."""
    pair = []
    for sha in (sha_a, sha_b):
        if not isinstance(sha, str) or not _SHA256.fullmatch(sha.lower()):
            raise InvalidArgumentError(f"expected a sha256 as 64 hex digits, got {sha!r}")
        pair.append(sha.lower())
    if pair[0] == pair[1]:
        raise InvalidArgumentError(f"cannot mark identical contents (sha256 {pair[0][:12]}...) as not duplicates: "
                                   f"byte-identical copies are always duplicates")
    return (pair[0], pair[1]) if pair[0] < pair[1] else (pair[1], pair[0])


def _sha_pairs(sha_pairs: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """`sha_pairs` checked and ordered (not_duplicate_key), each once, sorted."""
    keys = set()
    for pair in sha_pairs:
        if isinstance(pair, (str, bytes)) or len(pair) != 2:
            raise InvalidArgumentError(f"expected pairs of two sha256 digests, got {pair!r}")
        keys.add(not_duplicate_key(*pair))
    return sorted(keys)


@dataclass(frozen=True)
class Filters:
    """Metadata filters of a search; each None means "any"."""

    folder: str | None = None  # relative folder prefix, e.g. "2023/holiday"
    # Any form parse_capture_time accepts; stored normalised to "YYYY-MM-DD HH:MM:SS".
    captured_after: str | None = None  # inclusive
    captured_before: str | None = None  # exclusive
    camera: str | None = None  # substring of "Make Model", case-insensitive
    min_pixels: int | None = None  # width * height
    max_pixels: int | None = None
    min_bytes: int | None = None
    max_bytes: int | None = None

    def __post_init__(self) -> None:
        # Validated here so that the Python API refuses what the CLI refuses, instead of
        # comparing "01-06-2023" as a string and silently matching the wrong photos.
        for name in ("captured_after", "captured_before"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, parse_capture_time(value))

    def active(self) -> bool:
        return any(v is not None for v in vars(self).values())


def _filter_conditions(filters: Filters) -> list:
    """The SQL conditions over ImageRow that `filters` stand for."""
    conditions = []
    if filters.folder is not None:
        prefix = filters.folder.strip("/")
        if prefix:
            conditions.append((ImageRow.folder == prefix) | ImageRow.folder.startswith(prefix + "/", autoescape=True))
    if filters.captured_after is not None:
        conditions.append(ImageRow.captured_at >= filters.captured_after)
    if filters.captured_before is not None:
        conditions.append(ImageRow.captured_at < filters.captured_before)
    if filters.camera is not None:
        conditions.append(ImageRow.camera.icontains(filters.camera, autoescape=True))
    if filters.min_pixels is not None:
        conditions.append(ImageRow.width * ImageRow.height >= filters.min_pixels)
    if filters.max_pixels is not None:
        conditions.append(ImageRow.width * ImageRow.height <= filters.max_pixels)
    if filters.min_bytes is not None:
        conditions.append(ImageRow.size >= filters.min_bytes)
    if filters.max_bytes is not None:
        conditions.append(ImageRow.size <= filters.max_bytes)
    return conditions


class Catalog:
    """Queries over one catalog database (SQLite file or any SQLAlchemy URL)."""

    def __init__(self, engine: Engine, catalog_file: Path | None = None) -> None:
        self.engine = engine
        self.catalog_file = catalog_file  # the SQLite file, for restore hints (None with --url)
        # The manifest never changes once recorded: read and checked once, not on every `dim()` (which
        # every block of vectors, batch write and search asks for).
        self._manifest: dict | None = None

    def session(self) -> Session:
        """A session of its own, for tests and tools that inspect the catalog directly."""
        return Session(self.engine)

    def dispose(self) -> None:
        self.engine.dispose()

    # ---- model manifest -------------------------------------------------------------------
    def manifest(self) -> dict | None:
        """The library's model manifest; LibraryError if the catalog's copy was damaged (it carries
        its own sha256: a changed digit of the weights' hash or of `dim` must not pass silently)."""
        if self._manifest is not None:
            return dict(self._manifest)
        try:
            with self.session() as s:
                row = s.get(ManifestRow, 1)
                data = row.data if row else None
        except ValueError as e:  # the JSON itself no longer parses
            raise LibraryError(f"the model manifest in the catalog is damaged ({one_line(e)}); "
                               f"{restore_hint(self.catalog_file)}") from e
        if data is None:
            return None
        data = dict(data) if isinstance(data, dict) else {MANIFEST_DIGEST: "?"}
        recorded = data.pop(MANIFEST_DIGEST, None)  # libraries made before it was recorded have none
        if recorded is not None and recorded != _digest(data):
            raise LibraryError(f"the model manifest in the catalog is damaged; {restore_hint(self.catalog_file)}")
        self._manifest = data
        return dict(data)

    def record_manifest(self, manifest: dict) -> None:
        """Store the model manifest (with its own checksum) of a library that has none yet."""
        with self.session() as s, s.begin():
            s.add(ManifestRow(id=1, data={**manifest, MANIFEST_DIGEST: _digest(manifest)}))

    def replace_manifest(self, manifest: dict) -> None:
        """Rewrite the recorded manifest (where the weights are now); the next read sees it."""
        with self.session() as s, s.begin():
            s.get(ManifestRow, 1).data = {**manifest, MANIFEST_DIGEST: _digest(manifest)}
        self._manifest = None  # the cached copy is stale

    def dim(self) -> int | None:
        manifest = self.manifest()
        return manifest["dim"] if manifest else None

    # ---- the library's identity (revision 0008) ------------------------------------------------
    def library_identity(self) -> tuple[str, bytes] | None:
        """(library id, raw photo folder last used) of the library this catalog belongs to; None for
        a catalog no writer has opened since revision 0008 (or a new one)."""
        with self.session() as s:
            row = s.get(LibraryRow, 1)
            return None if row is None else (row.library_id, bytes(row.root))

    def record_library(self, library_id: str, root: bytes) -> None:
        """Make this catalog library `library_id`'s, last used from `root` (a catalog without an id)."""
        with self.session() as s, s.begin():
            s.add(LibraryRow(id=1, library_id=library_id, root=root))

    def sample_files(self, count: int) -> list[Row]:
        """(path, size, mtime_ns) of up to `count` embedded rows, the first catalogued: enough to tell
        whether a photo folder is the one this catalog describes (indexer.identity)."""
        with self.session() as s:
            return list(s.execute(select(ImageRow.path, ImageRow.size, ImageRow.mtime_ns)
                                  .where(ImageRow.status == EMBEDDED).order_by(ImageRow.id).limit(count)))

    def record_root(self, root: bytes) -> None:
        """The photo folder the library was opened from now (another mount path of it)."""
        with self.session() as s, s.begin():
            s.execute(update(LibraryRow).where(LibraryRow.id == 1).values(root=root, root_seen_at=utcnow()))

    # ---- vectors ------------------------------------------------------------------------------
    def searchable(self):
        """SQL condition for rows that take part in searches: embedded, with usable vectors."""
        return (ImageRow.status == EMBEDDED) & vectors_usable(self.dim())

    def embedded_ids(self) -> np.ndarray:
        """Ids of the rows the indexes must hold (embedded, with usable vectors)."""
        with self.session() as s:
            return np.asarray(s.scalars(select(ImageRow.id).where(self.searchable())).all(), dtype=np.int64)

    def vectors(self, kind: str, ids=None) -> tuple[np.ndarray, np.ndarray]:
        """(ids, float32 vectors) of searchable rows, all or the given ids, ordered by id."""
        ids_out, (vectors,) = self.vector_sets((kind,), ids)
        return ids_out, vectors

    def vector_sets(self, kinds: tuple[str, ...], ids=None) -> tuple[np.ndarray, list[np.ndarray]]:
        """Like `vectors` for several kinds, read in one transaction so they always agree."""
        columns = [getattr(ImageRow, kind) for kind in kinds]
        query = select(ImageRow.id, *columns).where(self.searchable()).order_by(ImageRow.id)
        dim = self.dim() or 0
        with self.session() as s, s.begin():  # one snapshot (WAL) for every chunk
            if ids is None:
                rows = s.execute(query).all()
            else:
                rows = [r for part in chunks(sorted(int(i) for i in ids))
                        for r in s.execute(query.where(ImageRow.id.in_(part)))]
        out_ids = np.asarray([r[0] for r in rows], dtype=np.int64)
        return out_ids, [vectors_from_blobs([r[1 + k] for r in rows], dim) for k in range(len(kinds))]

    def vector_blocks(self, kind: str, block: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, vectors) of searchable rows in id order, `block` at a time (keyset pagination:
        each block is its own short read, so a long consumer never holds a snapshot open)."""
        dim = self.dim()
        column = getattr(ImageRow, kind)
        last = -1
        while True:
            with self.session() as s:
                rows = s.execute(select(ImageRow.id, column).where(self.searchable(), ImageRow.id > last)
                                 .order_by(ImageRow.id).limit(block)).all()
            if not rows:
                return
            last = rows[-1][0]
            yield np.array([r[0] for r in rows], dtype=np.int64), vectors_from_blobs([r[1] for r in rows], dim)

    def row_vectors(self, *, row_id: int | None = None, path: bytes | None = None) -> tuple[int, dict] | None:
        """(id, {kind: float32 vector}) of the embedded row with this id or raw relative path."""
        query = select(ImageRow.id, ImageRow.cls, ImageRow.patch).where(ImageRow.status == EMBEDDED)
        query = query.where(ImageRow.id == row_id) if row_id is not None else query.where(at_path(path))
        with self.session() as s:
            row = s.execute(query).first()
        if row is None:
            return None
        dim = self.dim()
        return row.id, {"cls": vectors_from_blobs([row.cls], dim)[0], "patch": vectors_from_blobs([row.patch], dim)[0]}

    def embedded_path_blobs(self, kind: str) -> list[Row]:
        """(id, raw path, float16 blob of `kind`) of every embedded row; decoded by the caller, so a
        damaged blob only matters if it is used."""
        column = getattr(ImageRow, kind)
        with self.session() as s:
            return s.execute(select(ImageRow.id, ImageRow.path, column).where(ImageRow.status == EMBEDDED)).all()

    # ---- rows ---------------------------------------------------------------------------------
    def filtered_ids(self, filters: Filters) -> np.ndarray:
        """Ids of the embedded rows that pass `filters`."""
        query = select(ImageRow.id).where(ImageRow.status == EMBEDDED, *_filter_conditions(filters))
        with self.session() as s:
            return np.asarray(s.scalars(query).all(), dtype=np.int64)

    def hit_rows(self, ids: list[int]) -> list[Row]:
        """(id, path, path_text, width, height, size, format, captured_at, camera) of the embedded
        rows among `ids` (not the vector blobs): what a search result shows."""
        columns = (ImageRow.id, ImageRow.path, ImageRow.path_text, ImageRow.width, ImageRow.height, ImageRow.size,
                   ImageRow.format, ImageRow.captured_at, ImageRow.camera)
        # Core, not the ORM: this lookup is most of the API's cost over raw FAISS at large batches.
        with self.engine.connect() as connection:
            return [row for part in chunks(ids)
                    for row in connection.execute(select(*columns).where(ImageRow.id.in_(part),
                                                                         ImageRow.status == EMBEDDED))]

    def members(self, ids: Iterable[int]) -> list[Row]:
        """(id, path_text, path, size, width, height, format, captured_at, sha256, mtime_ns, camera) of
        the searchable rows among `ids`: what grouping and keep rules look at."""
        columns = (ImageRow.id, ImageRow.path_text, ImageRow.path, ImageRow.size, ImageRow.width, ImageRow.height,
                   ImageRow.format, ImageRow.captured_at, ImageRow.sha256, ImageRow.mtime_ns, ImageRow.camera)
        searchable = self.searchable()
        with self.session() as s:
            return [row for part in chunks(sorted(set(ids)))
                    for row in s.execute(select(*columns).where(ImageRow.id.in_(part), searchable))]

    def embedded_paths(self, ids: Iterable[int]) -> dict[int, bytes]:
        """id -> raw relative path of the embedded rows among `ids`, in id order."""
        with self.session() as s:
            return {row_id: path for part in chunks(sorted(set(ids)))
                    for row_id, path in s.execute(select(ImageRow.id, ImageRow.path)
                                                  .where(ImageRow.id.in_(part), ImageRow.status == EMBEDDED)
                                                  .order_by(ImageRow.id))}

    def exact_hash_groups(self) -> list[list[int]]:
        """Ids of embedded rows sharing one sha256, a list per hash (ids ascending), in one query."""
        repeated = (select(ImageRow.sha256).where(ImageRow.status == EMBEDDED)
                    .group_by(ImageRow.sha256).having(func.count() > 1))
        by_hash: dict[str, list[int]] = {}
        with self.session() as s:
            for row_id, digest in s.execute(select(ImageRow.id, ImageRow.sha256).where(
                    ImageRow.status == EMBEDDED, ImageRow.sha256.in_(repeated)).order_by(ImageRow.id)):
                by_hash.setdefault(digest, []).append(row_id)
        return list(by_hash.values())

    # ---- statuses -----------------------------------------------------------------------------
    def set_status(self, row_id: int, status: str, reason: str | None) -> bool:
        """True if the row still exists (an index run since may have dropped it)."""
        with self.session() as s, s.begin():
            return s.execute(update(ImageRow).where(ImageRow.id == row_id)
                             .values(status=status, reason=reason)).rowcount > 0

    def unquarantine(self, path: bytes) -> bool:
        """quarantined -> embedded for the row at this raw relative path, and only if it is
        quarantined (a journal names paths, and must not touch unrelated rows). True if a row for
        `path` exists at all."""
        with self.session() as s, s.begin():
            s.execute(update(ImageRow).where(at_path(path), ImageRow.status == QUARANTINED)
                      .values(status=EMBEDDED, reason=None))
            return s.scalar(select(ImageRow.id).where(at_path(path))) is not None

    def rows_at(self, paths: list[bytes]) -> dict[bytes, tuple[str | None, str]]:
        """path -> (sha256, status) of the rows at these raw relative paths."""
        out: dict[bytes, tuple[str | None, str]] = {}
        wanted = set(paths)
        with self.session() as s:  # by hash (the indexed column), then by path: a collision is not a match
            for part in chunks(sorted({path_digest(path) for path in wanted})):
                query = select(ImageRow.path, ImageRow.sha256, ImageRow.status).where(ImageRow.path_sha256.in_(part))
                out.update((path, (sha256, status)) for path, sha256, status in s.execute(query) if path in wanted)
        return out

    # ---- dedup journals (revision 0003): which applies this library made, and which were undone ---
    def record_journal(self, name: str, root: bytes, quarantine: bytes, action: str) -> None:
        with self.session() as s, s.begin():
            s.add(JournalRow(name=name, root=root, quarantine=quarantine, action=action))

    def journal_records(self) -> dict[str, tuple[bytes, bytes, str, object, object]]:
        """name -> (root, quarantine, action, undone_at, purged_at) of every apply recorded."""
        with self.session() as s:
            return {r.name: (r.root, r.quarantine, r.action, r.undone_at, r.purged_at)
                    for r in s.scalars(select(JournalRow))}

    def close_journal(self, name: str, root: bytes, quarantine: bytes, action: str,
                      given_up: dict[bytes, str]) -> None:
        """Mark a journal undone (one written before revision 0003 gets its row now); each file given
        up on (raw relative path -> why) keeps the reason in its row, still quarantined."""
        with self.session() as s, s.begin():
            row = _journal_row(s, name, root, quarantine, action)
            row.undone_at = utcnow()
            row.note = "\n".join(given_up.values()) or None
            for path, why in given_up.items():
                s.execute(update(ImageRow).where(at_path(path), ImageRow.status == QUARANTINED)
                          .values(reason=f"not restored by undo, accepted as lost: {why}"))

    def journal_applied_at(self) -> dict[str, datetime]:
        """name -> when the catalog recorded the apply (UTC), for `purge --older-than`."""
        with self.session() as s:
            return {name: at if at.tzinfo else at.replace(tzinfo=timezone.utc)
                    for name, at in s.execute(select(JournalRow.name, JournalRow.created_at))}

    def purge_journal(self, name: str, root: bytes, quarantine: bytes, action: str,
                      set_aside: list[tuple[bytes, str]]) -> int:
        """Mark a journal purged (revision 0004; one written before 0003 gets its row now) and, in the
        same transaction, delete the rows it set aside: each (raw relative path, sha256) only while
        that row is still quarantined with those bytes, so a photo put back or replaced since keeps
        its row. Returns how many rows were deleted."""
        deleted = 0
        with self.session() as s, s.begin():
            row = _journal_row(s, name, root, quarantine, action)
            row.purged_at = utcnow()
            for path, sha256 in set_aside:
                deleted += s.execute(delete(ImageRow).where(at_path(path), ImageRow.sha256 == sha256,
                                                            ImageRow.status == QUARANTINED)).rowcount
        return deleted

    def delete_rows(self, ids: Iterable[int]) -> None:
        with self.session() as s, s.begin():
            for part in chunks(ids):
                s.execute(delete(ImageRow).where(ImageRow.id.in_(part)))

    # ---- "not a duplicate" marks (revision 0005): pairs of contents by sha256 ---------------------
    # Small writes that readers make too (the review page, `mark-distinct`): they never take the
    # library's writer lock, so they work while `index` runs. SQLite still has one writer at a time:
    # a mark waits for an index batch to commit (busy_timeout) and is refused in one line after that.
    def mark_not_duplicate(self, sha_pairs: Iterable[tuple[str, str]]) -> int:
        """Record each pair of contents (two sha256 hex digests) as not duplicates; returns how many
        were new (a pair already marked counts 0). Identical contents are refused (InvalidArgumentError)."""
        wanted = _sha_pairs(sha_pairs)
        try:
            return self._add_marks(wanted)
        except IntegrityError:  # another process added one of them between our read and our write
            return self._add_marks(wanted)

    def _add_marks(self, wanted: list[tuple[str, str]]) -> int:
        with self._marks_write(), self.session() as s, s.begin():
            present = self._marked(s, {sha for pair in wanted for sha in pair})
            new = [pair for pair in wanted if pair not in present]
            s.add_all(NotDuplicateRow(sha_a=a, sha_b=b) for a, b in new)
        return len(new)

    def unmark_not_duplicate(self, sha_pairs: Iterable[tuple[str, str]]) -> int:
        """Forget these "not a duplicate" marks; returns how many there were."""
        wanted = _sha_pairs(sha_pairs)
        removed = 0
        with self._marks_write(), self.session() as s, s.begin():
            for part in chunks(wanted, ID_CHUNK // 2):  # two bound parameters per pair
                removed += s.execute(delete(NotDuplicateRow).where(
                    tuple_(NotDuplicateRow.sha_a, NotDuplicateRow.sha_b).in_(part))).rowcount
        return removed

    def not_duplicate_pairs(self) -> set[tuple[str, str]]:
        """Every mark, as ordered (sha_a, sha_b) pairs. For listing; dedup asks `marked_among`."""
        with self.session() as s:
            return {(a, b) for a, b in s.execute(select(NotDuplicateRow.sha_a, NotDuplicateRow.sha_b))}

    def has_not_duplicate_marks(self) -> bool:
        """Whether any mark exists: dedup skips looking them up at all in a library without any."""
        with self.session() as s:
            return s.scalar(select(NotDuplicateRow.sha_a).limit(1)) is not None

    def marked_among(self, shas: Iterable[str]) -> set[tuple[str, str]]:
        """The marks (ordered sha pairs) whose two contents are both among `shas`: what one batch of
        candidate pairs needs, without reading every mark of the library."""
        with self.session() as s:
            return self._marked(s, set(shas))

    @staticmethod
    def _marked(s: Session, shas: set[str]) -> set[tuple[str, str]]:
        found = set()
        for part in chunks(sorted(shas)):  # the primary key finds them by sha_a; sha_b is checked here
            found.update((a, b) for a, b in s.execute(select(NotDuplicateRow.sha_a, NotDuplicateRow.sha_b)
                                                      .where(NotDuplicateRow.sha_a.in_(part))) if b in shas)
        return found

    @contextlib.contextmanager
    def _marks_write(self) -> Iterator[None]:
        """SQLite's refusals of a mark (busy past its timeout, a read-only folder) as the library's errors."""
        try:
            yield
        except OperationalError as e:
            reason = one_line(e.orig if e.orig is not None else e)
            if "locked" in reason or "busy" in reason:
                raise LibraryLockedError("the catalog is busy: another process (an index run?) kept it locked; "
                                         "try the marks again in a moment") from e
            if "readonly" in reason or "read-only" in reason:
                where = self.catalog_file.parent if self.catalog_file else "the catalog"
                raise LibraryError(f"{where} is read-only: marks need to write the catalog") from e
            raise

    def contents_by_id(self, ids: Iterable[int]) -> dict[int, tuple[str | None, str]]:
        """id -> (sha256, path_text) of the embedded rows among `ids`: what marks and their messages use."""
        with self.session() as s:  # int(): sqlite3 would bind a numpy integer as a blob, matching nothing
            return {row_id: (sha, text) for part in chunks(sorted({int(i) for i in ids}))
                    for row_id, sha, text in s.execute(select(ImageRow.id, ImageRow.sha256, ImageRow.path_text)
                                                       .where(ImageRow.id.in_(part), ImageRow.status == EMBEDDED))}

    # ---- the indexing run ---------------------------------------------------------------------
    def file_states(self) -> dict[bytes, Row]:
        """raw path -> (id, path, size, mtime_ns, status, sha256, usable) of every row: what a run
        compares the scan with."""
        usable = vectors_usable(self.dim()).label("usable")
        with self.session() as s:
            return {r.path: r for r in s.execute(select(ImageRow.id, ImageRow.path, ImageRow.size, ImageRow.mtime_ns,
                                                        ImageRow.status, ImageRow.sha256, usable))}

    def write_batch(self, *, delete_ids: list[int], moves: list[tuple[bytes, dict]], inserts: list[dict],
                    restores: list[tuple[bytes, dict]]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """One indexing batch in one transaction: delete rows, move rows (old path -> new column
        values), insert rows, update restored rows (path -> column values). Returns the ids and
        vectors ({kind: (n, D)}) of the embedded rows inserted or restored, for the indexes."""
        with self.session() as s, s.begin():
            for part in chunks(delete_ids):
                s.execute(delete(ImageRow).where(ImageRow.id.in_(part)))
            for old, values in moves:
                s.execute(update(ImageRow).where(at_path(old)).values(**with_path_hash(values)))
            written = [ImageRow(**values) for values in inserts]  # the model hashes each path
            s.add_all(written)
            for path, values in restores:
                row = s.scalars(select(ImageRow).where(at_path(path))).one()
                for name, value in values.items():
                    setattr(row, name, value)
                written.append(row)
            s.flush()
            fresh = [(r.id, r.cls, r.patch) for r in written if r.status == EMBEDDED]
        dim = self.dim() if fresh else 0
        ids = np.array([f[0] for f in fresh], dtype=np.int64)
        return ids, {"cls": vectors_from_blobs([f[1] for f in fresh], dim),
                     "patch": vectors_from_blobs([f[2] for f in fresh], dim)}

    def start_run(self) -> int:
        with self.session() as s, s.begin():
            run = RunRow(status="running", counts={})
            s.add(run)
            s.flush()
            return run.id

    def finish_run(self, run_id: int, status: str, counts: dict) -> None:
        with self.session() as s, s.begin():
            s.execute(update(RunRow).where(RunRow.id == run_id)
                      .values(status=status, counts=dict(counts), finished_at=utcnow()))

    def close_interrupted_runs(self) -> None:
        """Runs still marked running belonged to a writer that died: the lock is ours now."""
        with self.session() as s, s.begin():
            s.execute(update(RunRow).where(RunRow.status == "running").values(status="interrupted"))

    # ---- index files --------------------------------------------------------------------------
    def index_records(self) -> dict[str, IndexFileRow]:
        """kind -> what its last index checkpoint holds (detached rows: read, never written)."""
        with self.session() as s:
            return {r.kind: r for r in s.scalars(select(IndexFileRow))}

    def record_index_file(self, kind: str, *, factory: str, requested: str, nprobe: int | None, count: int,
                          dim: int, checksum: str, trained_on: int, generation: int = 0,
                          lists_bytes: int | None = None, lists_checksum: str | None = None) -> None:
        with self.session() as s, s.begin():
            s.merge(IndexFileRow(kind=kind, factory=factory, requested=requested, auto=int(requested == "auto"),
                                 nprobe=nprobe, count=count, dim=dim, checksum=checksum, trained_on=trained_on,
                                 generation=generation, lists_bytes=lists_bytes, lists_checksum=lists_checksum))

    # ---- reporting and checking ---------------------------------------------------------------
    def summary(self) -> tuple[dict[str, int], list[dict], RunRow | None]:
        """(rows per status, the rows that failed with path and reason, the last run), one snapshot."""
        with self.session() as s:
            counts = dict(s.execute(select(ImageRow.status, func.count()).group_by(ImageRow.status)).all())
            errors = [
                {"path": p, "status": st, "reason": r}
                for p, st, r in s.execute(
                    select(ImageRow.path_text, ImageRow.status, ImageRow.reason)
                    .where(ImageRow.status != EMBEDDED).order_by(ImageRow.path_text)
                )
            ]
            last = s.scalars(select(RunRow).order_by(RunRow.id.desc()).limit(1)).first()
        return counts, errors, last

    def integrity_problem(self) -> str | None:
        """SQLite's integrity check of the catalog file (SQLite has no checksums of its own: this
        finds damaged pages and structure, not a changed value inside a row)."""
        if self.engine.dialect.name != "sqlite":
            return None
        try:
            with self.engine.connect() as connection:
                result = [r[0] for r in connection.exec_driver_sql("PRAGMA integrity_check(5)")]
        except (DatabaseError, UnicodeDecodeError) as e:  # a damaged schema's message may not even be UTF-8
            result = [str(e.orig) if isinstance(e, DatabaseError) else "malformed database schema"]
        if result == ["ok"]:
            return None
        return f"catalog: SQLite integrity check failed ({one_line(result[0])}); {restore_hint(self.catalog_file)}"

    def check_blocks(self, block: int) -> Iterator[list[Row]]:
        """Every row as (id, path, path_text, folder, status, cls, patch), `block` rows at a time in
        id order, with the text columns as bytes where SQLite stores them (a damaged one may no
        longer be valid UTF-8; other servers check encodings on write, and PostgreSQL's text->bytea
        cast would parse escapes)."""
        as_bytes = (lambda c: cast(c, LargeBinary)) if self.engine.dialect.name == "sqlite" else (lambda c: c)
        columns = (ImageRow.id, ImageRow.path, as_bytes(ImageRow.path_text), as_bytes(ImageRow.folder),
                   ImageRow.status, ImageRow.cls, ImageRow.patch)
        last = -1
        while True:
            with self.session() as s:
                rows = s.execute(select(*columns).where(ImageRow.id > last).order_by(ImageRow.id).limit(block)).all()
            if not rows:
                return
            last = rows[-1][0]
            yield rows


def _journal_row(s, name: str, root: bytes, quarantine: bytes, action: str) -> JournalRow:
    """The catalog's record of journal `name`; one written before revision 0003 gets its row now."""
    row = s.get(JournalRow, name)
    if row is None:
        row = JournalRow(name=name, root=root, quarantine=quarantine, action=action)
        s.add(row)
    return row
