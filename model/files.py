"""Opening files that must be regular files, with a size cap, without ever blocking.

Used by every layer (model is the lowest one): photos, query images, index files, catalogs and
weights. A path swapped for a FIFO would block `open()` forever and a symlink to `/dev/zero` would
be read until memory runs out; both are refused here in bounded time.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from typing import BinaryIO

HASH_CHUNK = 1 << 20  # bytes per read when hashing: files of any size hash in constant memory


class NotRegularFileError(OSError):
    """The path is a FIFO, device, socket or folder where a regular file is expected."""


class FileTooLargeError(OSError):
    """The file is larger than the reader's cap."""


def open_regular(path: str | bytes | os.PathLike, *, max_bytes: int | None = None,
                 follow_symlinks: bool = True) -> BinaryIO:
    """Open `path` for reading in binary mode if it is a regular file of at most `max_bytes`.

    O_NONBLOCK makes opening a FIFO return at once (then refused by fstat) instead of waiting for a
    writer; the stat before opening keeps device files (tapes, terminals) from being opened at all;
    the fstat after closes the gap of a swap in between. `follow_symlinks=False` refuses a symlink
    as the last component (O_NOFOLLOW).
    """
    _check(os.stat(path, follow_symlinks=follow_symlinks), path, max_bytes)
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    if not follow_symlinks:
        flags |= os.O_NOFOLLOW
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if e.errno == errno.ELOOP and not follow_symlinks:
            raise NotRegularFileError(errno.ELOOP, "is a symbolic link, expected a regular file", path) from e
        raise
    try:
        _check(os.fstat(fd), path, max_bytes)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str | bytes | os.PathLike, *, max_bytes: int | None = None,
                 follow_symlinks: bool = True) -> bytes:
    """The whole content of a regular file, never more than `max_bytes`: a file that grows while
    being read is read on up to the cap, and refused (FileTooLargeError) beyond it."""
    with open_regular(path, max_bytes=max_bytes, follow_symlinks=follow_symlinks) as f:
        if max_bytes is None:
            return f.read()
        # read(n) allocates n bytes before reading: asking for the cap (1 GiB for photos) cost a
        # 1 GiB mapping per file, which made reading and hashing a 12 MP JPEG 1.6x slower (more
        # across threads; benchmarks/read.py). The size fstat gives is asked for instead, plus one
        # byte to see whether the file has grown; if it has, reading goes on up to the cap.
        expected = min(os.fstat(f.fileno()).st_size, max_bytes)
        chunks = [f.read(expected + 1)]
        total = len(chunks[0])
        while total > expected and total <= max_bytes and (chunk := f.read(min(HASH_CHUNK, max_bytes + 1 - total))):
            chunks.append(chunk)  # grown since: read on in chunks (each read allocates its size)
            total += len(chunk)
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    if len(data) > max_bytes:
        raise FileTooLargeError(errno.EFBIG, f"grew beyond the {max_bytes:,}-byte limit while being read", path)
    return data


def hash_into(digest, f: BinaryIO) -> None:
    """Feed the rest of the open binary file `f` to `digest` (a hashlib object), chunk by chunk."""
    for chunk in iter(lambda: f.read(HASH_CHUNK), b""):
        digest.update(chunk)


def sha256_file(source: BinaryIO | str | bytes | os.PathLike, *, follow_symlinks: bool = True) -> str:
    """Hex sha256 of a file's bytes, streamed. `source` is a path, opened with `open_regular` (so a
    FIFO or device is refused, and `follow_symlinks=False` refuses a symlink), or a binary file
    object already open, hashed from its current position: callers that must fstat the very
    descriptor they hash open it themselves."""
    digest = hashlib.sha256()
    if isinstance(source, (str, bytes, os.PathLike)):
        with open_regular(source, follow_symlinks=follow_symlinks) as f:
            hash_into(digest, f)
    else:
        hash_into(digest, source)
    return digest.hexdigest()


def _check(st: os.stat_result, path, max_bytes: int | None) -> None:
    if stat.S_ISDIR(st.st_mode):
        raise NotRegularFileError(errno.EISDIR, "is a folder, expected a regular file", path)
    if stat.S_ISLNK(st.st_mode):
        raise NotRegularFileError(errno.ELOOP, "is a symbolic link, expected a regular file", path)
    if not stat.S_ISREG(st.st_mode):
        raise NotRegularFileError(errno.EINVAL, "is not a regular file (FIFO, device or socket)", path)
    if max_bytes is not None and st.st_size > max_bytes:
        raise FileTooLargeError(errno.EFBIG, f"{st.st_size:,} bytes is more than the {max_bytes:,}-byte limit", path)
