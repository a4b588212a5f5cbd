"""Photos served by catalog id only, never by a path from the request.

An id names a file only while its row is searchable (embedded, with vectors): rows removed,
quarantined by an apply, or that failed to decode name nothing. The row's path must then resolve
(symlinks followed) to a regular file inside the photo folder and outside the library folder; a
symlink leading out of ROOT, or a path with `..` in it, names nothing either.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from dinoseek.indexer.decode import MAX_FILE_BYTES
from dinoseek.indexer.library import Library
from dinoseek.model.files import open_regular

CHUNK = 1 << 20
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


def served_file(library: Library, row_id: int) -> ServedFile:
    rows = library.catalog.members([row_id])
    if not rows:
        raise FileNotServed(f"no photo with id {row_id}")
    row = rows[0]
    root = library.root.resolve()
    real = Path(os.path.realpath(root / os.fsdecode(row.path)))
    if not real.is_relative_to(root) or real.is_relative_to(library.folder.resolve()) or not real.is_file():
        raise FileNotServed(f"no photo with id {row_id}")
    return ServedFile(real, row.sha256 or "", row.size, row.format or "")


def file_chunks(path: Path) -> Iterator[bytes]:
    """The file's bytes in chunks, opened as a regular file only (a path swapped for a FIFO or a
    device since it was checked is refused, never read); FileNotServed if it cannot be opened."""
    try:
        handle = open_regular(path, max_bytes=MAX_FILE_BYTES)
    except OSError as e:
        raise FileNotServed(f"{path.name}: {e.strerror or e}") from e

    def chunks() -> Iterator[bytes]:
        with handle:
            while block := handle.read(CHUNK):
                yield block

    return chunks()


def media_type(fmt: str) -> str:
    return MEDIA_TYPES.get(fmt, "application/octet-stream")
