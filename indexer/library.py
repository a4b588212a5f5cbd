"""A library folder: the catalog (source of truth), its FAISS indexes (derived), the writer lock.

`Library` is a thin facade: it opens the pieces in the right order (lock, catalog file checks,
migrations, leftovers of a killed writer), checks the model manifest, and hands out the catalog
gateway (`library.catalog`, every query) and the index set (`library.index_set`, the FAISS files).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from . import migrate
from .catalog import KINDS  # noqa: F401 - re-exported: the vector kinds callers iterate over
from .catalog_file import CATALOG_NAME, catalog_present, check_catalog, sqlite_engine, url_engine
from .catalog_gateway import Catalog
from .damage import damaged_rows, describe_damage
from .errors import LibraryError, ModelMismatchError, NeedsRepairError, NotIndexedError
from .index_set import IndexSet
from .lock import WriterLock
from .store import VectorIndex, remove_temp_files

log = logging.getLogger(__name__)

DEFAULT_FOLDER = ".dinoseek"
# Manifest fields that define which vectors may share an index (precision alone may differ).
IDENTITY = ("arch", "weights_sha256", "preprocess", "dim")


def find_library_root(start: Path) -> Path | None:
    """The nearest of `start` and its ancestors holding DEFAULT_FOLDER/catalog.sqlite, as git finds
    `.git`: commands run anywhere inside a photo folder use its library. None where there is none."""
    start = Path(start).resolve()
    for folder in (start, *start.parents):
        if (folder / DEFAULT_FOLDER / CATALOG_NAME).is_file():
            return folder
    return None


def check_placement(root: Path, folder: Path) -> None:
    """The library folder may sit inside the photo folder (ROOT/.dinoseek, ROOT/lib: the scan skips
    it), but not be the photo folder itself: its quarantine would be indexed as photos again."""
    if Path(folder).resolve() == Path(root).resolve():
        raise LibraryError(f"the library folder {folder} is the photo folder itself, so its quarantine would be "
                           f"indexed again; give the library a folder of its own, inside the photo folder (the "
                           f"default is ROOT/.dinoseek) or outside it")


@dataclass
class Library:
    root: Path  # the photo folder
    folder: Path  # the library folder: catalog, index files, journals, quarantine
    catalog: Catalog
    index_set: IndexSet
    writable: bool  # opened with write=True: holds the writer lock
    _lock: WriterLock | None = None

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
        index_choice: str | None = None,
    ) -> "Library":
        """Open (or with create=True, make) the library of photo folder `root`.

        write=True takes the writer lock (a second writer gets LibraryLockedError); readers never
        block. Pending migrations are applied; temp files of a killed writer are removed.
        `index_choice` is --index: "auto" or a FAISS factory string the indexes are rebuilt with (None: as recorded).

        A catalog that is not a regular SQLite file, fails SQLite's quick check (writers), or is
        missing from a folder that held one is refused with LibraryError, never replaced by a new
        one. On a folder that cannot be written (a read-only mount) readers open the catalog
        read-only and writers are refused.
        """
        root = Path(root).resolve()
        folder = Path(folder).resolve() if folder else root / DEFAULT_FOLDER
        catalog_file = None if url else folder / CATALOG_NAME
        if create:
            check_placement(root, folder)
        has_catalog = url is not None or catalog_present(folder, catalog_file)
        if not folder.is_dir() or not has_catalog:
            if not create:
                raise NotIndexedError(f"no library at {folder}", root)
            folder.mkdir(parents=True, exist_ok=True)
        writable = os.access(folder, os.W_OK)
        if (write or create) and not writable:
            raise LibraryError(f"{folder} is read-only: indexing, applying dedup plans, undo and repair need to write "
                               f"there (reading, searching, dedup plans and verifying work)")
        lock = WriterLock.take(folder) if write else None
        try:
            catalog = _open_catalog(url, catalog_file, writable=writable, check=write or create)
            if write or create:
                migrate.upgrade(catalog.engine, catalog_file)
                remove_temp_files(folder)
                catalog.close_interrupted_runs()
            elif not migrate.at_head(catalog.engine):
                raise NeedsRepairError(f"the catalog in {folder} needs an upgrade, which only a writer applies", root)
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        return cls(root, folder, catalog, IndexSet(folder, catalog, writable=write, choice=index_choice), write, lock)

    def close(self) -> None:
        self.catalog.dispose()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> "Library":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- model manifest -------------------------------------------------------------------
    def manifest(self) -> dict | None:
        """The library's model manifest (None before the first run); LibraryError if damaged."""
        return self.catalog.manifest()

    def dim(self) -> int | None:
        return self.catalog.dim()

    def bind_model(self, manifest: dict) -> None:
        """Record the model on first use; refuse a different one afterwards."""
        if self.manifest() is None:
            self.catalog.record_manifest(manifest)
            return
        self.check_model(manifest)

    def check_model(self, manifest: dict) -> None:
        """Raise ModelMismatchError unless `manifest` makes vectors comparable with this library's."""
        current = self.manifest()
        if current is None:
            raise NotIndexedError(f"{self.folder} has no vectors yet", self.root)
        differs = [k for k in IDENTITY if current.get(k) != manifest.get(k)]
        if differs:
            raise ModelMismatchError(f"this library was built with another model ({', '.join(differs)} differ)")
        if current.get("precision") != manifest.get("precision"):
            log.warning("library vectors were made at %s, this run uses %s", current.get("precision"),
                        manifest.get("precision"))

    # ---- indexes and rows -------------------------------------------------------------------
    @property
    def indexes(self) -> dict[str, VectorIndex]:
        """The indexes loaded so far, by kind (see load_indexes)."""
        return self.index_set.loaded

    def load_indexes(self, kinds: tuple[str, ...] = KINDS) -> dict[str, VectorIndex]:
        """Each kind's index, checked against the catalog (see IndexSet.load)."""
        return self.index_set.load(kinds)

    def delete_rows(self, ids) -> None:
        """Drop rows from the catalog, then their vectors from the loaded indexes."""
        ids = list(ids)
        self.catalog.delete_rows(ids)
        self.index_set.remove(ids)

    # ---- reporting and checking -----------------------------------------------------------
    def info(self) -> dict:
        indexes = self.index_set.describe()
        counts, errors, last = self.catalog.summary()
        return {
            "root": str(self.root),
            "library": str(self.folder),
            "counts": counts,
            "total": sum(counts.values()),
            "errors": errors,
            "model": self.manifest(),
            "indexes": indexes,
            "last_run": None if last is None else {
                "id": last.id, "status": last.status, "counts": last.counts,
                "started_at": str(last.started_at), "finished_at": str(last.finished_at),
            },
        }

    def verify(self) -> list[str]:
        """Problems in the catalog and between it and the index files, without repairing anything
        (empty list: consistent). Checks SQLite's integrity, every embedded row's vectors (present,
        of the model's length, finite, unit norm, and equal to the copy an exact index holds), and
        that each index file holds exactly the catalog's embedded ids."""
        damage = self.catalog.integrity_problem()
        if damage:
            return [damage]  # a damaged file may answer anything below: it must be restored first
        catalog_ids = self.catalog.embedded_ids()
        files = self.index_set.read_files()
        problems = describe_damage(damaged_rows(self.catalog, {k: index for k, (_, index) in files.items()}),
                                   self.dim())
        return problems + self.index_set.problems(files, catalog_ids)

    def repair(self) -> int:
        """Drop the damaged rows (see indexer.damage: the next index run finds their files again and
        embeds them afresh — the file, not either stored copy, is the truth), then rebuild or
        reconcile the index files. Returns how many rows were dropped."""
        if not self.writable:
            raise LibraryError("library opened read-only")
        files = self.index_set.read_files()
        damaged = damaged_rows(self.catalog, {k: index for k, (_, index) in files.items()})
        if damaged:
            log.warning("%d damaged rows dropped: their files are indexed again by the next run", len(damaged))
            self.delete_rows(list(damaged))
        self.load_indexes()
        return len(damaged)


def _open_catalog(url: str | None, catalog_file: Path | None, *, writable: bool, check: bool) -> Catalog:
    """The catalog gateway over `url`, or over the SQLite file once it passed its checks (the
    quick check for writers, who must never write into a malformed file)."""
    if url:
        return Catalog(url_engine(url))
    engine = sqlite_engine(catalog_file, read_only=not writable)
    check_catalog(engine, catalog_file, quick_check=check)
    return Catalog(engine, catalog_file)
