"""A library folder: the catalog (source of truth), its FAISS indexes (derived), the writer lock.

`Library` is a thin facade: it opens the pieces in the right order (lock, catalog file checks,
migrations, leftovers of a killed writer), checks the model manifest, and hands out the catalog
gateway (`library.catalog`, every query) and the index set (`library.index_set`, the FAISS files).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from sqlalchemy.exc import OperationalError

from dinoseek.model.encoder import WEIGHTS_SOURCE

from . import migrate
from .catalog import KINDS  # noqa: F401 - re-exported: the vector kinds callers iterate over
from .catalog_file import CATALOG_NAME, catalog_present, check_catalog, sqlite_engine, url_engine
from .catalog_gateway import Catalog
from .damage import damaged_rows, describe_damage
from .errors import LibraryError, ModelMismatchError, NeedsUpgradeError, NotIndexedError
from .identity import ID_FILE, check_identity
from .index_set import IndexSet
from .lock import LOCK_FILE, CatalogLock, WriterLock
from .store import VectorIndex, remove_temp_files

log = logging.getLogger(__name__)

DEFAULT_FOLDER = ".dinoseek"
# Manifest fields that define which vectors may share an index (precision alone may differ; where
# the weights were loaded from, WEIGHTS_SOURCE, may change as they move: their sha256 is the identity).
IDENTITY = ("arch", "weights_sha256", "preprocess", "dim")
# What opening a new library writes in its folder before any model is recorded: all that a failed
# first run removes again (never anything else: the folder may be one the user made and filled).
FIRST_FILES = (CATALOG_NAME, f"{CATALOG_NAME}-wal", f"{CATALOG_NAME}-shm", f"{CATALOG_NAME}-journal", LOCK_FILE,
               ID_FILE)

T = TypeVar("T")


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
    _catalog_lock: CatalogLock | None = None  # the advisory lock of a PostgreSQL catalog (writers)
    # Made by this open (create=True on a folder without a catalog): the folders it created, deepest
    # first, and the names the folder held before. A `with` block that fails before a model is
    # recorded removes them again, so a failed first run leaves no half-made library behind.
    _made: tuple[tuple[Path, ...], frozenset[str]] | None = None
    # The library's id (revision 0008), in the catalog and in `folder`/library-id: None only for a
    # reader of a catalog no writer has opened since that revision.
    library_id: str | None = None

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
        block. create=True implies write=True: making a library (and upgrading or adopting its
        catalog) is writing, and must not race a writer. Pending migrations are applied; temp files of a killed writer are removed.
        `index_choice` is --index: "auto" or a FAISS factory string the indexes are rebuilt with (None: as recorded).

        A catalog that is not a regular SQLite file, fails SQLite's quick check (writers), or is
        missing from a folder that held one is refused with LibraryError, never replaced by a new
        one. On a folder that cannot be written (a read-only mount) readers open the catalog
        read-only and writers are refused.
        """
        root = Path(root).expanduser().resolve()  # "~/Pictures" from Python as from a shell
        folder = Path(folder).expanduser().resolve() if folder else root / DEFAULT_FOLDER
        write = write or create
        catalog_file = None if url else folder / CATALOG_NAME
        if create:
            check_placement(root, folder)
        has_catalog = url is not None or catalog_present(folder, catalog_file)
        made = None
        if not folder.is_dir() or not has_catalog:
            if not create:
                raise NotIndexedError(f"no library at {folder}", root)
            new_folders = tuple(f for f in (folder, *folder.parents) if not f.exists())
            folder.mkdir(parents=True, exist_ok=True)
            made = (new_folders, frozenset(os.listdir(folder)))
        writable = os.access(folder, os.W_OK)
        if write and not writable:
            raise LibraryError(f"{folder} is read-only: indexing, applying dedup plans, undo and repair need to write "
                               f"there (reading, searching, dedup plans and verifying work)")
        lock = WriterLock.take(folder) if write else None
        catalog = catalog_lock = None
        try:
            catalog = _open_catalog(url, catalog_file, writable=writable, check=write)
            # Before any migration: two machines must not upgrade one PostgreSQL catalog at once.
            catalog_lock = CatalogLock.take(catalog.engine) if write else None
            if write:
                migrate.upgrade(catalog.engine, catalog_file)
                remove_temp_files(folder)
                catalog.close_interrupted_runs()
            elif not migrate.at_head(catalog.engine):
                raise NeedsUpgradeError(f"the catalog in {folder} was made by an older dinoseek and needs an upgrade, "
                                        f"which only a writer applies (it keeps a backup)", root)
            where = catalog_file or catalog.engine.url.render_as_string(hide_password=True)
            library_id = check_identity(catalog, folder, root, may_write=write, where=str(where),
                                        catalog_in_folder=catalog_file is not None)
        except BaseException:
            if catalog_lock is not None:
                catalog_lock.release()
            if catalog is not None:
                catalog.dispose()
            if lock is not None:
                lock.release()
            if made is not None:
                _remove_made(folder, made)
            raise
        return cls(root, folder, catalog, IndexSet(folder, catalog, writable=write, choice=index_choice), write, lock,
                   catalog_lock, made, library_id)

    def close(self) -> None:
        if self._catalog_lock is not None:
            self._catalog_lock.release()
            self._catalog_lock = None
        self.catalog.dispose()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> "Library":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        unused = exc_type is not None and self._made is not None and self._no_model_yet()
        self.close()
        if unused:
            self._discard()

    def _no_model_yet(self) -> bool:
        try:
            return self.catalog.manifest() is None
        except (LibraryError, OperationalError):
            return False  # cannot tell: keep it

    def _discard(self) -> None:
        """A first run failed or was interrupted before it recorded a model: leave the folder as it was."""
        _remove_made(self.folder, self._made)
        log.info("no model was recorded in the new library %s: removed again", self.folder)

    # ---- model manifest -------------------------------------------------------------------
    def manifest(self) -> dict | None:
        """The library's model manifest (None before the first run); LibraryError if damaged."""
        return self.catalog.manifest()

    def dim(self) -> int | None:
        return self.catalog.dim()

    def bind_model(self, manifest: dict) -> None:
        """Record the model on first use (with where its weights are, so later commands load them
        unasked); refuse a different one afterwards."""
        if self.manifest() is None:
            source = manifest.get(WEIGHTS_SOURCE)
            self.catalog.record_manifest({**manifest, **({WEIGHTS_SOURCE: self._located(source)} if source else {})})
            return
        self.check_model(manifest)

    def check_model(self, manifest: dict) -> None:
        """Raise ModelMismatchError unless `manifest` makes vectors comparable with this library's.

        Where the weights were found is recorded when the library's record no longer leads to them
        (moved, or a library made before it was recorded): their sha256 just matched, so later
        commands find them there without being told."""
        current = self.manifest()
        if current is None:
            raise NotIndexedError(f"{self.folder} has no vectors yet", self.root)
        differs = [k for k in IDENTITY if current.get(k) != manifest.get(k)]
        if differs:
            recorded = current.get(WEIGHTS_SOURCE) or {}
            built_with = recorded.get("hub") or recorded.get("path")
            named = f" ({built_with})" if built_with else ""
            raise ModelMismatchError(f"this library was built with another model{named}; "
                                     f"{', '.join(differs)} differ")
        if current.get("precision") != manifest.get("precision"):
            log.warning("library vectors were made at %s, this run uses %s", current.get("precision"),
                        manifest.get("precision"))
        source = manifest.get(WEIGHTS_SOURCE)
        if source and not _still_there(current.get(WEIGHTS_SOURCE)):
            self._rewrite_manifest({**current, WEIGHTS_SOURCE: self._located(source)})

    def _located(self, source: dict) -> dict:
        """A weights source as recorded: a path also relative to the photo folder, where it is
        looked for when the library and its weights moved together."""
        if "path" not in source:
            return dict(source)
        try:
            relative = os.path.relpath(os.path.realpath(source["path"]), self.root)
        except ValueError:  # another drive (Windows): no relative path
            return dict(source)
        return {**source, "relative": relative}

    def _rewrite_manifest(self, manifest: dict) -> None:
        """Replace the recorded manifest (only where the weights are changes: see check_model).
        Readers try too; where the catalog cannot be written (a read-only mount, a busy writer)
        the weights are still used, just not remembered."""
        try:
            self.catalog.replace_manifest(manifest)
        except OperationalError as e:
            log.warning("could not record where this library's weights are now (%s); give them again next time",
                        str(e.orig).splitlines()[0] if e.orig else e)
            return
        log.info("the library now records its weights at %s", manifest[WEIGHTS_SOURCE])

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
            "library_id": self.library_id,
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
        self.index_set.load(full_check=True)  # on-disk lists whose sha256 fails are rebuilt too
        return len(damaged)


