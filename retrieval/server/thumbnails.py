"""Thumbnails of library photos, made once and kept in the library folder (`thumbnails/`).

Named by the file's content (sha256 and size) and the thumbnail's side, not by its path: a renamed
or moved photo reuses its thumbnail, an edited one gets a new one. Decoded through the indexer's own
path (indexer.decode.read_image: regular files only, pixel cap, format allowlist, JPEG draft
decoding, EXIF orientation applied), so a thumbnail is upright and a bomb is refused. The pixels
come from the photo's one checked open file (files.ServedFile.open), never from its path again.

Sides are snapped to a few fixed ones (SIDES), so the cache holds at most that many files per
photo whatever sizes are asked for; at most DECODE_SLOTS decodes run at once, so a page of
thumbnails asked for together cannot take every thread and all the memory.
"""

from __future__ import annotations

import io
import os
import tempfile
import threading
from pathlib import Path

from dinoseek.indexer.decode import read_image
from dinoseek.indexer.errors import DecodeError

from .files import ServedFile, fd_path

FOLDER = "thumbnails"
SIDES = (128, 256, 512, 1024)  # the sides made; any size asked for is served as one of these
DECODE_SLOTS = threading.BoundedSemaphore(4)  # decodes at once, across every request
QUALITY = 85


class ThumbnailError(Exception):
    """The photo could not be decoded into a thumbnail (one line: why)."""


class Thumbnails:
    def __init__(self, library_folder: Path) -> None:
        self.folder = Path(library_folder) / FOLDER

    def path_for(self, sha256: str, size: int, side: int) -> Path:
        return self.folder / sha256[:2] / f"{sha256}-{size}-{side}.jpg"

    def get(self, photo: ServedFile, side: int) -> bytes:
        """JPEG bytes of `photo`'s thumbnail, at most `snap(side)` pixels on its long side."""
        sha256, size, side = photo.sha256, photo.size, snap(side)
        cached = self.path_for(sha256, size, side)
        try:
            return cached.read_bytes()
        except FileNotFoundError:
            pass
        with DECODE_SLOTS:
            with photo.open() as handle:
                try:
                    decoded = read_image(fd_path(handle), min_side=side)
                except DecodeError as e:
                    raise ThumbnailError(e.reason) from e
            image = decoded.image
            image.thumbnail((side, side))
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=QUALITY)
            data = buffer.getvalue()
        if decoded.sha256 == sha256 and decoded.size == size:  # the file is still the one indexed
            self._store(cached, data)
        return data

    def _store(self, path: Path, data: bytes) -> None:
        """Written whole or not at all (a temp file renamed): a reader never sees half a JPEG. A
        library folder that cannot be written just means thumbnails are made again each time."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, temp = tempfile.mkstemp(dir=path.parent, prefix=".thumb-", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(temp, path)
            except BaseException:
                _unlink_quietly(temp)
                raise
        except OSError:
            pass


def snap(side: int) -> int:
    """The smallest of SIDES at least `side` (the largest for anything bigger)."""
    return next((s for s in SIDES if s >= side), SIDES[-1])


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
