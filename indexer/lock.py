"""The writer lock of a library: one writer at a time, readers never wait.

A POSIX record lock on `FOLDER/lock`, which also holds the writer's pid so the refusal can name it;
with a PostgreSQL catalog also an advisory lock in the database (`CatalogLock`), which writers on
other machines meet.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import socket
import threading
import time
from pathlib import Path

from sqlalchemy import Connection, Engine, text

from .errors import LibraryLockedError

LOCK_FILE = "lock"
# POSIX locks don't conflict within one process: folders this process holds are tracked here, and
# checked and claimed under one mutex (a server's threads may both try to apply at once).
_LOCKED_HERE: set[Path] = set()
_CLAIMING = threading.Lock()


def _busy(where: object, holder: str) -> LibraryLockedError:
    return LibraryLockedError(f"{where} is being written by {holder} (an index, apply, undo, purge or "
                              f"repair); wait for it to finish")


class WriterLock:
    """The lock on one library folder, held from `take` until `release`."""

    def __init__(self, folder: Path, fd: int) -> None:
        self.folder, self._fd = folder, fd

    @classmethod
    def take(cls, folder: Path) -> "WriterLock":
        """Take the lock or raise LibraryLockedError naming the process that holds it."""
        with _CLAIMING:
            if folder in _LOCKED_HERE:
                raise _busy(folder, f"pid {os.getpid()}")
            _LOCKED_HERE.add(folder)
        try:
            fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except BaseException:
            _LOCKED_HERE.discard(folder)
            raise
        try:
            # A POSIX record lock, not flock: it is not inherited by forked decode workers, so it goes
            # away with the writer itself even if orphaned workers linger for a moment.
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
            holder = f"pid {pid}" if pid else "another process"
            os.close(fd)
            _LOCKED_HERE.discard(folder)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise _busy(folder, holder) from e
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        return cls(folder, fd)

    def release(self) -> None:
        """Give the lock up (closing the file drops the POSIX lock); a second call does nothing."""
        if self._fd is None:
            return
        os.close(self._fd)
        self._fd = None
        _LOCKED_HERE.discard(self.folder)


# The advisory lock key of a catalog's writer: one catalog per database, so one key for all. A
# fixed 64-bit number (the first 8 bytes of a hash of its name), not a per-folder one: two mount
# paths of one library must meet on the same key.
ADVISORY_KEY = int.from_bytes(hashlib.sha256(b"dinoseek catalog writer").digest()[:8], "big", signed=True)
# How long a writer keeps trying before it is refused. A killed writer's lock goes with its session,
# but only once the server has seen the connection close and ended the session: a writer started just
# after the kill (a re-run, a repair) met a lock still held by the dead pid. Moments, on a live server.
RELEASE_GRACE_SECONDS = 3.0


class CatalogLock:
    """The writer lock held inside a PostgreSQL catalog: a session-level advisory lock, so writers on
    other machines (where the POSIX lock on the library folder may not reach) are refused too.

    The lock lives as long as the connection that took it: held open until `release`, and dropped
    by the server when the writer dies (a SIGKILLed writer's session ends with its socket).
    """

    def __init__(self, connection: Connection) -> None:
        self._connection: Connection | None = connection

    @classmethod
    def take(cls, engine: Engine) -> "CatalogLock | None":
        """Take the lock on `engine`'s catalog or raise LibraryLockedError naming the holder; None for
        catalogs without one (SQLite: the catalog file sits in the library folder, under the POSIX lock)."""
        if engine.dialect.name != "postgresql":
            return None
        connection = engine.connect()
        try:
            deadline = time.monotonic() + RELEASE_GRACE_SECONDS
            while not connection.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": ADVISORY_KEY}).scalar():
                if time.monotonic() >= deadline:
                    raise _busy(engine.url.render_as_string(hide_password=True), _advisory_holder(connection))
                connection.rollback()
                time.sleep(0.05)
            # Shown in pg_stat_activity: what a refused writer on another machine names.
            name = f"dinoseek writer pid {os.getpid()} on {socket.gethostname()}"[:63]
            connection.execute(text("SELECT set_config('application_name', :name, false)"), {"name": name})
            connection.commit()  # the lock is the session's: it outlives this transaction
        except BaseException:
            # Never back into the pool: its session may hold the lock (the pool only rolls back).
            connection.invalidate()
            raise
        return cls(connection)

    def release(self) -> None:
        """Give the lock up; a second call does nothing."""
        connection, self._connection = self._connection, None
        if connection is None:
            return
        try:
            connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": ADVISORY_KEY})
            connection.commit()
        except Exception:  # noqa: BLE001 - a lost connection has lost its lock already
            pass
        finally:
            connection.close()


def _advisory_holder(connection: Connection) -> str:
    """Who holds the advisory lock, as pg_stat_activity names it (its application name and host)."""
    row = connection.execute(text(
        "SELECT a.application_name, a.client_addr, a.pid FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
        "WHERE l.locktype = 'advisory' AND l.granted AND l.classid = :high AND l.objid = :low AND l.objsubid = 1"),
        {"high": (ADVISORY_KEY >> 32) & 0xFFFFFFFF, "low": ADVISORY_KEY & 0xFFFFFFFF}).first()
    connection.rollback()
    if row is None:
        return "another writer"
    name, address, backend = row
    where = f" from {address}" if address else ""
    return f"{name or 'a client'} (server process {backend}{where})"
