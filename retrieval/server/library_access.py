"""How the server reaches the library: one shared reader, writers only for apply/undo/marks.

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

from dinoseek.indexer.library import Library
from dinoseek.retrieval.api import LibrarySearch

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


def change_token(library: Library) -> tuple:
    """Something that differs whenever the catalog changed (rows, runs, journals, marks), read cheaply.

    A SQLite catalog: the size and modification time of the file and its WAL, two stat calls; every
    committed write changes one of them. Another database (--url): row counts per status, the last
    run and the journals' states, read from the catalog (marks made by other processes are not seen
    there; this server's own writes clear its caches anyway)."""
    file = library.catalog.catalog_file
    if file is not None:
        return tuple(_stat(path) for path in (str(file), f"{file}-wal"))
    counts, _, last = library.catalog.summary()
    journals = library.catalog.journal_records()
    return (tuple(sorted(counts.items())), None if last is None else (last.id, last.status),
            tuple(sorted((name, r[3] is not None, r[4] is not None) for name, r in journals.items())))


def _stat(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


class Reader:
    """The shared read-only `LibrarySearch`, reopened when the catalog changed (see module doc).

    `writes` counts this server's own writes (apply, undo, marks): each one forces a reload and a
    new change token at once, whatever the file times say."""

    def __init__(self, place: LibraryPlace) -> None:
        self.place = place
        self._lock = threading.Lock()
        self._search: LibrarySearch | None = None
        self._token: tuple | None = None
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

    def current(self) -> tuple[LibrarySearch, tuple]:
        """The reader and the change token it is at least as fresh as, reloaded now if the catalog
        changed: for what is cached by that token (duplicate groups), which must not be built from
        indexes older than the token says."""
        with self._lock:
            return self._current()

    def token(self) -> tuple:
        return self.current()[1]

    def _current(self) -> tuple[LibrarySearch, tuple]:
        current = self._search
        if current is not None and self._token == self._token_of(current.library):
            self._opened_at = time.monotonic()
            return current, self._token
        library = self.place.open()
        try:
            token = self._token_of(library)  # read before the indexes load: they are at least this fresh
            fresh = LibrarySearch(library, self._encoder, owns_library=True)
        except BaseException:
            library.close()
            raise
        # The old reader is not closed: a request in another thread may still be using it; its
        # engine and indexes go when the last reference does.
        self._search, self._token, self._opened_at = fresh, token, time.monotonic()
        return fresh, token

    def _token_of(self, library: Library) -> tuple:
        return (self.writes, change_token(library))

    def wrote(self) -> None:
        """This server changed the library: reload on the next request."""
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
