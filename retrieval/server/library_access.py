"""How the server reaches the library: one shared reader, writers only for apply/undo (marks need none).

The reader never takes the writer lock, so the server keeps answering while `dinoseek index` runs
(SQLite WAL). Its FAISS indexes are reloaded when the catalog changed, at most every
READER_REFRESH_SECONDS: between two reloads a search may miss the newest rows, never return a
removed one (the query layer drops hits whose rows are gone).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from dinoseek.indexer.catalog import ImageRow, IndexFileRow, JournalRow, NotDuplicateRow, RunRow
from dinoseek.indexer.library import Library
from dinoseek.retrieval.api import LibrarySearch
from sqlalchemy import func, select

READER_REFRESH_SECONDS = 5.0


@dataclass(frozen=True)
class LibraryPlace:
    """Where the library is, as the CLI's ROOT / --library / --url name it, and its model's weights."""

    root: Path
    folder: Path | None = None
    url: str | None = None
    model: str | None = None  # preset or Hub id for search by upload (default: what the library recorded)
    weights: Path | None = None
    device: str = "cpu"
    precision: str = "auto"

    def open(self, write: bool = False) -> Library:
        """A library handle; write=True takes the writer lock (LibraryLockedError while another holds it)."""
        return Library.open(self.root, folder=self.folder, url=self.url, write=write)


class Token(NamedTuple):
    """What the reader's view of the catalog is at least as fresh as, in three parts, so each cache
    moves only with what it depends on: candidate pairs with `images`, plans with `images` and `marks`."""

    files: tuple  # cheap (stat calls): whether anything may have changed, so the other two are re-read
    images: tuple  # rows, statuses, runs, journals, index checkpoints: what candidate pairs come from
    marks: tuple  # the "not a duplicate" marks, which grouping applies to the pairs


def change_token(library: Library) -> tuple:
    """Something that differs whenever the catalog changed (rows, runs, journals, marks), read cheaply.

    A SQLite catalog: the size and modification time of the file and its WAL, two stat calls; every
    committed write changes one of them. Another database (--url): images_token, read from the
    catalog (marks made by other processes are seen there only with the next change to the images;
    this server's own writes are counted by the Reader anyway)."""
    file = library.catalog.catalog_file
    if file is not None:
        return tuple(_stat(path) for path in (str(file), f"{file}-wal"))
    return images_token(library)


def images_token(library: Library) -> tuple:
    """The state candidate pairs depend on, read from the catalog (one snapshot), marks left out:
    rows per status, the highest row id, the last run and its status, the journals' states and each
    index checkpoint. Apply, undo and index runs move it; a row re-embedded in place during an index
    run moves it at the run's next index checkpoint (for indexes with lists on disk: when the run
    ends), or when the run ends."""
    with library.catalog.session() as s:
        counts = tuple(sorted(s.execute(select(ImageRow.status, func.count()).group_by(ImageRow.status)).all()))
        highest = s.scalar(select(func.max(ImageRow.id)))
        last = s.execute(select(RunRow.id, RunRow.status).order_by(RunRow.id.desc()).limit(1)).first()
        journals = tuple(s.execute(select(JournalRow.name, JournalRow.undone_at, JournalRow.purged_at)
                                   .order_by(JournalRow.name)).all())
        checkpoints = tuple(s.execute(select(IndexFileRow.kind, IndexFileRow.checksum, IndexFileRow.count)
                                      .order_by(IndexFileRow.kind)).all())
    return counts, highest, None if last is None else tuple(last), journals, checkpoints


def marks_token(library: Library) -> tuple:
    """The "not a duplicate" marks' state: how many, and the newest (a removal lowers the count)."""
    with library.catalog.session() as s:
        return tuple(s.execute(select(func.count(), func.max(NotDuplicateRow.created_at))
                               .select_from(NotDuplicateRow)).one())


def _stat(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


class Reader:
    """The shared read-only `LibrarySearch`, reopened when the catalog changed (see module doc).

    `writes` counts this server's own writes (apply, undo, marks): each one makes the next request
    look again at once, whatever the file times say, and is part of the marks token (so a plan is
    regrouped after this server's mark even where the catalog could not tell).

    A reload opens the new reader without holding the lock that requests take: while it loads the
    FAISS indexes, requests go on with the previous reader. The previous one is closed once swapped
    out: closing disposes its catalog's idle connections only, so a request still using it finishes
    (its session keeps its connection; its indexes live while it holds them)."""

    def __init__(self, place: LibraryPlace) -> None:
        self.place = place
        self._lock = threading.Lock()  # held only to read or swap the fields below: never while loading
        self._reloading = threading.Lock()  # one reload at a time
        self._search: LibrarySearch | None = None
        self._token: Token | None = None
        self._opened_at = 0.0
        self._encoder = None
        self.writes = 0

    def search(self) -> LibrarySearch:
        """The reader for searches and files (opened on first use; NotIndexedError before the first
        index run), reloaded when the catalog changed, at most every READER_REFRESH_SECONDS."""
        with self._lock:
            if self._search is not None and time.monotonic() - self._opened_at < READER_REFRESH_SECONDS:
                return self._search
        return self._current()[0]

    def current(self) -> tuple[LibrarySearch, Token]:
        """The reader and the change token it is at least as fresh as, reloaded now if the catalog
        changed (unless another request is reloading it: then the reader in use, with its own token):
        for what is cached by that token (duplicate groups), which must not be built from indexes
        older than the token says."""
        return self._current()

    def token(self) -> Token:
        return self.current()[1]

    def _current(self) -> tuple[LibrarySearch, Token]:
        with self._lock:
            current, token = self._search, self._token
        if current is None:
            self._reloading.acquire()  # nothing to serve from yet: wait for the first load
        elif not self._reloading.acquire(blocking=False):
            return current, token  # another request is reloading: serve from the reader in use
        try:
            with self._lock:
                current, token = self._search, self._token  # another thread may have swapped it meanwhile
            if current is not None:
                files = self._files_of(current.library)
                if files == token.files:
                    return self._keep(current, token)
                images = images_token(current.library)
                if images == token.images:  # marks only (or nothing the indexes hold): no reload
                    return self._keep(current, Token(files, images, self._marks_of(current.library)))
            fresh, token = self._load()
            with self._lock:
                old, self._search, self._token, self._opened_at = self._search, fresh, token, time.monotonic()
            if old is not None:
                old.close()  # safe for a request still using it: see the class doc
            return fresh, token
        finally:
            self._reloading.release()

    def _keep(self, current: LibrarySearch, token: Token) -> tuple[LibrarySearch, Token]:
        with self._lock:
            self._token, self._opened_at = token, time.monotonic()
        return current, token

    def _load(self) -> tuple[LibrarySearch, Token]:
        """A new reader and its token, read before the indexes load (they are at least this fresh)."""
        library = self.place.open()
        try:
            token = Token(self._files_of(library), images_token(library), self._marks_of(library))
            return LibrarySearch(library, self._encoder, owns_library=True), token
        except BaseException:
            library.close()
            raise

    def _files_of(self, library: Library) -> tuple:
        return (self.writes, change_token(library))

    def _marks_of(self, library: Library) -> tuple:
        return (self.writes, marks_token(library))

    def wrote(self) -> None:
        """This server changed the library: look again on the next request."""
        with self._lock:
            self.writes += 1
            self._opened_at = 0.0

    def with_encoder(self) -> LibrarySearch:
        """The reader with the library's model loaded (for search by upload), loaded once."""
        searcher = self.search()
        with self._lock:
            if self._encoder is None:
                from dinoseek.model import encoder_for_library

                self._encoder = encoder_for_library(searcher.library.manifest(), self.place.weights or self.place.model,
                                                    root=searcher.library.root, device=self.place.device,
                                                    precision=self.place.precision)
            if searcher.encoder is None:
                searcher.library.check_model(self._encoder.manifest())
                searcher.encoder = self._encoder
        return searcher

    def close(self) -> None:
        with self._lock:
            if self._search is not None:
                self._search.close()
                self._search = None
