"""A small photo collection with every awkward case the indexer must survive, made on the fly."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
from conftest import synthetic_photo
from PIL import Image

# name -> expected outcome: "ok" or the DecodeError status recorded for it
EXPECTED: dict[str, str] = {}


def _exif_rotated(path: Path, orientation: int) -> None:
    image = synthetic_photo(320, 200, seed=40 + orientation)
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[271], exif[272] = "Canon", "EOS 5D"
    exif.get_ifd(0x8769)[36867] = "2021:07:04 12:30:00"
    image.save(path, exif=exif, quality=92)


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A valid PNG signature and IHDR claiming width x height, with no pixel data (a bomb header)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(bytes(1024))  # a sliver of pixel data; the header is what matters
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def make_collection(root: Path) -> dict[str, str]:
    """Write the collection under root; return {relative path: expected status}."""
    expected: dict[str, str] = {}

    def ok(rel: str) -> Path:
        expected[rel] = "ok"
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def bad(rel: str, status: str) -> Path:
        path = ok(rel)
        expected[rel] = status
        return path

    synthetic_photo(640, 480, seed=1).save(ok("holiday/beach.jpg"), quality=90)
    synthetic_photo(500, 300, seed=2).save(ok("holiday/nested/deep/sunset.png"))
    synthetic_photo(300, 300, seed=3).save(ok("holiday/dune.webp"), quality=85)
    frames = [synthetic_photo(120, 90, seed=10 + i).convert("P") for i in range(3)]
    frames[0].save(ok("anim/loop.gif"), save_all=True, append_images=frames[1:], duration=100, loop=0)
    pages = [synthetic_photo(200, 150, seed=20 + i) for i in range(2)]
    pages[0].save(ok("scans/pages.tiff"), save_all=True, append_images=pages[1:])
    _exif_rotated(ok("camera/rotated6.jpg"), 6)
    _exif_rotated(ok("camera/rotated3.jpg"), 3)
    synthetic_photo(400, 300, seed=5).convert("CMYK").save(ok("print/cmyk.jpg"), quality=90)
    grey16 = (np.linspace(0, 65535, 256 * 200).reshape(200, 256)).astype(np.uint16)
    Image.fromarray(grey16).save(ok("scans/grey16.png"))  # I;16
    rgba = synthetic_photo(256, 256, seed=6).convert("RGBA")
    rgba.putalpha(128)
    rgba.save(ok("web/alpha.png"))
    full = root / "broken" / "truncated.jpg"
    data = _jpeg_bytes(synthetic_photo(800, 600, seed=7))
    bad("broken/truncated.jpg", "truncated").write_bytes(data[: len(data) // 2])
    bad("broken/empty.jpg", "empty").write_bytes(b"")
    bad("broken/page.jpg", "unidentified").write_text("<!doctype html><html><body>404</body></html>")
    _png_header_only(bad("broken/bomb.png", "too-large"), 40000, 40000)
    bad("broken/layers.psd", "unsupported").write_bytes(_psd_bytes())
    (root / ".hidden").mkdir()
    synthetic_photo(100, 100, seed=8).save(root / ".hidden" / "secret.jpg")  # skipped, not recorded
    os.symlink(root / "holiday", root / "holiday" / "nested" / "loop")  # a symlink loop (not followed)
    weird = os.fsdecode(b"odd-\xff\xfe-name.jpg")
    synthetic_photo(210, 160, seed=9).save(ok(weird), quality=90)
    (root / "notes.txt").write_text("not a photo, not an image extension: ignored")
    assert not full.with_suffix(".tmp").exists()
    return expected


def _jpeg_bytes(image: Image.Image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _psd_bytes() -> bytes:
    """A minimal Photoshop header (8BPS, 1 channel, 4x4, 8-bit greyscale) that Pillow identifies."""
    header = b"8BPS" + struct.pack(">H6xHIIHH", 1, 1, 4, 4, 8, 1)
    sections = struct.pack(">I", 0) * 3  # colour mode data, image resources, layer info: empty
    return header + sections + struct.pack(">H", 0) + bytes(16)
