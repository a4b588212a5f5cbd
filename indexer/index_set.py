"""The set of FAISS indexes of a library, one per vector kind: load, reconcile, rebuild, save, check.

Index files are derived, checkpointed copies of the catalog's vectors. Each is named after its
sha256, which the catalog records (with count, dim, generation and how it was built) once the file
is safely written; on load a missing, damaged or stale file is rebuilt or reconciled from the catalog.
Large IVF indexes keep their lists in a second file, mapped rather than read, with its own rule
(size and generation on open, sha256 on verify: see indexer.ondisk). Builds stream the catalog in
blocks (indexer.build): no kind's whole matrix is ever in memory.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from dinoseek.model.files import sha256_file

from . import ondisk
from .build import CatalogSource, build_streamed, lists_fit_on_disk
from .catalog import KINDS, IndexFileRow
from .catalog_gateway import Catalog
from .errors import LibraryError
from .store import VectorIndex, auto_factory, max_index_bytes, read_index, write_index_atomic
from .tuning import BUILD_BLOCK

log = logging.getLogger(__name__)


class IndexSet:
    """The indexes of one library folder; `loaded` holds those in memory, by kind."""

    def __init__(self, folder: Path, catalog: Catalog, *, writable: bool, choice: str | None = None) -> None:
        self.folder, self.catalog, self.writable = folder, catalog, writable
        self.choice = choice  # --index: "auto", a FAISS factory string, or None (keep what was recorded)
        self.loaded: dict[str, VectorIndex] = {}

    # ---- files and their records ------------------------------------------------------------
    def path(self, kind: str, checksum: str) -> Path:
        """Checkpoint files are named after their checksum: a new one never replaces the file the
        catalog points to until the catalog points to the new one (a kill in between is harmless)."""
        return self.folder / f"{kind}.{checksum[:16]}.faiss"

    def record(self, kind: str) -> IndexFileRow | None:
        """What the last checkpoint of `kind` holds (factory, count, nprobe), without loading it."""
        return self.catalog.index_records().get(kind)

    def file(self, kind: str) -> Path | None:
        """The checkpoint file the catalog currently points to for `kind`."""
        record = self.record(kind)
        return self.path(kind, record.checksum) if record else None

    def read(self, kind: str, record: IndexFileRow | None, *, full_check: bool = False) -> VectorIndex | None:
        """The checkpoint `record` describes, if its file is there and matches its checksum, and its
        lists file (if any) passes the on-disk rule; `full_check` also hashes the lists file."""
        if record is None:
            return None
        on_disk = record.lists_bytes is not None
        loaded = read_index(self.path(kind, record.checksum), record.checksum,
                            max_bytes=max_index_bytes(record.count, record.dim), on_disk=on_disk)
        if loaded is None:
            return None
        lists = None
        if on_disk:
            lists = ondisk.ListsFile(ondisk.lists_path(self.folder, kind, record.generation), record.generation,
                                     checkpointed=True, size=record.lists_bytes, checksum=record.lists_checksum or "",
                                     read_only=not self.writable)
            problem = ondisk.lists_problem(ondisk.ondisk_lists(loaded), lists.path, record.generation,
                                           record.lists_bytes)
            if problem is None and not lists_fit_on_disk(loaded):
                problem = "FastScan lists on disk, as an earlier version built them: their results were wrong"
            if problem is None and full_check and sha256_file(lists.path) != record.lists_checksum:
                problem = "sha256 differs from the checkpoint's"
            if problem is not None:
                log.warning("%s: %s", lists.path.name, problem)
                return None
            # Read-only even for writers: the first change moves to a copy (VectorIndex._before_write).
            ondisk.open_lists(loaded, lists.path, writable=False)
        return VectorIndex(loaded, record.factory, record.requested, record.nprobe, record.trained_on, lists=lists,
                           saved_version=0)

    def read_files(self) -> dict[str, tuple[IndexFileRow | None, VectorIndex | None]]:
        """kind -> (record, its file as it is on disk or None): for checks, nothing repaired."""
        records = self.catalog.index_records()
        return {kind: (records.get(kind), self.read(kind, records.get(kind), full_check=True)) for kind in KINDS}

    # ---- load, reconcile, rebuild, save -------------------------------------------------------
    def load(self, kinds: tuple[str, ...] = KINDS, *, full_check: bool = False) -> dict[str, VectorIndex]:
        """Each kind's index, checked against the catalog: damaged ones rebuilt, stale ones reconciled.

        Writers save what they repaired; readers keep the repair in memory. `full_check` hashes
        on-disk lists files too (verify --repair), which an ordinary open does not (see read).
        """
        dim = self.catalog.dim()
        catalog_ids = self.catalog.embedded_ids()
        records = self.catalog.index_records()
        for kind in kinds:
            record = records.get(kind)
            index = self.read(kind, record, full_check=full_check)
            if index is not None and (index.dim != dim or index.count != record.count):
                log.warning("%s index does not match its record (dim/count): rebuilding", kind)
                index = None
            if index is not None and self.choice not in (None, index.requested):
                log.info("%s index: switching %s -> %s", kind, index.requested, self.choice)
                index = None
            if index is None:
                if record is not None and self.choice in (None, record.requested):
                    log.warning("%s index missing or damaged: rebuilding from the catalog", kind)
                self.loaded[kind] = self._build(kind, record)
                if self.writable:
                    self.save(kind)
                continue
            changed = self._reconcile(kind, index, catalog_ids)  # before it is published: searches take no lock
            self.loaded[kind] = index
            if changed and self.writable:
                self.save(kind)
        return self.loaded

    def _build(self, kind: str, record: IndexFileRow | None) -> VectorIndex:
        """A new index of the catalog's vectors, streamed in blocks (indexer.build); its lists file,
        if it needs one, is the generation after the last recorded one (never the recorded file)."""
        dim = self.catalog.dim() or 1
        requested = self.choice or (record.requested if record else "auto")
        source = CatalogSource(self.catalog, kind, np.sort(self.catalog.embedded_ids()), dim)
        # Past the recorded generation and the one the loaded index may have moved to since (its
        # lists file is still mapped until the new index replaces it: never reuse its name).
        loaded = self.loaded.get(kind)
        generation = max(record.generation if record else 0, loaded.lists.generation if loaded and loaded.lists else 0) + 1

        def lists_for() -> ondisk.ListsFile:
            return ondisk.ListsFile(ondisk.lists_path(self.folder, kind, generation), generation, checkpointed=False)

        return build_streamed(requested, source, requested=requested,
                              lists_for=lists_for if self.writable else None)

    def _reconcile(self, kind: str, index: VectorIndex, catalog_ids: np.ndarray) -> bool:
        """Make the index hold exactly the catalog's embedded ids; True if anything changed."""
        in_index = index.ids()
        extra = np.setdiff1d(in_index, catalog_ids, assume_unique=True)
        missing = np.setdiff1d(catalog_ids, in_index, assume_unique=True)
        if not len(extra) and not len(missing):
            return False
        log.info("%s index: reconciling (%d stale, %d missing)", kind, len(extra), len(missing))
        index.remove(extra)
        for start in range(0, len(missing), BUILD_BLOCK):  # a long-missing library is read a block at a time
            ids, vectors = self.catalog.vectors(kind, missing[start:start + BUILD_BLOCK])
            index.add(ids, vectors)
        return True

    def rebuild_if_outgrown(self) -> None:
        """Rebuild where the library's size now calls for another index: an auto index growing into
        IVF, or a requested factory that had to start as Flat until there was enough to train."""
        for kind, index in list(self.loaded.items()):
            wanted = auto_factory(index.count, index.dim) if index.requested == "auto" else index.requested
            if wanted == index.factory:
                continue
            if index.requested == "auto" and index.count < 2 * index.trained_on:
                continue  # auto rebuilds (and retrains) only once the library has doubled since
            rebuilt = self._build(kind, self.record(kind))  # auto's choice (with its fallbacks), or the request
            # Kept even where auto fell back to the same factory: it is trained on the grown library
            # (so the next run does not rebuild again), and its lists file must not be left unused.
            log.info("%s index: %d vectors, %s -> %s", kind, index.count, index.factory, rebuilt.factory)
            self.loaded[kind] = rebuilt
            self.save(kind)

    def checkpoint(self, *, periodic: bool = False) -> None:
        """Save every loaded index that changed since the catalog's record of it.

        `periodic` (the timer during an index run) leaves out indexes whose lists are on disk: their
        checkpoint hashes the whole lists file and the next change copies it (indexer.ondisk), GBs
        a minute for a large library. They are saved at the run's end; after a kill the recorded
        generation is reconciled with the rows committed since, which the catalog holds."""
        for kind, index in self.loaded.items():
            if index.saved_version == index.version or (periodic and index.lists is not None):
                continue
            self.save(kind)

    def save(self, kind: str) -> None:
        """Checkpoint one index: a new file, then the catalog pointing to it, then old files removed."""
        if not self.writable:
            raise LibraryError("library opened read-only")
        index = self.loaded[kind]
        record = self.record(kind)
        lists = index.lists
        if lists is not None and not lists.checkpointed:
            ondisk.checkpoint(index.index, lists)  # synced, trailer, size and sha256 (ondisk's rule)
        path, checksum = write_index_atomic(index.index, self.folder, kind, lambda digest: self.path(kind, digest))
        # On-disk lists: the record's generation is the lists file's. In memory: one more than before.
        generation = lists.generation if lists else (record.generation if record else 0) + 1
        self.catalog.record_index_file(kind, factory=index.factory, requested=index.requested, nprobe=index.nprobe,
                                       count=index.count, dim=index.dim, checksum=checksum,
                                       trained_on=index.trained_on, generation=generation,
                                       lists_bytes=lists.size if lists else None,
                                       lists_checksum=lists.checksum if lists else None)
        index.saved_version = index.version
        for old in self.folder.glob(f"{kind}.*.faiss"):
            if old != path:
                old.unlink(missing_ok=True)
        for old in self.folder.glob(f"{kind}.g*.ivfdata"):
            if lists is None or old != lists.path:
                old.unlink(missing_ok=True)  # a reader that has one mapped keeps it until it closes

    def sync(self) -> None:
        """Bring the indexes in line with the catalog after statuses changed outside an index run
        (dedup --apply sets rows aside, undo brings them back): reconciled and, for writers, saved.
        Kinds without an index file yet are left for the next index run to build."""
        catalog_ids = self.catalog.embedded_ids()
        for kind in KINDS:
            index = self.loaded.get(kind)
            if index is None:
                if self.record(kind) is not None:
                    self.load((kind,))
            elif self._reconcile(kind, index, catalog_ids) and self.writable:
                self.save(kind)

    def remove(self, ids) -> None:
        """Drop `ids` from every loaded index (their rows left the catalog)."""
        ids = list(ids)
        for index in self.loaded.values():
            index.remove(ids)

    # ---- reporting and checking ---------------------------------------------------------------
    def describe(self) -> dict[str, dict]:
        """kind -> what its checkpoint holds (for `info`), from the records and file sizes."""
        records = self.catalog.index_records()
        out = {}
        for kind in KINDS:
            record = records.get(kind)
            path = self.path(kind, record.checksum) if record else self.folder / "-"
            out[kind] = {
                "factory": record.factory if record else None,
                "requested": record.requested if record else None,
                "vectors": record.count if record else 0,
                "nprobe": record.nprobe if record else None,
                "bytes": (path.stat().st_size if path.exists() else 0) + ((record.lists_bytes or 0) if record else 0),
            }
        return out

    def problems(self, files: dict[str, tuple[IndexFileRow | None, VectorIndex | None]],
                 catalog_ids: np.ndarray) -> list[str]:
        """Why the index files (see read_files) do not hold exactly the catalog's embedded ids."""
        problems = []
        for kind in KINDS:
            record, index = files[kind]
            if record is None:
                if len(catalog_ids):
                    problems.append(f"{kind}: no index file recorded for {len(catalog_ids)} embedded images")
                continue
            if index is None:
                lists = (f" (or its lists file {ondisk.lists_path(self.folder, kind, record.generation).name})"
                         if record.lists_bytes is not None else "")
                problems.append(f"{kind}: {self.path(kind, record.checksum).name}{lists} is missing or fails its checksum")
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
