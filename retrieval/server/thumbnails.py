"""Thumbnails of library photos, made once and kept in the library folder (`thumbnails/`).

Named by the file's content (sha256 and size) and the thumbnail's side, not by its path: a renamed
or moved photo reuses its thumbnail, an edited one gets a new one. Decoded through the indexer's own
path (indexer.decode.read_image: regular files only, pixel cap, format allowlist, JPEG draft
decoding, EXIF orientation applied), so a thumbnail is upright and a bomb is refused.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

from dinoseek.indexer.decode import read_image
from dinoseek.indexer.errors import DecodeError

FOLDER = "thumbnails"
SIDES = (64, 1024)  # smallest and largest side asked for
QUALITY = 85


class ThumbnailError(Exception):
    """The photo could not be decoded into a thumbnail (one line: why)."""


class Thumbnails:
    def __init__(self, library_folder: Path) -> None:
        self.folder = Path(library_folder) / FOLDER

    def path_for(self, sha256: str, size: int, side: int) -> Path:
        return self.folder / sha256[:2] / f"{sha256}-{size}-{side}.jpg"

    def get(self, photo: Path, sha256: str, size: int, side: int) -> bytes:
        """JPEG bytes of `photo`'s thumbnail, at most `side` pixels on its long side."""
        side = min(max(side, SIDES[0]), SIDES[1])
        cached = self.path_for(sha256, size, side)
        try:
            return cached.read_bytes()
        except FileNotFoundError:
            pass
        try:
            decoded = read_image(photo, min_side=side)
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


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
