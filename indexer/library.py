"""A library folder: catalog (source of truth), FAISS files (derived), model manifest, writer lock."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sqlalchemy import URL, create_engine, delete, event, func, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from . import migrate
from .catalog import EMBEDDED, ImageRow, IndexFileRow, ManifestRow, RunRow
from .errors import LibraryError, LibraryLockedError, ModelMismatchError
from .store import VectorIndex, auto_factory, build_index, read_index, remove_temp_files, write_atomic

log = logging.getLogger(__name__)

KINDS = ("cls", "patch")
DEFAULT_FOLDER = ".dinoseek"
# Manifest fields that define which vectors may share an index (precision alone may differ).
IDENTITY = ("arch", "weights_sha256", "preprocess", "dim")


def vectors_from_blobs(blobs: list[bytes], dim: int) -> np.ndarray:
    """float16 blobs -> (N, dim) float32."""
    if not blobs:
        return np.zeros((0, dim), np.float32)
    return np.frombuffer(b"".join(blobs), dtype=np.float16).reshape(len(blobs), dim).astype(np.float32)


@dataclass
class Library:
    root: Path
    folder: Path
    engine: Engine
    writable: bool
    index_choice: str | None = None  # --index: "auto", a FAISS factory string, or None (as before)
    _lock_fd: int | None = None
    indexes: dict[str, VectorIndex] = field(default_factory=dict)

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
        """
        root = Path(root).resolve()
        folder = Path(folder).resolve() if folder else root / DEFAULT_FOLDER
        catalog_file = folder / "catalog.sqlite"
        if not folder.is_dir() or (url is None and not catalog_file.exists()):
            if not create:
                raise LibraryError(f"no library at {folder}; run `dinoseek index {root}` first")
            folder.mkdir(parents=True, exist_ok=True)
        lock_fd = _take_lock(folder) if write else None
        try:
            # URL.create, not an f-string: "?" or "%" in a folder name must not reach the URL parser.
            engine = _engine(url or URL.create("sqlite", database=str(catalog_file)))
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
        return cls(root, folder, engine, write, index, lock_fd)

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
        with self.session() as s:
            row = s.get(ManifestRow, 1)
            return dict(row.data) if row else None

    def bind_model(self, manifest: dict) -> None:
        """Record the model on first use; refuse a different one afterwards."""
        if self.manifest() is None:
            with self.session() as s, s.begin():
                s.add(ManifestRow(id=1, data=manifest))
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

    def catalog_vector_sets(self, kinds: tuple[str, ...], ids=None) -> tuple[np.ndarray, list[np.ndarray]]:
        """Like catalog_vectors for several kinds, read in one transaction so they always agree."""
        columns = [getattr(ImageRow, kind) for kind in kinds]
        query = select(ImageRow.id, *columns).where(ImageRow.status == EMBEDDED).order_by(ImageRow.id)
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
        with self.session() as s:
            return np.asarray(s.scalars(select(ImageRow.id).where(ImageRow.status == EMBEDDED)).all(), dtype=np.int64)

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
        loaded = read_index(self.index_path(kind, record.checksum), record.checksum)
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
        """Problems between catalog and index files, without repairing anything (empty list: consistent)."""
        problems = []
        catalog_ids = self.embedded_ids()
        dim = self.dim()
        records = self._records()
        with self.session() as s:
            no_vectors = s.scalar(select(func.count()).where(ImageRow.status == EMBEDDED, (ImageRow.cls.is_(None)) | (ImageRow.patch.is_(None))))
            if no_vectors:
                problems.append(f"{no_vectors} embedded rows have no vectors")
            if dim is not None:
                bad = s.scalar(select(func.count()).where(ImageRow.status == EMBEDDED, func.length(ImageRow.cls) != 2 * dim))
                if bad:
                    problems.append(f"{bad} rows have vectors of another dimension than the model's {dim}")
        for kind in KINDS:
            record = records.get(kind)
            if record is None:
                if len(catalog_ids):
                    problems.append(f"{kind}: no index file recorded for {len(catalog_ids)} embedded images")
                continue
            index = self._read(kind, record)
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

    def delete_rows(self, session: Session, ids) -> None:
        ids = list(ids)
        for start in range(0, len(ids), 500):
            session.execute(delete(ImageRow).where(ImageRow.id.in_(ids[start:start + 500])))
        for index in self.indexes.values():
            index.remove(ids)


def _close_interrupted_runs(engine: Engine) -> None:
    """Runs still marked running belonged to a writer that died: the lock is ours now."""
    with Session(engine) as s, s.begin():
        s.execute(update(RunRow).where(RunRow.status == "running").values(status="interrupted"))


def _engine(url) -> Engine:
    engine = create_engine(url)
    if engine.dialect.name == "sqlite":

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection, _record):
            cursor = dbapi_connection.cursor()
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
