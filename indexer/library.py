"""A library folder: catalog (source of truth), FAISS files (derived), model manifest, writer lock."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
from sqlalchemy import URL, LargeBinary, cast, create_engine, delete, event, func, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DatabaseError
from sqlalchemy.orm import Session

from model.files import open_regular

from . import migrate
from .catalog import EMBEDDED, ImageRow, IndexFileRow, ManifestRow, RunRow
from .decode import display_path
from .errors import LibraryError, LibraryLockedError, ModelMismatchError
from .store import (VectorIndex, auto_factory, build_index, max_index_bytes, read_index, remove_temp_files,
                    write_atomic)

log = logging.getLogger(__name__)

KINDS = ("cls", "patch")
DEFAULT_FOLDER = ".dinoseek"
# Manifest fields that define which vectors may share an index (precision alone may differ).
IDENTITY = ("arch", "weights_sha256", "preprocess", "dim")
SQLITE_MAGIC = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite database file
# Storing a unit vector as float16 moves its norm by ~5e-4; a damaged vector is usually far off.
NORM_TOLERANCE = 1e-2
VERIFY_BLOCK = 4096  # rows per read when verify checks every vector
MANIFEST_DIGEST = "manifest_sha256"  # the manifest's own checksum, stored inside its JSON
# Files only a library that had a catalog leaves behind: their presence without one means it was lost.
LIBRARY_TRACES = ("*.faiss", "journals", "quarantine", "catalog.sqlite.bak-*", "catalog.sqlite-wal")


def vectors_from_blobs(blobs: list[bytes], dim: int) -> np.ndarray:
    """float16 blobs -> (N, dim) float32."""
    if not blobs:
        return np.zeros((0, dim), np.float32)
    if any(b is None or len(b) != 2 * dim for b in blobs):
        raise LibraryError("an embedded image has no usable vectors in the catalog; run `dinoseek verify --repair`")
    return np.frombuffer(b"".join(blobs), dtype=np.float16).reshape(len(blobs), dim).astype(np.float32)


def vectors_usable(dim: int | None):
    """SQL condition: both vectors present and of the model's length. Rows failing it are left out
    of searches and indexes (never a crash) until `verify --repair` or `index` re-embeds them."""
    present = ImageRow.cls.is_not(None) & ImageRow.patch.is_not(None)
    if dim is None:
        return present
    return present & (func.length(ImageRow.cls) == 2 * dim) & (func.length(ImageRow.patch) == 2 * dim)


def _digest(manifest: dict) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def check_placement(root: Path, folder: Path) -> None:
    """The library folder may sit inside the photo folder (ROOT/.dinoseek, ROOT/lib: the scan skips
    it), but not be the photo folder itself: its quarantine would be indexed as photos again."""
    if Path(folder).resolve() == Path(root).resolve():
        raise LibraryError(f"the library folder {folder} is the photo folder itself, so its quarantine would be "
                           f"indexed again; use the default ROOT/.dinoseek or a --library folder inside or outside it")


@dataclass
class Library:
    root: Path
    folder: Path
    engine: Engine
    writable: bool
    index_choice: str | None = None  # --index: "auto", a FAISS factory string, or None (as before)
    _lock_fd: int | None = None
    indexes: dict[str, VectorIndex] = field(default_factory=dict)
    catalog_file: Path | None = None  # the SQLite catalog (None with --url)

    # ---- opening and closing -------------------------------------------------------------
    @classmethod
    def open(
        cls,
        root: str | Path,
        *,
        folder: str | Path | None = None,
        url: str | None = None,
        write: bool = False,
        create: bool = False,
        index: str | None = None,
    ) -> "Library":
        """Open (or with create=True, make) the library of photo folder `root`.

        write=True takes the writer lock (a second writer gets LibraryLockedError); readers never
        block. Pending migrations are applied; temp files of a killed writer are removed.

        A catalog that is not a regular SQLite file, fails SQLite's quick check (writers), or is
        missing from a folder that held one is refused with LibraryError, never replaced by a new
        one. On a folder that cannot be written (a read-only mount) readers open the catalog
        read-only and writers are refused.
        """
        root = Path(root).resolve()
        folder = Path(folder).resolve() if folder else root / DEFAULT_FOLDER
        catalog_file = folder / "catalog.sqlite"
        if create:
            check_placement(root, folder)
        has_catalog = url is not None or _catalog_present(folder, catalog_file)
        if not folder.is_dir() or not has_catalog:
            if not create:
                raise LibraryError(f"no library at {folder}; run `dinoseek index {root}` first")
            folder.mkdir(parents=True, exist_ok=True)
        writable = os.access(folder, os.W_OK)
        if (write or create) and not writable:
            raise LibraryError(f"{folder} is read-only: indexing, dedup --apply, undo and verify --repair need to "
                               f"write there (info, search, similar, dedup and verify work)")
        lock_fd = _take_lock(folder) if write else None
        try:
            engine = _engine(url) if url else _sqlite_engine(catalog_file, read_only=not writable)
            if url is None:
                _check_catalog(engine, catalog_file, quick_check=write or create)
            if write or create:
                migrate.upgrade(engine, None if url else catalog_file)
                remove_temp_files(folder)
                _close_interrupted_runs(engine)
            elif not migrate.at_head(engine):
                raise LibraryError(f"the catalog in {folder} needs an upgrade; run `dinoseek verify --repair {root}`")
        except BaseException:
            if lock_fd is not None:
                _release_lock(folder, lock_fd)
            raise
        return cls(root, folder, engine, write, index, lock_fd, catalog_file=None if url else catalog_file)

    def close(self) -> None:
        self.engine.dispose()
        if self._lock_fd is not None:
            _release_lock(self.folder, self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> "Library":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def session(self) -> Session:
        return Session(self.engine)

    # ---- model manifest -------------------------------------------------------------------
    def manifest(self) -> dict | None:
        """The library's model manifest; LibraryError if the catalog's copy was damaged (it carries
        its own sha256: a changed digit of the weights' hash or of `dim` must not pass silently)."""
        try:
            with self.session() as s:
                row = s.get(ManifestRow, 1)
                data = row.data if row else None
        except ValueError as e:  # the JSON itself no longer parses
            raise LibraryError(f"the model manifest in the catalog is damaged ({_one_line(e)}); "
                               f"{_restore_hint(self.catalog_file)}") from e
        if data is None:
            return None
        data = dict(data) if isinstance(data, dict) else {MANIFEST_DIGEST: "?"}
        recorded = data.pop(MANIFEST_DIGEST, None)  # libraries made before it was recorded have none
        if recorded is not None and recorded != _digest(data):
            raise LibraryError(f"the model manifest in the catalog is damaged; {_restore_hint(self.catalog_file)}")
        return data

    def bind_model(self, manifest: dict) -> None:
        """Record the model on first use; refuse a different one afterwards."""
        if self.manifest() is None:
            with self.session() as s, s.begin():
                s.add(ManifestRow(id=1, data={**manifest, MANIFEST_DIGEST: _digest(manifest)}))
            return
        self.check_model(manifest)

    def check_model(self, manifest: dict) -> None:
        """Raise ModelMismatchError unless `manifest` makes vectors comparable with this library's."""
        current = self.manifest()
        if current is None:
            raise LibraryError(f"{self.folder} has no vectors yet; run `dinoseek index {self.root}` first")
        differs = [k for k in IDENTITY if current.get(k) != manifest.get(k)]
        if differs:
            raise ModelMismatchError(
                f"this library was built with another model ({', '.join(differs)} differ); "
                f"use the same --model/--weights, or a new --library"
            )
        if current.get("precision") != manifest.get("precision"):
            log.warning("library vectors were made at %s, this run uses %s", current.get("precision"), manifest.get("precision"))

    def dim(self) -> int | None:
        manifest = self.manifest()
        return manifest["dim"] if manifest else None

    # ---- vectors ------------------------------------------------------------------------------
    def catalog_vectors(self, kind: str, ids=None) -> tuple[np.ndarray, np.ndarray]:
        """(ids, float32 vectors) of embedded rows, all or the given ids, ordered by id."""
        ids_out, (vectors,) = self.catalog_vector_sets((kind,), ids)
        return ids_out, vectors

    def searchable(self):
        """SQL condition for rows that take part in searches: embedded, with usable vectors."""
        return (ImageRow.status == EMBEDDED) & vectors_usable(self.dim())

    def catalog_vector_sets(self, kinds: tuple[str, ...], ids=None) -> tuple[np.ndarray, list[np.ndarray]]:
        """Like catalog_vectors for several kinds, read in one transaction so they always agree."""
        columns = [getattr(ImageRow, kind) for kind in kinds]
        query = select(ImageRow.id, *columns).where(self.searchable()).order_by(ImageRow.id)
        dim = self.dim() or 0
        with self.session() as s, s.begin():  # one snapshot (WAL) for every chunk
            if ids is None:
                rows = s.execute(query).all()
            else:
                ids = sorted(int(i) for i in ids)
                rows = [r for start in range(0, len(ids), 500)
                        for r in s.execute(query.where(ImageRow.id.in_(ids[start:start + 500])))]
        out_ids = np.asarray([r[0] for r in rows], dtype=np.int64)
        return out_ids, [vectors_from_blobs([r[1 + k] for r in rows], dim) for k in range(len(kinds))]

    def embedded_ids(self) -> np.ndarray:
        """Ids of the rows the indexes must hold (embedded, with usable vectors)."""
        with self.session() as s:
            return np.asarray(s.scalars(select(ImageRow.id).where(self.searchable())).all(), dtype=np.int64)

    def index_path(self, kind: str, checksum: str) -> Path:
        """Checkpoint files are named after their checksum: a new one never replaces the file the
        catalog points to until the catalog points to the new one (a kill in between is harmless)."""
        return self.folder / f"{kind}.{checksum[:16]}.faiss"

    def _records(self) -> dict[str, IndexFileRow]:
        with self.session() as s:
            return {r.kind: r for r in s.scalars(select(IndexFileRow))}

    def index_file(self, kind: str) -> Path | None:
        """The checkpoint file the catalog currently points to for `kind`."""
        record = self._records().get(kind)
        return self.index_path(kind, record.checksum) if record else None

    def _read(self, kind: str, record: IndexFileRow | None) -> VectorIndex | None:
        if record is None:
            return None
        loaded = read_index(self.index_path(kind, record.checksum), record.checksum,
                            max_bytes=max_index_bytes(record.count, record.dim))
        if loaded is None:
            return None
        return VectorIndex(loaded, record.factory, record.requested, record.nprobe, record.trained_on)

    def index_record(self, kind: str) -> IndexFileRow | None:
        """What the last checkpoint of `kind` holds (factory, count, nprobe), without loading it."""
        return self._records().get(kind)

    def load_indexes(self, kinds: tuple[str, ...] = KINDS) -> dict[str, VectorIndex]:
        """Each kind's index, checked against the catalog: damaged ones rebuilt, stale ones reconciled.

        Writers save what they repaired; readers keep the repair in memory.
        """
        dim = self.dim()
        catalog_ids = self.embedded_ids()
        records = self._records()
        for kind in kinds:
            record = records.get(kind)
            index = self._read(kind, record)
            if index is not None and (index.dim != dim or index.count != record.count):
                log.warning("%s index does not match its record (dim/count): rebuilding", kind)
                index = None
            if index is not None and self.index_choice not in (None, index.requested):
                log.info("%s index: switching %s -> %s", kind, index.requested, self.index_choice)
                index = None
            if index is None:
                if record is not None and self.index_choice in (None, record.requested):
                    log.warning("%s index missing or damaged: rebuilding from the catalog", kind)
                self.indexes[kind] = self._build(kind, record)
                if self.writable:
                    self.save_index(kind)
                continue
            self.indexes[kind] = index
            if self._reconcile(kind, index, catalog_ids) and self.writable:
                self.save_index(kind)
        return self.indexes

    def _requested(self, record: IndexFileRow | None) -> str:
        return self.index_choice or (record.requested if record else "auto")

    def _build(self, kind: str, record: IndexFileRow | None) -> VectorIndex:
        ids, vectors = self.catalog_vectors(kind)
        dim = self.dim() or 1
        requested = self._requested(record)
        factory = auto_factory(len(ids), dim) if requested == "auto" else requested
        return build_index(factory, dim, vectors.reshape(-1, dim), ids, requested=requested)

    def _reconcile(self, kind: str, index: VectorIndex, catalog_ids: np.ndarray) -> bool:
        """Make the index hold exactly the catalog's embedded ids; True if anything changed."""
        in_index = index.ids()
        extra = np.setdiff1d(in_index, catalog_ids, assume_unique=True)
        missing = np.setdiff1d(catalog_ids, in_index, assume_unique=True)
        if not len(extra) and not len(missing):
            return False
        log.info("%s index: reconciling (%d stale, %d missing)", kind, len(extra), len(missing))
        index.remove(extra)
        ids, vectors = self.catalog_vectors(kind, missing)
        index.add(ids, vectors)
        return True

    def rebuild_if_outgrown(self) -> None:
        """Rebuild where the library's size now calls for another index: an auto index growing into
        IVF, or a requested factory that had to start as Flat until there was enough to train."""
        for kind, index in list(self.indexes.items()):
            wanted = auto_factory(index.count, index.dim) if index.requested == "auto" else index.requested
            if wanted == index.factory:
                continue
            if index.requested == "auto" and index.count < 2 * index.trained_on:
                continue  # auto rebuilds (and retrains) only once the library has doubled since
            ids, vectors = self.catalog_vectors(kind)
            rebuilt = build_index(wanted, index.dim, vectors, ids, requested=index.requested)
            if rebuilt.factory != index.factory:
                log.info("%s index: %d vectors, %s -> %s", kind, index.count, index.factory, rebuilt.factory)
                self.indexes[kind] = rebuilt
                self.save_index(kind)

    def save_index(self, kind: str) -> None:
        """Checkpoint one index: a new file, then the catalog pointing to it, then old files removed."""
        if not self.writable:
            raise LibraryError("library opened read-only")
        index = self.indexes[kind]
        data = index.serialize()
        checksum = hashlib.sha256(data).hexdigest()
        path = self.index_path(kind, checksum)
        write_atomic(path, data)
        with self.session() as s, s.begin():
            s.merge(IndexFileRow(kind=kind, factory=index.factory, requested=index.requested,
                                 auto=int(index.requested == "auto"), nprobe=index.nprobe, count=index.count,
                                 dim=index.dim, checksum=checksum, trained_on=index.trained_on))
        for old in self.folder.glob(f"{kind}.*.faiss"):
            if old != path:
                old.unlink(missing_ok=True)

    # ---- reporting ------------------------------------------------------------------------
    def info(self) -> dict:
        records = self._records()
        with self.session() as s:
            counts = dict(s.execute(select(ImageRow.status, func.count()).group_by(ImageRow.status)).all())
            errors = [
                {"path": p, "status": st, "reason": r}
                for p, st, r in s.execute(
                    select(ImageRow.path_text, ImageRow.status, ImageRow.reason)
                    .where(ImageRow.status != EMBEDDED).order_by(ImageRow.path_text)
                )
            ]
            runs = s.scalars(select(RunRow).order_by(RunRow.id.desc()).limit(1)).all()
        indexes = {}
        for kind in KINDS:
            record = records.get(kind)
            path = self.index_path(kind, record.checksum) if record else self.folder / "-"
            indexes[kind] = {
                "factory": record.factory if record else None,
                "requested": record.requested if record else None,
                "vectors": record.count if record else 0,
                "nprobe": record.nprobe if record else None,
                "bytes": path.stat().st_size if path.exists() else 0,
            }
        last = runs[0] if runs else None
        return {
            "root": str(self.root),
            "library": str(self.folder),
            "counts": counts,
            "total": sum(counts.values()),
            "errors": errors,
            "model": self.manifest(),
            "indexes": indexes,
            "last_run": None if last is None else {"id": last.id, "status": last.status, "counts": last.counts,
                                                    "started_at": str(last.started_at), "finished_at": str(last.finished_at)},
        }

    def verify(self) -> list[str]:
        """Problems in the catalog and between it and the index files, without repairing anything
        (empty list: consistent). Checks SQLite's integrity, every embedded row's vectors (present,
        of the model's length, finite, unit norm, and equal to the copy an exact index holds), and
        that each index file holds exactly the catalog's embedded ids."""
        damage = self._integrity_problem()
        if damage:
            return [damage]  # a damaged file may answer anything below: it must be restored first
        catalog_ids = self.embedded_ids()
        records = self._records()
        indexes = {kind: self._read(kind, records.get(kind)) for kind in KINDS}
        problems = _describe_damage(self.damaged_rows(indexes), self.dim())
        for kind in KINDS:
            record, index = records.get(kind), indexes[kind]
            if record is None:
                if len(catalog_ids):
                    problems.append(f"{kind}: no index file recorded for {len(catalog_ids)} embedded images")
                continue
            if index is None:
                problems.append(f"{kind}: {self.index_path(kind, record.checksum).name} is missing or fails its checksum")
                continue
            ids = index.ids()
            stale, missing = np.setdiff1d(ids, catalog_ids), np.setdiff1d(catalog_ids, ids)
            if len(stale):
                problems.append(f"{kind}: {len(stale)} vectors for images no longer in the catalog")
            if len(missing):
                problems.append(f"{kind}: {len(missing)} embedded images missing from the index")
            if len(ids) != len(np.unique(ids)):
                problems.append(f"{kind}: duplicate ids in the index")
        return problems

    def _integrity_problem(self) -> str | None:
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
        return f"catalog: SQLite integrity check failed ({_one_line(result[0])}); {_restore_hint(self.catalog_file)}"

    def damaged_rows(self, indexes: dict[str, VectorIndex | None] | None = None) -> dict[int, str]:
        """Rows whose content cannot be trusted -> why. SQLite keeps no checksums, so this uses the
        redundancy there is: a row's raw path and its two printable forms must agree ("path"), and
        an embedded row's vectors must be present, of the model's length, finite and of unit norm
        ("missing", "length", "not finite", "not unit") and equal to the float32 copy an exact
        (Flat) index holds ("differs from index") — which finds any change to a stored value."""
        dim = self.dim()
        exact = {kind: (index, set(index.ids().tolist())) for kind, index in (indexes or {}).items()
                 if index is not None and isinstance(faiss.downcast_index(index.index.index), faiss.IndexFlat)}
        # SQLite: text columns read as bytes, as a damaged one may no longer be valid UTF-8 (other
        # servers check encodings on write; and PostgreSQL's text->bytea cast would parse escapes).
        as_bytes = (lambda c: cast(c, LargeBinary)) if self.engine.dialect.name == "sqlite" else (lambda c: c)
        columns = (ImageRow.id, ImageRow.path, as_bytes(ImageRow.path_text), as_bytes(ImageRow.folder),
                   ImageRow.status, ImageRow.cls, ImageRow.patch)
        damaged: dict[int, str] = {}
        last = -1
        while True:
            with self.session() as s:
                query = select(*columns).where(ImageRow.id > last).order_by(ImageRow.id).limit(VERIFY_BLOCK)
                rows = s.execute(query).all()
            if not rows:
                return damaged
            last = rows[-1][0]
            for row_id, path, text, folder, *_ in rows:
                printed = [t if isinstance(t, bytes) else t.encode() for t in (text, folder)]
                if printed != [display_path(path).encode(), display_path(os.path.dirname(path)).encode()]:
                    damaged[row_id] = "path"
            embedded = [r for r in rows if r.status == EMBEDDED]
            for position, kind in enumerate(KINDS, 5):
                if dim is None:
                    break
                for row_id, why in _vector_problems([(r[0], r[position]) for r in embedded], dim, exact.get(kind)):
                    damaged.setdefault(row_id, why)

    def repair(self) -> int:
        """Drop the damaged rows (see damaged_rows: the next index run finds their files again and
        embeds them afresh — the file, not either stored copy, is the truth), then rebuild or
        reconcile the index files. Returns how many rows were dropped."""
        if not self.writable:
            raise LibraryError("library opened read-only")
        records = self._records()
        damaged = self.damaged_rows({kind: self._read(kind, records.get(kind)) for kind in KINDS})
        if damaged:
            log.warning("%d damaged rows dropped: their files are indexed again by the next run", len(damaged))
            with self.session() as s, s.begin():
                self.delete_rows(s, list(damaged))
        self.load_indexes()
        return len(damaged)

    def delete_rows(self, session: Session, ids) -> None:
        ids = list(ids)
        for start in range(0, len(ids), 500):
            session.execute(delete(ImageRow).where(ImageRow.id.in_(ids[start:start + 500])))
        for index in self.indexes.values():
            index.remove(ids)


def _vector_problems(rows: list[tuple[int, bytes | None]], dim: int, exact) -> list[tuple[int, str]]:
    """(id, why) for each damaged vector among (id, float16 blob) rows; `exact` is (a Flat index,
    its ids) to compare with, or None."""
    out = [(row_id, "missing" if blob is None else "length") for row_id, blob in rows
           if blob is None or len(blob) != 2 * dim]
    good = [(row_id, blob) for row_id, blob in rows if blob is not None and len(blob) == 2 * dim]
    if not good:
        return out
    ids = np.array([row_id for row_id, _ in good], dtype=np.int64)
    vectors = vectors_from_blobs([blob for _, blob in good], dim)  # (N, dim)
    with np.errstate(all="ignore"):
        finite = np.isfinite(vectors).all(axis=1)
        unit = np.abs(np.linalg.norm(vectors, axis=1) - 1) <= NORM_TOLERANCE
    same = np.ones(len(ids), dtype=bool)
    if exact is not None:
        index, indexed = exact
        present = np.array([i in indexed for i in ids.tolist()], dtype=bool)
        if present.any():
            stored = index.index.reconstruct_batch(ids[present])  # (n, dim) float32
            same[present] = (stored == vectors[present]).all(axis=1)  # -0.0 == 0.0: numerically equal
    for row_id, is_finite, is_unit, is_same in zip(ids.tolist(), finite, unit, same):
        if not (is_finite and is_unit and is_same):
            out.append((row_id, "not finite" if not is_finite else "not unit" if not is_unit else "differs from index"))
    return out


_DAMAGE = {
    "path": "have a damaged path (its raw and printable forms disagree)",
    "missing": "have no vectors",
    "length": "have vectors of another length than the model's {dim}",
    "not finite": "have vectors that are not finite numbers",
    "not unit": "have vectors that are not of unit length",
    "differs from index": "have vectors that differ from the exact index's copy",
}


def _describe_damage(damaged: dict[int, str], dim: int | None) -> list[str]:
    problems = []
    for why, count in sorted(Counter(damaged.values()).items()):
        ids = sorted(i for i, w in damaged.items() if w == why)
        shown = ", ".join(map(str, ids[:5])) + (", ..." if len(ids) > 5 else "")
        rows = "rows" if why == "path" else "embedded rows"
        problems.append(f"{count} {rows} {_DAMAGE[why].format(dim=dim)} (ids {shown}); `dinoseek verify --repair` "
                        f"drops them and the next index run reads their files again")
    return problems


def _catalog_present(folder: Path, catalog_file: Path) -> bool:
    """Whether `catalog_file` holds a catalog (False: none yet, a new library may start).

    Checked before SQLite opens it, in bounded time: a FIFO or device is refused without being
    opened for long (model.files), anything that is not an SQLite file is refused, and a missing or
    empty catalog in a folder that shows a library once had one is refused rather than replaced.
    """
    if not os.path.lexists(catalog_file) or (catalog_file.is_file() and catalog_file.stat().st_size == 0):
        traces = sorted({p.name for pattern in LIBRARY_TRACES for p in folder.glob(pattern)})
        if traces:
            raise LibraryError(f"{catalog_file} is missing or empty, but {folder} holds a library "
                               f"({', '.join(traces)}); {_restore_hint(catalog_file)}")
        return False  # a new library (or a first run killed before its first write)
    try:
        with open_regular(catalog_file) as f:
            header = f.read(len(SQLITE_MAGIC))
    except OSError as e:
        raise LibraryError(f"{catalog_file} cannot be read as a catalog: {e.strerror or e}; "
                           f"{_restore_hint(catalog_file)}") from e
    if header != SQLITE_MAGIC:
        raise LibraryError(f"{catalog_file} is not a dinoseek catalog (damaged?); {_restore_hint(catalog_file)}")
    return True


def _check_catalog(engine: Engine, catalog_file: Path, *, quick_check: bool) -> None:
    """Refuse an SQLite file that is not a dinoseek catalog or (for writers, who must never write
    into a malformed file) fails SQLite's quick check."""
    try:
        with engine.connect() as connection:
            if quick_check:
                result = [r[0] for r in connection.exec_driver_sql("PRAGMA quick_check(1)")]
                if result != ["ok"]:
                    raise LibraryError(f"{catalog_file} is damaged ({_one_line(result[0])}); "
                                       f"{_restore_hint(catalog_file)}")
            tables = {r[0] for r in connection.exec_driver_sql("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except (DatabaseError, UnicodeDecodeError) as e:  # a damaged schema's message may not even be UTF-8
        detail = e.orig if isinstance(e, DatabaseError) else "malformed database schema"
        raise LibraryError(f"{catalog_file} is not a dinoseek catalog (damaged? {_one_line(detail)}); "
                           f"{_restore_hint(catalog_file)}") from e
    if tables and "alembic_version" not in tables:  # no tables: a new catalog, migrated next
        raise LibraryError(f"{catalog_file} is an SQLite database but not a dinoseek catalog; "
                           f"{_restore_hint(catalog_file)}")


def _restore_hint(catalog_file: Path | None) -> str:
    """How to get out of a damaged or lost catalog: the newest backup (migrate.upgrade writes
    `catalog.sqlite.bak-<revision>` before every migration), or a new library."""
    if catalog_file is None:
        return "restore the catalog database from a backup"
    name = catalog_file.name
    backups = sorted(catalog_file.parent.glob(f"{name}.bak-*"), key=lambda p: p.stat().st_mtime)
    start_over = f"move {catalog_file.parent} away to start a new library"
    if not backups:
        return f"no backup exists ({name}.bak-* are made before migrations); {start_over}"
    return (f"restore the backup: copy {backups[-1]} to {catalog_file} and delete {name}-wal and {name}-shm, "
            f"or {start_over}")


def _one_line(detail) -> str:
    """SQLite's own messages may span lines (integrity check reports); errors here are one line."""
    return " ".join(str(detail).split())


def _close_interrupted_runs(engine: Engine) -> None:
    """Runs still marked running belonged to a writer that died: the lock is ours now."""
    with Session(engine) as s, s.begin():
        s.execute(update(RunRow).where(RunRow.status == "running").values(status="interrupted"))


def _sqlite_engine(catalog_file: Path, *, read_only: bool) -> Engine:
    """The catalog file's engine. In a folder that cannot be written (a read-only mount), SQLite
    cannot create the -shm file WAL readers need: then the catalog is opened read-only, and
    `immutable` where no -wal file is left (everything is in the main file, nobody writes it)."""
    if not read_only:
        # URL.create, not an f-string: "?" or "%" in a folder name must not reach the URL parser.
        return _engine(URL.create("sqlite", database=str(catalog_file)))
    query = {"mode": "ro", "uri": "true"}
    if not os.path.exists(f"{catalog_file}-wal"):
        query["immutable"] = "1"
    elif not os.path.exists(f"{catalog_file}-shm"):  # SQLite would have to create it to read the -wal
        raise LibraryError(f"{catalog_file.parent} is read-only and the catalog's last changes are still in "
                           f"{catalog_file.name}-wal; open the library once where its folder can be written")
    uri = "file:" + urllib.parse.quote(os.fsencode(catalog_file))  # a URI: "?", "#", "%" escaped
    return _engine(URL.create("sqlite", database=uri, query=query), read_only=True)


def _engine(url, read_only: bool = False) -> Engine:
    engine = create_engine(url)
    if engine.dialect.name == "sqlite":

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection, _record):
            cursor = dbapi_connection.cursor()
            if not read_only:
                cursor.execute("PRAGMA journal_mode=WAL")  # readers never block the writer, nor it them
            cursor.execute("PRAGMA synchronous=NORMAL")  # durable across process kills in WAL mode
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()
            # pysqlite only opens transactions before DML, so DDL (migrations) would autocommit
            # statement by statement; take over and BEGIN ourselves (SQLAlchemy's documented recipe).
            dbapi_connection.isolation_level = None

        @event.listens_for(engine, "begin")
        def _begin(connection):
            connection.exec_driver_sql("BEGIN")

    return engine


_LOCKED_HERE: set[Path] = set()  # POSIX locks don't conflict within one process: track those ourselves


def _take_lock(folder: Path) -> int:
    if folder in _LOCKED_HERE:
        raise LibraryLockedError(f"{folder} is being indexed by pid {os.getpid()}; wait for it to finish")
    fd = os.open(folder / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        # A POSIX record lock, not flock: it is not inherited by forked decode workers, so it goes
        # away with the writer itself even if orphaned workers linger for a moment.
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        if e.errno in (errno.EAGAIN, errno.EACCES):
            raise LibraryLockedError(f"{folder} is being indexed by pid {holder}; wait for it to finish") from e
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    _LOCKED_HERE.add(folder)
    return fd


def _release_lock(folder: Path, fd: int) -> None:
    os.close(fd)
    _LOCKED_HERE.discard(folder)
