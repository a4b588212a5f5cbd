"""Opening the catalog database: the SQLite file checked before it is trusted, engines with our pragmas.

A damaged or foreign file is refused with LibraryError and a way out (`restore_hint`), never
replaced by a new catalog. Everything here runs before the catalog gateway exists.
"""

from __future__ import annotations

import os
import stat
import urllib.parse
from pathlib import Path

from sqlalchemy import URL, create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DatabaseError

from .errors import LibraryError

CATALOG_NAME = "catalog.sqlite"
# Files only a library that had a catalog leaves behind: their presence without one means it was lost.
LIBRARY_TRACES = ("*.faiss", "journals", "quarantine", "catalog.sqlite.bak-*", "catalog.sqlite-wal", "library-id")


def catalog_present(folder: Path, catalog_file: Path) -> bool:
    """Whether `catalog_file` holds a catalog (False: none yet, a new library may start).

    Checked before SQLite opens it, without opening it: a FIFO or device is refused (SQLite would
    block on it), and a missing or empty catalog in a folder that shows a library once had one is
    refused rather than replaced. Whether a regular file is an SQLite catalog, SQLite itself tells
    (check_catalog). The file is never opened here: closing any descriptor of a database file drops
    every POSIX lock this process holds on it, SQLite's included, and in a long-lived process (the
    server reopening its reader) another process could then checkpoint and delete the -wal under
    live connections and damage the catalog (sqlite.org/howtocorrupt.html, 2.2).
    """
    if not os.path.lexists(catalog_file) or (catalog_file.is_file() and catalog_file.stat().st_size == 0):
        traces = sorted({p.name for pattern in LIBRARY_TRACES for p in folder.glob(pattern)})
        if traces:
            raise LibraryError(f"{catalog_file} is missing or empty, but {folder} holds a library "
                               f"({', '.join(traces)}); if its catalog is on a database server, open it with that "
                               f"catalog's URL; otherwise {restore_hint(catalog_file)}")
        return False  # a new library (or a first run killed before its first write)
    try:
        st = os.stat(catalog_file)
    except OSError as e:
        raise LibraryError(f"{catalog_file} cannot be read as a catalog: {e.strerror or e}; "
                           f"{restore_hint(catalog_file)}") from e
    if not stat.S_ISREG(st.st_mode):
        raise LibraryError(f"{catalog_file} cannot be read as a catalog: not a regular file; "
                           f"{restore_hint(catalog_file)}")
    if not os.access(catalog_file, os.R_OK):
        raise LibraryError(f"{catalog_file} cannot be read as a catalog: Permission denied; "
                           f"{restore_hint(catalog_file)}")
    return True


def check_catalog(engine: Engine, catalog_file: Path, *, quick_check: bool) -> None:
    """Refuse an SQLite file that is not a dinoseek catalog or (for writers, who must never write
    into a malformed file) fails SQLite's quick check."""
    try:
        with engine.connect() as connection:
            if quick_check:
                result = [r[0] for r in connection.exec_driver_sql("PRAGMA quick_check(1)")]
                if result != ["ok"]:
                    raise LibraryError(f"{catalog_file} is damaged ({one_line(result[0])}); "
                                       f"{restore_hint(catalog_file)}")
            tables = {r[0] for r in connection.exec_driver_sql("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except (DatabaseError, UnicodeDecodeError) as e:  # a damaged schema's message may not even be UTF-8
        detail = e.orig if isinstance(e, DatabaseError) else "malformed database schema"
        raise LibraryError(f"{catalog_file} is not a dinoseek catalog (damaged? {one_line(detail)}); "
                           f"{restore_hint(catalog_file)}") from e
    if tables and "alembic_version" not in tables:  # no tables: a new catalog, migrated next
        raise LibraryError(f"{catalog_file} is an SQLite database but not a dinoseek catalog; "
                           f"{restore_hint(catalog_file)}")


def restore_hint(catalog_file: Path | None) -> str:
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


def one_line(detail) -> str:
    """SQLite's own messages may span lines (integrity check reports); errors here are one line."""
    return " ".join(str(detail).split())


def sqlite_engine(catalog_file: Path, *, read_only: bool) -> Engine:
    """The catalog file's engine. In a folder that cannot be written (a read-only mount), SQLite
    cannot create the -shm file WAL readers need: then the catalog is opened read-only, and
    `immutable` where no -wal file is left (everything is in the main file, nobody writes it)."""
    if not read_only:
        # URL.create, not an f-string: "?" or "%" in a folder name must not reach the URL parser.
        return url_engine(URL.create("sqlite", database=str(catalog_file)))
    query = {"mode": "ro", "uri": "true"}
    if not os.path.exists(f"{catalog_file}-wal"):
        query["immutable"] = "1"
    elif not os.path.exists(f"{catalog_file}-shm"):  # SQLite would have to create it to read the -wal
        raise LibraryError(f"{catalog_file.parent} is read-only and the catalog's last changes are still in "
                           f"{catalog_file.name}-wal; open the library once where its folder can be written")
    uri = "file:" + urllib.parse.quote(os.fsencode(catalog_file))  # a URI: "?", "#", "%" escaped
    return url_engine(URL.create("sqlite", database=uri, query=query), read_only=True)


def url_engine(url, read_only: bool = False) -> Engine:
    """An engine for any SQLAlchemy URL; SQLite ones get WAL and explicit transactions."""
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
