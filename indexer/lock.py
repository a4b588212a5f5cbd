"""The writer lock of a library folder: one writer at a time, readers never wait.

A POSIX record lock on `FOLDER/lock`, which also holds the writer's pid so the refusal can name it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
from pathlib import Path

from .errors import LibraryLockedError

LOCK_FILE = "lock"
# POSIX locks don't conflict within one process: folders this process holds are tracked here, and
# checked and claimed under one mutex (a server's threads may both try to apply at once).
_LOCKED_HERE: set[Path] = set()
_CLAIMING = threading.Lock()


def _busy(folder: Path, holder: object) -> LibraryLockedError:
    return LibraryLockedError(f"{folder} is being written by pid {holder} (an index, apply, undo, purge or "
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
                raise _busy(folder, os.getpid())
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
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
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