def open_for_indexing(
    root: str | Path,
    prepare: Callable[[dict | None], T],
    *,
    folder: str | Path | None = None,
    url: str | None = None,
    index_choice: str | None = None,
) -> tuple[Library, T]:
    """Open the library of `root` for writing, and `prepare(manifest)` for it (load the model: the
    manifest says which, and with what preprocessing; None for a new library).

    An existing library is opened first, since its manifest decides the model. A new one is
    created only once `prepare` has succeeded: a first run whose weights are missing or unreadable
    leaves no library folder behind. The caller closes the library (`with library:`).
    """
    try:
        library = Library.open(root, folder=folder, url=url, write=True, index_choice=index_choice)
    except NotIndexedError:
        if url is None:
            prepared = prepare(None)
            library = Library.open(root, folder=folder, url=url, write=True, create=True, index_choice=index_choice)
            return library, prepared
        # A database catalog may hold the library already (a new machine's library folder for it):
        # its manifest names the model, so it is opened before the model is prepared.
        library = Library.open(root, folder=folder, url=url, write=True, create=True, index_choice=index_choice)
    try:
        return library, prepare(library.manifest())
    except BaseException:
        library.close()
        if library._made is not None:
            library._discard()  # the folder this open made, as it was before
        raise


def _still_there(recorded) -> bool:
    """Whether a recorded weights source still leads to its weights: a Hub repo id always does
    (found in whichever cache there is), a path while something is there. Weights found only by
    their path relative to the photo folder have moved: their new place is recorded."""
    if not isinstance(recorded, dict):
        return False
    return bool(recorded.get("hub")) or (isinstance(recorded.get("path"), str) and os.path.exists(recorded["path"]))


def _remove_made(folder: Path, made: tuple[tuple[Path, ...], frozenset[str]]) -> None:
    """Remove the library files a new library's first open wrote (FIRST_FILES the folder did not
    hold before) and the folders it created, deepest first, while they are empty."""
    new_folders, names_before = made
    for name in FIRST_FILES:
        if name not in names_before:
            try:
                (folder / name).unlink()
            except FileNotFoundError:
                pass
    for created in new_folders:  # a folder something else was put in meanwhile stays
        try:
            created.rmdir()
        except OSError:
            break


def _open_catalog(url: str | None, catalog_file: Path | None, *, writable: bool, check: bool) -> Catalog:
    """The catalog gateway over `url`, or over the SQLite file once it passed its checks (the
    quick check for writers, who must never write into a malformed file)."""
    if url:
        return Catalog(url_engine(url))
    engine = sqlite_engine(catalog_file, read_only=not writable)
    check_catalog(engine, catalog_file, quick_check=check)
    return Catalog(engine, catalog_file)
