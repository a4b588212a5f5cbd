"""Photos served by catalog id only, never by a path from the request.

An id names a file only while its row is searchable (embedded, with vectors): rows removed,
quarantined by an apply, or that failed to decode name nothing. The row's path must then resolve
(symlinks followed) to a regular file inside the photo folder and outside the library folder; a
symlink leading out of ROOT, or a path with `..` in it, names nothing either.

The check and the read must be about the same file: a path swapped for a symlink between the two
would otherwise be served from outside ROOT. So the checked real path is opened once, without
following a final symlink (O_NOFOLLOW), the open file must be the inode that was checked (device
and inode numbers), and where the kernel names open files (/proc/self/fd) that name must still be
inside ROOT (a folder on the way swapped for a symlink); the bytes sent, and a thumbnail's pixels,
come from that open file only.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from dinoseek.indexer.decode import MAX_FILE_BYTES
from dinoseek.indexer.library import Library
from dinoseek.model.files import open_regular

CHUNK = 1 << 20
FD_NAMES = "/proc/self/fd"  # Linux: the kernel's name of each open file of this process
MEDIA_TYPES = {"JPEG": "image/jpeg", "MPO": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp",
               "GIF": "image/gif", "TIFF": "image/tiff", "BMP": "image/bmp", "AVIF": "image/avif",
               "HEIF": "image/heif"}


class FileNotServed(LookupError):
    """This id names no file the server may send (see the module doc); the API answers 404."""


@dataclass(frozen=True)
class ServedFile:
    path: Path  # resolved, inside the photo folder
    sha256: str
    size: int  # bytes, as the catalog recorded them
    format: str
    device: int  # st_dev and st_ino of `path` when it was checked: the file opened must be this one
    inode: int
    root: Path  # resolved photo folder and library folder, checked again on the open file
    library_folder: Path

    def open(self) -> BinaryIO:
        """The checked file, opened once: a regular file (never a FIFO or a device), within the
        size cap, not a symlink, the same inode that was checked, still inside ROOT. FileNotServed
        otherwise, naming the file only by its base name."""
        try:
            handle = open_regular(self.path, max_bytes=MAX_FILE_BYTES, follow_symlinks=False)
        except OSError as e:
            raise FileNotServed(f"{self.path.name}: {e.strerror or e}") from e
        try:
            opened = os.fstat(handle.fileno())
            if (opened.st_dev, opened.st_ino) != (self.device, self.inode) or not self._inside(handle.fileno()):
                raise FileNotServed(f"{self.path.name}: changed since it was checked")
        except BaseException:
            handle.close()
            raise
        return handle

    def _inside(self, fd: int) -> bool:
        if not os.path.isdir(FD_NAMES):
            return True  # no kernel name to check; the O_NOFOLLOW open and the inode check stand alone
        real = Path(os.path.realpath(f"{FD_NAMES}/{fd}"))
        return real.is_relative_to(self.root) and not real.is_relative_to(self.library_folder)


def served_file(library: Library, row_id: int) -> ServedFile:
    rows = library.catalog.members([row_id])
    if not rows:
        raise FileNotServed(f"no photo with id {row_id}")
    row = rows[0]
    root, library_folder = library.root.resolve(), library.folder.resolve()
    real = Path(os.path.realpath(root / os.fsdecode(row.path)))
    if not real.is_relative_to(root) or real.is_relative_to(library_folder):
        raise FileNotServed(f"no photo with id {row_id}")
    try:
        checked = os.lstat(real)
    except OSError as e:
        raise FileNotServed(f"no photo with id {row_id}") from e
    if not stat.S_ISREG(checked.st_mode):
        raise FileNotServed(f"no photo with id {row_id}")
    return ServedFile(real, row.sha256 or "", row.size, row.format or "", checked.st_dev, checked.st_ino,
                      root, library_folder)


def fd_path(handle: BinaryIO) -> str:
    """A name that opens exactly this open file again (not whatever its path names now), for
    readers that take a path: /proc/self/fd/N on Linux, /dev/fd/N on macOS and the BSDs."""
    folder = FD_NAMES if os.path.isdir(FD_NAMES) else "/dev/fd"
    return f"{folder}/{handle.fileno()}"


def file_chunks(photo: ServedFile) -> Iterator[bytes]:
    """The checked file's bytes in chunks, from the one open file (ServedFile.open); FileNotServed
    now, before any byte is sent, if it cannot be opened or is not the file that was checked."""
    handle = photo.open()

    def chunks() -> Iterator[bytes]:
        with handle:
            while block := handle.read(CHUNK):
                yield block

    return chunks()


def media_type(fmt: str) -> str:
    return MEDIA_TYPES.get(fmt, "application/octet-stream")
